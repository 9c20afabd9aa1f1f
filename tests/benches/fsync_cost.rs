//! What an `fdatasync` costs the machine besides its own latency: a thread spinning on one
//! CPU counts the time it loses while another thread writes and syncs, on the same CPU and
//! on the other one, against a control in the same run that sleeps instead of syncing (two
//! context switches per operation, as the sync's wait has too).
//!
//! Run: `cargo bench -p tern-tests --bench fsync_cost` (env `TERN_BENCH_N`, default 3000,
//! sets the operations per case). Needs two CPUs. It explains figures of the messaging
//! bench: on a VM where a sync takes CPU time from both CPUs, a flush cannot overlap other
//! work for free.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a bench binary: panics report failures

use std::{
    os::unix::fs::FileExt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};

/// A gap in the spinner's clock readings longer than this was time it did not run.
const GAP: Duration = Duration::from_micros(10);

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &set).unwrap();
}

/// `n` operations on a thread pinned to `cpu` while a spinner runs on CPU 1: the median
/// operation and the spinner's lost time per operation.
fn case(n: usize, cpu: usize, sync: bool) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("sync")).unwrap();
    file.write_all_at(&vec![0; 1 << 20], 0).unwrap();
    file.sync_all().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin(1);
            let (mut lost, mut last) = (Duration::ZERO, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let gap = now - last;
                if gap > GAP {
                    lost += gap;
                }
                last = now;
            }
            lost
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let ops = std::thread::spawn(move || {
        pin(cpu);
        let mut times: Vec<Duration> = (0..n)
            .map(|i| {
                file.write_all_at(&[1; 200], (i as u64 * 200) % (1 << 20))
                    .unwrap();
                let t = Instant::now();
                if sync {
                    file.sync_data().unwrap();
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
                t.elapsed()
            })
            .collect();
        times.sort();
        times[n / 2]
    })
    .join()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let lost = spinner.join().unwrap();
    (ops, lost / n as u32)
}

fn main() {
    let n = std::env::var("TERN_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    if std::thread::available_parallelism().map_or(1, |p| p.get()) < 2 {
        println!("fsync_cost needs two CPUs; skipped");
        return;
    }
    println!("What one fdatasync costs a thread spinning on CPU 1 ({n} operations per case)");
    let (c_op, c_lost) = case(n, 1, false);
    println!(
        "  control: sleep 100 µs on CPU 1         op p50 {c_op:>9.1?}  spinner lost {c_lost:>8.1?} per op"
    );
    let (s_op, s_lost) = case(n, 1, true);
    println!(
        "  write + fdatasync on CPU 1 (same)      op p50 {s_op:>9.1?}  spinner lost {s_lost:>8.1?} per op"
    );
    let (o_op, o_lost) = case(n, 0, true);
    println!(
        "  write + fdatasync on CPU 0 (the other) op p50 {o_op:>9.1?}  spinner lost {o_lost:>8.1?} per op"
    );
    println!(
        "  beyond the control's context switches: {:.1?} of the same CPU; {:.1?} of the other CPU",
        s_lost.saturating_sub(c_lost),
        o_lost
    );
}
