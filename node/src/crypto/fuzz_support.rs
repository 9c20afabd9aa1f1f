//! Entry points shared by the cargo-fuzz targets (`node/fuzz`) and the
//! corpus replay test (`node/tests/crypto_fuzz_corpus.rs`).
//!
//! Each function feeds arbitrary bytes to one decoder. Invariants checked
//! (by panicking, which is what a fuzzer detects): decoders never panic,
//! wire formats are canonical (a decoded value re-encodes to the exact input),
//! and decrypting garbage with a live session fails without changing it.
//! Not part of the stable API.

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::keys::{IdentityKeys, LocalPrekeys, PrekeyBundle};
use super::media::{self, MediaKey};
use super::sender_keys::{
    GroupMessage, InboundSenderKey, OutboundSenderKey, SenderKeyDistribution, SenderKeyStore,
};
use super::session::{Message, Session};

/// A fuzz entry point.
pub type FuzzTarget = fn(&[u8]);

/// Every target: (name, function). The name is the fuzz target and corpus
/// directory name.
pub const TARGETS: &[(&str, FuzzTarget)] = &[
    ("prekey_bundle", prekey_bundle),
    ("message", message),
    ("session_decrypt", session_decrypt),
    ("group_message", group_message),
    ("sender_key_distribution", sender_key_distribution),
    ("media_key", media_key),
    ("media_stream", media_stream),
    ("session_state", session_state),
    ("prekeys_state", prekeys_state),
    ("sender_key_state", sender_key_state),
];

/// [`PrekeyBundle::from_bytes`] + canonical re-encoding + `verify`.
pub fn prekey_bundle(data: &[u8]) {
    if let Ok(bundle) = PrekeyBundle::from_bytes(data) {
        assert_eq!(bundle.to_bytes(), data, "non-canonical bundle");
        let _ = bundle.verify();
    }
}

/// [`Message::from_bytes`] + canonical re-encoding.
pub fn message(data: &[u8]) {
    if let Ok(m) = Message::from_bytes(data) {
        assert_eq!(m.to_bytes(), data, "non-canonical message");
    }
}

/// Decrypts arbitrary bytes with a fixed, live session pair: must fail
/// (forgery) and leave the session byte-identical.
pub fn session_decrypt(data: &[u8]) {
    let Ok(m) = Message::from_bytes(data) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(7);
    let (Ok(alice), Ok(bob)) = (
        IdentityKeys::generate(&mut rng),
        IdentityKeys::generate(&mut rng),
    ) else {
        return;
    };
    let mut prekeys = LocalPrekeys::new(&mut rng, 0);
    let Ok(bundle) = prekeys.bundle(&bob, None) else {
        return;
    };
    let Ok(mut session) = Session::initiate(&mut rng, &alice, &bundle) else {
        return;
    };
    let Ok(Message::PreKey(first)) = session.encrypt(&mut rng, b"hello", b"") else {
        return;
    };
    let Ok((mut bob_session, _)) = Session::accept(&bob, &mut prekeys, &first, b"") else {
        return;
    };
    for s in [&mut session, &mut bob_session] {
        let before = s.to_bytes().map(|b| b.to_vec());
        if s.decrypt(&m, b"").is_err() {
            assert_eq!(
                before,
                s.to_bytes().map(|b| b.to_vec()),
                "failed decrypt changed state"
            );
        }
    }
    if let Message::PreKey(p) = &m {
        let before = prekeys.to_bytes().map(|b| b.to_vec());
        if Session::accept(&bob, &mut prekeys, p, b"").is_err() {
            assert_eq!(
                before,
                prekeys.to_bytes().map(|b| b.to_vec()),
                "failed accept changed prekeys"
            );
        }
    }
}

/// [`GroupMessage::from_bytes`] + canonical re-encoding.
pub fn group_message(data: &[u8]) {
    if let Ok(m) = GroupMessage::from_bytes(data) {
        assert_eq!(m.to_bytes(), data, "non-canonical group message");
        let mut store = SenderKeyStore::new();
        let _ = store.decrypt(&m);
    }
}

/// [`SenderKeyDistribution::from_bytes`] + canonical re-encoding.
pub fn sender_key_distribution(data: &[u8]) {
    if let Ok(d) = SenderKeyDistribution::from_bytes(data) {
        assert_eq!(d.to_bytes().as_slice(), data, "non-canonical distribution");
        let _ = InboundSenderKey::from_distribution(&d);
    }
}

/// [`MediaKey::from_bytes`] + canonical re-encoding.
pub fn media_key(data: &[u8]) {
    if let Ok(k) = MediaKey::from_bytes(data) {
        assert_eq!(k.to_bytes().as_slice(), data, "non-canonical media key");
    }
}

/// The fixed key of the `media_stream` target (for building seed corpora).
pub fn media_stream_key() -> MediaKey {
    MediaKey::generate(&mut StdRng::seed_from_u64(3))
}

/// Decrypts arbitrary bytes as a media stream under a fixed key, whole and
/// in small pieces; both must agree.
pub fn media_stream(data: &[u8]) {
    let key = media_stream_key();
    let whole = media::decrypt(&key, data);
    let mut dec = media::MediaDecryptor::new(&key);
    let mut out = Vec::new();
    let pieces = data
        .chunks(977)
        .try_for_each(|c| dec.update(c, &mut out))
        .and_then(|()| dec.finalize(&mut out))
        .map(|()| out);
    assert_eq!(whole.is_ok(), pieces.is_ok(), "split decryption disagrees");
}

/// [`Session::from_bytes`], then re-encoding must round-trip.
pub fn session_state(data: &[u8]) {
    if let Ok(s) = Session::from_bytes(data)
        && let Ok(bytes) = s.to_bytes()
    {
        assert!(
            Session::from_bytes(&bytes).is_ok(),
            "session state does not round-trip"
        );
    }
}

/// [`LocalPrekeys::from_bytes`], then re-encoding must round-trip.
pub fn prekeys_state(data: &[u8]) {
    if let Ok(p) = LocalPrekeys::from_bytes(data)
        && let Ok(bytes) = p.to_bytes()
    {
        assert!(
            LocalPrekeys::from_bytes(&bytes).is_ok(),
            "prekey state does not round-trip"
        );
    }
}

/// The three sender-key state decoders.
pub fn sender_key_state(data: &[u8]) {
    if let Ok(k) = OutboundSenderKey::from_bytes(data) {
        let _ = k.to_bytes();
    }
    if let Ok(k) = InboundSenderKey::from_bytes(data) {
        let _ = k.to_bytes();
    }
    if let Ok(s) = SenderKeyStore::from_bytes(data) {
        let _ = s.to_bytes();
    }
}
