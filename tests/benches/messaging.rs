//! Messaging figures between two nodes in two processes on loopback, with their baseline
//! measured in the same run over the same connection.
//!
//! Run: `cargo bench -p tern-tests --bench messaging` (env `TERN_BENCH_N`, default 10000,
//! sets the number of round trips; `TERN_BENCH_THROUGHPUT_N`, default 20000, the messages of
//! the throughput run). The bench runs alice; it starts itself again as a child process
//! (`TERN_BENCH_ROLE=bob`) that runs bob's node until its stdin closes, so the two nodes share
//! nothing but the machine (sled, for one, serialises transactions process-wide).
//!
//! - Baseline: a bare `/tern/msg/1` request-response round trip that the recipient answers
//!   at once (a frame it refuses as malformed: no crypto, no storage).
//! - Round trip: `send` (encrypt, commit, flush) -> recipient decrypts, stores, flushes ->
//!   its answer `Delivered` (the receipt) -> sender records `delivered` -> `receipt
//!   delivered` event (that record is flushed later, with other work). The recipient's
//!   durable flush (a journal `fdatasync`) sits on this path; the sender's runs while the
//!   message travels, since its chain position is covered by a durable reservation (all
//!   but the first messages of a chain; the bench's all stay on one).
//! - Floors: the bare round trip plus the recipient's `fdatasync`, and plus the sender's
//!   too (what the first message of a new chain pays), timed the same way.
//! - Throughput: 1 KiB messages with many sends in flight, until the sender has seen `sent`
//!   (durably stored on both sides) for every one: counted from its events.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench binary: panics report failures

use std::{
    io::{BufRead, Write},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tern_node::events::EventKind;
use tern_tests::TestNode;

/// Concurrent `send` callers in the throughput run.
const SENDERS: usize = 256;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn report(name: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p99) = (pct(&v, 0.50), pct(&v, 0.99));
    println!(
        "  {name:<34} n={:<6} p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
        v.len(),
        p50,
        p99,
        v[v.len() - 1]
    );
    (p50, p99)
}

/// A 1 MiB file in `dir` whose blocks are written and synced ahead, as the journal's are,
/// so that syncing a write into it records no new size or blocks.
fn preallocated(dir: &tempfile::TempDir) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(dir.path().join("sync")).unwrap();
    file.write_all_at(&vec![0; 1 << 20], 0).unwrap();
    file.sync_all().unwrap();
    file
}

/// `n` timings of `fdatasync` after a 200-byte write into a pre-allocated file on the disk
/// the nodes' data directories are on (the temporary directory).
fn fdatasync_times(n: usize) -> Vec<Duration> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let file = preallocated(&dir);
    (0..n)
        .map(|i| {
            file.write_all_at(&[1; 200], (i as u64 * 200) % (1 << 20))
                .unwrap();
            let t = Instant::now();
            file.sync_data().unwrap();
            t.elapsed()
        })
        .collect()
}

/// The child process: bob's node, announced as `<ticket> <tcp addr>` on stdout, stopped when
/// stdin closes.
async fn run_bob() {
    let b = TestNode::spawn("bob").await;
    let ticket = b.handle.ticket().await.unwrap().encode();
    println!("bob: {ticket} {}", b.tcp_addr().await);
    std::io::stdout().flush().unwrap();
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await
    .unwrap();
    b.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var("TERN_BENCH_ROLE").as_deref() == Ok("bob") {
        return run_bob().await;
    }
    let n = env("TERN_BENCH_N", 10_000);
    let tn = env("TERN_BENCH_THROUGHPUT_N", 20_000);
    let mut bob = Command::new(std::env::current_exe().unwrap())
        .arg("--bench")
        .env("TERN_BENCH_ROLE", "bob")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stdout also carries its log: find the announcement, then keep draining.
    let mut lines = std::io::BufReader::new(bob.stdout.take().unwrap()).lines();
    let line = loop {
        let l = lines
            .next()
            .expect("bob exited before announcing itself")
            .unwrap();
        if let Some(rest) = l.strip_prefix("bob: ") {
            break rest.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let (ticket, b_addr) = line.trim().split_once(' ').expect("bob announces itself");
    let b_addr: tern_node::Multiaddr = b_addr.parse().unwrap();
    let b_id = tern_node::net::peer_id_of(&b_addr).unwrap();
    let mut a = TestNode::spawn("alice").await;
    a.handle.contact_add(ticket, "bob").await.unwrap();
    a.handle.dial(b_addr).await.unwrap();
    // Warm up: session set-up, connection, caches.
    for i in 0..200 {
        a.handle.send("bob", &format!("warm {i}")).await.unwrap();
    }
    a.wait_history("bob", Duration::from_secs(120), |h| {
        h.iter().all(|m| m.state == "delivered")
    })
    .await;

    println!("Tern messaging figures (two nodes, loopback TCP, release build)");
    // Context for the round trip: two durable flushes sit on it, each an `fdatasync`.
    report("fdatasync of a small write, alone", fdatasync_times(2000));
    // Baseline: bare request-response round trips on the same connection.
    let net = a.handle.net().clone();
    let mut bare = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = net
            .request(b_id, Vec::new(), b"\x01x".to_vec())
            .await
            .unwrap();
        bare.push(t.elapsed());
        assert!(!r.is_empty());
    }
    let (bare50, bare99) = report("bare request-response round trip", bare);

    // The floors under the durability rules: the recipient answers only once its flush
    // made the message durable, and a message leaves only once the ratchet state that
    // sealed it is durable, or is covered by a durable reservation of its chain position
    // (then the sender's flush runs while it travels). So the same bare round trip with
    // the recipient's `fdatasync` after it (a message covered by a reservation), and with
    // the sender's before it too (the first message of a new chain), at the message path's
    // pace (the disk idles between them as it does there).
    let (floor1, floor2) = {
        use std::os::unix::fs::FileExt;
        const SLOTS: u64 = (1 << 20) / 600;
        let dir = tempfile::tempdir().unwrap();
        let file = preallocated(&dir);
        // A 600-byte record (about a message's), then `fdatasync`, as a flush does.
        let store = |k: u64| {
            tokio::task::block_in_place(|| {
                file.write_all_at(&[1; 600], (k % SLOTS) * 600).unwrap();
                file.sync_data().unwrap();
            })
        };
        let mut floors = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..2 * n as u64 {
            let both = i % 2 == 1;
            let t = Instant::now();
            if both {
                store(2 * i);
            }
            let r = net
                .request(b_id, Vec::new(), b"\x01x".to_vec())
                .await
                .unwrap();
            store(2 * i + 1);
            if both { &mut floors.1 } else { &mut floors.0 }.push(t.elapsed());
            assert!(!r.is_empty());
        }
        floors
    };
    for (name, floor) in [
        ("bare + the recipient's fdatasync", floor1),
        ("bare + two fdatasyncs in sequence", floor2),
    ] {
        let (f50, f99) = report(name, floor);
        println!(
            "    (to bare: p50 {:.1}x, p99 {:.1}x)",
            f50.as_secs_f64() / bare50.as_secs_f64(),
            f99.as_secs_f64() / bare99.as_secs_f64()
        );
    }

    // Message round trip to the delivered receipt (fresh subscription: nothing stale queued).
    a.events = a.handle.subscribe(None).unwrap();
    let mut rtt = Vec::with_capacity(n);
    let payload = "x".repeat(100);
    for _ in 0..n {
        let t = Instant::now();
        let id = a.handle.send("bob", &payload).await.unwrap().to_hex();
        a.wait_for("delivered", |e| match &e.kind {
            EventKind::Receipt { id: rid, state, .. } if *rid == id && state == "delivered" => {
                Some(())
            }
            _ => None,
        })
        .await;
        rtt.push(t.elapsed());
    }
    let (m50, m99) = report("send -> delivered receipt", rtt);
    println!(
        "  ratio to bare: p50 {:.1}x (target <= 2x), p99 {:.1}x (target <= 3x)",
        m50.as_secs_f64() / bare50.as_secs_f64(),
        m99.as_secs_f64() / bare99.as_secs_f64()
    );

    // Throughput of 1 KiB messages, everything durable on both sides.
    let kib = Arc::new("k".repeat(1024));
    let handle = a.handle.clone();
    let mut live = handle.subscribe(None).unwrap().live;
    let total = (tn / SENDERS) * SENDERS;
    // Every message is `sent` once bob acknowledged it (durably stored on both sides): count
    // those events as they come, in a task of their own so the subscription keeps up while
    // the senders run (polling the outbox's size would cost alice a walk of it each time).
    let counter = {
        let handle = handle.clone();
        tokio::spawn(async move {
            // (sent, failed) by one event.
            let count = |e: &tern_node::events::Event| match &e.kind {
                EventKind::Receipt { state, .. } if state == "sent" => (1, 0),
                EventKind::MessageFailed { .. } => (0, 1),
                _ => (0, 0),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            let (mut sent, mut failed, mut last) = (0, 0, None);
            while sent + failed < total {
                match tokio::time::timeout_at(deadline, live.recv()).await {
                    Ok(Ok(e)) if last.is_none_or(|l| e.seq > l) => {
                        last = Some(e.seq);
                        let (s, f) = count(&e);
                        (sent, failed) = (sent + s, failed + f);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_lagged)) => {
                        // Fell behind: resume from the event log after the last one seen,
                        // unless the log dropped some of them since (then wait for the
                        // outbox to empty, which costs alice a walk of it each time).
                        let since = last.unwrap_or(0);
                        let resumed = handle.subscribe(Some(since)).unwrap();
                        let whole = resumed.backlog.len() < tern_node::events::EVENT_LOG_CAP;
                        let gap = resumed.backlog.first().is_some_and(|e| e.seq > since + 1);
                        if gap || !whole {
                            println!("  (the event subscription fell behind: polling the outbox)");
                            while handle.status().await.unwrap().outbox != 0 {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            break;
                        }
                        for e in resumed.backlog {
                            last = Some(e.seq);
                            let (s, f) = count(&e);
                            (sent, failed) = (sent + s, failed + f);
                        }
                        live = resumed.live;
                    }
                    Err(_) => {
                        let outbox = handle.status().await.map(|s| s.outbox);
                        panic!("throughput run stalled: {sent} of {total} sent, outbox {outbox:?}")
                    }
                }
            }
            assert_eq!(failed, 0, "{failed} of {total} messages failed");
            Instant::now()
        })
    };
    let start = Instant::now();
    let per = tn / SENDERS;
    let mut tasks = Vec::new();
    for _ in 0..SENDERS {
        let handle = handle.clone();
        let kib = kib.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                handle.send("bob", &kib).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = start.elapsed();
    let done = counter.await.unwrap();
    let elapsed = done - start;
    println!(
        "  throughput, 1 KiB, {SENDERS} sends in flight: {total} messages stored on both sides in {:.2?} = {:.0} msg/s (target >= 5000)",
        elapsed,
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  (all {total} accepted into the durable outbox after {:.2?} = {:.0} msg/s)",
        accepted,
        total as f64 / accepted.as_secs_f64()
    );
    a.stop().await;
    drop(bob.stdin.take());
    assert!(bob.wait().unwrap().success(), "bob's process failed");
}
