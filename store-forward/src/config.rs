//! The relay's configuration: `relay.toml`, its documented defaults, and `TERN_RELAY_*`
//! environment overrides.
//!
//! Precedence, highest first: command-line flags (applied by the CLI), environment
//! variables ([`RelayConfig::apply_env`]), the TOML file, the defaults below. Unknown keys
//! in the file and unknown `TERN_RELAY_*` variables are errors, never silently ignored, so a
//! typo cannot quietly leave a setting at its default. `TERN_RELAY_CONFIG` is reserved for
//! the CLI (the path of the file) and skipped here.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{limits::RelayLimits, server::ServerOptions};

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "TERN_RELAY_";
/// The variable the CLI reads the config path from; [`RelayConfig::apply_env`] skips it.
pub const ENV_CONFIG_PATH: &str = "TERN_RELAY_CONFIG";

/// Why a relay configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("invalid relay config {origin}: {message}")]
    Parse {
        /// The file (or `<string>`).
        origin: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid relay config: {field}: {message}")]
    Invalid {
        /// The offending key (`limits.quota_count` for the limits table).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// An environment override is unknown or has a bad value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

/// The settings of a relay (`tern relay --config relay.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Peer listen addresses (multiaddrs). Default: `/ip4/0.0.0.0/tcp/4001` and
    /// `/ip4/0.0.0.0/udp/4001/quic-v1`. Env: `TERN_RELAY_LISTEN` (comma-separated).
    pub listen: Vec<String>,
    /// Address of the admin HTTP endpoint (`/metrics`, `/healthz`); loopback only.
    /// Default: `127.0.0.1:9464`. Env: `TERN_RELAY_ADMIN_BIND`.
    pub admin_bind: SocketAddr,
    /// Whether new mailboxes are accepted; existing ones keep working either way.
    /// Default: `true`. Env: `TERN_RELAY_ACCEPT_REGISTRATIONS`.
    pub accept_registrations: bool,
    /// Logs as JSON lines instead of text. Default: `false`. Env: `TERN_RELAY_LOG_JSON`.
    pub log_json: bool,
    /// Most simultaneous peer connections. Default: 10000. Env: `TERN_RELAY_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// Seconds an idle connection stays open. Default: 120. Env:
    /// `TERN_RELAY_IDLE_TIMEOUT_SECS`.
    pub idle_timeout_secs: u64,
    /// Free disk space (MiB) kept in reserve; below it deposits are refused with
    /// `DiskFull`. Default: 256. Env: `TERN_RELAY_MIN_FREE_DISK_MB`.
    pub min_free_disk_mb: u64,
    /// Seconds between purges of expired envelopes and idle mailboxes. Default: 300. Env:
    /// `TERN_RELAY_PURGE_INTERVAL_SECS`.
    pub purge_interval_secs: u64,
    /// Seconds a SIGTERM waits for in-flight requests (no new ones are accepted) before
    /// the final flush and exit. Default: 10. Env: `TERN_RELAY_DRAIN_TIMEOUT_SECS`.
    pub drain_timeout_secs: u64,
    /// Most envelopes held, all mailboxes together: past it deposits are refused
    /// `RelayFull` (the index keeps about 150 bytes of memory per envelope). Default:
    /// 2000000. Env: `TERN_RELAY_MAX_STORED_ENVELOPES`.
    pub max_stored_envelopes: u64,
    /// MiB of fetch pages on their way to readers at most (a page waits in memory until
    /// its reader takes it); past it fetches are refused `RateLimited` and retried.
    /// Default: 64. Env: `TERN_RELAY_MAX_FETCH_IN_FLIGHT_MB`.
    pub max_fetch_in_flight_mb: u64,
    /// How long a group commit's flush may take before the mailbox database stops
    /// (sled 0.34 can wait forever after a failed background write). Not in the file:
    /// 30 s, shorter in tests.
    #[serde(skip)]
    #[doc(hidden)]
    pub flush_limit: Option<Duration>,
    /// The mailbox limits (`[limits]` table), published to clients by `Info`. Env:
    /// `TERN_RELAY_LIMITS_<FIELD>`, e.g. `TERN_RELAY_LIMITS_QUOTA_COUNT`.
    pub limits: RelayLimits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ],
            admin_bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
            accept_registrations: true,
            log_json: false,
            max_connections: 10_000,
            idle_timeout_secs: 120,
            min_free_disk_mb: 256,
            purge_interval_secs: 300,
            drain_timeout_secs: 10,
            max_stored_envelopes: crate::rules::DEFAULT_MAX_STORED_ENVELOPES,
            max_fetch_in_flight_mb: 64,
            flush_limit: None,
            limits: RelayLimits::default(),
        }
    }
}

/// (table, key, comment) for every key `to_toml_string` writes; a test checks that the
/// list matches the serialized keys exactly.
const DOCS: &[(&str, &str, &str)] = &[
    (
        "",
        "listen",
        "peer listen multiaddrs (default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1; env TERN_RELAY_LISTEN, comma-separated)",
    ),
    (
        "",
        "admin_bind",
        "admin HTTP endpoint for /metrics and /healthz, loopback only (default: 127.0.0.1:9464; env TERN_RELAY_ADMIN_BIND)",
    ),
    (
        "",
        "accept_registrations",
        "accept new mailboxes; existing ones keep working when false (default: true; env TERN_RELAY_ACCEPT_REGISTRATIONS)",
    ),
    (
        "",
        "log_json",
        "log JSON lines instead of text (default: false; env TERN_RELAY_LOG_JSON)",
    ),
    (
        "",
        "max_connections",
        "most simultaneous peer connections (default: 10000; env TERN_RELAY_MAX_CONNECTIONS)",
    ),
    (
        "",
        "idle_timeout_secs",
        "seconds an idle connection stays open (default: 120; env TERN_RELAY_IDLE_TIMEOUT_SECS)",
    ),
    (
        "",
        "min_free_disk_mb",
        "free disk space (MiB) kept in reserve; below it deposits fail with DiskFull (default: 256; env TERN_RELAY_MIN_FREE_DISK_MB)",
    ),
    (
        "",
        "purge_interval_secs",
        "seconds between purges of expired envelopes and idle mailboxes (default: 300; env TERN_RELAY_PURGE_INTERVAL_SECS)",
    ),
    (
        "",
        "drain_timeout_secs",
        "seconds SIGTERM waits for in-flight requests before the final flush (default: 10; env TERN_RELAY_DRAIN_TIMEOUT_SECS)",
    ),
    (
        "",
        "max_stored_envelopes",
        "most envelopes held, all mailboxes together; past it deposits fail with RelayFull (default: 2000000, about 300 MB of index in memory; env TERN_RELAY_MAX_STORED_ENVELOPES)",
    ),
    (
        "",
        "max_fetch_in_flight_mb",
        "MiB of fetch pages on their way to readers at most; past it fetches are refused RateLimited and retried (default: 64; env TERN_RELAY_MAX_FETCH_IN_FLIGHT_MB)",
    ),
    (
        "limits",
        "max_envelope_bytes",
        "largest envelope accepted, bytes (default: 98304, also the protocol maximum)",
    ),
    (
        "limits",
        "quota_count",
        "most envelopes stored per mailbox (default: 10000)",
    ),
    (
        "limits",
        "quota_bytes",
        "most envelope bytes stored per mailbox (default: 268435456 = 256 MiB)",
    ),
    (
        "limits",
        "min_ttl_secs",
        "shortest envelope lifetime; shorter requests are raised (default: 3600)",
    ),
    (
        "limits",
        "default_ttl_secs",
        "lifetime when the sender gives none (default: 1209600 = 14 days)",
    ),
    (
        "limits",
        "max_ttl_secs",
        "longest envelope lifetime; longer requests are cut (default: 2592000 = 30 days)",
    ),
    (
        "limits",
        "sender_rate_per_sec",
        "write requests per second accepted from one peer, sustained (default: 100)",
    ),
    (
        "limits",
        "sender_burst",
        "write requests one peer may send in a burst (default: 1000)",
    ),
    (
        "limits",
        "max_mailboxes",
        "most mailboxes on this relay (default: 10000)",
    ),
    (
        "limits",
        "max_tokens_per_mailbox",
        "most capability tokens per mailbox (default: 1024)",
    ),
    (
        "limits",
        "max_prekeys_per_mailbox",
        "most one-time prekeys per mailbox (default: 100)",
    ),
    (
        "limits",
        "fetch_max_items",
        "most envelopes per fetch page (default: 1000, at most 8192)",
    ),
    (
        "limits",
        "fetch_max_bytes",
        "most envelope bytes per fetch page (default and maximum: 1047552)",
    ),
    (
        "limits",
        "mailbox_idle_secs",
        "a mailbox whose owner has not registered for this long is deleted with its envelopes and prekeys; 0 = never (default: 7776000 = 90 days, at most 100 years)",
    ),
];

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn env_value<T: FromStr>(var: &str, value: &str, expected: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| ConfigError::Env {
        var: var.to_string(),
        message: format!("{value:?} is not {expected} ({e})"),
    })
}

impl RelayConfig {
    /// Parses TOML text (empty text gives the defaults) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, "<string>")
    }

    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `TERN_RELAY_*` overrides from `vars` (pass `std::env::vars()`), then
    /// validates. Other variables are ignored; an unknown `TERN_RELAY_*` variable or a bad
    /// value is an error naming the variable.
    pub fn apply_env(
        &mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, value) in vars {
            let Some(field) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if var == ENV_CONFIG_PATH {
                continue;
            }
            self.set_from_env(&var, field, value.trim())?;
        }
        self.validate()
    }

    fn set_from_env(&mut self, var: &str, field: &str, value: &str) -> Result<(), ConfigError> {
        const INT: &str = "a non-negative integer";
        let bool_value = || {
            parse_bool(value).ok_or_else(|| ConfigError::Env {
                var: var.to_string(),
                message: format!("{value:?} is not a boolean (true/false, 1/0, yes/no)"),
            })
        };
        let l = &mut self.limits;
        match field {
            "LISTEN" => {
                self.listen = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
            }
            "ADMIN_BIND" => {
                self.admin_bind = env_value(var, value, "an address like 127.0.0.1:9464")?
            }
            "ACCEPT_REGISTRATIONS" => self.accept_registrations = bool_value()?,
            "LOG_JSON" => self.log_json = bool_value()?,
            "MAX_CONNECTIONS" => self.max_connections = env_value(var, value, INT)?,
            "IDLE_TIMEOUT_SECS" => self.idle_timeout_secs = env_value(var, value, INT)?,
            "MIN_FREE_DISK_MB" => self.min_free_disk_mb = env_value(var, value, INT)?,
            "PURGE_INTERVAL_SECS" => self.purge_interval_secs = env_value(var, value, INT)?,
            "DRAIN_TIMEOUT_SECS" => self.drain_timeout_secs = env_value(var, value, INT)?,
            "MAX_STORED_ENVELOPES" => self.max_stored_envelopes = env_value(var, value, INT)?,
            "MAX_FETCH_IN_FLIGHT_MB" => self.max_fetch_in_flight_mb = env_value(var, value, INT)?,
            "LIMITS_MAX_ENVELOPE_BYTES" => l.max_envelope_bytes = env_value(var, value, INT)?,
            "LIMITS_QUOTA_COUNT" => l.quota_count = env_value(var, value, INT)?,
            "LIMITS_QUOTA_BYTES" => l.quota_bytes = env_value(var, value, INT)?,
            "LIMITS_MIN_TTL_SECS" => l.min_ttl_secs = env_value(var, value, INT)?,
            "LIMITS_DEFAULT_TTL_SECS" => l.default_ttl_secs = env_value(var, value, INT)?,
            "LIMITS_MAX_TTL_SECS" => l.max_ttl_secs = env_value(var, value, INT)?,
            "LIMITS_SENDER_RATE_PER_SEC" => l.sender_rate_per_sec = env_value(var, value, INT)?,
            "LIMITS_SENDER_BURST" => l.sender_burst = env_value(var, value, INT)?,
            "LIMITS_MAX_MAILBOXES" => l.max_mailboxes = env_value(var, value, INT)?,
            "LIMITS_MAX_TOKENS_PER_MAILBOX" => {
                l.max_tokens_per_mailbox = env_value(var, value, INT)?
            }
            "LIMITS_MAX_PREKEYS_PER_MAILBOX" => {
                l.max_prekeys_per_mailbox = env_value(var, value, INT)?
            }
            "LIMITS_FETCH_MAX_ITEMS" => l.fetch_max_items = env_value(var, value, INT)?,
            "LIMITS_FETCH_MAX_BYTES" => l.fetch_max_bytes = env_value(var, value, INT)?,
            "LIMITS_MAILBOX_IDLE_SECS" => l.mailbox_idle_secs = env_value(var, value, INT)?,
            _ => {
                return Err(ConfigError::Env {
                    var: var.to_string(),
                    message: "unknown setting (see docs/OPERATOR.md for the list)".into(),
                });
            }
        }
        Ok(())
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| {
            Err(ConfigError::Invalid {
                field: field.to_string(),
                message,
            })
        };
        if self.listen.is_empty() {
            return invalid("listen", "at least one address is needed".into());
        }
        for a in &self.listen {
            if !a.starts_with('/') || a.chars().any(char::is_whitespace) {
                return invalid(
                    "listen",
                    format!("{a:?} is not a multiaddr (like /ip4/0.0.0.0/tcp/4001)"),
                );
            }
        }
        if !self.admin_bind.ip().is_loopback() {
            return invalid(
                "admin_bind",
                format!(
                    "{} is not a loopback address; the admin endpoint is never exposed (put a reverse proxy in front if metrics must leave the host)",
                    self.admin_bind
                ),
            );
        }
        for (field, value) in [
            ("max_connections", u64::from(self.max_connections)),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("purge_interval_secs", self.purge_interval_secs),
            ("max_stored_envelopes", self.max_stored_envelopes),
            ("max_fetch_in_flight_mb", self.max_fetch_in_flight_mb),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.max_fetch_in_flight_mb > u64::MAX / (1024 * 1024) {
            return invalid("max_fetch_in_flight_mb", "too large".into());
        }
        if self.min_free_disk_mb > u64::MAX / (1024 * 1024) {
            return invalid("min_free_disk_mb", "too large".into());
        }
        self.limits
            .validate()
            .or_else(|e| invalid(&format!("limits.{}", e.field), e.message))
    }

    /// The TOML text of this config, every key preceded by a comment with its meaning,
    /// default and environment variable (`tern relay --print-config`).
    pub fn to_toml_string(&self) -> String {
        let body = match toml::to_string_pretty(self) {
            Ok(b) => b,
            // Plain integers, booleans, strings and one table always serialize.
            Err(e) => unreachable!("relay config always serializes: {e}"),
        };
        let mut out = String::from(
            "# Tern relay configuration (tern relay --config FILE).\n\
             # Precedence: command-line flags > TERN_RELAY_* environment > this file > defaults.\n\
             # Unknown keys are errors. See docs/OPERATOR.md.\n\n",
        );
        let mut table = "";
        for line in body.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table = if name == "limits" { "limits" } else { "?" };
                let _ = writeln!(
                    out,
                    "# Mailbox limits, published to clients (Info). Env: TERN_RELAY_LIMITS_<KEY>."
                );
            } else if let Some((key, _)) = line.split_once(" = ")
                && let Some((_, _, doc)) = DOCS.iter().find(|(t, k, _)| *t == table && *k == key)
            {
                let _ = writeln!(out, "# {doc}");
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// The server options these settings give.
    pub fn server_options(&self) -> ServerOptions {
        ServerOptions {
            accept_registrations: self.accept_registrations,
            min_free_bytes: self.min_free_disk_mb.saturating_mul(1024 * 1024),
            max_stored_envelopes: self.max_stored_envelopes,
        }
    }

    /// How long a group commit's flush may take before the mailbox database stops.
    pub fn flush_limit(&self) -> Duration {
        self.flush_limit.unwrap_or(Duration::from_secs(30))
    }

    /// Bytes of fetch pages on their way to readers at most.
    pub fn max_fetch_in_flight(&self) -> u64 {
        self.max_fetch_in_flight_mb.saturating_mul(1024 * 1024)
    }

    /// The idle connection timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The purge interval.
    pub fn purge_interval(&self) -> Duration {
        Duration::from_secs(self.purge_interval_secs)
    }

    /// The drain timeout on SIGTERM.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn empty_text_gives_the_documented_defaults() {
        let c = RelayConfig::from_toml_str("").unwrap();
        assert_eq!(c, RelayConfig::default());
        assert_eq!(
            c.listen,
            vec!["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
        );
        assert_eq!(c.admin_bind.to_string(), "127.0.0.1:9464");
        assert!(c.accept_registrations && !c.log_json);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.min_free_disk_mb, 256);
        assert_eq!(c.server_options().min_free_bytes, 256 << 20);
        assert_eq!(c.limits, RelayLimits::default());
        assert_eq!(c.limits.mailbox_idle_secs, 90 * 86400);
    }

    #[test]
    fn mailbox_idle_secs_is_read_from_the_file_and_zero_means_never() {
        let c = RelayConfig::from_toml_str("[limits]\nmailbox_idle_secs = 86400\n").unwrap();
        assert_eq!(c.limits.mailbox_idle_secs, 86400);
        assert_eq!(c.limits.quota_count, RelayLimits::default().quota_count);
        let c = RelayConfig::from_toml_str("[limits]\nmailbox_idle_secs = 0\n").unwrap();
        assert_eq!(c.limits.mailbox_idle_secs, 0);
        // A config written before the setting existed keeps working, with the default.
        let old = "purge_interval_secs = 60\n[limits]\nquota_count = 5\n";
        assert_eq!(
            RelayConfig::from_toml_str(old)
                .unwrap()
                .limits
                .mailbox_idle_secs,
            90 * 86400
        );
        // --print-config shows it with its comment, and round-trips it.
        let mut c = RelayConfig::default();
        c.limits.mailbox_idle_secs = 1234;
        let text = c.to_toml_string();
        let at = text.find("mailbox_idle_secs = 1234\n").unwrap();
        let comment = text[..at].lines().last().unwrap();
        assert!(
            comment.starts_with("# ") && comment.contains("90 days"),
            "{comment}"
        );
        assert_eq!(RelayConfig::from_toml_str(&text).unwrap(), c);
    }

    #[test]
    fn file_values_override_defaults_and_partial_limits_keep_the_rest() {
        let c = RelayConfig::from_toml_str(
            "accept_registrations = false\nmin_free_disk_mb = 1024\n[limits]\nquota_count = 50\n",
        )
        .unwrap();
        assert!(!c.accept_registrations);
        assert!(!c.server_options().accept_registrations);
        assert_eq!(c.min_free_disk_mb, 1024);
        assert_eq!(c.limits.quota_count, 50);
        assert_eq!(c.limits.quota_bytes, RelayLimits::default().quota_bytes);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = RelayConfig::from_toml_str("acept_registrations = true\n").unwrap_err();
        assert!(e.to_string().contains("acept_registrations"), "{e}");
        let e = RelayConfig::from_toml_str("[limits]\nquota = 5\n").unwrap_err();
        assert!(e.to_string().contains("quota"), "{e}");
        let e = RelayConfig::from_toml_str("max_connections = \"many\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
    }

    #[test]
    fn admin_bind_must_be_loopback() {
        let e = RelayConfig::from_toml_str("admin_bind = \"0.0.0.0:9464\"\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { field, .. } if field == "admin_bind"),
            "{e}"
        );
        assert!(RelayConfig::from_toml_str("admin_bind = \"[::1]:9000\"\n").is_ok());
    }

    #[test]
    fn values_are_validated() {
        let field = |text: &str| match RelayConfig::from_toml_str(text).unwrap_err() {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(field("listen = []\n"), "listen");
        assert_eq!(field("listen = [\"tcp 4001\"]\n"), "listen");
        assert_eq!(field("max_connections = 0\n"), "max_connections");
        assert_eq!(field("purge_interval_secs = 0\n"), "purge_interval_secs");
        assert_eq!(
            field("[limits]\nmin_ttl_secs = 100\ndefault_ttl_secs = 50\n"),
            "limits.default_ttl_secs"
        );
        assert_eq!(
            field("[limits]\nmax_envelope_bytes = 200000\n"),
            "limits.max_envelope_bytes"
        );
        assert_eq!(
            field("[limits]\nmailbox_idle_secs = 4000000000\n"),
            "limits.mailbox_idle_secs"
        );
    }

    #[test]
    fn env_overrides_every_kind_of_value() {
        let mut c = RelayConfig::default();
        c.apply_env(env(&[
            (
                "TERN_RELAY_LISTEN",
                "/ip4/127.0.0.1/tcp/5000, /ip6/::1/tcp/5000,",
            ),
            ("TERN_RELAY_ADMIN_BIND", "127.0.0.1:9999"),
            ("TERN_RELAY_ACCEPT_REGISTRATIONS", "no"),
            ("TERN_RELAY_LOG_JSON", "1"),
            ("TERN_RELAY_LIMITS_QUOTA_COUNT", "77"),
            ("TERN_RELAY_LIMITS_SENDER_BURST", " 5 "),
            ("TERN_RELAY_LIMITS_MAILBOX_IDLE_SECS", "604800"),
            ("TERN_RELAY_CONFIG", "/etc/tern/relay.toml"),
            ("PATH", "/usr/bin"),
        ]))
        .unwrap();
        assert_eq!(
            c.listen,
            vec!["/ip4/127.0.0.1/tcp/5000", "/ip6/::1/tcp/5000"]
        );
        assert_eq!(c.admin_bind.port(), 9999);
        assert!(!c.accept_registrations);
        assert!(c.log_json);
        assert_eq!(c.limits.quota_count, 77);
        assert_eq!(c.limits.sender_burst, 5);
        assert_eq!(c.limits.mailbox_idle_secs, 604_800);
    }

    #[test]
    fn every_env_variable_named_in_the_docs_is_accepted() {
        for (table, key, doc) in DOCS {
            let var = if table.is_empty() {
                format!("TERN_RELAY_{}", key.to_ascii_uppercase())
            } else {
                format!("TERN_RELAY_LIMITS_{}", key.to_ascii_uppercase())
            };
            if table.is_empty() {
                assert!(doc.contains(&var), "{key}: doc must name {var}");
            }
            let defaults = RelayConfig::default();
            let value = toml::Value::try_from(&defaults).unwrap();
            let value = if table.is_empty() {
                value.get(key).cloned()
            } else {
                value.get(table).and_then(|t| t.get(key)).cloned()
            }
            .unwrap();
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Array(a) => a
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            let mut c = RelayConfig::default();
            c.apply_env(env(&[(&var, &text)]))
                .unwrap_or_else(|e| panic!("{var}={text}: {e}"));
            assert_eq!(c, defaults, "{var} with the default value changes nothing");
        }
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let cases = [
            ("TERN_RELAY_LIMITS_QUOTA_COUNT", "lots"),
            ("TERN_RELAY_LOG_JSON", "maybe"),
            ("TERN_RELAY_ADMIN_BIND", "localhost"),
            ("TERN_RELAY_MAX_CONNECTIONS", "-1"),
            ("TERN_RELAY_QUOTA_COUNT", "5"),
            ("TERN_RELAY_LIMITS_MAILBOX_IDLE_SECS", "90d"),
            ("TERN_RELAY_MAILBOX_IDLE_SECS", "60"),
        ];
        for (var, value) in cases {
            let e = RelayConfig::default()
                .apply_env(env(&[(var, value)]))
                .unwrap_err();
            assert!(
                matches!(&e, ConfigError::Env { var: v, .. } if v == var),
                "{var}: {e}"
            );
            assert!(e.to_string().contains(var), "{e}");
        }
        // A well-formed value that breaks a rule is reported by field.
        let e = RelayConfig::default()
            .apply_env(env(&[("TERN_RELAY_ADMIN_BIND", "0.0.0.0:1")]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e}");
    }

    #[test]
    fn printed_config_round_trips_and_documents_every_key() {
        let mut c = RelayConfig::default();
        c.limits.quota_count = 123;
        c.log_json = true;
        let text = c.to_toml_string();
        assert_eq!(RelayConfig::from_toml_str(&text).unwrap(), c);
        // Every serialized key has a comment line just above it, and DOCS has no stale key.
        let value = toml::Value::try_from(&c).unwrap();
        let mut keys = Vec::new();
        for (k, v) in value.as_table().unwrap() {
            match v.as_table() {
                Some(t) => keys.extend(t.keys().map(|k2| (k.clone(), k2.clone()))),
                None => keys.push((String::new(), k.clone())),
            }
        }
        assert_eq!(keys.len(), DOCS.len());
        let lines: Vec<&str> = text.lines().collect();
        for (table, key) in &keys {
            assert!(
                DOCS.iter().any(|(t, k, _)| t == table && k == key),
                "{table}.{key} undocumented"
            );
            let at = lines
                .iter()
                .position(|l| l.starts_with(&format!("{key} = ")))
                .unwrap();
            assert!(lines[at - 1].starts_with("# "), "{key}: {}", lines[at - 1]);
        }
        assert!(text.contains("# Mailbox limits"));
    }

    #[test]
    fn operator_guide_matches_the_code() {
        let guide = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATOR.md"),
        )
        .unwrap();
        // The full example file gives exactly the defaults.
        let example = guide
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap();
        assert_eq!(
            RelayConfig::from_toml_str(example).unwrap(),
            RelayConfig::default()
        );
        // Every variable the guide names is one the relay accepts.
        let mut named = 0;
        for word in guide.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with(ENV_PREFIX) || word.ends_with('_') || word == ENV_CONFIG_PATH {
                continue;
            }
            named += 1;
            let mut c = RelayConfig::default();
            let value = match word {
                "TERN_RELAY_LISTEN" => "/ip4/127.0.0.1/tcp/1",
                "TERN_RELAY_ADMIN_BIND" => "127.0.0.1:1",
                "TERN_RELAY_ACCEPT_REGISTRATIONS" | "TERN_RELAY_LOG_JSON" => "true",
                _ => "3600",
            };
            if let Err(ConfigError::Env { message, .. }) = c.apply_env(env(&[(word, value)])) {
                panic!("{word} named in OPERATOR.md: {message}");
            }
        }
        assert!(named >= 10, "{named}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "log_json = true\n").unwrap();
        assert!(RelayConfig::load(&path).unwrap().log_json);
        std::fs::write(&path, "log_jsn = true\n").unwrap();
        let e = RelayConfig::load(&path).unwrap_err();
        assert!(e.to_string().contains("relay.toml"), "{e}");
        let e = RelayConfig::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }
}
