//! The node's one identity: a 32-byte ed25519 seed stored in `<data-dir>/identity.key`.
//!
//! The same seed gives the libp2p [`PeerId`] (via an ed25519 libp2p keypair) and the iroh
//! `EndpointId` (the same ed25519 public key, as iroh encodes it), and it signs everything the
//! node publishes about itself. There is exactly one identity per data directory.
//!
//! File format (48 bytes, mode 0600): the magic `TERN-ID1`, the 32-byte seed, and the first
//! 8 bytes of `BLAKE3(magic || seed)` so that truncation or bit rot is reported as corruption
//! instead of silently yielding a different identity. The seed never appears in `Debug`
//! output or logs, and is zeroed when dropped.

use std::path::{Path, PathBuf};

use libp2p::{PeerId, identity::Keypair};
use zeroize::Zeroizing;

use crate::data_dir::{DataDir, DataDirError, write_private_new};

const MAGIC: &[u8; 8] = b"TERN-ID1";
const FILE_LEN: usize = 8 + 32 + 8;

/// Errors loading or creating an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `tern init` was run where an identity already exists.
    #[error("an identity already exists at {path}; refusing to overwrite it")]
    AlreadyExists {
        /// The existing identity file.
        path: PathBuf,
    },
    /// No identity file yet.
    #[error("no Tern identity at {path}; create one with `tern init`")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The file exists but is not a valid identity.
    #[error("corrupt identity file {path}: {problem}")]
    Corrupt {
        /// The identity file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading or writing failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The identity file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory could not be prepared.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
}

/// The node identity. Cheap to clone; the seed is zeroed on drop.
#[derive(Clone)]
pub struct Identity {
    seed: Zeroizing<[u8; 32]>,
    keypair: Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .field("seed", &"<redacted>")
            .finish()
    }
}

impl Identity {
    /// Builds the identity from a seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        let mut copy = Zeroizing::new(*seed);
        // A 32-byte slice is always a valid ed25519 secret key.
        let keypair = Keypair::ed25519_from_bytes(copy.as_mut_slice())
            .expect("any 32 bytes are a valid ed25519 secret key");
        Self { seed, keypair }
    }

    /// A fresh random identity.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Self::from_seed(seed)
    }

    /// Creates a new identity in `dir`; refuses if one exists.
    pub fn create(dir: &DataDir) -> Result<Self, IdentityError> {
        dir.create()?;
        let path = dir.identity_path();
        if path.exists() {
            return Err(IdentityError::AlreadyExists { path });
        }
        let id = Self::generate();
        // Never over an identity that appeared meanwhile (another `tern init`).
        match write_private_new(&path, &id.encode(), 0o600) {
            Ok(()) => Ok(id),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(IdentityError::AlreadyExists { path })
            }
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    /// Loads the identity of `dir`.
    pub fn load(dir: &DataDir) -> Result<Self, IdentityError> {
        Self::load_file(&dir.identity_path())
    }

    /// Loads an identity file.
    pub fn load_file(path: &Path) -> Result<Self, IdentityError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(IdentityError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::decode(&bytes).map_err(|problem| IdentityError::Corrupt {
            path: path.to_owned(),
            problem,
        })
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(FILE_LEN));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(self.seed.as_slice());
        out.extend_from_slice(&checksum(&self.seed));
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != FILE_LEN {
            return Err(format!(
                "expected {FILE_LEN} bytes, found {} (truncated or not a Tern identity)",
                bytes.len()
            ));
        }
        if &bytes[..8] != MAGIC {
            return Err("missing the TERN-ID1 header (not a Tern identity file)".into());
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[8..40]);
        if bytes[40..] != checksum(&seed) {
            return Err("checksum mismatch (the file is damaged)".into());
        }
        Ok(Self::from_seed(*seed))
    }

    /// The libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The iroh endpoint id: the same ed25519 public key, in iroh's encoding.
    pub fn endpoint_id(&self) -> iroh_base::EndpointId {
        iroh_base::SecretKey::from_bytes(&self.seed).public()
    }

    /// The libp2p keypair (for the Swarm).
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The raw seed, for deriving the other long-term keys (crypto layer only).
    pub(crate) fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The ed25519 signing key for Tern-level signatures.
    pub fn signing_key(&self) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&self.seed)
    }
}

fn checksum(seed: &[u8; 32]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(MAGIC);
    h.update(seed);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// The ed25519 public key inside an ed25519 [`PeerId`], or `None` for other key types.
pub fn ed25519_public_of(peer: &PeerId) -> Option<ed25519_dalek::VerifyingKey> {
    let mh = peer.as_ref();
    // Ed25519 peer ids use the identity multihash (code 0) over the protobuf public key.
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    ed25519_dalek::VerifyingKey::from_bytes(&ed.to_bytes()).ok()
}

/// The 32 bytes of the ed25519 public key behind `peer`, if it has one. The canonical
/// protobuf encoding libp2p puts in such a peer id (`08 01 12 20` then the key) is read
/// directly; point decompression (twice, through [`ed25519_public_of`]) cost ~40 µs per
/// inbound envelope. Anything else takes the full decoding path.
pub fn ed25519_key_bytes_of(peer: &PeerId) -> Option<[u8; 32]> {
    let mh = peer.as_ref();
    if mh.code() == 0
        && let Some(key) = mh.digest().strip_prefix(&[0x08, 0x01, 0x12, 0x20])
        && let Ok(key) = <[u8; 32]>::try_from(key)
    {
        return Some(key);
    }
    ed25519_public_of(peer).map(|k| k.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_of_a_peer_id_match_the_full_decoding() {
        for seed in [[1u8; 32], [2; 32], [0xfe; 32]] {
            let kp = libp2p::identity::Keypair::ed25519_from_bytes(seed).unwrap();
            let peer = kp.public().to_peer_id();
            assert_eq!(
                ed25519_key_bytes_of(&peer),
                ed25519_public_of(&peer).map(|k| k.to_bytes())
            );
            assert!(ed25519_key_bytes_of(&peer).is_some());
        }
        // Not an ed25519 key.
        assert_eq!(ed25519_key_bytes_of(&PeerId::random()), None);
    }

    #[test]
    fn seed_gives_stable_ids() {
        let a = Identity::from_seed([7u8; 32]);
        let b = Identity::from_seed([7u8; 32]);
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.endpoint_id(), b.endpoint_id());
        // Both ids carry the same ed25519 public key.
        assert_eq!(
            ed25519_public_of(&a.peer_id()).unwrap().to_bytes(),
            *a.endpoint_id().as_bytes()
        );
        assert_eq!(
            a.signing_key().verifying_key().to_bytes(),
            *a.endpoint_id().as_bytes()
        );
        // Known answer: the ids of this seed never change.
        assert_eq!(
            a.peer_id().to_string(),
            "12D3KooWRawPbxPtP1eZaJpumGnyWX2DcUyd3RQnydr3eAto4Az7"
        );
        assert_ne!(a.peer_id(), Identity::from_seed([8u8; 32]).peer_id());
    }

    #[test]
    fn create_load_round_trip_and_refuse_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("n"));
        let id = Identity::create(&dir).unwrap();
        let loaded = Identity::load(&dir).unwrap();
        assert_eq!(id.peer_id(), loaded.peer_id());
        let before = std::fs::read(dir.identity_path()).unwrap();
        assert!(matches!(
            Identity::create(&dir),
            Err(IdentityError::AlreadyExists { .. })
        ));
        assert_eq!(before, std::fs::read(dir.identity_path()).unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.identity_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn corrupt_files_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        Identity::create(&dir).unwrap();
        let path = dir.identity_path();
        let good = std::fs::read(&path).unwrap();

        std::fs::write(&path, &good[..20]).unwrap();
        let e = Identity::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("corrupt identity file") && e.contains("truncated"),
            "{e}"
        );

        let mut flipped = good.clone();
        flipped[10] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = Identity::load(&dir).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn debug_never_shows_the_seed() {
        let seed = [0xABu8; 32];
        let id = Identity::from_seed(seed);
        let dbg = format!("{id:?}");
        assert!(dbg.contains("redacted"));
        assert!(!dbg.to_lowercase().contains("abab"));
        assert!(!dbg.contains("171"), "no decimal bytes either: {dbg}");
    }
}
