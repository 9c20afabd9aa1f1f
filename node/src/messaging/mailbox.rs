//! The user side of store-and-forward: our mailbox on our home relays, and deposits into
//! contacts' mailboxes when they cannot be reached directly.
//!
//! - **Receiving.** Our mailbox token (random, in `mailbox_self`) goes into our ticket with
//!   our home relays (`relays` in the config). Whenever a home relay connects, or sends a
//!   `Notice`, a sync task registers the token's hash there, then fetches pages; each page
//!   goes through the same inbound path as a direct envelope (dedup, ratchet, history in one
//!   transaction), and only after that batch is flushed are its ids acked, which deletes
//!   them on the relay. An envelope whose processing is refused for a transient reason is
//!   not acked (fetched again later).
//! - **Sending.** A contact whose ticket named relays and a token has them in
//!   `contact_mailbox`. When a direct delivery attempt fails on the network, the envelopes it
//!   did not deliver are deposited, byte for byte, at every one of those relays (at most
//!   [`MAX_HOME_RELAYS`]); one relay's durable ack is enough for the outbox to let go (state
//!   `stored`). The recipient deduplicates copies from several relays by message id.

use std::collections::HashSet;

use futures::{StreamExt, stream::FuturesUnordered};
use libp2p::{Multiaddr, PeerId};
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tern_store_forward::{
    MailboxToken, PeerBytes, Request as MbRequest, Response as MbResponse, StoredItem,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Actor, Inbound, MessagingError,
    db::{OutKind, OutboxItem, PeerKey},
    wire::{Content, Envelope, MsgId, Request, Response},
};
use crate::{
    net::{InboundRequest, NetHandle, Proto, peer_id_of},
    store::Table,
};

/// Most relays a message is deposited at.
pub const MAX_HOME_RELAYS: usize = 2;
/// How many revoked token hashes are kept (and revoked again at each registration).
const MAX_REVOKED: usize = 16;
/// A relay's pool of our one-time prekeys is topped up when it holds fewer than this...
const PREKEY_LOW: u32 = 25;
/// ...up to this many.
const PREKEY_TARGET: u32 = 100;
/// The longest a relay hold is believed to last, in ms (a relay's limit is 30 days).
const MAX_HOLD_MS: u64 = 30 * 24 * 3600 * 1000;
/// How long adding a contact waits for one of its relays to hand out a one-time prekey.
const CLAIM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Items per fetched page.
const FETCH_ITEMS: u32 = 256;
/// Envelope bytes per fetched page.
const FETCH_BYTES: u32 = 512 * 1024;
/// How long a sync waits after a relay answered a fetch `RateLimited` (busy) before it
/// fetches again, and how many times in a row it does so before the sync ends (the next
/// one comes with the relay's next notice, a new connection or the daily sync).
const FETCH_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const FETCH_BUSY_RETRIES: u32 = 60;

/// Whether `e` is a failure to write (a full disk, an I/O error), which a retry may get
/// past, rather than something about one contact's own records (a corrupt one stays so).
pub(super) fn storage_failure(e: &MessagingError) -> bool {
    matches!(e, MessagingError::Store(s) if !matches!(s, crate::store::StoreError::Corrupt { .. }))
}

/// A contact's mailbox, from its ticket. `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactMailbox {
    /// Its home relays (binary multiaddrs with `/p2p/`).
    pub relays: Vec<Vec<u8>>,
    /// The capability it issued.
    pub token: [u8; 32],
}

impl std::fmt::Debug for ContactMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactMailbox")
            .field("relays", &self.relays.len())
            .field("token", &"<secret>")
            .finish()
    }
}

impl ContactMailbox {
    /// The relays as (peer id, address) pairs.
    pub fn relay_peers(&self) -> Vec<(PeerId, Multiaddr)> {
        self.relays
            .iter()
            .filter_map(|b| Multiaddr::try_from(b.clone()).ok())
            .filter_map(|a| peer_id_of(&a).map(|p| (p, a)))
            .take(MAX_HOME_RELAYS)
            .collect()
    }
}

/// A fetched page handed to the actor; it answers with the ids to ack once they are
/// durable.
pub(super) struct RelayPage {
    pub(super) items: Vec<StoredItem>,
    pub(super) done: oneshot::Sender<Vec<[u8; 16]>>,
}

/// A sync task asks the actor for `count` new one-time prekey bundles to publish; they are
/// answered once the new private keys are durable (an empty list when they are not).
pub(super) struct MintRequest {
    pub(super) count: u32,
    pub(super) done: oneshot::Sender<Vec<Vec<u8>>>,
}

/// Loads or creates (and flushes) our mailbox token.
pub fn load_or_create_token(table: &Table<[u8; 32]>) -> Result<MailboxToken, MessagingError> {
    if let Some(bytes) = table.get(b"token")? {
        return Ok(MailboxToken::from_bytes(bytes));
    }
    let token = MailboxToken::random(&mut StdRng::from_entropy());
    table.insert(b"token", token.expose_bytes())?;
    Ok(token)
}

impl Actor {
    /// Our home relays as (peer id, address).
    pub(super) fn home_relay_peers(&self) -> Vec<(PeerId, Multiaddr)> {
        self.config
            .home_relays
            .iter()
            .filter_map(|a| peer_id_of(a).map(|p| (p, a.clone())))
            .collect()
    }

    /// A contact that held our token (if `was_eligible`) was removed or blocked (its record
    /// says so already): make a new token, send it to every contact eligible now over its
    /// session, and revoke the old one at our relays (now for those connected, at every
    /// later registration for all).
    pub(super) fn mailbox_contact_dropped(
        &mut self,
        was_eligible: bool,
    ) -> Result<(), MessagingError> {
        if !was_eligible || self.config.home_relays.is_empty() {
            return Ok(());
        }
        let old = self.mailbox_token.hash();
        let mut revoked = self.db.mailbox_revoked.get(b"revoked")?.unwrap_or_default();
        revoked.push(old.0);
        if revoked.len() > MAX_REVOKED {
            revoked.remove(0);
        }
        let token = MailboxToken::random(&mut self.rng);
        self.db
            .mailbox_self
            .insert(b"token", token.expose_bytes())?;
        self.db.mailbox_revoked.insert(b"revoked", &revoked)?;
        self.mailbox_token = token;
        self.dirty = true;
        // Register the new token (and revoke the old) at the relays we are connected to,
        // also if queuing it for the others fails below (then the whole rotation runs again:
        // it stays owed, see `settle_rekeys`).
        for (relay, _) in self.home_relay_peers() {
            self.sync_relay(relay);
        }
        for peer in self.eligible_contacts()? {
            let content = self.mailbox_token_message();
            match self.queue(peer, vec![(content, OutKind::MailboxToken)]) {
                Ok(_) => {}
                // Storage (a full disk): the rotation fails as a whole and runs again.
                Err(e) if storage_failure(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "could not queue the new mailbox token for a contact")
                }
            }
        }
        Ok(())
    }

    /// A contact became eligible (added, accepted from a message request, unblocked): send
    /// it our current token and home relays over its session. The ticket it may have holds
    /// an older token, revoked since by a rotation; without this, its deposits at our
    /// relays would be refused.
    pub(super) fn mailbox_contact_added(
        &mut self,
        c: &super::contacts::Contact,
    ) -> Result<(), MessagingError> {
        if let Some(content) = self.mailbox_token_content(c) {
            self.queue(c.key(), vec![(content, OutKind::MailboxToken)])?;
        }
        Ok(())
    }

    /// Our mailbox token and relays, if `c` should hold them (we have home relays, and it
    /// is a contact that shares in our keys).
    pub(super) fn mailbox_token_content(&self, c: &super::contacts::Contact) -> Option<Content> {
        if self.config.home_relays.is_empty() || !super::presence_share::eligible(c) {
            return None;
        }
        Some(self.mailbox_token_message())
    }

    /// Our current mailbox token and home relays, as a contact gets them.
    fn mailbox_token_message(&self) -> Content {
        Content::MailboxToken {
            token: *self.mailbox_token.expose_bytes(),
            relays: self.config.home_relays.iter().map(|a| a.to_vec()).collect(),
        }
    }

    /// Makes `count` one-time prekeys (bounded by the pool's cap), persists the pool and
    /// answers their public bundles after the flush.
    pub(super) fn mint_prekeys(&mut self, req: MintRequest) {
        let room = crate::crypto::keys::MAX_ONE_TIME_PREKEYS
            .saturating_sub(self.prekeys.one_time_prekey_count());
        let count = (req.count as usize).min(room);
        let mut prekeys = self.prekeys.clone();
        let bundles: Result<Vec<Vec<u8>>, MessagingError> = (|| {
            let ids = prekeys.generate_one_time_prekeys(&mut self.rng, count)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(prekeys.bundle(&self.keys, Some(id))?.to_bytes());
            }
            self.db.prekeys.insert(b"local", &*prekeys.to_bytes()?)?;
            Ok(out)
        })();
        match bundles {
            Ok(bundles) => {
                self.prekeys = prekeys;
                self.dirty = true;
                let done = req.done;
                self.after_flush.push(Box::new(move |flushed| {
                    let _ = done.send(if flushed.is_ok() { bundles } else { Vec::new() });
                }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make one-time prekeys");
                let _ = req.done.send(Vec::new());
            }
        }
    }

    /// Keeps a bundle claimed from a contact's relay for the next session it starts, if it
    /// is genuine (verifies, carries a one-time prekey, belongs to the contact) and that
    /// session is due: the first one (no session exists yet) or, `for_restart`, the one
    /// replacing a session the peer lost.
    pub(super) fn store_claimed(
        &mut self,
        peer: &PeerKey,
        claimed: Option<Vec<u8>>,
        for_restart: bool,
    ) -> Result<(), MessagingError> {
        let Some(bytes) = claimed else {
            return Ok(());
        };
        let Some(contact) = self.db.contacts.get(peer)? else {
            // Removed while the claim ran.
            return Ok(());
        };
        let genuine = crate::crypto::PrekeyBundle::from_bytes(&bytes)
            .ok()
            .filter(|b| b.verify().is_ok() && b.one_time_prekey().is_some())
            .is_some_and(|b| *b.identity() == contact.identity);
        if !genuine {
            tracing::warn!("a relay handed out a prekey bundle that does not verify; ignored");
            return Ok(());
        }
        // For the first session, or the one replacing a session the peer lost.
        if for_restart || self.db.sessions.get(peer)?.is_none() {
            self.db.claimed_prekeys.insert(key(peer), &bytes)?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Starts a sync with home relay `relay` unless one runs.
    pub(super) fn sync_relay(&mut self, relay: PeerId) {
        let Some((_, addr)) = self
            .home_relay_peers()
            .into_iter()
            .find(|(p, _)| *p == relay)
        else {
            return;
        };
        if !self.syncing.insert(relay) {
            self.sync_again.insert(relay);
            return;
        }
        let net = self.net.clone();
        let pages = self.relay_pages_tx.clone();
        let mint = self.mint_tx.clone();
        let done = self.sync_done_tx.clone();
        let hash = self.mailbox_token.hash();
        let revoked: Vec<tern_store_forward::TokenHash> = self
            .db
            .mailbox_revoked
            .get(b"revoked")
            .ok()
            .flatten()
            .unwrap_or_default()
            .into_iter()
            .map(tern_store_forward::TokenHash)
            .collect();
        tokio::spawn(async move {
            let mut registered = false;
            let r = sync(
                &net,
                relay,
                addr,
                Registration {
                    token_hash: hash,
                    revoked,
                },
                &pages,
                &mint,
                &mut registered,
            )
            .await;
            if let Err(e) = r {
                tracing::debug!(relay = %crate::net::short(&relay), error = %e, "mailbox sync stopped");
            }
            let _ = done.send((relay, registered)).await;
        });
    }

    /// Syncs every home relay once per `relay_sync_interval`: a long-lived connection gets
    /// no new-connection sync, and a relay forgets a mailbox whose owner stops registering.
    pub(super) fn sync_relays_if_due(&mut self) {
        let now = std::time::Instant::now();
        if now < self.next_relay_sync {
            return;
        }
        self.next_relay_sync = now + self.config.relay_sync_interval;
        for (relay, _) in self.home_relay_peers() {
            self.sync_relay(relay);
        }
    }

    /// A sync ended (`registered`: its registration succeeded): start another if a notice
    /// came meanwhile.
    pub(super) fn sync_finished(&mut self, relay: PeerId, registered: bool) {
        if registered {
            self.relay_registered.insert(relay, crate::events::now_ms());
        }
        self.syncing.remove(&relay);
        if self.sync_again.remove(&relay) {
            self.sync_relay(relay);
        }
    }

    /// A `/tern/mailbox/1` request to us: a relay's `Notice`.
    pub(super) fn handle_mailbox_request(&mut self, req: InboundRequest) {
        let response = match MbRequest::from_bytes(&req.bytes) {
            Ok(MbRequest::Notice { waiting }) => {
                let ours = self.home_relay_peers().iter().any(|(p, _)| *p == req.peer);
                if ours {
                    tracing::debug!(waiting, "relay notice");
                    self.sync_relay(req.peer);
                    MbResponse::Ok
                } else {
                    MbResponse::error(
                        tern_store_forward::ErrorCode::NotRecipient,
                        "you are not one of my home relays",
                    )
                }
            }
            Ok(_) => MbResponse::error(
                tern_store_forward::ErrorCode::Unsupported,
                "a user node only takes notices",
            ),
            Err(e) => MbResponse::error(tern_store_forward::ErrorCode::Malformed, e.to_string()),
        };
        let net = self.net.clone();
        tokio::spawn(async move {
            let _ = net
                .respond_on(Proto::Mailbox, req.channel, response.to_bytes())
                .await;
        });
    }

    /// Processes a fetched page like direct envelopes; acks what is durable after the flush.
    pub(super) fn handle_relay_page(&mut self, page: RelayPage) {
        let mut ack = Vec::new();
        for item in &page.items {
            let Ok(from) = PeerId::from_bytes(item.from.as_bytes()) else {
                ack.push(item.id);
                continue;
            };
            let bytes = match Envelope::from_bytes(&item.envelope) {
                Ok(env) => Request::Deliver(env).to_bytes(),
                Err(_) => {
                    // Garbage: counted as malformed below, and never worth fetching again.
                    self.count_rejected("malformed");
                    ack.push(item.id);
                    continue;
                }
            };
            match self.accept_inbound(from, &bytes) {
                Inbound::Respond(Response::Rejected(_, reason)) if reason.is_transient() => {}
                Inbound::Respond(_) | Inbound::Drop => ack.push(item.id),
            }
        }
        self.dirty = true;
        let done = page.done;
        self.after_flush.push(Box::new(move |flushed| {
            // Nothing is acked unless it is on our disk.
            let _ = done.send(if flushed.is_ok() { ack } else { Vec::new() });
        }));
    }
}

/// What a sync registers: our token's hash, and the hashes it revokes.
struct Registration {
    token_hash: tern_store_forward::TokenHash,
    revoked: Vec<tern_store_forward::TokenHash>,
}

/// One sync with `relay`: register (sets `registered`), top up prekeys, fetch every page.
async fn sync(
    net: &NetHandle,
    relay: PeerId,
    addr: Multiaddr,
    registration: Registration,
    pages: &mpsc::Sender<RelayPage>,
    mint: &mpsc::Sender<MintRequest>,
    registered: &mut bool,
) -> Result<(), String> {
    let Registration {
        token_hash,
        revoked,
    } = registration;
    let call = |req: MbRequest| {
        let addr = addr.clone();
        async move {
            let bytes = net
                .request_on(Proto::Mailbox, relay, vec![addr], req.to_bytes())
                .await
                .map_err(|e| e.to_string())?;
            MbResponse::from_bytes(&bytes).map_err(|e| e.to_string())
        }
    };
    match call(MbRequest::Register {
        add: vec![token_hash],
        revoke: revoked,
    })
    .await?
    {
        MbResponse::Registered { .. } => *registered = true,
        other => return Err(format!("register refused: {other:?}")),
    }
    // Keep the relay's pool of our one-time prekeys topped up.
    if let MbResponse::PrekeysPublished { available, .. } = call(MbRequest::PublishPrekeys {
        prekeys: Vec::new(),
    })
    .await?
        && available < PREKEY_LOW
    {
        let (done, rx) = oneshot::channel();
        mint.send(MintRequest {
            count: PREKEY_TARGET - available,
            done,
        })
        .await
        .map_err(|_| "messaging stopped".to_string())?;
        let prekeys = rx.await.map_err(|_| "messaging stopped".to_string())?;
        if !prekeys.is_empty() {
            call(MbRequest::PublishPrekeys { prekeys }).await?;
        }
    }
    let mut after = None;
    let mut busy = 0;
    loop {
        let (items, more) = match call(MbRequest::Fetch {
            after,
            max_items: FETCH_ITEMS,
            max_bytes: FETCH_BYTES,
        })
        .await?
        {
            MbResponse::Batch { items, more } => (items, more),
            // The relay limits fetches per peer and the pages it has on their way: the
            // mail waits there, fetched again in a moment.
            MbResponse::Error {
                code: tern_store_forward::wire::ErrorCode::RateLimited,
                ..
            } if busy < FETCH_BUSY_RETRIES => {
                busy += 1;
                tokio::time::sleep(FETCH_BUSY_WAIT).await;
                continue;
            }
            other => return Err(format!("fetch refused: {other:?}")),
        };
        busy = 0;
        if items.is_empty() {
            return Ok(());
        }
        after = items.last().map(|i| i.seq);
        let (done, rx) = oneshot::channel();
        pages
            .send(RelayPage { items, done })
            .await
            .map_err(|_| "messaging stopped".to_string())?;
        let ids = rx.await.map_err(|_| "messaging stopped".to_string())?;
        if !ids.is_empty() {
            for chunk in ids.chunks(tern_store_forward::wire::MAX_ACK_IDS) {
                call(MbRequest::Ack {
                    ids: chunk.to_vec(),
                })
                .await?;
            }
        }
        if !more {
            return Ok(());
        }
    }
}

/// Deposits `items` (for `recipient`) at the contact's relays, in order: each envelope goes
/// to every relay at once, and the next only after they answered, so a relay stores a
/// session's envelopes in the order they were encrypted (the first one sets the session
/// up). Stops at the first envelope no relay stored; returns the ids at least one relay
/// stored durably, each with when the last relay that stored it drops it (ms since the
/// epoch, the relays' clock, kept within reason of ours).
///
/// The ids in `resent` were queued again after a relay held them: a relay still holding
/// the older envelope answers the new one as a duplicate, which does not count as stored
/// (that copy is the one the recipient could not decrypt). Such an envelope is skipped,
/// not stopped at: it stays queued, and the next ones may be stored. Any other failure
/// stops the deposit, as for every envelope.
pub(super) async fn deposit(
    net: &NetHandle,
    recipient: PeerId,
    mailbox: &ContactMailbox,
    items: Vec<OutboxItem>,
    resent: &HashSet<MsgId>,
    now_ms: u64,
) -> Deposited {
    let relays = mailbox.relay_peers();
    let mut done = Deposited {
        stored: Vec::new(),
        token_refused: false,
    };
    let Ok(recipient) = PeerBytes::new(recipient.to_bytes()) else {
        return done;
    };
    let token = MailboxToken::from_bytes(mailbox.token);
    for item in items {
        let ttl = item.expires_at.saturating_sub(now_ms) / 1000;
        let frame = MbRequest::Deposit {
            recipient: recipient.clone(),
            token: token.clone(),
            id: item.id.0,
            ttl_secs: Some(ttl.max(1)),
            envelope: item.envelope.clone(),
        }
        .to_bytes();
        let mut answers: FuturesUnordered<_> = relays
            .iter()
            .map(|(relay, addr)| {
                let frame = frame.clone();
                async move {
                    let r = net
                        .request_on(Proto::Mailbox, *relay, vec![addr.clone()], frame)
                        .await;
                    (*relay, r)
                }
            })
            .collect();
        let mut held_until = None;
        // A relay holds the older envelope of a text queued again.
        let mut older_held = false;
        // Relays that answered, and of those the ones that refused our token.
        let (mut answered, mut unauthorized) = (0, 0);
        while let Some((relay, result)) = answers.next().await {
            let result = result.map(|b| MbResponse::from_bytes(&b));
            answered += usize::from(matches!(result, Ok(Ok(_))));
            match result {
                Ok(Ok(MbResponse::Deposited {
                    duplicate,
                    expires_at,
                })) if !(duplicate && resent.contains(&item.id)) => {
                    // A relay's clock may be off: never before the lifetime we asked for,
                    // never past 30 days or that lifetime, whichever is later.
                    let until = expires_at
                        .saturating_mul(1000)
                        .clamp(item.expires_at, item.expires_at.max(now_ms + MAX_HOLD_MS));
                    held_until = Some(held_until.map_or(until, |u: u64| u.max(until)));
                }
                Ok(Ok(MbResponse::Deposited { .. })) => {
                    older_held = true;
                    tracing::debug!(
                        relay = %crate::net::short(&relay),
                        "the relay still holds the older envelope of a text queued again; it stays queued"
                    );
                }
                Ok(Ok(MbResponse::Error {
                    code: tern_store_forward::ErrorCode::Unauthorized,
                    ..
                })) => {
                    unauthorized += 1;
                    tracing::debug!(
                        relay = %crate::net::short(&relay),
                        "a relay of the recipient refuses our token for it (it removed or blocked us, or moved its mailbox)"
                    );
                }
                Ok(Ok(other)) => {
                    // Shown by default: a full mailbox or relay is why messages to an
                    // offline contact stay queued (they are kept and tried again).
                    tracing::info!(
                        relay = %crate::net::short(&relay),
                        answer = ?other,
                        "a relay of the recipient refused a deposit (unless another relay took it, the message stays queued and is tried again)"
                    );
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "bad deposit answer"),
                Err(e) => {
                    tracing::debug!(relay = %crate::net::short(&relay), error = %e, "relay unreachable");
                }
            }
        }
        let Some(until) = held_until else {
            if older_held {
                continue;
            }
            done.token_refused = unauthorized > 0 && unauthorized == answered;
            break;
        };
        done.stored.push((item.id, until));
    }
    done
}

/// What [`deposit`] did.
pub(super) struct Deposited {
    /// The ids at least one relay stored, each with when the last of them drops it.
    pub stored: Vec<(MsgId, u64)>,
    /// Every relay that answered refused our token for the envelope the deposit stopped at.
    pub token_refused: bool,
}

/// The `contact_mailbox` key of a contact.
pub(super) fn key(peer: &PeerKey) -> &[u8] {
    peer
}

/// Claims one of the ticket owner's one-time prekeys (a bundle) from its relays; `None` when
/// the ticket names none, no relay answers within a few seconds, or the pool is empty.
pub async fn claim_prekey(
    net: &NetHandle,
    ticket: &crate::ticket::ContactTicket,
) -> Option<Vec<u8>> {
    let mb = ContactMailbox {
        relays: ticket.relays.iter().map(|a| a.to_vec()).collect(),
        token: ticket.mailbox_token?,
    };
    claim_from(net, ticket.peer_id, &mb).await
}

/// Claims one of `owner`'s one-time prekeys from the relays of its mailbox `mb`; `None` when
/// no relay answers within a few seconds each, or the pool is empty.
pub(super) async fn claim_from(
    net: &NetHandle,
    owner: PeerId,
    mb: &ContactMailbox,
) -> Option<Vec<u8>> {
    let recipient = PeerBytes::new(owner.to_bytes()).ok()?;
    for (relay, addr) in mb.relay_peers() {
        let frame = MbRequest::ClaimPrekey {
            recipient: recipient.clone(),
            token: MailboxToken::from_bytes(mb.token),
        }
        .to_bytes();
        let answer = tokio::time::timeout(
            CLAIM_TIMEOUT,
            net.request_on(Proto::Mailbox, relay, vec![addr], frame),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|b| MbResponse::from_bytes(&b).ok());
        if let Some(MbResponse::Prekey(Some(bundle))) = answer {
            return Some(bundle);
        }
    }
    None
}
