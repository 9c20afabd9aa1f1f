//! Two real daemons find each other by mDNS, inside a network namespace the test creates
//! (mDNS never uses loopback, and tests never touch a real network).
//!
//! Where a namespace cannot be made (not root, no iproute2), the test says why it did not
//! run. Under CI (`CI` set) that is a failure, so it never passes silently there.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use serde_json::Value;
use tern_tests::{NetNs, TernDir, TestDaemon, eventually};

#[tokio::test]
async fn two_daemons_find_each_other_by_mdns() {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(reason) => {
            let msg = format!("mDNS test NOT RUN: {reason}");
            if std::env::var_os("CI").is_some() {
                panic!("{msg} (required under CI)");
            }
            eprintln!("{msg}");
            println!("{msg}");
            return;
        }
    };
    // Inside the namespace 0.0.0.0 means lo and the veth pair only.
    let listen = "/ip4/0.0.0.0/tcp/0".to_string();
    let a = TestDaemon::spawn_raw(
        TernDir::new("alice").in_netns(&ns).init(),
        &["daemon", "--listen", &listen],
    )
    .await;
    let b = TestDaemon::spawn_raw(
        TernDir::new("bob").in_netns(&ns).init(),
        &["daemon", "--listen", &listen],
    )
    .await;
    let a_id = a.peer_id();
    let b_id = b.peer_id();
    for (who, d, other) in [("alice", &a, &b_id), ("bob", &b, &a_id)] {
        eventually(
            &format!("{who} lists the other via mDNS"),
            Duration::from_secs(30),
            || async {
                let s = d.tern_json(&["status"]);
                let peers: Vec<&str> = s["connected_peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                peers.contains(&other.as_str()).then_some(())
            },
        )
        .await;
    }
    drop(a);
    drop(b);
    drop(ns);
}
