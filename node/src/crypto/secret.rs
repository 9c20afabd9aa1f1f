//! Secret byte containers shared by the encryption core.
//!
//! Invariants: a [`Secret32`] is wiped when dropped (`ZeroizeOnDrop`), its
//! `Debug` output is the constant `<redacted>`, and it is only ever copied out
//! into types that are themselves zeroized on drop (`x25519_dalek::StaticSecret`,
//! `ed25519_dalek::SigningKey`, `zeroize::Zeroizing`). It serializes with serde
//! as a plain 32-byte array so it can be part of the persisted (versioned)
//! state; callers of `to_bytes()` receive that state in a `Zeroizing<Vec<u8>>`.

use std::fmt;

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::error::CryptoError;

/// 32 secret bytes: a chain key, root key, message key or private scalar.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
pub(crate) struct Secret32([u8; 32]);

impl Secret32 {
    /// Wraps raw bytes (the caller is responsible for wiping its copy).
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Copies the bytes out of another (zeroizing) buffer without leaving an
    /// intermediate copy on the stack.
    pub(crate) fn copy_from(bytes: &[u8; 32]) -> Self {
        let mut s = Self([0u8; 32]);
        s.0.copy_from_slice(bytes);
        s
    }

    /// Fresh random bytes.
    pub(crate) fn random<R: CryptoRng + RngCore>(rng: &mut R) -> Self {
        let mut s = Self([0u8; 32]);
        rng.fill_bytes(&mut s.0);
        s
    }

    /// Borrows the bytes.
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The X25519 private key these bytes encode (clamping happens inside
    /// `x25519_dalek`).
    pub(crate) fn x25519_secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }

    /// The X25519 public key of [`Self::x25519_secret`].
    pub(crate) fn x25519_public(&self) -> [u8; 32] {
        PublicKey::from(&self.x25519_secret()).to_bytes()
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An X25519 key pair whose public half is cached (so that encrypting does
/// not need a scalar multiplication). The cache is checked when state is
/// decoded ([`RatchetKeyPair::check`]).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct RatchetKeyPair {
    pub(crate) secret: Secret32,
    pub(crate) public: [u8; 32],
}

impl RatchetKeyPair {
    /// A fresh random key pair.
    pub(crate) fn generate<R: CryptoRng + RngCore>(rng: &mut R) -> Self {
        let secret = Secret32::random(rng);
        let public = secret.x25519_public();
        Self { secret, public }
    }

    /// Builds the pair from a secret.
    pub(crate) fn from_secret(secret: Secret32) -> Self {
        let public = secret.x25519_public();
        Self { secret, public }
    }

    /// Verifies that the cached public key matches the secret.
    pub(crate) fn check(&self, what: &'static str) -> Result<(), CryptoError> {
        if self.secret.x25519_public() == self.public {
            Ok(())
        } else {
            Err(CryptoError::malformed(
                what,
                "ratchet public key does not match its secret",
            ))
        }
    }
}

impl fmt::Debug for RatchetKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RatchetKeyPair")
            .field("public", &Hex(&self.public))
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// X25519 Diffie-Hellman that rejects non-contributory results (low-order
/// peer keys), returning the 32-byte shared secret in a zeroizing container.
pub(crate) fn x25519(
    secret: &Secret32,
    their_public: &[u8; 32],
    what: &'static str,
) -> Result<zeroize::Zeroizing<[u8; 32]>, CryptoError> {
    let shared = secret
        .x25519_secret()
        .diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return Err(CryptoError::InvalidPublicKey { what });
    }
    Ok(zeroize::Zeroizing::new(shared.to_bytes()))
}

/// Rejects non-canonical X25519 public key encodings: the top bit set, or a
/// u-coordinate `>= 2^255 - 19`. X25519 itself ignores the top bit and
/// reduces modulo p, so without this check two different encodings would
/// yield the same shared secret and a bit flip in an unauthenticated field
/// (the X3DH ephemeral key) would go unnoticed.
pub(crate) fn check_x25519_public(bytes: &[u8; 32], what: &'static str) -> Result<(), CryptoError> {
    let top_bit = bytes[31] & 0x80 != 0;
    let at_least_p =
        bytes[31] == 0x7f && bytes[1..31].iter().all(|b| *b == 0xff) && bytes[0] >= 0xed;
    if top_bit || at_least_p {
        return Err(CryptoError::InvalidPublicKey { what });
    }
    Ok(())
}

/// Formats public bytes as lowercase hex in `Debug` output.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
