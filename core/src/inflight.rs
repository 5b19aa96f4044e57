//! The in-flight table: every request that has been handed to the upstream and not answered.
//!
//! Each entry knows which connection and reply slot it answers, its deadline and its breaker
//! permit. Deadlines are kept in a map ordered by `(deadline, id)`: ids grow monotonically, so
//! two requests with the same deadline expire in the order they arrived, on every run.
//!
//! An entry leaves the table exactly once, by one of: a reply ([`InFlightTable::remove`]),
//! its deadline ([`InFlightTable::pop_expired`]), or its client leaving or the drain ending
//! ([`InFlightTable::remove`] again, by the gateway). A reply for an id that is no longer here
//! is late, duplicate or unknown; the gateway drops and counts it.

use std::collections::BTreeMap;

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

#[derive(Debug, Default)]
pub struct InFlightTable {
    entries: BTreeMap<RequestId, InFlight>,
    deadlines: BTreeMap<(Instant, RequestId), ()>,
    next_id: u64,
}

impl InFlightTable {
    pub fn new() -> InFlightTable {
        InFlightTable::default()
    }

    /// Adds a request and returns its new id.
    pub fn insert(&mut self, entry: InFlight) -> RequestId {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        self.deadlines.insert((entry.deadline, id), ());
        self.entries.insert(id, entry);
        self.check();
        id
    }

    /// Takes a request out of the table; `None` if it already left (late or duplicate reply).
    pub fn remove(&mut self, id: RequestId) -> Option<InFlight> {
        let entry = self.entries.remove(&id)?;
        self.deadlines.remove(&(entry.deadline, id));
        self.check();
        Some(entry)
    }

    /// Takes out the request with the earliest deadline if that deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(RequestId, InFlight)> {
        let (&(deadline, id), ()) = self.deadlines.first_key_value()?;
        if deadline > now {
            return None;
        }
        let entry = self.remove(id)?;
        Some((id, entry))
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first_key_value().map(|(&(d, _), ())| d)
    }

    pub fn get(&self, id: RequestId) -> Option<&InFlight> {
        self.entries.get(&id)
    }

    /// All ids, oldest first (for draining).
    pub fn ids(&self) -> Vec<RequestId> {
        self.entries.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The two indexes describe the same set of requests (stays on in release builds: it is
    /// what the simulations lean on, and it costs two length reads).
    fn check(&self) {
        assert_eq!(
            self.entries.len(),
            self.deadlines.len(),
            "in-flight indexes diverged"
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
            }
        }
    }
}
