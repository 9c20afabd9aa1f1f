//! Presence: online, away, offline and last seen, gossiped to contacts over gossipsub.
//!
//! Each node publishes signed frames ([`wire`]) on its own topic
//! `tern/presence/1/<hash(peer id)>` and subscribes to its contacts' topics. One actor task
//! owns everything mutable: the [`book::Book`] of what contacts said (answered from memory,
//! the "Redis" of the design), the [`book::Publisher`] of our own state, the keys that open
//! contacts' frames and the subscriptions. Every gossip message is judged here before
//! gossipsub forwards it: forged, replayed, stale, flooding or garbage frames are rejected,
//! which lowers the forwarding peer's score. Last seen (and each contact's sequence number,
//! so replays stay stale) is persisted so it survives restarts.
//!
//! With `share = "nobody"` nothing is published, no contact topic is joined and no one's
//! last seen is shown, as in WhatsApp.

pub mod book;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::{
    book::{Book, Change, Check, Publisher, Seen},
    wire::{PresenceKey, PresenceWireError, State, TOPIC_PREFIX},
};
use crate::{
    config::{PresenceConfig, SharePresence},
    events::{EventBus, EventKind, now_ms},
    messaging::{KnownOffline, MessagingError, MessagingHandle, PresenceNote, db::MessagingDb},
    net::{GossipMessage, MessageAcceptance, NetEvent, NetHandle, presence_topic_params},
    store::{StoreError, Table},
};

/// Capacity of the command channel into the presence actor.
pub const COMMAND_CHANNEL_CAPACITY: usize = 256;
/// How long a graceful shutdown waits for the final `offline` frame to leave.
pub const OFFLINE_GRACE: Duration = Duration::from_millis(150);
/// How often changed last-seen values are written back.
const PERSIST_INTERVAL: Duration = Duration::from_secs(30);
/// Key of our last published sequence number in the `presence_own_seq` table.
const OWN_SEQ_KEY: &[u8] = b"seq";

/// Errors of presence operations.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// No contact with that name.
    #[error("unknown contact {0:?}; see `tern contact list`")]
    UnknownContact(String),
    /// Only online and away can be chosen.
    #[error("cannot set presence to {0:?}: choose online or away")]
    InvalidState(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Messaging (contacts, keys) failed.
    #[error(transparent)]
    Messaging(#[from] MessagingError),
    /// The presence task is gone.
    #[error("the presence task is not running (node shutting down?)")]
    ActorGone,
}

/// A contact's presence as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceView {
    /// The contact's name.
    pub name: String,
    /// The contact's peer id.
    pub peer_id: String,
    /// `online`, `away`, `offline`, or `unknown` (never heard, not shared with us, or we
    /// share with nobody).
    pub state: String,
    /// When we last saw them online or away, ms since the epoch.
    pub last_seen: Option<u64>,
}

/// Our own presence and the counters, for `presence` without a name and `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceStats {
    /// What we show (`online`, `away`), or `hidden` with `share = "nobody"`.
    pub own_state: String,
    /// Frames accepted.
    pub accepted: u64,
    /// Frames rejected, by reason (malformed, wrong_owner, bad_signature, stale, flood, ...).
    pub rejected: BTreeMap<String, u64>,
}

enum Cmd {
    Query {
        name: Option<String>,
        reply: oneshot::Sender<Result<Vec<PresenceView>, PresenceError>>,
    },
    Set {
        state: State,
        reply: oneshot::Sender<()>,
    },
    Activity,
    Stats {
        reply: oneshot::Sender<PresenceStats>,
    },
}

/// Cheap, cloneable handle to the presence actor.
#[derive(Clone, Debug)]
pub struct PresenceHandle {
    tx: mpsc::Sender<Cmd>,
}

impl PresenceHandle {
    /// Presence of one contact, or of every contact when `name` is `None`.
    pub async fn query(&self, name: Option<String>) -> Result<Vec<PresenceView>, PresenceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Query { name, reply })
            .await
            .map_err(|_| PresenceError::ActorGone)?;
        rx.await.map_err(|_| PresenceError::ActorGone)?
    }

    /// Chooses our state: `away` sticks until `online` (which returns to automatic).
    pub async fn set(&self, state: &str) -> Result<(), PresenceError> {
        let state = match state {
            "online" => State::Online,
            "away" => State::Away,
            other => return Err(PresenceError::InvalidState(other.to_string())),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Set { state, reply })
            .await
            .map_err(|_| PresenceError::ActorGone)?;
        rx.await.map_err(|_| PresenceError::ActorGone)
    }

    /// The user did something: we are not idle (never blocks; dropped when busy).
    pub fn activity(&self) {
        let _ = self.tx.try_send(Cmd::Activity);
    }

    /// Our state and the frame counters.
    pub async fn stats(&self) -> Result<PresenceStats, PresenceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Stats { reply })
            .await
            .map_err(|_| PresenceError::ActorGone)?;
        rx.await.map_err(|_| PresenceError::ActorGone)
    }
}

/// What the presence actor is started with.
pub struct PresenceParts {
    /// Our peer id.
    pub me: PeerId,
    /// Our ed25519 key, which signs our frames.
    pub signing: SigningKey,
    /// The `[presence]` configuration.
    pub config: PresenceConfig,
    /// The network.
    pub net: NetHandle,
    /// The event bus.
    pub events: EventBus,
    /// Messaging (contacts and presence keys).
    pub messaging: MessagingHandle,
    /// The messaging tables (read at start for the keys contacts shared).
    pub db: MessagingDb,
    /// Gossip messages to judge.
    pub gossip: mpsc::Receiver<GossipMessage>,
    /// Key and contact changes from messaging.
    pub notes: mpsc::UnboundedReceiver<PresenceNote>,
    /// Where offline contacts are published for messaging.
    pub known_offline: KnownOffline,
}

struct Actor {
    me: PeerId,
    signing: SigningKey,
    share: bool,
    own_key: Option<PresenceKey>,
    my_topic: String,
    book: Book,
    publisher: Publisher,
    /// Keys that open contacts' frames.
    keys: HashMap<PeerId, PresenceKey>,
    /// Per contact, its latest frame we could not open yet (its key is usually on the way
    /// over the ratchet session): opened as soon as the key arrives.
    unopened: HashMap<PeerId, (wire::Verified, u64)>,
    /// Contacts we follow (not blocked): peer -> name.
    contacts: HashMap<PeerId, String>,
    /// Topics we joined: topic -> owner.
    subscribed: HashMap<String, PeerId>,
    net: NetHandle,
    events: EventBus,
    messaging: MessagingHandle,
    seen_table: Table<Seen>,
    /// The last sequence number we published (key [`OWN_SEQ_KEY`]).
    own_seq: Table<u64>,
    /// Whether storing it failed last time (so the warning is logged once).
    own_seq_failing: bool,
    known_offline: KnownOffline,
    dirty: HashMap<PeerId, Seen>,
    accepted: u64,
    rejected: BTreeMap<&'static str, u64>,
    rng: StdRng,
    tick: Duration,
}

/// Starts the presence actor: sets up key sharing with messaging, restores last seen,
/// joins contacts' topics.
pub async fn spawn(
    parts: PresenceParts,
    shutdown: CancellationToken,
) -> Result<(PresenceHandle, tokio::task::JoinHandle<()>), PresenceError> {
    let PresenceParts {
        me,
        signing,
        config,
        net,
        events,
        messaging,
        db,
        gossip,
        notes,
        known_offline,
    } = parts;
    let share = config.share == SharePresence::Contacts;
    let own_key = messaging.presence_setup(share).await?;
    let seen_table: Table<Seen> = db.store.table("presence_seen")?;
    let mut book = Book::of_node(config.missed_beats, me);
    for (k, seen) in seen_table.scan_prefix(&[])? {
        if let Ok(peer) = PeerId::from_bytes(&k) {
            book.restore(peer, seen);
        }
    }
    let mut keys = HashMap::new();
    for (k, key) in db.presence_keys.scan_prefix(&[])? {
        if let Some(peer) = k
            .as_slice()
            .try_into()
            .ok()
            .and_then(|k: [u8; 32]| crate::messaging::peer_id_of_key(&k))
        {
            keys.insert(peer, key);
        }
    }
    let own_seq: Table<u64> = db.store.table("presence_own_seq")?;
    let now = now_ms();
    let heartbeat = config.heartbeat_ms;
    let mut publisher = Publisher::new(now, heartbeat, config.away_after_secs * 1000);
    if let Some(seq) = own_seq.get(OWN_SEQ_KEY)? {
        publisher.resume_after(seq);
    }
    let actor = Actor {
        me,
        signing,
        share,
        own_key,
        my_topic: wire::topic_for(&me),
        book,
        publisher,
        keys,
        unopened: HashMap::new(),
        contacts: HashMap::new(),
        subscribed: HashMap::new(),
        net: net.clone(),
        events,
        messaging,
        seen_table,
        own_seq,
        own_seq_failing: false,
        known_offline,
        dirty: HashMap::new(),
        accepted: 0,
        rejected: BTreeMap::new(),
        rng: StdRng::from_entropy(),
        // Ticks often enough to notice timeouts and idle within a fraction of a beat.
        tick: Duration::from_millis((heartbeat / 4).clamp(25, 1_000)),
    };
    let (tx, cmds) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let net_events = net.net_events();
    let task = tokio::spawn(actor.run(cmds, gossip, notes, net_events, shutdown));
    Ok((PresenceHandle { tx }, task))
}

impl Actor {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut gossip: mpsc::Receiver<GossipMessage>,
        mut notes: mpsc::UnboundedReceiver<PresenceNote>,
        mut net_events: broadcast::Receiver<NetEvent>,
        shutdown: CancellationToken,
    ) {
        if self.share {
            // Joining our own topic lets gossipsub track who follows us (its subscription
            // filter only tracks topics we joined) and puts us in our contacts' mesh.
            if let Err(e) = self
                .net
                .subscribe(self.my_topic.clone(), Some(presence_topic_params()))
                .await
            {
                tracing::warn!(error = %e, "cannot join our own presence topic");
            }
        }
        self.refresh_contacts().await;
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut persist = tokio::time::interval(PERSIST_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(cmd) = cmds.recv() => self.handle_command(cmd).await,
                Some(msg) = gossip.recv() => self.handle_gossip(msg).await,
                Some(note) = notes.recv() => self.handle_note(note).await,
                ev = net_events.recv() => self.handle_net_event(ev).await,
                _ = tick.tick() => self.handle_tick().await,
                _ = persist.tick() => self.persist_dirty(),
            }
        }
        self.go_offline().await;
        self.persist_dirty();
        tracing::debug!("presence task stopped");
    }

    async fn handle_command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Query { name, reply } => {
                let _ = reply.send(self.query(name));
            }
            Cmd::Set { state, reply } => {
                self.publisher.set(now_ms(), state);
                self.publish_if_due().await;
                let _ = reply.send(());
            }
            Cmd::Activity => {
                self.publisher.activity(now_ms());
                self.publish_if_due().await;
            }
            Cmd::Stats { reply } => {
                let own_state = if self.share {
                    self.publisher.state(now_ms()).as_str().to_string()
                } else {
                    "hidden".to_string()
                };
                let _ = reply.send(PresenceStats {
                    own_state,
                    accepted: self.accepted,
                    rejected: self
                        .rejected
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), *v))
                        .collect(),
                });
            }
        }
    }

    fn query(&self, name: Option<String>) -> Result<Vec<PresenceView>, PresenceError> {
        // Names are stored in NFC: the same name typed in another Unicode form matches.
        let want = name
            .as_deref()
            .map(crate::messaging::contacts::normalize_name);
        let mut out: Vec<PresenceView> = self
            .contacts
            .iter()
            .filter(|(_, n)| {
                want.as_ref()
                    .is_none_or(|w| *n == w || crate::messaging::contacts::normalize_name(n) == *w)
            })
            .map(|(peer, n)| {
                let seen = if self.share {
                    self.book.get(peer)
                } else {
                    None
                };
                PresenceView {
                    name: n.clone(),
                    peer_id: peer.to_string(),
                    state: seen
                        .and_then(|s| s.state)
                        .map_or("unknown", |s| s.as_str())
                        .to_string(),
                    last_seen: seen.and_then(|s| s.last_seen_ms),
                }
            })
            .collect();
        if let Some(n) = name
            && out.is_empty()
        {
            return Err(PresenceError::UnknownContact(n));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn reject(&mut self, reason: &'static str) -> MessageAcceptance {
        *self.rejected.entry(reason).or_default() += 1;
        MessageAcceptance::Reject
    }

    /// Drops a frame without penalising its forwarder (counted with the rejections).
    fn ignore(&mut self, reason: &'static str) -> MessageAcceptance {
        *self.rejected.entry(reason).or_default() += 1;
        MessageAcceptance::Ignore
    }

    /// Judges one gossip message, tells gossipsub, and applies what it says.
    async fn handle_gossip(&mut self, msg: GossipMessage) {
        let now = now_ms();
        let mut change = None;
        let verdict = if !msg.topic.starts_with(TOPIC_PREFIX) {
            // Not a presence topic (no other gossip capability yet): drop, no penalty.
            MessageAcceptance::Ignore
        } else {
            match wire::verify(&msg.topic, &msg.data) {
                Err(e) => self.reject(match e {
                    PresenceWireError::TooLarge(_) => "too_large",
                    PresenceWireError::Version(_) => "version",
                    PresenceWireError::WrongOwner => "wrong_owner",
                    PresenceWireError::BadSignature => "bad_signature",
                    PresenceWireError::Malformed(_) | PresenceWireError::Undecryptable => {
                        "malformed"
                    }
                }),
                Ok(v) => match self.book.check(now, v.owner, v.seq) {
                    Check::Own => self.ignore("own"),
                    Check::Stale => self.reject("stale"),
                    Check::Late => self.ignore("late"),
                    Check::Flood => self.ignore("flood"),
                    Check::Duplicate => MessageAcceptance::Ignore,
                    Check::Fresh => {
                        self.accepted += 1;
                        if self.share && self.contacts.contains_key(&v.owner) {
                            change = self.open(now, v);
                        }
                        MessageAcceptance::Accept
                    }
                },
            }
        };
        if verdict == MessageAcceptance::Reject {
            tracing::debug!(source = %crate::net::short(&msg.source), "presence frame rejected");
        }
        let _ = self.net.validate(msg.id, msg.source, verdict).await;
        if let Some(c) = change {
            self.report(c);
        }
    }

    /// Opens a contact's fresh frame, received at `now`, and applies it; keeps it for later
    /// when we do not hold a key that opens it.
    fn open(&mut self, now: u64, v: wire::Verified) -> Option<Change> {
        let body = self.keys.get(&v.owner).map(|key| v.open(key));
        match body {
            Some(Ok(body)) => {
                self.unopened.remove(&v.owner);
                let change = self.book.observe(now, v.owner, &body);
                if let Some(seen) = self.book.get(&v.owner) {
                    self.dirty.insert(v.owner, seen);
                }
                change
            }
            Some(Err(_)) | None => {
                *self.rejected.entry("undecryptable").or_default() += 1;
                self.unopened.insert(v.owner, (v, now));
                None
            }
        }
    }

    /// Emits `presenceChanged` and writes the new state.
    fn report(&mut self, c: Change) {
        self.known_offline.set(c.peer, c.state == State::Offline);
        let Some(name) = self.contacts.get(&c.peer).cloned() else {
            return;
        };
        if let Some(seen) = self.book.get(&c.peer) {
            if let Err(e) = self.seen_table.insert(&c.peer.to_bytes(), &seen) {
                tracing::warn!(error = %e, "could not store last seen");
            }
            self.dirty.remove(&c.peer);
        }
        self.events.publish(EventKind::PresenceChanged {
            peer_id: c.peer.to_string(),
            name,
            state: c.state.as_str().to_string(),
            last_seen: c.last_seen_ms,
        });
    }

    fn persist_dirty(&mut self) {
        for (peer, seen) in self.dirty.drain() {
            if let Err(e) = self.seen_table.insert(&peer.to_bytes(), &seen) {
                tracing::warn!(error = %e, "could not store last seen");
            }
        }
    }

    async fn handle_note(&mut self, note: PresenceNote) {
        match note {
            PresenceNote::PeerKey(peer, Some(key)) => {
                self.keys.insert(peer, key);
                // Applied as of when it arrived: if that is long ago, the next tick turns
                // it offline again.
                if let Some((v, received)) = self.unopened.remove(&peer)
                    && let Some(c) = self.open(received, v)
                {
                    self.report(c);
                }
            }
            PresenceNote::PeerKey(peer, None) => {
                self.keys.remove(&peer);
            }
            PresenceNote::OwnKey(key) => {
                self.own_key = key;
                // Publish under the new key at once.
                self.publisher.announce();
                self.publish_if_due().await;
            }
            PresenceNote::ContactsChanged => self.refresh_contacts().await,
        }
    }

    async fn handle_net_event(&mut self, ev: Result<NetEvent, broadcast::error::RecvError>) {
        if let Ok(NetEvent::Subscribed { topic, .. }) = ev
            && topic == self.my_topic
        {
            // Someone (a contact coming online) joined our topic: tell them now rather
            // than at the next heartbeat.
            self.publisher.announce();
            self.publish_if_due().await;
        }
    }

    async fn handle_tick(&mut self) {
        self.publish_if_due().await;
        for c in self.book.tick(now_ms()) {
            self.report(c);
        }
    }

    async fn publish_if_due(&mut self) {
        if !self.share {
            return;
        }
        if let Some((seq, body)) = self.publisher.due(now_ms()) {
            self.publish(seq, &body).await;
        }
    }

    async fn publish(&mut self, seq: u64, body: &wire::Body) -> bool {
        let Some(key) = &self.own_key else {
            return false;
        };
        let mut nonce = [0u8; 24];
        self.rng.fill_bytes(&mut nonce);
        // Best effort (not flushed here: the next flush of anyone, or the stop's, makes it
        // durable); said once while it keeps failing (a full disk).
        match self.own_seq.insert(OWN_SEQ_KEY, &seq) {
            Ok(()) => self.own_seq_failing = false,
            Err(e) if !self.own_seq_failing => {
                self.own_seq_failing = true;
                tracing::warn!(error = %e, "could not store our presence sequence number");
            }
            Err(_) => {}
        }
        let frame = wire::seal(&self.signing, &self.me, key, seq, body, nonce);
        match self.net.publish(self.my_topic.clone(), frame).await {
            Ok(()) => true,
            Err(e) => {
                // Usually: no contact online to hear it.
                tracing::trace!(error = %e, "presence not published");
                false
            }
        }
    }

    async fn go_offline(&mut self) {
        if !self.share {
            return;
        }
        let (seq, body) = self.publisher.offline(now_ms());
        if self.publish(seq, &body).await {
            tokio::time::sleep(OFFLINE_GRACE).await;
        }
    }

    /// Follows every contact that is not blocked; leaves the others' topics.
    async fn refresh_contacts(&mut self) {
        let list = match self.messaging.contact_list().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "presence: cannot list contacts");
                return;
            }
        };
        self.contacts = list
            .into_iter()
            .filter(|c| !c.blocked)
            .filter_map(|c| c.peer_id.parse::<PeerId>().ok().map(|p| (p, c.name)))
            .collect();
        let wanted: HashMap<String, PeerId> = if self.share {
            self.contacts
                .keys()
                .map(|p| (wire::topic_for(p), *p))
                .collect()
        } else {
            HashMap::new()
        };
        let gone: Vec<(String, PeerId)> = self
            .subscribed
            .iter()
            .filter(|(t, _)| !wanted.contains_key(*t))
            .map(|(t, p)| (t.clone(), *p))
            .collect();
        for (topic, peer) in gone {
            let _ = self.net.unsubscribe(topic.clone()).await;
            self.subscribed.remove(&topic);
            self.book.forget(&peer);
            self.unopened.remove(&peer);
            let _ = self.seen_table.remove(&peer.to_bytes());
        }
        for (topic, peer) in wanted {
            if self.subscribed.contains_key(&topic) {
                continue;
            }
            match self
                .net
                .subscribe(topic.clone(), Some(presence_topic_params()))
                .await
            {
                Ok(()) => {
                    self.subscribed.insert(topic, peer);
                }
                Err(e) => tracing::warn!(error = %e, "cannot follow a contact's presence"),
            }
        }
    }
}
