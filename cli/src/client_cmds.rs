//! The commands that set up a data directory or talk to a running daemon through the
//! local API: `init`, `id`, `status`, `peers`, `dial`, `events`, `stop`.

use anyhow::Context as _;
use serde_json::json;
use tern_node::{
    Config, Identity,
    api::client::{ApiClient, ClientError},
    events::{Event, EventKind},
};

use crate::{
    Globals,
    output::{untrusted, untrusted_line},
};

async fn connect(g: &Globals) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::connect(&g.dir).await?)
}

/// `tern init [--name N]`.
pub(crate) fn init(g: &Globals, name: Option<String>) -> anyhow::Result<()> {
    let config_path = g.dir.config_path();
    // A directory holding only an identity (set up again from a kept `identity.key`) is
    // completed: the identity stays, a config is written.
    let (identity, created) = match Identity::create(&g.dir) {
        Ok(identity) => (identity, true),
        Err(tern_node::identity::IdentityError::AlreadyExists { .. }) if !config_path.exists() => {
            (Identity::load(&g.dir)?, false)
        }
        Err(e) => return Err(e.into()),
    };
    // Never into the directory of a daemon running there (without a config): the lock
    // says whether one does, and is held while the config is written.
    let lock = if created { None } else { Some(g.dir.lock()?) };
    if !config_path.exists() {
        let config = Config {
            name,
            ..Config::default()
        };
        config.write(&config_path)?;
    } else if name.is_some() {
        eprintln!(
            "note: {} already exists and was left as it is; set `name` there",
            config_path.display()
        );
    }
    drop(lock);
    let ticket = tern_node::offline_ticket(&g.dir)?.encode();
    g.out.emit(
        &json!({ "peer_id": identity.peer_id().to_string(), "ticket": ticket }),
        || {
            let what = if created {
                "Created a Tern identity"
            } else {
                "Kept the Tern identity found"
            };
            format!(
                "{what} in {}\npeer id: {}\nStart your node with `tern daemon`, then share the ticket from `tern id`.",
                g.dir.root().display(),
                identity.peer_id()
            )
        },
    )
}

/// `tern id [--qr]`: asks the daemon (for a ticket with live addresses) or reads the identity.
pub(crate) async fn id(g: &Globals, qr: bool) -> anyhow::Result<()> {
    let (peer_id, endpoint_id, ticket) = match ApiClient::connect(&g.dir).await {
        Ok(client) => {
            let info = client.info().await?;
            (info.peer_id, info.endpoint_id, info.ticket)
        }
        Err(ClientError::NoDaemon { .. }) => {
            let identity = Identity::load(&g.dir)?;
            let ticket = tern_node::offline_ticket(&g.dir)?;
            eprintln!("note: no daemon is running, so this ticket carries no addresses yet");
            (
                identity.peer_id().to_string(),
                identity.endpoint_id().to_string(),
                ticket.encode(),
            )
        }
        Err(e) => return Err(e.into()),
    };
    let qr_text = if qr { Some(render_qr(&ticket)?) } else { None };
    let mut value = json!({ "peer_id": peer_id, "endpoint_id": endpoint_id, "ticket": ticket });
    if let Some(q) = &qr_text {
        value["qr"] = json!(q);
    }
    g.out.emit(&value, || {
        let mut s =
            format!("peer id:     {peer_id}\nendpoint id: {endpoint_id}\nticket:      {ticket}");
        if let Some(q) = &qr_text {
            s.push('\n');
            s.push_str(q);
        }
        s
    })
}

fn render_qr(text: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::new(text.to_uppercase().as_bytes())
        .context("the ticket is too long for a QR code")?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .quiet_zone(true)
        .build())
}

/// `tern status`.
pub(crate) async fn status(g: &Globals) -> anyhow::Result<()> {
    let s = connect(g).await?.status().await?;
    g.out.emit(&s, || {
        let mut out = format!("peer id: {}\nlistening on:\n", s.peer_id);
        for a in &s.listen_addrs {
            out.push_str(&format!("  {a}\n"));
        }
        out.push_str(&format!("connected peers: {}\n", s.connected_peers.len()));
        for p in &s.connected_peers {
            out.push_str(&format!("  {p}\n"));
        }
        out.push_str(&format!("relays: {}\n", s.relays.len()));
        for r in &s.relays {
            let state = if r.connected {
                "connected".to_string()
            } else {
                format!(
                    "not connected{}",
                    r.last_error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )
            };
            let mailbox = if r.mailbox_registered_at.is_some() {
                ", mailbox registered"
            } else {
                ""
            };
            out.push_str(&format!("  {} {state}{mailbox}\n", r.address));
        }
        let punches = s.hole_punches;
        if punches.succeeded + punches.failed > 0 {
            out.push_str(&format!(
                "hole punching: {} direct, {} failed\n",
                punches.succeeded, punches.failed
            ));
        }
        out.push_str(&format!("outbox: {}", s.outbox));
        out
    })
}

/// `tern peers`.
pub(crate) async fn peers(g: &Globals) -> anyhow::Result<()> {
    let peers = connect(g).await?.peers().await?;
    g.out.emit(&peers, || {
        if peers.is_empty() {
            return "no connected peers".into();
        }
        peers
            .iter()
            .map(|p| {
                let rtt = p
                    .rtt_ms
                    .map(|r| format!(" ({r:.1} ms)"))
                    .unwrap_or_default();
                format!("{}{rtt}\n  {}", p.peer_id, p.addrs.join("\n  "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `tern dial MA`.
pub(crate) async fn dial(g: &Globals, address: &str) -> anyhow::Result<()> {
    crate::parse_multiaddr(address).map_err(anyhow::Error::msg)?;
    let peer = connect(g).await?.dial(address).await?;
    g.out.emit(&json!({ "peer_id": peer }), || {
        format!("connected to {peer}")
    })
}

/// `tern stop`.
pub(crate) async fn stop(g: &Globals) -> anyhow::Result<()> {
    connect(g).await?.shutdown().await?;
    // Returns once the daemon let go of the directory, so `tern stop && tern daemon` works.
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while g.dir.in_use()? {
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the daemon was asked to stop but still holds {} after {} s",
                g.dir.root().display(),
                STOP_WAIT.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    g.out
        .emit(&json!({ "stopped": true }), || "daemon stopped".into())
}

/// How long `tern stop` waits for the daemon to let go of its directory (its own stop is
/// bounded well below this: the database gets 30 s to close).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `tern events [--since SEQ]`: streams until Ctrl-C.
pub(crate) async fn events(g: &Globals, since: Option<u64>) -> anyhow::Result<()> {
    let client = connect(g).await?;
    // Resumes after the last event shown if it falls behind (a slow terminal or pipe).
    let mut sub = client.events(since).await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            next = sub.next() => match next {
                Some(Ok(event)) => print_event(g, &event)?,
                Some(Err(e)) => anyhow::bail!("bad event from the daemon: {e}"),
                None => anyhow::bail!("the daemon closed the event stream (it stopped?)"),
            },
        }
    }
}

fn print_event(g: &Globals, e: &Event) -> anyhow::Result<()> {
    g.out
        .emit(e, || format!("[{}] {}", e.seq, describe(&e.kind)))
}

/// A one-line human description of an event.
pub(crate) fn describe(kind: &EventKind) -> String {
    match kind {
        EventKind::Listening { address } => format!("listening on {address}"),
        EventKind::PeerConnected { peer_id, address } => {
            format!("connected to {peer_id} via {address}")
        }
        EventKind::PeerDisconnected { peer_id } => format!("disconnected from {peer_id}"),
        EventKind::PeerDiscovered { peer_id, .. } => format!("discovered {peer_id} on the LAN"),
        EventKind::Ping { peer_id, rtt_ms } => format!("ping {peer_id}: {rtt_ms:.2} ms"),
        EventKind::RelayUnreachable { address, error } => {
            format!("relay {address} unreachable: {error}")
        }
        EventKind::ContactAdded {
            name,
            peer_id,
            auto_added,
        } => {
            if *auto_added {
                format!(
                    "message request from {peer_id}, added as contact {}",
                    untrusted_line(name)
                )
            } else {
                format!("contact {} added ({peer_id})", untrusted_line(name))
            }
        }
        EventKind::Message { from, text, id, .. } => {
            let head = format!("message {id} from {}: ", untrusted_line(from));
            let indent = head.chars().count();
            head + &untrusted(text, indent)
        }
        EventKind::Receipt { id, to, state, .. } => {
            format!("message {id} to {}: {state}", untrusted_line(to))
        }
        EventKind::Typing { from, typing, .. } => {
            format!(
                "{} {}",
                untrusted_line(from),
                if *typing {
                    "is typing"
                } else {
                    "stopped typing"
                }
            )
        }
        EventKind::MessageFailed { id, to, reason, .. } => {
            format!("message {id} to {} failed: {reason}", untrusted_line(to))
        }
        EventKind::PresenceChanged { name, state, .. } => {
            format!("{} is now {state}", untrusted_line(name))
        }
        EventKind::ShuttingDown => "node shutting down".into(),
    }
}
