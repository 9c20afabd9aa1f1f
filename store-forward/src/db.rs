//! sled persistence of the relay mailbox, in its own database directory, and the rebuild
//! of the [`MailboxRules`] index from it at open.
//!
//! Layout: tree `mbx_meta` holds `schema_version` (u32 BE); everything else lives in ONE
//! tree, `mbx_data`, under typed keys (`key` is the 32-byte [`PeerKey`] of the mailbox
//! owner, `seq` a u64 big-endian, so range scans are ordered):
//!
//! | key | value |
//! |---|---|
//! | `m` ‖ key | `MailboxRecord { peer, tokens, registered_at }` |
//! | `e` ‖ key ‖ seq | `ItemRecord { id, deposited_at, expires_at, from, envelope }` |
//! | `p` ‖ key ‖ seq | a one-time prekey (raw bytes) |
//! | `s` | `seq_reserved` (u64 BE): every seq ever used is below it |
//!
//! Why one tree: a sled write batch is atomic only within a tree, and each atomic write
//! costs about as much as five plain inserts (sled seals every batch in its log). So
//! writes are not applied one by one: they collect in a pending write set (readable, as an
//! overlay, by the reads that follow) and [`MailboxDb::write_pending`] applies a whole group
//! commit as ONE atomic `apply_batch`, right before the flush: a mailbox and its first
//! items, a seq reservation and the items using it land together or not at all.
//!
//! Mailbox records written before idle expiry lack `registered_at` (`{ peer, tokens }`,
//! the same schema version: an older build reads a new record and ignores the extra
//! field). [`MailboxDb::load`] reads such a record as registered at `now` (the idle clock
//! of a mailbox starts when the relay first runs a build that keeps it) and queues a
//! rewrite in the new layout, so that a restart before its owner registers again does not
//! restart the clock.
//!
//! Why no separate id index on disk: the in-memory index ([`MailboxRules`]) is the id
//! index; at open it is rebuilt by one scan of the `e` records (decoded without copying
//! the envelopes). A separate index record would halve deposit and drain throughput (every
//! deposit and every ack would touch two sled keys in two leaves), for a faster start only.
//! The price: opening reads every stored envelope once.
//!
//! Invariants:
//! - nothing is durable before [`MailboxDb::flush`] (write the pending set, then flush
//!   sled); the server answers only after it;
//! - seqs are reserved in blocks (`s`) written in the same batch as the first item of a
//!   block, so no seq is handed out twice, even after a crash (the fetch cursor relies on
//!   it);
//! - new writes are refused with [`DbError::DiskFull`] while the disk has less free space
//!   than the reserve (counting the pending bytes), and a batch with new values is measured
//!   again right before sled gets it: sled 0.34 does not recover from ENOSPC, so it never
//!   gets there. Removals are never refused (they free space);
//! - after a failed sled write the database stops ([`DbError::Stopped`]): sled is neither
//!   written, read, flushed nor closed again in this process (it can wait forever then).
//! - an idle mailbox is removed (its record, items and prekeys) in one write set, so the
//!   atomic batch never leaves items or prekeys without their mailbox.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::{
    rules::{MailboxRemoval, MailboxRules, NewItem, sender_tag},
    space::{Full, SpaceGuard},
    wire::{MessageId, PeerBytes, PeerKey, StoredItem, TokenHash},
};

/// The schema this build writes.
pub const SCHEMA_VERSION: u32 = 1;
const META: &str = "mbx_meta";
const DATA: &str = "mbx_data";
const SCHEMA_KEY: &[u8] = b"schema_version";
const TAG_MAILBOX: u8 = b'm';
const TAG_ITEM: u8 = b'e';
const TAG_PREKEY: u8 = b'p';
const SEQ_KEY: &[u8] = b"s";
/// Seqs reserved per write of `s`.
const SEQ_BLOCK: u64 = 4096;

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
    #[error("corrupt mailbox database: {message}")]
    Corrupt {
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
    /// A write to sled failed: the database takes nothing more, and is neither flushed nor
    /// closed again in this process (sled 0.34 can wait forever after a failed write of
    /// its own). What was flushed before is safe; a restart opens it again.
    #[error("the mailbox database stopped after a failed write ({0}); restart the relay")]
    Stopped(String),
}

fn corrupt(message: impl Into<String>) -> DbError {
    DbError::Corrupt {
        message: message.into(),
    }
}

#[derive(Serialize, Deserialize)]
struct MailboxRecord {
    peer: PeerBytes,
    tokens: Vec<TokenHash>,
    /// `now` of the owner's last `Register`: the idle expiry counts from it.
    registered_at: u64,
}

/// A mailbox record as written before idle expiry: [`MailboxRecord`] without
/// `registered_at`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct LegacyMailboxRecord {
    peer: PeerBytes,
    tokens: Vec<TokenHash>,
}

/// Decodes a mailbox record of either layout; `registered_at` is `None` for a legacy one.
/// Each layout must use every byte, so neither can be mistaken for the other (a legacy
/// record ends where `registered_at` would start).
fn decode_mailbox(bytes: &[u8]) -> Result<(PeerBytes, Vec<TokenHash>, Option<u64>), DbError> {
    let current = match postcard::take_from_bytes::<MailboxRecord>(bytes) {
        Ok((r, [])) => return Ok((r.peer, r.tokens, Some(r.registered_at))),
        Ok((_, tail)) => format!("{} trailing bytes", tail.len()),
        Err(e) => e.to_string(),
    };
    match postcard::take_from_bytes::<LegacyMailboxRecord>(bytes) {
        Ok((r, [])) => Ok((r.peer, r.tokens, None)),
        _ => Err(corrupt(format!("mailbox record: {current}"))),
    }
}

/// A stored envelope with everything the index needs; decoded borrowing from the sled
/// value (no copy of the envelope at open).
#[derive(Serialize, Deserialize)]
struct ItemRecord<'a> {
    id: MessageId,
    deposited_at: u64,
    expires_at: u64,
    #[serde(borrow, serialize_with = "crate::wire::bytes::serialize")]
    from: &'a [u8],
    #[serde(borrow, serialize_with = "crate::wire::bytes::serialize")]
    envelope: &'a [u8],
}

impl From<Full> for DbError {
    fn from(f: Full) -> Self {
        DbError::DiskFull {
            free_mib: f.free / (1024 * 1024),
            reserve_mib: f.reserve / (1024 * 1024),
        }
    }
}

/// What makes sled's writes durable beyond its own flush. Both Tern stores call
/// [`SledFiles::sync`] right after sled's flush, before anything counts as durable.
///
/// sled 0.34's flush ends with `sync_file_range` on its log file (`db`): that neither empties
/// the disk's volatile write cache nor records the file's new size, so a power cut could
/// still take writes it reported flushed. Pages too large for its log (over a quarter of a
/// segment: a leaf holding a few 60 KiB envelopes or messages) go to files of their own
/// under `blobs/`, which sled never syncs, nor the directory naming them. `sync` makes up
/// for both: an `fdatasync` of the log file, then an `fsync` of every blob file not synced
/// before at its present length (sled writes each once, under a new name, and never changes
/// it after; one still being written is synced again once it grew) and of `blobs/` when it
/// holds new ones.
#[derive(Debug)]
pub struct SledFiles {
    log: File,
    blobs: PathBuf,
    /// The blob files made durable so far and their lengths then (those still present at
    /// the last sync).
    synced: Mutex<HashMap<OsString, u64>>,
}

impl SledFiles {
    /// The files of the sled database in directory `path` (already created).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            log: File::open(path.join("db"))?,
            blobs: path.join("blobs"),
            synced: Mutex::new(HashMap::new()),
        })
    }

    /// Makes durable what sled's flush wrote: call after it. Returns the number of blob
    /// files synced (new ones, and ones that grew since their last sync).
    pub fn sync(&self) -> std::io::Result<usize> {
        self.log.sync_data()?;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = HashMap::with_capacity(synced.len());
        let mut new = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            // Removed by sled meanwhile (its page was rewritten): nothing to keep.
            let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if synced.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e),
                }
                new += 1;
            }
            present.insert(name, len);
        }
        if new > 0 {
            File::open(&self.blobs)?.sync_all()?;
        }
        *synced = present;
        Ok(new)
    }
}

/// Makes the mailbox database durable from another task (e.g. `flush_async` in the node's
/// group commit, after [`MailboxDb::write_pending`] on the owning task). Cheap to clone.
#[derive(Clone)]
pub struct Flusher(
    sled::Db,
    Arc<OnceLock<String>>,
    Arc<AtomicBool>,
    Arc<SledFiles>,
);

impl Flusher {
    /// Blocking flush of every applied write, made durable ([`SledFiles`]); returns the
    /// bytes flushed.
    pub fn flush(&self) -> Result<usize, DbError> {
        running(&self.1)?;
        let bytes = self.0.flush()?;
        sync_files(&self.3, &self.1)?;
        Ok(bytes)
    }

    /// The same as a future (sled's `flush_async`, then the files' sync on the blocking
    /// pool).
    pub async fn flush_async(&self) -> Result<usize, DbError> {
        running(&self.1)?;
        if self.2.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        let bytes = self.0.flush_async().await?;
        let (files, failed) = (self.3.clone(), self.1.clone());
        tokio::task::spawn_blocking(move || sync_files(&files, &failed))
            .await
            .map_err(|e| DbError::Sled(sled::Error::Io(std::io::Error::other(e))))??;
        Ok(bytes)
    }

    /// Stops the database as a failed write does ([`DbError::Stopped`] with `why`): for a
    /// flush that did not end in time, since sled 0.34 may never end one after a failed
    /// background write. Nothing is written, read or flushed again in this process.
    pub fn stop(&self, why: String) {
        if self.1.set(why.clone()).is_ok() {
            tracing::error!(error = %why, "mailbox database stops");
        }
    }

    /// Test hook: every later [`Flusher::flush_async`] waits forever, as sled's can.
    #[doc(hidden)]
    pub fn hang_flushes(&self) {
        self.2.store(true, Ordering::Relaxed);
    }
}

/// [`SledFiles::sync`]; a failure stops the database: Linux may drop the pages it could not
/// write and report success on the next try, so nothing written since the last good sync
/// can be trusted to be on disk.
fn sync_files(files: &SledFiles, failed: &OnceLock<String>) -> Result<(), DbError> {
    match files.sync() {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = format!("syncing the database files failed: {e}");
            if failed.set(why.clone()).is_ok() {
                tracing::error!(error = %why, "mailbox database stops");
            }
            Err(DbError::Stopped(why))
        }
    }
}

/// `Err(Stopped)` once a write to sled failed (see [`DbError::Stopped`]).
fn running(failed: &OnceLock<String>) -> Result<(), DbError> {
    match failed.get() {
        Some(why) => Err(DbError::Stopped(why.clone())),
        None => Ok(()),
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
    /// Mailbox records without a registration time (written before idle expiry): counted
    /// as registered at load time, rewrites queued.
    pub upgraded: u64,
    /// Stored envelopes (expired ones included, before the purge).
    pub items: u64,
    /// Prekeys.
    pub prekeys: u64,
}

/// The relay's sled trees plus the pending write set.
pub struct MailboxDb {
    db: sled::Db,
    meta: sled::Tree,
    data: sled::Tree,
    /// Writes not applied to sled yet: key -> new value (`None`: delete).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    space: SpaceGuard,
    /// `s` as it will be after the pending writes.
    seq_reserved: u64,
    /// Set once a write to sled failed (shared with the [`Flusher`]s).
    failed: Arc<OnceLock<String>>,
    /// [`Flusher::hang_flushes`] (shared with the [`Flusher`]s).
    hang: Arc<AtomicBool>,
    /// Synced after every flush (shared with the [`Flusher`]s).
    files: Arc<SledFiles>,
    /// Makes the next [`MailboxDb::write_pending`] fail as sled would.
    #[cfg(test)]
    fail_next_write: bool,
}

impl Drop for MailboxDb {
    fn drop(&mut self) {
        // sled flushes when its last handle goes; after one of its writes failed that flush
        // can wait forever (sled 0.34): leave sled as it is, open until the process ends.
        if self.failed.get().is_some() {
            tracing::error!("the mailbox database is left unflushed after its failed write");
            std::mem::forget(self.db.clone());
        }
    }
}

impl std::fmt::Debug for MailboxDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxDb")
            .field("dir", &self.space.dir())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

fn mailbox_key(key: &PeerKey) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = TAG_MAILBOX;
    k[1..].copy_from_slice(&key.0);
    k
}

fn seq_key(tag: u8, key: &PeerKey, seq: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = tag;
    k[1..33].copy_from_slice(&key.0);
    k[33..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_seq_key(k: &[u8]) -> Result<(PeerKey, u64), DbError> {
    let bad = || corrupt(format!("key of {} bytes, expected 41", k.len()));
    let key: [u8; 32] = k
        .get(1..33)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(bad)?;
    let seq: [u8; 8] = k
        .get(33..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(bad)?;
    Ok((PeerKey(key), u64::from_be_bytes(seq)))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DbError> {
    postcard::to_stdvec(value).map_err(|e| corrupt(format!("cannot encode a record: {e}")))
}

fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, DbError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(format!("{what} record: {e}")))
}

/// Makes sure a sled database exists at `path`, creating a missing one atomically: sled
/// 0.34 writes its `conf` file with two `write`s and no sync, and a process killed between
/// them leaves a database that never opens again ("Read corrupted data"). So a new
/// database is made in `<path>.creating`, flushed, and renamed into place (both directories
/// synced); a leftover from a creation that was killed is started over. An existing
/// database is left alone. Both Tern stores call this before opening theirs.
pub fn create_sled_dir(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("a database path needs a file name"))?;
    let mut creating_name = file_name.to_os_string();
    creating_name.push(".creating");
    let creating = path.with_file_name(creating_name);
    if creating.exists() {
        std::fs::remove_dir_all(&creating)?;
    }
    {
        let db = open_sled(&sled::Config::new().path(&creating).flush_every_ms(None))
            .map_err(std::io::Error::other)?;
        db.flush().map_err(std::io::Error::other)?;
    }
    std::fs::File::open(&creating)?.sync_all()?;
    std::fs::rename(&creating, path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

/// Opens `config`'s database, waiting up to 2 s for its file lock: sled 0.34 releases the
/// lock of a database dropped a moment ago only when its background threads let go of the
/// file, so a quick reopen (a restart, a test) can find it still held. A lock that stays
/// held (another process has the database open) is the error it was.
///
/// A database that does not open as corrupt is opened again without its unfinished
/// snapshot files, if it has any ([`remove_unfinished_snapshots`]).
pub fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut retried = false;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e @ sled::Error::Corruption { .. }) if !retried => {
                retried = true;
                let removed = remove_unfinished_snapshots(&config.path)?;
                if removed == 0 {
                    // Not that: sled's own error, as it was.
                    return Err(e);
                }
                tracing::warn!(
                    removed,
                    "removed the unfinished snapshot files of a crash; opening again"
                );
            }
            other => return other,
        }
    }
}

/// Removes `snap.<lsn>.generating` files from the sled directory `path` and returns how
/// many there were. sled 0.34 writes a snapshot to such a file, syncs it and only then
/// renames it to `snap.<lsn>`; a process killed before the rename leaves it behind, and
/// sled's open takes it for the newest snapshot (it does not leave such names out), finds
/// its checksum wrong and refuses to open, for good. The file is by construction a snapshot
/// that was never finished: the previous one and the log still hold everything.
pub fn remove_unfinished_snapshots(path: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        std::fs::File::open(path)?.sync_all()?;
    }
    Ok(removed)
}

impl MailboxDb {
    /// Opens (or creates) the database in directory `path`, refusing writes while the disk
    /// holding it has less than `min_free_bytes` free. Checks the schema; call
    /// [`MailboxDb::load`] next.
    pub fn open(path: &Path, min_free_bytes: u64) -> Result<Self, DbError> {
        create_sled_dir(path).map_err(|e| DbError::Sled(sled::Error::Io(e)))?;
        let db = open_sled(
            &sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput),
        )?;
        let meta = db.open_tree(META)?;
        let found = match meta.get(SCHEMA_KEY)? {
            None => 0,
            Some(v) => u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| corrupt("schema_version is not 4 bytes"))?,
            ),
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
        let data = db.open_tree(DATA)?;
        let mut this = Self {
            db,
            meta,
            data,
            pending: BTreeMap::new(),
            space: SpaceGuard::new(path, min_free_bytes),
            seq_reserved: 1,
            failed: Arc::new(OnceLock::new()),
            hang: Arc::new(AtomicBool::new(false)),
            files: Arc::new(SledFiles::open(path).map_err(|e| DbError::Sled(sled::Error::Io(e)))?),
            #[cfg(test)]
            fail_next_write: false,
        };
        this.seq_reserved = this.read_seq_reserved()?;
        Ok(this)
    }

    fn read_seq_reserved(&self) -> Result<u64, DbError> {
        match self.data.get(SEQ_KEY)? {
            None => Ok(1),
            Some(v) => Ok(u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| corrupt("seq_reserved is not 8 bytes"))?,
            )),
        }
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u32, DbError> {
        Ok(self
            .meta
            .get(SCHEMA_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes))
    }

    /// Rebuilds `rules` (whose index must be empty) from what is applied to sled:
    /// mailboxes, the item index (from the item records, envelopes not copied), prekeys
    /// and the next seq.
    /// Expired items and idle mailboxes are restored too; purge next. Pending writes are
    /// not seen: call it with none. A mailbox record without a registration time (written
    /// before idle expiry) counts as registered at `now`, and its rewrite with that time is
    /// queued (flush next); when the disk is below its reserve the rewrite is skipped and
    /// the next load stamps it again.
    pub fn load(&mut self, rules: &mut MailboxRules, now: u64) -> Result<LoadStats, DbError> {
        let mut stats = LoadStats::default();
        let mut legacy = Vec::new();
        for entry in self.data.scan_prefix([TAG_MAILBOX]) {
            let (k, v) = entry?;
            let (peer, tokens, registered_at) = decode_mailbox(&v)?;
            let key = peer.key();
            if k.get(1..) != Some(key.0.as_slice()) {
                return Err(corrupt("a mailbox is filed under another peer's key"));
            }
            rules.restore_mailbox(key, &tokens, registered_at.unwrap_or(now));
            if registered_at.is_none() {
                legacy.push((key, peer, tokens));
            }
            stats.mailboxes += 1;
        }
        let mut skipped = 0u64;
        for (key, peer, tokens) in legacy {
            match self.put_mailbox(&key, &peer, &tokens, now) {
                Ok(()) => stats.upgraded += 1,
                Err(DbError::DiskFull { .. }) => skipped += 1,
                Err(e) => return Err(e),
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "disk below its reserve: mailbox records not upgraded; their idle clock starts again at the next start"
            );
        }
        for entry in self.data.scan_prefix([TAG_ITEM]) {
            let (k, v) = entry?;
            let (key, seq) = split_seq_key(&k)?;
            let r: ItemRecord<'_> = decode("item", &v)?;
            let size = u32::try_from(r.envelope.len())
                .map_err(|_| corrupt(format!("item seq {seq} is larger than 4 GiB")))?;
            let item = NewItem {
                key,
                seq,
                id: r.id,
                sender: sender_tag(r.from),
                size,
                deposited_at: r.deposited_at,
                expires_at: r.expires_at,
            };
            if !rules.restore_item(&item) {
                return Err(corrupt(format!(
                    "item seq {seq} has no mailbox or repeats an id of its mailbox"
                )));
            }
            stats.items += 1;
        }
        for entry in self.data.scan_prefix([TAG_PREKEY]).keys() {
            let (key, seq) = split_seq_key(&entry?)?;
            if !rules.restore_prekey(key, seq) {
                return Err(corrupt(format!("prekey seq {seq} has no mailbox")));
            }
            stats.prekeys += 1;
        }
        rules.restore_next_seq(self.read_seq_reserved()?);
        Ok(stats)
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.pending.insert(key.to_vec(), Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
    }

    /// The current value of `key`: the pending write if any, else sled's.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.data.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Reserves seqs up to `last` (in the same write set as their first use).
    fn reserve_seqs(&mut self, last: u64) {
        if last >= self.seq_reserved {
            self.seq_reserved = last.saturating_add(SEQ_BLOCK);
            let v = self.seq_reserved.to_be_bytes().to_vec();
            self.put(SEQ_KEY, v);
        }
    }

    /// Creates or replaces a mailbox record, with its owner's last registration.
    pub fn put_mailbox(
        &mut self,
        key: &PeerKey,
        peer: &PeerBytes,
        tokens: &[TokenHash],
        registered_at: u64,
    ) -> Result<(), DbError> {
        let value = encode(&MailboxRecord {
            peer: peer.clone(),
            tokens: tokens.to_vec(),
            registered_at,
        })?;
        self.space.check((33 + value.len()) as u64)?;
        self.put(&mailbox_key(key), value);
        Ok(())
    }

    /// Stores a new envelope.
    pub fn put_item(
        &mut self,
        item: &NewItem,
        from: &PeerBytes,
        envelope: &[u8],
    ) -> Result<(), DbError> {
        let value = encode(&ItemRecord {
            id: item.id,
            deposited_at: item.deposited_at,
            expires_at: item.expires_at,
            from: from.as_bytes(),
            envelope,
        })?;
        self.space.check((41 + value.len()) as u64)?;
        self.reserve_seqs(item.seq);
        self.put(&seq_key(TAG_ITEM, &item.key, item.seq), value);
        Ok(())
    }

    /// Removes envelopes (never refused for space).
    pub fn remove_items(&mut self, key: &PeerKey, items: &[(u64, MessageId)]) {
        for (seq, _) in items {
            self.delete(&seq_key(TAG_ITEM, key, *seq));
        }
    }

    /// Removes an idle mailbox: its record, the listed items and prekeys (never refused for
    /// space). All in the pending write set, so they go in one atomic batch.
    pub fn remove_mailbox(&mut self, removal: &MailboxRemoval) {
        let key = &removal.key;
        self.delete(&mailbox_key(key));
        for (seq, _) in &removal.items {
            self.delete(&seq_key(TAG_ITEM, key, *seq));
        }
        for seq in &removal.prekeys {
            self.delete(&seq_key(TAG_PREKEY, key, *seq));
        }
    }

    /// Reads the items `seqs` (ascending) of mailbox `key`, pending writes included: the
    /// pending set first, then one sled range scan for the rest. An item missing (which
    /// the index says is there) is skipped with a warning.
    pub fn read_items(&self, key: &PeerKey, seqs: &[u64]) -> Result<Vec<StoredItem>, DbError> {
        let mut found: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut from_disk: Vec<u64> = Vec::new();
        for &seq in seqs {
            match self.pending.get(seq_key(TAG_ITEM, key, seq).as_slice()) {
                Some(Some(v)) => {
                    found.insert(seq, v.clone());
                }
                Some(None) => {}
                None => from_disk.push(seq),
            }
        }
        if let (Some(first), Some(last)) = (from_disk.first(), from_disk.last()) {
            let mut wanted = from_disk.iter().peekable();
            let range = seq_key(TAG_ITEM, key, *first)..=seq_key(TAG_ITEM, key, *last);
            for entry in self.data.range(range) {
                let (k, v) = entry?;
                let (_, seq) = split_seq_key(&k)?;
                while wanted.next_if(|w| **w < seq).is_some() {}
                if wanted.next_if_eq(&&seq).is_some() {
                    found.insert(seq, v.to_vec());
                }
                if wanted.peek().is_none() {
                    break;
                }
            }
        }
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let Some(v) = found.remove(&seq) else {
                tracing::warn!(seq, "a mailbox item in the index is missing");
                continue;
            };
            let r: ItemRecord<'_> = decode("item", &v)?;
            out.push(StoredItem {
                seq,
                id: r.id,
                from: PeerBytes::new(r.from.to_vec())
                    .map_err(|e| corrupt(format!("item seq {seq}: {e}")))?,
                deposited_at: r.deposited_at,
                expires_at: r.expires_at,
                envelope: r.envelope.to_vec(),
            });
        }
        Ok(out)
    }

    /// Appends prekeys numbered `first_seq..`.
    pub fn add_prekeys(
        &mut self,
        key: &PeerKey,
        first_seq: u64,
        prekeys: &[Vec<u8>],
    ) -> Result<(), DbError> {
        if prekeys.is_empty() {
            return Ok(());
        }
        let last = first_seq.saturating_add(prekeys.len() as u64 - 1);
        let bytes: usize = prekeys.iter().map(|p| p.len() + 41).sum();
        self.space.check(bytes as u64)?;
        self.reserve_seqs(last);
        for (seq, p) in (first_seq..).zip(prekeys) {
            self.put(&seq_key(TAG_PREKEY, key, seq), p.clone());
        }
        Ok(())
    }

    /// Removes prekey `seq` of mailbox `key` and returns it (`None` if it is not there).
    pub fn take_prekey(&mut self, key: &PeerKey, seq: u64) -> Result<Option<Vec<u8>>, DbError> {
        let k = seq_key(TAG_PREKEY, key, seq);
        let value = self.get(&k)?;
        if value.is_some() {
            self.delete(&k);
        }
        Ok(value)
    }

    /// Number of pending writes (keys written or deleted since the last
    /// [`MailboxDb::write_pending`]).
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    /// Applies the pending writes to sled as one atomic batch (not yet durable: flush
    /// next). On error the pending writes are dropped: the caller reloads the index (unless
    /// the database stopped: [`MailboxDb::is_stopped`]). A batch with new values is
    /// refused with [`DbError::DiskFull`], sled untouched, if the disk has no room for it
    /// now; one of removals only is never refused (it frees space).
    pub fn write_pending(&mut self) -> Result<(), DbError> {
        running(&self.failed)?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let new_bytes: usize = pending
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| k.len() + v.len()))
            .sum();
        if new_bytes > 0
            && let Err(full) = self.space.check_fresh(new_bytes as u64)
        {
            self.seq_reserved = self.read_seq_reserved().unwrap_or(self.seq_reserved);
            return Err(full.into());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in pending {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        #[cfg(test)]
        let injected = std::mem::take(&mut self.fail_next_write);
        #[cfg(not(test))]
        let injected = false;
        let applied = if injected {
            Err(sled::Error::Io(std::io::Error::other(
                "injected write failure",
            )))
        } else {
            self.data.apply_batch(batch)
        };
        if let Err(e) = applied {
            // sled may now wait forever on any flush or read of what it was writing.
            let why = e.to_string();
            tracing::error!(error = %why, "mailbox database write failed; the database stops");
            let _ = self.failed.set(why.clone());
            return Err(DbError::Stopped(why));
        }
        Ok(())
    }

    /// Whether a write to sled failed (see [`DbError::Stopped`]).
    pub fn is_stopped(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Drops the pending writes (after a failure, before reloading the index).
    pub fn discard_pending(&mut self) -> Result<(), DbError> {
        self.pending.clear();
        running(&self.failed)?;
        self.seq_reserved = self.read_seq_reserved()?;
        Ok(())
    }

    /// Applies the pending writes and makes everything durable.
    pub fn flush(&mut self) -> Result<usize, DbError> {
        self.write_pending()?;
        running(&self.failed)?;
        let bytes = self.db.flush()?;
        sync_files(&self.files, &self.failed)?;
        Ok(bytes)
    }

    /// A handle that flushes this database from elsewhere (after
    /// [`MailboxDb::write_pending`]).
    pub fn flusher(&self) -> Flusher {
        Flusher(
            self.db.clone(),
            self.failed.clone(),
            self.hang.clone(),
            self.files.clone(),
        )
    }

    /// Bytes used on disk (approximate).
    pub fn size_on_disk(&self) -> Result<u64, DbError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Changes the free-space reserve (the next write measures again).
    pub fn set_min_free_bytes(&mut self, bytes: u64) {
        self.space.set_reserve(bytes);
    }
}

#[cfg(test)]
impl MailboxDb {
    /// Makes the disk report `free` bytes (`None`: the real figure).
    pub(crate) fn pretend_free(&mut self, free: Option<u64>) {
        self.space.pretend_free(free);
    }

    /// Makes the next batch fail as a write of sled's would.
    pub(crate) fn fail_next_write(&mut self) {
        self.fail_next_write = true;
    }

    /// Queues a mailbox record in the layout of builds before idle expiry (for tests of
    /// the upgrade elsewhere in the crate).
    pub(crate) fn put_legacy_mailbox(
        &mut self,
        peer: &PeerBytes,
        tokens: &[TokenHash],
    ) -> Result<(), DbError> {
        let value = encode(&LegacyMailboxRecord {
            peer: peer.clone(),
            tokens: tokens.to_vec(),
        })?;
        self.put(&mailbox_key(&peer.key()), value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{limits::RelayLimits, wire::MailboxToken};

    #[test]
    fn a_snapshot_left_unfinished_by_a_crash_does_not_keep_the_database_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let config = sled::Config::new().path(&path);
        {
            let db = open_sled(&config).unwrap();
            db.insert(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        // What a kill during a snapshot leaves: the file before its rename, cut short.
        std::fs::write(path.join("snap.7FFFFFFFFFFFFFFF.generating"), [1, 2, 3]).unwrap();
        // sled alone (not `open_sled`), waiting out the file lock the dropped database may
        // still hold for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let refused = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other,
            }
        };
        assert!(
            matches!(refused, Err(sled::Error::Corruption { .. })),
            "sled 0.34 takes the unfinished file for its snapshot"
        );
        let db = open_sled(&config).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(
            !path.join("snap.7FFFFFFFFFFFFFFF.generating").exists(),
            "the unfinished snapshot is gone"
        );
    }

    #[test]
    fn a_creation_killed_half_way_is_started_over_and_never_leaves_a_broken_database() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mailbox");
        // What a kill between sled's two writes of `conf` leaves: the text without its crc,
        // which sled 0.34 then refuses for ever. Here it is in the half-made directory.
        let creating = tmp.path().join("mailbox.creating");
        std::fs::create_dir(&creating).unwrap();
        std::fs::write(
            creating.join("conf"),
            b"segment_size: 524288\nuse_compression: fal",
        )
        .unwrap();
        create_sled_dir(&path).unwrap();
        assert!(!creating.exists());
        MailboxDb::open(&path, 0).unwrap();
        // An existing database is left as it is.
        create_sled_dir(&path).unwrap();
        MailboxDb::open(&path, 0).unwrap();
    }

    fn peer(n: u8) -> PeerBytes {
        PeerBytes::new(vec![n; 38]).unwrap()
    }

    fn item(key: PeerKey, seq: u64, id: u8, size: u32) -> NewItem {
        NewItem {
            key,
            seq,
            id: [id; 16],
            sender: crate::rules::sender_tag(peer(2).as_bytes()),
            size,
            deposited_at: 10,
            expires_at: 1000,
        }
    }

    const T0: u64 = 1_700_000_000;

    fn load(db: &mut MailboxDb) -> (MailboxRules, LoadStats) {
        load_at(db, T0)
    }

    fn load_at(db: &mut MailboxDb, now: u64) -> (MailboxRules, LoadStats) {
        let mut rules = MailboxRules::new(RelayLimits::default(), true);
        let stats = db.load(&mut rules, now).unwrap();
        rules.check_invariants().unwrap();
        (rules, stats)
    }

    #[test]
    fn writes_survive_reopen_and_rebuild_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
            db.put_mailbox(
                &key,
                &bob,
                &[MailboxToken::from_bytes([1; 32]).hash()],
                T0 - 50,
            )
            .unwrap();
            for seq in 1..=3 {
                db.put_item(&item(key, seq, seq as u8, 4), &peer(2), &[seq as u8; 4])
                    .unwrap();
            }
            // Pending writes are readable before they are applied.
            assert_eq!(db.read_items(&key, &[2]).unwrap()[0].envelope, vec![2; 4]);
            db.flush().unwrap();
            assert_eq!(db.pending_writes(), 0);
            db.remove_items(&key, &[(2, [2; 16])]);
            assert!(
                db.read_items(&key, &[2]).unwrap().is_empty(),
                "pending delete seen"
            );
            db.add_prekeys(&key, 4, &[vec![7], vec![8]]).unwrap();
            db.flush().unwrap();
        }
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        let (rules, stats) = load(&mut db);
        assert_eq!(
            stats,
            LoadStats {
                mailboxes: 1,
                upgraded: 0,
                items: 2,
                prekeys: 2
            }
        );
        assert_eq!(rules.registered_at(&bob), Some(T0 - 50));
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
        assert_eq!(db.take_prekey(&key, 4).unwrap(), Some(vec![7]));
        assert_eq!(
            db.take_prekey(&key, 4).unwrap(),
            None,
            "pending removal seen"
        );
        assert_eq!(db.take_prekey(&key, 5).unwrap(), Some(vec![8]));
    }

    #[test]
    fn unapplied_writes_are_not_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            db.put_mailbox(&bob.key(), &bob, &[], T0).unwrap();
            db.flush().unwrap();
            db.put_item(&item(bob.key(), 1, 1, 1), &peer(2), &[1])
                .unwrap();
            // Dropped without write_pending: the item never reached sled.
        }
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        let (rules, _) = load(&mut db);
        assert_eq!(rules.usage(&bob), Some((0, 0)));
    }

    #[test]
    fn discarded_writes_leave_the_applied_state() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        db.put_mailbox(&bob.key(), &bob, &[], T0).unwrap();
        db.put_item(&item(bob.key(), 1, 1, 1), &peer(2), &[1])
            .unwrap();
        db.flush().unwrap();
        db.put_item(&item(bob.key(), 2, 2, 1), &peer(2), &[2])
            .unwrap();
        db.discard_pending().unwrap();
        assert_eq!(db.pending_writes(), 0);
        let (rules, stats) = load(&mut db);
        assert_eq!(stats.items, 1);
        assert!(rules.next_seq() > 2);
    }

    #[test]
    fn seq_reservation_survives_removal_of_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            db.put_mailbox(&key, &bob, &[], T0).unwrap();
            db.put_item(&item(key, 1, 1, 1), &peer(2), &[1]).unwrap();
            db.flush().unwrap();
            db.remove_items(&key, &[(1, [1; 16])]);
            db.flush().unwrap();
        }
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        let (rules, stats) = load(&mut db);
        assert_eq!(stats.items, 0);
        assert!(
            rules.next_seq() > 1,
            "a cursor at seq 1 must not hide the next item"
        );
    }

    #[test]
    fn old_format_mailbox_records_open_and_count_from_the_first_load() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        let tok = MailboxToken::from_bytes([1; 32]).hash();
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            // The record exactly as builds before idle expiry wrote it.
            db.put_legacy_mailbox(&bob, &[tok]).unwrap();
            db.put_item(&item(key, 1, 1, 4), &peer(2), &[1; 4]).unwrap();
            db.add_prekeys(&key, 2, &[vec![9]]).unwrap();
            db.flush().unwrap();
        }
        {
            // First start of this build: registered at load time, rewrite queued.
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            let (rules, stats) = load_at(&mut db, T0 + 100);
            assert_eq!(
                stats,
                LoadStats {
                    mailboxes: 1,
                    upgraded: 1,
                    items: 1,
                    prekeys: 1
                }
            );
            assert_eq!(rules.registered_at(&bob), Some(T0 + 100));
            assert_eq!(db.pending_writes(), 1);
            db.flush().unwrap();
        }
        // Later starts keep that time: a restart does not restart the idle clock.
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        let (mut rules, stats) = load_at(&mut db, T0 + 5000);
        assert_eq!(stats.upgraded, 0);
        assert_eq!(db.pending_writes(), 0);
        assert_eq!(rules.registered_at(&bob), Some(T0 + 100));
        assert_eq!(rules.usage(&bob), Some((1, 4)));
        assert_eq!(rules.prekeys(&bob), 1);
        assert!(
            rules
                .deposit(T0 + 5000, &peer(2), &bob, &tok, [7; 16], None, 1)
                .is_ok(),
            "the token set survived the upgrade"
        );
        // An older build still reads the new record (its decoder ignores the extra field).
        let v = db.data.get(mailbox_key(&key)).unwrap().unwrap();
        let seen_by_old: LegacyMailboxRecord = postcard::from_bytes(&v).unwrap();
        assert_eq!(
            (seen_by_old.peer, seen_by_old.tokens),
            (bob.clone(), vec![tok])
        );
        // A record of neither layout is corruption, not silently read as the other.
        let mut longer = v.to_vec();
        longer.push(0);
        db.data.insert(mailbox_key(&key), longer).unwrap();
        let mut fresh = MailboxRules::new(RelayLimits::default(), true);
        assert!(matches!(
            db.load(&mut fresh, T0),
            Err(DbError::Corrupt { .. })
        ));
    }

    #[test]
    fn remove_mailbox_deletes_its_record_items_and_prekeys_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (bob, carol) = (peer(1), peer(3));
        let (kb, kc) = (bob.key(), carol.key());
        {
            let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
            db.put_mailbox(&kb, &bob, &[], T0).unwrap();
            db.put_mailbox(&kc, &carol, &[], T0).unwrap();
            for seq in 1..=3 {
                db.put_item(&item(kb, seq, seq as u8, 2), &peer(2), &[0; 2])
                    .unwrap();
            }
            db.add_prekeys(&kb, 4, &[vec![4], vec![5]]).unwrap();
            db.put_item(&item(kc, 6, 6, 3), &peer(2), &[0; 3]).unwrap();
            db.add_prekeys(&kc, 7, &[vec![7]]).unwrap();
            db.flush().unwrap();
            // One of Bob's items is still pending when the removal is queued.
            db.put_item(&item(kb, 8, 8, 2), &peer(2), &[0; 2]).unwrap();
            db.remove_mailbox(&MailboxRemoval {
                key: kb,
                registered_at: T0,
                items: vec![(1, [1; 16]), (2, [2; 16]), (3, [3; 16]), (8, [8; 16])],
                prekeys: vec![4, 5],
            });
            assert!(db.read_items(&kb, &[1, 8]).unwrap().is_empty());
            assert_eq!(db.take_prekey(&kb, 4).unwrap(), None);
            db.flush().unwrap();
        }
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        let (rules, stats) = load(&mut db);
        assert_eq!(
            stats,
            LoadStats {
                mailboxes: 1,
                upgraded: 0,
                items: 1,
                prekeys: 1
            }
        );
        assert!(!rules.is_registered(&bob));
        assert_eq!(rules.usage(&carol), Some((1, 3)));
        assert_eq!(rules.prekeys(&carol), 1);
        for k in db.data.iter().keys() {
            let k = k.unwrap();
            assert_ne!(k.get(1..33), Some(kb.0.as_slice()), "left behind: {k:?}");
        }
        assert!(rules.next_seq() > 8, "seqs are never reused");
    }

    #[test]
    fn newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let db = MailboxDb::open(tmp.path(), 0).unwrap();
            db.meta.insert(SCHEMA_KEY, &7u32.to_be_bytes()).unwrap();
            db.db.flush().unwrap();
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
        db.write_pending().unwrap();
        let mut rules = MailboxRules::new(RelayLimits::default(), true);
        assert!(matches!(
            db.load(&mut rules, T0),
            Err(DbError::Corrupt { .. })
        ));
    }

    #[test]
    fn disk_reserve_refuses_writes_but_not_removals() {
        let tmp = tempfile::tempdir().unwrap();
        let bob = peer(1);
        let key = bob.key();
        let mut db = MailboxDb::open(tmp.path(), 0).unwrap();
        db.put_mailbox(&key, &bob, &[], T0).unwrap();
        db.put_item(&item(key, 1, 1, 1), &peer(2), &[1]).unwrap();
        db.flush().unwrap();
        db.set_min_free_bytes(u64::MAX / 4);
        let e = db
            .put_item(&item(key, 2, 2, 1), &peer(2), &[2])
            .unwrap_err();
        assert!(matches!(e, DbError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("nothing was written"));
        assert!(matches!(
            db.put_mailbox(&key, &bob, &[], T0),
            Err(DbError::DiskFull { .. })
        ));
        assert!(matches!(
            db.add_prekeys(&key, 3, &[vec![1]]),
            Err(DbError::DiskFull { .. })
        ));
        assert_eq!(
            db.pending_writes(),
            0,
            "refused writes left nothing pending"
        );
        db.remove_items(&key, &[(1, [1; 16])]);
        db.flush().unwrap();
        let (rules, _) = load(&mut db);
        assert_eq!(rules.usage(&bob), Some((0, 0)));
        // The reserve measured again lets writes through once it is lowered.
        db.set_min_free_bytes(0);
        db.put_item(&item(key, 2, 2, 1), &peer(2), &[2]).unwrap();
    }

    #[test]
    fn sled_files_sync_each_blob_once_at_each_length() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        create_sled_dir(&path).unwrap();
        let db = open_sled(&sled::Config::new().path(&path)).unwrap();
        let files = SledFiles::open(&path).unwrap();
        // A value over a quarter of sled's segment goes to a blob file of its own.
        db.insert(b"big", vec![7u8; 300 * 1024]).unwrap();
        db.flush().unwrap();
        let first = files.sync().unwrap();
        assert!(first >= 1, "sled wrote its blob: {first}");
        assert_eq!(files.sync().unwrap(), 0, "synced once");
        // A blob still being written when it was synced is synced again once it grew.
        let blobs = path.join("blobs");
        std::fs::write(blobs.join("999999"), [1, 2, 3]).unwrap();
        assert_eq!(files.sync().unwrap(), 1);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(blobs.join("999999"))
            .unwrap();
        std::io::Write::write_all(&mut f, &[4, 5]).unwrap();
        assert_eq!(files.sync().unwrap(), 1);
        assert_eq!(files.sync().unwrap(), 0);
        std::fs::remove_file(blobs.join("999999")).unwrap();
        assert_eq!(files.sync().unwrap(), 0);
    }
}
