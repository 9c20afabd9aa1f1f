//! Key derivation functions, domain-separation labels and the AEAD wrapper.
//!
//! All constructions are fixed here so that `docs/SECURITY.md` and the
//! known-answer vectors have a single source of truth:
//!
//! * identity X25519 secret: `HKDF-SHA256(salt = none, ikm = ed25519 seed,
//!   info = LABEL_IDENTITY_X25519)`, 32 bytes;
//! * X3DH: `HKDF-SHA256(salt = 0x00 * 32, ikm = 0xFF * 32 || DH1 || DH2 || DH3
//!   [|| DH4], info = LABEL_X3DH)`, 32 bytes;
//! * `KDF_RK(rk, dh) = HKDF-SHA256(salt = rk, ikm = dh, info = LABEL_ROOT)`,
//!   64 bytes split into (root key, chain key);
//! * `KDF_CK(ck)`: message key `HMAC-SHA256(ck, 0x01)`, next chain key
//!   `HMAC-SHA256(ck, 0x02)`;
//! * message key expansion: `HKDF-SHA256(salt = 0x00 * 32, ikm = mk, info)`,
//!   44 bytes split into a ChaCha20-Poly1305 key (32) and nonce (12); `info`
//!   is [`LABEL_MESSAGE_KEYS`] (pairwise) or [`LABEL_SENDER_KEY_MESSAGE`] (groups).
//!
//! Invariant: every message key is expanded into a distinct (key, nonce) pair
//! and is used for exactly one AEAD operation, so nonce reuse cannot happen.
//! Secret outputs are returned in zeroizing containers.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::error::CryptoError;

/// HKDF info deriving the X25519 identity secret from the ed25519 seed.
pub const LABEL_IDENTITY_X25519: &[u8] = b"Tern v1 identity X25519";
/// HKDF info of the X3DH shared-secret derivation.
pub const LABEL_X3DH: &[u8] = b"Tern v1 X3DH";
/// HKDF info of the Double Ratchet root chain (`KDF_RK`).
pub const LABEL_ROOT: &[u8] = b"Tern v1 Double Ratchet root";
/// HKDF info expanding a pairwise message key into AEAD key and nonce.
pub const LABEL_MESSAGE_KEYS: &[u8] = b"Tern v1 Double Ratchet message keys";
/// HKDF info expanding a sender-key message key into AEAD key and nonce.
pub const LABEL_SENDER_KEY_MESSAGE: &[u8] = b"Tern v1 Sender Key message keys";
/// Signature context: the ed25519 identity signs `label || x25519 identity key`.
pub const SIGN_IDENTITY_X25519: &[u8] = b"Tern v1 signature: X25519 identity key";
/// Signature context: the identity signs `label || id (u32 BE) || signed prekey`.
pub const SIGN_SIGNED_PREKEY: &[u8] = b"Tern v1 signature: signed prekey";
/// Signature context: a group sender signs `label || encoded group message
/// without its signature`.
pub const SIGN_GROUP_MESSAGE: &[u8] = b"Tern v1 signature: group message";

/// `KDF_CK` input byte deriving the message key.
pub const MESSAGE_KEY_SEED: u8 = 0x01;
/// `KDF_CK` input byte deriving the next chain key.
pub const CHAIN_KEY_SEED: u8 = 0x02;

type HmacSha256 = Hmac<Sha256>;

/// Two 32-byte secrets returned by a KDF step, wiped on drop.
pub type KeyPair32 = (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>);

fn hkdf<const N: usize>(
    salt: Option<&[u8]>,
    ikm: &[u8],
    info: &[u8],
) -> Result<Zeroizing<[u8; N]>, CryptoError> {
    let mut okm = Zeroizing::new([0u8; N]);
    Hkdf::<Sha256>::new(salt, ikm)
        .expand(info, okm.as_mut())
        .map_err(|_| CryptoError::Kdf)?;
    Ok(okm)
}

fn hmac(key: &[u8; 32], input: u8) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| CryptoError::Kdf)?;
    mac.update(&[input]);
    Ok(Zeroizing::new(mac.finalize().into_bytes().into()))
}

/// Derives the X25519 identity secret (pre-clamping bytes) from the 32-byte
/// ed25519 identity seed.
pub fn identity_x25519_secret(seed: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    hkdf(None, seed, LABEL_IDENTITY_X25519)
}

/// The X3DH KDF: `dh_concat` is `DH1 || DH2 || DH3 [|| DH4]`.
pub fn x3dh(dh_concat: &[u8]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 + dh_concat.len()));
    ikm.extend_from_slice(&[0xFF; 32]);
    ikm.extend_from_slice(dh_concat);
    hkdf(Some(&[0u8; 32]), &ikm, LABEL_X3DH)
}

/// `KDF_RK(rk, dh_out)`: returns `(new root key, new chain key)`.
pub fn kdf_rk(root_key: &[u8; 32], dh_out: &[u8; 32]) -> Result<KeyPair32, CryptoError> {
    let okm = hkdf::<64>(Some(root_key), dh_out, LABEL_ROOT)?;
    let mut rk = Zeroizing::new([0u8; 32]);
    let mut ck = Zeroizing::new([0u8; 32]);
    rk.copy_from_slice(&okm[..32]);
    ck.copy_from_slice(&okm[32..]);
    Ok((rk, ck))
}

/// `KDF_CK(ck)`: returns `(next chain key, message key)`.
pub fn kdf_ck(chain_key: &[u8; 32]) -> Result<KeyPair32, CryptoError> {
    let mk = hmac(chain_key, MESSAGE_KEY_SEED)?;
    let next = hmac(chain_key, CHAIN_KEY_SEED)?;
    Ok((next, mk))
}

/// A ChaCha20-Poly1305 key and nonce expanded from one message key.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct AeadKey {
    key: [u8; 32],
    nonce: [u8; 12],
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(<redacted>)")
    }
}

impl AeadKey {
    /// Expands a message key with `HKDF-SHA256(salt = 0x00 * 32, ikm = mk, info)`
    /// into 32 key bytes followed by 12 nonce bytes.
    pub fn expand(message_key: &[u8; 32], info: &[u8]) -> Result<Self, CryptoError> {
        let okm = hkdf::<44>(Some(&[0u8; 32]), message_key, info)?;
        let mut out = Self {
            key: [0u8; 32],
            nonce: [0u8; 12],
        };
        out.key.copy_from_slice(&okm[..32]);
        out.nonce.copy_from_slice(&okm[32..]);
        Ok(out)
    }

    /// The 32-byte AEAD key (exposed for known-answer tests).
    pub fn key_bytes(&self) -> &[u8; 32] {
        &self.key
    }

    /// The 12-byte nonce (exposed for known-answer tests).
    pub fn nonce_bytes(&self) -> &[u8; 12] {
        &self.nonce
    }

    /// Encrypts `plaintext`; returns `ciphertext || 16-byte tag`. Consumes the
    /// key so it cannot be used twice.
    pub fn seal(self, associated_data: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = ChaCha20Poly1305::new((&self.key).into());
        let mut buf = Vec::with_capacity(plaintext.len() + 16);
        buf.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached((&self.nonce).into(), associated_data, &mut buf)
            .map_err(|_| CryptoError::TooLarge {
                what: "AEAD plaintext",
                max: usize::MAX,
                got: plaintext.len(),
            })?;
        buf.extend_from_slice(&tag);
        Ok(buf)
    }

    /// Decrypts `ciphertext || tag`. Consumes the key.
    pub fn open(self, associated_data: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let body_len = ciphertext
            .len()
            .checked_sub(16)
            .ok_or(CryptoError::DecryptionFailed)?;
        let (body, tag) = ciphertext.split_at(body_len);
        let cipher = ChaCha20Poly1305::new((&self.key).into());
        let mut buf = body.to_vec();
        match cipher.decrypt_in_place_detached(
            (&self.nonce).into(),
            associated_data,
            &mut buf,
            tag.into(),
        ) {
            Ok(()) => Ok(buf),
            Err(_) => {
                buf.zeroize();
                Err(CryptoError::DecryptionFailed)
            }
        }
    }
}
