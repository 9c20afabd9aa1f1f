//! Contact tickets: one copy-pasteable string that carries everything needed to reach a
//! node and start an encrypted session with it: its peer id, dialable addresses, display
//! name and signed prekey bundle, and (version 3) its home relays with the mailbox token
//! that lets a contact deposit messages there while the node is offline.
//!
//! Text form: `tern1` followed by lowercase unpadded base32 of
//! `version (1 byte) || postcard(body) || BLAKE3(version || body)[..4]`.
//! The checksum catches copy-paste damage; the version lets newer nodes keep reading old
//! tickets. Decoding caps the input length before allocating.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "tern1";
const VERSION: u8 = 3;
/// The longest ticket text accepted (a ticket with many addresses stays far below).
pub const MAX_TICKET_LEN: usize = 16 * 1024;

/// Why a ticket string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// It does not start with `tern1`.
    #[error("not a Tern ticket (it must start with `{PREFIX}`)")]
    Prefix,
    /// Longer than [`MAX_TICKET_LEN`].
    #[error("ticket too long: {len} characters, at most {MAX_TICKET_LEN}")]
    TooLong {
        /// The length found.
        len: usize,
    },
    /// Not valid base32 or too short.
    #[error("ticket is damaged (altered or cut while copying?): {0}")]
    Encoding(String),
    /// The checksum does not match: the text was altered or truncated.
    #[error("ticket checksum mismatch: the ticket was altered or cut while copying")]
    Checksum,
    /// Made by a newer Tern.
    #[error("ticket version {0} is not supported by this Tern (it reads versions 1 to {VERSION})")]
    Version(u8),
}

/// What a ticket carries. Its `Debug` output leaves out the mailbox token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactTicket {
    /// The node's libp2p peer id (its ed25519 identity).
    pub peer_id: PeerId,
    /// Addresses the node can be dialed at (without the `/p2p/` suffix).
    pub addrs: Vec<Multiaddr>,
    /// The display name the node's owner chose.
    pub name: Option<String>,
    /// The signed prekey bundle (`crypto::PrekeyBundle` encoding), for starting a session.
    pub bundle: Option<Vec<u8>>,
    /// Home relays (each with `/p2p/<relay id>`) holding the node's mailbox.
    pub relays: Vec<Multiaddr>,
    /// The capability to deposit into that mailbox (a secret: share the ticket only with
    /// people you want to hear from).
    pub mailbox_token: Option<[u8; 32]>,
}

impl std::fmt::Debug for ContactTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactTicket")
            .field("peer_id", &self.peer_id)
            .field("addrs", &self.addrs)
            .field("name", &self.name)
            .field("bundle", &self.bundle.as_ref().map(Vec::len))
            .field("mailbox_token", &self.mailbox_token.map(|_| "<secret>"))
            .finish()
    }
}

/// Version 2 tickets (no relays).
#[derive(Deserialize)]
struct TicketV2 {
    peer_id: PeerId,
    addrs: Vec<Multiaddr>,
    name: Option<String>,
    bundle: Option<Vec<u8>>,
}

/// Version 1 tickets (peer id and addresses only).
#[derive(Deserialize)]
struct TicketV1 {
    peer_id: PeerId,
    addrs: Vec<Multiaddr>,
}

impl ContactTicket {
    /// Encodes to the `tern1…` text form.
    pub fn encode(&self) -> String {
        let mut bytes = vec![VERSION];
        bytes.extend(postcard::to_stdvec(self).expect("ticket fields always serialize"));
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        format!(
            "{PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        )
    }

    /// Decodes the text form, checking length, checksum and version.
    pub fn decode(text: &str) -> Result<Self, TicketError> {
        // Spaces and line breaks anywhere are dropped: a ticket pasted from a wrapped line.
        let joined: String;
        let text = if text.trim().contains(char::is_whitespace) {
            joined = text.split_whitespace().collect();
            joined.as_str()
        } else {
            text.trim()
        };
        if text.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong { len: text.len() });
        }
        // Either case: the QR form is upper case (QR's alphanumeric mode is denser).
        let body = text
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| text.get(PREFIX.len()..))
            .ok_or(TicketError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_uppercase().as_bytes())
            .map_err(|e| TicketError::Encoding(e.to_string()))?;
        if bytes.len() < 1 + 4 {
            return Err(TicketError::Encoding("too short".into()));
        }
        let (payload, sum) = bytes.split_at(bytes.len() - 4);
        if checksum(payload) != sum {
            return Err(TicketError::Checksum);
        }
        let body = &payload[1..];
        let bad = |e: postcard::Error| TicketError::Encoding(e.to_string());
        match payload[0] {
            1 => {
                let v1: TicketV1 = postcard::from_bytes(body).map_err(bad)?;
                Ok(Self {
                    peer_id: v1.peer_id,
                    addrs: v1.addrs,
                    name: None,
                    bundle: None,
                    relays: Vec::new(),
                    mailbox_token: None,
                })
            }
            2 => {
                let v2: TicketV2 = postcard::from_bytes(body).map_err(bad)?;
                Ok(Self {
                    peer_id: v2.peer_id,
                    addrs: v2.addrs,
                    name: v2.name,
                    bundle: v2.bundle,
                    relays: Vec::new(),
                    mailbox_token: None,
                })
            }
            VERSION => postcard::from_bytes(body).map_err(bad),
            other => Err(TicketError::Version(other)),
        }
    }
}

fn checksum(bytes: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..4]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn sample() -> ContactTicket {
        ContactTicket {
            peer_id: Identity::from_seed([1u8; 32]).peer_id(),
            addrs: vec![
                "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
                "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
            ],
            name: Some("bob".into()),
            bundle: Some(vec![1, 2, 3]),
            relays: vec![
                "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
                    .parse()
                    .unwrap(),
            ],
            mailbox_token: Some([5; 32]),
        }
    }

    #[test]
    fn version_1_tickets_still_decode() {
        let t = sample();
        let mut bytes = vec![1u8];
        bytes.extend(postcard::to_stdvec(&(t.peer_id, t.addrs.clone())).unwrap());
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        let text = format!(
            "tern1{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        );
        let got = ContactTicket::decode(&text).unwrap();
        assert_eq!(got.peer_id, t.peer_id);
        assert_eq!(got.addrs, t.addrs);
        assert_eq!(got.bundle, None);
    }

    #[test]
    fn version_2_tickets_still_decode() {
        let t = sample();
        let mut bytes = vec![2u8];
        bytes.extend(
            postcard::to_stdvec(&(t.peer_id, t.addrs.clone(), t.name.clone(), t.bundle.clone()))
                .unwrap(),
        );
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        let text = format!(
            "tern1{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        );
        let got = ContactTicket::decode(&text).unwrap();
        assert_eq!(got.name, t.name);
        assert_eq!(got.bundle, t.bundle);
        assert!(got.relays.is_empty());
        assert_eq!(got.mailbox_token, None);
    }

    #[test]
    fn debug_leaves_out_the_mailbox_token() {
        let shown = format!("{:?}", sample());
        assert!(shown.contains("<secret>"), "{shown}");
        assert!(!shown.contains("5, 5"), "{shown}");
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let text = t.encode();
        assert!(text.starts_with("tern1"));
        assert!(text.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(ContactTicket::decode(&text).unwrap(), t);
        assert_eq!(ContactTicket::decode(&format!("  {text}\n")).unwrap(), t);
        // As read from the QR code of `tern id --qr`.
        assert_eq!(ContactTicket::decode(&text.to_uppercase()).unwrap(), t);
        // Pasted from a wrapped line: breaks and spaces inside are dropped.
        let (head, tail) = text.split_at(30);
        let wrapped = format!("{head}\n  {}\r\n{}", &tail[..20], &tail[20..]);
        assert_eq!(ContactTicket::decode(&wrapped).unwrap(), t);
    }

    #[test]
    fn damage_is_detected() {
        let text = sample().encode();
        for cut in 1..8 {
            let err = ContactTicket::decode(&text[..text.len() - cut]).unwrap_err();
            assert!(
                matches!(err, TicketError::Checksum | TicketError::Encoding(_)),
                "cut {cut}: {err:?}"
            );
        }
        let mut chars: Vec<char> = text.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let altered: String = chars.into_iter().collect();
        assert!(ContactTicket::decode(&altered).is_err());
        assert_eq!(
            ContactTicket::decode("hello").unwrap_err(),
            TicketError::Prefix
        );
        assert!(matches!(
            ContactTicket::decode("tern1!!!"),
            Err(TicketError::Encoding(_))
        ));
        let long = format!("tern1{}", "a".repeat(MAX_TICKET_LEN));
        assert!(matches!(
            ContactTicket::decode(&long),
            Err(TicketError::TooLong { .. })
        ));
    }

    #[test]
    fn future_version_is_refused() {
        let mut bytes = vec![9u8];
        bytes.extend(postcard::to_stdvec(&sample()).unwrap());
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        let text = format!(
            "tern1{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        );
        assert_eq!(
            ContactTicket::decode(&text).unwrap_err(),
            TicketError::Version(9)
        );
    }
}
