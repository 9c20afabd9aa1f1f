//! `tern-tests`: the harness every multi-node scenario builds on.
//!
//! - [`TestNode`]: a node in this process, in its own temporary directory, on loopback with
//!   OS-chosen ports and mDNS off; stopped when dropped.
//! - [`TestDaemon`]: a real `tern daemon` process, likewise isolated; killed when dropped,
//!   so a failing test never leaves a process behind.
//!
//! Waiting is always on an event or a condition with a deadline, never a bare sleep.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use tern_node::{
    Config, DataDir, Identity, Node, NodeHandle, NodeOptions,
    api::client::ApiClient,
    events::{Event, EventKind, Subscription},
};

/// The default deadline of every wait in the harness.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long one test binary may run before [`arm_watchdog`] aborts it, unless
/// `TERN_TEST_WATCHDOG_SECS` says otherwise. The longest runs under half a minute here; a
/// hung test then fails CI in minutes instead of at its limit.
const BINARY_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Aborts this process, saying why, once it has run for [`BINARY_LIMIT`] after the first
/// call (a hang in a test, which would otherwise run until CI gives up). Only in debug
/// builds: benchmarks, built for release, may run longer.
pub fn arm_watchdog() {
    static ARMED: std::sync::Once = std::sync::Once::new();
    if !cfg!(debug_assertions) {
        return;
    }
    ARMED.call_once(|| {
        let limit = std::env::var("TERN_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(BINARY_LIMIT, Duration::from_secs);
        let started = std::thread::Builder::new()
            .name("tern-test-watchdog".into())
            .spawn(move || {
                std::thread::sleep(limit);
                eprintln!(
                    "tern-tests watchdog: this test binary ran for {} s: a test hangs; aborting",
                    limit.as_secs()
                );
                std::process::abort();
            });
        if let Err(e) = started {
            eprintln!("tern-tests watchdog: not started: {e}");
        }
    });
}

/// Installs a test log subscriber once (RUST_LOG controls it; output is captured per test).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tern_node=info")),
        )
        .with_test_writer()
        .try_init();
}

/// A node running in this process.
pub struct TestNode {
    pub name: String,
    pub handle: NodeHandle,
    pub events: Subscription,
    config: Config,
    dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a loopback node named `name` (also its display name).
    pub async fn spawn(name: &str) -> Self {
        Self::spawn_with(name, |_| {}).await
    }

    /// Adds `other` as a contact named `name` (by its current ticket).
    pub async fn add_contact(&self, other: &TestNode, name: &str) {
        let ticket = other.handle.ticket().await.unwrap().encode();
        self.handle.contact_add(&ticket, name).await.unwrap();
    }

    /// Waits until `pred` holds for the history with `with`, up to `timeout`.
    pub async fn wait_history(
        &self,
        with: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[tern_node::messaging::HistoryItem]) -> bool,
    ) -> Vec<tern_node::messaging::HistoryItem> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            let h = self.handle.history(with, 100_000).await.unwrap_or_default();
            if pred(&h) {
                return h;
            }
            if tokio::time::Instant::now() >= deadline {
                let states: Vec<String> = h.iter().map(|m| m.state.clone()).collect();
                panic!(
                    "{}: history with {with} not as expected within {timeout:?}: {} messages, states {:?}",
                    self.name,
                    h.len(),
                    states.iter().collect::<std::collections::BTreeSet<_>>()
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Starts a loopback node after letting `tweak` adjust its configuration.
    pub async fn spawn_with(name: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::spawn_in_parent(name, None, tweak).await
    }

    /// Starts a loopback node whose data directory lives under `parent` (for example a
    /// small tmpfs); `parent` must outlive the node.
    pub async fn spawn_under(name: &str, parent: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::spawn_in_parent(name, Some(parent), tweak).await
    }

    async fn spawn_in_parent(
        name: &str,
        parent: Option<&Path>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        init_logs();
        arm_watchdog();
        let mut builder = tempfile::Builder::new();
        let prefix = format!("tern-test-{name}-");
        builder.prefix(&prefix);
        let dir = match parent {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .unwrap();
        let data_dir = DataDir::new(dir.path().join("node"));
        Identity::create(&data_dir).unwrap();
        let mut config = Config {
            name: Some(name.into()),
            ..Config::loopback()
        };
        tweak(&mut config);
        Self::start_in(name, dir, data_dir, config).await
    }

    async fn start_in(
        name: &str,
        dir: tempfile::TempDir,
        data_dir: DataDir,
        config: Config,
    ) -> Self {
        let handle = Node::start(NodeOptions {
            data_dir,
            config: config.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
        let events = handle.subscribe(None).unwrap();
        Self {
            name: name.into(),
            handle,
            events,
            config,
            dir,
        }
    }

    /// Stops the node and starts it again on the same data directory.
    pub async fn restart(&mut self) {
        self.handle.shutdown().await.unwrap();
        self.start_again().await;
    }

    /// Starts the node again after [`TestNode::stop_keep`].
    pub async fn start_again(&mut self) {
        let handle = Node::start(NodeOptions {
            data_dir: self.data_dir(),
            config: self.config.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{} did not restart: {e}", self.name));
        self.events = handle.subscribe(None).unwrap();
        self.handle = handle;
    }

    /// The data directory.
    pub fn data_dir(&self) -> DataDir {
        DataDir::new(self.dir.path().join("node"))
    }

    /// A dialable `/ip4/127.0.0.1/tcp/<port>/p2p/<id>` address of this node.
    pub async fn tcp_addr(&self) -> tern_node::Multiaddr {
        let addrs = self.handle.listen_addrs().await.unwrap();
        addrs
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .expect("node listens on TCP")
            .with(tern_node::net::p2p(self.handle.peer_id()))
    }

    /// Waits for an event matching `pick`, up to [`WAIT`].
    ///
    /// A receiver that lagged behind a busy node (its channel overflowed) is no failure:
    /// the events it skipped are read back from the event log before the next live one
    /// (those the log does not keep, such as presence changes and connections, are gone).
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        use tokio::sync::broadcast::error::RecvError;
        let deadline = tokio::time::Instant::now() + WAIT;
        // How many events the live receiver skipped since the last one it gave.
        let mut skipped: u64 = 0;
        let mut replay: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
        loop {
            let event = match replay.pop_front() {
                Some(e) => e,
                None => {
                    let received = tokio::time::timeout_at(deadline, self.events.live.recv()).await;
                    match received {
                        Ok(Ok(e)) if skipped > 0 => {
                            // Seqs are consecutive: the skipped ones come right before this one.
                            let first = e.seq.saturating_sub(skipped);
                            skipped = 0;
                            replay = self.logged_between(first, e.seq);
                            replay.push_back(e);
                            continue;
                        }
                        Ok(Ok(e)) => e,
                        Ok(Err(RecvError::Lagged(n))) => {
                            skipped = skipped.saturating_add(n);
                            continue;
                        }
                        Ok(Err(RecvError::Closed)) => {
                            panic!(
                                "{}: event stream closed while waiting for {what}",
                                self.name
                            )
                        }
                        Err(_) => panic!("{}: no {what} within {WAIT:?}", self.name),
                    }
                }
            };
            if let Some(v) = pick(&event) {
                return v;
            }
        }
    }

    /// The events with `first <= seq < end` that the event log kept.
    fn logged_between(&self, first: u64, end: u64) -> std::collections::VecDeque<Event> {
        match self.handle.subscribe(Some(first.saturating_sub(1))) {
            Ok(sub) => sub
                .backlog
                .into_iter()
                .filter(|e| e.seq >= first && e.seq < end)
                .collect(),
            Err(e) => {
                eprintln!("{}: cannot read skipped events back: {e}", self.name);
                std::collections::VecDeque::new()
            }
        }
    }

    /// Waits until this node is connected to `peer`.
    pub async fn wait_connected(&mut self, peer: &tern_node::PeerId) {
        let want = peer.to_string();
        if self
            .handle
            .status()
            .await
            .unwrap()
            .connected_peers
            .contains(&want)
        {
            return;
        }
        self.wait_for("connection", |e| match &e.kind {
            EventKind::PeerConnected { peer_id, .. } if *peer_id == want => Some(()),
            _ => None,
        })
        .await
    }

    /// Shuts the node down but keeps its directory, to [`TestNode::start_again`] later.
    pub async fn stop_keep(&self) {
        self.handle.shutdown().await.unwrap();
    }

    /// Shuts the node down (also done, without waiting, on drop).
    pub async fn stop(self) {
        self.handle.shutdown().await.unwrap();
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.handle.request_shutdown();
        // On a multi-thread runtime, wait (bounded) until the node has stopped and released
        // its files, so its temporary directory is not removed under it. A current-thread
        // runtime cannot run the node's tasks while this thread waits: there the directory
        // goes at once, as before; and so it does while a failed test unwinds (a second
        // panic here would abort every test of the binary).
        if !std::thread::panicking()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
            && rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            let handle = self.handle.clone();
            tokio::task::block_in_place(|| {
                let _ = rt.block_on(tokio::time::timeout(
                    Duration::from_secs(10),
                    handle.shutdown(),
                ));
            });
        }
    }
}

/// Polls `cond` until it returns `Some`, up to `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// The `tern` binary under test: `$TERN_BIN`, or `target/<profile>/tern` next to this test.
pub fn tern_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TERN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("tern");
    assert!(
        bin.exists(),
        "the tern binary is missing at {}; build it with `cargo build -p tern-cli` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// A data directory for `tern` processes, removed when dropped.
pub struct TernDir {
    pub name: String,
    dir: tempfile::TempDir,
    /// Run every `tern` command inside this network namespace (mDNS tests).
    netns: Option<String>,
}

impl TernDir {
    /// A fresh, uninitialized directory.
    pub fn new(name: &str) -> Self {
        arm_watchdog();
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-proc-{name}-"))
            .tempdir()
            .unwrap();
        Self {
            name: name.into(),
            dir,
            netns: None,
        }
    }

    /// Runs this directory's `tern` commands inside network namespace `ns`.
    pub fn in_netns(mut self, ns: &NetNs) -> Self {
        self.netns = Some(ns.name.clone());
        self
    }

    /// A directory on which `tern init` already ran.
    pub fn initialized(name: &str) -> Self {
        Self::new(name).init()
    }

    /// Runs `tern init` on this directory.
    pub fn init(self) -> Self {
        let name = self.name.clone();
        let d = self;
        let out = d.tern(&["init", "--name", &name]);
        assert!(out.status.success(), "tern init failed: {}", stderr(&out));
        d
    }

    /// The data directory path.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where a daemon started in this directory logs (outside the data directory).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// A `tern` command with `--data-dir` set.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            None => Command::new(tern_bin()),
            Some(ns) => {
                // `ip netns exec` execs the program, so the child's pid is tern's pid.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tern_bin());
                c
            }
        };
        c.arg("--data-dir").arg(self.path()).args(args);
        c.env_remove("TERN_DATA_DIR");
        c.stdin(Stdio::null());
        c
    }

    /// Runs `tern <args>` to completion.
    pub fn tern(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `tern <args>` to completion, for at most `limit`: a command still running then
    /// (a `tern daemon` that should have refused to start, say) is killed and the test
    /// fails, instead of hanging with a daemon left behind.
    pub fn tern_within(&self, args: &[&str], limit: Duration) -> Output {
        output_within(self.command(args), limit)
    }

    /// Runs `tern --json <args>`, asserts success, parses stdout as one JSON value.
    pub fn tern_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.tern(&full);
        assert!(
            out.status.success(),
            "tern {args:?} failed ({}): {}",
            out.status,
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "tern {args:?} printed no single JSON value ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A running `tern daemon`.
pub struct TestDaemon {
    pub dir: TernDir,
    child: Option<Child>,
}

impl TestDaemon {
    /// Initializes a directory and starts a daemon on loopback without mDNS.
    pub async fn start(name: &str) -> Self {
        Self::start_in(TernDir::initialized(name), &["--no-mdns"]).await
    }

    /// Starts `tern daemon <extra>` in `dir`, listening on loopback, and waits for its API.
    pub async fn start_in(dir: TernDir, extra: &[&str]) -> Self {
        let mut args = vec![
            "daemon",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ];
        args.extend_from_slice(extra);
        Self::spawn_raw(dir, &args).await
    }

    /// Starts `tern <args>` (a daemon command line) and waits until `api.json` names it.
    pub async fn spawn_raw(dir: TernDir, args: &[&str]) -> Self {
        let mut cmd = dir.command(args);
        // stderr goes to a file: a pipe nobody reads would block a chatty daemon.
        let log = std::fs::File::create(dir.log_path()).unwrap();
        cmd.stdout(Stdio::null()).stderr(log);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        let child = cmd.spawn().unwrap();
        let mut d = Self {
            dir,
            child: Some(child),
        };
        d.wait_api_ready().await;
        d
    }

    async fn wait_api_ready(&mut self) {
        let pid = self.pid();
        let data_dir = DataDir::new(self.dir.path());
        let name = self.dir.name.clone();
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut delay = Duration::from_millis(5);
        loop {
            if let Some(file) = tern_node::api::read_api_file(&data_dir)
                && file.pid == pid
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let err = self.take_stderr();
                panic!("daemon {name} exited early ({status}): {err}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon {name}: API not ready within {WAIT:?}"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// A typed API client.
    pub async fn client(&self) -> ApiClient {
        ApiClient::connect(&DataDir::new(self.dir.path()))
            .await
            .unwrap()
    }

    /// `tern --json <args>` against this daemon.
    pub fn tern_json(&self, args: &[&str]) -> Value {
        self.dir.tern_json(args)
    }

    /// `tern <args>` against this daemon.
    pub fn tern(&self, args: &[&str]) -> Output {
        self.dir.tern(args)
    }

    /// The peer id, from `tern id --json`.
    pub fn peer_id(&self) -> String {
        self.tern_json(&["id"])["peer_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A dialable TCP multiaddr with `/p2p/`, from `tern status --json`.
    pub fn tcp_addr(&self) -> String {
        let status = self.tern_json(&["status"]);
        let addr = status["listen_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find(|a| a.contains("/tcp/"))
            .expect("daemon listens on TCP")
            .to_string();
        format!("{addr}/p2p/{}", status["peer_id"].as_str().unwrap())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(5);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon {} did not exit within {timeout:?}",
                self.dir.name
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// What the daemon wrote on stderr so far.
    pub fn take_stderr(&mut self) -> String {
        std::fs::read_to_string(self.dir.log_path()).unwrap_or_default()
    }

    /// Kills the daemon with SIGKILL and returns its directory (to restart on it).
    pub fn kill9(mut self) -> TernDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::mem::replace(&mut self.dir, TernDir::new("moved"))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// stderr of a finished command as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd` to completion with its stdout and stderr captured, for at most `limit`: a
/// command still running then is killed (and reaped) and the test fails.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Both pipes are read on their own threads, so a chatty command never blocks on one.
    let stdout = read_to_end_on_a_thread(child.0.stdout.take().unwrap());
    let stderr = read_to_end_on_a_thread(child.0.stderr.take().unwrap());
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            child.kill();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "{cmd:?} still ran after {limit:?} (killed); stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn read_to_end_on_a_thread<R: std::io::Read + Send + 'static>(
    mut pipe: R,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// A child process that is killed (and reaped) when dropped, so a failing test leaves no
/// process behind.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits for the process to exit, for at most `limit`: one still running then is
    /// killed and the test fails.
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                self.kill();
                panic!("process {} still ran after {limit:?} (killed)", self.0.id());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9` and reap (nothing happens to a process that already exited).
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway network namespace with a multicast-capable veth pair (10.77.0.1 and
/// 10.77.0.2), for the mDNS test. Nothing in it reaches any real network.
/// Deleted when dropped.
pub struct NetNs {
    pub name: String,
    /// The IPv4 address of the namespace's interface.
    pub addr: String,
}

impl NetNs {
    /// Creates the namespace, or says why it cannot (not root, no `ip`, no netns support).
    pub fn create() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("creating a network namespace needs root".into());
        }
        let name = format!("tern-mdns-{}-{}", std::process::id(), rand_suffix());
        let ns = Self {
            name,
            addr: "10.77.0.1".into(),
        };
        ns.ip(&["netns", "add", &ns.name])?;
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        // A veth pair inside the namespace: multicast sent on one end arrives on the other.
        ns.ip(&[
            "-n", &ns.name, "link", "add", "tern0", "type", "veth", "peer", "name", "tern1",
        ])?;
        ns.ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            "tern0",
        ])?;
        ns.ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.77.0.2/24",
            "dev",
            "tern1",
        ])?;
        ns.ip(&["-n", &ns.name, "link", "set", "tern0", "up"])?;
        ns.ip(&["-n", &ns.name, "link", "set", "tern1", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run `ip` (iproute2 missing?): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                stderr(&out).trim()
            ))
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// A size-limited tmpfs mounted on a fresh directory (full-disk tests); unmounted on drop.
pub struct SmallDisk {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes`, or says why it cannot (not root, no mount rights).
    pub fn mount(megabytes: u32) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("tern-disk-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount failed: {}", stderr(&out).trim()));
        }
        Ok(Self {
            path: dir.path().to_owned(),
            _dir: dir,
        })
    }

    /// Fills the disk with a file until writes fail; returns the file (delete it to free space).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.path.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// How long a `tern relay` process may take to log its address.
pub const RELAY_START: Duration = Duration::from_secs(30);

/// A `tern relay` process (`--data-dir data relay --listen ...`, admin endpoint on an
/// OS-chosen loopback port) and the dialable address it logged. Killed on drop.
pub struct RelayProcess {
    pub child: KillOnDrop,
    /// `/ip4/.../tcp/<port>/p2p/<relay id>`.
    pub addr: tern_node::Multiaddr,
}

impl RelayProcess {
    /// Starts the relay with the `tern` next to the running test or bench binary and waits
    /// until it logs its address (at most [`RELAY_START`]; a relay that does not, or logs
    /// one that does not parse, is killed and the test fails).
    pub fn spawn(data: &Path, listen: &str) -> Self {
        use std::{io::BufRead, sync::mpsc::RecvTimeoutError};
        arm_watchdog();
        let mut child = KillOnDrop(
            Command::new(tern_bin())
                .arg("--data-dir")
                .arg(data)
                .args(["relay", "--listen", listen])
                .env("TERN_RELAY_ADMIN_BIND", "127.0.0.1:0")
                .env("RUST_LOG", "warn,tern=info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let log = child.0.stderr.take().unwrap();
        // The log is read to its end on a thread (so the relay never blocks on a full
        // pipe), its lines handed over for as long as someone takes them.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut reader = std::io::BufReader::new(log);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                if tx.as_ref().is_none_or(|t| t.send(text).is_err()) {
                    tx = None;
                }
            }
        });
        let deadline = std::time::Instant::now() + RELAY_START;
        let mut seen = Vec::new();
        let found: Result<tern_node::Multiaddr, String> = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("relay listening")
                        && let Some(at) = line.find("/ip4/")
                    {
                        let text: String = line[at..]
                            .chars()
                            .take_while(|c| !c.is_whitespace() && !c.is_control())
                            .collect();
                        break text.parse::<tern_node::Multiaddr>().map_err(|e| {
                            format!("logged an address that does not parse ({e}): {text}")
                        });
                    }
                    seen.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    break Err(format!("logged no address within {RELAY_START:?}"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break Err("exited before listening".to_string());
                }
            }
        };
        match found {
            Ok(addr) => Self { child, addr },
            Err(why) => {
                child.kill();
                panic!("the relay {why}; its log:\n{}", seen.concat());
            }
        }
    }

    /// The relay's pid.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        self.child.kill();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    #[ignore = "child process of a_hung_test_binary_is_aborted_by_its_watchdog"]
    fn hanging_child() {
        arm_watchdog();
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    #[cfg(debug_assertions)] // the watchdog is off in release builds
    fn a_hung_test_binary_is_aborted_by_its_watchdog() {
        let started = std::time::Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "tests::hanging_child",
                "--nocapture",
            ])
            .env("TERN_TEST_WATCHDOG_SECS", "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(nix::libc::SIGABRT),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("a test hangs; aborting"));
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
