//! Node configuration: `<data-dir>/config.toml`, its documented defaults, and the
//! command-line overrides that win over it.
//!
//! Precedence, highest first: command-line flags ([`Overrides`]), `config.toml`, the
//! defaults below. Unknown keys in `config.toml` are an error, never silently ignored, so a
//! typo cannot quietly turn a setting off.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong, with line and column where known.
        message: String,
    },
    /// The file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The settings of one node, as stored in `config.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Your display name, shown to contacts. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Addresses the node listens on for peers.
    /// Default: every interface, an OS-chosen TCP port and an OS-chosen QUIC port.
    pub listen: Vec<Multiaddr>,
    /// Relay / bootstrap nodes to connect to at start, each ending in `/p2p/<peer id>`.
    /// Default: none.
    pub relays: Vec<Multiaddr>,
    /// Seconds between two syncs with each home relay while connected (register, which keeps
    /// the mailbox from expiring at the relay, then fetch). Syncs also run on every new
    /// connection to a relay and on its notices. Default: 86400 (a day).
    pub relay_sync_secs: u64,
    /// Whether to discover peers on the local network with mDNS. Default: `true`.
    pub mdns: bool,
    /// Where the local JSON-RPC API listens. Must be a loopback address.
    /// Default: `127.0.0.1:0` (port chosen by the OS, published in `api.json`).
    pub api_bind: SocketAddr,
    /// Most simultaneously established peer connections. Default: 256.
    pub max_connections: u32,
    /// Most established connections to one peer. Default: 4.
    pub max_connections_per_peer: u32,
    /// Seconds an idle connection stays open. Default: 60.
    pub idle_timeout_secs: u64,
    /// Seconds an accepted message may wait for delivery before it fails. Default: 604800
    /// (7 days); at most 30 days (recipients remember ids for 60 days to deduplicate).
    pub message_ttl_secs: u64,
    /// Inbound envelopes per second accepted from one peer. Default: 20000.
    pub inbound_rate: u32,
    /// Inbound envelope burst accepted from one peer. Default: 40000.
    pub inbound_burst: u32,
    /// Most message requests (conversations strangers started, not yet accepted, blocked
    /// or removed) kept at once; beyond it strangers are refused until some are handled.
    /// 0: only contacts can write to you. Default: 1000.
    pub max_message_requests: u32,
    /// Free disk space (MiB) kept in reserve: below it the node refuses writes (sends fail
    /// with a clear error, inbound envelopes wait at their senders). Default: 64.
    pub min_free_disk_mb: u64,
    /// Presence (online, away, last seen) settings: the `[presence]` table.
    pub presence: PresenceConfig,
}

/// Who sees our presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharePresence {
    /// Our contacts (the people we added, not message requests or blocked ones).
    Contacts,
    /// No one: nothing is published, and, as in WhatsApp, we see no one's last seen either.
    Nobody,
}

/// The `[presence]` table of `config.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Who sees our presence: `"contacts"` or `"nobody"`. Default: `"contacts"`.
    pub share: SharePresence,
    /// Milliseconds between presence heartbeats. Default: 30000; at least 1000 (a file's
    /// 100 - 999, which older versions took, is raised to 1000 with a warning).
    pub heartbeat_ms: u64,
    /// A contact is shown offline after this many missed heartbeats. Default: 3.
    pub missed_beats: u32,
    /// Seconds without local activity (sending, typing, reading) after which we show as
    /// away; 0 never. Default: 300.
    pub away_after_secs: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            share: SharePresence::Contacts,
            heartbeat_ms: 30_000,
            missed_beats: 3,
            away_after_secs: 300,
        }
    }
}

impl PresenceConfig {
    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: None,
            listen: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .expect("valid literal multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid literal multiaddr"),
            ],
            relays: Vec::new(),
            relay_sync_secs: 24 * 3600,
            mdns: true,
            api_bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            max_connections: 256,
            max_connections_per_peer: 4,
            idle_timeout_secs: 60,
            message_ttl_secs: 7 * 24 * 3600,
            inbound_rate: 20_000,
            inbound_burst: 40_000,
            max_message_requests: 1_000,
            min_free_disk_mb: 64,
            presence: PresenceConfig::default(),
        }
    }
}

/// Command-line values that override `config.toml`. `None` / empty means "not given".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen MA` (repeatable): replaces the configured listen addresses.
    pub listen: Vec<Multiaddr>,
    /// `--relay MA` (repeatable): replaces the configured relays.
    pub relays: Vec<Multiaddr>,
    /// `--no-mdns`: turns mDNS off.
    pub no_mdns: bool,
    /// `--api MA`: the API bind address.
    pub api_bind: Option<SocketAddr>,
}

impl Config {
    /// The file name of the config inside a data directory.
    pub const FILE_NAME: &'static str = "config.toml";

    /// Loads `path`, or the defaults when the file does not exist.
    pub fn load_or_default(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses TOML text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        // A display name contacts would not accept (they show `peer-…` instead) is not
        // announced; an older config may hold one, and that is no reason not to start.
        if let Some(name) = &config.name
            && let Err(why) = crate::messaging::contacts::validate_name(name)
        {
            tracing::warn!(
                path = %path.display(),
                "name {name:?} is not announced to contacts: {why}"
            );
            config.name = None;
        }
        // Faster heartbeats (100 - 999 ms, which older versions took) would pass the flood
        // limit contacts apply: raised to the floor, with a warning, rather than refused.
        let floor = crate::presence::book::MIN_HEARTBEAT_MS;
        if (100..floor).contains(&config.presence.heartbeat_ms) {
            tracing::warn!(
                path = %path.display(),
                "presence.heartbeat_ms {} is below {floor}; using {floor}",
                config.presence.heartbeat_ms
            );
            config.presence.heartbeat_ms = floor;
        }
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the values; `source` names where they came from in the error.
    pub fn validate(&self, source: &Path) -> Result<(), ConfigError> {
        let path = source;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if !self.api_bind.ip().is_loopback() {
            return Err(invalid(format!(
                "api_bind {} is not a loopback address; the local API is never exposed to the network",
                self.api_bind
            )));
        }

        for relay in &self.relays {
            if !relay
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(invalid(format!(
                    "relay address {relay} must end in /p2p/<peer id>"
                )));
            }
        }
        if self.message_ttl_secs > 30 * 24 * 3600 {
            return Err(invalid(format!(
                "message_ttl_secs {} is more than 30 days (2592000)",
                self.message_ttl_secs
            )));
        }
        if self.message_ttl_secs == 0 || self.inbound_rate == 0 || self.inbound_burst == 0 {
            return Err(invalid(
                "message_ttl_secs, inbound_rate and inbound_burst must be at least 1".into(),
            ));
        }
        if self.max_message_requests > 100_000 {
            return Err(invalid(format!(
                "max_message_requests {} is more than 100000",
                self.max_message_requests
            )));
        }
        if !(1..=30 * 24 * 3600).contains(&self.relay_sync_secs) {
            return Err(invalid(format!(
                "relay_sync_secs {} is outside 1..=2592000",
                self.relay_sync_secs
            )));
        }
        if self.max_connections == 0 || self.max_connections_per_peer == 0 {
            return Err(invalid("connection limits must be at least 1".into()));
        }
        if !(crate::presence::book::MIN_HEARTBEAT_MS..=3_600_000)
            .contains(&self.presence.heartbeat_ms)
        {
            return Err(invalid(format!(
                "presence.heartbeat_ms {} is outside {}..=3600000",
                self.presence.heartbeat_ms,
                crate::presence::book::MIN_HEARTBEAT_MS
            )));
        }
        if !(1..=100).contains(&self.presence.missed_beats) {
            return Err(invalid(format!(
                "presence.missed_beats {} is outside 1..=100",
                self.presence.missed_beats
            )));
        }
        Ok(())
    }

    /// Writes the config with a commented header to `path` (used by `tern init`).
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        let body = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let text = format!("{}\n{body}", Self::HEADER);
        std::fs::write(path, text).map_err(|source| ConfigError::Write {
            path: path.to_owned(),
            source,
        })
    }

    const HEADER: &'static str = "\
# Tern node configuration. Command-line flags override these values.
# name:          your display name, shown to contacts (default: none)
# listen:        peer listen addresses (default: all interfaces, OS-chosen TCP and QUIC ports)
# relays:        relay/bootstrap multiaddrs ending in /p2p/<peer id> (default: none)
# relay_sync_secs: seconds between syncs with each connected home relay (default: 86400)
# mdns:          discover peers on the local network (default: true)
# api_bind:      local JSON-RPC API address, loopback only (default: 127.0.0.1:0)
# max_connections / max_connections_per_peer: connection limits (default: 256 / 4)
# idle_timeout_secs: how long an idle connection stays open (default: 60)
# message_ttl_secs: how long a message may wait for delivery before it fails (default: 604800, at most 2592000)
# inbound_rate / inbound_burst: envelopes per second / burst accepted from one peer (default: 20000 / 40000)
# max_message_requests: strangers' conversations kept until you accept, block or remove them; 0 only contacts can write (default: 1000)
# min_free_disk_mb: free disk space kept in reserve; below it writes are refused (default: 64)
# [presence] share: who sees your online state and last seen, \"contacts\" or \"nobody\" (default: contacts)
# [presence] heartbeat_ms / missed_beats: heartbeat interval and missed beats before offline (default: 30000 / 3)
# [presence] away_after_secs: idle seconds before you show as away, 0 never (default: 300)
";

    /// A loopback-only configuration with mDNS off: OS-chosen TCP and QUIC ports on
    /// 127.0.0.1. Used by `tern demo` and the tests.
    pub fn loopback() -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .expect("valid literal multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("valid literal multiaddr"),
            ],
            mdns: false,
            ..Self::default()
        }
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, overrides: &Overrides) {
        if !overrides.listen.is_empty() {
            self.listen = overrides.listen.clone();
        }
        if !overrides.relays.is_empty() {
            self.relays = overrides.relays.clone();
        }
        if overrides.no_mdns {
            self.mdns = false;
        }
        if let Some(api) = overrides.api_bind {
            self.api_bind = api;
        }
    }

    /// The idle connection timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse(Path::new("c.toml"), "").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_file() {
        let err = Config::parse(Path::new("/x/config.toml"), "mnds = false\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/x/config.toml"), "{msg}");
        assert!(msg.contains("mnds"), "{msg}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = Config::parse(Path::new("c.toml"), "mdns = \"yes\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }));
    }

    #[test]
    fn api_must_be_loopback() {
        let err = Config::parse(Path::new("c.toml"), "api_bind = \"0.0.0.0:5000\"\n").unwrap_err();
        assert!(err.to_string().contains("loopback"));
    }

    #[test]
    fn relay_needs_peer_id() {
        let err = Config::parse(Path::new("c.toml"), "relays = [\"/ip4/127.0.0.1/tcp/1\"]\n")
            .unwrap_err();
        assert!(err.to_string().contains("/p2p/"), "{err}");
    }

    #[test]
    fn precedence_flags_over_file_over_defaults() {
        let mut c = Config::parse(
            Path::new("c.toml"),
            "mdns = true\nlisten = [\"/ip4/127.0.0.1/tcp/4001\"]\nmax_connections = 10\n",
        )
        .unwrap();
        assert_eq!(c.max_connections, 10, "file wins over default");
        assert_eq!(c.max_connections_per_peer, 4, "default kept");
        c.apply(&Overrides {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            no_mdns: true,
            ..Default::default()
        });
        assert!(!c.mdns, "flag wins over file");
        assert_eq!(
            c.listen,
            vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()]
        );
        assert!(c.relays.is_empty());
    }

    #[test]
    fn presence_table_parses_and_is_checked() {
        let c = Config::parse(
            Path::new("c.toml"),
            "[presence]\nshare = \"nobody\"\nheartbeat_ms = 1500\n",
        )
        .unwrap();
        assert_eq!(c.presence.share, SharePresence::Nobody);
        assert_eq!(c.presence.heartbeat_ms, 1500);
        assert_eq!(c.presence.missed_beats, 3, "default kept");
        let err =
            Config::parse(Path::new("c.toml"), "[presence]\nshare = \"everyone\"\n").unwrap_err();
        assert!(err.to_string().contains("everyone"), "{err}");
        let err = Config::parse(Path::new("c.toml"), "[presence]\nheartbeat_ms = 5\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_ms"), "{err}");
        // A display name contacts would not accept is not announced, and does not stop a
        // start (an older config may hold one).
        let c = Config::parse(Path::new("c.toml"), "name = \"  me  \"\n").unwrap();
        assert_eq!(c.name, None);
        let c = Config::parse(Path::new("c.toml"), "name = \"Bob\"\n").unwrap();
        assert_eq!(c.name.as_deref(), Some("Bob"));
        // Faster than one frame a second would exceed what contacts accept from an owner:
        // an older config's 100 - 999 ms is raised to 1 s (and does not stop a start);
        // anything below is refused, as it always was.
        let c = Config::parse(Path::new("c.toml"), "[presence]\nheartbeat_ms = 999\n").unwrap();
        assert_eq!(c.presence.heartbeat_ms, 1000);
        let c = Config::parse(Path::new("c.toml"), "[presence]\nheartbeat_ms = 100\n").unwrap();
        assert_eq!(c.presence.heartbeat_ms, 1000);
        let err =
            Config::parse(Path::new("c.toml"), "[presence]\nheartbeat_ms = 99\n").unwrap_err();
        assert!(err.to_string().contains("1000..=3600000"), "{err}");
    }

    #[test]
    fn written_config_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let c = Config {
            mdns: false,
            ..Config::default()
        };
        c.write(&path).unwrap();
        assert_eq!(Config::load_or_default(&path).unwrap(), c);
    }
}
