//! Wire types of one-to-one messaging: message ids, the envelope carried by `/tern/msg/1`
//! (and, later, by relays), the request/response frames, and the encrypted content.
//!
//! Everything is postcard with an explicit version byte first, so a newer Tern can keep
//! reading older frames. Decoders never trust lengths: the frame codec caps the frame size
//! before allocation, and these types re-check the limits that matter (text size).
//! The formats are documented in docs/PROTOCOL.md.

use serde::{Deserialize, Serialize};

/// Largest text message, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Largest `/tern/msg/1` request frame (a 64 KiB text plus encryption and envelope
/// overhead); the transport enforces it.
pub use crate::net::MSG_MAX_REQUEST as MAX_REQUEST_FRAME;
/// Largest `/tern/msg/1` response frame.
pub use crate::net::MSG_MAX_RESPONSE as MAX_RESPONSE_FRAME;
/// Most envelopes in one [`Request::DeliverBatch`].
pub const MAX_BATCH_ENVELOPES: usize = 64;
/// Most envelope bytes a sender packs into one [`Request::DeliverBatch`] (the frame limit,
/// [`MAX_REQUEST_FRAME`], leaves room for the framing).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Version byte of [`Envelope`], [`Request`], [`Response`] and [`Plaintext`].
pub const WIRE_VERSION: u8 = 1;

/// Errors decoding wire data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The bytes are not a valid frame of this kind.
    #[error("malformed {what}: {message}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Decoder message.
        message: String,
    },
    /// Made by a newer Tern.
    #[error("unsupported {what} version {got} (this Tern speaks {WIRE_VERSION})")]
    Version {
        /// What was being decoded.
        what: &'static str,
        /// The version found.
        got: u8,
    },
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    out.extend(postcard::to_stdvec(value).expect("wire types always serialize"));
    out
}

fn decode<'a, T: Deserialize<'a>>(what: &'static str, bytes: &'a [u8]) -> Result<T, WireError> {
    match bytes.split_first() {
        None => Err(WireError::Malformed {
            what,
            message: "empty".into(),
        }),
        Some((&WIRE_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| WireError::Malformed {
                what,
                message: e.to_string(),
            })
        }
        Some((&got, _)) => Err(WireError::Version { what, got }),
    }
}

/// A message id: 6 bytes of milliseconds since the epoch, a 2-byte counter and 8 random
/// bytes. Ids from one sender sort in the order they were made.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MsgId(pub [u8; 16]);

impl MsgId {
    /// The milliseconds part.
    pub fn millis(&self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.0[..6]);
        u64::from_be_bytes(b)
    }

    /// An id that sorts just before this one (its millisecond and counter one step back,
    /// `random` as its tail), or `None` for the very first. For an envelope that must go
    /// before queued ones whose ids are older than now.
    pub fn just_before(&self, random: [u8; 8]) -> Option<Self> {
        let counter = u16::from_be_bytes([self.0[6], self.0[7]]);
        let (ms, counter) = match counter.checked_sub(1) {
            Some(c) => (self.millis(), c),
            None => (self.millis().checked_sub(1)?, u16::MAX),
        };
        let mut id = [0u8; 16];
        id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        id[6..8].copy_from_slice(&counter.to_be_bytes());
        id[8..].copy_from_slice(&random);
        Some(Self(id))
    }

    /// Lowercase hex (32 characters), as shown to users and the API.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// Parses the hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl std::fmt::Debug for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MsgId({})", self.to_hex())
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Makes strictly increasing [`MsgId`]s for one node.
#[derive(Debug, Default)]
pub struct MsgIdGen {
    last_ms: u64,
    counter: u16,
}

impl MsgIdGen {
    /// The next id at wall-clock `now_ms`, with `random` filling the tail.
    pub fn next(&mut self, now_ms: u64, random: [u8; 8]) -> MsgId {
        let ms = now_ms.max(self.last_ms);
        if ms == self.last_ms {
            if self.counter == u16::MAX {
                // 65,536 ids in one millisecond: borrow the next millisecond.
                self.last_ms += 1;
                self.counter = 0;
            } else {
                self.counter += 1;
            }
        } else {
            self.last_ms = ms;
            self.counter = 0;
        }
        let mut id = [0u8; 16];
        id[..6].copy_from_slice(&self.last_ms.to_be_bytes()[2..]);
        id[6..8].copy_from_slice(&self.counter.to_be_bytes());
        id[8..].copy_from_slice(&random);
        MsgId(id)
    }
}

/// What travels between nodes (and through relays): an id, the two ends, and the
/// end-to-end ciphertext. Only the recipient can read `ciphertext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id; the recipient deduplicates on it.
    pub id: MsgId,
    /// The sender's ed25519 public key (its peer id's key).
    pub sender: [u8; 32],
    /// The recipient's ed25519 public key.
    pub recipient: [u8; 32],
    /// A `crypto::session::Message` encoding (postcard writes it as a length and the bytes
    /// either way; as bytes it is copied at once rather than byte by byte).
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl Envelope {
    /// The associated data bound into the ciphertext: a label, the id and both ends, so
    /// nobody can move a ciphertext under another id or between conversations.
    pub fn associated_data(id: &MsgId, sender: &[u8; 32], recipient: &[u8; 32]) -> Vec<u8> {
        let mut ad = Vec::with_capacity(16 + 16 + 64);
        ad.extend_from_slice(b"tern/msg/1 env\0");
        ad.extend_from_slice(&id.0);
        ad.extend_from_slice(sender);
        ad.extend_from_slice(recipient);
        ad
    }

    /// Encodes with the version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and checks the version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode("envelope", bytes)
    }
}

/// A `/tern/msg/1` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Store this envelope (a message, receipt or profile) durably, then answer.
    Deliver(Envelope),
    /// An ephemeral envelope (typing): process if possible, never store, never retry.
    Ephemeral(Envelope),
    /// Store these envelopes (1 ..= [`MAX_BATCH_ENVELOPES`], each judged on its own), then
    /// answer [`Response::Batch`] with one answer per envelope, in order. Added after the
    /// first release: a recipient from before answers `Rejected(0, Malformed)`, and the
    /// sender then sends one envelope per request.
    DeliverBatch(Vec<Envelope>),
    /// Like [`Request::DeliverBatch`], answered [`Response::Receipted`]: the answers plus
    /// the recipient's encrypted `delivered` receipt for the text messages among them, in
    /// the same frame (one round trip instead of two, and the recipient queues nothing).
    /// A recipient from before answers `Rejected(0, Malformed)`; the sender then falls
    /// back to [`Request::DeliverBatch`].
    DeliverReceipted(Vec<Envelope>),
    /// Like [`Request::DeliverBatch`], answered [`Response::Batch`] in which each text
    /// message the recipient decrypted and durably stored (now, or before for a repeat) is
    /// answered [`Answer::Delivered`] instead of [`Answer::Stored`]: the `delivered`
    /// receipt is the answer itself, authenticated by the connection (its Noise handshake
    /// binds it to the recipient's identity key), so it costs no ratchet step and no second
    /// message. A recipient from before answers `Rejected(0, Malformed)`; the sender then
    /// falls back to [`Request::DeliverReceipted`].
    DeliverConfirmed(Vec<Envelope>),
}

impl Request {
    /// Encodes with the version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and checks the version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode("request", bytes)
    }
}

/// Why a recipient refused an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The request did not decode.
    Malformed,
    /// The envelope was addressed to someone else, or its sender is not the connection's peer.
    WrongParty,
    /// The ciphertext did not decrypt (no session, bad tag, unknown prekey).
    Undecryptable,
    /// Too many envelopes from this peer; try later.
    RateLimited,
    /// The recipient could not store it (for example a full disk); try later.
    Unavailable,
    /// Its session is valid but it is further ahead of the messages decrypted so far than
    /// the recipient skips at once (earlier ones are still on their way); try later.
    TooEarly,
}

impl RejectReason {
    /// Whether the sender should retry later (the same envelope may succeed).
    pub fn is_transient(self) -> bool {
        matches!(self, Self::RateLimited | Self::Unavailable | Self::TooEarly)
    }
}

/// A `/tern/msg/1` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Durably stored (or already stored before: duplicates are acknowledged again).
    Stored(MsgId),
    /// Processed without storing (ephemeral).
    Seen(MsgId),
    /// Refused.
    Rejected(MsgId, RejectReason),
    /// The answers to a [`Request::DeliverBatch`], one per envelope, in order.
    Batch(Vec<Answer>),
    /// The answers to a [`Request::DeliverReceipted`], one per envelope, in order, and an
    /// envelope from the recipient to the sender carrying a `delivered` receipt for the text
    /// messages it holds among them (`None` when there are none). The receipt is end-to-end
    /// encrypted like any envelope; the sender processes it as if it had been delivered to
    /// it, and does not answer it.
    Receipted(Vec<Answer>, Option<Envelope>),
    /// Stored and decrypted by the recipient: only ever inside the answers to a
    /// [`Request::DeliverConfirmed`], never a response on its own.
    Delivered(MsgId),
}

/// The answer to one envelope of a [`Request::DeliverBatch`] (its own type, so a batch
/// answer cannot nest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Durably stored (or already stored before).
    Stored(MsgId),
    /// Refused.
    Rejected(MsgId, RejectReason),
    /// A text message decrypted and durably stored by the recipient (or before): its
    /// `delivered` receipt. Only in answers to a [`Request::DeliverConfirmed`].
    Delivered(MsgId),
}

impl Answer {
    /// The id of the envelope it answers.
    pub fn id(&self) -> MsgId {
        match self {
            Answer::Stored(id) | Answer::Rejected(id, _) | Answer::Delivered(id) => *id,
        }
    }
}

impl From<Answer> for Response {
    fn from(a: Answer) -> Self {
        match a {
            Answer::Stored(id) => Response::Stored(id),
            Answer::Rejected(id, reason) => Response::Rejected(id, reason),
            Answer::Delivered(id) => Response::Delivered(id),
        }
    }
}

impl Response {
    /// Encodes with the version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and checks the version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode("response", bytes)
    }
}

/// Receipt kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptKind {
    /// The recipient's node stored the message.
    Delivered,
    /// The recipient's user saw the message.
    Read,
}

/// What is inside the ciphertext. `Debug` shows no text and no key: only their sizes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// A text message.
    Text {
        /// The text (at most [`MAX_TEXT_BYTES`]).
        text: String,
        /// Sender's wall clock, ms since the epoch.
        sent_at: u64,
    },
    /// Receipts for earlier messages.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MsgId>,
    },
    /// Typing state (ephemeral).
    Typing {
        /// Whether the sender is typing.
        typing: bool,
    },
    /// The sender's display name and addresses, sent when a session starts.
    Profile {
        /// Display name.
        name: Option<String>,
        /// Dialable multiaddrs (binary form).
        addrs: Vec<Vec<u8>>,
    },
    /// The key that opens the sender's presence frames; `None`: it stopped sharing its
    /// presence with us (or we were removed), forget the old key.
    PresenceKey {
        /// The 32-byte key.
        key: Option<[u8; 32]>,
    },
    /// The sender's current mailbox capability and home relays (sent when it rotates its
    /// token, which revokes the old one for everyone else).
    MailboxToken {
        /// The token to deposit with.
        token: [u8; 32],
        /// The sender's home relays (binary multiaddrs with `/p2p/`).
        relays: Vec<Vec<u8>>,
    },
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Text { text, sent_at } => f
                .debug_struct("Text")
                .field("text_bytes", &text.len())
                .field("sent_at", sent_at)
                .finish(),
            Content::Receipt { kind, ids } => f
                .debug_struct("Receipt")
                .field("kind", kind)
                .field("ids", ids)
                .finish(),
            Content::Typing { typing } => f.debug_struct("Typing").field("typing", typing).finish(),
            Content::Profile { name, addrs } => f
                .debug_struct("Profile")
                .field("name", name)
                .field("addrs", &addrs.len())
                .finish(),
            Content::PresenceKey { key } => f
                .debug_struct("PresenceKey")
                .field("key", &key.map(|_| "<secret>"))
                .finish(),
            Content::MailboxToken { relays, .. } => f
                .debug_struct("MailboxToken")
                .field("token", &"<secret>")
                .field("relays", &relays.len())
                .finish(),
        }
    }
}

/// The plaintext of an envelope: versioned [`Content`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plaintext(pub Content);

impl Plaintext {
    /// Encodes with the version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(&self.0)
    }

    /// Decodes, checking the version and the text limit.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let content: Content = decode("plaintext", bytes)?;
        if let Content::Text { text, .. } = &content
            && text.len() > MAX_TEXT_BYTES
        {
            return Err(WireError::Malformed {
                what: "plaintext",
                message: format!("text of {} bytes exceeds {MAX_TEXT_BYTES}", text.len()),
            });
        }
        Ok(Self(content))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_just_before_another_sorts_before_it_and_after_anything_older() {
        let mut ids = MsgIdGen::default();
        let a = ids.next(1_000, [0xff; 8]);
        let b = ids.next(1_000, [0; 8]);
        let c = ids.next(1_001, [0; 8]);
        // Same millisecond: one counter step back, whatever the tail.
        let before_b = b.just_before([0xff; 8]).unwrap();
        assert!(a <= before_b && before_b < b);
        // A new millisecond: the previous one's last counter.
        let before_c = c.just_before([0; 8]).unwrap();
        assert!(b < before_c && before_c < c);
        assert_eq!(before_c.millis(), 1_000);
        assert_eq!(MsgId([0; 16]).just_before([1; 8]), None);
    }

    #[test]
    fn ids_are_strictly_increasing_even_within_a_millisecond() {
        let mut g = MsgIdGen::default();
        let mut prev = g.next(1_000, [0xff; 8]);
        for i in 0..70_000u64 {
            // The clock even goes backwards once.
            let now = if i == 500 { 10 } else { 1_000 + i / 1000 };
            let id = g.next(now, [(i % 256) as u8; 8]);
            assert!(id > prev, "{i}");
            prev = id;
        }
        assert_eq!(MsgId::from_hex(&prev.to_hex()), Some(prev));
        assert_eq!(g.next(5_000_000, [0; 8]).millis(), 5_000_000);
    }

    #[test]
    fn debug_shows_no_text_and_no_key() {
        for (content, secret) in [
            (
                Content::Text {
                    text: "meet at the old mill".into(),
                    sent_at: 1,
                },
                "old mill",
            ),
            (
                Content::PresenceKey {
                    key: Some([0x5a; 32]),
                },
                "90, 90",
            ),
            (
                Content::MailboxToken {
                    token: [0x5a; 32],
                    relays: Vec::new(),
                },
                "90, 90",
            ),
        ] {
            let shown = format!("{content:?}");
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let env = Envelope {
            id: MsgId([7; 16]),
            sender: [1; 32],
            recipient: [2; 32],
            ciphertext: vec![9; 40],
        };
        let req = Request::Deliver(env.clone());
        assert_eq!(Request::from_bytes(&req.to_bytes()).unwrap(), req);
        assert_eq!(Envelope::from_bytes(&env.to_bytes()).unwrap(), env);
        let resp = Response::Rejected(MsgId([1; 16]), RejectReason::RateLimited);
        assert_eq!(Response::from_bytes(&resp.to_bytes()).unwrap(), resp);

        assert!(matches!(
            Request::from_bytes(&[]),
            Err(WireError::Malformed { .. })
        ));
        assert!(matches!(
            Request::from_bytes(&[9, 0, 0]),
            Err(WireError::Version { got: 9, .. })
        ));
        assert!(Request::from_bytes(&[1, 200, 1, 2, 3]).is_err());
        let mut truncated = req.to_bytes();
        truncated.truncate(truncated.len() - 5);
        assert!(Request::from_bytes(&truncated).is_err());
    }

    #[test]
    fn a_full_batch_and_its_answers_fit_their_frames() {
        let env = |i: u8| Envelope {
            id: MsgId([i; 16]),
            sender: [1; 32],
            recipient: [2; 32],
            ciphertext: vec![9; MAX_BATCH_BYTES / MAX_BATCH_ENVELOPES],
        };
        let req = Request::DeliverBatch((0..MAX_BATCH_ENVELOPES as u8).map(env).collect());
        let bytes = req.to_bytes();
        assert!(bytes.len() <= MAX_REQUEST_FRAME, "{}", bytes.len());
        assert_eq!(Request::from_bytes(&bytes).unwrap(), req);
        let answers: Vec<Answer> = (0..MAX_BATCH_ENVELOPES as u8)
            .map(|i| Answer::Rejected(MsgId([i; 16]), RejectReason::Unavailable))
            .collect();
        let resp = Response::Batch(answers.clone());
        let bytes = resp.to_bytes();
        assert!(bytes.len() <= MAX_RESPONSE_FRAME, "{}", bytes.len());
        assert_eq!(Response::from_bytes(&bytes).unwrap(), resp);
        // With a receipt for every one of them: the receipt's plaintext is a list of
        // 16-byte ids, sealed by the ratchet (a header of 32 + 4 + 4 bytes and a 16-byte
        // tag), well under 2 KiB of ciphertext.
        let receipt = Plaintext(Content::Receipt {
            kind: ReceiptKind::Delivered,
            ids: (0..MAX_BATCH_ENVELOPES as u8)
                .map(|i| MsgId([i; 16]))
                .collect(),
        })
        .to_bytes();
        assert!(receipt.len() < 1100, "{}", receipt.len());
        let resp = Response::Receipted(
            answers,
            Some(Envelope {
                id: MsgId([7; 16]),
                sender: [2; 32],
                recipient: [1; 32],
                ciphertext: vec![9; 2048],
            }),
        );
        let bytes = resp.to_bytes();
        assert!(bytes.len() <= MAX_RESPONSE_FRAME, "{}", bytes.len());
        assert_eq!(Response::from_bytes(&bytes).unwrap(), resp);
    }

    #[test]
    fn oversize_text_is_refused_on_decode() {
        let big = Plaintext(Content::Text {
            text: "x".repeat(MAX_TEXT_BYTES + 1),
            sent_at: 0,
        });
        assert!(Plaintext::from_bytes(&big.to_bytes()).is_err());
        let ok = Plaintext(Content::Text {
            text: "x".repeat(MAX_TEXT_BYTES),
            sent_at: 0,
        });
        assert_eq!(Plaintext::from_bytes(&ok.to_bytes()).unwrap(), ok);
    }
}
