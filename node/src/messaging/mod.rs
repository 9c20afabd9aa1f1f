//! One-to-one messaging: contacts, end-to-end encrypted envelopes over `/tern/msg/1`, the
//! persistent outbox with retries, receipts, history, typing.
//!
//! One actor task owns all messaging state (the outbox schedule, rate limiters, the id
//! generator) and is the only writer of the messaging tables; the rest of the node holds a
//! [`MessagingHandle`]. Invariants the actor keeps:
//! - `send` returns an id only after the encrypted envelope, the ratchet state and the
//!   history entry were committed in one transaction *and flushed*;
//! - an envelope is encrypted once and re-sent byte for byte until acknowledged, so a retry
//!   never advances the ratchet and the recipient deduplicates on the id;
//! - nothing leaves the process (an envelope or an acknowledgement) before the state it
//!   depends on is flushed, except a text whose chain position a durable reservation covers
//!   ([`reserve`]): ratchet keys are never reused after a crash, and a `Stored` answer means
//!   the message survives a crash of the recipient;
//! - inbound: dedup marker + ratchet state + message commit together or not at all; a
//!   failed decryption changes nothing.
//!
//! Work is batched: the actor drains what is ready (commands, inbound envelopes, delivery
//! results), then flushes once and answers everyone, which is how a single sled flush
//! covers hundreds of messages under load (group commit).

pub mod contacts;
pub mod db;
pub mod mailbox;
mod presence_share;
pub mod ratelimit;
pub mod reserve;
pub mod schedule;
pub mod wire;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesOrdered};
use libp2p::{Multiaddr, PeerId, request_response::ResponseChannel};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    task::JoinError,
};
use tokio_util::sync::CancellationToken;

pub use self::presence_share::{PresenceNote, PresenceNotes};
use self::{
    contacts::{BlockedPeer, Contact, ContactView, fold_name, normalize_name, validate_name},
    db::{
        MAX_PREVIOUS_SESSIONS, MessagingDb, MsgState, OutKind, OutboxItem, PeerKey, RelayHeld,
        Round, SessionRecord, StoredMessage, history_key, peer_id_key,
    },
    ratelimit::TokenBucket,
    reserve::Reservations,
    schedule::{RetryPolicy, Schedule},
    wire::{
        Content, Envelope, MAX_TEXT_BYTES, MsgId, MsgIdGen, Plaintext, ReceiptKind, RejectReason,
        Request, Response,
    },
};
use crate::{
    crypto::{CryptoError, IdentityKeys, LocalPrekeys, Message, PrekeyBundle, Session},
    events::{EventBus, EventKind, now_ms},
    identity::{ed25519_key_bytes_of, ed25519_public_of},
    net::{InboundRequest, NetEvent, NetHandle, is_dialable},
    store::{StoreError, Tx, TxError},
    ticket::ContactTicket,
};

/// Capacity of the command channel into the messaging actor.
pub const COMMAND_CHANNEL_CAPACITY: usize = 1024;
/// Capacity of the inbound envelope channel from the network actor.
pub const INBOUND_CHANNEL_CAPACITY: usize = 4096;
/// Most items handled between two flushes.
const BATCH_LIMIT: usize = 1024;
/// Most texts, and text bytes, queued in one transaction.
const SEND_CHUNK_TEXTS: usize = 64;
const SEND_CHUNK_BYTES: usize = 1024 * 1024;
/// Most requests in flight to one peer.
const DELIVERY_WINDOW: usize = 64;
/// Most envelopes in flight to one peer (give or take one request). Requests may overtake
/// each other on the way, so this stays well below the ratchet's `MAX_SKIP` (1,000): the
/// recipient refuses a message further ahead than that as `TooEarly`.
const DELIVERY_AHEAD: usize = 512;
/// How much of the queue one round of a delivery takes (it asks for the next round when it
/// runs low): up to 2,048 envelopes, and no more than about 2 MiB of them, since a round is
/// held in memory (a round of 64 KiB texts is 32 of them).
const DELIVERY_ROUND: Round = Round {
    items: 2048,
    bytes: 2 * 1024 * 1024,
};
/// Longest a recorded answer (outbox removal, `sent` / `delivered` state) waits for a flush
/// of its own when no other write brings one sooner.
const BOOKKEEPING_FLUSH: Duration = Duration::from_millis(50);
/// After a failed flush, how long recorded answers wait before the next attempt (besides
/// any other write that flushes).
const FAILED_FLUSH_RETRY: Duration = Duration::from_secs(1);
/// How long after a failed key rotation (a full disk) the owed rotations run again.
const REKEY_RETRY: Duration = Duration::from_secs(30);
/// How long a message may be refused `TooEarly` (the ones before it on its chain never
/// arrive, for example lost with a relay) before the sender gives it up as failed.
const TOO_EARLY_LIMIT: Duration = Duration::from_secs(600);
/// What the user is told of a text its recipient's relays held and dropped with no receipt
/// from the recipient ([`MessagingConfig::relay_grace`] later).
const RELAY_HOLD_ENDED: &str = "the recipient's relays held it until it expired there, and no \
     receipt came: the recipient did not fetch it in time, or could not decrypt it";
/// How long after its start a node waits at least before it judges a relay's hold on one
/// of its texts over: time to fetch the receipts waiting in its own mailbox.
const START_SETTLE: Duration = Duration::from_secs(60);
/// What the user is told of a text a relay held when its recipient was removed: it fails
/// (no receipt of theirs could be decrypted any more), but the relay may still hand it over.
const REMOVED_WHILE_HELD: &str =
    "contact removed (its relays may still hand it over, but no receipt can come back)";
/// What the user is told of a message given up after [`TOO_EARLY_LIMIT`].
const TOO_EARLY_GIVEN_UP: &str = "the recipient could not decrypt it for 10 minutes: \
     messages sent before it never reached them (for example lost with a relay)";

/// Messaging settings.
#[derive(Debug, Clone)]
pub struct MessagingConfig {
    /// How long an accepted message may wait for delivery before it fails. Default: 7 days.
    pub message_ttl: Duration,
    /// Sustained inbound envelopes per second accepted from one peer. Default: 20,000.
    pub inbound_rate: u32,
    /// Inbound burst allowed from one peer. Default: 40,000.
    pub inbound_burst: u32,
    /// Our display name, sent to contacts.
    pub name: Option<String>,
    /// Retry backoff.
    pub retry: RetryPolicy,
    /// Our listen addresses at start, announced in our profile (kept up to date from the
    /// network afterwards). Default: none.
    pub listen_addrs: Vec<Multiaddr>,
    /// Our home relays (with `/p2p/`), where our mailbox lives. Default: none.
    pub home_relays: Vec<Multiaddr>,
    /// How often each connected home relay is synced (register + fetch) besides on connect
    /// and on notices: registering keeps our mailbox from expiring there.
    pub relay_sync_interval: Duration,
    /// Most message requests (contacts a stranger's first message created) kept at once;
    /// a stranger writing beyond that is refused `RateLimited` until the user accepts,
    /// blocks or removes some. 0: strangers cannot start conversations. Default: 1,000.
    pub max_message_requests: usize,
    /// Contacts presence says are offline: their envelopes go straight to their relays.
    pub known_offline: KnownOffline,
    /// How long after the recipient's relays drop a text they held (`stored`) a receipt may
    /// still come before the text fails: the recipient may have fetched it just before.
    /// Default: [`relay_grace`] of the default `message_ttl`, an hour.
    pub relay_grace: Duration,
}

/// The [`MessagingConfig::relay_grace`] that goes with a message lifetime: 1/168 of it (an
/// hour for the default 7 days), at most an hour.
pub fn relay_grace(message_ttl: Duration) -> Duration {
    (message_ttl / 168).min(Duration::from_secs(3600))
}

/// The peers presence currently shows offline, shared by the presence actor (which sets
/// them) and messaging (which deposits at relays without trying a direct delivery, and
/// clears a peer that just delivered to us directly). Presence sets a peer only when its
/// state changes, so one cleared that way is set again only after presence has seen it
/// online and then offline again: until then, a delivery to it tries the direct path first.
#[derive(Debug, Clone, Default)]
pub struct KnownOffline(std::sync::Arc<std::sync::RwLock<std::collections::HashSet<PeerId>>>);

impl KnownOffline {
    /// Records what presence says about `peer`.
    pub fn set(&self, peer: PeerId, offline: bool) {
        let mut set = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if offline {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }

    /// Whether presence shows `peer` offline.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(peer)
    }
}

impl Default for MessagingConfig {
    fn default() -> Self {
        Self {
            message_ttl: Duration::from_secs(7 * 24 * 3600),
            inbound_rate: 20_000,
            inbound_burst: 40_000,
            name: None,
            retry: RetryPolicy::default(),
            listen_addrs: Vec::new(),
            home_relays: Vec::new(),
            relay_sync_interval: Duration::from_secs(24 * 3600),
            max_message_requests: 1_000,
            known_offline: KnownOffline::default(),
            relay_grace: relay_grace(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// Errors of messaging operations.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    /// No contact with that name.
    #[error("unknown contact {0:?}; see `tern contact list`")]
    UnknownContact(String),
    /// The contact is blocked.
    #[error("{0} is blocked; unblock them first")]
    Blocked(String),
    /// No removed contact with that peer id is blocked.
    #[error("no removed contact with peer id {0} is blocked; see `tern contact blocked`")]
    NotBlocked(String),
    /// The peer to unblock by peer id is still a contact.
    #[error("that peer is your contact {0:?}: unblock it by name")]
    StillContact(String),
    /// The text is too long.
    #[error("message too large: {len} bytes, at most {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The text is empty.
    #[error("message is empty")]
    Empty,
    /// The name is taken.
    #[error("a contact named {0:?} (or a name that reads the same) already exists")]
    NameTaken(String),
    /// The peer is already a contact.
    #[error("this peer is already your contact {0:?}")]
    AlreadyContact(String),
    /// The name is not acceptable.
    #[error("invalid contact name: {0}")]
    InvalidName(String),
    /// The ticket is unusable.
    #[error("invalid ticket: {0}")]
    InvalidTicket(String),
    /// No session and no way to start one.
    #[error("cannot start an encrypted session with {0}: their ticket carried no prekey bundle")]
    NoSession(String),
    /// The database failed (for example a full disk); nothing was half-written.
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    /// The change could not be made durable (for example a full disk); it was withdrawn and
    /// nothing was sent.
    #[error("could not store it durably, so nothing was sent: {0}")]
    NotDurable(String),
    /// The message could not be made durable and was withdrawn, but it was due to leave
    /// before its flush (its chain position was reserved, [`reserve`]) and may have left:
    /// the recipient may still get it.
    #[error(
        "could not store it durably; it was withdrawn, but it may already have left, so the recipient may still get it: {0}"
    )]
    NotDurableLeft(String),
    /// Encryption failed.
    #[error("encryption failed: {0}")]
    Crypto(#[from] CryptoError),
    /// The actor is gone.
    #[error("the messaging task is not running (node shutting down?)")]
    ActorGone,
}

/// A history entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryItem {
    /// Message id (hex).
    pub id: String,
    /// Sender: `"me"` or the contact's name.
    pub from: String,
    /// Recipient: `"me"` or the contact's name.
    pub to: String,
    /// The text.
    pub text: String,
    /// Sender's timestamp, ms since the epoch.
    pub timestamp: u64,
    /// queued, stored (at a relay), sent, delivered, read, failed (outgoing); received, read (incoming).
    pub state: String,
    /// Why it failed, for failed messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One conversation in the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The contact's name.
    pub name: String,
    /// The contact's peer id.
    pub peer_id: String,
    /// Unread incoming messages.
    pub unread: u64,
    /// The newest message, if any.
    pub last: Option<HistoryItem>,
    /// A message request: a stranger wrote first and we have not added them (their name is
    /// the one they announced, and may imitate someone's).
    #[serde(default)]
    pub request: bool,
    /// Blocked: nothing new from them is accepted.
    #[serde(default)]
    pub blocked: bool,
}

/// Counters for `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessagingStats {
    /// Envelopes waiting in the outbox (messages, receipts, profiles).
    pub outbox: u64,
    /// Inbound envelopes refused since start, by reason.
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Home relays (by peer id) where our mailbox registration succeeded since start, with
    /// the time (ms since the epoch) of the last one.
    pub relay_registrations: std::collections::BTreeMap<PeerId, u64>,
    /// Envelopes that left before their own flush since start, covered by a durable
    /// reservation of their chain positions ([`reserve`]).
    pub sent_before_flush: u64,
    /// Inbound envelopes already stored, answered `Stored` again since start (a sender
    /// whose answer was lost, a replay).
    pub duplicates: u64,
}

type Reply<T> = oneshot::Sender<Result<T, MessagingError>>;

enum Cmd {
    ContactAdd {
        ticket: String,
        name: String,
        claimed: Option<Vec<u8>>,
        reply: Reply<ContactView>,
    },
    ContactList {
        reply: Reply<Vec<ContactView>>,
    },
    ContactShow {
        name: String,
        reply: Reply<ContactView>,
    },
    ContactRemove {
        name: String,
        reply: Reply<()>,
    },
    ContactBlock {
        name: String,
        blocked: bool,
        reply: Reply<ContactView>,
    },
    BlockedList {
        reply: Reply<Vec<BlockedPeer>>,
    },
    PeerUnblock {
        peer: PeerId,
        reply: Reply<()>,
    },
    Send {
        to: String,
        text: String,
        reply: Reply<MsgId>,
    },
    History {
        with: String,
        limit: usize,
        reply: Reply<Vec<HistoryItem>>,
    },
    Conversations {
        reply: Reply<Vec<Conversation>>,
    },
    MarkRead {
        with: String,
        reply: Reply<usize>,
    },
    Typing {
        to: String,
        typing: bool,
        reply: Reply<bool>,
    },
    Stats {
        reply: Reply<MessagingStats>,
    },
    Bundle {
        reply: Reply<Vec<u8>>,
    },
    MailboxToken {
        reply: Reply<[u8; 32]>,
    },
    PresenceSetup {
        share: bool,
        reply: Reply<Option<crate::presence::wire::PresenceKey>>,
    },
}

/// Cheap, cloneable handle to the messaging actor.
#[derive(Clone, Debug)]
pub struct MessagingHandle {
    tx: mpsc::Sender<Cmd>,
}

impl MessagingHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, MessagingError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| MessagingError::ActorGone)?;
        rx.await.map_err(|_| MessagingError::ActorGone)?
    }

    /// Adds a contact from its ticket under `name`. When the ticket names relays, one of
    /// the contact's one-time prekeys is claimed there first (`net`), so the session this
    /// starts gets a fresh one even while the contact is offline.
    pub async fn contact_add(
        &self,
        net: &NetHandle,
        ticket: String,
        name: String,
    ) -> Result<ContactView, MessagingError> {
        let claimed = match ContactTicket::decode(&ticket) {
            Ok(t) => mailbox::claim_prekey(net, &t).await,
            Err(_) => None,
        };
        self.call(|reply| Cmd::ContactAdd {
            ticket,
            name,
            claimed,
            reply,
        })
        .await
    }

    /// Every contact.
    pub async fn contact_list(&self) -> Result<Vec<ContactView>, MessagingError> {
        self.call(|reply| Cmd::ContactList { reply }).await
    }

    /// One contact with its safety number.
    pub async fn contact_show(&self, name: String) -> Result<ContactView, MessagingError> {
        self.call(|reply| Cmd::ContactShow { name, reply }).await
    }

    /// Removes a contact, its session and its queued messages (history is kept).
    pub async fn contact_remove(&self, name: String) -> Result<(), MessagingError> {
        self.call(|reply| Cmd::ContactRemove { name, reply }).await
    }

    /// Blocks or unblocks a contact.
    pub async fn contact_block(
        &self,
        name: String,
        blocked: bool,
    ) -> Result<ContactView, MessagingError> {
        self.call(|reply| Cmd::ContactBlock {
            name,
            blocked,
            reply,
        })
        .await
    }

    /// Blocked contacts, then blocked contacts the user removed.
    pub async fn blocked_list(&self) -> Result<Vec<BlockedPeer>, MessagingError> {
        self.call(|reply| Cmd::BlockedList { reply }).await
    }

    /// Lifts the block of a blocked contact the user removed: its messages are taken as a
    /// message request again. (A blocked contact is unblocked with [`Self::contact_block`].)
    pub async fn peer_unblock(&self, peer: PeerId) -> Result<(), MessagingError> {
        self.call(|reply| Cmd::PeerUnblock { peer, reply }).await
    }

    /// Queues a text; returns its id once it is durably queued.
    pub async fn send(&self, to: String, text: String) -> Result<MsgId, MessagingError> {
        self.call(|reply| Cmd::Send { to, text, reply }).await
    }

    /// The last `limit` messages with a contact, oldest first.
    pub async fn history(
        &self,
        with: String,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, MessagingError> {
        self.call(|reply| Cmd::History { with, limit, reply }).await
    }

    /// Every conversation with its unread count and newest message.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, MessagingError> {
        self.call(|reply| Cmd::Conversations { reply }).await
    }

    /// Marks a conversation read (sends read receipts); returns how many were unread.
    pub async fn mark_read(&self, with: String) -> Result<usize, MessagingError> {
        self.call(|reply| Cmd::MarkRead { with, reply }).await
    }

    /// Tells a contact we are (not) typing; returns whether it was received. Call it only
    /// while the contact is connected: every call advances the ratchet.
    pub async fn typing(&self, to: String, typing: bool) -> Result<bool, MessagingError> {
        self.call(|reply| Cmd::Typing { to, typing, reply }).await
    }

    /// Outbox size and rejection counters.
    pub async fn stats(&self) -> Result<MessagingStats, MessagingError> {
        self.call(|reply| Cmd::Stats { reply }).await
    }

    /// Our current prekey bundle (no one-time prekey), for the contact ticket.
    pub async fn bundle(&self) -> Result<Vec<u8>, MessagingError> {
        self.call(|reply| Cmd::Bundle { reply }).await
    }

    /// Our mailbox token (for the contact ticket).
    pub async fn mailbox_token(&self) -> Result<[u8; 32], MessagingError> {
        self.call(|reply| Cmd::MailboxToken { reply }).await
    }

    /// Brings presence-key sharing in line with the configuration (`share`: with contacts,
    /// or with nobody); returns our presence key, `None` when we share with nobody.
    pub async fn presence_setup(
        &self,
        share: bool,
    ) -> Result<Option<crate::presence::wire::PresenceKey>, MessagingError> {
        self.call(|reply| Cmd::PresenceSetup { share, reply }).await
    }
}

/// What the network and presence hand to messaging, and where messaging reports.
#[derive(Debug)]
pub struct MessagingIo {
    /// `/tern/msg/1` requests from the network.
    pub inbound: mpsc::Receiver<InboundRequest>,
    /// `/tern/mailbox/1` requests (relay notices) from the network.
    pub mailbox_in: mpsc::Receiver<InboundRequest>,
    /// Where presence-key and contact changes go (the presence actor), if anywhere.
    pub presence_notes: Option<PresenceNotes>,
}

/// The receivers the messaging actor listens on.
struct Channels {
    cmds: mpsc::Receiver<Cmd>,
    inbound: mpsc::Receiver<InboundRequest>,
    results: mpsc::Receiver<DeliveryResult>,
    net_events: broadcast::Receiver<NetEvent>,
    mailbox_in: mpsc::Receiver<InboundRequest>,
    relay_pages: mpsc::Receiver<mailbox::RelayPage>,
    sync_done: mpsc::Receiver<(PeerId, bool)>,
    mint: mpsc::Receiver<mailbox::MintRequest>,
    claims: mpsc::Receiver<(PeerKey, Option<Vec<u8>>)>,
}

/// What a delivery attempt to a peer produced: sent as each request is answered (`last`
/// false), and once at the end (`last` true).
struct DeliveryResult {
    peer: PeerKey,
    outcomes: Vec<(MsgId, Outcome)>,
    /// Receipts the recipient put in its answers.
    receipts: Vec<Envelope>,
    failure: Option<String>,
    /// The failure is the recipient refusing for now (`RateLimited`, `Unavailable`,
    /// `TooEarly`): its limits decide when to try again, not hearing from it.
    refused: bool,
    /// The attempt is over: the schedule decides what comes next.
    last: bool,
    /// Every relay of the recipient refused our token: it revoked it (it removed or blocked
    /// us) or moved its mailbox, so whatever presence says, it should be tried directly.
    token_refused: bool,
    /// Whether any item of the whole attempt was stored (at the peer or a relay).
    progressed: bool,
    /// The attempt runs low: the next queued items after this id, please (none: the queue
    /// is drained).
    more: Option<(MsgId, oneshot::Sender<Vec<OutboxItem>>)>,
}

/// How a delivery attempt ended, for the schedule ([`Actor::end_attempt`]).
struct AttemptEnd {
    failure: Option<String>,
    progressed: bool,
    refused: bool,
}

/// A text queued again under a new session ([`Actor::restart_session`]): its
/// id, and when it was first queued and expires (a restart extends nothing).
#[derive(Clone, Copy)]
struct Again {
    id: MsgId,
    created_at: u64,
    expires_at: u64,
    /// A relay holds (or held) an older envelope under this id: a relay that answers this
    /// one as a duplicate of it did not store it ([`MessagingDb::resent`]).
    resent: bool,
}

enum Outcome {
    Stored,
    /// Stored and decrypted by the recipient, which said so in its answer.
    Delivered,
    /// Deposited at (at least one of) the recipient's relays, which hold it until then (ms
    /// since the epoch).
    Relayed(u64),
    Rejected(RejectReason),
    /// Given up by this node, with the reason the user is told.
    GaveUp(&'static str),
}

type AfterFlush = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A running flush: the blocking pool's task, or one already done on the actor's thread.
type FlushTask = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Result<(), StoreError>, JoinError>> + Send>,
>;

/// Whether this thread may block in place (a worker of a multi-thread runtime).
fn can_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Runs the flush `f` on this thread (`block_in_place`: the runtime moves this worker's
/// other tasks to another thread meanwhile). A panic in it is a failed flush, as it is on
/// the blocking pool, not the end of the caller.
fn flush_in_place(f: impl FnOnce() -> Result<(), StoreError>) -> Result<(), StoreError> {
    tokio::task::block_in_place(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("no message");
            Err(StoreError::Broken(format!("the flush panicked: {why}")))
        })
    })
}

struct Actor {
    me: PeerKey,
    keys: IdentityKeys,
    prekeys: LocalPrekeys,
    config: MessagingConfig,
    db: MessagingDb,
    net: NetHandle,
    events: EventBus,
    ids: MsgIdGen,
    rng: StdRng,
    schedule: Schedule<PeerKey, Instant>,
    limits: HashMap<PeerId, TokenBucket>,
    last_error: HashMap<PeerKey, String>,
    results_tx: mpsc::Sender<DeliveryResult>,
    // Work to finish once the current batch is flushed.
    dirty: bool,
    /// Answers recorded that no flush covers yet. They are facts the peer made durable
    /// already (so their events go out at once); the next flush covers them, at the latest
    /// [`BOOKKEEPING_FLUSH`] later.
    unflushed: LazyFlush,
    /// Outgoing messages refused `TooEarly`, and since when (in memory: a restart gives
    /// them the full [`TOO_EARLY_LIMIT`] again).
    too_early: HashMap<(PeerKey, MsgId), Instant>,
    /// Peers whose running delivery got answers that could not be recorded (a full disk):
    /// the attempt ends as a failure, so the next one waits its backoff instead of sending
    /// the same envelopes again at once.
    unrecorded: HashMap<PeerKey, String>,
    after_flush: Vec<AfterFlush>,
    responses: Vec<(ResponseChannel<Vec<u8>>, Vec<u8>)>,
    pending_receipts: HashMap<PeerKey, Vec<MsgId>>,
    /// Running deliveries asking for the items after this id, answered at the end of a turn
    /// with what is durable by then.
    refills: Vec<(PeerKey, MsgId, oneshot::Sender<Vec<OutboxItem>>)>,
    /// Texts `send` accepted in this turn and not queued yet: (recipient, text, reply).
    pending_sends: Vec<(String, String, Reply<MsgId>)>,
    /// While a [`Request::DeliverReceipted`] is judged: the text messages it holds, for the
    /// receipt in the answer (instead of `pending_receipts`).
    piggyback: Option<Vec<MsgId>>,
    rejected: std::collections::BTreeMap<&'static str, u64>,
    /// Outgoing envelopes committed in the current batch, removed again if its flush fails
    /// (the sender was told it failed, so it must not go out later).
    undo: Vec<(PeerKey, MsgId, Option<u64>)>,
    /// Peers that could not decrypt envelopes of a running delivery: a new session starts
    /// when the attempt ends ([`Self::restart_session`]).
    restarts: HashSet<PeerKey>,
    /// Envelopes queued in the batch being flushed and in the current one: no delivery
    /// takes them before they are durable.
    not_durable: NotDurable,
    /// Sending-chain positions reserved ahead, by peer: envelopes they cover leave before
    /// their flush ([`reserve`]).
    reservations: Reservations,
    /// Envelopes that left before their flush since start (covered by a reservation).
    sent_before_flush: u64,
    /// Inbound envelopes already stored, answered again since start.
    duplicates: u64,
    /// The previous batch, while its flush runs (one at a time: the current batch gathers
    /// meanwhile and is flushed next).
    flushing: Option<Flushing>,
    /// This turn found nothing else waiting and no delivery running: its flush may run on
    /// the actor's own thread ([`Self::start_flush`]).
    idle_turn: bool,
    /// Set once shutdown began: turns only flush and answer, they start no deliveries.
    stopping: bool,
    /// While an inbound request's writes are grouped: the one-time prekeys as they were
    /// before the request used one, restored if the group's commit fails.
    group_prekeys: Option<Option<LocalPrekeys>>,
    /// Set while the last flush failed (for example a full disk): inbound envelopes are
    /// refused as `Unavailable` until a flush succeeds again.
    storage_failed: Option<String>,
    /// When the dedup set is next pruned.
    next_prune: Instant,
    /// Peers whose relays refused our token in the last attempt: the next one tries them
    /// directly even if presence shows them offline.
    try_direct: HashSet<PeerKey>,
    /// [`MessagingDb::resent`], in memory, by peer.
    resent: HashMap<PeerKey, HashSet<MsgId>>,
    /// Contacts that started a new session with us in this batch: the texts their relays
    /// hold go again under it ([`Self::resend_relay_held`]).
    resend_held: HashSet<PeerKey>,
    /// The earliest `relays_until` in `relay_held` (ms since the epoch): texts relays held
    /// are checked for a missing receipt from then on ([`Self::fail_relay_held_if_due`]).
    /// `None`: the table is empty.
    relay_held_due: Option<u64>,
    /// The peers with texts in `relay_held` (or that had some: a superset, made exact at
    /// each check), so a receipt from anyone else costs no lookup.
    relay_held_peers: HashSet<PeerKey>,
    /// When the check runs again after it could not read or write the store.
    relay_held_retry: Option<Instant>,
    /// When this actor started (ms since the epoch): no hold is judged ended before a grace
    /// after it, so receipts waiting in our own mailbox are fetched first.
    started_ms: u64,
    /// When every home relay is next synced (besides on connect and on notices).
    next_relay_sync: Instant,
    /// When owed key rotations run again after one failed ([`Self::settle_rekeys`]).
    rekey_retry: Option<Instant>,
    /// Marks of owed rotations done in the current batch: cleared once it is durable.
    settling: Vec<Vec<u8>>,
    /// Contacts that are message requests (auto-added, not yet accepted).
    message_requests: usize,
    /// Our dialable listen addresses, announced in our profile.
    my_addrs: Vec<Multiaddr>,
    /// Peer ids (and their text) of peer keys seen, since deriving one decompresses a
    /// curve point (a few microseconds on every delivery and receipt otherwise).
    peer_ids: std::cell::RefCell<HashMap<PeerKey, Option<(PeerId, String)>>>,
    /// Decoded current sessions by peer, valid while the stored bytes are the same (decoding
    /// a session costs more than using it).
    session_cache: std::cell::RefCell<HashMap<PeerKey, CachedSession>>,
    /// Where presence-key and contact changes are reported (the presence actor).
    presence_notes: Option<PresenceNotes>,
    /// Our mailbox capability (its hash is registered at our home relays).
    mailbox_token: tern_store_forward::MailboxToken,
    /// Home relays with a sync running, and those to sync again when it ends.
    syncing: std::collections::HashSet<PeerId>,
    sync_again: std::collections::HashSet<PeerId>,
    relay_pages_tx: mpsc::Sender<mailbox::RelayPage>,
    sync_done_tx: mpsc::Sender<(PeerId, bool)>,
    /// Last successful mailbox registration (ms since the epoch) per home relay.
    relay_registered: std::collections::BTreeMap<PeerId, u64>,
    mint_tx: mpsc::Sender<mailbox::MintRequest>,
    /// Contacts one of whose one-time prekeys is being claimed from their relays, for a
    /// new session ([`Self::claim_for_restart`]).
    claiming: HashSet<PeerKey>,
    /// Of those, the ones whose restart waits for the claim, with how their attempt ended:
    /// it stays open (in flight for the schedule) until the claim answers.
    restart_after_claim: HashMap<PeerKey, AttemptEnd>,
    claims_tx: mpsc::Sender<(PeerKey, Option<Vec<u8>>)>,
}

/// Starts the messaging actor. `inbound` receives `/tern/msg/1` requests from the network.
pub fn spawn(
    seed: &[u8; 32],
    db: MessagingDb,
    net: NetHandle,
    events: EventBus,
    io: MessagingIo,
    config: MessagingConfig,
    shutdown: CancellationToken,
) -> Result<(MessagingHandle, tokio::task::JoinHandle<()>), MessagingError> {
    let MessagingIo {
        inbound,
        mailbox_in,
        presence_notes,
    } = io;
    let mailbox_token = mailbox::load_or_create_token(&db.mailbox_self)?;
    let (relay_pages_tx, relay_pages) = mpsc::channel(4);
    let (sync_done_tx, sync_done) = mpsc::channel(16);
    let (mint_tx, mint) = mpsc::channel(4);
    let (claims_tx, claims) = mpsc::channel(16);
    let keys = IdentityKeys::from_seed(seed)?;
    let mut rng = StdRng::from_entropy();
    let prekeys = load_or_create_prekeys(&db, &mut rng)?;
    let moved = skip_reserved_positions(&db)?;
    if moved > 0 {
        tracing::info!(
            sessions = moved,
            "sending chains moved past the positions reserved before an unclean stop"
        );
    }
    let next_relay_sync = Instant::now() + config.relay_sync_interval;
    let message_requests = count_message_requests(&db)?;
    let (relay_held_due, relay_held_peers) = relay_held_summary(&db.relay_held.scan_prefix(&[])?);
    let mut resent: HashMap<PeerKey, HashSet<MsgId>> = HashMap::new();
    for (k, ()) in db.resent.scan_prefix(&[])? {
        if let Some((peer, id)) = split_peer_id_key(&k) {
            resent.entry(peer).or_default().insert(id);
        }
    }
    let my_addrs = config
        .listen_addrs
        .iter()
        .filter(|a| is_dialable(a))
        .cloned()
        .collect();
    let (tx, cmds) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let (results_tx, results) = mpsc::channel(256);
    let mut actor = Actor {
        me: *keys.public().ed25519(),
        keys,
        prekeys,
        schedule: Schedule::new(config.retry),
        config,
        db,
        net: net.clone(),
        events,
        ids: MsgIdGen::default(),
        rng,
        limits: HashMap::new(),
        last_error: HashMap::new(),
        results_tx,
        dirty: false,
        after_flush: Vec::new(),
        responses: Vec::new(),
        pending_receipts: HashMap::new(),
        pending_sends: Vec::new(),
        refills: Vec::new(),
        piggyback: None,
        rejected: Default::default(),
        undo: Vec::new(),
        restarts: HashSet::new(),
        not_durable: NotDurable::default(),
        reservations: Reservations::default(),
        sent_before_flush: 0,
        duplicates: 0,
        flushing: None,
        idle_turn: false,
        stopping: false,
        group_prekeys: None,
        storage_failed: None,
        next_prune: Instant::now(),
        try_direct: HashSet::new(),
        resent,
        resend_held: HashSet::new(),
        relay_held_due,
        relay_held_peers,
        relay_held_retry: None,
        started_ms: now_ms(),
        unflushed: LazyFlush::default(),
        too_early: HashMap::new(),
        unrecorded: HashMap::new(),
        next_relay_sync,
        rekey_retry: None,
        settling: Vec::new(),
        message_requests,
        my_addrs,
        peer_ids: Default::default(),
        session_cache: Default::default(),
        presence_notes,
        mailbox_token,
        syncing: Default::default(),
        sync_again: Default::default(),
        relay_pages_tx,
        sync_done_tx,
        relay_registered: Default::default(),
        mint_tx,
        claiming: HashSet::new(),
        restart_after_claim: HashMap::new(),
        claims_tx,
    };
    // Everything queued before a restart is due at once.
    let now = Instant::now();
    for peer in actor.db.outbox_peers()? {
        actor.schedule.enqueue(peer, now);
    }
    let net_events = net.net_events();
    let task = tokio::spawn(actor.run(
        Channels {
            cmds,
            inbound,
            results,
            net_events,
            mailbox_in,
            relay_pages,
            sync_done,
            mint,
            claims,
        },
        shutdown,
    ));
    Ok((MessagingHandle { tx }, task))
}

/// The node's prekeys, created (and flushed) on first use.
pub fn load_or_create_prekeys(
    db: &MessagingDb,
    rng: &mut StdRng,
) -> Result<LocalPrekeys, MessagingError> {
    match db.prekeys.get(b"local")? {
        Some(bytes) => Ok(LocalPrekeys::from_bytes(&bytes)?),
        None => {
            let p = LocalPrekeys::new(rng, now_ms() / 1000);
            db.prekeys.insert(b"local", &*p.to_bytes()?)?;
            db.store.flush_blocking()?;
            Ok(p)
        }
    }
}

/// After an unclean stop, envelopes sealed at reserved positions may have left while the
/// state that sealed them was lost: moves the sending chain of each session (the current one
/// and the previous ones, which can become current again) that is a reserved chain past its
/// reservation, and clears the reservations, durably, before anything new is sealed
/// ([`reserve`]). Returns how many sessions moved. A reservation whose sessions do not all
/// decode is kept (a session that does not decode cannot seal anything either).
pub fn skip_reserved_positions(db: &MessagingDb) -> Result<usize, MessagingError> {
    let reserved = db.send_reserved.scan_prefix(&[])?;
    if reserved.is_empty() {
        return Ok(0);
    }
    let mut done = Vec::new();
    let mut records = Vec::new();
    let mut moved = 0;
    for (key, reservation) in &reserved {
        let Some(mut record) = db.sessions.get(key)? else {
            done.push(key);
            continue;
        };
        let mut changed = false;
        let mut intact = true;
        for bytes in std::iter::once(&mut record.current).chain(record.previous.iter_mut()) {
            let skipped = Session::from_bytes(bytes)
                .and_then(|mut s| Ok((s.skip_sending_to(&reservation.position())?, s)));
            match skipped {
                Ok((true, session)) => {
                    *bytes = session.to_bytes()?.to_vec();
                    changed = true;
                    moved += 1;
                }
                Ok((false, _)) => {}
                Err(e) => {
                    intact = false;
                    tracing::warn!(error = %e, "a session with a reserved chain could not be moved on");
                }
            }
        }
        if intact {
            done.push(key);
        }
        if changed {
            records.push((key, record));
        }
    }
    db.store
        .transaction(&[&db.sessions, &db.send_reserved], |tx| {
            for key in &done {
                tx.remove(&db.send_reserved, key)?;
            }
            for (key, record) in &records {
                tx.insert(&db.sessions, key, record)?;
            }
            Ok(())
        })?;
    db.store.flush_blocking()?;
    Ok(moved)
}

/// Removes every stored reservation and flushes that (at a clean stop, after the last
/// flush). If this fails the next start moves the chains on, which is safe too.
async fn clear_reservations(db: MessagingDb) -> Result<(), MessagingError> {
    let keys: Vec<Vec<u8>> = db
        .send_reserved
        .scan_prefix(&[])?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    db.store.transaction(&[&db.send_reserved], |tx| {
        for k in &keys {
            tx.remove(&db.send_reserved, k)?;
        }
        Ok(())
    })?;
    match db.store.start_flush().await {
        Ok(r) => Ok(r?),
        Err(e) => Err(MessagingError::NotDurable(format!(
            "flush task failed: {e}"
        ))),
    }
}

/// Our signed prekey bundle (no one-time prekey), encoded, for a contact ticket.
pub fn local_bundle(seed: &[u8; 32], db: &MessagingDb) -> Result<Vec<u8>, MessagingError> {
    let keys = IdentityKeys::from_seed(seed)?;
    let prekeys = load_or_create_prekeys(db, &mut StdRng::from_entropy())?;
    Ok(prekeys.bundle(&keys, None)?.to_bytes())
}

/// What a `send` caller is told if its message's flush fails: withdrawn, and, if it was due
/// before the flush ([`reserve`]), that it may have left all the same.
fn text_flush_failed(early: bool) -> fn(String) -> MessagingError {
    if early {
        MessagingError::NotDurableLeft
    } else {
        MessagingError::NotDurable
    }
}

/// The libp2p peer id of an ed25519 key.
pub fn peer_id_of_key(key: &PeerKey) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(key).ok()?;
    Some(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

impl Actor {
    async fn run(mut self, channels: Channels, shutdown: CancellationToken) {
        let Channels {
            mut cmds,
            mut inbound,
            mut results,
            mut net_events,
            mut mailbox_in,
            mut relay_pages,
            mut sync_done,
            mut mint,
            mut claims,
        } = channels;
        self.reconnect_contacts();
        self.settle_rekeys();
        // A home relay may have connected before this task subscribed to network events:
        // sync with each now (a sync dials if needed; a later connection syncs again).
        for (relay, _) in self.home_relay_peers() {
            self.sync_relay(relay);
        }
        // Starts the due deliveries, and flushes what the start wrote (an owed rotation).
        self.finish_batch();
        loop {
            let wake = self
                .schedule
                .next_due()
                .map_or(self.next_relay_sync, |due| due.min(self.next_relay_sync))
                .min(self.rekey_retry.unwrap_or(self.next_relay_sync))
                .min(Instant::now() + Duration::from_secs(3600));
            // While a flush runs, its end starts the next one: no earlier wake-up for it.
            let wake = match (&self.flushing, self.unflushed.deadline()) {
                (None, Some(due)) => wake.min(due),
                _ => wake,
            };
            // Writes waiting for disk space are tried again then (the idle branch below).
            let wake = match self.db.store.apply_retry_at() {
                Some(retry) => wake.min(retry),
                None => wake,
            };
            let wake = match self.relay_held_check_at() {
                Some(check) => wake.min(check),
                None => wake,
            };
            let wake = tokio::time::Instant::from_std(wake);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(flushed) = async {
                    match self.flushing.as_mut() {
                        Some(f) => Some((&mut f.task).await),
                        None => None,
                    }
                }, if self.flushing.is_some() => self.flush_done(flushed).await,
                Some(cmd) = cmds.recv() => self.handle_command(cmd),
                Some(req) = inbound.recv() => self.handle_inbound(req),
                Some(res) = results.recv() => self.handle_delivery_result(res),
                ev = net_events.recv() => self.handle_net_event(ev),
                Some(req) = mailbox_in.recv() => self.handle_mailbox_request(req),
                Some(page) = relay_pages.recv() => self.handle_relay_page(page),
                Some((relay, registered)) = sync_done.recv() => self.sync_finished(relay, registered),
                Some(req) = mint.recv() => self.mint_prekeys(req),
                Some((peer, bundle)) = claims.recv() => self.claim_done(peer, bundle),
                // Nothing else to do: the writes journaled in the last turns go into sled
                // now, after their answers and events went out, once their flush ended (sled
                // never holds what the journal might lose). Yielding first lets the tasks
                // this turn woke (a delivery, the network task with an answer) run before it.
                () = tokio::task::yield_now(), if self.db.store.has_durable_pending() => {
                    if let Err(e) = self.db.store.apply_pending() {
                        tracing::error!(error = %e, "could not apply journaled writes");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            // Drain what else is ready, so one flush covers the whole batch.
            let mut quiet = false;
            for _ in 0..BATCH_LIMIT {
                if let Ok(req) = inbound.try_recv() {
                    self.handle_inbound(req);
                } else if let Ok(cmd) = cmds.try_recv() {
                    self.handle_command(cmd);
                } else if let Ok(res) = results.try_recv() {
                    self.handle_delivery_result(res);
                } else {
                    quiet = true;
                    break;
                }
            }
            self.idle_turn = quiet && !self.schedule.any_in_flight();
            self.finish_batch();
            self.idle_turn = false;
        }
        // Answer what is pending so callers are not left hanging (and flush everything);
        // start nothing new.
        self.stopping = true;
        self.dirty |= self.unflushed.deadline().is_some();
        loop {
            if let Some(f) = self.flushing.as_mut() {
                let flushed = (&mut f.task).await;
                self.flush_done(flushed).await;
            } else {
                self.finish_batch();
                if self.flushing.is_none() {
                    break;
                }
            }
        }
        // Every sealed envelope's state is durable now: the next start skips nothing.
        if self.storage_failed.is_none()
            && let Err(e) = clear_reservations(self.db.clone()).await
        {
            tracing::warn!(error = %e, "could not clear the reserved chain positions");
        }
        tracing::debug!("messaging task stopped");
    }

    /// Ends an actor turn: queues what waits to be queued, starts due deliveries with what
    /// is durable, and starts the flush of this batch unless one runs already.
    fn finish_batch(&mut self) {
        self.queue_pending_sends();
        let receipts: Vec<(PeerKey, Vec<MsgId>)> = self.pending_receipts.drain().collect();
        for (peer, ids) in receipts {
            if let Err(e) = self.queue(peer, receipt_contents(ReceiptKind::Delivered, &ids)) {
                tracing::warn!(error = %e, "could not queue delivered receipts");
            }
        }
        if !self.stopping {
            self.prune_seen_if_due();
            for peer in std::mem::take(&mut self.resend_held) {
                self.resend_relay_held(peer);
            }
            self.fail_relay_held_if_due();
            self.sync_relays_if_due();
            self.settle_rekeys_if_due();
            self.start_deliveries();
            self.answer_refills();
        }
        self.start_flush();
    }

    /// Starts flushing the current batch, if it needs it and no flush runs. What the batch
    /// owes (answers to peers, replies, events, its undo list) moves with it and is released
    /// when its flush ends ([`Self::flush_done`]); the actor goes on with the next batch
    /// meanwhile. In an idle turn (nothing else waiting, no delivery running, no checkpoint
    /// due) the flush runs on the actor's thread instead ([`flush_in_place`]) and is over
    /// when this returns: there is nothing to overlap it with, and the two thread hand-offs
    /// cost a lone message more than they save.
    fn start_flush(&mut self) {
        if self.flushing.is_some() {
            return;
        }
        // Idle: nothing else waits (the turn drained every channel), no delivery runs (this
        // turn may have started one), and no checkpoint is due (it takes far longer).
        let inline = std::mem::take(&mut self.idle_turn)
            && !self.schedule.any_in_flight()
            && !self.db.store.checkpoint_due()
            && can_block_in_place();
        let needed = self.dirty
            || self.unflushed.due(Instant::now())
            || !self.after_flush.is_empty()
            || !self.responses.is_empty();
        if !needed {
            return;
        }
        self.dirty = false;
        self.not_durable.flush_started();
        self.reservations.flush_started();
        let task: FlushTask = if inline {
            let store = self.db.store.clone();
            let done = flush_in_place(|| store.flush_blocking());
            Box::pin(std::future::ready(Ok(done)))
        } else {
            let task = self.db.store.start_flush();
            Box::pin(task)
        };
        self.flushing = Some(Flushing {
            task,
            after_flush: std::mem::take(&mut self.after_flush),
            responses: std::mem::take(&mut self.responses),
            undo: std::mem::take(&mut self.undo),
            settled: std::mem::take(&mut self.settling),
            recorded: self.unflushed.flush_started(),
        });
    }

    /// The running flush ended: answers peers, makes the batch's envelopes deliverable and
    /// starts their deliveries, then answers callers and publishes events (or, if it failed,
    /// withdraws the batch's outgoing envelopes and answers errors), and ends the turn.
    async fn flush_done(&mut self, flushed: Result<Result<(), StoreError>, JoinError>) {
        let Some(batch) = self.flushing.take() else {
            return;
        };
        let result = match flushed {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("flush task failed: {e}")),
        };
        let durable = self.not_durable.flush_done(result.is_ok());
        self.reservations.flush_done(result.is_ok());
        match &result {
            Ok(()) => {
                if self.storage_failed.take().is_some() {
                    tracing::info!("storage works again");
                }
                self.rekeys_durable(&batch.settled);
            }
            Err(e) => {
                tracing::error!(error = %e, "flush failed; nothing is acknowledged");
                self.undo_batch(&batch.undo);
                if !batch.settled.is_empty() {
                    // Not durable: the rotation stays owed (a failed flush usually leaves
                    // the store broken for this run; then it runs at the next start).
                    self.rekey_retry = Some(Instant::now() + REKEY_RETRY);
                }
                self.storage_failed = Some(e.clone());
                self.unflushed.failed(batch.recorded, Instant::now());
            }
        }
        // Peers first (they wait on the network), then new deliveries, then callers and
        // events.
        if result.is_ok() {
            for (channel, bytes) in batch.responses {
                if self.net.respond(channel, bytes).await.is_err() {
                    break;
                }
            }
        }
        let now = Instant::now();
        for peer in durable {
            self.schedule.enqueue(peer, now);
        }
        // The envelopes made durable go out before callers and events are told: the new
        // deliveries get to run first.
        if !self.stopping && self.start_deliveries() {
            tokio::task::yield_now().await;
        }
        if !self.stopping {
            self.answer_refills();
        }
        for f in batch.after_flush {
            f(result.clone());
        }
        self.finish_batch();
    }

    /// Answers the running deliveries that asked for more items. One whose next items are
    /// still being made durable waits for the flush that does it.
    fn answer_refills(&mut self) {
        for (peer, after, reply) in std::mem::take(&mut self.refills) {
            let items = self.more_items(&peer, &after);
            if items.is_empty() && self.not_durable.first(&peer).is_some() {
                self.refills.push((peer, after, reply));
            } else {
                let _ = reply.send(items);
            }
        }
    }

    /// The rotations owed for `marks` are durable: the marks go (with the next flush).
    fn rekeys_durable(&mut self, marks: &[Vec<u8>]) {
        for k in marks {
            if let Err(e) = self.db.rekey_owed.remove(k) {
                tracing::warn!(error = %e, "could not clear an owed key rotation; it runs again");
                self.rekey_retry = Some(Instant::now() + REKEY_RETRY);
            }
        }
        self.dirty |= !marks.is_empty();
    }

    /// Removes what this batch queued for sending: its flush failed and the callers were
    /// told so.
    fn undo_batch(&mut self, undo: &[(PeerKey, MsgId, Option<u64>)]) {
        let db = &self.db;
        let r = db
            .store
            .transaction(&[&db.outbox, &db.history, &db.index], |tx| {
                for (peer, id, ts) in undo {
                    tx.remove(&db.outbox, &peer_id_key(peer, id))?;
                    if let Some(ts) = ts {
                        tx.remove(&db.history, &history_key(peer, *ts, id))?;
                        tx.remove(&db.index, &peer_id_key(peer, id))?;
                    }
                }
                Ok(())
            });
        match r {
            // Made durable by the next flush (until then the envelopes stay held back).
            Ok(()) => self.dirty |= !undo.is_empty(),
            Err(e) => tracing::error!(error = %e, "could not withdraw the failed batch"),
        }
    }

    fn handle_command(&mut self, cmd: Cmd) {
        // Texts wait to be queued together, but never past another command (which could
        // change what they depend on: a contact, a block).
        if !matches!(cmd, Cmd::Send { .. }) {
            self.queue_pending_sends();
        }
        match cmd {
            Cmd::ContactAdd {
                ticket,
                name,
                claimed,
                reply,
            } => {
                let r = self.contact_add(&ticket, name, claimed);
                self.recount_message_requests();
                self.reply_after_flush(reply, r);
            }
            Cmd::ContactList { reply } => {
                let own = self.keys.public().clone();
                let r = self
                    .db
                    .contact_list()
                    .map(|l| l.iter().map(|c| c.view(&own)).collect())
                    .map_err(Into::into);
                let _ = reply.send(r);
            }
            Cmd::ContactShow { name, reply } => {
                let own = self.keys.public().clone();
                let _ = reply.send(self.contact(&name).map(|c| c.view(&own)));
            }
            Cmd::ContactRemove { name, reply } => {
                let r = self.contact_remove(&name);
                self.recount_message_requests();
                self.reply_after_flush(reply, r);
            }
            Cmd::ContactBlock {
                name,
                blocked,
                reply,
            } => {
                let r = self.contact_block(&name, blocked);
                self.recount_message_requests();
                self.reply_after_flush(reply, r);
            }
            Cmd::BlockedList { reply } => {
                let _ = reply.send(self.blocked_list());
            }
            Cmd::PeerUnblock { peer, reply } => {
                let r = self.peer_unblock(&peer);
                self.reply_after_flush(reply, r);
            }
            Cmd::Send { to, text, reply } => self.pending_sends.push((to, text, reply)),
            Cmd::History { with, limit, reply } => {
                let _ = reply.send(self.history(&with, limit));
            }
            Cmd::Conversations { reply } => {
                let _ = reply.send(self.conversations());
            }
            Cmd::MarkRead { with, reply } => {
                let r = self.mark_read(&with);
                self.reply_after_flush(reply, r);
            }
            Cmd::Typing { to, typing, reply } => self.typing(&to, typing, reply),
            Cmd::Stats { reply } => {
                let rejected = self
                    .rejected
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), *v))
                    .collect();
                let relay_registrations = self.relay_registered.clone();
                let sent_before_flush = self.sent_before_flush;
                let duplicates = self.duplicates;
                // Counting walks the whole outbox: not on this task, which would stall
                // every delivery meanwhile.
                let outbox = self.db.outbox.clone();
                tokio::task::spawn_blocking(move || {
                    let stats = outbox.len().map(|n| MessagingStats {
                        outbox: n as u64,
                        rejected,
                        relay_registrations,
                        sent_before_flush,
                        duplicates,
                    });
                    let _ = reply.send(stats.map_err(Into::into));
                });
            }
            Cmd::MailboxToken { reply } => {
                let _ = reply.send(Ok(*self.mailbox_token.expose_bytes()));
            }
            Cmd::PresenceSetup { share, reply } => {
                let r = self.presence_setup(share);
                self.reply_after_flush(reply, r);
            }
            Cmd::Bundle { reply } => {
                let r = self
                    .prekeys
                    .bundle(&self.keys, None)
                    .map(|b| b.to_bytes())
                    .map_err(Into::into);
                let _ = reply.send(r);
            }
        }
    }

    /// Replies once the batch is flushed (or at once with the error).
    fn reply_after_flush<T: Send + 'static>(
        &mut self,
        reply: Reply<T>,
        result: Result<T, MessagingError>,
    ) {
        match result {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(v) => self.reply_once_flushed(reply, v, MessagingError::NotDurable),
        }
    }

    /// Answers `v` once the current batch is flushed, or `failed` with the flush's error.
    fn reply_once_flushed<T: Send + 'static>(
        &mut self,
        reply: Reply<T>,
        v: T,
        failed: fn(String) -> MessagingError,
    ) {
        self.dirty = true;
        self.after_flush.push(Box::new(move |flushed| {
            let _ = reply.send(flushed.map(|()| v).map_err(failed));
        }));
    }

    /// The contact named `name`, typed in any Unicode form: names are stored in NFC, and
    /// ones stored before that may be in any form.
    fn contact(&self, name: &str) -> Result<Contact, MessagingError> {
        let key = match self.db.names.get(name.as_bytes())? {
            Some(key) => Some(key),
            None => {
                let want = normalize_name(name);
                self.find_name(|stored| normalize_name(stored) == want)?
            }
        };
        key.map(|k| self.db.contacts.get(&k))
            .transpose()?
            .flatten()
            .ok_or_else(|| MessagingError::UnknownContact(name.to_string()))
    }

    /// The key of the first contact whose stored name `matches` (a scan of every name: for
    /// when the exact lookup missed).
    fn find_name(&self, matches: impl Fn(&str) -> bool) -> Result<Option<PeerKey>, MessagingError> {
        Ok(self
            .db
            .names
            .scan_prefix(&[])?
            .into_iter()
            .find(|(k, _)| matches(&String::from_utf8_lossy(k)))
            .map(|(_, key)| key))
    }

    fn contact_add(
        &mut self,
        ticket: &str,
        name: String,
        claimed: Option<Vec<u8>>,
    ) -> Result<ContactView, MessagingError> {
        let name = normalize_name(&name);
        validate_name(&name).map_err(MessagingError::InvalidName)?;
        let ticket = ContactTicket::decode(ticket)
            .map_err(|e| MessagingError::InvalidTicket(e.to_string()))?;
        let key = ed25519_public_of(&ticket.peer_id)
            .ok_or_else(|| {
                MessagingError::InvalidTicket("the peer id is not an ed25519 key".into())
            })?
            .to_bytes();
        if key == self.me {
            return Err(MessagingError::InvalidTicket(
                "that is your own ticket".into(),
            ));
        }
        let bundle_bytes = ticket.bundle.clone().ok_or_else(|| {
            MessagingError::InvalidTicket(
                "it carries no prekey bundle (made by an older Tern?)".into(),
            )
        })?;
        let bundle = PrekeyBundle::from_bytes(&bundle_bytes)
            .map_err(|e| MessagingError::InvalidTicket(format!("bad prekey bundle: {e}")))?;
        bundle.verify().map_err(|e| {
            MessagingError::InvalidTicket(format!("prekey bundle does not verify: {e}"))
        })?;
        if bundle.identity().ed25519() != &key {
            return Err(MessagingError::InvalidTicket(
                "the prekey bundle belongs to another identity than the peer id".into(),
            ));
        }
        if let Some(existing) = self.db.contacts.get(&key)? {
            if existing.auto_added {
                // A message request becomes a real contact: rename and keep the bundle.
                let mut c = existing.clone();
                if self.name_owner(&name)?.is_some_and(|owner| owner != key) {
                    return Err(MessagingError::NameTaken(name));
                }
                let old_name = c.name.clone();
                c.name = name;
                c.auto_added = false;
                c.bundle = Some(bundle_bytes);
                merge_addrs(&mut c.addrs, &ticket.addrs);
                self.db
                    .store
                    .transaction(&[&self.db.contacts, &self.db.names], |tx| {
                        tx.remove(&self.db.names, old_name.as_bytes())?;
                        tx.insert(&self.db.names, c.name.as_bytes(), &key)?;
                        tx.insert(&self.db.contacts, &key, &c)?;
                        Ok(())
                    })?;
                self.store_contact_mailbox(&key, &ticket)?;
                self.store_claimed(&key, claimed, false)?;
                self.presence_contact_added(&c)?;
                self.mailbox_contact_added(&c)?;
                return Ok(c.view(self.keys.public()));
            }
            return Err(MessagingError::AlreadyContact(existing.name));
        }
        if self.name_owner(&name)?.is_some() {
            return Err(MessagingError::NameTaken(name));
        }
        // A peer blocked and then removed comes back blocked (unblocking is explicit).
        let blocked = self.db.blocked_peers.contains(&key)?;
        let contact = Contact {
            name,
            peer_id: ticket.peer_id,
            identity: bundle.identity().clone(),
            bundle: Some(bundle_bytes),
            addrs: ticket.addrs.clone(),
            blocked,
            auto_added: false,
            announced_name: ticket.name.clone(),
            added_at: now_ms(),
        };
        let db = &self.db;
        db.store.transaction(
            &[&db.contacts, &db.names, &db.former_names, &db.blocked_peers],
            |tx| {
                tx.insert(&db.names, contact.name.as_bytes(), &key)?;
                tx.insert(&db.contacts, &key, &contact)?;
                tx.remove(&db.former_names, &key)?;
                tx.remove(&db.blocked_peers, &key)?;
                Ok(())
            },
        )?;
        self.publish_after_flush(EventKind::ContactAdded {
            name: contact.name.clone(),
            peer_id: contact.peer_id.to_string(),
            auto_added: false,
        });
        self.store_contact_mailbox(&key, &ticket)?;
        self.store_claimed(&key, claimed, false)?;
        self.presence_contact_added(&contact)?;
        self.mailbox_contact_added(&contact)?;
        Ok(contact.view(self.keys.public()))
    }

    fn contact_remove(&mut self, name: &str) -> Result<(), MessagingError> {
        let c = self.contact(name)?;
        let key = c.key();
        let queued = self.db.outbox.scan_prefix(&key)?;
        let unread = self.db.unread.scan_prefix(&key)?;
        let held = self.db.relay_held.scan_prefix(&key)?;
        let db = &self.db;
        let held_failed = db.store.transaction(
            &[
                &db.contacts,
                &db.names,
                &db.sessions,
                &db.outbox,
                &db.history,
                &db.index,
                &db.unread,
                &db.rekey_owed,
                &db.contact_mailbox,
                &db.former_names,
                &db.blocked_peers,
                &db.relay_held,
                &db.claimed_prekeys,
            ],
            |tx| {
                // The name it announced, for a message request it may start later (only a
                // valid one; none clears an older one).
                match c.announced_name.as_deref().map(normalize_name) {
                    Some(n) if validate_name(&n).is_ok() => {
                        tx.insert(&db.former_names, &key, &n)?
                    }
                    _ => {
                        tx.remove(&db.former_names, &key)?;
                    }
                }
                // Removed, a blocked contact stays blocked: the block would go with the
                // record, and its node would start a new session with us as a stranger.
                if c.blocked {
                    tx.insert(&db.blocked_peers, &key, &())?;
                }
                // The keys it held are replaced next, until that has run to the end (a
                // rotation still owed from a block stays owed).
                let owed = tx.get(&db.rekey_owed, &key)?.unwrap_or(false);
                tx.insert(
                    &db.rekey_owed,
                    &key,
                    &(owed || presence_share::eligible(&c)),
                )?;
                tx.remove(&db.contact_mailbox, mailbox::key(&key))?;
                tx.remove(&db.claimed_prekeys, mailbox::key(&key))?;
                tx.remove(&db.contacts, &key)?;
                tx.remove(&db.names, c.name.as_bytes())?;
                tx.remove(&db.sessions, &key)?;
                for (k, _) in &unread {
                    tx.remove(&db.unread, k)?;
                }
                for (k, item) in &queued {
                    tx.remove(&db.outbox, k)?;
                    if item.kind == OutKind::Text {
                        set_state(
                            tx,
                            db,
                            &key,
                            &item.id,
                            MsgState::Failed("contact removed".into()),
                        )?;
                    }
                }
                // Texts its relays hold: no receipt for them could be decrypted any more.
                let mut failed = Vec::new();
                for (k, _) in &held {
                    tx.remove(&db.relay_held, k)?;
                    if let Some((_, id)) = split_peer_id_key(k)
                        && set_state(
                            tx,
                            db,
                            &key,
                            &id,
                            MsgState::Failed(REMOVED_WHILE_HELD.into()),
                        )?
                        .is_some()
                    {
                        failed.push(id);
                    }
                }
                Ok(failed)
            },
        )?;
        self.schedule.done(&key);
        self.restarts.remove(&key);
        self.restart_after_claim.remove(&key);
        self.relay_held_peers.remove(&key);
        self.session_cache.borrow_mut().remove(&key);
        self.rekey_owed_again(&key);
        self.settle_rekeys();
        let texts = queued
            .iter()
            .filter(|(_, i)| i.kind == OutKind::Text)
            .map(|(_, i)| (i.id, "contact removed"));
        let held = held_failed.into_iter().map(|id| (id, REMOVED_WHILE_HELD));
        for (id, reason) in texts.chain(held) {
            self.publish_after_flush(EventKind::MessageFailed {
                id: id.to_hex(),
                peer_id: c.peer_id.to_string(),
                to: c.name.clone(),
                reason: reason.into(),
            });
        }
        Ok(())
    }

    fn blocked_list(&self) -> Result<Vec<BlockedPeer>, MessagingError> {
        let mut list: Vec<BlockedPeer> = self
            .db
            .contact_list()?
            .into_iter()
            .filter(|c| c.blocked)
            .map(|c| BlockedPeer {
                peer_id: c.peer_id.to_string(),
                name: Some(c.name),
                contact: true,
            })
            .collect();
        for (key, ()) in self.db.blocked_peers.scan_prefix(&[])? {
            let Some(peer_id) = PeerKey::try_from(key.as_slice())
                .ok()
                .and_then(|k| peer_id_of_key(&k))
            else {
                continue;
            };
            list.push(BlockedPeer {
                peer_id: peer_id.to_string(),
                name: self.db.former_names.get(&key)?,
                contact: false,
            });
        }
        Ok(list)
    }

    fn peer_unblock(&mut self, peer: &PeerId) -> Result<(), MessagingError> {
        let unknown = || MessagingError::NotBlocked(peer.to_string());
        let key = ed25519_key_bytes_of(peer).ok_or_else(unknown)?;
        if let Some(c) = self.db.contacts.get(&key)? {
            return Err(MessagingError::StillContact(c.name));
        }
        if !self.db.blocked_peers.remove(&key)? {
            return Err(unknown());
        }
        self.dirty = true;
        tracing::info!(peer = %crate::net::short(peer), "a removed contact is no longer blocked");
        Ok(())
    }

    fn contact_block(&mut self, name: &str, blocked: bool) -> Result<ContactView, MessagingError> {
        let mut c = self.contact(name)?;
        let was_eligible = presence_share::eligible(&c);
        let was_blocked = c.blocked;
        let key = c.key();
        c.blocked = blocked;
        let db = &self.db;
        db.store
            .transaction(&[&db.contacts, &db.rekey_owed], |tx| {
                tx.insert(&db.contacts, &key, &c)?;
                // Blocked, the keys it held are replaced next, until that has run to the
                // end. (A rotation still owed when it is unblocked runs, it included.)
                if blocked {
                    let owed = tx.get(&db.rekey_owed, &key)?.unwrap_or(false);
                    tx.insert(&db.rekey_owed, &key, &(owed || was_eligible))?;
                }
                Ok(())
            })?;
        self.dirty = true;
        if blocked {
            self.restarts.remove(&key);
            // An attempt held open for a claimed prekey ends: nothing goes to it now.
            if self.restart_after_claim.remove(&key).is_some() {
                self.unrecorded.remove(&key);
                let r = self.rng.next_u32();
                self.schedule.failed(&key, Instant::now(), r);
            }
            self.rekey_owed_again(&key);
            self.settle_rekeys();
        }
        if !blocked {
            // Also for a contact that was not blocked: our current keys again (unblocking
            // is how a user repairs a contact that lacks them).
            self.presence_contact_added(&c)?;
            self.mailbox_contact_added(&c)?;
        }
        // Something for it to receive, also when it shares in none of our keys: its node
        // retries what it queued for us as soon as it hears from us. Not to a message
        // request (a stranger learns nothing of us by being unblocked), nor without a
        // session (its node then has nothing queued for us under one).
        if was_blocked
            && !blocked
            && !c.auto_added
            && matches!(self.db.sessions.get(&key), Ok(Some(_)))
            && let Err(e) = self.queue(key, vec![(self.profile_content(), OutKind::Profile)])
        {
            tracing::warn!(error = %e, "could not queue our profile for an unblocked contact");
        }
        if !blocked && !self.db.outbox.scan_prefix_first(&c.key(), 1)?.is_empty() {
            self.schedule.enqueue(c.key(), Instant::now());
            self.schedule.reachable(&c.key(), Instant::now());
        }
        if blocked && let Some(peer) = peer_id_of_key(&c.key()) {
            let net = self.net.clone();
            tokio::spawn(async move {
                let _ = net.disconnect(peer).await;
            });
        }
        Ok(c.view(self.keys.public()))
    }

    /// Runs the key rotation owed for contacts blocked or removed
    /// ([`MessagingDb::rekey_owed`]): one rotation of our presence key and mailbox token
    /// covers every mark, the new keys going to the contacts eligible now (so also to one
    /// unblocked or added again since). The marks go once the rotation's writes are durable
    /// ([`Self::flush_done`]). A rotation that fails part-way (a full disk), or whose flush
    /// fails, stays owed and runs again [`REKEY_RETRY`] later, and at every start.
    fn settle_rekeys(&mut self) {
        let r = (|| -> Result<(), MessagingError> {
            let settled = self.flushing.as_ref().map(|f| &f.settled);
            let owed: Vec<(Vec<u8>, bool)> = self
                .db
                .rekey_owed
                .scan_prefix(&[])?
                .into_iter()
                .filter(|(k, _)| {
                    !self.settling.contains(k) && !settled.is_some_and(|s| s.contains(k))
                })
                .collect();
            if owed.is_empty() {
                return Ok(());
            }
            let held = owed.iter().any(|(_, held)| *held);
            self.mailbox_contact_dropped(held)?;
            self.presence_contact_dropped(held)?;
            self.settling.extend(owed.into_iter().map(|(k, _)| k));
            self.dirty = true;
            Ok(())
        })();
        self.rekey_retry = match r {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "could not replace the keys a blocked or removed contact held; trying again"
                );
                Some(Instant::now() + REKEY_RETRY)
            }
        };
    }

    /// A new rotation is owed for `key` (blocked or removed again): one that covered it and
    /// is not durable yet no longer clears its mark.
    fn rekey_owed_again(&mut self, key: &PeerKey) {
        self.settling.retain(|k| k.as_slice() != key);
        if let Some(f) = self.flushing.as_mut() {
            f.settled.retain(|k| k.as_slice() != key);
        }
    }

    /// [`Self::settle_rekeys`] once its retry is due, unless the store failed a flush
    /// (then it runs at the next start; a write refused for disk space is retried).
    fn settle_rekeys_if_due(&mut self) {
        if self.storage_failed.is_none() && self.rekey_retry.is_some_and(|at| at <= Instant::now())
        {
            self.settle_rekeys();
        }
    }

    /// Remembers the relays and token a contact's ticket named, for deposits.
    fn store_contact_mailbox(
        &mut self,
        key: &PeerKey,
        ticket: &ContactTicket,
    ) -> Result<(), MessagingError> {
        if let Some(token) = ticket.mailbox_token
            && !ticket.relays.is_empty()
        {
            let mb = mailbox::ContactMailbox {
                relays: ticket.relays.iter().map(|a| a.to_vec()).collect(),
                token,
            };
            self.db.contact_mailbox.insert(mailbox::key(key), &mb)?;
            self.dirty = true;
        }
        Ok(())
    }

    /// Queues the texts `send` accepted in this turn: those to one recipient in one
    /// transaction (one session write and one journal record for all), in the order they
    /// were sent. Each caller is answered after the flush. If that transaction fails, each
    /// text is queued alone, so every caller gets its own answer.
    fn queue_pending_sends(&mut self) {
        type Texts = Vec<(String, Reply<MsgId>)>;
        let mut groups: Vec<(String, Texts)> = Vec::new();
        for (to, text, reply) in std::mem::take(&mut self.pending_sends) {
            match groups.iter_mut().find(|(name, _)| *name == to) {
                Some((_, texts)) => texts.push((text, reply)),
                None => groups.push((to, vec![(text, reply)])),
            }
        }
        for (to, texts) in groups {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            // One lookup for the group; each text is still checked on its own.
            let contact = self.contact(&to).ok().filter(|c| !c.blocked);
            for (text, reply) in texts {
                let checked = match &contact {
                    Some(c) => check_text(&text).map(|()| c.key()),
                    None => self.check_send(&to, &text),
                };
                match checked {
                    Ok(peer) => {
                        bytes += text.len();
                        chunk.push((peer, text, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
                if chunk.len() >= SEND_CHUNK_TEXTS || bytes >= SEND_CHUNK_BYTES {
                    self.queue_texts(std::mem::take(&mut chunk));
                    bytes = 0;
                }
            }
            self.queue_texts(chunk);
        }
    }

    /// Queues `texts` (all to one peer) in one transaction; see [`Self::queue_pending_sends`].
    fn queue_texts(&mut self, mut texts: Vec<(PeerKey, String, Reply<MsgId>)>) {
        let Some(&(peer, ..)) = texts.first() else {
            return;
        };
        let sent_at = now_ms();
        let contents = texts
            .iter()
            .map(|(_, text, _)| {
                let text = text.clone();
                (Content::Text { text, sent_at }, OutKind::Text)
            })
            .collect();
        match self.queue_with(peer, contents, true) {
            Ok((ids, early)) => {
                // A new session queues its profile first: the texts' ids are the last.
                let ids = &ids[ids.len().saturating_sub(texts.len())..];
                for ((_, _, reply), id) in texts.into_iter().zip(ids) {
                    self.reply_once_flushed(reply, *id, text_flush_failed(early));
                }
            }
            Err(e) if texts.len() == 1 => {
                if let Some((_, _, reply)) = texts.pop() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(_) => {
                for (peer, text, reply) in texts {
                    let text = vec![(Content::Text { text, sent_at }, OutKind::Text)];
                    let r = self.queue_with(peer, text, true).and_then(|(ids, early)| {
                        Ok((ids.last().copied().ok_or(MessagingError::Empty)?, early))
                    });
                    match r {
                        Ok((id, early)) => {
                            self.reply_once_flushed(reply, id, text_flush_failed(early))
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
    }

    /// Whether `text` may be sent to the contact named `to`; its key if so.
    fn check_send(&self, to: &str, text: &str) -> Result<PeerKey, MessagingError> {
        check_text(text)?;
        let c = self.contact(to)?;
        if c.blocked {
            return Err(MessagingError::Blocked(c.name));
        }
        Ok(c.key())
    }

    /// Encrypts `contents` for `peer` (starting a session if needed, then announcing our
    /// profile first), and commits session + outbox + history in one transaction.
    fn queue(
        &mut self,
        peer: PeerKey,
        contents: Vec<(Content, OutKind)>,
    ) -> Result<Vec<MsgId>, MessagingError> {
        Ok(self.queue_with(peer, contents, false)?.0)
    }

    /// [`Self::queue`]; if `may_leave_early`, the envelopes leave before their flush when
    /// a durable reservation covers their chain positions (only texts do: their callers are
    /// told if one was withdrawn after it may have left). Also returns whether they do.
    fn queue_with(
        &mut self,
        peer: PeerKey,
        contents: Vec<(Content, OutKind)>,
        may_leave_early: bool,
    ) -> Result<(Vec<MsgId>, bool), MessagingError> {
        let contents = contents.into_iter().map(|(c, k)| (c, k, None)).collect();
        self.queue_in(peer, contents, may_leave_early, None)
    }

    /// [`Self::queue_with`], where a content may be a text queued again under its own id
    /// ([`Again`]; its history entry stays as it is). With `restart`, a new session is
    /// started even if one exists (the old one is kept to decrypt what is on its way), and
    /// the outbox items `restart` names are dropped in the same transaction. Nothing of a
    /// restart is withdrawn if its flush fails: what it replaces was accepted before.
    fn queue_in(
        &mut self,
        peer: PeerKey,
        contents: Vec<(Content, OutKind, Option<Again>)>,
        may_leave_early: bool,
        restart: Option<&[MsgId]>,
    ) -> Result<(Vec<MsgId>, bool), MessagingError> {
        let contact = self.db.contacts.get(&peer)?;
        let record = self.db.sessions.get(&peer)?;
        let mut contents = contents;
        // A one-time prekey claimed from the contact's relay, used once, for the first session.
        let mut used_claimed = false;
        let (mut session, mut previous) = match record {
            Some(mut r) if restart.is_none() => (
                self.cached_session(&peer, &r.current)?,
                std::mem::take(&mut r.previous),
            ),
            old => {
                let c = contact
                    .as_ref()
                    .ok_or_else(|| MessagingError::UnknownContact(hex_short(&peer)))?;
                let claimed = self.db.claimed_prekeys.get(mailbox::key(&peer))?;
                used_claimed = claimed.is_some();
                let bundle_bytes = match &claimed {
                    Some(b) => b,
                    None => c
                        .bundle
                        .as_ref()
                        .ok_or_else(|| MessagingError::NoSession(c.name.clone()))?,
                };
                let bundle = PrekeyBundle::from_bytes(bundle_bytes)?;
                let s = Session::initiate(&mut self.rng, &self.keys, &bundle)?;
                // The profile opens the session, so it goes first, also before texts sent
                // again under their (older) ids: the queue is in id order.
                let oldest = contents.iter().filter_map(|(.., a)| a.map(|a| a.id)).min();
                let random = self.random8();
                let fresh = now_ms() + self.config.message_ttl.as_millis() as u64;
                let last_expiry = contents
                    .iter()
                    .map(|(.., a)| a.map_or(fresh, |a| a.expires_at))
                    .max();
                let profile = oldest.and_then(|o| o.just_before(random)).map(|id| Again {
                    id,
                    resent: false,
                    created_at: now_ms(),
                    // As long as what it opens the way for, no longer.
                    expires_at: last_expiry.unwrap_or(fresh),
                });
                contents.insert(0, (self.profile_content(), OutKind::Profile, profile));
                // Sessions replaced by a restart still decrypt what the peer sent under them.
                let previous = old.map_or_else(Vec::new, |mut r| {
                    let current = std::mem::take(&mut r.current);
                    std::iter::once(current)
                        .chain(std::mem::take(&mut r.previous))
                        .collect()
                });
                (s, previous)
            }
        };
        let now = now_ms();
        let expires_at = now + self.config.message_ttl.as_millis() as u64;
        let mut items = Vec::new();
        let mut entries = Vec::new();
        let before = session.sending_position();
        // Texts queued again (under their ids): no history entry, no undo, and no longer
        // watched as held by a relay.
        let mut again_texts = Vec::new();
        let mut resent = Vec::new();
        for (content, kind, again) in contents {
            let envelope = self.seal_as(&mut session, peer, &content, again.map(|a| a.id))?;
            let id = envelope.id;
            if let Some(a) = again {
                if kind == OutKind::Text {
                    again_texts.push(id);
                }
                if a.resent {
                    resent.push(id);
                }
                items.push(OutboxItem {
                    id,
                    peer,
                    envelope: envelope.to_bytes(),
                    kind,
                    created_at: a.created_at,
                    expires_at: a.expires_at,
                });
                continue;
            }
            if let Content::Text { text, sent_at } = &content {
                entries.push(StoredMessage {
                    id,
                    peer,
                    outgoing: true,
                    text: text.clone(),
                    timestamp: *sent_at,
                    state: MsgState::Queued,
                });
            }
            items.push(OutboxItem {
                id,
                peer,
                envelope: envelope.to_bytes(),
                kind,
                created_at: now,
                expires_at,
            });
        }
        previous.truncate(MAX_PREVIOUS_SESSIONS);
        let record = SessionRecord {
            current: session.to_bytes()?.to_vec(),
            previous,
        };
        self.cache_session(peer, &record.current, &session);
        // May these leave before their flush (a durable reservation covers them), and is a
        // new reservation due?
        let after = session.sending_position();
        let early = match (&before, &after) {
            (Some(first), Some(next)) => {
                may_leave_early && self.reservations.covers(&peer, first, next)
            }
            _ => false,
        };
        let renewal = after
            .as_ref()
            .and_then(|next| self.reservations.renewal(&peer, next));
        let db = &self.db;
        let mut tables: Vec<&dyn crate::store::AnyTable> =
            vec![&db.sessions, &db.outbox, &db.history, &db.index];
        if used_claimed {
            tables.push(&db.claimed_prekeys);
        }
        if renewal.is_some() {
            tables.push(&db.send_reserved);
        }
        if !again_texts.is_empty() {
            tables.push(&db.relay_held);
        }
        if !resent.is_empty() {
            tables.push(&db.resent);
        }
        db.store.transaction(&tables, |tx| {
            for id in restart.unwrap_or_default() {
                tx.remove(&db.outbox, &peer_id_key(&peer, id))?;
            }
            for id in &again_texts {
                tx.remove(&db.relay_held, &peer_id_key(&peer, id))?;
            }
            for id in &resent {
                tx.insert(&db.resent, &peer_id_key(&peer, id), &())?;
            }
            if used_claimed {
                tx.remove(&db.claimed_prekeys, mailbox::key(&peer))?;
            }
            if let Some(r) = &renewal {
                tx.insert(&db.send_reserved, &peer, r)?;
            }
            tx.insert(&db.sessions, &peer, &record)?;
            for item in &items {
                tx.insert(&db.outbox, &peer_id_key(&peer, &item.id), item)?;
            }
            for m in &entries {
                let hk = history_key(&peer, m.timestamp, &m.id);
                tx.insert(&db.history, &hk, m)?;
                tx.insert(&db.index, &peer_id_key(&m.peer, &m.id), &hk)?;
            }
            Ok(())
        })?;
        self.dirty = true;
        if !resent.is_empty() {
            self.resent.entry(peer).or_default().extend(resent);
        }
        for item in items
            .iter()
            .filter(|i| restart.is_none() && !again_texts.contains(&i.id))
        {
            let ts = entries
                .iter()
                .find(|m| m.id == item.id)
                .map(|m| m.timestamp);
            self.undo.push((peer, item.id, ts));
        }
        if let Some(r) = renewal {
            self.reservations.written(peer, r);
        }
        let early = early && !items.is_empty();
        if early {
            // Covered by a durable reservation: due now, its flush runs meanwhile.
            self.sent_before_flush += items.len() as u64;
            self.schedule.enqueue(peer, Instant::now());
        } else if let Some(first) = items.iter().map(|i| i.id).min() {
            // Due once durable (`flush_done`).
            self.not_durable.queued(peer, first);
        }
        Ok((items.iter().map(|i| i.id).collect(), early))
    }

    /// Whether a new session with `peer` can start by itself: a contact, not blocked, with
    /// a prekey bundle (from its ticket, or claimed from its relay).
    fn may_restart_session(&self, peer: &PeerKey) -> bool {
        let contact = self.db.contacts.get(peer).ok().flatten();
        contact.is_some_and(|c| {
            !c.blocked
                && (c.bundle.is_some()
                    || matches!(self.db.claimed_prekeys.get(mailbox::key(peer)), Ok(Some(_))))
        })
    }

    /// Claims one of `peer`'s one-time prekeys from its relays for the session about to
    /// replace the one it lost (as adding a contact does), unless a claim runs already or
    /// its relays are unknown. Only for a session it had accepted: a new session's first
    /// messages refused in turn start the next one from the signed prekey alone, which is
    /// never restarted (so a peer refusing everything costs one claim, not one per try).
    fn claim_for_restart(&mut self, peer: PeerKey) {
        // One claim at a time, and none while a claimed bundle waits to be used (a restart
        // that failed is tried again with it).
        if self.claiming.contains(&peer)
            || !matches!(
                self.db.claimed_prekeys.contains(mailbox::key(&peer)),
                Ok(false)
            )
        {
            return;
        }
        let Some((peer_id, mb)) = self.peer_id(&peer).zip(self.contact_mailbox(&peer)) else {
            return;
        };
        self.claiming.insert(peer);
        let net = self.net.clone();
        let done = self.claims_tx.clone();
        tokio::spawn(async move {
            use futures::FutureExt as _;
            // Answered whatever happens: the attempt it holds open ends only with it.
            let claim = std::panic::AssertUnwindSafe(mailbox::claim_from(&net, peer_id, &mb));
            let bundle = claim.catch_unwind().await.ok().flatten();
            let _ = done.send((peer, bundle)).await;
        });
    }

    /// A claim for `peer` answered: the bundle (if one came and verifies) starts the new
    /// session, and a restart that waited for it runs now.
    /// (Kept only while that restart is still due: a contact removed or blocked meanwhile
    /// drops it.)
    fn claim_done(&mut self, peer: PeerKey, bundle: Option<Vec<u8>>) {
        self.claiming.remove(&peer);
        let waiting = self.restart_after_claim.remove(&peer);
        if (waiting.is_some() || self.restarts.contains(&peer))
            && let Err(e) = self.store_claimed(&peer, bundle, true)
        {
            tracing::warn!(error = %e, "could not keep a claimed prekey");
        }
        if let Some(end) = waiting {
            self.end_attempt(peer, true, end);
        }
    }

    /// `peer` could not decrypt envelopes of our session (it removed us as a contact, or lost
    /// its data) and the attempt that found it is over: starts a new session from its prekey
    /// bundle and queues again, under it, what was queued for it and the texts its relays
    /// hold (sealed under the old session, so as undecryptable). Texts keep their ids,
    /// history entries and expiry; our presence key and mailbox token go as they are now;
    /// receipts sealed under the old session are dropped (those messages stay `sent` on the
    /// other side). The new session starts on a one-time prekey claimed from the peer's
    /// relays when there is one ([`Self::claim_for_restart`]), else from the ticket's signed
    /// prekey. Its first envelopes are prekey messages: a refusal of one started on a claimed
    /// prekey restarts once more, without a claim, and a refusal of one started from the
    /// signed prekey alone fails the texts (no loop).
    fn restart_session(&mut self, peer: PeerKey) -> Result<(), MessagingError> {
        let Some(c) = self.db.contacts.get(&peer)?.filter(|c| !c.blocked) else {
            return Ok(());
        };
        let mut contents = Vec::new();
        let mut dropped = Vec::new();
        for (_, item) in self.db.outbox.scan_prefix(&peer)? {
            let entry = match item.kind {
                OutKind::Text => self.db.message(&peer, &item.id)?,
                _ => None,
            };
            match entry {
                // (A relay may hold its old envelope too: a deposit whose answer was lost.)
                Some(m) => contents.push(text_again(m, item.created_at, item.expires_at)),
                None => dropped.push(item.id),
            }
        }
        // Texts a relay holds for it were sealed under the old session too: if the peer
        // fetched them, it could not decrypt them.
        contents.extend(self.relay_held_texts(&peer)?);
        // Sealed in the order they go (the queue's, by id).
        contents.sort_by_key(|(.., a)| a.map(|a| a.id));
        let texts = contents.len();
        if let Some(key) = self.presence_key_for(&c)? {
            let key = Content::PresenceKey { key: Some(key.0) };
            contents.push((key, OutKind::PresenceKey, None));
        }
        if let Some(token) = self.mailbox_token_content(&c) {
            contents.push((token, OutKind::MailboxToken, None));
        }
        self.queue_in(peer, contents, false, Some(&dropped))?;
        tracing::info!(
            contact = %c.name,
            texts,
            "the contact could no longer decrypt our messages (it removed us, or lost its \
             data): started a new session; what was queued goes again under it"
        );
        Ok(())
    }

    /// The texts `peer`'s relays hold for it (state `stored`, not expired), to be queued
    /// again under their ids: a peer that has them already answers them as stored.
    fn relay_held_texts(
        &self,
        peer: &PeerKey,
    ) -> Result<Vec<(Content, OutKind, Option<Again>)>, MessagingError> {
        let mut texts = Vec::new();
        if !self.relay_held_peers.contains(peer) {
            return Ok(texts);
        }
        let now = now_ms();
        for (key, held) in self.db.relay_held.scan_prefix(peer)? {
            let Some((_, id)) = split_peer_id_key(&key) else {
                continue;
            };
            if held.expires_at <= now {
                continue;
            }
            if let Some(m) = self.db.message(peer, &id)?
                && m.state == MsgState::Stored
            {
                let created_at = m.timestamp;
                texts.push(text_again(m, created_at, held.expires_at));
            }
        }
        Ok(texts)
    }

    /// `peer`, a contact, started a new session with us: it may have lost the one the
    /// texts its relays hold were sealed under (then it cannot decrypt them). They go again
    /// under the session it started.
    fn resend_relay_held(&mut self, peer: PeerKey) {
        let queued = self.relay_held_texts(&peer).and_then(|texts| {
            if texts.is_empty() {
                return Ok(0);
            }
            let n = texts.len();
            self.queue_in(peer, texts, false, None)?;
            Ok(n)
        });
        match queued {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                peer = %hex_short(&peer),
                texts = n,
                "the contact started a new session: the texts its relays hold go again under it"
            ),
            Err(e) => tracing::warn!(error = %e, "could not queue again the texts relays hold"),
        }
    }

    fn profile_content(&self) -> Content {
        Content::Profile {
            name: self.config.name.clone(),
            addrs: self.my_addrs.iter().map(|a| a.to_vec()).collect(),
        }
    }

    fn random8(&mut self) -> [u8; 8] {
        let mut r = [0u8; 8];
        self.rng.fill_bytes(&mut r);
        r
    }

    fn history(&self, with: &str, limit: usize) -> Result<Vec<HistoryItem>, MessagingError> {
        let (entries, label) = match self.contact(with) {
            Ok(c) => (self.db.history_for(&c.key(), limit)?, c.name),
            // A removed contact's history is kept: read by its peer id.
            Err(MessagingError::UnknownContact(_)) => {
                let unknown = || MessagingError::UnknownContact(with.to_string());
                let key = with
                    .parse::<PeerId>()
                    .ok()
                    .and_then(|p| ed25519_key_bytes_of(&p))
                    .ok_or_else(unknown)?;
                let kept = self.db.history_for(&key, limit)?;
                if kept.is_empty() {
                    return Err(unknown());
                }
                (kept, with.to_string())
            }
            Err(e) => return Err(e),
        };
        Ok(entries.iter().map(|m| history_item(m, &label)).collect())
    }

    fn conversations(&self) -> Result<Vec<Conversation>, MessagingError> {
        let mut out = Vec::new();
        for c in self.db.contact_list()? {
            let key = c.key();
            let last = self
                .db
                .history_for(&key, 1)?
                .first()
                .map(|m| history_item(m, &c.name));
            out.push(Conversation {
                unread: self.db.unread.count_prefix(&key)? as u64,
                name: c.name.clone(),
                peer_id: c.peer_id.to_string(),
                last,
                request: c.auto_added,
                blocked: c.blocked,
            });
        }
        out.sort_by(|a, b| {
            let ta = a.last.as_ref().map_or(0, |m| m.timestamp);
            let tb = b.last.as_ref().map_or(0, |m| m.timestamp);
            tb.cmp(&ta).then(a.name.cmp(&b.name))
        });
        Ok(out)
    }

    fn mark_read(&mut self, with: &str) -> Result<usize, MessagingError> {
        let c = self.contact(with)?;
        let key = c.key();
        let unread = self.db.unread.scan_prefix(&key)?;
        if unread.is_empty() {
            return Ok(0);
        }
        let ids: Vec<MsgId> = unread
            .iter()
            .filter_map(|(k, _)| {
                k.get(32..48)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(MsgId)
            })
            .collect();
        // Receipts first: if queueing them fails, the messages stay unread and a retry sends
        // them; if the second step fails, a retry only repeats receipts (states never go back).
        if !c.blocked {
            self.queue(key, receipt_contents(ReceiptKind::Read, &ids))?;
        }
        let db = &self.db;
        db.store
            .transaction(&[&db.unread, &db.history, &db.index], |tx| {
                for (k, _) in &unread {
                    tx.remove(&db.unread, k)?;
                }
                for id in &ids {
                    set_state(tx, db, &key, id, MsgState::Seen)?;
                }
                Ok(())
            })?;
        Ok(ids.len())
    }

    fn typing(&mut self, to: &str, typing: bool, reply: Reply<bool>) {
        let c = match self.contact(to) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let key = c.key();
        let Some(peer) = peer_id_of_key(&key) else {
            let _ = reply.send(Ok(false));
            return;
        };
        if c.blocked {
            let _ = reply.send(Err(MessagingError::Blocked(c.name)));
            return;
        }
        // Only over an existing session: typing never starts one.
        let record = match self.db.sessions.get(&key) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let _ = reply.send(Ok(false));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let result = (|| -> Result<Vec<u8>, MessagingError> {
            let mut session = Session::from_bytes(&record.current)?;
            let random = self.random8();
            let id = self.ids.next(now_ms(), random);
            let ad = Envelope::associated_data(&id, &self.me, &key);
            let pt = Plaintext(Content::Typing { typing }).to_bytes();
            let message = session.encrypt(&mut self.rng, &pt, &ad)?;
            let new_record = SessionRecord {
                current: session.to_bytes()?.to_vec(),
                previous: record.previous.clone(),
            };
            self.db.sessions.insert(&key, &new_record)?;
            Ok(Request::Ephemeral(Envelope {
                id,
                sender: self.me,
                recipient: key,
                ciphertext: message.to_bytes(),
            })
            .to_bytes())
        })();
        match result {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(bytes) => {
                // Sent only after the advanced ratchet is durable, and only if connected.
                let net = self.net.clone();
                self.dirty = true;
                self.after_flush.push(Box::new(move |flushed| {
                    if flushed.is_err() {
                        let _ = reply.send(Ok(false));
                        return;
                    }
                    tokio::spawn(async move {
                        let answered = match net.request(peer, Vec::new(), bytes).await {
                            Ok(b) => matches!(Response::from_bytes(&b), Ok(Response::Seen(_))),
                            Err(_) => false,
                        };
                        let _ = reply.send(Ok(answered));
                    });
                }));
            }
        }
    }

    fn handle_net_event(&mut self, ev: Result<NetEvent, broadcast::error::RecvError>) {
        match ev {
            Ok(NetEvent::Connected(peer)) => {
                if let Some(key) = ed25519_key_bytes_of(&peer) {
                    self.schedule.reachable(&key, Instant::now());
                }
                // A home relay: register and fetch what waits for us.
                self.sync_relay(peer);
            }
            Ok(NetEvent::Identified { peer, listen_addrs }) => {
                let Some(key) = ed25519_key_bytes_of(&peer) else {
                    return;
                };
                if let Ok(Some(mut c)) = self.db.contacts.get(&key) {
                    let usable: Vec<Multiaddr> =
                        listen_addrs.into_iter().filter(is_dialable).collect();
                    if !usable.is_empty() && c.addrs != usable {
                        c.addrs = usable;
                        if self.db.contacts.insert(&key, &c).is_ok() {
                            self.dirty = true;
                        }
                    }
                }
            }
            Ok(NetEvent::ListenAddrs(addrs)) => {
                self.my_addrs = addrs.into_iter().filter(is_dialable).collect();
            }
            Ok(NetEvent::Disconnected(_) | NetEvent::Subscribed { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(n, "missed network events; retrying every queue and relay");
                let now = Instant::now();
                if let Ok(peers) = self.db.outbox_peers() {
                    for p in peers {
                        self.schedule.reachable(&p, now);
                    }
                }
                for (relay, _) in self.home_relay_peers() {
                    self.sync_relay(relay);
                }
            }
            Err(broadcast::error::RecvError::Closed) => {}
        }
    }

    /// Dials every contact we know an address of, so queued messages flow both ways after
    /// a restart (our addresses may have changed; theirs are in the contact record).
    fn reconnect_contacts(&self) {
        let Ok(contacts) = self.db.contact_list() else {
            return;
        };
        for c in contacts {
            if c.blocked || c.addrs.is_empty() {
                continue;
            }
            let net = self.net.clone();
            let addrs = c.addrs.clone();
            let peer = c.peer_id;
            tokio::spawn(async move {
                for a in addrs {
                    if net.dial(a.with(crate::net::p2p(peer))).await.is_ok() {
                        break;
                    }
                }
            });
        }
    }

    /// The relays and token of `peer`'s mailbox, if known (and readable).
    fn contact_mailbox(&self, peer: &PeerKey) -> Option<mailbox::ContactMailbox> {
        self.db
            .contact_mailbox
            .get(mailbox::key(peer))
            .ok()
            .flatten()
    }

    /// Starts an attempt for every peer due; whether it started any.
    fn start_deliveries(&mut self) -> bool {
        let now = Instant::now();
        let mut started = false;
        for peer in self.schedule.take_due(now) {
            match self.prepare_delivery(&peer) {
                Ok(Some((peer_id, addrs, items))) => {
                    let net = self.net.clone();
                    let results = self.results_tx.clone();
                    let mailbox = self.contact_mailbox(&peer);
                    // Known offline and reachable through relays: skip the direct attempt
                    // (a dial to a vanished host can take many seconds to fail).
                    // Presence can be wrong, for example about a contact that replaced its
                    // presence key when it removed us: not when a connection to it is open,
                    // nor on the attempt after its relays refused our token.
                    let try_direct = self.try_direct.remove(&peer);
                    let presence_offline = !try_direct
                        && mailbox
                            .as_ref()
                            .is_some_and(|m| !m.relay_peers().is_empty())
                        && self.config.known_offline.contains(&peer_id);
                    let resent = self.resent.get(&peer).cloned().unwrap_or_default();
                    tokio::spawn(async move {
                        let offline =
                            presence_offline && !net.is_connected(peer_id).await.unwrap_or(false);
                        let target = Target {
                            peer,
                            peer_id,
                            addrs,
                            mailbox,
                            resent,
                        };
                        let r = deliver(net, target, items, offline, results.clone()).await;
                        let _ = results.send(r).await;
                    });
                    started = true;
                }
                Ok(None) => self.schedule.done(&peer),
                Err(e) => {
                    if !matches!(e, MessagingError::Blocked(_)) {
                        tracing::warn!(error = %e, "cannot read the outbox");
                    }
                    let r = self.rng.next_u32();
                    self.schedule.failed(&peer, now, r);
                }
            }
        }
        started
    }

    /// Fails the expired ones among `items` (removed from the outbox, `messageFailed`) and
    /// returns the others.
    fn drop_expired(
        &mut self,
        peer: &PeerKey,
        mut items: Vec<OutboxItem>,
    ) -> Result<Vec<OutboxItem>, MessagingError> {
        let now = now_ms();
        let expired: Vec<OutboxItem> = items
            .iter()
            .filter(|i| i.expires_at <= now)
            .cloned()
            .collect();
        if !expired.is_empty() {
            let reason = match self.last_error.get(peer) {
                Some(e) => format!("not delivered before it expired; last error: {e}"),
                None => "not delivered before it expired".to_string(),
            };
            let db = &self.db;
            let failed = db
                .store
                .transaction(&[&db.outbox, &db.history, &db.index], |tx| {
                    let mut failed = Vec::new();
                    for item in &expired {
                        tx.remove(&db.outbox, &peer_id_key(peer, &item.id))?;
                        if item.kind == OutKind::Text
                            && set_state(tx, db, peer, &item.id, MsgState::Failed(reason.clone()))?
                                .is_some()
                        {
                            failed.push(item.id);
                        }
                    }
                    Ok(failed)
                })?;
            self.dirty = true;
            for id in failed {
                self.publish_failed(&id, peer, &reason);
            }
            items.retain(|i| i.expires_at > now);
        }
        Ok(items)
    }

    /// The next round of `peer`'s durable queued items (after `after`, or from the start),
    /// failing the expired ones. A round that had only expired items is followed by the
    /// next one: the items behind it must not wait for an event that may never come.
    fn live_round(
        &mut self,
        peer: &PeerKey,
        after: Option<&MsgId>,
    ) -> Result<Vec<OutboxItem>, MessagingError> {
        loop {
            let round = match after {
                Some(after) => self.db.outbox_after(peer, after, DELIVERY_ROUND)?,
                None => self.db.outbox_for(peer, DELIVERY_ROUND)?,
            };
            let round = self.not_durable.durable_only(peer, round);
            let read = round.len();
            let live = self.drop_expired(peer, round)?;
            // Each pass removes at least one item from the outbox, so this ends.
            if !live.is_empty() || read == 0 {
                return Ok(live);
            }
        }
    }

    /// The next queued items for a running delivery to `peer`, after `after` (empty when
    /// there are none, or the contact is blocked now).
    fn more_items(&mut self, peer: &PeerKey, after: &MsgId) -> Vec<OutboxItem> {
        let blocked = matches!(self.db.contacts.get(peer), Ok(Some(c)) if c.blocked);
        if blocked {
            return Vec::new();
        }
        match self.live_round(peer, Some(after)) {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        }
    }

    /// Loads a peer's due items, failing the expired ones first.
    #[allow(clippy::type_complexity)] // one-off tuple of what a delivery task needs
    fn prepare_delivery(
        &mut self,
        peer: &PeerKey,
    ) -> Result<Option<(PeerId, Vec<Multiaddr>, Vec<OutboxItem>)>, MessagingError> {
        let items = self.live_round(peer, None)?;
        if items.is_empty() {
            return Ok(None);
        }
        let Some(peer_id) = self.peer_id(peer) else {
            return Ok(None);
        };
        let contact = self.db.contacts.get(peer)?;
        if contact.as_ref().is_some_and(|c| c.blocked) {
            // Nothing goes to a blocked contact; items wait (and expire, checked on every
            // backed-off attempt) unless the contact is unblocked.
            self.last_error.insert(*peer, "contact is blocked".into());
            return Err(MessagingError::Blocked(
                contact.map(|c| c.name).unwrap_or_default(),
            ));
        }
        let addrs = contact.map(|c| c.addrs).unwrap_or_default();
        Ok(Some((peer_id, addrs, items)))
    }

    /// The peer id and contact name (empty when unknown) of a peer key, for events.
    fn peer_labels(&self, peer: &PeerKey) -> (String, String) {
        let name = self
            .db
            .contacts
            .get(peer)
            .ok()
            .flatten()
            .map(|c| c.name)
            .unwrap_or_default();
        let peer_id = self.peer_id_text(peer).unwrap_or_default();
        (peer_id, name)
    }

    /// `peer`'s peer id and its text ([`peer_id_of_key`], remembered).
    fn peer_id_entry(&self, peer: &PeerKey) -> Option<(PeerId, String)> {
        /// Entries kept at most (keys come from contacts and their messages).
        const KEEP: usize = 4096;
        let mut ids = self.peer_ids.borrow_mut();
        if let Some(known) = ids.get(peer) {
            return known.clone();
        }
        if ids.len() >= KEEP {
            ids.clear();
        }
        let entry = peer_id_of_key(peer).map(|id| (id, id.to_string()));
        ids.insert(*peer, entry.clone());
        entry
    }

    fn peer_id(&self, peer: &PeerKey) -> Option<PeerId> {
        self.peer_id_entry(peer).map(|(id, _)| id)
    }

    fn peer_id_text(&self, peer: &PeerKey) -> Option<String> {
        self.peer_id_entry(peer).map(|(_, text)| text)
    }

    fn publish_failed(&mut self, id: &MsgId, peer: &PeerKey, reason: &str) {
        let (peer_id, to) = self.peer_labels(peer);
        tracing::info!(%to, %id, %reason, "a message failed");
        self.publish_after_flush(EventKind::MessageFailed {
            id: id.to_hex(),
            peer_id,
            to,
            reason: reason.to_string(),
        });
    }

    fn handle_delivery_result(&mut self, res: DeliveryResult) {
        let DeliveryResult {
            peer,
            outcomes,
            receipts,
            failure,
            refused,
            last,
            token_refused,
            progressed,
            more,
        } = res;
        if token_refused {
            // The next attempt tries it directly, whatever presence says (where a recipient
            // that dropped our session says so, and a new one starts).
            self.try_direct.insert(peer);
        }
        let outcomes = give_up_too_early(&mut self.too_early, &peer, outcomes, Instant::now());
        let undecryptable =
            |o: &Outcome| matches!(o, Outcome::Rejected(RejectReason::Undecryptable));
        let may_restart =
            outcomes.iter().any(|(_, o)| undecryptable(o)) && self.may_restart_session(&peer);
        let db = &self.db;
        let mut updates = Vec::new();
        // Only what the answers write takes part (each table costs a lock and a validation).
        let mut tables: Vec<&dyn crate::store::AnyTable> = vec![&db.outbox, &db.history, &db.index];
        if outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Relayed(_)))
        {
            tables.push(&db.relay_held);
        }
        let r = db.store.transaction(&tables, |tx| {
            let mut changed = Vec::new();
            let mut restart = false;
            // Refused on an established session (not a first message): a fresh one-time
            // prekey is worth claiming for the new one.
            let mut established = false;
            let mut held_until = None;
            for (id, outcome) in &outcomes {
                let key = peer_id_key(&peer, id);
                let Some(item) = tx.get(&db.outbox, &key)? else {
                    continue;
                };
                match outcome {
                    // The recipient lost our session (it removed us, or its data): the
                    // envelope stays queued, and goes again under a new session once
                    // the attempt ends (unless a new one would start the same way).
                    o if undecryptable(o) && may_restart && restart_may_help(&item.envelope) => {
                        restart = true;
                        established |=
                            matches!(sealed_message(&item.envelope), Some(Message::Normal(_)));
                    }
                    Outcome::Stored => {
                        tx.remove(&db.outbox, &key)?;
                        if item.kind == OutKind::Text
                            && set_state(tx, db, &peer, id, MsgState::Sent)?.is_some()
                        {
                            changed.push((*id, Ok("sent")));
                        }
                    }
                    Outcome::Delivered => {
                        tx.remove(&db.outbox, &key)?;
                        if item.kind == OutKind::Text
                            && let Some(previous) =
                                set_state(tx, db, &peer, id, MsgState::Delivered)?
                        {
                            for name in progress_names(previous, &MsgState::Delivered) {
                                changed.push((*id, Ok(name)));
                            }
                        }
                    }
                    Outcome::Relayed(until) => {
                        // A relay holds it durably: the recipient fetches it later. A
                        // text is watched until its receipt comes (or the relays drop
                        // it: it fails then).
                        tx.remove(&db.outbox, &key)?;
                        if item.kind == OutKind::Text {
                            let moved = set_state(tx, db, &peer, id, MsgState::Stored)?;
                            if moved.is_some() {
                                changed.push((*id, Ok("stored")));
                            }
                            // (A text queued again was `stored` already.)
                            if moved.is_some()
                                || message_state(tx, db, &peer, id)? == Some(MsgState::Stored)
                            {
                                let held = RelayHeld {
                                    relays_until: *until,
                                    expires_at: item.expires_at,
                                };
                                tx.insert(&db.relay_held, &key, &held)?;
                                held_until =
                                    Some(held_until.map_or(*until, |u: u64| u.min(*until)));
                            }
                        }
                    }
                    Outcome::Rejected(reason) if !reason.is_transient() => {
                        tx.remove(&db.outbox, &key)?;
                        let why = refusal_reason(*reason, first_flight(&item.envelope));
                        if item.kind == OutKind::Text
                            && set_state(tx, db, &peer, id, MsgState::Failed(why.clone()))?
                                .is_some()
                        {
                            changed.push((*id, Err(why)));
                        }
                    }
                    Outcome::GaveUp(why) => {
                        tx.remove(&db.outbox, &key)?;
                        let why = why.to_string();
                        if item.kind == OutKind::Text
                            && set_state(tx, db, &peer, id, MsgState::Failed(why.clone()))?
                                .is_some()
                        {
                            changed.push((*id, Err(why)));
                        }
                    }
                    Outcome::Rejected(_) => {}
                }
            }
            Ok((changed, restart, established, held_until))
        });
        match r {
            Ok((changed, restart, established, held_until)) => {
                updates = changed;
                if let Some(until) = held_until {
                    self.relay_held_watch(peer, until);
                }
                if restart {
                    self.restarts.insert(peer);
                    if established {
                        self.claim_for_restart(peer);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not record delivery results");
                self.unrecorded
                    .insert(peer, format!("could not record the answers: {e}"));
            }
        }
        // What the peer (or a relay) made durable is reported at once; the record of it
        // waits for the next flush (a crash before it only sends those envelopes again, and
        // the recipient answers the same). A refusal is reported once it is durable.
        if !outcomes.is_empty() {
            self.unflushed.recorded(Instant::now());
        }
        if !updates.is_empty() {
            let labels = self.peer_labels(&peer);
            let mut progress = Vec::new();
            for (id, change) in updates {
                match change {
                    Ok(state) => progress.push(receipt_event(&id, &labels, state)),
                    Err(why) => self.publish_failed(&id, &peer, &why),
                }
            }
            // `sent` and `delivered` of one answer: the second is not held up by the
            // first's log write.
            self.events.publish_all(progress);
        }
        // Receipts that came back in the answers: processed like envelopes delivered to us.
        if let Some(peer_id) = self.peer_id(&peer) {
            for envelope in receipts {
                if let Inbound::Respond(Response::Rejected(_, reason)) =
                    self.accept_envelope(peer_id, envelope, Via::Answer)
                {
                    // Not sent again: those messages stay `sent` (they are stored there).
                    tracing::warn!(peer = %hex_short(&peer), ?reason, "receipt in an answer refused");
                }
            }
        }
        if let Some((after, reply)) = more {
            // Answered at the end of the turn, with what is durable by then.
            self.refills.push((peer, after, reply));
        }
        if !last {
            return;
        }
        let end = AttemptEnd {
            failure,
            progressed,
            refused,
        };
        if self.restarts.contains(&peer) && self.claiming.contains(&peer) {
            // The new session waits for the contact's fresh one-time prekey (a few seconds
            // at most); the attempt stays open meanwhile, so nothing more goes under the
            // old session ([`Self::claim_done`] ends it).
            self.restarts.remove(&peer);
            self.restart_after_claim.insert(peer, end);
            return;
        }
        let restart = self.restarts.remove(&peer);
        self.end_attempt(peer, restart, end);
    }

    /// Ends a delivery attempt: starts the new session it found due (`restart`), then lets
    /// the schedule decide what comes next.
    fn end_attempt(&mut self, peer: PeerKey, restart: bool, end: AttemptEnd) {
        if restart && let Err(e) = self.restart_session(peer) {
            // Still queued under the old session: tried again after the backoff, not at
            // once (which would loop for as long as the store fails).
            tracing::warn!(error = %e, "could not start a new session");
            self.unrecorded
                .insert(peer, format!("could not start a new session: {e}"));
        }
        // The attempt is over: what next is the schedule's call. (A transient refusal made
        // the attempt stop with a failure.) Answers that could not be recorded make it a
        // failure too: their envelopes are still queued, and sending them again at once
        // would loop for as long as the disk stays full.
        let now = Instant::now();
        let AttemptEnd {
            failure,
            progressed,
            refused,
        } = end;
        let (failure, progressed, refused) = match self.unrecorded.remove(&peer) {
            Some(why) => (Some(why), false, false),
            None => (failure, progressed, refused),
        };
        match failure {
            Some(error) if progressed => {
                let r = self.rng.next_u32();
                self.schedule.slow_down(&peer, now, r);
                if refused {
                    self.schedule.refused(&peer);
                }
                self.last_error.insert(peer, error);
            }
            Some(error) => {
                let r = self.rng.next_u32();
                let delay = self.schedule.failed(&peer, now, r);
                if refused {
                    self.schedule.refused(&peer);
                }
                tracing::debug!(peer = %hex_short(&peer), %error, ?delay, "delivery failed; will retry");
                self.last_error.insert(peer, error);
            }
            None => {
                self.last_error.remove(&peer);
                if self
                    .db
                    .outbox
                    .scan_prefix_first(&peer, 1)
                    .map(|v| v.is_empty())
                    .unwrap_or(false)
                {
                    self.schedule.done(&peer);
                } else {
                    self.schedule.progressed(&peer, now);
                }
            }
        }
    }

    fn handle_inbound(&mut self, req: InboundRequest) {
        let InboundRequest {
            peer,
            bytes,
            channel,
            ..
        } = req;
        match self.accept_inbound(peer, &bytes) {
            Inbound::Respond(resp) => {
                // It reached us directly and we stored what it sent: what we queue for it
                // need not wait out a backoff ([`Schedule::heard_from`]). Not for typing,
                // nor envelopes fetched from a relay (they say nothing of that).
                if stored_any(&resp)
                    && let Some(key) = ed25519_key_bytes_of(&peer)
                {
                    self.schedule.heard_from(&key, Instant::now());
                    // Whatever presence last said, it is online: no detour through relays.
                    if self.config.known_offline.contains(&peer) {
                        self.config.known_offline.set(peer, false);
                    }
                }
                self.responses.push((channel, resp.to_bytes()));
            }
            Inbound::Drop => drop(channel),
        }
    }

    fn accept_inbound(&mut self, peer: PeerId, bytes: &[u8]) -> Inbound {
        let zero = MsgId([0; 16]);
        let request = match Request::from_bytes(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(peer = %crate::net::short(&peer), error = %e, "malformed request");
                self.count_rejected("malformed");
                return Inbound::Respond(Response::Rejected(zero, RejectReason::Malformed));
            }
        };
        match request {
            Request::Deliver(e) => self.accept_envelope(peer, e, Via::Request),
            Request::Ephemeral(e) => self.accept_envelope(peer, e, Via::Ephemeral),
            Request::DeliverBatch(list) => match self.accept_batch(peer, list) {
                Ok(answers) => Inbound::Respond(Response::Batch(answers)),
                Err(refused) => refused.into(),
            },
            Request::DeliverReceipted(list) => {
                self.piggyback = Some(Vec::new());
                let answers = self.accept_batch(peer, list);
                let ids = self.piggyback.take().unwrap_or_default();
                let answers = match answers {
                    Ok(answers) => answers,
                    Err(refused) => return refused.into(),
                };
                let receipt = match ed25519_key_bytes_of(&peer) {
                    Some(sender) if !ids.is_empty() => self.seal_receipt(sender, ids),
                    _ => None,
                };
                Inbound::Respond(Response::Receipted(answers, receipt))
            }
            Request::DeliverConfirmed(list) => {
                // The text messages among them (stored now or before) are answered
                // `Delivered`: nothing is sealed, nothing queued.
                self.piggyback = Some(Vec::new());
                let answers = self.accept_batch(peer, list);
                let texts: std::collections::HashSet<MsgId> = self
                    .piggyback
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                match answers {
                    Ok(answers) => Inbound::Respond(Response::Batch(
                        answers
                            .into_iter()
                            .map(|a| match a {
                                wire::Answer::Stored(id) if texts.contains(&id) => {
                                    wire::Answer::Delivered(id)
                                }
                                other => other,
                            })
                            .collect(),
                    )),
                    Err(refused) => refused.into(),
                }
            }
        }
    }

    /// Judges each envelope of a batch on its own, or refuses the whole request.
    fn accept_batch(
        &mut self,
        peer: PeerId,
        list: Vec<Envelope>,
    ) -> Result<Vec<wire::Answer>, Refused> {
        if list.is_empty() || list.len() > wire::MAX_BATCH_ENVELOPES {
            self.count_rejected("malformed");
            return Err(Refused::Malformed);
        }
        // One atomic commit for the whole request: a session written by every envelope is
        // written once.
        let store = self.db.store.clone();
        let owed = self.after_flush.len();
        let requests = self.message_requests;
        let resend = self.resend_held.clone();
        self.group_prekeys = Some(None);
        let (answers, committed) = store.group(|| self.accept_each(peer, list));
        let prekeys = self.group_prekeys.take().flatten();
        let mut answers = answers?;
        if let Err(e) = committed {
            // Not stored (or, if the commit broke half way, not acknowledged: the journal
            // replays it on the next start and the retry is answered from `seen`): what it
            // stored is refused for now (the sender keeps it and retries), nothing it would
            // have announced is, and what it changed in memory is undone.
            tracing::warn!(error = %e, "could not store a batch of inbound messages");
            if let Some(p) = prekeys {
                self.prekeys = p;
            }
            self.message_requests = requests;
            self.resend_held = resend;
            for f in self.after_flush.drain(owed..) {
                f(Err(e.to_string()));
            }
            if let Some(ids) = self.piggyback.as_mut() {
                ids.clear();
            }
            if let Some(sender) = ed25519_key_bytes_of(&peer)
                && let Some(ids) = self.pending_receipts.get_mut(&sender)
            {
                let refused: std::collections::HashSet<MsgId> =
                    answers.iter().map(wire::Answer::id).collect();
                ids.retain(|id| !refused.contains(id));
            }
            for a in &mut answers {
                if !matches!(a, wire::Answer::Rejected(..)) {
                    self.count_rejected("unavailable");
                    *a = wire::Answer::Rejected(a.id(), RejectReason::Unavailable);
                }
            }
        }
        Ok(answers)
    }

    /// Judges each envelope of a batch on its own (committing nothing: the caller groups
    /// the writes), or refuses the whole request.
    fn accept_each(
        &mut self,
        peer: PeerId,
        list: Vec<Envelope>,
    ) -> Result<Vec<wire::Answer>, Refused> {
        let zero = MsgId([0; 16]);
        let mut answers = Vec::with_capacity(list.len());
        for envelope in list {
            match self.accept_envelope(peer, envelope, Via::Request) {
                Inbound::Respond(Response::Stored(id)) => answers.push(wire::Answer::Stored(id)),
                Inbound::Respond(Response::Rejected(id, reason)) => {
                    answers.push(wire::Answer::Rejected(id, reason));
                }
                // Answers only ephemeral envelopes and batches get; never here.
                Inbound::Respond(Response::Seen(id)) => {
                    answers.push(wire::Answer::Rejected(id, RejectReason::Malformed));
                }
                Inbound::Respond(
                    Response::Batch(_) | Response::Receipted(..) | Response::Delivered(_),
                ) => {
                    answers.push(wire::Answer::Rejected(zero, RejectReason::Malformed));
                }
                // A blocked sender: every envelope of the batch is its own.
                Inbound::Drop => return Err(Refused::Blocked),
            }
        }
        Ok(answers)
    }

    /// Encrypts a `delivered` receipt for `ids` to `peer` with the current session and
    /// commits the advanced session (flushed with the batch, before the answer carrying it
    /// leaves). Without a session, or if that fails, the receipt is queued in the outbox
    /// instead and `None` returned.
    fn seal_receipt(&mut self, peer: PeerKey, ids: Vec<MsgId>) -> Option<Envelope> {
        let sealed = (|| -> Result<Option<Envelope>, MessagingError> {
            let Some(mut record) = self.db.sessions.get(&peer)? else {
                return Ok(None);
            };
            let mut session = self.cached_session(&peer, &record.current)?;
            let content = Content::Receipt {
                kind: ReceiptKind::Delivered,
                ids: ids.clone(),
            };
            let envelope = self.seal(&mut session, peer, &content)?;
            let record = SessionRecord {
                current: session.to_bytes()?.to_vec(),
                previous: std::mem::take(&mut record.previous),
            };
            let db = &self.db;
            db.store.transaction(&[&db.sessions], |tx| {
                tx.insert(&db.sessions, &peer, &record)?;
                Ok(())
            })?;
            self.cache_session(peer, &record.current, &session);
            self.dirty = true;
            Ok(Some(envelope))
        })();
        match sealed {
            Ok(Some(envelope)) => Some(envelope),
            Ok(None) => {
                self.pending_receipts.entry(peer).or_default().extend(ids);
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not seal a receipt; it is queued instead");
                self.pending_receipts.entry(peer).or_default().extend(ids);
                None
            }
        }
    }

    /// Encrypts `content` to `peer` under a fresh id with `session` (which advances).
    fn seal(
        &mut self,
        session: &mut Session,
        peer: PeerKey,
        content: &Content,
    ) -> Result<Envelope, MessagingError> {
        self.seal_as(session, peer, content, None)
    }

    /// [`Self::seal`] under the id given, if any (a text sent again under a new session).
    fn seal_as(
        &mut self,
        session: &mut Session,
        peer: PeerKey,
        content: &Content,
        id: Option<MsgId>,
    ) -> Result<Envelope, MessagingError> {
        let id = match id {
            Some(id) => id,
            None => {
                let random = self.random8();
                self.ids.next(now_ms(), random)
            }
        };
        let ad = Envelope::associated_data(&id, &self.me, &peer);
        let message =
            session.encrypt(&mut self.rng, &Plaintext(content.clone()).to_bytes(), &ad)?;
        Ok(Envelope {
            id,
            sender: self.me,
            recipient: peer,
            ciphertext: message.to_bytes(),
        })
    }

    /// Judges one envelope from `peer`: checks, decrypts, commits (flushed with the batch).
    fn accept_envelope(&mut self, peer: PeerId, envelope: Envelope, via: Via) -> Inbound {
        let id = envelope.id;
        let ephemeral = via == Via::Ephemeral;
        if self.storage_failed.is_some() {
            // Nothing can be made durable right now; the sender keeps it and retries.
            self.count_rejected("storage");
            return Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable));
        }
        let Some(sender) = ed25519_key_bytes_of(&peer) else {
            return Inbound::Respond(Response::Rejected(id, RejectReason::WrongParty));
        };
        if envelope.sender != sender || envelope.recipient != self.me {
            self.count_rejected("wrong_party");
            return Inbound::Respond(Response::Rejected(id, RejectReason::WrongParty));
        }
        let now = Instant::now();
        let bucket = self.limits.entry(peer).or_insert_with(|| {
            TokenBucket::new(self.config.inbound_burst, self.config.inbound_rate, now)
        });
        // A receipt in an answer was asked for (one per request we made): not limited.
        if via != Via::Answer && !bucket.take(now) {
            self.count_rejected("rate_limited");
            return Inbound::Respond(Response::Rejected(id, RejectReason::RateLimited));
        }
        let contact = match self.db.contacts.get(&sender) {
            Ok(c) => c,
            Err(_) => {
                self.count_rejected("unavailable");
                return Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable));
            }
        };
        let blocked = match &contact {
            Some(c) => Ok(c.blocked),
            // A blocked contact the user removed stays blocked.
            None => self.db.blocked_peers.contains(&sender),
        };
        match blocked {
            Ok(false) => {}
            Ok(true) => {
                // Dropped without an answer: a blocked peer learns nothing.
                self.count_rejected("blocked");
                return Inbound::Drop;
            }
            Err(_) => {
                self.count_rejected("unavailable");
                return Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable));
            }
        }
        match self.db.seen.contains(&peer_id_key(&sender, &id)) {
            Ok(true) => {
                // A repeat: our answer (and its receipt) may have been lost on the way.
                self.duplicates += 1;
                if let Some(ids) = self.piggyback.as_mut()
                    && self
                        .db
                        .index
                        .contains(&peer_id_key(&sender, &id))
                        .unwrap_or(false)
                {
                    ids.push(id);
                }
                return Inbound::Respond(Response::Stored(id));
            }
            Ok(false) => {}
            Err(_) => {
                self.count_rejected("unavailable");
                return Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable));
            }
        }
        // Older than the dedup markers are kept, it could be a replay whose marker is gone:
        // refused (a message waits 30 days at most, so only a replay or a clock two months
        // off gets here). Markers are kept until 60 days after the later of the arrival and
        // the id's own time, so a younger id is always still known. Dated far ahead, its
        // marker would be kept for as long: refused too. Both transiently (`Unavailable`):
        // if it is our clock that is wrong, the sender retries and a relay keeps the
        // envelope (a relay page acks only what it must not serve again) until it is right.
        let now = now_ms();
        let refused = if id.millis().saturating_add(STALE_AFTER.as_millis() as u64) < now {
            Some("stale")
        } else if id.millis() > now.saturating_add(FUTURE_LIMIT.as_millis() as u64) {
            Some("future")
        } else {
            None
        };
        if let Some(why) = refused {
            self.count_rejected(why);
            return Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable));
        }
        // Not seen from them, yet in the message index under their key: the id of one of
        // our messages to them. Ids are random, so only a peer copying ours gets here; taking
        // it would overwrite our own history entry.
        match self.db.index.contains(&peer_id_key(&sender, &id)) {
            Ok(false) => {}
            Ok(true) => {
                tracing::debug!(peer = %crate::net::short(&peer), "envelope reuses the id of one of our messages");
                self.count_rejected("id_reused");
                return Inbound::Respond(Response::Rejected(id, RejectReason::Malformed));
            }
            Err(_) => {
                self.count_rejected("unavailable");
                return Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable));
            }
        }
        if contact.is_none() && self.message_requests >= self.config.max_message_requests {
            // A stranger while the message requests are full: it may retry later.
            self.count_rejected("requests_full");
            return Inbound::Respond(Response::Rejected(id, RejectReason::RateLimited));
        }
        let opened = match self.open(&envelope, &sender, contact.as_ref()) {
            Ok(o) => o,
            Err(reason) => {
                tracing::debug!(peer = %crate::net::short(&peer), ?reason, "envelope refused");
                self.count_rejected(reason_name(reason));
                return Inbound::Respond(Response::Rejected(id, reason));
            }
        };
        match self.commit_inbound(peer, sender, id, contact, opened, ephemeral) {
            Ok(()) if ephemeral => Inbound::Respond(Response::Seen(id)),
            Ok(()) => Inbound::Respond(Response::Stored(id)),
            Err(e) => {
                tracing::warn!(error = %e, "could not store an inbound message");
                self.count_rejected("unavailable");
                Inbound::Respond(Response::Rejected(id, RejectReason::Unavailable))
            }
        }
    }

    /// Decrypts with the matching session (or a new one); changes nothing.
    fn open(
        &self,
        env: &Envelope,
        sender: &PeerKey,
        contact: Option<&Contact>,
    ) -> Result<Opened, RejectReason> {
        let ad = Envelope::associated_data(&env.id, &env.sender, &env.recipient);
        let message = Message::from_bytes(&env.ciphertext).map_err(|_| RejectReason::Malformed)?;
        let record = self
            .db
            .sessions
            .get(sender)
            .map_err(|_| RejectReason::Unavailable)?
            .unwrap_or_default();
        let mut sessions: Vec<Session> = Vec::new();
        if !record.current.is_empty() {
            sessions.extend(self.cached_session(sender, &record.current).ok());
        }
        sessions.extend(
            record
                .previous
                .iter()
                .filter_map(|b| Session::from_bytes(b).ok()),
        );

        // An existing session that decrypts it.
        let mut too_early = false;
        for (i, s) in sessions.iter().enumerate() {
            if let Message::PreKey(pk) = &message
                && !s.matches(pk)
            {
                continue;
            }
            let mut candidate = s.clone();
            let decrypted = candidate.decrypt(&message, &ad);
            too_early |= i == 0
                && matches!(decrypted, Err(CryptoError::TooFarAhead { .. }))
                && s.decryptable_later(&message);
            if let Ok(pt) = decrypted {
                let content = Plaintext::from_bytes(&pt)
                    .map_err(|_| RejectReason::Malformed)?
                    .0;
                sessions[i] = candidate;
                let promoted = sessions.remove(i);
                sessions.insert(0, promoted);
                return Ok(Opened {
                    content,
                    sessions,
                    prekeys: None,
                    new_identity: None,
                });
            }
        }
        // Far ahead on the current session's receiving chain: the envelopes before it are
        // delayed (requests overtake each other), so it can be decrypted once they are in.
        if too_early {
            return Err(RejectReason::TooEarly);
        }
        // A first message starting a new session.
        let Message::PreKey(pk) = &message else {
            return Err(RejectReason::Undecryptable);
        };
        if pk.identity().ed25519() != sender {
            return Err(RejectReason::WrongParty);
        }
        if let Some(c) = contact
            && c.identity != *pk.identity()
        {
            tracing::warn!(contact = %c.name, "a first message carries a different identity key than the contact's; refused");
            return Err(RejectReason::Undecryptable);
        }
        let mut prekeys = self.prekeys.clone();
        let (session, pt) = Session::accept(&self.keys, &mut prekeys, pk, &ad)
            .map_err(|_| RejectReason::Undecryptable)?;
        let content = Plaintext::from_bytes(&pt)
            .map_err(|_| RejectReason::Malformed)?
            .0;
        let identity = session.remote_identity().clone();
        sessions.insert(0, session);
        let consumed = pk.one_time_prekey_id().is_some();
        Ok(Opened {
            content,
            sessions,
            prekeys: consumed.then_some(prekeys),
            new_identity: Some(identity),
        })
    }

    fn commit_inbound(
        &mut self,
        peer: PeerId,
        sender: PeerKey,
        id: MsgId,
        contact: Option<Contact>,
        opened: Opened,
        ephemeral: bool,
    ) -> Result<(), MessagingError> {
        let Opened {
            content,
            mut sessions,
            prekeys,
            new_identity,
        } = opened;
        sessions.truncate(1 + MAX_PREVIOUS_SESSIONS);
        let mut encoded = Vec::with_capacity(sessions.len());
        for s in &sessions {
            encoded.push(s.to_bytes()?.to_vec());
        }
        let record = SessionRecord {
            current: encoded.first().cloned().unwrap_or_default(),
            previous: encoded.into_iter().skip(1).collect(),
        };
        if let Some(first) = sessions.first() {
            self.cache_session(sender, &record.current, first);
        }
        let prekey_bytes = match &prekeys {
            Some(p) => Some(p.to_bytes()?.to_vec()),
            None => None,
        };
        // A contact started a new session with us (it may have lost the old one).
        let new_session_of_contact = new_identity.is_some() && contact.is_some();
        // A stranger's first message makes a "message request" contact.
        let mut new_contact = None;
        let mut contact = contact;
        if contact.is_none() {
            let identity = match new_identity {
                Some(i) => i,
                None => return Err(MessagingError::UnknownContact(hex_short(&sender))),
            };
            let announced = match &content {
                Content::Profile { name, .. } => name.clone(),
                // No profile first (a session it started before we removed it): the name
                // it announced then.
                _ => self.db.former_names.get(&sender)?,
            };
            let name = self.free_name(announced.as_deref(), &peer)?;
            let c = Contact {
                name,
                peer_id: peer,
                identity,
                bundle: None,
                addrs: Vec::new(),
                blocked: false,
                auto_added: true,
                announced_name: announced,
                added_at: now_ms(),
            };
            new_contact = Some(c.clone());
            contact = Some(c);
        }
        let mut contact =
            contact.ok_or_else(|| MessagingError::UnknownContact(hex_short(&sender)))?;
        // A message request named before its profile arrived gets the announced name.
        let mut renamed_from = None;
        if let Content::Profile { name, addrs } = &content {
            if let Some(announced) = name.as_deref().map(normalize_name)
                && contact.auto_added
                && contact.name.starts_with("peer-")
                && new_contact.is_none()
                && validate_name(&announced).is_ok()
                && self.name_owner(&announced)?.is_none()
            {
                renamed_from = Some(std::mem::replace(&mut contact.name, announced));
            }
            contact.announced_name = name.clone();
            let announced: Vec<Multiaddr> = addrs
                .iter()
                .filter_map(|b| Multiaddr::try_from(b.clone()).ok())
                .filter(is_dialable)
                .collect();
            merge_addrs(&mut contact.addrs, &announced);
        }
        let text_entry = match &content {
            Content::Text { text, sent_at } => Some(StoredMessage {
                id,
                peer: sender,
                outgoing: false,
                text: text.clone(),
                timestamp: *sent_at,
                state: MsgState::Received,
            }),
            _ => None,
        };
        let receipt_updates: Vec<(MsgId, MsgState)> = match &content {
            Content::Receipt { kind, ids } => {
                let state = match kind {
                    ReceiptKind::Delivered => MsgState::Delivered,
                    ReceiptKind::Read => MsgState::Read,
                };
                ids.iter().map(|i| (*i, state.clone())).collect()
            }
            _ => Vec::new(),
        };
        let db = &self.db;
        // Only the tables this envelope writes take part: every table in a sled transaction
        // costs a lock and a validation.
        let mut tables: Vec<&dyn crate::store::AnyTable> = vec![&db.sessions, &db.seen];
        if prekey_bytes.is_some() {
            tables.push(&db.prekeys);
        }
        if text_entry.is_some() || !receipt_updates.is_empty() {
            tables.extend([
                &db.history as &dyn crate::store::AnyTable,
                &db.index,
                &db.unread,
            ]);
        }
        // Relays hold texts of ours (none is watched otherwise: no lookups on the hot path).
        let watched = !receipt_updates.is_empty() && self.relay_held_peers.contains(&sender);
        if watched {
            tables.push(&db.relay_held);
        }
        if new_contact.is_some() || matches!(content, Content::Profile { .. }) {
            tables.extend([&db.contacts as &dyn crate::store::AnyTable, &db.names]);
        }
        if matches!(content, Content::PresenceKey { .. }) {
            tables.push(&db.presence_keys);
        }
        if matches!(content, Content::MailboxToken { .. }) {
            tables.push(&db.contact_mailbox);
        }
        let changed = db.store.transaction(&tables, |tx| {
            tx.insert(&db.sessions, &sender, &record)?;
            if let Some(p) = &prekey_bytes {
                tx.insert(&db.prekeys, b"local", p)?;
            }
            if !ephemeral {
                // Kept 60 days past the later of now and the id's time (see STALE_AFTER).
                tx.insert(
                    &db.seen,
                    &peer_id_key(&sender, &id),
                    &now_ms().max(id.millis()),
                )?;
            }
            if new_contact.is_some() || matches!(content, Content::Profile { .. }) {
                tx.insert(&db.contacts, &sender, &contact)?;
                if new_contact.is_some() {
                    tx.insert(&db.names, contact.name.as_bytes(), &sender)?;
                }
                if let Some(old) = &renamed_from {
                    tx.remove(&db.names, old.as_bytes())?;
                    tx.insert(&db.names, contact.name.as_bytes(), &sender)?;
                }
            }
            if let Content::PresenceKey { key } = &content {
                match key {
                    Some(k) => tx.insert(
                        &db.presence_keys,
                        &sender,
                        &crate::presence::wire::PresenceKey(*k),
                    )?,
                    None => {
                        tx.remove(&db.presence_keys, &sender)?;
                    }
                }
            }
            if let Content::MailboxToken { token, relays } = &content {
                tx.insert(
                    &db.contact_mailbox,
                    mailbox::key(&sender),
                    &mailbox::ContactMailbox {
                        relays: relays.clone(),
                        token: *token,
                    },
                )?;
            }
            if let Some(m) = &text_entry {
                let hk = history_key(&sender, m.timestamp, &m.id);
                tx.insert(&db.history, &hk, m)?;
                tx.insert(&db.index, &peer_id_key(&m.peer, &m.id), &hk)?;
                tx.insert(&db.unread, &peer_id_key(&sender, &m.id), &())?;
            }
            let mut changed = Vec::new();
            for (rid, state) in &receipt_updates {
                if !owned_outgoing(tx, db, rid, &sender)? {
                    continue;
                }
                if watched {
                    // A text a relay held reached them: its watch ends.
                    tx.remove(&db.relay_held, &peer_id_key(&sender, rid))?;
                }
                if let Some(previous) = set_state(tx, db, &sender, rid, state.clone())? {
                    // Report every state passed, so clients always see sent ->
                    // delivered -> read even when a receipt overtakes the acknowledgement.
                    for name in progress_names(previous, state) {
                        changed.push((*rid, name));
                    }
                }
            }
            Ok(changed)
        })?;
        if let Some(p) = prekeys {
            let before = std::mem::replace(&mut self.prekeys, p);
            if let Some(kept) = self.group_prekeys.as_mut() {
                kept.get_or_insert(before);
            }
        }
        self.dirty = true;
        if new_contact.is_some() {
            self.message_requests += 1;
        }
        if new_session_of_contact && self.relay_held_peers.contains(&sender) {
            self.resend_held.insert(sender);
        }
        // Events follow the flush: an event means the data is durable.
        let events = self.events.clone();
        let name = contact.name.clone();
        // The sender's peer id text, remembered (base58 costs more than the rest of this).
        let peer_str = match self.peer_id_entry(&sender) {
            Some((id, text)) if id == peer => text,
            _ => peer.to_string(),
        };
        let notices: Vec<EventKind> = {
            let mut v = Vec::new();
            if let Some(c) = &new_contact {
                v.push(EventKind::ContactAdded {
                    name: c.name.clone(),
                    peer_id: peer_str.clone(),
                    auto_added: true,
                });
            }
            match &content {
                Content::Text { text, sent_at } => v.push(EventKind::Message {
                    id: id.to_hex(),
                    peer_id: peer_str.clone(),
                    from: name.clone(),
                    text: text.clone(),
                    sent_at: *sent_at,
                }),
                Content::Typing { typing } => v.push(EventKind::Typing {
                    peer_id: peer_str.clone(),
                    from: name.clone(),
                    typing: *typing,
                }),
                _ => {}
            }
            for (rid, state) in &changed {
                v.push(EventKind::Receipt {
                    id: rid.to_hex(),
                    peer_id: peer_str.clone(),
                    to: name.clone(),
                    state: (*state).to_string(),
                });
            }
            v
        };
        if !notices.is_empty() {
            self.after_flush.push(Box::new(move |flushed| {
                if flushed.is_ok() {
                    for n in notices {
                        events.publish(n);
                    }
                }
            }));
        }
        if text_entry.is_some() {
            match self.piggyback.as_mut() {
                Some(ids) => ids.push(id),
                None => self.pending_receipts.entry(sender).or_default().push(id),
            }
        }
        if let Content::PresenceKey { key } = &content
            && let Some(note) = Self::presence_key_note(&sender, *key)
        {
            self.note_after_flush(note);
        }
        if new_contact.is_some() {
            self.note_after_flush(PresenceNote::ContactsChanged);
        }
        Ok(())
    }

    /// The session stored as `bytes` for `peer`, decoded once and then served from memory.
    fn cached_session(&self, peer: &PeerKey, bytes: &[u8]) -> Result<Session, CryptoError> {
        if let Some((b, s)) = self.session_cache.borrow().get(peer)
            && b.as_slice() == bytes
        {
            return Ok(s.clone());
        }
        let s = Session::from_bytes(bytes)?;
        self.cache_session(*peer, bytes, &s);
        Ok(s)
    }

    fn cache_session(&self, peer: PeerKey, bytes: &[u8], session: &Session) {
        let mut cache = self.session_cache.borrow_mut();
        // Bounded: strangers can make sessions; a full cache is simply started over.
        if cache.len() >= SESSION_CACHE_CAP && !cache.contains_key(&peer) {
            cache.clear();
        }
        cache.insert(
            peer,
            (zeroize::Zeroizing::new(bytes.to_vec()), session.clone()),
        );
    }

    /// Watches a text a relay holds for `peer` until `until` (ms since the epoch).
    fn relay_held_watch(&mut self, peer: PeerKey, until: u64) {
        self.relay_held_due = Some(self.relay_held_due.map_or(until, |d| d.min(until)));
        self.relay_held_peers.insert(peer);
    }

    /// When the hold ending at `until` is judged over: a grace after it, and never sooner
    /// than a grace after [`START_SETTLE`] past our start (the receipts waiting in our own
    /// mailbox come first, also with a short message lifetime, whose grace is short).
    fn relay_hold_over_at(&self, until: u64) -> u64 {
        let settled = self
            .started_ms
            .saturating_add(START_SETTLE.as_millis() as u64);
        until
            .max(settled)
            .saturating_add(self.config.relay_grace.as_millis() as u64)
    }

    /// When the texts relays hold are next checked.
    fn relay_held_check_at(&self) -> Option<Instant> {
        if let Some(retry) = self.relay_held_retry {
            return Some(retry);
        }
        let at = self.relay_hold_over_at(self.relay_held_due?);
        Some(Instant::now() + Duration::from_millis(at.saturating_sub(now_ms())))
    }

    /// Texts whose relays dropped them ([`MessagingConfig::relay_grace`] ago) with no
    /// receipt fail: the recipient never fetched them, or could not decrypt them (it lost
    /// our session). Their watch ends with a receipt ([`Self::commit_inbound`]) or when they
    /// go again under a new session.
    fn fail_relay_held_if_due(&mut self) {
        let now = now_ms();
        match self.relay_held_retry {
            Some(retry) if Instant::now() < retry => return,
            _ => self.relay_held_retry = None,
        }
        match self.relay_held_due {
            Some(due) if self.relay_hold_over_at(due) <= now => {}
            _ => return,
        }
        let db = &self.db;
        let checked = db
            .relay_held
            .scan_prefix(&[])
            .map_err(MessagingError::from)
            .and_then(|all| {
                let (over, left): (Vec<_>, Vec<_>) = all
                    .into_iter()
                    .partition(|(_, h)| self.relay_hold_over_at(h.relays_until) <= now);
                let failed =
                    db.store
                        .transaction(&[&db.relay_held, &db.history, &db.index], |tx| {
                            let mut failed = Vec::new();
                            for (key, _) in &over {
                                tx.remove(&db.relay_held, key)?;
                                let Some((peer, id)) = split_peer_id_key(key) else {
                                    continue;
                                };
                                let why = MsgState::Failed(RELAY_HOLD_ENDED.to_string());
                                if set_state(tx, db, &peer, &id, why)?.is_some() {
                                    failed.push((peer, id));
                                }
                            }
                            Ok(failed)
                        })?;
                Ok((failed, !over.is_empty(), left))
            });
        match checked {
            Ok((failed, changed, left)) => {
                self.dirty |= changed;
                (self.relay_held_due, self.relay_held_peers) = relay_held_summary(&left);
                for (peer, id) in failed {
                    self.publish_failed(&id, &peer, RELAY_HOLD_ENDED);
                }
            }
            Err(e) => {
                // Not again at once: a full disk would make it spin.
                tracing::warn!(error = %e, "could not check the texts relays hold");
                self.relay_held_retry = Some(Instant::now() + REKEY_RETRY);
            }
        }
    }

    /// Drops dedup markers older than [`SEEN_RETENTION`] (hourly): a sender gives up on an
    /// envelope after its TTL, so no retry or replay can carry an older id to us.
    fn prune_seen_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_prune {
            return;
        }
        self.next_prune = now + SEEN_PRUNE_INTERVAL;
        self.prune_resent();
        // Rate limiters outlive disconnects (a reconnect must not refill a burst) but not
        // forever: drop the buckets that are full again, i.e. of peers quiet for a while.
        self.limits.retain(|_, bucket| !bucket.is_full(now));
        let cutoff = now_ms().saturating_sub(SEEN_RETENTION.as_millis() as u64);
        let old: Vec<Vec<u8>> = match self.db.seen.scan_prefix(&[]) {
            Ok(all) => all
                .into_iter()
                .filter(|(_, at)| *at < cutoff)
                .map(|(k, _)| k)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot scan the dedup set");
                return;
            }
        };
        for k in &old {
            if self.db.seen.remove(k).is_err() {
                break;
            }
        }
        if !old.is_empty() {
            self.dirty = true;
            tracing::debug!(removed = old.len(), "pruned old dedup markers");
        }
    }

    /// Forgets the marks of texts queued again ([`MessagingDb::resent`]) that left the
    /// outbox.
    fn prune_resent(&mut self) {
        let db = &self.db;
        let gone: Vec<(PeerKey, MsgId)> = self
            .resent
            .iter()
            .flat_map(|(p, ids)| ids.iter().map(move |id| (*p, *id)))
            .filter(|(p, id)| matches!(db.outbox.contains(&peer_id_key(p, id)), Ok(false)))
            .collect();
        for (peer, id) in gone {
            if db.resent.remove(&peer_id_key(&peer, &id)).is_err() {
                break;
            }
            if let Some(ids) = self.resent.get_mut(&peer) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.resent.remove(&peer);
                }
            }
            self.dirty = true;
        }
    }

    /// Counts the message requests again (after the user added, removed or blocked a
    /// contact); on a read error the old count stays.
    fn recount_message_requests(&mut self) {
        match count_message_requests(&self.db) {
            Ok(n) => self.message_requests = n,
            Err(e) => tracing::warn!(error = %e, "cannot count message requests"),
        }
    }

    /// Publishes `kind` once the current batch is durable (never if its flush fails).
    fn publish_after_flush(&mut self, kind: EventKind) {
        let events = self.events.clone();
        self.after_flush.push(Box::new(move |flushed| {
            if flushed.is_ok() {
                events.publish(kind);
            }
        }));
    }

    fn count_rejected(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    fn free_name(&self, announced: Option<&str>, peer: &PeerId) -> Result<String, MessagingError> {
        let short = crate::net::short(peer);
        let base = announced
            .map(normalize_name)
            .filter(|n| validate_name(n).is_ok())
            .unwrap_or_else(|| format!("peer-{short}"));
        if self.name_owner(&base)?.is_none() {
            return Ok(base);
        }
        let alt = format!("{}-{short}", base.chars().take(40).collect::<String>());
        if self.name_owner(&alt)?.is_none() {
            return Ok(alt);
        }
        Ok(format!("peer-{peer}"))
    }

    /// The contact whose name is `name` or reads the same ([`fold_name`]: letter case, and
    /// Unicode forms such as a full-width `Ｂ`; `Bob` next to `bob` would read as the same
    /// person). Names are still looked up exactly (in NFC).
    fn name_owner(&self, name: &str) -> Result<Option<PeerKey>, MessagingError> {
        if let Some(key) = self.db.names.get(name.as_bytes())? {
            return Ok(Some(key));
        }
        let folded = fold_name(name);
        self.find_name(|stored| fold_name(stored) == folded)
    }
}

/// What a `messageFailed` says about a permanent refusal, with what the user can do.
/// `first_flight`: the envelope started a session (so a new session would not have helped).
fn refusal_reason(reason: RejectReason, first_flight: bool) -> String {
    let advice = match reason {
        RejectReason::Undecryptable if first_flight => {
            ": it could not decrypt it, not even as the first message of a new session: its \
             keys are no longer those of its ticket (it was set up again?). Ask it for a new \
             ticket, then remove the contact and add it again from that ticket"
        }
        RejectReason::Undecryptable => {
            ": it could not decrypt it; it no longer has our session (it removed us as a \
             contact, or lost its data). Remove the contact and add it again from its \
             ticket to start a new session"
        }
        RejectReason::Malformed => ": it could not read it (another Tern version?)",
        RejectReason::WrongParty => ": it is not the node this was addressed to",
        _ => "",
    };
    format!("the recipient refused it ({reason:?}){advice}")
}

/// A text of ours queued again under its id ([`Again`]), marked `resent`: a relay may hold
/// an older envelope under that id.
fn text_again(
    m: StoredMessage,
    created_at: u64,
    expires_at: u64,
) -> (Content, OutKind, Option<Again>) {
    let again = Again {
        id: m.id,
        created_at,
        expires_at,
        resent: true,
    };
    let text = Content::Text {
        text: m.text,
        sent_at: m.timestamp,
    };
    (text, OutKind::Text, Some(again))
}

/// The earliest `relays_until` among `held` (`relay_held` entries), and their peers.
fn relay_held_summary(held: &[(Vec<u8>, RelayHeld)]) -> (Option<u64>, HashSet<PeerKey>) {
    let due = held.iter().map(|(_, h)| h.relays_until).min();
    let peers = held
        .iter()
        .filter_map(|(k, _)| split_peer_id_key(k).map(|(p, _)| p))
        .collect();
    (due, peers)
}

/// The peer and id of a `peer || id` key.
fn split_peer_id_key(key: &[u8]) -> Option<(PeerKey, MsgId)> {
    let peer = PeerKey::try_from(key.get(..32)?).ok()?;
    let id = <[u8; 16]>::try_from(key.get(32..)?).ok()?;
    Some((peer, MsgId(id)))
}

/// Contacts that are message requests: created by a stranger's first message, not yet
/// accepted (added by ticket) or blocked.
fn count_message_requests(db: &MessagingDb) -> Result<usize, MessagingError> {
    Ok(db
        .contact_list()?
        .iter()
        .filter(|c| c.auto_added && !c.blocked)
        .count())
}

fn reason_name(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::Malformed => "malformed",
        RejectReason::WrongParty => "wrong_party",
        RejectReason::Undecryptable => "undecryptable",
        RejectReason::RateLimited => "rate_limited",
        RejectReason::Unavailable => "unavailable",
        RejectReason::TooEarly => "too_early",
    }
}

/// Why a whole batch request is refused.
enum Refused {
    /// Empty or too many envelopes.
    Malformed,
    /// From a blocked peer: no answer at all.
    Blocked,
}

impl From<Refused> for Inbound {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Malformed => {
                Inbound::Respond(Response::Rejected(MsgId([0; 16]), RejectReason::Malformed))
            }
            Refused::Blocked => Inbound::Drop,
        }
    }
}

/// How an envelope reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// In a `/tern/msg/1` request or a relay page: stored, rate-limited per peer.
    Request,
    /// An ephemeral request (typing): processed, never stored.
    Ephemeral,
    /// A receipt in the answer to our own request: stored, not rate-limited.
    Answer,
}

enum Inbound {
    Respond(Response),
    Drop,
}

struct Opened {
    content: Content,
    sessions: Vec<Session>,
    prekeys: Option<LocalPrekeys>,
    new_identity: Option<crate::crypto::IdentityPublic>,
}

/// Sends a peer's items in order, up to [`DELIVERY_WINDOW`] requests and [`DELIVERY_AHEAD`]
/// envelopes in flight, stopping at the first transport failure.
async fn deliver(
    net: NetHandle,
    target: Target,
    items: Vec<OutboxItem>,
    known_offline: bool,
    results: mpsc::Sender<DeliveryResult>,
) -> DeliveryResult {
    let Target {
        peer,
        peer_id,
        addrs,
        mailbox,
        resent,
    } = target;
    // What was taken and is not answered yet (handed to the relays if the peer fails us).
    let mut open: std::collections::BTreeMap<MsgId, OutboxItem> =
        items.iter().map(|i| (i.id, i.clone())).collect();
    let mut outcomes = Vec::new();
    let mut progressed = false;
    let mut failure = known_offline.then(|| "the recipient is offline".to_string());
    // The recipient could not decrypt our session: what is left is not handed to its
    // relays (it could not decrypt it there either), but stays queued for the new session
    // the actor starts.
    let mut lost_session = false;
    // The failure is the recipient refusing for now (it is reachable, so no relay).
    let mut refused = false;
    let items = if known_offline { Vec::new() } else { items };
    // The last item taken, while the actor may have more after it: only a full batch says
    // so (a short one emptied the queue; what is queued later gets the next attempt).
    let full = |round: &[OutboxItem]| DELIVERY_ROUND.filled_by(round);
    let mut cursor = items.last().filter(|_| full(&items)).map(|i| i.id);
    let mut in_flight = FuturesOrdered::new();
    let mut envelopes_in_flight = 0;
    // A profile opens a new session: it goes alone, so the recipient knows who writes before
    // the first message arrives.
    let mut window = if items.first().is_some_and(|i| i.kind == OutKind::Profile) {
        1
    } else {
        DELIVERY_WINDOW
    };
    // Envelopes travel in batches whose answers are the receipts; a recipient from before
    // gets batches answered with a sealed receipt, plain batches, or one envelope per request.
    let mut mode = Framing::Confirmed;
    let mut queue: std::collections::VecDeque<OutboxItem> = items.into();
    let mut receipts = Vec::new();
    loop {
        // Running low: ask the actor for the items queued after the last one taken, so the
        // requests keep flowing instead of stopping for a new attempt.
        if failure.is_none()
            && queue.is_empty()
            && in_flight.len() <= window / 2
            && let Some(after) = cursor
        {
            let (reply, more) = oneshot::channel();
            let ask = DeliveryResult {
                peer,
                outcomes: std::mem::take(&mut outcomes),
                receipts: Vec::new(),
                failure: None,
                refused: false,
                last: false,
                token_refused: false,
                progressed,
                more: Some((after, reply)),
            };
            let more = match results.send(ask).await {
                Ok(()) => more.await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            cursor = more.last().filter(|_| full(&more)).map(|i| i.id);
            open.extend(more.iter().map(|i| (i.id, i.clone())));
            queue.extend(more);
        }
        while failure.is_none() && in_flight.len() < window && envelopes_in_flight < DELIVERY_AHEAD
        {
            let framing = mode;
            let mut sent = take_request(&mut queue, framing != Framing::Single && window > 1);
            if sent.is_empty() {
                break;
            }
            let mut envelopes = Vec::with_capacity(sent.len());
            sent.retain(|item| match Envelope::from_bytes(&item.envelope) {
                Ok(env) => {
                    envelopes.push(env);
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "corrupt outbox item skipped");
                    open.remove(&item.id);
                    outcomes.push((item.id, Outcome::Rejected(RejectReason::Malformed)));
                    false
                }
            });
            let request = match (framing, envelopes.len()) {
                (_, 0) => continue,
                (Framing::Confirmed, _) => Request::DeliverConfirmed(envelopes),
                (Framing::Receipted, _) => Request::DeliverReceipted(envelopes),
                (_, 1) => Request::Deliver(envelopes.remove(0)),
                _ => Request::DeliverBatch(envelopes),
            }
            .to_bytes();
            let net = net.clone();
            let addrs = addrs.clone();
            envelopes_in_flight += sent.len();
            in_flight.push_back(async move {
                (framing, sent, net.request(peer_id, addrs, request).await)
            });
        }
        let Some((framing, sent, result)) = in_flight.next().await else {
            break;
        };
        window = DELIVERY_WINDOW;
        let n = sent.len();
        envelopes_in_flight -= n;
        let answers = match read_answer(framing, n, result.map_err(|e| e.to_string())) {
            Answered::Answers(answers, receipt) => {
                receipts.extend(receipt);
                answers
            }
            Answered::Older(older) => {
                // A recipient from before this framing: send these again, the older way.
                mode = mode.min(older);
                for item in sent.into_iter().rev() {
                    queue.push_front(item);
                }
                continue;
            }
            Answered::Failed(why) => {
                failure.get_or_insert(why);
                continue;
            }
        };
        for (item, answer) in sent.iter().zip(answers) {
            let id = item.id;
            let outcome = match answer {
                Response::Stored(got) | Response::Seen(got) if got == id => Outcome::Stored,
                Response::Delivered(got) if got == id => Outcome::Delivered,
                Response::Rejected(_, reason) => {
                    if reason.is_transient() && failure.is_none() {
                        failure = Some(format!("recipient answered {reason:?}"));
                        refused = true;
                    }
                    lost_session |= reason == RejectReason::Undecryptable;
                    Outcome::Rejected(reason)
                }
                other => {
                    failure.get_or_insert_with(|| format!("unexpected answer {other:?}"));
                    continue;
                }
            };
            progressed |= matches!(outcome, Outcome::Stored | Outcome::Delivered);
            open.remove(&id);
            outcomes.push((id, outcome));
        }
        // Each answer is recorded as it comes (outbox, states, events), except the last,
        // which goes with the end of the attempt (one actor turn, not two, before what is
        // queued next can go).
        let finishing =
            in_flight.is_empty() && (failure.is_some() || (queue.is_empty() && cursor.is_none()));
        if finishing {
            continue;
        }
        let partial = DeliveryResult {
            peer,
            outcomes: std::mem::take(&mut outcomes),
            receipts: std::mem::take(&mut receipts),
            failure: None,
            refused: false,
            last: false,
            token_refused: false,
            progressed,
            more: None,
        };
        if results.send(partial).await.is_err() {
            failure.get_or_insert_with(|| "the messaging task stopped".to_string());
        }
    }
    // The recipient could not be reached: hand what was not delivered to its relays.
    let mut token_refused = false;
    if let (Some(_), Some(mb)) = (&failure, &mailbox) {
        let rest: Vec<OutboxItem> = open.into_values().collect();
        if !rest.is_empty() && !refused && !lost_session {
            let n = rest.len();
            let deposited = mailbox::deposit(&net, peer_id, mb, rest, &resent, now_ms()).await;
            let stored = deposited.stored;
            if deposited.token_refused {
                token_refused = true;
                let relays = "the recipient's relays no longer take our messages for it (it \
                     removed or blocked us, moved its mailbox, or has not been back for months): \
                     they wait until it can be reached directly";
                failure = Some(match failure {
                    Some(direct) if !known_offline => format!("{direct}; {relays}"),
                    _ => relays.to_string(),
                });
            }
            tracing::debug!(
                deposited = stored.len(),
                of = n,
                "deposited at the recipient's relays"
            );
            if stored.len() == n {
                // Everything is durable somewhere: this attempt did not fail.
                failure = None;
            }
            progressed |= !stored.is_empty();
            outcomes.extend(
                stored
                    .into_iter()
                    .map(|(id, until)| (id, Outcome::Relayed(until))),
            );
        }
    }
    DeliveryResult {
        peer,
        outcomes,
        receipts,
        failure,
        refused,
        last: true,
        token_refused,
        progressed,
        more: None,
    }
}

/// Where a delivery goes.
struct Target {
    peer: PeerKey,
    peer_id: PeerId,
    addrs: Vec<Multiaddr>,
    mailbox: Option<mailbox::ContactMailbox>,
    /// Ids a relay may hold an older envelope under ([`Again::resent`]).
    resent: HashSet<MsgId>,
}

/// What the answer to one request of a delivery says.
#[derive(Debug, PartialEq)]
enum Answered {
    /// One answer per envelope sent, in order, and the receipt that came with them.
    Answers(Vec<Response>, Option<Envelope>),
    /// The recipient predates this framing: send the same envelopes again in this one.
    Older(Framing),
    /// The request failed (network, or an answer that does not fit the request).
    Failed(String),
}

/// Judges the answer (or the network error) to a request of `n` envelopes framed as
/// `framing`. Pure, so the fallback rules have their own tests.
fn read_answer(framing: Framing, n: usize, result: Result<Vec<u8>, String>) -> Answered {
    let response = match result.map(|b| Response::from_bytes(&b)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Answered::Failed(format!("bad answer: {e}")),
        Err(e) => return Answered::Failed(e),
    };
    match response {
        Response::Receipted(answers, receipt)
            if framing == Framing::Receipted && answers.len() == n =>
        {
            Answered::Answers(answers.into_iter().map(Response::from).collect(), receipt)
        }
        // `Delivered` answers only to the framing that asks for them.
        Response::Batch(answers)
            if answers.len() == n
                && (framing == Framing::Confirmed
                    || (framing == Framing::Batch
                        && n > 1
                        && !answers
                            .iter()
                            .any(|a| matches!(a, wire::Answer::Delivered(_))))) =>
        {
            Answered::Answers(answers.into_iter().map(Response::from).collect(), None)
        }
        Response::Rejected(_, RejectReason::Malformed)
            if framing >= Framing::Receipted || (framing == Framing::Batch && n > 1) =>
        {
            Answered::Older(framing.older())
        }
        answer @ (Response::Stored(_) | Response::Seen(_) | Response::Rejected(..))
            if framing <= Framing::Batch && n == 1 =>
        {
            Answered::Answers(vec![answer], None)
        }
        other => Answered::Failed(format!("unexpected answer {other:?}")),
    }
}

/// How envelopes are framed into `/tern/msg/1` requests, newest first (ordered so that
/// falling back is `min`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Framing {
    /// One envelope per [`Request::Deliver`] (the first release).
    Single,
    /// [`Request::DeliverBatch`].
    Batch,
    /// [`Request::DeliverReceipted`]: batches answered with the recipient's receipt.
    Receipted,
    /// [`Request::DeliverConfirmed`]: batches whose answers are the `delivered` receipts.
    Confirmed,
}

impl Framing {
    /// The framing a recipient that refused this one as malformed understands.
    fn older(self) -> Self {
        match self {
            Self::Confirmed => Self::Receipted,
            Self::Receipted => Self::Batch,
            Self::Batch | Self::Single => Self::Single,
        }
    }
}

/// Takes the items of the next `/tern/msg/1` request off the front of `queue`, in order:
/// one (when not `batch`), or as many as fit [`wire::MAX_BATCH_ENVELOPES`] and
/// [`wire::MAX_BATCH_BYTES`] (an envelope larger than that goes alone). Empty when `queue` is.
fn take_request(
    queue: &mut std::collections::VecDeque<OutboxItem>,
    batch: bool,
) -> Vec<OutboxItem> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    let mut bytes = first.envelope.len();
    let mut taken = vec![first];
    while batch && taken.len() < wire::MAX_BATCH_ENVELOPES {
        match queue.front() {
            Some(next) if bytes + next.envelope.len() <= wire::MAX_BATCH_BYTES => {
                bytes += next.envelope.len();
                taken.extend(queue.pop_front());
            }
            _ => break,
        }
    }
    taken
}

/// How long an accepted envelope's id is remembered for deduplication: far beyond the
/// largest message TTL a sender uses by default (7 days).
pub const SEEN_RETENTION: Duration = Duration::from_secs(60 * 24 * 3600);
/// Envelopes whose id is older than this are refused as stale: a day less than
/// [`SEEN_RETENTION`], so every id young enough to be taken still has its dedup marker.
pub const STALE_AFTER: Duration = Duration::from_secs(59 * 24 * 3600);
/// Envelopes whose id is dated further ahead than this are refused: a marker is kept 60
/// days past its id's time, so without a bound a peer could make markers that are never
/// pruned.
pub const FUTURE_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most decoded sessions kept in memory.
const SESSION_CACHE_CAP: usize = 4096;
/// How often the dedup set is pruned.
const SEEN_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Most ids in one receipt, so a receipt always fits a frame.
const MAX_RECEIPT_IDS: usize = 1000;

/// A decoded session and the stored bytes it was decoded from (they hold its keys: wiped
/// when dropped).
type CachedSession = (zeroize::Zeroizing<Vec<u8>>, Session);

/// A batch whose flush runs, with what it releases when the flush ends.
struct Flushing {
    task: FlushTask,
    after_flush: Vec<AfterFlush>,
    responses: Vec<(ResponseChannel<Vec<u8>>, Vec<u8>)>,
    undo: Vec<(PeerKey, MsgId, Option<u64>)>,
    /// Marks of the owed key rotations it makes durable ([`Actor::settle_rekeys`]).
    settled: Vec<Vec<u8>>,
    /// Whether it covers recorded answers ([`LazyFlush`]).
    recorded: bool,
}

/// Which queued envelopes are not durable yet: those of the batch being flushed and of the
/// current batch, by peer (the first id of each; ids only grow, so the ones after it are
/// not durable either). Nothing recorded here leaves before it is on disk, the ratchet state
/// that sealed it included: a crash must not make the next start seal another message with
/// the same key. (Envelopes whose chain positions a durable reservation covers are not
/// recorded: [`reserve`] makes a start skip past them instead.) Pure: the actor reports
/// queuing and flushes.
#[derive(Debug, Default)]
struct NotDurable {
    flushing: HashMap<PeerKey, MsgId>,
    current: HashMap<PeerKey, MsgId>,
}

impl NotDurable {
    /// `id` (and what follows) was queued for `peer` in the current batch.
    fn queued(&mut self, peer: PeerKey, id: MsgId) {
        let first = self.current.entry(peer).or_insert(id);
        *first = (*first).min(id);
    }

    /// The current batch's flush starts (the previous one ended).
    fn flush_started(&mut self) {
        debug_assert!(self.flushing.is_empty(), "one flush at a time");
        self.flushing = std::mem::take(&mut self.current);
    }

    /// The running flush ended. Returns the peers whose envelopes became durable. If it
    /// failed, none did: they stay held back with the current batch's (withdrawing them can
    /// fail too, on a broken store), until a later flush succeeds.
    fn flush_done(&mut self, ok: bool) -> Vec<PeerKey> {
        let batch = std::mem::take(&mut self.flushing);
        if ok {
            return batch.into_keys().collect();
        }
        for (peer, id) in batch {
            let first = self.current.entry(peer).or_insert(id);
            *first = (*first).min(id);
        }
        Vec::new()
    }

    /// The first of `peer`'s envelopes that is not durable yet, if any. Usually the
    /// flushing batch's, but a session restart queues envelopes under older ids.
    fn first(&self, peer: &PeerKey) -> Option<MsgId> {
        match (self.flushing.get(peer), self.current.get(peer)) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    /// `items` (`peer`'s queue, in order) without the ones not durable yet.
    fn durable_only(&self, peer: &PeerKey, mut items: Vec<OutboxItem>) -> Vec<OutboxItem> {
        if let Some(first) = self.first(peer) {
            items.retain(|i| i.id < first);
        }
        items
    }
}

/// When recorded answers (writes that need no flush of their own) must be flushed: at most
/// [`BOOKKEEPING_FLUSH`] after the first one, or [`FAILED_FLUSH_RETRY`] after a failed
/// flush (not at once in a loop). Pure: times are given.
#[derive(Debug, Default)]
struct LazyFlush {
    due: Option<Instant>,
}

impl LazyFlush {
    /// An answer was recorded at `now`.
    fn recorded(&mut self, now: Instant) {
        self.due.get_or_insert(now + BOOKKEEPING_FLUSH);
    }

    /// When a flush is due, if anything waits for one.
    fn deadline(&self) -> Option<Instant> {
        self.due
    }

    /// Whether a flush is due at `now`.
    fn due(&self, now: Instant) -> bool {
        self.due.is_some_and(|due| now >= due)
    }

    /// A flush starts: it covers everything recorded so far. Returns whether anything was.
    fn flush_started(&mut self) -> bool {
        self.due.take().is_some()
    }

    /// A flush failed at `now`; `covered` is what [`Self::flush_started`] said. What it
    /// covered, and what was recorded since, is tried again later.
    fn failed(&mut self, covered: bool, now: Instant) {
        if covered || self.due.is_some() {
            self.due = Some(now + FAILED_FLUSH_RETRY);
        }
    }
}

/// Turns a `TooEarly` refusal that has lasted [`TOO_EARLY_LIMIT`] (counted in `since`, by
/// message) into a permanent one, so the message fails, and forgets the refusals of
/// messages answered otherwise. Pure: `now` is given.
fn give_up_too_early(
    since: &mut HashMap<(PeerKey, MsgId), Instant>,
    peer: &PeerKey,
    outcomes: Vec<(MsgId, Outcome)>,
    now: Instant,
) -> Vec<(MsgId, Outcome)> {
    let refused = |o: &Outcome| matches!(o, Outcome::Rejected(RejectReason::TooEarly));
    if since.is_empty() && !outcomes.iter().any(|(_, o)| refused(o)) {
        return outcomes;
    }
    if since.len() > 65_536 {
        // Refusals of messages that left the outbox otherwise (expired, contact removed).
        since.retain(|_, t| now.saturating_duration_since(*t) < 2 * TOO_EARLY_LIMIT);
    }
    outcomes
        .into_iter()
        .map(|(id, outcome)| {
            if !refused(&outcome) {
                since.remove(&(*peer, id));
                return (id, outcome);
            }
            let first = *since.entry((*peer, id)).or_insert(now);
            if now.saturating_duration_since(first) >= TOO_EARLY_LIMIT {
                since.remove(&(*peer, id));
                (id, Outcome::GaveUp(TOO_EARLY_GIVEN_UP))
            } else {
                (id, outcome)
            }
        })
        .collect()
}

/// Whether a new session could do better than the session an outbox envelope was sealed
/// in, if the recipient could not decrypt it: yes for a session it had accepted (a normal
/// message: it has lost that session), and for one started from a one-time prekey it may
/// have used up since; no for one started from its signed prekey alone, which is how a new
/// session would start too. So restarts never loop: the second start has no one-time
/// prekey (it was used once).
fn restart_may_help(envelope: &[u8]) -> bool {
    sealed_message(envelope).is_some_and(|m| match m {
        Message::Normal(_) => true,
        Message::PreKey(pk) => pk.one_time_prekey_id().is_some(),
    })
}

/// Whether a response to a direct request stored at least one envelope (typing is
/// answered `Seen`, refusals `Rejected`).
fn stored_any(response: &Response) -> bool {
    let stored =
        |a: &wire::Answer| matches!(a, wire::Answer::Stored(_) | wire::Answer::Delivered(_));
    match response {
        Response::Stored(_) | Response::Delivered(_) => true,
        Response::Batch(answers) | Response::Receipted(answers, _) => answers.iter().any(stored),
        Response::Seen(_) | Response::Rejected(..) => false,
    }
}

/// Whether an outbox envelope is a session's first flight (a prekey message).
fn first_flight(envelope: &[u8]) -> bool {
    matches!(sealed_message(envelope), Some(Message::PreKey(_)))
}

/// The ratchet message an outbox envelope carries, if it decodes.
fn sealed_message(envelope: &[u8]) -> Option<Message> {
    Envelope::from_bytes(envelope)
        .ok()
        .and_then(|e| Message::from_bytes(&e.ciphertext).ok())
}

/// The event saying that `id` reached `state`; `labels` are the peer's id and contact name.
fn receipt_event(id: &MsgId, labels: &(String, String), state: &str) -> EventKind {
    EventKind::Receipt {
        id: id.to_hex(),
        peer_id: labels.0.clone(),
        to: labels.1.clone(),
        state: state.to_string(),
    }
}

/// Whether `text` may be sent: not empty, at most [`MAX_TEXT_BYTES`].
fn check_text(text: &str) -> Result<(), MessagingError> {
    if text.is_empty() {
        return Err(MessagingError::Empty);
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(MessagingError::TooLarge {
            len: text.len(),
            max: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

/// Receipts for `ids`, split so that each fits a frame.
fn receipt_contents(kind: ReceiptKind, ids: &[MsgId]) -> Vec<(Content, OutKind)> {
    ids.chunks(MAX_RECEIPT_IDS)
        .map(|chunk| {
            (
                Content::Receipt {
                    kind,
                    ids: chunk.to_vec(),
                },
                OutKind::Receipt(kind),
            )
        })
        .collect()
}

/// Moves message `id` to `state` unless it is already further along; returns the rank of
/// the state it left when it changed.
fn set_state(
    tx: &Tx<'_>,
    db: &MessagingDb,
    peer: &PeerKey,
    id: &MsgId,
    state: MsgState,
) -> Result<Option<u8>, TxError> {
    let Some(hk) = tx.get(&db.index, &peer_id_key(peer, id))? else {
        return Ok(None);
    };
    let Some(mut m) = tx.get(&db.history, &hk)? else {
        return Ok(None);
    };
    let failing = matches!(state, MsgState::Failed(_));
    let was_failed = matches!(m.state, MsgState::Failed(_));
    // The recipient's word that it has the message beats our giving up on it (a relay's
    // hold ended, or an answer was lost before the text expired).
    let receipt_after_failure =
        was_failed && m.outgoing && matches!(state, MsgState::Delivered | MsgState::Read);
    // A message the recipient stored (its receipt may have overtaken a lost acknowledgement)
    // never turns into a failure; one a relay held does, once the relay dropped it.
    // A text queued again after a relay held it is `stored`: the recipient's answer moves it
    // on to `sent` (the same rank).
    let stored_now_sent = m.state == MsgState::Stored && state == MsgState::Sent;
    if m.state == state
        || (!failing && !was_failed && !stored_now_sent && state.rank() <= m.state.rank())
        || (failing
            && m.outgoing
            && m.state.rank() >= MsgState::Sent.rank()
            && m.state != MsgState::Stored)
        || (was_failed && !receipt_after_failure)
    {
        return Ok(None);
    }
    let previous = if receipt_after_failure {
        MsgState::Sent.rank()
    } else {
        m.state.rank()
    };
    m.state = state;
    tx.insert(&db.history, &hk, &m)?;
    Ok(Some(previous))
}

/// The state of message `id` with `peer`, if there is one.
fn message_state(
    tx: &Tx<'_>,
    db: &MessagingDb,
    peer: &PeerKey,
    id: &MsgId,
) -> Result<Option<MsgState>, TxError> {
    let Some(hk) = tx.get(&db.index, &peer_id_key(peer, id))? else {
        return Ok(None);
    };
    Ok(tx.get(&db.history, &hk)?.map(|m| m.state))
}

/// The outgoing states passed when moving from rank `previous` to `state`, in order.
fn progress_names(previous: u8, state: &MsgState) -> Vec<&'static str> {
    const OUTGOING: [(u8, &str); 3] = [(1, "sent"), (2, "delivered"), (3, "read")];
    OUTGOING
        .iter()
        .filter(|(rank, _)| *rank > previous && *rank <= state.rank())
        .map(|(_, name)| *name)
        .collect()
}

/// Whether `id` is an outgoing message to `peer` (receipts only move our own messages).
fn owned_outgoing(
    tx: &Tx<'_>,
    db: &MessagingDb,
    id: &MsgId,
    peer: &PeerKey,
) -> Result<bool, TxError> {
    let Some(hk) = tx.get(&db.index, &peer_id_key(peer, id))? else {
        return Ok(false);
    };
    Ok(tx
        .get(&db.history, &hk)?
        .is_some_and(|m| m.outgoing && m.peer == *peer))
}

fn history_item(m: &StoredMessage, contact: &str) -> HistoryItem {
    let (from, to) = if m.outgoing {
        ("me".to_string(), contact.to_string())
    } else {
        (contact.to_string(), "me".to_string())
    };
    HistoryItem {
        id: m.id.to_hex(),
        from,
        to,
        text: m.text.clone(),
        timestamp: m.timestamp,
        state: m.state.name().to_string(),
        error: match &m.state {
            MsgState::Failed(e) => Some(e.clone()),
            _ => None,
        },
    }
}

fn merge_addrs(into: &mut Vec<Multiaddr>, new: &[Multiaddr]) {
    for a in new {
        if !into.contains(a) {
            into.push(a.clone());
        }
    }
    // Keep the newest few.
    let excess = into.len().saturating_sub(8);
    into.drain(..excess);
}

fn hex_short(key: &PeerKey) -> String {
    data_encoding::HEXLOWER.encode(&key[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lost_session_or_a_used_one_time_prekey_is_worth_a_restart() {
        let mut r = crate::crypto::tests::rng(9);
        let sealed = |session: &mut Session, r: &mut rand_chacha::ChaCha20Rng| {
            let message = session.encrypt(r, b"hi", b"").unwrap();
            Envelope {
                id: MsgId([1; 16]),
                sender: [2; 32],
                recipient: [3; 32],
                ciphertext: message.to_bytes(),
            }
            .to_bytes()
        };
        // A session the recipient had accepted (normal messages): it lost it.
        let (mut alice, _bob) = crate::crypto::tests::established(&mut r);
        assert!(restart_may_help(&sealed(&mut alice, &mut r)));
        // The first messages of a session started from a one-time prekey (it may be used up).
        let mut p = crate::crypto::tests::pair(&mut r, true);
        assert!(restart_may_help(&sealed(&mut p.alice_session, &mut r)));
        // From the signed prekey alone: a new session would start the same way.
        let mut p = crate::crypto::tests::pair(&mut r, false);
        assert!(!restart_may_help(&sealed(&mut p.alice_session, &mut r)));
        // What does not decode is not sent again.
        assert!(!restart_may_help(b"garbage"));
    }

    #[tokio::test]
    async fn a_current_thread_runtime_never_flushes_in_place() {
        assert!(!can_block_in_place());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_in_place_reports_its_result_and_survives_a_panic() {
        assert!(can_block_in_place());
        let store = crate::store::Store::temporary().unwrap();
        assert!(flush_in_place(|| store.flush_blocking()).is_ok());
        let failed = flush_in_place(|| Err(StoreError::Broken("disk gone".into())));
        assert!(matches!(failed, Err(StoreError::Broken(why)) if why == "disk gone"));
        let panicked = flush_in_place(|| panic!("a bug in the flush"));
        assert!(
            matches!(panicked, Err(StoreError::Broken(why))
                if why.contains("panicked") && why.contains("a bug in the flush")),
            "a panic is a failed flush"
        );
        // The task and its runtime go on.
        assert!(flush_in_place(|| store.flush_blocking()).is_ok());
    }

    #[test]
    fn a_start_moves_reserved_chains_on_once_and_clears_the_reservations() {
        let db = MessagingDb::open(&crate::store::Store::temporary().unwrap()).unwrap();
        let mut r = crate::crypto::tests::rng(7);
        let (alice, mut bob) = crate::crypto::tests::following(&mut r);
        let at = alice.sending_position().unwrap();
        let peer = [5u8; 32];
        let record = SessionRecord {
            current: alice.to_bytes().unwrap().to_vec(),
            previous: Vec::new(),
        };
        db.sessions.insert(&peer, &record).unwrap();
        let reserved = reserve::Reservation {
            chain: at.ratchet_key,
            until: at.index + reserve::RESERVE,
        };
        db.send_reserved.insert(&peer, &reserved).unwrap();
        // A reservation of a peer without a session is dropped.
        db.send_reserved.insert(&[6u8; 32], &reserved).unwrap();
        // The same chain in a previous session (it can become current again) moves too;
        // another current session on another chain does not.
        let other = [9u8; 32];
        let (carol, _) = crate::crypto::tests::following(&mut r);
        let carol_at = carol.sending_position().unwrap();
        let with_previous = SessionRecord {
            current: carol.to_bytes().unwrap().to_vec(),
            previous: vec![alice.to_bytes().unwrap().to_vec()],
        };
        db.sessions.insert(&other, &with_previous).unwrap();
        db.send_reserved.insert(&other, &reserved).unwrap();
        assert_eq!(skip_reserved_positions(&db).unwrap(), 2);
        let stored = db.sessions.get(&other).unwrap().unwrap();
        let current = Session::from_bytes(&stored.current).unwrap();
        assert_eq!(current.sending_position(), Some(carol_at));
        let previous = Session::from_bytes(&stored.previous[0]).unwrap();
        assert_eq!(previous.sending_position(), Some(reserved.position()));
        let stored = db.sessions.get(&peer).unwrap().unwrap();
        let mut moved = Session::from_bytes(&stored.current).unwrap();
        assert_eq!(moved.sending_position(), Some(reserved.position()));
        assert!(db.send_reserved.scan_prefix(&[]).unwrap().is_empty());
        assert_eq!(skip_reserved_positions(&db).unwrap(), 0, "nothing left");
        // The recipient reads what is sealed next (it skips the reserved positions).
        let m = moved.encrypt(&mut r, b"after", b"").unwrap();
        assert_eq!(m.ratchet_message().header().index, reserved.until);
        assert_eq!(bob.decrypt(&m, b"").unwrap(), b"after");
    }

    #[test]
    fn requests_take_the_queue_in_order_within_the_batch_limits() {
        let item = |n: u8, len: usize| OutboxItem {
            id: MsgId([n; 16]),
            peer: [0; 32],
            envelope: vec![0; len],
            kind: OutKind::Text,
            created_at: 0,
            expires_at: 1,
        };
        let ids = |v: &[OutboxItem]| v.iter().map(|i| i.id.0[0]).collect::<Vec<u8>>();
        let mut queue: std::collections::VecDeque<OutboxItem> =
            (0..100).map(|n| item(n, 100)).collect();
        assert_eq!(ids(&take_request(&mut queue, false)), vec![0]);
        assert_eq!(
            ids(&take_request(&mut queue, true)),
            (1..=64).collect::<Vec<u8>>()
        );
        assert_eq!(
            ids(&take_request(&mut queue, true)),
            (65..100).collect::<Vec<u8>>()
        );
        assert!(take_request(&mut queue, true).is_empty());
        // Bytes: 40 KiB + 30 KiB do not fit in 64 KiB; an oversize envelope goes alone.
        let mut queue: std::collections::VecDeque<OutboxItem> = [
            item(1, 40 * 1024),
            item(2, 30 * 1024),
            item(3, 90 * 1024),
            item(4, 10),
        ]
        .into();
        for n in 1..=4 {
            assert_eq!(ids(&take_request(&mut queue, true)), vec![n]);
        }
    }

    #[test]
    fn answers_fall_back_one_framing_at_a_time_and_must_fit_the_request() {
        let id = |i: u8| MsgId([i; 16]);
        let bytes = |r: Response| Ok(r.to_bytes());
        let malformed = || bytes(Response::Rejected(id(0), RejectReason::Malformed));
        let receipt = Envelope {
            id: id(9),
            sender: [2; 32],
            recipient: [1; 32],
            ciphertext: vec![1, 2, 3],
        };
        // The newest framing: the answers are the receipts.
        let two = vec![wire::Answer::Stored(id(1)), wire::Answer::Stored(id(2))];
        let confirmed = vec![wire::Answer::Delivered(id(1)), wire::Answer::Stored(id(2))];
        assert_eq!(
            read_answer(
                Framing::Confirmed,
                2,
                bytes(Response::Batch(confirmed.clone()))
            ),
            Answered::Answers(
                vec![Response::Delivered(id(1)), Response::Stored(id(2))],
                None
            )
        );
        // The one before: answers and a sealed receipt.
        assert_eq!(
            read_answer(
                Framing::Receipted,
                2,
                bytes(Response::Receipted(two.clone(), Some(receipt.clone())))
            ),
            Answered::Answers(
                vec![Response::Stored(id(1)), Response::Stored(id(2))],
                Some(receipt)
            )
        );
        // A recipient from before: Confirmed -> Receipted -> Batch -> Single, for any size.
        assert_eq!(
            read_answer(Framing::Confirmed, 1, malformed()),
            Answered::Older(Framing::Receipted)
        );
        assert_eq!(
            read_answer(Framing::Receipted, 1, malformed()),
            Answered::Older(Framing::Batch)
        );
        assert_eq!(
            read_answer(Framing::Batch, 2, malformed()),
            Answered::Older(Framing::Single)
        );
        // One envelope alone: a refusal is that envelope's answer, not a fallback.
        assert_eq!(
            read_answer(Framing::Single, 1, malformed()),
            Answered::Answers(
                vec![Response::Rejected(id(0), RejectReason::Malformed)],
                None
            )
        );
        // Answers that do not fit the request fail it.
        for (framing, n, answer) in [
            (
                Framing::Receipted,
                3,
                Response::Receipted(two.clone(), None),
            ),
            (Framing::Receipted, 2, Response::Batch(two.clone())),
            (Framing::Receipted, 1, Response::Stored(id(1))),
            (Framing::Batch, 2, Response::Receipted(two.clone(), None)),
            (Framing::Single, 1, Response::Batch(two.clone())),
            (Framing::Confirmed, 3, Response::Batch(two.clone())),
            (Framing::Confirmed, 1, Response::Stored(id(1))),
            (Framing::Confirmed, 1, Response::Delivered(id(1))),
            (
                Framing::Confirmed,
                2,
                Response::Receipted(two.clone(), None),
            ),
            // `Delivered` is an answer only the newest framing asks for.
            (Framing::Batch, 2, Response::Batch(confirmed.clone())),
            (Framing::Single, 1, Response::Delivered(id(1))),
        ] {
            assert!(
                matches!(read_answer(framing, n, bytes(answer)), Answered::Failed(_)),
                "{framing:?} {n}"
            );
        }
        assert!(matches!(
            read_answer(Framing::Batch, 2, Ok(vec![9, 9])),
            Answered::Failed(m) if m.starts_with("bad answer")
        ));
        assert_eq!(
            read_answer(Framing::Single, 1, Err("dial failed".into())),
            Answered::Failed("dial failed".into())
        );
    }

    #[test]
    fn only_envelopes_of_finished_flushes_are_deliverable() {
        let (p, q) = ([1; 32], [2; 32]);
        let item = |n: u8| OutboxItem {
            id: MsgId([n; 16]),
            peer: p,
            envelope: Vec::new(),
            kind: OutKind::Text,
            created_at: 0,
            expires_at: u64::MAX,
        };
        let ids = |items: Vec<OutboxItem>| items.iter().map(|i| i.id.0[0]).collect::<Vec<_>>();
        let queue = || (1..=6).map(item).collect::<Vec<_>>();
        let mut nd = NotDurable::default();
        // 1 and 2 were durable before; 3 and 4 are queued in the current batch.
        nd.queued(p, MsgId([3; 16]));
        nd.queued(p, MsgId([4; 16]));
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2]);
        assert_eq!(nd.first(&q), None);
        // Its flush runs while 5 and 6 are queued in the next batch: still not 3 or 4.
        nd.flush_started();
        nd.queued(p, MsgId([5; 16]));
        nd.queued(q, MsgId([6; 16]));
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2]);
        assert_eq!(nd.first(&q), Some(MsgId([6; 16])));
        // It ends: 3 and 4 may go, not 5.
        assert_eq!(nd.flush_done(true), vec![p]);
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2, 3, 4]);
        // The next flush (of 5 and 6) fails: nothing becomes deliverable, and they stay
        // held back, with 7 queued meanwhile, until a flush succeeds.
        nd.flush_started();
        nd.queued(p, MsgId([7; 16]));
        assert!(nd.flush_done(false).is_empty());
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2, 3, 4]);
        assert_eq!(nd.first(&q), Some(MsgId([6; 16])));
        nd.flush_started();
        let mut durable = nd.flush_done(true);
        durable.sort();
        assert_eq!(durable, vec![p, q]);
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2, 3, 4, 5, 6]);
        assert_eq!(nd.first(&q), None);
        // A session restart queues envelopes under older ids, also below those of the
        // running flush and of earlier ones in its own batch: none of them goes early.
        nd.queued(p, MsgId([6; 16]));
        nd.flush_started();
        nd.queued(p, MsgId([5; 16]));
        nd.queued(p, MsgId([3; 16]));
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2]);
        assert_eq!(nd.flush_done(true), vec![p]);
        assert_eq!(ids(nd.durable_only(&p, queue())), [1, 2]);
    }

    #[test]
    fn recorded_answers_are_flushed_within_the_deadline_and_retried_after_a_failure() {
        let t0 = Instant::now();
        let mut lazy = LazyFlush::default();
        assert_eq!(lazy.deadline(), None);
        assert!(!lazy.due(t0 + Duration::from_secs(3600)));
        // The first answer sets the deadline; later ones do not move it.
        lazy.recorded(t0);
        lazy.recorded(t0 + Duration::from_millis(30));
        assert_eq!(lazy.deadline(), Some(t0 + BOOKKEEPING_FLUSH));
        assert!(!lazy.due(t0 + BOOKKEEPING_FLUSH - Duration::from_millis(1)));
        assert!(lazy.due(t0 + BOOKKEEPING_FLUSH));
        // A flush starts: it covers them, nothing waits any more.
        let t1 = t0 + BOOKKEEPING_FLUSH;
        assert!(lazy.flush_started());
        assert_eq!(lazy.deadline(), None);
        // It failed: retried a second later, not at once.
        lazy.failed(true, t1);
        assert!(!lazy.due(t1 + BOOKKEEPING_FLUSH));
        assert!(lazy.due(t1 + FAILED_FLUSH_RETRY));
        // The retry covers them; it succeeds: nothing waits.
        assert!(lazy.flush_started());
        assert!(!lazy.flush_started());
        assert_eq!(lazy.deadline(), None);
        // A failed flush that covered nothing, with nothing recorded since, schedules nothing.
        lazy.failed(false, t1);
        assert_eq!(lazy.deadline(), None);
        // One recorded while a flush ran is due after a failure, a second later.
        lazy.recorded(t1);
        lazy.failed(false, t1);
        assert_eq!(lazy.deadline(), Some(t1 + FAILED_FLUSH_RETRY));
    }

    #[test]
    fn states_only_move_forward_but_a_relay_hold_can_fail_and_a_receipt_beats_a_failure() {
        let db = MessagingDb::open(&crate::store::Store::temporary().unwrap()).unwrap();
        let peer = [3; 32];
        let put = |n: u8, state: MsgState| {
            let m = StoredMessage {
                id: MsgId([n; 16]),
                peer,
                outgoing: true,
                text: format!("m{n}"),
                timestamp: u64::from(n),
                state,
            };
            let hk = history_key(&peer, m.timestamp, &m.id);
            db.history.insert(&hk, &m).unwrap();
            db.index.insert(&peer_id_key(&peer, &m.id), &hk).unwrap();
        };
        let set = |n: u8, state: MsgState| {
            db.store
                .transaction(&[&db.history, &db.index], |tx| {
                    set_state(tx, &db, &peer, &MsgId([n; 16]), state.clone())
                })
                .unwrap()
        };
        let state = |n: u8| db.message(&peer, &MsgId([n; 16])).unwrap().unwrap().state;
        let failed = || MsgState::Failed("why".into());
        put(1, MsgState::Sent);
        put(2, MsgState::Stored);
        put(3, MsgState::Queued);
        put(4, MsgState::Delivered);
        // Stored by the recipient: never a failure, never back.
        assert_eq!(set(1, failed()), None);
        assert_eq!(set(1, MsgState::Queued), None);
        assert_eq!(state(1), MsgState::Sent);
        // Held by a relay that dropped it: a failure.
        assert_eq!(set(2, failed()), Some(MsgState::Stored.rank()));
        assert_eq!(state(2), failed());
        // A failure stays, unless the recipient says it has the message after all: reported
        // as from `sent`, so `delivered` (and `read`) are announced.
        assert_eq!(set(2, MsgState::Sent), None);
        assert_eq!(set(2, failed()), None);
        assert_eq!(set(2, MsgState::Read), Some(MsgState::Sent.rank()));
        assert_eq!(state(2), MsgState::Read);
        assert_eq!(
            progress_names(MsgState::Sent.rank(), &MsgState::Read),
            ["delivered", "read"]
        );
        // Queued: fails; then a delivered receipt (its answer was lost) still counts.
        assert_eq!(set(3, failed()), Some(MsgState::Queued.rank()));
        assert_eq!(set(3, MsgState::Delivered), Some(MsgState::Sent.rank()));
        assert_eq!(state(3), MsgState::Delivered);
        // A text queued again after a relay held it: the recipient's answer moves it on.
        put(5, MsgState::Stored);
        assert_eq!(set(5, MsgState::Sent), Some(MsgState::Stored.rank()));
        assert_eq!(set(5, MsgState::Stored), None);
        // Forward only.
        assert_eq!(set(4, MsgState::Sent), None);
        assert_eq!(set(4, MsgState::Read), Some(MsgState::Delivered.rank()));
    }

    #[test]
    fn a_message_refused_too_early_for_ten_minutes_is_given_up() {
        let peer = [7; 32];
        let (a, b) = (MsgId([1; 16]), MsgId([2; 16]));
        let too_early = || Outcome::Rejected(RejectReason::TooEarly);
        let mut since = HashMap::new();
        let t0 = Instant::now();
        let kinds = |v: Vec<(MsgId, Outcome)>| -> Vec<(MsgId, Option<RejectReason>)> {
            v.into_iter()
                .map(|(id, o)| match o {
                    Outcome::Rejected(r) => (id, Some(r)),
                    _ => (id, None),
                })
                .collect()
        };
        // Refused: kept (transient), remembered from the first refusal.
        let r = give_up_too_early(
            &mut since,
            &peer,
            vec![(a, too_early()), (b, too_early())],
            t0,
        );
        assert_eq!(
            kinds(r),
            vec![
                (a, Some(RejectReason::TooEarly)),
                (b, Some(RejectReason::TooEarly))
            ]
        );
        let later = t0 + TOO_EARLY_LIMIT - Duration::from_secs(1);
        let r = give_up_too_early(&mut since, &peer, vec![(a, too_early())], later);
        assert_eq!(kinds(r), vec![(a, Some(RejectReason::TooEarly))]);
        // b got through meanwhile: forgotten.
        let r = give_up_too_early(&mut since, &peer, vec![(b, Outcome::Delivered)], later);
        assert_eq!(kinds(r), vec![(b, None)]);
        assert!(!since.contains_key(&(peer, b)));
        // a, still refused after the limit: given up as undecryptable, and forgotten.
        let r = give_up_too_early(
            &mut since,
            &peer,
            vec![(a, too_early())],
            t0 + TOO_EARLY_LIMIT,
        );
        assert!(
            matches!(r.as_slice(), [(id, Outcome::GaveUp(TOO_EARLY_GIVEN_UP))] if *id == a),
            "given up"
        );
        assert!(since.is_empty());
        // Other refusals pass through untouched.
        let r = give_up_too_early(
            &mut since,
            &peer,
            vec![(a, Outcome::Rejected(RejectReason::RateLimited))],
            t0,
        );
        assert_eq!(kinds(r), vec![(a, Some(RejectReason::RateLimited))]);
    }

    #[test]
    fn progress_reports_every_state_passed_in_order() {
        assert_eq!(progress_names(0, &MsgState::Sent), ["sent"]);
        assert_eq!(
            progress_names(0, &MsgState::Delivered),
            ["sent", "delivered"]
        );
        assert_eq!(progress_names(1, &MsgState::Read), ["delivered", "read"]);
        assert!(progress_names(2, &MsgState::Delivered).is_empty());
    }

    #[test]
    fn receipts_are_split_to_fit_a_frame() {
        let ids: Vec<MsgId> = (0..2500u32)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&i.to_be_bytes());
                MsgId(b)
            })
            .collect();
        let parts = receipt_contents(ReceiptKind::Read, &ids);
        assert_eq!(parts.len(), 3);
        for (content, _) in &parts {
            let bytes = Plaintext(content.clone()).to_bytes();
            assert!(bytes.len() < wire::MAX_REQUEST_FRAME / 2, "{}", bytes.len());
        }
    }
}
