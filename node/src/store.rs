//! The node's persistent store: one sled database behind a narrow, typed interface.
//!
//! Everything above this module sees [`Store`] and [`Table`], never sled itself, so the engine
//! can be swapped without touching protocol code. Invariants:
//! - the `meta` tree holds `schema_version`; opening a database written by a newer Tern fails,
//!   an older one is migrated step by step before anything else reads it;
//! - values are versioned postcard (or raw bytes) chosen by the caller of [`Table`];
//! - nothing is acknowledged to anyone before [`Store::flush`] returned: sled writes are
//!   durable only after a flush;
//! - writes stop, with [`StoreError::DiskFull`], while the disk has less free space than the
//!   configured reserve. sled does not recover cleanly from running out of space (it stops
//!   writing, and data flushed just before can be lost on the next open), so the store never
//!   lets it get there.

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Serialize, de::DeserializeOwned};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
    UnabortableTransactionError,
};

/// Free disk space kept in reserve by default: 64 MiB.
pub const DEFAULT_DISK_RESERVE: u64 = 64 * 1024 * 1024;

/// The schema this build writes.
pub const SCHEMA_VERSION: u32 = 1;
const META_TREE: &str = "meta";
const SCHEMA_KEY: &[u8] = b"schema_version";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (I/O, full disk, corruption).
    #[error("database error: {}", describe(.0))]
    Db(#[from] sled::Error),
    /// The database was written by a newer Tern.
    #[error("database schema {found} is newer than this Tern supports ({supported}); upgrade Tern")]
    NewerSchema {
        /// The schema found on disk.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
    /// A stored value does not decode.
    #[error("corrupt value in table {table}: {message}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// Decoder message.
        message: String,
    },
    /// The disk is (almost) full: writing now could lose data, so nothing was written.
    #[error(
        "the disk is almost full: {free_mib} MiB free, Tern keeps {reserve_mib} MiB in reserve; free some space"
    )]
    DiskFull {
        /// Free space in MiB.
        free_mib: u64,
        /// The reserve in MiB.
        reserve_mib: u64,
    },
    /// A transaction was aborted by its closure.
    #[error("transaction aborted: {0}")]
    Aborted(String),
}

/// A readable description of a sled error (I/O errors by their OS message).
fn describe(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => match io.get_ref() {
            // sled wraps OS errors in a custom error whose text is the Debug form.
            Some(inner) => {
                let text = inner.to_string();
                if text.contains("code: 28") || io.kind() == std::io::ErrorKind::StorageFull {
                    "the disk is full (no space left on device)".to_string()
                } else {
                    format!("I/O error: {text}")
                }
            }
            None if io.kind() == std::io::ErrorKind::StorageFull => {
                "the disk is full (no space left on device)".to_string()
            }
            None => format!("I/O error: {io}"),
        },
        other => other.to_string(),
    }
}

/// Refuses writes while free disk space is below a reserve. Free space is measured with
/// `statvfs` at most every [`SPACE_CHECK_INTERVAL`], or sooner when the bytes written since
/// the last measurement could have eaten into the reserve.
#[derive(Debug)]
struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    state: Mutex<SpaceState>,
}

#[derive(Debug)]
struct SpaceState {
    checked: Option<Instant>,
    free: u64,
    written: u64,
}

/// How often free space is measured at most (when few bytes are written).
const SPACE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

impl SpaceGuard {
    fn check(&self, incoming: u64) -> Result<(), StoreError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // sled writes a little more than the payload (log headers, page rewrites).
        let incoming = incoming.saturating_mul(2).saturating_add(4096);
        let stale = st
            .checked
            .is_none_or(|t| t.elapsed() >= SPACE_CHECK_INTERVAL);
        let headroom = st.free.saturating_sub(self.reserve);
        if (stale || st.written.saturating_add(incoming) > headroom / 2)
            && let Ok(s) = nix::sys::statvfs::statvfs(&self.dir)
        {
            #[allow(clippy::useless_conversion)] // the block count is u32 on some platforms
            let blocks = u64::from(s.blocks_available());
            st.free = blocks.saturating_mul(s.fragment_size());
            st.checked = Some(Instant::now());
            st.written = 0;
        }
        if st.free
            < self
                .reserve
                .saturating_add(st.written)
                .saturating_add(incoming)
        {
            return Err(StoreError::DiskFull {
                free_mib: st.free / (1024 * 1024),
                reserve_mib: self.reserve / (1024 * 1024),
            });
        }
        st.written = st.written.saturating_add(incoming);
        Ok(())
    }
}

/// The database. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    space: Option<Arc<SpaceGuard>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database at `path` and brings its schema up to date, with the
    /// default disk reserve ([`DEFAULT_DISK_RESERVE`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_reserve(path, DEFAULT_DISK_RESERVE)
    }

    /// Opens the database, refusing writes while the disk has less than `reserve` bytes free.
    pub fn open_with_reserve(path: &Path, reserve: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let store = Self {
            db,
            space: Some(Arc::new(SpaceGuard {
                dir: path.to_owned(),
                reserve,
                state: Mutex::new(SpaceState {
                    checked: None,
                    free: 0,
                    written: 0,
                }),
            })),
        };
        store.migrate()?;
        Ok(store)
    }

    /// A throwaway in-memory database (tests and benchmarks).
    pub fn temporary() -> Result<Self, StoreError> {
        let store = Self {
            db: sled::Config::new().temporary(true).open()?,
            space: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Fails with [`StoreError::DiskFull`] if writing `bytes` would eat into the reserve.
    pub fn ensure_space(&self, bytes: u64) -> Result<(), StoreError> {
        match &self.space {
            Some(g) => g.check(bytes),
            None => Ok(()),
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let meta = self.db.open_tree(META_TREE)?;
        let found = match meta.get(SCHEMA_KEY)? {
            None => 0,
            Some(v) => {
                let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    table: META_TREE,
                    message: "schema_version is not 4 bytes".into(),
                })?;
                u32::from_be_bytes(bytes)
            }
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        // Migration steps run in order; version 0 (a fresh database) -> 1 needs no data change.
        if found < SCHEMA_VERSION {
            meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            meta.flush()?;
        }
        Ok(())
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let meta = self.db.open_tree(META_TREE)?;
        Ok(meta
            .get(SCHEMA_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0))
    }

    /// A typed table (a sled tree) named `name`.
    pub fn table<V>(&self, name: &'static str) -> Result<Table<V>, StoreError> {
        Ok(Table {
            name,
            tree: self.db.open_tree(name)?,
            space: self.space.clone(),
            _v: PhantomData,
        })
    }

    /// Makes every write so far durable. Call before acknowledging anything.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush_async().await?)
    }

    /// Blocking flush, for shutdown paths outside async code.
    pub fn flush_blocking(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// Runs `f` atomically over `tables`: either every write in it lands or none does.
    /// `f` may be re-run on conflict, so it must not have side effects outside `tx`.
    pub fn transaction<R>(
        &self,
        tables: &[&dyn AnyTable],
        f: impl Fn(&Tx<'_>) -> Result<R, TxError>,
    ) -> Result<R, StoreError> {
        let trees: Vec<sled::Tree> = tables.iter().map(|t| t.tree().clone()).collect();
        let names: Vec<&'static str> = tables.iter().map(|t| t.name()).collect();
        let result = trees
            .as_slice()
            .transaction(|views: &Vec<TransactionalTree>| {
                let tx = Tx {
                    views: views.as_slice(),
                    names: &names,
                };
                f(&tx).map_err(|e| e.0)
            });
        match result {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StoreError::Db(e)),
        }
    }

    /// Bytes used on disk (approximate).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// Any table, for naming the tables a transaction touches.
pub trait AnyTable {
    /// The table's name.
    fn name(&self) -> &'static str;
    /// The sled tree behind it.
    fn tree(&self) -> &sled::Tree;
}

impl<V> AnyTable for Table<V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn tree(&self) -> &sled::Tree {
        &self.tree
    }
}

/// An error inside a transaction: a storage error, a conflict (sled retries) or an abort.
#[derive(Debug)]
pub struct TxError(ConflictableTransactionError<StoreError>);

impl TxError {
    /// Aborts the transaction with `error`; nothing it wrote lands.
    pub fn abort(error: StoreError) -> Self {
        Self(ConflictableTransactionError::Abort(error))
    }
}

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> Self {
        Self(e.into())
    }
}

/// The view of the tables inside [`Store::transaction`].
pub struct Tx<'a> {
    views: &'a [TransactionalTree],
    names: &'a [&'static str],
}

impl Tx<'_> {
    fn view<V>(&self, table: &Table<V>) -> Result<&TransactionalTree, TxError> {
        self.names
            .iter()
            .position(|n| *n == table.name)
            .map(|i| &self.views[i])
            .ok_or_else(|| {
                TxError::abort(StoreError::Aborted(format!(
                    "table {} is not part of this transaction",
                    table.name
                )))
            })
    }

    /// Reads `key` of `table`.
    pub fn get<V: Serialize + DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: &[u8],
    ) -> Result<Option<V>, TxError> {
        match self.view(table)?.get(key)? {
            None => Ok(None),
            Some(bytes) => table.decode(&bytes).map(Some).map_err(TxError::abort),
        }
    }

    /// Writes `value` under `key` of `table`.
    pub fn insert<V: Serialize + DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: &[u8],
        value: &V,
    ) -> Result<(), TxError> {
        let bytes = table.encode(value).map_err(TxError::abort)?;
        if let Some(g) = &table.space {
            g.check((key.len() + bytes.len()) as u64)
                .map_err(TxError::abort)?;
        }
        self.view(table)?.insert(key, bytes)?;
        Ok(())
    }

    /// Removes `key` of `table`; returns whether it existed.
    pub fn remove<V>(&self, table: &Table<V>, key: &[u8]) -> Result<bool, TxError> {
        Ok(self.view(table)?.remove(key)?.is_some())
    }
}

/// A typed view of one tree: byte keys, values encoded with postcard.
pub struct Table<V> {
    name: &'static str,
    tree: sled::Tree,
    space: Option<Arc<SpaceGuard>>,
    _v: PhantomData<fn() -> V>,
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            tree: self.tree.clone(),
            space: self.space.clone(),
            _v: PhantomData,
        }
    }
}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.name).finish()
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    fn decode(&self, bytes: &[u8]) -> Result<V, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
            table: self.name,
            message: e.to_string(),
        })
    }

    fn encode(&self, value: &V) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(value).map_err(|e| StoreError::Corrupt {
            table: self.name,
            message: e.to_string(),
        })
    }

    /// The value under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<V>, StoreError> {
        self.tree.get(key)?.map(|v| self.decode(&v)).transpose()
    }

    /// Stores `value` under `key` (durable only after [`Store::flush`]).
    pub fn insert(&self, key: &[u8], value: &V) -> Result<(), StoreError> {
        let bytes = self.encode(value)?;
        if let Some(g) = &self.space {
            g.check((key.len() + bytes.len()) as u64)?;
        }
        self.tree.insert(key, bytes)?;
        Ok(())
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree.remove(key)?.is_some())
    }

    /// Whether `key` exists.
    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(key)?)
    }

    /// Number of entries (walks the tree).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Entries with keys `>= from`, in key order, at most `limit`.
    pub fn scan_from(&self, from: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.range(from..).take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), self.decode(&v)?));
        }
        Ok(out)
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            out.push((k.to_vec(), self.decode(&v)?));
        }
        Ok(out)
    }

    /// At most `limit` entries whose key starts with `prefix`, from the first in key order.
    pub fn scan_prefix_first(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix).take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), self.decode(&v)?));
        }
        Ok(out)
    }

    /// The last `limit` entries whose key starts with `prefix`, returned in key order.
    pub fn scan_prefix_last(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix).rev().take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), self.decode(&v)?));
        }
        out.reverse();
        Ok(out)
    }

    /// Number of keys starting with `prefix`.
    pub fn count_prefix(&self, prefix: &[u8]) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.scan_prefix(prefix) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The last entry in key order.
    pub fn last(&self) -> Result<Option<(Vec<u8>, V)>, StoreError> {
        self.tree
            .last()?
            .map(|(k, v)| Ok((k.to_vec(), self.decode(&v)?)))
            .transpose()
    }

    /// Removes the first `n` entries in key order; returns how many were removed.
    pub fn remove_first(&self, n: usize) -> Result<usize, StoreError> {
        let mut removed = 0;
        while removed < n {
            match self.tree.pop_min()? {
                Some(_) => removed += 1,
                None => break,
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_written_and_newer_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
            let meta = s.db.open_tree(META_TREE).unwrap();
            meta.insert(SCHEMA_KEY, &99u32.to_be_bytes()).unwrap();
            s.flush_blocking().unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::NewerSchema { found: 99, .. }) => {}
            other => panic!("expected NewerSchema, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn typed_table_round_trip_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            let t: Table<(String, u64)> = s.table("things").unwrap();
            t.insert(b"a", &("x".into(), 1)).unwrap();
            t.insert(b"b", &("y".into(), 2)).unwrap();
            s.flush().await.unwrap();
        }
        let s = Store::open(&path).unwrap();
        let t: Table<(String, u64)> = s.table("things").unwrap();
        assert_eq!(t.get(b"a").unwrap(), Some(("x".into(), 1)));
        assert_eq!(t.scan_from(b"b", 10).unwrap().len(), 1);
        assert_eq!(t.last().unwrap().unwrap().0, b"b".to_vec());
        assert_eq!(t.remove_first(1).unwrap(), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn transaction_is_all_or_nothing() {
        let s = Store::temporary().unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        let b: Table<String> = s.table("b").unwrap();
        s.transaction(&[&a, &b], |tx| {
            tx.insert(&a, b"k", &1)?;
            tx.insert(&b, b"k", &"one".to_string())?;
            Ok(())
        })
        .unwrap();
        let err = s
            .transaction(&[&a, &b], |tx| {
                tx.insert(&a, b"k", &2)?;
                tx.remove(&b, b"k")?;
                Err::<(), _>(TxError::abort(StoreError::Aborted("no".into())))
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Aborted(_)));
        assert_eq!(
            a.get(b"k").unwrap(),
            Some(1),
            "nothing of the aborted tx landed"
        );
        assert_eq!(b.get(b"k").unwrap(), Some("one".to_string()));
        // A table outside the transaction is refused.
        let c: Table<u32> = s.table("c").unwrap();
        assert!(s.transaction(&[&a], |tx| tx.insert(&c, b"k", &1)).is_err());
    }

    #[test]
    fn corrupt_value_is_a_typed_error() {
        let s = Store::temporary().unwrap();
        let raw: Table<Vec<u8>> = s.table("t").unwrap();
        raw.insert(b"k", &vec![]).unwrap();
        let typed: Table<(u64, String, [u8; 32])> = s.table("t").unwrap();
        assert!(matches!(
            typed.get(b"k"),
            Err(StoreError::Corrupt { table: "t", .. })
        ));
    }
}
