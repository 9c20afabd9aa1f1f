//! The store's write path against sled's own, in the same run on the same disk: what one
//! message's transaction costs through `Store` (journal record + plain sled writes) and
//! through a sled transaction, and what a flush costs against a plain file's append +
//! `fdatasync` on the same disk.
//!
//! Run: `cargo bench -p tern-tests --bench store` (env `TERN_BENCH_N`, default 20000, the
//! transactions per variant). Each transaction writes what `send` writes for a 1 KiB
//! message: a 600-byte session record, a 1.1 KiB outbox item, a 1.1 KiB history entry and a
//! 56-byte index entry, in four tables.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench binary: panics report failures

use std::time::{Duration, Instant};

use sled::Transactional;
use tern_node::store::{Store, Table};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(i: usize) -> Vec<u8> {
    let mut k = vec![5u8; 32];
    k.extend_from_slice(&(i as u64).to_be_bytes());
    k.extend_from_slice(&[1; 8]);
    k
}

/// Length of the key of transaction `i`.
fn k_len(i: usize) -> usize {
    key(i).len()
}

fn per_op(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() {
    let n = env("TERN_BENCH_N", 20_000);
    let session = vec![9u8; 600];
    let item = vec![7u8; 1100];
    let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
    println!(
        "Tern store figures ({n} transactions each, data on the disk of the current directory)"
    );

    let open = |name: &str| {
        let db = sled::Config::new()
            .path(dir.path().join(name))
            .mode(sled::Mode::HighThroughput)
            .open()
            .unwrap();
        let trees: Vec<sled::Tree> = ["sessions", "outbox", "history", "index"]
            .iter()
            .map(|t| db.open_tree(t).unwrap())
            .collect();
        (db, trees)
    };
    // Baseline 1: a sled transaction over four trees (what the store did before).
    let (db, trees) = open("sled-tx");
    let (s, o, h, x) = (&trees[0], &trees[1], &trees[2], &trees[3]);
    let start = Instant::now();
    for i in 0..n {
        let k = key(i);
        (s, o, h, x)
            .transaction(|(s, o, h, x)| {
                s.insert(&[5u8; 32], session.clone())?;
                o.insert(k.clone(), item.clone())?;
                h.insert(k.clone(), item.clone())?;
                x.insert(k.clone(), k.clone())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
    }
    let sled_tx = per_op(start.elapsed(), n);
    drop((trees, db));
    // Baseline 2: the same four writes as plain sled inserts (no atomicity), fresh database.
    let (db, trees) = open("sled-plain");
    let (s, o, h, x) = (&trees[0], &trees[1], &trees[2], &trees[3]);
    let start = Instant::now();
    for i in 0..n {
        let k = key(i);
        s.insert([5u8; 32], session.clone()).unwrap();
        o.insert(k.clone(), item.clone()).unwrap();
        h.insert(k.clone(), item.clone()).unwrap();
        x.insert(k.clone(), k.clone()).unwrap();
    }
    let plain = per_op(start.elapsed(), n);
    drop((trees, db));

    // The store: the same transaction through the journal.
    let store = Store::open(&dir.path().join("store")).unwrap();
    let tables: Vec<Table<Vec<u8>>> = ["sessions", "outbox", "history", "index"]
        .iter()
        .map(|t| store.table(t).unwrap())
        .collect();
    let (s, o, h, x) = (&tables[0], &tables[1], &tables[2], &tables[3]);
    let start = Instant::now();
    for i in 0..n {
        let k = key(i);
        store
            .transaction(&[s, o, h, x], |tx| {
                tx.insert(s, &[5u8; 32], &session)?;
                tx.insert(o, &k, &item)?;
                tx.insert(h, &k, &item)?;
                tx.insert(x, &k, &k)?;
                Ok(())
            })
            .unwrap();
    }
    let journal_tx = per_op(start.elapsed(), n);
    // Flushes: one small transaction, then a flush (the journal's fdatasync).
    let flushes = (n / 10).max(100);
    let mut flush = Vec::with_capacity(flushes);
    for i in 0..flushes {
        let k = key(n + i);
        store
            .transaction(&[h], |tx| tx.insert(h, &k, &item))
            .unwrap();
        let t = Instant::now();
        store.flush_blocking().unwrap();
        flush.push(t.elapsed());
    }
    let (f50, f99) = (pct(&mut flush, 0.5), pct(&mut flush, 0.99));
    // Baseline for the flush: the same appends (a record's size each) to a plain file whose
    // blocks were written and synced ahead, as the journal's are, each followed by
    // `fdatasync`, on the same disk.
    let raw = {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(dir.path().join("raw")).unwrap();
        file.write_all_at(&vec![0; 8 << 20], 0).unwrap();
        file.sync_all().unwrap();
        let record = vec![1u8; item.len() + k_len(n) + 64];
        let mut at = 0;
        let mut v: Vec<Duration> = (0..flushes)
            .map(|_| {
                file.write_all_at(&record, at).unwrap();
                at = (at + record.len() as u64) % (8 << 20);
                let t = Instant::now();
                file.sync_data().unwrap();
                t.elapsed()
            })
            .collect();
        (pct(&mut v, 0.5), pct(&mut v, 0.99))
    };

    println!("  sled transaction, 4 trees (baseline)   {sled_tx:>8.1} µs");
    println!("  4 plain sled inserts (not atomic)      {plain:>8.1} µs");
    println!("  store transaction (journal + sled)     {journal_tx:>8.1} µs");
    println!(
        "  ratio store / sled transaction: {:.2}x; store / plain inserts: {:.2}x",
        journal_tx / sled_tx,
        journal_tx / plain
    );
    println!(
        "  store flush after one transaction: p50 {f50:.3?}, p99 {f99:.3?} ({flushes} flushes)"
    );
    println!(
        "  baseline: append + fdatasync of a plain file: p50 {:.3?}, p99 {:.3?}; ratio p50 {:.2}x",
        raw.0,
        raw.1,
        f50.as_secs_f64() / raw.0.as_secs_f64()
    );
}
