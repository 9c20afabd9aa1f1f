//! The typed client of the local API, used by the `tern` CLI and the tests.
//!
//! It finds the daemon through `<data-dir>/api.json`, sends the bearer token on the WebSocket
//! handshake, and turns "no file" or "connection refused" into [`ClientError::NoDaemon`] with
//! the message users see: "no Tern daemon is running for <dir>; start one with `tern daemon`"
//! (with `--data-dir <dir>` in it unless `<dir>` is the default).

use std::{path::PathBuf, time::Duration};

use jsonrpsee::{
    core::{
        ClientError as RpcClientError,
        client::{ClientT, Subscription, SubscriptionClientT},
        params::ObjectParams,
    },
    ws_client::{WsClient, WsClientBuilder},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    data_dir::DataDir,
    events::Event,
    messaging::{
        Conversation, HistoryItem,
        contacts::{BlockedPeer, ContactView},
    },
    net::PeerInfo,
    node::{NodeInfo, NodeStatus},
};

/// How long a single call may take before the client gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon runs for this data directory.
    #[error(
        "no Tern daemon is running for {}; start one with `{}`",
        dir.display(),
        start_command(dir)
    )]
    NoDaemon {
        /// The data directory.
        dir: PathBuf,
    },
    /// The data directory is a file (or something else that is not a directory).
    #[error("{} is not a directory; --data-dir names a Tern data directory", dir.display())]
    NotADirectory {
        /// The path given.
        dir: PathBuf,
    },
    /// The daemon refused the token or origin.
    #[error("the daemon refused the connection: {0}")]
    Refused(String),
    /// The daemon answered with a JSON-RPC error.
    #[error("{message}")]
    Rpc {
        /// The JSON-RPC error code (see `api::codes`).
        code: i32,
        /// The daemon's message.
        message: String,
    },
    /// Any other transport problem.
    #[error("API connection failed: {0}")]
    Transport(String),
    /// The daemon's answer did not have the expected shape.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
}

impl From<RpcClientError> for ClientError {
    fn from(e: RpcClientError) -> Self {
        match e {
            RpcClientError::Call(obj) => ClientError::Rpc {
                code: obj.code(),
                message: obj.message().to_string(),
            },
            RpcClientError::ParseError(e) => ClientError::Decode(e.to_string()),
            other => ClientError::Transport(other.to_string()),
        }
    }
}

/// A connection to a daemon's API.
#[derive(Debug)]
pub struct ApiClient {
    client: WsClient,
}

impl ApiClient {
    /// Connects to the daemon that serves `dir`.
    pub async fn connect(dir: &DataDir) -> Result<Self, ClientError> {
        let no_daemon = || ClientError::NoDaemon {
            dir: dir.root().to_owned(),
        };
        if dir.root().exists() && !dir.root().is_dir() {
            return Err(ClientError::NotADirectory {
                dir: dir.root().to_owned(),
            });
        }
        let file = super::read_api_file(dir).ok_or_else(no_daemon)?;
        match Self::connect_with(&file.url, &file.token).await {
            Err(ClientError::Transport(msg)) if looks_refused(&msg) => Err(no_daemon()),
            other => other,
        }
    }

    /// Connects to `url` with `token` (tests use this to try bad tokens).
    pub async fn connect_with(url: &str, token: &str) -> Result<Self, ClientError> {
        let mut headers = http::HeaderMap::new();
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Refused("token is not a valid header value".into()))?;
        headers.insert(http::header::AUTHORIZATION, value);
        let client = WsClientBuilder::default()
            .set_headers(headers)
            .request_timeout(REQUEST_TIMEOUT)
            .connection_timeout(Duration::from_secs(5))
            .build(url)
            .await
            .map_err(|e| {
                let msg = e.to_string();
                if msg.contains("401") || msg.contains("403") {
                    ClientError::Refused(msg)
                } else {
                    ClientError::Transport(msg)
                }
            })?;
        Ok(Self { client })
    }

    /// Calls any method with named params; returns the raw JSON result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.call_typed(method, params).await
    }

    async fn call_typed<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, ClientError> {
        let mut obj = ObjectParams::new();
        if let Value::Object(map) = params {
            for (k, v) in map {
                obj.insert(&k, v)
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
            }
        }
        Ok(self.client.request(method, obj).await?)
    }

    /// `info`.
    pub async fn info(&self) -> Result<NodeInfo, ClientError> {
        self.call_typed("info", Value::Null).await
    }

    /// `status`.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        self.call_typed("status", Value::Null).await
    }

    /// `peers`.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ClientError> {
        self.call_typed("peers", Value::Null).await
    }

    /// `dial`; returns the peer id.
    pub async fn dial(&self, address: &str) -> Result<String, ClientError> {
        let v: Value = self
            .call_typed("dial", serde_json::json!({ "address": address }))
            .await?;
        v.get("peer_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Decode("dial result without peer_id".into()))
    }

    /// `shutdown`.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        let _: Value = self.call_typed("shutdown", Value::Null).await?;
        Ok(())
    }

    /// `contactAdd`.
    pub async fn contact_add(&self, ticket: &str, name: &str) -> Result<ContactView, ClientError> {
        self.call_typed(
            "contactAdd",
            serde_json::json!({ "ticket": ticket, "name": name }),
        )
        .await
    }

    /// `contactList`.
    pub async fn contact_list(&self) -> Result<Vec<ContactView>, ClientError> {
        self.call_typed("contactList", Value::Null).await
    }

    /// `contactShow`.
    pub async fn contact_show(&self, name: &str) -> Result<ContactView, ClientError> {
        self.call_typed("contactShow", serde_json::json!({ "name": name }))
            .await
    }

    /// `contactRemove`.
    pub async fn contact_remove(&self, name: &str) -> Result<(), ClientError> {
        let _: Value = self
            .call_typed("contactRemove", serde_json::json!({ "name": name }))
            .await?;
        Ok(())
    }

    /// `contactBlock`.
    pub async fn contact_block(
        &self,
        name: &str,
        blocked: bool,
    ) -> Result<ContactView, ClientError> {
        self.call_typed(
            "contactBlock",
            serde_json::json!({ "name": name, "blocked": blocked }),
        )
        .await
    }

    /// `blockedList`.
    pub async fn blocked_list(&self) -> Result<Vec<BlockedPeer>, ClientError> {
        self.call_typed("blockedList", Value::Null).await
    }

    /// `peerUnblock`.
    pub async fn peer_unblock(&self, peer_id: &str) -> Result<(), ClientError> {
        let _: Value = self
            .call_typed("peerUnblock", serde_json::json!({ "peer_id": peer_id }))
            .await?;
        Ok(())
    }

    /// `send`; returns the message id.
    pub async fn send(&self, to: &str, text: &str) -> Result<String, ClientError> {
        let v: Value = self
            .call_typed("send", serde_json::json!({ "to": to, "text": text }))
            .await?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Decode("send result without id".into()))
    }

    /// `history`.
    pub async fn history(&self, with: &str, limit: usize) -> Result<Vec<HistoryItem>, ClientError> {
        self.call_typed(
            "history",
            serde_json::json!({ "with": with, "limit": limit }),
        )
        .await
    }

    /// `conversations`.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        self.call_typed("conversations", Value::Null).await
    }

    /// `markRead`; returns how many were unread.
    pub async fn mark_read(&self, with: &str) -> Result<u64, ClientError> {
        let v: Value = self
            .call_typed("markRead", serde_json::json!({ "with": with }))
            .await?;
        v.get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| ClientError::Decode("markRead result without count".into()))
    }

    /// `typing`; returns whether it was sent.
    pub async fn typing(&self, to: &str, typing: bool) -> Result<bool, ClientError> {
        let v: Value = self
            .call_typed("typing", serde_json::json!({ "to": to, "typing": typing }))
            .await?;
        Ok(v.get("sent").and_then(Value::as_bool).unwrap_or(false))
    }

    /// `presence` of one contact or of all.
    pub async fn presence(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<crate::presence::PresenceView>, ClientError> {
        let params = match name {
            Some(n) => serde_json::json!({ "name": n }),
            None => Value::Null,
        };
        self.call_typed("presence", params).await
    }

    /// `setPresence`: `online` or `away`.
    pub async fn set_presence(&self, state: &str) -> Result<(), ClientError> {
        let _: Value = self
            .call_typed("setPresence", serde_json::json!({ "state": state }))
            .await?;
        Ok(())
    }

    /// The events after `since` (only new ones without it), resumed when the subscription
    /// ends while the daemon runs: see [`EventStream`].
    pub async fn events(&self, since: Option<u64>) -> Result<EventStream<'_>, ClientError> {
        Ok(EventStream {
            client: self,
            sub: self.subscribe(since).await?,
            last: since,
        })
    }

    /// Subscribes to events after `since`: one subscription, which ends if its reader falls
    /// behind (see [`ApiClient::events`] for a stream that resumes).
    pub async fn subscribe(&self, since: Option<u64>) -> Result<Subscription<Event>, ClientError> {
        let mut obj = ObjectParams::new();
        if let Some(since) = since {
            obj.insert("since", since)
                .map_err(|e| ClientError::Decode(e.to_string()))?;
        }
        Ok(self
            .client
            .subscribe("subscribe", obj, "unsubscribe")
            .await?)
    }
}

/// The events of a daemon, resumed after the last one seen whenever the subscription ends
/// while the daemon still answers ([`ApiClient::events`]).
///
/// A subscription ends when its reader falls behind: the daemon closes one that lags more
/// than 1,024 events (`LAGGED`), and the client stops one whose own buffer fills (jsonrpsee
/// drops the notification that did not fit and may pass on a few later ones before it
/// stops, so a plain [`Subscription`] can have a gap; this stream checks for that after
/// every event). Either way this stream subscribes again with `since` = the last `seq` it
/// returned, so the reader sees every event the daemon's log still holds, once and in order
/// (from the first event it returned: started without `since`, it knows no position before
/// that). It ends (`None`) when the daemon refuses to subscribe (it stopped) or when three
/// subscriptions in a row end before giving an event (a daemon shutting down).
#[derive(Debug)]
pub struct EventStream<'a> {
    client: &'a ApiClient,
    sub: Subscription<Event>,
    last: Option<u64>,
}

/// Subscriptions in a row that may end without an event before the stream ends.
const EMPTY_RESUMES: usize = 3;

impl EventStream<'_> {
    /// The next event; `None` once the daemon is gone.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        let mut empty = 0;
        loop {
            match self.sub.next().await {
                Some(Ok(event)) if self.last.is_some_and(|last| event.seq <= last) => {}
                // The client's buffer overflowed at some point before now: jsonrpsee then
                // drops that notification but may still pass on later ones, so this one
                // may come after a gap. Everything returned so far was received before the
                // overflow (it was checked each time): resume after it.
                Some(Ok(_)) if self.sub.close_reason().is_some() => {
                    tracing::debug!(last = ?self.last, "event subscription lagged; resuming");
                    self.sub = self.client.subscribe(self.last).await.ok()?;
                }
                Some(Ok(event)) => {
                    self.last = Some(event.seq);
                    return Some(Ok(event));
                }
                Some(Err(e)) => return Some(Err(ClientError::Decode(e.to_string()))),
                None if empty < EMPTY_RESUMES => {
                    empty += 1;
                    tracing::debug!(last = ?self.last, "event subscription ended; resuming");
                    self.sub = self.client.subscribe(self.last).await.ok()?;
                }
                None => return None,
            }
        }
    }

    /// The `seq` of the last event returned (or the `since` it started from).
    pub fn last_seq(&self) -> Option<u64> {
        self.last
    }
}

/// The command that starts a daemon for `dir`: `--data-dir` is named unless it is the
/// default directory.
fn start_command(dir: &std::path::Path) -> String {
    if DataDir::os_default().is_some_and(|d| d.root() == dir) {
        "tern daemon".into()
    } else {
        let shown = dir.display().to_string();
        if shown.contains(char::is_whitespace) {
            format!("tern --data-dir '{shown}' daemon")
        } else {
            format!("tern --data-dir {shown} daemon")
        }
    }
}

fn looks_refused(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("refused") || m.contains("connection reset") || m.contains("not connected")
}
