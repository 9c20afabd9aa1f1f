//! Sender Keys for group messages (the construction Signal uses for groups).
//!
//! Each member owns, per group and membership epoch, an
//! [`OutboundSenderKey`]: a symmetric chain key plus an ed25519 signing key.
//! The member sends a [`SenderKeyDistribution`] (chain key, iteration and
//! signing public key) to every other member **inside a pairwise
//! [`super::session::Session`]**; never in the clear. A group message is
//! encrypted once with the next message key of the chain and signed:
//!
//! ```text
//! mk, ck' = HMAC-SHA256(ck, 0x01), HMAC-SHA256(ck, 0x02)
//! key, nonce = HKDF-SHA256(salt = 0x00*32, ikm = mk, info = "Tern v1 Sender Key message keys")
//! header = 0x21 || group id (32) || epoch (u64 BE) || sender (32) || iteration (u32 BE)
//! ct = ChaCha20-Poly1305(key, nonce, ad = header, plaintext)
//! sig = Ed25519(signing key, "Tern v1 signature: group message" || header || ct)
//! ```
//!
//! Invariants: receivers verify the signature before touching the chain;
//! a message at most [`MAX_GROUP_FORWARD`] iterations ahead is accepted and
//! the keys it skips are kept (at most [`MAX_GROUP_SKIPPED_KEYS`], oldest
//! evicted), so out-of-order delivery works; an iteration that was already
//! decrypted (or whose key was evicted) is rejected; decryption is
//! transactional. Every member can read the group, but only the owner of a
//! signing key can author messages under it. Remove a member by moving to a
//! new epoch with fresh sender keys.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::codec::{Reader, decode_state, encode_state};
use super::error::CryptoError;
use super::kdf::{self, AeadKey, LABEL_SENDER_KEY_MESSAGE};
use super::keys::sign;
use super::ratchet::{MAX_PLAINTEXT_LEN, TAG_LEN};
use super::secret::{Hex, Secret32};

/// Maximum number of iterations a message may be ahead of the receiving chain.
pub const MAX_GROUP_FORWARD: u32 = 2000;
/// Maximum number of skipped message keys kept per sender.
pub const MAX_GROUP_SKIPPED_KEYS: usize = 2000;
/// Maximum number of sender keys in a [`SenderKeyStore`].
pub const MAX_SENDER_KEYS: usize = 10_000;
/// Maximum number of sender keys of one sender in a [`SenderKeyStore`] (groups and epochs
/// together), so that one member cannot fill the store for every group.
pub const MAX_SENDER_KEYS_PER_SENDER: usize = 256;
/// Wire tag (format version) of a [`SenderKeyDistribution`].
pub const DISTRIBUTION_VERSION: u8 = 0x20;
/// Wire tag (format version) of a [`GroupMessage`].
pub const GROUP_MESSAGE_VERSION: u8 = 0x21;

const OUTBOUND_STATE_KIND: u8 = b'O';
const INBOUND_STATE_KIND: u8 = b'I';
const STORE_STATE_KIND: u8 = b'K';
const STATE_VERSION: u8 = 1;

/// Identifies one sender key: group, epoch, sender.
type SenderKeyId = ([u8; 32], u64, [u8; 32]);

fn group_header(
    group_id: &[u8; 32],
    epoch: u64,
    sender: &[u8; 32],
    iteration: u32,
) -> [u8; GroupMessage::HEADER_LEN] {
    let mut h = [0u8; GroupMessage::HEADER_LEN];
    h[0] = GROUP_MESSAGE_VERSION;
    h[1..33].copy_from_slice(group_id);
    h[33..41].copy_from_slice(&epoch.to_be_bytes());
    h[41..73].copy_from_slice(sender);
    h[73..77].copy_from_slice(&iteration.to_be_bytes());
    h
}

/// The secret a member hands to each other member (inside a pairwise
/// session) so they can read its group messages from `iteration` on.
///
/// Encoding (141 bytes): `0x20 || group id (32) || epoch (u64 BE) || sender
/// (32) || iteration (u32 BE) || chain key (32) || signing public key (32)`.
#[derive(Clone)]
pub struct SenderKeyDistribution {
    group_id: [u8; 32],
    epoch: u64,
    sender: [u8; 32],
    iteration: u32,
    chain_key: Secret32,
    signing_public: [u8; 32],
}

impl SenderKeyDistribution {
    /// Encoded length.
    pub const LEN: usize = 1 + 32 + 8 + 32 + 4 + 32 + 32;

    /// The group.
    pub fn group_id(&self) -> &[u8; 32] {
        &self.group_id
    }

    /// The membership epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sender (its ed25519 identity key). Receivers must check it equals
    /// the identity of the pairwise session this distribution arrived on.
    pub fn sender(&self) -> &[u8; 32] {
        &self.sender
    }

    /// The first iteration the chain key can decrypt.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// The sender's group signing public key.
    pub fn signing_public(&self) -> &[u8; 32] {
        &self.signing_public
    }

    /// The encoding (contains the chain key: wiped on drop, send it only
    /// through a pairwise session).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(Self::LEN));
        out.push(DISTRIBUTION_VERSION);
        out.extend_from_slice(&self.group_id);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.sender);
        out.extend_from_slice(&self.iteration.to_be_bytes());
        out.extend_from_slice(self.chain_key.as_bytes());
        out.extend_from_slice(&self.signing_public);
        out
    }

    /// Decodes the encoding; checks the signing key is a valid ed25519 point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != Self::LEN {
            return Err(CryptoError::InvalidLength {
                what: "sender key distribution",
                expected: Self::LEN,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "sender key distribution");
        r.tag(DISTRIBUTION_VERSION)?;
        let group_id = r.array()?;
        let epoch = r.u64()?;
        let sender = r.array()?;
        let iteration = r.u32()?;
        let chain_key = Secret32::from_bytes(r.array()?);
        let signing_public = r.array()?;
        r.finish()?;
        VerifyingKey::from_bytes(&signing_public).map_err(|_| CryptoError::InvalidPublicKey {
            what: "group signing key",
        })?;
        Ok(Self {
            group_id,
            epoch,
            sender,
            iteration,
            chain_key,
            signing_public,
        })
    }
}

#[cfg(test)]
impl SenderKeyDistribution {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        vec![self.chain_key.as_bytes().to_vec()]
    }
}

impl fmt::Debug for SenderKeyDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyDistribution")
            .field("group_id", &Hex(&self.group_id))
            .field("epoch", &self.epoch)
            .field("sender", &Hex(&self.sender))
            .field("iteration", &self.iteration)
            .field("signing_public", &Hex(&self.signing_public))
            .field("chain_key", &"<redacted>")
            .finish()
    }
}

/// An encrypted, signed group message.
///
/// Encoding: `0x21 || group id (32) || epoch (u64 BE) || sender (32) ||
/// iteration (u32 BE) || ciphertext || tag (16) || signature (64)`.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupMessage {
    group_id: [u8; 32],
    epoch: u64,
    sender: [u8; 32],
    iteration: u32,
    ciphertext: Vec<u8>,
    signature: [u8; 64],
}

impl GroupMessage {
    /// Length of the header (also the AEAD associated data).
    pub const HEADER_LEN: usize = 1 + 32 + 8 + 32 + 4;
    /// Smallest valid encoding (empty plaintext).
    pub const MIN_LEN: usize = Self::HEADER_LEN + TAG_LEN + 64;
    /// Largest valid encoding.
    pub const MAX_LEN: usize = Self::MIN_LEN + MAX_PLAINTEXT_LEN;

    /// The group.
    pub fn group_id(&self) -> &[u8; 32] {
        &self.group_id
    }

    /// The membership epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sender's identity key.
    pub fn sender(&self) -> &[u8; 32] {
        &self.sender
    }

    /// The chain iteration that encrypted this message.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    fn header(&self) -> [u8; Self::HEADER_LEN] {
        group_header(&self.group_id, self.epoch, &self.sender, self.iteration)
    }

    /// The wire encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER_LEN + self.ciphertext.len() + 64);
        out.extend_from_slice(&self.header());
        out.extend_from_slice(&self.ciphertext);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes the wire encoding; the length is checked before allocating.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() > Self::MAX_LEN {
            return Err(CryptoError::TooLarge {
                what: "group message",
                max: Self::MAX_LEN,
                got: bytes.len(),
            });
        }
        if bytes.len() < Self::MIN_LEN {
            return Err(CryptoError::InvalidLength {
                what: "group message",
                expected: Self::MIN_LEN,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "group message");
        r.tag(GROUP_MESSAGE_VERSION)?;
        let group_id = r.array()?;
        let epoch = r.u64()?;
        let sender = r.array()?;
        let iteration = r.u32()?;
        let ciphertext = r.take(bytes.len() - Self::HEADER_LEN - 64)?.to_vec();
        let signature = r.array()?;
        r.finish()?;
        Ok(Self {
            group_id,
            epoch,
            sender,
            iteration,
            ciphertext,
            signature,
        })
    }
}

impl fmt::Debug for GroupMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupMessage")
            .field("group_id", &Hex(&self.group_id))
            .field("epoch", &self.epoch)
            .field("sender", &Hex(&self.sender))
            .field("iteration", &self.iteration)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// Our own sending chain for one group and epoch.
#[derive(Clone, Serialize, Deserialize)]
pub struct OutboundSenderKey {
    group_id: [u8; 32],
    epoch: u64,
    sender: [u8; 32],
    iteration: u32,
    chain_key: Secret32,
    signing: SigningKey,
}

impl OutboundSenderKey {
    /// A fresh sender key for `sender` (our ed25519 identity key) in
    /// `group_id` at `epoch`, starting at iteration 0.
    pub fn new<R: CryptoRng + RngCore>(
        rng: &mut R,
        group_id: [u8; 32],
        epoch: u64,
        sender: [u8; 32],
    ) -> Self {
        let chain_key = Secret32::random(rng);
        let seed = Secret32::random(rng);
        Self {
            group_id,
            epoch,
            sender,
            iteration: 0,
            chain_key,
            signing: SigningKey::from_bytes(seed.as_bytes()),
        }
    }

    /// The distribution message for other members (current iteration: they
    /// can read messages from now on, not earlier ones).
    pub fn distribution(&self) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group_id: self.group_id,
            epoch: self.epoch,
            sender: self.sender,
            iteration: self.iteration,
            chain_key: self.chain_key.clone(),
            signing_public: self.signing.verifying_key().to_bytes(),
        }
    }

    /// The next iteration to be used.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// Encrypts and signs `plaintext` (at most [`MAX_PLAINTEXT_LEN`] bytes)
    /// and advances the chain.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<GroupMessage, CryptoError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::TooLarge {
                what: "plaintext",
                max: MAX_PLAINTEXT_LEN,
                got: plaintext.len(),
            });
        }
        let next_iteration =
            self.iteration
                .checked_add(1)
                .ok_or(CryptoError::CounterExhausted {
                    what: "sender key chain",
                })?;
        let header = group_header(&self.group_id, self.epoch, &self.sender, self.iteration);
        let (next, mk) = kdf::kdf_ck(self.chain_key.as_bytes())?;
        let ciphertext =
            AeadKey::expand(&mk, LABEL_SENDER_KEY_MESSAGE)?.seal(&header, plaintext)?;
        let signature = sign(
            &self.signing,
            kdf::SIGN_GROUP_MESSAGE,
            &[&header, &ciphertext],
        );
        let message = GroupMessage {
            group_id: self.group_id,
            epoch: self.epoch,
            sender: self.sender,
            iteration: self.iteration,
            ciphertext,
            signature,
        };
        self.chain_key = Secret32::copy_from(&next);
        self.iteration = next_iteration;
        Ok(message)
    }

    /// Versioned persistent encoding (`'O' || 0x01 || postcard`), wiped on drop.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        encode_state(
            OUTBOUND_STATE_KIND,
            STATE_VERSION,
            "outbound sender key",
            self,
        )
    }

    /// Decodes [`Self::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        decode_state(
            OUTBOUND_STATE_KIND,
            STATE_VERSION,
            "outbound sender key",
            bytes,
        )
    }
}

#[cfg(test)]
impl OutboundSenderKey {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        vec![
            self.chain_key.as_bytes().to_vec(),
            self.signing.to_bytes().to_vec(),
        ]
    }
}

impl fmt::Debug for OutboundSenderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSenderKey")
            .field("group_id", &Hex(&self.group_id))
            .field("epoch", &self.epoch)
            .field("sender", &Hex(&self.sender))
            .field("iteration", &self.iteration)
            .field(
                "signing_public",
                &Hex(&self.signing.verifying_key().to_bytes()),
            )
            .field("secrets", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct SkippedGroupKey {
    iteration: u32,
    message_key: Secret32,
}

/// Another member's chain, as received in a [`SenderKeyDistribution`].
#[derive(Clone, Serialize, Deserialize)]
pub struct InboundSenderKey {
    group_id: [u8; 32],
    epoch: u64,
    sender: [u8; 32],
    iteration: u32,
    chain_key: Secret32,
    signing_public: [u8; 32],
    skipped: VecDeque<SkippedGroupKey>,
}

impl InboundSenderKey {
    /// Builds the receiving state from a distribution.
    pub fn from_distribution(distribution: &SenderKeyDistribution) -> Result<Self, CryptoError> {
        VerifyingKey::from_bytes(&distribution.signing_public).map_err(|_| {
            CryptoError::InvalidPublicKey {
                what: "group signing key",
            }
        })?;
        Ok(Self {
            group_id: distribution.group_id,
            epoch: distribution.epoch,
            sender: distribution.sender,
            iteration: distribution.iteration,
            chain_key: distribution.chain_key.clone(),
            signing_public: distribution.signing_public,
            skipped: VecDeque::new(),
        })
    }

    fn id(&self) -> SenderKeyId {
        (self.group_id, self.epoch, self.sender)
    }

    /// The next iteration expected in order.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// Number of stored skipped message keys.
    pub fn skipped_message_keys(&self) -> usize {
        self.skipped.len()
    }

    /// Verifies and decrypts a group message. Transactional: on error nothing
    /// changes.
    pub fn decrypt(&mut self, message: &GroupMessage) -> Result<Vec<u8>, CryptoError> {
        if message.group_id != self.group_id {
            return Err(CryptoError::GroupMismatch { field: "group id" });
        }
        if message.epoch != self.epoch {
            return Err(CryptoError::GroupMismatch { field: "epoch" });
        }
        if message.sender != self.sender {
            return Err(CryptoError::GroupMismatch { field: "sender" });
        }
        let header = message.header();
        let key = VerifyingKey::from_bytes(&self.signing_public).map_err(|_| {
            CryptoError::InvalidPublicKey {
                what: "group signing key",
            }
        })?;
        let mut signed = Vec::with_capacity(
            kdf::SIGN_GROUP_MESSAGE.len() + header.len() + message.ciphertext.len(),
        );
        signed.extend_from_slice(kdf::SIGN_GROUP_MESSAGE);
        signed.extend_from_slice(&header);
        signed.extend_from_slice(&message.ciphertext);
        key.verify_strict(&signed, &Signature::from_bytes(&message.signature))
            .map_err(|_| CryptoError::InvalidSignature {
                what: "group message",
            })?;

        if message.iteration < self.iteration {
            let pos = self
                .skipped
                .iter()
                .position(|k| k.iteration == message.iteration)
                .ok_or(CryptoError::DuplicateMessage {
                    index: message.iteration,
                })?;
            let plaintext = self
                .skipped
                .get(pos)
                .ok_or(CryptoError::InvalidState {
                    reason: "skipped key vanished",
                })
                .and_then(|k| AeadKey::expand(k.message_key.as_bytes(), LABEL_SENDER_KEY_MESSAGE))?
                .open(&header, &message.ciphertext)?;
            self.skipped.remove(pos);
            return Ok(plaintext);
        }
        if message.iteration - self.iteration > MAX_GROUP_FORWARD {
            return Err(CryptoError::TooFarAhead {
                current: self.iteration,
                got: message.iteration,
                max: MAX_GROUP_FORWARD,
            });
        }
        let next_iteration =
            message
                .iteration
                .checked_add(1)
                .ok_or(CryptoError::CounterExhausted {
                    what: "sender key chain",
                })?;
        let mut chain_key = self.chain_key.clone();
        let mut new_skipped = Vec::new();
        for iteration in self.iteration..message.iteration {
            let (next, mk) = kdf::kdf_ck(chain_key.as_bytes())?;
            new_skipped.push(SkippedGroupKey {
                iteration,
                message_key: Secret32::copy_from(&mk),
            });
            chain_key = Secret32::copy_from(&next);
        }
        let (next, mk) = kdf::kdf_ck(chain_key.as_bytes())?;
        let plaintext =
            AeadKey::expand(&mk, LABEL_SENDER_KEY_MESSAGE)?.open(&header, &message.ciphertext)?;

        // Commit.
        self.chain_key = Secret32::copy_from(&next);
        self.iteration = next_iteration;
        self.skipped.extend(new_skipped);
        while self.skipped.len() > MAX_GROUP_SKIPPED_KEYS {
            self.skipped.pop_front();
        }
        Ok(plaintext)
    }

    fn check(&self) -> Result<(), CryptoError> {
        if self.skipped.len() > MAX_GROUP_SKIPPED_KEYS {
            return Err(CryptoError::malformed(
                "inbound sender key",
                "too many skipped keys",
            ));
        }
        VerifyingKey::from_bytes(&self.signing_public).map_err(|_| {
            CryptoError::InvalidPublicKey {
                what: "group signing key",
            }
        })?;
        Ok(())
    }

    /// Versioned persistent encoding (`'I' || 0x01 || postcard`), wiped on drop.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        encode_state(
            INBOUND_STATE_KIND,
            STATE_VERSION,
            "inbound sender key",
            self,
        )
    }

    /// Decodes [`Self::to_bytes`] output, checking invariants.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let key: Self = decode_state(
            INBOUND_STATE_KIND,
            STATE_VERSION,
            "inbound sender key",
            bytes,
        )?;
        key.check()?;
        Ok(key)
    }
}

#[cfg(test)]
impl InboundSenderKey {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        let mut out = vec![self.chain_key.as_bytes().to_vec()];
        out.extend(
            self.skipped
                .iter()
                .map(|k| k.message_key.as_bytes().to_vec()),
        );
        out
    }
}

impl fmt::Debug for InboundSenderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundSenderKey")
            .field("group_id", &Hex(&self.group_id))
            .field("epoch", &self.epoch)
            .field("sender", &Hex(&self.sender))
            .field("iteration", &self.iteration)
            .field("signing_public", &Hex(&self.signing_public))
            .field("skipped_keys", &self.skipped.len())
            .field("chain_key", &"<redacted>")
            .finish()
    }
}

/// All inbound sender keys of this device, looked up by (group, epoch, sender).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SenderKeyStore {
    keys: BTreeMap<SenderKeyId, InboundSenderKey>,
}

impl SenderKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the sender key of a distribution. Returns `Ok(false)` and keeps
    /// the existing state if that (group, epoch, sender) is already known, so
    /// a re-sent distribution cannot rewind the chain (replays).
    pub fn add(&mut self, distribution: &SenderKeyDistribution) -> Result<bool, CryptoError> {
        let key = InboundSenderKey::from_distribution(distribution)?;
        let id = key.id();
        if self.keys.contains_key(&id) {
            return Ok(false);
        }
        if self.keys.len() >= MAX_SENDER_KEYS {
            return Err(CryptoError::TooLarge {
                what: "sender key store",
                max: MAX_SENDER_KEYS,
                got: self.keys.len() + 1,
            });
        }
        let of_sender = self.keys.keys().filter(|(_, _, s)| *s == id.2).count();
        if of_sender >= MAX_SENDER_KEYS_PER_SENDER {
            return Err(CryptoError::TooLarge {
                what: "sender keys of one sender",
                max: MAX_SENDER_KEYS_PER_SENDER,
                got: of_sender + 1,
            });
        }
        self.keys.insert(id, key);
        Ok(true)
    }

    /// Decrypts a group message with the matching sender key
    /// ([`CryptoError::UnknownSender`] if none).
    pub fn decrypt(&mut self, message: &GroupMessage) -> Result<Vec<u8>, CryptoError> {
        self.keys
            .get_mut(&(message.group_id, message.epoch, message.sender))
            .ok_or(CryptoError::UnknownSender)?
            .decrypt(message)
    }

    /// The sender key for (group, epoch, sender), if known.
    pub fn get(
        &self,
        group_id: &[u8; 32],
        epoch: u64,
        sender: &[u8; 32],
    ) -> Option<&InboundSenderKey> {
        self.keys.get(&(*group_id, epoch, *sender))
    }

    /// Forgets every sender key of `group_id` with an epoch below `epoch`
    /// (after a membership change). Returns how many were removed.
    pub fn remove_epochs_before(&mut self, group_id: &[u8; 32], epoch: u64) -> usize {
        let before = self.keys.len();
        self.keys
            .retain(|(g, e, _), _| g != group_id || *e >= epoch);
        before - self.keys.len()
    }

    /// Forgets every sender key of `group_id`.
    pub fn remove_group(&mut self, group_id: &[u8; 32]) -> usize {
        let before = self.keys.len();
        self.keys.retain(|(g, _, _), _| g != group_id);
        before - self.keys.len()
    }

    /// Number of sender keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Versioned persistent encoding (`'K' || 0x01 || postcard`), wiped on drop.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        encode_state(STORE_STATE_KIND, STATE_VERSION, "sender key store", self)
    }

    /// Decodes [`Self::to_bytes`] output, checking invariants.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let store: Self = decode_state(STORE_STATE_KIND, STATE_VERSION, "sender key store", bytes)?;
        if store.keys.len() > MAX_SENDER_KEYS {
            return Err(CryptoError::malformed(
                "sender key store",
                "too many sender keys",
            ));
        }
        for (id, key) in &store.keys {
            if *id != key.id() {
                return Err(CryptoError::malformed(
                    "sender key store",
                    "key id mismatch",
                ));
            }
            key.check()?;
        }
        Ok(store)
    }
}

impl fmt::Debug for SenderKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.values()).finish()
    }
}
