//! Property tests of the pairwise session: random send / deliver / drop /
//! reorder / replay interleavings in both directions, and bit flips.

use proptest::prelude::*;

use super::{established, pair, rng, snapshot};
use crate::crypto::session::{Message, Session};

#[derive(Debug, Clone)]
enum Op {
    /// `true`: Alice sends, `false`: Bob sends.
    Send(bool),
    /// Deliver an in-flight message (`true`: to Bob), chosen by the index.
    Deliver(bool, usize),
    /// Lose an in-flight message.
    Drop(bool, usize),
    /// Re-deliver an already delivered message: must fail, state unchanged.
    Replay(bool, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(Op::Send),
        4 => (any::<bool>(), any::<usize>()).prop_map(|(d, i)| Op::Deliver(d, i)),
        1 => (any::<bool>(), any::<usize>()).prop_map(|(d, i)| Op::Drop(d, i)),
        1 => (any::<bool>(), any::<usize>()).prop_map(|(d, i)| Op::Replay(d, i)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_decrypt_exactly_once(seed in any::<u8>(), ops in proptest::collection::vec(op(), 1..150)) {
        let mut r = rng(seed);
        let mut p = pair(&mut r, true);
        let mut alice = p.alice_session;
        let mut bob: Option<Session> = None;
        // In flight: (message, plaintext), per direction (index 0: to Bob).
        let mut in_flight: [Vec<(Message, Vec<u8>)>; 2] = [Vec::new(), Vec::new()];
        let mut delivered: [Vec<Message>; 2] = [Vec::new(), Vec::new()];
        let mut sent = 0u32;
        for op in ops {
            match op {
                Op::Send(from_alice) => {
                    sent += 1;
                    let pt = format!("message {sent}").into_bytes();
                    if from_alice {
                        let m = alice.encrypt(&mut r, &pt, b"ad").unwrap();
                        in_flight[0].push((m, pt));
                    } else if let Some(b) = bob.as_mut() {
                        let m = b.encrypt(&mut r, &pt, b"ad").unwrap();
                        in_flight[1].push((m, pt));
                    }
                }
                Op::Deliver(to_bob, i) => {
                    let dir = usize::from(!to_bob);
                    if in_flight[dir].is_empty() {
                        continue;
                    }
                    let idx = i % in_flight[dir].len();
                    let (m, pt) = in_flight[dir].remove(idx);
                    let got = if to_bob {
                        match bob.as_mut() {
                            Some(b) => b.decrypt(&m, b"ad").unwrap(),
                            None => {
                                let Message::PreKey(pk) = &m else {
                                    panic!("Alice sent a normal message before any reply");
                                };
                                let (s, got) = Session::accept(&p.bob, &mut p.bob_prekeys, pk, b"ad").unwrap();
                                bob = Some(s);
                                got
                            }
                        }
                    } else {
                        alice.decrypt(&m, b"ad").unwrap()
                    };
                    prop_assert_eq!(got, pt);
                    delivered[dir].push(m);
                }
                Op::Drop(to_bob, i) => {
                    let dir = usize::from(!to_bob);
                    if !in_flight[dir].is_empty() {
                        let idx = i % in_flight[dir].len();
                        in_flight[dir].remove(idx);
                    }
                }
                Op::Replay(to_bob, i) => {
                    let dir = usize::from(!to_bob);
                    if delivered[dir].is_empty() {
                        continue;
                    }
                    let m = &delivered[dir][i % delivered[dir].len()];
                    let target = if to_bob { bob.as_mut() } else { Some(&mut alice) };
                    if let Some(s) = target {
                        let before = snapshot(s);
                        prop_assert!(s.decrypt(m, b"ad").is_err());
                        prop_assert_eq!(snapshot(s), before);
                    }
                }
            }
        }
        // Everything still in flight is delivered, in reverse order.
        while let Some((m, pt)) = in_flight[1].pop() {
            prop_assert_eq!(alice.decrypt(&m, b"ad").unwrap(), pt);
        }
        if let Some(b) = bob.as_mut() {
            while let Some((m, pt)) = in_flight[0].pop() {
                prop_assert_eq!(b.decrypt(&m, b"ad").unwrap(), pt);
            }
        }
    }

    #[test]
    fn any_bit_flip_is_rejected_without_state_change(seed in any::<u8>(), kind in 0..3u8, bit in any::<usize>()) {
        let mut r = rng(seed);
        match kind {
            // A first-flight message given to `accept`.
            0 => {
                let mut p = pair(&mut r, true);
                let bytes = p.alice_session.encrypt(&mut r, b"first flight", b"").unwrap().to_bytes();
                let mut b = bytes.clone();
                let bit = bit % (b.len() * 8);
                b[bit / 8] ^= 1 << (bit % 8);
                let before = p.bob_prekeys.to_bytes().unwrap().to_vec();
                if let Ok(Message::PreKey(m)) = Message::from_bytes(&b) {
                    prop_assert!(Session::accept(&p.bob, &mut p.bob_prekeys, &m, b"").is_err());
                }
                prop_assert_eq!(p.bob_prekeys.to_bytes().unwrap().to_vec(), before);
            }
            // Normal messages in either direction, including a DH ratchet step.
            _ => {
                let (mut alice, mut bob) = established(&mut r);
                let (sender, receiver) = if kind == 1 { (&mut alice, &mut bob) } else { (&mut bob, &mut alice) };
                let bytes = sender.encrypt(&mut r, b"some plaintext", b"ad").unwrap().to_bytes();
                let mut b = bytes.clone();
                let bit = bit % (b.len() * 8);
                b[bit / 8] ^= 1 << (bit % 8);
                let before = snapshot(receiver);
                if let Ok(m) = Message::from_bytes(&b) {
                    prop_assert!(receiver.decrypt(&m, b"ad").is_err());
                }
                prop_assert_eq!(snapshot(receiver), before);
                // The genuine message still decrypts afterwards.
                let m = Message::from_bytes(&bytes).unwrap();
                prop_assert_eq!(receiver.decrypt(&m, b"ad").unwrap(), b"some plaintext".to_vec());
            }
        }
    }
}
