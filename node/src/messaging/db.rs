//! The messaging tables and the records in them: contacts, ratchet sessions, the outbox
//! (the message queue), the history (the message store), the dedup set and unread marks.
//!
//! Keys are fixed width so that prefix scans are ordered: a peer is its 32-byte ed25519
//! key, a message its 16-byte [`MsgId`]. Writes that belong together go through
//! [`crate::store::Store::transaction`] in the messaging actor; this module only defines the
//! records and the read helpers.

use serde::{Deserialize, Serialize};

use super::{
    contacts::Contact,
    wire::{MsgId, ReceiptKind},
};
use crate::{
    presence::wire::PresenceKey,
    store::{Store, StoreError, Table},
};

/// A peer's storage key: its ed25519 public key.
pub type PeerKey = [u8; 32];

/// How many superseded sessions are kept per peer (to decrypt late messages after a
/// simultaneous start or a reset).
pub const MAX_PREVIOUS_SESSIONS: usize = 4;

/// A peer's sessions: the one used for sending and recent older ones. The encoded sessions
/// hold their secret keys: `Debug` shows only their sizes.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Encoded `crypto::Session` used to encrypt.
    #[serde(with = "serde_bytes")]
    pub current: Vec<u8>,
    /// Older sessions, newest first.
    pub previous: Vec<Vec<u8>>,
}

/// The encoded sessions hold their secret keys: wiped when the record goes.
impl Drop for SessionRecord {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.current.zeroize();
        for p in &mut self.previous {
            p.zeroize();
        }
    }
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecord")
            .field("current_bytes", &self.current.len())
            .field(
                "previous_bytes",
                &self.previous.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What an outbox item carries, for bookkeeping after it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutKind {
    /// A user's text message (has a history entry).
    Text,
    /// A receipt for these messages.
    Receipt(ReceiptKind),
    /// Our profile (name and addresses).
    Profile,
    /// Our presence key (or its withdrawal).
    PresenceKey,
    /// Our new mailbox token.
    MailboxToken,
}

/// One queued envelope, encrypted once and re-sent as is until acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxItem {
    /// The message id.
    pub id: MsgId,
    /// The recipient.
    pub peer: PeerKey,
    /// The encoded `wire::Envelope`.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// What it is.
    pub kind: OutKind,
    /// When queued, ms since the epoch.
    pub created_at: u64,
    /// When it becomes undeliverable, ms since the epoch.
    pub expires_at: u64,
}

/// The state of a message in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsgState {
    /// Outgoing, durably queued.
    Queued,
    /// Outgoing, durably stored by the recipient's node.
    Sent,
    /// Outgoing, the recipient's node confirmed it (encrypted receipt).
    Delivered,
    /// Outgoing, the recipient read it.
    Read,
    /// Outgoing, could not be delivered.
    Failed(String),
    /// Incoming, not read yet.
    Received,
    /// Incoming, read here.
    Seen,
    /// Outgoing, durably stored by one of the recipient's relays (it is offline).
    Stored,
}

impl MsgState {
    /// The API name of the state.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read | Self::Seen => "read",
            Self::Failed(_) => "failed",
            Self::Received => "received",
            Self::Stored => "stored",
        }
    }

    /// Order of outgoing states (a late "delivered" never overrides "read").
    pub fn rank(&self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Sent => 1,
            Self::Delivered => 2,
            Self::Read => 3,
            Self::Failed(_) => 4,
            Self::Received => 0,
            Self::Seen => 1,
            Self::Stored => 1,
        }
    }
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message id.
    pub id: MsgId,
    /// The other party.
    pub peer: PeerKey,
    /// Sent by us.
    pub outgoing: bool,
    /// The text.
    pub text: String,
    /// The sender's timestamp, ms since the epoch.
    pub timestamp: u64,
    /// The state.
    pub state: MsgState,
}

/// The history key: peer, timestamp, id — so a conversation reads in (timestamp, id) order.
pub fn history_key(peer: &PeerKey, timestamp: u64, id: &MsgId) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + 8 + 16);
    k.extend_from_slice(peer);
    k.extend_from_slice(&timestamp.to_be_bytes());
    k.extend_from_slice(&id.0);
    k
}

/// The outbox (and unread) key: peer then id, so a peer's queue reads in send order.
pub fn peer_id_key(peer: &PeerKey, id: &MsgId) -> Vec<u8> {
    let mut k = Vec::with_capacity(48);
    k.extend_from_slice(peer);
    k.extend_from_slice(&id.0);
    k
}

/// How much of a peer's queue one delivery round takes: at most `items` envelopes, and
/// none after the one that brings their bytes to `bytes` (a round is held in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Most envelopes.
    pub items: usize,
    /// Envelope bytes after which no more are taken.
    pub bytes: usize,
}

impl Round {
    /// Whether `items`, taken with this bound, filled it (so more may be queued after them).
    pub fn filled_by(&self, items: &[OutboxItem]) -> bool {
        items.len() >= self.items
            || items.iter().map(|i| i.envelope.len()).sum::<usize>() >= self.bytes
    }
}

/// Every messaging table.
#[derive(Clone, Debug)]
pub struct MessagingDb {
    /// The store.
    pub store: Store,
    /// Peer key -> contact.
    pub contacts: Table<Contact>,
    /// Name -> peer key.
    pub names: Table<PeerKey>,
    /// Peer key -> sessions.
    pub sessions: Table<SessionRecord>,
    /// "local" -> encoded `crypto::LocalPrekeys`.
    pub prekeys: Table<Vec<u8>>,
    /// Peer key + id -> queued envelope.
    pub outbox: Table<OutboxItem>,
    /// Peer key + timestamp + id -> message.
    pub history: Table<StoredMessage>,
    /// Peer key + id -> history key (ids are only unique per sender, so they are always
    /// looked up together with the peer).
    pub index: Table<Vec<u8>>,
    /// Sender key + id of every accepted inbound envelope -> when it was accepted (dedup).
    pub seen: Table<u64>,
    /// Peer key + id of unread incoming messages.
    pub unread: Table<()>,
    /// Peer key -> the presence key that contact shared with us.
    pub presence_keys: Table<PresenceKey>,
    /// `"self"` -> our own presence key and whether it is shared.
    pub presence_self: Table<OwnPresence>,
    /// `"token"` -> our mailbox token.
    pub mailbox_self: Table<[u8; 32]>,
    /// `"revoked"` -> hashes of our earlier tokens, revoked at every registration.
    pub mailbox_revoked: Table<Vec<[u8; 32]>>,
    /// Peer key -> the relays and token of that contact's mailbox (from its ticket).
    pub contact_mailbox: Table<super::mailbox::ContactMailbox>,
    /// Peer key -> a prekey bundle with a one-time prekey claimed from the contact's relay,
    /// used (and removed) when the first session with it starts.
    pub claimed_prekeys: Table<Vec<u8>>,
    /// Peer key -> the sending-chain positions reserved ahead (envelopes sealed there may
    /// leave before their flush; a start after a crash skips past them).
    pub send_reserved: Table<super::reserve::Reservation>,
    /// Peer key of a contact blocked or removed -> whether it held our presence key and
    /// mailbox token then: a rotation of both is owed until it has run to the end (a full
    /// disk can stop it part-way; it runs again until it completes).
    pub rekey_owed: Table<bool>,
    /// Peer key of a removed contact -> the name it had announced: a message request it
    /// starts later without a profile first (its session with us was never confirmed, so
    /// its node does not know it has to announce itself again) is named from it.
    pub former_names: Table<String>,
    /// Peer keys of blocked contacts the user removed: they stay blocked (nothing from them
    /// is accepted, also not as a message request) until added again, which brings the
    /// contact back blocked.
    pub blocked_peers: Table<()>,
    /// Peer key + id of a text one of the peer's relays holds (state `stored`) -> until when
    /// the relays hold it and when it expires: it fails if no receipt comes by a grace after
    /// the relays drop it, and goes again if the recipient lost the session it was sealed
    /// under.
    pub relay_held: Table<RelayHeld>,
    /// Peer key + id of texts queued again after a relay held them: a relay may still hold
    /// the older envelope under that id, and then answers the new one as a duplicate, which
    /// does not count as stored. Pruned once they left the outbox.
    pub resent: Table<()>,
}

/// A text a relay holds for its offline recipient ([`MessagingDb::relay_held`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHeld {
    /// When the last relay that stored it drops it, ms since the epoch (the relays' clock).
    pub relays_until: u64,
    /// When the message itself expires, ms since the epoch.
    pub expires_at: u64,
}

/// Our presence key and whether our contacts have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnPresence {
    /// The key our frames are sealed with.
    pub key: PresenceKey,
    /// Whether it was sent to our contacts (`share = "contacts"`).
    pub shared: bool,
}

impl MessagingDb {
    /// Opens the tables.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            contacts: store.table("contacts")?,
            names: store.table("contact_names")?,
            sessions: store.table("sessions")?,
            prekeys: store.table("prekeys")?,
            outbox: store.table("outbox")?,
            history: store.table("history")?,
            index: store.table("msg_index")?,
            seen: store.table("seen")?,
            unread: store.table("unread")?,
            presence_keys: store.table("presence_keys")?,
            presence_self: store.table("presence_self")?,
            mailbox_self: store.table("mailbox_self")?,
            mailbox_revoked: store.table("mailbox_revoked")?,
            contact_mailbox: store.table("contact_mailbox")?,
            claimed_prekeys: store.table("claimed_prekeys")?,
            send_reserved: store.table("send_reserved")?,
            rekey_owed: store.table("rekey_owed")?,
            former_names: store.table("former_names")?,
            blocked_peers: store.table("blocked_peers")?,
            relay_held: store.table("relay_held")?,
            resent: store.table("resent")?,
        })
    }

    /// Every contact, sorted by name.
    pub fn contact_list(&self) -> Result<Vec<Contact>, StoreError> {
        let mut all: Vec<Contact> = self
            .contacts
            .scan_prefix(&[])?
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Up to `limit` queued items for `peer`, oldest first.
    pub fn outbox_for(&self, peer: &PeerKey, round: Round) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self
            .outbox
            .scan_weighted(peer, peer, round.items, round.bytes, |i| i.envelope.len())?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// One round of queued items for `peer` that come after `after`, oldest first.
    pub fn outbox_after(
        &self,
        peer: &PeerKey,
        after: &MsgId,
        round: Round,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // Just after the cursor (which may still be queued): the next id up.
        let mut from = peer_id_key(peer, after);
        from.push(0);
        Ok(self
            .outbox
            .scan_weighted(&from, peer, round.items, round.bytes, |i| i.envelope.len())?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Peers with queued items.
    pub fn outbox_peers(&self) -> Result<Vec<PeerKey>, StoreError> {
        let mut peers: Vec<PeerKey> = Vec::new();
        for (k, _) in self.outbox.scan_prefix(&[])? {
            if let Some(p) = k.get(..32).and_then(|s| <PeerKey>::try_from(s).ok())
                && peers.last() != Some(&p)
            {
                peers.push(p);
            }
        }
        Ok(peers)
    }

    /// The history entry of message `id` with `peer`.
    pub fn message(&self, peer: &PeerKey, id: &MsgId) -> Result<Option<StoredMessage>, StoreError> {
        match self.index.get(&peer_id_key(peer, id))? {
            Some(hk) => self.history.get(&hk),
            None => Ok(None),
        }
    }

    /// The last `limit` messages with `peer`, oldest first.
    pub fn history_for(
        &self,
        peer: &PeerKey,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(self
            .history
            .scan_prefix_last(peer, limit)?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(peer: u8, n: u8) -> OutboxItem {
        OutboxItem {
            id: MsgId([n; 16]),
            peer: [peer; 32],
            envelope: vec![n; 8],
            kind: OutKind::Text,
            created_at: 1,
            expires_at: 2,
        }
    }

    #[test]
    fn session_records_show_no_key_bytes() {
        let record = SessionRecord {
            current: vec![0xab; 300],
            previous: vec![vec![0xcd; 200]],
        };
        let shown = format!("{record:?}");
        assert_eq!(
            shown,
            "SessionRecord { current_bytes: 300, previous_bytes: [200] }"
        );
    }

    #[test]
    fn outbox_after_continues_one_peers_queue_past_the_cursor_only() {
        let db = MessagingDb::open(&Store::temporary().unwrap()).unwrap();
        // Peers 1, 2 and 3 each have queued items; the cursor walks peer 2's.
        for peer in [1u8, 2, 3] {
            for n in [10u8, 20, 30, 40] {
                let i = item(peer, n);
                db.outbox.insert(&peer_id_key(&i.peer, &i.id), &i).unwrap();
            }
        }
        let ids = |items: Vec<OutboxItem>| -> Vec<(u8, u8)> {
            items.iter().map(|i| (i.peer[0], i.id.0[0])).collect()
        };
        let p2 = [2u8; 32];
        let items = |n| Round {
            items: n,
            bytes: usize::MAX,
        };
        assert_eq!(
            ids(db.outbox_after(&p2, &MsgId([10; 16]), items(2)).unwrap()),
            [(2, 20), (2, 30)]
        );
        // Never past the peer's own items, and never the cursor itself.
        assert_eq!(
            ids(db.outbox_after(&p2, &MsgId([30; 16]), items(10)).unwrap()),
            [(2, 40)]
        );
        assert!(
            db.outbox_after(&p2, &MsgId([40; 16]), items(10))
                .unwrap()
                .is_empty()
        );
        // A cursor that is no longer queued (answered since) still finds what follows it.
        assert_eq!(
            ids(db.outbox_after(&p2, &MsgId([15; 16]), items(10)).unwrap()),
            [(2, 20), (2, 30), (2, 40)]
        );
        assert_eq!(
            ids(db
                .outbox_after(&[3u8; 32], &MsgId([0; 16]), items(1))
                .unwrap()),
            [(3, 10)]
        );
        // A byte bound: the envelopes here are 8 bytes; the one reaching 20 is the last.
        let bytes = Round {
            items: 100,
            bytes: 20,
        };
        let round = db.outbox_for(&p2, bytes).unwrap();
        assert_eq!(ids(round.clone()), [(2, 10), (2, 20), (2, 30)]);
        assert!(bytes.filled_by(&round));
        assert!(!bytes.filled_by(&round[..2]));
        assert_eq!(
            ids(db.outbox_after(&p2, &MsgId([20; 16]), bytes).unwrap()),
            [(2, 30), (2, 40)]
        );
        assert!(items(2).filled_by(&round[..2]));
    }
}
