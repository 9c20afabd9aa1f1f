//! Known-answer tests for the encryption core.
//!
//! The committed JSON files in `node/src/crypto/vectors/` were generated once
//! by this test (`TERN_REGENERATE_VECTORS=1 cargo test -p tern-node --test
//! crypto_vectors`) and pin the exact constructions: KDF outputs, a whole
//! pairwise conversation (seeded RNG, exact bytes), a sender-key chain and a
//! media stream. Any change to a label, KDF, encoding or cipher fails here.
//! Regenerate only for a deliberate, versioned format change.

// Test/bench code: panicking on unexpected errors is the point.
#![allow(clippy::unwrap_used)]

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tern_node::crypto::kdf::{self, AeadKey};
use tern_node::crypto::media::{self, CHUNK_SIZE, MediaKey};
use tern_node::crypto::{
    IdentityKeys, LocalPrekeys, Message, OutboundSenderKey, SenderKeyDistribution, SenderKeyStore,
    Session,
};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
        .collect()
}

fn arr(len_seed: u8) -> [u8; 32] {
    pattern(32, len_seed).try_into().unwrap()
}

fn check(name: &str, committed: &str, computed: Value) {
    let path = format!(
        "{}/src/crypto/vectors/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("TERN_REGENERATE_VECTORS").is_some() {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&computed).unwrap() + "\n",
        )
        .unwrap();
        return;
    }
    let committed: Value = serde_json::from_str(committed).unwrap();
    assert_eq!(committed, computed, "known-answer vector {name} changed");
}

#[test]
fn kdf_vectors() {
    let seed = arr(1);
    let dh3 = pattern(96, 2);
    let dh4 = pattern(128, 3);
    let (rk, ck) = kdf::kdf_rk(&arr(4), &arr(5)).unwrap();
    let (next, mk) = kdf::kdf_ck(&arr(6)).unwrap();
    let msg = AeadKey::expand(&arr(7), kdf::LABEL_MESSAGE_KEYS).unwrap();
    let group = AeadKey::expand(&arr(7), kdf::LABEL_SENDER_KEY_MESSAGE).unwrap();
    let identity = IdentityKeys::from_seed(&seed).unwrap();
    let computed = json!({
        "identity_x25519": {
            "seed": hex::encode(seed),
            "x25519_secret": hex::encode(*kdf::identity_x25519_secret(&seed).unwrap()),
            "public": hex::encode(identity.public().to_bytes()),
        },
        "x3dh_without_one_time": { "dh": hex::encode(&dh3), "sk": hex::encode(*kdf::x3dh(&dh3).unwrap()) },
        "x3dh_with_one_time": { "dh": hex::encode(&dh4), "sk": hex::encode(*kdf::x3dh(&dh4).unwrap()) },
        "kdf_rk": { "rk": hex::encode(arr(4)), "dh": hex::encode(arr(5)), "new_rk": hex::encode(*rk), "ck": hex::encode(*ck) },
        "kdf_ck": { "ck": hex::encode(arr(6)), "next_ck": hex::encode(*next), "mk": hex::encode(*mk) },
        "message_keys": { "mk": hex::encode(arr(7)), "key": hex::encode(msg.key_bytes()), "nonce": hex::encode(msg.nonce_bytes()) },
        "sender_key_message_keys": { "mk": hex::encode(arr(7)), "key": hex::encode(group.key_bytes()), "nonce": hex::encode(group.nonce_bytes()) },
    });
    check(
        "kdf",
        include_str!("../src/crypto/vectors/kdf.json"),
        computed,
    );
}

#[test]
fn session_vector() {
    let mut rng = ChaCha20Rng::from_seed([0x5e; 32]);
    let alice = IdentityKeys::generate(&mut rng).unwrap();
    let bob = IdentityKeys::generate(&mut rng).unwrap();
    let mut prekeys = LocalPrekeys::new(&mut rng, 0);
    let opk = prekeys.generate_one_time_prekeys(&mut rng, 1).unwrap()[0];
    let bundle = prekeys.bundle(&bob, Some(opk)).unwrap();
    let mut a = Session::initiate(&mut rng, &alice, &bundle).unwrap();
    let mut transcript = Vec::new();

    let m1 = a.encrypt(&mut rng, b"Hello Bob", b"kat").unwrap();
    let Message::PreKey(first) = &m1 else {
        panic!()
    };
    let (mut b, pt) = Session::accept(&bob, &mut prekeys, first, b"kat").unwrap();
    assert_eq!(pt, b"Hello Bob");
    transcript.push(
        json!({ "from": "alice", "plaintext": "Hello Bob", "bytes": hex::encode(m1.to_bytes()) }),
    );

    let script: [(&str, &str); 4] = [
        ("bob", "Hi Alice"),
        ("alice", "How are you?"),
        ("alice", "Still there?"),
        ("bob", "Fine, thanks"),
    ];
    for (from, text) in script {
        let (s, r) = if from == "alice" {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let m = s.encrypt(&mut rng, text.as_bytes(), b"kat").unwrap();
        let bytes = m.to_bytes();
        assert_eq!(
            r.decrypt(&Message::from_bytes(&bytes).unwrap(), b"kat")
                .unwrap(),
            text.as_bytes()
        );
        transcript.push(json!({ "from": from, "plaintext": text, "bytes": hex::encode(bytes) }));
    }
    let computed = json!({
        "rng": "ChaCha20Rng::from_seed([0x5e; 32])",
        "associated_data": hex::encode(b"kat"),
        "alice_identity": hex::encode(alice.public().to_bytes()),
        "bob_identity": hex::encode(bob.public().to_bytes()),
        "bundle": hex::encode(bundle.to_bytes()),
        "messages": transcript,
    });
    check(
        "session",
        include_str!("../src/crypto/vectors/session.json"),
        computed,
    );
}

#[test]
fn sender_key_vector() {
    let mut rng = ChaCha20Rng::from_seed([0x6b; 32]);
    let mut out = OutboundSenderKey::new(&mut rng, [0x11; 32], 1, [0x22; 32]);
    let dist = out.distribution().to_bytes();
    let mut store = SenderKeyStore::new();
    store
        .add(&SenderKeyDistribution::from_bytes(&dist).unwrap())
        .unwrap();
    let mut messages = Vec::new();
    for text in ["first", "second", "third"] {
        let m = out.encrypt(text.as_bytes()).unwrap();
        assert_eq!(store.decrypt(&m).unwrap(), text.as_bytes());
        messages.push(json!({ "plaintext": text, "bytes": hex::encode(m.to_bytes()) }));
    }
    let computed = json!({
        "rng": "ChaCha20Rng::from_seed([0x6b; 32])",
        "distribution": hex::encode(&*dist),
        "messages": messages,
    });
    check(
        "sender_key",
        include_str!("../src/crypto/vectors/sender_key.json"),
        computed,
    );
}

#[test]
fn media_vector() {
    let mut rng = ChaCha20Rng::from_seed([0x3d; 32]);
    let key = MediaKey::generate(&mut rng);
    let small = media::encrypt(&key, b"Tern media known answer").unwrap();
    let large_pt = pattern(2 * CHUNK_SIZE + 100, 9);
    let large = media::encrypt(&key, &large_pt).unwrap();
    assert_eq!(media::decrypt(&key, &large).unwrap(), large_pt);
    let computed = json!({
        "rng": "ChaCha20Rng::from_seed([0x3d; 32])",
        "key": hex::encode(&*key.to_bytes()),
        "small_plaintext": "Tern media known answer",
        "small_ciphertext": hex::encode(&small),
        "large_plaintext": "pattern(2 * CHUNK_SIZE + 100, 9)",
        "large_ciphertext_len": large.len(),
        "large_ciphertext_sha256": hex::encode(Sha256::digest(&large)),
        "large_ciphertext_tail": hex::encode(&large[large.len() - 64..]),
    });
    check(
        "media",
        include_str!("../src/crypto/vectors/media.json"),
        computed,
    );
}
