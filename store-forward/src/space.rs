//! Free disk space kept in reserve, for a sled database: sled 0.34 does not recover from
//! running out of space (it stops writing, data flushed just before can be lost on the next
//! open, and a failed write can leave every later flush waiting forever), so both the
//! relay's mailbox and the node's store keep it away from a full disk with a [`SpaceGuard`].

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How often free space is measured at most while little is written.
const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Free space a batch needs beyond twice its size when it is measured afresh
/// ([`SpaceGuard::check_fresh`]): sled's log and page rewrites.
const FRESH_MARGIN: u64 = 1 << 20;

/// A write refused for lack of space: the last measurement and the reserve, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Free space last measured.
    pub free: u64,
    /// The reserve kept.
    pub reserve: u64,
}

/// Refuses writes while free disk space is below a reserve. Measures with `statvfs` at
/// most every 50 ms, or sooner when the bytes counted since the last measurement could
/// have eaten half the headroom above the reserve. A failed measurement keeps the last one
/// (none yet counts as a full disk).
#[derive(Debug)]
pub struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    checked: Option<Instant>,
    free: u64,
    written: u64,
    /// What the disk reports in tests ([`SpaceGuard::pretend_free`]).
    pretended: Option<u64>,
}

impl SpaceGuard {
    /// Guards the disk holding `dir`, keeping `reserve` bytes free.
    pub fn new(dir: &Path, reserve: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            reserve,
            checked: None,
            free: 0,
            written: 0,
            pretended: None,
        }
    }

    /// The directory whose disk is guarded.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Changes the reserve (the next check measures again).
    pub fn set_reserve(&mut self, reserve: u64) {
        self.reserve = reserve;
        self.checked = None;
    }

    /// Counts a write of `incoming` bytes, refusing it if it would eat into the reserve.
    /// sled writes more than the payload (log headers, page rewrites): it counts as
    /// 2 × `incoming` + 4,096 bytes.
    pub fn check(&mut self, incoming: u64) -> Result<(), Full> {
        let incoming = incoming.saturating_mul(2).saturating_add(4096);
        let stale = self.checked.is_none_or(|t| t.elapsed() >= CHECK_INTERVAL);
        let headroom = self.free.saturating_sub(self.reserve);
        if stale || self.written.saturating_add(incoming) > headroom / 2 {
            self.measure();
        }
        if self.free
            < self
                .reserve
                .saturating_add(self.written)
                .saturating_add(incoming)
        {
            return Err(self.full());
        }
        self.written = self.written.saturating_add(incoming);
        Ok(())
    }

    /// Refuses a batch of `bytes` unless the disk has room for twice that plus 1 MiB,
    /// measured afresh: for writes counted earlier that sled gets only now (the disk may
    /// have filled meanwhile, by another program too). It may use the reserve: that is
    /// what the reserve is kept for.
    pub fn check_fresh(&mut self, bytes: u64) -> Result<(), Full> {
        self.measure();
        if self.free < bytes.saturating_mul(2).saturating_add(FRESH_MARGIN) {
            return Err(self.full());
        }
        Ok(())
    }

    /// The refusal, with the last measurement.
    pub fn full(&self) -> Full {
        Full {
            free: self.free,
            reserve: self.reserve,
        }
    }

    /// Makes the disk report `free` bytes from now on (`None`: the real figure), measured
    /// at the next check. For tests of what a full disk does.
    #[doc(hidden)]
    pub fn pretend_free(&mut self, free: Option<u64>) {
        self.pretended = free;
        self.checked = None;
    }

    /// Measures free space (`statvfs`); keeps the last figure if it cannot.
    fn measure(&mut self) {
        let measured = match self.pretended {
            Some(free) => Some(free),
            None => nix::sys::statvfs::statvfs(&self.dir).ok().map(|s| {
                #[allow(clippy::useless_conversion)] // the block count is u32 on some platforms
                let blocks = u64::from(s.blocks_available());
                blocks.saturating_mul(s.fragment_size())
            }),
        };
        if let Some(free) = measured {
            self.free = free;
            self.checked = Some(Instant::now());
            self.written = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_would_eat_into_the_reserve_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = SpaceGuard::new(dir.path(), 1 << 20);
        g.pretend_free(Some(3 << 20));
        // Counted as 2 × its size + 4 KiB: 1,804 KiB fit above the reserve, 2,052 do not.
        g.check(900 << 10).unwrap();
        let full = g.check(1 << 20).unwrap_err();
        assert_eq!(
            full,
            Full {
                free: 3 << 20,
                reserve: 1 << 20
            }
        );
    }

    #[test]
    fn a_fresh_check_measures_now_and_may_use_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = SpaceGuard::new(dir.path(), 64 << 20);
        g.pretend_free(Some(3 << 20));
        assert!(g.check(1).is_err(), "below the reserve");
        g.check_fresh(1 << 20).unwrap();
        g.pretend_free(Some((3 << 20) - 1));
        assert!(g.check_fresh(1 << 20).is_err(), "2 × 1 MiB + 1 MiB");
        assert!(g.check_fresh(0).is_ok());
    }
}
