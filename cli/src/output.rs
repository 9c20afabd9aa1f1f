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
            println!("{}", serde_json::to_string(value)?);
        } else {
            let text = human();
            if !text.is_empty() {
                println!("{text}");
            }
        }
        Ok(())
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
