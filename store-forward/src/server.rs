//! The server half of `/tern/mailbox/1`: decode a request frame, decide with
//! [`MailboxRules`], write to sled, encode the response frame. Synchronous: the node's relay
//! task calls it and owns the networking.
//!
//! Durability (group commit, the caller's job): [`MailboxServer::handle`] decides, updates
//! the index and queues its writes, but never writes to disk. The caller handles a batch of
//! concurrent requests, calls [`MailboxServer::flush`] once (which applies the queued
//! writes as one atomic sled batch, then flushes; an async caller may instead call
//! [`MailboxServer::write_pending`] and then [`Flusher::flush_async`]), then sends every
//! reply. The caller flushes after every batch, also one without deposits (acks and
//! purges are queued writes too). A
//! reply with `needs_flush` may only leave after that flush succeeded; if it failed, the
//! caller passes the batch to [`MailboxServer::fail_unflushed`], which turns each such reply
//! into `Error { Unavailable }`, or `Error { DiskFull }` when the batch was refused because
//! the disk filled since its writes were counted (the client retries; a retried deposit is
//! then acknowledged as a duplicate once the data is on disk). Replies to reads (`Fetch`, `Info`), to `Ack`
//! (losing a delete only means a re-delivery the recipient deduplicates) and errors never
//! need the flush. An envelope is deleted only by its recipient's `Ack`, by its expiry, or
//! with its whole mailbox when the owner has not registered for `mailbox_idle_secs` (the
//! idle purge, run by [`MailboxServer::purge`] with the expiry purge).

use std::path::Path;

use crate::{
    db::{DbError, Flusher, LoadStats, MailboxDb},
    limits::{LimitsError, RelayLimits},
    metrics::Metrics,
    rules::{DEFAULT_MAX_STORED_ENVELOPES, Deposit, Effect, MailboxRules, Refusal},
    wire::{ErrorCode, PeerBytes, Request, Response, WireError},
};

/// Default free-disk reserve: 256 MiB (the relay config's `min_free_disk_mb` default).
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;

/// How the server runs, beyond its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Whether new mailboxes are accepted. Default: `true`.
    pub accept_registrations: bool,
    /// Free disk space kept in reserve; writes are refused (`DiskFull`) below it.
    /// Default: [`DEFAULT_MIN_FREE_BYTES`].
    pub min_free_bytes: u64,
    /// Most envelopes held, all mailboxes together (the index keeps each in memory).
    /// Default: [`DEFAULT_MAX_STORED_ENVELOPES`].
    pub max_stored_envelopes: u64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            accept_registrations: true,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            max_stored_envelopes: DEFAULT_MAX_STORED_ENVELOPES,
        }
    }
}

/// Errors opening or flushing the mailbox store.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The limits are invalid.
    #[error("invalid relay limits: {0}")]
    Limits(#[from] LimitsError),
}

/// Something the node may act on once the reply is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A new envelope was stored for `recipient`: send it a `Notice { waiting }` if it is
    /// connected (after the flush).
    Deposited {
        /// The mailbox owner.
        recipient: PeerBytes,
        /// Envelopes now waiting for it.
        waiting: u32,
    },
}

/// The answer to one request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded response frame.
    pub bytes: Vec<u8>,
    /// Send only after a successful flush.
    pub needs_flush: bool,
    /// What happened, for the node.
    pub event: Option<ServerEvent>,
    /// The error code when the response is an error (for logs and metrics).
    pub error: Option<ErrorCode>,
}

const UNAVAILABLE_MESSAGE: &str = "the relay could not store this durably; retry later";

impl Reply {
    fn new(response: &Response, needs_flush: bool, event: Option<ServerEvent>) -> Self {
        let error = match response {
            Response::Error { code, .. } => Some(*code),
            _ => None,
        };
        Self {
            bytes: response.to_bytes(),
            needs_flush,
            event,
            error,
        }
    }

    /// The reply sent instead of one whose flush failed: `Error { Unavailable }`.
    pub fn unavailable() -> Self {
        Self::new(
            &Response::error(ErrorCode::Unavailable, UNAVAILABLE_MESSAGE),
            false,
            None,
        )
    }

    /// This reply after a failed flush: [`Reply::unavailable`] if it needed the flush,
    /// else unchanged.
    pub fn after_failed_flush(self) -> Self {
        if self.needs_flush {
            Self::unavailable()
        } else {
            self
        }
    }
}

/// Why handling a request failed.
enum Failure {
    Refused(Refusal),
    Db(DbError),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

/// The relay mailbox: rules + store + counters. One owner (the node's relay task).
#[derive(Debug)]
pub struct MailboxServer {
    db: MailboxDb,
    rules: MailboxRules,
    metrics: Metrics,
    /// The `now` given to [`MailboxServer::open`]: the registration time of mailbox
    /// records written before idle expiry, also when the index is reloaded after a failed
    /// write.
    opened_at: u64,
    /// Bytes of fetch pages this server may still answer before
    /// [`MailboxServer::set_fetch_budget`] is called again.
    fetch_budget: u64,
    /// Why the last [`MailboxServer::write_pending`] refused its batch for lack of disk
    /// space (its replies become `DiskFull`).
    batch_refused: Option<String>,
}

impl MailboxServer {
    /// Opens the store in directory `path`, rebuilds the index, and purges what expired by
    /// `now` (unix seconds): envelopes past their TTL and idle mailboxes. A mailbox stored
    /// before idle expiry existed counts as registered at `now`.
    pub fn open(
        path: &Path,
        limits: RelayLimits,
        options: ServerOptions,
        now: u64,
    ) -> Result<Self, ServerError> {
        limits.validate()?;
        let mut db = MailboxDb::open(path, options.min_free_bytes)?;
        let mut rules = MailboxRules::new(limits, options.accept_registrations);
        rules.set_max_stored_items(options.max_stored_envelopes);
        let stats: LoadStats = db.load(&mut rules, now)?;
        let mut metrics = Metrics::default();
        for code in ErrorCode::ALL {
            metrics.rejections.insert(code, 0);
        }
        let mut server = Self {
            db,
            rules,
            metrics,
            opened_at: now,
            fetch_budget: u64::MAX,
            batch_refused: None,
        };
        let purged = server.purge(now);
        // Purges and the upgrade of old mailbox records are queued writes.
        if server.db.pending_writes() > 0 {
            server.flush()?;
        }
        tracing::info!(
            mailboxes = stats.mailboxes,
            envelopes = stats.items,
            prekeys = stats.prekeys,
            upgraded = stats.upgraded,
            purged,
            expired_mailboxes = server.metrics.expired_mailboxes,
            "mailbox store opened"
        );
        Ok(server)
    }

    /// Handles one request frame from `peer` (as authenticated by the transport) at `now`.
    /// Never fails: errors become `Error` responses. Writes are not flushed; see the module
    /// docs.
    pub fn handle(&mut self, now: u64, peer: &PeerBytes, frame: &[u8]) -> Reply {
        self.metrics.requests += 1;
        if self.db.is_stopped() {
            return self.refuse(
                ErrorCode::Unavailable,
                "storage failure at the relay; retry later",
            );
        }
        let request = match Request::from_bytes(frame) {
            Ok(r) => r,
            Err(e) => {
                let code = match e {
                    WireError::Version { .. } => ErrorCode::UnsupportedVersion,
                    WireError::TooLarge { .. } => ErrorCode::TooLarge,
                    WireError::Malformed { .. } => ErrorCode::Malformed,
                };
                return self.refuse(code, e.to_string());
            }
        };
        match self.serve(now, peer, request) {
            Ok(reply) => reply,
            Err(Failure::Refused(r)) => self.refuse(r.code(), r.to_string()),
            Err(Failure::Db(e @ DbError::DiskFull { .. })) => {
                tracing::warn!(peer = %peer.short(), "mailbox write refused: {e}");
                self.refuse(ErrorCode::DiskFull, e.to_string())
            }
            Err(Failure::Db(e)) => {
                tracing::warn!(peer = %peer.short(), "mailbox storage failure: {e}");
                self.refuse(
                    ErrorCode::Unavailable,
                    "storage failure at the relay; retry later",
                )
            }
        }
    }

    /// Bounds the fetch pages answered from now on to `bytes` in all, until the next call
    /// (a fetch past it is refused `RateLimited`, and the node retries shortly). The relay
    /// sets it before each batch to what is left of its limit of pages on their way:
    /// pages wait in memory until the peer reads them, and a peer that never reads could
    /// otherwise pile up gigabytes of them. Unbounded until first called.
    pub fn set_fetch_budget(&mut self, bytes: u64) {
        self.fetch_budget = bytes;
    }

    /// What is left of the budget [`MailboxServer::set_fetch_budget`] set.
    pub fn fetch_budget(&self) -> u64 {
        self.fetch_budget
    }

    fn refuse(&mut self, code: ErrorCode, message: impl Into<String>) -> Reply {
        *self.metrics.rejections.entry(code).or_default() += 1;
        Reply::new(&Response::error(code, message), false, None)
    }

    fn serve(&mut self, now: u64, peer: &PeerBytes, request: Request) -> Result<Reply, Failure> {
        match request {
            Request::Register { add, revoke } => {
                let reg = self.rules.register(now, peer, &add, &revoke)?;
                let u = &reg.update;
                self.db
                    .put_mailbox(&u.key, &u.peer, &u.tokens, u.registered_at)?;
                self.rules.apply(&Effect::PutMailbox(reg.update));
                self.metrics.registrations += 1;
                if reg.created {
                    tracing::info!(peer = %peer.short(), "mailbox created");
                }
                Ok(Reply::new(
                    &Response::Registered {
                        waiting: reg.waiting,
                    },
                    true,
                    None,
                ))
            }
            Request::Deposit {
                recipient,
                token,
                id,
                ttl_secs,
                envelope,
            } => {
                let hash = token.hash();
                if self.rules.holds_expired(&recipient, &id, now) {
                    // The old copy is dead: a duplicate answer would lose this one.
                    self.purge(now);
                }
                match self.rules.deposit(
                    now,
                    peer,
                    &recipient,
                    &hash,
                    id,
                    ttl_secs,
                    envelope.len(),
                )? {
                    Deposit::Store(item) => {
                        self.db.put_item(&item, peer, &envelope)?;
                        let expires_at = item.expires_at;
                        self.rules.apply(&Effect::PutItem(item));
                        self.metrics.deposits += 1;
                        let waiting = self.rules.waiting(&recipient);
                        Ok(Reply::new(
                            &Response::Deposited {
                                duplicate: false,
                                expires_at,
                            },
                            true,
                            Some(ServerEvent::Deposited { recipient, waiting }),
                        ))
                    }
                    // The original may not be flushed yet: this answer waits for the flush
                    // too.
                    Deposit::Duplicate { expires_at, .. } => {
                        self.metrics.duplicates += 1;
                        Ok(Reply::new(
                            &Response::Deposited {
                                duplicate: true,
                                expires_at,
                            },
                            true,
                            None,
                        ))
                    }
                }
            }
            Request::Fetch {
                after,
                max_items,
                max_bytes,
            } => {
                let plan = self.rules.fetch(now, peer, after, max_items, max_bytes)?;
                let items = self.db.read_items(&plan.key, &plan.seqs)?;
                let count = items.len() as u64;
                let reply = Reply::new(
                    &Response::Batch {
                        items,
                        more: plan.more,
                    },
                    false,
                    None,
                );
                let size = reply.bytes.len() as u64;
                if size > self.fetch_budget {
                    return Err(Failure::Refused(Refusal::Busy));
                }
                self.fetch_budget -= size;
                self.metrics.fetches += 1;
                self.metrics.fetched_envelopes += count;
                Ok(reply)
            }
            Request::Ack { ids } => {
                let removal = self.rules.ack(peer, &ids)?;
                self.db.remove_items(&removal.key, &removal.items);
                let removed = removal.items.len() as u32;
                self.rules.apply(&Effect::RemoveItems(removal));
                self.metrics.acks += 1;
                self.metrics.acked_envelopes += u64::from(removed);
                Ok(Reply::new(&Response::Acked { removed }, false, None))
            }
            Request::Info => Ok(Reply::new(
                &Response::Info(self.rules.limits().clone()),
                false,
                None,
            )),
            Request::Notice { .. } => Ok(self.refuse(
                ErrorCode::Unsupported,
                "relays do not take notices; notices go from a relay to a recipient",
            )),
            Request::PublishPrekeys { prekeys } => {
                let grant = self.rules.publish_prekeys(now, peer, prekeys.len())?;
                let a = &grant.append;
                let kept = prekeys.get(..a.count as usize).unwrap_or(&prekeys);
                self.db.add_prekeys(&a.key, a.first_seq, kept)?;
                self.rules.apply(&Effect::AddPrekeys(grant.append));
                self.metrics.prekeys_published += u64::from(grant.accepted);
                Ok(Reply::new(
                    &Response::PrekeysPublished {
                        accepted: grant.accepted,
                        available: grant.available,
                    },
                    true,
                    None,
                ))
            }
            Request::ClaimPrekey { recipient, token } => {
                let hash = token.hash();
                let Some(claim) = self.rules.claim_prekey(now, peer, &recipient, &hash)? else {
                    return Ok(Reply::new(&Response::Prekey(None), false, None));
                };
                let prekey = self.db.take_prekey(&claim.key, claim.seq)?;
                if prekey.is_none() {
                    tracing::warn!(seq = claim.seq, "a prekey in the index is missing");
                }
                self.rules.apply(&Effect::TakePrekey(claim));
                if prekey.is_some() {
                    self.metrics.prekeys_claimed += 1;
                }
                // The removal must be durable before the prekey is handed out, or a crash
                // could hand the same one-time prekey to a second sender.
                Ok(Reply::new(&Response::Prekey(prekey), true, None))
            }
        }
    }

    /// Makes every write so far durable: [`MailboxServer::write_pending`], then a sled
    /// flush (the group commit). Returns the bytes flushed.
    pub fn flush(&mut self) -> Result<usize, ServerError> {
        self.write_pending()?;
        Ok(self.db.flush()?)
    }

    /// Applies the queued writes to sled as one atomic batch, not yet durable (for async
    /// callers, who then await [`Flusher::flush_async`]). If sled refuses the batch, the
    /// queued writes are dropped and the index is rebuilt from disk, so it again matches
    /// what is stored; every reply of the batch that needed the flush must then become
    /// `DiskFull` (the disk filled since the writes were counted) or `Unavailable`
    /// ([`MailboxServer::fail_unflushed`]).
    pub fn write_pending(&mut self) -> Result<(), ServerError> {
        self.batch_refused = None;
        if let Err(e) = self.db.write_pending() {
            if matches!(e, DbError::DiskFull { .. }) {
                self.batch_refused = Some(e.to_string());
            }
            if self.db.is_stopped() {
                // Nothing more is read from sled (it may wait forever now); every request
                // is refused from here on.
                let _ = self.db.discard_pending();
                return Err(e.into());
            }
            tracing::warn!("mailbox batch write failed, reloading the index: {e}");
            self.db.discard_pending()?;
            self.rules.clear_index();
            self.db.load(&mut self.rules, self.opened_at)?;
            return Err(e.into());
        }
        Ok(())
    }

    /// A cloneable handle that flushes this store from another task (after
    /// [`MailboxServer::write_pending`]).
    pub fn flusher(&self) -> Flusher {
        self.db.flusher()
    }

    /// Counts a failed group commit (`tern_relay_flush_failures_total`): a failed flush, or
    /// a batch sled refused; not a batch refused for lack of disk space, which is counted
    /// with its `DiskFull` replies.
    pub fn count_flush_failure(&mut self) {
        if self.batch_refused.is_none() {
            self.metrics.flush_failures += 1;
        }
    }

    /// After a failed group commit: turns every reply of the batch that needed it into
    /// `Error { DiskFull }` if [`MailboxServer::write_pending`] refused the batch for lack
    /// of space, else `Error { Unavailable }` (and drops its event; a deposit is no longer
    /// counted as one).
    pub fn fail_unflushed(&mut self, replies: &mut [Reply]) {
        let refused = self.batch_refused.take();
        for r in replies.iter_mut().filter(|r| r.needs_flush) {
            // Counted as a deposit when handled, but not stored after all.
            if matches!(r.event, Some(ServerEvent::Deposited { .. })) {
                self.metrics.deposits = self.metrics.deposits.saturating_sub(1);
            }
            let code = match &refused {
                Some(why) => {
                    *r = Reply::new(
                        &Response::error(ErrorCode::DiskFull, why.clone()),
                        false,
                        None,
                    );
                    ErrorCode::DiskFull
                }
                None => {
                    *r = Reply::unavailable();
                    ErrorCode::Unavailable
                }
            };
            *self.metrics.rejections.entry(code).or_default() += 1;
        }
    }

    /// Envelopes waiting for `recipient` (for a `Notice` when it connects).
    pub fn waiting(&self, recipient: &PeerBytes) -> u32 {
        self.rules.waiting(recipient)
    }

    /// Deletes what expired by `now`: envelopes past their TTL, then idle mailboxes (whose
    /// owner has not registered for `mailbox_idle_secs`) with their token hashes,
    /// envelopes and prekeys; and forgets idle senders' buckets. Queued: applied by the
    /// next flush (losing a purge only delays it). Returns how many envelopes were deleted,
    /// those of idle mailboxes included.
    pub fn purge(&mut self, now: u64) -> u64 {
        // A stopped database takes nothing more (see `DbError::Stopped`).
        if self.db.is_stopped() {
            return 0;
        }
        let mut removed = 0;
        for removal in self.rules.purge(now) {
            self.db.remove_items(&removal.key, &removal.items);
            removed += removal.items.len() as u64;
            self.rules.apply(&Effect::RemoveItems(removal));
        }
        let (mut mailboxes, mut prekeys) = (0u64, 0u64);
        for removal in self.rules.purge_idle(now) {
            self.db.remove_mailbox(&removal);
            removed += removal.items.len() as u64;
            prekeys += removal.prekeys.len() as u64;
            mailboxes += 1;
            self.rules.apply(&Effect::RemoveMailbox(removal));
        }
        if mailboxes > 0 {
            tracing::info!(
                mailboxes,
                prekeys,
                idle_secs = self.rules.limits().mailbox_idle_secs,
                "idle mailboxes expired"
            );
        }
        self.metrics.expired_envelopes += removed;
        self.metrics.expired_mailboxes += mailboxes;
        self.rules.prune_senders(now);
        removed
    }

    /// Writes queued but not yet applied to sled (they are lost if the process dies
    /// before the next flush).
    pub fn pending_writes(&self) -> usize {
        self.db.pending_writes()
    }

    /// A snapshot of the counters and gauges.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            envelopes_stored: self.rules.stored_items(),
            bytes_stored: self.rules.stored_bytes(),
            mailboxes: self.rules.mailbox_count() as u64,
            prekeys_stored: self.rules.stored_prekeys(),
            accepting_registrations: self.rules.accept_registrations(),
            rejections: self.metrics.rejections.clone(),
            ..self.metrics.clone()
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &RelayLimits {
        self.rules.limits()
    }

    /// Opens or closes registration of new mailboxes at run time.
    pub fn set_accept_registrations(&mut self, accept: bool) {
        self.rules.set_accept_registrations(accept);
    }

    /// Changes the free-disk reserve at run time.
    pub fn set_min_free_bytes(&mut self, bytes: u64) {
        self.db.set_min_free_bytes(bytes);
    }

    /// The mailbox index (read-only), for inspection and tests.
    pub fn rules(&self) -> &MailboxRules {
        &self.rules
    }

    /// Approximate bytes on disk.
    pub fn size_on_disk(&self) -> Result<u64, ServerError> {
        Ok(self.db.size_on_disk()?)
    }
}

impl Drop for MailboxServer {
    /// Best effort: a server dropped without a final flush still writes what is queued
    /// (nothing was acknowledged on it, but acks and purges are kept).
    fn drop(&mut self) {
        if self.db.pending_writes() > 0
            && let Err(e) = self.flush()
        {
            tracing::warn!("final mailbox flush failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::tests::check_exposition,
        wire::{MAX_ITEM_OVERHEAD, MailboxToken, StoredItem, TokenHash},
    };

    const T0: u64 = 1_700_000_000;

    fn peer(n: u8) -> PeerBytes {
        PeerBytes::new(vec![n; 38]).unwrap()
    }

    fn token(n: u8) -> MailboxToken {
        MailboxToken::from_bytes([n; 32])
    }

    fn limits() -> RelayLimits {
        RelayLimits {
            sender_rate_per_sec: 10_000,
            sender_burst: 100_000,
            ..RelayLimits::default()
        }
    }

    fn options() -> ServerOptions {
        ServerOptions {
            accept_registrations: true,
            min_free_bytes: 0,
            ..ServerOptions::default()
        }
    }

    fn open(dir: &Path) -> MailboxServer {
        MailboxServer::open(dir, limits(), options(), T0).unwrap()
    }

    fn call(s: &mut MailboxServer, now: u64, from: &PeerBytes, r: &Request) -> (Response, Reply) {
        let reply = s.handle(now, from, &r.to_bytes());
        (Response::from_bytes(&reply.bytes).unwrap(), reply)
    }

    fn ask(s: &mut MailboxServer, from: &PeerBytes, r: &Request) -> Response {
        call(s, T0, from, r).0
    }

    fn register(s: &mut MailboxServer, who: &PeerBytes, add: &[TokenHash]) -> Response {
        ask(
            s,
            who,
            &Request::Register {
                add: add.to_vec(),
                revoke: vec![],
            },
        )
    }

    fn deposit_req(to: &PeerBytes, t: &MailboxToken, id: u8, envelope: Vec<u8>) -> Request {
        Request::Deposit {
            recipient: to.clone(),
            token: t.clone(),
            id: [id; 16],
            ttl_secs: None,
            envelope,
        }
    }

    fn fetch_all(s: &mut MailboxServer, who: &PeerBytes) -> Vec<StoredItem> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let Response::Batch { items, more } = ask(
                s,
                who,
                &Request::Fetch {
                    after,
                    max_items: 1000,
                    max_bytes: u32::MAX,
                },
            ) else {
                panic!("not a batch")
            };
            after = items.last().map(|i| i.seq).or(after);
            out.extend(items);
            if !more {
                return out;
            }
        }
    }

    fn code(r: &Response) -> Option<ErrorCode> {
        match r {
            Response::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn an_id_is_unique_per_sender_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, alice, mallory) = (peer(1), peer(2), peer(3));
        {
            let mut s = open(dir.path());
            register(&mut s, &bob, &[token(1).hash()]);
            ask(
                &mut s,
                &mallory,
                &deposit_req(&bob, &token(1), 7, vec![6; 10]),
            );
            s.flush().unwrap();
        }
        let mut s = open(dir.path());
        // Alice's envelope under the id mallory used first is refused, not "duplicate".
        let r = ask(
            &mut s,
            &alice,
            &deposit_req(&bob, &token(1), 7, vec![7; 10]),
        );
        assert_eq!(code(&r), Some(ErrorCode::Malformed), "{r:?}");
        let r = ask(
            &mut s,
            &mallory,
            &deposit_req(&bob, &token(1), 7, vec![6; 10]),
        );
        assert!(
            matches!(
                r,
                Response::Deposited {
                    duplicate: true,
                    ..
                }
            ),
            "{r:?}"
        );
    }

    #[test]
    fn fetch_pages_stay_within_the_budget_the_relay_sets() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, alice) = (peer(1), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        for i in 0..4 {
            ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), i, vec![i; 10_000]),
            );
        }
        let page = Request::Fetch {
            after: None,
            max_items: 1,
            max_bytes: u32::MAX,
        };
        // Room for two pages of one 10 kB envelope: the third is refused, nothing lost.
        s.set_fetch_budget(25_000);
        for _ in 0..2 {
            assert!(matches!(ask(&mut s, &bob, &page), Response::Batch { .. }));
        }
        let refused = ask(&mut s, &bob, &page);
        assert_eq!(code(&refused), Some(ErrorCode::RateLimited), "{refused:?}");
        assert_eq!(s.waiting(&bob), 4);
        // The next batch's budget lets them through.
        s.set_fetch_budget(50_000);
        assert_eq!(fetch_all(&mut s, &bob).len(), 4);
    }

    #[test]
    fn every_request_type_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, alice) = (peer(1), peer(2));
        // Register.
        let (resp, reply) = call(
            &mut s,
            T0,
            &bob,
            &Request::Register {
                add: vec![token(1).hash()],
                revoke: vec![],
            },
        );
        assert_eq!(resp, Response::Registered { waiting: 0 });
        assert!(reply.needs_flush && reply.error.is_none());
        // Deposit.
        let (resp, reply) = call(
            &mut s,
            T0,
            &alice,
            &deposit_req(&bob, &token(1), 7, vec![7; 50]),
        );
        assert_eq!(
            resp,
            Response::Deposited {
                duplicate: false,
                expires_at: T0 + limits().default_ttl_secs
            }
        );
        assert!(reply.needs_flush);
        assert_eq!(
            reply.event,
            Some(ServerEvent::Deposited {
                recipient: bob.clone(),
                waiting: 1
            })
        );
        assert_eq!(s.waiting(&bob), 1);
        // Duplicate: acknowledged again, also after the flush.
        let (resp, reply) = call(
            &mut s,
            T0 + 1,
            &alice,
            &deposit_req(&bob, &token(1), 7, vec![9; 5]),
        );
        assert!(matches!(
            resp,
            Response::Deposited {
                duplicate: true,
                ..
            }
        ));
        assert!(reply.needs_flush && reply.event.is_none());
        // Fetch.
        let (resp, reply) = call(
            &mut s,
            T0,
            &bob,
            &Request::Fetch {
                after: None,
                max_items: 10,
                max_bytes: 10_000,
            },
        );
        assert!(!reply.needs_flush);
        let Response::Batch { items, more } = resp else {
            panic!("{resp:?}")
        };
        assert!(!more);
        assert_eq!(items.len(), 1);
        assert_eq!(
            (
                items[0].id,
                &items[0].from,
                items[0].deposited_at,
                &items[0].envelope
            ),
            ([7; 16], &alice, T0, &vec![7; 50])
        );
        // Ack.
        let (resp, reply) = call(
            &mut s,
            T0,
            &bob,
            &Request::Ack {
                ids: vec![[7; 16], [8; 16]],
            },
        );
        assert_eq!(resp, Response::Acked { removed: 1 });
        assert!(!reply.needs_flush);
        assert_eq!(s.waiting(&bob), 0);
        // Info.
        assert_eq!(
            ask(&mut s, &peer(99), &Request::Info),
            Response::Info(limits())
        );
        // Notice is not served by relays.
        assert_eq!(
            code(&ask(&mut s, &bob, &Request::Notice { waiting: 1 })),
            Some(ErrorCode::Unsupported)
        );
        // Prekeys.
        let (resp, reply) = call(
            &mut s,
            T0,
            &bob,
            &Request::PublishPrekeys {
                prekeys: vec![vec![1], vec![2]],
            },
        );
        assert_eq!(
            resp,
            Response::PrekeysPublished {
                accepted: 2,
                available: 2
            }
        );
        assert!(reply.needs_flush);
        let claim = Request::ClaimPrekey {
            recipient: bob.clone(),
            token: token(1),
        };
        let (resp, reply) = call(&mut s, T0, &alice, &claim);
        assert_eq!(resp, Response::Prekey(Some(vec![1])), "oldest first");
        assert!(
            reply.needs_flush,
            "a handed-out prekey must be gone durably"
        );
        assert_eq!(ask(&mut s, &alice, &claim), Response::Prekey(Some(vec![2])));
        let (resp, reply) = call(&mut s, T0, &alice, &claim);
        assert_eq!(resp, Response::Prekey(None));
        assert!(!reply.needs_flush);
        // Claim without a valid token.
        let bad_claim = Request::ClaimPrekey {
            recipient: bob.clone(),
            token: token(5),
        };
        assert_eq!(
            code(&ask(&mut s, &alice, &bad_claim)),
            Some(ErrorCode::Unauthorized)
        );
        s.flush().unwrap();

        let m = s.metrics();
        assert_eq!((m.registrations, m.deposits, m.duplicates), (1, 1, 1));
        assert_eq!(
            (m.fetches, m.fetched_envelopes, m.acks, m.acked_envelopes),
            (1, 1, 1, 1)
        );
        assert_eq!((m.prekeys_published, m.prekeys_claimed), (2, 2));
        assert_eq!(m.rejections[&ErrorCode::Unsupported], 1);
        assert_eq!(m.rejections[&ErrorCode::Unauthorized], 1);
        assert_eq!((m.mailboxes, m.envelopes_stored, m.bytes_stored), (1, 0, 0));
        assert_eq!(m.requests, 12);
        let text = m.render_prometheus(&[]);
        check_exposition(&text).unwrap();
        assert!(text.contains("tern_relay_deposits_total 1\n"));
    }

    #[test]
    fn refusals_become_error_replies() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, alice) = (peer(1), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        // Stranger: unknown mailbox and unknown token give the same answer.
        let r1 = ask(
            &mut s,
            &alice,
            &deposit_req(&peer(9), &token(1), 1, vec![1]),
        );
        let r2 = ask(&mut s, &alice, &deposit_req(&bob, &token(2), 1, vec![1]));
        assert_eq!(code(&r1), Some(ErrorCode::Unauthorized));
        assert_eq!(r1, r2, "no oracle of who has a mailbox");
        // Revoked token.
        ask(
            &mut s,
            &bob,
            &Request::Register {
                add: vec![],
                revoke: vec![token(1).hash()],
            },
        );
        assert_eq!(
            code(&ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), 1, vec![1])
            )),
            Some(ErrorCode::Unauthorized)
        );
        // Fetch and ack by a peer without a mailbox.
        let fetch = Request::Fetch {
            after: None,
            max_items: 1,
            max_bytes: 1,
        };
        assert_eq!(
            code(&ask(&mut s, &alice, &fetch)),
            Some(ErrorCode::NotRegistered)
        );
        assert_eq!(
            code(&ask(&mut s, &alice, &Request::Ack { ids: vec![[1; 16]] })),
            Some(ErrorCode::NotRegistered)
        );
        // Registration switch.
        s.set_accept_registrations(false);
        let (resp, reply) = call(
            &mut s,
            T0,
            &alice,
            &Request::Register {
                add: vec![],
                revoke: vec![],
            },
        );
        assert_eq!(code(&resp), Some(ErrorCode::RegistrationClosed));
        assert!(!reply.needs_flush);
        assert_eq!(reply.error, Some(ErrorCode::RegistrationClosed));
        assert!(matches!(
            register(&mut s, &bob, &[token(3).hash()]),
            Response::Registered { .. }
        ));
        assert!(!s.metrics().accepting_registrations);
        // Too large for this relay's limit.
        let small_dir = tempfile::tempdir().unwrap();
        let mut small = MailboxServer::open(
            small_dir.path(),
            RelayLimits {
                max_envelope_bytes: 100,
                ..limits()
            },
            options(),
            T0,
        )
        .unwrap();
        register(&mut small, &bob, &[token(1).hash()]);
        assert_eq!(
            code(&ask(
                &mut small,
                &alice,
                &deposit_req(&bob, &token(1), 1, vec![0; 101])
            )),
            Some(ErrorCode::TooLarge)
        );
        assert!(matches!(
            ask(
                &mut small,
                &alice,
                &deposit_req(&bob, &token(1), 1, vec![0; 100])
            ),
            Response::Deposited { .. }
        ));
    }

    #[test]
    fn garbage_frames_get_malformed_and_the_server_stays_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let bob = peer(1);
        register(&mut s, &bob, &[token(1).hash()]);
        let frames: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            vec![1, 200],
            vec![1, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![0xff; 300],
        ];
        for f in &frames {
            let reply = s.handle(T0, &bob, f);
            let resp = Response::from_bytes(&reply.bytes).unwrap();
            assert!(
                matches!(
                    code(&resp),
                    Some(ErrorCode::Malformed | ErrorCode::UnsupportedVersion)
                ),
                "{f:?} -> {resp:?}"
            );
            assert!(!reply.needs_flush);
        }
        assert_eq!(
            code(&Response::from_bytes(&s.handle(T0, &bob, &[2, 0]).bytes).unwrap()),
            Some(ErrorCode::UnsupportedVersion)
        );
        let huge = vec![1u8; crate::wire::MAX_REQUEST_FRAME + 1];
        assert_eq!(
            code(&Response::from_bytes(&s.handle(T0, &bob, &huge).bytes).unwrap()),
            Some(ErrorCode::TooLarge)
        );
        // Still serving.
        assert!(matches!(
            ask(&mut s, &peer(2), &deposit_req(&bob, &token(1), 1, vec![1])),
            Response::Deposited {
                duplicate: false,
                ..
            }
        ));
        assert_eq!(fetch_all(&mut s, &bob).len(), 1);
        let m = s.metrics();
        assert_eq!(m.rejections[&ErrorCode::Malformed], 4);
        assert_eq!(
            m.rejections[&ErrorCode::UnsupportedVersion],
            3,
            "'G' and 0xff are versions"
        );
    }

    #[test]
    fn restart_keeps_everything_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, carol, alice) = (peer(1), peer(3), peer(2));
        let before;
        {
            let mut s = open(dir.path());
            register(&mut s, &bob, &[token(1).hash(), token(2).hash()]);
            register(&mut s, &carol, &[token(3).hash()]);
            for i in 0..20u8 {
                ask(
                    &mut s,
                    &alice,
                    &deposit_req(&bob, &token(1), i, vec![i; 100 + usize::from(i)]),
                );
            }
            ask(
                &mut s,
                &alice,
                &deposit_req(&carol, &token(3), 1, vec![1; 10]),
            );
            ask(
                &mut s,
                &bob,
                &Request::Ack {
                    ids: vec![[0; 16], [5; 16]],
                },
            );
            ask(
                &mut s,
                &bob,
                &Request::PublishPrekeys {
                    prekeys: vec![vec![1], vec![2], vec![3]],
                },
            );
            ask(
                &mut s,
                &alice,
                &Request::ClaimPrekey {
                    recipient: bob.clone(),
                    token: token(2),
                },
            );
            s.flush().unwrap();
            before = fetch_all(&mut s, &bob);
            assert_eq!(before.len(), 18);
        }
        let mut s = open(dir.path());
        assert_eq!(
            fetch_all(&mut s, &bob),
            before,
            "same items, seqs and bytes"
        );
        assert_eq!(s.waiting(&carol), 1);
        assert_eq!(s.rules().prekeys(&bob), 2);
        s.rules().check_invariants().unwrap();
        // Tokens survived: both still work; the next seq is past every old one.
        let Response::Deposited { .. } =
            ask(&mut s, &alice, &deposit_req(&bob, &token(2), 100, vec![1]))
        else {
            panic!()
        };
        let after = fetch_all(&mut s, &bob);
        assert!(after.last().unwrap().seq > before.last().unwrap().seq);
        assert_eq!(
            ask(
                &mut s,
                &alice,
                &Request::ClaimPrekey {
                    recipient: bob.clone(),
                    token: token(1)
                }
            ),
            Response::Prekey(Some(vec![2]))
        );
        let m = s.metrics();
        assert_eq!((m.mailboxes, m.envelopes_stored), (2, 20));
    }

    #[test]
    fn expired_envelopes_are_purged_at_open_and_by_purge() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, alice) = (peer(1), peer(2));
        let min = limits().min_ttl_secs;
        {
            let mut s = open(dir.path());
            register(&mut s, &bob, &[token(1).hash()]);
            for (i, ttl) in [(1u8, min), (2, 3 * min), (3, 5 * min)] {
                ask(
                    &mut s,
                    &alice,
                    &Request::Deposit {
                        recipient: bob.clone(),
                        token: token(1),
                        id: [i; 16],
                        ttl_secs: Some(ttl),
                        envelope: vec![i; 10],
                    },
                );
            }
            s.flush().unwrap();
        }
        let mut s = MailboxServer::open(dir.path(), limits(), options(), T0 + 2 * min).unwrap();
        assert_eq!(s.waiting(&bob), 2, "purged at open");
        assert_eq!(s.purge(T0 + 3 * min), 1);
        assert_eq!(
            s.metrics().expired_envelopes,
            2,
            "the purge at open counts too"
        );
        let left = fetch_all(&mut s, &bob);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, [3; 16]);
    }

    #[test]
    fn idle_mailboxes_are_purged_with_their_envelopes_and_prekeys() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, carol, alice) = (peer(1), peer(3), peer(2));
        let idle = limits().mailbox_idle_secs;
        {
            let mut s = open(dir.path());
            register(&mut s, &bob, &[token(1).hash()]);
            register(&mut s, &carol, &[token(3).hash()]);
            ask(
                &mut s,
                &bob,
                &Request::PublishPrekeys {
                    prekeys: vec![vec![1], vec![2]],
                },
            );
            // Alice keeps depositing for Bob (unexpired at the purge); Carol comes back.
            for i in 0..2u8 {
                let (r, _) = call(
                    &mut s,
                    T0 + idle - 10,
                    &alice,
                    &deposit_req(&bob, &token(1), i, vec![i; 10]),
                );
                assert!(matches!(r, Response::Deposited { .. }), "{r:?}");
            }
            let (r, _) = call(
                &mut s,
                T0 + idle - 5,
                &carol,
                &Request::Register {
                    add: vec![],
                    revoke: vec![],
                },
            );
            assert_eq!(r, Response::Registered { waiting: 0 });
            call(
                &mut s,
                T0 + idle - 5,
                &alice,
                &deposit_req(&carol, &token(3), 9, vec![9; 5]),
            );
            s.flush().unwrap();
            assert_eq!(s.purge(T0 + idle - 1), 0);
            assert!(s.rules().is_registered(&bob));
            assert_eq!(
                s.purge(T0 + idle),
                2,
                "Bob's envelopes went with his mailbox"
            );
            assert!(!s.rules().is_registered(&bob));
            assert_eq!(s.waiting(&carol), 1);
            let m = s.metrics();
            assert_eq!(
                (
                    m.expired_mailboxes,
                    m.expired_envelopes,
                    m.mailboxes,
                    m.envelopes_stored,
                    m.prekeys_stored
                ),
                (1, 2, 1, 1, 0)
            );
            let text = m.render_prometheus(&[]);
            check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert!(
                text.contains("tern_relay_expired_mailboxes_total 1\n"),
                "{text}"
            );
            let (r, _) = call(
                &mut s,
                T0 + idle,
                &alice,
                &deposit_req(&bob, &token(1), 3, vec![3]),
            );
            assert_eq!(code(&r), Some(ErrorCode::Unauthorized));
            assert!(s.pending_writes() > 0, "the purge is queued");
            s.flush().unwrap();
        }
        // On disk: Bob's mailbox, envelopes and prekeys are gone, Carol's are intact.
        let mut s = MailboxServer::open(dir.path(), limits(), options(), T0 + idle + 1).unwrap();
        s.rules().check_invariants().unwrap();
        assert!(!s.rules().is_registered(&bob));
        assert_eq!(s.rules().prekeys(&bob), 0);
        assert_eq!(s.metrics().expired_mailboxes, 0, "counters restart");
        let (r, _) = call(
            &mut s,
            T0 + idle + 1,
            &carol,
            &Request::Fetch {
                after: None,
                max_items: 10,
                max_bytes: u32::MAX,
            },
        );
        let Response::Batch { items, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, [9; 16]);
        // Bob comes back to a new, empty mailbox.
        let (r, _) = call(
            &mut s,
            T0 + idle + 1,
            &bob,
            &Request::Register {
                add: vec![token(1).hash()],
                revoke: vec![],
            },
        );
        assert_eq!(r, Response::Registered { waiting: 0 });
    }

    #[test]
    fn mailboxes_from_before_idle_expiry_count_from_the_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let idle = limits().mailbox_idle_secs;
        {
            let mut s = open(dir.path());
            s.db.put_legacy_mailbox(&bob, &[token(1).hash()]).unwrap();
            s.flush().unwrap();
        }
        // Long after the record was written (it carries no time): the clock starts now.
        let first = T0 + 1000 * 86400;
        {
            let mut s = MailboxServer::open(dir.path(), limits(), options(), first).unwrap();
            assert_eq!(s.rules().registered_at(&bob), Some(first));
            assert_eq!(s.pending_writes(), 0, "the upgrade was flushed at open");
            let (r, _) = call(
                &mut s,
                first,
                &bob,
                &Request::PublishPrekeys {
                    prekeys: vec![vec![1]],
                },
            );
            assert!(matches!(r, Response::PrekeysPublished { accepted: 1, .. }));
            s.flush().unwrap();
        }
        // A restart does not restart the clock...
        {
            let s = MailboxServer::open(dir.path(), limits(), options(), first + idle - 1).unwrap();
            assert_eq!(s.rules().registered_at(&bob), Some(first));
            assert_eq!(s.rules().prekeys(&bob), 1);
        }
        // ...and the mailbox expires one idle period after the first open, at open.
        {
            let s = MailboxServer::open(dir.path(), limits(), options(), first + idle).unwrap();
            assert!(!s.rules().is_registered(&bob));
            assert_eq!(s.metrics().expired_mailboxes, 1);
            assert_eq!(s.rules().stored_prekeys(), 0);
            assert_eq!(s.pending_writes(), 0, "the purge at open was flushed");
        }
        let s = MailboxServer::open(dir.path(), limits(), options(), first + idle).unwrap();
        assert!(!s.rules().is_registered(&bob), "and stays done");
        assert_eq!(s.metrics().expired_mailboxes, 0);
    }

    #[test]
    fn a_redeposit_after_expiry_is_stored_again_not_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, alice) = (peer(1), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        let min = limits().min_ttl_secs;
        let req = Request::Deposit {
            recipient: bob.clone(),
            token: token(1),
            id: [4; 16],
            ttl_secs: Some(min),
            envelope: vec![4; 8],
        };
        call(&mut s, T0, &alice, &req);
        let (dup, _) = call(&mut s, T0 + min - 1, &alice, &req);
        assert!(matches!(
            dup,
            Response::Deposited {
                duplicate: true,
                ..
            }
        ));
        let (again, reply) = call(&mut s, T0 + min, &alice, &req);
        assert_eq!(
            again,
            Response::Deposited {
                duplicate: false,
                expires_at: T0 + 2 * min
            }
        );
        assert!(reply.event.is_some());
        assert_eq!(s.waiting(&bob), 1);
        s.rules().check_invariants().unwrap();
    }

    #[test]
    fn fetch_pages_by_items_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, alice) = (peer(1), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        for i in 0..10u8 {
            ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), i, vec![i; 1000]),
            );
        }
        let page = |s: &mut MailboxServer, after, max_items, max_bytes| {
            let Response::Batch { items, more } = ask(
                s,
                &bob,
                &Request::Fetch {
                    after,
                    max_items,
                    max_bytes,
                },
            ) else {
                panic!()
            };
            (
                items.iter().map(|i| i.id[0]).collect::<Vec<_>>(),
                more,
                items.last().map(|i| i.seq),
            )
        };
        let (ids, more, last) = page(&mut s, None, 3, u32::MAX);
        assert_eq!((ids, more), (vec![0, 1, 2], true));
        let (ids, more, _) = page(&mut s, last, 100, 2 * (1000 + MAX_ITEM_OVERHEAD));
        assert_eq!((ids, more), (vec![3, 4], true));
        let (ids, more, _) = page(&mut s, last, 100, 10);
        assert_eq!((ids, more), (vec![3], true), "at least one item per page");
        let (ids, more, _) = page(&mut s, last, 100, u32::MAX);
        assert_eq!((ids, more), ((3..10).collect(), false));
        // Fetching does not delete; acking does.
        assert_eq!(fetch_all(&mut s, &bob).len(), 10);
    }

    #[test]
    fn a_full_page_of_the_largest_envelopes_fits_a_response_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let bob = PeerBytes::new(vec![1; crate::wire::MAX_PEER_BYTES]).unwrap();
        let alice = PeerBytes::new(vec![2; crate::wire::MAX_PEER_BYTES]).unwrap();
        register(&mut s, &bob, &[token(1).hash()]);
        let max = limits().max_envelope_bytes as usize;
        for i in 0..12u8 {
            ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), i, vec![i; max]),
            );
        }
        let reply = s.handle(
            T0,
            &bob,
            &Request::Fetch {
                after: None,
                max_items: 1000,
                max_bytes: u32::MAX,
            }
            .to_bytes(),
        );
        assert!(reply.bytes.len() <= crate::wire::MAX_RESPONSE_FRAME);
        let Response::Batch { items, more } = Response::from_bytes(&reply.bytes).unwrap() else {
            panic!()
        };
        assert!(more);
        assert_eq!(
            items.len(),
            10,
            "ten 96 KiB envelopes fit 1 MiB, eleven do not"
        );
    }

    #[test]
    fn ack_by_a_non_owner_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, eve, alice) = (peer(1), peer(6), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        ask(
            &mut s,
            &alice,
            &deposit_req(&bob, &token(1), 1, vec![1; 10]),
        );
        // Eve without a mailbox.
        assert_eq!(
            code(&ask(&mut s, &eve, &Request::Ack { ids: vec![[1; 16]] })),
            Some(ErrorCode::NotRegistered)
        );
        // Eve with her own mailbox: her ack only looks in her mailbox.
        register(&mut s, &eve, &[]);
        assert_eq!(
            ask(&mut s, &eve, &Request::Ack { ids: vec![[1; 16]] }),
            Response::Acked { removed: 0 }
        );
        // The sender cannot delete what it deposited either.
        assert_eq!(
            code(&ask(&mut s, &alice, &Request::Ack { ids: vec![[1; 16]] })),
            Some(ErrorCode::NotRegistered)
        );
        assert_eq!(s.waiting(&bob), 1);
        assert_eq!(fetch_all(&mut s, &bob).len(), 1);
    }

    /// A server on `dir` where bob registered and alice's deposit (id 1) is flushed.
    fn one_flushed_deposit(dir: &Path) -> (MailboxServer, PeerBytes, PeerBytes) {
        let mut s = open(dir);
        let (bob, alice) = (peer(1), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        ask(
            &mut s,
            &alice,
            &deposit_req(&bob, &token(1), 1, vec![1; 10]),
        );
        s.flush().unwrap();
        (s, bob, alice)
    }

    #[test]
    fn a_batch_is_refused_if_the_disk_filled_since_its_writes_were_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, bob, alice) = one_flushed_deposit(dir.path());
        let (resp, reply) = call(
            &mut s,
            T0,
            &alice,
            &deposit_req(&bob, &token(1), 2, vec![2; 10]),
        );
        assert!(code(&resp).is_none() && reply.needs_flush, "{resp:?}");
        // Another program fills the disk before the group commit.
        s.db.pretend_free(Some(0));
        let e = s.flush().unwrap_err();
        assert!(
            matches!(e, ServerError::Db(DbError::DiskFull { .. })),
            "{e}"
        );
        // Its replies say why: DiskFull, not stored, not counted as a deposit.
        let mut replies = vec![reply];
        let deposits = s.metrics().deposits;
        s.fail_unflushed(&mut replies);
        let resp = Response::from_bytes(&replies[0].bytes).unwrap();
        assert_eq!(code(&resp), Some(ErrorCode::DiskFull), "{resp:?}");
        assert_eq!(s.metrics().deposits, deposits - 1);
        assert_eq!(
            s.metrics().flush_failures,
            0,
            "a refusal, not a failed flush"
        );
        // Nothing reached sled; the index matches the disk again; the store goes on.
        assert_eq!(s.waiting(&bob), 1);
        s.rules().check_invariants().unwrap();
        assert!(!s.db.is_stopped());
        // Removals only: applied even on a full disk (they free space).
        let first = fetch_all(&mut s, &bob)[0].id;
        assert_eq!(
            ask(&mut s, &bob, &Request::Ack { ids: vec![first] }),
            Response::Acked { removed: 1 }
        );
        s.flush().unwrap();
        s.db.pretend_free(None);
        ask(
            &mut s,
            &alice,
            &deposit_req(&bob, &token(1), 2, vec![2; 10]),
        );
        s.flush().unwrap();
        drop(s);
        let mut s = open(dir.path());
        let items = fetch_all(&mut s, &bob);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, [2; 16]);
    }

    #[test]
    fn a_failed_sled_write_stops_the_mailbox_and_every_request_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, bob, alice) = one_flushed_deposit(dir.path());
        ask(
            &mut s,
            &alice,
            &deposit_req(&bob, &token(1), 2, vec![2; 10]),
        );
        s.db.fail_next_write();
        let e = s.flush().unwrap_err();
        assert!(matches!(e, ServerError::Db(DbError::Stopped(_))), "{e}");
        assert!(e.to_string().contains("restart the relay"), "{e}");
        // No flush, read or write of sled from here on.
        assert!(matches!(s.flusher().flush(), Err(DbError::Stopped(_))));
        assert!(matches!(
            s.flush(),
            Err(ServerError::Db(DbError::Stopped(_)))
        ));
        for r in [
            deposit_req(&bob, &token(1), 3, vec![3; 10]),
            Request::Fetch {
                after: None,
                max_items: 10,
                max_bytes: u32::MAX,
            },
        ] {
            let (resp, reply) = call(&mut s, T0, &bob, &r);
            assert_eq!(code(&resp), Some(ErrorCode::Unavailable), "{resp:?}");
            assert!(!reply.needs_flush);
        }
        assert_eq!(s.purge(T0 + 365 * 24 * 3600), 0, "nothing more is written");
        // Dropped without flushing (sled is left open until the process ends).
        drop(s);
    }

    #[test]
    fn disk_full_refuses_writes_and_leaves_nothing_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, alice) = (peer(1), peer(2));
        {
            let mut s = open(dir.path());
            register(&mut s, &bob, &[token(1).hash()]);
            ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), 1, vec![1; 10]),
            );
            s.flush().unwrap();
        }
        // Reopen with a reserve larger than any disk.
        let full = ServerOptions {
            min_free_bytes: u64::MAX / 4,
            ..options()
        };
        {
            let mut s = MailboxServer::open(dir.path(), limits(), full.clone(), T0).unwrap();
            let (resp, reply) = call(
                &mut s,
                T0,
                &alice,
                &deposit_req(&bob, &token(1), 2, vec![2; 10]),
            );
            assert_eq!(code(&resp), Some(ErrorCode::DiskFull), "{resp:?}");
            assert!(!reply.needs_flush && reply.event.is_none());
            assert!(ErrorCode::DiskFull.is_transient());
            assert_eq!(
                code(&register(&mut s, &peer(3), &[])),
                Some(ErrorCode::DiskFull)
            );
            assert_eq!(
                code(&ask(
                    &mut s,
                    &bob,
                    &Request::PublishPrekeys {
                        prekeys: vec![vec![1]]
                    }
                )),
                Some(ErrorCode::DiskFull)
            );
            // Reads and deletes keep working; the index did not count the refused writes.
            assert_eq!(s.waiting(&bob), 1);
            assert_eq!(s.metrics().mailboxes, 1);
            assert_eq!(fetch_all(&mut s, &bob).len(), 1);
            s.rules().check_invariants().unwrap();
            s.flush().unwrap();
            assert_eq!(s.metrics().rejections[&ErrorCode::DiskFull], 3);
        }
        // On disk: exactly the state before the refusals.
        let mut s = open(dir.path());
        let items = fetch_all(&mut s, &bob);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, [1; 16]);
        assert!(!s.rules().is_registered(&peer(3)));
        assert_eq!(s.rules().prekeys(&bob), 0);
        // Space back: the same deposit now succeeds.
        assert!(matches!(
            ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), 2, vec![2; 10])
            ),
            Response::Deposited {
                duplicate: false,
                ..
            }
        ));
        s.set_min_free_bytes(u64::MAX / 4);
        assert_eq!(
            code(&ask(
                &mut s,
                &alice,
                &deposit_req(&bob, &token(1), 3, vec![3; 10])
            )),
            Some(ErrorCode::DiskFull),
            "the reserve can change at run time"
        );
    }

    #[test]
    fn failed_flush_turns_only_unflushed_replies_into_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let (bob, alice) = (peer(1), peer(2));
        let mut batch = vec![
            s.handle(
                T0,
                &bob,
                &Request::Register {
                    add: vec![token(1).hash()],
                    revoke: vec![],
                }
                .to_bytes(),
            ),
            s.handle(
                T0,
                &alice,
                &deposit_req(&bob, &token(1), 1, vec![1]).to_bytes(),
            ),
            s.handle(T0, &alice, &Request::Info.to_bytes()),
            s.handle(T0, &alice, &[]),
        ];
        let untouched = batch[2..].to_vec();
        s.count_flush_failure();
        s.fail_unflushed(&mut batch);
        for r in &batch[..2] {
            let resp = Response::from_bytes(&r.bytes).unwrap();
            assert_eq!(code(&resp), Some(ErrorCode::Unavailable));
            assert!(r.event.is_none() && !r.needs_flush);
        }
        assert_eq!(&batch[2..], &untouched[..]);
        let m = s.metrics();
        assert_eq!(
            (m.flush_failures, m.rejections[&ErrorCode::Unavailable]),
            (1, 2)
        );
        // The standalone helper does the same.
        let r = s.handle(
            T0,
            &alice,
            &deposit_req(&bob, &token(1), 2, vec![1]).to_bytes(),
        );
        assert_eq!(r.clone().after_failed_flush(), Reply::unavailable());
        let info = s.handle(T0, &alice, &Request::Info.to_bytes());
        assert_eq!(info.clone().after_failed_flush(), info);
        // The client retries after the failure: answered as a duplicate once flushed.
        assert!(matches!(
            ask(&mut s, &alice, &deposit_req(&bob, &token(1), 1, vec![1])),
            Response::Deposited {
                duplicate: true,
                ..
            }
        ));
    }

    #[test]
    fn invalid_limits_are_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let e = MailboxServer::open(
            dir.path(),
            RelayLimits {
                quota_count: 0,
                ..limits()
            },
            options(),
            T0,
        )
        .unwrap_err();
        assert!(matches!(e, ServerError::Limits(_)), "{e}");
    }

    #[test]
    fn rate_limited_sender_gets_a_transient_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MailboxServer::open(
            dir.path(),
            RelayLimits {
                sender_rate_per_sec: 1,
                sender_burst: 2,
                ..RelayLimits::default()
            },
            options(),
            T0,
        )
        .unwrap();
        let (bob, alice) = (peer(1), peer(2));
        register(&mut s, &bob, &[token(1).hash()]);
        ask(&mut s, &alice, &deposit_req(&bob, &token(1), 1, vec![1]));
        ask(&mut s, &alice, &deposit_req(&bob, &token(1), 2, vec![1]));
        let r = ask(&mut s, &alice, &deposit_req(&bob, &token(1), 3, vec![1]));
        assert_eq!(code(&r), Some(ErrorCode::RateLimited));
        assert!(ErrorCode::RateLimited.is_transient());
        let (r, _) = call(
            &mut s,
            T0 + 1,
            &alice,
            &deposit_req(&bob, &token(1), 3, vec![1]),
        );
        assert!(matches!(r, Response::Deposited { .. }));
    }
}
