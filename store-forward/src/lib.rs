//! `tern-store-forward`: the relay mailbox that holds ciphertext for offline peers.
//!
//! This crate depends on neither `tern-node` nor `tern-cli`. It will hold the mailbox wire
//! protocol, the I/O-free mailbox rules (capability, quota, TTL, rate), their sled
//! persistence, and the server and client halves; see docs/PROTOCOL.md as they land.
