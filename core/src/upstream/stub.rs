//! The embedded stub Router (gateway.md section 3).
//!
//! With NATS disabled, every task is answered with
//! `{"message_id":"stub","status":"ok","result":{"echo":<client payload>}}`, so the gateway can
//! be run, benchmarked and tried by an IDE with nothing else installed. An optional delay makes
//! it behave like a Router that takes time, which is how the tests get requests in flight.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::inflight::RequestId;
use crate::time::Instant;
use crate::upstream::{Identity, Upstream, UpstreamEvent, UpstreamRequest};

const PREFIX: &[u8] = br#"{"message_id":"stub","status":"ok","result":{"echo":"#;
const SUFFIX: &[u8] = b"}}";

/// How the stub behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StubConfig {
    /// How long it takes to answer (zero: at once).
    pub delay: Duration,
}

/// The stub upstream.
#[derive(Debug, Default)]
pub struct StubUpstream {
    delay: Duration,
    /// A shutdown asked it to close; it has nothing to flush, so it is closed at once.
    closed: bool,
    /// Replies not yet due, by (due time, id).
    scheduled: BTreeMap<(Instant, RequestId), Bytes>,
    /// When each scheduled request is due, to find it again on cancel.
    due: BTreeMap<RequestId, Instant>,
    ready: VecDeque<UpstreamEvent>,
}

impl StubUpstream {
    /// A stub that answers after `delay` (zero: at once).
    pub fn new(delay: Duration) -> StubUpstream {
        StubUpstream {
            delay,
            ..StubUpstream::default()
        }
    }

    /// The stub's reply to a payload. The payload was validated as one JSON object, so
    /// splicing it in as a value yields valid JSON without parsing it again.
    pub fn reply_for(payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(PREFIX.len() + payload.len() + SUFFIX.len());
        b.put_slice(PREFIX);
        b.put_slice(payload);
        b.put_slice(SUFFIX);
        b.freeze()
    }
}

impl Upstream for StubUpstream {
    type Config = StubConfig;
    /// The stub does no I/O: there is nothing to report and nothing to do.
    type Input<'a> = std::convert::Infallible;
    type Action = std::convert::Infallible;

    fn new(config: StubConfig, _identity: Identity) -> StubUpstream {
        StubUpstream::new(config.delay)
    }

    fn handle_input(&mut self, input: Self::Input<'_>, _now: Instant) {
        match input {}
    }

    fn poll_action(&mut self) -> Option<Self::Action> {
        None
    }

    fn is_flush(action: &Self::Action) -> bool {
        match *action {}
    }

    fn handle_shutdown(&mut self, _now: Instant) {
        self.closed = true;
    }

    fn handle_abort(&mut self, _now: Instant) {
        self.closed = true;
    }

    fn is_closed(&self) -> bool {
        self.closed
    }

    fn assert_invariants(&self) {
        assert_eq!(
            self.scheduled.len(),
            self.due.len(),
            "stub: every scheduled reply is findable by its id"
        );
    }

    fn submit(&mut self, request: UpstreamRequest, now: Instant) {
        let payload = StubUpstream::reply_for(request.payload.json());
        if self.delay.is_zero() {
            self.ready.push_back(UpstreamEvent::Reply {
                id: request.id,
                payload,
            });
        } else {
            let due = now + self.delay;
            self.scheduled.insert((due, request.id), payload);
            self.due.insert(request.id, due);
        }
    }

    fn cancel(&mut self, id: RequestId) {
        if let Some(due) = self.due.remove(&id) {
            self.scheduled.remove(&(due, id));
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, id), payload) = entry.remove_entry();
            self.due.remove(&id);
            self.ready.push_back(UpstreamEvent::Reply { id, payload });
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.scheduled.first_key_value().map(|(&(t, _), _)| t)
    }

    fn poll_event(&mut self) -> Option<UpstreamEvent> {
        self.ready.pop_front()
    }

    fn pending(&self) -> usize {
        self.scheduled.len() + self.ready.len()
    }

    /// The stub is the Router: a request it holds past its deadline is the Router's delay.
    fn awaiting_router(&self, id: RequestId) -> bool {
        self.due.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::validate_task_payload;
    use crate::upstream::TaskKind;

    fn request(id: u64, payload: &str) -> UpstreamRequest {
        UpstreamRequest {
            id: RequestId(id),
            kind: TaskKind::Submit,
            payload: validate_task_payload(Bytes::copy_from_slice(payload.as_bytes())).unwrap(),
            deadline: Instant::ZERO + Duration::from_secs(30),
        }
    }

    #[test]
    fn reply_echoes_the_payload_as_json() {
        let r = StubUpstream::reply_for(br#"{"a":[1,"x"]}"#);
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"message_id":"stub","status":"ok","result":{"echo":{"a":[1,"x"]}}})
        );
    }

    #[test]
    fn without_delay_answers_at_once() {
        let mut s = StubUpstream::new(Duration::ZERO);
        s.submit(request(1, "{}"), Instant::ZERO);
        assert!(matches!(
            s.poll_event(),
            Some(UpstreamEvent::Reply {
                id: RequestId(1),
                ..
            })
        ));
        assert_eq!(s.poll_event(), None);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn with_delay_answers_at_the_due_time_and_cancel_forgets() {
        let mut s = StubUpstream::new(Duration::from_millis(100));
        let t0 = Instant::ZERO;
        s.submit(request(1, "{}"), t0);
        assert_eq!(s.pending(), 1);
        s.submit(request(2, "{}"), t0 + Duration::from_millis(10));
        assert_eq!(s.pending(), 2);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(100)));
        s.handle_timeout(t0 + Duration::from_millis(99));
        assert_eq!(s.poll_event(), None);
        s.cancel(RequestId(2));
        assert_eq!(s.pending(), 1);
        s.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(s.pending(), 1, "a due reply counts until it is polled");
        assert!(matches!(
            s.poll_event(),
            Some(UpstreamEvent::Reply {
                id: RequestId(1),
                ..
            })
        ));
        assert_eq!(s.poll_event(), None, "the cancelled one never comes");
        assert_eq!(s.pending(), 0);
        assert_eq!(s.poll_timeout(), None);
    }
}
