//! The node's event stream: every observable change gets a monotonically increasing `seq`,
//! is kept in the event log file ([`file`]; so a client can resume with `since`, even
//! across daemon restarts) and is broadcast to live subscribers.
//!
//! Invariants: `seq` strictly increases and is never reused, even after a power loss that
//! takes the newest events with it (they were broadcast, so a client may have seen their
//! `seq`): the counter resumes after the last stored event and never below a durable
//! reservation, which is moved [`SEQ_RESERVATION`] ahead (and flushed) before a `seq`
//! beyond it is handed out; a crash leaves a gap, never a reuse. [`EventBus::subscribe`]
//! returns the backlog after `since` and a live receiver with no gap and no duplicate
//! between the two. The log keeps at least the newest [`EVENT_LOG_CAP`] events.

mod file;

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::{Store, StoreError, Table};

use self::file::EventFile;

/// How many events the log keeps for resuming, at least (up to twice as many between two
/// compactions of its file).
pub const EVENT_LOG_CAP: usize = 10_000;
/// How many `seq`s one durable reservation covers (one flush per this many events).
pub const SEQ_RESERVATION: u64 = 10_000;
/// Key of the reservation in the `event_seq` table: every `seq` handed out is below it.
const RESERVED_KEY: &[u8] = b"reserved";
/// Live subscriber buffer; a subscriber that lags more is told to resume with `since` (one
/// turn of the messaging task can publish more: 512 texts answered `Delivered` are 1,024
/// receipts). Kept small because it holds whole events (a `message` carries up to 64 KiB).
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// One event, as delivered to API subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the node's event log; strictly increasing.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the event happened.
    pub timestamp: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Serialized with a `type` tag in camelCase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum EventKind {
    /// The node listens on a new address.
    Listening {
        /// The address.
        address: String,
    },
    /// A connection to a peer was established (first connection to that peer).
    PeerConnected {
        /// The peer.
        peer_id: String,
        /// The remote address of the connection.
        address: String,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer_id: String,
    },
    /// mDNS found a peer on the local network.
    PeerDiscovered {
        /// The peer.
        peer_id: String,
        /// Its advertised addresses.
        addresses: Vec<String>,
    },
    /// A ping round trip to a peer succeeded.
    Ping {
        /// The peer.
        peer_id: String,
        /// Round-trip time in milliseconds.
        rtt_ms: f64,
    },
    /// A configured relay could not be reached (the node keeps retrying).
    RelayUnreachable {
        /// The relay address.
        address: String,
        /// Why.
        error: String,
    },
    /// A contact was added (by ticket, or from a stranger's first message).
    ContactAdded {
        /// Its local name.
        name: String,
        /// Its peer id.
        peer_id: String,
        /// Added from an incoming message (a message request).
        auto_added: bool,
    },
    /// A message arrived (it is durably stored).
    Message {
        /// Message id (hex).
        id: String,
        /// Sender's peer id.
        peer_id: String,
        /// Sender's contact name.
        from: String,
        /// The text.
        text: String,
        /// Sender's clock when sent, ms since the epoch (the event's own `timestamp` is
        /// when it arrived).
        sent_at: u64,
    },
    /// An outgoing message moved on: `sent`, `delivered` or `read`.
    Receipt {
        /// Message id (hex).
        id: String,
        /// Recipient's peer id.
        peer_id: String,
        /// Recipient's contact name.
        to: String,
        /// The new state.
        state: String,
    },
    /// A contact started or stopped typing.
    Typing {
        /// The contact's peer id.
        peer_id: String,
        /// The contact's name.
        from: String,
        /// Typing or not.
        typing: bool,
    },
    /// An outgoing message cannot be delivered.
    MessageFailed {
        /// Message id (hex).
        id: String,
        /// Recipient's peer id.
        peer_id: String,
        /// Recipient's contact name.
        to: String,
        /// Why.
        reason: String,
    },
    /// A contact's presence changed (online, away, offline).
    PresenceChanged {
        /// The contact's peer id.
        peer_id: String,
        /// The contact's name.
        name: String,
        /// `online`, `away` or `offline`.
        state: String,
        /// When we last saw them online or away, ms since the epoch.
        last_seen: Option<u64>,
    },
    /// The node is shutting down.
    ShuttingDown,
}

impl EventKind {
    /// Whether the event log keeps it for subscribers that resume with `since`. Typing is
    /// never stored (it is ephemeral by design), and neither are the network's events,
    /// which any peer can cause at will (connecting, pinging, answering mDNS) and which
    /// would otherwise push the messages out of the log, nor presence changes (a contact
    /// can change state twice a second; `presence` answers the current state).
    pub fn is_logged(&self) -> bool {
        !matches!(
            self,
            EventKind::Typing { .. }
                | EventKind::PeerConnected { .. }
                | EventKind::PeerDisconnected { .. }
                | EventKind::PeerDiscovered { .. }
                | EventKind::Ping { .. }
                | EventKind::PresenceChanged { .. }
        )
    }
}

struct Inner {
    next_seq: u64,
    /// Durable bound: every `seq` handed out is below it.
    reserved: u64,
    reservation: Table<u64>,
    store: Store,
    log: EventFile,
    tx: broadcast::Sender<Event>,
}

impl Inner {
    /// Gives `kind` the next `seq` and sends it to live subscribers (a subscription is
    /// made under the bus's lock, so none sees the log and the live channel out of step).
    fn broadcast(&mut self, kind: EventKind) -> Event {
        if self.next_seq >= self.reserved {
            // Make the next block of `seq`s durable before handing out the first of it. If
            // that fails the event still goes out; the reservation is retried next time.
            let reserved = self.next_seq.saturating_add(SEQ_RESERVATION);
            match self
                .reservation
                .insert(RESERVED_KEY, &reserved)
                .and_then(|()| self.store.flush_blocking().map(drop))
            {
                Ok(()) => self.reserved = reserved,
                Err(e) => tracing::warn!(error = %e, "could not reserve event sequence numbers"),
            }
        }
        let event = Event {
            seq: self.next_seq,
            timestamp: now_ms(),
            kind,
        };
        self.next_seq += 1;
        let _ = self.tx.send(event.clone());
        event
    }

    /// Appends `event` to the log (after live subscribers got it), unless it is of a kind
    /// the log does not keep ([`EventKind::is_logged`]).
    fn record(&mut self, event: &Event) {
        if !event.kind.is_logged() {
            return;
        }
        match serde_json::to_string(event) {
            Ok(json) => {
                if let Err(e) = self.log.append(event.seq, &json) {
                    tracing::warn!(error = %e, "could not store event; live subscribers still get it")
                }
            }
            Err(e) => tracing::warn!(error = %e, "event does not serialize"),
        }
    }
}

/// Cheap handle to the event log and broadcast.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").finish_non_exhaustive()
    }
}

/// A subscription: the stored backlog after `since`, then live events.
#[derive(Debug)]
pub struct Subscription {
    /// Events after `since` that were already in the log, oldest first.
    pub backlog: Vec<Event>,
    /// Live events, all with `seq` greater than the backlog's.
    pub live: broadcast::Receiver<Event>,
}

impl EventBus {
    /// Opens the log file at `log_path` (its `seq` reservation lives in `store`) and
    /// restores the counter: after the last stored event and not below the durable
    /// reservation (events past the last flush may be gone, but a client may have seen
    /// their `seq`). Events an older version kept in the store's `events` table move to the
    /// file.
    pub fn open(store: &Store, log_path: &Path) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| io_error(log_path, e);
        let mut log = EventFile::open(log_path, EVENT_LOG_CAP).map_err(io)?;
        let old: Table<String> = store.table("events")?;
        if !old.is_empty()? {
            for (key, json) in old.scan_from(&[], usize::MAX)? {
                if let Some(seq) = seq_of(&key)
                    && log.last_seq().is_none_or(|last| seq > last)
                {
                    log.append(seq, &json).map_err(io)?;
                }
            }
            old.remove_first(usize::MAX)?;
        }
        let reservation: Table<u64> = store.table("event_seq")?;
        let after_log = log.last_seq().map_or(1, |s| s + 1);
        let next_seq = after_log.max(reservation.get(RESERVED_KEY)?.unwrap_or(1));
        let reserved = next_seq.saturating_add(SEQ_RESERVATION);
        reservation.insert(RESERVED_KEY, &reserved)?;
        store.flush_blocking()?;
        let (tx, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                next_seq,
                reserved,
                reservation,
                store: store.clone(),
                log,
                tx,
            })),
        })
    }

    /// Records and broadcasts an event; returns it with its `seq`.
    pub fn publish(&self, kind: EventKind) -> Event {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let event = inner.broadcast(kind);
        inner.record(&event);
        event
    }

    /// Publishes `kinds` in order: all reach live subscribers before any is written to the
    /// log, so the last does not wait for the others' writes.
    pub fn publish_all(&self, kinds: Vec<EventKind>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let events: Vec<Event> = kinds.into_iter().map(|k| inner.broadcast(k)).collect();
        for event in &events {
            inner.record(event);
        }
    }

    /// On a clean stop: pulls the reservation back to the next `seq` (made durable by the
    /// caller's final flush, after the last event), so the next start continues without a
    /// gap. Events published after this move the reservation ahead again.
    pub fn seal(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let next = inner.next_seq;
        match inner.reservation.insert(RESERVED_KEY, &next) {
            Ok(()) => inner.reserved = next,
            Err(e) => tracing::warn!(error = %e, "could not seal the event sequence"),
        }
    }

    /// Subscribes, returning stored events with `seq > since` and a live receiver.
    pub fn subscribe(&self, since: Option<u64>) -> Result<Subscription, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let live = inner.tx.subscribe();
        let backlog = match since {
            None => Vec::new(),
            Some(since) => inner
                .log
                .read_after(since, EVENT_LOG_CAP)
                .map_err(|e| io_error(Path::new("events.log"), e))?
                .iter()
                .filter_map(|json| serde_json::from_str(json).ok())
                .collect(),
        };
        Ok(Subscription { backlog, live })
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq
    }
}

/// An I/O error of the event log file, as a store error naming the file.
fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Db(sled::Error::Io(std::io::Error::new(
        e.kind(),
        format!("event log {}: {e}", path.display()),
    )))
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event the log keeps.
    fn logged(n: u32) -> EventKind {
        EventKind::ContactAdded {
            name: format!("c{n}"),
            peer_id: format!("p{n}"),
            auto_added: false,
        }
    }

    #[tokio::test]
    async fn ephemeral_events_go_out_live_but_never_into_the_log() {
        let store = Store::temporary().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&store, &tmp.path().join("events.log")).unwrap();
        let mut sub = bus.subscribe(None).unwrap();
        let typing = EventKind::Typing {
            peer_id: "p".into(),
            from: "bob".into(),
            typing: true,
        };
        let ping = EventKind::Ping {
            peer_id: "p".into(),
            rtt_ms: 1.0,
        };
        assert!(!typing.is_logged() && !ping.is_logged() && logged(0).is_logged());
        bus.publish(logged(0));
        bus.publish(typing.clone());
        bus.publish_all(vec![ping.clone(), logged(1)]);
        let mut live = Vec::new();
        for _ in 0..4 {
            let e = sub.live.recv().await.unwrap();
            live.push((e.seq, e.kind));
        }
        assert_eq!(
            live,
            vec![(1, logged(0)), (2, typing), (3, ping), (4, logged(1))]
        );
        let kept: Vec<(u64, EventKind)> = bus
            .subscribe(Some(0))
            .unwrap()
            .backlog
            .into_iter()
            .map(|e| (e.seq, e.kind))
            .collect();
        assert_eq!(kept, vec![(1, logged(0)), (4, logged(1))]);
        let text = std::fs::read_to_string(tmp.path().join("events.log")).unwrap();
        assert!(!text.contains("typing") && !text.contains("ping"), "{text}");
    }

    #[tokio::test]
    async fn seq_increases_and_resume_has_no_gap() {
        let store = Store::temporary().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&store, &tmp.path().join("events.log")).unwrap();
        for n in 0..5 {
            bus.publish(logged(n));
        }
        let mut sub = bus.subscribe(Some(2)).unwrap();
        let seqs: Vec<u64> = sub.backlog.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        bus.publish(logged(9));
        assert_eq!(sub.live.recv().await.unwrap().seq, 6);
    }

    #[tokio::test]
    async fn events_published_together_go_out_and_into_the_log_in_order() {
        let store = Store::temporary().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&store, &tmp.path().join("events.log")).unwrap();
        bus.publish(logged(0));
        let mut sub = bus.subscribe(None).unwrap();
        bus.publish_all(vec![logged(1), logged(2)]);
        bus.publish_all(Vec::new());
        bus.publish(logged(3));
        let mut live = Vec::new();
        for _ in 0..3 {
            let e = sub.live.recv().await.unwrap();
            live.push((e.seq, e.kind));
        }
        assert_eq!(live, vec![(2, logged(1)), (3, logged(2)), (4, logged(3))]);
        let logged: Vec<(u64, EventKind)> = bus
            .subscribe(Some(1))
            .unwrap()
            .backlog
            .into_iter()
            .map(|e| (e.seq, e.kind))
            .collect();
        assert_eq!(logged, live);
    }

    #[test]
    fn counter_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let log = tmp.path().join("events.log");
        {
            let store = Store::open(&path).unwrap();
            let bus = EventBus::open(&store, &log).unwrap();
            bus.publish(EventKind::ShuttingDown);
            bus.publish(EventKind::ShuttingDown);
            bus.seal();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let bus = EventBus::open(&store, &log).unwrap();
        // A clean stop: no gap.
        assert_eq!(bus.publish(EventKind::ShuttingDown).seq, 3);
    }

    #[test]
    fn a_seq_seen_before_a_crash_is_never_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let log = tmp.path().join("events.log");
        {
            let store = Store::open(&path).unwrap();
            let bus = EventBus::open(&store, &log).unwrap();
            assert_eq!(bus.publish(EventKind::ShuttingDown).seq, 1);
            store.flush_blocking().unwrap();
        }
        // A power loss that lost the newest events: the log holds seq 1 only, yet seq 2..=9
        // had been broadcast. Simulated by deleting them after the fact.
        {
            let store = Store::open(&path).unwrap();
            let bus = EventBus::open(&store, &log).unwrap();
            let seen: Vec<u64> = (0..8)
                .map(|_| bus.publish(EventKind::ShuttingDown).seq)
                .collect();
            assert!(seen.iter().all(|s| *s > 1), "{seen:?}");
            store.flush_blocking().unwrap();
            let last_seen = *seen.last().unwrap();
            drop(bus);
            let text = std::fs::read_to_string(&log).unwrap();
            std::fs::write(&log, format!("{}\n", text.lines().next().unwrap())).unwrap();
            let bus = EventBus::open(&store, &log).unwrap();
            assert!(bus.publish(EventKind::ShuttingDown).seq > last_seen);
        }
    }

    #[test]
    fn events_an_older_version_kept_in_the_store_move_to_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let log = tmp.path().join("events.log");
        let store = Store::open(&path).unwrap();
        let old: Table<String> = store.table("events").unwrap();
        for seq in [4u64, 5] {
            let e = Event {
                seq,
                timestamp: 1,
                kind: logged(seq as u32),
            };
            old.insert(&seq.to_be_bytes(), &serde_json::to_string(&e).unwrap())
                .unwrap();
        }
        let bus = EventBus::open(&store, &log).unwrap();
        assert!(old.is_empty().unwrap());
        let seqs: Vec<u64> = bus
            .subscribe(Some(0))
            .unwrap()
            .backlog
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(bus.publish(EventKind::ShuttingDown).seq, 6);
    }

    #[test]
    fn crossing_a_reservation_moves_it_ahead_durably() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let log = tmp.path().join("events.log");
        let store = Store::open(&path).unwrap();
        let bus = EventBus::open(&store, &log).unwrap();
        let reservation: Table<u64> = store.table("event_seq").unwrap();
        let first = reservation.get(RESERVED_KEY).unwrap().unwrap();
        assert_eq!(first, 1 + SEQ_RESERVATION);
        // seq 1 ..= SEQ_RESERVATION are covered; the next one moves the reservation.
        for _ in 0..SEQ_RESERVATION {
            bus.publish(EventKind::ShuttingDown);
        }
        assert_eq!(reservation.get(RESERVED_KEY).unwrap().unwrap(), first);
        bus.publish(EventKind::ShuttingDown);
        let moved = reservation.get(RESERVED_KEY).unwrap().unwrap();
        assert_eq!(moved, first + SEQ_RESERVATION);
        assert_eq!(bus.next_seq(), first + 1);
    }

    #[test]
    fn every_event_kind_round_trips_through_json() {
        let kinds = vec![
            EventKind::Message {
                id: "i".into(),
                peer_id: "p".into(),
                from: "f".into(),
                text: "t".into(),
                sent_at: 5,
            },
            EventKind::Receipt {
                id: "i".into(),
                peer_id: "p".into(),
                to: "t".into(),
                state: "sent".into(),
            },
            EventKind::Typing {
                peer_id: "p".into(),
                from: "f".into(),
                typing: true,
            },
            EventKind::ContactAdded {
                name: "n".into(),
                peer_id: "p".into(),
                auto_added: true,
            },
            EventKind::MessageFailed {
                id: "i".into(),
                peer_id: "p".into(),
                to: "t".into(),
                reason: "r".into(),
            },
            EventKind::PresenceChanged {
                peer_id: "p".into(),
                name: "n".into(),
                state: "away".into(),
                last_seen: Some(9),
            },
            EventKind::ShuttingDown,
        ];
        for kind in kinds {
            let e = Event {
                seq: 1,
                timestamp: 2,
                kind,
            };
            let json = serde_json::to_string(&e).unwrap();
            let back: Event =
                serde_json::from_str(&json).unwrap_or_else(|err| panic!("{json}: {err}"));
            assert_eq!(back, e);
        }
    }

    #[test]
    fn json_shape_is_tagged_camel_case() {
        let e = Event {
            seq: 7,
            timestamp: 1,
            kind: EventKind::PeerDisconnected {
                peer_id: "x".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "peerDisconnected");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["peer_id"], "x");
    }
}
