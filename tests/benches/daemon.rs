//! Daemon figures: start to API ready, idle RSS, release binary size.
//!
//! Run: `cargo build --release -p tern-cli && cargo bench -p tern-tests --bench daemon`
//! (uses `target/release/tern`, or `$TERN_BIN`). The baseline, measured in the same run, is
//! the same binary doing the least a process can do (`tern --version`), so the ratio shows
//! what the node itself adds on top of process start-up.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench binary: panics report failures

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tern_tests::KillOnDrop;

const RUNS: usize = 15;

fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("TERN_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let b = target.join("release").join("tern");
    assert!(
        b.exists(),
        "{} missing: run `cargo build --release -p tern-cli` first",
        b.display()
    );
    b
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn main() {
    let bin = bin();
    // Baseline: process start and exit of the same binary.
    let mut base = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let ok = Command::new(&bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        base.push(t.elapsed());
    }

    let mut ready = Vec::new();
    let mut rss = Vec::new();
    let mut hwm = Vec::new();
    for i in 0..RUNS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let ok = Command::new(&bin)
            .arg("--data-dir")
            .arg(&dir)
            .arg("init")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        let api = dir.join("api.json");
        let t = Instant::now();
        // Killed on drop: a failed assertion below leaves no daemon running.
        let mut child = KillOnDrop(
            Command::new(&bin)
                .arg("--data-dir")
                .arg(&dir)
                .args([
                    "daemon",
                    "--no-mdns",
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--listen",
                    "/ip4/127.0.0.1/udp/0/quic-v1",
                ])
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(b) = std::fs::read(&api)
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
                && v["pid"] == pid
            {
                break;
            }
            assert!(Instant::now() < deadline, "daemon not ready");
            std::thread::sleep(Duration::from_micros(500));
        }
        ready.push(t.elapsed());
        if i < 5 {
            // Idle: let start-up settle, then read resident memory.
            std::thread::sleep(Duration::from_secs(3));
            rss.push(rss_kib(pid, "VmRSS:"));
            hwm.push(rss_kib(pid, "VmHWM:"));
        }
        nix_term(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "daemon did not stop");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let size = std::fs::metadata(&bin).unwrap().len();
    let (b, r) = (median(base.clone()), median(ready.clone()));
    rss.sort();
    hwm.sort();
    println!(
        "tern daemon figures ({RUNS} runs, binary {})",
        bin.display()
    );
    println!(
        "  baseline `tern --version`:  median {:>8.2?}  p90 {:>8.2?}",
        b,
        p90(base)
    );
    println!(
        "  start -> API ready:         median {:>8.2?}  p90 {:>8.2?}  (target <= 300 ms)",
        r,
        p90(ready)
    );
    println!(
        "  ratio ready / baseline:     {:.1}x",
        r.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  idle RSS (3 s after start): median {:.1} MiB, max {:.1} MiB  (target <= 40 MB)",
        rss[rss.len() / 2] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0
    );
    println!(
        "  peak RSS (VmHWM):           median {:.1} MiB",
        hwm[hwm.len() / 2] as f64 / 1024.0
    );
    println!(
        "  release binary size:        {:.1} MiB",
        size as f64 / (1024.0 * 1024.0)
    );
}

fn nix_term(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
