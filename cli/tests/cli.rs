//! The `tern` binary's contract without a running daemon: exit codes, `init`, `id`, `demo`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::process::{Command, Output};

fn tern(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("TERN_DATA_DIR")
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("exactly one JSON value on stdout")
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        tern(tmp.path(), &["no-such-command"]).status.code(),
        Some(2)
    );
    assert_eq!(tern(tmp.path(), &["dial"]).status.code(), Some(2));
    assert_eq!(
        tern(tmp.path(), &["daemon", "--listen", "garbage"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        tern(tmp.path(), &["daemon", "--api", "0.0.0.0:1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(tern(tmp.path(), &["--help"]).status.code(), Some(0));
}

#[test]
fn init_then_id_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let init = json(&tern(&dir, &["--json", "init", "--name", "alice"]));
    let peer = init["peer_id"].as_str().unwrap().to_string();
    assert!(init["ticket"].as_str().unwrap().starts_with("tern1"));
    assert!(
        std::fs::read_to_string(dir.join("config.toml"))
            .unwrap()
            .contains("alice")
    );

    let again = tern(&dir, &["init"]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);

    let id = json(&tern(&dir, &["--json", "id"]));
    assert_eq!(id["peer_id"], peer.as_str());
    assert_eq!(
        id["endpoint_id"].as_str().unwrap().len(),
        64,
        "hex ed25519 key"
    );
    let t = tern_node::ContactTicket::decode(id["ticket"].as_str().unwrap()).unwrap();
    assert_eq!(t.peer_id.to_string(), peer);

    let qr = tern(&dir, &["id", "--qr"]);
    assert!(qr.status.success());
    let text = String::from_utf8_lossy(&qr.stdout);
    assert!(
        text.contains('█') || text.contains('▀'),
        "a QR code is drawn"
    );
}

#[test]
fn id_without_init_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tern(&tmp.path().join("none"), &["id"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tern init"));
}

/// Runs `cmd` to its end, or kills it and fails after `limit` (a hung demo must not hang
/// the test run).
fn output_within(mut cmd: Command, limit: std::time::Duration) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} did not end within {limit:?}; killed");
        }
    }
}

#[test]
fn demo_runs_a_complete_scenario() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.args(["--json", "demo"]).env("TMPDIR", tmp.path());
    let out = output_within(cmd, std::time::Duration::from_secs(300));
    let steps = json(&out);
    let texts: Vec<String> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["actor"].as_str().unwrap(),
                s["text"].as_str().unwrap()
            )
        })
        .collect();
    let all = texts.join("\n");
    assert!(all.contains("alice connected to bob"), "{all}");
    assert!(all.contains("alice ping bob"), "{all}");
    assert!(all.contains("bob ping alice"), "{all}");
    assert!(all.contains("bob receives from alice"), "{all}");
    assert!(all.contains("matches alice's"), "{all}");
    assert!(all.contains("alice message is delivered"), "{all}");
    assert!(all.contains("alice message is read"), "{all}");
    assert!(all.contains("alice receives from bob"), "{all}");
    // Presence, then store-and-forward through the relay while bob is offline.
    assert!(all.contains("alice sees bob away"), "{all}");
    assert!(all.contains("alice sees bob online again"), "{all}");
    assert!(all.contains("bob receives through the relay"), "{all}");
    assert!(all.contains("alice both messages are delivered"), "{all}");
    // Self-cleaning: nothing left in the temporary directory.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "{all}");
}
