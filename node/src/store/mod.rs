//! The node's persistent store: one sled database behind a narrow, typed interface.
//!
//! Everything above this module sees [`Store`] and [`Table`], never sled itself, so the engine
//! can be swapped without touching protocol code. Invariants:
//! - the `meta` tree holds `schema_version`; opening a database written by a newer Tern fails,
//!   an older one is migrated step by step before anything else reads it;
//! - values are versioned postcard (or raw bytes) chosen by the caller of [`Table`];
//! - nothing is acknowledged to anyone before [`Store::flush`] returned: sled writes are
//!   durable only after a flush;
//! - a write is journaled at once and applied to sled only once its record is durable
//!   ([`Store::apply_pending`], a flush, a checkpoint, or once much is waiting): reads and
//!   scans see it meanwhile, and sled never holds what the journal could still lose;
//! - writes stop, with [`StoreError::DiskFull`], while the disk has less free space than the
//!   configured reserve, and journaled writes wait (readable) while it has no room to apply
//!   them. sled does not recover from running out of space (it stops writing, data flushed
//!   just before can be lost on the next open, and a failed write can leave every later
//!   flush waiting forever), so the store keeps it away from a full disk as far as it can
//!   measure, and after a failed sled write it never flushes or closes sled again in this
//!   process (sled's handle is leaked: its file lock, threads and cache stay until the
//!   process ends, so reopening in the same process fails to take sled's lock).

mod journal;

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    fs::File,
    marker::PhantomData,
    ops::Bound,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Serialize, de::DeserializeOwned};
use tern_store_forward::space;

/// Free disk space kept in reserve by default: 64 MiB.
pub const DEFAULT_DISK_RESERVE: u64 = 64 * 1024 * 1024;

/// The schema this build writes.
pub const SCHEMA_VERSION: u32 = 2;
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
    /// A write failed half way; the store accepts nothing more until it is opened again
    /// (opening repairs it from its journal).
    #[error("the database stopped after a failed write ({0}); restart Tern")]
    Broken(String),
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

/// The free-space reserve ([`tern_store_forward::space::SpaceGuard`], shared with the
/// relay's mailbox) behind a mutex, since every writer checks it. Writes journaled earlier
/// and applied to sled only now are measured afresh first ([`SpaceGuard::room_to_apply`]).
#[derive(Debug)]
struct SpaceGuard(Mutex<space::SpaceGuard>);

impl SpaceGuard {
    /// Guards the disk holding `dir`, keeping `reserve` bytes free.
    fn new(dir: &Path, reserve: u64) -> Self {
        Self(Mutex::new(space::SpaceGuard::new(dir, reserve)))
    }

    /// Counts an insert of `incoming` bytes, refusing it if it would eat into the reserve.
    fn check(&self, incoming: u64) -> Result<(), StoreError> {
        Ok(lock(&self.0).check(incoming)?)
    }

    /// Whether sled can take `bytes` of writes now, measured afresh (the disk may have
    /// filled since they were counted, by another program too). sled must not run out of
    /// space: a failed write can leave it waiting forever for the write to end (sled 0.34).
    /// What sled still buffers from earlier applies (a few MiB) is covered by the reserve
    /// kept for inserts; only another program filling the disk between a measurement and
    /// sled's write can still get sled there.
    fn room_to_apply(&self, bytes: u64) -> bool {
        lock(&self.0).check_fresh(bytes).is_ok()
    }

    /// The error for a write refused because the disk is full, with the last measurement.
    fn full(&self) -> StoreError {
        lock(&self.0).full().into()
    }
}

impl From<space::Full> for StoreError {
    fn from(f: space::Full) -> Self {
        StoreError::DiskFull {
            free_mib: f.free / (1024 * 1024),
            reserve_mib: f.reserve / (1024 * 1024),
        }
    }
}

/// How long applying waits, after finding too little free space, before measuring again.
const APPLY_RETRY: Duration = Duration::from_millis(250);

/// How long [`Store::close`] waits for the flush and checkpoint before giving up.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// The `meta` key holding the seq of the last journal record applied to sled.
const JOURNAL_SEQ_KEY: &[u8] = b"journal_seq";
/// Journal bytes after which a flush also checkpoints (sled flush, fresh journal file).
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// One write of a transaction, as it is applied to sled.
struct Write {
    tree: sled::Tree,
    name: &'static str,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

/// Writes journaled and not yet applied to sled: the latest value of each key, by tree.
/// Reads and scans look here as well as in sled; [`Shared::apply`] moves them into sled,
/// and only once every record they come from is durable, so that sled never holds a write
/// the journal could still lose. Applying them off the writer's path (after its answer went
/// out) is what deferring buys: a sled insert costs several microseconds, a journal append
/// a fraction of that.
#[derive(Default)]
struct Pending {
    trees: HashMap<&'static str, PendingTree>,
    /// How many keys and bytes wait, to apply before they grow large.
    keys: usize,
    bytes: usize,
    /// The last journal record all of whose writes are here or in sled.
    seq: u64,
    /// The `seq` last recorded in `meta` by an apply (none is written when it is current).
    recorded: u64,
    /// Set when applying failed: sled may lack writes, the values stay here (reads stay
    /// right) and the store accepts no more writes.
    failed: Option<String>,
    /// Set while the disk has too little space to apply: when to measure again. The writes
    /// wait here meanwhile (they are journaled and readable).
    retry_at: Option<Instant>,
}

struct PendingTree {
    tree: sled::Tree,
    /// In key order, for scans; `None` is a removal.
    values: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// Pending writes beyond which a commit makes them durable and applies them at once, if the
/// disk has room (memory and read cost stay small even when nothing calls
/// [`Store::apply_pending`]).
const PENDING_KEYS_MAX: usize = 4096;
const PENDING_BYTES_MAX: usize = 4 << 20;
/// How many times those limits may wait while the disk is too full to apply them; beyond
/// that a commit is refused ([`StoreError::DiskFull`]) before anything is written.
const PENDING_FULL_FACTOR: usize = 4;

/// Size of a pending entry, for [`PENDING_BYTES_MAX`].
fn entry_size(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

impl Pending {
    fn get(&self, name: &str, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.trees.get(name)?.values.get(key).cloned()
    }

    fn add(&mut self, x: Write) {
        let added = entry_size(&x.key, &x.value);
        let t = self.trees.entry(x.name).or_insert_with(|| PendingTree {
            tree: x.tree,
            values: BTreeMap::new(),
        });
        let removed = match t.values.get_mut(&x.key) {
            Some(v) => entry_size(&x.key, &std::mem::replace(v, x.value)),
            None => {
                t.values.insert(x.key, x.value);
                self.keys += 1;
                0
            }
        };
        self.bytes = self.bytes + added - removed;
    }

    /// The pending entries of `name` between `lo` and `hi`, in key order (a copy).
    fn range(
        &self,
        name: &str,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let Some(t) = self.trees.get(name) else {
            return Vec::new();
        };
        t.values
            .range::<[u8], _>((lo, hi))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Applies every pending write to sled and records `seq` in `meta` (a journaled
    /// store); on success they leave `self`. On failure everything stays, for reads, and
    /// `failed` is set.
    fn apply(&mut self, meta: Option<&sled::Tree>) -> Result<(), StoreError> {
        if let Some(why) = &self.failed {
            return Err(StoreError::Broken(why.clone()));
        }
        let applied = (|| -> Result<(), sled::Error> {
            for t in self.trees.values() {
                for (k, v) in &t.values {
                    match v {
                        Some(v) => drop(t.tree.insert(k.as_slice(), v.as_slice())?),
                        None => drop(t.tree.remove(k.as_slice())?),
                    }
                }
            }
            if let Some(meta) = meta
                && self.recorded != self.seq
            {
                meta.insert(JOURNAL_SEQ_KEY, &self.seq.to_be_bytes())?;
            }
            Ok(())
        })();
        if let Err(e) = applied {
            let why = format!("database write failed half way: {e}");
            self.failed = Some(why);
            return Err(e.into());
        }
        self.recorded = self.seq;
        self.trees.clear();
        self.keys = 0;
        self.bytes = 0;
        Ok(())
    }
}

/// A scan's entries: sled's, with the pending writes of the same range laid over them (a
/// pending value replaces sled's, a pending removal hides it), in key order or reversed.
struct Merged<'a> {
    sled: std::iter::Peekable<SledEntries<'a>>,
    pending: std::iter::Peekable<PendingEntries>,
    rev: bool,
}

/// sled's entries of a scan's range, in its order.
type SledEntries<'a> = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a>;
/// The pending writes of a scan's range, in its order (`None`: removed).
type PendingEntries = Box<dyn Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>>;

impl Iterator for Merged<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        loop {
            let order = match (self.sled.peek(), self.pending.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => {
                    return match self.sled.next() {
                        Some(Err(e)) => Some(Err(e.into())),
                        _ => None,
                    };
                }
                (Some(Ok(_)), None) => Less,
                (None, Some(_)) => Greater,
                (Some(Ok((sk, _))), Some((pk, _))) => {
                    let o = sk.as_ref().cmp(pk.as_slice());
                    if self.rev { o.reverse() } else { o }
                }
            };
            if order == Less {
                return self
                    .sled
                    .next()
                    .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into));
            }
            if order == Equal {
                // The pending write is newer than what sled holds.
                self.sled.next();
            }
            match self.pending.next() {
                Some((k, Some(v))) => return Some(Ok((k, v))),
                Some((_, None)) => {}
                None => return None,
            }
        }
    }
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// What a store's handles share.
struct Shared {
    db: sled::Db,
    meta: sled::Tree,
    space: Option<SpaceGuard>,
    /// Files of the write-ahead journal; `None` for a temporary store.
    files: Option<journal::Files>,
    /// sled's directory; `None` for a temporary store.
    path: Option<PathBuf>,
    /// The single writer: held for the whole of a transaction and for every write, so the
    /// journal's order is sled's order.
    writer: Mutex<Writer>,
    /// Held while the journal is synced or checkpointed (one flush at a time).
    syncing: Mutex<()>,
    /// Held around every `fdatasync` of the journal, also a commit's (innermost lock; see
    /// [`Shared::datasync`]): the first failure, after which every sync fails.
    datasync: Mutex<Option<String>>,
    /// sled's files, synced after its flush; `None` for a temporary store.
    sled_files: Option<tern_store_forward::db::SledFiles>,
    /// The last record known durable.
    synced: AtomicU64,
    /// Journaled writes not yet in sled. Lock order: `writer`, then `pending`.
    pending: Mutex<Pending>,
}

struct Writer {
    /// The last record written.
    seq: u64,
    /// The journal file appended to, its number, the end of its records and its size.
    file: Option<Arc<File>>,
    number: u64,
    len: u64,
    size: u64,
    /// Set when sled failed half way through a record, a journal sync failed or a
    /// checkpoint failed: nothing more is written or acknowledged until the store is opened
    /// again, which repairs it from the journal.
    broken: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Db(sled::Error::Io(e))
}

thread_local! {
    /// The write group open on this thread, if any ([`Store::group`]).
    static GROUP: RefCell<Option<Group>> = const { RefCell::new(None) };
}

/// Writes gathered by [`Store::group`]: the last value of each key, in the order keys were
/// first written.
struct Group {
    /// The store they belong to (its `Shared`'s address).
    store: usize,
    writes: Vec<Write>,
    at: HashMap<(&'static str, Vec<u8>), usize>,
    /// Set when gathered writes could not be committed (see [`Shared::settle_group`]).
    failed: Option<StoreError>,
}

/// Clears this thread's group however [`Store::group`]'s closure ends (a panic too).
struct GroupGuard;

impl Drop for GroupGuard {
    fn drop(&mut self) {
        GROUP.with(|g| g.borrow_mut().take());
    }
}

impl Shared {
    fn address(&self) -> usize {
        self as *const Self as usize
    }

    /// The group's latest write of `key` in `tree` on this thread: `Some(None)` for a
    /// removal, `None` if the group did not write it.
    fn group_read(&self, tree: &'static str, key: &[u8]) -> Option<Option<Vec<u8>>> {
        GROUP.with(|g| {
            let g = g.borrow();
            let g = g.as_ref().filter(|g| g.store == self.address())?;
            let &i = g.at.get(&(tree, key.to_vec()))?;
            Some(g.writes[i].value.clone())
        })
    }

    /// The value of `key` in `tree` as this thread sees it (its group's writes first).
    fn read(
        &self,
        name: &'static str,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, sled::Error> {
        if let Some(v) = self.group_read(name, key) {
            return Ok(v);
        }
        // Under the lock: a write being applied is either still here or in sled already.
        let pending = lock(&self.pending);
        match pending.get(name, key) {
            Some(v) => Ok(v),
            None => Ok(tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Whether `key` exists in `tree`, as this thread sees it.
    fn contains(
        &self,
        name: &'static str,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<bool, sled::Error> {
        if let Some(v) = self.group_read(name, key) {
            return Ok(v.is_some());
        }
        let pending = lock(&self.pending);
        match pending.get(name, key) {
            Some(v) => Ok(v.is_some()),
            None => tree.contains_key(key),
        }
    }

    /// Applies every pending write to sled (see [`Pending`]): for a store without a journal
    /// (nothing to wait for, no space guard).
    fn apply(&self) -> Result<(), StoreError> {
        let meta = self.files.as_ref().map(|_| &self.meta);
        lock(&self.pending).apply(meta)
    }

    /// Whether every record `pending` holds writes of is durable (a store without a
    /// journal has nothing to wait for).
    fn durable(&self, pending: &Pending) -> bool {
        self.files.is_none() || self.synced.load(Ordering::Acquire) >= pending.seq
    }

    /// Whether the disk has room to apply `pending` now (see [`SpaceGuard::room_to_apply`]);
    /// when it has not, no new measurement is made before [`APPLY_RETRY`] has passed, unless
    /// `now_anyway` (a checkpoint).
    fn room_to_apply(&self, pending: &mut Pending, now_anyway: bool) -> bool {
        let Some(g) = &self.space else {
            return true;
        };
        let now = Instant::now();
        if !now_anyway && pending.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        if g.room_to_apply(pending.bytes as u64) {
            if pending.retry_at.take().is_some() {
                tracing::info!("disk space is back: the waiting writes go into the database");
            }
            return true;
        }
        if pending.retry_at.is_none() {
            tracing::warn!(
                writes = pending.keys,
                "the disk is full: journaled writes wait in memory until space is freed"
            );
        }
        pending.retry_at = Some(now + APPLY_RETRY);
        false
    }

    /// Applies the pending writes if every record they come from is durable and the disk
    /// has room; otherwise leaves them for a later call (after the flush that makes them
    /// durable, or once space is freed).
    fn apply_durable(&self) -> Result<(), StoreError> {
        let mut pending = lock(&self.pending);
        let nothing = pending.keys == 0 && pending.recorded == pending.seq;
        if nothing || !self.durable(&pending) || !self.room_to_apply(&mut pending, false) {
            return Ok(());
        }
        pending.apply(self.files.as_ref().map(|_| &self.meta))
    }

    /// If the disk has room to apply the pending writes: makes every record written so far
    /// durable (an `fdatasync` of the current journal file, besides any flush running) and
    /// applies them. For a checkpoint and for a commit that finds too much pending. Returns
    /// whether they were applied (false: nothing done). Caller holds `writer`, not `pending`.
    fn sync_and_apply(&self, w: &Writer) -> Result<bool, StoreError> {
        // Measured first: no `fdatasync` for each commit while the disk stays full.
        if !self.room_to_apply(&mut lock(&self.pending), false) {
            return Ok(false);
        }
        if let Some(file) = &w.file {
            self.datasync(file)?;
        }
        self.synced.fetch_max(w.seq, Ordering::AcqRel);
        lock(&self.pending).apply(self.files.as_ref().map(|_| &self.meta))?;
        Ok(true)
    }

    /// Commits what this thread's group gathered so far (before a scan, which reads only
    /// committed writes, pending or in sled, or a flush). A failure is kept for the end of
    /// the group.
    fn settle_group(&self) {
        let Some(writes) = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            let g = g
                .as_mut()
                .filter(|g| g.store == self.address() && !g.writes.is_empty())?;
            g.at.clear();
            Some(std::mem::take(&mut g.writes))
        }) else {
            return;
        };
        let mut w = lock(&self.writer);
        if let Err(e) = self.commit_now(&mut w, writes) {
            GROUP.with(|g| {
                if let Some(g) = g.borrow_mut().as_mut() {
                    g.failed.get_or_insert(e);
                }
            });
        }
    }

    /// Journals `writes` as one record and applies them to sled; inside a group on this
    /// thread, adds them to the group instead. Caller holds `writer`.
    fn commit(&self, w: &mut Writer, writes: Vec<Write>) -> Result<(), StoreError> {
        let writes = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            let Some(g) = g.as_mut().filter(|g| g.store == self.address()) else {
                return Some(writes);
            };
            if g.failed.is_some() {
                // The group failed already: nothing more of it lands.
                return None;
            }
            for x in writes {
                match g.at.entry((x.name, x.key.clone())) {
                    std::collections::hash_map::Entry::Occupied(at) => {
                        g.writes[*at.get()].value = x.value;
                    }
                    std::collections::hash_map::Entry::Vacant(at) => {
                        at.insert(g.writes.len());
                        g.writes.push(x);
                    }
                }
            }
            None
        });
        match writes {
            Some(writes) => self.commit_now(w, writes),
            None => Ok(()),
        }
    }

    /// Journals `writes` as one record, then applies them to sled. Caller holds `writer`.
    fn commit_now(&self, w: &mut Writer, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        if let Some(why) = &w.broken {
            return Err(StoreError::Broken(why.clone()));
        }
        let over_cap = {
            let pending = lock(&self.pending);
            if let Some(why) = &pending.failed {
                w.broken = Some(why.clone());
                return Err(StoreError::Broken(why.clone()));
            }
            pending.keys > PENDING_KEYS_MAX * PENDING_FULL_FACTOR
                || pending.bytes > PENDING_BYTES_MAX * PENDING_FULL_FACTOR
        };
        // Too much waits for space to apply it: apply it now if space is back, otherwise
        // take nothing more (removals neither) until it is.
        if over_cap && let Some(g) = &self.space {
            match self.sync_and_apply(w) {
                Ok(true) => {}
                Ok(false) => return Err(g.full()),
                Err(e) => {
                    w.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        let seq = w.seq + 1;
        if let Some(file) = &w.file {
            let ops: Vec<journal::OpRef<'_>> = writes
                .iter()
                .map(|x| journal::OpRef {
                    tree: x.name,
                    key: &x.key,
                    value: x.value.as_deref(),
                })
                .collect();
            let bytes = journal::encode_ref(seq, &ops);
            // Inserts were checked where they were made (`Tx::insert`, `Table::insert`);
            // growing the file writes a whole chunk of zeros. Removals are not guarded:
            // they are what frees space.
            if let Some(g) = &self.space
                && w.len + bytes.len() as u64 > w.size
                && writes.iter().any(|x| x.value.is_some())
            {
                g.check(journal::CHUNK)?;
            }
            // On failure nothing counts: the next record is written at the same place.
            journal::append(file, w.len, &mut w.size, &bytes).map_err(io_error)?;
            w.len += bytes.len() as u64;
        }
        w.seq = seq;
        // Applied to sled later (reads see it meanwhile): see [`Pending`].
        let too_much = {
            let mut pending = lock(&self.pending);
            for x in writes {
                pending.add(x);
            }
            pending.seq = seq;
            pending.keys > PENDING_KEYS_MAX || pending.bytes > PENDING_BYTES_MAX
        };
        // Durable first (sled never gets ahead of the journal), then into sled if the disk
        // has room (otherwise the writes wait). The commit stands either way: its record is
        // journaled and readable; a failure stops the store (the next open replays the
        // journal into sled).
        if too_much && let Err(e) = self.sync_and_apply(w) {
            tracing::error!(error = %e, "could not sync and apply journaled writes; the store stops");
            w.broken = Some(e.to_string());
        }
        Ok(())
    }

    /// Makes every record written so far durable (group commit), checkpointing first when
    /// the journal has grown large.
    fn sync(&self) -> Result<(), StoreError> {
        let Some(files) = &self.files else {
            self.apply()?;
            self.db.flush()?;
            return Ok(());
        };
        let target = lock(&self.writer).seq;
        let _syncing = lock(&self.syncing);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (file, upto, big) = {
            let w = lock(&self.writer);
            if let Some(why) = &w.broken {
                return Err(StoreError::Broken(why.clone()));
            }
            (w.file.clone(), w.seq, w.len >= CHECKPOINT_BYTES)
        };
        let checkpointed = if big {
            match self.checkpoint(files) {
                Ok(done) => done,
                // The checkpoint synced the journal before it failed (applying to sled or
                // syncing sled): what this flush covers is durable, the store is stopped
                // (`broken`), and the next open applies the journal.
                Err(e) if self.synced.load(Ordering::Acquire) >= target => {
                    tracing::error!(error = %e, "checkpoint failed after the journal was synced");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        } else {
            false
        };
        let (file, upto) = if checkpointed {
            let w = lock(&self.writer);
            (w.file.clone(), w.seq)
        } else {
            (file, upto)
        };
        if let Some(file) = file
            && let Err(e) = self.datasync(&file)
        {
            if let StoreError::Broken(why) = &e {
                lock(&self.writer).broken = Some(why.clone());
            }
            return Err(e);
        }
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// `fdatasync` of a journal file. Every sync of the journal goes through here, one at a
    /// time: Linux reports a write-back error to only one of the `fsync`s that race on a
    /// file, so the other would succeed over pages that were dropped. The first failure is
    /// kept and fails every later sync: Linux may drop the pages it could not write and
    /// report success next time, so nothing written so far can be trusted to be on disk.
    fn datasync(&self, file: &File) -> Result<(), StoreError> {
        let mut failed = lock(&self.datasync);
        if let Some(why) = &*failed {
            return Err(StoreError::Broken(why.clone()));
        }
        file.sync_data().map_err(|e| {
            let why = format!("journal sync failed: {e}");
            *failed = Some(why.clone());
            StoreError::Broken(why)
        })
    }

    /// Flushes, then checkpoints (or keeps the journal if the disk is full). Takes
    /// `syncing` itself.
    fn close(&self) -> Result<(), StoreError> {
        self.sync()?;
        if let Some(files) = &self.files {
            let _syncing = lock(&self.syncing);
            if !self.checkpoint(files)? {
                tracing::warn!(
                    "the disk is full: the journal is kept, and applied at the next start"
                );
            }
        }
        Ok(())
    }

    /// Makes sled hold every record written so far, durably, then starts a fresh journal
    /// file and deletes the older ones. Writers wait meanwhile (so sled is made durable at a
    /// record boundary). Returns false, having changed nothing, when the disk has no room
    /// for it: the journal goes on in its current file and a later flush tries again.
    /// Caller holds `syncing`.
    fn checkpoint(&self, files: &journal::Files) -> Result<bool, StoreError> {
        let mut w = lock(&self.writer);
        if let Some(why) = &w.broken {
            return Err(StoreError::Broken(why.clone()));
        }
        if !self.room_to_apply(&mut lock(&self.pending), true) {
            return Ok(false);
        }
        let next = w.number + 1;
        let (file, size) = match files.create(next) {
            Ok(created) => created,
            Err(e) => {
                tracing::warn!(error = %e, "could not start a new journal file; the checkpoint waits");
                let _ = files.remove(next);
                return Ok(false);
            }
        };
        // sled must hold every record before the journal that has them goes, and only
        // durable ones (a power loss during sled's flush must not leave part of a record the
        // journal lost): the journal is synced first.
        let done = self.sync_and_apply(&w).and_then(|applied| {
            if applied {
                sync_sled(&self.db, self.sled_files.as_ref(), self.path.as_deref())?;
            }
            Ok(applied)
        });
        match done {
            Ok(true) => {}
            Ok(false) => {
                drop(file);
                let _ = files.remove(next);
                return Ok(false);
            }
            Err(e) => {
                w.broken = Some(format!("checkpoint failed: {e}"));
                drop(file);
                let _ = files.remove(next);
                return Err(e);
            }
        }
        w.file = Some(Arc::new(file));
        w.number = next;
        w.len = 0;
        w.size = size;
        drop(w);
        // Everything is durable in sled now: an old file left behind (it could not be
        // removed) is only space, skipped by the next open (its records are older than
        // sled's `journal_seq`) and removed then.
        let removed = files.list().and_then(|numbers| {
            numbers
                .into_iter()
                .filter(|n| *n < next)
                .try_for_each(|n| files.remove(n))
        });
        if let Err(e) = removed {
            tracing::warn!(error = %e, "could not remove an old journal file; the next start does");
        }
        Ok(true)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // sled flushes when its last handle goes; after one of its writes failed that flush
        // can wait forever (sled 0.34 leaves a buffer that is never written). The journal
        // holds every write, and the next open repairs sled from it: leave sled as it is.
        if lock(&self.pending).failed.is_some() {
            tracing::error!("the database is left unflushed after its failed write");
            std::mem::forget(self.db.clone());
        }
    }
}

/// Flushes sled and makes its files durable (sled's own flush uses `sync_file_range`, which
/// records neither the disk cache nor a new file size, and never syncs its blob files: see
/// [`SledFiles`](tern_store_forward::db::SledFiles)), then its directory.
fn sync_sled(
    db: &sled::Db,
    files: Option<&tern_store_forward::db::SledFiles>,
    path: Option<&Path>,
) -> Result<(), StoreError> {
    db.flush()?;
    if let Some(files) = files {
        files.sync().map_err(io_error)?;
    }
    if let Some(path) = path {
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(io_error)?;
    }
    Ok(())
}

/// Applies the journal's records that sled does not hold entirely, in order, makes sled
/// durable and starts an empty journal. Returns the writer. A gap in the records (a
/// damaged journal) refuses to open, keeping the files.
fn recover(
    db: &sled::Db,
    meta: &sled::Tree,
    files: &journal::Files,
    sled_files: &tern_store_forward::db::SledFiles,
    path: &Path,
    space: &SpaceGuard,
) -> Result<Writer, StoreError> {
    let applied = meta
        .get(JOURNAL_SEQ_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    let numbers = files.list().map_err(io_error)?;
    let mut next = applied + 1;
    let mut replayed = 0usize;
    // A database without a schema version was never opened: its journal, if any, is left
    // from one that was deleted, and must not be replayed into this one.
    let orphaned = meta.get(SCHEMA_KEY)?.is_none() && !numbers.is_empty();
    if orphaned {
        tracing::warn!("a journal without its database was found and is discarded");
    }
    for n in numbers.iter().filter(|_| !orphaned) {
        let records = files.read(*n).map_err(io_error)?;
        let bytes: usize = records
            .iter()
            .filter(|r| r.seq >= next)
            .flat_map(|r| &r.ops)
            .map(|op| entry_size(&op.key, &op.value))
            .sum();
        // sled must not run out of space half way (see `APPLY_MARGIN`).
        if bytes > 0 && !space.room_to_apply(bytes as u64) {
            return Err(space.full());
        }
        for record in records {
            if record.seq < next {
                continue;
            }
            if record.seq > next {
                return Err(StoreError::Corrupt {
                    table: "journal",
                    message: format!(
                        "record {} follows record {} in {}; the journal is kept as it is",
                        record.seq,
                        next - 1,
                        journal_dir(path).display()
                    ),
                });
            }
            let replayed_record = (|| -> Result<(), sled::Error> {
                for op in record.ops {
                    let tree = db.open_tree(&op.tree)?;
                    match op.value {
                        Some(v) => drop(tree.insert(op.key, v)?),
                        None => drop(tree.remove(op.key)?),
                    }
                }
                meta.insert(JOURNAL_SEQ_KEY, &record.seq.to_be_bytes())?;
                Ok(())
            })();
            if let Err(e) = replayed_record {
                // Closing sled after a failed write can wait forever (see `Shared`'s drop).
                std::mem::forget(db.clone());
                return Err(e.into());
            }
            next += 1;
            replayed += 1;
        }
    }
    sync_sled(db, Some(sled_files), Some(path))?;
    if replayed > 0 {
        tracing::info!(records = replayed, "database repaired from its journal");
    }
    let number = numbers.last().map_or(1, |n| n + 1);
    let (file, size) = files.create(number).map_err(io_error)?;
    for n in numbers {
        files.remove(n).map_err(io_error)?;
    }
    Ok(Writer {
        seq: next - 1,
        file: Some(Arc::new(file)),
        number,
        len: 0,
        size,
        broken: None,
    })
}

/// Where the journal of the database at `path` lives: next to it, `<path>.journal`.
pub fn journal_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".journal");
    path.with_file_name(name)
}

/// The database. Cheap to clone (one shared state behind an `Arc`).
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
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
    /// Records of the journal that sled does not hold yet (after a crash) are applied first.
    pub fn open_with_reserve(path: &Path, reserve: u64) -> Result<Self, StoreError> {
        tern_store_forward::db::create_sled_dir(path).map_err(io_error)?;
        // sled is made durable only at checkpoints (the journal is what flushes make
        // durable), so that its own periodic flush cannot make half a record durable.
        let db = tern_store_forward::db::open_sled(
            &sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .flush_every_ms(None),
        )?;
        let meta = db.open_tree(META_TREE)?;
        let files = journal::Files::open(&journal_dir(path)).map_err(io_error)?;
        let space = SpaceGuard::new(path, reserve);
        let sled_files = tern_store_forward::db::SledFiles::open(path).map_err(io_error)?;
        let writer = recover(&db, &meta, &files, &sled_files, path, &space)?;
        let synced = AtomicU64::new(writer.seq);
        // Everything up to `writer.seq` is in sled, and `meta` says so.
        let pending = Pending {
            seq: writer.seq,
            recorded: writer.seq,
            ..Pending::default()
        };
        let store = Self {
            shared: Arc::new(Shared {
                db,
                meta,
                space: Some(space),
                files: Some(files),
                path: Some(path.to_owned()),
                writer: Mutex::new(writer),
                syncing: Mutex::new(()),
                datasync: Mutex::new(None),
                sled_files: Some(sled_files),
                synced,
                pending: Mutex::new(pending),
            }),
        };
        store.migrate()?;
        Ok(store)
    }

    /// A throwaway in-memory database (tests and benchmarks): no journal, nothing durable.
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        let meta = db.open_tree(META_TREE)?;
        let store = Self {
            shared: Arc::new(Shared {
                db,
                meta,
                space: None,
                files: None,
                path: None,
                writer: Mutex::new(Writer {
                    seq: 0,
                    file: None,
                    number: 0,
                    len: 0,
                    size: 0,
                    broken: None,
                }),
                syncing: Mutex::new(()),
                datasync: Mutex::new(None),
                sled_files: None,
                synced: AtomicU64::new(0),
                pending: Mutex::new(Pending::default()),
            }),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Fails with [`StoreError::DiskFull`] if writing `bytes` would eat into the reserve.
    pub fn ensure_space(&self, bytes: u64) -> Result<(), StoreError> {
        match &self.shared.space {
            Some(g) => g.check(bytes),
            None => Ok(()),
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let meta = &self.shared.meta;
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
        // Migration steps run in order; version 0 (a fresh database) -> 1 needs no data
        // change, nor 1 -> 2 (tree `send_reserved`, created empty: the bump keeps an older
        // Tern, which would ignore the reservations, from opening the database).
        if found < SCHEMA_VERSION {
            meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            sync_sled(
                &self.shared.db,
                self.shared.sled_files.as_ref(),
                self.shared.path.as_deref(),
            )?;
        }
        Ok(())
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .shared
            .meta
            .get(SCHEMA_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0))
    }

    /// A typed table (a sled tree) named `name`.
    pub fn table<V>(&self, name: &'static str) -> Result<Table<V>, StoreError> {
        Ok(Table {
            name,
            tree: self.shared.db.open_tree(name)?,
            shared: self.shared.clone(),
            _v: PhantomData,
        })
    }

    /// Makes every write so far durable (one `fdatasync` of the journal, shared with the
    /// writers waiting at the same time). Call before acknowledging anything.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.start_flush()
            .await
            .map_err(|e| StoreError::Broken(format!("flush task failed: {e}")))??;
        // After the durable part: what waits for sled is applied now (the caller is past
        // its `await` only once this is done, though). The flush succeeded whatever
        // happens here: a failure to apply stops the store (the next write says so) and the
        // next open applies the journal, which holds it all.
        if let Err(e) = self.apply_pending() {
            tracing::error!(error = %e, "could not apply durable writes to the database");
        }
        Ok(())
    }

    /// Starts [`Store::flush`] on the blocking pool and returns at once: the flush covers
    /// every write made before this call (and possibly later ones). For a writer that goes
    /// on with its next batch while the previous one is made durable.
    pub fn start_flush(&self) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        self.shared.settle_group();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.sync())
    }

    /// Blocking flush: for shutdown paths outside async code, and for a caller that has
    /// nothing to do meanwhile (inside `tokio::task::block_in_place`).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.shared.settle_group();
        self.shared.sync()
    }

    /// Whether the next flush checkpoints first (the journal reached its size limit): it
    /// then takes much longer than one `fdatasync` (sled is flushed and synced).
    pub fn checkpoint_due(&self) -> bool {
        self.shared.files.is_some() && lock(&self.shared.writer).len >= CHECKPOINT_BYTES
    }

    /// Applies the writes journaled so far to sled, if all of them are durable (a flush
    /// ended after the last of them); otherwise does nothing, and a call after the next
    /// flush does it. Reads and scans see them before this too: call it when there is time
    /// (a writer that answers someone once its flush is done calls it after answering, so
    /// that sled's cost is not on the answer's path). Checkpoints and a commit that finds
    /// many writes waiting apply them anyway (after making them durable).
    pub fn apply_pending(&self) -> Result<(), StoreError> {
        self.shared.apply_durable()
    }

    /// Whether journaled writes wait to be applied ([`Store::apply_pending`]): false once
    /// applying failed (the store is stopped then; trying again would fail the same way).
    #[cfg(test)]
    fn has_pending(&self) -> bool {
        let pending = lock(&self.shared.pending);
        pending.keys > 0 && pending.failed.is_none()
    }

    /// Whether writes wait to be applied and every record they come from is durable (its
    /// flush ended): the moment to apply them without sled getting ahead of the journal.
    /// False while they wait for disk space, until [`Store::apply_retry_at`].
    pub fn has_durable_pending(&self) -> bool {
        let pending = lock(&self.shared.pending);
        pending.keys > 0
            && pending.failed.is_none()
            && self.shared.durable(&pending)
            && pending.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// While durable journaled writes wait for disk space to be applied: when to try again.
    /// A task that applies them when idle ([`Store::apply_pending`]) wakes then, and
    /// [`Store::has_durable_pending`] is true from then on until it tried (writes not yet
    /// durable wait for their flush instead, which applies them: no time is given for them,
    /// so that a wake-up never finds nothing to do).
    pub fn apply_retry_at(&self) -> Option<Instant> {
        let pending = lock(&self.shared.pending);
        pending.retry_at.filter(|_| {
            pending.keys > 0 && pending.failed.is_none() && self.shared.durable(&pending)
        })
    }

    /// On a clean stop: flushes, then checkpoints (sled made durable, the journal emptied),
    /// so the next open has nothing to apply again. Gives up after [`CLOSE_LIMIT`], so that a
    /// stop always ends (sled can wait forever after a failed write of its own); the journal
    /// holds every acknowledged write, and the next open applies it.
    pub async fn close(&self) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let closing = tokio::task::spawn_blocking(move || shared.close());
        match tokio::time::timeout(CLOSE_LIMIT, closing).await {
            Ok(closed) => {
                closed.map_err(|e| StoreError::Broken(format!("close task failed: {e}")))?
            }
            Err(_) => Err(StoreError::Broken(format!(
                "the database did not close within {} s; its journal is applied at the next start",
                CLOSE_LIMIT.as_secs()
            ))),
        }
    }

    /// [`Store::close`] on this thread, without its time bound: for a short command that
    /// opened the database for a moment (`tern init`), so the next open has nothing to
    /// apply again.
    pub fn close_blocking(&self) -> Result<(), StoreError> {
        self.shared.close()
    }

    /// Runs `f` over `tables` and then commits its writes atomically: either every write in
    /// it lands or none does (also across a crash: the journal holds them as one record).
    /// Writers are serialised: `f` sees no other writer's partial work, and must not write
    /// through [`Table`] itself (that would wait for the transaction to end).
    pub fn transaction<R>(
        &self,
        tables: &[&dyn AnyTable],
        f: impl Fn(&Tx<'_>) -> Result<R, TxError>,
    ) -> Result<R, StoreError> {
        let mut w = lock(&self.shared.writer);
        let tx = Tx {
            shared: &self.shared,
            tables,
            space: self.shared.space.as_ref(),
            writes: RefCell::new(Vec::new()),
            overlay: RefCell::new(HashMap::new()),
        };
        let r = f(&tx).map_err(|e| e.0)?;
        self.shared.commit(&mut w, tx.writes.into_inner())?;
        Ok(r)
    }

    /// Runs `f` with this thread's writes to this store gathered, and commits them when it
    /// ends as one atomic record holding the last value of each key: a key written many
    /// times (a ratchet session by every message of a batch) is journaled and applied once.
    /// Reads on this thread see the gathered writes; other threads see none of them until
    /// the end. A scan or a flush inside `f` commits what was gathered so far first (scans
    /// read committed writes only), splitting the group there. Returns `f`'s result and
    /// whether the commit worked (if not, none of the writes since the last split landed,
    /// nor any after a failed split). A group inside a group of the same store joins it;
    /// inside a group of another store, `f`'s writes to this one are not grouped. While a
    /// group is open, [`Store::transaction`]s in it are atomic and see their own writes but
    /// land only with the group, after any other thread's writes in the meantime (the
    /// messaging actor is the only writer of the tables it groups).
    pub fn group<R>(&self, f: impl FnOnce() -> R) -> (R, Result<(), StoreError>) {
        if GROUP.with(|g| g.borrow().is_some()) {
            return (f(), Ok(()));
        }
        GROUP.with(|g| {
            *g.borrow_mut() = Some(Group {
                store: self.shared.address(),
                writes: Vec::new(),
                at: HashMap::new(),
                failed: None,
            })
        });
        let guard = GroupGuard;
        let r = f();
        let group = GROUP.with(|g| g.borrow_mut().take());
        drop(guard);
        let committed = match group {
            None => Ok(()),
            Some(Group {
                failed: Some(e), ..
            }) => Err(e),
            Some(g) => {
                let mut w = lock(&self.shared.writer);
                self.shared.commit_now(&mut w, g.writes)
            }
        };
        (r, committed)
    }

    /// Bytes used on disk (approximate): sled's files and the journal.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        let journal = lock(&self.shared.writer).size;
        Ok(self.shared.db.size_on_disk()? + journal)
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

/// An error inside a transaction: the transaction is abandoned and nothing it wrote lands.
#[derive(Debug)]
pub struct TxError(StoreError);

impl TxError {
    /// Aborts the transaction with `error`; nothing it wrote lands.
    pub fn abort(error: StoreError) -> Self {
        Self(error)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        Self(e)
    }
}

impl From<sled::Error> for TxError {
    fn from(e: sled::Error) -> Self {
        Self(e.into())
    }
}

/// A transaction's latest write to each (table, key): its index in the writes, so a value
/// is held once.
type Overlay = HashMap<(usize, Vec<u8>), usize>;

/// The view of the tables inside [`Store::transaction`]: reads see the transaction's own
/// writes; the writes are applied when it ends well.
pub struct Tx<'a> {
    shared: &'a Shared,
    tables: &'a [&'a dyn AnyTable],
    space: Option<&'a SpaceGuard>,
    writes: RefCell<Vec<Write>>,
    overlay: RefCell<Overlay>,
}

impl Tx<'_> {
    fn index<V>(&self, table: &Table<V>) -> Result<usize, TxError> {
        self.tables
            .iter()
            .position(|t| t.name() == table.name)
            .ok_or_else(|| {
                TxError::abort(StoreError::Aborted(format!(
                    "table {} is not part of this transaction",
                    table.name
                )))
            })
    }

    fn raw(&self, i: usize, key: &[u8]) -> Result<Option<Vec<u8>>, TxError> {
        if let Some(&at) = self.overlay.borrow().get(&(i, key.to_vec())) {
            return Ok(self.writes.borrow()[at].value.clone());
        }
        let t = self.tables[i];
        Ok(self.shared.read(t.name(), t.tree(), key)?)
    }

    fn write(&self, i: usize, key: &[u8], value: Option<Vec<u8>>) {
        let mut writes = self.writes.borrow_mut();
        self.overlay
            .borrow_mut()
            .insert((i, key.to_vec()), writes.len());
        writes.push(Write {
            tree: self.tables[i].tree().clone(),
            name: self.tables[i].name(),
            key: key.to_vec(),
            value,
        });
    }

    /// Reads `key` of `table`.
    pub fn get<V: Serialize + DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: &[u8],
    ) -> Result<Option<V>, TxError> {
        match self.raw(self.index(table)?, key)? {
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
        let i = self.index(table)?;
        let bytes = table.encode(value).map_err(TxError::abort)?;
        if let Some(g) = self.space {
            g.check((key.len() + bytes.len()) as u64)
                .map_err(TxError::abort)?;
        }
        self.write(i, key, Some(bytes));
        Ok(())
    }

    /// Removes `key` of `table`; returns whether it existed.
    pub fn remove<V>(&self, table: &Table<V>, key: &[u8]) -> Result<bool, TxError> {
        let i = self.index(table)?;
        let existed = self.raw(i, key)?.is_some();
        if existed {
            self.write(i, key, None);
        }
        Ok(existed)
    }
}

/// A typed view of one tree: byte keys, values encoded with postcard.
pub struct Table<V> {
    name: &'static str,
    tree: sled::Tree,
    shared: Arc<Shared>,
    _v: PhantomData<fn() -> V>,
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            tree: self.tree.clone(),
            shared: self.shared.clone(),
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

    fn write(&self, key: &[u8], value: Option<Vec<u8>>) -> Write {
        Write {
            tree: self.tree.clone(),
            name: self.name,
            key: key.to_vec(),
            value,
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<V>, StoreError> {
        self.shared
            .read(self.name, &self.tree, key)?
            .map(|v| self.decode(&v))
            .transpose()
    }

    /// Stores `value` under `key` (durable only after [`Store::flush`]).
    pub fn insert(&self, key: &[u8], value: &V) -> Result<(), StoreError> {
        let bytes = self.encode(value)?;
        if let Some(g) = &self.shared.space {
            g.check((key.len() + bytes.len()) as u64)?;
        }
        let mut w = lock(&self.shared.writer);
        self.shared
            .commit(&mut w, vec![self.write(key, Some(bytes))])
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&self, key: &[u8]) -> Result<bool, StoreError> {
        let mut w = lock(&self.shared.writer);
        if self.shared.read(self.name, &self.tree, key)?.is_none() {
            return Ok(false);
        }
        self.shared.commit(&mut w, vec![self.write(key, None)])?;
        Ok(true)
    }

    /// Whether `key` exists.
    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.shared.contains(self.name, &self.tree, key)?)
    }

    /// Number of entries (walks the tree).
    pub fn len(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.merged(Bound::Unbounded, Bound::Unbounded, false) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        match self
            .merged(Bound::Unbounded, Bound::Unbounded, false)
            .next()
        {
            None => Ok(true),
            Some(item) => item.map(|_| false),
        }
    }

    /// Decodes the entries `items` yields.
    fn collect(
        &self,
        items: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>,
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        items
            .map(|item| {
                let (k, v) = item?;
                Ok((k, self.decode(&v)?))
            })
            .collect()
    }

    /// Entries with keys `>= from`, in key order, at most `limit`.
    pub fn scan_from(&self, from: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        self.collect(
            self.merged(Bound::Included(from), Bound::Unbounded, false)
                .take(limit),
        )
    }

    /// Entries with keys `>= from` that start with `prefix`, in key order: at most `limit`,
    /// and none after the one that brings the sum of `weight` over them to `max_weight`.
    /// Values are read one at a time, so a small budget reads little.
    pub fn scan_weighted(
        &self,
        from: &[u8],
        prefix: &[u8],
        limit: usize,
        max_weight: usize,
        weight: impl Fn(&V) -> usize,
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let mut out = Vec::new();
        let mut total = 0usize;
        // Bounded by the prefix's end: the pending writes copied for the walk are only the
        // prefix's (an outbox walk takes one peer's, not every later peer's).
        let end = prefix_end(prefix);
        let hi = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        for item in self.merged(Bound::Included(from), hi, false) {
            if out.len() >= limit || total >= max_weight {
                break;
            }
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            let v = self.decode(&v)?;
            total = total.saturating_add(weight(&v));
            out.push((k, v));
        }
        Ok(out)
    }

    /// The entries whose key starts with `prefix`, in key order or reversed.
    fn prefixed(&self, prefix: &[u8], rev: bool) -> Merged<'_> {
        let end = prefix_end(prefix);
        let hi = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.merged(Bound::Included(prefix), hi, rev)
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        self.collect(self.prefixed(prefix, false))
    }

    /// At most `limit` entries whose key starts with `prefix`, from the first in key order.
    pub fn scan_prefix_first(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        self.collect(self.prefixed(prefix, false).take(limit))
    }

    /// The last `limit` entries whose key starts with `prefix`, returned in key order.
    pub fn scan_prefix_last(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>, StoreError> {
        let mut out = self.collect(self.prefixed(prefix, true).take(limit))?;
        out.reverse();
        Ok(out)
    }

    /// Number of keys starting with `prefix`.
    pub fn count_prefix(&self, prefix: &[u8]) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.prefixed(prefix, false) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The last entry in key order.
    pub fn last(&self) -> Result<Option<(Vec<u8>, V)>, StoreError> {
        self.merged(Bound::Unbounded, Bound::Unbounded, true)
            .next()
            .map(|item| {
                let (k, v) = item?;
                Ok((k, self.decode(&v)?))
            })
            .transpose()
    }

    /// The entries between `lo` and `hi` as this thread sees them: what its group gathered
    /// is committed first, then sled's entries are walked with the pending writes of the
    /// range laid over them (a copy of those taken now: later writes are not seen, as with
    /// any scan).
    fn merged(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>, rev: bool) -> Merged<'_> {
        self.shared.settle_group();
        let pending = lock(&self.shared.pending).range(self.name, lo, hi);
        let range = self.tree.range::<&[u8], _>((lo, hi));
        let (sled, pending): (SledEntries<'_>, PendingEntries) = if rev {
            (Box::new(range.rev()), Box::new(pending.into_iter().rev()))
        } else {
            (Box::new(range), Box::new(pending.into_iter()))
        };
        Merged {
            sled: sled.peekable(),
            pending: pending.peekable(),
            rev,
        }
    }

    /// Removes the first `n` entries in key order (one atomic write); returns how many
    /// were removed.
    pub fn remove_first(&self, n: usize) -> Result<usize, StoreError> {
        self.shared.settle_group();
        // Under the writer lock: no other commit can slip in between the walk and the
        // removals.
        let mut w = lock(&self.shared.writer);
        let mut writes = Vec::new();
        for item in self
            .merged(Bound::Unbounded, Bound::Unbounded, false)
            .take(n)
        {
            writes.push(self.write(&item?.0, None));
        }
        let removed = writes.len();
        self.shared.commit(&mut w, writes)?;
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
            let meta = &s.shared.meta;
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
        assert_eq!(t.len().unwrap(), 1);
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
    fn a_transaction_reads_its_own_writes() {
        let s = Store::temporary().unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        a.insert(b"gone", &7).unwrap();
        let seen = s
            .transaction(&[&a], |tx| {
                tx.insert(&a, b"k", &1)?;
                let first = tx.get(&a, b"k")?;
                tx.insert(&a, b"k", &2)?;
                let removed = tx.remove(&a, b"gone")?;
                let again = tx.remove(&a, b"gone")?;
                Ok((
                    first,
                    tx.get(&a, b"k")?,
                    removed,
                    again,
                    tx.get(&a, b"gone")?,
                ))
            })
            .unwrap();
        assert_eq!(seen, (Some(1), Some(2), true, false, None));
        assert_eq!(a.get(b"k").unwrap(), Some(2));
        assert_eq!(a.get(b"gone").unwrap(), None);
    }

    #[test]
    fn a_group_commits_the_last_value_of_each_key_once_and_only_at_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("db")).unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        a.insert(b"gone", &7).unwrap();
        let seq = || lock(&s.shared.writer).seq;
        let before = seq();
        let other = |key: &'static [u8]| {
            let a = a.clone();
            std::thread::spawn(move || a.get(key).unwrap())
                .join()
                .unwrap()
        };
        let (seen, committed) = s.group(|| {
            for n in 1..=50 {
                s.transaction(&[&a], |tx| tx.insert(&a, b"k", &n)).unwrap();
            }
            a.remove(b"gone").unwrap();
            // This thread reads the group's writes; another thread does not, yet.
            (
                a.get(b"k").unwrap(),
                a.contains(b"gone").unwrap(),
                s.transaction(&[&a], |tx| tx.get(&a, b"k")).unwrap(),
                other(b"k"),
                other(b"gone"),
            )
        });
        committed.unwrap();
        assert_eq!(seen, (Some(50), false, Some(50), None, Some(7)));
        assert_eq!(seq(), before + 1, "one journal record for the group");
        assert_eq!(other(b"k"), Some(50));
        assert_eq!(other(b"gone"), None);
    }

    #[test]
    fn a_scan_inside_a_group_sees_its_writes_and_a_failed_group_lands_nothing() {
        let s = Store::temporary().unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        let (scanned, committed) = s.group(|| {
            a.insert(b"k1", &1).unwrap();
            a.insert(b"k2", &2).unwrap();
            let scanned = a.scan_prefix(b"k").unwrap().len();
            a.insert(b"k3", &3).unwrap();
            scanned
        });
        committed.unwrap();
        assert_eq!(scanned, 2);
        assert_eq!(a.len().unwrap(), 3);
        // A group whose commit fails: none of its writes land, and the caller is told.
        let (_, committed) = s.group(|| {
            a.insert(b"k4", &4).unwrap();
            lock(&s.shared.writer).broken = Some("test".into());
        });
        assert!(matches!(committed, Err(StoreError::Broken(_))));
        lock(&s.shared.writer).broken = None;
        assert_eq!(a.get(b"k4").unwrap(), None);
        // A panic inside a group leaves no group behind on the thread.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.group(|| panic!("boom"));
        }));
        assert!(caught.is_err());
        a.insert(b"k5", &5).unwrap();
        assert_eq!(
            std::thread::scope(|t| t.spawn(|| a.get(b"k5").unwrap()).join().unwrap()),
            Some(5)
        );
    }

    #[tokio::test]
    async fn a_group_survives_a_crash_after_its_flush() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            let a: Table<u32> = s.table("a").unwrap();
            let ((), committed) = s.group(|| {
                a.insert(b"x", &1).unwrap();
                a.insert(b"x", &2).unwrap();
                a.insert(b"y", &3).unwrap();
            });
            committed.unwrap();
            s.flush().await.unwrap();
            // Dropped without `close`: sled may lack it, the journal has it.
        }
        let s = Store::open(&path).unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        assert_eq!(a.get(b"x").unwrap(), Some(2));
        assert_eq!(a.get(b"y").unwrap(), Some(3));
    }

    #[test]
    fn writes_are_read_and_scanned_before_sled_has_them_and_applied_once_durable() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("db")).unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        let b: Table<u32> = s.table("b").unwrap();
        a.insert(b"old", &1).unwrap();
        s.flush_blocking().unwrap();
        s.apply_pending().unwrap();
        assert!(!s.has_pending());
        assert!(a.tree.get(b"old").unwrap().is_some());
        s.transaction(&[&a, &b], |tx| {
            tx.insert(&a, b"k1", &10)?;
            tx.insert(&b, b"k1", &20)?;
            tx.remove(&a, b"old")?;
            Ok(())
        })
        .unwrap();
        // Journaled, not durable: nothing goes into sled yet.
        assert!(s.has_pending());
        assert!(!s.has_durable_pending(), "not flushed yet");
        s.apply_pending().unwrap();
        assert!(s.has_pending());
        assert!(a.tree.get(b"k1").unwrap().is_none());
        assert!(a.tree.get(b"old").unwrap().is_some());
        // Every read and scan sees the new state all the same.
        assert_eq!(a.get(b"k1").unwrap(), Some(10));
        assert_eq!(a.get(b"old").unwrap(), None);
        assert!(!a.contains(b"old").unwrap());
        assert!(b.contains(b"k1").unwrap());
        let seen = s
            .transaction(&[&a, &b], |tx| Ok((tx.get(&a, b"k1")?, tx.get(&b, b"k1")?)))
            .unwrap();
        assert_eq!(seen, (Some(10), Some(20)));
        assert_eq!(a.scan_prefix(b"").unwrap(), vec![(b"k1".to_vec(), 10)]);
        assert_eq!(a.len().unwrap(), 1);
        assert_eq!(a.last().unwrap(), Some((b"k1".to_vec(), 10)));
        assert!(
            a.tree.get(b"old").unwrap().is_some(),
            "a scan applies nothing"
        );
        // Durable: applied.
        s.flush_blocking().unwrap();
        assert!(s.has_durable_pending());
        s.apply_pending().unwrap();
        assert!(!s.has_pending());
        assert!(a.tree.get(b"old").unwrap().is_none());
        assert!(a.tree.get(b"k1").unwrap().is_some());
        assert!(b.tree.get(b"k1").unwrap().is_some());
        assert_eq!(b.len().unwrap(), 1);
    }

    /// Every scan over sled and pending writes together, against a map kept alongside,
    /// through random inserts, removals, groups and applies.
    #[test]
    fn scans_lay_the_pending_writes_over_sled_in_order_and_reversed() {
        use rand_chacha::{
            ChaCha8Rng,
            rand_core::{RngCore, SeedableRng},
        };
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("db")).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        let mut model = BTreeMap::<Vec<u8>, u32>::new();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Keys of one or two bytes among 0, 1, 0xfe and 0xff: shared prefixes, and
        // prefixes whose end wraps.
        let byte = |r: u32| [0u8, 1, 0xfe, 0xff][(r % 4) as usize];
        let key = |rng: &mut ChaCha8Rng| {
            let r = rng.next_u32();
            let mut k = vec![byte(r)];
            if r & 0x100 != 0 {
                k.push(byte(r >> 3));
            }
            k
        };
        let prefixes: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![1],
            vec![0xff],
            vec![0xff, 0xff],
            vec![0xfe, 0xff],
        ];
        for step in 0..600u32 {
            match rng.next_u32() % 10 {
                0..=4 => {
                    let k = key(&mut rng);
                    t.insert(&k, &step).unwrap();
                    model.insert(k, step);
                }
                5 | 6 => {
                    let k = key(&mut rng);
                    assert_eq!(t.remove(&k).unwrap(), model.remove(&k).is_some());
                }
                7 => {
                    // A group: its writes land at its end (a scan inside settles them).
                    let (k1, k2) = (key(&mut rng), key(&mut rng));
                    let ((), done) = s.group(|| {
                        t.insert(&k1, &(step + 1)).unwrap();
                        t.remove(&k2).unwrap();
                    });
                    done.unwrap();
                    model.insert(k1.clone(), step + 1);
                    if k2 != k1 {
                        model.remove(&k2);
                    } else {
                        model.remove(&k1);
                    }
                }
                8 => s.flush_blocking().unwrap(),
                _ => s.apply_pending().unwrap(),
            }
            for p in &prefixes {
                let want: Vec<(Vec<u8>, u32)> = model
                    .iter()
                    .filter(|(k, _)| k.starts_with(p))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                assert_eq!(t.scan_prefix(p).unwrap(), want, "step {step} prefix {p:?}");
                assert_eq!(t.count_prefix(p).unwrap(), want.len());
                assert_eq!(
                    t.scan_prefix_first(p, 2).unwrap(),
                    want.iter().take(2).cloned().collect::<Vec<_>>()
                );
                let last: Vec<_> = want
                    .iter()
                    .skip(want.len().saturating_sub(2))
                    .cloned()
                    .collect();
                assert_eq!(
                    t.scan_prefix_last(p, 2).unwrap(),
                    last,
                    "step {step} prefix {p:?}"
                );
                let from: Vec<_> = model
                    .range(p.clone()..)
                    .take(3)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                assert_eq!(t.scan_from(p, 3).unwrap(), from);
                let weighted: Vec<_> = model
                    .range(p.clone()..)
                    .take_while(|(k, _)| k.starts_with(p))
                    .take(2)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                assert_eq!(
                    t.scan_weighted(p, p, 2, usize::MAX, |_| 1).unwrap(),
                    weighted
                );
            }
            assert_eq!(t.len().unwrap(), model.len());
            assert_eq!(t.is_empty().unwrap(), model.is_empty());
            assert_eq!(
                t.last().unwrap(),
                model.iter().next_back().map(|(k, v)| (k.clone(), *v))
            );
        }
        // And what sled holds once everything is durable and applied is the same.
        s.flush_blocking().unwrap();
        s.apply_pending().unwrap();
        assert!(!s.has_pending());
        let in_sled: BTreeMap<Vec<u8>, u32> = t
            .tree
            .iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.to_vec(), postcard::from_bytes(&v).unwrap())
            })
            .collect();
        assert_eq!(in_sled, model);
    }

    #[test]
    fn many_waiting_writes_are_applied_by_the_commit_that_finds_them() {
        let s = Store::temporary().unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        for i in 0..PENDING_KEYS_MAX as u32 {
            a.insert(&i.to_be_bytes(), &i).unwrap();
        }
        assert!(s.has_pending());
        a.insert(b"one more", &0).unwrap();
        assert!(
            !s.has_pending(),
            "past the limit, the commit applied everything"
        );
        assert_eq!(a.tree.len(), PENDING_KEYS_MAX + 1);
    }

    /// Makes the store's disk report `free` bytes (`None`: the real figure).
    fn pretend_free(s: &Store, free: Option<u64>) {
        lock(&s.shared.space.as_ref().unwrap().0).pretend_free(free);
    }

    #[test]
    fn on_a_full_disk_writes_wait_readable_and_go_into_sled_once_space_is_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let s = Store::open_with_reserve(&path, 0).unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        a.insert(b"k", &1).unwrap();
        pretend_free(&s, Some(0));
        s.flush_blocking().unwrap();
        s.apply_pending().unwrap();
        assert!(s.has_pending(), "no room: the write waits");
        assert!(a.tree.get(b"k").unwrap().is_none());
        assert_eq!(a.get(b"k").unwrap(), Some(1));
        assert_eq!(a.scan_prefix(b"").unwrap(), vec![(b"k".to_vec(), 1)]);
        // Not offered again before the disk is measured again (if it is offered, that time
        // has passed: this thread may have been descheduled that long).
        let offered = s.has_durable_pending();
        let retry = s.apply_retry_at().expect("a time to try again");
        assert!(
            !offered || Instant::now() >= retry,
            "offered before {retry:?}"
        );
        assert!(retry <= Instant::now() + APPLY_RETRY);
        // New writes are refused meanwhile; removals (which free space) are taken, up to
        // the cap.
        assert!(matches!(
            a.insert(b"k2", &2),
            Err(StoreError::DiskFull { .. })
        ));
        assert!(a.remove(b"k").unwrap());
        // A clean stop keeps the journal instead of checkpointing into a full disk.
        s.flush_blocking().unwrap();
        let _syncing = lock(&s.shared.syncing);
        assert!(
            !s.shared
                .checkpoint(s.shared.files.as_ref().unwrap())
                .unwrap()
        );
        drop(_syncing);
        assert!(a.tree.get(b"k").unwrap().is_none());
        a.insert(b"k3", &3).unwrap_err();

        // Space is back: applied at the next chance after the wait.
        pretend_free(&s, None);
        std::thread::sleep(APPLY_RETRY);
        assert!(s.has_durable_pending());
        s.apply_pending().unwrap();
        assert!(!s.has_pending());
        assert!(a.tree.get(b"k").unwrap().is_none());
        a.insert(b"k3", &3).unwrap();
        s.flush_blocking().unwrap();
        s.apply_pending().unwrap();
        assert_eq!(a.tree.len(), 1);
        assert!(!s.has_pending());
    }

    #[test]
    fn writes_waiting_for_space_are_capped_and_then_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open_with_reserve(&tmp.path().join("db"), 0).unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        let cap = PENDING_KEYS_MAX * PENDING_FULL_FACTOR;
        s.transaction(&[&a], |tx| {
            for i in 0..=cap as u32 + 1 {
                tx.insert(&a, &i.to_be_bytes(), &i)?;
            }
            Ok(())
        })
        .unwrap();
        s.flush_blocking().unwrap();
        s.apply_pending().unwrap();
        assert!(!s.has_pending());
        pretend_free(&s, Some(0));
        let mut refused = None;
        for i in 0..=cap as u32 + 1 {
            if let Err(e) = a.remove(&i.to_be_bytes()) {
                refused = Some((i, e));
                break;
            }
        }
        let (i, e) = refused.expect("refused once too much waits");
        assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
        assert_eq!(i as usize, cap + 1, "the cap, not before");
        assert!(
            a.contains(&i.to_be_bytes()).unwrap(),
            "the refused removal did nothing"
        );
        assert!(!a.contains(&0u32.to_be_bytes()).unwrap());
        // Space is back: the next commit past the cap applies what waits and goes through.
        pretend_free(&s, None);
        std::thread::sleep(APPLY_RETRY);
        assert!(a.remove(&i.to_be_bytes()).unwrap());
        assert!(s.apply_retry_at().is_none());
        assert!(a.tree.get(0u32.to_be_bytes()).unwrap().is_none(), "applied");
    }

    #[tokio::test]
    async fn flushed_writes_that_sled_never_got_are_replayed_from_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            let a: Table<u32> = s.table("a").unwrap();
            a.insert(b"applied", &1).unwrap();
            s.flush_blocking().unwrap();
            s.apply_pending().unwrap();
            a.insert(b"applied", &2).unwrap();
            a.insert(b"waiting", &3).unwrap();
            a.remove(b"waiting").unwrap();
            a.insert(b"last", &4).unwrap();
            // Durable in the journal, never applied: the process dies here.
            s.flush_blocking().unwrap();
            assert!(s.has_pending());
            assert!(a.tree.get(b"last").unwrap().is_none());
        }
        let s = Store::open(&path).unwrap();
        let a: Table<u32> = s.table("a").unwrap();
        assert_eq!(
            a.scan_prefix(b"").unwrap(),
            vec![(b"applied".to_vec(), 2), (b"last".to_vec(), 4)]
        );
    }

    /// Writes a journal file by hand, as a crash would leave it: records sled never got.
    fn leave_journal(path: &Path, number: u64, records: &[journal::Record]) {
        let files = journal::Files::open(&journal_dir(path)).unwrap();
        let (f, mut size) = files.create(number).unwrap();
        let mut len = 0;
        for r in records {
            let bytes = journal::encode(r);
            journal::append(&f, len, &mut size, &bytes).unwrap();
            len += bytes.len() as u64;
        }
    }

    fn op(tree: &str, key: &[u8], value: Option<u32>) -> journal::Op {
        journal::Op {
            tree: tree.into(),
            key: key.to_vec(),
            value: value.map(|v| postcard::to_stdvec(&v).unwrap()),
        }
    }

    #[test]
    fn a_journal_is_not_replayed_into_a_full_disk_and_is_kept_for_later() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let applied = {
            let s = Store::open(&path).unwrap();
            let t: Table<u32> = s.table("t").unwrap();
            t.insert(b"a", &1).unwrap();
            s.flush_blocking().unwrap();
            s.apply_pending().unwrap();
            lock(&s.shared.writer).seq
        };
        leave_journal(
            &path,
            1000,
            &[journal::Record {
                seq: applied + 1,
                ops: vec![op("t", b"a", Some(2))],
            }],
        );
        {
            let db = tern_store_forward::db::open_sled(
                &sled::Config::new().path(&path).flush_every_ms(None),
            )
            .unwrap();
            let meta = db.open_tree(META_TREE).unwrap();
            let files = journal::Files::open(&journal_dir(&path)).unwrap();
            let full = SpaceGuard::new(&path, 0);
            lock(&full.0).pretend_free(Some(0));
            let sled_files = tern_store_forward::db::SledFiles::open(&path).unwrap();
            let e = recover(&db, &meta, &files, &sled_files, &path, &full)
                .err()
                .unwrap();
            assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
            assert!(files.list().unwrap().contains(&1000), "the journal is kept");
            let before = db.open_tree("t").unwrap().get(b"a").unwrap().unwrap();
            assert_eq!(
                before.as_ref(),
                postcard::to_stdvec(&1u32).unwrap(),
                "nothing replayed"
            );
        }
        // With room, the next open replays it.
        let s = Store::open(&path).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        assert_eq!(t.get(b"a").unwrap(), Some(2));
    }

    #[tokio::test]
    async fn opening_applies_the_journal_records_sled_lacks_and_no_others() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let applied = {
            let s = Store::open(&path).unwrap();
            let t: Table<u32> = s.table("t").unwrap();
            t.insert(b"old", &1).unwrap();
            t.insert(b"kept", &5).unwrap();
            s.flush().await.unwrap();
            lock(&s.shared.writer).seq
        };
        // The journal of a crash: an old record sled holds already (not applied again),
        // then the next two (applied in order).
        leave_journal(
            &path,
            1000,
            &[
                journal::Record {
                    seq: applied,
                    ops: vec![op("t", b"kept", Some(0))],
                },
                journal::Record {
                    seq: applied + 1,
                    ops: vec![op("t", b"a", Some(1)), op("u", b"b", Some(2))],
                },
                journal::Record {
                    seq: applied + 2,
                    ops: vec![op("t", b"a", Some(3)), op("t", b"old", None)],
                },
            ],
        );
        let s = Store::open(&path).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        let u: Table<u32> = s.table("u").unwrap();
        assert_eq!(t.get(b"kept").unwrap(), Some(5));
        assert_eq!(t.get(b"a").unwrap(), Some(3));
        assert_eq!(u.get(b"b").unwrap(), Some(2));
        assert_eq!(t.get(b"old").unwrap(), None);
        // The journal starts over; new writes continue the sequence and survive a reopen
        // that finds them only in the journal.
        assert_eq!(lock(&s.shared.writer).seq, applied + 2);
        assert_eq!(
            journal::Files::open(&journal_dir(&path))
                .unwrap()
                .list()
                .unwrap(),
            vec![1001]
        );
        t.insert(b"new", &4).unwrap();
        s.flush().await.unwrap();
        let records = journal::Files::open(&journal_dir(&path))
            .unwrap()
            .read(1001)
            .unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].seq, applied + 3);
    }

    #[tokio::test]
    async fn a_closed_store_reopens_with_nothing_to_apply() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, blocking) in [("db", false), ("blocking", true)] {
            let path = tmp.path().join(name);
            {
                let s = Store::open(&path).unwrap();
                let t: Table<u32> = s.table("t").unwrap();
                t.insert(b"a", &1).unwrap();
                if blocking {
                    s.close_blocking().unwrap();
                } else {
                    s.close().await.unwrap();
                }
                let files = journal::Files::open(&journal_dir(&path)).unwrap();
                let numbers = files.list().unwrap();
                assert_eq!(numbers.len(), 1, "{name}");
                assert!(files.read(numbers[0]).unwrap().is_empty(), "{name}");
            }
            let s = Store::open(&path).unwrap();
            let t: Table<u32> = s.table("t").unwrap();
            assert_eq!(t.get(b"a").unwrap(), Some(1));
        }
    }

    #[tokio::test]
    async fn applying_with_nothing_pending_never_moves_the_applied_mark_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let applied = |s: &Store| {
            let v = s.shared.meta.get(JOURNAL_SEQ_KEY).unwrap().unwrap();
            u64::from_be_bytes(v.as_ref().try_into().unwrap())
        };
        {
            let s = Store::open(&path).unwrap();
            let t: Table<u32> = s.table("t").unwrap();
            t.insert(b"a", &1).unwrap();
            t.insert(b"a", &2).unwrap();
            s.close().await.unwrap();
        }
        {
            let s = Store::open(&path).unwrap();
            let t: Table<u32> = s.table("t").unwrap();
            assert_eq!(applied(&s), 2);
            s.flush().await.unwrap();
            s.apply_pending().unwrap();
            assert_eq!(applied(&s), 2, "nothing was pending: the mark stays");
            t.insert(b"b", &3).unwrap();
            s.flush_blocking().unwrap();
            s.apply_pending().unwrap();
            assert_eq!(applied(&s), 3);
            t.insert(b"c", &4).unwrap();
            // Not durable: not applied, the mark stays. sled is made durable as it is, as
            // its own buffer write-back could, and the process dies.
            s.apply_pending().unwrap();
            s.shared.db.flush().unwrap();
            assert_eq!(applied(&s), 3);
            assert!(t.tree.get(b"c").unwrap().is_none());
        }
        // Opens (no gap from a mark moved back) with every record: `c`'s was written to
        // the journal file, which a killed process leaves behind.
        let s = Store::open(&path).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        assert_eq!(
            t.scan_prefix(b"").unwrap(),
            vec![(b"a".to_vec(), 2), (b"b".to_vec(), 3), (b"c".to_vec(), 4)]
        );
    }

    #[tokio::test]
    async fn a_journal_with_a_gap_refuses_to_open_and_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let applied = {
            let s = Store::open(&path).unwrap();
            s.flush().await.unwrap();
            lock(&s.shared.writer).seq
        };
        leave_journal(
            &path,
            1000,
            &[
                journal::Record {
                    seq: applied + 1,
                    ops: vec![op("t", b"a", Some(1))],
                },
                journal::Record {
                    seq: applied + 3,
                    ops: vec![op("t", b"late", Some(9))],
                },
            ],
        );
        match Store::open(&path) {
            Err(StoreError::Corrupt {
                table: "journal",
                message,
            }) => {
                assert!(message.contains("follows record"), "{message}");
            }
            other => panic!("expected a corrupt journal, got {other:?}"),
        }
        let files = journal::Files::open(&journal_dir(&path)).unwrap();
        assert!(files.list().unwrap().contains(&1000));
        assert_eq!(files.read(1000).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_journal_whose_database_was_deleted_is_not_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            let t: Table<u32> = s.table("t").unwrap();
            t.insert(b"a", &1).unwrap();
            s.flush().await.unwrap();
        }
        leave_journal(
            &path,
            1000,
            &[journal::Record {
                seq: 1,
                ops: vec![op("t", b"stale", Some(1))],
            }],
        );
        std::fs::remove_dir_all(&path).unwrap();
        let s = Store::open(&path).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        assert_eq!(t.get(b"stale").unwrap(), None);
        assert_eq!(t.get(b"a").unwrap(), None);
    }

    #[tokio::test]
    async fn a_checkpoint_starts_a_new_journal_file_and_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let s = Store::open(&path).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        t.insert(b"a", &1).unwrap();
        s.flush().await.unwrap();
        let files = journal::Files::open(&journal_dir(&path)).unwrap();
        let before = files.list().unwrap();
        s.shared.checkpoint(&files).unwrap();
        t.insert(b"b", &2).unwrap();
        s.flush().await.unwrap();
        let after = files.list().unwrap();
        assert_eq!(after, vec![before[0] + 1]);
        assert_eq!(files.read(after[0]).unwrap().len(), 1);
        drop((s, t));
        let s = Store::open(&path).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        assert_eq!(
            (t.get(b"a").unwrap(), t.get(b"b").unwrap()),
            (Some(1), Some(2))
        );
    }

    #[tokio::test]
    async fn a_checkpoint_is_due_once_the_journal_reaches_its_limit_and_not_after() {
        assert!(!Store::temporary().unwrap().checkpoint_due(), "no journal");
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("db")).unwrap();
        let t: Table<u32> = s.table("t").unwrap();
        t.insert(b"a", &1).unwrap();
        assert!(!s.checkpoint_due());
        // As if 64 MiB of records had been written: the next flush checkpoints.
        lock(&s.shared.writer).len = CHECKPOINT_BYTES;
        assert!(s.checkpoint_due());
        s.flush().await.unwrap();
        assert!(
            !s.checkpoint_due(),
            "the flush checkpointed: a fresh journal"
        );
        assert_eq!(t.get(b"a").unwrap(), Some(1));
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
