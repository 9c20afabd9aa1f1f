//! End-to-end encryption core: X3DH, Double Ratchet, Sender Keys, media STREAM.
//!
//! This module is pure protocol logic: no I/O, no clocks (callers pass `now`),
//! no tasks, and every source of randomness is an explicit
//! `rand::CryptoRng + RngCore` argument so tests are deterministic. Relays and
//! the network only ever see the encodings produced here; keys exist only on
//! user devices.
//!
//! * [`keys`] - [`IdentityKeys`] (one 32-byte ed25519 seed backs the whole
//!   identity), [`LocalPrekeys`] (signed prekey rotation, one-time prekey
//!   pool) and the public [`PrekeyBundle`].
//! * [`session`] - [`Session`] = X3DH setup ([`PreKeyMessage`]) + Double
//!   Ratchet ([`ratchet::RatchetMessage`]), both carried by [`Message`].
//! * [`sender_keys`] - group messaging with per-member signed chains.
//! * [`media`] - chunked ChaCha20-Poly1305 STREAM for attachments.
//! * [`kdf`] - every KDF, label and AEAD key expansion.
//! * [`error`] - [`CryptoError`].
//!
//! Invariants shared by all submodules: failed operations leave state
//! unchanged (decryption is transactional); decoders check lengths before
//! allocating and reject trailing bytes; every persisted state is a
//! versioned postcard blob returned in a `Zeroizing` buffer; secrets are
//! zeroized on drop and `Debug` never prints them. The constructions and all
//! deviations from the Signal specifications are documented in
//! `docs/SECURITY.md`.

mod codec;
pub mod error;
#[doc(hidden)]
pub mod fuzz_support;
pub mod kdf;
pub mod keys;
pub mod media;
pub mod ratchet;
mod secret;
pub mod sender_keys;
pub mod session;
#[cfg(test)]
pub(crate) mod tests;
mod x3dh;

pub use error::CryptoError;
pub use keys::{IdentityKeys, IdentityPublic, LocalPrekeys, PrekeyBundle};
pub use media::{MediaDecryptor, MediaEncryptor, MediaKey, MediaReader, MediaWriter};
pub use ratchet::{Header, RatchetMessage};
pub use sender_keys::{
    GroupMessage, InboundSenderKey, OutboundSenderKey, SenderKeyDistribution, SenderKeyStore,
};
pub use session::{ChainPosition, Message, PreKeyMessage, Session};
