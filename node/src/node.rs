//! Starting a node and the [`NodeHandle`] through which the API, the CLI and the tests use it.
//!
//! Start order: take the data-directory lock (so a second daemon fails before touching the
//! database), load the identity, open the store and the event log, then spawn the network
//! actor. Shutdown reverses it: cancel every task, wait for them, flush the store, release
//! the lock. [`NodeHandle`] is a cheap clone; every method is typed and async.

use std::sync::{Arc, Mutex};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, ConfigError},
    data_dir::{DataDir, DataDirError, DataDirLock},
    events::{EventBus, EventKind, Subscription},
    identity::{Identity, IdentityError},
    messaging::{
        self, Conversation, HistoryItem, MessagingConfig, MessagingError, MessagingHandle,
        contacts::{BlockedPeer, ContactView},
        db::MessagingDb,
        wire::MsgId,
    },
    net::{self, NetError, NetHandle, PeerInfo, RelayStatus},
    presence::{self, PresenceError, PresenceHandle, PresenceParts, PresenceStats, PresenceView},
    store::{Store, StoreError},
    ticket::ContactTicket,
};

/// Errors starting or using a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory is locked or inaccessible.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The identity is missing or corrupt.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A messaging operation failed.
    #[error(transparent)]
    Messaging(#[from] MessagingError),
    /// A presence operation failed.
    #[error(transparent)]
    Presence(#[from] PresenceError),
    /// The node is shutting down and takes no new work.
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// What a node is started with.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Its data directory (must hold an identity).
    pub data_dir: DataDir,
    /// The effective configuration (file merged with flags).
    pub config: Config,
}

impl NodeOptions {
    /// Loads `config.toml` from `data_dir` (defaults when absent).
    pub fn load(data_dir: DataDir) -> Result<Self, NodeError> {
        let config = Config::load_or_default(&data_dir.config_path())?;
        Ok(Self { data_dir, config })
    }
}

/// Who this node is, for `tern id` and the `info` method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// libp2p peer id.
    pub peer_id: String,
    /// iroh endpoint id (same key).
    pub endpoint_id: String,
    /// Contact ticket with the current addresses.
    pub ticket: String,
    /// Tern version.
    pub version: String,
    /// The data directory.
    pub data_dir: String,
}

/// The daemon state for `tern status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// libp2p peer id.
    pub peer_id: String,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<String>,
    /// Connected peers.
    pub connected_peers: Vec<String>,
    /// Configured relays and whether they are connected.
    pub relays: Vec<RelayStatus>,
    /// Envelopes waiting in the outbox (messages, receipts) until a recipient acknowledges.
    pub outbox: u64,
    /// Inbound envelopes refused since start, by reason (malformed, rate_limited, ...).
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Our presence and the presence frames accepted and rejected.
    pub presence: PresenceStats,
    /// Relayed connections upgraded to direct ones by hole punching, and failed attempts.
    pub hole_punches: net::HolePunchStats,
    /// Envelopes that left before their own flush since start (their chain positions were
    /// reserved durably ahead).
    #[serde(default)]
    pub sent_before_flush: u64,
    /// Inbound envelopes already stored, answered `Stored` again since start.
    #[serde(default)]
    pub duplicates: u64,
}

struct Inner {
    identity: Identity,
    data_dir: DataDir,
    name: Option<String>,
    /// Home relays, put in our ticket.
    relays: Vec<Multiaddr>,
    net: NetHandle,
    messaging: MessagingHandle,
    presence: PresenceHandle,
    /// Stops the capabilities (messaging, presence).
    shutdown: CancellationToken,
    /// Stops the network, after the capabilities had their last word (presence `offline`).
    net_shutdown: CancellationToken,
    tasks: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    net_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Held while running; taken (and so closed) by `shutdown`, so that a stopped node
    /// releases its database and data directory even while stale handles linger.
    resources: Mutex<Option<Resources>>,
}

struct Resources {
    store: Store,
    events: EventBus,
    lock: DataDirLock,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("peer_id", &self.inner.identity.peer_id())
            .finish_non_exhaustive()
    }
}

/// Entry point.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Starts a node; returns once it listens.
    pub async fn start(options: NodeOptions) -> Result<NodeHandle, NodeError> {
        let NodeOptions { data_dir, config } = options;
        config.validate(&data_dir.config_path())?;
        let lock = data_dir.lock()?;
        let identity = Identity::load(&data_dir)?;
        let store = Store::open_with_reserve(
            &data_dir.db_path(),
            config.min_free_disk_mb.saturating_mul(1024 * 1024),
        )?;
        let events = EventBus::open(&store, &data_dir.events_path())?;
        let shutdown = CancellationToken::new();
        let net_shutdown = CancellationToken::new();
        let (inbound_tx, inbound_rx) =
            tokio::sync::mpsc::channel(messaging::INBOUND_CHANNEL_CAPACITY);
        let (gossip_tx, gossip_rx) = tokio::sync::mpsc::channel(net::GOSSIP_CHANNEL_CAPACITY);
        let (notes_tx, notes_rx) = tokio::sync::mpsc::unbounded_channel();
        let (mailbox_tx, mailbox_rx) =
            tokio::sync::mpsc::channel(messaging::INBOUND_CHANNEL_CAPACITY);
        let (net, net_task) = net::spawn(
            &identity,
            &config,
            events.clone(),
            net_shutdown.clone(),
            net::Sinks {
                msg: inbound_tx,
                gossip: gossip_tx,
                mailbox: mailbox_tx,
            },
            net::Role::User,
            &match config.presence.share {
                crate::config::SharePresence::Contacts => {
                    vec![presence::wire::topic_for(&identity.peer_id())]
                }
                crate::config::SharePresence::Nobody => Vec::new(),
            },
        )
        .await?;
        let messaging_config = MessagingConfig {
            message_ttl: std::time::Duration::from_secs(config.message_ttl_secs),
            relay_grace: messaging::relay_grace(std::time::Duration::from_secs(
                config.message_ttl_secs,
            )),
            inbound_rate: config.inbound_rate,
            inbound_burst: config.inbound_burst,
            max_message_requests: config.max_message_requests as usize,
            name: config.name.clone(),
            ..MessagingConfig::default()
        };
        let listen_addrs = net.listen_addrs().await.unwrap_or_default();
        let known_offline = messaging::KnownOffline::default();
        let capabilities = async {
            let db = MessagingDb::open(&store)?;
            let (messaging, messaging_task) = messaging::spawn(
                identity.seed(),
                db.clone(),
                net.clone(),
                events.clone(),
                messaging::MessagingIo {
                    inbound: inbound_rx,
                    mailbox_in: mailbox_rx,
                    presence_notes: Some(notes_tx),
                },
                MessagingConfig {
                    listen_addrs,
                    home_relays: config.relays.clone(),
                    relay_sync_interval: std::time::Duration::from_secs(config.relay_sync_secs),
                    known_offline: known_offline.clone(),
                    ..messaging_config
                },
                shutdown.child_token(),
            )?;
            let presence = presence::spawn(
                PresenceParts {
                    me: identity.peer_id(),
                    signing: identity.signing_key(),
                    config: config.presence.clone(),
                    net: net.clone(),
                    events: events.clone(),
                    messaging: messaging.clone(),
                    db,
                    gossip: gossip_rx,
                    notes: notes_rx,
                    known_offline,
                },
                shutdown.child_token(),
            )
            .await;
            match presence {
                Ok((presence, presence_task)) => {
                    Ok((messaging, presence, vec![messaging_task, presence_task]))
                }
                Err(e) => {
                    shutdown.cancel();
                    let _ = messaging_task.await;
                    Err(NodeError::from(e))
                }
            }
        };
        let (messaging, presence, tasks) = match capabilities.await {
            Ok(m) => m,
            Err(e) => {
                // Do not leave the network task running behind a failed start.
                shutdown.cancel();
                net_shutdown.cancel();
                let _ = net_task.await;
                return Err(e);
            }
        };
        tracing::info!(peer_id = %identity.peer_id(), dir = %data_dir.root().display(), "node started");
        Ok(NodeHandle {
            inner: Arc::new(Inner {
                identity,
                data_dir,
                name: config.name.clone(),
                relays: config.relays.clone(),
                net,
                messaging,
                presence,
                shutdown,
                net_shutdown,
                tasks: tokio::sync::Mutex::new(tasks),
                net_task: tokio::sync::Mutex::new(Some(net_task)),
                resources: Mutex::new(Some(Resources {
                    store,
                    events,
                    lock,
                })),
            }),
        })
    }
}

impl NodeHandle {
    fn check_running(&self) -> Result<(), NodeError> {
        if self.inner.shutdown.is_cancelled() {
            Err(NodeError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.identity.peer_id()
    }

    /// The network handle (raw protocol access for tools and tests).
    pub fn net(&self) -> &NetHandle {
        &self.inner.net
    }

    /// The data directory.
    pub fn data_dir(&self) -> &DataDir {
        &self.inner.data_dir
    }

    fn resources<T>(&self, f: impl FnOnce(&Resources) -> T) -> Result<T, NodeError> {
        let guard = self
            .inner
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(f).ok_or(NodeError::ShuttingDown)
    }

    /// The event bus (for capabilities and the API).
    pub fn events(&self) -> Result<EventBus, NodeError> {
        self.resources(|r| r.events.clone())
    }

    /// The store (for capabilities).
    pub fn store(&self) -> Result<Store, NodeError> {
        self.resources(|r| r.store.clone())
    }

    /// Identity, ids and a fresh contact ticket.
    pub async fn info(&self) -> Result<NodeInfo, NodeError> {
        let ticket = self.ticket().await?;
        Ok(NodeInfo {
            peer_id: self.peer_id().to_string(),
            endpoint_id: self.inner.identity.endpoint_id().to_string(),
            ticket: ticket.encode(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: self.inner.data_dir.root().display().to_string(),
        })
    }

    /// The contact ticket with the node's dialable addresses.
    pub async fn ticket(&self) -> Result<ContactTicket, NodeError> {
        let addrs = self
            .inner
            .net
            .listen_addrs()
            .await?
            .into_iter()
            .filter(net::is_dialable)
            .collect();
        let bundle = self.inner.messaging.bundle().await?;
        let token = self.inner.messaging.mailbox_token().await?;
        Ok(ContactTicket {
            peer_id: self.peer_id(),
            addrs,
            name: self.inner.name.clone(),
            bundle: Some(bundle),
            relays: self.inner.relays.clone(),
            mailbox_token: (!self.inner.relays.is_empty()).then_some(token),
        })
    }

    /// Listen addresses, peers, relays and outbox size.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let net = self.inner.net.status().await?;
        let stats = self.inner.messaging.stats().await?;
        let presence = self.inner.presence.stats().await?;
        Ok(NodeStatus {
            peer_id: self.peer_id().to_string(),
            listen_addrs: net.listen_addrs,
            connected_peers: net.connected_peers,
            relays: net
                .relays
                .into_iter()
                .map(|mut r| {
                    r.mailbox_registered_at = r
                        .address
                        .parse::<Multiaddr>()
                        .ok()
                        .and_then(|a| net::peer_id_of(&a))
                        .and_then(|p| stats.relay_registrations.get(&p).copied());
                    r
                })
                .collect(),
            hole_punches: net.hole_punches,
            outbox: stats.outbox,
            rejected: stats.rejected,
            sent_before_flush: stats.sent_before_flush,
            duplicates: stats.duplicates,
            presence,
        })
    }

    /// Adds a contact from its ticket.
    pub async fn contact_add(&self, ticket: &str, name: &str) -> Result<ContactView, NodeError> {
        self.check_running()?;
        Ok(self
            .inner
            .messaging
            .contact_add(&self.inner.net, ticket.to_string(), name.to_string())
            .await?)
    }

    /// Every contact.
    pub async fn contact_list(&self) -> Result<Vec<ContactView>, NodeError> {
        Ok(self.inner.messaging.contact_list().await?)
    }

    /// One contact with its safety number.
    pub async fn contact_show(&self, name: &str) -> Result<ContactView, NodeError> {
        Ok(self.inner.messaging.contact_show(name.to_string()).await?)
    }

    /// Removes a contact (its queued messages fail; history is kept; a blocked contact
    /// stays blocked).
    pub async fn contact_remove(&self, name: &str) -> Result<(), NodeError> {
        Ok(self
            .inner
            .messaging
            .contact_remove(name.to_string())
            .await?)
    }

    /// Blocks or unblocks a contact.
    pub async fn contact_block(&self, name: &str, blocked: bool) -> Result<ContactView, NodeError> {
        Ok(self
            .inner
            .messaging
            .contact_block(name.to_string(), blocked)
            .await?)
    }

    /// Blocked contacts, then blocked contacts the user removed.
    pub async fn blocked_list(&self) -> Result<Vec<BlockedPeer>, NodeError> {
        Ok(self.inner.messaging.blocked_list().await?)
    }

    /// Lifts the block of a blocked contact the user removed.
    pub async fn peer_unblock(&self, peer: PeerId) -> Result<(), NodeError> {
        Ok(self.inner.messaging.peer_unblock(peer).await?)
    }

    /// Queues a text message; returns its id once durably queued.
    pub async fn send(&self, to: &str, text: &str) -> Result<MsgId, NodeError> {
        self.check_running()?;
        self.inner.presence.activity();
        Ok(self
            .inner
            .messaging
            .send(to.to_string(), text.to_string())
            .await?)
    }

    /// The last `limit` messages with a contact, oldest first.
    pub async fn history(&self, with: &str, limit: usize) -> Result<Vec<HistoryItem>, NodeError> {
        Ok(self
            .inner
            .messaging
            .history(with.to_string(), limit)
            .await?)
    }

    /// Every conversation.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, NodeError> {
        Ok(self.inner.messaging.conversations().await?)
    }

    /// Marks a conversation read and sends read receipts; returns how many were unread.
    pub async fn mark_read(&self, with: &str) -> Result<usize, NodeError> {
        self.inner.presence.activity();
        Ok(self.inner.messaging.mark_read(with.to_string()).await?)
    }

    /// Sends a typing indicator if the contact is connected right now (it is ephemeral:
    /// never queued, never stored); returns whether the contact received it.
    pub async fn typing(&self, to: &str, typing: bool) -> Result<bool, NodeError> {
        self.inner.presence.activity();
        let contact = self.inner.messaging.contact_show(to.to_string()).await?;
        let peer: PeerId = contact
            .peer_id
            .parse()
            .map_err(|_| MessagingError::UnknownContact(to.to_string()))?;
        // Not connected: nothing is encrypted, so the ratchet does not advance for nothing.
        if !self.inner.net.is_connected(peer).await? {
            return Ok(false);
        }
        Ok(self.inner.messaging.typing(to.to_string(), typing).await?)
    }

    /// Presence of one contact, or of every contact. A blocked contact's presence is not
    /// followed: it shows as `blocked`.
    pub async fn presence(&self, name: Option<&str>) -> Result<Vec<PresenceView>, NodeError> {
        let blocked = |c: &ContactView| PresenceView {
            name: c.name.clone(),
            peer_id: c.peer_id.clone(),
            state: "blocked".into(),
            last_seen: None,
        };
        // The contacts decide who is listed and who is blocked; the presence task, which
        // learns of a block or an unblock a moment later, only says the state of the others.
        let contacts = match name {
            Some(name) => vec![self.inner.messaging.contact_show(name.to_string()).await?],
            None => self.inner.messaging.contact_list().await?,
        };
        let known = self.inner.presence.query(None).await?;
        let mut all: Vec<PresenceView> = contacts
            .iter()
            .map(|c| match known.iter().find(|p| p.peer_id == c.peer_id) {
                _ if c.blocked => blocked(c),
                Some(p) => PresenceView {
                    name: c.name.clone(),
                    ..p.clone()
                },
                None => PresenceView {
                    name: c.name.clone(),
                    peer_id: c.peer_id.clone(),
                    state: "unknown".into(),
                    last_seen: None,
                },
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Sets our presence: `online` (automatic: away after idling) or `away`.
    pub async fn set_presence(&self, state: &str) -> Result<(), NodeError> {
        Ok(self.inner.presence.set(state).await?)
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        Ok(self.inner.net.peers().await?)
    }

    /// Connects to a peer.
    pub async fn dial(&self, address: Multiaddr) -> Result<PeerId, NodeError> {
        self.check_running()?;
        Ok(self.inner.net.dial(address).await?)
    }

    /// The listen addresses.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        Ok(self.inner.net.listen_addrs().await?)
    }

    /// Subscribes to events after `since` (all live events when `None`).
    pub fn subscribe(&self, since: Option<u64>) -> Result<Subscription, NodeError> {
        Ok(self.events()?.subscribe(since)?)
    }

    /// Asks the node to stop; [`NodeHandle::closed`] resolves, the owner then calls
    /// [`NodeHandle::shutdown`].
    pub fn request_shutdown(&self) {
        if !self.inner.shutdown.is_cancelled()
            && let Ok(events) = self.events()
        {
            events.publish(EventKind::ShuttingDown);
        }
        self.inner.shutdown.cancel();
    }

    /// Resolves when shutdown was requested.
    pub async fn closed(&self) {
        self.inner.shutdown.cancelled().await;
    }

    /// Stops every task, flushes the database and releases the data-directory lock.
    /// Idempotent; returns when everything is down.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        self.request_shutdown();
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().await);
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a node task ended abnormally");
            }
        }
        // The network goes last: the capabilities' final words (presence `offline`) go
        // out through it.
        self.inner.net_shutdown.cancel();
        if let Some(task) = self.inner.net_task.lock().await.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the network task ended abnormally");
        }
        let resources = self
            .inner
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(Resources {
            store,
            events,
            lock,
        }) = resources
        {
            // A clean stop: the next start continues at the next seq, without a gap.
            events.seal();
            drop(events);
            // Flushed and checkpointed: the next start has no journal to apply (bounded, see
            // `Store::close`).
            let flushed = store.close().await;
            // Close the database before releasing the directory lock, even if the flush
            // failed (a full disk): the lock must not outlive the node. (A close that timed
            // out leaves sled open until the process ends; sled's own file lock then keeps
            // any other opener out.)
            drop(store);
            drop(lock);
            flushed?;
            tracing::info!("node stopped");
        }
        Ok(())
    }
}

/// A contact ticket made without a running node (`tern init`, `tern id` with no daemon):
/// the identity, name and prekey bundle, but no addresses. Takes the data-directory lock
/// for a moment, so it fails while a daemon runs (ask the daemon instead).
pub fn offline_ticket(dir: &DataDir) -> Result<ContactTicket, NodeError> {
    let config = Config::load_or_default(&dir.config_path())?;
    let identity = Identity::load(dir)?;
    let lock = dir.lock()?;
    let store = Store::open(&dir.db_path())?;
    let db = MessagingDb::open(&store)?;
    let bundle = messaging::local_bundle(identity.seed(), &db)?;
    let token = messaging::mailbox::load_or_create_token(&db.mailbox_self)?;
    // Closed, not just flushed: the daemon's first start then has no journal to apply.
    store.close_blocking()?;
    drop(store);
    drop(lock);
    Ok(ContactTicket {
        peer_id: identity.peer_id(),
        addrs: Vec::new(),
        name: config.name,
        bundle: Some(bundle),
        mailbox_token: (!config.relays.is_empty()).then(|| *token.expose_bytes()),
        relays: config.relays,
    })
}
