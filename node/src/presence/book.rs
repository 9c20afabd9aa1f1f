//! The I/O-free heart of presence: [`Book`] tracks what contacts said (freshness of their
//! sequence numbers, flood limits, offline timeouts) and [`Publisher`] decides when we speak
//! and what we say. Time is always an input (`now_ms`), so every rule has a deterministic
//! test below.

use std::collections::HashMap;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::wire::{Body, State};

/// Shortest heartbeat we believe a contact announces (a faster claim is clamped), and the
/// shortest a node may be configured with: at one frame a second, an owner stays within
/// [`FLOOD_RATE_PER_SEC`] with room for its state changes and announcements.
pub const MIN_HEARTBEAT_MS: u64 = 1_000;
/// Longest heartbeat we believe a contact announces.
pub const MAX_HEARTBEAT_MS: u64 = 3_600_000;
/// Frames one owner may have in flight in a burst before it counts as a flood.
pub const FLOOD_BURST: f64 = 6.0;
/// Frames per second one owner may sustain (state changes and re-announcements to new
/// subscribers come on top of heartbeats).
pub const FLOOD_RATE_PER_SEC: f64 = 2.0;
/// A new subscriber makes us publish at once, but not more often than this.
pub const ANNOUNCE_MIN_GAP_MS: u64 = 1_000;

/// The verdict on a verified frame's sequence number and rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Newer than anything seen: accept and forward.
    Fresh,
    /// The very frame we already accepted (another path): ignore, no penalty.
    Duplicate,
    /// Our own frame coming back: gossipsub never hands a node its own frames while its
    /// duplicate cache holds them, so this is an old one replayed through us, which
    /// contacts would refuse as stale and penalise us for forwarding. Ignore, not forward.
    Own,
    /// Older than what we accepted, by less than [`LATE_MS`]: frames close together can
    /// arrive out of order over two paths; ignore, no penalty for the honest forwarder.
    Late,
    /// Older than what we accepted by [`LATE_MS`] or more (a replay): reject and penalise.
    Stale,
    /// The owner publishes faster than any honest node: ignore (not forwarded). No penalty
    /// for the forwarder, who cannot slow the owner down: each forwarder's own limit passes
    /// a different subset, which may exceed ours together.
    Flood,
}

/// How much older than the newest accepted frame one may be and still count as reordered
/// on the way rather than replayed (sequence numbers are the owner's clock in ms).
pub const LATE_MS: u64 = 10_000;

/// A contact's state as we last learnt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Online, away, offline; `None` while unknown (never heard since we learnt of them).
    pub state: Option<State>,
    /// When we last heard them online or away (ms since the epoch, our clock).
    pub last_seen_ms: Option<u64>,
    /// The highest sequence number accepted from them.
    pub seq: u64,
}

/// A state transition to report (event `presenceChanged`) and persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Whose state changed.
    pub peer: PeerId,
    /// The new state.
    pub state: State,
    /// Last seen, ms since the epoch.
    pub last_seen_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Entry {
    seen: Seen,
    heard_at_ms: u64,
    heartbeat_ms: u64,
    tokens: f64,
    tokens_at_ms: u64,
}

/// What we know about other peers' presence.
#[derive(Debug)]
pub struct Book {
    entries: HashMap<PeerId, Entry>,
    missed_beats: u32,
    /// This node: its own frames are never judged as a contact's.
    own: Option<PeerId>,
}

impl Book {
    /// An empty book; a contact is offline after `missed_beats` missed heartbeats.
    pub fn new(missed_beats: u32) -> Self {
        Self {
            entries: HashMap::new(),
            missed_beats: missed_beats.max(1),
            own: None,
        }
    }

    /// The book of node `me`: frames of `me` are [`Check::Own`].
    pub fn of_node(missed_beats: u32, me: PeerId) -> Self {
        Self {
            own: Some(me),
            ..Self::new(missed_beats)
        }
    }

    /// Restores what was persisted (after a restart everything starts as offline, with its
    /// last seen and its sequence number kept, so old frames stay stale).
    pub fn restore(&mut self, peer: PeerId, seen: Seen) {
        let state = seen.state.map(|_| State::Offline);
        self.entries.insert(
            peer,
            Entry {
                seen: Seen { state, ..seen },
                heard_at_ms: 0,
                heartbeat_ms: MAX_HEARTBEAT_MS,
                tokens: FLOOD_BURST,
                tokens_at_ms: 0,
            },
        );
    }

    /// Forgets a peer (removed or blocked contact).
    pub fn forget(&mut self, peer: &PeerId) {
        self.entries.remove(peer);
    }

    fn entry(&mut self, peer: PeerId, now_ms: u64) -> &mut Entry {
        self.entries.entry(peer).or_insert(Entry {
            seen: Seen {
                state: None,
                last_seen_ms: None,
                seq: 0,
            },
            heard_at_ms: 0,
            heartbeat_ms: MAX_HEARTBEAT_MS,
            tokens: FLOOD_BURST,
            tokens_at_ms: now_ms,
        })
    }

    /// Judges a verified frame from `owner` with sequence number `seq`; records `seq` when
    /// fresh. Runs for every frame, also for owners whose body we cannot open (we still
    /// forward their valid frames to other contacts).
    pub fn check(&mut self, now_ms: u64, owner: PeerId, seq: u64) -> Check {
        if self.own == Some(owner) {
            return Check::Own;
        }
        let e = self.entry(owner, now_ms);
        if seq == e.seen.seq && seq != 0 {
            return Check::Duplicate;
        }
        if seq <= e.seen.seq {
            return if e.seen.seq - seq < LATE_MS {
                Check::Late
            } else {
                Check::Stale
            };
        }
        let elapsed = now_ms.saturating_sub(e.tokens_at_ms) as f64 / 1000.0;
        e.tokens = (e.tokens + elapsed * FLOOD_RATE_PER_SEC).min(FLOOD_BURST);
        e.tokens_at_ms = now_ms;
        if e.tokens < 1.0 {
            return Check::Flood;
        }
        e.tokens -= 1.0;
        e.seen.seq = seq;
        Check::Fresh
    }

    /// Applies an opened body from `owner` (after [`Book::check`] said fresh). Returns the
    /// transition, if the state changed.
    pub fn observe(&mut self, now_ms: u64, owner: PeerId, body: &Body) -> Option<Change> {
        let e = self.entry(owner, now_ms);
        e.heard_at_ms = now_ms;
        e.heartbeat_ms = body.heartbeat_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS);
        // Last seen is our clock: the owner's may be wrong.
        e.seen.last_seen_ms = Some(now_ms);
        let changed = e.seen.state != Some(body.state);
        e.seen.state = Some(body.state);
        changed.then_some(Change {
            peer: owner,
            state: body.state,
            last_seen_ms: e.seen.last_seen_ms,
        })
    }

    /// Marks offline every contact whose heartbeats stopped for `missed_beats` intervals.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        let missed = u64::from(self.missed_beats);
        let mut out = Vec::new();
        for (peer, e) in &mut self.entries {
            let live = matches!(e.seen.state, Some(State::Online | State::Away));
            if live && now_ms.saturating_sub(e.heard_at_ms) > e.heartbeat_ms * missed {
                e.seen.state = Some(State::Offline);
                e.seen.last_seen_ms = Some(e.heard_at_ms);
                out.push(Change {
                    peer: *peer,
                    state: State::Offline,
                    last_seen_ms: Some(e.heard_at_ms),
                });
            }
        }
        out.sort_by_key(|c| c.peer);
        out
    }

    /// What we know about `peer`.
    pub fn get(&self, peer: &PeerId) -> Option<Seen> {
        self.entries.get(peer).map(|e| e.seen)
    }
}

/// Decides when our own presence is published and with which state.
#[derive(Debug)]
pub struct Publisher {
    heartbeat_ms: u64,
    away_after_ms: u64,
    manual: Option<State>,
    last_activity_ms: u64,
    seq: u64,
    next_beat_ms: u64,
    last_published: Option<(State, u64)>,
    announce: bool,
    last_announce_ms: Option<u64>,
}

impl Publisher {
    /// A publisher that beats every `heartbeat_ms` and turns away after `away_after_ms`
    /// without activity (0: never). `now_ms` counts as activity.
    pub fn new(now_ms: u64, heartbeat_ms: u64, away_after_ms: u64) -> Self {
        Self {
            heartbeat_ms,
            away_after_ms,
            manual: None,
            last_activity_ms: now_ms,
            seq: 0,
            next_beat_ms: now_ms,
            last_published: None,
            announce: false,
            last_announce_ms: None,
        }
    }

    /// The state we show now.
    pub fn state(&self, now_ms: u64) -> State {
        match self.manual {
            Some(s) => s,
            None if self.away_after_ms > 0
                && now_ms.saturating_sub(self.last_activity_ms) >= self.away_after_ms =>
            {
                State::Away
            }
            None => State::Online,
        }
    }

    /// The user did something (sent, typed, read).
    pub fn activity(&mut self, now_ms: u64) {
        self.last_activity_ms = now_ms;
    }

    /// The user chose a state: `Away` sticks until `Online`; `Online` returns to automatic
    /// (online, away after idling).
    pub fn set(&mut self, now_ms: u64, state: State) {
        self.last_activity_ms = now_ms;
        self.manual = match state {
            State::Away => Some(State::Away),
            _ => None,
        };
    }

    /// Someone new subscribed to our topic: tell them soon (rate limited).
    pub fn announce(&mut self) {
        self.announce = true;
    }

    /// The heartbeat interval we announce.
    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms
    }

    /// Continues after `seq`, the last sequence number published before (stored across
    /// restarts): contacts keep the highest they accepted, so a clock set back since must
    /// not make our frames look like replays.
    pub fn resume_after(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    fn next_seq(&mut self, now_ms: u64) -> u64 {
        // Milliseconds keep sequence numbers increasing across restarts (the clock only
        // goes back if the user turns it back); +1 keeps them strictly increasing.
        self.seq = now_ms.max(self.seq + 1);
        self.seq
    }

    /// The frame to publish now, if one is due: a heartbeat, a state change, or an
    /// announcement to a new subscriber.
    pub fn due(&mut self, now_ms: u64) -> Option<(u64, Body)> {
        let state = self.state(now_ms);
        let changed = self.last_published.map(|(s, _)| s) != Some(state);
        let beat = now_ms >= self.next_beat_ms;
        let announce = self.announce
            && self
                .last_announce_ms
                .is_none_or(|at| now_ms.saturating_sub(at) >= ANNOUNCE_MIN_GAP_MS);
        if !(changed || beat || announce) {
            return None;
        }
        if announce {
            self.last_announce_ms = Some(now_ms);
        }
        self.announce = false;
        self.next_beat_ms = now_ms + self.heartbeat_ms;
        self.last_published = Some((state, now_ms));
        Some((self.next_seq(now_ms), self.body(state, now_ms)))
    }

    /// The final frame of a graceful shutdown.
    pub fn offline(&mut self, now_ms: u64) -> (u64, Body) {
        self.last_published = Some((State::Offline, now_ms));
        (self.next_seq(now_ms), self.body(State::Offline, now_ms))
    }

    fn body(&self, state: State, now_ms: u64) -> Body {
        Body {
            state,
            heartbeat_ms: self.heartbeat_ms,
            sent_at_ms: now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        crate::identity::Identity::from_seed([n; 32]).peer_id()
    }

    fn body(state: State, heartbeat_ms: u64) -> Body {
        Body {
            state,
            heartbeat_ms,
            sent_at_ms: 0,
        }
    }

    #[test]
    fn sequence_numbers_must_grow() {
        let mut b = Book::new(3);
        let p = peer(1);
        let newest = 100_000;
        assert_eq!(b.check(1_000, p, newest), Check::Fresh);
        assert_eq!(b.check(1_001, p, newest), Check::Duplicate);
        // Reordered on the way (a little older): ignored without penalty.
        assert_eq!(b.check(1_002, p, newest - 1), Check::Late);
        assert_eq!(b.check(1_002, p, newest - LATE_MS + 1), Check::Late);
        // Older than that: a replay.
        assert_eq!(b.check(1_002, p, newest - LATE_MS), Check::Stale);
        assert_eq!(b.check(1_003, p, newest + 1), Check::Fresh);
        assert_eq!(b.check(1_004, p, 0), Check::Stale);
        // Neither moved the newest.
        assert_eq!(b.check(1_005, p, newest + 1), Check::Duplicate);
    }

    #[test]
    fn a_publisher_resumes_after_its_stored_sequence_when_the_clock_went_back() {
        let mut p = Publisher::new(5_000, 1_000, 0);
        p.resume_after(9_000_000);
        let (seq, _) = p.due(5_000).unwrap();
        assert_eq!(seq, 9_000_001, "after the stored one, not the clock");
        let mut p = Publisher::new(20_000_000, 1_000, 0);
        p.resume_after(9_000_000);
        assert_eq!(
            p.due(20_000_000).unwrap().0,
            20_000_000,
            "the clock when ahead"
        );
    }

    #[test]
    fn our_own_frames_are_never_judged_as_a_contacts() {
        let me = peer(9);
        let mut b = Book::of_node(3, me);
        // Any seq, fresh or old: ours coming back is ignored, and records nothing.
        assert_eq!(b.check(1_000, me, 1), Check::Own);
        assert_eq!(b.check(1_000, me, 100_000), Check::Own);
        assert!(b.get(&me).is_none());
        assert_eq!(b.check(1_000, peer(1), 1), Check::Fresh);
    }

    #[test]
    fn flood_is_refused_and_recovers() {
        let mut b = Book::new(3);
        let p = peer(1);
        let burst = FLOOD_BURST as u64;
        for seq in 1..=burst {
            assert_eq!(b.check(5_000, p, seq), Check::Fresh, "seq {seq}");
        }
        assert_eq!(b.check(5_000, p, burst + 1), Check::Flood);
        // A flooded frame is not recorded: the same seq is fresh once tokens return.
        assert_eq!(b.check(5_600, p, burst + 1), Check::Fresh);
        // Another peer is unaffected.
        assert_eq!(b.check(5_000, peer(2), 1), Check::Fresh);
    }

    #[test]
    fn observe_reports_only_transitions() {
        let mut b = Book::new(3);
        let p = peer(1);
        let c = b.observe(1_000, p, &body(State::Online, 1_000)).unwrap();
        assert_eq!(c.state, State::Online);
        assert_eq!(c.last_seen_ms, Some(1_000));
        assert_eq!(b.observe(2_000, p, &body(State::Online, 1_000)), None);
        assert_eq!(b.get(&p).unwrap().last_seen_ms, Some(2_000));
        let c = b.observe(2_500, p, &body(State::Away, 1_000)).unwrap();
        assert_eq!(c.state, State::Away);
        let c = b.observe(3_000, p, &body(State::Offline, 1_000)).unwrap();
        assert_eq!(c.state, State::Offline);
    }

    #[test]
    fn silence_for_missed_beats_means_offline() {
        let mut b = Book::new(3);
        let p = peer(1);
        b.observe(10_000, p, &body(State::Online, 1_000));
        assert!(
            b.tick(13_000).is_empty(),
            "exactly three beats is not yet late"
        );
        let changes = b.tick(13_001);
        assert_eq!(
            changes,
            vec![Change {
                peer: p,
                state: State::Offline,
                last_seen_ms: Some(10_000)
            }]
        );
        assert!(b.tick(20_000).is_empty(), "reported once");
        assert_eq!(b.get(&p).unwrap().state, Some(State::Offline));
    }

    #[test]
    fn announced_heartbeat_is_clamped() {
        let mut b = Book::new(2);
        let p = peer(1);
        b.observe(0, p, &body(State::Online, 1));
        // 1 ms would time out at once; the floor is MIN_HEARTBEAT_MS.
        assert!(b.tick(2 * MIN_HEARTBEAT_MS).is_empty());
        assert_eq!(b.tick(2 * MIN_HEARTBEAT_MS + 1).len(), 1);
    }

    #[test]
    fn restored_peers_start_offline_and_keep_their_sequence() {
        let mut b = Book::new(3);
        let p = peer(1);
        b.restore(
            p,
            Seen {
                state: Some(State::Online),
                last_seen_ms: Some(500),
                seq: 77_000,
            },
        );
        let seen = b.get(&p).unwrap();
        assert_eq!(seen.state, Some(State::Offline));
        assert_eq!(seen.last_seen_ms, Some(500));
        assert_eq!(b.check(1_000, p, 77_000), Check::Duplicate);
        assert_eq!(
            b.check(1_000, p, 50),
            Check::Stale,
            "a replay after restart"
        );
        assert!(b.tick(u64::MAX / 4).is_empty());
    }

    #[test]
    fn publisher_beats_on_time() {
        let mut p = Publisher::new(0, 1_000, 0);
        let (s1, b1) = p.due(0).unwrap();
        assert_eq!(b1.state, State::Online);
        assert_eq!(p.due(999), None);
        let (s2, _) = p.due(1_000).unwrap();
        assert!(s2 > s1);
        assert_eq!(p.due(1_500), None);
    }

    #[test]
    fn publisher_speaks_at_once_on_change_and_announce() {
        let mut p = Publisher::new(0, 10_000, 0);
        p.due(0).unwrap();
        p.set(100, State::Away);
        assert_eq!(p.due(100).unwrap().1.state, State::Away);
        p.set(200, State::Online);
        assert_eq!(p.due(200).unwrap().1.state, State::Online);
        p.announce();
        assert!(p.due(300).is_some(), "a new subscriber hears us at once");
        p.announce();
        assert_eq!(p.due(400), None, "announcements are rate limited");
        assert!(p.due(1_300).is_some(), "and then go out");
        assert_eq!(p.due(1_400), None, "once");
    }

    #[test]
    fn idle_turns_away_and_activity_returns() {
        let mut p = Publisher::new(0, 1_000_000, 5_000);
        assert_eq!(p.due(0).unwrap().1.state, State::Online);
        assert_eq!(p.due(4_999), None);
        assert_eq!(p.due(5_000).unwrap().1.state, State::Away);
        p.activity(6_000);
        assert_eq!(p.due(6_000).unwrap().1.state, State::Online);
    }

    #[test]
    fn sequence_survives_a_clock_standing_still() {
        let mut p = Publisher::new(0, 1, 0);
        let mut last = 0;
        for _ in 0..10 {
            let (seq, _) = p.due(50).unwrap_or_else(|| p.offline(50));
            assert!(seq > last);
            last = seq;
        }
        let (seq, body) = p.offline(10);
        assert!(seq > last);
        assert_eq!(body.state, State::Offline);
    }
}
