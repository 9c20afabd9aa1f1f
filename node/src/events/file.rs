//! The event log on disk: one JSON line per event, appended to `events.log` with a single
//! `write` each, so appending costs one system call rather than a store transaction.
//!
//! The file is not flushed: like any write that no flush covers, the newest lines can be
//! lost in a power loss (the `seq` reservation in the store keeps a lost `seq` from being
//! reused). Opening reads every line, keeps an index of `(seq, offset)` and cuts the file
//! at the first line that is torn, garbled or out of order, so appends continue after the
//! last good line. Once the file holds twice the cap, the newest `cap` lines are copied to
//! a new file that replaces it: each line is copied about once, whatever the cap.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// What opening needs from a line.
#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The append-only file and its index.
pub(crate) struct EventFile {
    path: PathBuf,
    file: File,
    /// Length of the whole lines; appends go here.
    end: u64,
    /// `(seq, offset of its line)`, oldest first.
    index: VecDeque<(u64, u64)>,
    cap: usize,
}

impl EventFile {
    /// Opens (or creates) the log at `path`, keeping at least the newest `cap` events.
    pub(crate) fn open(path: &Path, cap: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let (index, end) = scan(BufReader::new(&file))?;
        if end < len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = len - end,
                "event log ends in a torn or garbled line; cut after the last good one"
            );
            file.set_len(end)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            end,
            index,
            cap: cap.max(1),
        })
    }

    /// The `seq` of the newest event in the file.
    pub(crate) fn last_seq(&self) -> Option<u64> {
        self.index.back().map(|(s, _)| *s)
    }

    /// How many events the file holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Appends `json` (one event, no newline in it) as the line of `seq`, which must be
    /// above every stored `seq`. On an error nothing of the line stays in the file.
    pub(crate) fn append(&mut self, seq: u64, json: &str) -> io::Result<()> {
        if self.last_seq().is_some_and(|last| seq <= last) || json.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "event out of order or not a single line",
            ));
        }
        let mut line = Vec::with_capacity(json.len() + 1);
        line.extend_from_slice(json.as_bytes());
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            // A partial line would garble the next one: cut it off.
            let _ = self.file.set_len(self.end);
            return Err(e);
        }
        self.index.push_back((seq, self.end));
        self.end += line.len() as u64;
        if self.index.len() > 2 * self.cap {
            self.compact()?;
        }
        Ok(())
    }

    /// The lines of the (at most `limit`) oldest events with `seq > since`, oldest first.
    pub(crate) fn read_after(&self, since: u64, limit: usize) -> io::Result<Vec<String>> {
        let first = self.index.partition_point(|(s, _)| *s <= since);
        let Some(&(_, from)) = self.index.get(first) else {
            return Ok(Vec::new());
        };
        let to = self
            .index
            .get(first.saturating_add(limit))
            .map_or(self.end, |(_, offset)| *offset);
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = vec![0; (to - from) as usize];
        file.read_exact(&mut bytes)?;
        Ok(bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect())
    }

    /// Replaces the file by one holding its newest `cap` lines.
    fn compact(&mut self) -> io::Result<()> {
        let drop = self.index.len().saturating_sub(self.cap);
        let Some(&(_, keep_from)) = self.index.get(drop) else {
            return Ok(());
        };
        let mut reader = File::open(&self.path)?;
        reader.seek(SeekFrom::Start(keep_from))?;
        let tmp = self.path.with_extension("log.tmp");
        // Copied through a small buffer: the kept lines may be large (texts up to 64 KiB).
        let copied = io::copy(
            &mut reader.take(self.end - keep_from),
            &mut File::create(&tmp)?,
        )?;
        if copied != self.end - keep_from {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "event log shorter than its index",
            ));
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)?;
        self.index.drain(..drop);
        for (_, offset) in &mut self.index {
            *offset -= keep_from;
        }
        self.end -= keep_from;
        Ok(())
    }
}

/// Indexes the whole lines read from `reader` (one at a time, so the file is never held
/// in memory) up to the first bad one; returns the index and the length of the good part.
fn scan(mut reader: impl BufRead) -> io::Result<(VecDeque<(u64, u64)>, u64)> {
    let mut index = VecDeque::new();
    let mut at = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        // End of file, or a last line without its newline (torn).
        if line.last() != Some(&b'\n') {
            break;
        }
        let Ok(SeqOnly { seq }) = serde_json::from_slice(&line[..n - 1]) else {
            break;
        };
        if index.back().is_some_and(|(last, _)| seq <= *last) {
            break;
        }
        index.push_back((seq, at));
        at += n as u64;
    }
    Ok((index, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> String {
        format!(r#"{{"seq":{seq},"timestamp":1,"type":"shuttingDown"}}"#)
    }

    fn seqs(lines: &[String]) -> Vec<u64> {
        lines
            .iter()
            .map(|l| serde_json::from_str::<SeqOnly>(l).unwrap().seq)
            .collect()
    }

    #[test]
    fn appends_survive_reopen_and_read_after_skips_older_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        {
            let mut f = EventFile::open(&path, 100).unwrap();
            for s in 1..=5 {
                f.append(s, &line(s)).unwrap();
            }
            assert_eq!(seqs(&f.read_after(2, 100).unwrap()), vec![3, 4, 5]);
            assert_eq!(seqs(&f.read_after(1, 2).unwrap()), vec![2, 3]);
        }
        let mut f = EventFile::open(&path, 100).unwrap();
        assert_eq!(f.last_seq(), Some(5));
        assert_eq!(seqs(&f.read_after(0, 100).unwrap()), vec![1, 2, 3, 4, 5]);
        assert!(f.read_after(5, 100).unwrap().is_empty());
        f.append(6, &line(6)).unwrap();
        assert_eq!(seqs(&f.read_after(4, 100).unwrap()), vec![5, 6]);
    }

    #[test]
    fn a_torn_or_garbled_tail_is_cut_and_appends_continue_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        for tail in [
            b"{\"seq\":3,\"tim".to_vec(),
            vec![0u8; 300],
            b"not json\n{\"seq\":9}\n".to_vec(),
            format!("{}\n", line(1)).into_bytes(),
        ] {
            {
                let mut f = EventFile::open(&path, 100).unwrap();
                f.append(1, &line(1)).unwrap();
                f.append(2, &line(2)).unwrap();
            }
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.extend_from_slice(&tail);
            std::fs::write(&path, &bytes).unwrap();
            let mut f = EventFile::open(&path, 100).unwrap();
            assert_eq!(f.last_seq(), Some(2));
            f.append(3, &line(3)).unwrap();
            drop(f);
            let f = EventFile::open(&path, 100).unwrap();
            assert_eq!(seqs(&f.read_after(0, 100).unwrap()), vec![1, 2, 3]);
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn out_of_order_or_multi_line_events_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = EventFile::open(&tmp.path().join("events.log"), 100).unwrap();
        f.append(5, &line(5)).unwrap();
        assert!(f.append(5, &line(5)).is_err());
        assert!(f.append(4, &line(4)).is_err());
        assert!(f.append(6, "{\n}").is_err());
        assert_eq!(seqs(&f.read_after(0, 100).unwrap()), vec![5]);
    }

    #[test]
    fn compaction_keeps_the_newest_cap_events_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("events.log");
        let mut f = EventFile::open(&path, 10).unwrap();
        for s in 1..=21 {
            f.append(s, &line(s)).unwrap();
        }
        // The 21st append went past twice the cap: 12..=21 are kept.
        assert_eq!(f.len(), 10);
        assert_eq!(
            seqs(&f.read_after(0, 100).unwrap()),
            (12..=21).collect::<Vec<_>>()
        );
        f.append(22, &line(22)).unwrap();
        drop(f);
        let f = EventFile::open(&path, 10).unwrap();
        assert_eq!(
            seqs(&f.read_after(15, 100).unwrap()),
            (16..=22).collect::<Vec<_>>()
        );
        assert!(!path.with_extension("log.tmp").exists());
    }
}
