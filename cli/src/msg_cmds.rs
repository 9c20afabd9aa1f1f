//! Messaging commands: `contact …`, `send`, `history`, `conversations`, `read`.

use std::{io::Read as _, time::Duration};

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use tern_node::{
    PeerId,
    api::{
        client::{ApiClient, ClientError},
        codes,
    },
    events::EventKind,
    messaging::{
        HistoryItem,
        contacts::{BlockedPeer, ContactView},
    },
};

use crate::{
    Globals,
    output::{untrusted, untrusted_line},
};

/// `tern contact …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ContactCmd {
    /// Add a contact from their ticket (from `tern id`).
    Add {
        /// The contact's ticket.
        ticket: String,
        /// The name you will use for them.
        #[arg(long)]
        name: String,
    },
    /// List contacts.
    List,
    /// Show a contact and the safety number to compare with them.
    Show {
        /// The contact's name.
        name: String,
    },
    /// Remove a contact (queued messages to them fail; history is kept; a blocked
    /// contact stays blocked).
    Remove {
        /// The contact's name.
        name: String,
    },
    /// Block a contact: nothing from them is accepted, nothing is sent to them.
    Block {
        /// The contact's name.
        name: String,
    },
    /// Unblock a contact, or a blocked contact you removed (by its peer id).
    Unblock {
        /// The contact's name, or the peer id of a blocked contact you removed (see
        /// `tern contact blocked`).
        name: String,
    },
    /// List blocked contacts, and blocked contacts you removed (they stay blocked).
    Blocked,
}

/// What `send --wait` waits for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum WaitFor {
    /// The recipient's node confirmed it.
    Delivered,
    /// The recipient read it.
    Read,
}

async fn connect(g: &Globals) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::connect(&g.dir).await?)
}

fn contact_text(c: &ContactView) -> String {
    let mut s = format!("{}  {}", untrusted_line(&c.name), c.peer_id);
    if c.blocked {
        s.push_str("  [blocked]");
    }
    if c.auto_added {
        s.push_str("  [message request]");
    }
    s
}

/// Runs a `contact` subcommand.
pub(crate) async fn contact(g: &Globals, cmd: ContactCmd) -> anyhow::Result<()> {
    let client = connect(g).await?;
    match cmd {
        ContactCmd::Add { ticket, name } => {
            let c = client.contact_add(&ticket, &name).await?;
            g.out.emit(&c, || {
                format!(
                    "added {}\nsafety number: {}\n(compare it with {} over a channel you trust)",
                    contact_text(&c),
                    c.safety_number,
                    c.name
                )
            })
        }
        ContactCmd::List => {
            let list = client.contact_list().await?;
            g.out.emit(&list, || {
                if list.is_empty() {
                    "no contacts yet; add one with `tern contact add TICKET --name NAME`".into()
                } else {
                    list.iter().map(contact_text).collect::<Vec<_>>().join("\n")
                }
            })
        }
        ContactCmd::Show { name } => {
            let c = client.contact_show(&name).await?;
            g.out.emit(&c, || {
                let mut s = format!(
                    "{}\nsafety number: {}\nannounced name: {}\naddresses:",
                    contact_text(&c),
                    c.safety_number,
                    c.announced_name
                        .as_deref()
                        .map_or("-".into(), untrusted_line)
                );
                for a in &c.addrs {
                    s.push_str(&format!("\n  {a}"));
                }
                s
            })
        }
        ContactCmd::Remove { name } => {
            client.contact_remove(&name).await?;
            g.out
                .emit(&json!({ "removed": name }), || format!("removed {name}"))
        }
        ContactCmd::Block { name } => {
            let c = client.contact_block(&name, true).await?;
            g.out.emit(&c, || format!("blocked {}", c.name))
        }
        ContactCmd::Unblock { name } => {
            // The peer id of a removed blocked contact first: a contact (a message request
            // names itself) could be called by another peer's id.
            let removed = name.parse::<PeerId>().is_ok()
                && client
                    .blocked_list()
                    .await?
                    .iter()
                    .any(|b| !b.contact && b.peer_id == name);
            if removed {
                client.peer_unblock(&name).await?;
                return g.out.emit(&json!({ "unblocked": name }), || {
                    format!("unblocked {name}: its messages come in as a message request again")
                });
            }
            match client.contact_block(&name, false).await {
                Ok(c) => g.out.emit(&c, || format!("unblocked {}", c.name)),
                Err(e) if matches!(&e, ClientError::Rpc { code, .. } if *code == codes::UNKNOWN_CONTACT) =>
                {
                    // A removed blocked contact listed under the name it had announced?
                    let list = client.blocked_list().await?;
                    let named = |b: &&BlockedPeer| !b.contact && b.name.as_deref() == Some(&*name);
                    let ids: Vec<&str> = list
                        .iter()
                        .filter(named)
                        .map(|b| b.peer_id.as_str())
                        .collect();
                    if !ids.is_empty() {
                        anyhow::bail!(
                            "{name:?} is no contact: a peer that called itself so was removed \
                             while blocked; unblock it by its peer id: tern contact unblock {}",
                            ids.join(" (or) ")
                        )
                    }
                    if name.parse::<PeerId>().is_ok() {
                        anyhow::bail!(
                            "no contact is called {name:?}, and no removed contact with that \
                             peer id is blocked; see `tern contact blocked`"
                        )
                    }
                    Err(e.into())
                }
                Err(e) => Err(e.into()),
            }
        }
        ContactCmd::Blocked => {
            let list = client.blocked_list().await?;
            g.out.emit(&list, || {
                if list.is_empty() {
                    return "no one is blocked".into();
                }
                list.iter()
                    .map(|b| match (&b.name, b.contact) {
                        (Some(n), true) => format!("{}  {}", untrusted_line(n), b.peer_id),
                        (name, _) => format!(
                            "{}  [removed{}]",
                            b.peer_id,
                            name.as_deref()
                                .map(|n| format!(", called itself {}", untrusted_line(n)))
                                .unwrap_or_default()
                        ),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

/// `tern send NAME TEXT|- [--wait delivered|read] [--timeout SECS]`.
pub(crate) async fn send(
    g: &Globals,
    to: &str,
    text: &str,
    wait: Option<WaitFor>,
    timeout: u64,
) -> anyhow::Result<()> {
    let text = if text == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the message from stdin")?;
        s.strip_suffix('\n').unwrap_or(&s).to_string()
    } else {
        text.to_string()
    };
    let client = connect(g).await?;
    // Subscribe before sending so no receipt can slip by.
    let mut sub = match wait {
        Some(_) => Some(client.events(None).await?),
        None => None,
    };
    let id = client.send(to, &text).await?;
    if let (Some(want), Some(sub)) = (wait, sub.as_mut()) {
        let target = match want {
            WaitFor::Delivered => ["delivered", "read"].as_slice(),
            WaitFor::Read => ["read"].as_slice(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        // The newest state a receipt reported, for the message if time runs out.
        let mut reached: Option<String> = None;
        loop {
            let event = match tokio::time::timeout_at(deadline, sub.next()).await {
                Err(_) => break,
                Ok(None) => anyhow::bail!("the daemon closed the event stream"),
                Ok(Some(e)) => e?,
            };
            match event.kind {
                EventKind::Receipt { id: rid, state, .. } if rid == id => {
                    if target.contains(&state.as_str()) {
                        reached = Some(state);
                        break;
                    }
                    reached = Some(state);
                }
                EventKind::MessageFailed {
                    id: fid, reason, ..
                } if fid == id => {
                    anyhow::bail!("message {id} failed: {}", untrusted_line(&reason))
                }
                _ => {}
            }
        }
        // Time is up (or the target was seen): the history has the last word, since a
        // receipt may have come just before the subscription saw it (`--timeout 0`).
        let item = client
            .history(to, 100)
            .await
            .ok()
            .and_then(|h| h.into_iter().find(|m| m.id == id));
        let error = item.as_ref().and_then(|m| m.error.clone());
        let state = item.map(|m| m.state).or(reached);
        if !state.as_deref().is_some_and(|s| target.contains(&s)) {
            let what = match state.as_deref() {
                Some("delivered") => format!(
                    "it was delivered; it becomes read when {} reads it",
                    untrusted_line(to)
                ),
                Some("stored") => "a relay holds it until the recipient comes online".to_string(),
                Some("sent") => {
                    "the recipient's node has it; no delivery receipt has come yet".to_string()
                }
                Some("failed") => match error {
                    Some(why) => format!("it failed: {}", untrusted_line(&why)),
                    None => "it failed".to_string(),
                },
                _ => "it stays queued and will be retried".to_string(),
            };
            anyhow::bail!("message {id} not {} within {timeout} s; {what}", target[0]);
        }
    }
    g.out.emit(&json!({ "id": id }), || match wait {
        None => format!("queued {id}"),
        Some(WaitFor::Delivered) => format!("delivered {id}"),
        Some(WaitFor::Read) => format!("read {id}"),
    })
}

/// A message's time in the local time zone: `HH:MM:SS` if it is today, else
/// `YYYY-MM-DD HH:MM:SS`.
pub(crate) fn clock(ms: u64) -> String {
    use chrono::{Local, TimeZone as _};
    // The sender's clock says when: anything past the year 9999 is shown as it came
    // (chrono cannot shift times near its own limit into a local zone).
    const LAST: u64 = 253_402_300_799_999;
    let Some(at) = i64::try_from(ms)
        .ok()
        .filter(|_| ms <= LAST)
        .and_then(|ms| Local.timestamp_millis_opt(ms).single())
    else {
        return format!("{ms} ms");
    };
    clock_at(at, Local::now())
}

/// [`clock`] of `at`, seen at `now`.
fn clock_at<Tz: chrono::TimeZone>(at: chrono::DateTime<Tz>, now: chrono::DateTime<Tz>) -> String
where
    Tz::Offset: std::fmt::Display,
{
    if at.date_naive() == now.date_naive() {
        at.format("%H:%M:%S").to_string()
    } else {
        at.format("%Y-%m-%d %H:%M:%S").to_string()
    }
}

/// One history line.
pub(crate) fn history_line(m: &HistoryItem) -> String {
    let head = format!("[{}] {}: ", clock(m.timestamp), untrusted_line(&m.from));
    let indent = head.chars().count();
    let mut line = head + &untrusted(&m.text, indent);
    if m.from == "me" {
        line.push_str(&format!("  ({})", m.state));
        if let Some(e) = &m.error {
            line.push_str(&format!(" {e}"));
        }
    }
    line
}

/// `tern history NAME [--limit N]`.
pub(crate) async fn history(g: &Globals, with: &str, limit: usize) -> anyhow::Result<()> {
    let client = connect(g).await?;
    let items = client.history(with, limit).await?;
    let request = !g.out.json && client.contact_show(with).await?.auto_added;
    g.out.emit(&items, || {
        let mut out = Vec::new();
        if request {
            out.push(format!(
                "({} is a message request: a stranger wrote first and chose that name; \
                 compare safety numbers before you trust it)",
                untrusted_line(with)
            ));
        }
        if items.is_empty() {
            out.push(format!("no messages with {} yet", untrusted_line(with)));
        }
        out.extend(items.iter().map(history_line));
        out.join("\n")
    })
}

/// `tern conversations`.
pub(crate) async fn conversations(g: &Globals) -> anyhow::Result<()> {
    let list = connect(g).await?.conversations().await?;
    g.out.emit(&list, || {
        if list.is_empty() {
            return "no conversations yet".into();
        }
        list.iter()
            .map(|c| {
                let last = c
                    .last
                    .as_ref()
                    .map(|m| {
                        format!(
                            "  {}: {}",
                            untrusted_line(&m.from),
                            untrusted_line(&m.text.chars().take(60).collect::<String>())
                        )
                    })
                    .unwrap_or_default();
                let mut unread = if c.unread > 0 {
                    format!(" [{} unread]", c.unread)
                } else {
                    String::new()
                };
                if c.request {
                    unread.push_str(" [message request]");
                }
                if c.blocked {
                    unread.push_str(" [blocked]");
                }
                format!("{}{unread}{last}", untrusted_line(&c.name))
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `tern read NAME`: mark a conversation read.
pub(crate) async fn read(g: &Globals, with: &str) -> anyhow::Result<()> {
    let n = connect(g).await?.mark_read(with).await?;
    g.out.emit(&json!({ "count": n }), || {
        format!("marked {n} message(s) read")
    })
}

/// `presence [NAME] [--set STATE]`.
pub(crate) async fn presence(
    g: &Globals,
    name: Option<&str>,
    set: Option<String>,
) -> anyhow::Result<()> {
    let client = connect(g).await?;
    if let Some(state) = set {
        client.set_presence(&state).await?;
        return g.out.emit(&json!({ "state": state }), || {
            format!("you now show as {state}")
        });
    }
    let list = client.presence(name).await?;
    let now = tern_node::events::now_ms();
    let line = |p: &tern_node::presence::PresenceView| match (p.state.as_str(), p.last_seen) {
        ("online" | "away", _) => format!("{}: {}", p.name, p.state),
        (state, Some(t)) => format!("{}: {state}, last seen {}", p.name, ago(now, t)),
        (state, None) => format!("{}: {state}", p.name),
    };
    match (name, list.first()) {
        (Some(_), Some(one)) => g.out.emit(one, || line(one)),
        _ => g.out.emit(&list, || {
            if list.is_empty() {
                return "no contacts yet".into();
            }
            list.iter().map(line).collect::<Vec<_>>().join("\n")
        }),
    }
}

/// "12 s ago", "5 min ago", "3 h ago", "2 days ago".
pub(crate) fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{FixedOffset, TimeZone as _};

    use super::clock_at;

    #[test]
    fn a_time_of_today_shows_the_clock_and_an_older_one_its_date() {
        let tz = FixedOffset::east_opt(3600).unwrap();
        let now = tz.with_ymd_and_hms(2026, 11, 29, 10, 0, 0).unwrap();
        let today = tz.with_ymd_and_hms(2026, 11, 29, 0, 30, 5).unwrap();
        let yesterday = tz.with_ymd_and_hms(2026, 11, 28, 23, 59, 59).unwrap();
        assert_eq!(clock_at(today, now), "00:30:05");
        assert_eq!(clock_at(yesterday, now), "2026-11-28 23:59:59");
    }

    #[test]
    fn any_time_a_sender_claims_is_shown_without_a_panic() {
        for ms in [
            0,
            1,
            253_402_300_799_999,
            253_402_300_800_000,
            8_210_298_412_000_000,
            u64::MAX,
        ] {
            assert!(!super::clock(ms).is_empty());
        }
        assert_eq!(super::clock(u64::MAX), format!("{} ms", u64::MAX));
    }
}
