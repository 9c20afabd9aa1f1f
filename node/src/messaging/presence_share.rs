//! Handing our presence key to our contacts (and taking it back) over the ratchet sessions.
//!
//! Presence frames are sealed with a key only our contacts hold. This part of the messaging
//! actor decides who holds it: every contact we added ourselves and have not blocked, never
//! a message request. Removing or blocking such a contact rotates the key and sends the new
//! one to everyone else, so the removed peer can read nothing we publish afterwards;
//! switching to `share = "nobody"` rotates it too and tells contacts to forget the old one.
//! Keys travel as ordinary outbox items, so a contact that is offline gets it later.

use rand::RngCore;
use tokio::sync::mpsc;

use super::{
    Actor, MessagingError,
    contacts::Contact,
    db::{OutKind, OwnPresence, PeerKey},
    peer_id_of_key,
    wire::Content,
};
use crate::presence::wire::PresenceKey;

/// What the messaging actor tells the presence actor (after the change is durable).
#[derive(Debug, Clone)]
pub enum PresenceNote {
    /// A contact shared its presence key with us (`None`: it withdrew it).
    PeerKey(libp2p::PeerId, Option<PresenceKey>),
    /// Our own key changed (`None`: we share with nobody).
    OwnKey(Option<PresenceKey>),
    /// Contacts were added, removed, blocked or unblocked.
    ContactsChanged,
}

/// The sending half of the note channel.
pub type PresenceNotes = mpsc::UnboundedSender<PresenceNote>;

const SELF_KEY: &[u8] = b"self";

/// Whether `c` should hold our presence key.
pub(super) fn eligible(c: &Contact) -> bool {
    !c.blocked && !c.auto_added
}

impl Actor {
    fn own_presence(&self) -> Result<Option<OwnPresence>, MessagingError> {
        Ok(self.db.presence_self.get(SELF_KEY)?)
    }

    /// Sends the note once the current batch is durable.
    pub(super) fn note_after_flush(&mut self, note: PresenceNote) {
        if let Some(tx) = self.presence_notes.clone() {
            self.dirty = true;
            self.after_flush.push(Box::new(move |flushed| {
                if flushed.is_ok() {
                    let _ = tx.send(note);
                }
            }));
        }
    }

    /// Queues our presence key (or its withdrawal) for `peer`. A storage failure (a full
    /// disk) is returned, so the operation that rotates keys fails whole and runs again;
    /// any other failure only concerns that contact and is logged.
    fn queue_presence_key(
        &mut self,
        peer: PeerKey,
        key: Option<&PresenceKey>,
    ) -> Result<(), MessagingError> {
        let content = Content::PresenceKey {
            key: key.map(|k| k.0),
        };
        match self.queue(peer, vec![(content, OutKind::PresenceKey)]) {
            Ok(_) => Ok(()),
            Err(e) if super::mailbox::storage_failure(&e) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "could not queue the presence key for a contact");
                Ok(())
            }
        }
    }

    /// The contacts that hold our presence key and mailbox token.
    pub(super) fn eligible_contacts(&self) -> Result<Vec<PeerKey>, MessagingError> {
        Ok(self
            .db
            .contact_list()?
            .iter()
            .filter(|c| eligible(c))
            .map(Contact::key)
            .collect())
    }

    fn queue_to_all(&mut self, key: Option<&PresenceKey>) -> Result<(), MessagingError> {
        for peer in self.eligible_contacts()? {
            self.queue_presence_key(peer, key)?;
        }
        Ok(())
    }

    fn new_own_key(&mut self, shared: bool) -> Result<PresenceKey, MessagingError> {
        let mut bytes = [0u8; 32];
        self.rng.fill_bytes(&mut bytes);
        let own = OwnPresence {
            key: PresenceKey(bytes),
            shared,
        };
        self.db.presence_self.insert(SELF_KEY, &own)?;
        self.dirty = true;
        Ok(own.key)
    }

    /// Brings sharing in line with the configuration at start; returns the key to seal our
    /// frames with, or `None` when we share with nobody.
    pub(super) fn presence_setup(
        &mut self,
        share: bool,
    ) -> Result<Option<PresenceKey>, MessagingError> {
        let current = self.own_presence()?;
        match (current, share) {
            (Some(own), true) if own.shared => Ok(Some(own.key)),
            (_, true) => {
                let key = self.new_own_key(true)?;
                self.queue_to_all(Some(&key))?;
                Ok(Some(key))
            }
            (Some(own), false) if own.shared => {
                // Those who had the old key may not read anything new.
                self.new_own_key(false)?;
                self.queue_to_all(None)?;
                Ok(None)
            }
            (_, false) => Ok(None),
        }
    }

    /// A contact became eligible (added or unblocked): give it our key.
    pub(super) fn presence_contact_added(&mut self, c: &Contact) -> Result<(), MessagingError> {
        self.note_after_flush(PresenceNote::ContactsChanged);
        if let Some(key) = self.presence_key_for(c)? {
            self.queue_presence_key(c.key(), Some(&key))?;
        }
        Ok(())
    }

    /// Our presence key, if `c` should hold it now (we share, and it is eligible): what a
    /// contact added gets, and what a new session with it carries again.
    pub(super) fn presence_key_for(
        &self,
        c: &Contact,
    ) -> Result<Option<PresenceKey>, MessagingError> {
        Ok(self
            .own_presence()?
            .filter(|own| own.shared && eligible(c))
            .map(|own| own.key))
    }

    /// A contact that held our key (if `was_eligible`) was removed or blocked (its record
    /// says so already): rotate the key for the contacts that are eligible now.
    pub(super) fn presence_contact_dropped(
        &mut self,
        was_eligible: bool,
    ) -> Result<(), MessagingError> {
        self.note_after_flush(PresenceNote::ContactsChanged);
        if was_eligible
            && let Some(own) = self.own_presence()?
            && own.shared
        {
            let key = self.new_own_key(true)?;
            // Sealing moves to the new key now that it is stored, also if queuing it for
            // the others fails (then the rotation runs again: it stays owed).
            self.note_after_flush(PresenceNote::OwnKey(Some(key.clone())));
            self.queue_to_all(Some(&key))?;
        }
        Ok(())
    }

    /// What to do with a received `PresenceKey`: the note to send after the flush.
    pub(super) fn presence_key_note(
        sender: &PeerKey,
        key: Option<[u8; 32]>,
    ) -> Option<PresenceNote> {
        peer_id_of_key(sender).map(|peer| PresenceNote::PeerKey(peer, key.map(PresenceKey)))
    }
}
