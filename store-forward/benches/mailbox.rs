//! Mailbox benchmark (`harness = false`): durable deposits per second through
//! `MailboxServer::handle` with group commit, against a raw sled insert + flush (+ the same
//! file sync) loop with the same batching measured in the same run, and the drain rate (fetch + ack).
//!
//! `cargo bench -p tern-store-forward --bench mailbox`; `TERN_SF_BENCH_BATCHES` sets the
//! number of 64-deposit batches per run (default 300), `TERN_SF_BENCH_ENVELOPE` the
//! envelope size in bytes (default 512). Each measurement runs 3 times, interleaved with
//! its baseline; the median is reported. Targets: deposits >= 0.5x raw sled, drain >= 50k
//! envelopes/s.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use tern_store_forward::{
    MailboxServer, MailboxToken, PeerBytes, RelayLimits, Request, Response, ServerOptions,
};

const BATCH: usize = 64;
const RUNS: usize = 3;
const NOW: u64 = 1_700_000_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bob() -> PeerBytes {
    PeerBytes::new(vec![1; 38]).expect("valid peer")
}

fn alice() -> PeerBytes {
    PeerBytes::new(vec![2; 38]).expect("valid peer")
}

fn limits() -> RelayLimits {
    RelayLimits {
        quota_count: 10_000_000,
        quota_bytes: 1 << 40,
        sender_rate_per_sec: 10_000_000,
        sender_burst: 10_000_000,
        fetch_max_items: 1000,
        ..RelayLimits::default()
    }
}

fn id(n: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(n as u64).to_be_bytes());
    id
}

/// The baseline: what a minimal durable mailbox would do per deposit (one sled insert of
/// key + record of the same size), flushed once per batch and made durable as the mailbox
/// makes it (`SledFiles::sync`: sled's own flush leaves the disk's cache unflushed).
fn raw_sled(dir: &Path, n: usize, envelope: &[u8]) -> Duration {
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("sled opens");
    let tree = db.open_tree("raw").expect("tree");
    let files = tern_store_forward::db::SledFiles::open(dir).expect("sled's files");
    // Record: id, sender, timestamps and the envelope, like the mailbox's item record.
    let mut value = vec![0u8; 16 + 39 + 10];
    value.extend_from_slice(envelope);
    let started = Instant::now();
    for batch in 0..n / BATCH {
        for i in 0..BATCH {
            let seq = (batch * BATCH + i) as u64;
            let mut key = [7u8; 40];
            key[32..].copy_from_slice(&seq.to_be_bytes());
            value[..16].copy_from_slice(&id(seq as usize));
            tree.insert(&key[..], value.as_slice()).expect("insert");
        }
        db.flush().expect("flush");
        files.sync().expect("sync");
    }
    started.elapsed()
}

fn open(dir: &Path) -> MailboxServer {
    MailboxServer::open(
        dir,
        limits(),
        ServerOptions {
            accept_registrations: true,
            min_free_bytes: 0,
            ..ServerOptions::default()
        },
        NOW,
    )
    .expect("server opens")
}

/// Durable deposits through the server: `handle` per request, one flush per batch, as the
/// node's group commit does. Returns the elapsed time and the server (for the drain).
fn deposits(dir: &Path, frames: &[Vec<u8>]) -> (Duration, MailboxServer) {
    let mut s = open(dir);
    let reg = Request::Register {
        add: vec![MailboxToken::from_bytes([9; 32]).hash()],
        revoke: vec![],
    };
    s.handle(NOW, &bob(), &reg.to_bytes());
    s.flush().expect("flush");
    let sender = alice();
    let started = Instant::now();
    for batch in frames.chunks(BATCH) {
        let mut replies = Vec::with_capacity(BATCH);
        for f in batch {
            replies.push(s.handle(NOW, &sender, f));
        }
        s.flush().expect("flush");
        assert!(
            replies.iter().all(|r| r.error.is_none()),
            "a deposit failed"
        );
    }
    (started.elapsed(), s)
}

/// Fetch pages of up to 1000 and ack each page (one flush per page) until the mailbox is
/// empty.
fn drain(s: &mut MailboxServer, expected: usize) -> Duration {
    let owner = bob();
    let started = Instant::now();
    let mut drained = 0;
    // A second of the relay's clock per page: a peer gets 20 fetches a second.
    let mut now = NOW;
    loop {
        now += 1;
        let fetch = Request::Fetch {
            after: None,
            max_items: 1000,
            max_bytes: u32::MAX,
        };
        let reply = s.handle(now, &owner, &fetch.to_bytes());
        let Ok(Response::Batch { items, .. }) = Response::from_bytes(&reply.bytes) else {
            panic!("fetch failed")
        };
        if items.is_empty() {
            break;
        }
        drained += items.len();
        let ack = Request::Ack {
            ids: items.iter().map(|i| i.id).collect(),
        };
        let reply = s.handle(now, &owner, &ack.to_bytes());
        assert!(reply.error.is_none(), "ack failed");
        // One group commit per page, as the node's relay task does per batch.
        s.flush().expect("flush");
    }
    assert_eq!(drained, expected);
    started.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let batches = env_or("TERN_SF_BENCH_BATCHES", 300);
    let size = env_or("TERN_SF_BENCH_ENVELOPE", 512);
    let n = batches * BATCH;
    let envelope = vec![0xa5u8; size];
    let token = MailboxToken::from_bytes([9; 32]);
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            Request::Deposit {
                recipient: bob(),
                token: token.clone(),
                id: id(i),
                ttl_secs: None,
                envelope: envelope.clone(),
            }
            .to_bytes()
        })
        .collect();
    println!(
        "mailbox bench: {n} deposits of {size} bytes in batches of {BATCH} (one flush per batch), {RUNS} runs, medians"
    );
    let (mut raw, mut server, mut drains) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t_raw = raw_sled(&tmp.path().join("raw"), n, &envelope);
        let (t_dep, mut s) = deposits(&tmp.path().join("mailbox"), &frames);
        let t_drain = drain(&mut s, n);
        let rate = |t: Duration| n as f64 / t.as_secs_f64();
        println!(
            "  run {run}: raw sled {:>9.0}/s  mailbox deposits {:>9.0}/s  drain {:>9.0}/s",
            rate(t_raw),
            rate(t_dep),
            rate(t_drain)
        );
        raw.push(rate(t_raw));
        server.push(rate(t_dep));
        drains.push(rate(t_drain));
    }
    let (raw, server, drain) = (median(raw), median(server), median(drains));
    let ratio = server / raw;
    println!("raw sled insert+flush (baseline): {raw:.0} inserts/s");
    println!("durable deposits via handle+flush: {server:.0} deposits/s");
    println!(
        "deposit / raw ratio: {ratio:.2}x (target >= 0.5x: {})",
        if ratio >= 0.5 { "met" } else { "NOT met" }
    );
    println!(
        "drain (fetch 1000 + ack + flush per page): {drain:.0} envelopes/s (target >= 50000/s: {})",
        if drain >= 50_000.0 { "met" } else { "NOT met" }
    );
}
