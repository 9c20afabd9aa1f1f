//! The store's write-ahead journal: what makes a group of writes atomic and durable without
//! sled's atomic batches.
//!
//! sled 0.34 writes its I/O buffer to disk (and syncs it) twice for every transaction or
//! atomic batch, which made each of them cost ~100 µs and a disk write. The store instead
//! applies a transaction's writes to sled as plain inserts and removes, after appending the
//! whole write set to this journal as one checksummed record:
//!
//! - a record reaches the kernel (`write`) before any of its writes reaches sled, so after
//!   a crash of the process the journal holds every record sled holds any part of;
//! - [`Store::flush`](super::Store::flush) is one `fdatasync` of the journal, shared by
//!   every writer waiting at that moment (group commit); that is the durability point;
//! - every record also sets `journal_seq` in the `meta` tree, written after its other
//!   writes, so sled says which records it holds entirely;
//! - on open, records after sled's `journal_seq` are applied again (writes are whole keys
//!   and values: applying twice is the same as once), sled is flushed and the journal
//!   starts empty;
//! - a checkpoint (sled flush, then a fresh journal file) bounds the journal's size.
//!
//! This file holds the record format (pure, with its own tests) and the journal files.
//! Format of a record, little endian: `len: u32`, `check: [u8; 8]` (the first 8 bytes of
//! BLAKE3 over the payload), `payload` (postcard [`Record`]). A record that is cut short or
//! does not match its check ends the journal: it was never acknowledged.

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// One write: set `key` of `tree` to `value`, or remove it (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Op {
    /// The sled tree.
    pub(super) tree: String,
    /// The key.
    #[serde(with = "serde_bytes")]
    pub(super) key: Vec<u8>,
    /// The new value, `None` to remove.
    #[serde(with = "serde_bytes")]
    pub(super) value: Option<Vec<u8>>,
}

/// An [`Op`] borrowed from the writes it describes (encodes exactly like one).
#[derive(Debug, Serialize)]
pub(super) struct OpRef<'a> {
    /// The sled tree.
    pub(super) tree: &'a str,
    /// The key.
    #[serde(with = "serde_bytes")]
    pub(super) key: &'a [u8],
    /// The new value, `None` to remove.
    #[serde(with = "serde_bytes")]
    pub(super) value: Option<&'a [u8]>,
}

#[derive(Serialize)]
struct RecordRef<'a> {
    seq: u64,
    ops: &'a [OpRef<'a>],
}

/// The writes of one transaction, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    /// Position in the store's history of writes, from 1, without gaps.
    pub(super) seq: u64,
    /// The writes.
    pub(super) ops: Vec<Op>,
}

const HEADER: usize = 4 + 8;
/// Largest record accepted when reading (a transaction's writes are far smaller).
pub(super) const MAX_RECORD: usize = 256 * 1024 * 1024;

fn check(payload: &[u8]) -> [u8; 8] {
    let hash = blake3::hash(payload);
    let mut out = [0; 8];
    out.copy_from_slice(&hash.as_bytes()[..8]);
    out
}

/// Frames `record` for appending to the journal.
#[cfg(test)]
pub(super) fn encode(record: &Record) -> Vec<u8> {
    frame(postcard::to_stdvec(record).expect("records always serialize"))
}

/// Frames the record `seq` of `ops` (the same bytes as [`encode`] of the owned record).
pub(super) fn encode_ref(seq: u64, ops: &[OpRef<'_>]) -> Vec<u8> {
    frame(postcard::to_stdvec(&RecordRef { seq, ops }).expect("records always serialize"))
}

fn frame(payload: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&check(&payload));
    out.extend_from_slice(&payload);
    out
}

/// The whole records at the start of `bytes`, and how many bytes they take. Reading stops
/// at the first record that is cut short, too large, fails its check or does not decode.
pub(super) fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if header[4..] != check(payload) {
            break;
        }
        let Ok(record) = postcard::from_bytes::<Record>(payload) else {
            break;
        };
        records.push(record);
        at += HEADER + len;
    }
    (records, at)
}

/// The journal's directory and its numbered files (`<n>.log`, one written at a time).
#[derive(Debug)]
pub(super) struct Files {
    dir: PathBuf,
}

impl Files {
    /// The journal in `dir` (created if missing, and then made durable in its parent, so a
    /// power cut cannot take the directory with records already acknowledged).
    pub(super) fn open(dir: &Path) -> std::io::Result<Self> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(parent)?.sync_all()?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The numbers of the journal files present, ascending.
    pub(super) fn list(&self) -> std::io::Result<Vec<u64>> {
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        Ok(numbers)
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:020}.log"))
    }

    /// Every whole record of file `n`.
    pub(super) fn read(&self, n: u64) -> std::io::Result<Vec<Record>> {
        let mut bytes = Vec::new();
        File::open(self.path(n))?.read_to_end(&mut bytes)?;
        Ok(decode_all(&bytes).0)
    }

    /// Creates file `n` with [`CHUNK`] bytes of zeros written and synced, and makes its
    /// name durable. Returns it and its size.
    pub(super) fn create(&self, n: u64) -> std::io::Result<(File, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(self.path(n))?;
        grow(&file, 0, CHUNK)?;
        file.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        Ok((file, CHUNK))
    }

    /// Deletes file `n`.
    pub(super) fn remove(&self, n: u64) -> std::io::Result<()> {
        std::fs::remove_file(self.path(n))
    }
}

/// How much a journal file grows at a time. Its blocks are written (zeros) ahead of the
/// records, so that syncing a record does not also have to record a new file size or newly
/// allocated blocks (under two writers that made each `fdatasync` ~1.5x slower here).
pub(super) const CHUNK: u64 = 4 * 1024 * 1024;

/// Writes zeros from `from` to `to`.
fn grow(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = zeros.len().min((to - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `bytes` at `len`, the end of the records in `file` (which is `size` bytes long,
/// grown first if needed). Zeros follow the last record, and a record that failed half
/// way is overwritten by the next: reading stops at either.
pub(super) fn append(file: &File, len: u64, size: &mut u64, bytes: &[u8]) -> std::io::Result<()> {
    let end = len + bytes.len() as u64;
    if end > *size {
        let to = end.div_ceil(CHUNK) * CHUNK;
        grow(file, *size, to)?;
        *size = to;
    }
    file.write_all_at(bytes, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(seq: u64, n: usize) -> Record {
        Record {
            seq,
            ops: (0..n)
                .map(|i| Op {
                    tree: format!("t{i}"),
                    key: vec![i as u8; i + 1],
                    value: (i % 3 != 0).then(|| vec![seq as u8; 10 * i]),
                })
                .collect(),
        }
    }

    #[test]
    fn a_borrowed_record_encodes_like_the_owned_one() {
        let r = record(7, 4);
        let ops: Vec<OpRef<'_>> = r
            .ops
            .iter()
            .map(|o| OpRef {
                tree: &o.tree,
                key: &o.key,
                value: o.value.as_deref(),
            })
            .collect();
        assert_eq!(encode_ref(7, &ops), encode(&r));
    }

    #[test]
    fn records_read_back_in_order() {
        let records: Vec<Record> = (1..=5).map(|s| record(s, s as usize)).collect();
        let bytes: Vec<u8> = records.iter().flat_map(encode).collect();
        assert_eq!(decode_all(&bytes), (records, bytes.len()));
    }

    #[test]
    fn a_flipped_bit_ends_the_journal_there() {
        let a = encode(&record(1, 2));
        let b = encode(&record(2, 3));
        let mut bytes = [a.clone(), b].concat();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(decode_all(&bytes), (vec![record(1, 2)], a.len()));
        // A length beyond the limit is not trusted either.
        let mut huge = a.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_all(&huge), (Vec::new(), 0));
    }

    proptest! {
        /// A journal cut anywhere reads as the records entirely before the cut.
        #[test]
        fn a_cut_journal_reads_as_its_whole_records(sizes in prop::collection::vec(0usize..6, 1..8), cut in any::<prop::sample::Index>()) {
            let records: Vec<Record> = sizes.iter().enumerate().map(|(i, n)| record(i as u64 + 1, *n)).collect();
            let frames: Vec<Vec<u8>> = records.iter().map(encode).collect();
            let bytes = frames.concat();
            let cut = cut.index(bytes.len() + 1);
            let (got, used) = decode_all(&bytes[..cut]);
            let mut end = 0;
            let mut whole = 0;
            for f in &frames {
                if end + f.len() > cut {
                    break;
                }
                end += f.len();
                whole += 1;
            }
            prop_assert_eq!(used, end);
            prop_assert_eq!(got, records[..whole].to_vec());
        }
    }

    #[test]
    fn files_are_listed_in_order_and_a_failed_append_leaves_no_torn_record() {
        let tmp = tempfile::tempdir().unwrap();
        let files = Files::open(&tmp.path().join("j")).unwrap();
        let (f2, mut size) = files.create(2).unwrap();
        files.create(10).unwrap();
        files.create(1).unwrap();
        assert_eq!(files.list().unwrap(), vec![1, 2, 10]);
        assert_eq!(size, CHUNK);
        let a = encode(&record(1, 2));
        append(&f2, 0, &mut size, &a).unwrap();
        append(&f2, a.len() as u64, &mut size, &encode(&record(2, 1))).unwrap();
        assert_eq!(files.read(2).unwrap(), vec![record(1, 2), record(2, 1)]);
        // A record past the end of the file grows it by whole chunks.
        let big = Record {
            seq: 3,
            ops: vec![Op {
                tree: "t".into(),
                key: vec![1],
                value: Some(vec![7; CHUNK as usize]),
            }],
        };
        let at = (a.len() + encode(&record(2, 1)).len()) as u64;
        append(&f2, at, &mut size, &encode(&big)).unwrap();
        assert_eq!(size, 2 * CHUNK);
        assert_eq!(f2.metadata().unwrap().len(), 2 * CHUNK);
        assert_eq!(files.read(2).unwrap().len(), 3);
        // A record that failed half way (here: cut short) ends the journal, and the next
        // record, written at the same place, takes its place.
        let end = at + encode(&big).len() as u64;
        let c = encode(&record(4, 5));
        f2.write_all_at(&c[..c.len() / 2], end).unwrap();
        assert_eq!(files.read(2).unwrap().len(), 3);
        append(&f2, end, &mut size, &encode(&record(4, 1))).unwrap();
        assert_eq!(files.read(2).unwrap()[3], record(4, 1));
        files.remove(10).unwrap();
        assert_eq!(files.list().unwrap(), vec![1, 2]);
    }
}
