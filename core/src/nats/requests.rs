//! The NATS session's book of requests: every request it holds by id, the reconnect buffer
//! (requests not on the wire, in submit order, with their byte count), and a bounded ring of
//! recently answered tokens that tells a duplicate reply from a late one.
//!
//! Bookkeeping only, no protocol: [`crate::nats_session`] decides when a request moves
//! between the buffer and the wire; this keeps the indexes and the byte count consistent
//! however it moves (the byte count is what bounds memory, gateway.md section 1.5).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::inflight::RequestId;
use crate::time::Instant;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// In the reconnect buffer.
    Buffered,
    /// Queued for the socket; its frame starts at this offset of the output stream.
    Written { start: u64 },
}

/// A request the session holds, with its Router request already built.
#[derive(Debug)]
pub(crate) struct Pending {
    pub deadline: Instant,
    pub body: Bytes,
    pub headers: Vec<(&'static str, String)>,
    /// What it costs in the reconnect buffer.
    pub size: usize,
    /// Submit order, the buffer's key.
    seq: u64,
    place: Place,
    /// It waited in the reconnect buffer: the outage held it up, so its timeout tells
    /// nothing about the Router (written at the reconnect, it may have had too little of
    /// its time left for any Router to answer).
    held: bool,
}

impl Pending {
    pub fn new(
        deadline: Instant,
        body: Bytes,
        headers: Vec<(&'static str, String)>,
        size: usize,
    ) -> Pending {
        Pending {
            deadline,
            body,
            headers,
            size,
            seq: 0,
            place: Place::Buffered,
            held: false,
        }
    }

    pub fn place(&self) -> Place {
        self.place
    }

    /// Whether it ever waited in the reconnect buffer.
    pub fn held(&self) -> bool {
        self.held
    }
}

#[derive(Debug)]
pub(crate) struct RequestBook {
    requests: BTreeMap<RequestId, Pending>,
    /// Buffered requests by submit order.
    buffer: BTreeMap<u64, RequestId>,
    buffered_bytes: usize,
    next_seq: u64,
    recent: VecDeque<u64>,
    recent_set: BTreeSet<u64>,
    recent_capacity: usize,
}

impl RequestBook {
    pub fn new(recent_capacity: usize) -> RequestBook {
        RequestBook {
            requests: BTreeMap::new(),
            buffer: BTreeMap::new(),
            buffered_bytes: 0,
            next_seq: 0,
            recent: VecDeque::new(),
            recent_set: BTreeSet::new(),
            recent_capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn contains(&self, id: RequestId) -> bool {
        self.requests.contains_key(&id)
    }

    pub fn get(&self, id: RequestId) -> Option<&Pending> {
        self.requests.get(&id)
    }

    /// Every request's id, in id order.
    pub fn ids(&self) -> Vec<RequestId> {
        self.requests.keys().copied().collect()
    }

    /// Bytes the reconnect buffer holds.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    pub fn buffered_count(&self) -> usize {
        self.buffer.len()
    }

    /// Buffered requests in submit order.
    pub fn buffered_ids(&self) -> Vec<RequestId> {
        self.buffer.values().copied().collect()
    }

    /// Requests on the wire, with where their frames start in the output stream.
    pub fn written(&self) -> Vec<(RequestId, u64)> {
        self.requests
            .iter()
            .filter_map(|(id, p)| match p.place {
                Place::Written { start } => Some((*id, start)),
                Place::Buffered => None,
            })
            .collect()
    }

    /// Whether any request awaits its reply on the wire.
    pub fn any_written(&self) -> bool {
        self.requests
            .values()
            .any(|p| matches!(p.place, Place::Written { .. }))
    }

    /// Adds a request to the reconnect buffer, at the end of the submit order.
    pub fn insert_buffered(&mut self, id: RequestId, mut pending: Pending) {
        pending.seq = self.next_seq;
        self.next_seq += 1;
        pending.place = Place::Buffered;
        pending.held = true;
        self.buffered_bytes += pending.size;
        self.buffer.insert(pending.seq, id);
        self.requests.insert(id, pending);
    }

    /// Adds a request that goes straight to the wire.
    pub fn insert_written(&mut self, id: RequestId, mut pending: Pending, start: u64) {
        pending.seq = self.next_seq;
        self.next_seq += 1;
        pending.place = Place::Written { start };
        self.requests.insert(id, pending);
    }

    /// Takes the oldest buffered request out of the buffer. It stays in the book, and the
    /// caller writes it ([`RequestBook::mark_written`]) or fails it ([`RequestBook::remove`])
    /// next; both know its bytes have left the buffer already.
    pub fn pop_buffered(&mut self) -> Option<RequestId> {
        while let Some((_, id)) = self.buffer.pop_first() {
            if let Some(p) = self.requests.get(&id) {
                self.buffered_bytes -= p.size;
                return Some(id);
            }
        }
        None
    }

    /// Records that the request's frame was queued at `start`.
    pub fn mark_written(&mut self, id: RequestId, start: u64) {
        if let Some(p) = self.requests.get_mut(&id) {
            if p.place == Place::Buffered && self.buffer.remove(&p.seq).is_some() {
                self.buffered_bytes -= p.size;
            }
            p.place = Place::Written { start };
        }
    }

    /// Puts a written request back into the buffer (its bytes never reached the socket),
    /// keeping its place in the submit order.
    pub fn rebuffer(&mut self, id: RequestId) {
        if let Some(p) = self.requests.get_mut(&id) {
            if p.place != Place::Buffered {
                p.place = Place::Buffered;
                p.held = true;
                self.buffered_bytes += p.size;
                self.buffer.insert(p.seq, id);
            }
        }
    }

    /// Forgets a request wherever it is.
    pub fn remove(&mut self, id: RequestId) -> Option<Pending> {
        let p = self.requests.remove(&id)?;
        if p.place == Place::Buffered && self.buffer.remove(&p.seq).is_some() {
            self.buffered_bytes -= p.size;
        }
        Some(p)
    }

    /// Remembers an answered token, forgetting the oldest beyond the capacity.
    pub fn remember(&mut self, token: u64) {
        if self.recent_capacity == 0 {
            return;
        }
        if self.recent.len() >= self.recent_capacity {
            if let Some(old) = self.recent.pop_front() {
                self.recent_set.remove(&old);
            }
        }
        self.recent.push_back(token);
        self.recent_set.insert(token);
    }

    pub fn is_recent(&self, token: u64) -> bool {
        self.recent_set.contains(&token)
    }

    pub fn recent_len(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(size: usize) -> Pending {
        Pending::new(Instant::ZERO, Bytes::new(), Vec::new(), size)
    }

    /// The byte count follows every move; the buffer keeps submit order across a rebuffer.
    #[test]
    fn buffer_bytes_and_order_follow_every_move() {
        let mut b = RequestBook::new(2);
        b.insert_buffered(RequestId(1), pending(10));
        b.insert_written(RequestId(2), pending(20), 0);
        b.insert_buffered(RequestId(3), pending(30));
        assert_eq!((b.buffered_bytes(), b.buffered_count()), (40, 2));
        assert_eq!(b.written(), vec![(RequestId(2), 0)]);
        b.rebuffer(RequestId(2));
        assert_eq!(b.buffered_bytes(), 60);
        assert_eq!(
            b.buffered_ids(),
            vec![RequestId(1), RequestId(2), RequestId(3)],
            "a rebuffered request keeps its submit position"
        );
        assert_eq!(b.pop_buffered(), Some(RequestId(1)));
        assert_eq!(b.buffered_bytes(), 50);
        assert!(b.contains(RequestId(1)), "popped, not forgotten");
        b.mark_written(RequestId(1), 5);
        assert_eq!(
            b.buffered_bytes(),
            50,
            "popped bytes are not subtracted twice"
        );
        b.mark_written(RequestId(3), 9);
        assert_eq!(b.buffered_bytes(), 20);
        assert!(b.remove(RequestId(2)).is_some());
        assert_eq!((b.buffered_bytes(), b.buffered_count()), (0, 0));
        assert!(b.any_written());
        b.remove(RequestId(1));
        b.remove(RequestId(3));
        assert!(!b.any_written());
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn recent_ring_is_bounded() {
        let mut b = RequestBook::new(2);
        for t in 1..=3 {
            b.remember(t);
        }
        assert_eq!(b.recent_len(), 2);
        assert!(!b.is_recent(1));
        assert!(b.is_recent(2) && b.is_recent(3));
        let mut none = RequestBook::new(0);
        none.remember(1);
        assert!(!none.is_recent(1));
    }
}
