//! Pairwise sessions: X3DH setup wrapped around the Double Ratchet.
//!
//! The initiator builds a [`Session`] from the peer's [`PrekeyBundle`] and,
//! until it has decrypted a reply, wraps every message in a [`PreKeyMessage`]
//! carrying what the responder needs to run X3DH (initiator identity,
//! ephemeral key, signed-prekey id, optional one-time-prekey id), exactly as
//! the X3DH specification suggests. The responder creates its session with
//! [`Session::accept`] from such a message.
//!
//! Invariants: a one-time prekey is consumed only after the first message
//! decrypted successfully; any failure leaves the session (and the prekey
//! store) unchanged; the X3DH header fields are authenticated implicitly (any
//! change yields a different shared secret and the AEAD tag fails). Without a
//! one-time prekey the first message can be replayed to create a duplicate
//! responder session (documented in `docs/SECURITY.md`); callers must check
//! [`Session::remote_identity`] against the contact they expect.

use std::fmt;

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::codec::{Reader, decode_state, encode_state, put_optional_u32};
use super::error::CryptoError;
use super::keys::{IdentityKeys, IdentityPublic, LocalPrekeys, PrekeyBundle};
use super::ratchet::{DoubleRatchet, RatchetMessage};
use super::secret::{Hex, RatchetKeyPair, check_x25519_public};
use super::x3dh;

/// Wire tag (format version) of a [`PreKeyMessage`].
pub const PREKEY_MESSAGE_VERSION: u8 = 0x02;

const SESSION_STATE_KIND: u8 = b'S';
const SESSION_STATE_VERSION: u8 = 1;

/// A first-flight message: X3DH parameters plus a Double Ratchet message.
///
/// Encoding: `0x02 || initiator identity (128) || ephemeral key (32) ||
/// signed prekey id (u32 BE) || one-time flag (0/1) || one-time id (u32 BE,
/// zero when absent) || ratchet message encoding`.
#[derive(Clone, PartialEq, Eq)]
pub struct PreKeyMessage {
    identity: IdentityPublic,
    ephemeral_key: [u8; 32],
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
    message: RatchetMessage,
}

impl PreKeyMessage {
    /// Length of the fields preceding the ratchet message.
    pub const PREFIX_LEN: usize = 1 + IdentityPublic::LEN + 32 + 4 + 5;
    /// Largest valid encoding.
    pub const MAX_LEN: usize = Self::PREFIX_LEN + RatchetMessage::MAX_LEN;

    /// The initiator's identity.
    pub fn identity(&self) -> &IdentityPublic {
        &self.identity
    }

    /// The initiator's ephemeral X25519 key (EK_A).
    pub fn ephemeral_key(&self) -> &[u8; 32] {
        &self.ephemeral_key
    }

    /// The responder's signed prekey id that was used.
    pub fn signed_prekey_id(&self) -> u32 {
        self.signed_prekey_id
    }

    /// The responder's one-time prekey id that was used, if any.
    pub fn one_time_prekey_id(&self) -> Option<u32> {
        self.one_time_prekey_id
    }

    /// The embedded ratchet message.
    pub fn message(&self) -> &RatchetMessage {
        &self.message
    }

    /// The wire encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let inner = self.message.to_bytes();
        let mut out = Vec::with_capacity(Self::PREFIX_LEN + inner.len());
        out.push(PREKEY_MESSAGE_VERSION);
        out.extend_from_slice(&self.identity.to_bytes());
        out.extend_from_slice(&self.ephemeral_key);
        out.extend_from_slice(&self.signed_prekey_id.to_be_bytes());
        put_optional_u32(&mut out, self.one_time_prekey_id);
        out.extend_from_slice(&inner);
        out
    }

    /// Decodes the wire encoding; the length is checked before allocating.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() > Self::MAX_LEN {
            return Err(CryptoError::TooLarge {
                what: "prekey message",
                max: Self::MAX_LEN,
                got: bytes.len(),
            });
        }
        if bytes.len() < Self::PREFIX_LEN + RatchetMessage::MIN_LEN {
            return Err(CryptoError::InvalidLength {
                what: "prekey message",
                expected: Self::PREFIX_LEN + RatchetMessage::MIN_LEN,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "prekey message");
        r.tag(PREKEY_MESSAGE_VERSION)?;
        let identity = IdentityPublic::read(&mut r)?;
        let ephemeral_key = r.array()?;
        check_x25519_public(&ephemeral_key, "ephemeral key")?;
        let signed_prekey_id = r.u32()?;
        let one_time_prekey_id = r.optional_u32()?;
        let message = RatchetMessage::from_bytes(r.rest())?;
        Ok(Self {
            identity,
            ephemeral_key,
            signed_prekey_id,
            one_time_prekey_id,
            message,
        })
    }
}

impl fmt::Debug for PreKeyMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreKeyMessage")
            .field("identity", &self.identity)
            .field("ephemeral_key", &Hex(&self.ephemeral_key))
            .field("signed_prekey_id", &self.signed_prekey_id)
            .field("one_time_prekey_id", &self.one_time_prekey_id)
            .field("message", &self.message)
            .finish()
    }
}

/// Any pairwise message: a first-flight [`PreKeyMessage`] or a normal
/// [`RatchetMessage`]. The first byte of the encoding tells them apart.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Message {
    /// Sent by the initiator until it has received a reply.
    PreKey(PreKeyMessage),
    /// Every other message.
    Normal(RatchetMessage),
}

impl Message {
    /// The wire encoding (that of the variant).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::PreKey(m) => m.to_bytes(),
            Self::Normal(m) => m.to_bytes(),
        }
    }

    /// Decodes either variant, dispatching on the first byte.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        match bytes.first() {
            Some(&PREKEY_MESSAGE_VERSION) => PreKeyMessage::from_bytes(bytes).map(Self::PreKey),
            Some(&super::ratchet::MESSAGE_VERSION) => {
                RatchetMessage::from_bytes(bytes).map(Self::Normal)
            }
            Some(&got) => Err(CryptoError::UnsupportedVersion {
                what: "message",
                expected: super::ratchet::MESSAGE_VERSION,
                got,
            }),
            None => Err(CryptoError::InvalidLength {
                what: "message",
                expected: RatchetMessage::MIN_LEN,
                got: 0,
            }),
        }
    }

    /// The ratchet message inside.
    pub fn ratchet_message(&self) -> &RatchetMessage {
        match self {
            Self::PreKey(m) => &m.message,
            Self::Normal(m) => m,
        }
    }
}

/// A position in a sending chain: the chain's ratchet public key (sent in the clear in
/// every header) and a message index. Public values only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPosition {
    /// Our ratchet public key of the chain.
    pub ratchet_key: [u8; 32],
    /// The index.
    pub index: u32,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingPrekey {
    ephemeral_key: [u8; 32],
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
}

#[derive(Clone, Serialize, Deserialize)]
enum Role {
    /// We started the session; `pending` is set until a reply decrypts.
    Initiator { pending: Option<PendingPrekey> },
    /// The peer started it with the ephemeral (base) key `base_key`.
    Responder { base_key: [u8; 32] },
}

/// An end-to-end encrypted pairwise session with one peer device.
#[derive(Clone, Serialize, Deserialize)]
pub struct Session {
    local_identity: IdentityPublic,
    remote_identity: IdentityPublic,
    role: Role,
    ratchet: DoubleRatchet,
}

impl Session {
    /// Starts a session to the owner of `bundle` (X3DH initiator). The bundle
    /// signatures are verified first. No message is produced yet: call
    /// [`Self::encrypt`]; messages are [`Message::PreKey`] until a reply
    /// has been decrypted.
    pub fn initiate<R: CryptoRng + RngCore>(
        rng: &mut R,
        local: &IdentityKeys,
        bundle: &PrekeyBundle,
    ) -> Result<Self, CryptoError> {
        let (out, ephemeral_key) = x3dh::initiate(rng, local, bundle)?;
        Ok(Self {
            local_identity: local.public().clone(),
            remote_identity: bundle.identity().clone(),
            role: Role::Initiator {
                pending: Some(PendingPrekey {
                    ephemeral_key,
                    signed_prekey_id: bundle.signed_prekey_id(),
                    one_time_prekey_id: bundle.one_time_prekey().map(|(id, _)| id),
                }),
            },
            ratchet: DoubleRatchet::new_initiator(
                out.shared_secret,
                *bundle.signed_prekey(),
                out.associated_data,
            ),
        })
    }

    /// Creates the responder session from a first-flight message and returns
    /// it with the decrypted plaintext. The one-time prekey named by the
    /// message is removed from `prekeys` only if decryption succeeds; on any
    /// error neither `prekeys` nor anything else is modified.
    pub fn accept(
        local: &IdentityKeys,
        prekeys: &mut LocalPrekeys,
        message: &PreKeyMessage,
        associated_data: &[u8],
    ) -> Result<(Self, Vec<u8>), CryptoError> {
        let signed_prekey = prekeys.signed_prekey_secret(message.signed_prekey_id)?;
        let one_time_prekey = match message.one_time_prekey_id {
            Some(id) => Some(prekeys.one_time_secret(id)?),
            None => None,
        };
        let out = x3dh::respond(
            local,
            signed_prekey,
            one_time_prekey,
            &message.identity,
            &message.ephemeral_key,
        )?;
        let mut ratchet = DoubleRatchet::new_responder(
            out.shared_secret,
            RatchetKeyPair::from_secret(signed_prekey.clone()),
            out.associated_data,
        );
        let plaintext = ratchet.decrypt(&message.message, associated_data)?;
        if let Some(id) = message.one_time_prekey_id {
            prekeys.consume_one_time_prekey(id)?;
        }
        let session = Self {
            local_identity: local.public().clone(),
            remote_identity: message.identity.clone(),
            role: Role::Responder {
                base_key: message.ephemeral_key,
            },
            ratchet,
        };
        Ok((session, plaintext))
    }

    /// Encrypts `plaintext` (at most [`super::ratchet::MAX_PLAINTEXT_LEN`]
    /// bytes). `associated_data` is authenticated but not sent; the receiver
    /// must pass the same bytes.
    pub fn encrypt<R: CryptoRng + RngCore>(
        &mut self,
        rng: &mut R,
        plaintext: &[u8],
        associated_data: &[u8],
    ) -> Result<Message, CryptoError> {
        let message = self.ratchet.encrypt(rng, plaintext, associated_data)?;
        Ok(match &self.role {
            Role::Initiator { pending: Some(p) } => Message::PreKey(PreKeyMessage {
                identity: self.local_identity.clone(),
                ephemeral_key: p.ephemeral_key,
                signed_prekey_id: p.signed_prekey_id,
                one_time_prekey_id: p.one_time_prekey_id,
                message,
            }),
            _ => Message::Normal(message),
        })
    }

    /// Decrypts a message of this session. Transactional: on error the
    /// session is unchanged. A [`Message::PreKey`] is accepted only by the
    /// responder session it created (same identity and ephemeral key);
    /// otherwise [`CryptoError::SessionMismatch`].
    pub fn decrypt(
        &mut self,
        message: &Message,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        match message {
            Message::Normal(m) => {
                let plaintext = self.ratchet.decrypt(m, associated_data)?;
                if let Role::Initiator { pending } = &mut self.role {
                    *pending = None;
                }
                Ok(plaintext)
            }
            Message::PreKey(m) => {
                if !self.matches(m) {
                    return Err(CryptoError::SessionMismatch);
                }
                self.ratchet.decrypt(&m.message, associated_data)
            }
        }
    }

    /// Whether `message` belongs to this session's current receiving chain but lies too far
    /// ahead to decrypt now ([`CryptoError::TooFarAhead`]), and close enough that it can be
    /// decrypted once the messages before it have been: worth retrying later, unlike a
    /// message that does not belong here. Nothing is authenticated: only the peer knows
    /// the header's ratchet key, but a header is not proof of anything.
    pub fn decryptable_later(&self, message: &Message) -> bool {
        match message {
            Message::Normal(m) => self.ratchet.decryptable_later(m.header()),
            Message::PreKey(m) => {
                self.matches(m) && self.ratchet.decryptable_later(m.message.header())
            }
        }
    }

    /// Where the current sending chain stands: the ratchet public key its messages carry
    /// and the index the next one gets (see [`ChainPosition`]). `None` while there is no
    /// sending chain (the next [`Self::encrypt`] starts one).
    pub fn sending_position(&self) -> Option<ChainPosition> {
        self.ratchet
            .sending_position()
            .map(|(ratchet_key, index)| ChainPosition { ratchet_key, index })
    }

    /// Moves the sending chain on to `to.index` if it is still the chain `to.ratchet_key`
    /// names and behind that index: the keys in between are derived and forgotten, never
    /// used. Returns whether it moved. This is how positions that may have been used by
    /// messages whose new state was lost (a crash before it was stored) are never used
    /// again; the receiver skips them as it skips lost messages.
    pub fn skip_sending_to(&mut self, to: &ChainPosition) -> Result<bool, CryptoError> {
        self.ratchet.skip_sending(&to.ratchet_key, to.index)
    }

    /// Whether `message` is a first-flight message of this (responder) session.
    pub fn matches(&self, message: &PreKeyMessage) -> bool {
        matches!(&self.role, Role::Responder { base_key }
            if *base_key == message.ephemeral_key && self.remote_identity == message.identity)
    }

    /// The peer's identity (verified during setup). Check it against the
    /// expected contact.
    pub fn remote_identity(&self) -> &IdentityPublic {
        &self.remote_identity
    }

    /// Our identity.
    pub fn local_identity(&self) -> &IdentityPublic {
        &self.local_identity
    }

    /// Whether we initiated the session.
    pub fn is_initiator(&self) -> bool {
        matches!(self.role, Role::Initiator { .. })
    }

    /// Whether we are the initiator and have not yet decrypted a reply (our
    /// messages are still [`Message::PreKey`]).
    pub fn awaiting_reply(&self) -> bool {
        matches!(self.role, Role::Initiator { pending: Some(_) })
    }

    /// Number of stored skipped message keys (bounded by
    /// [`super::ratchet::MAX_SKIPPED_KEYS`]).
    pub fn skipped_message_keys(&self) -> usize {
        self.ratchet.skipped_len()
    }

    /// Versioned persistent encoding (`'S' || 0x01 || postcard`), wiped on drop.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        encode_state(
            SESSION_STATE_KIND,
            SESSION_STATE_VERSION,
            "session state",
            self,
        )
    }

    /// Decodes [`Self::to_bytes`] output, checking kind, version and invariants.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let session: Self = decode_state(
            SESSION_STATE_KIND,
            SESSION_STATE_VERSION,
            "session state",
            bytes,
        )?;
        session.ratchet.check()?;
        Ok(session)
    }
}

#[cfg(test)]
impl Session {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        self.ratchet.test_secrets()
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("local_identity", &Hex(self.local_identity.ed25519()))
            .field("remote_identity", &Hex(self.remote_identity.ed25519()))
            .field("initiator", &self.is_initiator())
            .field("awaiting_reply", &self.awaiting_reply())
            .field("ratchet", &self.ratchet)
            .finish()
    }
}
