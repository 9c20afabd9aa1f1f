//! Media STREAM cipher tests: sizes, splits, truncation, reordering, swaps,
//! appended data, cross-file splicing and the `Read`/`Write` adapters.

use std::io::{Read, Write};

use proptest::prelude::*;

use super::rng;
use crate::crypto::error::CryptoError;
use crate::crypto::media::{
    self, CHUNK_SIZE, ENCRYPTED_CHUNK_SIZE, MediaDecryptor, MediaEncryptor, MediaKey, MediaReader,
    MediaWriter, ciphertext_len,
};

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn round_trip_sizes() {
    let key = MediaKey::generate(&mut rng(1));
    for len in [
        0,
        1,
        100,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        2 * CHUNK_SIZE,
        3 * CHUNK_SIZE + 7,
    ] {
        let pt = data(len);
        let ct = media::encrypt(&key, &pt).unwrap();
        assert_eq!(ct.len() as u64, ciphertext_len(len as u64), "len {len}");
        assert_eq!(media::decrypt(&key, &ct).unwrap(), pt, "len {len}");
    }
}

#[test]
fn media_key_encoding() {
    let key = MediaKey::generate(&mut rng(2));
    let bytes = key.to_bytes();
    assert_eq!(bytes.len(), MediaKey::LEN);
    let again = MediaKey::from_bytes(&bytes).unwrap();
    assert_eq!(again.to_bytes(), bytes);
    assert!(matches!(
        MediaKey::from_bytes(&bytes[1..]),
        Err(CryptoError::InvalidLength { .. })
    ));
}

#[test]
fn truncation_detected() {
    let key = MediaKey::generate(&mut rng(3));
    let pt = data(3 * CHUNK_SIZE + 10);
    let ct = media::encrypt(&key, &pt).unwrap();
    // At chunk boundaries: a valid-looking prefix of whole chunks.
    for chunks in 1..=3 {
        let cut = &ct[..chunks * ENCRYPTED_CHUNK_SIZE];
        assert_eq!(
            media::decrypt(&key, cut).unwrap_err(),
            CryptoError::Truncated,
            "{chunks} chunks"
        );
    }
    // Inside a chunk and the empty stream.
    assert!(media::decrypt(&key, &ct[..ct.len() - 1]).is_err());
    assert!(media::decrypt(&key, &ct[..ENCRYPTED_CHUNK_SIZE + 5]).is_err());
    assert_eq!(
        media::decrypt(&key, &[]).unwrap_err(),
        CryptoError::Truncated
    );
    // A full final chunk: dropping it leaves whole chunks too.
    let pt = data(2 * CHUNK_SIZE);
    let ct = media::encrypt(&key, &pt).unwrap();
    assert_eq!(ct.len(), 2 * ENCRYPTED_CHUNK_SIZE);
    assert_eq!(
        media::decrypt(&key, &ct[..ENCRYPTED_CHUNK_SIZE]).unwrap_err(),
        CryptoError::Truncated
    );
}

#[test]
fn reorder_swap_append_detected() {
    let key = MediaKey::generate(&mut rng(4));
    let pt = data(3 * CHUNK_SIZE + 10);
    let ct = media::encrypt(&key, &pt).unwrap();
    let chunk =
        |i: usize| &ct[i * ENCRYPTED_CHUNK_SIZE..((i + 1) * ENCRYPTED_CHUNK_SIZE).min(ct.len())];
    // Swap chunks 0 and 1.
    let swapped = [chunk(1), chunk(0), chunk(2), chunk(3)].concat();
    assert_eq!(
        media::decrypt(&key, &swapped).unwrap_err(),
        CryptoError::DecryptionFailed
    );
    // Duplicate a chunk.
    let dup = [chunk(0), chunk(0), chunk(2), chunk(3)].concat();
    assert!(media::decrypt(&key, &dup).is_err());
    // Drop a middle chunk.
    let dropped = [chunk(0), chunk(2), chunk(3)].concat();
    assert!(media::decrypt(&key, &dropped).is_err());
    // Appended data after the final chunk.
    let mut appended = ct.clone();
    appended.extend_from_slice(&[0u8; 20]);
    // (the bytes merge into the short final chunk, whose tag then fails).
    assert_eq!(
        media::decrypt(&key, &appended).unwrap_err(),
        CryptoError::DecryptionFailed
    );
    // Data appended after a full-size final chunk is diagnosed as such.
    let full = media::encrypt(&key, &data(CHUNK_SIZE)).unwrap();
    let twice = [full.as_slice(), full.as_slice()].concat();
    assert_eq!(
        media::decrypt(&key, &twice).unwrap_err(),
        CryptoError::TrailingData
    );
    let mut one_more = full.clone();
    one_more.push(0);
    assert_eq!(
        media::decrypt(&key, &one_more).unwrap_err(),
        CryptoError::TrailingData
    );
    // Splicing a chunk from another file encrypted under another key.
    let other_key = MediaKey::generate(&mut rng(5));
    let other = media::encrypt(&other_key, &pt).unwrap();
    let spliced = [
        chunk(0),
        &other[ENCRYPTED_CHUNK_SIZE..2 * ENCRYPTED_CHUNK_SIZE],
        chunk(2),
        chunk(3),
    ]
    .concat();
    assert!(media::decrypt(&key, &spliced).is_err());
    // Bit flips anywhere.
    for pos in [
        0,
        100,
        ENCRYPTED_CHUNK_SIZE - 1,
        ENCRYPTED_CHUNK_SIZE,
        ct.len() - 1,
    ] {
        let mut b = ct.clone();
        b[pos] ^= 0x40;
        assert!(media::decrypt(&key, &b).is_err(), "flip at {pos}");
    }
}

#[test]
fn decryptor_poisoned_after_error() {
    let key = MediaKey::generate(&mut rng(6));
    let mut ct = media::encrypt(&key, &data(3 * CHUNK_SIZE)).unwrap();
    ct[5] ^= 1;
    let mut dec = MediaDecryptor::new(&key);
    let mut out = Vec::new();
    assert_eq!(
        dec.update(&ct, &mut out).unwrap_err(),
        CryptoError::DecryptionFailed
    );
    assert!(out.is_empty(), "no unauthenticated plaintext released");
    assert!(matches!(
        dec.update(&[], &mut out),
        Err(CryptoError::StreamMisuse { .. })
    ));
}

#[test]
fn io_adapters_round_trip_and_detect_truncation() {
    let key = MediaKey::generate(&mut rng(7));
    let pt = data(2 * CHUNK_SIZE + 1234);
    let mut w = MediaWriter::new(&key, Vec::new());
    for piece in pt.chunks(10_000) {
        w.write_all(piece).unwrap();
    }
    let ct = w.finish().unwrap();
    assert_eq!(ct, media::encrypt(&key, &pt).unwrap());
    let mut back = Vec::new();
    MediaReader::new(&key, ct.as_slice())
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, pt);
    // Truncated at a chunk boundary: an error, never a silent short read.
    let mut back = Vec::new();
    let err = MediaReader::new(&key, &ct[..2 * ENCRYPTED_CHUNK_SIZE])
        .read_to_end(&mut back)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    // A writer dropped without finish leaves a rejected stream.
    let mut w = MediaWriter::new(&key, Vec::new());
    w.write_all(&pt).unwrap();
    drop(w);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_splits_agree(len in 0..(2 * CHUNK_SIZE + 300), splits in proptest::collection::vec(1..70_000usize, 1..6), seed in any::<u8>()) {
        let key = MediaKey::generate(&mut rng(seed));
        let pt = data(len);
        let whole = media::encrypt(&key, &pt).unwrap();
        // Encrypt in arbitrary pieces.
        let mut enc = MediaEncryptor::new(&key);
        let mut ct = Vec::new();
        let mut rest = pt.as_slice();
        for s in splits.iter().cycle() {
            if rest.is_empty() { break; }
            let (a, b) = rest.split_at((*s).min(rest.len()));
            enc.update(a, &mut ct).unwrap();
            rest = b;
        }
        enc.finalize(&mut ct).unwrap();
        prop_assert_eq!(&ct, &whole);
        // Decrypt in arbitrary pieces.
        let mut dec = MediaDecryptor::new(&key);
        let mut out = Vec::new();
        let mut rest = ct.as_slice();
        for s in splits.iter().rev().cycle() {
            if rest.is_empty() { break; }
            let (a, b) = rest.split_at((*s).min(rest.len()));
            dec.update(a, &mut out).unwrap();
            rest = b;
        }
        dec.finalize(&mut out).unwrap();
        prop_assert_eq!(out, pt);
    }
}
