//! The Double Ratchet (Signal "The Double Ratchet Algorithm", rev. 4) with
//! header fields in the clear and ChaCha20-Poly1305 as AEAD.
//!
//! * `KDF_RK`, `KDF_CK` and the message-key expansion are in [`super::kdf`].
//! * Header: ratchet public key (32) || PN (u32 BE) || N (u32 BE), 40 bytes,
//!   fixed length, so `AEAD-AD = X3DH AD (128) || header (40) || caller AD`
//!   is unambiguous.
//! * `MAX_SKIP` = [`MAX_SKIP`] message keys may be skipped per chain step; at
//!   most [`MAX_SKIPPED_KEYS`] skipped keys are stored, the oldest evicted.
//! * The sending half of a DH ratchet step is performed lazily, on the next
//!   encryption after a new remote ratchet key was received (as in
//!   vodozemac). The root-chain inputs and the wire format are exactly the
//!   specification's; decryption therefore needs no randomness.
//!
//! Invariants: each message key is expanded and used for one AEAD operation
//! only and then forgotten; decryption is transactional: all derivations
//! happen on copies and are committed only after the tag has verified, so a
//! failed decryption leaves the state bit-for-bit unchanged.

use std::collections::VecDeque;
use std::fmt;

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use super::codec::Reader;
use super::error::CryptoError;
use super::kdf::{self, AeadKey, LABEL_MESSAGE_KEYS};
use super::secret::{Hex, RatchetKeyPair, Secret32, check_x25519_public, x25519};
use super::x3dh::AD_LEN;

/// Maximum number of message keys skipped in one receiving chain step.
pub const MAX_SKIP: u32 = 1000;
/// Maximum number of skipped message keys stored per session.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// How far ahead of the receiving chain a message may be and still count as
/// [`crate::crypto::Session::decryptable_later`] (its predecessors may be on their way).
pub const MAX_AHEAD_LATER: u32 = 4 * MAX_SKIP;
/// Maximum plaintext length of one message (1 MiB).
pub const MAX_PLAINTEXT_LEN: usize = 1 << 20;
/// Length of the Poly1305 tag appended to each ciphertext.
pub const TAG_LEN: usize = 16;
/// Wire tag (format version) of a [`RatchetMessage`].
pub const MESSAGE_VERSION: u8 = 0x01;

/// A Double Ratchet message header.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The sender's current ratchet public key.
    pub ratchet_key: [u8; 32],
    /// Number of messages in the sender's previous sending chain (PN).
    pub previous_chain_length: u32,
    /// Index of this message in the current sending chain (N).
    pub index: u32,
}

impl Header {
    /// Encoded length.
    pub const LEN: usize = 40;

    /// `ratchet key || PN (u32 BE) || N (u32 BE)`.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(&self.ratchet_key);
        out[32..36].copy_from_slice(&self.previous_chain_length.to_be_bytes());
        out[36..].copy_from_slice(&self.index.to_be_bytes());
        out
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, CryptoError> {
        let ratchet_key = r.array()?;
        check_x25519_public(&ratchet_key, "ratchet key")?;
        Ok(Self {
            ratchet_key,
            previous_chain_length: r.u32()?,
            index: r.u32()?,
        })
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("ratchet_key", &Hex(&self.ratchet_key))
            .field("previous_chain_length", &self.previous_chain_length)
            .field("index", &self.index)
            .finish()
    }
}

/// An encrypted Double Ratchet message: `0x01 || header (40) || ciphertext || tag (16)`.
#[derive(Clone, PartialEq, Eq)]
pub struct RatchetMessage {
    header: Header,
    ciphertext: Vec<u8>,
}

impl RatchetMessage {
    /// Smallest valid encoding (empty plaintext).
    pub const MIN_LEN: usize = 1 + Header::LEN + TAG_LEN;
    /// Largest valid encoding.
    pub const MAX_LEN: usize = Self::MIN_LEN + MAX_PLAINTEXT_LEN;

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Ciphertext with its tag.
    pub fn ciphertext(&self) -> &[u8] {
        &self.ciphertext
    }

    /// The wire encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + Header::LEN + self.ciphertext.len());
        out.push(MESSAGE_VERSION);
        out.extend_from_slice(&self.header.to_bytes());
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Decodes the wire encoding; the length is checked before allocating.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() > Self::MAX_LEN {
            return Err(CryptoError::TooLarge {
                what: "ratchet message",
                max: Self::MAX_LEN,
                got: bytes.len(),
            });
        }
        if bytes.len() < Self::MIN_LEN {
            return Err(CryptoError::InvalidLength {
                what: "ratchet message",
                expected: Self::MIN_LEN,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "ratchet message");
        r.tag(MESSAGE_VERSION)?;
        let header = Header::read(&mut r)?;
        let ciphertext = r.rest().to_vec();
        Ok(Self { header, ciphertext })
    }
}

impl fmt::Debug for RatchetMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RatchetMessage")
            .field("header", &self.header)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Chain {
    key: Secret32,
    index: u32,
}

#[derive(Clone, Serialize, Deserialize)]
struct SkippedKey {
    ratchet_key: [u8; 32],
    index: u32,
    message_key: Secret32,
}

/// Double Ratchet state (one side of a pairwise session).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct DoubleRatchet {
    /// X3DH associated data (both identities), prefixed to every AEAD AD.
    associated_data: Vec<u8>,
    root_key: Secret32,
    /// DHs. `None` only for an initiator that has not encrypted yet.
    our_ratchet: Option<RatchetKeyPair>,
    /// DHr.
    their_ratchet: Option<[u8; 32]>,
    /// CKs and Ns; `None` until the (lazy) sending half of a DH step runs.
    sending: Option<Chain>,
    /// CKr and Nr.
    receiving: Option<Chain>,
    /// PN.
    previous_sending_length: u32,
    /// MKSKIPPED, oldest first.
    skipped: VecDeque<SkippedKey>,
}

/// Derives keys of `chain` up to (excluding) `until` into `out`.
fn skip_keys(
    chain: &mut Chain,
    ratchet_key: [u8; 32],
    until: u32,
    out: &mut Vec<SkippedKey>,
) -> Result<(), CryptoError> {
    if u64::from(until) > u64::from(chain.index) + u64::from(MAX_SKIP) {
        return Err(CryptoError::TooFarAhead {
            current: chain.index,
            got: until,
            max: MAX_SKIP,
        });
    }
    while chain.index < until {
        let (next, mk) = kdf::kdf_ck(chain.key.as_bytes())?;
        out.push(SkippedKey {
            ratchet_key,
            index: chain.index,
            message_key: Secret32::copy_from(&mk),
        });
        chain.key = Secret32::copy_from(&next);
        chain.index += 1;
    }
    Ok(())
}

impl DoubleRatchet {
    /// Alice: knows SK and Bob's signed prekey (his first ratchet key).
    pub(crate) fn new_initiator(
        shared_secret: Secret32,
        their_ratchet: [u8; 32],
        associated_data: Vec<u8>,
    ) -> Self {
        Self {
            associated_data,
            root_key: shared_secret,
            our_ratchet: None,
            their_ratchet: Some(their_ratchet),
            sending: None,
            receiving: None,
            previous_sending_length: 0,
            skipped: VecDeque::new(),
        }
    }

    /// Bob: knows SK; his signed prekey pair is his first ratchet key pair.
    pub(crate) fn new_responder(
        shared_secret: Secret32,
        our_ratchet: RatchetKeyPair,
        associated_data: Vec<u8>,
    ) -> Self {
        Self {
            associated_data,
            root_key: shared_secret,
            our_ratchet: Some(our_ratchet),
            their_ratchet: None,
            sending: None,
            receiving: None,
            previous_sending_length: 0,
            skipped: VecDeque::new(),
        }
    }

    /// Number of stored skipped message keys.
    pub(crate) fn skipped_len(&self) -> usize {
        self.skipped.len()
    }

    fn aead_ad(&self, header: &[u8; Header::LEN], caller_ad: &[u8]) -> Vec<u8> {
        let mut ad = Vec::with_capacity(self.associated_data.len() + Header::LEN + caller_ad.len());
        ad.extend_from_slice(&self.associated_data);
        ad.extend_from_slice(header);
        ad.extend_from_slice(caller_ad);
        ad
    }

    /// RatchetEncrypt. Draws a new ratchet key pair from `rng` when a new
    /// sending chain is started.
    pub(crate) fn encrypt<R: CryptoRng + RngCore>(
        &mut self,
        rng: &mut R,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> Result<RatchetMessage, CryptoError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::TooLarge {
                what: "plaintext",
                max: MAX_PLAINTEXT_LEN,
                got: plaintext.len(),
            });
        }
        if self.sending.is_none() {
            // Sending half of the DH ratchet step.
            let their = self.their_ratchet.ok_or(CryptoError::InvalidState {
                reason: "no remote ratchet key",
            })?;
            let pair = RatchetKeyPair::generate(rng);
            let dh = x25519(&pair.secret, &their, "ratchet key")?;
            let (rk, ck) = kdf::kdf_rk(self.root_key.as_bytes(), &dh)?;
            self.root_key = Secret32::copy_from(&rk);
            self.our_ratchet = Some(pair);
            self.sending = Some(Chain {
                key: Secret32::copy_from(&ck),
                index: 0,
            });
        }
        let (Some(chain), Some(ours)) = (self.sending.as_ref(), self.our_ratchet.as_ref()) else {
            return Err(CryptoError::InvalidState {
                reason: "no sending chain",
            });
        };
        let next_index = chain
            .index
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted {
                what: "sending chain",
            })?;
        let header = Header {
            ratchet_key: ours.public,
            previous_chain_length: self.previous_sending_length,
            index: chain.index,
        };
        let (next, mk) = kdf::kdf_ck(chain.key.as_bytes())?;
        let ad = self.aead_ad(&header.to_bytes(), associated_data);
        let ciphertext = AeadKey::expand(&mk, LABEL_MESSAGE_KEYS)?.seal(&ad, plaintext)?;
        if let Some(chain) = self.sending.as_mut() {
            chain.key = Secret32::copy_from(&next);
            chain.index = next_index;
        }
        Ok(RatchetMessage { header, ciphertext })
    }

    /// The current sending chain: our ratchet public key and the index its next message
    /// gets. `None` until a sending chain exists (before the first encryption, and after a
    /// new remote ratchet key until the next one).
    pub(crate) fn sending_position(&self) -> Option<([u8; 32], u32)> {
        match (&self.sending, &self.our_ratchet) {
            (Some(chain), Some(ours)) => Some((ours.public, chain.index)),
            _ => None,
        }
    }

    /// Moves the sending chain whose ratchet public key is `ratchet_key` on to index
    /// `until`, deriving and forgetting the message keys before it, so that no later
    /// message reuses one of them. Returns whether it moved (the current sending chain is
    /// another one, or already there). At most [`MAX_SKIP`] positions: the receiver skips
    /// no more than that at once.
    pub(crate) fn skip_sending(
        &mut self,
        ratchet_key: &[u8; 32],
        until: u32,
    ) -> Result<bool, CryptoError> {
        let ours = self.our_ratchet.as_ref().map(|p| p.public);
        let Some(chain) = self.sending.as_mut() else {
            return Ok(false);
        };
        if ours.as_ref() != Some(ratchet_key) || chain.index >= until {
            return Ok(false);
        }
        if u64::from(until) > u64::from(chain.index) + u64::from(MAX_SKIP) {
            return Err(CryptoError::TooFarAhead {
                current: chain.index,
                got: until,
                max: MAX_SKIP,
            });
        }
        let mut key = Secret32::copy_from(chain.key.as_bytes());
        for _ in chain.index..until {
            let (next, _message_key) = kdf::kdf_ck(key.as_bytes())?;
            key = Secret32::copy_from(&next);
        }
        chain.key = key;
        chain.index = until;
        Ok(true)
    }

    /// Whether `header` continues the current receiving chain beyond the keys skipped at
    /// once (`MAX_SKIP`) but at most [`MAX_AHEAD_LATER`] ahead: once the messages before it
    /// are decrypted, it is within reach. Reads only public header fields.
    pub(crate) fn decryptable_later(&self, header: &Header) -> bool {
        let Some(chain) = &self.receiving else {
            return false;
        };
        let ahead = u64::from(header.index).saturating_sub(u64::from(chain.index));
        self.their_ratchet == Some(header.ratchet_key)
            && ahead > u64::from(MAX_SKIP)
            && ahead <= u64::from(MAX_AHEAD_LATER)
    }

    /// RatchetDecrypt, transactional.
    pub(crate) fn decrypt(
        &mut self,
        message: &RatchetMessage,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let header = message.header;
        let ad = self.aead_ad(&header.to_bytes(), associated_data);

        // TrySkippedMessageKeys.
        if let Some(pos) = self
            .skipped
            .iter()
            .position(|k| k.index == header.index && k.ratchet_key == header.ratchet_key)
        {
            let plaintext = self
                .skipped
                .get(pos)
                .ok_or(CryptoError::InvalidState {
                    reason: "skipped key vanished",
                })
                .and_then(|k| AeadKey::expand(k.message_key.as_bytes(), LABEL_MESSAGE_KEYS))?
                .open(&ad, &message.ciphertext)?;
            self.skipped.remove(pos);
            return Ok(plaintext);
        }

        let mut new_skipped = Vec::new();
        let ratchet_step = self.their_ratchet != Some(header.ratchet_key);
        let (new_root, mut chain) = if ratchet_step {
            if let (Some(current), Some(their)) = (self.receiving.as_ref(), self.their_ratchet) {
                let mut current = current.clone();
                skip_keys(
                    &mut current,
                    their,
                    header.previous_chain_length,
                    &mut new_skipped,
                )?;
            }
            let ours = self.our_ratchet.as_ref().ok_or(CryptoError::InvalidState {
                reason: "no local ratchet key",
            })?;
            let dh = x25519(&ours.secret, &header.ratchet_key, "ratchet key")?;
            let (rk, ck) = kdf::kdf_rk(self.root_key.as_bytes(), &dh)?;
            (
                Some(Secret32::copy_from(&rk)),
                Chain {
                    key: Secret32::copy_from(&ck),
                    index: 0,
                },
            )
        } else {
            let chain = self.receiving.clone().ok_or(CryptoError::InvalidState {
                reason: "no receiving chain",
            })?;
            (None, chain)
        };
        if header.index < chain.index {
            return Err(CryptoError::DuplicateMessage {
                index: header.index,
            });
        }
        let next_index = header
            .index
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted {
                what: "receiving chain",
            })?;
        skip_keys(
            &mut chain,
            header.ratchet_key,
            header.index,
            &mut new_skipped,
        )?;
        let (next, mk) = kdf::kdf_ck(chain.key.as_bytes())?;
        let plaintext = AeadKey::expand(&mk, LABEL_MESSAGE_KEYS)?.open(&ad, &message.ciphertext)?;

        // Commit.
        chain.key = Secret32::copy_from(&next);
        chain.index = next_index;
        if let Some(root) = new_root {
            self.root_key = root;
            self.their_ratchet = Some(header.ratchet_key);
            if let Some(sending) = self.sending.take() {
                self.previous_sending_length = sending.index;
            }
        }
        self.receiving = Some(chain);
        self.skipped.extend(new_skipped);
        while self.skipped.len() > MAX_SKIPPED_KEYS {
            self.skipped.pop_front();
        }
        Ok(plaintext)
    }

    /// Checks invariants of decoded state.
    pub(crate) fn check(&self) -> Result<(), CryptoError> {
        const WHAT: &str = "session state";
        if self.associated_data.len() != AD_LEN {
            return Err(CryptoError::malformed(WHAT, "bad associated data length"));
        }
        if self.skipped.len() > MAX_SKIPPED_KEYS {
            return Err(CryptoError::malformed(WHAT, "too many skipped keys"));
        }
        if self.sending.is_some() && self.our_ratchet.is_none() {
            return Err(CryptoError::malformed(
                WHAT,
                "sending chain without ratchet key",
            ));
        }
        if self.receiving.is_some() && self.their_ratchet.is_none() {
            return Err(CryptoError::malformed(
                WHAT,
                "receiving chain without remote key",
            ));
        }
        if let Some(pair) = &self.our_ratchet {
            pair.check(WHAT)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl DoubleRatchet {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        let mut out = vec![self.root_key.as_bytes().to_vec()];
        out.extend(
            self.our_ratchet
                .iter()
                .map(|p| p.secret.as_bytes().to_vec()),
        );
        out.extend(self.sending.iter().map(|c| c.key.as_bytes().to_vec()));
        out.extend(self.receiving.iter().map(|c| c.key.as_bytes().to_vec()));
        out.extend(
            self.skipped
                .iter()
                .map(|k| k.message_key.as_bytes().to_vec()),
        );
        out
    }
}

impl fmt::Debug for DoubleRatchet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoubleRatchet")
            .field(
                "our_ratchet",
                &self.our_ratchet.as_ref().map(|p| Hex(&p.public)),
            )
            .field(
                "their_ratchet",
                &self.their_ratchet.as_ref().map(|k| Hex(k)),
            )
            .field("sent", &self.sending.as_ref().map(|c| c.index))
            .field("received", &self.receiving.as_ref().map(|c| c.index))
            .field("previous_sending_length", &self.previous_sending_length)
            .field("skipped_keys", &self.skipped.len())
            .finish_non_exhaustive()
    }
}
