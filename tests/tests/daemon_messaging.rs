//! Messaging between real `tern daemon` processes, through the CLI and the API: contacts by
//! ticket, send with --wait, history, receipts and typing over the subscription, `tern chat`
//! through a pipe, and crash safety with `kill -9`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use tern_node::events::EventKind;
use tern_tests::{KillOnDrop, TestDaemon, eventually, stderr};

const LONG: Duration = Duration::from_secs(60);

/// Starts alice and bob and makes bob alice's contact (by bob's ticket).
async fn pair() -> (TestDaemon, TestDaemon) {
    let a = TestDaemon::start("alice").await;
    let b = TestDaemon::start("bob").await;
    let ticket = b.tern_json(&["id"])["ticket"].as_str().unwrap().to_string();
    let c = a.tern_json(&["contact", "add", &ticket, "--name", "bob"]);
    assert_eq!(c["name"], "bob");
    assert_eq!(c["safety_number"].as_str().unwrap().len(), 71);
    (a, b)
}

/// The conversation with `with`; empty while `with` is not a contact yet (before the first
/// message arrived).
fn history(d: &TestDaemon, with: &str) -> Vec<Value> {
    let out = d.tern(&["--json", "history", with, "--limit", "5000"]);
    if !out.status.success() {
        assert!(
            stderr(&out).contains("unknown contact"),
            "history failed: {}",
            stderr(&out)
        );
        return Vec::new();
    }
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn daemons_exchange_messages_through_the_cli() {
    let (a, b) = pair().await;
    let sent = a.tern_json(&[
        "send",
        "bob",
        "hello bob",
        "--wait",
        "delivered",
        "--timeout",
        "30",
    ]);
    let id = sent["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);

    let at_b = history(&b, "alice");
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0]["text"], "hello bob");
    assert_eq!(at_b[0]["from"], "alice");
    assert_eq!(at_b[0]["id"], id.as_str());
    let contacts = b.tern_json(&["contact", "list"]);
    assert_eq!(contacts[0]["name"], "alice");
    assert_eq!(contacts[0]["auto_added"], true);

    // Text from stdin.
    let mut child = a
        .dir
        .command(&["--json", "send", "bob", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Bob reads: alice's history moves to read.
    let r = b.tern_json(&["read", "alice"]);
    assert!(r["count"].as_u64().unwrap() >= 1);
    eventually("alice sees read", LONG, || async {
        let h = history(&a, "bob");
        (h.first().map(|m| m["state"] == "read") == Some(true)).then_some(())
    })
    .await;
    let h = eventually("bob has both", LONG, || async {
        let h = history(&b, "alice");
        (h.len() == 2).then_some(h)
    })
    .await;
    assert_eq!(h[1]["text"], "line one\nline two");

    // Errors: unknown contact, oversize, bad ticket — exit 1 with one line, nothing queued.
    let out = a.tern(&["send", "nobody", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown contact"), "{}", stderr(&out));
    let big = "x".repeat(64 * 1024 + 1);
    let out = a.tern(&["send", "bob", &big]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("too large"), "{}", stderr(&out));
    let out = a.tern(&["contact", "add", "tern1nonsense", "--name", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid ticket"), "{}", stderr(&out));
    eventually("outbox drains", LONG, || async {
        (a.tern_json(&["status"])["outbox"] == 0).then_some(())
    })
    .await;

    // A blocked contact is listed with its presence `blocked`, not "unknown contact".
    a.tern_json(&["contact", "block", "bob"]);
    assert_eq!(a.tern_json(&["presence", "bob"])["state"], "blocked");
    let all = a.tern_json(&["presence"]);
    assert_eq!(all[0]["name"], "bob");
    assert_eq!(all[0]["state"], "blocked");

    // Removed, bob stays blocked: listed by peer id, and unblocked by it.
    let bob = b.peer_id();
    let blocked = a.tern_json(&["contact", "blocked"]);
    assert_eq!(
        blocked,
        serde_json::json!([{ "peer_id": bob, "name": "bob", "contact": true }])
    );
    a.tern_json(&["contact", "remove", "bob"]);
    let blocked = a.tern_json(&["contact", "blocked"]);
    assert_eq!(blocked[0]["peer_id"], bob);
    assert_eq!(blocked[0]["contact"], false);
    let out = a.tern(&["contact", "unblock", "bob"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("tern contact unblock {bob}")),
        "{}",
        stderr(&out)
    );
    a.tern_json(&["contact", "unblock", &bob]);
    assert_eq!(a.tern_json(&["contact", "blocked"]), serde_json::json!([]));
    let out = a.tern(&["contact", "unblock", &bob]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is blocked"), "{}", stderr(&out));
}

/// The next event of an API subscription, within [`LONG`].
async fn next_event(
    sub: &mut jsonrpsee::core::client::Subscription<tern_node::events::Event>,
) -> tern_node::events::Event {
    tokio::time::timeout(LONG, sub.next())
        .await
        .expect("an event in time")
        .expect("the subscription is open")
        .expect("the event decodes")
}

#[tokio::test]
async fn receipts_and_typing_arrive_over_the_api_subscription() {
    let (a, b) = pair().await;
    let ca = a.client().await;
    let cb = b.client().await;
    let mut sub_a = ca.subscribe(None).await.unwrap();
    let mut sub_b = cb.subscribe(None).await.unwrap();
    let id = ca.send("bob", "watch the receipts").await.unwrap();

    let mut states = Vec::new();
    while states.len() < 2 {
        let e = next_event(&mut sub_a).await;
        if let EventKind::Receipt { id: rid, state, .. } = e.kind
            && rid == id
        {
            states.push(state);
        }
    }
    assert_eq!(states, ["sent", "delivered"]);
    loop {
        let e = next_event(&mut sub_b).await;
        if let EventKind::Message { id: mid, .. } = e.kind
            && mid == id
        {
            break;
        }
    }
    assert!(ca.typing("bob", true).await.unwrap());
    loop {
        let e = next_event(&mut sub_b).await;
        if let EventKind::Typing { from, typing, .. } = e.kind {
            assert_eq!(from, "alice");
            assert!(typing);
            break;
        }
    }
}

#[tokio::test]
async fn a_thousand_messages_between_daemons_arrive_once_in_order() {
    let (a, b) = pair().await;
    let ca = a.client().await;
    let n = 1000;
    for i in 0..n {
        ca.send("bob", &format!("m{i:04}")).await.unwrap();
    }
    let cb = b.client().await;
    let got = eventually("bob has all", LONG, || async {
        let h = cb.history("alice", 5000).await.unwrap();
        (h.len() >= n).then_some(h)
    })
    .await;
    assert_eq!(got.len(), n);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, m)| m.text == format!("m{i:04}"))
    );
    eventually("all delivered", LONG, || async {
        let h = ca.history("bob", 5000).await.unwrap();
        h.iter().all(|m| m.state == "delivered").then_some(())
    })
    .await;
}

#[tokio::test]
async fn kill_9_right_after_send_then_restart_delivers_exactly_once() {
    let (a, b) = pair().await;
    let mut a = a;
    for round in 0..4 {
        let text = format!("survives a crash {round}");
        let id = a.tern_json(&["send", "bob", &text])["id"]
            .as_str()
            .unwrap()
            .to_string();
        // SIGKILL the sender the moment `send` returned.
        let dir = a.kill9();
        a = TestDaemon::start_in(dir, &["--no-mdns"]).await;
        let got = eventually("bob has it", LONG, || async {
            let h = history(&b, "alice");
            h.iter().any(|m| m["id"] == id.as_str()).then_some(h)
        })
        .await;
        eventually("alice sees delivered", LONG, || async {
            let h = history(&a, "bob");
            h.iter()
                .any(|m| m["id"] == id.as_str() && m["state"] == "delivered")
                .then_some(())
        })
        .await;
        let again = history(&b, "alice");
        assert_eq!(
            again.iter().filter(|m| m["text"] == text.as_str()).count(),
            1,
            "round {round}: exactly once ({} then {} messages)",
            got.len(),
            again.len()
        );
        assert_eq!(again.len(), round + 1);
    }
}

#[tokio::test]
async fn chat_through_a_pipe_sends_and_shows_messages() {
    let (a, b) = pair().await;
    // A first message so bob knows alice and can answer.
    a.tern_json(&["send", "bob", "hi", "--wait", "delivered"]);
    // Killed on drop: a failing test leaves no chat process behind.
    let mut chat = KillOnDrop(
        a.dir
            .command(&["chat", "bob"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdin = chat.0.stdin.take().unwrap();
    let stdout = chat.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_line = |pred: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("chat printed the expected line in time");
            if pred(&line) {
                return line;
            }
        }
    };
    wait_line(&|l| l.starts_with("chat with bob"));
    writeln!(stdin, "hello from chat").unwrap();
    eventually("bob gets the chat line", LONG, || async {
        history(&b, "alice")
            .iter()
            .any(|m| m["text"] == "hello from chat")
            .then_some(())
    })
    .await;
    b.tern_json(&["send", "alice", "answer from bob"]);
    let line = wait_line(&|l| l.contains("answer from bob"));
    assert!(line.contains("bob: answer from bob"), "{line}");
    // What a peer writes cannot forge a line of the chat or reach the terminal as escapes.
    b.tern_json(&["send", "alice", "two\n[00:00:00] me: forged\x1b[31m"]);
    let line = wait_line(&|l| l.contains("bob: two"));
    let next = wait_line(&|_| true);
    assert!(
        next.starts_with("    ") && next.trim_start() == "[00:00:00] me: forged\\u{1b}[31m",
        "{line}\n{next}"
    );
    let shown = a.tern(&["history", "bob"]);
    let shown = String::from_utf8(shown.stdout).unwrap();
    assert!(!shown.contains('\x1b'), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with(' ') && l.contains("[00:00:00] me: forged")),
        "{shown}"
    );
    // `//text` sends `/text`; a failed command leaves the chat running.
    writeln!(stdin, "//slash at the start").unwrap();
    eventually("bob gets the slash line", LONG, || async {
        history(&b, "alice")
            .iter()
            .any(|m| m["text"] == "/slash at the start")
            .then_some(())
    })
    .await;
    writeln!(stdin, "/history 2").unwrap();
    wait_line(&|l| l.contains("me: /slash at the start"));
    writeln!(stdin, "/quit").unwrap();
    let status = chat.wait_within(Duration::from_secs(30));
    assert!(status.success());
    // Showing it in the chat marked it read.
    eventually("bob sees read", LONG, || async {
        history(&b, "alice")
            .iter()
            .any(|m| m["text"] == "answer from bob" && m["state"] == "read")
            .then_some(())
    })
    .await;
}
