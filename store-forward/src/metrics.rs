//! The relay's counters and gauges, and their Prometheus text exposition (format 0.0.4).
//!
//! Counters only grow while the process runs (they restart at zero); gauges are read from
//! the mailbox index when [`crate::MailboxServer::metrics`] is called. Every name starts
//! with `tern_relay_`; rejections are one counter with a `reason` label per
//! [`ErrorCode`], all present from the start so that rates work without gaps.

use std::{collections::BTreeMap, fmt::Write};

use crate::wire::ErrorCode;

/// A snapshot of the relay's metrics.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    /// Requests handled (decodable or not).
    pub requests: u64,
    /// Successful `Register` requests.
    pub registrations: u64,
    /// Envelopes stored by `Deposit` (duplicates excluded).
    pub deposits: u64,
    /// `Deposit`s of an id already stored (acknowledged, not stored again).
    pub duplicates: u64,
    /// Successful `Fetch` requests.
    pub fetches: u64,
    /// Envelopes returned by fetches.
    pub fetched_envelopes: u64,
    /// Successful `Ack` requests.
    pub acks: u64,
    /// Envelopes deleted by acks.
    pub acked_envelopes: u64,
    /// Envelopes deleted because they expired: their TTL ran out, or their mailbox was
    /// deleted as idle.
    pub expired_envelopes: u64,
    /// Mailboxes deleted because their owner had not registered for `mailbox_idle_secs`.
    pub expired_mailboxes: u64,
    /// Prekeys accepted by `PublishPrekeys`.
    pub prekeys_published: u64,
    /// Prekeys handed out by `ClaimPrekey`.
    pub prekeys_claimed: u64,
    /// Group-commit flushes that failed (their replies became `Unavailable`).
    pub flush_failures: u64,
    /// Refused requests by reason (every code present).
    pub rejections: BTreeMap<ErrorCode, u64>,
    /// Gauge: envelopes stored now.
    pub envelopes_stored: u64,
    /// Gauge: envelope bytes stored now.
    pub bytes_stored: u64,
    /// Gauge: mailboxes.
    pub mailboxes: u64,
    /// Gauge: one-time prekeys stored.
    pub prekeys_stored: u64,
    /// Gauge: whether new mailboxes are accepted.
    pub accepting_registrations: bool,
}

/// A gauge the caller adds to the exposition (connections, uptime, free disk, ...).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauge<'a> {
    /// Metric name; characters outside `[a-zA-Z0-9_:]` are replaced by `_`.
    pub name: &'a str,
    /// One-line description.
    pub help: &'a str,
    /// Current value.
    pub value: f64,
}

fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

impl Metrics {
    /// The Prometheus text exposition of these metrics plus `extra_gauges`.
    pub fn render_prometheus(&self, extra_gauges: &[Gauge<'_>]) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            // Writing into a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        let counters: [(&str, &str, u64); 13] = [
            (
                "tern_relay_requests_total",
                "Mailbox requests handled.",
                self.requests,
            ),
            (
                "tern_relay_registrations_total",
                "Successful mailbox registrations.",
                self.registrations,
            ),
            (
                "tern_relay_deposits_total",
                "Envelopes stored (duplicates excluded).",
                self.deposits,
            ),
            (
                "tern_relay_duplicate_deposits_total",
                "Deposits of an id already stored.",
                self.duplicates,
            ),
            (
                "tern_relay_fetches_total",
                "Successful fetch requests.",
                self.fetches,
            ),
            (
                "tern_relay_fetched_envelopes_total",
                "Envelopes returned by fetches.",
                self.fetched_envelopes,
            ),
            (
                "tern_relay_acks_total",
                "Successful ack requests.",
                self.acks,
            ),
            (
                "tern_relay_acked_envelopes_total",
                "Envelopes deleted by acks.",
                self.acked_envelopes,
            ),
            (
                "tern_relay_expired_envelopes_total",
                "Envelopes deleted because they or their idle mailbox expired.",
                self.expired_envelopes,
            ),
            (
                "tern_relay_expired_mailboxes_total",
                "Mailboxes deleted because their owner stopped registering.",
                self.expired_mailboxes,
            ),
            (
                "tern_relay_prekeys_published_total",
                "One-time prekeys accepted.",
                self.prekeys_published,
            ),
            (
                "tern_relay_prekeys_claimed_total",
                "One-time prekeys handed out.",
                self.prekeys_claimed,
            ),
            (
                "tern_relay_flush_failures_total",
                "Group-commit flushes that failed.",
                self.flush_failures,
            ),
        ];
        for (name, help, v) in counters {
            family(name, "counter", help, &one(v));
        }
        let rejections: Vec<(String, String)> = ErrorCode::ALL
            .iter()
            .map(|c| {
                (
                    format!("{{reason=\"{}\"}}", c.as_str()),
                    self.rejections.get(c).copied().unwrap_or(0).to_string(),
                )
            })
            .collect();
        family(
            "tern_relay_rejections_total",
            "counter",
            "Refused mailbox requests by reason.",
            &rejections,
        );
        let gauges: [(&str, &str, u64); 5] = [
            (
                "tern_relay_envelopes_stored",
                "Envelopes stored now.",
                self.envelopes_stored,
            ),
            (
                "tern_relay_stored_bytes",
                "Envelope bytes stored now.",
                self.bytes_stored,
            ),
            (
                "tern_relay_mailboxes",
                "Registered mailboxes.",
                self.mailboxes,
            ),
            (
                "tern_relay_prekeys_stored",
                "One-time prekeys stored now.",
                self.prekeys_stored,
            ),
            (
                "tern_relay_accepting_registrations",
                "1 if new mailboxes are accepted, else 0.",
                u64::from(self.accepting_registrations),
            ),
        ];
        for (name, help, v) in gauges {
            family(name, "gauge", help, &one(v));
        }
        for g in extra_gauges {
            family(
                &sanitize_name(g.name),
                "gauge",
                g.help,
                &[(String::new(), format_value(g.value))],
            );
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A strict reader of the text format: every sample belongs to a family announced by
    /// `# HELP` and `# TYPE` lines before it, names and labels are well formed, values parse,
    /// and no family appears twice.
    pub(crate) fn check_exposition(text: &str) -> Result<usize, String> {
        let valid_name = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut seen = HashSet::new();
        let (mut help, mut typed) = (None::<String>, None::<String>);
        let mut samples = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or("");
                if !valid_name(name) || !seen.insert(name.to_string()) {
                    return Err(format!("bad or repeated family: {line}"));
                }
                help = Some(name.into());
                typed = None;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (parts.next(), parts.next());
                if name != help.as_deref() || !matches!(kind, Some("counter" | "gauge")) {
                    return Err(format!("TYPE without HELP: {line}"));
                }
                typed = name.map(String::from);
            } else {
                let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
                let name = series.split('{').next().unwrap_or("");
                if Some(name) != typed.as_deref() {
                    return Err(format!("sample outside its family: {line}"));
                }
                if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                    let inner = labels
                        .strip_prefix('{')
                        .and_then(|l| l.strip_suffix('}'))
                        .ok_or(format!("bad labels: {line}"))?;
                    for pair in inner.split(',') {
                        let (k, v) = pair.split_once('=').ok_or(format!("bad label: {line}"))?;
                        if !(valid_name(k) && v.starts_with('"') && v.ends_with('"')) {
                            return Err(format!("bad label: {line}"));
                        }
                    }
                }
                if !matches!(value, "NaN" | "+Inf" | "-Inf") && value.parse::<f64>().is_err() {
                    return Err(format!("bad value: {line}"));
                }
                samples += 1;
            }
        }
        Ok(samples)
    }

    #[test]
    fn exposition_is_valid_and_complete() {
        let mut m = Metrics {
            deposits: 7,
            expired_mailboxes: 2,
            bytes_stored: 1234,
            accepting_registrations: true,
            ..Metrics::default()
        };
        m.rejections.insert(ErrorCode::Quota, 3);
        let text = m.render_prometheus(&[
            Gauge {
                name: "tern_relay_connections",
                help: "Open connections.",
                value: 5.0,
            },
            Gauge {
                name: "bad name-2",
                help: "multi\nline \\ help",
                value: f64::INFINITY,
            },
        ]);
        let samples = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(samples, 13 + ErrorCode::ALL.len() + 5 + 2);
        assert!(text.contains("tern_relay_deposits_total 7\n"), "{text}");
        assert!(
            text.contains(
                "# TYPE tern_relay_expired_mailboxes_total counter\ntern_relay_expired_mailboxes_total 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("tern_relay_rejections_total{reason=\"quota\"} 3\n"));
        assert!(text.contains("tern_relay_rejections_total{reason=\"disk_full\"} 0\n"));
        assert!(text.contains("tern_relay_stored_bytes 1234\n"));
        assert!(text.contains("tern_relay_accepting_registrations 1\n"));
        assert!(text.contains("tern_relay_connections 5\n"));
        assert!(text.contains("bad_name_2 +Inf\n"));
        assert!(text.contains("# HELP bad_name_2 multi\\nline \\\\ help\n"));
    }

    #[test]
    fn the_checker_rejects_broken_text() {
        assert!(check_exposition("x 1\n").is_err(), "no family");
        assert!(check_exposition("# HELP a b\n# TYPE a counter\na one\n").is_err());
        assert!(check_exposition("# HELP a b\n# TYPE a counter\na{r=x} 1\n").is_err());
        assert!(
            check_exposition("# HELP a b\n# TYPE a counter\n# HELP a b\n# TYPE a counter\n")
                .is_err()
        );
        assert_eq!(
            check_exposition("# HELP a b\n# TYPE a gauge\na{r=\"x\"} 1.5\n"),
            Ok(1)
        );
    }
}
