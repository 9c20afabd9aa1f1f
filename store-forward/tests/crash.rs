//! Crash test of the mailbox store: a child process deposits envelopes in small
//! group-committed batches and reports each id on stdout only after its flush; the parent
//! kills it with SIGKILL at a random moment, reopens the store and checks that it opens,
//! that every reported id is present with its exact bytes, and that nothing the parent
//! deleted (ack + flush) came back. Repeated for `TERN_SF_CRASH_CYCLES` cycles (default
//! 200); the seed is printed and `TERN_SF_CRASH_SEED` replays a run.
//!
//! The child is this test binary itself, re-executed with `TERN_SF_CRASH_CHILD_DIR` set,
//! running the ignored test `writer_child`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tern_store_forward::{
    MailboxServer, MailboxToken, PeerBytes, RelayLimits, Request, Response, ServerOptions,
    StoredItem,
};

const CHILD_DIR_ENV: &str = "TERN_SF_CRASH_CHILD_DIR";
const CHILD_CYCLE_ENV: &str = "TERN_SF_CRASH_CHILD_CYCLE";
const CYCLES_ENV: &str = "TERN_SF_CRASH_CYCLES";
const SEED_ENV: &str = "TERN_SF_CRASH_SEED";
/// A child that is never killed stops by itself after this long.
const CHILD_MAX_RUN: Duration = Duration::from_secs(20);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bob() -> PeerBytes {
    PeerBytes::new(vec![1; 38]).unwrap()
}

fn alice() -> PeerBytes {
    PeerBytes::new(vec![2; 38]).unwrap()
}

fn token() -> MailboxToken {
    MailboxToken::from_bytes([7; 32])
}

fn limits() -> RelayLimits {
    RelayLimits {
        quota_count: 1_000_000,
        quota_bytes: 1 << 34,
        sender_rate_per_sec: 1_000_000,
        sender_burst: 1_000_000,
        ..RelayLimits::default()
    }
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
        now(),
    )
    .unwrap_or_else(|e| panic!("the store must open after a crash: {e}"))
}

fn message_id(cycle: u32, n: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&cycle.to_be_bytes());
    id[4..8].copy_from_slice(&n.to_be_bytes());
    id
}

/// The envelope deposited under `id`: 1 to 1024 bytes derived from the id.
fn envelope_for(id: &[u8; 16]) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(id);
    let mut reader = h.finalize_xof();
    let mut len = [0u8; 2];
    reader.fill(&mut len);
    let mut out = vec![0u8; 1 + usize::from(u16::from_be_bytes(len)) % 1024];
    reader.fill(&mut out);
    out
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

fn fetch_all(s: &mut MailboxServer) -> Vec<StoredItem> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let req = Request::Fetch {
            after,
            max_items: 1000,
            max_bytes: u32::MAX,
        };
        let reply = s.handle(now(), &bob(), &req.to_bytes());
        let Response::Batch { items, more } = Response::from_bytes(&reply.bytes).unwrap() else {
            panic!("fetch failed")
        };
        after = items.last().map(|i| i.seq).or(after);
        out.extend(items);
        if !more {
            return out;
        }
    }
}

/// The writer: runs only as the child of `crash_cycles`.
#[test]
#[ignore = "child process of crash_cycles"]
fn writer_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let cycle: u32 = std::env::var(CHILD_CYCLE_ENV).unwrap().parse().unwrap();
    let mut rng = StdRng::seed_from_u64(u64::from(cycle));
    let mut s = open(Path::new(&dir));
    let register = Request::Register {
        add: vec![token().hash()],
        revoke: vec![],
    };
    let reply = s.handle(now(), &bob(), &register.to_bytes());
    assert!(matches!(
        Response::from_bytes(&reply.bytes).unwrap(),
        Response::Registered { .. }
    ));
    s.flush().unwrap();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "READY").unwrap();
    stdout.flush().unwrap();
    let started = Instant::now();
    let mut n = 0u32;
    let mut batch_no = 0u32;
    while started.elapsed() < CHILD_MAX_RUN {
        let size = rng.gen_range(1..=64);
        let mut pending = Vec::with_capacity(size);
        for _ in 0..size {
            let id = message_id(cycle, n);
            n += 1;
            let req = Request::Deposit {
                recipient: bob(),
                token: token(),
                id,
                ttl_secs: None,
                envelope: envelope_for(&id),
            };
            let reply = s.handle(now(), &alice(), &req.to_bytes());
            pending.push((id, reply));
        }
        batch_no += 1;
        if batch_no.is_multiple_of(8) {
            // Mix in mailbox record writes (idempotent re-registration).
            s.handle(now(), &bob(), &register.to_bytes());
        }
        s.flush().unwrap();
        let mut lines = String::new();
        for (id, reply) in pending {
            if let Response::Deposited { .. } = Response::from_bytes(&reply.bytes).unwrap() {
                lines.push_str(&format!("ACK {}\n", hex(&id)));
            }
        }
        stdout.write_all(lines.as_bytes()).unwrap();
        stdout.flush().unwrap();
    }
}

#[test]
fn crash_cycles() {
    let cycles: u32 = std::env::var(CYCLES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var(SEED_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("crash test: seed {seed} ({SEED_ENV}={seed} replays it), {cycles} cycles");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mailbox");
    let exe = std::env::current_exe().unwrap();
    // Acked by the child and not deleted by us: must be present at every reopen.
    let mut must_have: HashSet<[u8; 16]> = HashSet::new();
    // Deleted by us (ack + flush): must never come back.
    let mut deleted: HashSet<[u8; 16]> = HashSet::new();
    let (mut total_acked, mut killed_before_ready) = (0usize, 0u32);
    {
        // Bob's mailbox exists before the first child (which may die before registering).
        let mut s = open(&dir);
        let reg = Request::Register {
            add: vec![token().hash()],
            revoke: vec![],
        };
        s.handle(now(), &bob(), &reg.to_bytes());
        s.flush().unwrap();
    }
    let started = Instant::now();
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_DIR_ENV, &dir)
            .env(CHILD_CYCLE_ENV, cycle.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        if !out.contains("READY\n") {
            killed_before_ready += 1;
        }
        // Only complete lines count: the kill may cut the last one.
        let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
        let acked: Vec<[u8; 16]> = complete
            .lines()
            .filter_map(|l| l.strip_prefix("ACK "))
            .map(|h| parse_hex(h).unwrap_or_else(|| panic!("cycle {cycle}: bad line {h:?}")))
            .collect();
        total_acked += acked.len();
        must_have.extend(acked);

        let mut s = open(&dir);
        s.rules()
            .check_invariants()
            .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): {e}"));
        let items = fetch_all(&mut s);
        let present: HashMap<[u8; 16], &StoredItem> = items.iter().map(|i| (i.id, i)).collect();
        assert_eq!(
            present.len(),
            items.len(),
            "cycle {cycle}: an id is stored twice"
        );
        for id in &must_have {
            let item = present.get(id).unwrap_or_else(|| {
                panic!("cycle {cycle} (seed {seed}): acked id {} lost", hex(id))
            });
            assert_eq!(
                item.envelope,
                envelope_for(id),
                "cycle {cycle}: {}",
                hex(id)
            );
        }
        for item in &items {
            assert_eq!(
                item.envelope,
                envelope_for(&item.id),
                "cycle {cycle} (seed {seed}): unacked item {} damaged",
                hex(&item.id)
            );
            assert!(
                !deleted.contains(&item.id),
                "cycle {cycle} (seed {seed}): deleted id {} came back",
                hex(&item.id)
            );
        }
        // Delete most of what is there (keeps the store small, and tests ack durability).
        let ids: Vec<[u8; 16]> = items
            .iter()
            .map(|i| i.id)
            .filter(|_| rng.gen_bool(0.8))
            .collect();
        for chunk in ids.chunks(4096) {
            let reply = s.handle(
                now(),
                &bob(),
                &Request::Ack {
                    ids: chunk.to_vec(),
                }
                .to_bytes(),
            );
            assert_eq!(
                Response::from_bytes(&reply.bytes).unwrap(),
                Response::Acked {
                    removed: chunk.len() as u32
                }
            );
        }
        s.flush().unwrap();
        for id in ids {
            must_have.remove(&id);
            deleted.insert(id);
        }
    }
    println!(
        "crash test: {cycles} cycles in {:.1?}, {total_acked} acked deposits checked, {killed_before_ready} kills before the store was ready",
        started.elapsed()
    );
    assert!(
        total_acked > 0,
        "the child never got to acknowledge anything"
    );
}
