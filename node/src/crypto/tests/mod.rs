//! Unit tests of the encryption core (run with `cargo test -p tern-node --lib crypto`).
//!
//! Shared helpers: deterministic RNGs, a ready-made session pair, and the
//! `Debug` redaction check.

mod debug;
mod media;
mod prekeys;
mod ratchet_props;
mod sender_keys;
mod session;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::keys::{IdentityKeys, LocalPrekeys};
use super::session::{Message, Session};

/// A deterministic RNG.
pub(crate) fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

/// Alice, Bob, Bob's prekeys (with `one_time` OPKs), Alice's session to Bob.
pub(crate) struct Pair {
    pub(crate) alice: IdentityKeys,
    pub(crate) bob: IdentityKeys,
    pub(crate) bob_prekeys: LocalPrekeys,
    pub(crate) alice_session: Session,
    pub(crate) opk: Option<u32>,
}

pub(crate) fn pair(rng: &mut ChaCha20Rng, with_one_time: bool) -> Pair {
    let alice = IdentityKeys::generate(rng).unwrap();
    let bob = IdentityKeys::generate(rng).unwrap();
    let mut bob_prekeys = LocalPrekeys::new(rng, 1_000);
    let ids = bob_prekeys.generate_one_time_prekeys(rng, 3).unwrap();
    let opk = with_one_time.then(|| ids[1]);
    let bundle = bob_prekeys.bundle(&bob, opk).unwrap();
    let alice_session = Session::initiate(rng, &alice, &bundle).unwrap();
    Pair {
        alice,
        bob,
        bob_prekeys,
        alice_session,
        opk,
    }
}

/// A pair after one round trip (Alice -> Bob prekey message, Bob -> Alice
/// reply), so both sides send normal messages.
pub(crate) fn established(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let mut p = pair(rng, true);
    let first = p.alice_session.encrypt(rng, b"first", b"").unwrap();
    let Message::PreKey(first) = first else {
        panic!("first message must be a prekey message")
    };
    let (mut bob_session, pt) = Session::accept(&p.bob, &mut p.bob_prekeys, &first, b"").unwrap();
    assert_eq!(pt, b"first");
    let reply = bob_session.encrypt(rng, b"reply", b"").unwrap();
    assert_eq!(p.alice_session.decrypt(&reply, b"").unwrap(), b"reply");
    (p.alice_session, bob_session)
}

/// An established pair in which Alice has a sending chain that Bob follows (she sent
/// `first` after his reply, and he decrypted it).
pub(crate) fn following(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let (mut alice, mut bob) = established(rng);
    // Bob's reply ended her chain: her turn starts a new one.
    assert_eq!(alice.sending_position(), None);
    let first = alice.encrypt(rng, b"first", b"").unwrap();
    assert_eq!(bob.decrypt(&first, b"").unwrap(), b"first");
    (alice, bob)
}

/// Serialized state, for "unchanged after failure" comparisons.
pub(crate) fn snapshot(s: &Session) -> Vec<u8> {
    s.to_bytes().unwrap().to_vec()
}

/// Asserts that `debug` contains none of the renderings of `secret`.
pub(crate) fn assert_redacted(debug: &str, secret: &[u8]) {
    assert!(
        !secret.iter().all(|b| *b == 0),
        "test secret must not be all zero"
    );
    let lower = hex::encode(secret);
    let upper = hex::encode_upper(secret);
    let decimal = format!("{:?}", &secret[..8]);
    let decimal = decimal.trim_end_matches(']');
    for needle in [&lower[..16], &upper[..16], decimal] {
        assert!(
            !debug.contains(needle),
            "secret leaked in Debug output: {debug}"
        );
    }
}
