//! The relay's published limits ([`RelayLimits`]): what the mailbox rules enforce, what
//! `Info` answers, and the `[limits]` table of the relay config.
//!
//! Invariant (checked by [`RelayLimits::validate`]): every limit is at least 1 (except
//! `max_prekeys_per_mailbox` and `mailbox_idle_secs`, where 0 means "none" and "never"),
//! `min_ttl_secs <= default_ttl_secs <= max_ttl_secs`, an envelope of the largest allowed
//! size fits the byte quota and a fetch page, and no value exceeds what the wire protocol
//! can carry.

use serde::{Deserialize, Serialize};

use crate::wire::{MAX_ENVELOPE_BYTES, MAX_FETCH_BYTES};

/// Largest `fetch_max_items` (a page of that many empty items still fits a response frame).
pub const MAX_FETCH_ITEMS: u32 = 8192;
/// Largest `max_prekeys_per_mailbox`.
pub const MAX_PREKEYS_CAP: u32 = 10_000;
/// Default `mailbox_idle_secs`: 90 days.
pub const DEFAULT_MAILBOX_IDLE_SECS: u64 = 90 * 24 * 3600;
/// Largest `mailbox_idle_secs`: 100 years (keeps `registered_at + idle` far from overflow
/// and every value printable as a TOML integer).
pub const MAX_MAILBOX_IDLE_SECS: u64 = 100 * 365 * 24 * 3600;

/// The limits a relay enforces and publishes (`Info`). Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayLimits {
    /// Largest envelope accepted, in bytes. Default: 98304 (96 KiB, also the protocol's
    /// maximum).
    pub max_envelope_bytes: u32,
    /// Most envelopes stored per mailbox. Default: 10000.
    pub quota_count: u32,
    /// Most envelope bytes stored per mailbox. Default: 268435456 (256 MiB).
    pub quota_bytes: u64,
    /// Shortest lifetime of a stored envelope; shorter requests are raised to it.
    /// Default: 3600 (1 hour).
    pub min_ttl_secs: u64,
    /// Lifetime of an envelope deposited without a TTL. Default: 1209600 (14 days).
    pub default_ttl_secs: u64,
    /// Longest lifetime; longer requests are cut to it. Default: 2592000 (30 days).
    pub max_ttl_secs: u64,
    /// Write requests (register, deposit, publish, claim) per second accepted from one
    /// peer, sustained. Default: 100.
    pub sender_rate_per_sec: u32,
    /// Write requests one peer may send in a burst. Default: 1000.
    pub sender_burst: u32,
    /// Most mailboxes this relay holds. Default: 10000.
    pub max_mailboxes: u32,
    /// Most token hashes registered per mailbox (about one per contact). Default: 1024.
    pub max_tokens_per_mailbox: u32,
    /// Most one-time prekeys held per mailbox. Default: 100.
    pub max_prekeys_per_mailbox: u32,
    /// Most items in one fetch page. Default: 1000.
    pub fetch_max_items: u32,
    /// Most envelope bytes in one fetch page (plus a fixed overhead per item). Default:
    /// 1047552 (the response frame of 1 MiB less 1 KiB), also the maximum.
    pub fetch_max_bytes: u32,
    /// Seconds after its owner's last `Register` at which a mailbox is deleted with
    /// everything in it (token hashes, envelopes, prekeys), so a relay does not keep
    /// abandoned mailboxes forever. Only the owner's `Register` restarts the clock:
    /// deposits and prekey claims by others never do. 0: mailboxes never expire (and what
    /// an `Info` from a relay older than this field decodes to). Default: 7776000 (90
    /// days); at most [`MAX_MAILBOX_IDLE_SECS`]. Last field: see the wire compatibility
    /// note in docs/PROTOCOL.md.
    pub mailbox_idle_secs: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: MAX_ENVELOPE_BYTES,
            quota_count: 10_000,
            quota_bytes: 256 * 1024 * 1024,
            min_ttl_secs: 3600,
            default_ttl_secs: 14 * 24 * 3600,
            max_ttl_secs: 30 * 24 * 3600,
            sender_rate_per_sec: 100,
            sender_burst: 1000,
            max_mailboxes: 10_000,
            max_tokens_per_mailbox: 1024,
            max_prekeys_per_mailbox: 100,
            fetch_max_items: 1000,
            fetch_max_bytes: MAX_FETCH_BYTES,
            mailbox_idle_secs: DEFAULT_MAILBOX_IDLE_SECS,
        }
    }
}

/// A limit that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limits.{field}: {message}")]
pub struct LimitsError {
    /// The offending field (as named in the `[limits]` table).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl RelayLimits {
    /// Checks the invariants listed in the module docs.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let err = |field, message: String| Err(LimitsError { field, message });
        let at_least_one: [(&'static str, u64); 12] = [
            ("max_envelope_bytes", self.max_envelope_bytes.into()),
            ("quota_count", self.quota_count.into()),
            ("quota_bytes", self.quota_bytes),
            ("min_ttl_secs", self.min_ttl_secs),
            ("default_ttl_secs", self.default_ttl_secs),
            ("max_ttl_secs", self.max_ttl_secs),
            ("sender_rate_per_sec", self.sender_rate_per_sec.into()),
            ("sender_burst", self.sender_burst.into()),
            ("max_mailboxes", self.max_mailboxes.into()),
            ("max_tokens_per_mailbox", self.max_tokens_per_mailbox.into()),
            ("fetch_max_items", self.fetch_max_items.into()),
            ("fetch_max_bytes", self.fetch_max_bytes.into()),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return err(field, "must be at least 1".into());
            }
        }
        if self.max_envelope_bytes > MAX_ENVELOPE_BYTES {
            return err(
                "max_envelope_bytes",
                format!(
                    "{} exceeds the protocol maximum {MAX_ENVELOPE_BYTES}",
                    self.max_envelope_bytes
                ),
            );
        }
        if self.quota_bytes < u64::from(self.max_envelope_bytes) {
            return err(
                "quota_bytes",
                format!(
                    "{} is smaller than max_envelope_bytes {}",
                    self.quota_bytes, self.max_envelope_bytes
                ),
            );
        }
        if self.default_ttl_secs < self.min_ttl_secs || self.default_ttl_secs > self.max_ttl_secs {
            return err(
                "default_ttl_secs",
                format!(
                    "{} is outside [min_ttl_secs {}, max_ttl_secs {}]",
                    self.default_ttl_secs, self.min_ttl_secs, self.max_ttl_secs
                ),
            );
        }
        // Keeps `now + ttl` far from overflow for any plausible clock.
        if self.max_ttl_secs > 10 * 365 * 24 * 3600 {
            return err(
                "max_ttl_secs",
                format!("{} is more than 10 years", self.max_ttl_secs),
            );
        }
        if self.max_prekeys_per_mailbox > MAX_PREKEYS_CAP {
            return err(
                "max_prekeys_per_mailbox",
                format!(
                    "{} exceeds the maximum {MAX_PREKEYS_CAP}",
                    self.max_prekeys_per_mailbox
                ),
            );
        }
        if self.fetch_max_items > MAX_FETCH_ITEMS {
            return err(
                "fetch_max_items",
                format!(
                    "{} exceeds the maximum {MAX_FETCH_ITEMS}",
                    self.fetch_max_items
                ),
            );
        }
        if self.mailbox_idle_secs > MAX_MAILBOX_IDLE_SECS {
            return err(
                "mailbox_idle_secs",
                format!(
                    "{} is more than 100 years (use 0 to never expire mailboxes)",
                    self.mailbox_idle_secs
                ),
            );
        }
        if self.fetch_max_bytes > MAX_FETCH_BYTES {
            return err(
                "fetch_max_bytes",
                format!(
                    "{} exceeds the maximum {MAX_FETCH_BYTES} (a page must fit a response frame)",
                    self.fetch_max_bytes
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let l = RelayLimits::default();
        l.validate().unwrap();
        assert_eq!(l.max_envelope_bytes, 96 * 1024);
        assert_eq!(l.quota_count, 10_000);
        assert_eq!(l.quota_bytes, 256 << 20);
        assert_eq!(l.min_ttl_secs, 3600);
        assert_eq!(l.default_ttl_secs, 14 * 86400);
        assert_eq!(l.max_ttl_secs, 30 * 86400);
        assert_eq!(l.max_prekeys_per_mailbox, 100);
        assert_eq!(l.mailbox_idle_secs, 90 * 86400);
    }

    #[test]
    fn each_invariant_is_checked() {
        let bad = |f: fn(&mut RelayLimits), field: &str| {
            let mut l = RelayLimits::default();
            f(&mut l);
            let e = l.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        };
        bad(|l| l.quota_count = 0, "quota_count");
        bad(|l| l.sender_burst = 0, "sender_burst");
        bad(
            |l| l.max_envelope_bytes = MAX_ENVELOPE_BYTES + 1,
            "max_envelope_bytes",
        );
        bad(|l| l.quota_bytes = 10, "quota_bytes");
        bad(|l| l.default_ttl_secs = 10, "default_ttl_secs");
        bad(
            |l| l.default_ttl_secs = l.max_ttl_secs + 1,
            "default_ttl_secs",
        );
        bad(|l| l.max_ttl_secs = u64::MAX, "max_ttl_secs");
        bad(
            |l| l.max_prekeys_per_mailbox = MAX_PREKEYS_CAP + 1,
            "max_prekeys_per_mailbox",
        );
        bad(
            |l| l.fetch_max_items = MAX_FETCH_ITEMS + 1,
            "fetch_max_items",
        );
        bad(
            |l| l.fetch_max_bytes = MAX_FETCH_BYTES + 1,
            "fetch_max_bytes",
        );
        bad(
            |l| l.mailbox_idle_secs = MAX_MAILBOX_IDLE_SECS + 1,
            "mailbox_idle_secs",
        );
        // Zero prekeys is allowed: the relay then keeps no prekeys.
        let l = RelayLimits {
            max_prekeys_per_mailbox: 0,
            ..RelayLimits::default()
        };
        l.validate().unwrap();
        // Zero idle seconds is allowed: mailboxes never expire; the cap itself is valid.
        for idle in [0, 1, MAX_MAILBOX_IDLE_SECS] {
            let l = RelayLimits {
                mailbox_idle_secs: idle,
                ..RelayLimits::default()
            };
            l.validate().unwrap();
        }
    }
}
