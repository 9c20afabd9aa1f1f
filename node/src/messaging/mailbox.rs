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
    db::{OutboxItem, PeerKey},
    wire::{Envelope, MsgId, Request, Response},
};
use crate::{
    net::{InboundRequest, NetHandle, Proto, peer_id_of},
    store::Table,
};

/// Most relays a message is deposited at.
pub const MAX_HOME_RELAYS: usize = 2;
/// Items per fetched page.
const FETCH_ITEMS: u32 = 256;
/// Envelope bytes per fetched page.
const FETCH_BYTES: u32 = 512 * 1024;

/// A contact's mailbox, from its ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactMailbox {
    /// Its home relays (binary multiaddrs with `/p2p/`).
    pub relays: Vec<Vec<u8>>,
    /// The capability it issued.
    pub token: [u8; 32],
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
        let done = self.sync_done_tx.clone();
        let hash = self.mailbox_token.hash();
        tokio::spawn(async move {
            if let Err(e) = sync(&net, relay, addr, hash, &pages).await {
                tracing::debug!(relay = %crate::net::short(&relay), error = %e, "mailbox sync stopped");
            }
            let _ = done.send(relay).await;
        });
    }

    /// A sync ended: start another if a notice came meanwhile.
    pub(super) fn sync_finished(&mut self, relay: PeerId) {
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

async fn sync(
    net: &NetHandle,
    relay: PeerId,
    addr: Multiaddr,
    token_hash: tern_store_forward::TokenHash,
    pages: &mpsc::Sender<RelayPage>,
) -> Result<(), String> {
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
        revoke: Vec::new(),
    })
    .await?
    {
        MbResponse::Registered { .. } => {}
        other => return Err(format!("register refused: {other:?}")),
    }
    let mut after = None;
    loop {
        let (items, more) = match call(MbRequest::Fetch {
            after,
            max_items: FETCH_ITEMS,
            max_bytes: FETCH_BYTES,
        })
        .await?
        {
            MbResponse::Batch { items, more } => (items, more),
            other => return Err(format!("fetch refused: {other:?}")),
        };
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
/// stored durably.
pub(super) async fn deposit(
    net: &NetHandle,
    recipient: PeerId,
    mailbox: &ContactMailbox,
    items: Vec<OutboxItem>,
    now_ms: u64,
) -> Vec<MsgId> {
    let relays = mailbox.relay_peers();
    let Ok(recipient) = PeerBytes::new(recipient.to_bytes()) else {
        return Vec::new();
    };
    let token = MailboxToken::from_bytes(mailbox.token);
    let mut stored = Vec::new();
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
        let mut ok = false;
        while let Some((relay, result)) = answers.next().await {
            match result.map(|b| MbResponse::from_bytes(&b)) {
                Ok(Ok(MbResponse::Deposited { .. })) => ok = true,
                Ok(Ok(other)) => {
                    tracing::debug!(relay = %crate::net::short(&relay), answer = ?other, "deposit refused");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "bad deposit answer"),
                Err(e) => {
                    tracing::debug!(relay = %crate::net::short(&relay), error = %e, "relay unreachable");
                }
            }
        }
        if !ok {
            break;
        }
        stored.push(item.id);
    }
    stored
}

/// The `contact_mailbox` key of a contact.
pub(super) fn key(peer: &PeerKey) -> &[u8] {
    peer
}
