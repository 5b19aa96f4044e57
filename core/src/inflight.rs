//! The in-flight table: every request that has been handed to the upstream and not answered.
//!
//! Each entry knows which connection and reply slot it answers, its deadline and its breaker
//! permit. Expiry order is `(deadline, id)`: ids grow monotonically, so two requests with the
//! same deadline expire in the order they arrived, on every run.
//!
//! An entry leaves the table exactly once, by one of: a reply ([`InFlightTable::remove`]),
//! its deadline ([`InFlightTable::pop_expired`]), or its client leaving or the drain ending
//! ([`InFlightTable::remove`] again, by the gateway). A reply for an id that is no longer here
//! is late, duplicate or unknown; the gateway drops and counts it.
//!
//! Layout, chosen for the per-request cost (it was a fifth of the core's time with two
//! B-trees): entries live in a hash map keyed by id with a fixed multiplicative hasher (lookups
//! only, never iterated, so no order leaks out); deadlines live in a queue sorted by
//! `(deadline, id)`. With one request timeout and time that only moves forward, new deadlines
//! are never earlier than the last, so inserting is a push at the back (a sorted insert
//! otherwise). Removing by reply leaves a stale queue element behind (lazy deletion): stale
//! elements at the front are dropped at once, so the front is always live, and the queue is
//! compacted when stale elements outnumber live ones, which keeps it within twice the live
//! count (bounded by the in-flight limit) at an amortised O(1) per request.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::breaker::Permit;
use crate::connection::ConnId;
use crate::time::Instant;

/// A gateway-assigned request id. Ids come from a counter and are never reused in a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What the table remembers about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub conn: ConnId,
    /// The reply slot on the connection that this request's answer fills.
    pub slot: u64,
    pub deadline: Instant,
    pub started: Instant,
    pub permit: Permit,
    /// The request's IPC message type, for logs and metrics.
    pub kind: u8,
}

/// Hashes a sequential id by one multiplication (Fibonacci hashing): deterministic across
/// runs, unlike `RandomState`, and spreads consecutive ids over the table's high bits.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
pub struct InFlightTable {
    entries: HashMap<RequestId, InFlight, BuildHasherDefault<IdHasher>>,
    /// Sorted by `(deadline, id)`; may hold stale elements, never at the front.
    deadlines: VecDeque<(Instant, RequestId)>,
    next_id: u64,
}

impl std::fmt::Debug for InFlightTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightTable")
            .field("live", &self.entries.len())
            .field("queued_deadlines", &self.deadlines.len())
            .finish()
    }
}

impl InFlightTable {
    pub fn new() -> InFlightTable {
        InFlightTable::default()
    }

    /// Adds a request and returns its new id.
    pub fn insert(&mut self, entry: InFlight) -> RequestId {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        let key = (entry.deadline, id);
        if self.deadlines.back().is_none_or(|last| *last <= key) {
            self.deadlines.push_back(key);
        } else {
            let at = self.deadlines.partition_point(|k| *k < key);
            self.deadlines.insert(at, key);
        }
        self.entries.insert(id, entry);
        id
    }

    /// Takes a request out of the table; `None` if it already left (late or duplicate reply).
    pub fn remove(&mut self, id: RequestId) -> Option<InFlight> {
        let entry = self.entries.remove(&id)?;
        self.tidy();
        Some(entry)
    }

    /// Takes out the request with the earliest deadline if that deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(RequestId, InFlight)> {
        let &(deadline, id) = self.deadlines.front()?;
        if deadline > now {
            return None;
        }
        self.deadlines.pop_front();
        let entry = self.entries.remove(&id);
        assert!(entry.is_some(), "the front of the deadline queue was stale");
        self.tidy();
        entry.map(|e| (id, e))
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(d, _)| d)
    }

    pub fn get(&self, id: RequestId) -> Option<&InFlight> {
        self.entries.get(&id)
    }

    /// All ids, earliest deadline first (for draining).
    pub fn ids(&self) -> Vec<RequestId> {
        self.deadlines
            .iter()
            .map(|&(_, id)| id)
            .filter(|id| self.entries.contains_key(id))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Elements kept in the deadline queue, live and stale (for the bounded-memory checks).
    pub fn queued_deadlines(&self) -> usize {
        self.deadlines.len()
    }

    fn is_live(&self, &(deadline, id): &(Instant, RequestId)) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.deadline == deadline)
    }

    /// Restores the queue's two promises: a live front, and at most twice as many elements as
    /// live entries (plus a little slack so small tables do not compact on every removal).
    fn tidy(&mut self) {
        while let Some(front) = self.deadlines.front() {
            if self.is_live(front) {
                break;
            }
            self.deadlines.pop_front();
        }
        if self.deadlines.len() > 2 * self.entries.len() + 32 {
            let entries = &self.entries;
            self.deadlines
                .retain(|&(d, id)| entries.get(&id).is_some_and(|e| e.deadline == d));
        }
        assert!(
            self.deadlines.len() >= self.entries.len(),
            "a live request lost its deadline"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{BreakerConfig, CircuitBreaker};
    use proptest::prelude::*;
    use std::time::Duration;

    fn entry(conn: u64, slot: u64, deadline_ms: u64) -> InFlight {
        let permit = CircuitBreaker::new(BreakerConfig::default())
            .try_acquire(Instant::ZERO)
            .unwrap();
        InFlight {
            conn: ConnId(conn),
            slot,
            deadline: Instant::ZERO + Duration::from_millis(deadline_ms),
            started: Instant::ZERO,
            permit,
            kind: 1,
        }
    }

    fn ms(n: u64) -> Instant {
        Instant::ZERO + Duration::from_millis(n)
    }

    #[test]
    fn equal_deadlines_expire_in_arrival_order() {
        let mut t = InFlightTable::new();
        let a = t.insert(entry(1, 0, 100));
        let b = t.insert(entry(2, 0, 50));
        let c = t.insert(entry(3, 0, 100));
        assert_eq!(t.next_deadline(), Some(ms(50)));
        assert_eq!(t.pop_expired(ms(49)), None);
        let order: Vec<RequestId> =
            std::iter::from_fn(|| t.pop_expired(ms(100)).map(|(id, _)| id)).collect();
        assert_eq!(order, vec![b, a, c]);
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn a_request_leaves_exactly_once() {
        let mut t = InFlightTable::new();
        let a = t.insert(entry(1, 7, 10));
        assert_eq!(t.get(a).map(|e| e.slot), Some(7));
        assert_eq!(t.remove(a).map(|e| e.conn), Some(ConnId(1)));
        assert_eq!(t.remove(a), None, "duplicate reply");
        assert_eq!(t.pop_expired(ms(1_000)), None, "no timeout after the reply");
    }

    /// Removing from anywhere but the front leaves a stale deadline (lazy), and stale ones
    /// are compacted away once they outnumber the live ones, so the queue stays bounded.
    #[test]
    fn deadline_queue_is_lazy_but_bounded() {
        let mut t = InFlightTable::new();
        let ids: Vec<RequestId> = (0..200).map(|i| t.insert(entry(0, i, 1_000 + i))).collect();
        assert_eq!(
            (t.len(), t.queued_deadlines(), t.is_empty()),
            (200, 200, false)
        );
        t.remove(ids[150]);
        assert_eq!(
            (t.len(), t.queued_deadlines()),
            (199, 200),
            "one stale element kept"
        );
        for id in &ids[1..150] {
            t.remove(*id);
            assert!(t.queued_deadlines() <= 2 * t.len() + 32);
            assert!(t.queued_deadlines() >= t.len());
        }
        assert_eq!(t.len(), 50);
        assert!(t.queued_deadlines() < 2 * 50 + 32 + 1);
        // Every live request still expires, in order, after compaction.
        let expired: Vec<RequestId> =
            std::iter::from_fn(|| t.pop_expired(ms(10_000)).map(|(id, _)| id)).collect();
        let mut live = vec![ids[0]];
        live.extend(ids[151..].iter().copied());
        assert_eq!(expired, live);
        assert!(t.is_empty());
        assert_eq!(t.queued_deadlines(), 0);
    }

    /// Compaction starts exactly when the queue exceeds twice the live count plus 32.
    #[test]
    fn compaction_threshold_is_twice_the_live_count_plus_32() {
        let mut t = InFlightTable::new();
        let ids: Vec<RequestId> = (0..200).map(|i| t.insert(entry(0, i, 1_000 + i))).collect();
        // Remove from the back: never the front, so every removal leaves a stale element.
        for id in ids[84..].iter().rev() {
            t.remove(*id);
        }
        assert_eq!(
            (t.len(), t.queued_deadlines()),
            (84, 200),
            "200 > 2*84+32 is false: lazy"
        );
        t.remove(ids[83]);
        assert_eq!(
            (t.len(), t.queued_deadlines()),
            (83, 83),
            "200 > 2*83+32: compacted"
        );
    }

    /// A front removal drops stale elements at once: the next deadline is always a live one.
    #[test]
    fn next_deadline_skips_removed_requests() {
        let mut t = InFlightTable::new();
        let a = t.insert(entry(0, 0, 10));
        let _b = t.insert(entry(0, 1, 20));
        t.remove(a);
        assert_eq!(t.next_deadline(), Some(ms(20)));
        assert_eq!(t.queued_deadlines(), 1);
        assert_eq!(
            format!("{t:?}"),
            "InFlightTable { live: 1, queued_deadlines: 1 }"
        );
    }

    /// Sequential ids spread over the hash space (the map's speed depends on it).
    #[test]
    fn id_hasher_spreads_sequential_ids_and_bytes() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let build = BuildHasherDefault::<IdHasher>::default();
        let hashes: std::collections::BTreeSet<u64> =
            (0..1000u64).map(|i| build.hash_one(RequestId(i))).collect();
        assert_eq!(hashes.len(), 1000);
        let top_bits: std::collections::BTreeSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(top_bits.len() > 100, "high bits vary: {}", top_bits.len());
        let bytes = |b: &[u8]| {
            let mut h = build.build_hasher();
            h.write(b);
            h.finish()
        };
        assert_ne!(bytes(&[1]), bytes(&[2]));
        assert_ne!(bytes(&[1, 2]), bytes(&[2, 1]));
        assert_ne!(bytes(&[3]), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(usize),
        Expire(u64),
    }

    proptest! {
        /// The table agrees with a plain list model: same members, same expiry order, never a
        /// request answered twice.
        #[test]
        fn table_matches_a_list_model(ops in proptest::collection::vec(prop_oneof![
            (0u64..50).prop_map(Op::Insert),
            any::<usize>().prop_map(Op::Remove),
            (0u64..60).prop_map(Op::Expire),
        ], 1..200)) {
            let mut t = InFlightTable::new();
            let mut model: Vec<(u64, RequestId)> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(d) => {
                        let id = t.insert(entry(0, 0, d));
                        model.push((d, id));
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (_, id) = model.remove(i % model.len());
                        prop_assert!(t.remove(id).is_some());
                        prop_assert!(t.remove(id).is_none());
                    }
                    Op::Remove(_) => {}
                    Op::Expire(now) => {
                        let mut due: Vec<(u64, RequestId)> = model.iter().copied().filter(|(d, _)| *d <= now).collect();
                        due.sort();
                        model.retain(|(d, _)| *d > now);
                        let got: Vec<RequestId> = std::iter::from_fn(|| t.pop_expired(ms(now)).map(|(id, _)| id)).collect();
                        prop_assert_eq!(got, due.into_iter().map(|(_, id)| id).collect::<Vec<_>>());
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                prop_assert_eq!(t.next_deadline(), model.iter().map(|(d, _)| ms(*d)).min());
                prop_assert!(t.queued_deadlines() <= 2 * t.len() + 32, "deadline queue unbounded");
                let mut ids: Vec<(u64, RequestId)> = model.clone();
                ids.sort();
                prop_assert_eq!(t.ids(), ids.into_iter().map(|(_, id)| id).collect::<Vec<_>>());
            }
        }
    }
}
