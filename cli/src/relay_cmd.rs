//! `tern relay`: runs a relay (mailboxes, circuit relay v2, Kademlia server) in the
//! foreground until Ctrl-C or SIGTERM, then drains (answers what it received, flushes) and
//! exits 0. Configuration: `--config FILE`, else `<data-dir>/relay.toml` when it exists,
//! else the documented defaults; then `TERN_RELAY_*` environment variables; then flags.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tern_node::relay;
use tern_store_forward::RelayConfig;

use crate::Globals;

/// Flags of `tern relay`.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// The relay's TOML configuration [default: <data-dir>/relay.toml if present].
    #[arg(long, value_name = "FILE", env = "TERN_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Listen on this multiaddr (repeatable; replaces the configured ones).
    #[arg(long = "listen", value_name = "MA", value_parser = crate::parse_multiaddr)]
    listen: Vec<tern_node::Multiaddr>,
    /// Print the effective configuration (defaults, file, environment, flags) and exit.
    #[arg(long)]
    print_config: bool,
}

fn load(g: &Globals, args: &RelayArgs) -> anyhow::Result<RelayConfig> {
    let default_path = g.dir.root().join("relay.toml");
    let mut config = match &args.config {
        Some(path) => RelayConfig::load(path)?,
        None if default_path.exists() => RelayConfig::load(&default_path)?,
        None => RelayConfig::default(),
    };
    config.apply_env(std::env::vars())?;
    if !args.listen.is_empty() {
        config.listen = args.listen.iter().map(ToString::to_string).collect();
    }
    config.validate()?;
    Ok(config)
}

/// Runs the relay until it is told to stop.
pub(crate) async fn run(g: &Globals, args: RelayArgs) -> anyhow::Result<()> {
    let config = load(g, &args)?;
    if args.print_config {
        print!("{}", config.to_toml_string());
        return Ok(());
    }
    crate::daemon::init_logging(config.log_json);
    let relay = relay::start(g.dir.clone(), config).await?;
    for addr in relay.addresses().await? {
        tracing::info!(%addr, "relay listening; users add it with --relay");
    }
    tracing::info!(admin = %relay.admin_addr(), "metrics at /metrics, health at /healthz");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let reason = tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupt",
        _ = sigterm.recv() => "SIGTERM",
    };
    tracing::info!(reason, "draining");
    relay.shutdown().await;
    Ok(())
}
