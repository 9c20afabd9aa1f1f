//! The local API (the gateway): JSON-RPC 2.0 over WebSocket on a loopback address, guarded
//! by a bearer token, serving a [`NodeHandle`].
//!
//! The node never imports this module; whoever runs the daemon starts the node first, then
//! [`serve`] on its handle. While the server runs, `<data-dir>/api.json` (mode 0600) holds
//! `{"url","token","pid"}`; [`ApiServer::stop`] removes it. Every method is listed in
//! docs/API.md with its params, result and error codes ([`codes`]).

mod auth;
pub mod client;

use std::{net::SocketAddr, path::PathBuf};

use jsonrpsee::{
    PendingSubscriptionSink, RpcModule, SubscriptionMessage,
    server::{Server, ServerConfig, ServerHandle},
    types::{ErrorObjectOwned, Params},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::broadcast::error::RecvError;

use crate::{
    data_dir::{DataDir, write_private},
    node::{NodeError, NodeHandle},
};

/// Application error codes of the API (JSON-RPC reserves -32768..-32000).
pub mod codes {
    /// The node is shutting down.
    pub const SHUTTING_DOWN: i32 = 1001;
    /// A peer or relay could not be reached.
    pub const UNREACHABLE: i32 = 1002;
    /// The database failed (for example a full disk).
    pub const STORAGE: i32 = 1003;
    /// Any other node failure.
    pub const NODE: i32 = 1004;
    /// A subscriber fell too far behind; resubscribe with `since`.
    pub const LAGGED: i32 = 1005;
    /// No contact with that name.
    pub const UNKNOWN_CONTACT: i32 = 1010;
    /// The message is too large (or empty).
    pub const BAD_MESSAGE: i32 = 1011;
    /// The contact is blocked.
    pub const BLOCKED: i32 = 1012;
    /// The ticket is invalid.
    pub const INVALID_TICKET: i32 = 1013;
    /// The contact name is taken or invalid, or the peer is already a contact.
    pub const BAD_CONTACT: i32 = 1014;
    /// No session can be started with the contact.
    pub const NO_SESSION: i32 = 1015;
    /// A presence state other than online or away was asked for.
    pub const BAD_PRESENCE: i32 = 1020;
}

/// Most simultaneous API connections.
pub const MAX_API_CONNECTIONS: u32 = 64;
/// Most bytes of JSON one `history` answer carries: the newest messages that fit, so the
/// answer stays below the server's and the client's 10 MiB limit on a response (10,000
/// messages of 64 KiB would be over 600 MiB).
pub const HISTORY_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// The newest of `items` (oldest first) whose JSON fits `budget` bytes in all, oldest
/// first; at least the newest one.
fn newest_within<T: Serialize>(mut items: Vec<T>, budget: usize) -> Vec<T> {
    let mut used = 0usize;
    let mut keep = 0;
    for item in items.iter().rev() {
        let size = serde_json::to_vec(item).map_or(0, |v| v.len()) + 1;
        if keep > 0 && used + size > budget {
            break;
        }
        used += size;
        keep += 1;
    }
    items.drain(..items.len() - keep);
    items
}

/// Errors starting or stopping the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The bind address is not loopback.
    #[error("the API must bind a loopback address, not {0}")]
    NotLoopback(SocketAddr),
    /// Binding or serving failed.
    #[error("cannot start the API on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `api.json` could not be written.
    #[error("cannot write {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The contents of `api.json`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiFile {
    /// WebSocket URL of the API.
    pub url: String,
    /// Bearer token.
    pub token: String,
    /// pid of the daemon.
    pub pid: u32,
}

impl std::fmt::Debug for ApiFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiFile")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("pid", &self.pid)
            .finish()
    }
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    handle: ServerHandle,
    api_path: PathBuf,
    url: String,
}

impl ApiServer {
    /// The WebSocket URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops serving and removes `api.json`.
    pub async fn stop(self) {
        let _ = self.handle.stop();
        self.handle.stopped().await;
        remove_api_file(&self.api_path);
    }
}

fn remove_api_file(path: &PathBuf) {
    // Only remove the file if it still describes this process.
    let ours = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ApiFile>(&b).ok())
        .is_some_and(|f| f.pid == std::process::id());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Starts the API for `node` on `bind` and writes `api.json`.
pub async fn serve(node: NodeHandle, bind: SocketAddr) -> Result<ApiServer, ApiError> {
    if !bind.ip().is_loopback() {
        return Err(ApiError::NotLoopback(bind));
    }
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| ApiError::Bind { addr: bind, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ApiError::Bind { addr: bind, source })?;
    drop(listener);
    let token = random_token();
    let middleware = tower::ServiceBuilder::new().layer(auth::AuthLayer::new(&token, local.port()));
    let server = Server::builder()
        .set_config(
            ServerConfig::builder()
                .max_connections(MAX_API_CONNECTIONS)
                .build(),
        )
        .set_http_middleware(middleware)
        .build(local)
        .await
        .map_err(|source| ApiError::Bind {
            addr: local,
            source,
        })?;
    let data_dir = node.data_dir().clone();
    let module = rpc_module(node);
    let handle = server.start(module);
    let url = format!("ws://{local}");
    let api_path = data_dir.api_path();
    let file = ApiFile {
        url: url.clone(),
        token,
        pid: std::process::id(),
    };
    let json = serde_json::to_vec_pretty(&file).expect("ApiFile serializes");
    if let Err(source) = write_private(&api_path, &json, 0o600) {
        let _ = handle.stop();
        return Err(ApiError::File {
            path: api_path,
            source,
        });
    }
    tracing::info!(%url, "local API listening");
    Ok(ApiServer {
        handle,
        api_path,
        url,
    })
}

/// Reads `api.json` of a data directory.
pub fn read_api_file(dir: &DataDir) -> Option<ApiFile> {
    let bytes = std::fs::read(dir.api_path()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    data_encoding::HEXLOWER.encode(&bytes)
}

/// Parses named params (an object), or a single positional object; `null`/absent when `T`
/// allows it.
fn parse<T: DeserializeOwned>(params: &Params<'_>) -> Result<T, ErrorObjectOwned> {
    match params.parse::<T>() {
        Ok(v) => Ok(v),
        Err(e) => params.one::<T>().map_err(|_| e),
    }
}

fn node_error(e: NodeError) -> ErrorObjectOwned {
    use crate::{messaging::MessagingError as M, net::NetError, presence::PresenceError as P};
    let code = match &e {
        NodeError::Messaging(m) => match m {
            M::UnknownContact(_) | M::NotBlocked(_) => codes::UNKNOWN_CONTACT,
            M::StillContact(_) => codes::BAD_CONTACT,
            M::TooLarge { .. } | M::Empty => codes::BAD_MESSAGE,
            M::Blocked(_) => codes::BLOCKED,
            M::InvalidTicket(_) => codes::INVALID_TICKET,
            M::NameTaken(_) | M::AlreadyContact(_) | M::InvalidName(_) => codes::BAD_CONTACT,
            M::NoSession(_) => codes::NO_SESSION,
            M::Store(_) | M::NotDurable(_) | M::NotDurableLeft(_) => codes::STORAGE,
            M::ActorGone => codes::SHUTTING_DOWN,
            M::Crypto(_) => codes::NODE,
        },
        NodeError::Presence(p) => match p {
            P::UnknownContact(_) => codes::UNKNOWN_CONTACT,
            P::InvalidState(_) => codes::BAD_PRESENCE,
            P::Store(_) => codes::STORAGE,
            P::ActorGone => codes::SHUTTING_DOWN,
            P::Messaging(_) => codes::NODE,
        },
        NodeError::ShuttingDown | NodeError::Net(NetError::ActorGone) => codes::SHUTTING_DOWN,
        NodeError::Net(NetError::Dial { .. } | NetError::DialTimeout { .. }) => codes::UNREACHABLE,
        NodeError::Store(_) => codes::STORAGE,
        _ => codes::NODE,
    };
    ErrorObjectOwned::owned(code, e.to_string(), None::<()>)
}

/// Registers `name`: parses params `P`, runs `f`, maps errors to API codes.
fn method<P, R, F, Fut>(m: &mut RpcModule<NodeHandle>, name: &'static str, f: F)
where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Clone + Send + 'static,
    F: Fn(NodeHandle, P) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R, NodeError>> + Send,
{
    m.register_async_method(name, move |params, node, _| {
        let f = f.clone();
        async move {
            let p: P = parse(&params)?;
            f((*node).clone(), p).await.map_err(node_error)
        }
    })
    .expect("unique method name");
}

/// No params.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactAddParams {
    ticket: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockParams {
    name: String,
    #[serde(default = "yes")]
    blocked: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerParams {
    peer_id: PeerIdParam,
}

/// A peer id given as a string (refused as invalid params if it does not parse).
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct PeerIdParam(libp2p::PeerId);

impl TryFrom<String> for PeerIdParam {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
            .map(PeerIdParam)
            .map_err(|e| format!("invalid peer id {s:?}: {e}"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendParams {
    to: String,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    with: String,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    50
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WithParams {
    with: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypingParams {
    to: String,
    typing: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceParams {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPresenceParams {
    state: String,
}

/// Params of `dial`.
#[derive(Debug, Deserialize)]
struct DialParams {
    address: String,
}

/// Params of `subscribe`.
#[derive(Debug, Default, Deserialize)]
struct SubscribeParams {
    since: Option<u64>,
}

fn rpc_module(node: NodeHandle) -> RpcModule<NodeHandle> {
    let mut m = RpcModule::new(node);
    m.register_async_method("info", |_, node, _| async move {
        node.info().await.map_err(node_error)
    })
    .expect("unique method name");
    m.register_async_method("status", |_, node, _| async move {
        node.status().await.map_err(node_error)
    })
    .expect("unique method name");
    m.register_async_method("peers", |_, node, _| async move {
        node.peers().await.map_err(node_error)
    })
    .expect("unique method name");
    m.register_async_method("dial", |params, node, _| async move {
        let p: DialParams = parse(&params)?;
        let address = p.address.parse().map_err(|e| {
            ErrorObjectOwned::owned(
                jsonrpsee::types::error::INVALID_PARAMS_CODE,
                format!("invalid multiaddr {:?}: {e}", p.address),
                None::<()>,
            )
        })?;
        let peer = node.dial(address).await.map_err(node_error)?;
        Ok::<_, ErrorObjectOwned>(serde_json::json!({ "peer_id": peer.to_string() }))
    })
    .expect("unique method name");
    method(
        &mut m,
        "contactAdd",
        |node, p: ContactAddParams| async move { node.contact_add(&p.ticket, &p.name).await },
    );
    method(
        &mut m,
        "contactList",
        |node, _: Option<NoParams>| async move { node.contact_list().await },
    );
    method(&mut m, "contactShow", |node, p: NameParams| async move {
        node.contact_show(&p.name).await
    });
    method(&mut m, "contactRemove", |node, p: NameParams| async move {
        node.contact_remove(&p.name).await?;
        Ok(serde_json::json!({ "removed": p.name }))
    });
    method(&mut m, "contactBlock", |node, p: BlockParams| async move {
        node.contact_block(&p.name, p.blocked).await
    });
    method(
        &mut m,
        "blockedList",
        |node, _: Option<NoParams>| async move { node.blocked_list().await },
    );
    method(&mut m, "peerUnblock", |node, p: PeerParams| async move {
        let PeerIdParam(peer) = p.peer_id;
        node.peer_unblock(peer).await?;
        Ok(serde_json::json!({ "unblocked": peer.to_string() }))
    });
    method(&mut m, "send", |node, p: SendParams| async move {
        let id = node.send(&p.to, &p.text).await?;
        Ok(serde_json::json!({ "id": id.to_hex() }))
    });
    method(&mut m, "history", |node, p: HistoryParams| async move {
        let items = node.history(&p.with, p.limit.clamp(1, 10_000)).await?;
        Ok(newest_within(items, HISTORY_ANSWER_BYTES))
    });
    method(
        &mut m,
        "conversations",
        |node, _: Option<NoParams>| async move { node.conversations().await },
    );
    method(&mut m, "markRead", |node, p: WithParams| async move {
        let count = node.mark_read(&p.with).await?;
        Ok(serde_json::json!({ "count": count }))
    });
    method(&mut m, "typing", |node, p: TypingParams| async move {
        let sent = node.typing(&p.to, p.typing).await?;
        Ok(serde_json::json!({ "sent": sent }))
    });
    method(
        &mut m,
        "presence",
        |node, p: Option<PresenceParams>| async move {
            node.presence(p.unwrap_or_default().name.as_deref()).await
        },
    );
    method(
        &mut m,
        "setPresence",
        |node, p: SetPresenceParams| async move {
            node.set_presence(&p.state).await?;
            Ok(serde_json::json!({ "state": p.state }))
        },
    );
    m.register_method("shutdown", |_, node, _| {
        let node = node.clone();
        // Reply first, then stop: the daemon's main loop notices and shuts down.
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            node.request_shutdown();
        });
        serde_json::json!({ "stopping": true })
    })
    .expect("unique method name");
    m.register_subscription("subscribe", "event", "unsubscribe", subscribe)
        .expect("unique method name");
    m
}

fn to_message(event: &crate::events::Event) -> Result<SubscriptionMessage, serde_json::Error> {
    Ok(serde_json::value::to_raw_value(event)?.into())
}

async fn subscribe(
    params: Params<'static>,
    pending: PendingSubscriptionSink,
    node: std::sync::Arc<NodeHandle>,
    _: jsonrpsee::Extensions,
) -> jsonrpsee::core::SubscriptionResult {
    let p: Option<SubscribeParams> = match parse(&params) {
        Ok(p) => p,
        Err(e) => {
            pending.reject(e).await;
            return Ok(());
        }
    };
    let since = p.unwrap_or_default().since;
    // A position this node never reached (another data directory's, or a typo) would wait
    // silently for events that never come: refuse it.
    if let Some(since) = since
        && let Ok(bus) = node.events()
        && since >= bus.next_seq()
    {
        let newest = bus.next_seq().saturating_sub(1);
        pending
            .reject(ErrorObjectOwned::owned(
                jsonrpsee::types::error::INVALID_PARAMS_CODE,
                format!(
                    "since {since} is ahead of this node's newest event ({newest}); \
                     subscribe without since, or with a seq this node gave"
                ),
                None::<()>,
            ))
            .await;
        return Ok(());
    }
    let sub = match node.subscribe(since) {
        Ok(s) => s,
        Err(e) => {
            pending.reject(node_error(e)).await;
            return Ok(());
        }
    };
    let sink = pending.accept().await?;
    let mut last = since.unwrap_or(0);
    for event in sub.backlog {
        last = event.seq;
        sink.send(to_message(&event)?).await?;
    }
    let mut live = sub.live;
    loop {
        tokio::select! {
            _ = sink.closed() => return Ok(()),
            _ = node.closed() => return Ok(()),
            event = live.recv() => match event {
                Ok(event) if event.seq <= last => continue,
                Ok(event) => {
                    last = event.seq;
                    sink.send(to_message(&event)?).await?;
                }
                Err(RecvError::Lagged(_)) => {
                    let error = serde_json::json!({
                        "code": codes::LAGGED,
                        "message": format!("subscriber lagged; resubscribe with since={last}"),
                        "data": { "since": last },
                    });
                    return Err(jsonrpsee::core::SubscriptionError::from_json(
                        serde_json::value::to_raw_value(&error)?,
                    ));
                }
                Err(RecvError::Closed) => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_answer_keeps_the_newest_messages_that_fit() {
        let items: Vec<String> = (0..10).map(|i| format!("{i}").repeat(100)).collect();
        // Each is 102 bytes of JSON plus a separator.
        let kept = newest_within(items.clone(), 3 * 103);
        assert_eq!(kept, items[7..].to_vec());
        assert_eq!(newest_within(items.clone(), usize::MAX), items);
        // The newest always comes, however large.
        assert_eq!(newest_within(items.clone(), 1), items[9..].to_vec());
        assert!(newest_within(Vec::<String>::new(), 10).is_empty());
    }
}
