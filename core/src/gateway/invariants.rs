//! The gateway's invariants (gateway.md section 1), checked by simulators and fuzzers after
//! every step. Each state machine checks its own against its own configuration: the gateway
//! checks its bookkeeping here and asks the upstream for its own
//! ([`crate::upstream::Upstream::assert_invariants`]), so no harness carries a copy of a bound.

use super::{Gateway, READ_SLACK};
use crate::upstream::Upstream;

impl<U: Upstream> Gateway<U> {
    /// Checks the invariants that hold at every instant; panics with a description of the
    /// first violated one.
    pub fn assert_invariants(&self) {
        let owned: usize = self
            .clients
            .values()
            .map(|c| c.conn.waiting_requests().count())
            .sum();
        assert_eq!(
            owned,
            self.inflight.len(),
            "every in-flight request belongs to one live client"
        );
        for (id, client) in &self.clients {
            assert_eq!(
                client.conn.waiting_requests().count(),
                client.conn.waiting(),
                "conn {id:?}: waiting count = its waiting slots"
            );
            assert!(
                client.conn.waiting() <= self.config.connection.max_inflight,
                "per-connection limit"
            );
            for rid in client.conn.waiting_requests() {
                assert_eq!(
                    self.inflight.get(rid).map(|e| e.conn),
                    Some(*id),
                    "request {rid:?} points back to its connection"
                );
            }
            assert!(
                client.conn.buffered_input() <= self.config.connection.max_frame_bytes + READ_SLACK,
                "conn {id:?}: input buffer {} exceeds a frame plus one read",
                client.conn.buffered_input()
            );
        }
        assert!(
            self.inflight.len() <= self.config.max_inflight,
            "global in-flight limit"
        );
        assert!(
            self.admitted_connections <= self.config.max_connections,
            "connection limit"
        );
        assert_eq!(
            self.admitted_connections,
            self.clients.values().filter(|c| c.admitted).count(),
            "admitted connection count"
        );
        self.upstream.assert_invariants();
    }

    /// Whether nothing is held any more: no requests, timers or buffered bytes, here or in the
    /// upstream (the no-leak invariant, checked once traffic has stopped and deadlines have
    /// passed).
    pub fn is_quiescent(&self) -> bool {
        self.inflight.is_empty()
            && self.upstream.is_quiescent()
            && self.read_deadlines.is_empty()
            && self
                .clients
                .values()
                .all(|c| c.conn.unanswered_slots() == 0 && !c.conn.has_output())
    }
}
