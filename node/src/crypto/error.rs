//! The single error type of the end-to-end encryption core.
//!
//! Every fallible operation in [`crate::crypto`] returns [`CryptoError`].
//! Invariant: an operation that returns an error has not modified the state it
//! was called on (decryption is transactional, prekeys are consumed only after
//! success). Error values never carry secret material: they name the object
//! that failed and carry only public numbers (lengths, ids, counters, versions).

use thiserror::Error;

/// Everything that can go wrong in the encryption core.
///
/// The variants are deliberately coarse for authentication failures
/// ([`CryptoError::DecryptionFailed`], [`CryptoError::InvalidSignature`]) so an
/// attacker learns nothing beyond "rejected".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// An encoded object has the wrong length.
    #[error("invalid {what} length: expected {expected} bytes, got {got}")]
    InvalidLength {
        /// The object being decoded.
        what: &'static str,
        /// The expected length, or the minimum when the object is variable-length.
        expected: usize,
        /// The length that was supplied.
        got: usize,
    },

    /// An encoded object or a plaintext exceeds its size cap.
    #[error("{what} too large: at most {max} bytes, got {got}")]
    TooLarge {
        /// The object that was too large.
        what: &'static str,
        /// The cap.
        max: usize,
        /// The size that was supplied.
        got: usize,
    },

    /// An encoded object starts with a version/type byte that is not understood.
    #[error("unsupported {what} version: expected {expected:#04x}, got {got:#04x}")]
    UnsupportedVersion {
        /// The object being decoded.
        what: &'static str,
        /// The version (or type tag) this build understands.
        expected: u8,
        /// The version (or type tag) found.
        got: u8,
    },

    /// An encoded object is structurally invalid (non-canonical flag, trailing
    /// bytes, failed serde decoding, broken internal invariant, ...).
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// The object being decoded.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// A signature did not verify (identity binding, signed prekey, group message).
    #[error("invalid signature on {what}")]
    InvalidSignature {
        /// What was signed.
        what: &'static str,
    },

    /// A public key is not usable: not a valid ed25519 point, or an X25519 key
    /// that produced a non-contributory (all-zero) shared secret.
    #[error("invalid or weak public key in {what}")]
    InvalidPublicKey {
        /// Where the key came from.
        what: &'static str,
    },

    /// The signed prekey id named by an initial message is neither the current
    /// nor the previous (grace period) signed prekey.
    #[error("unknown signed prekey id {id}")]
    UnknownSignedPrekey {
        /// The requested id.
        id: u32,
    },

    /// The one-time prekey id is not in the pool (never issued or already consumed).
    #[error("unknown one-time prekey id {id}")]
    UnknownOneTimePrekey {
        /// The requested id.
        id: u32,
    },

    /// The one-time prekey pool is full.
    #[error("too many one-time prekeys: at most {max}, requested {requested}")]
    TooManyPrekeys {
        /// Pool capacity.
        max: usize,
        /// Pool size after the request.
        requested: usize,
    },

    /// AEAD authentication failed: wrong key, tampered ciphertext, header or
    /// associated data.
    #[error("decryption failed: authentication tag mismatch")]
    DecryptionFailed,

    /// A message index lies too far ahead of the receiving chain.
    #[error("message index {got} is too far ahead: chain at {current}, at most {max} skipped")]
    TooFarAhead {
        /// Current position of the receiving chain.
        current: u32,
        /// Index carried by the message.
        got: u32,
        /// Maximum number of message keys that may be skipped.
        max: u32,
    },

    /// A message index was already used (replay) or its key was evicted.
    #[error("duplicate or expired message index {index}")]
    DuplicateMessage {
        /// The message index.
        index: u32,
    },

    /// A 32-bit message or chunk counter would overflow.
    #[error("{what} counter exhausted")]
    CounterExhausted {
        /// Which counter.
        what: &'static str,
    },

    /// The session cannot perform this operation in its current state
    /// (e.g. receiving a ratchet step before the local ratchet key exists).
    #[error("invalid session state: {reason}")]
    InvalidState {
        /// Why.
        reason: &'static str,
    },

    /// An initial (prekey) message does not belong to this session.
    #[error("prekey message does not belong to this session")]
    SessionMismatch,

    /// A group message names a group, epoch or sender that does not match the
    /// sender key used to decrypt it.
    #[error("group message {field} mismatch")]
    GroupMismatch {
        /// The mismatching field: "group id", "epoch" or "sender".
        field: &'static str,
    },

    /// No sender key is known for the sender of a group message.
    #[error("unknown group sender")]
    UnknownSender,

    /// A media stream ended before its final chunk.
    #[error("media stream truncated")]
    Truncated,

    /// A media stream has bytes after its final chunk.
    #[error("media stream has data after its final chunk")]
    TrailingData,

    /// A media cipher was used after it finished or failed.
    #[error("media stream: {reason}")]
    StreamMisuse {
        /// Why.
        reason: &'static str,
    },

    /// Internal KDF failure (an output length above the HKDF limit). Cannot
    /// happen with the fixed sizes used by this module.
    #[error("internal key derivation error")]
    Kdf,
}

impl CryptoError {
    /// Shorthand for [`CryptoError::Malformed`].
    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Malformed {
            what,
            reason: reason.into(),
        }
    }
}
