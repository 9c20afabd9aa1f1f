//! `tern daemon`: runs a node and its local API in the foreground until Ctrl-C, SIGTERM or
//! the API's `shutdown` method, then stops cleanly (API first, so `api.json` disappears,
//! then the node, which flushes its database) and exits 0.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Args;
use tern_node::{Multiaddr, Node, NodeOptions, Overrides, api};

use crate::Globals;

/// How long the node gets to stop before the daemon exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Flags of `tern daemon`.
#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    /// Listen on this multiaddr (repeatable; replaces the configured ones).
    #[arg(long = "listen", value_name = "MA", value_parser = crate::parse_multiaddr)]
    listen: Vec<Multiaddr>,
    /// Connect to this relay, a multiaddr ending in /p2p/<peer id> (repeatable).
    #[arg(long = "relay", value_name = "MA", value_parser = parse_relay)]
    relays: Vec<Multiaddr>,
    /// Do not discover peers on the local network.
    #[arg(long)]
    no_mdns: bool,
    /// Bind the local API here (loopback only) [default: from config, 127.0.0.1:0].
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_api_addr)]
    api: Option<SocketAddr>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

/// A `--relay` address: a multiaddr that names the relay's peer id (a usage error otherwise).
fn parse_relay(s: &str) -> Result<Multiaddr, String> {
    let addr = crate::parse_multiaddr(s)?;
    let text = addr.to_string();
    if text.rsplit('/').nth(1) != Some("p2p") {
        return Err(format!("relay address {s:?} must end in /p2p/<peer id>"));
    }
    Ok(addr)
}

pub(crate) fn init_logging(json: bool) {
    let filter = without_secrets(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,tern_node=info,tern=info")
        }),
    );
    // Colours only on a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `filter`, with the API server's own logs held at `info` whatever `RUST_LOG` says: at
/// `debug` and `trace` jsonrpsee logs whole HTTP requests, and their `authorization` header
/// carries the API token.
pub(crate) fn without_secrets(
    filter: tracing_subscriber::EnvFilter,
) -> tracing_subscriber::EnvFilter {
    ["jsonrpsee-server=info", "jsonrpsee_server=info"]
        .into_iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |f, d| f.add_directive(d))
}

/// Runs the daemon until it is told to stop.
pub(crate) async fn run(g: &Globals, args: DaemonArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let mut options = NodeOptions::load(g.dir.clone())?;
    options.config.apply(&Overrides {
        listen: args.listen,
        relays: args.relays,
        no_mdns: args.no_mdns,
        api_bind: args.api,
    });
    let api_bind = options.config.api_bind;
    let node = Node::start(options).await?;
    let server = match api::serve(node.clone(), api_bind).await {
        Ok(s) => s,
        Err(e) => {
            let _ = node.shutdown().await;
            return Err(e.into());
        }
    };
    tracing::info!(peer_id = %node.peer_id(), api = %server.url(), "tern daemon running");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let reason = tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupt",
        _ = sigterm.recv() => "SIGTERM",
        _ = node.closed() => "shutdown request",
    };
    tracing::info!(reason, "stopping");
    server.stop().await;
    match tokio::time::timeout(SHUTDOWN_GRACE, node.shutdown()).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("node did not stop within {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// Everything logged, for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn trace_logging_keeps_the_api_servers_requests_out() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(super::without_secrets(tracing_subscriber::EnvFilter::new(
                "trace",
            )))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "jsonrpsee-server", "authorization: Bearer s3cret");
            tracing::debug!(target: "jsonrpsee-server", "Denied request: Bearer s3cret");
            tracing::info!(target: "jsonrpsee-server", "server started");
            tracing::trace!(target: "tern_node", "other traces stay");
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains("s3cret"), "{log}");
        assert!(log.contains("server started"), "{log}");
        assert!(log.contains("other traces stay"), "{log}");
    }
}
