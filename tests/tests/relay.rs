//! Store-and-forward through relays, in process on loopback: a recipient that is offline gets
//! every message once and in order when it returns; a relay restarted between deposit and
//! fetch loses nothing; one of two relays down still delivers; the relay's data directory
//! never holds a plaintext; the admin endpoint serves metrics and health.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{path::Path, time::Duration};

use tern_node::{DataDir, Multiaddr, relay};
use tern_store_forward::RelayConfig;
use tern_tests::{TestNode, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(90);

struct TestRelay {
    handle: relay::RelayHandle,
    dir: tempfile::TempDir,
}

async fn start_relay_in(dir: tempfile::TempDir) -> TestRelay {
    let config = RelayConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        admin_bind: "127.0.0.1:0".parse().unwrap(),
        ..RelayConfig::default()
    };
    let handle = relay::start(DataDir::new(dir.path().join("relay")), config)
        .await
        .unwrap();
    TestRelay { handle, dir }
}

async fn start_relay() -> TestRelay {
    start_relay_in(tempfile::tempdir().unwrap()).await
}

impl TestRelay {
    async fn addr(&self) -> Multiaddr {
        self.handle
            .addresses()
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .unwrap()
    }

    /// `GET path` on the admin endpoint: (status line, body).
    async fn admin_get(&self, path: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(self.handle.admin_addr())
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
    }

    /// Restarts the relay on the same data directory and port (a graceful stop).
    async fn restart(self) -> TestRelay {
        let addr = self.addr().await;
        // /ip4/127.0.0.1/tcp/<port>/p2p/<id>
        let port: u16 = addr.to_string().split('/').nth(4).unwrap().parse().unwrap();
        let TestRelay { handle, dir } = self;
        handle.shutdown().await;
        let config = RelayConfig {
            listen: vec![format!("/ip4/127.0.0.1/tcp/{port}")],
            admin_bind: "127.0.0.1:0".parse().unwrap(),
            ..RelayConfig::default()
        };
        let handle = relay::start(DataDir::new(dir.path().join("relay")), config)
            .await
            .unwrap();
        TestRelay { handle, dir }
    }
}

/// Alice (no relays) and bob (home relays `relays`), alice holding bob's ticket; bob is
/// registered at every relay.
async fn pair(relays: &[&TestRelay]) -> (TestNode, TestNode) {
    let mut addrs = Vec::new();
    for r in relays {
        addrs.push(r.addr().await);
    }
    let a = TestNode::spawn("alice").await;
    let b = TestNode::spawn_with("bob", |c| c.relays = addrs).await;
    a.add_contact(&b, "bob").await;
    for r in relays {
        eventually("bob registered", LONG, || async {
            (r.metric("tern_relay_mailboxes").await >= 1.0).then_some(())
        })
        .await;
    }
    (a, b)
}

fn dir_contains(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                return true;
            }
        }
    }
    false
}

#[tokio::test]
async fn offline_recipient_gets_200_messages_once_and_in_order_through_the_relay() {
    let r = start_relay().await;
    let (a, mut b) = pair(&[&r]).await;
    b.stop_keep().await;
    let texts: Vec<String> = (0..200)
        .map(|i| format!("secret-plaintext-{i:03}"))
        .collect();
    for t in &texts {
        a.handle.send("bob", t).await.unwrap();
    }
    // Every message is durably on the relay: state "stored", nothing left in the outbox.
    a.wait_history("bob", LONG, |h| {
        h.len() == 200 && h.iter().all(|m| m.state == "stored")
    })
    .await;
    assert_eq!(a.handle.status().await.unwrap().outbox, 0);
    assert!(r.metric("tern_relay_envelopes_stored").await >= 200.0);
    // The relay holds ciphertext only.
    r.handle.net().listen_addrs().await.unwrap();
    assert!(
        !dir_contains(r.dir.path(), b"secret-plaintext"),
        "plaintext found in the relay's data directory"
    );

    b.start_again().await;
    let h = b.wait_history("alice", LONG, |h| h.len() >= 200).await;
    let got: Vec<&str> = h.iter().map(|m| m.text.as_str()).collect();
    let want: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert_eq!(got, want, "all 200, once, in order");
    // Bob's receipts reach alice directly; the relay deletes what bob acked.
    a.wait_history("bob", LONG, |h| {
        h.len() == 200 && h.iter().all(|m| m.state == "delivered")
    })
    .await;
    eventually("relay emptied", LONG, || async {
        (r.metric("tern_relay_envelopes_stored").await == 0.0).then_some(())
    })
    .await;
    let (status, body) = r.admin_get("/healthz").await;
    assert!(status.contains("200"), "{status} {body}");
    let (status, _) = r.admin_get("/nothing").await;
    assert!(status.contains("404"), "{status}");
    a.stop().await;
    b.stop().await;
    r.handle.shutdown().await;
}

#[tokio::test]
async fn a_relay_restarted_between_deposit_and_fetch_loses_nothing() {
    let r = start_relay().await;
    let (a, mut b) = pair(&[&r]).await;
    b.stop_keep().await;
    for i in 0..20 {
        a.handle.send("bob", &format!("m{i}")).await.unwrap();
    }
    a.wait_history("bob", LONG, |h| {
        h.len() == 20 && h.iter().all(|m| m.state == "stored")
    })
    .await;
    let r = r.restart().await;
    b.start_again().await;
    let h = b.wait_history("alice", LONG, |h| h.len() >= 20).await;
    assert_eq!(h.len(), 20);
    assert_eq!(h[0].text, "m0");
    assert_eq!(h[19].text, "m19");
    a.stop().await;
    b.stop().await;
    r.handle.shutdown().await;
}

#[tokio::test]
async fn one_of_two_relays_down_still_delivers() {
    let r1 = start_relay().await;
    let r2 = start_relay().await;
    let (a, mut b) = pair(&[&r1, &r2]).await;
    b.stop_keep().await;
    r2.handle.shutdown().await;
    for i in 0..10 {
        a.handle.send("bob", &format!("m{i}")).await.unwrap();
    }
    a.wait_history("bob", LONG, |h| {
        h.len() == 10 && h.iter().all(|m| m.state == "stored")
    })
    .await;
    b.start_again().await;
    let h = b.wait_history("alice", LONG, |h| h.len() >= 10).await;
    assert_eq!(h.len(), 10, "each message once");
    a.stop().await;
    b.stop().await;
    r1.handle.shutdown().await;
}
