//! `tern-store-forward`: the relay mailbox that holds ciphertext for offline peers.
//!
//! A relay keeps, per recipient, a mailbox of opaque end-to-end encrypted envelopes that
//! senders holding a capability token deposit, and that the recipient fetches and acks
//! (deletes) when it comes online; plus a small pool of the recipient's signed one-time
//! prekeys so a first message to an offline contact still gets a fresh one. A mailbox whose
//! owner stops registering is deleted after `mailbox_idle_secs`. The crate is
//! I/O-light and network-free: the node's libp2p swarm carries `/tern/mailbox/1` frames and
//! calls [`MailboxServer::handle`].
//!
//! Layers, each using only those above it:
//! - [`wire`]: the protocol frames (versioned postcard), tokens and limits constants;
//! - [`limits`]: [`RelayLimits`], published by `Info`;
//! - [`rules`]: the I/O-free mailbox state machine ([`MailboxRules`]) with `now` as input;
//! - [`space`]: the free-disk-space reserve that keeps sled off a full disk (the node's
//!   store uses it too);
//! - [`db`]: sled persistence of the mailbox trees, rebuilding the rules index at open;
//! - [`server`]: [`MailboxServer`], request in, reply out, group commit by the caller;
//! - [`metrics`]: counters and the Prometheus text exposition;
//! - [`config`]: [`RelayConfig`], the relay's TOML config with `TERN_RELAY_*` overrides.
//!
//! This crate depends on neither `tern-node` nor `tern-cli`. The protocol is documented in
//! docs/PROTOCOL.md ("Mailbox protocol /tern/mailbox/1"), operation in docs/OPERATOR.md.

pub mod config;
pub mod db;
pub mod limits;
pub mod metrics;
pub mod rules;
pub mod server;
pub mod space;
pub mod wire;

pub use config::{ConfigError, RelayConfig};
pub use db::{DbError, Flusher};
pub use limits::{LimitsError, RelayLimits};
pub use metrics::{Gauge, Metrics};
pub use rules::{MailboxRules, Refusal};
pub use server::{MailboxServer, Reply, ServerError, ServerEvent, ServerOptions};
pub use wire::{
    ErrorCode, MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME, MailboxToken, MessageId, PROTOCOL, PeerBytes,
    Request, Response, StoredItem, TokenHash, WireError,
};
