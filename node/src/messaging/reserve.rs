//! Sending before the flush: sending-chain positions reserved durably ahead, so that an
//! envelope may leave while the state that sealed it is still being made durable.
//!
//! An envelope must never leave unless a crash cannot make the next start seal another
//! message with the same message key. Waiting for the flush that stores the advanced
//! ratchet guarantees that, at the price of an `fdatasync` before every lone message
//! leaves. A reservation guarantees it too: `(chain, until)` is stored durably (in the
//! `send_reserved` table, with the session write of an earlier batch), and then envelopes
//! sealed on that chain at indexes below `until` may leave at once. After a crash the start
//! moves every session whose sending chain is a reserved one on to `until`
//! ([`crate::crypto::Session::skip_sending_to`]) before anything is sealed, so whatever
//! left at a position whose state was lost, no later message uses that position again (the
//! recipient skips it, as it skips a lost message). A clean stop clears the reservations
//! after its last flush, so a normal restart skips nothing.
//!
//! Only positions of the chain the reservation names are covered: the first messages of a
//! new chain (a new session, or our turn after the peer's new ratchet key) wait for their
//! flush as before, because a chain that is lost in a crash cannot be rebuilt the same way
//! (it starts from a fresh random key pair). So do messages beyond `until`.
//!
//! Pure: the actor reports what it wrote and when flushes start and end.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::db::PeerKey;
use crate::crypto::ChainPosition;

/// How far ahead positions are reserved. A crash makes the recipient skip at most this
/// many message keys per chain (kept in its session until they are evicted), so it is
/// small; a reservation is renewed when less than half of it is left.
pub const RESERVE: u32 = 16;

/// A durable promise about one peer's sending chain: positions before `until` may have
/// been used by envelopes whose state was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The chain's ratchet public key.
    pub chain: [u8; 32],
    /// The first index not covered.
    pub until: u32,
}

impl Reservation {
    /// The position a restart moves the chain on to.
    pub fn position(&self) -> ChainPosition {
        ChainPosition {
            ratchet_key: self.chain,
            index: self.until,
        }
    }
}

/// Which reservations are durable, and which are written by the batch being flushed and
/// by the current one.
///
/// At a crash the journal keeps some prefix of its records: at least everything before the
/// last flush that ended, maybe more. So a reservation is relied on only once its flush
/// ended, and only while nothing written after it for the same peer could replace it on
/// disk (the table holds one entry per peer): no reservation of another chain may have been
/// written since, not even one that a later write for the same chain replaced again.
#[derive(Debug, Default)]
pub struct Reservations {
    durable: HashMap<PeerKey, Reservation>,
    flushing: HashMap<PeerKey, Pending>,
    current: HashMap<PeerKey, Pending>,
}

/// What one batch wrote for a peer: the last reservation, and whether it also wrote one of
/// another chain before it.
#[derive(Debug, Clone, Copy)]
struct Pending {
    latest: Reservation,
    mixed: bool,
}

impl Pending {
    /// Whether this batch's writes leave `chain`'s durable reservation standing.
    fn keeps(&self, chain: &[u8; 32]) -> bool {
        !self.mixed && self.latest.chain == *chain
    }

    /// `later` was written after `self`: what the two together wrote.
    fn then(self, later: Pending) -> Pending {
        Pending {
            latest: later.latest,
            mixed: self.mixed || later.mixed || self.latest.chain != later.latest.chain,
        }
    }
}

impl Reservations {
    /// Whether the envelopes just sealed for `peer`, from position `first` up to `next`
    /// (excluded), may leave before their flush: a durable reservation of that chain covers
    /// them, and no reservation of another chain was written since. (The table holds one
    /// reservation per peer: a newer one, once durable, replaces it on disk, and the
    /// envelopes must not rely on the one it replaces. Envelopes sealed earlier in the same
    /// call on another chain are not covered: that chain ended, so `next` names another.)
    pub fn covers(&self, peer: &PeerKey, first: &ChainPosition, next: &ChainPosition) -> bool {
        let chain = &next.ratchet_key;
        first.ratchet_key == *chain
            && [&self.flushing, &self.current]
                .iter()
                .all(|batch| batch.get(peer).is_none_or(|p| p.keeps(chain)))
            && self
                .durable
                .get(peer)
                .is_some_and(|r| r.chain == *chain && next.index <= r.until)
    }

    /// The reservation written last for `peer`, durable or not.
    fn latest(&self, peer: &PeerKey) -> Option<&Reservation> {
        self.current
            .get(peer)
            .or_else(|| self.flushing.get(peer))
            .map(|p| &p.latest)
            .or_else(|| self.durable.get(peer))
    }

    /// The reservation to write with envelopes sealed up to `next` (excluded), if the
    /// latest one written for `peer` is for another chain or has less than half of
    /// [`RESERVE`] left.
    pub fn renewal(&self, peer: &PeerKey, next: &ChainPosition) -> Option<Reservation> {
        match self.latest(peer) {
            Some(r)
                if r.chain == next.ratchet_key
                    && r.until >= next.index.saturating_add(RESERVE / 2) =>
            {
                None
            }
            _ => Some(Reservation {
                chain: next.ratchet_key,
                until: next.index.saturating_add(RESERVE),
            }),
        }
    }

    /// `reservation` for `peer` was committed in the current batch.
    pub fn written(&mut self, peer: PeerKey, reservation: Reservation) {
        let new = Pending {
            latest: reservation,
            mixed: false,
        };
        let merged = self.current.get(&peer).map_or(new, |p| p.then(new));
        self.current.insert(peer, merged);
    }

    /// The current batch's flush starts (the previous one ended).
    pub fn flush_started(&mut self) {
        debug_assert!(self.flushing.is_empty(), "one flush at a time");
        self.flushing = std::mem::take(&mut self.current);
    }

    /// The running flush ended. If it failed its reservations are not durable yet, but
    /// they were written and a later flush may make them durable: they stay pending with
    /// the current batch's (which are newer, and win).
    pub fn flush_done(&mut self, ok: bool) {
        let batch = std::mem::take(&mut self.flushing);
        if ok {
            // On disk each peer's entry is what the batch wrote last.
            self.durable
                .extend(batch.into_iter().map(|(peer, p)| (peer, p.latest)));
        } else {
            for (peer, failed) in batch {
                let merged = self.current.get(&peer).map_or(failed, |c| failed.then(*c));
                self.current.insert(peer, merged);
            }
        }
    }

    /// Whether no reservation is known: none written, being flushed or durable.
    pub fn is_empty(&self) -> bool {
        self.durable.is_empty() && self.flushing.is_empty() && self.current.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: PeerKey = [1; 32];

    fn at(chain: u8, index: u32) -> ChainPosition {
        ChainPosition {
            ratchet_key: [chain; 32],
            index,
        }
    }

    fn reserve(r: &mut Reservations, chain: u8, index: u32) {
        let new = r.renewal(&PEER, &at(chain, index)).unwrap();
        r.written(PEER, new);
    }

    fn flush(r: &mut Reservations, ok: bool) {
        r.flush_started();
        r.flush_done(ok);
    }

    #[test]
    fn only_a_durable_reservation_of_the_same_chain_covers_envelopes() {
        let mut r = Reservations::default();
        // Nothing reserved yet: the first envelopes wait, and a reservation is written.
        assert!(!r.covers(&PEER, &at(9, 0), &at(9, 1)));
        let first = r.renewal(&PEER, &at(9, 1)).unwrap();
        assert_eq!(first.until, 1 + RESERVE);
        r.written(PEER, first);
        // Written, not durable: still no.
        assert!(!r.covers(&PEER, &at(9, 1), &at(9, 2)));
        assert_eq!(
            r.renewal(&PEER, &at(9, 2)),
            None,
            "the pending one is enough"
        );
        r.flush_started();
        assert!(!r.covers(&PEER, &at(9, 1), &at(9, 2)));
        r.flush_done(true);
        // Durable: positions below `until` go at once, the one at `until` does not.
        assert!(r.covers(&PEER, &at(9, 1), &at(9, 2)));
        assert!(r.covers(&PEER, &at(9, 1), &at(9, 1 + RESERVE)));
        assert!(!r.covers(&PEER, &at(9, 1), &at(9, 2 + RESERVE)));
        // Another chain (the peer's turn ended ours), or a call that crossed chains: no.
        assert!(!r.covers(&PEER, &at(8, 0), &at(8, 1)));
        assert!(!r.covers(&PEER, &at(9, 3), &at(8, 1)));
        assert!(!r.covers(&[2; 32], &at(9, 1), &at(9, 2)));
    }

    #[test]
    fn a_reservation_is_renewed_at_half_and_on_a_new_chain() {
        let mut r = Reservations::default();
        r.written(
            PEER,
            Reservation {
                chain: [9; 32],
                until: 20,
            },
        );
        assert_eq!(r.renewal(&PEER, &at(9, 20 - RESERVE / 2)), None);
        assert_eq!(
            r.renewal(&PEER, &at(9, 21 - RESERVE / 2)),
            Some(Reservation {
                chain: [9; 32],
                until: 21 - RESERVE / 2 + RESERVE
            })
        );
        assert_eq!(
            r.renewal(&PEER, &at(7, 0)),
            Some(Reservation {
                chain: [7; 32],
                until: RESERVE
            })
        );
        // Near the end of the index space nothing overflows.
        assert_eq!(r.renewal(&PEER, &at(9, u32::MAX)).unwrap().until, u32::MAX);
    }

    #[test]
    fn a_failed_flush_makes_nothing_durable() {
        let mut r = Reservations::default();
        reserve(&mut r, 9, 1);
        r.flush_started();
        // The next batch writes nothing more while that one is flushed.
        assert_eq!(r.renewal(&PEER, &at(9, 2)), None);
        r.flush_done(false);
        assert!(!r.covers(&PEER, &at(9, 1), &at(9, 2)));
        // Still pending (a later flush may make it durable): not written again, and the
        // next successful flush makes it durable.
        assert_eq!(r.renewal(&PEER, &at(9, 2)), None);
        flush(&mut r, true);
        assert!(r.covers(&PEER, &at(9, 1), &at(9, 2)));
        assert!(!r.is_empty());
    }

    #[test]
    fn a_newer_reservation_of_another_chain_ends_the_cover_of_the_durable_one() {
        let mut r = Reservations::default();
        reserve(&mut r, 1, 1);
        flush(&mut r, true);
        assert!(r.covers(&PEER, &at(1, 1), &at(1, 2)));
        // Another session's chain (a new session, or a previous one made current again)
        // writes its reservation: chain 1 is no longer covered, even before that is durable,
        // because on disk it replaces chain 1's.
        reserve(&mut r, 2, 1);
        assert!(!r.covers(&PEER, &at(1, 2), &at(1, 3)));
        r.flush_started();
        assert!(!r.covers(&PEER, &at(1, 2), &at(1, 3)));
        assert!(!r.covers(&PEER, &at(2, 1), &at(2, 2)), "not durable yet");
        r.flush_done(true);
        assert!(!r.covers(&PEER, &at(1, 2), &at(1, 3)));
        assert!(r.covers(&PEER, &at(2, 1), &at(2, 2)));
        // Back on chain 1: it needs a reservation of its own again.
        assert!(r.renewal(&PEER, &at(1, 3)).is_some());
    }

    #[test]
    fn another_chain_written_in_between_is_never_hidden_by_a_later_write() {
        // Chain 1 durable; then, in one batch, chain 2 and chain 1 again (a previous
        // session made current again): the disk may end up holding chain 2's, so chain 1
        // is not covered until that batch is durable.
        let mut r = Reservations::default();
        reserve(&mut r, 1, 1);
        flush(&mut r, true);
        reserve(&mut r, 2, 1);
        reserve(&mut r, 1, 5);
        assert!(!r.covers(&PEER, &at(1, 5), &at(1, 6)));
        r.flush_started();
        assert!(!r.covers(&PEER, &at(1, 5), &at(1, 6)));
        r.flush_done(true);
        assert!(
            r.covers(&PEER, &at(1, 5), &at(1, 6)),
            "chain 1's is last on disk"
        );

        // The same across two batches: chain 2 being flushed, chain 1 in the current one.
        reserve(&mut r, 2, 9);
        r.flush_started();
        reserve(&mut r, 1, 9);
        assert!(!r.covers(&PEER, &at(1, 9), &at(1, 10)));
        // That flush fails: its write may still reach the disk, before the current one's.
        r.flush_done(false);
        assert!(!r.covers(&PEER, &at(1, 9), &at(1, 10)));
        flush(&mut r, true);
        assert!(r.covers(&PEER, &at(1, 9), &at(1, 10)));

        // A failed batch of the same chain only, followed by a renewal: still covered once
        // durable, and never mixed up with another chain.
        reserve(&mut r, 1, 18);
        flush(&mut r, false);
        assert_eq!(r.renewal(&PEER, &at(1, 18)), None, "still pending");
        flush(&mut r, true);
        assert!(r.covers(&PEER, &at(1, 18), &at(1, 19)));
    }
}
