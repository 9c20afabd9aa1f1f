//! Replays the committed cargo-fuzz seed corpus (`node/fuzz/corpus/<target>/`)
//! through the same entry points the fuzz targets use
//! (`tern_node::crypto::fuzz_support`), on stable `cargo test`.
//!
//! `TERN_REGENERATE_CORPUS=1 cargo test -p tern-node --test crypto_fuzz_corpus`
//! rewrites the seeds (valid encodings plus truncated and mangled variants).

// Test/bench code: panicking on unexpected errors is the point.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tern_node::crypto::fuzz_support::{TARGETS, media_stream_key};
use tern_node::crypto::{
    IdentityKeys, LocalPrekeys, Message, OutboundSenderKey, SenderKeyStore, Session, media,
};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut rng = ChaCha20Rng::from_seed([0xc0; 32]);
    let alice = IdentityKeys::generate(&mut rng).unwrap();
    let bob = IdentityKeys::generate(&mut rng).unwrap();
    let mut prekeys = LocalPrekeys::new(&mut rng, 0);
    let opk = prekeys.generate_one_time_prekeys(&mut rng, 2).unwrap()[0];
    let with_opk = prekeys.bundle(&bob, Some(opk)).unwrap();
    let without_opk = prekeys.bundle(&bob, None).unwrap();
    let mut a = Session::initiate(&mut rng, &alice, &with_opk).unwrap();
    let first = a.encrypt(&mut rng, b"first", b"").unwrap();
    let Message::PreKey(pk) = &first else {
        panic!()
    };
    let (mut b, _) = Session::accept(&bob, &mut prekeys, pk, b"").unwrap();
    let reply = b.encrypt(&mut rng, b"reply", b"").unwrap();
    a.decrypt(&reply, b"").unwrap();
    let normal = a.encrypt(&mut rng, b"normal", b"").unwrap();

    let mut out = OutboundSenderKey::new(&mut rng, [1; 32], 1, *alice.public().ed25519());
    let dist = out.distribution();
    let group_msg = out.encrypt(b"group").unwrap();
    let mut store = SenderKeyStore::new();
    store.add(&dist).unwrap();
    let inbound = store
        .get(&[1; 32], 1, alice.public().ed25519())
        .unwrap()
        .clone();

    let key = media::MediaKey::generate(&mut rng);
    let stream_key = media_stream_key();
    let stream = media::encrypt(&stream_key, &[0x42; 100]).unwrap();
    let long_stream = media::encrypt(&stream_key, &vec![7u8; media::CHUNK_SIZE + 10]).unwrap();

    let truncate = |v: &[u8]| v[..v.len() / 2].to_vec();
    vec![
        (
            "prekey_bundle",
            vec![
                with_opk.to_bytes(),
                without_opk.to_bytes(),
                truncate(&with_opk.to_bytes()),
            ],
        ),
        (
            "message",
            vec![
                first.to_bytes(),
                reply.to_bytes(),
                normal.to_bytes(),
                truncate(&first.to_bytes()),
            ],
        ),
        (
            "session_decrypt",
            vec![first.to_bytes(), normal.to_bytes(), vec![1; 57]],
        ),
        (
            "group_message",
            vec![group_msg.to_bytes(), truncate(&group_msg.to_bytes())],
        ),
        (
            "sender_key_distribution",
            vec![dist.to_bytes().to_vec(), truncate(&dist.to_bytes())],
        ),
        ("media_key", vec![key.to_bytes().to_vec(), vec![0x30; 3]]),
        (
            "media_stream",
            vec![stream.clone(), long_stream, truncate(&stream), Vec::new()],
        ),
        (
            "session_state",
            vec![
                a.to_bytes().unwrap().to_vec(),
                b.to_bytes().unwrap().to_vec(),
                vec![b'S', 1, 0],
            ],
        ),
        (
            "prekeys_state",
            vec![prekeys.to_bytes().unwrap().to_vec(), vec![b'P', 1]],
        ),
        (
            "sender_key_state",
            vec![
                out.to_bytes().unwrap().to_vec(),
                inbound.to_bytes().unwrap().to_vec(),
                store.to_bytes().unwrap().to_vec(),
            ],
        ),
    ]
}

#[test]
fn replay_seed_corpus() {
    if std::env::var_os("TERN_REGENERATE_CORPUS").is_some() {
        for (target, files) in seeds() {
            let dir = corpus_dir().join(target);
            fs::create_dir_all(&dir).unwrap();
            for (i, bytes) in files.iter().enumerate() {
                fs::write(dir.join(format!("seed-{i}")), bytes).unwrap();
            }
        }
    }
    for (target, run) in TARGETS {
        let dir = corpus_dir().join(target);
        let mut n = 0;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            run(&bytes);
            // Every prefix too: truncation must never panic.
            for len in (0..bytes.len()).step_by(bytes.len() / 16 + 1) {
                run(&bytes[..len]);
            }
            n += 1;
        }
        assert!(n > 0, "empty corpus for {target}");
    }
}
