//! `tern demo`: a complete local scenario on loopback, in temporary directories that are
//! removed at the end, printed as a transcript (JSON with `--json`).
//!
//! Today's scenario: alice and bob start; alice adds bob by his contact ticket (which carries
//! his addresses and signed prekeys) and they compare safety numbers; the nodes connect and
//! ping; alice sends an end-to-end encrypted message and watches it go sent -> delivered ->
//! read; bob answers; bob adds alice back, which shares their presence keys, and alice
//! watches bob online, away and (when he stops) offline at once; while bob is offline alice
//! writes to him: the messages go to bob's home relay, and arrive when bob comes back; all
//! stop cleanly. Each capability added to Tern extends it.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tern_node::{
    Config, ContactTicket, DataDir, Identity, Node, NodeHandle, NodeOptions,
    events::{EventKind, Subscription},
};

use crate::Globals;

/// How long any single step may take before the demo reports a failure.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Presence heartbeat of the demo nodes (30 s by default; short here so it shows).
const DEMO_HEARTBEAT_MS: u64 = 1_000;

#[derive(Debug, Serialize)]
struct Step {
    at_ms: u64,
    actor: String,
    text: String,
}

struct Transcript {
    start: Instant,
    steps: Vec<Step>,
    json: bool,
}

impl Transcript {
    fn say(&mut self, actor: &str, text: impl Into<String>) {
        let step = Step {
            at_ms: self.start.elapsed().as_millis() as u64,
            actor: actor.into(),
            text: text.into(),
        };
        if !self.json {
            println!(
                "[{:>6.3}s] {:<6} {}",
                step.at_ms as f64 / 1000.0,
                step.actor,
                step.text
            );
        }
        self.steps.push(step);
    }
}

struct DemoNode {
    name: &'static str,
    handle: NodeHandle,
    events: Subscription,
    _dir: tempfile::TempDir,
}

async fn start(name: &'static str, relays: Vec<tern_node::Multiaddr>) -> anyhow::Result<DemoNode> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("tern-demo-{name}-"))
        .tempdir()
        .context("cannot create a temporary directory")?;
    Identity::create(&DataDir::new(tmp.path().join("node")))?;
    start_in(name, tmp, relays, None).await
}

/// Starts (or restarts) `name`'s node in `tmp`. `since`: the events already in its log
/// after that seq are waited on too (a restarted node may receive before the demo
/// subscribes: what its relay held arrives within moments of the start).
async fn start_in(
    name: &'static str,
    tmp: tempfile::TempDir,
    relays: Vec<tern_node::Multiaddr>,
    since: Option<u64>,
) -> anyhow::Result<DemoNode> {
    let dir = DataDir::new(tmp.path().join("node"));
    let handle = Node::start(NodeOptions {
        data_dir: dir,
        config: {
            let mut c = Config {
                name: Some(name.into()),
                ..Config::loopback()
            };
            c.presence.heartbeat_ms = DEMO_HEARTBEAT_MS;
            c.relays = relays;
            c
        },
    })
    .await
    .with_context(|| format!("cannot start {name}'s node"))?;
    let events = handle.subscribe(since)?;
    Ok(DemoNode {
        name,
        handle,
        events,
        _dir: tmp,
    })
}

/// Waits for the first event matching `pick`.
async fn wait_for<T>(
    node: &mut DemoNode,
    what: &str,
    mut pick: impl FnMut(&EventKind) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let event = if node.events.backlog.is_empty() {
            tokio::time::timeout_at(deadline, node.events.live.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("{} did not see {what} within {STEP_TIMEOUT:?}", node.name)
                })?
                .with_context(|| format!("{}'s event stream ended", node.name))?
        } else {
            node.events.backlog.remove(0)
        };
        if let Some(v) = pick(&event.kind) {
            return Ok(v);
        }
    }
}

/// Runs the scenario.
pub(crate) async fn run(g: &Globals) -> anyhow::Result<()> {
    // Quiet unless asked: `RUST_LOG=tern_node=debug tern demo` shows the nodes' logs.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(crate::daemon::without_secrets(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut t = Transcript {
        start: Instant::now(),
        steps: Vec::new(),
        json: g.out.json,
    };
    if !g.out.json {
        println!("Tern demo: two nodes on loopback, in temporary directories\n");
    }
    let relay_tmp = tempfile::Builder::new()
        .prefix("tern-demo-relay-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let relay = tern_node::relay::start(
        DataDir::new(relay_tmp.path().join("relay")),
        tern_store_forward::RelayConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            admin_bind: "127.0.0.1:0".parse()?,
            ..Default::default()
        },
    )
    .await?;
    let relay_addr = relay
        .addresses()
        .await?
        .into_iter()
        .next()
        .context("the relay listens nowhere")?;
    t.say(
        "relay",
        format!("started at {relay_addr} (mailboxes for offline users)"),
    );
    let mut alice = start("alice", Vec::new()).await?;
    t.say("alice", format!("started as {}", alice.handle.peer_id()));
    let mut bob = start("bob", vec![relay_addr.clone()]).await?;
    t.say(
        "bob",
        format!(
            "started as {}, home relay {}",
            bob.handle.peer_id(),
            relay.peer_id()
        ),
    );

    let ticket = bob.handle.ticket().await?;
    let text = ticket.encode();
    t.say(
        "bob",
        format!("shares his contact ticket {}…", &text[..24.min(text.len())]),
    );
    let parsed = ContactTicket::decode(&text)?;
    t.say(
        "alice",
        format!(
            "reads the ticket: peer {} at {} address(es)",
            parsed.peer_id,
            parsed.addrs.len()
        ),
    );
    let addr = parsed
        .addrs
        .iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .or(parsed.addrs.first())
        .cloned()
        .context("bob's ticket carries no address")?
        .with(tern_node::net::p2p(parsed.peer_id));
    let peer = alice.handle.dial(addr.clone()).await?;
    t.say("alice", format!("connected to bob over {addr}"));
    anyhow::ensure!(peer == bob.handle.peer_id(), "dialed the wrong peer");

    let bob_id = bob.handle.peer_id().to_string();
    let alice_id = alice.handle.peer_id().to_string();
    let rtt = wait_for(&mut alice, "a ping from bob", |k| match k {
        EventKind::Ping { peer_id, rtt_ms } if *peer_id == bob_id => Some(*rtt_ms),
        _ => None,
    })
    .await?;
    t.say("alice", format!("ping bob: {rtt:.2} ms round trip"));
    let rtt = wait_for(&mut bob, "a ping from alice", |k| match k {
        EventKind::Ping { peer_id, rtt_ms } if *peer_id == alice_id => Some(*rtt_ms),
        _ => None,
    })
    .await?;
    t.say("bob", format!("ping alice: {rtt:.2} ms round trip"));

    // Contacts and an end-to-end encrypted conversation.
    let contact = alice.handle.contact_add(&text, "bob").await?;
    t.say(
        "alice",
        format!(
            "adds bob as a contact; safety number {}",
            contact.safety_number
        ),
    );
    let id = alice
        .handle
        .send("bob", "Hello Bob! This is end-to-end encrypted.")
        .await?
        .to_hex();
    t.say(
        "alice",
        format!("sends message …{} (durably queued)", &id[id.len() - 8..]),
    );
    let (from, body) = wait_for(&mut bob, "alice's message", |k| match k {
        EventKind::Message {
            id: m, from, text, ..
        } if *m == id => Some((from.clone(), text.clone())),
        _ => None,
    })
    .await?;
    t.say("bob", format!("receives from {from}: {body:?}"));
    let bob_view = bob.handle.contact_show(&from).await?;
    t.say(
        "bob",
        format!(
            "sees a message request from {from}; safety number {} ({})",
            bob_view.safety_number,
            if bob_view.safety_number == contact.safety_number {
                "matches alice's"
            } else {
                "MISMATCH"
            }
        ),
    );
    for state in ["sent", "delivered"] {
        wait_for(&mut alice, state, |k| match k {
            EventKind::Receipt {
                id: m, state: s, ..
            } if *m == id && s == state => Some(()),
            _ => None,
        })
        .await?;
        t.say("alice", format!("message is {state}"));
    }
    bob.handle.mark_read(&from).await?;
    t.say("bob", "reads it");
    wait_for(&mut alice, "read", |k| match k {
        EventKind::Receipt { id: m, state, .. } if *m == id && state == "read" => Some(()),
        _ => None,
    })
    .await?;
    t.say("alice", "message is read");
    bob.handle.send(&from, "Hi Alice, loud and clear.").await?;
    let reply = wait_for(&mut alice, "bob's reply", |k| match k {
        EventKind::Message { text, .. } => Some(text.clone()),
        _ => None,
    })
    .await?;
    t.say("alice", format!("receives from bob: {reply:?}"));
    let history = alice.handle.history("bob", 10).await?;
    t.say(
        "alice",
        format!(
            "history with bob: {}",
            history
                .iter()
                .map(|m| format!("{}: {} ({})", m.from, m.text, m.state))
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    );

    // Presence: bob adds alice back, so each holds the key that opens the other's frames.
    let alice_ticket = alice.handle.ticket().await?.encode();
    bob.handle.contact_add(&alice_ticket, "alice").await?;
    t.say(
        "bob",
        "adds alice as a contact: his presence key goes to her over their encrypted session",
    );
    let presence = |who: &'static str, want: &'static str| {
        move |k: &EventKind| match k {
            EventKind::PresenceChanged { name, state, .. } if name == who && state == want => {
                Some(())
            }
            _ => None,
        }
    };
    wait_for(&mut alice, "bob online", presence("bob", "online")).await?;
    t.say(
        "alice",
        format!("sees bob online (signed frames on his gossipsub topic, heartbeat {DEMO_HEARTBEAT_MS} ms)"),
    );
    bob.handle.set_presence("away").await?;
    t.say("bob", "steps away");
    wait_for(&mut alice, "bob away", presence("bob", "away")).await?;
    t.say("alice", "sees bob away");
    bob.handle.set_presence("online").await?;
    wait_for(&mut alice, "bob back", presence("bob", "online")).await?;
    t.say("alice", "sees bob online again");

    // Bob's mailbox must be registered at his relay before he leaves (it is within moments
    // of connecting; on a loaded machine the demo could otherwise outrun it).
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !bob
        .handle
        .status()
        .await?
        .relays
        .iter()
        .any(|r| r.mailbox_registered_at.is_some())
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "bob's mailbox was not registered at his relay within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bob.handle.shutdown().await?;
    t.say(
        "bob",
        "stopped (database flushed, 'offline' published on the way out)",
    );
    wait_for(&mut alice, "bob offline", presence("bob", "offline")).await?;
    let seen = alice.handle.presence(Some("bob")).await?;
    let last_seen = seen
        .first()
        .and_then(|p| p.last_seen)
        .map(|t| format!("{} ms ago", tern_node::events::now_ms().saturating_sub(t)))
        .unwrap_or_else(|| "unknown".into());
    t.say(
        "alice",
        format!("sees bob offline at once; last seen {last_seen}"),
    );

    // Store and forward: bob is offline, so alice's node deposits at bob's home relay.
    let mut ids = Vec::new();
    for text in ["Are you there?", "I'll leave this with your relay."] {
        ids.push(alice.handle.send("bob", text).await?.to_hex());
    }
    t.say("alice", "sends 2 messages while bob is offline");
    for id in &ids {
        wait_for(&mut alice, "stored at the relay", |k| match k {
            EventKind::Receipt { id: m, state, .. } if m == id && state == "stored" => Some(()),
            _ => None,
        })
        .await?;
    }
    t.say(
        "alice",
        "both are 'stored': bob's relay holds them durably (ciphertext only)",
    );
    let DemoNode { _dir: bob_dir, .. } = bob;
    let mut bob = start_in("bob", bob_dir, vec![relay_addr], Some(0)).await?;
    t.say("bob", "comes back online and fetches from his relay");
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let text = wait_for(&mut bob, "a relayed message", |k| match k {
            EventKind::Message { id, text, .. } if ids.contains(id) => Some(text.clone()),
            _ => None,
        })
        .await?;
        got.push(text);
    }
    t.say("bob", format!("receives through the relay: {got:?}"));
    for id in &ids {
        wait_for(&mut alice, "delivered", |k| match k {
            EventKind::Receipt { id: m, state, .. } if m == id && state == "delivered" => Some(()),
            _ => None,
        })
        .await?;
    }
    t.say("alice", "both messages are delivered");
    bob.handle.shutdown().await?;
    t.say("bob", "stopped (database flushed)");
    alice.handle.shutdown().await?;
    t.say("alice", "stopped (database flushed)");
    relay.shutdown().await;
    t.say("relay", "drained and stopped");
    drop(alice);
    drop(bob);
    t.say("demo", "temporary directories removed; done");
    if g.out.json {
        println!("{}", serde_json::to_string(&t.steps)?);
    }
    Ok(())
}
