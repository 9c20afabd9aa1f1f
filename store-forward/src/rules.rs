//! The mailbox rules as an I/O-free state machine: capability, quota, TTL, rate, paging,
//! idle expiry of mailboxes.
//!
//! [`MailboxRules`] holds an in-memory index only (never envelope bytes, so a relay's memory
//! grows with the number of stored items, not their size): per mailbox the registered
//! token hashes, the time of its owner's last `Register`, its usage (count, bytes), the
//! stored ids with their `seq`, size and expiry, and the prekey count; one global expiry
//! order of items and one of mailboxes by last registration; one token bucket per recent
//! sender. `now` (unix seconds) is always an argument: there is no clock, disk or
//! randomness here.
//!
//! Idle expiry: a mailbox whose owner has not registered for `mailbox_idle_secs` (0: never)
//! is idle; deposits and prekey claims treat it as gone (`Unauthorized`) and
//! [`MailboxRules::purge_idle`] deletes it with its token hashes, envelopes and prekeys.
//! Only the owner's `Register` restarts the clock. Not `Fetch` or `Ack`: a node registers
//! at the start of every sync anyway, and counting them would cost a disk write per fetch
//! (or an index that no longer equals the disk). Never a deposit or claim by someone else:
//! a sender holding a token must not keep an abandoned mailbox alive.
//!
//! Every request is decided in two steps. A decision method (`register`, `deposit`,
//! `fetch`, `ack`, `publish_prekeys`, `claim_prekey`, `purge`, `purge_idle`) checks the
//! rules and returns
//! what to persist (the payload of an [`Effect`]), without touching the index (only the
//! sender's token bucket is charged). The persistence layer writes it, and only when that
//! succeeded calls [`MailboxRules::apply`] with the [`Effect`]. So the index always equals what is on disk, even when a write
//! fails (a full disk, an I/O error).
//!
//! Invariants (checked by the proptest below): a mailbox's `(count, bytes)` equals the sum
//! over its stored items; a deposit never takes a mailbox over its quota and never evicts
//! anything; the expiry order holds exactly the stored items; the idle order holds exactly
//! the mailboxes with their last registration; `seq` strictly increases.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    ops::Bound,
};

use crate::{
    limits::RelayLimits,
    wire::{ErrorCode, MAX_ITEM_OVERHEAD, MessageId, PeerBytes, PeerKey, TokenHash},
};

/// How many senders' token buckets are tracked by default; beyond it idle ones are
/// forgotten first.
pub const DEFAULT_TRACKED_SENDERS: usize = 65_536;
/// Fetches per second accepted from one peer, sustained. Fetch is not a write and has no
/// place in `sender_rate_per_sec`: a recipient must always be able to drain its mailbox.
/// But each fetch answers up to a megabyte, so it has a bucket of its own. A node's pages
/// hold up to 256 envelopes or 512 KiB: a mailbox at the default count quota is 40 pages,
/// within the burst; one at the byte quota (256 MiB) about 500, drained in some 20 s.
pub const FETCH_RATE_PER_SEC: u32 = 20;
/// Fetches one peer may send in a burst.
pub const FETCH_BURST: u32 = 60;
/// Envelopes the relay holds at most by default, all mailboxes together (the index keeps
/// about 150 bytes of memory for each).
pub const DEFAULT_MAX_STORED_ENVELOPES: u64 = 2_000_000;

/// Why the rules refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The envelope is larger than `max_envelope_bytes`.
    #[error("envelope of {size} bytes exceeds this relay's limit of {max} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: u32,
    },
    /// The mailbox cannot take this envelope without exceeding its quota.
    #[error(
        "the recipient's mailbox is full ({count} envelopes, {bytes} bytes stored; quota {quota_count} envelopes, {quota_bytes} bytes)"
    )]
    Quota {
        /// Envelopes stored.
        count: u32,
        /// Bytes stored.
        bytes: u64,
        /// The count quota.
        quota_count: u32,
        /// The byte quota.
        quota_bytes: u64,
    },
    /// The token set would exceed `max_tokens_per_mailbox`.
    #[error("{count} tokens exceed this relay's limit of {max} per mailbox")]
    TooManyTokens {
        /// Tokens after the update.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// The peer's token bucket is empty.
    #[error("too many requests from this peer; retry later")]
    RateLimited,
    /// The mailbox holds an envelope of another sender under this id.
    #[error("the recipient's mailbox holds another sender's envelope under this id")]
    IdTaken,
    /// The relay has as many fetch pages on their way as it keeps in memory.
    #[error("the relay is busy sending other pages; retry in a moment")]
    Busy,
    /// No such mailbox, or the token is not (or no longer) registered for it.
    #[error("no mailbox here accepts this token")]
    Unauthorized,
    /// The requesting peer has no mailbox.
    #[error("this peer has no mailbox here; register first")]
    NotRegistered,
    /// New mailboxes are not accepted.
    #[error("this relay accepts no new mailboxes")]
    RegistrationClosed,
    /// The relay holds `max_mailboxes` mailboxes.
    #[error("this relay holds its maximum of {max} mailboxes")]
    RelayFull {
        /// The limit.
        max: u32,
    },
    /// The relay holds its maximum of envelopes, all mailboxes together.
    #[error("this relay holds its maximum of {max} envelopes; retry later or elsewhere")]
    StoreFull {
        /// The limit.
        max: u64,
    },
}

impl Refusal {
    /// The wire code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::IdTaken => ErrorCode::Malformed,
            Self::Quota { .. } | Self::TooManyTokens { .. } => ErrorCode::Quota,
            Self::RateLimited | Self::Busy => ErrorCode::RateLimited,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::NotRegistered => ErrorCode::NotRegistered,
            Self::RegistrationClosed => ErrorCode::RegistrationClosed,
            Self::RelayFull { .. } | Self::StoreFull { .. } => ErrorCode::RelayFull,
        }
    }
}

/// A new envelope to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// The recipient's mailbox.
    pub key: PeerKey,
    /// Its sequence number (deposit order, the fetch cursor).
    pub seq: u64,
    /// The sender's message id.
    pub id: MessageId,
    /// The depositing peer ([`sender_tag`] of its bytes).
    pub sender: u64,
    /// Envelope size in bytes.
    pub size: u32,
    /// `now` of the deposit.
    pub deposited_at: u64,
    /// When it expires (`deposited_at` + the clamped TTL).
    pub expires_at: u64,
}

/// A mailbox's full token set after a `Register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxUpdate {
    /// The mailbox.
    pub key: PeerKey,
    /// Its owner.
    pub peer: PeerBytes,
    /// The full token set after the update, sorted.
    pub tokens: Vec<TokenHash>,
    /// `now` of this registration: the idle expiry counts from it.
    pub registered_at: u64,
}

/// Stored envelopes to delete (acked or expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// The mailbox.
    pub key: PeerKey,
    /// `(seq, id)` of each, in `seq` order, no duplicates.
    pub items: Vec<(u64, MessageId)>,
}

/// An idle mailbox to delete with everything in it (decided by
/// [`MailboxRules::purge_idle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxRemoval {
    /// The mailbox.
    pub key: PeerKey,
    /// Its owner's last registration (for logs).
    pub registered_at: u64,
    /// `(seq, id)` of every stored envelope, in `seq` order (expired ones included).
    pub items: Vec<(u64, MessageId)>,
    /// The number of every stored prekey, ascending.
    pub prekeys: Vec<u64>,
}

/// Prekeys to append, numbered `first_seq..first_seq + count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyAppend {
    /// The mailbox.
    pub key: PeerKey,
    /// Number of the first.
    pub first_seq: u64,
    /// How many.
    pub count: u32,
}

/// The prekey a `ClaimPrekey` takes: the oldest of the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrekeyClaim {
    /// The mailbox.
    pub key: PeerKey,
    /// The prekey's number.
    pub seq: u64,
}

/// A change to persist, then to [`MailboxRules::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Create or update a mailbox.
    PutMailbox(MailboxUpdate),
    /// Store an envelope.
    PutItem(NewItem),
    /// Delete stored envelopes.
    RemoveItems(Removal),
    /// Append prekeys.
    AddPrekeys(PrekeyAppend),
    /// Remove a prekey (and hand it out).
    TakePrekey(PrekeyClaim),
    /// Delete an idle mailbox: its token hashes, envelopes and prekeys.
    RemoveMailbox(MailboxRemoval),
}

/// The decision on a `Register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The mailbox write ([`Effect::PutMailbox`]).
    pub update: MailboxUpdate,
    /// Envelopes waiting in the mailbox.
    pub waiting: u32,
    /// Whether the mailbox is new.
    pub created: bool,
}

/// The decision on a `Deposit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deposit {
    /// Store it ([`Effect::PutItem`] of this item).
    Store(NewItem),
    /// The id is stored already: acknowledge again, store nothing.
    Duplicate {
        /// The stored copy's seq.
        seq: u64,
        /// The stored copy's expiry.
        expires_at: u64,
    },
}

/// The decision on a `Fetch`: which items make the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    /// The mailbox.
    pub key: PeerKey,
    /// The page's items, ascending.
    pub seqs: Vec<u64>,
    /// Whether unexpired items follow the page.
    pub more: bool,
}

/// The decision on a `PublishPrekeys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyGrant {
    /// [`Effect::AddPrekeys`] for the accepted ones.
    pub append: PrekeyAppend,
    /// How many of the offered prekeys fit under the cap (the first ones).
    pub accepted: u32,
    /// Pool size after the write.
    pub available: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ItemMeta {
    seq: u64,
    size: u32,
    expires_at: u64,
    /// Who deposited it ([`sender_tag`]): an id is only unique per sender.
    sender: u64,
}

/// A depositing peer's tag in the index: the first 8 bytes of a hash of its bytes (finding
/// another peer with the same tag as a given one takes 2^64 tries).
pub fn sender_tag(peer: &[u8]) -> u64 {
    let hash = blake3::derive_key("tern mailbox sender tag v1", peer);
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(tag)
}

#[derive(Debug, Default)]
struct Mailbox {
    tokens: HashSet<TokenHash>,
    /// `now` of the owner's last `Register` (or of the load, for a record written before
    /// this was kept): the mailbox is idle `mailbox_idle_secs` after it.
    registered_at: u64,
    count: u32,
    bytes: u64,
    items: HashMap<MessageId, ItemMeta>,
    /// seq -> id, for paging in deposit order.
    order: BTreeMap<u64, MessageId>,
    /// Numbers of the stored prekeys, oldest first.
    prekeys: VecDeque<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    last: u64,
}

/// One token bucket per sender, bounded in number.
#[derive(Debug)]
struct SenderLimiter {
    buckets: HashMap<PeerKey, Bucket>,
    capacity: usize,
}

impl SenderLimiter {
    fn refill(b: &mut Bucket, now: u64, rate: u64, burst: u64) {
        let elapsed = now.saturating_sub(b.last);
        b.tokens = b
            .tokens
            .saturating_add(elapsed.saturating_mul(rate))
            .min(burst);
        b.last = b.last.max(now);
    }

    fn take(&mut self, key: PeerKey, now: u64, rate: u32, burst: u32) -> bool {
        let (rate, burst) = (u64::from(rate), u64::from(burst));
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            self.make_room(now, rate, burst);
        }
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        Self::refill(b, now, rate, burst);
        if b.tokens >= 1 {
            b.tokens -= 1;
            true
        } else {
            false
        }
    }

    /// Forgets every full bucket (it carries no information); if that frees less than an
    /// eighth of the capacity, also the least recently used ones, fullest first, so the
    /// cost of pruning is amortised over many new senders.
    fn make_room(&mut self, now: u64, rate: u64, burst: u64) {
        self.prune(now, rate, burst);
        let target = self.capacity - self.capacity / 8;
        if self.buckets.len() > target.saturating_sub(1) {
            let mut by_age: Vec<(u64, std::cmp::Reverse<u64>, PeerKey)> = self
                .buckets
                .iter()
                .map(|(k, b)| (b.last, std::cmp::Reverse(b.tokens), *k))
                .collect();
            by_age.sort_unstable();
            let excess = self.buckets.len() + 1 - target.max(1);
            for (_, _, k) in by_age.into_iter().take(excess) {
                self.buckets.remove(&k);
            }
        }
    }

    fn prune(&mut self, now: u64, rate: u64, burst: u64) {
        self.buckets.retain(|_, b| {
            let mut b = *b;
            Self::refill(&mut b, now, rate, burst);
            b.tokens < burst
        });
    }
}

/// The relay's mailbox rules and in-memory index. See the module docs.
pub struct MailboxRules {
    limits: RelayLimits,
    accept_registrations: bool,
    mailboxes: HashMap<PeerKey, Mailbox>,
    /// (expires_at, seq, mailbox) of every stored item.
    expiry: BTreeSet<(u64, u64, PeerKey)>,
    /// (registered_at, mailbox) of every mailbox, so the idle purge reads only the idle
    /// ones.
    idle: BTreeSet<(u64, PeerKey)>,
    /// The next seq to hand out; starts at 1 so `after: Some(0)` means "from the start".
    next_seq: u64,
    senders: SenderLimiter,
    fetchers: SenderLimiter,
    /// Most envelopes held, all mailboxes together.
    max_stored_items: u64,
    stored_items: u64,
    stored_bytes: u64,
    stored_prekeys: u64,
}

impl std::fmt::Debug for MailboxRules {
    /// A summary: the index itself can hold millions of entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxRules")
            .field("accept_registrations", &self.accept_registrations)
            .field("mailboxes", &self.mailboxes.len())
            .field("stored_items", &self.stored_items)
            .field("stored_bytes", &self.stored_bytes)
            .field("stored_prekeys", &self.stored_prekeys)
            .field("next_seq", &self.next_seq)
            .field("tracked_senders", &self.senders.buckets.len())
            .finish_non_exhaustive()
    }
}

impl MailboxRules {
    /// Empty rules. `limits` should be valid ([`RelayLimits::validate`]).
    pub fn new(limits: RelayLimits, accept_registrations: bool) -> Self {
        Self::with_sender_capacity(limits, accept_registrations, DEFAULT_TRACKED_SENDERS)
    }

    /// Empty rules tracking at most `senders` token buckets (at least 8).
    pub fn with_sender_capacity(
        limits: RelayLimits,
        accept_registrations: bool,
        senders: usize,
    ) -> Self {
        Self {
            limits,
            accept_registrations,
            mailboxes: HashMap::new(),
            expiry: BTreeSet::new(),
            idle: BTreeSet::new(),
            next_seq: 1,
            senders: SenderLimiter {
                buckets: HashMap::new(),
                capacity: senders.max(8),
            },
            fetchers: SenderLimiter {
                buckets: HashMap::new(),
                capacity: senders.max(8),
            },
            max_stored_items: DEFAULT_MAX_STORED_ENVELOPES,
            stored_items: 0,
            stored_bytes: 0,
            stored_prekeys: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &RelayLimits {
        &self.limits
    }

    /// Whether new mailboxes are accepted.
    pub fn accept_registrations(&self) -> bool {
        self.accept_registrations
    }

    /// Sets the most envelopes held, all mailboxes together: past it deposits are refused
    /// [`Refusal::StoreFull`] (what is stored already stays).
    pub fn set_max_stored_items(&mut self, max: u64) {
        self.max_stored_items = max;
    }

    /// Opens or closes registration of new mailboxes; existing ones keep working.
    pub fn set_accept_registrations(&mut self, accept: bool) {
        self.accept_registrations = accept;
    }

    /// Whether `mb` is idle at `now`: its owner last registered `mailbox_idle_secs` or more
    /// ago (never when that limit is 0). An idle mailbox awaits [`MailboxRules::purge_idle`]
    /// and takes no deposits or claims meanwhile.
    fn is_idle(&self, mb: &Mailbox, now: u64) -> bool {
        let idle = self.limits.mailbox_idle_secs;
        idle != 0 && mb.registered_at.saturating_add(idle) <= now
    }

    fn rate_limit(&mut self, now: u64, peer: &PeerBytes) -> Result<(), Refusal> {
        let (rate, burst) = (self.limits.sender_rate_per_sec, self.limits.sender_burst);
        if self.senders.take(peer.key(), now, rate, burst) {
            Ok(())
        } else {
            Err(Refusal::RateLimited)
        }
    }

    /// `Register` from `peer`: creates or updates its mailbox, and restarts its idle clock
    /// at `now` (also when the mailbox is idle but not purged yet).
    pub fn register(
        &mut self,
        now: u64,
        peer: &PeerBytes,
        add: &[TokenHash],
        revoke: &[TokenHash],
    ) -> Result<Registration, Refusal> {
        self.rate_limit(now, peer)?;
        let key = peer.key();
        let existing = self.mailboxes.get(&key);
        if existing.is_none() {
            if !self.accept_registrations {
                return Err(Refusal::RegistrationClosed);
            }
            if self.mailboxes.len() >= self.limits.max_mailboxes as usize {
                return Err(Refusal::RelayFull {
                    max: self.limits.max_mailboxes,
                });
            }
        }
        let mut tokens: HashSet<TokenHash> = existing.map(|m| m.tokens.clone()).unwrap_or_default();
        tokens.extend(add.iter().copied());
        for r in revoke {
            tokens.remove(r);
        }
        if tokens.len() > self.limits.max_tokens_per_mailbox as usize {
            return Err(Refusal::TooManyTokens {
                count: tokens.len(),
                max: self.limits.max_tokens_per_mailbox,
            });
        }
        let mut tokens: Vec<TokenHash> = tokens.into_iter().collect();
        tokens.sort_unstable();
        Ok(Registration {
            update: MailboxUpdate {
                key,
                peer: peer.clone(),
                tokens,
                registered_at: now,
            },
            waiting: existing.map_or(0, |m| m.count),
            created: existing.is_none(),
        })
    }

    /// The TTL a deposit gets: `requested` clamped to `[min_ttl_secs, max_ttl_secs]`, or
    /// `default_ttl_secs`.
    pub fn ttl(&self, requested: Option<u64>) -> u64 {
        requested.map_or(self.limits.default_ttl_secs, |t| {
            t.clamp(self.limits.min_ttl_secs, self.limits.max_ttl_secs)
        })
    }

    /// `Deposit` of an envelope of `size` bytes from `sender` into `recipient`'s mailbox
    /// with the capability whose hash is `token`. An idle mailbox is refused like a missing
    /// one, and a deposit never restarts the idle clock.
    #[allow(clippy::too_many_arguments)] // one argument per field of the request
    pub fn deposit(
        &mut self,
        now: u64,
        sender: &PeerBytes,
        recipient: &PeerBytes,
        token: &TokenHash,
        id: MessageId,
        ttl_secs: Option<u64>,
        size: usize,
    ) -> Result<Deposit, Refusal> {
        self.rate_limit(now, sender)?;
        let key = recipient.key();
        let mb = self
            .mailboxes
            .get(&key)
            .filter(|m| m.tokens.contains(token) && !self.is_idle(m, now))
            .ok_or(Refusal::Unauthorized)?;
        if size > self.limits.max_envelope_bytes as usize {
            return Err(Refusal::TooLarge {
                size,
                max: self.limits.max_envelope_bytes,
            });
        }
        let sender_tag = sender_tag(sender.as_bytes());
        if let Some(meta) = mb.items.get(&id) {
            if meta.sender != sender_tag {
                return Err(Refusal::IdTaken);
            }
            return Ok(Deposit::Duplicate {
                seq: meta.seq,
                expires_at: meta.expires_at,
            });
        }
        if self.stored_items >= self.max_stored_items {
            return Err(Refusal::StoreFull {
                max: self.max_stored_items,
            });
        }
        if mb.count >= self.limits.quota_count
            || mb.bytes.saturating_add(size as u64) > self.limits.quota_bytes
        {
            return Err(Refusal::Quota {
                count: mb.count,
                bytes: mb.bytes,
                quota_count: self.limits.quota_count,
                quota_bytes: self.limits.quota_bytes,
            });
        }
        let ttl = self.ttl(ttl_secs);
        // Never promised past the day the mailbox itself goes, if its owner stays away.
        let mut expires_at = now.saturating_add(ttl);
        if self.limits.mailbox_idle_secs > 0 {
            expires_at = expires_at.min(
                mb.registered_at
                    .saturating_add(self.limits.mailbox_idle_secs),
            );
        }
        Ok(Deposit::Store(NewItem {
            key,
            seq: self.next_seq,
            id,
            sender: sender_tag,
            // size <= max_envelope_bytes, a u32.
            size: size as u32,
            deposited_at: now,
            expires_at,
        }))
    }

    /// `Fetch` by `peer` of its own mailbox: the page after `after`, at most `max_items`
    /// (clamped to `1..=fetch_max_items`) and `max_bytes` (clamped to `fetch_max_bytes`),
    /// counting each item as its size plus [`MAX_ITEM_OVERHEAD`]. The first item is always
    /// included, however large, so a small `max_bytes` cannot stall the mailbox. Expired
    /// items (awaiting purge) are skipped. A peer gets [`FETCH_RATE_PER_SEC`] fetches a
    /// second ([`FETCH_BURST`] at once), then [`Refusal::RateLimited`].
    pub fn fetch(
        &mut self,
        now: u64,
        peer: &PeerBytes,
        after: Option<u64>,
        max_items: u32,
        max_bytes: u32,
    ) -> Result<FetchPlan, Refusal> {
        let key = peer.key();
        if !self.mailboxes.contains_key(&key) {
            return Err(Refusal::NotRegistered);
        }
        if !self
            .fetchers
            .take(key, now, FETCH_RATE_PER_SEC, FETCH_BURST)
        {
            return Err(Refusal::RateLimited);
        }
        let mb = self.mailboxes.get(&key).ok_or(Refusal::NotRegistered)?;
        let max_items = max_items.clamp(1, self.limits.fetch_max_items) as usize;
        let budget = u64::from(max_bytes.min(self.limits.fetch_max_bytes));
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut seqs = Vec::new();
        let mut used = 0u64;
        let mut more = false;
        for (&seq, id) in mb.order.range((start, Bound::Unbounded)) {
            let Some(meta) = mb.items.get(id) else {
                continue;
            };
            if meta.expires_at <= now {
                continue;
            }
            let cost = u64::from(meta.size) + u64::from(MAX_ITEM_OVERHEAD);
            if seqs.len() == max_items || (!seqs.is_empty() && used + cost > budget) {
                more = true;
                break;
            }
            seqs.push(seq);
            used += cost;
        }
        Ok(FetchPlan { key, seqs, more })
    }

    /// `Ack` by `peer` of ids in its own mailbox: the items to remove (unknown ids, and ids
    /// only stored in other mailboxes, are ignored).
    pub fn ack(&self, peer: &PeerBytes, ids: &[MessageId]) -> Result<Removal, Refusal> {
        let key = peer.key();
        let mb = self.mailboxes.get(&key).ok_or(Refusal::NotRegistered)?;
        let mut items: Vec<(u64, MessageId)> = ids
            .iter()
            .filter_map(|id| mb.items.get(id).map(|m| (m.seq, *id)))
            .collect();
        items.sort_unstable();
        items.dedup();
        Ok(Removal { key, items })
    }

    /// `PublishPrekeys` of `count` prekeys by `peer`: the first ones that fit under
    /// `max_prekeys_per_mailbox` are accepted.
    pub fn publish_prekeys(
        &mut self,
        now: u64,
        peer: &PeerBytes,
        count: usize,
    ) -> Result<PrekeyGrant, Refusal> {
        self.rate_limit(now, peer)?;
        let key = peer.key();
        let mb = self.mailboxes.get(&key).ok_or(Refusal::NotRegistered)?;
        let room = self
            .limits
            .max_prekeys_per_mailbox
            .saturating_sub(mb.prekeys.len() as u32);
        let accepted = room.min(u32::try_from(count).unwrap_or(u32::MAX));
        Ok(PrekeyGrant {
            append: PrekeyAppend {
                key,
                first_seq: self.next_seq,
                count: accepted,
            },
            accepted,
            available: mb.prekeys.len() as u32 + accepted,
        })
    }

    /// `ClaimPrekey` by `sender` from `recipient`'s pool with the capability whose hash is
    /// `token`: the oldest prekey of the pool ([`Effect::TakePrekey`]), `None` when the
    /// pool is empty. An idle mailbox is refused like a missing one.
    pub fn claim_prekey(
        &mut self,
        now: u64,
        sender: &PeerBytes,
        recipient: &PeerBytes,
        token: &TokenHash,
    ) -> Result<Option<PrekeyClaim>, Refusal> {
        self.rate_limit(now, sender)?;
        let key = recipient.key();
        let mb = self
            .mailboxes
            .get(&key)
            .filter(|m| m.tokens.contains(token) && !self.is_idle(m, now))
            .ok_or(Refusal::Unauthorized)?;
        Ok(mb.prekeys.front().map(|&seq| PrekeyClaim { key, seq }))
    }

    /// The items expired at `now` (`expires_at <= now`), one [`Removal`] per mailbox.
    pub fn purge(&self, now: u64) -> Vec<Removal> {
        let mut by_box: BTreeMap<PeerKey, Vec<(u64, MessageId)>> = BTreeMap::new();
        for &(expires_at, seq, key) in &self.expiry {
            if expires_at > now {
                break;
            }
            if let Some(id) = self.mailboxes.get(&key).and_then(|m| m.order.get(&seq)) {
                by_box.entry(key).or_default().push((seq, *id));
            }
        }
        by_box
            .into_iter()
            .map(|(key, mut items)| {
                items.sort_unstable();
                Removal { key, items }
            })
            .collect()
    }

    /// The mailboxes idle at `now` (their owner last registered `mailbox_idle_secs` or more
    /// ago; none when that limit is 0), oldest registration first, each with every stored
    /// envelope and prekey: [`Effect::RemoveMailbox`] deletes them all. Apply each right
    /// after persisting it, as for every decision.
    pub fn purge_idle(&self, now: u64) -> Vec<MailboxRemoval> {
        let idle = self.limits.mailbox_idle_secs;
        if idle == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &(registered_at, key) in &self.idle {
            if registered_at.saturating_add(idle) > now {
                break;
            }
            let Some(mb) = self.mailboxes.get(&key) else {
                continue;
            };
            out.push(MailboxRemoval {
                key,
                registered_at,
                items: mb.order.iter().map(|(&seq, &id)| (seq, id)).collect(),
                prekeys: mb.prekeys.iter().copied().collect(),
            });
        }
        out
    }

    /// Forgets the token buckets of senders that have been quiet long enough to be full.
    pub fn prune_senders(&mut self, now: u64) {
        let (rate, burst) = (self.limits.sender_rate_per_sec, self.limits.sender_burst);
        self.senders.prune(now, rate.into(), burst.into());
    }

    /// Records a persisted effect in the index.
    pub fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::PutMailbox(MailboxUpdate {
                key,
                tokens,
                registered_at,
                ..
            }) => self.put_mailbox(*key, tokens, *registered_at),
            Effect::PutItem(item) => self.insert_item(item),
            Effect::RemoveItems(Removal { key, items }) => {
                let Some(mb) = self.mailboxes.get_mut(key) else {
                    return;
                };
                for (seq, id) in items {
                    match mb.items.get(id) {
                        Some(meta) if meta.seq == *seq => {}
                        _ => continue,
                    }
                    if let Some(meta) = mb.items.remove(id) {
                        mb.order.remove(&meta.seq);
                        mb.count -= 1;
                        mb.bytes -= u64::from(meta.size);
                        self.stored_items -= 1;
                        self.stored_bytes -= u64::from(meta.size);
                        self.expiry.remove(&(meta.expires_at, meta.seq, *key));
                    }
                }
            }
            Effect::AddPrekeys(PrekeyAppend {
                key,
                first_seq,
                count,
            }) => {
                if let Some(mb) = self.mailboxes.get_mut(key) {
                    for seq in *first_seq..first_seq.saturating_add(u64::from(*count)) {
                        mb.prekeys.push_back(seq);
                    }
                    self.stored_prekeys += u64::from(*count);
                    self.next_seq = self
                        .next_seq
                        .max(first_seq.saturating_add(u64::from(*count)));
                }
            }
            Effect::TakePrekey(PrekeyClaim { key, seq }) => {
                if let Some(mb) = self.mailboxes.get_mut(key)
                    && let Some(at) = mb.prekeys.iter().position(|s| s == seq)
                {
                    mb.prekeys.remove(at);
                    self.stored_prekeys -= 1;
                }
            }
            // Drops what the index holds for the mailbox (the removal lists exactly that
            // when applied right after its decision); a second apply finds nothing.
            Effect::RemoveMailbox(MailboxRemoval { key, .. }) => {
                let Some(mb) = self.mailboxes.remove(key) else {
                    return;
                };
                self.idle.remove(&(mb.registered_at, *key));
                for meta in mb.items.values() {
                    self.expiry.remove(&(meta.expires_at, meta.seq, *key));
                }
                self.stored_items -= u64::from(mb.count);
                self.stored_bytes -= mb.bytes;
                self.stored_prekeys -= mb.prekeys.len() as u64;
            }
        }
    }

    /// Creates mailbox `key` or replaces its token set and last registration.
    fn put_mailbox(&mut self, key: PeerKey, tokens: &[TokenHash], registered_at: u64) {
        let mb = self.mailboxes.entry(key).or_default();
        // A new mailbox has `registered_at` 0 and no entry in `idle`: removing is a no-op.
        self.idle.remove(&(mb.registered_at, key));
        mb.registered_at = registered_at;
        mb.tokens = tokens.iter().copied().collect();
        self.idle.insert((registered_at, key));
    }

    fn insert_item(&mut self, item: &NewItem) {
        let &NewItem {
            key,
            seq,
            id,
            sender,
            size,
            expires_at,
            ..
        } = item;
        let Some(mb) = self.mailboxes.get_mut(&key) else {
            return;
        };
        if mb.items.contains_key(&id) || mb.order.contains_key(&seq) {
            return;
        }
        mb.items.insert(
            id,
            ItemMeta {
                seq,
                size,
                expires_at,
                sender,
            },
        );
        mb.order.insert(seq, id);
        mb.count += 1;
        mb.bytes += u64::from(size);
        self.stored_items += 1;
        self.stored_bytes += u64::from(size);
        self.expiry.insert((expires_at, seq, key));
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
    }

    /// Restores a mailbox read from disk (at open) with its owner's last registration.
    pub(crate) fn restore_mailbox(
        &mut self,
        key: PeerKey,
        tokens: &[TokenHash],
        registered_at: u64,
    ) {
        self.put_mailbox(key, tokens, registered_at);
    }

    /// Restores a stored item read from disk; `false` if its mailbox is unknown or the
    /// id/seq is already there. Quotas are not checked: limits may have been lowered since
    /// it was stored, and nothing stored is ever evicted.
    pub(crate) fn restore_item(&mut self, item: &NewItem) -> bool {
        let known = self
            .mailboxes
            .get(&item.key)
            .is_some_and(|m| !m.items.contains_key(&item.id) && !m.order.contains_key(&item.seq));
        if known {
            self.insert_item(item);
        }
        known
    }

    /// Restores a stored prekey (in ascending `seq` order per mailbox); `false` if the
    /// mailbox is unknown.
    pub(crate) fn restore_prekey(&mut self, key: PeerKey, seq: u64) -> bool {
        match self.mailboxes.get_mut(&key) {
            Some(mb) => {
                mb.prekeys.push_back(seq);
                self.stored_prekeys += 1;
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                true
            }
            None => false,
        }
    }

    /// Forgets the whole index (mailboxes, items, prekeys) but keeps the limits, the
    /// sender buckets and the seq high-water mark; used to reload from disk after a
    /// failed write.
    pub(crate) fn clear_index(&mut self) {
        self.mailboxes.clear();
        self.expiry.clear();
        self.idle.clear();
        self.stored_items = 0;
        self.stored_bytes = 0;
        self.stored_prekeys = 0;
    }

    /// Makes the next seq at least `seq` (restored from disk).
    pub(crate) fn restore_next_seq(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// The next seq to be handed out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether `recipient`'s mailbox holds `id` in a copy expired at `now` (awaiting
    /// purge): a new deposit of that id must purge first, not count as a duplicate.
    pub fn holds_expired(&self, recipient: &PeerBytes, id: &MessageId, now: u64) -> bool {
        self.mailboxes
            .get(&recipient.key())
            .and_then(|m| m.items.get(id))
            .is_some_and(|m| m.expires_at <= now)
    }

    /// Whether `peer` has a mailbox (an idle one not purged yet included).
    pub fn is_registered(&self, peer: &PeerBytes) -> bool {
        self.mailboxes.contains_key(&peer.key())
    }

    /// When `peer` last registered its mailbox (`None` without one).
    pub fn registered_at(&self, peer: &PeerBytes) -> Option<u64> {
        self.mailboxes.get(&peer.key()).map(|m| m.registered_at)
    }

    /// Envelopes stored for `peer` (0 without a mailbox), expired ones awaiting purge
    /// included.
    pub fn waiting(&self, peer: &PeerBytes) -> u32 {
        self.mailboxes.get(&peer.key()).map_or(0, |m| m.count)
    }

    /// `(count, bytes)` stored in `peer`'s mailbox.
    pub fn usage(&self, peer: &PeerBytes) -> Option<(u32, u64)> {
        self.mailboxes.get(&peer.key()).map(|m| (m.count, m.bytes))
    }

    /// Prekeys in `peer`'s pool.
    pub fn prekeys(&self, peer: &PeerBytes) -> u32 {
        self.mailboxes
            .get(&peer.key())
            .map_or(0, |m| m.prekeys.len() as u32)
    }

    /// Number of mailboxes.
    pub fn mailbox_count(&self) -> usize {
        self.mailboxes.len()
    }

    /// Envelopes stored in all mailboxes.
    pub fn stored_items(&self) -> u64 {
        self.stored_items
    }

    /// Envelope bytes stored in all mailboxes.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Prekeys stored in all mailboxes.
    pub fn stored_prekeys(&self) -> u64 {
        self.stored_prekeys
    }

    /// Number of senders whose token bucket is tracked.
    pub fn tracked_senders(&self) -> usize {
        self.senders.buckets.len()
    }

    /// Checks every invariant of the index; `Err` names the first broken one. Used by the
    /// tests and after a restore.
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut items, mut bytes, mut prekeys) = (0u64, 0u64, 0u64);
        for (key, mb) in &self.mailboxes {
            let sum: u64 = mb.items.values().map(|m| u64::from(m.size)).sum();
            if mb.count as usize != mb.items.len() || mb.bytes != sum {
                return Err(format!(
                    "{key:?}: usage ({}, {}) != items ({}, {sum})",
                    mb.count,
                    mb.bytes,
                    mb.items.len()
                ));
            }
            if mb.order.len() != mb.items.len()
                || mb
                    .order
                    .iter()
                    .any(|(seq, id)| mb.items.get(id).map(|m| m.seq) != Some(*seq))
            {
                return Err(format!("{key:?}: order and items disagree"));
            }
            for (seq, m) in mb.items.values().map(|m| (m.seq, m)) {
                if !self.expiry.contains(&(m.expires_at, seq, *key)) {
                    return Err(format!("{key:?}: seq {seq} missing from expiry"));
                }
                if seq >= self.next_seq {
                    return Err(format!("{key:?}: seq {seq} >= next_seq {}", self.next_seq));
                }
            }
            if !self.idle.contains(&(mb.registered_at, *key)) {
                return Err(format!("{key:?}: missing from the idle order"));
            }
            items += mb.items.len() as u64;
            bytes += sum;
            prekeys += mb.prekeys.len() as u64;
            if mb
                .prekeys
                .iter()
                .zip(mb.prekeys.iter().skip(1))
                .any(|(a, b)| a >= b)
            {
                return Err(format!("{key:?}: prekeys out of order"));
            }
        }
        if self.expiry.len() as u64 != items || self.stored_items != items {
            return Err(format!(
                "totals: expiry {} stored {} items {items}",
                self.expiry.len(),
                self.stored_items
            ));
        }
        if self.stored_bytes != bytes || self.stored_prekeys != prekeys {
            return Err("byte or prekey totals disagree".into());
        }
        if self.idle.len() != self.mailboxes.len() {
            return Err(format!(
                "idle order has {} entries for {} mailboxes",
                self.idle.len(),
                self.mailboxes.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::MailboxToken;

    const T0: u64 = 1_700_000_000;

    fn peer(n: u8) -> PeerBytes {
        PeerBytes::new(vec![n; 38]).unwrap()
    }

    fn token(n: u8) -> MailboxToken {
        MailboxToken::from_bytes([n; 32])
    }

    fn id(n: u32) -> MessageId {
        let mut i = [0u8; 16];
        i[..4].copy_from_slice(&n.to_be_bytes());
        i
    }

    fn limits() -> RelayLimits {
        RelayLimits {
            sender_rate_per_sec: 1000,
            sender_burst: 100_000,
            ..RelayLimits::default()
        }
    }

    /// Decide and apply in one step, as the server does after a successful write.
    fn register(r: &mut MailboxRules, now: u64, p: &PeerBytes, add: &[TokenHash]) -> Registration {
        let reg = r.register(now, p, add, &[]).unwrap();
        r.apply(&Effect::PutMailbox(reg.update.clone()));
        reg
    }

    fn deposit(
        r: &mut MailboxRules,
        now: u64,
        from: &PeerBytes,
        to: &PeerBytes,
        t: &MailboxToken,
        i: MessageId,
        size: usize,
    ) -> Result<Deposit, Refusal> {
        let d = r.deposit(now, from, to, &t.hash(), i, None, size)?;
        if let Deposit::Store(item) = &d {
            r.apply(&Effect::PutItem(item.clone()));
        }
        Ok(d)
    }

    fn rules_with_bob() -> MailboxRules {
        let mut r = MailboxRules::new(limits(), true);
        register(&mut r, T0, &peer(1), &[token(1).hash()]);
        r
    }

    #[test]
    fn register_creates_and_reregister_is_idempotent() {
        let mut r = MailboxRules::new(limits(), true);
        let bob = peer(1);
        let reg = register(&mut r, T0, &bob, &[token(1).hash()]);
        assert!(reg.created);
        assert_eq!(reg.waiting, 0);
        let again = r.register(T0, &bob, &[token(1).hash()], &[]).unwrap();
        assert!(!again.created);
        assert_eq!(again.update, reg.update, "same token set, same write");
        r.apply(&Effect::PutMailbox(again.update));
        assert_eq!(r.mailbox_count(), 1);
        deposit(&mut r, T0, &peer(2), &bob, &token(1), id(1), 10).unwrap();
        assert_eq!(r.register(T0, &bob, &[], &[]).unwrap().waiting, 1);
    }

    #[test]
    fn revoke_wins_over_add_and_stops_deposits() {
        let mut r = rules_with_bob();
        let bob = peer(1);
        let reg = r
            .register(
                T0,
                &bob,
                &[token(2).hash()],
                &[token(1).hash(), token(2).hash()],
            )
            .unwrap();
        assert_eq!(
            reg.update,
            MailboxUpdate {
                key: bob.key(),
                peer: bob.clone(),
                tokens: vec![],
                registered_at: T0,
            }
        );
        // Not applied yet: the old token still works (the index follows the disk).
        assert!(deposit(&mut r, T0, &peer(2), &bob, &token(1), id(1), 1).is_ok());
        r.apply(&Effect::PutMailbox(reg.update));
        assert_eq!(
            deposit(&mut r, T0, &peer(2), &bob, &token(1), id(2), 1),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            deposit(&mut r, T0, &peer(2), &bob, &token(2), id(2), 1),
            Err(Refusal::Unauthorized)
        );
    }

    #[test]
    fn strangers_and_unknown_mailboxes_are_unauthorized() {
        let mut r = rules_with_bob();
        let err = deposit(&mut r, T0, &peer(2), &peer(9), &token(1), id(1), 1).unwrap_err();
        assert_eq!(err, Refusal::Unauthorized, "no mailbox");
        assert_eq!(err.code(), ErrorCode::Unauthorized);
        assert_eq!(
            deposit(&mut r, T0, &peer(2), &peer(1), &token(7), id(1), 1),
            Err(Refusal::Unauthorized),
            "unknown token"
        );
        assert_eq!(
            r.claim_prekey(T0, &peer(2), &peer(1), &token(7).hash()),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(r.stored_items(), 0);
    }

    #[test]
    fn registration_switch_refuses_only_new_mailboxes() {
        let mut r = rules_with_bob();
        r.set_accept_registrations(false);
        assert!(!r.accept_registrations());
        assert_eq!(
            r.register(T0, &peer(5), &[], &[]).unwrap_err(),
            Refusal::RegistrationClosed
        );
        // Bob keeps working: update tokens, receive, fetch.
        register(&mut r, T0, &peer(1), &[token(3).hash()]);
        deposit(&mut r, T0, &peer(2), &peer(1), &token(3), id(1), 5).unwrap();
        assert_eq!(r.fetch(T0, &peer(1), None, 10, 1000).unwrap().seqs.len(), 1);
        r.set_accept_registrations(true);
        assert!(r.register(T0, &peer(5), &[], &[]).is_ok());
    }

    #[test]
    fn max_mailboxes_and_tokens_are_enforced() {
        let mut r = MailboxRules::new(
            RelayLimits {
                max_mailboxes: 2,
                max_tokens_per_mailbox: 2,
                ..limits()
            },
            true,
        );
        register(&mut r, T0, &peer(1), &[]);
        register(&mut r, T0, &peer(2), &[]);
        let e = r.register(T0, &peer(3), &[], &[]).unwrap_err();
        assert_eq!(e, Refusal::RelayFull { max: 2 });
        assert_eq!(e.code(), ErrorCode::RelayFull);
        // Existing mailboxes can still re-register.
        register(&mut r, T0, &peer(1), &[token(1).hash(), token(2).hash()]);
        let e = r
            .register(T0, &peer(1), &[token(3).hash()], &[])
            .unwrap_err();
        assert_eq!(e, Refusal::TooManyTokens { count: 3, max: 2 });
        assert_eq!(e.code(), ErrorCode::Quota);
        // Swapping one for another in a single request is fine.
        assert!(
            r.register(T0, &peer(1), &[token(3).hash()], &[token(1).hash()])
                .is_ok()
        );
    }

    #[test]
    fn too_large_is_refused_at_the_limit_plus_one() {
        let mut r = rules_with_bob();
        let max = r.limits().max_envelope_bytes as usize;
        assert!(deposit(&mut r, T0, &peer(2), &peer(1), &token(1), id(1), max).is_ok());
        let e = deposit(&mut r, T0, &peer(2), &peer(1), &token(1), id(2), max + 1).unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooLarge);
    }

    #[test]
    fn quota_count_refuses_the_next_and_evicts_nothing() {
        let mut r = MailboxRules::new(
            RelayLimits {
                quota_count: 3,
                ..limits()
            },
            true,
        );
        let bob = peer(1);
        register(&mut r, T0, &bob, &[token(1).hash()]);
        for i in 0..3 {
            deposit(&mut r, T0, &peer(2), &bob, &token(1), id(i), 10).unwrap();
        }
        let e = deposit(&mut r, T0, &peer(2), &bob, &token(1), id(3), 10).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Quota);
        assert_eq!(r.usage(&bob), Some((3, 30)));
        let plan = r.fetch(T0, &bob, None, 10, 10_000).unwrap();
        assert_eq!(plan.seqs, vec![1, 2, 3], "nothing evicted");
        // A duplicate of a stored id is still acknowledged when full.
        assert!(matches!(
            deposit(&mut r, T0, &peer(2), &bob, &token(1), id(0), 10),
            Ok(Deposit::Duplicate { seq: 1, .. })
        ));
        // Acking one makes room for one.
        let ack = r.ack(&bob, &[id(0)]).unwrap();
        r.apply(&Effect::RemoveItems(ack));
        assert!(deposit(&mut r, T0, &peer(2), &bob, &token(1), id(3), 10).is_ok());
        assert!(deposit(&mut r, T0, &peer(2), &bob, &token(1), id(4), 10).is_err());
        r.check_invariants().unwrap();
    }

    #[test]
    fn quota_bytes_refuses_the_envelope_that_would_exceed_it() {
        let mut r = MailboxRules::new(
            RelayLimits {
                quota_bytes: 100 * 1024,
                ..limits()
            },
            true,
        );
        let bob = peer(1);
        register(&mut r, T0, &bob, &[token(1).hash()]);
        deposit(&mut r, T0, &peer(2), &bob, &token(1), id(1), 60 * 1024).unwrap();
        let e = deposit(&mut r, T0, &peer(2), &bob, &token(1), id(2), 40 * 1024 + 1).unwrap_err();
        assert!(matches!(e, Refusal::Quota { count: 1, .. }), "{e}");
        deposit(&mut r, T0, &peer(2), &bob, &token(1), id(2), 40 * 1024).unwrap();
        assert_eq!(r.usage(&bob), Some((2, 100 * 1024)));
    }

    #[test]
    fn senders_are_rate_limited_independently_and_refilled() {
        let mut r = MailboxRules::new(
            RelayLimits {
                sender_rate_per_sec: 2,
                sender_burst: 3,
                ..RelayLimits::default()
            },
            true,
        );
        register(&mut r, T0, &peer(1), &[token(1).hash()]);
        let (alice, carol) = (peer(2), peer(3));
        // Bob's own register took one of his tokens, not Alice's.
        for i in 0..3 {
            deposit(&mut r, T0, &alice, &peer(1), &token(1), id(i), 1).unwrap();
        }
        assert_eq!(
            deposit(&mut r, T0, &alice, &peer(1), &token(1), id(9), 1),
            Err(Refusal::RateLimited)
        );
        // Strangers are charged too (no free probing), and limited before anything else.
        assert_eq!(
            r.claim_prekey(T0, &alice, &peer(1), &token(1).hash()),
            Err(Refusal::RateLimited)
        );
        assert!(deposit(&mut r, T0, &carol, &peer(1), &token(1), id(10), 1).is_ok());
        // One second later: 2 more tokens.
        assert!(deposit(&mut r, T0 + 1, &alice, &peer(1), &token(1), id(11), 1).is_ok());
        assert!(deposit(&mut r, T0 + 1, &alice, &peer(1), &token(1), id(12), 1).is_ok());
        assert_eq!(
            deposit(&mut r, T0 + 1, &alice, &peer(1), &token(1), id(13), 1),
            Err(Refusal::RateLimited)
        );
        // A clock going backwards gives nothing.
        assert_eq!(
            deposit(&mut r, T0, &alice, &peer(1), &token(1), id(14), 1),
            Err(Refusal::RateLimited)
        );
        // Long quiet: refilled only up to the burst.
        for i in 0..3 {
            deposit(&mut r, T0 + 100, &alice, &peer(1), &token(1), id(20 + i), 1).unwrap();
        }
        assert!(deposit(&mut r, T0 + 100, &alice, &peer(1), &token(1), id(30), 1).is_err());
        // Fetch and ack are never rate limited (the owner must be able to drain).
        assert!(r.fetch(T0, &peer(1), None, 1, 1).is_ok());
    }

    #[test]
    fn tracked_senders_are_bounded_and_a_flooder_stays_limited() {
        let mut r = MailboxRules::with_sender_capacity(
            RelayLimits {
                sender_rate_per_sec: 1,
                sender_burst: 2,
                ..RelayLimits::default()
            },
            true,
            16,
        );
        register(&mut r, T0, &peer(1), &[token(1).hash()]);
        let flooder = peer(200);
        for n in 0..2 {
            assert!(deposit(&mut r, T0, &flooder, &peer(1), &token(1), id(n), 1).is_ok());
        }
        assert_eq!(
            deposit(&mut r, T0, &flooder, &peer(1), &token(1), id(2), 1),
            Err(Refusal::RateLimited)
        );
        for n in 0..100u8 {
            let _ = deposit(
                &mut r,
                T0,
                &peer(n.wrapping_add(2)),
                &peer(1),
                &token(1),
                id(1000 + u32::from(n)),
                1,
            );
            assert!(r.tracked_senders() <= 16, "{}", r.tracked_senders());
        }
        assert_eq!(
            deposit(&mut r, T0, &flooder, &peer(1), &token(1), id(3), 1),
            Err(Refusal::RateLimited),
            "an empty bucket is evicted last"
        );
        r.prune_senders(T0 + 10);
        assert_eq!(r.tracked_senders(), 0, "quiet senders are forgotten");
    }

    #[test]
    fn ttl_is_clamped_and_defaulted() {
        let mut r = rules_with_bob();
        let l = r.limits().clone();
        assert_eq!(r.ttl(None), l.default_ttl_secs);
        assert_eq!(r.ttl(Some(1)), l.min_ttl_secs);
        assert_eq!(r.ttl(Some(l.min_ttl_secs + 1)), l.min_ttl_secs + 1);
        assert_eq!(r.ttl(Some(u64::MAX)), l.max_ttl_secs);
        let Deposit::Store(item) = r
            .deposit(T0, &peer(2), &peer(1), &token(1).hash(), id(1), Some(5), 1)
            .unwrap()
        else {
            panic!("not stored")
        };
        assert_eq!(item.deposited_at, T0);
        assert_eq!(item.expires_at, T0 + l.min_ttl_secs);
    }

    #[test]
    fn duplicate_is_stored_once() {
        let mut r = rules_with_bob();
        let Deposit::Store(first) =
            deposit(&mut r, T0, &peer(2), &peer(1), &token(1), id(1), 10).unwrap()
        else {
            panic!("not stored")
        };
        let dup = deposit(&mut r, T0 + 5, &peer(2), &peer(1), &token(1), id(1), 99).unwrap();
        assert_eq!(
            dup,
            Deposit::Duplicate {
                seq: first.seq,
                expires_at: first.expires_at
            }
        );
        // Another sender's envelope under the same id is no duplicate of it: refused, so
        // that sender cannot make the first one's deposit at another relay look done.
        assert_eq!(
            deposit(&mut r, T0 + 5, &peer(3), &peer(1), &token(1), id(1), 99),
            Err(Refusal::IdTaken)
        );
        assert_eq!(Refusal::IdTaken.code(), ErrorCode::Malformed);
        assert_eq!(r.usage(&peer(1)), Some((1, 10)));
        // Applying a stale PutItem for a stored id changes nothing either.
        r.apply(&Effect::PutItem(NewItem {
            seq: 77,
            size: 5,
            ..first
        }));
        assert_eq!(r.usage(&peer(1)), Some((1, 10)));
        r.check_invariants().unwrap();
    }

    #[test]
    fn seqs_increase_in_deposit_order() {
        let mut r = rules_with_bob();
        let mut last = 0;
        for i in 0..20 {
            let Deposit::Store(item) =
                deposit(&mut r, T0, &peer(2), &peer(1), &token(1), id(i), 1).unwrap()
            else {
                panic!()
            };
            assert!(item.seq > last);
            last = item.seq;
        }
        assert_eq!(r.next_seq(), last + 1);
    }

    #[test]
    fn fetch_pages_by_items_and_bytes_in_order() {
        let mut r = rules_with_bob();
        let bob = peer(1);
        for i in 0..10 {
            deposit(&mut r, T0, &peer(2), &bob, &token(1), id(i), 1000).unwrap();
        }
        let p = r.fetch(T0, &bob, None, 4, u32::MAX).unwrap();
        assert_eq!((p.seqs.clone(), p.more), (vec![1, 2, 3, 4], true));
        let p = r.fetch(T0, &bob, Some(4), 100, u32::MAX).unwrap();
        assert_eq!((p.seqs.clone(), p.more), ((5..=10).collect(), false));
        // Bytes: each item costs 1000 + overhead.
        let per = 1000 + MAX_ITEM_OVERHEAD;
        let p = r.fetch(T0, &bob, None, 100, 3 * per).unwrap();
        assert_eq!((p.seqs.clone(), p.more), (vec![1, 2, 3], true));
        let p = r.fetch(T0, &bob, None, 100, 3 * per - 1).unwrap();
        assert_eq!(p.seqs, vec![1, 2]);
        // A budget smaller than one item still returns one item.
        let p = r.fetch(T0, &bob, None, 100, 1).unwrap();
        assert_eq!((p.seqs.clone(), p.more), (vec![1], true));
        // max_items 0 is read as 1; a cursor past the end gives an empty last page.
        assert_eq!(r.fetch(T0, &bob, None, 0, u32::MAX).unwrap().seqs, vec![1]);
        let p = r.fetch(T0, &bob, Some(u64::MAX), 10, u32::MAX).unwrap();
        assert_eq!((p.seqs.len(), p.more), (0, false));
        // The relay's own caps win over the request.
        let mut small = MailboxRules::new(
            RelayLimits {
                fetch_max_items: 2,
                ..limits()
            },
            true,
        );
        register(&mut small, T0, &bob, &[token(1).hash()]);
        for i in 0..3 {
            deposit(&mut small, T0, &peer(2), &bob, &token(1), id(i), 1).unwrap();
        }
        assert_eq!(
            small
                .fetch(T0, &bob, None, 1000, u32::MAX)
                .unwrap()
                .seqs
                .len(),
            2
        );
    }

    #[test]
    fn fetch_and_ack_need_the_owners_mailbox() {
        let mut r = rules_with_bob();
        deposit(&mut r, T0, &peer(2), &peer(1), &token(1), id(1), 1).unwrap();
        let eve = peer(6);
        assert_eq!(
            r.fetch(T0, &eve, None, 10, 100).unwrap_err(),
            Refusal::NotRegistered
        );
        assert_eq!(r.ack(&eve, &[id(1)]).unwrap_err(), Refusal::NotRegistered);
        assert_eq!(
            r.publish_prekeys(T0, &eve, 1).unwrap_err().code(),
            ErrorCode::NotRegistered
        );
        // A registered Eve cannot see or delete Bob's envelope.
        register(&mut r, T0, &eve, &[]);
        assert!(r.fetch(T0, &eve, None, 10, 100).unwrap().seqs.is_empty());
        let ack = r.ack(&eve, &[id(1)]).unwrap();
        assert_eq!(
            ack,
            Removal {
                key: eve.key(),
                items: vec![]
            }
        );
        r.apply(&Effect::RemoveItems(ack));
        assert_eq!(r.waiting(&peer(1)), 1);
        // Bob's ack removes it; duplicate ids in one ack count once.
        let ack = r.ack(&peer(1), &[id(1), id(1), id(42)]).unwrap();
        assert_eq!(
            ack,
            Removal {
                key: peer(1).key(),
                items: vec![(1, id(1))]
            }
        );
        let ack = Effect::RemoveItems(ack);
        r.apply(&ack);
        r.apply(&ack);
        assert_eq!(r.waiting(&peer(1)), 0);
        r.check_invariants().unwrap();
    }

    #[test]
    fn purge_removes_exactly_the_expired() {
        let mut r = rules_with_bob();
        let (min, max) = (r.limits().min_ttl_secs, r.limits().max_ttl_secs);
        for (i, ttl) in [(0, min), (1, max), (2, min + 10)] {
            r.deposit(
                T0,
                &peer(2),
                &peer(1),
                &token(1).hash(),
                id(i),
                Some(ttl),
                7,
            )
            .map(|d| match d {
                Deposit::Store(item) => r.apply(&Effect::PutItem(item)),
                Deposit::Duplicate { .. } => panic!(),
            })
            .unwrap();
        }
        assert!(r.purge(T0 + min - 1).is_empty());
        // Expired but not purged yet: no longer served.
        assert_eq!(
            r.fetch(T0 + min, &peer(1), None, 10, 1 << 20).unwrap().seqs,
            vec![2, 3]
        );
        let effects = r.purge(T0 + min + 10);
        assert_eq!(
            effects,
            vec![Removal {
                key: peer(1).key(),
                items: vec![(1, id(0)), (3, id(2))]
            }]
        );
        for e in effects {
            r.apply(&Effect::RemoveItems(e));
        }
        assert_eq!(r.usage(&peer(1)), Some((1, 7)));
        assert!(r.purge(T0 + min + 10).is_empty());
        r.check_invariants().unwrap();
    }

    #[test]
    fn prekeys_append_up_to_the_cap_and_are_claimed_one_by_one() {
        let mut r = MailboxRules::new(
            RelayLimits {
                max_prekeys_per_mailbox: 3,
                ..limits()
            },
            true,
        );
        register(&mut r, T0, &peer(1), &[token(1).hash()]);
        let g = r.publish_prekeys(T0, &peer(1), 2).unwrap();
        assert_eq!((g.accepted, g.available), (2, 2));
        r.apply(&Effect::AddPrekeys(g.append));
        let g = r.publish_prekeys(T0, &peer(1), 5).unwrap();
        assert_eq!((g.accepted, g.available), (1, 3));
        assert_eq!(g.append.count, 1);
        let first_seq = g.append.first_seq;
        r.apply(&Effect::AddPrekeys(g.append));
        assert!(r.next_seq() > first_seq, "prekey numbers are never reused");
        assert_eq!(r.publish_prekeys(T0, &peer(1), 5).unwrap().accepted, 0);
        let mut expected_seqs = vec![first_seq - 2, first_seq - 1, first_seq];
        for left in (0..3).rev() {
            let claim = r
                .claim_prekey(T0, &peer(2), &peer(1), &token(1).hash())
                .unwrap()
                .unwrap();
            assert_eq!(claim.seq, expected_seqs.remove(0), "oldest first");
            r.apply(&Effect::TakePrekey(claim));
            assert_eq!(r.prekeys(&peer(1)), left);
        }
        assert_eq!(
            r.claim_prekey(T0, &peer(2), &peer(1), &token(1).hash()),
            Ok(None)
        );
        assert_eq!(r.stored_prekeys(), 0);
    }

    #[test]
    fn debug_is_a_summary() {
        let mut r = rules_with_bob();
        deposit(&mut r, T0, &peer(2), &peer(1), &token(1), id(1), 10).unwrap();
        let shown = format!("{r:?}");
        assert!(
            shown.contains("mailboxes: 1") && shown.contains("stored_items: 1"),
            "{shown}"
        );
        assert!(!shown.contains("TokenHash"), "{shown}");
    }

    #[test]
    fn restore_rebuilds_the_same_index() {
        let mut r = MailboxRules::new(limits(), true);
        r.restore_mailbox(peer(1).key(), &[token(1).hash()], T0 - 7);
        let item = |key: PeerKey, seq: u64, i: MessageId| NewItem {
            key,
            seq,
            id: i,
            sender: sender_tag(peer(2).as_bytes()),
            size: 10,
            deposited_at: T0,
            expires_at: T0 + 100,
        };
        assert!(r.restore_item(&item(peer(1).key(), 5, id(1))));
        assert!(!r.restore_item(&item(peer(1).key(), 5, id(2))), "seq taken");
        assert!(
            !r.restore_item(&item(peer(9).key(), 6, id(1))),
            "no mailbox"
        );
        for seq in [7, 8, 9, 10] {
            assert!(r.restore_prekey(peer(1).key(), seq));
        }
        assert!(!r.restore_prekey(peer(9).key(), 11));
        r.restore_next_seq(3);
        assert_eq!(r.next_seq(), 11, "never below a stored seq or prekey");
        r.restore_next_seq(1000);
        assert_eq!(r.next_seq(), 1000);
        assert_eq!(r.waiting(&peer(1)), 1);
        assert_eq!(r.prekeys(&peer(1)), 4);
        assert_eq!(r.registered_at(&peer(1)), Some(T0 - 7));
        r.check_invariants().unwrap();
    }

    const IDLE: u64 = 90 * 86400;

    /// Decides and applies a purge of expired items and idle mailboxes, as the server does.
    fn purge_all(r: &mut MailboxRules, now: u64) -> Vec<MailboxRemoval> {
        for e in r.purge(now) {
            r.apply(&Effect::RemoveItems(e));
        }
        let idle = r.purge_idle(now);
        for e in &idle {
            r.apply(&Effect::RemoveMailbox(e.clone()));
        }
        idle
    }

    fn publish(r: &mut MailboxRules, now: u64, p: &PeerBytes, count: usize) -> u64 {
        let g = r.publish_prekeys(now, p, count).unwrap();
        let first = g.append.first_seq;
        r.apply(&Effect::AddPrekeys(g.append));
        first
    }

    #[test]
    fn the_relay_wide_envelope_limit_refuses_deposits_but_not_their_removal() {
        let mut r = rules_with_bob();
        let (bob, carol, alice) = (peer(1), peer(3), peer(2));
        register(&mut r, T0, &carol, &[token(3).hash()]);
        r.set_max_stored_items(3);
        deposit(&mut r, T0, &alice, &bob, &token(1), id(1), 10).unwrap();
        deposit(&mut r, T0, &alice, &bob, &token(1), id(2), 10).unwrap();
        deposit(&mut r, T0, &alice, &carol, &token(3), id(3), 10).unwrap();
        // Carol's mailbox is far from its quota; the relay as a whole is full.
        let refused = deposit(&mut r, T0, &alice, &carol, &token(3), id(4), 10);
        assert_eq!(refused, Err(Refusal::StoreFull { max: 3 }));
        assert_eq!(refused.unwrap_err().code(), ErrorCode::RelayFull);
        // A duplicate is still answered, and an ack makes room again.
        assert!(matches!(
            deposit(&mut r, T0, &alice, &bob, &token(1), id(1), 10),
            Ok(Deposit::Duplicate { .. })
        ));
        let removal = r.ack(&bob, &[id(1)]).unwrap();
        r.apply(&Effect::RemoveItems(removal));
        deposit(&mut r, T0, &alice, &carol, &token(3), id(4), 10).unwrap();
    }

    #[test]
    fn fetches_have_a_bucket_of_their_own_per_peer() {
        let mut r = rules_with_bob();
        let (bob, carol) = (peer(1), peer(3));
        register(&mut r, T0, &carol, &[token(3).hash()]);
        for _ in 0..FETCH_BURST {
            r.fetch(T0, &bob, None, 10, 1000).unwrap();
        }
        assert_eq!(r.fetch(T0, &bob, None, 10, 1000), Err(Refusal::RateLimited));
        // Another peer is not affected, nor are bob's writes.
        r.fetch(T0, &carol, None, 10, 1000).unwrap();
        r.register(T0, &bob, &[], &[]).unwrap();
        // A second later, FETCH_RATE_PER_SEC more.
        for _ in 0..FETCH_RATE_PER_SEC {
            r.fetch(T0 + 1, &bob, None, 10, 1000).unwrap();
        }
        assert_eq!(
            r.fetch(T0 + 1, &bob, None, 10, 1000),
            Err(Refusal::RateLimited)
        );
    }

    #[test]
    fn a_deposit_is_never_promised_past_its_mailboxs_idle_deadline() {
        let mut r = rules_with_bob();
        let (bob, alice) = (peer(1), peer(2));
        // Early on, the TTL decides (default TTL well before the deadline).
        let Ok(Deposit::Store(early)) = deposit(&mut r, T0 + 10, &alice, &bob, &token(1), id(1), 5)
        else {
            panic!("stored")
        };
        assert_eq!(early.expires_at, T0 + 10 + r.limits().default_ttl_secs);
        // Near the deadline, the deadline does: the item goes with the mailbox, as promised.
        let late_at = T0 + IDLE - 100;
        let Ok(Deposit::Store(late)) = deposit(&mut r, late_at, &alice, &bob, &token(1), id(2), 5)
        else {
            panic!("stored")
        };
        assert_eq!(late.expires_at, T0 + IDLE);
        // Bob registering again moves the deadline, and new deposits get their full TTL.
        register(&mut r, late_at + 1, &bob, &[]);
        let Ok(Deposit::Store(after)) =
            deposit(&mut r, late_at + 2, &alice, &bob, &token(1), id(3), 5)
        else {
            panic!("stored")
        };
        assert_eq!(after.expires_at, late_at + 2 + r.limits().default_ttl_secs);
    }

    #[test]
    fn idle_mailbox_is_purged_with_everything_in_it() {
        let mut r = rules_with_bob();
        assert_eq!(r.limits().mailbox_idle_secs, IDLE, "the default");
        let (bob, carol, alice) = (peer(1), peer(3), peer(2));
        register(&mut r, T0 + 5, &carol, &[token(3).hash()]);
        for i in 0..3 {
            deposit(&mut r, T0 + 10, &alice, &bob, &token(1), id(i), 100).unwrap();
        }
        deposit(&mut r, T0 + 10, &alice, &carol, &token(3), id(9), 7).unwrap();
        let first_prekey = publish(&mut r, T0 + 20, &bob, 2);
        publish(&mut r, T0 + 20, &carol, 1);
        // One second before the deadline nothing is idle, and deposits still work.
        assert!(r.purge_idle(T0 + IDLE - 1).is_empty());
        deposit(&mut r, T0 + IDLE - 1, &alice, &bob, &token(1), id(3), 100).unwrap();
        // At the deadline Bob's mailbox is idle: gone for senders even before the purge.
        assert_eq!(
            deposit(&mut r, T0 + IDLE, &alice, &bob, &token(1), id(4), 1),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            r.claim_prekey(T0 + IDLE, &alice, &bob, &token(1).hash()),
            Err(Refusal::Unauthorized)
        );
        let removals = r.purge_idle(T0 + IDLE);
        assert_eq!(
            removals,
            vec![MailboxRemoval {
                key: bob.key(),
                registered_at: T0,
                // Expired or not: 1-3 outlived their TTL, 8 did not.
                items: vec![(1, id(0)), (2, id(1)), (3, id(2)), (8, id(3))],
                prekeys: vec![first_prekey, first_prekey + 1],
            }]
        );
        // Deciding changes nothing; applying removes the lot.
        assert!(r.is_registered(&bob));
        let next_seq = r.next_seq();
        for e in &removals {
            r.apply(&Effect::RemoveMailbox(e.clone()));
        }
        assert!(!r.is_registered(&bob));
        assert_eq!((r.waiting(&bob), r.prekeys(&bob)), (0, 0));
        assert_eq!(r.registered_at(&bob), None);
        assert_eq!(
            (
                r.mailbox_count(),
                r.stored_items(),
                r.stored_bytes(),
                r.stored_prekeys()
            ),
            (1, 1, 7, 1),
            "only Carol's mailbox is left"
        );
        assert_eq!(r.next_seq(), next_seq, "seqs are never reused");
        r.check_invariants().unwrap();
        // Applying the same removal again is harmless; nothing more is idle.
        r.apply(&Effect::RemoveMailbox(removals[0].clone()));
        r.check_invariants().unwrap();
        assert!(r.purge_idle(T0 + IDLE).is_empty());
        // The owner's token no longer opens anything, and Bob comes back to a new, empty
        // mailbox.
        assert_eq!(
            deposit(&mut r, T0 + IDLE, &alice, &bob, &token(1), id(5), 1),
            Err(Refusal::Unauthorized)
        );
        let reg = register(&mut r, T0 + IDLE + 1, &bob, &[token(1).hash()]);
        assert!(reg.created);
        assert_eq!(reg.waiting, 0);
        assert!(deposit(&mut r, T0 + IDLE + 1, &alice, &bob, &token(1), id(0), 1).is_ok());
        r.check_invariants().unwrap();
    }

    #[test]
    fn a_mailbox_registered_again_within_the_window_survives() {
        let mut r = rules_with_bob();
        let (bob, alice) = (peer(1), peer(2));
        deposit(&mut r, T0, &alice, &bob, &token(1), id(1), 10).unwrap();
        let again = T0 + IDLE - 1;
        let reg = register(&mut r, again, &bob, &[]);
        assert!(!reg.created);
        assert_eq!(reg.update.registered_at, again);
        assert_eq!(r.registered_at(&bob), Some(again));
        assert!(purge_all(&mut r, T0 + IDLE).is_empty());
        assert!(r.is_registered(&bob));
        assert_eq!(r.waiting(&bob), 0, "its envelope expired by TTL meanwhile");
        deposit(&mut r, again + 10, &alice, &bob, &token(1), id(2), 10).unwrap();
        assert!(purge_all(&mut r, again + IDLE - 1).is_empty());
        assert_eq!(r.waiting(&bob), 0, "the deposit expired by TTL too");
        // An owner that is idle but not purged yet revives its mailbox by registering.
        assert_eq!(
            deposit(&mut r, again + IDLE, &alice, &bob, &token(1), id(3), 1),
            Err(Refusal::Unauthorized)
        );
        register(&mut r, again + IDLE, &bob, &[]);
        deposit(&mut r, again + IDLE, &alice, &bob, &token(1), id(3), 1).unwrap();
        assert!(purge_all(&mut r, again + IDLE).is_empty());
        assert_eq!(r.waiting(&bob), 1);
        // Its first registration is long past; only the last one counts.
        let removed = r.purge_idle(again + 2 * IDLE);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].registered_at, again + IDLE);
        assert_eq!(removed[0].items, vec![(3, id(3))]);
        r.apply(&Effect::RemoveMailbox(removed[0].clone()));
        assert!(!r.is_registered(&bob));
        r.check_invariants().unwrap();
    }

    #[test]
    fn activity_by_others_does_not_keep_a_mailbox_alive() {
        let mut r = rules_with_bob();
        let (bob, alice, eve) = (peer(1), peer(2), peer(6));
        register(&mut r, T0, &eve, &[]);
        publish(&mut r, T0, &bob, 50);
        // A stranger holding Bob's token deposits and claims every day until the end...
        let mut n = 0;
        let mut day = T0;
        while day < T0 + IDLE {
            deposit(&mut r, day, &alice, &bob, &token(1), id(n), 1).unwrap();
            if n < 50 {
                let claim = r
                    .claim_prekey(day, &alice, &bob, &token(1).hash())
                    .unwrap()
                    .unwrap();
                r.apply(&Effect::TakePrekey(claim));
            }
            // ...and registers its own mailbox (which is not Bob's).
            register(&mut r, day, &eve, &[token(1).hash()]);
            n += 1;
            day += 86400;
        }
        assert_eq!(r.registered_at(&bob), Some(T0));
        // Bob's own fetches and acks do not count either (only Register does; see the
        // module docs).
        let page = r.fetch(T0 + IDLE - 1, &bob, None, 10, u32::MAX).unwrap();
        assert!(!page.seqs.is_empty());
        let ack = r.ack(&bob, &[id(n - 1)]).unwrap();
        assert_eq!(ack.items.len(), 1);
        r.apply(&Effect::RemoveItems(ack));
        let removed = purge_all(&mut r, T0 + IDLE);
        assert_eq!(removed.len(), 1, "Eve registered on the last day");
        assert_eq!(removed[0].key, bob.key());
        assert!(!r.is_registered(&bob) && r.is_registered(&eve));
        assert_eq!((r.stored_items(), r.stored_prekeys()), (0, 0));
        r.check_invariants().unwrap();
    }

    #[test]
    fn idle_seconds_zero_never_expire_a_mailbox() {
        let mut r = MailboxRules::new(
            RelayLimits {
                mailbox_idle_secs: 0,
                ..limits()
            },
            true,
        );
        register(&mut r, T0, &peer(1), &[token(1).hash()]);
        let later = T0 + 10 * 365 * 86400;
        assert!(r.purge_idle(later).is_empty());
        assert!(r.purge_idle(u64::MAX).is_empty());
        assert!(deposit(&mut r, later, &peer(2), &peer(1), &token(1), id(1), 1).is_ok());
    }

    #[test]
    fn idle_mailboxes_are_purged_oldest_first_and_only_those() {
        let mut r = MailboxRules::new(
            RelayLimits {
                mailbox_idle_secs: 100,
                ..limits()
            },
            true,
        );
        for (p, at) in [(3u8, T0 + 20), (1, T0), (2, T0 + 10), (4, T0 + 30)] {
            register(&mut r, at, &peer(p), &[]);
        }
        let keys = |v: Vec<MailboxRemoval>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
        assert_eq!(keys(r.purge_idle(T0 + 99)), vec![]);
        assert_eq!(
            keys(r.purge_idle(T0 + 120)),
            vec![peer(1).key(), peer(2).key(), peer(3).key()]
        );
        // The clock never overflows near the end of time.
        register(&mut r, u64::MAX - 5, &peer(5), &[]);
        assert_eq!(purge_all(&mut r, u64::MAX - 1).len(), 4);
        assert!(r.is_registered(&peer(5)));
        r.check_invariants().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register(u8, Vec<u8>, Vec<u8>),
        Deposit {
            from: u8,
            to: u8,
            tok: u8,
            id: u8,
            size: u32,
            ttl: Option<u64>,
        },
        Ack(u8, Vec<u8>),
        Purge,
        Tick(u64),
        Fail,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..4u8, proptest::collection::vec(0..4u8, 0..3), proptest::collection::vec(0..4u8, 0..2))
                .prop_map(|(p, a, r)| Op::Register(p, a, r)),
            6 => (0..6u8, 0..4u8, 0..4u8, 0..40u8, 0..3000u32, proptest::option::of(0..200_000u64))
                .prop_map(|(from, to, tok, id, size, ttl)| Op::Deposit { from, to, tok, id, size, ttl }),
            2 => (0..4u8, proptest::collection::vec(0..40u8, 0..5)).prop_map(|(p, ids)| Op::Ack(p, ids)),
            1 => Just(Op::Purge),
            1 => (0..50_000u64).prop_map(Op::Tick),
            1 => Just(Op::Fail),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn usage_always_equals_stored_items_and_respects_quota(ops in proptest::collection::vec(arb_op(), 1..200)) {
            let l = RelayLimits {
                quota_count: 6,
                quota_bytes: 8000,
                max_envelope_bytes: 3000,
                min_ttl_secs: 10,
                default_ttl_secs: 1000,
                max_ttl_secs: 100_000,
                sender_rate_per_sec: 5,
                sender_burst: 20,
                max_tokens_per_mailbox: 3,
                mailbox_idle_secs: 100_000,
                ..RelayLimits::default()
            };
            let mut r = MailboxRules::new(l.clone(), true);
            let mut now = T0;
            // The model of idle expiry: each owner's last applied registration.
            let mut registered: HashMap<u8, u64> = HashMap::new();
            // A write that fails (storage error) is simply not applied.
            let mut fail_next = false;
            for op in ops {
                match op {
                    Op::Register(p, add, revoke) => {
                        let add: Vec<_> = add.iter().map(|t| token(*t).hash()).collect();
                        let revoke: Vec<_> = revoke.iter().map(|t| token(*t).hash()).collect();
                        if let Ok(reg) = r.register(now, &peer(p), &add, &revoke)
                            && !std::mem::take(&mut fail_next) {
                            r.apply(&Effect::PutMailbox(reg.update));
                            registered.insert(p, now);
                        }
                    }
                    Op::Deposit { from, to, tok, id: i, size, ttl } => {
                        let before = r.usage(&peer(to));
                        match r.deposit(now, &peer(from + 10), &peer(to), &token(tok).hash(), id(i.into()), ttl, size as usize) {
                            Ok(Deposit::Store(item)) => {
                                // The TTL is clamped to the limits, and never runs past the
                                // day the mailbox goes if its owner stays away (which can be
                                // sooner than the minimum TTL).
                                let deadline = registered[&to] + l.mailbox_idle_secs;
                                prop_assert!(item.expires_at > now);
                                prop_assert!(item.expires_at >= (now + l.min_ttl_secs).min(deadline));
                                prop_assert!(item.expires_at <= (now + l.max_ttl_secs).min(deadline));
                                if !std::mem::take(&mut fail_next) {
                                    r.apply(&Effect::PutItem(item));
                                }
                            }
                            Ok(Deposit::Duplicate { .. }) => prop_assert_eq!(r.usage(&peer(to)), before),
                            Err(_) => prop_assert_eq!(r.usage(&peer(to)), before, "a refusal evicts nothing"),
                        }
                    }
                    Op::Ack(p, ids) => {
                        let ids: Vec<_> = ids.iter().map(|i| id((*i).into())).collect();
                        if let Ok(e) = r.ack(&peer(p), &ids) {
                            r.apply(&Effect::RemoveItems(e));
                            let left = r.fetch(now, &peer(p), None, 10_000, u32::MAX).unwrap();
                            prop_assert!(left.seqs.len() <= l.quota_count as usize);
                        }
                    }
                    Op::Purge => {
                        for e in r.purge(now) { r.apply(&Effect::RemoveItems(e)); }
                        prop_assert!(r.purge(now).is_empty());
                        for e in r.purge_idle(now) {
                            prop_assert!(e.registered_at + l.mailbox_idle_secs <= now);
                            r.apply(&Effect::RemoveMailbox(e));
                        }
                        prop_assert!(r.purge_idle(now).is_empty());
                        registered.retain(|_, at| *at + l.mailbox_idle_secs > now);
                    }
                    Op::Tick(s) => now += s,
                    Op::Fail => fail_next = true,
                }
                if let Err(e) = r.check_invariants() {
                    return Err(TestCaseError::fail(e));
                }
                for p in 0..4 {
                    if let Some((count, bytes)) = r.usage(&peer(p)) {
                        prop_assert!(count <= l.quota_count);
                        prop_assert!(bytes <= l.quota_bytes);
                    }
                    // Only the owner's registrations (and the purge) move the idle clock.
                    prop_assert_eq!(r.registered_at(&peer(p)), registered.get(&p).copied());
                }
            }
        }
    }
}
