//! A full disk: `send` fails with a clear error and nothing half-written goes out; inbound
//! envelopes are refused as unavailable (the sender keeps them and retries); once space is
//! back, everything flows again without a restart and the failed message never appears.
//!
//! Needs root to mount a small tmpfs; without it the test says why it did not run, and under
//! CI (`CI` set) that is a failure.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use tern_tests::{SmallDisk, TestNode, eventually};

const LONG: Duration = Duration::from_secs(60);

/// A 24 MiB tmpfs, or `None` (the test says it did not run) where it cannot be mounted;
/// under CI (`CI` set) that is a failure.
fn small_disk() -> Option<SmallDisk> {
    match SmallDisk::mount(24) {
        Ok(d) => Some(d),
        Err(reason) => {
            let msg = format!("full-disk test NOT RUN: {reason}");
            if std::env::var_os("CI").is_some() {
                panic!("{msg} (required under CI)");
            }
            eprintln!("{msg}");
            None
        }
    }
}

/// Inbound envelopes `n` refused because it could not store them (as unavailable).
async fn refused_for_storage(n: &TestNode) -> u64 {
    let rejected = n.handle.status().await.unwrap().rejected;
    ["storage", "unavailable"]
        .iter()
        .map(|reason| rejected.get(*reason).copied().unwrap_or(0))
        .sum()
}

// On the runtime the daemon uses (where an idle node flushes on the actor's thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_sends_cleanly_and_recovers() {
    let Some(disk) = small_disk() else {
        return;
    };
    let a = TestNode::spawn_under("alice", &disk.path, |c| c.min_free_disk_mb = 4).await;
    let b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    b.add_contact(&a, "alice").await;
    a.handle
        .send("bob", "before the disk filled up")
        .await
        .unwrap();
    b.wait_history("alice", LONG, |h| h.len() == 1).await;
    a.wait_history("bob", LONG, |h| h.len() == 1 && h[0].state == "delivered")
        .await;

    let filler = disk.fill();
    // Sends now fail with a clear storage error; sled may absorb a little first.
    let mut failed = None;
    for i in 0..200 {
        match a
            .handle
            .send("bob", &format!("{i} {}", "z".repeat(60_000)))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                failed = Some((i, e.to_string()));
                break;
            }
        }
    }
    let (i, err) = failed.expect("a send fails once the disk is full");
    assert!(err.contains("disk is almost full"), "clear error: {err}");
    // Bob's message to alice is refused as unavailable and stays in bob's outbox.
    let before = refused_for_storage(&a).await;
    b.handle.send("alice", "are you there?").await.unwrap();
    eventually("alice refuses bob's envelope", LONG, || async {
        (refused_for_storage(&a).await > before).then_some(())
    })
    .await;
    let at_a = a.handle.history("bob", 1000).await.unwrap();
    assert!(
        at_a.iter().all(|m| m.text != "are you there?"),
        "stored while the disk was full"
    );
    let at_b = b.handle.history("alice", 1000).await.unwrap();
    let mine = at_b.iter().find(|m| m.text == "are you there?").unwrap();
    assert_eq!(mine.state, "queued", "bob keeps it to send again");
    assert!(b.handle.status().await.unwrap().outbox >= 1);

    // The node keeps answering (reads, status) while it cannot write.
    assert!(a.handle.status().await.is_ok());

    std::fs::remove_file(filler).unwrap();
    // Space is back: no restart needed.
    a.handle
        .send("bob", "after the disk was freed")
        .await
        .unwrap();
    let at_b = b
        .wait_history("alice", LONG, |h| {
            h.iter().any(|m| m.text == "after the disk was freed")
        })
        .await;
    // The failed message was withdrawn: it never reaches bob.
    let prefix = format!("{i} ");
    assert!(
        at_b.iter().all(|m| !m.text.starts_with(&prefix)),
        "failed send {i} went out"
    );
    a.wait_history("bob", LONG, |h| {
        h.iter().any(|m| m.text == "are you there?")
    })
    .await;
    let at_a = a.handle.history("bob", 1000).await.unwrap();
    assert!(
        at_a.iter().all(|m| !m.text.starts_with(&prefix)),
        "failed send {i} kept in history"
    );
    a.stop().await;
    b.stop().await;
    drop(disk);
}

/// A sender whose disk fills while its queue is delivered cannot record the answers (the
/// history update is refused). The attempt then counts as failed: the next waits its
/// backoff instead of sending the same envelopes again at once, which would loop for as
/// long as the disk stays full. Once space is back, the answers are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_cannot_be_recorded_do_not_start_a_resend_loop() {
    let Some(disk) = small_disk() else {
        return;
    };
    let a = TestNode::spawn_under("alice", &disk.path, |c| c.min_free_disk_mb = 4).await;
    let mut b = TestNode::spawn("bob").await;
    a.add_contact(&b, "bob").await;
    a.handle.send("bob", "hello").await.unwrap();
    a.wait_history("bob", LONG, |h| h.len() == 1 && h[0].state == "delivered")
        .await;
    b.stop_keep().await;
    for i in 0..5 {
        a.handle.send("bob", &format!("queued {i}")).await.unwrap();
    }
    let filler = disk.fill();
    b.start_again().await;
    // Bob stores them (his disk has room) and answers; alice cannot record that.
    b.wait_history("alice", LONG, |h| h.len() == 6).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = b.handle.status().await.unwrap().duplicates;
    // One retry a backoff later sends the 5 again, perhaps twice in 3 s; a loop sends them
    // hundreds of times.
    assert!(again <= 25, "{again} envelopes sent again within 3 s");
    std::fs::remove_file(filler).unwrap();
    a.wait_history("bob", LONG, |h| {
        h.len() == 6 && h.iter().all(|m| m.state == "delivered")
    })
    .await;
    a.stop().await;
    b.stop().await;
    drop(disk);
}
