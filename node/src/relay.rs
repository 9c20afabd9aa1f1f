//! Relay mode (`tern relay`): the same node binary serving mailboxes
//! (`/tern/mailbox/1`, rules and storage from `tern-store-forward`), circuit relay v2 and
//! the Kademlia server, plus a loopback admin endpoint with `/metrics` and `/healthz`.
//!
//! One task owns the [`MailboxServer`]: it drains the requests that are ready, handles
//! them, flushes once (group commit), then answers all of them, so a deposit is acked only
//! once it is on disk. After a deposit it tells the recipient, if connected, how many
//! envelopes wait (`Notice`), and does so again whenever a mailbox owner connects.
//! Shutdown (SIGTERM) drains: requests already received are answered, the store is flushed,
//! and only then does the network stop.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use libp2p::{Multiaddr, PeerId};
use tern_store_forward::{
    Gauge, MailboxServer, PeerBytes, RelayConfig, Reply, Request, ServerEvent,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    data_dir::{DataDir, DataDirLock},
    events::{EventBus, now_ms},
    identity::Identity,
    net::{self, InboundRequest, NetEvent, NetGroup, NetHandle, Proto, Reader},
    node::NodeError,
    store::Store,
};

/// Most requests handled between two flushes.
const BATCH_LIMIT: usize = 512;

/// Errors of relay mode.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Starting the node parts (lock, identity, network) failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The mailbox store failed.
    #[error("mailbox store: {0}")]
    Mailbox(#[from] tern_store_forward::ServerError),
    /// A listen address in the relay config is not a multiaddr.
    #[error("invalid listen address {0:?} in the relay config: {1}")]
    Listen(String, String),
    /// The relay config breaks a rule.
    #[error("invalid relay config: {0}")]
    Config(#[from] tern_store_forward::ConfigError),
    /// The admin endpoint could not bind.
    #[error("cannot serve the admin endpoint on {0}: {1}")]
    Admin(SocketAddr, std::io::Error),
}

enum AdminCmd {
    Metrics(oneshot::Sender<String>),
    Health(oneshot::Sender<Result<(), String>>),
}

/// A running relay.
pub struct RelayHandle {
    peer_id: PeerId,
    net: NetHandle,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    net_shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    net_task: tokio::task::JoinHandle<()>,
    drain_timeout: Duration,
    _lock: DataDirLock,
    store: Store,
    flusher: tern_store_forward::Flusher,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// The relay's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The network handle.
    pub fn net(&self) -> &NetHandle {
        &self.net
    }

    /// Test hook: the mailbox database's flushes never end from now on, as sled 0.34's
    /// can (the relay then stops the database after its flush limit).
    #[doc(hidden)]
    pub fn hang_mailbox_flushes(&self) {
        self.flusher.hang_flushes();
    }

    /// Where `/metrics` and `/healthz` are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The relay's addresses with `/p2p/<id>`, for users' `--relay`.
    pub async fn addresses(&self) -> Result<Vec<Multiaddr>, RelayError> {
        let addrs = self
            .net
            .listen_addrs()
            .await
            .map_err(NodeError::from)?
            .into_iter()
            .map(|a| a.with(net::p2p(self.peer_id)))
            .collect();
        Ok(addrs)
    }

    /// Drains and stops: answers what was received, flushes, then stops the network.
    /// New requests arriving meanwhile are refused (their senders retry elsewhere or
    /// later). Gives up waiting after `drain_timeout` (the store flushes on drop).
    pub async fn shutdown(self) {
        let drain = self.drain_timeout;
        self.shutdown.cancel();
        for t in self.tasks {
            if tokio::time::timeout(drain, t).await.is_err() {
                tracing::warn!(?drain, "drain timed out");
            }
        }
        self.net_shutdown.cancel();
        let _ = self.net_task.await;
        // The node's own store (its event log): flushed and checkpointed.
        if let Err(e) = self.store.close().await {
            tracing::warn!(error = %e, "could not close the relay's node store");
        }
        tracing::info!("relay stopped");
    }
}

/// Starts a relay on `data_dir` (an identity is made on first start).
pub async fn start(data_dir: DataDir, config: RelayConfig) -> Result<RelayHandle, RelayError> {
    config.validate()?;
    if config.min_free_disk_mb == 0 {
        tracing::warn!(
            "min_free_disk_mb = 0: no disk space is kept in reserve, and sled cannot recover \
             from a disk that fills up completely; see docs/OPERATOR.md"
        );
    }
    let lock = data_dir.lock().map_err(NodeError::from)?;
    let identity = match Identity::load(&data_dir) {
        Ok(i) => i,
        Err(crate::identity::IdentityError::Missing { .. }) => {
            Identity::create(&data_dir).map_err(NodeError::from)?
        }
        Err(e) => return Err(NodeError::from(e).into()),
    };
    let mut listen = Vec::new();
    for a in &config.listen {
        listen.push(
            a.parse::<Multiaddr>()
                .map_err(|e| RelayError::Listen(a.clone(), e.to_string()))?,
        );
    }
    let node_config = Config {
        listen,
        mdns: false,
        max_connections: config.max_connections,
        max_connections_per_peer: 8,
        idle_timeout_secs: config.idle_timeout_secs,
        ..Config::default()
    };
    let now = now_ms() / 1000;
    let server = MailboxServer::open(
        &data_dir.root().join("mailbox"),
        config.limits.clone(),
        config.server_options(),
        now,
    )?;
    // The node's own small store holds the event log (listen addresses, connections).
    let store = Store::open(&data_dir.db_path()).map_err(NodeError::from)?;
    let events = EventBus::open(&store, &data_dir.events_path()).map_err(NodeError::from)?;
    let shutdown = CancellationToken::new();
    let net_shutdown = CancellationToken::new();
    let (msg_tx, _) = mpsc::channel(1);
    let (gossip_tx, _) = mpsc::channel(1);
    let (mailbox_tx, mailbox_rx) = mpsc::channel(crate::messaging::INBOUND_CHANNEL_CAPACITY);
    let (net, net_task) = net::spawn(
        &identity,
        &node_config,
        events,
        net_shutdown.clone(),
        net::Sinks {
            msg: msg_tx,
            gossip: gossip_tx,
            mailbox: mailbox_tx,
        },
        net::Role::Relay,
        &[],
    )
    .await
    .map_err(NodeError::from)?;
    let (admin_tx, admin_rx) = mpsc::channel(16);
    let listener = tokio::net::TcpListener::bind(config.admin_bind)
        .await
        .map_err(|e| RelayError::Admin(config.admin_bind, e))?;
    let admin_addr = listener
        .local_addr()
        .map_err(|e| RelayError::Admin(config.admin_bind, e))?;
    let admin_task = tokio::spawn(serve_admin(listener, admin_tx, shutdown.clone()));
    let flusher = server.flusher();
    let actor = MailboxActor {
        server,
        net: net.clone(),
        purge_every: config.purge_interval(),
        last_flush_error: None,
        fetch_in_flight: config.max_fetch_in_flight(),
        flush_limit: config.flush_limit(),
    };
    let net_events = net.net_events();
    let mailbox_task = tokio::spawn(actor.run(mailbox_rx, admin_rx, net_events, shutdown.clone()));
    tracing::info!(peer_id = %identity.peer_id(), admin = %admin_addr, "relay started");
    Ok(RelayHandle {
        peer_id: identity.peer_id(),
        net,
        admin_addr,
        shutdown,
        net_shutdown,
        tasks: vec![mailbox_task, admin_task],
        net_task,
        drain_timeout: config.drain_timeout(),
        _lock: lock,
        store,
        flusher,
    })
}

/// Bytes of fetch pages on their way to one peer at most (four full pages): a node fetches
/// one page at a time, and a peer that never reads must not hold the relay-wide limit alone.
const FETCH_IN_FLIGHT_PER_PEER: u64 = 4 * 1024 * 1024;
/// Bytes of fetch pages on their way to the peers of one network at most (an IPv4 /24 or an
/// IPv6 /48, [`NetGroup`]): identities cost nothing, so without it 16 identities that never
/// read would hold the relay-wide default (64 MiB); with it that takes four networks.
const FETCH_IN_FLIGHT_PER_NET: u64 = 16 * 1024 * 1024;

/// What one batch may still answer in fetch pages: the relay-wide limit, the per-network
/// and the per-peer one, less what is on its way already and what the batch gave so far.
/// I/O-free.
struct FetchBudget {
    left: u64,
    per_peer: u64,
    per_net: u64,
    taken: HashMap<PeerId, u64>,
    taken_net: HashMap<NetGroup, u64>,
}

/// What is on its way to a request's reader, by peer and by network.
#[derive(Debug, Clone, Copy)]
struct Sending {
    to_peer: u64,
    to_net: u64,
}

impl FetchBudget {
    /// A batch's budget, with `limit` in all, `per_net` for each network and `per_peer` for
    /// each peer, while `sending` bytes are on their way.
    fn new(limit: u64, per_net: u64, per_peer: u64, sending: u64) -> Self {
        Self {
            left: limit.saturating_sub(sending),
            per_peer,
            per_net,
            taken: HashMap::new(),
            taken_net: HashMap::new(),
        }
    }

    /// What a request of `reader` may use, while `sending` is on its way to it.
    fn for_request(&self, reader: &Reader, sending: Sending) -> u64 {
        let peer_left = self
            .per_peer
            .saturating_sub(sending.to_peer)
            .saturating_sub(self.taken.get(&reader.peer).copied().unwrap_or(0));
        let net_left = self
            .per_net
            .saturating_sub(sending.to_net)
            .saturating_sub(self.taken_net.get(&reader.net).copied().unwrap_or(0));
        self.left.min(peer_left).min(net_left)
    }

    /// `reader`'s request used `used` bytes (at most what [`Self::for_request`] gave).
    fn spent(&mut self, reader: Reader, used: u64) {
        self.left = self.left.saturating_sub(used);
        *self.taken.entry(reader.peer).or_default() += used;
        *self.taken_net.entry(reader.net).or_default() += used;
    }
}

struct MailboxActor {
    server: MailboxServer,
    net: NetHandle,
    purge_every: Duration,
    last_flush_error: Option<String>,
    /// Most bytes of fetch pages on their way to readers.
    fetch_in_flight: u64,
    /// How long a flush may take before the database stops.
    flush_limit: Duration,
}

impl MailboxActor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<InboundRequest>,
        mut admin: mpsc::Receiver<AdminCmd>,
        mut net_events: broadcast::Receiver<NetEvent>,
        shutdown: CancellationToken,
    ) {
        let mut purge = tokio::time::interval(self.purge_every);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(req) = requests.recv() => {
                    let mut batch = vec![req];
                    while batch.len() < BATCH_LIMIT {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    self.handle_batch(batch).await;
                }
                Some(cmd) = admin.recv() => self.handle_admin(cmd).await,
                ev = net_events.recv() => {
                    if let Ok(NetEvent::Connected(peer)) = ev {
                        self.notify_if_waiting(peer);
                    }
                }
                _ = purge.tick() => {
                    let purged = self.server.purge(now_ms() / 1000);
                    if purged > 0 {
                        tracing::info!(purged, "expired envelopes purged");
                    }
                    self.flush().await;
                }
            }
        }
        // Drain: answer everything already received, then the final flush.
        let mut batch = Vec::new();
        while let Ok(r) = requests.try_recv() {
            batch.push(r);
        }
        if !batch.is_empty() {
            tracing::info!(requests = batch.len(), "draining");
            self.handle_batch(batch).await;
        }
        self.flush().await;
    }

    async fn flush(&mut self) -> bool {
        let result = match self.server.write_pending() {
            Ok(()) => {
                let flusher = self.server.flusher();
                match tokio::time::timeout(self.flush_limit, flusher.flush_async()).await {
                    Ok(flushed) => flushed.map(|_| ()).map_err(|e| e.to_string()),
                    // sled 0.34 may never end it: stop instead of waiting with every request
                    // and `/healthz` behind it.
                    Err(_) => {
                        let why = format!(
                            "a flush did not end within {} s; restart the relay",
                            self.flush_limit.as_secs_f64()
                        );
                        flusher.stop(why.clone());
                        Err(why)
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                self.last_flush_error = None;
                true
            }
            Err(e) => {
                self.server.count_flush_failure();
                tracing::error!(error = %e, "mailbox flush failed; deposits answered Unavailable");
                self.last_flush_error = Some(e);
                false
            }
        }
    }

    async fn handle_batch(&mut self, batch: Vec<InboundRequest>) {
        let now = now_ms() / 1000;
        // Pages still on their way count against the limits, in all, per network and per
        // peer; this batch gets the rest.
        let mut fetch = FetchBudget::new(
            self.fetch_in_flight,
            FETCH_IN_FLIGHT_PER_NET,
            FETCH_IN_FLIGHT_PER_PEER,
            self.net.mailbox_bytes_sending(),
        );
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        for req in &batch {
            let reader = req.reader();
            let sending = Sending {
                to_peer: self.net.mailbox_bytes_sending_to(&req.peer),
                to_net: self.net.mailbox_bytes_sending_to_net(&req.net),
            };
            let budget = fetch.for_request(&reader, sending);
            self.server.set_fetch_budget(budget);
            let reply = match PeerBytes::new(req.peer.to_bytes()) {
                Ok(peer) => self.server.handle(now, &peer, &req.bytes),
                Err(_) => Reply::unavailable(),
            };
            fetch.spent(reader, budget - self.server.fetch_budget());
            if let Some(code) = reply.error {
                tracing::debug!(peer = %net::short(&req.peer), code = code.as_str(), "mailbox request refused");
            }
            replies.push(reply);
        }
        if !self.flush().await {
            self.server.fail_unflushed(&mut replies);
        }
        let mut notices = Vec::new();
        for (req, reply) in batch.into_iter().zip(replies) {
            // A reply turned into `Unavailable` by a failed flush carries no event.
            if let Some(ServerEvent::Deposited { recipient, waiting }) = &reply.event {
                notices.push((recipient.clone(), *waiting));
            }
            let _ = self
                .net
                .respond_mailbox(req.id, req.reader(), req.channel, reply.bytes)
                .await;
        }
        notices.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        notices.dedup_by(|a, b| {
            if a.0 == b.0 {
                b.1 = b.1.max(a.1);
                true
            } else {
                false
            }
        });
        for (recipient, waiting) in notices {
            if let Ok(peer) = PeerId::from_bytes(recipient.as_bytes()) {
                self.send_notice(peer, waiting);
            }
        }
    }

    fn notify_if_waiting(&self, peer: PeerId) {
        if let Ok(p) = PeerBytes::new(peer.to_bytes()) {
            let waiting = self.server.waiting(&p);
            if waiting > 0 {
                self.send_notice(peer, waiting);
            }
        }
    }

    /// Tells a connected recipient how many envelopes wait (best effort: no addresses, so
    /// nothing is dialed; the recipient also fetches whenever it connects).
    fn send_notice(&self, peer: PeerId, waiting: u32) {
        let net = self.net.clone();
        tokio::spawn(async move {
            if !net.is_connected(peer).await.unwrap_or(false) {
                return;
            }
            let frame = Request::Notice { waiting }.to_bytes();
            if let Err(e) = net
                .request_on(Proto::Mailbox, peer, Vec::new(), frame)
                .await
            {
                tracing::debug!(peer = %net::short(&peer), error = %e, "notice not delivered");
            }
        });
    }

    async fn handle_admin(&mut self, cmd: AdminCmd) {
        match cmd {
            AdminCmd::Metrics(reply) => {
                let status = self.net.status().await.ok();
                let connections = status
                    .as_ref()
                    .map_or(0.0, |s| s.connected_peers.len() as f64);
                let bytes_on_disk = self.server.size_on_disk().unwrap_or(0) as f64;
                let text = self.server.metrics().render_prometheus(&[
                    Gauge {
                        name: "tern_relay_connections",
                        help: "Peers connected now.",
                        value: connections,
                    },
                    Gauge {
                        name: "tern_relay_disk_bytes",
                        help: "Bytes the mailbox database uses on disk.",
                        value: bytes_on_disk,
                    },
                ]);
                let _ = reply.send(text);
            }
            AdminCmd::Health(reply) => {
                let _ = reply.send(match &self.last_flush_error {
                    None => Ok(()),
                    Some(e) => Err(format!("last flush failed: {e}")),
                });
            }
        }
    }
}

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` (200 `ok`, or 503 with the
/// reason) on the loopback admin address until shutdown.
async fn serve_admin(
    listener: tokio::net::TcpListener,
    admin: mpsc::Sender<AdminCmd>,
    shutdown: CancellationToken,
) {
    let admin = Arc::new(admin);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin_response(&admin, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn admin_response(
    admin: &mpsc::Sender<AdminCmd>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let respond = |status: u16, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
    };
    if req.method() != hyper::Method::GET {
        return respond(405, "text/plain", "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            if admin.send(AdminCmd::Metrics(tx)).await.is_err() {
                return respond(503, "text/plain", "relay stopping\n".into());
            }
            match rx.await {
                Ok(text) => respond(200, "text/plain; version=0.0.4", text),
                Err(_) => respond(503, "text/plain", "relay stopping\n".into()),
            }
        }
        "/healthz" => {
            let (tx, rx) = oneshot::channel();
            if admin.send(AdminCmd::Health(tx)).await.is_err() {
                return respond(503, "text/plain", "relay stopping\n".into());
            }
            match rx.await {
                Ok(Ok(())) => respond(200, "text/plain", "ok\n".into()),
                Ok(Err(e)) => respond(503, "text/plain", format!("{e}\n")),
                Err(_) => respond(503, "text/plain", "relay stopping\n".into()),
            }
        }
        _ => respond(
            404,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(net: u8) -> Reader {
        Reader {
            peer: PeerId::random(),
            net: NetGroup::V4([10, 0, net]),
        }
    }

    fn sending(to_peer: u64, to_net: u64) -> Sending {
        Sending { to_peer, to_net }
    }

    #[test]
    fn a_batch_shares_the_fetch_limits_in_all_and_per_peer() {
        let (a, b) = (reader(1), reader(2));
        // 10 in all, 4 per peer (networks do not limit here), 3 on their way already (1 of
        // them to a).
        let mut f = FetchBudget::new(10, 100, 4, 3);
        assert_eq!(f.for_request(&a, sending(1, 1)), 3);
        f.spent(a, 3);
        assert_eq!(
            f.for_request(&a, sending(1, 1)),
            0,
            "a has 4 on its way and taken"
        );
        assert_eq!(f.for_request(&b, sending(0, 0)), 4);
        f.spent(b, 2);
        f.spent(reader(3), 2);
        // 7 - 3 - 2 - 2 = 0 left in all: b's own room does not matter then.
        assert_eq!(f.for_request(&b, sending(0, 0)), 0);
        // Nothing left in all from the start.
        assert_eq!(
            FetchBudget::new(10, 100, 4, 12).for_request(&a, sending(0, 0)),
            0
        );
    }

    #[test]
    fn peers_of_one_network_share_its_limit() {
        // 100 in all, 6 per network, 4 per peer.
        let mut f = FetchBudget::new(100, 6, 4, 0);
        let (a, b, other) = (reader(1), reader(1), reader(2));
        assert_eq!(f.for_request(&a, sending(0, 1)), 4);
        f.spent(a, 4);
        // b has nothing on its way, but its network has 1 + 4.
        assert_eq!(f.for_request(&b, sending(0, 1)), 1);
        f.spent(b, 1);
        assert_eq!(
            f.for_request(&reader(1), sending(0, 1)),
            0,
            "the network is full"
        );
        // Another network is not affected.
        assert_eq!(f.for_request(&other, sending(0, 0)), 4);
        // Which network a connection counts for.
        let net = |a: &str| NetGroup::of(&a.parse().unwrap());
        assert_eq!(
            net("/ip4/192.0.2.7/tcp/1"),
            net("/ip4/192.0.2.200/udp/9/quic-v1")
        );
        assert_ne!(net("/ip4/192.0.2.7/tcp/1"), net("/ip4/192.0.3.7/tcp/1"));
        assert_eq!(
            net("/ip6/2001:db8:1:2::1/tcp/1"),
            net("/ip6/2001:db8:1:ffff::9/tcp/1")
        );
        assert_ne!(
            net("/ip6/2001:db8:1::1/tcp/1"),
            net("/ip6/2001:db8:2::1/tcp/1")
        );
        assert_eq!(
            net("/ip6/::ffff:192.0.2.1/tcp/1"),
            net("/ip4/192.0.2.9/tcp/1")
        );
        assert_eq!(net("/dns4/example.org/tcp/1"), NetGroup::Other);
    }
}
