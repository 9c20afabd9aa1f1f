//! Presence between real `tern daemon` processes: `tern presence` through the CLI, and a
//! contact killed with `kill -9` shown offline once its heartbeats stop (when the configured
//! timeout has passed since its last one: not at once and not never).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::{TernDir, TestDaemon, eventually};

/// The shortest heartbeat a node may be configured with.
const HEARTBEAT_MS: u64 = 1_000;
const MISSED: u64 = 3;

/// A daemon whose config has a short heartbeat.
async fn daemon(name: &str) -> TestDaemon {
    let dir = TernDir::initialized(name);
    let config = dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("heartbeat_ms = 30000"), "{text}");
    let text = text
        .replace(
            "heartbeat_ms = 30000",
            &format!("heartbeat_ms = {HEARTBEAT_MS}"),
        )
        .replace("missed_beats = 3", &format!("missed_beats = {MISSED}"));
    std::fs::write(&config, text).unwrap();
    TestDaemon::start_in(dir, &["--no-mdns"]).await
}

fn state(d: &TestDaemon, name: &str) -> Value {
    d.tern_json(&["presence", name])
}

#[tokio::test]
async fn kill_9_shows_offline_within_the_timeout() {
    let a = daemon("alice").await;
    let b = daemon("bob").await;
    let bob_ticket = b.tern_json(&["id"])["ticket"].as_str().unwrap().to_string();
    let alice_ticket = a.tern_json(&["id"])["ticket"].as_str().unwrap().to_string();
    a.tern_json(&["contact", "add", &bob_ticket, "--name", "bob"]);
    b.tern_json(&["contact", "add", &alice_ticket, "--name", "alice"]);

    eventually("alice sees bob online", Duration::from_secs(30), || async {
        (state(&a, "bob")["state"] == "online").then_some(())
    })
    .await;
    let all = a.tern_json(&["presence"]);
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["name"], "bob");
    // Human output names the state.
    let out = a.tern(&["presence", "bob"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("bob: online"));
    // Bob sets himself away through the CLI.
    b.tern_json(&["presence", "--set", "away"]);
    eventually("alice sees bob away", Duration::from_secs(10), || async {
        (state(&a, "bob")["state"] == "away").then_some(())
    })
    .await;

    let killed = Instant::now();
    let _dir = b.kill9();
    let timeout = Duration::from_millis(HEARTBEAT_MS * MISSED);
    let seen = eventually(
        "alice sees bob offline",
        Duration::from_secs(30),
        || async {
            let s = state(&a, "bob");
            (s["state"] == "offline").then_some(s)
        },
    )
    .await;
    let seen_at_ms = tern_node::events::now_ms();
    let took = killed.elapsed();
    // Not never: the timeout plus plenty for a slow machine.
    assert!(
        took <= Duration::from_secs(20),
        "offline only after {took:?} (timeout {timeout:?})"
    );
    // Not at once: alice turns bob offline only once `timeout` passed without a frame, and
    // then keeps the time of his last frame as last seen. (Measured from that frame rather
    // than from the kill, which may come a beat or a stalled moment after it.)
    let last_seen = seen["last_seen"].as_u64().expect("a last seen time");
    assert!(
        seen_at_ms.saturating_sub(last_seen) > timeout.as_millis() as u64,
        "offline {} ms after bob's last frame (timeout {timeout:?})",
        seen_at_ms.saturating_sub(last_seen)
    );
    // Bad input: an unknown contact and a state that cannot be chosen.
    let out = a.tern(&["presence", "nobody-here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(tern_tests::stderr(&out).contains("unknown contact"));
    let out = a.tern(&["presence", "--set", "offline"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}
