//! The network layer: exactly one task owns the libp2p [`Swarm`]; everyone else holds a
//! cheap [`NetHandle`] and talks to it with commands carrying a `oneshot` reply.
//!
//! The actor loop is one `select!` over shutdown, commands, swarm events and a maintenance
//! timer; each branch calls one `handle_*` method. A dropped actor surfaces as
//! [`NetError::ActorGone`], never a panic.

mod accounting;
mod behaviour;
mod boxed;
mod frame;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub use accounting::{INBOUND_QUEUE_BYTES, NetGroup, Reader};
use accounting::{MailboxSending, QueuedBytes};
use behaviour::{Behaviour, BehaviourEvent};
pub use behaviour::{
    BuildError, GOSSIP_HEARTBEAT, GOSSIP_MAX_TRANSMIT, IDENTIFY_PROTOCOL, KAD_PROTOCOL,
    MAILBOX_PROTOCOL, MSG_MAX_REQUEST, MSG_MAX_RESPONSE, MSG_MAX_STREAMS, MSG_PROTOCOL,
    MSG_REQUEST_TIMEOUT, PING_INTERVAL, QUIC_IDLE_TIMEOUT_MS, QUIC_KEEP_ALIVE, Role,
    gossip_score_params, gossip_thresholds, presence_topic_params,
};
use boxed::Boxed;
pub use frame::FrameCodec;
use futures::StreamExt;
pub use libp2p::gossipsub::{MessageAcceptance, MessageId, TopicScoreParams};
use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::ConnectedPoint,
    dcutr, gossipsub, identify, kad, mdns,
    multiaddr::Protocol,
    ping, request_response,
    swarm::{ConnectionId, SwarmEvent, dial_opts::DialOpts, dial_opts::PeerCondition},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    events::{EventBus, EventKind},
    identity::Identity,
};

/// Capacity of the command channel into the swarm actor.
pub const COMMAND_CHANNEL_CAPACITY: usize = 256;
/// How long a dial may take before it is reported as failed.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(20);
/// Capacity of the channel of gossipsub messages awaiting validation.
pub const GOSSIP_CHANNEL_CAPACITY: usize = 1024;
/// Capacity of the internal network-event broadcast.
pub const NET_EVENT_CAPACITY: usize = 1024;
/// How long start-up waits for listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Relay reconnection backoff bounds.
const RELAY_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often the maintenance branch runs.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(500);
/// Checks that a listen address with a fixed port is free, by binding it once without port
/// reuse. libp2p's TCP transport sets `SO_REUSEPORT` on every listening socket (for hole
/// punching), so a second node or relay given the same port would start without an error
/// and take part of the first one's connections (clients then fail with "unexpected peer
/// id"). Port 0 and addresses without an IP and port pass.
fn port_is_free(address: &Multiaddr) -> Result<(), String> {
    use socket2::{Domain, Socket, Type};
    let mut ip = None;
    let mut tcp = None;
    let mut udp = None;
    for p in address.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) => tcp = Some(port),
            Protocol::Udp(port) => udp = Some(port),
            // A relayed listen address: the port before it is the relay's, not ours.
            Protocol::P2pCircuit => return Ok(()),
            _ => {}
        }
    }
    let port_kind = tcp
        .map(|p| (p, Type::STREAM))
        .or(udp.map(|p| (p, Type::DGRAM)));
    let (Some(ip), Some((port, kind))) = (ip, port_kind) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    // As libp2p opens it: IPv6 sockets IPv6-only (so `0.0.0.0` and `::` on one port do not
    // collide), address reuse for TCP (a port whose old connections wait in TIME_WAIT is
    // free), but no port reuse.
    let addr = std::net::SocketAddr::new(ip, port);
    let probe = || -> std::io::Result<()> {
        let socket = Socket::new(Domain::for_address(addr), kind, None)?;
        if ip.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if kind == Type::STREAM {
            socket.set_reuse_address(true)?;
        }
        socket.bind(&addr.into())
    };
    probe().map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            "the address is already in use (another Tern daemon or relay, or another program, \
             listens there)"
                .to_string()
        } else {
            e.to_string()
        }
    })
}

/// An error with its causes, `outer: inner: …`, leaving out empty messages (libp2p's
/// transport errors often say nothing themselves and keep the reason in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        "no reason given".into()
    } else {
        parts.join(": ")
    }
}

/// How often tracked mailbox answers are checked for ones no event came for.
const MAILBOX_SWEEP: Duration = Duration::from_secs(10);

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The swarm task is gone (the node is shutting down or crashed).
    #[error("the network task is not running (node shutting down?)")]
    ActorGone,
    /// The swarm could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A listen address could not be bound.
    #[error("cannot listen on {address}: {message}")]
    Listen {
        /// The address.
        address: Multiaddr,
        /// Why.
        message: String,
    },
    /// A dial failed.
    #[error("cannot reach {address}: {message}")]
    Dial {
        /// The address dialed.
        address: Multiaddr,
        /// Why.
        message: String,
    },
    /// A request to a peer failed (dial failure, timeout, closed connection, ...).
    #[error("request to {peer} failed: {message}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Why.
        message: String,
    },
    /// A gossipsub subscription or publication failed.
    #[error("gossip on {topic} failed: {message}")]
    Gossip {
        /// The topic.
        topic: String,
        /// Why.
        message: String,
    },
    /// A dial did not complete in time.
    #[error("cannot reach {address}: no answer within {secs} s")]
    DialTimeout {
        /// The address dialed.
        address: Multiaddr,
        /// The timeout.
        secs: u64,
    },
}

/// A connected peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer id.
    pub peer_id: String,
    /// Remote addresses of the open connections.
    pub addrs: Vec<String>,
    /// Last ping round trip in milliseconds, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// The state of one configured relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's multiaddr (with `/p2p/`).
    pub address: String,
    /// Whether a connection is open.
    pub connected: bool,
    /// The last dial error, while not connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When (ms since the epoch) our mailbox was last registered there (a sync with it
    /// succeeded), if it was since start: contacts can then leave messages there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox_registered_at: Option<u64>,
}

/// A snapshot of the network state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetStatus {
    /// Addresses the node listens on (including `/p2p-circuit` addresses through relays).
    pub listen_addrs: Vec<String>,
    /// Connected peers.
    pub connected_peers: Vec<String>,
    /// Configured relays.
    pub relays: Vec<RelayStatus>,
    /// Hole-punching outcomes since start.
    pub hole_punches: HolePunchStats,
}

/// A network happening that capabilities react to (not shown to users).
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// The first connection to a peer opened.
    Connected(PeerId),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
    /// Our own listen addresses changed (the full current list).
    ListenAddrs(Vec<Multiaddr>),
    /// A peer joined a gossipsub topic.
    Subscribed {
        /// The peer.
        peer: PeerId,
        /// The topic.
        topic: String,
    },
    /// A peer told us its listen addresses (identify).
    Identified {
        /// The peer.
        peer: PeerId,
        /// Its listen addresses.
        listen_addrs: Vec<Multiaddr>,
    },
}

/// An inbound `/tern/msg/1` request, handed to the messaging capability. Answer it with
/// [`NetHandle::respond`]; dropping it makes the sender see a failed request and retry.
#[derive(Debug)]
pub struct InboundRequest {
    /// The request's id (for [`NetHandle::respond_mailbox`]).
    pub id: request_response::InboundRequestId,
    /// The authenticated peer (noise) that sent it.
    pub peer: PeerId,
    /// The network of the connection it came on.
    pub net: NetGroup,
    /// The raw frame.
    pub bytes: Vec<u8>,
    /// Where the response goes.
    pub channel: request_response::ResponseChannel<Vec<u8>>,
    /// Counts `bytes` as queued until the request is dropped.
    _queued: QueuedBytes,
}

impl InboundRequest {
    /// Who its answer goes to: the peer and the network of the connection it came on.
    pub fn reader(&self) -> Reader {
        Reader {
            peer: self.peer,
            net: self.net,
        }
    }
}

/// A gossipsub message that arrived and waits for its capability's verdict: answer it
/// with [`NetHandle::validate`]. Nothing is forwarded before that, and a rejection lowers
/// the score of the peer that forwarded it.
#[derive(Debug)]
pub struct GossipMessage {
    /// Gossipsub's id of the message (hash of topic and data).
    pub id: MessageId,
    /// The peer that forwarded it to us (not necessarily its author).
    pub source: PeerId,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub data: Vec<u8>,
}

/// Gossip counters for one topic, since start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicStats {
    /// Messages that arrived over the wire (before validation).
    pub received: u64,
    /// Payload bytes that arrived.
    pub received_bytes: u64,
    /// Messages we published.
    pub published: u64,
    /// Payload bytes we published.
    pub published_bytes: u64,
}

/// Direct connection upgrades (DCUtR hole punching) since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunchStats {
    /// Relayed connections upgraded to a direct one.
    pub succeeded: u64,
    /// Attempts that failed (the relayed connection stays in use).
    pub failed: u64,
}

/// A request-response protocol of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// `/tern/msg/1`.
    Msg,
    /// `/tern/mailbox/1`.
    Mailbox,
}

/// Where the network actor hands what peers send, one channel per capability.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// `/tern/msg/1` requests (messaging).
    pub msg: mpsc::Sender<InboundRequest>,
    /// Gossipsub messages awaiting validation (presence).
    pub gossip: mpsc::Sender<GossipMessage>,
    /// `/tern/mailbox/1` requests (the mailbox server on relays, notices on users).
    pub mailbox: mpsc::Sender<InboundRequest>,
}

enum Command {
    Subscribe {
        topic: String,
        params: Option<TopicScoreParams>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Unsubscribe {
        topic: String,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Validate {
        id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    GossipScore {
        peer: PeerId,
        reply: oneshot::Sender<Option<f64>>,
    },
    TopicPeers {
        topic: String,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    TopicStats {
        topic: String,
        reply: oneshot::Sender<TopicStats>,
    },
    Request {
        proto: Proto,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    Respond {
        proto: Proto,
        channel: request_response::ResponseChannel<Vec<u8>>,
        bytes: Vec<u8>,
        /// Counted in [`NetHandle::mailbox_bytes_sending`] (already, by the caller) until
        /// written or failed: the request, its peer and the answer's size.
        track: Option<(request_response::InboundRequestId, Reader, u64)>,
    },
    IsConnected {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Disconnect {
        peer: PeerId,
    },
    Dial {
        address: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Status {
        reply: oneshot::Sender<NetStatus>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
}

/// Cheap, cloneable handle to the swarm actor.
#[derive(Clone, Debug)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    net_events: broadcast::Sender<NetEvent>,
    mailbox_sending: Arc<MailboxSending>,
}

impl NetHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NetError::ActorGone)?;
        rx.await.map_err(|_| NetError::ActorGone)
    }

    /// Connects to `address` (with or without `/p2p/<id>`); returns the remote peer id.
    pub async fn dial(&self, address: Multiaddr) -> Result<PeerId, NetError> {
        let addr = address.clone();
        match tokio::time::timeout(
            DIAL_TIMEOUT,
            self.call(|reply| Command::Dial { address, reply }),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => Err(NetError::DialTimeout {
                address: addr,
                secs: DIAL_TIMEOUT.as_secs(),
            }),
        }
    }

    /// The connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.call(|reply| Command::Peers { reply }).await
    }

    /// Listen addresses, connected peers, relays.
    pub async fn status(&self) -> Result<NetStatus, NetError> {
        self.call(|reply| Command::Status { reply }).await
    }

    /// The current listen addresses.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    /// Sends a `/tern/msg/1` request (dialing `addrs` if not connected) and waits for the
    /// response frame.
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, NetError> {
        self.request_on(Proto::Msg, peer, addrs, bytes).await
    }

    /// Sends a request on `proto` (dialing `addrs` if not connected) and waits for the
    /// response frame.
    pub async fn request_on(
        &self,
        proto: Proto,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, NetError> {
        self.call(|reply| Command::Request {
            proto,
            peer,
            addrs,
            bytes,
            reply,
        })
        .await?
    }

    /// Answers an inbound `/tern/msg/1` request.
    pub async fn respond(
        &self,
        channel: request_response::ResponseChannel<Vec<u8>>,
        bytes: Vec<u8>,
    ) -> Result<(), NetError> {
        self.respond_on(Proto::Msg, channel, bytes).await
    }

    /// Answers an inbound request of `proto`.
    pub async fn respond_on(
        &self,
        proto: Proto,
        channel: request_response::ResponseChannel<Vec<u8>>,
        bytes: Vec<u8>,
    ) -> Result<(), NetError> {
        self.tx
            .send(Command::Respond {
                proto,
                channel,
                bytes,
                track: None,
            })
            .await
            .map_err(|_| NetError::ActorGone)
    }

    /// Answers inbound `/tern/mailbox/1` request `id`, counting the answer's bytes in
    /// [`Self::mailbox_bytes_sending`] until it is written or fails (a relay bounds the
    /// fetch pages it has on their way with it).
    pub async fn respond_mailbox(
        &self,
        id: request_response::InboundRequestId,
        reader: Reader,
        channel: request_response::ResponseChannel<Vec<u8>>,
        bytes: Vec<u8>,
    ) -> Result<(), NetError> {
        let size = bytes.len() as u64;
        // Counted from now, so the caller's next look already sees it.
        self.mailbox_sending.add(reader, size);
        let sent = self
            .tx
            .send(Command::Respond {
                proto: Proto::Mailbox,
                channel,
                bytes,
                track: Some((id, reader, size)),
            })
            .await;
        if sent.is_err() {
            self.mailbox_sending.sub(reader, size);
            return Err(NetError::ActorGone);
        }
        Ok(())
    }

    /// Bytes of answers given with [`Self::respond_mailbox`] that are not written yet: a
    /// peer that reads slowly keeps them in memory until it reads or its request times
    /// out.
    pub fn mailbox_bytes_sending(&self) -> u64 {
        self.mailbox_sending.total.load(Ordering::Relaxed)
    }

    /// The part of [`Self::mailbox_bytes_sending`] that waits for `peer`.
    pub fn mailbox_bytes_sending_to(&self, peer: &PeerId) -> u64 {
        self.mailbox_sending.to(peer)
    }

    /// The part of [`Self::mailbox_bytes_sending`] that waits for peers of network `net`.
    pub fn mailbox_bytes_sending_to_net(&self, net: &NetGroup) -> u64 {
        self.mailbox_sending.to_net(net)
    }

    /// Whether a connection to `peer` is open.
    pub async fn is_connected(&self, peer: PeerId) -> Result<bool, NetError> {
        self.call(|reply| Command::IsConnected { peer, reply })
            .await
    }

    /// Closes every connection to `peer`.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.tx
            .send(Command::Disconnect { peer })
            .await
            .map_err(|_| NetError::ActorGone)
    }

    /// Subscribes to internal network events.
    pub fn net_events(&self) -> broadcast::Receiver<NetEvent> {
        self.net_events.subscribe()
    }

    /// Joins a gossipsub topic, with its peer-score parameters.
    pub async fn subscribe(
        &self,
        topic: String,
        params: Option<TopicScoreParams>,
    ) -> Result<(), NetError> {
        self.call(|reply| Command::Subscribe {
            topic,
            params,
            reply,
        })
        .await?
    }

    /// Leaves a gossipsub topic.
    pub async fn unsubscribe(&self, topic: String) -> Result<(), NetError> {
        self.tx
            .send(Command::Unsubscribe { topic })
            .await
            .map_err(|_| NetError::ActorGone)
    }

    /// Publishes on a topic. Fails with [`NetError::Gossip`] when no peer is subscribed.
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::Publish { topic, data, reply })
            .await?
    }

    /// Gives gossipsub the verdict on a [`GossipMessage`]: accepted messages are forwarded,
    /// rejected ones penalise their forwarder.
    pub async fn validate(
        &self,
        id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    ) -> Result<(), NetError> {
        self.tx
            .send(Command::Validate {
                id,
                source,
                acceptance,
            })
            .await
            .map_err(|_| NetError::ActorGone)
    }

    /// A peer's gossipsub score, if it is known.
    pub async fn gossip_score(&self, peer: PeerId) -> Result<Option<f64>, NetError> {
        self.call(|reply| Command::GossipScore { peer, reply })
            .await
    }

    /// The peers known to be subscribed to `topic`.
    pub async fn topic_peers(&self, topic: String) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::TopicPeers { topic, reply })
            .await
    }

    /// Gossip counters of one topic since start.
    pub async fn topic_stats(&self, topic: String) -> Result<TopicStats, NetError> {
        self.call(|reply| Command::TopicStats { topic, reply })
            .await
    }
}

struct RelayState {
    address: Multiaddr,
    peer_id: Option<PeerId>,
    connected: bool,
    /// A circuit listener (reservation) through this relay is open.
    circuit: Option<libp2p::core::transport::ListenerId>,
    dialing: Option<ConnectionId>,
    last_error: Option<String>,
    next_attempt: tokio::time::Instant,
    backoff: Duration,
}

/// Where the response to an outbound request goes.
type ResponseReply = oneshot::Sender<Result<Vec<u8>, NetError>>;

/// The actor that owns the swarm.
struct NetActor {
    swarm: Swarm<Boxed<Behaviour>>,
    commands: mpsc::Receiver<Command>,
    events: EventBus,
    shutdown: CancellationToken,
    pending_dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, NetError>>)>,
    connections: HashMap<PeerId, HashMap<ConnectionId, Multiaddr>>,
    rtt: HashMap<PeerId, Duration>,
    relays: Vec<RelayState>,
    sinks: Sinks,
    role: Role,
    topics: behaviour::JoinedTopics,
    topic_stats: HashMap<String, TopicStats>,
    hole_punches: HolePunchStats,
    pending_requests: HashMap<(Proto, request_response::OutboundRequestId), ResponseReply>,
    net_events: broadcast::Sender<NetEvent>,
    /// Tracked mailbox answers not written yet: size and when they were handed over.
    mailbox_out: HashMap<request_response::InboundRequestId, (Reader, u64, Instant)>,
    mailbox_sending: Arc<MailboxSending>,
    /// When `mailbox_out` was last cleared of entries no event came for.
    mailbox_swept: Instant,
    /// Bytes of inbound `/tern/msg/1` and `/tern/mailbox/1` requests waiting for their
    /// capability ([`INBOUND_QUEUE_BYTES`]).
    inbound_queued: [Arc<AtomicUsize>; 2],
}

/// Builds the swarm, binds every listen address, waits until they report addresses, then
/// spawns the actor. Returns the handle and the actor's join handle.
pub async fn spawn(
    identity: &Identity,
    config: &Config,
    events: EventBus,
    shutdown: CancellationToken,
    sinks: Sinks,
    role: Role,
    early_topics: &[String],
) -> Result<(NetHandle, tokio::task::JoinHandle<()>), NetError> {
    let topics = behaviour::JoinedTopics::default();
    // Peers' subscriptions arrive with their first connection and are not sent again: topics
    // whose followers matter from the start (our own presence topic) are tracked before
    // any connection opens.
    for t in early_topics {
        topics.insert(gossipsub::IdentTopic::new(t.clone()).hash());
    }
    let mut swarm =
        behaviour::build_swarm(identity.keypair().clone(), config, topics.clone(), role)?;
    let mut listeners = HashSet::new();
    for address in &config.listen {
        if let Err(message) = port_is_free(address) {
            return Err(NetError::Listen {
                address: address.clone(),
                message,
            });
        }
        let id = swarm
            .listen_on(address.clone())
            .map_err(|e| NetError::Listen {
                address: address.clone(),
                message: error_chain(&e),
            })?;
        listeners.insert(id);
    }
    // Poll until every listener has an address, so callers see real ports.
    let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    let mut early = Vec::new();
    while !listeners.is_empty() {
        let next = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
        match next {
            Err(_) => break,
            Ok(SwarmEvent::NewListenAddr {
                listener_id,
                address,
            }) => {
                listeners.remove(&listener_id);
                if role == Role::Relay && is_dialable(&address) {
                    swarm.add_external_address(address.clone());
                }
                events.publish(EventKind::Listening {
                    address: address.to_string(),
                });
            }
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                tracing::warn!(%error, "listener error during start-up");
            }
            Ok(SwarmEvent::ListenerClosed {
                addresses, reason, ..
            }) => {
                let address = addresses.first().cloned().unwrap_or_else(Multiaddr::empty);
                return Err(NetError::Listen {
                    address,
                    message: match reason {
                        Err(e) => error_chain(&e),
                        Ok(()) => "listener closed".into(),
                    },
                });
            }
            Ok(other) => early.push(other),
        }
    }
    let (tx, rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let (net_events, _) = broadcast::channel(NET_EVENT_CAPACITY);
    let now = tokio::time::Instant::now();
    let relays = config
        .relays
        .iter()
        .map(|address| RelayState {
            address: address.clone(),
            peer_id: peer_id_of(address),
            connected: false,
            circuit: None,
            dialing: None,
            last_error: None,
            next_attempt: now,
            backoff: RELAY_BACKOFF_MIN,
        })
        .collect();
    let mut actor = NetActor {
        swarm,
        commands: rx,
        events,
        shutdown,
        pending_dials: HashMap::new(),
        connections: HashMap::new(),
        rtt: HashMap::new(),
        relays,
        sinks,
        role,
        topics,
        topic_stats: HashMap::new(),
        hole_punches: HolePunchStats::default(),
        pending_requests: HashMap::new(),
        net_events: net_events.clone(),
        mailbox_out: HashMap::new(),
        mailbox_sending: Arc::new(MailboxSending::default()),
        mailbox_swept: Instant::now(),
        inbound_queued: Default::default(),
    };
    let mailbox_sending = actor.mailbox_sending.clone();
    for event in early {
        actor.handle_swarm_event(event);
    }
    let task = tokio::spawn(actor.run());
    Ok((
        NetHandle {
            tx,
            net_events,
            mailbox_sending,
        },
        task,
    ))
}

/// The peer an address leads to: its last `/p2p/<id>` component, if any (in a circuit
/// address `<relay>/p2p/<relay id>/p2p-circuit/p2p/<id>` the first one is the relay's).
pub fn peer_id_of(address: &Multiaddr) -> Option<PeerId> {
    match address.iter().last() {
        Some(Protocol::P2p(id)) => Some(id),
        _ => None,
    }
}

/// Whether an address can be dialed by someone else: not an unspecified (`0.0.0.0`, `::`)
/// listen address. Used for tickets, profiles and a relay's external addresses.
pub fn is_dialable(address: &Multiaddr) -> bool {
    address.iter().all(|p| match p {
        Protocol::Ip4(ip) => !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_unspecified(),
        _ => true,
    })
}

/// `address` without its trailing `/p2p/<id>` (a relay's id inside a circuit address stays).
fn without_p2p(address: &Multiaddr) -> Multiaddr {
    let mut a = address.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

impl NetActor {
    async fn run(mut self) {
        let mut maintenance = tokio::time::interval(MAINTENANCE_INTERVAL);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                _ = maintenance.tick() => self.handle_maintenance(),
            }
        }
        for (_, (address, reply)) in self.pending_dials.drain() {
            let _ = reply.send(Err(NetError::Dial {
                address,
                message: "node shutting down".into(),
            }));
        }
        for (_, reply) in self.pending_requests.drain() {
            let _ = reply.send(Err(NetError::ActorGone));
        }
        tracing::debug!("network task stopped");
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { address, reply } => self.handle_dial(address, reply),
            Command::Peers { reply } => {
                let _ = reply.send(self.peer_infos());
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Request {
                proto,
                peer,
                addrs,
                bytes,
                reply,
            } => match self.rr(proto) {
                Some(rr) => {
                    let id = rr.send_request_with_addresses(&peer, bytes, addrs);
                    self.pending_requests.insert((proto, id), reply);
                }
                None => {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        message: format!("this node does not speak {proto:?}"),
                    }));
                }
            },
            Command::Respond {
                proto,
                channel,
                bytes,
                track,
            } => {
                if self
                    .rr(proto)
                    .is_none_or(|rr| rr.send_response(channel, bytes).is_err())
                {
                    tracing::debug!("response not sent: the requester went away");
                    if let Some((_, reader, size)) = track {
                        self.mailbox_sending.sub(reader, size);
                    }
                } else if let Some((id, reader, size)) = track {
                    self.track_mailbox_answer(id, reader, size);
                }
            }
            Command::IsConnected { peer, reply } => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Subscribe {
                topic,
                params,
                reply,
            } => {
                let t = gossipsub::IdentTopic::new(topic.clone());
                self.topics.insert(t.hash());
                let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() else {
                    let _ = reply.send(Err(NetError::Gossip {
                        topic,
                        message: "this node does not run gossipsub".into(),
                    }));
                    return;
                };
                let mut result = gossip
                    .subscribe(&t)
                    .map(|_| ())
                    .map_err(|e| NetError::Gossip {
                        topic: topic.clone(),
                        message: e.to_string(),
                    });
                if let (Ok(()), Some(params)) = (&result, params) {
                    result = gossip
                        .set_topic_params(t, params)
                        .map_err(|e| NetError::Gossip {
                            topic,
                            message: e.to_string(),
                        });
                }
                let _ = reply.send(result);
            }
            Command::Unsubscribe { topic } => {
                let t = gossipsub::IdentTopic::new(topic);
                if let Some(g) = self.swarm.behaviour_mut().gossip.as_mut() {
                    g.unsubscribe(&t);
                }
                self.topics.remove(&t.hash());
            }
            Command::Publish { topic, data, reply } => {
                let len = data.len() as u64;
                let t = gossipsub::IdentTopic::new(topic.clone());
                let published = match self.swarm.behaviour_mut().gossip.as_mut() {
                    Some(g) => g.publish(t, data),
                    None => Err(gossipsub::PublishError::NoPeersSubscribedToTopic),
                };
                let result = match published {
                    Ok(_) => {
                        let stats = self.topic_stats.entry(topic).or_default();
                        stats.published += 1;
                        stats.published_bytes += len;
                        Ok(())
                    }
                    Err(e) => Err(NetError::Gossip {
                        topic,
                        message: match e {
                            gossipsub::PublishError::NoPeersSubscribedToTopic => {
                                "no peer is subscribed".into()
                            }
                            other => other.to_string(),
                        },
                    }),
                };
                let _ = reply.send(result);
            }
            Command::Validate {
                id,
                source,
                acceptance,
            } => {
                if let Some(g) = self.swarm.behaviour_mut().gossip.as_mut() {
                    g.report_message_validation_result(&id, &source, acceptance);
                }
            }
            Command::GossipScore { peer, reply } => {
                let score = self
                    .swarm
                    .behaviour()
                    .gossip
                    .as_ref()
                    .and_then(|g| g.peer_score(&peer));
                let _ = reply.send(score);
            }
            Command::TopicPeers { topic, reply } => {
                let hash = gossipsub::IdentTopic::new(topic).hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossip
                    .as_ref()
                    .map(|g| {
                        g.all_peers()
                            .filter(|(_, topics)| topics.contains(&&hash))
                            .map(|(p, _)| *p)
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(peers);
            }
            Command::TopicStats { topic, reply } => {
                let _ = reply.send(self.topic_stats.get(&topic).cloned().unwrap_or_default());
            }
        }
    }

    fn handle_gossip_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let topic = message.topic.into_string();
                let stats = self.topic_stats.entry(topic.clone()).or_default();
                stats.received += 1;
                stats.received_bytes += message.data.len() as u64;
                let item = GossipMessage {
                    id: message_id.clone(),
                    source: propagation_source,
                    topic,
                    data: message.data,
                };
                if let Err(e) = self.sinks.gossip.try_send(item) {
                    // No one to judge it now: drop it without forwarding or penalty.
                    tracing::debug!("gossip message ignored: {e}");
                    if let Some(g) = self.swarm.behaviour_mut().gossip.as_mut() {
                        g.report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                    }
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic, .. } => {
                let _ = self.net_events.send(NetEvent::Subscribed {
                    peer: peer_id,
                    topic: topic.into_string(),
                });
            }
            other => tracing::trace!(?other, "gossipsub event"),
        }
    }

    fn rr(&mut self, proto: Proto) -> Option<&mut request_response::Behaviour<FrameCodec>> {
        match proto {
            Proto::Msg => self.swarm.behaviour_mut().msg.as_mut().map(|b| &mut **b),
            Proto::Mailbox => Some(&mut self.swarm.behaviour_mut().mailbox),
        }
    }

    /// Counts a mailbox answer until its `ResponseSent` or `InboundFailure`; entries that
    /// outlive twice the request timeout (no event came) are dropped on the way.
    fn track_mailbox_answer(
        &mut self,
        id: request_response::InboundRequestId,
        reader: Reader,
        size: u64,
    ) {
        let now = Instant::now();
        if now.duration_since(self.mailbox_swept) > MAILBOX_SWEEP {
            self.mailbox_swept = now;
            let stale: Vec<_> = self
                .mailbox_out
                .iter()
                .filter(|(_, (_, _, at))| {
                    now.duration_since(*at) > 2 * behaviour::MSG_REQUEST_TIMEOUT
                })
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                self.mailbox_answer_done(id);
            }
        }
        if let Some((reader, size, _)) = self.mailbox_out.insert(id, (reader, size, now)) {
            // An id seen twice (not expected): the first answer's count goes.
            self.mailbox_sending.sub(reader, size);
        }
    }

    fn mailbox_answer_done(&mut self, id: request_response::InboundRequestId) {
        if let Some((reader, size, _)) = self.mailbox_out.remove(&id) {
            self.mailbox_sending.sub(reader, size);
        }
    }

    fn handle_rr_event(&mut self, proto: Proto, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
            } => {
                let (sink, queued) = match proto {
                    Proto::Msg => (&self.sinks.msg, &self.inbound_queued[0]),
                    Proto::Mailbox => (&self.sinks.mailbox, &self.inbound_queued[1]),
                };
                let Some(queued) = QueuedBytes::take(queued, request.len()) else {
                    // Dropping the channel tells the sender to retry later.
                    tracing::debug!(
                        peer = %short(&peer),
                        "inbound request dropped: too many bytes wait for the capability"
                    );
                    return;
                };
                let net = self
                    .connections
                    .get(&peer)
                    .and_then(|c| c.get(&connection_id))
                    .map_or(NetGroup::Other, NetGroup::of);
                let item = InboundRequest {
                    id: request_id,
                    peer,
                    net,
                    bytes: request,
                    channel,
                    _queued: queued,
                };
                if let Err(e) = sink.try_send(item) {
                    // Overloaded or shutting down: dropping the channel tells the sender
                    // to retry later.
                    tracing::debug!(peer = %short(&peer), "inbound request dropped: {e}");
                }
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&(proto, request_id)) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&(proto, request_id)) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        message: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                tracing::debug!(peer = %short(&peer), %error, "inbound request failed");
                if proto == Proto::Mailbox {
                    self.mailbox_answer_done(request_id);
                }
            }
            Event::ResponseSent { request_id, .. } => {
                if proto == Proto::Mailbox {
                    self.mailbox_answer_done(request_id);
                }
            }
        }
    }

    fn handle_dial(
        &mut self,
        address: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    ) {
        let target = peer_id_of(&address);
        if let Some(peer) = target {
            if peer == *self.swarm.local_peer_id() {
                let _ = reply.send(Err(NetError::Dial {
                    address,
                    message: "that is this node's own address".into(),
                }));
                return;
            }
            if self.swarm.is_connected(&peer) {
                let _ = reply.send(Ok(peer));
                return;
            }
        }
        let opts = match target {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![without_p2p(&address)])
                .condition(PeerCondition::Always)
                .build(),
            None => DialOpts::unknown_peer_id().address(address.clone()).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(id, (address, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(NetError::Dial {
                    address,
                    message: e.to_string(),
                }));
            }
        }
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.on_closed(peer_id, connection_id, num_established),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => self.on_dial_error(connection_id, error.to_string()),
            SwarmEvent::NewListenAddr { address, .. } => {
                // A relay hands its addresses to the users it makes reservations for: its
                // concrete listen addresses are its external ones.
                if self.role == Role::Relay && is_dialable(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.events.publish(EventKind::Listening {
                    address: address.to_string(),
                });
                let _ = self.net_events.send(NetEvent::ListenAddrs(
                    self.swarm.listeners().cloned().collect(),
                ));
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                // A relay reservation ended (the relay went away): listen again on reconnect.
                for relay in &mut self.relays {
                    if relay.circuit == Some(listener_id) {
                        relay.circuit = None;
                    }
                }
                let _ = self.net_events.send(NetEvent::ListenAddrs(
                    self.swarm.listeners().cloned().collect(),
                ));
            }
            SwarmEvent::ExpiredListenAddr { .. } => {
                let _ = self.net_events.send(NetEvent::ListenAddrs(
                    self.swarm.listeners().cloned().collect(),
                ));
            }
            SwarmEvent::Behaviour(event) => self.handle_behaviour_event(event),
            other => tracing::trace!(?other, "swarm event"),
        }
    }

    fn on_connected(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint, n: u32) {
        let remote = endpoint.get_remote_address().clone();
        self.connections
            .entry(peer)
            .or_default()
            .insert(id, remote.clone());
        if let Some((_, reply)) = self.pending_dials.remove(&id) {
            let _ = reply.send(Ok(peer));
        }
        for relay in &mut self.relays {
            if relay.peer_id == Some(peer) {
                relay.connected = true;
                relay.dialing = None;
                relay.last_error = None;
                relay.backoff = RELAY_BACKOFF_MIN;
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, without_p2p(&relay.address));
                // Reachable through the relay (circuit relay v2) even behind a NAT: the
                // circuit address shows up among our listen addresses, hence in our ticket.
                if relay.circuit.is_none() && self.role == Role::User {
                    let circuit = relay.address.clone().with(Protocol::P2pCircuit);
                    match self.swarm.listen_on(circuit) {
                        Ok(id) => relay.circuit = Some(id),
                        Err(e) => {
                            tracing::warn!(relay = %relay.address, error = %e, "cannot listen through the relay")
                        }
                    }
                }
            }
        }
        if n == 1 {
            let _ = self.net_events.send(NetEvent::Connected(peer));
            tracing::info!(peer = %short(&peer), %remote, "peer connected");
            self.events.publish(EventKind::PeerConnected {
                peer_id: peer.to_string(),
                address: remote.to_string(),
            });
        }
    }

    fn on_closed(&mut self, peer: PeerId, id: ConnectionId, remaining: u32) {
        if let Some(conns) = self.connections.get_mut(&peer) {
            conns.remove(&id);
            if conns.is_empty() {
                self.connections.remove(&peer);
            }
        }
        if remaining == 0 {
            self.rtt.remove(&peer);
            let now = tokio::time::Instant::now();
            for relay in &mut self.relays {
                if relay.peer_id == Some(peer) {
                    relay.connected = false;
                    relay.next_attempt = now + relay.backoff;
                }
            }
            let _ = self.net_events.send(NetEvent::Disconnected(peer));
            tracing::info!(peer = %short(&peer), "peer disconnected");
            self.events.publish(EventKind::PeerDisconnected {
                peer_id: peer.to_string(),
            });
        }
    }

    fn on_dial_error(&mut self, id: ConnectionId, message: String) {
        if let Some((address, reply)) = self.pending_dials.remove(&id) {
            let _ = reply.send(Err(NetError::Dial {
                address,
                message: message.clone(),
            }));
        }
        let now = tokio::time::Instant::now();
        for relay in &mut self.relays {
            if relay.dialing == Some(id) {
                relay.dialing = None;
                relay.last_error = Some(message.clone());
                relay.next_attempt = now + relay.backoff;
                relay.backoff = (relay.backoff * 2).min(RELAY_BACKOFF_MAX);
                tracing::warn!(relay = %relay.address, error = %message, "relay unreachable; will retry");
                self.events.publish(EventKind::RelayUnreachable {
                    address: relay.address.to_string(),
                    error: message.clone(),
                });
            }
        }
    }

    fn handle_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtt.insert(peer, rtt);
                self.events.publish(EventKind::Ping {
                    peer_id: peer.to_string(),
                    rtt_ms: rtt.as_secs_f64() * 1000.0,
                });
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Err(e),
                ..
            }) => tracing::debug!(peer = %short(&peer), error = %e, "ping failed"),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for addr in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                let _ = self.net_events.send(NetEvent::Identified {
                    peer: peer_id,
                    listen_addrs: info.listen_addrs,
                });
            }
            BehaviourEvent::Msg(event) => self.handle_rr_event(Proto::Msg, event),
            BehaviourEvent::Mailbox(event) => self.handle_rr_event(Proto::Mailbox, event),
            BehaviourEvent::Gossip(event) => self.handle_gossip_event(event),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => self.on_mdns_discovered(found),
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                tracing::debug!(peer = %short(&peer), "DHT routing updated");
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    self.hole_punches.succeeded += 1;
                    tracing::info!(peer = %short(&remote_peer_id), "direct connection by hole punching");
                }
                Err(e) => {
                    self.hole_punches.failed += 1;
                    tracing::info!(
                        peer = %short(&remote_peer_id),
                        error = %e,
                        "hole punching failed; the relayed connection stays in use"
                    );
                }
            },
            other => tracing::trace!(?other, "behaviour event"),
        }
    }

    fn on_mdns_discovered(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in found {
            by_peer.entry(peer).or_default().push(addr);
        }
        for (peer, addrs) in by_peer {
            self.events.publish(EventKind::PeerDiscovered {
                peer_id: peer.to_string(),
                addresses: addrs.iter().map(ToString::to_string).collect(),
            });
            if !self.swarm.is_connected(&peer) {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(peer = %short(&peer), error = %e, "mDNS dial not started");
                }
            }
        }
    }

    fn handle_maintenance(&mut self) {
        let now = tokio::time::Instant::now();
        for i in 0..self.relays.len() {
            let relay = &self.relays[i];
            if relay.connected || relay.dialing.is_some() || relay.next_attempt > now {
                continue;
            }
            let Some(peer) = relay.peer_id else { continue };
            if self.swarm.is_connected(&peer) {
                self.relays[i].connected = true;
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(vec![without_p2p(&relay.address)])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let id = opts.connection_id();
            let relay = &mut self.relays[i];
            match self.swarm.dial(opts) {
                Ok(()) => relay.dialing = Some(id),
                Err(e) => {
                    relay.last_error = Some(e.to_string());
                    relay.next_attempt = now + relay.backoff;
                    relay.backoff = (relay.backoff * 2).min(RELAY_BACKOFF_MAX);
                }
            }
        }
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .connections
            .iter()
            .map(|(peer, conns)| {
                let mut addrs: Vec<String> = conns.values().map(ToString::to_string).collect();
                addrs.sort();
                addrs.dedup();
                PeerInfo {
                    peer_id: peer.to_string(),
                    addrs,
                    rtt_ms: self.rtt.get(peer).map(|d| d.as_secs_f64() * 1000.0),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    fn status(&self) -> NetStatus {
        let mut connected_peers: Vec<String> =
            self.connections.keys().map(ToString::to_string).collect();
        connected_peers.sort();
        NetStatus {
            listen_addrs: self.swarm.listeners().map(ToString::to_string).collect(),
            connected_peers,
            relays: self
                .relays
                .iter()
                .map(|r| RelayStatus {
                    address: r.address.to_string(),
                    connected: r.connected,
                    last_error: if r.connected {
                        None
                    } else {
                        r.last_error.clone()
                    },
                    mailbox_registered_at: None,
                })
                .collect(),
            hole_punches: self.hole_punches,
        }
    }
}

/// The short form of a peer id for logs.
pub fn short(peer: &PeerId) -> String {
    let s = peer.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}

/// The `/p2p/<peer>` multiaddr component, for building dialable addresses.
pub fn p2p(peer: PeerId) -> Protocol<'static> {
    Protocol::P2p(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_listen_port_in_use_is_refused_before_libp2p_shares_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let e = port_is_free(&addr).unwrap_err();
        assert!(e.contains("already in use"), "{e}");
        drop(taken);
        assert_eq!(port_is_free(&addr), Ok(()));
        let any: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        assert_eq!(port_is_free(&any), Ok(()));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let quic: Multiaddr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .unwrap();
        assert!(port_is_free(&quic).is_err());
        // IPv4 taken, IPv6 on the same port is another socket for libp2p (IPv6-only).
        let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            let v6: Multiaddr = format!("/ip6/::/tcp/{port}").parse().unwrap();
            assert_eq!(port_is_free(&v6), Ok(()));
        }
        // A relayed address is not ours to probe.
        let circuit: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p-circuit")
            .parse()
            .unwrap();
        assert_eq!(port_is_free(&circuit), Ok(()));
    }

    #[test]
    fn an_error_chain_leaves_out_empty_and_repeated_messages() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                Ok(())
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "Cannot assign requested address",
        ));
        assert_eq!(error_chain(&e), "Cannot assign requested address");
    }
}
