//! How commands print: exactly one JSON value on stdout with `--json`, friendly text
//! otherwise; errors as one line on stderr.

use serde::Serialize;

/// The output mode chosen on the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    /// `--json` was given.
    pub(crate) json: bool,
}

impl Output {
    /// Prints `value` as JSON, or `human` as text.
    pub(crate) fn emit<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            print(&serde_json::to_string(value)?);
        } else {
            let text = human();
            if !text.is_empty() {
                print(&text);
            }
        }
        Ok(())
    }
}

/// Prints `text` and a line break on stdout. If the reader closed it (`tern events | head`),
/// it wants no more: the process ends quietly with success, as `head`'s other writers do
/// (Rust turns SIGPIPE off, so `println!` would panic instead). Any other failure to write
/// (a full disk under a redirection) ends it with an error, exit code 1.
pub(crate) fn print(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// An error chain as one line: "outer: inner: root".
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if parts.last().is_none_or(|last| !last.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Whether `c` may reorder or hide what a terminal shows: bidirectional controls and
/// invisible formatting characters (not control characters, so checked apart).
fn is_deceptive(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Text someone else wrote (a message, an announced name), made safe to print: control
/// characters (escape sequences, carriage returns, ...) and the characters of
/// [`is_deceptive`] become visible `\u{..}` escapes, so nothing a peer sends can recolour
/// the terminal, move its cursor or reorder a line. Line breaks are kept, each followed by
/// `indent` spaces, so a message's own lines never start where a line of the tool does.
pub(crate) fn untrusted(text: &str, indent: usize) -> String {
    escape(text, Some(indent))
}

/// [`untrusted`] on one line: line breaks shown as `\u{a}` too (names, previews).
pub(crate) fn untrusted_line(text: &str) -> String {
    escape(text, None)
}

fn escape(text: &str, indent: Option<usize>) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match (c, indent) {
            ('\n', Some(indent)) => {
                out.push('\n');
                out.extend(std::iter::repeat_n(' ', indent));
            }
            ('\t', _) => out.push(c),
            (c, _) if c.is_control() || is_deceptive(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            (c, _) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_overrides_become_visible() {
        assert_eq!(untrusted("a\x1b[31mb\r", 0), "a\\u{1b}[31mb\\u{d}");
        assert_eq!(untrusted("x\u{202e}y\u{200b}", 0), "x\\u{202e}y\\u{200b}");
        assert_eq!(untrusted("héllo\tçava 👋", 0), "héllo\tçava 👋");
    }

    #[test]
    fn a_message_cannot_start_a_line_of_its_own() {
        let forged = "hi\n[07:40:00] me: I owe you  (read)";
        assert_eq!(
            untrusted(forged, 4),
            "hi\n    [07:40:00] me: I owe you  (read)"
        );
        assert_eq!(
            untrusted_line(forged),
            "hi\\u{a}[07:40:00] me: I owe you  (read)"
        );
        assert_eq!(untrusted_line("a\u{0}b"), "a\\u{0}b");
    }
}
