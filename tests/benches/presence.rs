//! Presence figures: traffic of one node with many contacts online, and how long after a
//! contact starts its `presenceChanged` arrives, against the configured heartbeat.
//!
//! Run: `cargo bench -p tern-tests --bench presence` (env `TERN_BENCH_CONTACTS`, default 200;
//! `TERN_BENCH_HEARTBEAT_MS`, default 30000, the default heartbeat; `TERN_BENCH_WINDOW_SECS`,
//! default 60; `TERN_BENCH_STARTS`, default 10).
//!
//! One node ("hub") and N contacts, all in this process, form a star: each contact added the
//! hub and the hub added each contact. Run as root, the bench re-executes itself inside a
//! fresh network namespace, so the namespace's loopback carries nothing but this bench: its
//! byte counter is then the hub's wire traffic in both directions (every packet goes to or
//! from the hub), with TCP/IP headers, noise, yamux, gossipsub control, ping and identify
//! included. The payload figures (presence frames only, in and out) come from gossipsub's
//! per-topic counters. Baseline in the same run: the same window with the same connections
//! but presence silent (`share = "nobody"` everywhere), so the difference is presence.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench binary: panics report failures

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tern_node::{config::SharePresence, events::EventKind, presence::wire};
use tern_tests::{NetNs, TestNode};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn lo_bytes() -> u64 {
    std::fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    const INNER: &str = "TERN_BENCH_PRESENCE_INNER";
    if std::env::var_os(INNER).is_none() {
        match NetNs::create() {
            Ok(ns) => {
                let exe = std::env::current_exe().unwrap();
                let status = Command::new("ip")
                    .args(["netns", "exec", &ns.name])
                    .arg(exe)
                    .args(std::env::args().skip(1))
                    .env(INNER, "1")
                    .status()
                    .unwrap();
                drop(ns);
                std::process::exit(status.code().unwrap_or(1));
            }
            Err(reason) => {
                println!(
                    "(no network namespace: {reason}; the loopback counter includes other traffic)"
                );
            }
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

struct Star {
    hub: TestNode,
    contacts: Vec<TestNode>,
}

async fn star(n: usize, heartbeat_ms: u64, share: SharePresence) -> Star {
    let tweak = move |c: &mut tern_node::Config| {
        c.presence.heartbeat_ms = heartbeat_ms;
        c.presence.share = share;
        c.presence.away_after_secs = 0;
    };
    let hub = TestNode::spawn_with("hub", move |c| {
        tweak(c);
        // One connection each way per contact, with room to spare.
        c.max_connections = 4 * n as u32 + 64;
    })
    .await;
    let mut contacts = Vec::with_capacity(n);
    for i in 0..n {
        let c = TestNode::spawn_with(&format!("c{i}"), tweak).await;
        hub.add_contact(&c, &format!("c{i}")).await;
        c.add_contact(&hub, "hub").await;
        c.handle.dial(hub.tcp_addr().await).await.unwrap();
        contacts.push(c);
        if (i + 1) % 50 == 0 {
            eprintln!("  ({} contacts started)", i + 1);
        }
    }
    Star { hub, contacts }
}

async fn wait_all_connected(s: &Star) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = s.hub.handle.status().await.unwrap().connected_peers.len();
        if n >= s.contacts.len() {
            return;
        }
        assert!(Instant::now() < deadline, "only {n} contacts connected");
        eprintln!("  ({n} contacts connected)");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_all_online(s: &Star, heartbeat: Duration) {
    let deadline = Instant::now() + Duration::from_secs(300) + 3 * heartbeat;
    loop {
        let all = s.hub.handle.presence(None).await.unwrap();
        let online = all.iter().filter(|p| p.state == "online").count();
        if online == s.contacts.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {online} of {} online",
            s.contacts.len()
        );
        eprintln!("  ({online} contacts online)");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (wire bytes both ways, payload bytes in, payload bytes out, connections opened) over
/// `window`.
async fn measure(s: &Star, window: Duration) -> (u64, u64, u64, usize) {
    let mut events = s.hub.handle.subscribe(None).unwrap();
    let net = s.hub.handle.net().clone();
    let own = wire::topic_for(&s.hub.handle.peer_id());
    let topics: Vec<String> = s
        .contacts
        .iter()
        .map(|c| wire::topic_for(&c.handle.peer_id()))
        .collect();
    let payload = || {
        let net = net.clone();
        let own = own.clone();
        let topics = topics.clone();
        async move {
            let out = net.topic_stats(own).await.unwrap().published_bytes;
            let mut inb = 0;
            for t in topics {
                inb += net.topic_stats(t).await.unwrap().received_bytes;
            }
            (inb, out)
        }
    };
    let (in0, out0) = payload().await;
    let w0 = lo_bytes();
    let end = tokio::time::Instant::now() + window;
    let mut opened = 0;
    loop {
        match tokio::time::timeout_at(end, events.live.recv()).await {
            Err(_) => break,
            Ok(Ok(e)) if matches!(e.kind, EventKind::PeerConnected { .. }) => opened += 1,
            Ok(_) => {}
        }
    }
    let w1 = lo_bytes();
    let (in1, out1) = payload().await;
    (w1 - w0, in1 - in0, out1 - out0, opened)
}

async fn stop(s: Star) {
    for c in s.contacts {
        c.stop().await;
    }
    s.hub.stop().await;
}

async fn run() {
    let n = env("TERN_BENCH_CONTACTS", 200) as usize;
    let heartbeat_ms = env("TERN_BENCH_HEARTBEAT_MS", 30_000);
    let heartbeat = Duration::from_millis(heartbeat_ms);
    let window = Duration::from_secs(env("TERN_BENCH_WINDOW_SECS", 60));
    let starts = env("TERN_BENCH_STARTS", 10) as usize;
    let per_min = |b: u64| b as f64 * 60.0 / window.as_secs_f64();
    println!(
        "Tern presence figures: one node with {n} contacts online, heartbeat {heartbeat_ms} ms, {}s window",
        window.as_secs()
    );

    // Baseline: the same star with presence silent.
    let quiet = star(n, heartbeat_ms, SharePresence::Nobody).await;
    wait_all_connected(&quiet).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (base_wire, base_in, base_out, base_conns) = measure(&quiet, window).await;
    assert_eq!(base_in + base_out, 0, "nobody published nothing");
    stop(quiet).await;

    let s = star(n, heartbeat_ms, SharePresence::Contacts).await;
    wait_all_connected(&s).await;
    wait_all_online(&s, heartbeat).await;
    let (wire_bytes, pin, pout, conns) = measure(&s, window).await;
    println!(
        "  connections the hub opened during the window: {conns} with presence, {base_conns} without"
    );
    println!(
        "  presence payload at the hub: in {:.1} KiB/min, out {:.1} KiB/min ({:.0} B per contact per minute in)",
        per_min(pin) / 1024.0,
        per_min(pout) / 1024.0,
        per_min(pin) / n as f64
    );
    println!(
        "  hub wire traffic, both directions, everything: {:.1} KiB/min with presence, {:.1} KiB/min without (baseline, same connections) -> presence costs {:.1} KiB/min = {:.0} B per contact per minute",
        per_min(wire_bytes) / 1024.0,
        per_min(base_wire) / 1024.0,
        (per_min(wire_bytes) - per_min(base_wire)) / 1024.0,
        (per_min(wire_bytes) - per_min(base_wire)) / n as f64
    );

    // Time from a contact's start to the hub's presenceChanged.
    let mut hub = s.hub;
    let mut contacts = s.contacts;
    let mut times = Vec::new();
    for c in contacts.iter_mut().take(starts) {
        hub.events = hub.handle.subscribe(None).unwrap();
        c.stop_keep().await;
        let name = c.name.clone();
        hub.wait_for("offline", |e| match &e.kind {
            EventKind::PresenceChanged {
                name: who, state, ..
            } if *who == name && state == "offline" => Some(()),
            _ => None,
        })
        .await;
        let t = Instant::now();
        c.start_again().await;
        hub.wait_for("online", |e| match &e.kind {
            EventKind::PresenceChanged {
                name: who, state, ..
            } if *who == name && state == "online" => Some(()),
            _ => None,
        })
        .await;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "  contact start -> presenceChanged online at the hub: n={} p50 {:.1?} max {:.1?} = {:.4}x the heartbeat (target <= 1x)",
        times.len(),
        times[times.len() / 2],
        times[times.len() - 1],
        times[times.len() - 1].as_secs_f64() / heartbeat.as_secs_f64()
    );
    println!("  (baseline payload check: {base_in} B in, {base_out} B out with share = nobody)");
    stop(Star { hub, contacts }).await;
}
