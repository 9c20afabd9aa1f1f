//! `tern chat NAME`: an interactive conversation with one contact.
//!
//! Shows recent history, then incoming messages live with their receipts and the contact's
//! typing state; every line typed is sent. On a terminal it uses a line editor (reedline)
//! that keeps the input line intact while messages are printed above it, and tells the
//! contact while we type ([`TypingSignal`]); with a pipe it reads lines from stdin and
//! prints plainly, so scripts and tests can drive it. Messages shown are marked read (read
//! receipts go back to the sender).

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use tern_node::{
    api::client::ApiClient,
    events::{Event, EventKind},
};
use tokio::sync::mpsc;

use crate::{
    Globals,
    msg_cmds::{clock, history_line},
    output::{print, untrusted, untrusted_line},
};

const HELP: &str = "commands: /history [N]  show the last N messages (default 20)\n          /read         mark the conversation read\n          /help         this help\n          /quit         leave (Ctrl-D works too)\n          //text        send a line that starts with /";

/// Prints lines above the prompt (terminal) or plainly (pipe).
#[derive(Clone)]
enum Printer {
    Editor(std::sync::mpsc::SyncSender<String>),
    Plain,
}

impl Printer {
    fn print(&self, line: String) {
        match self {
            // The editor takes lines from its queue only while it reads one; when the queue
            // is full (a long `/history` while pasted lines wait to be handled), print
            // directly instead of waiting: that may disturb the input line, never hang.
            Printer::Editor(p) => match p.try_send(line) {
                Ok(()) => {}
                Err(
                    std::sync::mpsc::TrySendError::Full(line)
                    | std::sync::mpsc::TrySendError::Disconnected(line),
                ) => print(&line),
            },
            Printer::Plain => print(&line),
        }
    }
}

/// The input side of a chat: lines arrive on `lines`, and (on a terminal) the line being
/// edited on `edits` whenever it changes. The reader stops by itself after a quit command
/// (so the line editor does not take the terminal into raw mode again for a line nobody
/// will read) and at the end of input.
struct Input {
    lines: mpsc::Receiver<Line>,
    edits: mpsc::UnboundedReceiver<String>,
    printer: Printer,
}

/// How long after the last keystroke we stop saying we type.
const TYPING_IDLE: Duration = Duration::from_secs(5);

/// When to tell the contact that we type or stopped (I/O-free; times are inputs): typing
/// while the line being edited holds text that is not a chat command, until it is sent,
/// emptied, or left alone for [`TYPING_IDLE`]. Only changes are reported.
#[derive(Debug, Default)]
struct TypingSignal {
    typing: bool,
    line: String,
    last_edit: Option<Instant>,
}

impl TypingSignal {
    /// The line being edited is now `line`.
    fn edited(&mut self, now: Instant, line: &str) -> Option<bool> {
        if line == self.line {
            // A repaint (a message printed above it, a cursor move): no keystroke.
            return None;
        }
        self.line = line.to_string();
        self.last_edit = Some(now);
        let trimmed = line.trim_start();
        let command = trimmed.starts_with('/') && !trimmed.starts_with("//");
        self.set(!trimmed.is_empty() && !command)
    }

    /// Time passed: stops after [`TYPING_IDLE`] without a keystroke.
    fn tick(&mut self, now: Instant) -> Option<bool> {
        let idle = self
            .last_edit
            .is_some_and(|at| now.duration_since(at) >= TYPING_IDLE);
        if self.typing && idle {
            return self.set(false);
        }
        None
    }

    /// A line was entered (sent or a command): the editor starts an empty one.
    fn entered(&mut self) -> Option<bool> {
        self.line.clear();
        self.set(false)
    }

    fn set(&mut self, typing: bool) -> Option<bool> {
        (typing != self.typing).then(|| {
            self.typing = typing;
            typing
        })
    }
}

/// Hands the editor's current line to the chat whenever reedline repaints it (it asks its
/// highlighter on every change), and shows the line unstyled.
struct EditWatch(mpsc::UnboundedSender<String>);

impl reedline::Highlighter for EditWatch {
    fn highlight(&self, line: &str, _cursor: usize) -> reedline::StyledText {
        let _ = self.0.send(line.to_string());
        reedline::StyledText {
            buffer: vec![(Default::default(), line.to_string())],
        }
    }
}

enum Line {
    Text(String),
    Eof,
}

/// Whether `line` is one of the chat's quit commands.
fn is_quit(line: &str) -> bool {
    matches!(
        line.split_whitespace().next(),
        Some("/quit" | "/exit" | "/q")
    )
}

impl Drop for Input {
    fn drop(&mut self) {
        // The chat may end while the editor reads a line (the daemon stopped): give the
        // terminal back its line mode and echo, which the editor turned off for that line.
        if matches!(self.printer, Printer::Editor(_)) {
            let _ = crossterm::terminal::disable_raw_mode();
            let _ = std::io::Write::write_all(&mut std::io::stdout(), b"\n");
        }
    }
}

/// Starts reading lines; with `watch_edits`, the line being edited is reported too (for the
/// typing indicator; not for a blocked contact, who is never told).
fn spawn_input(name: String, watch_edits: bool) -> Input {
    let (tx, lines) = mpsc::channel(16);
    let (edit_tx, edits) = mpsc::unbounded_channel();
    // Reads lines until a quit command, the end of input, or the chat is gone. (It must
    // not wait for the chat between lines: the editor's printer is only drained while it
    // reads a line, and the chat may print more than its buffer holds.)
    let read = move |mut read_line: Box<dyn FnMut() -> Line + Send>| {
        std::thread::spawn(move || {
            loop {
                let line = read_line();
                let last = match &line {
                    Line::Eof => true,
                    Line::Text(t) => is_quit(t),
                };
                if tx.blocking_send(line).is_err() || last {
                    break;
                }
            }
        });
    };
    let printer = if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let editor_printer = reedline::ExternalPrinter::<String>::default();
        let printer = editor_printer.sender();
        let mut editor = reedline::Reedline::create().with_external_printer(editor_printer);
        if watch_edits {
            editor = editor.with_highlighter(Box::new(EditWatch(edit_tx)));
        }
        let prompt = reedline::DefaultPrompt::new(
            reedline::DefaultPromptSegment::Basic(format!("to {name}")),
            reedline::DefaultPromptSegment::Empty,
        );
        read(Box::new(move || match editor.read_line(&prompt) {
            Ok(reedline::Signal::Success(line)) => Line::Text(line),
            _ => Line::Eof,
        }));
        Printer::Editor(printer)
    } else {
        let stdin = std::io::stdin();
        read(Box::new(move || {
            let mut line = String::new();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => Line::Eof,
                Ok(_) => Line::Text(line.trim_end_matches(['\n', '\r']).to_string()),
            }
        }));
        drop(edit_tx);
        Printer::Plain
    };
    Input {
        lines,
        edits,
        printer,
    }
}

/// Runs the chat until `/quit`, end of input or Ctrl-C.
pub(crate) async fn run(g: &Globals, name: &str) -> anyhow::Result<()> {
    let client = ApiClient::connect(&g.dir).await?;
    let contact = client.contact_show(name).await?;
    let mut events = client.events(None).await?;
    print(&format!(
        "chat with {} ({}); safety number {}\n{HELP}",
        contact.name, contact.peer_id, contact.safety_number
    ));
    for m in client.history(name, 20).await? {
        print(&history_line(&m));
    }
    if contact.auto_added {
        print(&format!(
            "  {} is a message request: they wrote to you, you have not added them; the name \
             is the one they chose. Compare the safety number with them before you trust it.",
            contact.name
        ));
    }
    if contact.blocked {
        print(&format!(
            "  {} is blocked: nothing from them is shown, and they see no presence",
            contact.name
        ));
    } else if let Some(p) = client.presence(Some(&contact.name)).await?.first() {
        print(&format!(
            "  {}",
            presence_line(&p.name, &p.state, p.last_seen)
        ));
    }
    client.mark_read(name).await?;

    let mut input = spawn_input(contact.name.clone(), !contact.blocked);
    let printer = input.printer.clone();
    let mut mine = std::collections::HashSet::new();
    let mut typing = TypingSignal::default();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One Ctrl-C listener for the whole chat: one made anew on each pass would miss a
    // signal that arrives while a branch runs.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            // Edits first, so a line's own edits are taken before it (the rest, sent just
            // before it, are dropped when it is handled).
            biased;
            _ = &mut ctrl_c => break,
            Some(line) = input.edits.recv() => {
                tell(&client, &contact.name, typing.edited(Instant::now(), &line)).await;
            }
            line = input.lines.recv() => match line {
                None | Some(Line::Eof) => break,
                Some(Line::Text(line)) => {
                    // The editor's last edit of this line was sent before it: drop it, so
                    // it cannot say "typing" again after the line.
                    while input.edits.try_recv().is_ok() {}
                    tell(&client, &contact.name, typing.entered()).await;
                    if !handle_line(&client, &printer, &contact.name, &line, &mut mine).await {
                        break;
                    }
                }
            },
            _ = ticks.tick() => tell(&client, &contact.name, typing.tick(Instant::now())).await,
            event = events.next() => match event {
                None => anyhow::bail!("the daemon closed the event stream (it stopped?)"),
                Some(Err(e)) => anyhow::bail!("bad event from the daemon: {e}"),
                Some(Ok(event)) => show_event(&client, &printer, &contact.peer_id, &contact.name, &mine, event).await,
            },
        }
    }
    tell(&client, &contact.name, typing.entered()).await;
    Ok(())
}

/// Tells `name` that we type or stopped, if that changed. Typing goes out only while the
/// contact is connected; a failure just means nobody hears it.
async fn tell(client: &ApiClient, name: &str, change: Option<bool>) {
    if let Some(typing) = change {
        let _ = client.typing(name, typing).await;
    }
}

/// Handles one typed line; returns false to quit. A failed command is reported in the chat,
/// which goes on.
async fn handle_line(
    client: &ApiClient,
    printer: &Printer,
    name: &str,
    line: &str,
    mine: &mut std::collections::HashSet<String>,
) -> bool {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return true;
    }
    // `//text` sends `/text`.
    let text = match trimmed.strip_prefix('/') {
        Some(escaped) if escaped.starts_with('/') => &line[line.find('/').map_or(0, |i| i + 1)..],
        Some(cmd) => {
            let mut parts = cmd.split_whitespace();
            if is_quit(trimmed) {
                return false;
            }
            let done = match parts.next().unwrap_or("") {
                "help" => {
                    printer.print(HELP.to_string());
                    Ok(())
                }
                "read" => client
                    .mark_read(name)
                    .await
                    .map(|n| printer.print(format!("marked {n} message(s) read"))),
                "history" => {
                    let n = parts.next().and_then(|s| s.parse().ok()).unwrap_or(20);
                    client.history(name, n).await.map(|items| {
                        for m in items {
                            printer.print(history_line(&m));
                        }
                    })
                }
                other => {
                    printer.print(format!("unknown command /{other}; /help lists them"));
                    Ok(())
                }
            };
            if let Err(e) = done {
                printer.print(format!("  failed: {e}"));
            }
            return true;
        }
        None => line,
    };
    match client.send(name, text).await {
        Ok(id) => {
            mine.insert(id.clone());
            printer.print(format!("  (queued {})", &id[id.len().saturating_sub(8)..]));
        }
        Err(e) => printer.print(format!("  not sent: {e}")),
    }
    true
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
            let head = format!("[{}] {}: ", clock(sent_at), untrusted_line(name));
            let indent = head.chars().count();
            printer.print(head + &untrusted(&text, indent));
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{TYPING_IDLE, TypingSignal, is_quit};

    #[test]
    fn typing_is_told_on_changes_only_and_stops_when_sent_emptied_or_idle() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = TypingSignal::default();
        assert_eq!(s.edited(at(0), "h"), Some(true));
        assert_eq!(s.edited(at(100), "hi"), None, "still typing: nothing new");
        assert_eq!(s.edited(at(200), "hi"), None, "a repaint is no keystroke");
        assert_eq!(s.entered(), Some(false), "sent");
        assert_eq!(s.edited(at(300), ""), None, "the editor's new empty line");
        // A command is not a message being written; `//` is.
        assert_eq!(s.edited(at(400), "/hist"), None);
        assert_eq!(s.edited(at(500), "//slash"), Some(true));
        assert_eq!(s.edited(at(600), ""), Some(false), "emptied");
        // Idle: stops after TYPING_IDLE without a keystroke, once; a keystroke resumes.
        assert_eq!(s.edited(at(1_000), "x"), Some(true));
        let idle = TYPING_IDLE.as_millis() as u64;
        assert_eq!(s.tick(at(1_000 + idle - 1)), None);
        assert_eq!(s.tick(at(1_000 + idle)), Some(false));
        assert_eq!(s.tick(at(1_000 + 2 * idle)), None);
        assert_eq!(s.edited(at(1_000 + 2 * idle), "xy"), Some(true));
        assert_eq!(s.entered(), Some(false));
        assert_eq!(s.entered(), None, "told once");
    }

    #[test]
    fn quit_commands_are_recognised_by_their_first_word() {
        for q in ["/quit", " /quit ", "/exit", "/q", "/quit now"] {
            assert!(is_quit(q), "{q}");
        }
        for other in ["quit", "/quitting", "//quit", "/history", ""] {
            assert!(!is_quit(other), "{other}");
        }
    }
}
