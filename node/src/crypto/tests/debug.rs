//! `Debug` output of every secret-holding type contains no secret bytes.

use super::{assert_redacted, established, rng};
use crate::crypto::kdf::{AeadKey, LABEL_MESSAGE_KEYS};
use crate::crypto::keys::{IdentityKeys, LocalPrekeys};
use crate::crypto::media::{MediaDecryptor, MediaEncryptor, MediaKey};
use crate::crypto::sender_keys::{InboundSenderKey, OutboundSenderKey, SenderKeyStore};

fn check<T: std::fmt::Debug>(value: &T, secrets: &[Vec<u8>]) {
    assert!(!secrets.is_empty());
    for pretty in [format!("{value:?}"), format!("{value:#?}")] {
        for s in secrets {
            assert_redacted(&pretty, s);
        }
    }
}

#[test]
fn debug_never_prints_secrets() {
    let mut r = rng(1);
    let id = IdentityKeys::generate(&mut r).unwrap();
    check(&id, &id.test_secrets());

    let mut prekeys = LocalPrekeys::new(&mut r, 0);
    prekeys.generate_one_time_prekeys(&mut r, 2).unwrap();
    prekeys.rotate_signed_prekey(&mut r, 10).unwrap();
    check(&prekeys, &prekeys.test_secrets());

    let (mut alice, mut bob) = established(&mut r);
    // Create skipped keys so they are covered too.
    let _lost = alice.encrypt(&mut r, b"lost", b"").unwrap();
    let m = alice.encrypt(&mut r, b"x", b"").unwrap();
    bob.decrypt(&m, b"").unwrap();
    assert_eq!(bob.skipped_message_keys(), 1);
    check(&alice, &alice.test_secrets());
    check(&bob, &bob.test_secrets());

    let mut out = OutboundSenderKey::new(&mut r, [1; 32], 1, [2; 32]);
    let dist = out.distribution();
    check(&out, &out.test_secrets());
    check(&dist, &dist.test_secrets());
    let mut inbound = InboundSenderKey::from_distribution(&dist).unwrap();
    let _skipped = out.encrypt(b"a").unwrap();
    inbound.decrypt(&out.encrypt(b"b").unwrap()).unwrap();
    check(&inbound, &inbound.test_secrets());
    let mut store = SenderKeyStore::new();
    store.add(&dist).unwrap();
    check(&store, &inbound.test_secrets());

    let key = MediaKey::generate(&mut r);
    check(&key, &key.test_secrets());
    let mut enc = MediaEncryptor::new(&key);
    enc.update(b"secret plaintext", &mut Vec::new()).unwrap();
    check(&enc, &key.test_secrets());
    check(&MediaDecryptor::new(&key), &key.test_secrets());

    let aead = AeadKey::expand(&[9; 32], LABEL_MESSAGE_KEYS).unwrap();
    check(
        &aead,
        &[aead.key_bytes().to_vec(), aead.nonce_bytes().to_vec()],
    );
}
