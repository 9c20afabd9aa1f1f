//! Pairwise session tests: setup, prekeys, failures, persistence.

use super::{established, following, pair, rng, snapshot};
use crate::crypto::error::CryptoError;
use crate::crypto::keys::{IdentityKeys, LocalPrekeys, PrekeyBundle};
use crate::crypto::ratchet::{
    MAX_AHEAD_LATER, MAX_PLAINTEXT_LEN, MAX_SKIP, MAX_SKIPPED_KEYS, RatchetMessage,
};
use crate::crypto::session::{Message, PreKeyMessage, Session};

fn prekey(m: Message) -> PreKeyMessage {
    match m {
        Message::PreKey(p) => p,
        Message::Normal(_) => panic!("expected a prekey message"),
    }
}

#[test]
fn full_conversation_with_one_time_prekey() {
    let mut r = rng(2);
    let mut p = pair(&mut r, true);
    let opk = p.opk.unwrap();
    assert!(p.alice_session.awaiting_reply());
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"hi bob", b"ad").unwrap());
    assert_eq!(m1.one_time_prekey_id(), Some(opk));
    let (mut bob, pt) = Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"ad").unwrap();
    assert_eq!(pt, b"hi bob");
    assert!(
        !p.bob_prekeys.one_time_prekey_ids().contains(&opk),
        "OPK consumed"
    );
    assert_eq!(bob.remote_identity(), p.alice.public());
    assert_eq!(p.alice_session.remote_identity(), p.bob.public());

    // Alice keeps sending prekey messages until she hears back.
    let m2 = p
        .alice_session
        .encrypt(&mut r, b"still there?", b"ad")
        .unwrap();
    assert!(matches!(m2, Message::PreKey(_)));
    assert_eq!(bob.decrypt(&m2, b"ad").unwrap(), b"still there?");

    let reply = bob.encrypt(&mut r, b"yes", b"ad").unwrap();
    assert!(matches!(reply, Message::Normal(_)));
    assert_eq!(p.alice_session.decrypt(&reply, b"ad").unwrap(), b"yes");
    assert!(!p.alice_session.awaiting_reply());
    let m3 = p.alice_session.encrypt(&mut r, b"great", b"ad").unwrap();
    assert!(matches!(m3, Message::Normal(_)));
    assert_eq!(bob.decrypt(&m3, b"ad").unwrap(), b"great");

    // Wire round trip of every message type.
    for m in [Message::PreKey(m1), m2, reply, m3] {
        assert_eq!(Message::from_bytes(&m.to_bytes()).unwrap(), m);
    }
}

#[test]
fn setup_without_one_time_prekey() {
    let mut r = rng(3);
    let mut p = pair(&mut r, false);
    let before = p.bob_prekeys.one_time_prekey_count();
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"no opk", b"").unwrap());
    assert_eq!(m1.one_time_prekey_id(), None);
    let (_bob, pt) = Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").unwrap();
    assert_eq!(pt, b"no opk");
    assert_eq!(p.bob_prekeys.one_time_prekey_count(), before);
    // Documented caveat: without an OPK the first message can be replayed
    // into a new responder session.
    assert!(Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").is_ok());
}

#[test]
fn one_time_prekey_is_single_use() {
    let mut r = rng(4);
    let mut p = pair(&mut r, true);
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"x", b"").unwrap());
    Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").unwrap();
    let err = Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").unwrap_err();
    assert_eq!(
        err,
        CryptoError::UnknownOneTimePrekey { id: p.opk.unwrap() }
    );
}

#[test]
fn one_time_prekey_not_consumed_on_failed_decrypt() {
    let mut r = rng(5);
    let mut p = pair(&mut r, true);
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"x", b"ad").unwrap());
    let before = p.bob_prekeys.to_bytes().unwrap().to_vec();
    // Wrong associated data -> tag failure.
    let err = Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"other").unwrap_err();
    assert_eq!(err, CryptoError::DecryptionFailed);
    // Tampered ciphertext.
    let mut bytes = m1.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = PreKeyMessage::from_bytes(&bytes).unwrap();
    assert_eq!(
        Session::accept(&p.bob, &mut p.bob_prekeys, &tampered, b"ad").unwrap_err(),
        CryptoError::DecryptionFailed
    );
    assert_eq!(p.bob_prekeys.to_bytes().unwrap().to_vec(), before);
    assert!(
        p.bob_prekeys
            .one_time_prekey_ids()
            .contains(&p.opk.unwrap())
    );
    // The genuine message still works afterwards.
    Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"ad").unwrap();
}

#[test]
fn tampered_x3dh_header_fields_fail() {
    let mut r = rng(6);
    let mut p = pair(&mut r, true);
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"x", b"").unwrap());
    let bytes = m1.to_bytes();
    let before = p.bob_prekeys.to_bytes().unwrap().to_vec();
    // Every bit of the X3DH prefix (identity, ephemeral, ids) and the header.
    for byte in 1..PreKeyMessage::PREFIX_LEN + 1 + 40 {
        for bit in [0, 3, 7] {
            let mut b = bytes.clone();
            b[byte] ^= 1 << bit;
            if let Ok(m) = PreKeyMessage::from_bytes(&b) {
                assert!(
                    Session::accept(&p.bob, &mut p.bob_prekeys, &m, b"").is_err(),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }
    assert_eq!(p.bob_prekeys.to_bytes().unwrap().to_vec(), before);
}

#[test]
fn unknown_prekey_ids_rejected() {
    let mut r = rng(7);
    let mut p = pair(&mut r, true);
    let m1 = p
        .alice_session
        .encrypt(&mut r, b"x", b"")
        .unwrap()
        .to_bytes();
    // Patch the signed prekey id (offset 1 + 128 + 32).
    let mut b = m1.clone();
    b[161..165].copy_from_slice(&77u32.to_be_bytes());
    let m = PreKeyMessage::from_bytes(&b).unwrap();
    assert_eq!(
        Session::accept(&p.bob, &mut p.bob_prekeys, &m, b"").unwrap_err(),
        CryptoError::UnknownSignedPrekey { id: 77 }
    );
    let mut b = m1;
    b[166..170].copy_from_slice(&999u32.to_be_bytes());
    let m = PreKeyMessage::from_bytes(&b).unwrap();
    assert_eq!(
        Session::accept(&p.bob, &mut p.bob_prekeys, &m, b"").unwrap_err(),
        CryptoError::UnknownOneTimePrekey { id: 999 }
    );
}

#[test]
fn previous_signed_prekey_usable_during_grace_period() {
    let mut r = rng(8);
    let mut p = pair(&mut r, false);
    let old_id = p.bob_prekeys.signed_prekey_id();
    let new_id = p.bob_prekeys.rotate_signed_prekey(&mut r, 2_000).unwrap();
    assert_ne!(old_id, new_id);
    assert_eq!(p.bob_prekeys.previous_signed_prekey_id(), Some(old_id));
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"old bundle", b"").unwrap());
    assert_eq!(m1.signed_prekey_id(), old_id);
    assert!(
        !p.bob_prekeys
            .prune(2_000 + crate::crypto::keys::SIGNED_PREKEY_GRACE_SECS - 1)
    );
    Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").unwrap();
    assert!(
        p.bob_prekeys
            .prune(2_000 + crate::crypto::keys::SIGNED_PREKEY_GRACE_SECS)
    );
    assert_eq!(
        Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").unwrap_err(),
        CryptoError::UnknownSignedPrekey { id: old_id }
    );
    // A new bundle uses the new key.
    let bundle = p.bob_prekeys.bundle(&p.bob, None).unwrap();
    assert_eq!(bundle.signed_prekey_id(), new_id);
    let mut s = Session::initiate(&mut r, &p.alice, &bundle).unwrap();
    let m = prekey(s.encrypt(&mut r, b"new", b"").unwrap());
    assert_eq!(
        Session::accept(&p.bob, &mut p.bob_prekeys, &m, b"")
            .unwrap()
            .1,
        b"new"
    );
}

#[test]
fn bundle_signatures_verified() {
    let mut r = rng(9);
    let bob = IdentityKeys::generate(&mut r).unwrap();
    let alice = IdentityKeys::generate(&mut r).unwrap();
    let mut prekeys = LocalPrekeys::new(&mut r, 0);
    let ids = prekeys.generate_one_time_prekeys(&mut r, 1).unwrap();
    let bundle = prekeys.bundle(&bob, Some(ids[0])).unwrap();
    bundle.verify().unwrap();
    let bytes = bundle.to_bytes();
    assert_eq!(bytes.len(), PrekeyBundle::LEN_WITH_ONE_TIME);
    assert_eq!(PrekeyBundle::from_bytes(&bytes).unwrap(), bundle);
    assert_eq!(
        prekeys.bundle(&bob, None).unwrap().to_bytes().len(),
        PrekeyBundle::LEN_WITHOUT_ONE_TIME
    );
    // Any flipped bit in the signed parts breaks verification (the OPK is
    // unsigned by design, as in X3DH).
    for byte in 1..PrekeyBundle::LEN_WITHOUT_ONE_TIME - 1 {
        let mut b = bytes.clone();
        b[byte] ^= 0x10;
        let tampered = PrekeyBundle::from_bytes(&b).unwrap();
        assert!(tampered.verify().is_err(), "byte {byte}");
        assert!(
            Session::initiate(&mut r, &alice, &tampered).is_err(),
            "byte {byte}"
        );
    }
    // Signed by someone else: Mallory's identity with Bob's prekeys.
    let mallory = IdentityKeys::generate(&mut r).unwrap();
    let mut b = bytes.clone();
    b[1..129].copy_from_slice(&mallory.public().to_bytes());
    assert_eq!(
        PrekeyBundle::from_bytes(&b).unwrap().verify().unwrap_err(),
        CryptoError::InvalidSignature {
            what: "signed prekey"
        }
    );
    // Truncated / oversized / wrong version.
    assert!(matches!(
        PrekeyBundle::from_bytes(&bytes[..100]),
        Err(CryptoError::InvalidLength { .. })
    ));
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        PrekeyBundle::from_bytes(&long),
        Err(CryptoError::InvalidLength { .. })
    ));
    let mut v = bytes.clone();
    v[0] = 0x11;
    assert_eq!(
        PrekeyBundle::from_bytes(&v).unwrap_err(),
        CryptoError::UnsupportedVersion {
            what: "prekey bundle",
            expected: 0x10,
            got: 0x11
        }
    );
}

#[test]
fn initiator_identity_binding_is_checked() {
    // Mallory claims Alice's ed25519 identity with her own X25519 key: the
    // binding signature does not verify, so Bob rejects before any DH.
    let mut r = rng(10);
    let mut p = pair(&mut r, false);
    let mallory = IdentityKeys::generate(&mut r).unwrap();
    let bundle = p.bob_prekeys.bundle(&p.bob, None).unwrap();
    let mut s = Session::initiate(&mut r, &mallory, &bundle).unwrap();
    let mut b = s.encrypt(&mut r, b"I am Alice", b"").unwrap().to_bytes();
    b[1..33].copy_from_slice(p.alice.public().ed25519());
    let m = PreKeyMessage::from_bytes(&b).unwrap();
    assert_eq!(
        Session::accept(&p.bob, &mut p.bob_prekeys, &m, b"").unwrap_err(),
        CryptoError::InvalidSignature {
            what: "identity X25519 key"
        }
    );
}

#[test]
fn failed_decrypt_leaves_state_unchanged() {
    let mut r = rng(11);
    let mut p = pair(&mut r, true);
    let m1 = prekey(p.alice_session.encrypt(&mut r, b"x", b"").unwrap());
    let (mut bob, _) = Session::accept(&p.bob, &mut p.bob_prekeys, &m1, b"").unwrap();
    let mut alice = p.alice_session;
    let reply = bob.encrypt(&mut r, b"reply", b"").unwrap();
    let before = snapshot(&alice);
    assert_eq!(
        alice.decrypt(&reply, b"wrong ad").unwrap_err(),
        CryptoError::DecryptionFailed
    );
    assert_eq!(snapshot(&alice), before);
    assert!(alice.awaiting_reply());
    assert_eq!(alice.decrypt(&reply, b"").unwrap(), b"reply");
    assert!(!alice.awaiting_reply());
}

#[test]
fn replay_rejected() {
    let mut r = rng(12);
    let (mut alice, mut bob) = established(&mut r);
    let m = alice.encrypt(&mut r, b"once", b"").unwrap();
    assert_eq!(bob.decrypt(&m, b"").unwrap(), b"once");
    let before = snapshot(&bob);
    assert!(matches!(
        bob.decrypt(&m, b"").unwrap_err(),
        CryptoError::DuplicateMessage { .. }
    ));
    assert_eq!(snapshot(&bob), before);
    // Replay of a skipped-then-used key.
    let a = alice.encrypt(&mut r, b"a", b"").unwrap();
    let b = alice.encrypt(&mut r, b"b", b"").unwrap();
    assert_eq!(bob.decrypt(&b, b"").unwrap(), b"b");
    assert_eq!(bob.decrypt(&a, b"").unwrap(), b"a");
    assert!(bob.decrypt(&a, b"").is_err());
    assert!(bob.decrypt(&b, b"").is_err());
}

#[test]
fn max_skip_enforced() {
    let mut r = rng(13);
    let (mut alice, mut bob) = established(&mut r);
    // Alice starts a new sending chain at index 0; MAX_SKIP keys may be skipped.
    let mut last = None;
    for _ in 0..=MAX_SKIP + 1 {
        last = Some(alice.encrypt(&mut r, b"m", b"").unwrap());
    }
    let too_far = last.unwrap();
    let before = snapshot(&bob);
    assert!(matches!(
        bob.decrypt(&too_far, b"").unwrap_err(),
        CryptoError::TooFarAhead { max: MAX_SKIP, .. }
    ));
    assert_eq!(snapshot(&bob), before);

    // Exactly MAX_SKIP ahead works.
    let (mut alice, mut bob) = established(&mut r);
    let mut msgs = Vec::new();
    for _ in 0..=MAX_SKIP {
        msgs.push(alice.encrypt(&mut r, b"m", b"").unwrap());
    }
    bob.decrypt(msgs.last().unwrap(), b"").unwrap();
    assert_eq!(bob.skipped_message_keys(), MAX_SKIP as usize);
    bob.decrypt(&msgs[0], b"").unwrap();
}

#[test]
fn a_message_beyond_max_skip_on_the_current_chain_is_decryptable_later() {
    let mut r = rng(16);
    // Bob follows alice's current chain.
    let (mut alice, mut bob) = following(&mut r);
    let msgs: Vec<Message> = (0..=MAX_SKIP + 1)
        .map(|i| {
            alice
                .encrypt(&mut r, format!("m{i}").as_bytes(), b"")
                .unwrap()
        })
        .collect();
    let far = msgs.last().unwrap();
    assert!(matches!(
        bob.decrypt(far, b"").unwrap_err(),
        CryptoError::TooFarAhead { .. }
    ));
    assert!(bob.decryptable_later(far));
    // Within reach (and behind) is not "later"; a forged header far beyond the bound, or
    // one naming another chain, is not either.
    assert!(!bob.decryptable_later(&msgs[0]));
    let mut b = far.to_bytes();
    b[37..41].copy_from_slice(&(MAX_AHEAD_LATER + 2).to_be_bytes());
    assert!(!bob.decryptable_later(&Message::from_bytes(&b).unwrap()));
    let mut b = far.to_bytes();
    b[5] ^= 1;
    assert!(!bob.decryptable_later(&Message::from_bytes(&b).unwrap()));
    // Once the messages before it are in, it decrypts.
    for m in &msgs[..100] {
        bob.decrypt(m, b"").unwrap();
    }
    assert!(!bob.decryptable_later(far));
    assert_eq!(
        bob.decrypt(far, b"").unwrap(),
        format!("m{}", MAX_SKIP + 1).as_bytes()
    );
}

#[test]
fn header_index_beyond_max_skip_rejected_without_work() {
    let mut r = rng(14);
    let (mut alice, mut bob) = established(&mut r);
    let m = alice.encrypt(&mut r, b"m", b"").unwrap();
    let mut b = m.to_bytes();
    b[37..41].copy_from_slice(&u32::MAX.to_be_bytes());
    let forged = Message::from_bytes(&b).unwrap();
    let before = snapshot(&bob);
    assert!(bob.decrypt(&forged, b"").is_err());
    assert_eq!(snapshot(&bob), before);
}

#[test]
fn skipped_key_cap_evicts_oldest() {
    let mut r = rng(15);
    let (mut alice, mut bob) = established(&mut r);
    let mut first_gap = None;
    // Three chains, each skipping MAX_SKIP - 1 messages: 2997 skipped > cap.
    for round in 0..3 {
        let mut msgs = Vec::new();
        for _ in 0..MAX_SKIP {
            msgs.push(alice.encrypt(&mut r, b"m", b"").unwrap());
        }
        if round == 0 {
            first_gap = Some(msgs[0].clone());
        }
        bob.decrypt(msgs.last().unwrap(), b"").unwrap();
        // New DH ratchet step so the next round is a new chain.
        let reply = bob.encrypt(&mut r, b"r", b"").unwrap();
        alice.decrypt(&reply, b"").unwrap();
        assert!(bob.skipped_message_keys() <= MAX_SKIPPED_KEYS);
    }
    assert_eq!(bob.skipped_message_keys(), MAX_SKIPPED_KEYS);
    // The oldest skipped key was evicted.
    assert!(matches!(
        bob.decrypt(&first_gap.unwrap(), b"").unwrap_err(),
        CryptoError::DecryptionFailed
            | CryptoError::DuplicateMessage { .. }
            | CryptoError::TooFarAhead { .. }
    ));
}

#[test]
fn prekey_message_on_wrong_session_mismatch() {
    let mut r = rng(16);
    let mut p = pair(&mut r, false);
    let m1 = p.alice_session.encrypt(&mut r, b"x", b"").unwrap();
    // An initiator never accepts prekey messages.
    let before = snapshot(&p.alice_session);
    assert_eq!(
        p.alice_session.decrypt(&m1, b"").unwrap_err(),
        CryptoError::SessionMismatch
    );
    assert_eq!(snapshot(&p.alice_session), before);
    // A responder session created by another initial message.
    let bundle = p.bob_prekeys.bundle(&p.bob, None).unwrap();
    let mut other = Session::initiate(&mut r, &p.alice, &bundle).unwrap();
    let m_other = prekey(other.encrypt(&mut r, b"y", b"").unwrap());
    let (mut bob, _) = Session::accept(&p.bob, &mut p.bob_prekeys, &m_other, b"").unwrap();
    assert!(!bob.matches(match &m1 {
        Message::PreKey(p) => p,
        Message::Normal(_) => unreachable!(),
    }));
    assert_eq!(
        bob.decrypt(&m1, b"").unwrap_err(),
        CryptoError::SessionMismatch
    );
}

#[test]
fn decoders_reject_bad_lengths() {
    let mut r = rng(17);
    let (mut alice, _) = established(&mut r);
    let m = alice.encrypt(&mut r, b"hello", b"").unwrap().to_bytes();
    for len in 0..RatchetMessage::MIN_LEN {
        assert!(Message::from_bytes(&m[..len.min(m.len())]).is_err());
    }
    let huge = vec![1u8; RatchetMessage::MAX_LEN + 1];
    assert!(matches!(
        RatchetMessage::from_bytes(&huge),
        Err(CryptoError::TooLarge { .. })
    ));
    let mut huge = vec![2u8; PreKeyMessage::MAX_LEN + 1];
    huge[0] = 2;
    assert!(matches!(
        PreKeyMessage::from_bytes(&huge),
        Err(CryptoError::TooLarge { .. })
    ));
    assert!(matches!(
        Message::from_bytes(&[9, 1, 2]),
        Err(CryptoError::UnsupportedVersion { got: 9, .. })
    ));
    assert!(Message::from_bytes(&[]).is_err());
    let big = vec![0u8; MAX_PLAINTEXT_LEN + 1];
    let before = snapshot(&alice);
    assert!(matches!(
        alice.encrypt(&mut r, &big, b""),
        Err(CryptoError::TooLarge { .. })
    ));
    assert_eq!(snapshot(&alice), before);
    // The largest plaintext fits the decoder cap.
    let max = alice.encrypt(&mut r, &big[1..], b"").unwrap().to_bytes();
    assert_eq!(max.len(), RatchetMessage::MAX_LEN);
    assert!(Message::from_bytes(&max).is_ok());
}

#[test]
fn non_canonical_optional_id_rejected() {
    let mut r = rng(18);
    let mut p = pair(&mut r, false);
    let mut b = p
        .alice_session
        .encrypt(&mut r, b"x", b"")
        .unwrap()
        .to_bytes();
    b[169] = 1; // flag 0 with non-zero id
    assert!(matches!(
        PreKeyMessage::from_bytes(&b),
        Err(CryptoError::Malformed { .. })
    ));
    b[165] = 2; // invalid flag
    assert!(matches!(
        PreKeyMessage::from_bytes(&b),
        Err(CryptoError::Malformed { .. })
    ));
}

#[test]
fn state_persistence_round_trip() {
    let mut r = rng(19);
    let (alice, bob) = established(&mut r);
    let mut alice = Session::from_bytes(&alice.to_bytes().unwrap()).unwrap();
    let mut bob = Session::from_bytes(&bob.to_bytes().unwrap()).unwrap();
    let m = bob.encrypt(&mut r, b"after restore", b"").unwrap();
    assert_eq!(alice.decrypt(&m, b"").unwrap(), b"after restore");
    let bytes = alice.to_bytes().unwrap();
    assert_eq!(bytes[0], b'S');
    assert_eq!(bytes[1], 1);
    let mut v = bytes.to_vec();
    v[1] = 2;
    assert_eq!(
        Session::from_bytes(&v).unwrap_err(),
        CryptoError::UnsupportedVersion {
            what: "session state",
            expected: 1,
            got: 2
        }
    );
    let mut v = bytes.to_vec();
    v.push(0);
    assert!(matches!(
        Session::from_bytes(&v),
        Err(CryptoError::Malformed { .. })
    ));
    assert!(Session::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(
        LocalPrekeys::from_bytes(&bytes).is_err(),
        "kind byte checked"
    );
}

#[test]
fn identity_from_seed_is_deterministic() {
    let seed = [42u8; 32];
    let a = IdentityKeys::from_seed(&seed).unwrap();
    let b = IdentityKeys::from_seed(&seed).unwrap();
    assert_eq!(a.public(), b.public());
    assert_eq!(*a.seed(), seed);
    assert_eq!(
        a.public().ed25519(),
        &ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes()
    );
    a.public().verify().unwrap();
    assert_ne!(a.public().x25519(), a.public().ed25519());
}

/// A crash after messages left at positions whose new state was never stored: restarting
/// from the older stored state and skipping to the reserved position never reuses a message
/// key, and the receiver reads what comes next.
#[test]
fn skipping_past_reserved_positions_after_a_lost_state_never_reuses_a_key() {
    let mut r = rng(41);
    // (`following` checks that alice's turn starts a chain.)
    let (mut alice, mut bob) = following(&mut r);
    let stored = alice.to_bytes().unwrap();
    let at = alice.sending_position().expect("alice has a sending chain");
    let reserved = crate::crypto::ChainPosition {
        index: at.index + 16,
        ..at
    };
    // Three messages leave before their state is stored; bob reads them.
    let mut used = Vec::new();
    for i in 0..3u8 {
        let m = alice.encrypt(&mut r, &[i], b"ad").unwrap();
        used.push(m.ratchet_message().header().index);
        assert_eq!(bob.decrypt(&m, b"ad").unwrap(), [i]);
    }
    // Crash: alice comes back with the stored state, moves past the reservation.
    let mut alice = Session::from_bytes(&stored).unwrap();
    assert_eq!(alice.sending_position(), Some(at));
    assert!(alice.skip_sending_to(&reserved).unwrap());
    assert_eq!(alice.sending_position(), Some(reserved));
    assert!(!alice.skip_sending_to(&reserved).unwrap(), "already there");
    let m = alice.encrypt(&mut r, b"after", b"ad").unwrap();
    let index = m.ratchet_message().header().index;
    assert_eq!(index, reserved.index);
    assert!(!used.contains(&index));
    assert_eq!(bob.decrypt(&m, b"ad").unwrap(), b"after");
    // Without the skip the same state would seal at a position bob already used: refused.
    let mut careless = Session::from_bytes(&stored).unwrap();
    let again = careless.encrypt(&mut r, b"reused", b"ad").unwrap();
    assert_eq!(again.ratchet_message().header().index, used[0]);
    assert!(bob.decrypt(&again, b"ad").is_err());
}

#[test]
fn a_skip_applies_only_to_its_own_chain_and_stays_within_max_skip() {
    let mut r = rng(42);
    let (mut alice, mut bob) = following(&mut r);
    let at = alice.sending_position().unwrap();
    let other = crate::crypto::ChainPosition {
        ratchet_key: [7; 32],
        index: at.index + 5,
    };
    assert!(!alice.skip_sending_to(&other).unwrap(), "another chain");
    assert_eq!(alice.sending_position(), Some(at));
    let too_far = crate::crypto::ChainPosition {
        index: at.index + MAX_SKIP + 1,
        ..at
    };
    assert!(matches!(
        alice.skip_sending_to(&too_far),
        Err(CryptoError::TooFarAhead { .. })
    ));
    assert_eq!(alice.sending_position(), Some(at), "unchanged on error");
    // A new remote ratchet key ends the chain: nothing to skip until the next one starts.
    let m = bob.encrypt(&mut r, b"turn", b"ad").unwrap();
    alice.decrypt(&m, b"ad").unwrap();
    assert_eq!(alice.sending_position(), None);
    assert!(!alice.skip_sending_to(&at).unwrap());
}
