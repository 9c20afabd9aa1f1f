//! The outbox delivery schedule, as an I/O-free state machine with `now` as an input.
//!
//! Delivery is per peer and in order (head of line): a peer's queue is attempted as a
//! whole, and a failure backs the whole peer off. The backoff is exponential with jitter,
//! bounded by [`RetryPolicy::max`]; a reconnect (or a daemon restart) makes a peer due at
//! once. The caller owns time and randomness, so tests are deterministic.

use std::{collections::HashMap, hash::Hash, time::Duration};

/// Backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure. Default: 1 s.
    pub base: Duration,
    /// Largest delay. Default: 5 min.
    pub max: Duration,
    /// Jitter as a fraction of the delay, in per mille (200 = ±20 %). Default: 200.
    pub jitter_permille: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            jitter_permille: 200,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt number `failures + 1`, with `random` (any u32) choosing the
    /// jitter.
    pub fn delay(&self, failures: u32, random: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.max);
        let span = exp.as_millis() as u64 * u64::from(self.jitter_permille) / 1000;
        if span == 0 {
            return exp;
        }
        let offset = u64::from(random) % (2 * span + 1);
        let ms = (exp.as_millis() as u64 + offset).saturating_sub(span);
        Duration::from_millis(ms).min(self.max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerState<T> {
    failures: u32,
    due: T,
    in_flight: bool,
    /// The last attempt ended because the peer refused for now (its limits, its disk):
    /// hearing from it does not cut the wait short.
    refused: bool,
}

/// Which peers' queues are due for an attempt. `T` is the caller's instant type.
#[derive(Debug)]
pub struct Schedule<P, T> {
    policy: RetryPolicy,
    peers: HashMap<P, PeerState<T>>,
}

impl<P, T> Schedule<P, T>
where
    P: Hash + Eq + Clone,
    T: Copy + Ord + std::ops::Add<Duration, Output = T>,
{
    /// An empty schedule.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            peers: HashMap::new(),
        }
    }

    /// `peer` has queued work: due at once unless it is backing off or in flight.
    pub fn enqueue(&mut self, peer: P, now: T) {
        self.peers.entry(peer).or_insert(PeerState {
            failures: 0,
            due: now,
            in_flight: false,
            refused: false,
        });
    }

    /// `peer` became reachable (connected): retry at once, forgetting the backoff. Not
    /// while an attempt runs: its own connection says nothing new, and how it ends decides.
    pub fn reachable(&mut self, peer: &P, now: T) {
        if let Some(s) = self.peers.get_mut(peer)
            && !s.in_flight
        {
            s.failures = 0;
            s.due = now;
            s.refused = false;
        }
    }

    /// An envelope from `peer` was accepted: a queue for it waiting out its backoff is
    /// tried at once (it can be reached after all: it unblocked us, or its connection
    /// never dropped, so no reconnect says so). Not when the peer itself refused our last
    /// attempt for now ([`Self::refused`]): its limits decide then, and a chatty peer
    /// would otherwise make us resend at its pace. The failure count stays, so a queue
    /// that keeps failing still backs off further on the timer.
    pub fn heard_from(&mut self, peer: &P, now: T) {
        if let Some(s) = self.peers.get_mut(peer)
            && !s.in_flight
            && !s.refused
            && s.due > now
        {
            s.due = now;
        }
    }

    /// The attempt that just [`failed`](Self::failed) or was told to
    /// [`slow_down`](Self::slow_down) ended with the peer refusing for now (`RateLimited`,
    /// `Unavailable`, `TooEarly`).
    pub fn refused(&mut self, peer: &P) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.refused = true;
        }
    }

    /// Peers due at `now` (not in flight); they are marked in flight.
    pub fn take_due(&mut self, now: T) -> Vec<P> {
        let mut due = Vec::new();
        for (peer, s) in &mut self.peers {
            if !s.in_flight && s.due <= now {
                s.in_flight = true;
                due.push(peer.clone());
            }
        }
        due
    }

    /// Whether an attempt runs for any peer.
    pub fn any_in_flight(&self) -> bool {
        self.peers.values().any(|s| s.in_flight)
    }

    /// The attempt for `peer` drained its queue: forget it.
    pub fn done(&mut self, peer: &P) {
        self.peers.remove(peer);
    }

    /// The attempt for `peer` made progress but work remains: due again at once.
    pub fn progressed(&mut self, peer: &P, now: T) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.failures = 0;
            s.in_flight = false;
            s.due = now;
            s.refused = false;
        }
    }

    /// The attempt for `peer` failed: back off. Returns the delay chosen.
    pub fn failed(&mut self, peer: &P, now: T, random: u32) -> Duration {
        let policy = self.policy;
        match self.peers.get_mut(peer) {
            Some(s) => {
                s.failures = s.failures.saturating_add(1);
                s.in_flight = false;
                s.refused = false;
                let delay = policy.delay(s.failures, random);
                s.due = now + delay;
                delay
            }
            None => Duration::ZERO,
        }
    }

    /// The attempt made progress but was told to slow down: retry after the first-step delay
    /// (the backoff does not grow while progress is being made).
    pub fn slow_down(&mut self, peer: &P, now: T, random: u32) -> Duration {
        let policy = self.policy;
        match self.peers.get_mut(peer) {
            Some(s) => {
                s.failures = 1;
                s.in_flight = false;
                s.refused = false;
                let delay = policy.delay(1, random);
                s.due = now + delay;
                delay
            }
            None => Duration::ZERO,
        }
    }

    /// The earliest time something becomes due, if any.
    pub fn next_due(&self) -> Option<T> {
        self.peers
            .values()
            .filter(|s| !s.in_flight)
            .map(|s| s.due)
            .min()
    }

    /// How many peers have queued work.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type T = Duration; // "instants" as offsets from zero

    #[test]
    fn delay_grows_exponentially_with_bounded_jitter() {
        let p = RetryPolicy::default();
        for failures in 1..30 {
            let exact = Duration::from_secs(1)
                .saturating_mul(1 << (failures - 1).min(20))
                .min(p.max);
            for random in [0, 1, 12345, u32::MAX] {
                let d = p.delay(failures, random);
                assert!(d <= p.max, "{failures}: {d:?}");
                assert!(d >= exact.mul_f64(0.8).min(p.max), "{failures}: {d:?}");
                assert!(d <= exact.mul_f64(1.2), "{failures}: {d:?}");
            }
        }
        assert_eq!(
            RetryPolicy {
                jitter_permille: 0,
                ..p
            }
            .delay(3, 99),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn hearing_from_a_peer_ends_its_wait_but_not_its_backoff() {
        let mut s: Schedule<&str, T> = Schedule::new(RetryPolicy {
            jitter_permille: 0,
            ..RetryPolicy::default()
        });
        let t = Duration::from_secs;
        s.enqueue("bob", t(0));
        s.take_due(t(0));
        s.failed(&"bob", t(0), 0);
        s.take_due(t(1));
        assert_eq!(s.failed(&"bob", t(1), 0), t(2));
        // Bob writes to us at 2 s (due at 3 s): tried at once.
        s.heard_from(&"bob", t(2));
        assert_eq!(s.take_due(t(2)), vec!["bob"]);
        // In flight: hearing from it again changes nothing; failing again backs off
        // further (the count was kept).
        s.heard_from(&"bob", t(2));
        assert!(s.take_due(t(2)).is_empty());
        assert_eq!(s.failed(&"bob", t(2), 0), t(4));
        // Someone we queue nothing for.
        s.heard_from(&"carol", t(2));
        assert_eq!(s.take_due(t(6)), vec!["bob"]);
        // Bob refused that attempt for now (his limits): hearing from him changes nothing,
        // until an attempt ends otherwise.
        assert_eq!(s.failed(&"bob", t(6), 0), t(8));
        s.refused(&"bob");
        s.heard_from(&"bob", t(7));
        assert!(s.take_due(t(7)).is_empty());
        assert_eq!(s.take_due(t(14)), vec!["bob"]);
        assert_eq!(s.failed(&"bob", t(14), 0), t(16));
        s.heard_from(&"bob", t(15));
        assert_eq!(s.take_due(t(15)), vec!["bob"]);
    }

    #[test]
    fn a_peer_backs_off_then_reconnect_makes_it_due() {
        let mut s: Schedule<&str, T> = Schedule::new(RetryPolicy {
            jitter_permille: 0,
            ..RetryPolicy::default()
        });
        let t0 = Duration::ZERO;
        s.enqueue("bob", t0);
        assert!(!s.any_in_flight(), "due is not in flight yet");
        assert_eq!(s.take_due(t0), vec!["bob"]);
        assert!(s.any_in_flight());
        assert!(s.take_due(t0).is_empty(), "in flight is not due twice");
        assert_eq!(s.failed(&"bob", t0, 0), Duration::from_secs(1));
        assert!(!s.any_in_flight(), "backing off is not in flight");
        assert!(s.take_due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(s.take_due(t0 + Duration::from_secs(1)), vec!["bob"]);
        assert_eq!(
            s.failed(&"bob", t0 + Duration::from_secs(1), 0),
            Duration::from_secs(2)
        );
        assert_eq!(s.next_due(), Some(Duration::from_secs(3)));
        // Reconnect: due now, backoff forgotten.
        s.reachable(&"bob", Duration::from_secs(2));
        assert_eq!(s.take_due(Duration::from_secs(2)), vec!["bob"]);
        assert_eq!(
            s.failed(&"bob", Duration::from_secs(2), 0),
            Duration::from_secs(1)
        );
        // Enqueue during backoff does not cut the line.
        s.enqueue("bob", Duration::from_secs(2));
        assert!(s.take_due(Duration::from_secs(2)).is_empty());
        s.progressed(&"bob", Duration::from_secs(3));
        assert_eq!(s.take_due(Duration::from_secs(3)), vec!["bob"]);
        s.take_due(Duration::from_secs(3));
        s.failed(&"bob", Duration::from_secs(3), 0);
        s.failed(&"bob", Duration::from_secs(3), 0);
        assert_eq!(
            s.slow_down(&"bob", Duration::from_secs(3), 0),
            Duration::from_secs(1)
        );
        s.done(&"bob");
        assert!(s.is_empty());
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn a_connection_during_an_attempt_does_not_forget_the_backoff() {
        let mut s: Schedule<&str, T> = Schedule::new(RetryPolicy {
            jitter_permille: 0,
            ..RetryPolicy::default()
        });
        let t0 = Duration::ZERO;
        s.enqueue("bob", t0);
        s.take_due(t0);
        s.failed(&"bob", t0, 0);
        let t1 = Duration::from_secs(1);
        assert_eq!(s.take_due(t1), vec!["bob"]);
        // The attempt's own dial connects: nothing new, the backoff grows on.
        s.reachable(&"bob", t1);
        assert_eq!(s.failed(&"bob", t1, 0), Duration::from_secs(2));
        // A connection between attempts still makes it due at once, backoff forgotten.
        s.reachable(&"bob", t1);
        assert_eq!(s.take_due(t1), vec!["bob"]);
        assert_eq!(s.failed(&"bob", t1, 0), Duration::from_secs(1));
    }

    #[test]
    fn peers_are_independent() {
        let mut s: Schedule<u8, T> = Schedule::new(RetryPolicy::default());
        s.enqueue(1, T::ZERO);
        s.enqueue(2, T::ZERO);
        let mut due = s.take_due(T::ZERO);
        due.sort();
        assert_eq!(due, vec![1, 2]);
        s.failed(&1, T::ZERO, 7);
        s.done(&2);
        assert_eq!(s.len(), 1);
        assert!(s.next_due().unwrap() >= Duration::from_millis(800));
    }
}
