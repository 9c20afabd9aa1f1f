//! Local prekey store tests: pool management, rotation, persistence.

use super::rng;
use crate::crypto::error::CryptoError;
use crate::crypto::keys::{IdentityKeys, LocalPrekeys, MAX_ONE_TIME_PREKEYS};

#[test]
fn pool_generation_and_consumption() {
    let mut r = rng(1);
    let id = IdentityKeys::generate(&mut r).unwrap();
    let mut p = LocalPrekeys::new(&mut r, 5);
    assert_eq!(p.signed_prekey_id(), 1);
    assert_eq!(p.signed_prekey_created_at(), 5);
    let ids = p.generate_one_time_prekeys(&mut r, 5).unwrap();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(p.generate_one_time_prekeys(&mut r, 2).unwrap(), vec![6, 7]);
    p.consume_one_time_prekey(3).unwrap();
    assert_eq!(
        p.consume_one_time_prekey(3).unwrap_err(),
        CryptoError::UnknownOneTimePrekey { id: 3 }
    );
    assert_eq!(p.one_time_prekey_count(), 6);
    assert_eq!(
        p.bundle(&id, Some(3)).unwrap_err(),
        CryptoError::UnknownOneTimePrekey { id: 3 }
    );
    let b = p.bundle(&id, Some(4)).unwrap();
    assert_eq!(b.one_time_prekey().map(|(i, _)| i), Some(4));
    b.verify().unwrap();
    // Pool cap: fails without changes.
    let before = p.to_bytes().unwrap().to_vec();
    let err = p
        .generate_one_time_prekeys(&mut r, MAX_ONE_TIME_PREKEYS)
        .unwrap_err();
    assert!(matches!(err, CryptoError::TooManyPrekeys { .. }));
    assert_eq!(p.to_bytes().unwrap().to_vec(), before);
}

#[test]
fn rotation_keeps_one_previous_key() {
    let mut r = rng(2);
    let mut p = LocalPrekeys::new(&mut r, 0);
    assert_eq!(p.rotate_signed_prekey(&mut r, 100).unwrap(), 2);
    assert_eq!(p.previous_signed_prekey_id(), Some(1));
    assert_eq!(p.rotate_signed_prekey(&mut r, 200).unwrap(), 3);
    assert_eq!(p.previous_signed_prekey_id(), Some(2));
    assert!(p.signed_prekey_secret(1).is_err());
    assert!(p.signed_prekey_secret(2).is_ok());
    assert!(!p.prune(199));
    assert!(p.prune(200 + crate::crypto::keys::SIGNED_PREKEY_GRACE_SECS));
    assert_eq!(p.previous_signed_prekey_id(), None);
}

#[test]
fn persistence_round_trip_and_validation() {
    let mut r = rng(3);
    let id = IdentityKeys::generate(&mut r).unwrap();
    let mut p = LocalPrekeys::new(&mut r, 0);
    p.generate_one_time_prekeys(&mut r, 3).unwrap();
    p.rotate_signed_prekey(&mut r, 9).unwrap();
    let bytes = p.to_bytes().unwrap();
    assert_eq!(&bytes[..2], &[b'P', 1]);
    let q = LocalPrekeys::from_bytes(&bytes).unwrap();
    assert_eq!(q.to_bytes().unwrap(), bytes);
    assert_eq!(
        q.bundle(&id, Some(2)).unwrap(),
        p.bundle(&id, Some(2)).unwrap()
    );
    let mut v = bytes.to_vec();
    v[1] = 0;
    assert!(matches!(
        LocalPrekeys::from_bytes(&v),
        Err(CryptoError::UnsupportedVersion { .. })
    ));
    assert!(LocalPrekeys::from_bytes(&bytes[..bytes.len() - 3]).is_err());
}
