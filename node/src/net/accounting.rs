//! Who the bytes waiting in the network task belong to, and the bounds on them: the
//! network a connection comes from ([`NetGroup`]), the reader of a mailbox answer
//! ([`Reader`]) and the answers' bytes not written yet ([`MailboxSending`]), and inbound
//! requests waiting for their capability ([`QueuedBytes`], [`INBOUND_QUEUE_BYTES`]).
//! No I/O: the network task counts, the relay's mailbox task reads the counts.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

/// Bytes of mailbox answers handed to the network and not written yet, in all, per peer
/// and per network (see [`super::NetHandle::respond_mailbox`]). Counted up by the caller
/// before the answer is handed over, down by the network task once written, failed or
/// dropped.
#[derive(Debug, Default)]
pub(super) struct MailboxSending {
    pub(super) total: AtomicU64,
    per_reader: std::sync::Mutex<ReaderBytes>,
}

/// Bytes on their way, by peer and by the network the peers connect from.
#[derive(Debug, Default)]
struct ReaderBytes {
    peers: HashMap<PeerId, u64>,
    nets: HashMap<NetGroup, u64>,
}

/// Subtracts `size` from `key`'s count, forgetting it at zero.
fn count_down<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, key: &K, size: u64) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(size);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl MailboxSending {
    fn readers(&self) -> std::sync::MutexGuard<'_, ReaderBytes> {
        self.per_reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn add(&self, reader: Reader, size: u64) {
        self.total.fetch_add(size, Ordering::Relaxed);
        let mut r = self.readers();
        *r.peers.entry(reader.peer).or_default() += size;
        *r.nets.entry(reader.net).or_default() += size;
    }

    pub(super) fn sub(&self, reader: Reader, size: u64) {
        self.total.fetch_sub(size, Ordering::Relaxed);
        let mut r = self.readers();
        count_down(&mut r.peers, &reader.peer, size);
        count_down(&mut r.nets, &reader.net, size);
    }

    pub(super) fn to(&self, peer: &PeerId) -> u64 {
        self.readers().peers.get(peer).copied().unwrap_or(0)
    }

    pub(super) fn to_net(&self, net: &NetGroup) -> u64 {
        self.readers().nets.get(net).copied().unwrap_or(0)
    }
}

/// The network a connection comes from, as far as limits go: its IPv4 /24 or IPv6 /48 (an
/// attacker's identities cost nothing, its addresses do). Connections without an IP address
/// of their own share [`NetGroup::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetGroup {
    /// The first three bytes of an IPv4 address.
    V4([u8; 3]),
    /// The first six bytes of an IPv6 address.
    V6([u8; 6]),
    /// No IP address in the connection's address.
    Other,
}

impl NetGroup {
    /// The group of the first IP address in `addr` (for a relayed connection, the relay's).
    pub fn of(addr: &Multiaddr) -> Self {
        for p in addr.iter() {
            match p {
                Protocol::Ip4(ip) => {
                    let [a, b, c, _] = ip.octets();
                    return NetGroup::V4([a, b, c]);
                }
                Protocol::Ip6(ip) => {
                    let o = ip.octets();
                    return match ip.to_ipv4_mapped() {
                        Some(v4) => {
                            let [a, b, c, _] = v4.octets();
                            NetGroup::V4([a, b, c])
                        }
                        None => NetGroup::V6([o[0], o[1], o[2], o[3], o[4], o[5]]),
                    };
                }
                _ => {}
            }
        }
        NetGroup::Other
    }
}

/// Who an answer is on its way to: the peer and the network it connects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reader {
    /// The authenticated peer.
    pub peer: PeerId,
    /// The network of the connection its request came on.
    pub net: NetGroup,
}

/// The most bytes of inbound requests of one protocol that may wait for their capability
/// (queued in its channel or taken but not dropped yet). Past it, a request is dropped as
/// when the channel is full, and its sender retries. Without it, peers sending frames
/// near the limit (96 / 128 KiB) while the capability is slow could queue a channel's
/// 4,096 of them: 384 - 512 MiB.
pub const INBOUND_QUEUE_BYTES: usize = 32 * 1024 * 1024;

/// One inbound request's share of its protocol's queued bytes, given back when dropped.
#[derive(Debug)]
pub(super) struct QueuedBytes {
    total: Arc<AtomicUsize>,
    size: usize,
}

impl QueuedBytes {
    /// Counts `size` more bytes, unless that would pass [`INBOUND_QUEUE_BYTES`].
    pub(super) fn take(total: &Arc<AtomicUsize>, size: usize) -> Option<Self> {
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + size <= INBOUND_QUEUE_BYTES).then_some(queued + size)
            })
            .ok()?;
        Some(Self {
            total: total.clone(),
            size,
        })
    }
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.total.fetch_sub(self.size, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_inbound_bytes_are_bounded_and_given_back_on_drop() {
        let total = Arc::new(AtomicUsize::new(0));
        let half = INBOUND_QUEUE_BYTES / 2;
        let a = QueuedBytes::take(&total, half).unwrap();
        let b = QueuedBytes::take(&total, half).unwrap();
        assert!(QueuedBytes::take(&total, 1).is_none(), "past the bound");
        assert_eq!(total.load(Ordering::Acquire), INBOUND_QUEUE_BYTES);
        drop(a);
        assert_eq!(total.load(Ordering::Acquire), half);
        let c = QueuedBytes::take(&total, 1).unwrap();
        drop((b, c));
        assert_eq!(total.load(Ordering::Acquire), 0);
    }
}
