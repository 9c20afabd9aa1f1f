//! Long-term identity keys, prekeys and the public prekey bundle.
//!
//! * [`IdentityKeys`]: the 32-byte ed25519 seed is the whole identity (the same
//!   seed is the node, libp2p and iroh identity). The X25519 identity secret
//!   is derived from it with HKDF-SHA256 ([`super::kdf::identity_x25519_secret`]),
//!   and the ed25519 key signs the X25519 public key ([`IdentityPublic`]).
//! * [`LocalPrekeys`]: the secret halves of the signed prekey (rotatable, the
//!   previous one is kept for a grace period) and of the one-time prekey pool.
//! * [`PrekeyBundle`]: what a peer needs to start a session with us; compact
//!   binary encoding so it fits in a contact ticket.
//!
//! Invariants: nothing here reads a clock (callers pass `now`, in seconds);
//! signatures are always checked with `verify_strict` before a public key is
//! used; secrets are zeroized on drop and never appear in `Debug` output; a
//! one-time prekey leaves the pool only through [`LocalPrekeys::consume_one_time_prekey`]
//! or a successful [`super::session::Session::accept`].

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::codec::{Reader, decode_state, encode_state};
use super::error::CryptoError;
use super::kdf;
use super::secret::{Hex, Secret32, check_x25519_public};

/// Wire tag (format version) of [`PrekeyBundle`].
pub const BUNDLE_VERSION: u8 = 0x10;
/// How long (seconds) a replaced signed prekey is still accepted: 14 days.
pub const SIGNED_PREKEY_GRACE_SECS: u64 = 14 * 24 * 60 * 60;
/// Maximum number of one-time prekeys held at once.
pub const MAX_ONE_TIME_PREKEYS: usize = 10_000;

const PREKEYS_STATE_KIND: u8 = b'P';
const PREKEYS_STATE_VERSION: u8 = 1;

fn verifying_key(bytes: &[u8; 32], what: &'static str) -> Result<VerifyingKey, CryptoError> {
    VerifyingKey::from_bytes(bytes).map_err(|_| CryptoError::InvalidPublicKey { what })
}

fn verify_signature(
    key: &VerifyingKey,
    context: &[u8],
    parts: &[&[u8]],
    signature: &[u8; 64],
    what: &'static str,
) -> Result<(), CryptoError> {
    let mut msg = Vec::with_capacity(context.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    msg.extend_from_slice(context);
    for p in parts {
        msg.extend_from_slice(p);
    }
    key.verify_strict(&msg, &Signature::from_bytes(signature))
        .map_err(|_| CryptoError::InvalidSignature { what })
}

pub(crate) fn sign(key: &SigningKey, context: &[u8], parts: &[&[u8]]) -> [u8; 64] {
    let mut msg = Vec::with_capacity(context.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    msg.extend_from_slice(context);
    for p in parts {
        msg.extend_from_slice(p);
    }
    key.sign(&msg).to_bytes()
}

/// The public half of an identity: ed25519 key, X25519 identity key, and the
/// ed25519 signature binding the latter to the former. Encoded as 128 bytes
/// `ed25519 (32) || x25519 (32) || signature (64)`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct IdentityPublic {
    ed25519: [u8; 32],
    x25519: [u8; 32],
    signature: [u8; 64],
}

impl IdentityPublic {
    /// Encoded length.
    pub const LEN: usize = 128;

    /// The ed25519 identity public key (the peer's node identity).
    pub fn ed25519(&self) -> &[u8; 32] {
        &self.ed25519
    }

    /// The X25519 identity public key used in X3DH.
    pub fn x25519(&self) -> &[u8; 32] {
        &self.x25519
    }

    /// Checks that the ed25519 key is a valid point and signed the X25519 key.
    pub fn verify(&self) -> Result<(), CryptoError> {
        let key = verifying_key(&self.ed25519, "identity ed25519 key")?;
        verify_signature(
            &key,
            kdf::SIGN_IDENTITY_X25519,
            &[&self.x25519],
            &self.signature,
            "identity X25519 key",
        )
    }

    /// The 128-byte encoding.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(&self.ed25519);
        out[32..64].copy_from_slice(&self.x25519);
        out[64..].copy_from_slice(&self.signature);
        out
    }

    /// Decodes the 128-byte encoding (structure only: call [`Self::verify`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != Self::LEN {
            return Err(CryptoError::InvalidLength {
                what: "identity",
                expected: Self::LEN,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "identity");
        let out = Self::read(&mut r)?;
        r.finish()?;
        Ok(out)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, CryptoError> {
        let ed25519 = r.array()?;
        let x25519 = r.array()?;
        check_x25519_public(&x25519, "identity X25519 key")?;
        Ok(Self {
            ed25519,
            x25519,
            signature: r.array()?,
        })
    }
}

impl From<IdentityPublic> for Vec<u8> {
    fn from(id: IdentityPublic) -> Self {
        id.to_bytes().to_vec()
    }
}

impl TryFrom<Vec<u8>> for IdentityPublic {
    type Error = CryptoError;
    fn try_from(v: Vec<u8>) -> Result<Self, CryptoError> {
        Self::from_bytes(&v)
    }
}

impl fmt::Debug for IdentityPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityPublic")
            .field("ed25519", &Hex(&self.ed25519))
            .field("x25519", &Hex(&self.x25519))
            .finish_non_exhaustive()
    }
}

/// A device's long-term identity: the ed25519 signing key and the X25519
/// identity secret derived from the same 32-byte seed.
pub struct IdentityKeys {
    signing: SigningKey,
    x25519: Secret32,
    public: IdentityPublic,
}

impl IdentityKeys {
    /// Rebuilds the identity from its 32-byte ed25519 seed (as used by
    /// `ed25519_dalek::SigningKey::from_bytes`).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, CryptoError> {
        let signing = SigningKey::from_bytes(seed);
        let x25519 = Secret32::copy_from(&*kdf::identity_x25519_secret(seed)?);
        let x25519_public = x25519.x25519_public();
        let signature = sign(&signing, kdf::SIGN_IDENTITY_X25519, &[&x25519_public]);
        let public = IdentityPublic {
            ed25519: signing.verifying_key().to_bytes(),
            x25519: x25519_public,
            signature,
        };
        Ok(Self {
            signing,
            x25519,
            public,
        })
    }

    /// A fresh random identity.
    pub fn generate<R: CryptoRng + RngCore>(rng: &mut R) -> Result<Self, CryptoError> {
        let seed = Secret32::random(rng);
        Self::from_seed(seed.as_bytes())
    }

    /// The seed to persist (the only secret needed to restore the identity).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public identity (ed25519 key, X25519 key, binding signature).
    pub fn public(&self) -> &IdentityPublic {
        &self.public
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub(crate) fn x25519_secret(&self) -> &Secret32 {
        &self.x25519
    }
}

#[cfg(test)]
impl IdentityKeys {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        vec![
            self.signing.to_bytes().to_vec(),
            self.x25519.as_bytes().to_vec(),
        ]
    }
}

impl fmt::Debug for IdentityKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeys")
            .field("public", &self.public)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

/// A peer's published prekeys, signed by its identity.
///
/// Encoding (`to_bytes`), 230 bytes without and 266 with a one-time prekey:
/// `0x10 || identity (128) || signed prekey id (u32 BE) || signed prekey (32)
/// || signature (64) || flag (0/1) [|| one-time prekey id (u32 BE) || key (32)]`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrekeyBundle {
    identity: IdentityPublic,
    signed_prekey_id: u32,
    signed_prekey: [u8; 32],
    signed_prekey_signature: [u8; 64],
    one_time_prekey: Option<(u32, [u8; 32])>,
}

impl PrekeyBundle {
    /// Encoded length without a one-time prekey.
    pub const LEN_WITHOUT_ONE_TIME: usize = 1 + IdentityPublic::LEN + 4 + 32 + 64 + 1;
    /// Encoded length with a one-time prekey.
    pub const LEN_WITH_ONE_TIME: usize = Self::LEN_WITHOUT_ONE_TIME + 4 + 32;

    /// The owner's identity.
    pub fn identity(&self) -> &IdentityPublic {
        &self.identity
    }

    /// The signed prekey id.
    pub fn signed_prekey_id(&self) -> u32 {
        self.signed_prekey_id
    }

    /// The signed prekey (X25519 public key).
    pub fn signed_prekey(&self) -> &[u8; 32] {
        &self.signed_prekey
    }

    /// The one-time prekey id and public key, if any.
    pub fn one_time_prekey(&self) -> Option<(u32, &[u8; 32])> {
        self.one_time_prekey.as_ref().map(|(id, k)| (*id, k))
    }

    /// Verifies the identity binding and the signed-prekey signature. Must
    /// succeed before any key of the bundle is used (session setup does it).
    pub fn verify(&self) -> Result<(), CryptoError> {
        self.identity.verify()?;
        let key = verifying_key(&self.identity.ed25519, "identity ed25519 key")?;
        verify_signature(
            &key,
            kdf::SIGN_SIGNED_PREKEY,
            &[&self.signed_prekey_id.to_be_bytes(), &self.signed_prekey],
            &self.signed_prekey_signature,
            "signed prekey",
        )
    }

    /// The compact binary encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN_WITH_ONE_TIME);
        out.push(BUNDLE_VERSION);
        out.extend_from_slice(&self.identity.to_bytes());
        out.extend_from_slice(&self.signed_prekey_id.to_be_bytes());
        out.extend_from_slice(&self.signed_prekey);
        out.extend_from_slice(&self.signed_prekey_signature);
        match &self.one_time_prekey {
            Some((id, key)) => {
                out.push(1);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(key);
            }
            None => out.push(0),
        }
        out
    }

    /// Decodes [`Self::to_bytes`] output. Checks structure only; signatures
    /// are checked by [`Self::verify`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != Self::LEN_WITHOUT_ONE_TIME && bytes.len() != Self::LEN_WITH_ONE_TIME {
            return Err(CryptoError::InvalidLength {
                what: "prekey bundle",
                expected: Self::LEN_WITHOUT_ONE_TIME,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "prekey bundle");
        r.tag(BUNDLE_VERSION)?;
        let identity = IdentityPublic::read(&mut r)?;
        let signed_prekey_id = r.u32()?;
        let signed_prekey = r.array()?;
        check_x25519_public(&signed_prekey, "signed prekey")?;
        let signed_prekey_signature = r.array()?;
        let one_time_prekey = match r.u8()? {
            0 => None,
            1 => {
                let id = r.u32()?;
                let key = r.array()?;
                check_x25519_public(&key, "one-time prekey")?;
                Some((id, key))
            }
            _ => {
                return Err(CryptoError::malformed(
                    "prekey bundle",
                    "invalid presence flag",
                ));
            }
        };
        r.finish()?;
        Ok(Self {
            identity,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_signature,
            one_time_prekey,
        })
    }
}

impl fmt::Debug for PrekeyBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrekeyBundle")
            .field("identity", &self.identity)
            .field("signed_prekey_id", &self.signed_prekey_id)
            .field("signed_prekey", &Hex(&self.signed_prekey))
            .field(
                "one_time_prekey_id",
                &self.one_time_prekey.as_ref().map(|(id, _)| *id),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct SignedPrekeyRecord {
    id: u32,
    secret: Secret32,
    created_at: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct RetiredSignedPrekey {
    record: SignedPrekeyRecord,
    retired_at: u64,
}

/// The secret halves of this device's prekeys.
///
/// Persist with [`Self::to_bytes`] after every mutation (rotation, generation,
/// consumption) so a consumed one-time prekey is never accepted twice.
#[derive(Clone, Serialize, Deserialize)]
pub struct LocalPrekeys {
    current: SignedPrekeyRecord,
    previous: Option<RetiredSignedPrekey>,
    one_time: BTreeMap<u32, Secret32>,
    next_one_time_id: u32,
}

impl LocalPrekeys {
    /// Creates the state with a first signed prekey (id 1) and no one-time prekeys.
    pub fn new<R: CryptoRng + RngCore>(rng: &mut R, now: u64) -> Self {
        Self {
            current: SignedPrekeyRecord {
                id: 1,
                secret: Secret32::random(rng),
                created_at: now,
            },
            previous: None,
            one_time: BTreeMap::new(),
            next_one_time_id: 1,
        }
    }

    /// Id of the current signed prekey.
    pub fn signed_prekey_id(&self) -> u32 {
        self.current.id
    }

    /// When (caller's clock, seconds) the current signed prekey was created.
    pub fn signed_prekey_created_at(&self) -> u64 {
        self.current.created_at
    }

    /// Id of the previous signed prekey while it is still kept.
    pub fn previous_signed_prekey_id(&self) -> Option<u32> {
        self.previous.as_ref().map(|p| p.record.id)
    }

    /// Replaces the signed prekey with a fresh one and returns its id. The
    /// replaced key stays usable (for sessions started from old bundles) until
    /// [`Self::prune`] is called at or after `now + SIGNED_PREKEY_GRACE_SECS`;
    /// any older key is dropped immediately.
    pub fn rotate_signed_prekey<R: CryptoRng + RngCore>(
        &mut self,
        rng: &mut R,
        now: u64,
    ) -> Result<u32, CryptoError> {
        let id = self
            .current
            .id
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted {
                what: "signed prekey id",
            })?;
        let new = SignedPrekeyRecord {
            id,
            secret: Secret32::random(rng),
            created_at: now,
        };
        let old = std::mem::replace(&mut self.current, new);
        self.previous = Some(RetiredSignedPrekey {
            record: old,
            retired_at: now,
        });
        Ok(id)
    }

    /// Drops the previous signed prekey once its grace period is over.
    /// Returns whether a key was dropped.
    pub fn prune(&mut self, now: u64) -> bool {
        let expired = self
            .previous
            .as_ref()
            .is_some_and(|p| now >= p.retired_at.saturating_add(SIGNED_PREKEY_GRACE_SECS));
        if expired {
            self.previous = None;
        }
        expired
    }

    /// Adds `count` fresh one-time prekeys and returns their ids. Fails without
    /// changes if the pool would exceed [`MAX_ONE_TIME_PREKEYS`].
    pub fn generate_one_time_prekeys<R: CryptoRng + RngCore>(
        &mut self,
        rng: &mut R,
        count: usize,
    ) -> Result<Vec<u32>, CryptoError> {
        let requested = self.one_time.len().saturating_add(count);
        if requested > MAX_ONE_TIME_PREKEYS {
            return Err(CryptoError::TooManyPrekeys {
                max: MAX_ONE_TIME_PREKEYS,
                requested,
            });
        }
        let last = u32::try_from(count)
            .ok()
            .and_then(|c| self.next_one_time_id.checked_add(c))
            .ok_or(CryptoError::CounterExhausted {
                what: "one-time prekey id",
            })?;
        let ids: Vec<u32> = (self.next_one_time_id..last).collect();
        for id in &ids {
            self.one_time.insert(*id, Secret32::random(rng));
        }
        self.next_one_time_id = last;
        Ok(ids)
    }

    /// Ids of the one-time prekeys still in the pool, ascending.
    pub fn one_time_prekey_ids(&self) -> Vec<u32> {
        self.one_time.keys().copied().collect()
    }

    /// Number of one-time prekeys in the pool.
    pub fn one_time_prekey_count(&self) -> usize {
        self.one_time.len()
    }

    /// Removes a one-time prekey from the pool (e.g. when it was handed out in
    /// a bundle that expired). Session setup consumes keys by itself.
    pub fn consume_one_time_prekey(&mut self, id: u32) -> Result<(), CryptoError> {
        self.one_time
            .remove(&id)
            .map(drop)
            .ok_or(CryptoError::UnknownOneTimePrekey { id })
    }

    /// The public bundle, signed by `identity`, optionally carrying the
    /// one-time prekey `one_time_prekey_id` (which must be in the pool).
    pub fn bundle(
        &self,
        identity: &IdentityKeys,
        one_time_prekey_id: Option<u32>,
    ) -> Result<PrekeyBundle, CryptoError> {
        let one_time_prekey = match one_time_prekey_id {
            Some(id) => Some((id, self.one_time_secret(id)?.x25519_public())),
            None => None,
        };
        let signed_prekey = self.current.secret.x25519_public();
        let signed_prekey_signature = sign(
            identity.signing_key(),
            kdf::SIGN_SIGNED_PREKEY,
            &[&self.current.id.to_be_bytes(), &signed_prekey],
        );
        Ok(PrekeyBundle {
            identity: identity.public().clone(),
            signed_prekey_id: self.current.id,
            signed_prekey,
            signed_prekey_signature,
            one_time_prekey,
        })
    }

    pub(crate) fn signed_prekey_secret(&self, id: u32) -> Result<&Secret32, CryptoError> {
        if self.current.id == id {
            return Ok(&self.current.secret);
        }
        match &self.previous {
            Some(p) if p.record.id == id => Ok(&p.record.secret),
            _ => Err(CryptoError::UnknownSignedPrekey { id }),
        }
    }

    pub(crate) fn one_time_secret(&self, id: u32) -> Result<&Secret32, CryptoError> {
        self.one_time
            .get(&id)
            .ok_or(CryptoError::UnknownOneTimePrekey { id })
    }

    /// Versioned persistent encoding (`'P' || 0x01 || postcard`), wiped on drop.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        encode_state(
            PREKEYS_STATE_KIND,
            PREKEYS_STATE_VERSION,
            "prekey state",
            self,
        )
    }

    /// Decodes [`Self::to_bytes`] output, checking kind, version and invariants.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let state: Self = decode_state(
            PREKEYS_STATE_KIND,
            PREKEYS_STATE_VERSION,
            "prekey state",
            bytes,
        )?;
        if state.one_time.len() > MAX_ONE_TIME_PREKEYS {
            return Err(CryptoError::malformed(
                "prekey state",
                "one-time prekey pool too large",
            ));
        }
        if state
            .one_time
            .keys()
            .any(|id| *id >= state.next_one_time_id)
        {
            return Err(CryptoError::malformed(
                "prekey state",
                "one-time prekey id beyond counter",
            ));
        }
        if state
            .previous
            .as_ref()
            .is_some_and(|p| p.record.id == state.current.id)
        {
            return Err(CryptoError::malformed(
                "prekey state",
                "duplicate signed prekey id",
            ));
        }
        Ok(state)
    }
}

#[cfg(test)]
impl LocalPrekeys {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        let mut out = vec![self.current.secret.as_bytes().to_vec()];
        out.extend(
            self.previous
                .iter()
                .map(|p| p.record.secret.as_bytes().to_vec()),
        );
        out.extend(self.one_time.values().map(|s| s.as_bytes().to_vec()));
        out
    }
}

impl fmt::Debug for LocalPrekeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPrekeys")
            .field("signed_prekey_id", &self.current.id)
            .field(
                "previous_signed_prekey_id",
                &self.previous_signed_prekey_id(),
            )
            .field("one_time_prekeys", &self.one_time.len())
            .field("secrets", &"<redacted>")
            .finish()
    }
}
