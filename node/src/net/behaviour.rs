//! The composed libp2p behaviour of a Tern node and the swarm construction.
//!
//! Each protocol registers itself as one field; the derive macro wires them together.
//! Transport: TCP + noise + yamux, and QUIC. Kademlia runs under a Tern-specific protocol
//! name so Tern nodes never mix with the public IPFS DHT.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, connection_limits, dcutr, gossipsub, identify,
    identity::Keypair, kad, mdns, noise, ping, relay, request_response, swarm::NetworkBehaviour,
    swarm::behaviour::toggle::Toggle, tcp, yamux,
};

use super::{boxed::Boxed, frame::FrameCodec};
use crate::config::Config;

/// Kademlia protocol name of the Tern DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/tern/id/1.0.0";
/// One-to-one message delivery.
pub const MSG_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/msg/1");
/// Largest `/tern/msg/1` request frame: a 64 KiB text plus encryption and envelope overhead.
pub const MSG_MAX_REQUEST: usize = 96 * 1024;
/// Largest `/tern/msg/1` response frame (room for the answers to a full batch).
pub const MSG_MAX_RESPONSE: usize = 4096;
/// Store-and-forward mailboxes on relays.
pub const MAILBOX_PROTOCOL: StreamProtocol = StreamProtocol::new(tern_store_forward::PROTOCOL);
/// How long a `/tern/msg/1` request may wait for its response.
pub const MSG_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent `/tern/msg/1` streams per connection.
pub const MSG_MAX_STREAMS: usize = 512;
/// QUIC: a connection with no packet from the peer for this long is dead.
pub const QUIC_IDLE_TIMEOUT_MS: u32 = 4_000;
/// QUIC: keep-alive interval (well below the idle timeout).
pub const QUIC_KEEP_ALIVE: Duration = Duration::from_millis(1_500);
/// How often connected peers are pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Largest gossipsub frame (room for group messages; each topic's validator enforces its
/// own, smaller limit before anything is forwarded).
pub const GOSSIP_MAX_TRANSMIT: usize = 128 * 1024;
/// Gossipsub's own heartbeat (mesh maintenance, gossip emission, score decay).
pub const GOSSIP_HEARTBEAT: Duration = Duration::from_secs(1);

/// Gossipsub peer-score thresholds (v1.1). A peer below `gossip_threshold` gets no gossip
/// from us and we ignore its gossip; below `publish_threshold` we do not publish to it;
/// below `graylist_threshold` we ignore everything it sends.
pub fn gossip_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 1.0,
    }
}

/// Global gossipsub peer-score parameters. IP colocation (P6) is off: users behind one NAT
/// share an address, and every test node shares 127.0.0.1. Behaviour penalties (P7,
/// broken promises and GRAFT floods) keep the library defaults.
pub fn gossip_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        app_specific_weight: 1.0,
        ..gossipsub::PeerScoreParams::default()
    }
}

/// Per-topic score parameters of a presence topic. Presence is sparse (one message per
/// heartbeat per owner), so mesh delivery-rate penalties (P3, P3b) are off; what counts
/// is P4: every message our validator rejects (forged, replayed, stale, garbage, flood)
/// costs its forwarder `-(count^2)`, the count decaying by 1% a second: one rejected frame
/// makes the score negative, four put the peer below the gossip threshold (-10, no more
/// gossip with it), eight below the publish threshold (-50), nine graylist it (-80:
/// everything it sends is ignored).
pub fn presence_topic_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -1.0,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    }
}

/// Every protocol a Tern node speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Caps on established connections, total and per peer.
    pub(crate) limits: connection_limits::Behaviour,
    /// Learns peers' listen addresses and protocols.
    pub(crate) identify: identify::Behaviour,
    /// Liveness and round-trip time.
    pub(crate) ping: ping::Behaviour,
    /// The Tern DHT (client mode on user nodes).
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    /// LAN discovery, switched by `config.mdns`.
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    /// `/tern/msg/1`: envelopes in, durable-store acknowledgements out (users only).
    pub(crate) msg: Toggle<Boxed<request_response::Behaviour<FrameCodec>>>,
    /// Gossipsub (presence, later groups): StrictNoSign, every message validated by its
    /// capability before it is forwarded, peer scoring on.
    pub(crate) gossip:
        Toggle<Boxed<gossipsub::Behaviour<gossipsub::IdentityTransform, JoinedTopics>>>,
    /// `/tern/mailbox/1`: deposits, fetches and acks on relays; notices to users.
    pub(crate) mailbox: request_response::Behaviour<FrameCodec>,
    /// Circuit relay v2 server, on relays only.
    pub(crate) relay: Toggle<relay::Behaviour>,
    /// Circuit relay v2 client: users reachable through their home relays (users only).
    pub(crate) relay_client: Toggle<Boxed<relay::client::Behaviour>>,
    /// Direct connection upgrade through relay (hole punching) after a relayed connection
    /// (users only).
    pub(crate) dcutr: Toggle<Boxed<dcutr::Behaviour>>,
}

/// What a swarm is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A user's node: Kademlia client, no relay service.
    User,
    /// A relay: Kademlia server (bootstrap for users), circuit relay v2 server, mailboxes.
    Relay,
}

/// The gossipsub subscription filter: we track a remote peer's subscription only to topics
/// we joined ourselves. A peer follows one topic per contact, so the library's default cap
/// (100 topics per peer, beyond which it ignores the peer's whole RPC) would break users with
/// many contacts, while tracking topics we do not take part in only costs memory. The net
/// actor adds a topic before it subscribes and removes it after it leaves.
#[derive(Clone, Default)]
pub(crate) struct JoinedTopics(Arc<Mutex<HashSet<gossipsub::TopicHash>>>);

impl JoinedTopics {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<gossipsub::TopicHash>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts subscriptions to `topic` from now on.
    pub(crate) fn insert(&self, topic: gossipsub::TopicHash) {
        self.set().insert(topic);
    }

    /// Stops accepting subscriptions to `topic`.
    pub(crate) fn remove(&self, topic: &gossipsub::TopicHash) {
        self.set().remove(topic);
    }
}

impl gossipsub::TopicSubscriptionFilter for JoinedTopics {
    fn can_subscribe(&mut self, topic_hash: &gossipsub::TopicHash) -> bool {
        self.set().contains(topic_hash)
    }
}

/// Errors building the swarm.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The transport could not be built.
    #[error("cannot build the {what} transport: {message}")]
    Transport {
        /// Which part.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// mDNS could not start (no multicast socket).
    #[error("cannot start mDNS: {0}")]
    Mdns(std::io::Error),
    /// Gossipsub rejected its configuration (a bug).
    #[error("invalid gossipsub configuration: {0}")]
    Gossip(String),
}

/// Builds the gossipsub behaviour: anonymous (StrictNoSign) messages whose id is a hash of
/// topic and data, validation by the application before forwarding, and peer scoring.
fn build_gossip(
    topics: JoinedTopics,
) -> Result<gossipsub::Behaviour<gossipsub::IdentityTransform, JoinedTopics>, BuildError> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            let mut h = blake3::Hasher::new();
            h.update(m.topic.as_str().as_bytes());
            h.update(&[0]);
            h.update(&m.data);
            gossipsub::MessageId::new(&h.finalize().as_bytes()[..20])
        })
        .max_transmit_size(GOSSIP_MAX_TRANSMIT)
        .heartbeat_interval(GOSSIP_HEARTBEAT)
        .build()
        .map_err(|e| BuildError::Gossip(e.to_string()))?;
    let mut gossip = gossipsub::Behaviour::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Anonymous,
        config,
        topics,
    )
    .map_err(|e| BuildError::Gossip(e.to_string()))?;
    gossip
        .with_peer_score(gossip_score_params(), gossip_thresholds())
        .map_err(BuildError::Gossip)?;
    Ok(gossip)
}

/// Builds the swarm for `keypair` with the given configuration.
pub(crate) fn build_swarm(
    keypair: Keypair,
    config: &Config,
    topics: JoinedTopics,
    role: Role,
) -> Result<Swarm<Boxed<Behaviour>>, BuildError> {
    let mdns_on = config.mdns;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_connections))
        .with_max_pending_outgoing(Some(config.max_connections));
    let mut mdns_error = None;
    let gossip = build_gossip(topics)?;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| BuildError::Transport {
            what: "TCP",
            message: e.to_string(),
        })?
        .with_quic_config(|mut c| {
            // A peer that died without closing (kill -9, lost network) is noticed within
            // seconds, so requests move to a fresh connection instead of waiting on it.
            c.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            c.keep_alive_interval = QUIC_KEEP_ALIVE;
            c
        })
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| BuildError::Transport {
            what: "relay client",
            message: e.to_string(),
        })?
        .with_behaviour(|key, relay_client| {
            // Boxed: see `boxed` (per-connection memory on relays).
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            kad.set_mode(Some(match role {
                Role::User => kad::Mode::Client,
                Role::Relay => kad::Mode::Server,
            }));
            let mdns = if mdns_on {
                match mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        mdns_error = Some(e);
                        None
                    }
                }
            } else {
                None
            };
            Boxed::new(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(format!("tern/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL)),
                kad,
                mdns: Toggle::from(mdns),
                msg: Toggle::from((role == Role::User).then(|| {
                    Boxed::new(request_response::Behaviour::with_codec(
                        FrameCodec {
                            max_request: MSG_MAX_REQUEST,
                            max_response: MSG_MAX_RESPONSE,
                        },
                        [(MSG_PROTOCOL, request_response::ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(MSG_REQUEST_TIMEOUT)
                            .with_max_concurrent_streams(MSG_MAX_STREAMS),
                    ))
                })),
                gossip: Toggle::from((role == Role::User).then(|| Boxed::new(gossip))),
                mailbox: request_response::Behaviour::with_codec(
                    FrameCodec {
                        max_request: tern_store_forward::MAX_REQUEST_FRAME,
                        max_response: tern_store_forward::MAX_RESPONSE_FRAME,
                    },
                    [(MAILBOX_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(MSG_REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MSG_MAX_STREAMS),
                ),
                relay: Toggle::from(
                    (role == Role::Relay)
                        .then(|| relay::Behaviour::new(peer_id, relay::Config::default())),
                ),
                relay_client: Toggle::from((role == Role::User).then(|| Boxed::new(relay_client))),
                dcutr: Toggle::from(
                    (role == Role::User).then(|| Boxed::new(dcutr::Behaviour::new(peer_id))),
                ),
            })
        })
        .map_err(|e| BuildError::Transport {
            what: "behaviour",
            message: e.to_string(),
        })?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_timeout())
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    if let Some(e) = mdns_error {
        return Err(BuildError::Mdns(e));
    }
    Ok(swarm)
}
