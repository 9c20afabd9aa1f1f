//! The composed libp2p behaviour of a Tern node and the swarm construction.
//!
//! Each protocol registers itself as one field; the derive macro wires them together.
//! Transport: TCP + noise + yamux, and QUIC. Kademlia runs under a Tern-specific protocol
//! name so Tern nodes never mix with the public IPFS DHT.

use std::time::Duration;

use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, connection_limits, identify, identity::Keypair, kad, mdns,
    noise, ping, request_response, swarm::NetworkBehaviour, swarm::behaviour::toggle::Toggle, tcp,
    yamux,
};

use super::frame::FrameCodec;
use crate::config::Config;

/// Kademlia protocol name of the Tern DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/tern/id/1.0.0";
/// One-to-one message delivery.
pub const MSG_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/msg/1");
/// Largest `/tern/msg/1` request frame: a 64 KiB text plus encryption and envelope overhead.
pub const MSG_MAX_REQUEST: usize = 96 * 1024;
/// Largest `/tern/msg/1` response frame.
pub const MSG_MAX_RESPONSE: usize = 1024;
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
    /// `/tern/msg/1`: envelopes in, durable-store acknowledgements out.
    pub(crate) msg: request_response::Behaviour<FrameCodec>,
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
}

/// Builds the swarm for `keypair` with the given configuration.
pub(crate) fn build_swarm(
    keypair: Keypair,
    config: &Config,
) -> Result<Swarm<Behaviour>, BuildError> {
    let mdns_on = config.mdns;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_connections))
        .with_max_pending_outgoing(Some(config.max_connections));
    let mut mdns_error = None;
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
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            kad.set_mode(Some(kad::Mode::Client));
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
            Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(format!("tern/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL)),
                kad,
                mdns: Toggle::from(mdns),
                msg: request_response::Behaviour::with_codec(
                    FrameCodec {
                        max_request: MSG_MAX_REQUEST,
                        max_response: MSG_MAX_RESPONSE,
                    },
                    [(MSG_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(MSG_REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MSG_MAX_STREAMS),
                ),
            }
        })
        .map_err(|e| BuildError::Transport {
            what: "behaviour",
            message: e.to_string(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout()))
        .build();
    if let Some(e) = mdns_error {
        return Err(BuildError::Mdns(e));
    }
    Ok(swarm)
}
