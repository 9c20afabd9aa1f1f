//! sled persistence of the relay mailbox: its own tree set (`mbx_*`) in its own database
//! directory, and the rebuild of the [`MailboxRules`] index from it at open.
//!
//! Trees (keys are fixed width so that range scans are ordered; `key` is the 32-byte
//! [`PeerKey`] of the mailbox owner, `seq` a u64 big-endian):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `mbx_meta` | `schema_version`, `seq_reserved` | u32 BE, u64 BE |
//! | `mbx_mailboxes` | `key` | `MailboxRecord { peer, tokens }` |
//! | `mbx_items` | `key \|\| seq` | `ItemRecord { id, from, deposited_at, expires_at, envelope }` |
//! | `mbx_index` | `key \|\| seq` | `IndexRecord { id, size, expires_at }` (read at open, so the rebuild never reads envelope bytes) |
//! | `mbx_prekeys` | `key \|\| seq` | the prekey bytes |
//!
//! Invariants:
//! - an item and its index entry are written and removed in one sled transaction, with the
//!   `seq_reserved` high-water mark when a new block of seqs is taken, so a seq is never
//!   handed out twice even after a crash (the fetch cursor relies on it);
//! - nothing is durable before [`MailboxDb::flush`]; the server answers only after it;
//! - writes are refused with [`DbError::DiskFull`] while the disk has less free space than
//!   the reserve: sled 0.34 does not recover cleanly from ENOSPC, so it never gets there.
//!   Removals are never refused (they free space).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::{
    rules::{MailboxRules, NewItem},
    wire::{MessageId, PeerBytes, PeerKey, StoredItem, TokenHash},
};

/// The schema this build writes.
pub const SCHEMA_VERSION: u32 = 1;
const META: &str = "mbx_meta";
const MAILBOXES: &str = "mbx_mailboxes";
const ITEMS: &str = "mbx_items";
const INDEX: &str = "mbx_index";
const PREKEYS: &str = "mbx_prekeys";
const SCHEMA_KEY: &[u8] = b"schema_version";
const SEQ_KEY: &[u8] = b"seq_reserved";
/// Seqs reserved per write of `seq_reserved`.
const SEQ_BLOCK: u64 = 4096;
/// How often free space is measured at most while little is written.
const SPACE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the mailbox database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// sled reported an error (I/O, corruption).
    #[error("mailbox database error: {0}")]
    Sled(#[from] sled::Error),
    /// The database was written by a newer Tern.
    #[error(
        "mailbox database schema {found} is newer than this Tern supports ({supported}); upgrade Tern"
    )]
    NewerSchema {
        /// The schema on disk.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
    /// A stored record does not decode or contradicts another.
    #[error("corrupt mailbox database ({tree}): {message}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The disk is (almost) full: nothing was written.
    #[error(
        "the disk is almost full: {free_mib} MiB free, the relay keeps {reserve_mib} MiB in reserve; nothing was written"
    )]
    DiskFull {
        /// Free space in MiB.
        free_mib: u64,
        /// The reserve in MiB.
        reserve_mib: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct MailboxRecord {
    peer: PeerBytes,
    tokens: Vec<TokenHash>,
}

#[derive(Serialize, Deserialize)]
struct IndexRecord {
    id: MessageId,
    size: u32,
    expires_at: u64,
}

#[derive(Serialize, Deserialize)]
struct ItemRecord {
    id: MessageId,
    from: PeerBytes,
    deposited_at: u64,
    expires_at: u64,
    #[serde(with = "crate::wire::bytes")]
    envelope: Vec<u8>,
}

/// Refuses writes while free disk space is below a reserve; measures with `statvfs` at
/// most every [`SPACE_CHECK_INTERVAL`], or sooner when the bytes counted since the last
/// measurement could have eaten half the headroom.
#[derive(Debug)]
struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    checked: Option<Instant>,
    free: u64,
    written: u64,
}

impl SpaceGuard {
    fn check(&mut self, incoming: u64) -> Result<(), DbError> {
        // sled writes more than the payload (log headers, page rewrites).
        let incoming = incoming.saturating_mul(2).saturating_add(4096);
        let stale = self
            .checked
            .is_none_or(|t| t.elapsed() >= SPACE_CHECK_INTERVAL);
        let headroom = self.free.saturating_sub(self.reserve);
        if (stale || self.written.saturating_add(incoming) > headroom / 2)
            && let Ok(s) = nix::sys::statvfs::statvfs(&self.dir)
        {
            #[allow(clippy::useless_conversion)] // the block count is u32 on some platforms
            let blocks = u64::from(s.blocks_available());
            self.free = blocks.saturating_mul(s.fragment_size());
            self.checked = Some(Instant::now());
            self.written = 0;
        }
        if self.free
            < self
                .reserve
                .saturating_add(self.written)
                .saturating_add(incoming)
        {
            return Err(DbError::DiskFull {
                free_mib: self.free / (1024 * 1024),
                reserve_mib: self.reserve / (1024 * 1024),
            });
        }
        self.written = self.written.saturating_add(incoming);
        Ok(())
    }
}

/// Makes the mailbox database durable; cheap to clone and usable from another task (the
/// node's group commit may flush off the relay task, e.g. with `flush_async`).
#[derive(Clone)]
pub struct Flusher(sled::Db);

impl Flusher {
    /// Blocking flush of every write so far; returns the bytes flushed.
    pub fn flush(&self) -> Result<usize, DbError> {
        Ok(self.0.flush()?)
    }

    /// The same as a future (sled's `flush_async`).
    pub async fn flush_async(&self) -> Result<usize, DbError> {
        Ok(self.0.flush_async().await?)
    }
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flusher")
    }
}

/// What [`MailboxDb::load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadStats {
    /// Mailboxes.
    pub mailboxes: u64,
    /// Stored envelopes (expired ones included, before the purge).
    pub items: u64,
    /// Prekeys.
    pub prekeys: u64,
}

/// The relay's sled trees.
pub struct MailboxDb {
    db: sled::Db,
    meta: sled::Tree,
    mailboxes: sled::Tree,
    items: sled::Tree,
    index: sled::Tree,
    prekeys: sled::Tree,
    space: SpaceGuard,
    /// Every seq below this is covered by the `seq_reserved` on disk (after a flush).
    seq_reserved: u64,
}

impl std::fmt::Debug for MailboxDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxDb")
            .field("dir", &self.space.dir)
            .finish_non_exhaustive()
    }
}

fn item_key(key: &PeerKey, seq: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(&key.0);
    k[32..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_key(tree: &'static str, k: &[u8]) -> Result<(PeerKey, u64), DbError> {
    let corrupt = || DbError::Corrupt {
        tree,
        message: format!("key of {} bytes, expected 40", k.len()),
    };
    let key: [u8; 32] = k
        .get(..32)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(corrupt)?;
    let seq: [u8; 8] = k
        .get(32..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(corrupt)?;
    Ok((PeerKey(key), u64::from_be_bytes(seq)))
}

fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>, DbError> {
    postcard::to_stdvec(value).map_err(|e| DbError::Corrupt {
        tree,
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, DbError> {
    postcard::from_bytes(bytes).map_err(|e| DbError::Corrupt {
        tree,
        message: e.to_string(),
    })
}

fn tx_result(r: Result<(), TransactionError<()>>) -> Result<(), DbError> {
    match r {
        Ok(()) => Ok(()),
        Err(TransactionError::Storage(e)) => Err(DbError::Sled(e)),
        // No closure here aborts.
        Err(TransactionError::Abort(())) => Err(DbError::Corrupt {
            tree: ITEMS,
            message: "transaction aborted".into(),
        }),
    }
}

impl MailboxDb {
    /// Opens (or creates) the database in directory `path`, refusing writes while the disk
    /// holding it has less than `min_free_bytes` free. Checks the schema; call
    /// [`MailboxDb::load`] next.
    pub fn open(path: &Path, min_free_bytes: u64) -> Result<Self, DbError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let meta = db.open_tree(META)?;
        let found = match meta.get(SCHEMA_KEY)? {
            None => 0,
            Some(v) => u32::from_be_bytes(v.as_ref().try_into().map_err(|_| DbError::Corrupt {
                tree: META,
                message: "schema_version is not 4 bytes".into(),
            })?),
        };
        if found > SCHEMA_VERSION {
            return Err(DbError::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            // Version 0 is a fresh database: nothing to migrate.
            meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            db.flush()?;
        }
        let seq_reserved = match meta.get(SEQ_KEY)? {
            None => 1,
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| DbError::Corrupt {
                tree: META,
                message: "seq_reserved is not 8 bytes".into(),
            })?),
        };
        Ok(Self {
            mailboxes: db.open_tree(MAILBOXES)?,
            items: db.open_tree(ITEMS)?,
            index: db.open_tree(INDEX)?,
            prekeys: db.open_tree(PREKEYS)?,
            meta,
            db,
            space: SpaceGuard {
                dir: path.to_owned(),
                reserve: min_free_bytes,
                checked: None,
                free: 0,
                written: 0,
            },
            seq_reserved,
        })
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u32, DbError> {
        Ok(self
            .meta
            .get(SCHEMA_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes))
    }

    /// Rebuilds `rules` (fresh) from disk: mailboxes, the item index (never the envelope
    /// bytes), prekey counts and the next seq. Expired items are restored too; purge next.
    pub fn load(&self, rules: &mut MailboxRules) -> Result<LoadStats, DbError> {
        let mut stats = LoadStats::default();
        for entry in self.mailboxes.iter() {
            let (k, v) = entry?;
            let record: MailboxRecord = decode(MAILBOXES, &v)?;
            if record.peer.key().0.as_slice() != k.as_ref() {
                return Err(DbError::Corrupt {
                    tree: MAILBOXES,
                    message: "a mailbox is filed under another peer's key".into(),
                });
            }
            rules.restore_mailbox(record.peer.key(), &record.tokens);
            stats.mailboxes += 1;
        }
        for entry in self.index.iter() {
            let (k, v) = entry?;
            let (key, seq) = split_key(INDEX, &k)?;
            let r: IndexRecord = decode(INDEX, &v)?;
            if !rules.restore_item(key, seq, r.id, r.size, r.expires_at) {
                return Err(DbError::Corrupt {
                    tree: INDEX,
                    message: format!(
                        "item seq {seq} has no mailbox or repeats an id of its mailbox"
                    ),
                });
            }
            stats.items += 1;
        }
        let mut current: Option<(PeerKey, u32)> = None;
        let mut max_prekey_seq = 0;
        for entry in self.prekeys.iter().keys() {
            let k = entry?;
            let (key, seq) = split_key(PREKEYS, &k)?;
            max_prekey_seq = max_prekey_seq.max(seq);
            match &mut current {
                Some((cur, n)) if *cur == key => *n += 1,
                _ => {
                    if let Some((cur, n)) = current.take() {
                        self.restore_prekeys(rules, cur, n)?;
                    }
                    current = Some((key, 1));
                }
            }
            stats.prekeys += 1;
        }
        if let Some((cur, n)) = current {
            self.restore_prekeys(rules, cur, n)?;
        }
        rules.restore_next_seq(max_prekey_seq.saturating_add(1));
        rules.restore_next_seq(self.seq_reserved);
        Ok(stats)
    }

    fn restore_prekeys(
        &self,
        rules: &mut MailboxRules,
        key: PeerKey,
        n: u32,
    ) -> Result<(), DbError> {
        if rules.restore_prekeys(key, n) {
            Ok(())
        } else {
            Err(DbError::Corrupt {
                tree: PREKEYS,
                message: "prekeys without a mailbox".into(),
            })
        }
    }

    /// The `seq_reserved` value to write with a write that uses seqs up to `last`.
    fn reservation(&self, last: u64) -> Option<u64> {
        (last >= self.seq_reserved).then(|| last.saturating_add(SEQ_BLOCK))
    }

    /// Creates or replaces a mailbox record.
    pub fn put_mailbox(
        &mut self,
        key: &PeerKey,
        peer: &PeerBytes,
        tokens: &[TokenHash],
    ) -> Result<(), DbError> {
        let value = encode(
            MAILBOXES,
            &MailboxRecord {
                peer: peer.clone(),
                tokens: tokens.to_vec(),
            },
        )?;
        self.space.check((key.0.len() + value.len()) as u64)?;
        self.mailboxes.insert(key.0, value)?;
        Ok(())
    }

    /// Stores a new envelope and its index entry atomically.
    pub fn put_item(
        &mut self,
        item: &NewItem,
        from: &PeerBytes,
        envelope: &[u8],
    ) -> Result<(), DbError> {
        let k = item_key(&item.key, item.seq);
        let value = encode(
            ITEMS,
            &ItemRecord {
                id: item.id,
                from: from.clone(),
                deposited_at: item.deposited_at,
                expires_at: item.expires_at,
                envelope: envelope.to_vec(),
            },
        )?;
        let index = encode(
            INDEX,
            &IndexRecord {
                id: item.id,
                size: item.size,
                expires_at: item.expires_at,
            },
        )?;
        self.space
            .check((2 * k.len() + value.len() + index.len()) as u64)?;
        let reserve = self.reservation(item.seq);
        let r = (&self.items, &self.index, &self.meta).transaction(|(items, idx, meta)| {
            items.insert(&k[..], value.as_slice())?;
            idx.insert(&k[..], index.as_slice())?;
            if let Some(r) = reserve {
                meta.insert(SEQ_KEY, &r.to_be_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        tx_result(r)?;
        if let Some(r) = reserve {
            self.seq_reserved = r;
        }
        Ok(())
    }

    /// Removes envelopes and their index entries atomically (never refused for space).
    pub fn remove_items(&self, key: &PeerKey, items: &[(u64, MessageId)]) -> Result<(), DbError> {
        if items.is_empty() {
            return Ok(());
        }
        let keys: Vec<[u8; 40]> = items.iter().map(|(seq, _)| item_key(key, *seq)).collect();
        let r = (&self.items, &self.index).transaction(|(it, idx)| {
            for k in &keys {
                it.remove(&k[..])?;
                idx.remove(&k[..])?;
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        tx_result(r)
    }

    /// Reads the items `seqs` (ascending) of mailbox `key` with one range scan. An item
    /// missing on disk (which the index says is there) is skipped with a warning.
    pub fn read_items(&self, key: &PeerKey, seqs: &[u64]) -> Result<Vec<StoredItem>, DbError> {
        let (Some(first), Some(last)) = (seqs.first(), seqs.last()) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(seqs.len());
        let mut wanted = seqs.iter().peekable();
        for entry in self
            .items
            .range(item_key(key, *first)..=item_key(key, *last))
        {
            let (k, v) = entry?;
            let (_, seq) = split_key(ITEMS, &k)?;
            while wanted.next_if(|w| **w < seq).is_some() {
                tracing::warn!(seq, "mailbox item in the index is missing on disk");
            }
            if wanted.next_if_eq(&&seq).is_none() {
                continue;
            }
            let r: ItemRecord = decode(ITEMS, &v)?;
            out.push(StoredItem {
                seq,
                id: r.id,
                from: r.from,
                deposited_at: r.deposited_at,
                expires_at: r.expires_at,
                envelope: r.envelope,
            });
        }
        Ok(out)
    }

    /// Appends prekeys numbered `first_seq..`, atomically.
    pub fn add_prekeys(
        &mut self,
        key: &PeerKey,
        first_seq: u64,
        prekeys: &[Vec<u8>],
    ) -> Result<(), DbError> {
        if prekeys.is_empty() {
            return Ok(());
        }
        let bytes: usize = prekeys.iter().map(|p| p.len() + 40).sum();
        self.space.check(bytes as u64)?;
        let last = first_seq.saturating_add(prekeys.len() as u64 - 1);
        let reserve = self.reservation(last);
        let r = (&self.prekeys, &self.meta).transaction(|(pk, meta)| {
            for (i, p) in prekeys.iter().enumerate() {
                pk.insert(&item_key(key, first_seq + i as u64)[..], p.as_slice())?;
            }
            if let Some(r) = reserve {
                meta.insert(SEQ_KEY, &r.to_be_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        tx_result(r)?;
        if let Some(r) = reserve {
            self.seq_reserved = r;
        }
        Ok(())
    }

    /// Removes and returns the oldest prekey of mailbox `key`.
    pub fn take_prekey(&self, key: &PeerKey) -> Result<Option<Vec<u8>>, DbError> {
        let Some(entry) = self.prekeys.scan_prefix(key.0).next() else {
            return Ok(None);
        };
        let (k, v) = entry?;
        self.prekeys.remove(k)?;
        Ok(Some(v.to_vec()))
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<usize, DbError> {
        Ok(self.db.flush()?)
    }

    /// A handle that flushes this database from elsewhere.
    pub fn flusher(&self) -> Flusher {
        Flusher(self.db.clone())
    }

    /// Bytes used on disk (approximate).
    pub fn size_on_disk(&self) -> Result<u64, DbError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Changes the free-space reserve (the next write measures again).
    pub fn set_min_free_bytes(&mut self, bytes: u64) {
        self.space.reserve = bytes;
        self.space.checked = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{limits::RelayLimits, wire::MailboxToken};

    fn peer(n: u8) -> PeerBytes {
        PeerBytes::new(vec![n; 38]).unwrap()
    }

    fn item(key: PeerKey, seq: u64, id: u8, size: u32) -> NewItem {
        NewItem {
            key,
            seq,
            id: [id; 16],
            size,
            deposited_at: 10,
            expires_at: 1000,
        }
    }

    #[test]
    fn writes_survive_reopen_and_rebuild_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
            db.put_mailbox(&key, &bob, &[MailboxToken::from_bytes([1; 32]).hash()])
                .unwrap();
            for seq in 1..=3 {
                db.put_item(&item(key, seq, seq as u8, 4), &peer(2), &[seq as u8; 4])
                    .unwrap();
            }
            db.remove_items(&key, &[(2, [2; 16])]).unwrap();
            db.add_prekeys(&key, 4, &[vec![7], vec![8]]).unwrap();
            db.flush().unwrap();
        }
        let db = MailboxDb::open(tmp.path(), 0).unwrap();
        let mut rules = MailboxRules::new(RelayLimits::default(), true);
        let stats = db.load(&mut rules).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                mailboxes: 1,
                items: 2,
                prekeys: 2
            }
        );
        rules.check_invariants().unwrap();
        assert_eq!(rules.usage(&bob), Some((2, 8)));
        assert_eq!(rules.prekeys(&bob), 2);
        assert!(
            rules.next_seq() > 5,
            "seqs are never reused after a restart"
        );
        let items = db.read_items(&key, &[1, 3]).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].envelope, vec![3; 4]);
        assert_eq!(items[1].from, peer(2));
        // Asking for a subset of a range reads only that subset.
        assert_eq!(db.read_items(&key, &[3]).unwrap().len(), 1);
        assert_eq!(db.take_prekey(&key).unwrap(), Some(vec![7]));
        assert_eq!(db.take_prekey(&key).unwrap(), Some(vec![8]));
        assert_eq!(db.take_prekey(&key).unwrap(), None);
    }

    #[test]
    fn seq_reservation_survives_removal_of_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            db.put_mailbox(&key, &bob, &[]).unwrap();
            db.put_item(&item(key, 1, 1, 1), &peer(2), &[1]).unwrap();
            db.remove_items(&key, &[(1, [1; 16])]).unwrap();
            db.flush().unwrap();
        }
        let db = MailboxDb::open(tmp.path(), 0).unwrap();
        let mut rules = MailboxRules::new(RelayLimits::default(), true);
        db.load(&mut rules).unwrap();
        assert!(
            rules.next_seq() > 1,
            "a cursor at seq 1 must not hide the next item"
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let db = MailboxDb::open(tmp.path(), 0).unwrap();
            db.meta.insert(SCHEMA_KEY, &7u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            MailboxDb::open(tmp.path(), 0),
            Err(DbError::NewerSchema { found: 7, .. })
        ));
    }

    #[test]
    fn orphan_items_are_reported_as_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        db.put_item(&item(peer(1).key(), 1, 1, 1), &peer(2), &[1])
            .unwrap();
        let mut rules = MailboxRules::new(RelayLimits::default(), true);
        assert!(matches!(
            db.load(&mut rules),
            Err(DbError::Corrupt { tree: INDEX, .. })
        ));
    }

    #[test]
    fn disk_reserve_refuses_writes_but_not_removals() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        db.put_mailbox(&key, &bob, &[]).unwrap();
        db.put_item(&item(key, 1, 1, 1), &peer(2), &[1]).unwrap();
        db.set_min_free_bytes(u64::MAX / 4);
        let e = db
            .put_item(&item(key, 2, 2, 1), &peer(2), &[2])
            .unwrap_err();
        assert!(matches!(e, DbError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("nothing was written"));
        assert!(matches!(
            db.put_mailbox(&key, &bob, &[]),
            Err(DbError::DiskFull { .. })
        ));
        assert!(matches!(
            db.add_prekeys(&key, 3, &[vec![1]]),
            Err(DbError::DiskFull { .. })
        ));
        db.remove_items(&key, &[(1, [1; 16])]).unwrap();
        let mut rules = MailboxRules::new(RelayLimits::default(), true);
        db.load(&mut rules).unwrap();
        assert_eq!(
            rules.usage(&bob),
            Some((0, 0)),
            "the refused item left no trace"
        );
        // The reserve measured again lets writes through once it is lowered.
        db.set_min_free_bytes(0);
        db.put_item(&item(key, 2, 2, 1), &peer(2), &[2]).unwrap();
    }
}
