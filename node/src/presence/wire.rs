//! The presence frame published on `tern/presence/1/<hash(peer id)>`: who, a sequence
//! number, and the state sealed for the owner's contacts, all signed by the owner.
//!
//! Gossipsub runs StrictNoSign (anonymous messages), so authorship is proven here: every
//! forwarder checks that the signer is the topic's owner before it forwards anything. The
//! state itself (online/away/offline, heartbeat) is encrypted with the owner's *presence
//! key*, which only its contacts hold (sent to them over the pairwise ratchet sessions), so
//! "share with contacts" holds even against a stranger who knows the peer id and
//! subscribes. Layout and rules: docs/PROTOCOL.md, "Presence".

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::identity::ed25519_public_of;

/// Version byte of a presence frame.
pub const PRESENCE_VERSION: u8 = 1;
/// Largest presence frame accepted; anything larger is rejected before decoding.
pub const MAX_PRESENCE_FRAME: usize = 512;
/// Prefix of every presence topic.
pub const TOPIC_PREFIX: &str = "tern/presence/1/";
const SIGNATURE_LABEL: &[u8] = b"tern/presence/1 sig\0";
const AD_LABEL: &[u8] = b"tern/presence/1 body\0";

/// Errors decoding or checking a presence frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PresenceWireError {
    /// Larger than [`MAX_PRESENCE_FRAME`].
    #[error("presence frame of {0} bytes is too large")]
    TooLarge(usize),
    /// Not a presence frame.
    #[error("malformed presence frame: {0}")]
    Malformed(String),
    /// Made by a newer Tern.
    #[error("unsupported presence version {0}")]
    Version(u8),
    /// The owner is not the one the topic belongs to.
    #[error("presence signed by a peer that does not own the topic")]
    WrongOwner,
    /// The signature does not verify.
    #[error("bad presence signature")]
    BadSignature,
    /// The body does not decrypt with the key we hold (not shared with us, or rotated).
    #[error("presence body does not decrypt with our key")]
    Undecryptable,
}

/// The gossipsub topic of `owner`'s presence.
pub fn topic_for(owner: &PeerId) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"tern presence topic v1\0");
    h.update(&owner.to_bytes());
    let digest = h.finalize();
    format!(
        "{TOPIC_PREFIX}{}",
        data_encoding::HEXLOWER.encode(&digest.as_bytes()[..16])
    )
}

/// A 32-byte key that seals presence bodies for contacts. Redacted in `Debug`, wiped on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
pub struct PresenceKey(pub [u8; 32]);

impl std::fmt::Debug for PresenceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresenceKey(<redacted>)")
    }
}

/// What a node says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Running and in use.
    Online,
    /// Running, but the user is idle or said so.
    Away,
    /// Stopped (sent once on a graceful shutdown).
    Offline,
}

impl State {
    /// The lowercase name shown by the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Online => "online",
            State::Away => "away",
            State::Offline => "offline",
        }
    }
}

/// The sealed part of a presence frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// The owner's state.
    pub state: State,
    /// The owner's heartbeat interval: it publishes at least this often while running.
    pub heartbeat_ms: u64,
    /// The owner's wall clock when it published, ms since the epoch.
    pub sent_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    owner: Vec<u8>,
    seq: u64,
    nonce: [u8; 24],
    sealed: Vec<u8>,
}

/// A frame whose owner and signature checked out; the body is still sealed.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The owner (the signer, and the topic's peer).
    pub owner: PeerId,
    /// The owner's sequence number: strictly increasing across its frames.
    pub seq: u64,
    nonce: [u8; 24],
    sealed: Vec<u8>,
}

fn associated_data(owner: &[u8], seq: u64) -> Vec<u8> {
    let mut ad = AD_LABEL.to_vec();
    ad.extend_from_slice(owner);
    ad.extend_from_slice(&seq.to_be_bytes());
    ad
}

fn signed_message(topic: &str, signed: &[u8]) -> Vec<u8> {
    let mut m = SIGNATURE_LABEL.to_vec();
    m.extend_from_slice(topic.as_bytes());
    m.push(0);
    m.extend_from_slice(signed);
    m
}

/// Seals `body` under `key` and signs the frame as `owner` (whose ed25519 key is
/// `signing`). `nonce` must be fresh random bytes.
pub fn seal(
    signing: &SigningKey,
    owner: &PeerId,
    key: &PresenceKey,
    seq: u64,
    body: &Body,
    nonce: [u8; 24],
) -> Vec<u8> {
    let owner_bytes = owner.to_bytes();
    let plaintext = postcard::to_stdvec(body).expect("presence body always serializes");
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let sealed = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &associated_data(&owner_bytes, seq),
            },
        )
        .expect("XChaCha20-Poly1305 encryption of a short body cannot fail");
    let signed = postcard::to_stdvec(&Signed {
        owner: owner_bytes,
        seq,
        nonce,
        sealed,
    })
    .expect("presence frame always serializes");
    let signature = signing.sign(&signed_message(&topic_for(owner), &signed));
    let mut frame = vec![PRESENCE_VERSION];
    frame.extend_from_slice(&signature.to_bytes());
    frame.extend_from_slice(&signed);
    frame
}

/// Checks a frame that arrived on `topic`: size, version, encoding, that its owner owns the
/// topic, and the owner's signature. Needs no key, so every forwarder can run it.
pub fn verify(topic: &str, frame: &[u8]) -> Result<Verified, PresenceWireError> {
    if frame.len() > MAX_PRESENCE_FRAME {
        return Err(PresenceWireError::TooLarge(frame.len()));
    }
    let (&version, rest) = frame
        .split_first()
        .ok_or_else(|| PresenceWireError::Malformed("empty".into()))?;
    if version != PRESENCE_VERSION {
        return Err(PresenceWireError::Version(version));
    }
    if rest.len() < 64 {
        return Err(PresenceWireError::Malformed("no signature".into()));
    }
    let (sig_bytes, signed_bytes) = rest.split_at(64);
    let signed: Signed = postcard::from_bytes(signed_bytes)
        .map_err(|e| PresenceWireError::Malformed(e.to_string()))?;
    let owner = PeerId::from_bytes(&signed.owner)
        .map_err(|e| PresenceWireError::Malformed(format!("owner: {e}")))?;
    if topic_for(&owner) != topic {
        return Err(PresenceWireError::WrongOwner);
    }
    let public = ed25519_public_of(&owner).ok_or(PresenceWireError::WrongOwner)?;
    let sig_array: [u8; 64] = sig_bytes
        .try_into()
        .map_err(|_| PresenceWireError::Malformed("signature".into()))?;
    public
        .verify(
            &signed_message(topic, signed_bytes),
            &Signature::from_bytes(&sig_array),
        )
        .map_err(|_| PresenceWireError::BadSignature)?;
    Ok(Verified {
        owner,
        seq: signed.seq,
        nonce: signed.nonce,
        sealed: signed.sealed,
    })
}

impl Verified {
    /// Opens the sealed body with the owner's presence key.
    pub fn open(&self, key: &PresenceKey) -> Result<Body, PresenceWireError> {
        let cipher = XChaCha20Poly1305::new((&key.0).into());
        let plaintext = cipher
            .decrypt(
                XNonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.sealed,
                    aad: &associated_data(&self.owner.to_bytes(), self.seq),
                },
            )
            .map_err(|_| PresenceWireError::Undecryptable)?;
        postcard::from_bytes(&plaintext).map_err(|e| PresenceWireError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn body() -> Body {
        Body {
            state: State::Online,
            heartbeat_ms: 30_000,
            sent_at_ms: 1_700_000_000_000,
        }
    }

    fn frame(id: &Identity, key: &PresenceKey, seq: u64) -> Vec<u8> {
        seal(&id.signing_key(), &id.peer_id(), key, seq, &body(), [7; 24])
    }

    #[test]
    fn round_trip_on_the_owners_topic() {
        let id = Identity::from_seed([1; 32]);
        let key = PresenceKey([9; 32]);
        let f = frame(&id, &key, 42);
        assert!(f.len() < MAX_PRESENCE_FRAME, "{}", f.len());
        let v = verify(&topic_for(&id.peer_id()), &f).unwrap();
        assert_eq!(v.owner, id.peer_id());
        assert_eq!(v.seq, 42);
        assert_eq!(v.open(&key).unwrap(), body());
    }

    #[test]
    fn wrong_key_cannot_open() {
        let id = Identity::from_seed([1; 32]);
        let f = frame(&id, &PresenceKey([9; 32]), 1);
        let v = verify(&topic_for(&id.peer_id()), &f).unwrap();
        assert_eq!(
            v.open(&PresenceKey([8; 32])),
            Err(PresenceWireError::Undecryptable)
        );
    }

    #[test]
    fn frame_on_someone_elses_topic_is_refused() {
        let mallory = Identity::from_seed([2; 32]);
        let bob = Identity::from_seed([3; 32]);
        let f = frame(&mallory, &PresenceKey([9; 32]), 1);
        assert_eq!(
            verify(&topic_for(&bob.peer_id()), &f).unwrap_err(),
            PresenceWireError::WrongOwner
        );
    }

    #[test]
    fn forged_owner_fails_the_signature() {
        // Mallory signs a frame that names Bob as its owner.
        let mallory = Identity::from_seed([2; 32]);
        let bob = Identity::from_seed([3; 32]);
        let f = seal(
            &mallory.signing_key(),
            &bob.peer_id(),
            &PresenceKey([9; 32]),
            1,
            &body(),
            [0; 24],
        );
        assert_eq!(
            verify(&topic_for(&bob.peer_id()), &f).unwrap_err(),
            PresenceWireError::BadSignature
        );
    }

    #[test]
    fn tampered_seq_fails_the_signature() {
        let id = Identity::from_seed([1; 32]);
        let f = frame(&id, &PresenceKey([9; 32]), 5);
        let topic = topic_for(&id.peer_id());
        // Flip every byte after the signature in turn: none may verify.
        for i in 65..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x01;
            assert!(
                verify(&topic, &g).is_err(),
                "byte {i} flipped still verified"
            );
        }
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let topic = topic_for(&Identity::from_seed([1; 32]).peer_id());
        assert!(verify(&topic, &[]).is_err());
        assert!(verify(&topic, &[1]).is_err());
        assert_eq!(
            verify(&topic, &[2, 0, 0]).unwrap_err(),
            PresenceWireError::Version(2)
        );
        assert!(matches!(
            verify(&topic, &vec![1; MAX_PRESENCE_FRAME + 1]).unwrap_err(),
            PresenceWireError::TooLarge(_)
        ));
        let mut x = 0x1234_5678u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let mut f = vec![PRESENCE_VERSION];
            f.extend(bytes);
            assert!(verify(&topic, &f).is_err());
        }
    }

    #[test]
    fn topics_differ_per_peer_and_hide_the_id() {
        let a = Identity::from_seed([1; 32]).peer_id();
        let b = Identity::from_seed([2; 32]).peer_id();
        assert_ne!(topic_for(&a), topic_for(&b));
        assert!(topic_for(&a).starts_with(TOPIC_PREFIX));
        assert!(!topic_for(&a).contains(&a.to_string()));
    }

    #[test]
    fn key_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", PresenceKey([0xAB; 32])),
            "PresenceKey(<redacted>)"
        );
    }
}
