//! Process-level scenarios through the real `tern` binary: two daemons on loopback, the API
//! guard, the data-directory lock, clean shutdown, and bad input.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tern_node::{DataDir, api::client::ApiClient, api::client::ClientError, api::read_api_file};
use tern_tests::{TernDir, TestDaemon, eventually, stderr};

/// How long a `tern daemon` that must refuse to start may take to do so; one that is still
/// running then is killed and the test fails (rather than hanging with a daemon left).
const REFUSED_WITHIN: Duration = Duration::from_secs(30);
/// Where such a daemon would listen, if it started after all.
const LOOPBACK: &str = "/ip4/127.0.0.1/tcp/0";

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn two_daemons_connect_by_dial_and_list_each_other() {
    let a = TestDaemon::start("alice").await;
    let b = TestDaemon::start("bob").await;
    let a_id = a.peer_id();
    let b_id = b.peer_id();

    let dialed = a.tern_json(&["dial", &b.tcp_addr()]);
    assert_eq!(dialed["peer_id"], b_id.as_str());

    let sa = a.tern_json(&["status"]);
    assert_eq!(sa["peer_id"], a_id.as_str());
    assert!(strings(&sa["connected_peers"]).contains(&b_id));
    assert_eq!(sa["outbox"], 0);
    assert!(sa["relays"].as_array().unwrap().is_empty());
    // Bob sees the incoming connection too (it may land a moment after alice's dial returns).
    eventually("bob lists alice", Duration::from_secs(10), || async {
        let sb = b.tern_json(&["status"]);
        strings(&sb["connected_peers"])
            .contains(&a_id)
            .then_some(())
    })
    .await;

    let peers = a.tern_json(&["peers"]);
    let entry = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == b_id.as_str())
        .expect("bob in peers");
    assert!(!entry["addrs"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn bad_token_and_foreign_origin_are_refused() {
    let a = TestDaemon::start("alice").await;
    let file = read_api_file(&DataDir::new(a.dir.path())).unwrap();
    assert!(file.url.starts_with("ws://127.0.0.1:"), "{}", file.url);
    assert_eq!(file.pid, a.pid());

    match ApiClient::connect_with(&file.url, "not-the-token").await {
        Err(ClientError::Refused(msg)) => assert!(msg.contains("401"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let host = file.url.trim_start_matches("ws://").to_string();
    let status = raw_upgrade(&host, Some(&file.token), Some("https://evil.example")).await;
    assert_eq!(status, 403);
    let status = raw_upgrade(&host, None, None).await;
    assert_eq!(status, 401);
    let status = raw_upgrade(&host, Some(&file.token), None).await;
    assert_eq!(status, 101, "the right token without Origin is accepted");
    // And the daemon still serves.
    a.tern_json(&["status"]);
}

/// Sends a WebSocket upgrade request by hand and returns the HTTP status code.
async fn raw_upgrade(host: &str, token: Option<&str>, origin: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut req = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(o) = origin {
        req.push_str(&format!("Origin: {o}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn malformed_json_rpc_gets_standard_errors_and_the_connection_survives() {
    use soketto::handshake::{Client, ServerResponse, client::Header};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    let a = TestDaemon::start("alice").await;
    let file = read_api_file(&DataDir::new(a.dir.path())).unwrap();
    let host = file.url.trim_start_matches("ws://").to_string();
    let tcp = tokio::net::TcpStream::connect(&host).await.unwrap();
    let auth = format!("Bearer {}", file.token);
    let headers = [Header {
        name: "Authorization",
        value: auth.as_bytes(),
    }];
    let mut client = Client::new(tcp.compat(), &host, "/");
    client.set_headers(&headers);
    assert!(matches!(
        client.handshake().await.unwrap(),
        ServerResponse::Accepted { .. }
    ));
    let (mut tx, mut rx) = client.into_builder().finish();
    let mut ask = async |text: &str| -> Value {
        tx.send_text(text).await.unwrap();
        tx.flush().await.unwrap();
        let mut data = Vec::new();
        rx.receive_data(&mut data).await.unwrap();
        serde_json::from_slice(&data).unwrap()
    };

    let r = ask("{this is not json").await;
    assert_eq!(r["error"]["code"], -32700, "{r}");
    let r = ask(r#"{"jsonrpc":"2.0","id":1,"method":"noSuchMethod"}"#).await;
    assert_eq!(r["error"]["code"], -32601, "{r}");
    let r =
        ask(r#"{"jsonrpc":"2.0","id":2,"method":"dial","params":{"address":"not a multiaddr"}}"#)
            .await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = ask(r#"{"jsonrpc":"2.0","id":3,"method":"dial","params":{"wrong":1}}"#).await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = ask(r#"{"jsonrpc":"2.0","id":4,"method":"status"}"#).await;
    assert_eq!(r["id"], 4);
    assert!(r["result"]["peer_id"].is_string(), "{r}");
}

#[tokio::test]
async fn second_daemon_on_the_same_dir_fails_at_once() {
    let a = TestDaemon::start("alice").await;
    let out = a.dir.tern_within(
        &["daemon", "--no-mdns", "--listen", LOOPBACK],
        REFUSED_WITHIN,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let expected = format!(
        "a Tern daemon already uses {} (pid {})",
        a.dir.path().display(),
        a.pid()
    );
    assert!(err.contains(&expected), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // The first daemon is unaffected and its api.json still names it.
    assert_eq!(
        read_api_file(&DataDir::new(a.dir.path())).unwrap().pid,
        a.pid()
    );
    a.tern_json(&["status"]);
}

#[tokio::test]
async fn sigterm_exits_zero_and_removes_api_json() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut a = TestDaemon::start("alice").await;
        let api = DataDir::new(a.dir.path()).api_path();
        assert!(api.exists());
        let started = std::time::Instant::now();
        a.signal(sig);
        let status = a.wait_exit(Duration::from_secs(10)).await;
        let took = started.elapsed();
        assert!(
            status.success(),
            "{sig}: exit {status}; log: {}",
            a.take_stderr()
        );
        assert!(!api.exists(), "{sig}: api.json left behind");
        eprintln!("{sig}: daemon exited in {took:?}");
    }
}

#[tokio::test]
async fn a_reader_closing_the_output_early_is_no_failure() {
    let a = TestDaemon::start("alice").await;
    for args in [&["status"][..], &["--json", "events", "--since", "0"][..]] {
        let mut child = a
            .dir
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // As `tern ... | head -c 0` does: the reader is gone before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn shutdown_method_stops_the_daemon() {
    let mut a = TestDaemon::start("alice").await;
    let out = a.tern_json(&["stop"]);
    assert_eq!(out["stopped"], true);
    // `tern stop` returned once the directory was free: what needs its lock works at once.
    let id = a.tern(&["id"]);
    assert!(
        id.status.success(),
        "{}",
        String::from_utf8_lossy(&id.stderr)
    );
    assert!(a.wait_exit(Duration::from_secs(10)).await.success());
    let out = a.tern(&["status"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn commands_without_a_daemon_say_so() {
    let d = TernDir::initialized("alice");
    for cmd in [
        &["status"][..],
        &["peers"],
        &["dial", "/ip4/127.0.0.1/tcp/1"],
        &["events"],
    ] {
        let out = d.tern(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = stderr(&out);
        let expected = format!(
            "no Tern daemon is running for {0}; start one with `tern --data-dir {0} daemon`",
            d.path().display()
        );
        assert!(err.contains(&expected), "{cmd:?}: {err}");
    }
}

#[tokio::test]
async fn stale_api_json_after_kill_9_is_not_a_running_daemon() {
    let a = TestDaemon::start("alice").await;
    let dir = a.kill9();
    assert!(
        DataDir::new(dir.path()).api_path().exists(),
        "kill -9 leaves api.json"
    );
    let out = dir.tern(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no Tern daemon is running"),
        "{}",
        stderr(&out)
    );
    // A new daemon starts on the same directory (the OS released the lock).
    let b = TestDaemon::start_in(dir, &["--no-mdns"]).await;
    b.tern_json(&["status"]);
}

#[tokio::test]
async fn unreachable_dial_is_an_error_and_the_daemon_keeps_running() {
    let a = TestDaemon::start("alice").await;
    let stranger = tern_node::Identity::from_seed([42u8; 32]).peer_id();
    let out = a.tern(&["dial", &format!("/ip4/127.0.0.1/tcp/1/p2p/{stranger}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot reach"), "{err}");
    // A malformed address is a usage error.
    let out = a.tern(&["dial", "not-a-multiaddr"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid multiaddr"),
        "{}",
        stderr(&out)
    );
    a.tern_json(&["status"]);
}

#[tokio::test]
async fn unreachable_relay_is_reported_and_the_daemon_keeps_running() {
    let stranger = tern_node::Identity::from_seed([43u8; 32]).peer_id();
    let relay = format!("/ip4/127.0.0.1/tcp/1/p2p/{stranger}");
    let a = TestDaemon::start_in(
        TernDir::initialized("alice"),
        &["--no-mdns", "--relay", &relay],
    )
    .await;
    let relays = eventually("relay error reported", Duration::from_secs(15), || async {
        let s = a.tern_json(&["status"]);
        let r = s["relays"][0].clone();
        r["last_error"].is_string().then_some(r)
    })
    .await;
    assert_eq!(relays["address"], relay.as_str());
    assert_eq!(relays["connected"], false);
}

#[tokio::test]
async fn a_listen_port_in_use_is_refused() {
    // libp2p listens with SO_REUSEPORT: without a check, a second daemon on alice's port
    // would start and take part of her connections.
    let a = TestDaemon::start("alice").await;
    let taken = a.tcp_addr();
    let port_part = taken.split("/p2p/").next().unwrap().to_string();
    let d = TernDir::initialized("bob");
    let out = d.tern_within(
        &["daemon", "--no-mdns", "--listen", &port_part],
        REFUSED_WITHIN,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("already in use"), "{err}");
    a.tern_json(&["status"]);
}

#[tokio::test]
async fn relay_without_peer_id_is_a_usage_error() {
    let d = TernDir::initialized("alice");
    let out = d.tern_within(
        &[
            "daemon",
            "--no-mdns",
            "--listen",
            LOOPBACK,
            "--relay",
            "/ip4/127.0.0.1/tcp/1",
        ],
        REFUSED_WITHIN,
    );
    // The flag's value is wrong: a usage error that names the flag, not the config file.
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("/p2p/") && err.contains("--relay"), "{err}");
    assert!(!err.contains("config.toml"), "{err}");
}

#[tokio::test]
async fn corrupt_identity_and_config_are_reported_and_left_untouched() {
    let d = TernDir::initialized("alice");
    let data = DataDir::new(d.path());

    std::fs::write(
        data.config_path(),
        "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmnds = false\n",
    )
    .unwrap();
    let out = d.tern_within(
        &["daemon", "--no-mdns", "--listen", LOOPBACK],
        REFUSED_WITHIN,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&data.config_path().display().to_string()),
        "{err}"
    );
    assert!(err.contains("mnds"), "{err}");
    assert!(
        std::fs::read_to_string(data.config_path())
            .unwrap()
            .contains("mnds")
    );
    std::fs::remove_file(data.config_path()).unwrap();

    let mut id = std::fs::read(data.identity_path()).unwrap();
    id[12] ^= 0xff;
    std::fs::write(data.identity_path(), &id).unwrap();
    for cmd in [&["daemon", "--no-mdns", "--listen", LOOPBACK][..], &["id"]] {
        let out = d.tern_within(cmd, REFUSED_WITHIN);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = stderr(&out);
        assert!(err.contains("corrupt identity file"), "{err}");
        assert!(
            err.contains(&data.identity_path().display().to_string()),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read(data.identity_path()).unwrap(),
        id,
        "not overwritten"
    );
    // `init` completes a directory without a config, but not with a corrupt identity.
    let out = d.tern(&["init"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("corrupt identity file"));
    assert_eq!(std::fs::read(data.identity_path()).unwrap(), id);
}

/// A directory that kept only its `identity.key` (set up again) is completed by `init`:
/// the identity stays, a config with the name is written. A complete one is refused.
#[tokio::test]
async fn init_completes_a_directory_that_holds_only_an_identity() {
    let d = TernDir::initialized("alice");
    let data = DataDir::new(d.path());
    let id = std::fs::read(data.identity_path()).unwrap();
    let out = d.tern(&["init", "--name", "bob"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to overwrite"));
    std::fs::remove_file(data.config_path()).unwrap();
    let out = d.tern(&["init", "--name", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Kept the Tern identity"));
    assert_eq!(std::fs::read(data.identity_path()).unwrap(), id, "kept");
    let config = std::fs::read_to_string(data.config_path()).unwrap();
    assert!(config.contains("name = \"bob\""), "{config}");
}

#[tokio::test]
async fn events_stream_as_json_lines_and_resume_with_since() {
    use std::io::{BufRead, BufReader};
    let a = TestDaemon::start("alice").await;
    let b = TestDaemon::start("bob").await;
    let b_id = b.peer_id();

    let mut child = a
        .dir
        .command(&["--json", "events", "--since", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).expect("each line is one JSON value");
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    // Waits up to 30 s for the first line of type `kind` (the receiver travels along).
    type Lines = std::sync::mpsc::Receiver<Value>;
    async fn line_of(rx: Lines, kind: &'static str) -> (Value, Lines) {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let v = rx
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("no {kind} line in time"));
                if v["type"] == kind {
                    return (v, rx);
                }
            }
        })
        .await
        .unwrap()
    }
    // `--since 0` replays the log: the daemon's `listening` events come first, which also
    // says the stream is attached. The connection (an event the log does not keep) then
    // arrives live, and the contact after it.
    let (_, rx) = line_of(rx, "listening").await;
    let client = a.client().await;
    let mut sub = client.subscribe(None).await.unwrap();
    a.tern_json(&["dial", &b.tcp_addr()]);
    let (connected, rx) = line_of(rx, "peerConnected").await;
    let ticket = b.tern_json(&["id"])["ticket"].as_str().unwrap().to_string();
    a.tern_json(&["contact", "add", &ticket, "--name", "bob"]);
    let (added, _rx) = line_of(rx, "contactAdded").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(added["peer_id"], b_id.as_str());
    assert_eq!(connected["peer_id"], b_id.as_str());
    let seq = added["seq"].as_u64().unwrap();
    let connected_seq = connected["seq"].as_u64().unwrap();
    assert!(seq > connected_seq, "added after the connection");

    // The typed subscription saw the same event with the same seq.
    let live = loop {
        let e = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if e.seq == seq {
            break e;
        }
    };
    assert!(matches!(
        live.kind,
        tern_node::events::EventKind::ContactAdded { .. }
    ));

    // Resuming from before the connection replays the contact first: the connection is
    // not in the log.
    let mut again = client.subscribe(Some(connected_seq - 1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), again.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, seq, "{first:?}");
}
