//! Criterion benchmarks of the encryption core, each next to a baseline made
//! of the bare primitives it uses, measured in the same run.
//!
//! Run (release): `cargo bench -p tern-node --bench crypto -- --warm-up-time 1 --measurement-time 3`.
//! Figures and ratios are recorded in `docs/BENCHMARKS.md` ("Crypto (issue 3)").

// Test/bench code: panicking on unexpected errors is the point.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Tag};
use criterion::{BatchSize, Criterion, Throughput, criterion_main};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use tern_node::crypto::media::{self, CHUNK_SIZE, MediaKey};
use tern_node::crypto::{
    IdentityKeys, InboundSenderKey, LocalPrekeys, Message, OutboundSenderKey, Session,
};

const MSG: usize = 1024;

fn established(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let alice = IdentityKeys::generate(rng).unwrap();
    let bob = IdentityKeys::generate(rng).unwrap();
    let mut prekeys = LocalPrekeys::new(rng, 0);
    let opk = prekeys.generate_one_time_prekeys(rng, 1).unwrap()[0];
    let bundle = prekeys.bundle(&bob, Some(opk)).unwrap();
    let mut a = Session::initiate(rng, &alice, &bundle).unwrap();
    let Message::PreKey(first) = a.encrypt(rng, b"hi", b"").unwrap() else {
        unreachable!()
    };
    let (mut b, _) = Session::accept(&bob, &mut prekeys, &first, b"").unwrap();
    let reply = b.encrypt(rng, b"hi", b"").unwrap();
    a.decrypt(&reply, b"").unwrap();
    (a, b)
}

/// One side of what the ratchet does per message with bare primitives:
/// chain step (2 HMAC-SHA256), HKDF-SHA256 expansion of the message key to
/// key + nonce, and ChaCha20-Poly1305 over the payload.
fn primitive_side(ck: &mut [u8; 32], ad: &[u8], buf: &mut [u8], seal: bool, tag: &mut Tag) {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(ck).unwrap();
    mac.update(&[1]);
    let mk: [u8; 32] = mac.finalize().into_bytes().into();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(ck).unwrap();
    mac.update(&[2]);
    *ck = mac.finalize().into_bytes().into();
    let mut okm = [0u8; 44];
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), &mk)
        .expand(b"label", &mut okm)
        .unwrap();
    let cipher = ChaCha20Poly1305::new(okm[..32].into());
    let nonce = okm[32..].into();
    if seal {
        *tag = cipher.encrypt_in_place_detached(nonce, ad, buf).unwrap();
    } else {
        cipher
            .decrypt_in_place_detached(nonce, ad, buf, tag)
            .unwrap();
    }
}

fn ratchet(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::from_seed([1; 32]);
    let payload = vec![0x5a; MSG];
    let mut g = c.benchmark_group("ratchet_1KiB");
    g.throughput(Throughput::Elements(1));

    let (mut a, mut b) = established(&mut rng);
    g.bench_function("session_encrypt_decrypt", |bench| {
        bench.iter(|| {
            let m = a.encrypt(&mut rng, black_box(&payload), b"").unwrap();
            black_box(b.decrypt(&m, b"").unwrap())
        })
    });

    let (mut a, mut b) = established(&mut rng);
    g.bench_function("session_encrypt_decrypt_with_wire_encoding", |bench| {
        bench.iter(|| {
            let bytes = a
                .encrypt(&mut rng, black_box(&payload), b"")
                .unwrap()
                .to_bytes();
            black_box(
                b.decrypt(&Message::from_bytes(&bytes).unwrap(), b"")
                    .unwrap(),
            )
        })
    });

    let ad = [7u8; 168];
    let mut send_ck = [3u8; 32];
    let mut recv_ck = [3u8; 32];
    g.bench_function("primitives_baseline", |bench| {
        bench.iter(|| {
            let mut buf = payload.clone();
            let mut tag = Tag::default();
            primitive_side(&mut send_ck, &ad, &mut buf, true, &mut tag);
            primitive_side(&mut recv_ck, &ad, &mut buf, false, &mut tag);
            black_box(buf)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ratchet_step");
    g.throughput(Throughput::Elements(1));
    let (mut a, mut b) = established(&mut rng);
    g.bench_function("ping_pong_message_with_dh_step", |bench| {
        // Alternating directions: every message starts a new sending chain
        // (key generation + DH) and a new receiving chain (DH) on the peer.
        let mut alice_turn = true;
        bench.iter(|| {
            let (s, r) = if alice_turn {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            alice_turn = !alice_turn;
            let m = s.encrypt(&mut rng, black_box(&payload), b"").unwrap();
            black_box(r.decrypt(&m, b"").unwrap())
        })
    });
    let secret = x25519_dalek::StaticSecret::from([9u8; 32]);
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([8u8; 32]));
    g.bench_function("x25519_dh_baseline", |bench| {
        bench.iter(|| black_box(secret.diffie_hellman(black_box(&public))))
    });
    g.finish();
}

fn sender_keys(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::from_seed([2; 32]);
    let payload = vec![0x5a; MSG];
    let mut out = OutboundSenderKey::new(&mut rng, [1; 32], 1, [2; 32]);
    let inbound = InboundSenderKey::from_distribution(&out.distribution()).unwrap();
    let first = out.encrypt(&payload).unwrap();
    let mut g = c.benchmark_group("sender_keys_1KiB");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encrypt_sign", |bench| {
        bench.iter(|| black_box(out.encrypt(black_box(&payload)).unwrap()))
    });
    g.bench_function("verify_decrypt", |bench| {
        bench.iter_batched(
            || inbound.clone(),
            |mut k| black_box(k.decrypt(&first).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn media_stream(c: &mut Criterion) {
    const LEN: usize = 8 * 1024 * 1024;
    let key = MediaKey::generate(&mut ChaCha20Rng::from_seed([3; 32]));
    let data = vec![0x5a; LEN];
    let ct = media::encrypt(&key, &data).unwrap();
    let raw_key = [4u8; 32];
    let mut g = c.benchmark_group("media_8MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(20);
    g.bench_function("stream_encrypt", |bench| {
        bench.iter(|| black_box(media::encrypt(&key, &data).unwrap()))
    });
    g.bench_function("stream_decrypt", |bench| {
        bench.iter(|| black_box(media::decrypt(&key, &ct).unwrap()))
    });
    g.bench_function("raw_chacha20poly1305_baseline", |bench| {
        // The same bytes sealed in 64 KiB chunks into a fresh output buffer
        // (one copy + encryption, like the stream cipher).
        let cipher = ChaCha20Poly1305::new((&raw_key).into());
        bench.iter(|| {
            let mut out = Vec::with_capacity(LEN + LEN / CHUNK_SIZE * 16 + 16);
            for (i, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let start = out.len();
                out.extend_from_slice(chunk);
                let tag = cipher
                    .encrypt_in_place_detached((&nonce).into(), &[], &mut out[start..])
                    .unwrap();
                out.extend_from_slice(&tag);
            }
            black_box(out)
        })
    });
    g.finish();
}

/// Benchmark registration (the criterion macro generates an undocumented fn).
#[allow(missing_docs, unreachable_pub)]
mod registration {
    use super::{media_stream, ratchet, sender_keys};
    criterion::criterion_group!(benches, ratchet, sender_keys, media_stream);
}

criterion_main!(registration::benches);
