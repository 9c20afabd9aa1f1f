//! Relay memory: RSS of a `tern relay` process holding many idle client connections.
//!
//! Run: `cargo build --release -p tern-cli && cargo bench -p tern-tests --bench relay`
//! (env `TERN_BENCH_CLIENTS`, default 5000; uses `target/release/tern` or `$TERN_BIN`).
//! The relay runs as its own process; the clients are minimal libp2p swarms (TCP, noise,
//! yamux: exactly the connection a user's node keeps open) in this process, each with its
//! own identity. The baseline, measured in the same run, is the same relay process with no
//! client: the figure is (RSS with clients - RSS without) / clients.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench binary: panics report failures

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{SwarmBuilder, noise, swarm::dummy, tcp, yamux};
use tern_tests::RelayProcess;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let clients: usize = std::env::var("TERN_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let limit = open_files_limit();
    assert!(
        limit as usize > clients + 256,
        "the open-files limit ({limit}) is too low for {clients} connections: raise `ulimit -n`"
    );
    let dir = tempfile::tempdir().unwrap();
    // `target/release/tern`: build it first (see the command above).
    let relay = RelayProcess::spawn(&dir.path().join("relay"), "/ip4/127.0.0.1/tcp/0");
    let pid = relay.pid();
    let addr = relay.addr.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = rss_kib(pid);
    println!("Tern relay memory ({clients} idle connections, release build)");
    println!(
        "  relay RSS with no client: {:.1} MiB",
        base as f64 / 1024.0
    );

    let start = Instant::now();
    let (tx, mut connected) = tokio::sync::mpsc::channel(clients);
    for _ in 0..clients {
        let addr = addr.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut swarm = SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    tcp::Config::default(),
                    noise::Config::new,
                    yamux::Config::default,
                )
                .unwrap()
                .with_behaviour(|_| dummy::Behaviour)
                .unwrap()
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
                .build();
            swarm.dial(addr).unwrap();
            let mut told = false;
            loop {
                if let libp2p::swarm::SwarmEvent::ConnectionEstablished { .. } =
                    swarm.select_next_some().await
                    && !told
                {
                    told = true;
                    let _ = tx.send(()).await;
                }
            }
        });
    }
    drop(tx);
    for i in 0..clients {
        tokio::time::timeout(Duration::from_secs(300), connected.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {clients} clients connected"));
    }
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let loaded = rss_kib(pid);
    let per = (loaded.saturating_sub(base)) as f64 * 1024.0 / clients as f64;
    println!(
        "  {clients} clients connected in {took:.1?}; relay RSS {:.1} MiB",
        loaded as f64 / 1024.0
    );
    println!(
        "  per connection: {:.1} KB (target <= 50 KB; WhatsApp ran about 30 KB)",
        per / 1000.0
    );
    drop(relay);
}
