//! `tern chat NAME`: an interactive conversation with one contact.
//!
//! Shows recent history, then incoming messages live with their receipts and the contact's
//! typing state; every line typed is sent. On a terminal it uses a line editor (reedline)
//! that keeps the input line intact while messages are printed above it; with a pipe it
//! reads lines from stdin and prints plainly, so scripts and tests can drive it.
//! Messages shown are marked read (read receipts go back to the sender).

use std::io::IsTerminal;

use tern_node::{
    api::client::ApiClient,
    events::{Event, EventKind},
};
use tokio::sync::mpsc;

use crate::{
    Globals,
    msg_cmds::{clock, history_line},
};

const HELP: &str = "commands: /history [N]  show the last N messages (default 20)\n          /read         mark the conversation read\n          /help         this help\n          /quit         leave (Ctrl-D works too)";

enum Input {
    Line(String),
    Eof,
}

/// Prints lines above the prompt (terminal) or plainly (pipe).
#[derive(Clone)]
enum Printer {
    Editor(std::sync::mpsc::SyncSender<String>),
    Plain,
}

impl Printer {
    fn print(&self, line: String) {
        match self {
            Printer::Editor(p) => {
                if let Err(e) = p.send(line) {
                    println!("{}", e.0);
                }
            }
            Printer::Plain => println!("{line}"),
        }
    }
}

fn spawn_input(tx: mpsc::Sender<Input>, name: String) -> Printer {
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let editor_printer = reedline::ExternalPrinter::<String>::default();
        let printer = editor_printer.sender();
        std::thread::spawn(move || {
            let mut editor = reedline::Reedline::create().with_external_printer(editor_printer);
            let prompt = reedline::DefaultPrompt::new(
                reedline::DefaultPromptSegment::Basic(format!("to {name}")),
                reedline::DefaultPromptSegment::Empty,
            );
            loop {
                let msg = match editor.read_line(&prompt) {
                    Ok(reedline::Signal::Success(line)) => Input::Line(line),
                    _ => Input::Eof,
                };
                let eof = matches!(msg, Input::Eof);
                if tx.blocking_send(msg).is_err() || eof {
                    break;
                }
            }
        });
        Printer::Editor(printer)
    } else {
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                let msg = match stdin.read_line(&mut line) {
                    Ok(0) | Err(_) => Input::Eof,
                    Ok(_) => Input::Line(line.trim_end_matches(['\n', '\r']).to_string()),
                };
                let eof = matches!(msg, Input::Eof);
                if tx.blocking_send(msg).is_err() || eof {
                    break;
                }
            }
        });
        Printer::Plain
    }
}

/// Runs the chat until `/quit`, end of input or Ctrl-C.
pub(crate) async fn run(g: &Globals, name: &str) -> anyhow::Result<()> {
    let client = ApiClient::connect(&g.dir).await?;
    let contact = client.contact_show(name).await?;
    let mut events = client.subscribe(None).await?;
    println!(
        "chat with {} ({}); safety number {}\n{HELP}",
        contact.name, contact.peer_id, contact.safety_number
    );
    for m in client.history(name, 20).await? {
        println!("{}", history_line(&m));
    }
    if let Some(p) = client.presence(Some(name)).await?.first() {
        println!("  {}", presence_line(&p.name, &p.state, p.last_seen));
    }
    client.mark_read(name).await?;

    let (tx, mut input) = mpsc::channel(16);
    let printer = spawn_input(tx, contact.name.clone());
    let mine: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut mine = mine;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            line = input.recv() => match line {
                None | Some(Input::Eof) => break,
                Some(Input::Line(line)) => {
                    if !handle_line(&client, &printer, &contact.name, &line, &mut mine).await? {
                        break;
                    }
                }
            },
            event = events.next() => match event {
                None => anyhow::bail!("the daemon closed the event stream (it stopped?)"),
                Some(Err(e)) => anyhow::bail!("bad event from the daemon: {e}"),
                Some(Ok(event)) => show_event(&client, &printer, &contact.peer_id, &contact.name, &mine, event).await,
            },
        }
    }
    Ok(())
}

/// Handles one typed line; returns false to quit.
async fn handle_line(
    client: &ApiClient,
    printer: &Printer,
    name: &str,
    line: &str,
    mine: &mut std::collections::HashSet<String>,
) -> anyhow::Result<bool> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(true);
    }
    if let Some(cmd) = trimmed.strip_prefix('/') {
        let mut parts = cmd.split_whitespace();
        match parts.next().unwrap_or("") {
            "quit" | "exit" | "q" => return Ok(false),
            "help" => printer.print(HELP.to_string()),
            "read" => {
                let n = client.mark_read(name).await?;
                printer.print(format!("marked {n} message(s) read"));
            }
            "history" => {
                let n = parts.next().and_then(|s| s.parse().ok()).unwrap_or(20);
                for m in client.history(name, n).await? {
                    printer.print(history_line(&m));
                }
            }
            other => printer.print(format!("unknown command /{other}; /help lists them")),
        }
        return Ok(true);
    }
    match client.send(name, line).await {
        Ok(id) => {
            mine.insert(id.clone());
            printer.print(format!("  (queued {})", &id[id.len().saturating_sub(8)..]));
        }
        Err(e) => printer.print(format!("  not sent: {e}")),
    }
    Ok(true)
}

async fn show_event(
    client: &ApiClient,
    printer: &Printer,
    peer_id: &str,
    name: &str,
    mine: &std::collections::HashSet<String>,
    event: Event,
) {
    match event.kind {
        EventKind::Message {
            peer_id: from,
            text,
            sent_at,
            ..
        } if from == peer_id => {
            printer.print(format!("[{}] {name}: {text}", clock(sent_at)));
            let _ = client.mark_read(name).await;
        }
        EventKind::Receipt {
            id,
            state,
            peer_id: to,
            ..
        } if to == peer_id && mine.contains(&id) => {
            printer.print(format!("  ({} {state})", &id[id.len().saturating_sub(8)..]));
        }
        EventKind::MessageFailed {
            id,
            reason,
            peer_id: to,
            ..
        } if to == peer_id => {
            printer.print(format!(
                "  (message {} failed: {reason})",
                &id[id.len().saturating_sub(8)..]
            ));
        }
        EventKind::Typing {
            peer_id: from,
            typing,
            ..
        } if from == peer_id => {
            if typing {
                printer.print(format!("  {name} is typing…"));
            } else {
                printer.print(format!("  {name} stopped typing"));
            }
        }
        EventKind::PresenceChanged {
            peer_id: p,
            state,
            last_seen,
            ..
        } if p == peer_id => {
            printer.print(format!("  {}", presence_line(name, &state, last_seen)));
        }
        EventKind::PeerConnected { peer_id: p, .. } if p == peer_id => {
            printer.print(format!("  {name} is connected"));
        }
        EventKind::PeerDisconnected { peer_id: p } if p == peer_id => {
            printer.print(format!("  {name} disconnected"));
        }
        _ => {}
    }
}

/// "bob is online", "bob is offline, last seen 5 min ago".
fn presence_line(name: &str, state: &str, last_seen: Option<u64>) -> String {
    match (state, last_seen) {
        ("offline", Some(t)) => format!(
            "{name} is offline, last seen {}",
            crate::msg_cmds::ago(tern_node::events::now_ms(), t)
        ),
        ("unknown", _) => format!("{name}'s presence is not known"),
        (state, _) => format!("{name} is {state}"),
    }
}
