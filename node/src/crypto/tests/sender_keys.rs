//! Sender Keys tests: in-order and out-of-order delivery, replay, bounds,
//! forged signatures, unknown senders, transactional failures.

use proptest::prelude::*;

use super::rng;
use crate::crypto::error::CryptoError;
use crate::crypto::sender_keys::{
    GroupMessage, InboundSenderKey, MAX_GROUP_FORWARD, MAX_GROUP_SKIPPED_KEYS,
    MAX_SENDER_KEYS_PER_SENDER, OutboundSenderKey, SenderKeyDistribution, SenderKeyStore,
};

const GROUP: [u8; 32] = [7; 32];
const ALICE: [u8; 32] = [0xA1; 32];

fn setup(seed: u8) -> (OutboundSenderKey, SenderKeyStore) {
    let mut r = rng(seed);
    let out = OutboundSenderKey::new(&mut r, GROUP, 3, ALICE);
    let dist = SenderKeyDistribution::from_bytes(&out.distribution().to_bytes()).unwrap();
    let mut store = SenderKeyStore::new();
    assert!(store.add(&dist).unwrap());
    (out, store)
}

fn state(store: &SenderKeyStore) -> Vec<u8> {
    store.to_bytes().unwrap().to_vec()
}

#[test]
fn in_order_round_trip_and_wire_format() {
    let (mut out, mut store) = setup(1);
    for i in 0..5u32 {
        let m = out.encrypt(format!("hello {i}").as_bytes()).unwrap();
        assert_eq!(m.iteration(), i);
        let m = GroupMessage::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(
            store.decrypt(&m).unwrap(),
            format!("hello {i}").into_bytes()
        );
    }
    // Persistence of all three state types.
    let out2 = OutboundSenderKey::from_bytes(&out.to_bytes().unwrap()).unwrap();
    assert_eq!(out2.iteration(), 5);
    let mut store2 = SenderKeyStore::from_bytes(&store.to_bytes().unwrap()).unwrap();
    let inbound = store2.get(&GROUP, 3, &ALICE).unwrap().clone();
    let inbound = InboundSenderKey::from_bytes(&inbound.to_bytes().unwrap()).unwrap();
    assert_eq!(inbound.iteration(), 5);
    let m = out.encrypt(b"after restore").unwrap();
    assert_eq!(store2.decrypt(&m).unwrap(), b"after restore");
}

#[test]
fn replay_rejected_and_state_unchanged() {
    let (mut out, mut store) = setup(2);
    let m = out.encrypt(b"x").unwrap();
    store.decrypt(&m).unwrap();
    let before = state(&store);
    assert_eq!(
        store.decrypt(&m).unwrap_err(),
        CryptoError::DuplicateMessage { index: 0 }
    );
    assert_eq!(state(&store), before);
    // A re-sent distribution cannot rewind the chain.
    assert!(!store.add(&out.distribution()).unwrap());
    assert!(store.decrypt(&m).is_err());
}

#[test]
fn late_joiner_cannot_read_earlier_messages() {
    let mut r = rng(3);
    let mut out = OutboundSenderKey::new(&mut r, GROUP, 3, ALICE);
    let early = out.encrypt(b"before join").unwrap();
    let mut store = SenderKeyStore::new();
    store.add(&out.distribution()).unwrap();
    assert!(matches!(
        store.decrypt(&early).unwrap_err(),
        CryptoError::DuplicateMessage { index: 0 }
    ));
    assert_eq!(
        store.decrypt(&out.encrypt(b"after").unwrap()).unwrap(),
        b"after"
    );
}

#[test]
fn forward_bound_and_skipped_cap() {
    let (mut out, mut store) = setup(4);
    let mut msgs = Vec::new();
    for _ in 0..=MAX_GROUP_FORWARD + 1 {
        msgs.push(out.encrypt(b"m").unwrap());
    }
    let before = state(&store);
    assert!(matches!(
        store.decrypt(msgs.last().unwrap()).unwrap_err(),
        CryptoError::TooFarAhead {
            max: MAX_GROUP_FORWARD,
            ..
        }
    ));
    assert_eq!(state(&store), before);
    // Exactly MAX_GROUP_FORWARD ahead is fine and stores that many keys.
    store.decrypt(&msgs[MAX_GROUP_FORWARD as usize]).unwrap();
    let inbound = store.get(&GROUP, 3, &ALICE).unwrap();
    assert_eq!(inbound.skipped_message_keys(), MAX_GROUP_FORWARD as usize);
    // One more jump overflows the cap: the oldest keys are evicted.
    let mut more = Vec::new();
    for _ in 0..10 {
        more.push(out.encrypt(b"m").unwrap());
    }
    store.decrypt(&more[9]).unwrap();
    let inbound = store.get(&GROUP, 3, &ALICE).unwrap();
    assert_eq!(inbound.skipped_message_keys(), MAX_GROUP_SKIPPED_KEYS);
    assert!(store.decrypt(&msgs[0]).is_err(), "evicted");
    assert_eq!(store.decrypt(&msgs[1000]).unwrap(), b"m");
    assert_eq!(store.decrypt(&more[0]).unwrap(), b"m");
}

#[test]
fn forged_and_foreign_messages_rejected() {
    let (mut out, mut store) = setup(5);
    let m = out.encrypt(b"genuine").unwrap();
    let bytes = m.to_bytes();
    let before = state(&store);
    // Every bit of the message.
    for bit in (0..bytes.len() * 8).step_by(7) {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        if let Ok(forged) = GroupMessage::from_bytes(&b) {
            assert!(store.decrypt(&forged).is_err(), "bit {bit}");
        }
    }
    assert_eq!(state(&store), before);

    // A member that knows the chain key (every member does) but not the
    // signing key cannot author messages as Alice.
    let mut r = rng(6);
    let mut mallory = OutboundSenderKey::new(&mut r, GROUP, 3, ALICE);
    let forged = mallory.encrypt(b"forged").unwrap();
    assert_eq!(
        store.decrypt(&forged).unwrap_err(),
        CryptoError::InvalidSignature {
            what: "group message"
        }
    );

    // Unknown sender / group / epoch.
    let mut bob = OutboundSenderKey::new(&mut r, GROUP, 3, [0xB0; 32]);
    assert_eq!(
        store.decrypt(&bob.encrypt(b"x").unwrap()).unwrap_err(),
        CryptoError::UnknownSender
    );
    let mut other_epoch = OutboundSenderKey::new(&mut r, GROUP, 4, ALICE);
    assert_eq!(
        store
            .decrypt(&other_epoch.encrypt(b"x").unwrap())
            .unwrap_err(),
        CryptoError::UnknownSender
    );
    let mut inbound = store.get(&GROUP, 3, &ALICE).unwrap().clone();
    assert_eq!(
        inbound.decrypt(&bob.encrypt(b"x").unwrap()).unwrap_err(),
        CryptoError::GroupMismatch { field: "sender" }
    );
    assert_eq!(
        inbound
            .decrypt(&other_epoch.encrypt(b"x").unwrap())
            .unwrap_err(),
        CryptoError::GroupMismatch { field: "epoch" }
    );
    assert_eq!(state(&store), before);
    assert_eq!(store.decrypt(&m).unwrap(), b"genuine");
}

#[test]
fn decoders_reject_bad_input() {
    let (mut out, _) = setup(7);
    let d = out.distribution().to_bytes();
    assert!(matches!(
        SenderKeyDistribution::from_bytes(&d[..d.len() - 1]),
        Err(CryptoError::InvalidLength { .. })
    ));
    let mut v = d.to_vec();
    v[0] = 0x21;
    assert!(matches!(
        SenderKeyDistribution::from_bytes(&v),
        Err(CryptoError::UnsupportedVersion { .. })
    ));
    let m = out.encrypt(b"").unwrap().to_bytes();
    assert_eq!(m.len(), GroupMessage::MIN_LEN);
    assert!(GroupMessage::from_bytes(&m[..m.len() - 1]).is_err());
    let huge = vec![0x21u8; GroupMessage::MAX_LEN + 1];
    assert!(matches!(
        GroupMessage::from_bytes(&huge),
        Err(CryptoError::TooLarge { .. })
    ));
    assert!(OutboundSenderKey::from_bytes(&[b'O', 9]).is_err());
    assert!(SenderKeyStore::from_bytes(&[b'I', 1]).is_err());
}

#[test]
fn one_sender_cannot_fill_the_store_for_every_group() {
    let mut r = rng(9);
    let mut store = SenderKeyStore::new();
    for g in 0..MAX_SENDER_KEYS_PER_SENDER {
        let mut group = [0u8; 32];
        group[..8].copy_from_slice(&(g as u64).to_le_bytes());
        store
            .add(&OutboundSenderKey::new(&mut r, group, 1, ALICE).distribution())
            .unwrap();
    }
    let more = OutboundSenderKey::new(&mut r, [0xEE; 32], 1, ALICE).distribution();
    assert!(matches!(
        store.add(&more),
        Err(CryptoError::TooLarge { max, .. }) if max == MAX_SENDER_KEYS_PER_SENDER
    ));
    // Another member's key for a real group still goes in.
    let bob = OutboundSenderKey::new(&mut r, GROUP, 1, [0xB0; 32]).distribution();
    assert!(store.add(&bob).unwrap());
}

#[test]
fn store_epoch_management() {
    let mut r = rng(8);
    let mut store = SenderKeyStore::new();
    for epoch in 1..=3 {
        store
            .add(&OutboundSenderKey::new(&mut r, GROUP, epoch, ALICE).distribution())
            .unwrap();
    }
    store
        .add(&OutboundSenderKey::new(&mut r, [9; 32], 1, ALICE).distribution())
        .unwrap();
    assert_eq!(store.len(), 4);
    assert_eq!(store.remove_epochs_before(&GROUP, 3), 2);
    assert_eq!(store.remove_group(&[9; 32]), 1);
    assert_eq!(store.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn out_of_order_delivery(seed in any::<u8>(), order in Just((0..40usize).collect::<Vec<_>>()).prop_shuffle(), drop_mask in any::<u64>()) {
        let (mut out, mut store) = setup(seed);
        let msgs: Vec<_> = (0..40).map(|i| out.encrypt(format!("m{i}").as_bytes()).unwrap()).collect();
        for &i in &order {
            if drop_mask & (1 << i) != 0 {
                continue;
            }
            prop_assert_eq!(store.decrypt(&msgs[i]).unwrap(), format!("m{i}").into_bytes());
            prop_assert!(store.decrypt(&msgs[i]).is_err(), "replay of {}", i);
        }
    }
}
