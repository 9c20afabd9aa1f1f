//! Wire types of the mailbox protocol `/tern/mailbox/1`: one request frame, one response
//! frame per stream.
//!
//! Every frame is `WIRE_VERSION || postcard(value)`. The node's transport length-prefixes
//! frames and caps them at [`MAX_REQUEST_FRAME`] / [`MAX_RESPONSE_FRAME`] before allocating;
//! the decoders here check those caps again and then the per-field protocol limits (peer id
//! length, list lengths, envelope size), so a garbage frame is a [`WireError`], never a
//! panic or a large allocation. The format is documented in docs/PROTOCOL.md, section
//! "Mailbox protocol /tern/mailbox/1".
//!
//! Compatibility: `Info` gained [`RelayLimits::mailbox_idle_secs`] as a last field;
//! [`Response::from_bytes`] still reads the older 13-field `Info` (as `mailbox_idle_secs:
//! 0`, no idle expiry, which is what those relays do).
//!
//! Secrets: a [`MailboxToken`] is a capability; its `Debug` is redacted and it is zeroed on
//! drop. The relay only ever keeps its [`TokenHash`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::limits::RelayLimits;

/// The libp2p protocol name.
pub const PROTOCOL: &str = "/tern/mailbox/1";
/// Version byte that starts every frame.
pub const WIRE_VERSION: u8 = 1;
/// Largest envelope the protocol carries, whatever a relay's limits say: 96 KiB, the size
/// of the largest `/tern/msg/1` request, so every direct envelope also fits a mailbox.
pub const MAX_ENVELOPE_BYTES: u32 = 96 * 1024;
/// Largest request frame (a largest deposit plus its fields fits with room to spare).
pub const MAX_REQUEST_FRAME: usize = 128 * 1024;
/// Largest response frame: a fetch page is capped by bytes so that it fits.
pub const MAX_RESPONSE_FRAME: usize = 1024 * 1024;
/// Largest fetch page budget a relay may publish (`RelayLimits::fetch_max_bytes`): the
/// response frame less room for the frame header.
pub const MAX_FETCH_BYTES: u32 = (MAX_RESPONSE_FRAME - 1024) as u32;
/// Upper bound of the encoded size of a [`StoredItem`] beyond its envelope bytes (seq,
/// id, sender of at most [`MAX_PEER_BYTES`], two timestamps, length prefixes). Fetch pages
/// are budgeted with it so that a page always fits [`MAX_RESPONSE_FRAME`].
pub const MAX_ITEM_OVERHEAD: u32 = 128;
/// Longest peer id (libp2p `PeerId::to_bytes()` of an ed25519 key is 38 bytes).
pub const MAX_PEER_BYTES: usize = 64;
/// Most token hashes in one `Register.add` or `Register.revoke`.
pub const MAX_TOKENS_PER_REQUEST: usize = 1024;
/// Most ids in one `Ack`.
pub const MAX_ACK_IDS: usize = 4096;
/// Most prekeys in one `PublishPrekeys`.
pub const MAX_PREKEYS_PER_REQUEST: usize = 256;
/// Largest single prekey.
pub const MAX_PREKEY_BYTES: usize = 1024;
/// Longest error message a relay sends.
pub const MAX_ERROR_MESSAGE: usize = 512;

/// A message id, chosen by the sender (the node's `MsgId`). Unique per recipient mailbox.
pub type MessageId = [u8; 16];

/// Errors decoding (or validating) wire data.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The bytes are not a valid frame of this kind.
    #[error("malformed {what}: {message}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Decoder message.
        message: String,
    },
    /// Made by another protocol version.
    #[error("unsupported {what} version {got} (this relay speaks {WIRE_VERSION})")]
    Version {
        /// What was being decoded.
        what: &'static str,
        /// The version found.
        got: u8,
    },
    /// A frame or a field is larger than the protocol allows.
    #[error("{what} of {len} exceeds the protocol limit of {max}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size (bytes or items).
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![WIRE_VERSION];
    // Serializing these types into a Vec cannot fail: no maps with non-string keys, no
    // unsized sequences, no custom errors.
    match postcard::to_extend(value, out) {
        Ok(v) => v,
        Err(e) => unreachable!("mailbox wire types always serialize: {e}"),
    }
}

fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    bytes: &'a [u8],
    max: usize,
) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    match bytes.split_first() {
        None => Err(WireError::Malformed {
            what,
            message: "empty frame".into(),
        }),
        Some((&WIRE_VERSION, rest)) => {
            let (value, tail) =
                postcard::take_from_bytes(rest).map_err(|e| WireError::Malformed {
                    what,
                    message: e.to_string(),
                })?;
            if !tail.is_empty() {
                return Err(WireError::Malformed {
                    what,
                    message: format!("{} trailing bytes", tail.len()),
                });
            }
            Ok(value)
        }
        Some((&got, _)) => Err(WireError::Version { what, got }),
    }
}

/// Byte strings as serde bytes: the same postcard encoding as a `Vec<u8>` (a varint length,
/// then the bytes), but decoded in one copy instead of byte by byte.
pub(crate) mod bytes {
    use serde::{Deserializer, Serializer, de};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Visitor)
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Self-describing formats (not postcard) may hand bytes over as a sequence; the
            // capacity hint is never trusted beyond 4 KiB.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// A peer id as opaque bytes (libp2p `PeerId::to_bytes()`): 1 to [`MAX_PEER_BYTES`] bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerBytes(Vec<u8>);

impl PeerBytes {
    /// Validates the length.
    pub fn new(bytes: Vec<u8>) -> Result<Self, WireError> {
        if bytes.is_empty() {
            return Err(WireError::Malformed {
                what: "peer id",
                message: "empty".into(),
            });
        }
        if bytes.len() > MAX_PEER_BYTES {
            return Err(WireError::TooLarge {
                what: "peer id",
                len: bytes.len(),
                max: MAX_PEER_BYTES,
            });
        }
        Ok(Self(bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The fixed-width key the relay files this peer under (a domain-separated BLAKE3).
    pub fn key(&self) -> PeerKey {
        PeerKey(blake3::derive_key("tern mailbox peer v1", &self.0))
    }

    /// Lowercase hex of the last 6 bytes, for logs (enough to tell peers apart).
    pub fn short(&self) -> String {
        let tail = &self.0[self.0.len().saturating_sub(6)..];
        tail.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for PeerBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerBytes(..{})", self.short())
    }
}

impl TryFrom<Vec<u8>> for PeerBytes {
    type Error = WireError;

    fn try_from(bytes: Vec<u8>) -> Result<Self, WireError> {
        Self::new(bytes)
    }
}

impl Serialize for PeerBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PeerBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = bytes::deserialize(d)?;
        Self::new(bytes).map_err(serde::de::Error::custom)
    }
}

/// The fixed-width name of a peer inside the relay: `BLAKE3-derive_key("tern mailbox peer
/// v1", peer bytes)`. Database keys and in-memory maps use it instead of the variable-length
/// peer id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub [u8; 32]);

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// A mailbox capability: 32 random bytes the recipient gives to one sender (typically one
/// per contact). Whoever holds it may deposit into (and claim a prekey from) the recipient's
/// mailbox until the recipient revokes its hash. Secret: `Debug` is redacted and the bytes
/// are zeroed on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct MailboxToken([u8; 32]);

impl MailboxToken {
    /// A fresh random token.
    pub fn random<R: rand::RngCore + rand::CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    /// A token from its bytes (as stored by the holder).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The bytes, for the holder's own storage. Never log them.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// What the relay stores: `BLAKE3-derive_key("tern mailbox token v1", token)`.
    pub fn hash(&self) -> TokenHash {
        TokenHash(blake3::derive_key("tern mailbox token v1", &self.0))
    }
}

impl fmt::Debug for MailboxToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MailboxToken(<redacted>)")
    }
}

/// The hash of a [`MailboxToken`]; the relay stores and compares only these.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// A `/tern/mailbox/1` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// By the recipient, on its own connection: create (or keep) its mailbox, add then
    /// revoke token hashes (a hash in both lists ends up revoked). Idempotent.
    Register {
        /// Token hashes to accept from now on.
        add: Vec<TokenHash>,
        /// Token hashes to refuse from now on.
        revoke: Vec<TokenHash>,
    },
    /// By a sender holding a capability: store `envelope` for `recipient`.
    Deposit {
        /// The mailbox owner.
        recipient: PeerBytes,
        /// The capability the recipient issued to this sender.
        token: MailboxToken,
        /// The message id; the same id deposited twice is stored once.
        id: MessageId,
        /// Requested lifetime; clamped to the relay's `[min_ttl_secs, max_ttl_secs]`,
        /// `default_ttl_secs` when `None`.
        ttl_secs: Option<u64>,
        /// Ciphertext, opaque to the relay.
        #[serde(with = "bytes")]
        envelope: Vec<u8>,
    },
    /// By the recipient: the next page of its mailbox, in deposit order.
    Fetch {
        /// Only items with `seq > after` (the last `seq` of the previous page); `None`
        /// starts at the oldest.
        after: Option<u64>,
        /// Most items wanted (clamped to `1..=fetch_max_items`).
        max_items: u32,
        /// Most envelope bytes wanted (clamped to `fetch_max_bytes`); a page always holds
        /// at least one item when one is waiting.
        max_bytes: u32,
    },
    /// By the recipient: delete these stored envelopes (it holds them durably now).
    Ack {
        /// Message ids; unknown ones are ignored.
        ids: Vec<MessageId>,
    },
    /// By anyone: the relay's published limits.
    Info,
    /// From a relay to a recipient: `waiting` envelopes are stored for you. Answered
    /// `Response::Ok`; relays do not serve it (`Unsupported`).
    Notice {
        /// How many envelopes wait.
        waiting: u32,
    },
    /// By the recipient: append signed one-time prekeys (opaque) to its pool, up to the
    /// relay's cap; existing ones are kept.
    PublishPrekeys {
        /// The prekeys, each 1 to [`MAX_PREKEY_BYTES`] bytes.
        prekeys: Vec<Vec<u8>>,
    },
    /// By a sender holding a capability: take (and remove) one prekey of `recipient`.
    ClaimPrekey {
        /// The mailbox owner.
        recipient: PeerBytes,
        /// The capability the recipient issued to this sender.
        token: MailboxToken,
    },
}

impl Request {
    /// Encodes with the version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes, checking the version, the frame size and every protocol limit.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let request: Self = decode("request", bytes, MAX_REQUEST_FRAME)?;
        request.validate()?;
        Ok(request)
    }

    /// Checks the protocol limits of the fields.
    pub fn validate(&self) -> Result<(), WireError> {
        let cap = |what, len, max| {
            if len > max {
                Err(WireError::TooLarge { what, len, max })
            } else {
                Ok(())
            }
        };
        match self {
            Self::Register { add, revoke } => {
                cap("register.add", add.len(), MAX_TOKENS_PER_REQUEST)?;
                cap("register.revoke", revoke.len(), MAX_TOKENS_PER_REQUEST)
            }
            Self::Deposit { envelope, .. } => {
                cap("envelope", envelope.len(), MAX_ENVELOPE_BYTES as usize)
            }
            Self::Ack { ids } => cap("ack.ids", ids.len(), MAX_ACK_IDS),
            Self::PublishPrekeys { prekeys } => {
                cap("prekeys", prekeys.len(), MAX_PREKEYS_PER_REQUEST)?;
                for p in prekeys {
                    if p.is_empty() {
                        return Err(WireError::Malformed {
                            what: "prekey",
                            message: "empty".into(),
                        });
                    }
                    cap("prekey", p.len(), MAX_PREKEY_BYTES)?;
                }
                Ok(())
            }
            Self::Fetch { .. } | Self::Info | Self::Notice { .. } | Self::ClaimPrekey { .. } => {
                Ok(())
            }
        }
    }
}

/// One stored envelope, as returned by `Fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredItem {
    /// The relay's sequence number: increasing in deposit order; the fetch cursor.
    pub seq: u64,
    /// The sender's message id.
    pub id: MessageId,
    /// The depositing peer (as authenticated by the transport).
    pub from: PeerBytes,
    /// When the relay stored it (unix seconds, relay clock).
    pub deposited_at: u64,
    /// When the relay will drop it unless acked before (unix seconds, relay clock).
    pub expires_at: u64,
    /// The ciphertext as deposited.
    #[serde(with = "bytes")]
    pub envelope: Vec<u8>,
}

/// Why a relay (or a recipient answering a `Notice`) refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request did not decode or breaks a protocol rule.
    Malformed,
    /// The envelope (or the frame) is larger than allowed.
    TooLarge,
    /// The recipient's mailbox is full (count or bytes), or too many tokens.
    Quota,
    /// This peer sends too fast; retry later.
    RateLimited,
    /// No such mailbox, or the token is unknown or revoked (one answer for both, so the
    /// relay is no oracle of who has a mailbox).
    Unauthorized,
    /// The requesting peer has no mailbox here (register first).
    NotRegistered,
    /// Sent by a node that got a `Notice` from a relay it has no mailbox at.
    NotRecipient,
    /// The relay accepts no new mailboxes (existing ones keep working).
    RegistrationClosed,
    /// The relay's disk is below its free-space reserve; retry later.
    DiskFull,
    /// The relay could not read or store (a storage failure); retry later.
    Unavailable,
    /// The relay holds its maximum number of mailboxes.
    RelayFull,
    /// This request kind is not served by this peer (a relay is sent a `Notice`).
    Unsupported,
    /// The request was written in a protocol version this peer does not speak.
    UnsupportedVersion,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 13] = [
        Self::Malformed,
        Self::TooLarge,
        Self::Quota,
        Self::RateLimited,
        Self::Unauthorized,
        Self::NotRegistered,
        Self::NotRecipient,
        Self::RegistrationClosed,
        Self::DiskFull,
        Self::Unavailable,
        Self::RelayFull,
        Self::Unsupported,
        Self::UnsupportedVersion,
    ];

    /// A stable snake_case name (metrics labels, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Quota => "quota",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::NotRegistered => "not_registered",
            Self::NotRecipient => "not_recipient",
            Self::RegistrationClosed => "registration_closed",
            Self::DiskFull => "disk_full",
            Self::Unavailable => "unavailable",
            Self::RelayFull => "relay_full",
            Self::Unsupported => "unsupported",
            Self::UnsupportedVersion => "unsupported_version",
        }
    }

    /// Whether the same request may succeed later (the client keeps it and retries with
    /// backoff); otherwise the relay will keep refusing it.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Quota | Self::RateLimited | Self::DiskFull | Self::Unavailable | Self::RelayFull
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `/tern/mailbox/1` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done (answer to `Notice`).
    Ok,
    /// The mailbox exists with the new token set; `waiting` envelopes are stored in it.
    Registered {
        /// Envelopes waiting.
        waiting: u32,
    },
    /// Durably stored (also for an id stored before: `duplicate`).
    Deposited {
        /// The id was already stored; nothing new was written.
        duplicate: bool,
        /// When the stored copy expires (unix seconds, relay clock).
        expires_at: u64,
    },
    /// A page of the mailbox in deposit order.
    Batch {
        /// The items.
        items: Vec<StoredItem>,
        /// More items follow the last one (fetch again with `after` = its `seq`).
        more: bool,
    },
    /// Acked envelopes removed.
    Acked {
        /// How many of the ids were stored (and are now deleted).
        removed: u32,
    },
    /// The relay's limits.
    Info(RelayLimits),
    /// A claimed prekey, removed from the pool; `None` when the pool is empty.
    Prekey(Option<Vec<u8>>),
    /// Prekeys appended (durably) to the pool.
    PrekeysPublished {
        /// How many of the sent prekeys were kept (the rest would exceed the cap).
        accepted: u32,
        /// How many prekeys the pool holds now.
        available: u32,
    },
    /// Refused.
    Error {
        /// Why, machine-readable.
        code: ErrorCode,
        /// Why, for humans (at most [`MAX_ERROR_MESSAGE`] bytes).
        message: String,
    },
}

impl Response {
    /// An error response; the message is cut to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self::Error { code, message }
    }

    /// Encodes with the version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and checks the version and the frame size. Also reads an `Info` in the
    /// layout of relays that predate `mailbox_idle_secs` (13 fields), as
    /// `mailbox_idle_secs: 0`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let err = match decode("response", bytes, MAX_RESPONSE_FRAME) {
            Ok(r) => return Ok(r),
            Err(e @ (WireError::Version { .. } | WireError::TooLarge { .. })) => return Err(e),
            Err(e) => e,
        };
        if let [WIRE_VERSION, INFO_VARIANT, rest @ ..] = bytes
            && let Ok((old, [])) = postcard::take_from_bytes::<RelayLimitsV1>(rest)
        {
            return Ok(Self::Info(old.into()));
        }
        Err(err)
    }
}

/// The postcard variant index of [`Response::Info`] (a one-byte varint).
const INFO_VARIANT: u8 = 5;

/// [`RelayLimits`] as relays before idle expiry sent it in `Info`: the same fields in the
/// same order, without the last (`mailbox_idle_secs`). Such relays never expire a mailbox,
/// so it decodes as `mailbox_idle_secs: 0`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct RelayLimitsV1 {
    max_envelope_bytes: u32,
    quota_count: u32,
    quota_bytes: u64,
    min_ttl_secs: u64,
    default_ttl_secs: u64,
    max_ttl_secs: u64,
    sender_rate_per_sec: u32,
    sender_burst: u32,
    max_mailboxes: u32,
    max_tokens_per_mailbox: u32,
    max_prekeys_per_mailbox: u32,
    fetch_max_items: u32,
    fetch_max_bytes: u32,
}

impl From<RelayLimitsV1> for RelayLimits {
    fn from(o: RelayLimitsV1) -> Self {
        Self {
            max_envelope_bytes: o.max_envelope_bytes,
            quota_count: o.quota_count,
            quota_bytes: o.quota_bytes,
            min_ttl_secs: o.min_ttl_secs,
            default_ttl_secs: o.default_ttl_secs,
            max_ttl_secs: o.max_ttl_secs,
            sender_rate_per_sec: o.sender_rate_per_sec,
            sender_burst: o.sender_burst,
            max_mailboxes: o.max_mailboxes,
            max_tokens_per_mailbox: o.max_tokens_per_mailbox,
            max_prekeys_per_mailbox: o.max_prekeys_per_mailbox,
            fetch_max_items: o.fetch_max_items,
            fetch_max_bytes: o.fetch_max_bytes,
            mailbox_idle_secs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn peer(n: u8) -> PeerBytes {
        PeerBytes::new(vec![n; 38]).unwrap()
    }

    #[test]
    fn requests_round_trip() {
        let token = MailboxToken::from_bytes([7; 32]);
        let all = vec![
            Request::Register {
                add: vec![token.hash()],
                revoke: vec![TokenHash([1; 32])],
            },
            Request::Deposit {
                recipient: peer(1),
                token: token.clone(),
                id: [9; 16],
                ttl_secs: Some(3600),
                envelope: vec![0xab; 1000],
            },
            Request::Fetch {
                after: Some(42),
                max_items: 10,
                max_bytes: 1 << 20,
            },
            Request::Ack {
                ids: vec![[1; 16], [2; 16]],
            },
            Request::Info,
            Request::Notice { waiting: 3 },
            Request::PublishPrekeys {
                prekeys: vec![vec![1, 2, 3], vec![4; 100]],
            },
            Request::ClaimPrekey {
                recipient: peer(2),
                token,
            },
        ];
        for r in all {
            let bytes = r.to_bytes();
            assert_eq!(bytes[0], WIRE_VERSION);
            assert_eq!(Request::from_bytes(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn responses_round_trip() {
        let all = vec![
            Response::Ok,
            Response::Registered { waiting: 5 },
            Response::Deposited {
                duplicate: true,
                expires_at: 99,
            },
            Response::Batch {
                items: vec![StoredItem {
                    seq: 1,
                    id: [3; 16],
                    from: peer(4),
                    deposited_at: 10,
                    expires_at: 20,
                    envelope: vec![5; 33],
                }],
                more: true,
            },
            Response::Acked { removed: 2 },
            Response::Info(RelayLimits::default()),
            Response::Prekey(Some(vec![1, 2])),
            Response::Prekey(None),
            Response::PrekeysPublished {
                accepted: 1,
                available: 7,
            },
            Response::error(ErrorCode::Quota, "full"),
        ];
        for r in all {
            assert_eq!(Response::from_bytes(&r.to_bytes()).unwrap(), r);
        }
    }

    /// `Info(RelayLimits::default())` as relays before `mailbox_idle_secs` sent it.
    const OLD_DEFAULT_INFO: [u8; 34] = [
        0x01, 0x05, 0x80, 0x80, 0x06, 0x90, 0x4e, 0x80, 0x80, 0x80, 0x80, 0x01, 0x90, 0x1c, 0x80,
        0xea, 0x49, 0x80, 0x9a, 0x9e, 0x01, 0x64, 0xe8, 0x07, 0x90, 0x4e, 0x80, 0x08, 0x64, 0xe8,
        0x07, 0x80, 0xf8, 0x3f,
    ];

    #[test]
    fn info_of_an_older_relay_decodes_as_no_idle_expiry() {
        let expected = RelayLimits {
            mailbox_idle_secs: 0,
            ..RelayLimits::default()
        };
        assert_eq!(
            Response::from_bytes(&OLD_DEFAULT_INFO).unwrap(),
            Response::Info(expected)
        );
        // The new layout is the old one plus the idle period (varint 7776000) at the end.
        let new = Response::Info(RelayLimits::default()).to_bytes();
        assert_eq!(new[1], INFO_VARIANT);
        assert_eq!(&new[..OLD_DEFAULT_INFO.len()], &OLD_DEFAULT_INFO[..]);
        assert_eq!(&new[OLD_DEFAULT_INFO.len()..], &[0x80, 0xce, 0xda, 0x03]);
        // The legacy struct encodes like the old layout, for any values.
        let odd = RelayLimitsV1 {
            max_envelope_bytes: 1,
            quota_count: 2,
            quota_bytes: u64::MAX,
            min_ttl_secs: 4,
            default_ttl_secs: 5,
            max_ttl_secs: 6,
            sender_rate_per_sec: 7,
            sender_burst: 8,
            max_mailboxes: 9,
            max_tokens_per_mailbox: 10,
            max_prekeys_per_mailbox: 0,
            fetch_max_items: 12,
            fetch_max_bytes: u32::MAX,
        };
        let mut frame = vec![WIRE_VERSION, INFO_VARIANT];
        frame.extend(postcard::to_stdvec(&odd).unwrap());
        let Response::Info(l) = Response::from_bytes(&frame).unwrap() else {
            panic!("not an Info")
        };
        assert_eq!(
            (l.quota_bytes, l.max_prekeys_per_mailbox, l.fetch_max_bytes),
            (u64::MAX, 0, u32::MAX)
        );
        assert_eq!(l.mailbox_idle_secs, 0);
        let mut odd_new = l;
        odd_new.mailbox_idle_secs = 99;
        let mut new_frame = frame;
        new_frame.push(99);
        assert_eq!(
            Response::from_bytes(&new_frame).unwrap(),
            Response::Info(odd_new)
        );
        // Neither layout with a byte missing or extra, nor a legacy body under another
        // variant, decodes.
        let mut short = OLD_DEFAULT_INFO.to_vec();
        short.pop();
        assert!(matches!(
            Response::from_bytes(&short),
            Err(WireError::Malformed { .. })
        ));
        let mut long = new;
        long.push(0);
        assert!(matches!(
            Response::from_bytes(&long),
            Err(WireError::Malformed { .. })
        ));
        let mut other = OLD_DEFAULT_INFO.to_vec();
        other[1] = 7;
        assert!(Response::from_bytes(&other).is_err());
        // Other versions are still refused as such.
        let mut v2 = OLD_DEFAULT_INFO.to_vec();
        v2[0] = 2;
        assert!(matches!(
            Response::from_bytes(&v2),
            Err(WireError::Version { got: 2, .. })
        ));
    }

    #[test]
    fn byte_fields_encode_like_plain_vecs() {
        // `bytes` is an optimisation of decoding only: the encoding is postcard's Vec<u8>.
        #[derive(Serialize)]
        struct Plain {
            v: Vec<u8>,
        }
        #[derive(Serialize)]
        struct Fast {
            #[serde(with = "bytes")]
            v: Vec<u8>,
        }
        let v: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        assert_eq!(
            postcard::to_stdvec(&Plain { v: v.clone() }).unwrap(),
            postcard::to_stdvec(&Fast { v }).unwrap()
        );
    }

    #[test]
    fn frame_errors_are_typed() {
        assert!(matches!(
            Request::from_bytes(&[]),
            Err(WireError::Malformed { .. })
        ));
        assert_eq!(
            Request::from_bytes(&[2, 4]),
            Err(WireError::Version {
                what: "request",
                got: 2
            })
        );
        // Unknown variant.
        assert!(matches!(
            Request::from_bytes(&[1, 99]),
            Err(WireError::Malformed { .. })
        ));
        // Trailing bytes.
        let mut b = Request::Info.to_bytes();
        b.push(0);
        assert!(matches!(
            Request::from_bytes(&b),
            Err(WireError::Malformed { .. })
        ));
        // Oversize frame refused before decoding.
        let big = vec![1u8; MAX_REQUEST_FRAME + 1];
        assert!(matches!(
            Request::from_bytes(&big),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn protocol_limits_are_checked_on_decode() {
        let over = |r: Request| Request::from_bytes(&r.to_bytes());
        assert!(matches!(
            over(Request::Ack {
                ids: vec![[0; 16]; MAX_ACK_IDS + 1]
            }),
            Err(WireError::TooLarge {
                what: "ack.ids",
                ..
            })
        ));
        assert!(matches!(
            over(Request::Register {
                add: vec![TokenHash([0; 32]); MAX_TOKENS_PER_REQUEST + 1],
                revoke: vec![]
            }),
            Err(WireError::TooLarge { .. })
        ));
        assert!(matches!(
            over(Request::PublishPrekeys {
                prekeys: vec![vec![]]
            }),
            Err(WireError::Malformed { .. })
        ));
        assert!(matches!(
            over(Request::PublishPrekeys {
                prekeys: vec![vec![1; MAX_PREKEY_BYTES + 1]]
            }),
            Err(WireError::TooLarge { .. })
        ));
        assert!(matches!(
            over(Request::Deposit {
                recipient: peer(1),
                token: MailboxToken::from_bytes([0; 32]),
                id: [0; 16],
                ttl_secs: None,
                envelope: vec![0; MAX_ENVELOPE_BYTES as usize + 1],
            }),
            Err(WireError::TooLarge {
                what: "envelope",
                ..
            })
        ));
        // The largest legal deposit fits a request frame.
        let largest = Request::Deposit {
            recipient: PeerBytes::new(vec![0xff; MAX_PEER_BYTES]).unwrap(),
            token: MailboxToken::from_bytes([0xff; 32]),
            id: [0xff; 16],
            ttl_secs: Some(u64::MAX),
            envelope: vec![0xff; MAX_ENVELOPE_BYTES as usize],
        };
        assert!(largest.to_bytes().len() <= MAX_REQUEST_FRAME);
        assert!(Request::from_bytes(&largest.to_bytes()).is_ok());
    }

    #[test]
    fn peer_bytes_are_validated_on_decode() {
        assert!(PeerBytes::new(vec![]).is_err());
        assert!(PeerBytes::new(vec![1; MAX_PEER_BYTES + 1]).is_err());
        // Hand-craft a ClaimPrekey whose recipient has 65 bytes.
        let mut frame = vec![WIRE_VERSION, 7, 65];
        frame.extend([1u8; 65]);
        frame.extend([0u8; 32]);
        assert!(matches!(
            Request::from_bytes(&frame),
            Err(WireError::Malformed { .. })
        ));
        frame[2] = 64;
        frame.remove(3);
        assert!(Request::from_bytes(&frame).is_ok());
    }

    #[test]
    fn item_overhead_bound_holds_for_the_largest_item() {
        let item = StoredItem {
            seq: u64::MAX,
            id: [0xff; 16],
            from: PeerBytes::new(vec![0xff; MAX_PEER_BYTES]).unwrap(),
            deposited_at: u64::MAX,
            expires_at: u64::MAX,
            envelope: vec![0xff; MAX_ENVELOPE_BYTES as usize],
        };
        let len = postcard::to_stdvec(&item).unwrap().len();
        assert!(len <= MAX_ENVELOPE_BYTES as usize + MAX_ITEM_OVERHEAD as usize);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let token = MailboxToken::from_bytes([0x42; 32]);
        let shown = format!(
            "{:?}",
            Request::Deposit {
                recipient: peer(1),
                token: token.clone(),
                id: [0; 16],
                ttl_secs: None,
                envelope: vec![],
            }
        );
        assert!(shown.contains("MailboxToken(<redacted>)"), "{shown}");
        assert!(!shown.contains("42, 42"), "{shown}");
        assert_eq!(format!("{token:?}"), "MailboxToken(<redacted>)");
    }

    #[test]
    fn token_hash_is_domain_separated() {
        let t = MailboxToken::from_bytes([1; 32]);
        assert_ne!(t.hash().0, *blake3::hash(&[1; 32]).as_bytes());
        assert_ne!(t.hash().0, PeerBytes::new(vec![1; 32]).unwrap().key().0);
        assert_eq!(t.hash(), MailboxToken::from_bytes([1; 32]).hash());
    }

    #[test]
    fn error_message_is_capped_at_a_char_boundary() {
        let r = Response::error(ErrorCode::Malformed, "é".repeat(MAX_ERROR_MESSAGE));
        let Response::Error { message, .. } = r else {
            panic!("not an error")
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE && message.len() >= MAX_ERROR_MESSAGE - 1);
    }

    fn arb_peer() -> impl Strategy<Value = PeerBytes> {
        proptest::collection::vec(any::<u8>(), 1..=MAX_PEER_BYTES)
            .prop_map(|v| PeerBytes::new(v).unwrap())
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let hash = any::<[u8; 32]>().prop_map(TokenHash);
        let token = any::<[u8; 32]>().prop_map(MailboxToken::from_bytes);
        prop_oneof![
            (
                proptest::collection::vec(hash.clone(), 0..4),
                proptest::collection::vec(hash, 0..4)
            )
                .prop_map(|(add, revoke)| Request::Register { add, revoke }),
            (
                arb_peer(),
                token.clone(),
                any::<[u8; 16]>(),
                any::<Option<u64>>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(recipient, token, id, ttl_secs, envelope)| {
                    Request::Deposit {
                        recipient,
                        token,
                        id,
                        ttl_secs,
                        envelope,
                    }
                }),
            (any::<Option<u64>>(), any::<u32>(), any::<u32>()).prop_map(
                |(after, max_items, max_bytes)| Request::Fetch {
                    after,
                    max_items,
                    max_bytes
                }
            ),
            proptest::collection::vec(any::<[u8; 16]>(), 0..8).prop_map(|ids| Request::Ack { ids }),
            Just(Request::Info),
            any::<u32>().prop_map(|waiting| Request::Notice { waiting }),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..5)
                .prop_map(|prekeys| Request::PublishPrekeys { prekeys }),
            (arb_peer(), token)
                .prop_map(|(recipient, token)| Request::ClaimPrekey { recipient, token }),
        ]
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Request::from_bytes(&bytes);
            let _ = Response::from_bytes(&bytes);
            let mut versioned = bytes.clone();
            versioned.insert(0, WIRE_VERSION);
            let _ = Request::from_bytes(&versioned);
            let _ = Response::from_bytes(&versioned);
        }

        #[test]
        fn any_request_round_trips(r in arb_request()) {
            prop_assert_eq!(Request::from_bytes(&r.to_bytes()).unwrap(), r);
        }

        #[test]
        fn mutated_requests_never_panic(r in arb_request(), at in any::<usize>(), byte in any::<u8>()) {
            let mut b = r.to_bytes();
            let i = at % b.len();
            b[i] = byte;
            let _ = Request::from_bytes(&b);
            b.truncate(i);
            let _ = Request::from_bytes(&b);
        }
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate() {
        // A Batch claiming u32::MAX items, and an Ack claiming a huge id list: decoding
        // fails on the short input instead of reserving memory for the claimed length.
        let mut frame = vec![WIRE_VERSION, 3];
        frame.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Response::from_bytes(&frame).is_err());
        let mut frame = vec![WIRE_VERSION, 3];
        frame.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Request::from_bytes(&frame).is_err());
    }
}
