//! Contacts: who a node talks to, the keys it trusts for them, and the safety number two
//! people compare to verify each other.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::crypto::IdentityPublic;

/// Longest contact name.
pub const MAX_NAME_LEN: usize = 64;

/// A stored contact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    /// Local name, unique on this node.
    pub name: String,
    /// The contact's peer id.
    pub peer_id: PeerId,
    /// The contact's verified identity keys (ed25519 + signed X25519).
    pub identity: IdentityPublic,
    /// The prekey bundle from the contact's ticket, used to start a session.
    pub bundle: Option<Vec<u8>>,
    /// Addresses the contact was last seen at.
    pub addrs: Vec<Multiaddr>,
    /// Blocked contacts' envelopes are dropped.
    pub blocked: bool,
    /// Added from an incoming message rather than by ticket.
    pub auto_added: bool,
    /// The display name the contact announced, if any.
    pub announced_name: Option<String>,
    /// When added, ms since the epoch.
    pub added_at: u64,
}

/// A contact as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactView {
    /// Local name.
    pub name: String,
    /// Peer id.
    pub peer_id: String,
    /// Whether blocked.
    pub blocked: bool,
    /// Added from an incoming message (a message request) rather than by ticket.
    pub auto_added: bool,
    /// The name the contact announced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announced_name: Option<String>,
    /// Known addresses.
    pub addrs: Vec<String>,
    /// When added, ms since the epoch.
    pub added_at: u64,
    /// The safety number (compare it with the contact's to verify each other).
    pub safety_number: String,
}

/// A blocked peer as the API lists it: a blocked contact, or a blocked contact the user
/// removed (still blocked, [`crate::messaging::db::MessagingDb::blocked_peers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedPeer {
    /// Peer id.
    pub peer_id: String,
    /// The contact's name; for a removed one, the name it had announced, if any (chosen by
    /// that peer, not by the user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Still a contact (unblocked by name); otherwise removed (unblocked by peer id).
    pub contact: bool,
}

impl Contact {
    /// The API view; `own` is this node's identity for the safety number.
    pub fn view(&self, own: &IdentityPublic) -> ContactView {
        ContactView {
            name: self.name.clone(),
            peer_id: self.peer_id.to_string(),
            blocked: self.blocked,
            auto_added: self.auto_added,
            announced_name: self.announced_name.clone(),
            addrs: self.addrs.iter().map(ToString::to_string).collect(),
            added_at: self.added_at,
            safety_number: safety_number(own, &self.identity),
        }
    }

    /// The contact's ed25519 key (the storage key of everything about it).
    pub fn key(&self) -> [u8; 32] {
        *self.identity.ed25519()
    }
}

/// Checks a contact name: 1..=64 characters, no leading or trailing space, no control,
/// bidirectional or invisible formatting characters (zero-width joiners only between two
/// visible characters), and none of [`RESERVED_NAMES`] in any form.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(format!("a contact name has 1 to {MAX_NAME_LEN} characters"));
    }
    if RESERVED_NAMES.iter().any(|r| *r == fold_name(name)) {
        return Err(format!(
            "\"{name}\" is reserved: the history shows your own messages as \"me\""
        ));
    }
    let chars: Vec<char> = name.chars().collect();
    let stray_joiner = chars.iter().enumerate().any(|(i, c)| {
        is_joiner(*c)
            && (i == 0
                || i + 1 == chars.len()
                || is_joiner(chars[i - 1])
                || is_joiner(chars[i + 1]))
    });
    if name.trim() != name
        || stray_joiner
        || name.chars().any(|c| c.is_control() || is_invisible(c))
    {
        return Err(
            "a contact name has no leading/trailing spaces, control characters or invisible \
             formatting characters (bidirectional overrides, zero-width spaces)"
                .into(),
        );
    }
    Ok(())
}

/// A name as it is stored and looked up: Unicode NFC, so `é` typed as one character and as
/// `e` plus a combining accent are the same name.
pub fn normalize_name(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization as _;
    name.nfc().collect()
}

/// What two names must not share to be told apart: compatibility-normalised (NFKC: `ﬁ`
/// reads as `fi`, a full-width `Ｂ` as `B`) and in lower case.
pub fn fold_name(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization as _;
    name.nfkc()
        .filter(|c| !is_joiner(*c))
        .collect::<String>()
        .to_lowercase()
}

/// Names no contact may have (in any letter case): `me` is how the history shows our own
/// messages, so a contact called that would pass its messages off as ours.
pub const RESERVED_NAMES: &[&str] = &["me"];

/// Bidirectional controls and invisible formatting characters: in a name they could make
/// it look like another one, or reorder the line it is shown in.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200b}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Zero-width non-joiner and joiner: needed inside Persian and Indic names and emoji
/// sequences (👩‍💻), allowed only between two visible characters.
fn is_joiner(c: char) -> bool {
    matches!(c, '\u{200c}' | '\u{200d}')
}

/// The safety number of two identities: 60 digits in 12 groups of 5, the same on both sides.
pub fn safety_number(a: &IdentityPublic, b: &IdentityPublic) -> String {
    let mut keys = [a.to_bytes(), b.to_bytes()];
    keys.sort();
    let mut hasher = blake3::Hasher::new_derive_key("tern safety number v1");
    for k in &keys {
        // Only the keys, not the signature bytes, define the identity.
        hasher.update(&k[..64]);
    }
    let mut out = [0u8; 60];
    hasher.finalize_xof().fill(&mut out);
    out.chunks(5)
        .map(|c| {
            let mut b = [0u8; 8];
            b[3..].copy_from_slice(c);
            format!("{:05}", u64::from_be_bytes(b) % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::IdentityKeys;

    #[test]
    fn safety_number_is_symmetric_and_key_bound() {
        let a = IdentityKeys::from_seed(&[1; 32]).unwrap();
        let b = IdentityKeys::from_seed(&[2; 32]).unwrap();
        let c = IdentityKeys::from_seed(&[3; 32]).unwrap();
        let ab = safety_number(a.public(), b.public());
        assert_eq!(ab, safety_number(b.public(), a.public()));
        assert_ne!(ab, safety_number(a.public(), c.public()));
        assert_eq!(ab.len(), 12 * 5 + 11);
        assert!(
            ab.split(' ')
                .all(|g| g.len() == 5 && g.chars().all(|c| c.is_ascii_digit()))
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("bob").is_ok());
        assert!(validate_name("Bob Smith").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(" bob").is_err());
        assert!(validate_name("b\nob").is_err());
        assert!(validate_name("b\u{1b}[31mob").is_err());
        assert!(validate_name("bob\u{202e}").is_err());
        assert!(validate_name("b\u{200b}ob").is_err());
        // Joiners inside a word or an emoji sequence are part of the name; stray ones not.
        assert!(validate_name("\u{1f469}\u{200d}\u{1f4bb}").is_ok());
        assert!(validate_name("\u{645}\u{6cc}\u{200c}\u{62e}\u{648}\u{627}\u{647}\u{645}").is_ok());
        assert!(validate_name("\u{200d}bob").is_err());
        assert!(validate_name("bob\u{200c}").is_err());
        assert!(validate_name("b\u{200d}\u{200d}ob").is_err());
        assert_eq!(fold_name("b\u{200d}ob"), fold_name("bob"));
        // Our own messages show as "me": no contact may pass as that.
        for reserved in ["me", "Me", "ME"] {
            assert!(validate_name(reserved).is_err(), "{reserved}");
        }
        assert!(validate_name("meg").is_ok());
        assert!(validate_name("\u{ff2d}\u{ff45}").is_err(), "full-width me");
        // One form, and one folding for collisions.
        assert_eq!(normalize_name("Jose\u{301}"), "Jos\u{e9}");
        assert_eq!(fold_name("Jose\u{301}"), fold_name("JOS\u{c9}"));
        assert_eq!(fold_name("\u{fb01}x"), "fix");
        assert_ne!(fold_name("bob"), fold_name("bobby"));
        assert!(validate_name("Zoë 🐦").is_ok());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
