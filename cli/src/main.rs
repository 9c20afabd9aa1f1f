//! `tern`: the command-line face of a Tern node.
//!
//! This file only parses arguments, resolves the data directory and dispatches; the work
//! lives in `tern-node` and in the sibling modules. Exit codes: 0 success, 1 failure (one
//! line on stderr), 2 usage error (clap's own exit code).

mod chat;
mod client_cmds;
mod daemon;
mod demo;
mod msg_cmds;
mod output;
mod relay_cmd;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tern_node::{DataDir, Multiaddr};

/// Tern: a peer-to-peer, end-to-end encrypted messenger node.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, long_about = None)]
struct Cli {
    /// The node's data directory [default: the OS data directory, e.g. ~/.local/share/tern].
    #[arg(long, global = true, env = "TERN_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print exactly one JSON value (or JSON lines for streams) on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this node's identity and config (refuses if one exists).
    Init {
        /// Your display name, shown to contacts (the rules of contact names).
        #[arg(long, value_parser = display_name)]
        name: Option<String>,
    },
    /// Show this node's peer id, iroh endpoint id and contact ticket.
    Id {
        /// Also print the ticket as a terminal QR code.
        #[arg(long)]
        qr: bool,
    },
    /// Run the node in the foreground (stops cleanly on Ctrl-C / SIGTERM).
    Daemon(daemon::DaemonArgs),
    /// Run a relay in the foreground: mailboxes for offline users, circuit relay, DHT.
    Relay(relay_cmd::RelayArgs),
    /// Show the running daemon's state.
    Status,
    /// List connected peers.
    Peers,
    /// Connect to a peer by multiaddr (optionally ending in /p2p/<peer id>).
    Dial {
        /// The peer's address.
        #[arg(value_parser = parse_multiaddr)]
        address: Multiaddr,
    },
    /// Stream events until interrupted (JSON lines with --json).
    Events {
        /// Resume after this event sequence number.
        #[arg(long)]
        since: Option<u64>,
    },
    /// Manage contacts.
    #[command(subcommand)]
    Contact(msg_cmds::ContactCmd),
    /// Send a text message (TEXT `-` reads it from stdin).
    Send {
        /// The contact's name.
        name: String,
        /// The text, or `-` for stdin.
        text: String,
        /// Wait until the message is delivered or read.
        #[arg(long, value_enum)]
        wait: Option<msg_cmds::WaitFor>,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 60, requires = "wait")]
        timeout: u64,
    },
    /// Show a conversation.
    History {
        /// The contact's name.
        name: String,
        /// How many of the newest messages.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// List conversations with unread counts.
    Conversations,
    /// Mark a conversation read (sends read receipts).
    Read {
        /// The contact's name.
        name: String,
    },
    /// Show contacts' presence (online, away, offline, last seen), or set your own.
    Presence {
        /// One contact's name (all contacts when omitted).
        name: Option<String>,
        /// Set your own state instead: online (automatic: away after idling) or away.
        #[arg(long, value_parser = ["online", "away"], conflicts_with = "name")]
        set: Option<String>,
    },
    /// Chat interactively with a contact.
    Chat {
        /// The contact's name.
        name: String,
    },
    /// Ask the running daemon to stop.
    Stop,
    /// Run a complete local scenario on loopback, in temporary directories.
    Demo,
}

#[derive(Debug, Clone)]
struct Globals {
    dir: DataDir,
    out: output::Output,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.json && matches!(cli.command, Command::Chat { .. }) {
        use clap::CommandFactory as _;
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "`tern chat` is interactive and has no JSON output; for machine-readable \
                 messages use `tern --json events` and `tern --json send`",
            )
            .exit();
    }
    let dir = match cli
        .data_dir
        .clone()
        .map(DataDir::new)
        .or_else(DataDir::os_default)
    {
        Some(d) => d,
        None => {
            eprintln!(
                "error: cannot determine a data directory; pass --data-dir or set TERN_DATA_DIR"
            );
            return ExitCode::from(1);
        }
    };
    let globals = Globals {
        dir,
        out: output::Output { json: cli.json },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli.command, globals));
    // Do not wait for lingering blocking tasks (e.g. a stdin reader).
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::one_line(&e));
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, g: Globals) -> anyhow::Result<()> {
    match command {
        Command::Init { name } => client_cmds::init(&g, name),
        Command::Id { qr } => client_cmds::id(&g, qr).await,
        Command::Daemon(args) => daemon::run(&g, args).await,
        Command::Relay(args) => relay_cmd::run(&g, args).await,
        Command::Status => client_cmds::status(&g).await,
        Command::Peers => client_cmds::peers(&g).await,
        Command::Dial { address } => client_cmds::dial(&g, &address.to_string()).await,
        Command::Events { since } => client_cmds::events(&g, since).await,
        Command::Contact(cmd) => msg_cmds::contact(&g, cmd).await,
        Command::Send {
            name,
            text,
            wait,
            timeout,
        } => msg_cmds::send(&g, &name, &text, wait, timeout).await,
        Command::History { name, limit } => msg_cmds::history(&g, &name, limit).await,
        Command::Conversations => msg_cmds::conversations(&g).await,
        Command::Read { name } => msg_cmds::read(&g, &name).await,
        Command::Presence { name, set } => msg_cmds::presence(&g, name.as_deref(), set).await,
        Command::Chat { name } => chat::run(&g, &name).await,
        Command::Stop => client_cmds::stop(&g).await,
        Command::Demo => demo::run(&g).await,
    }
}

/// Parses a multiaddr argument with a clear message.
fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse()
        .map_err(|e| format!("invalid multiaddr {s:?}: {e}"))
}

/// Parses a loopback socket address argument.
fn parse_api_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("invalid address {s:?}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}

/// `--name` of `tern init`: what contacts accept as a name (otherwise they show a
/// `peer-…` name instead).
fn display_name(name: &str) -> Result<String, String> {
    tern_node::messaging::contacts::validate_name(name)?;
    Ok(name.to_string())
}
