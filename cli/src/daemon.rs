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
    #[arg(long = "relay", value_name = "MA", value_parser = crate::parse_multiaddr)]
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

pub(crate) fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tern_node=info,tern=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
