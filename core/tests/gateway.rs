//! Scenario tests of the gateway through its public surface, with a scripted upstream whose
//! replies, failures, late and duplicate answers the test decides. Each test pins one rule of
//! ipc-protocol.md or gateway.md: exact codes, messages, counters, and the actions a shell sees.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use ipc_gateway_core::breaker::{BreakerConfig, BreakerState};
use ipc_gateway_core::connection::ConnectionLimits;
use ipc_gateway_core::error::ErrorCode;
use ipc_gateway_core::frame::{encode_frame, kind, FrameDecoder};
use ipc_gateway_core::gateway::AllowedUids;
use ipc_gateway_core::inflight::RequestId;
use ipc_gateway_core::nats_session::{LinkId, NatsConfig, NatsInput, NatsSession, SessionAction};
use ipc_gateway_core::upstream::{
    FailureCause, Identity, TaskKind, Upstream, UpstreamEvent, UpstreamRequest,
};
use ipc_gateway_core::{Action, ConnId, Gateway, GatewayConfig, Instant, PeerCredentials};
use serde_json::{json, Value};

use common::capture_logs;

/// An upstream that records what it is asked and answers only when the test says so.
struct Scripted {
    submitted: Vec<(RequestId, TaskKind, Bytes)>,
    cancelled: Vec<RequestId>,
    events: VecDeque<UpstreamEvent>,
    /// What `pending()` reports (the test decides what the upstream still holds).
    holding: usize,
    /// The link the test says is up (`None`: down). Requests wait for the Router only on a
    /// link that is up.
    link: Option<u64>,
}

/// What the test feeds the scripted upstream through `Gateway::handle_upstream`.
enum Script {
    /// An outcome to report.
    Event(UpstreamEvent),
    /// The link goes down (`None`) or the n-th comes up.
    Link(Option<u64>),
    /// What `pending()` reports from now on.
    Holding(usize),
}

impl Upstream for Scripted {
    type Config = Scripted;
    type Input<'a> = Script;
    type Action = std::convert::Infallible;

    fn new(config: Scripted, _identity: Identity) -> Scripted {
        config
    }
    fn handle_input(&mut self, input: Script, _now: Instant) {
        match input {
            Script::Event(e) => self.events.push_back(e),
            Script::Link(link) => self.link = link,
            Script::Holding(n) => self.holding = n,
        }
    }
    fn poll_action(&mut self) -> Option<Self::Action> {
        None
    }
    fn is_flush(action: &Self::Action) -> bool {
        match *action {}
    }
    fn handle_shutdown(&mut self, _now: Instant) {}
    fn handle_abort(&mut self, _now: Instant) {}
    fn is_closed(&self) -> bool {
        true
    }
    fn assert_invariants(&self) {}
    fn submit(&mut self, r: UpstreamRequest, _now: Instant) {
        self.submitted
            .push((r.id, r.kind, r.payload.json().clone()));
    }
    fn cancel(&mut self, id: RequestId) {
        self.cancelled.push(id);
    }
    fn handle_timeout(&mut self, _now: Instant) {}
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn poll_event(&mut self) -> Option<UpstreamEvent> {
        self.events.pop_front()
    }
    fn pending(&self) -> usize {
        self.holding
    }
    fn awaiting_router(&self, _id: RequestId) -> bool {
        self.link.is_some()
    }
    fn link(&self) -> Option<u64> {
        self.link
    }
}

impl Default for Scripted {
    fn default() -> Scripted {
        Scripted {
            submitted: Vec::new(),
            cancelled: Vec::new(),
            events: VecDeque::new(),
            holding: 0,
            link: Some(1),
        }
    }
}

fn ms(n: u64) -> Instant {
    Instant::ZERO + Duration::from_millis(n)
}

fn config() -> GatewayConfig {
    GatewayConfig {
        max_connections: 2,
        max_inflight: 3,
        connection: ConnectionLimits {
            max_frame_bytes: 1024,
            max_inflight: 2,
            read_timeout: Duration::from_millis(500),
            max_unsent_bytes: 4096,
        },
        request_timeout: Duration::from_millis(100),
        drain_timeout: Duration::from_millis(1000),
        breaker: BreakerConfig {
            failures_to_open: 3,
            open_duration: Duration::from_millis(1000),
            max_open_duration: Duration::from_millis(4000),
            max_probes: 1,
            successes_to_close: 1,
        },
        health_grace: Duration::from_millis(5000),
        allowed_uids: AllowedUids::Only([1000].into()),
        seed: 42,
        version: "9.9.9".into(),
    }
}

/// A gateway with a scripted upstream, and a shell that records what it was told and writes
/// every byte it is offered.
struct Harness {
    gw: Gateway<Scripted>,
    received: BTreeMap<ConnId, Vec<u8>>,
    actions: Vec<Action<Infallible>>,
}

const USER: PeerCredentials = PeerCredentials {
    uid: Some(1000),
    gid: Some(1000),
    pid: Some(7),
};

impl Harness {
    fn new(config: GatewayConfig) -> Harness {
        Harness {
            gw: Gateway::<Scripted>::new(config, Scripted::default()),
            received: BTreeMap::new(),
            actions: Vec::new(),
        }
    }

    fn open(&mut self, now: Instant) -> ConnId {
        let id = self.gw.handle_client_opened(USER, now);
        self.pump(now);
        id
    }

    fn send(&mut self, id: ConnId, k: u8, payload: &[u8], now: Instant) {
        self.gw
            .handle_client_bytes(id, &encode_frame(k, payload), now);
        self.pump(now);
    }

    fn task(&mut self, id: ConnId, payload: &str, now: Instant) {
        self.send(id, kind::TASK_SUBMIT, payload.as_bytes(), now);
    }

    fn reply(&mut self, event: UpstreamEvent, now: Instant) {
        self.gw.handle_upstream(Script::Event(event), now);
        self.pump(now);
    }

    fn tick(&mut self, now: Instant) {
        self.gw.handle_timeout(now);
        self.pump(now);
    }

    /// Drains actions and writes all output, like a shell whose clients read everything.
    fn pump(&mut self, now: Instant) {
        while let Some(a) = self.gw.poll_action() {
            self.actions.push(a);
            if let Action::Transmit(id) = a {
                let out: Vec<u8> = self.gw.client_output(id).flatten().copied().collect();
                self.received.entry(id).or_default().extend_from_slice(&out);
                self.gw.handle_client_written(id, out.len(), now);
            }
        }
    }

    /// Complete frames received on `id`, as (type, payload).
    fn frames(&self, id: ConnId) -> Vec<(u8, Vec<u8>)> {
        let mut d = FrameDecoder::new(1 << 24);
        d.push(self.received.get(&id).map_or(&[][..], |v| v));
        std::iter::from_fn(|| d.next_frame().ok().flatten())
            .map(|f| (f.kind, f.payload.to_vec()))
            .collect()
    }

    fn errors(&self, id: ConnId) -> Vec<Value> {
        self.frames(id)
            .into_iter()
            .filter(|(k, _)| *k == kind::RESPONSE_ERROR)
            .map(|(_, p)| serde_json::from_slice::<Value>(&p).unwrap()["error"].clone())
            .collect()
    }

    fn closed(&self, id: ConnId) -> bool {
        self.actions.contains(&Action::Close(id))
    }

    fn submitted(&self) -> Vec<RequestId> {
        self.gw.upstream().submitted.iter().map(|s| s.0).collect()
    }
}

fn ok(id: RequestId, body: &'static str) -> UpstreamEvent {
    UpstreamEvent::Reply {
        id,
        payload: Bytes::from_static(body.as_bytes()),
    }
}

fn unavailable(id: RequestId) -> UpstreamEvent {
    UpstreamEvent::Failed {
        id,
        code: ErrorCode::RouterUnavailable,
        message: "Router unavailable: no responders".into(),
        cause: FailureCause::NoResponders,
    }
}

/// Router replies go back verbatim, in request order, even when they arrive out of order.
#[test]
fn replies_are_verbatim_and_in_request_order() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, r#"{"a":1}"#, ms(0));
    h.send(c, kind::TASK_QUERY, b"", ms(0));
    let ids = h.submitted();
    assert_eq!(h.gw.upstream().submitted[1].1, TaskKind::Query);
    assert_eq!(
        h.gw.upstream().submitted[1].2.as_ref(),
        b"{}",
        "empty payload means {{}}"
    );
    h.reply(ok(ids[1], r#"{"second":true}"#), ms(1));
    assert!(
        h.frames(c).is_empty(),
        "the second reply waits for the first"
    );
    h.reply(
        ok(
            ids[0],
            r#"{"ok":false,"error":{"code":"policy_not_found"}}"#,
        ),
        ms(2),
    );
    assert_eq!(
        h.frames(c),
        vec![
            (
                kind::RESPONSE_OK,
                br#"{"ok":false,"error":{"code":"policy_not_found"}}"#.to_vec()
            ),
            (kind::RESPONSE_OK, br#"{"second":true}"#.to_vec()),
        ]
    );
    assert_eq!(h.gw.stats().responses.get(&0), Some(&2));
    assert_eq!(h.gw.stats().task_requests, [1, 1, 0]);
    assert_eq!(h.gw.inflight_len(), 0);
}

/// A request the Router does not answer gets error 5 at its deadline, not before, naming its
/// request id; the upstream is told to forget it, and its late reply is dropped and counted.
#[test]
fn deadline_gives_timeout_and_the_late_reply_is_dropped() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, "{}", ms(10));
    let id = h.submitted()[0];
    assert_eq!(h.gw.poll_timeout(), Some(ms(110)));
    h.tick(ms(109));
    assert!(h.frames(c).is_empty());
    h.tick(ms(110));
    let errors = h.errors(c);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], 5);
    assert_eq!(errors[0]["retryable"], true);
    assert_eq!(errors[0]["request_id"], h.gw.request_id_text(id));
    assert!(errors[0]["message"].as_str().unwrap().contains("100 ms"));
    assert_eq!(h.gw.upstream().cancelled, vec![id]);
    assert_eq!(h.gw.stats().router_timeouts, 1);
    h.reply(ok(id, "{}"), ms(150));
    assert_eq!(
        h.frames(c).len(),
        1,
        "the late reply never reaches the client"
    );
    assert_eq!(h.gw.stats().dropped_replies, 1);
    // A duplicate of an answered request is dropped too.
    h.task(c, "{}", ms(200));
    let second = h.submitted()[1];
    h.reply(ok(second, "{}"), ms(201));
    h.reply(ok(second, "{}"), ms(202));
    assert_eq!(h.frames(c).len(), 2);
    assert_eq!(h.gw.stats().dropped_replies, 2);
    assert!(h.gw.is_quiescent());
}

/// The request-duration histogram observes each answered task request once, from the
/// instant its frame was decoded to the instant its reply was queued, by injected time: a
/// Router reply, a timeout and an admission refusal count; a PING and a request whose client
/// left before the answer do not.
#[test]
fn request_duration_histogram_counts_answered_task_requests() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, "{}", ms(10));
    let replied = h.submitted()[0];
    h.reply(ok(replied, "{}"), ms(12));
    h.task(c, "{}", ms(20));
    h.tick(ms(120));
    assert_eq!(h.gw.stats().router_timeouts, 1);
    h.send(c, kind::TASK_SUBMIT, b"[1]", ms(130));
    h.send(c, kind::PING, b"", ms(130));
    let gone = h.open(ms(140));
    h.task(gone, "{}", ms(140));
    let abandoned = h.submitted()[2];
    h.gw.handle_client_closed(gone, ms(150));
    h.pump(ms(150));
    h.reply(ok(abandoned, "{}"), ms(160));

    let stats = h.gw.stats();
    assert_eq!(stats.task_requests, [4, 0, 0]);
    let hist = &stats.request_duration;
    assert_eq!(
        hist.count(),
        3,
        "reply, timeout and refusal; not the abandoned one"
    );
    assert_eq!(hist.sum(), Duration::from_millis(2 + 100));
    let per_bucket: BTreeMap<Option<Duration>, u64> =
        hist.buckets().filter(|&(_, n)| n > 0).collect();
    assert_eq!(
        per_bucket,
        BTreeMap::from([
            (Some(Duration::from_micros(50)), 1), // the refusal, answered at once
            (Some(Duration::from_micros(2_500)), 1), // the reply after 2 ms
            (Some(Duration::from_millis(100)), 1), // the timeout, exactly at 100 ms
        ])
    );
}

/// Request ids carry the seeded instance prefix and differ between requests and seeds.
#[test]
fn request_ids_are_unique_and_seeded() {
    let a = Gateway::<Scripted>::new(config(), Scripted::default());
    let b = Gateway::<Scripted>::new(
        GatewayConfig {
            seed: 43,
            ..config()
        },
        Scripted::default(),
    );
    assert_ne!(
        a.request_id_text(RequestId(1)),
        a.request_id_text(RequestId(2))
    );
    assert_ne!(
        a.request_id_text(RequestId(1)),
        b.request_id_text(RequestId(1))
    );
    assert!(a.request_id_text(RequestId(12)).ends_with("-12"));
}

/// The breaker opens after consecutive Router timeouts, answers error 8 without asking the
/// upstream while open, half-opens after the open time and closes on a probe's success.
#[test]
fn breaker_lifecycle_through_the_gateway() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    for i in 0..3 {
        h.task(c, "{}", ms(i * 100));
        h.tick(ms(i * 100 + 100));
    }
    assert_eq!(h.gw.breaker_state(), BreakerState::Open);
    let asked = h.submitted().len();
    h.task(c, "{}", ms(10));
    assert_eq!(h.submitted().len(), asked, "nothing is sent while open");
    let last = h.errors(c).pop().unwrap();
    assert_eq!(
        (last["code"].as_u64(), last.get("request_id")),
        (Some(8), None)
    );
    assert!(last["message"]
        .as_str()
        .unwrap()
        .contains("circuit breaker open"));
    assert_eq!(h.gw.poll_timeout(), Some(ms(1300)));
    h.tick(ms(1002));
    assert_eq!(h.gw.breaker_state(), BreakerState::Open);
    h.tick(ms(1300));
    assert_eq!(h.gw.breaker_state(), BreakerState::HalfOpen);
    h.task(c, "{}", ms(1003));
    h.task(c, "{}", ms(1003));
    assert_eq!(h.submitted().len(), asked + 1, "one probe at a time");
    let probe = *h.submitted().last().unwrap();
    h.reply(ok(probe, "{}"), ms(1004));
    assert_eq!(h.gw.breaker_state(), BreakerState::Closed);
    let t = &h.gw.stats().breaker_transitions;
    assert_eq!(
        (t.get("open"), t.get("half_open"), t.get("closed")),
        (Some(&1), Some(&1), Some(&1))
    );
    // A payload-size failure says nothing about the Router's health.
    for i in 0..3 {
        h.task(c, "{}", ms(1010 + i));
        let id = *h.submitted().last().unwrap();
        let too_big = UpstreamEvent::Failed {
            id,
            code: ErrorCode::FrameTooLarge,
            message: "too large".into(),
            cause: FailureCause::Refused,
        };
        h.reply(too_big, ms(1010 + i));
    }
    assert_eq!(h.gw.breaker_state(), BreakerState::Closed);
    assert_eq!(h.errors(c).last().unwrap()["code"], 3);
}

/// Router timeouts open the breaker; no responders, link failures and timeouts of requests
/// that never reached a connected server do not (gateway.md section 4).
#[test]
fn only_router_timeouts_open_the_breaker() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    for i in 0..5 {
        h.task(c, "{}", ms(i));
        let id = *h.submitted().last().unwrap();
        h.reply(unavailable(id), ms(i));
        h.task(c, "{}", ms(i));
        let id = *h.submitted().last().unwrap();
        let lost = UpstreamEvent::Failed {
            id,
            code: ErrorCode::RouterUnavailable,
            message: "lost".into(),
            cause: FailureCause::Link,
        };
        h.reply(lost, ms(i));
    }
    assert_eq!(
        h.gw.breaker_state(),
        BreakerState::Closed,
        "no responders and link failures"
    );
    h.gw.handle_upstream(Script::Link(None), ms(100));
    for i in 0..3 {
        h.task(c, "{}", ms(100 + i * 200));
        h.tick(ms(100 + i * 200 + 100));
    }
    assert_eq!(
        h.gw.breaker_state(),
        BreakerState::Closed,
        "timeouts while the link is down"
    );
    h.gw.handle_upstream(Script::Link(Some(2)), ms(1000));
    for i in 0..3 {
        h.task(c, "{}", ms(1000 + i * 200));
        h.tick(ms(1000 + i * 200 + 100));
    }
    assert_eq!(h.gw.breaker_state(), BreakerState::Open);
}

/// Requests the Router took with it when it went away (a later request got "no responders")
/// time out without counting; a Router that stays subscribed and is silent still opens the
/// breaker.
#[test]
fn requests_lost_with_a_departed_router_do_not_open_the_breaker() {
    let mut h = Harness::new(GatewayConfig {
        max_inflight: 10,
        ..config()
    });
    let a = h.open(ms(0));
    let b = h.open(ms(0));
    // Three requests reach the Router (3 failures would open the breaker), then it goes away:
    // the next request gets "no responders".
    h.task(a, "{}", ms(0));
    h.task(a, "{}", ms(0));
    h.task(b, "{}", ms(0));
    h.task(b, "{}", ms(1));
    assert_eq!(h.submitted().len(), 4);
    let newest = *h.submitted().last().unwrap();
    h.reply(unavailable(newest), ms(1));
    h.tick(ms(150));
    let codes =
        |h: &Harness, c| -> Vec<Value> { h.errors(c).iter().map(|e| e["code"].clone()).collect() };
    assert_eq!(
        codes(&h, a),
        [5, 5],
        "the requests at the departed Router time out"
    );
    assert_eq!(codes(&h, b), [5, 8]);
    assert_eq!(h.gw.breaker_state(), BreakerState::Closed);
    for i in 0..3 {
        h.task(b, "{}", ms(200 + i * 200));
        h.tick(ms(200 + i * 200 + 100));
    }
    assert_eq!(h.gw.breaker_state(), BreakerState::Open, "a silent Router");
}

/// A breaker opened by timeouts on a link that is then lost closes when a link is back, so the
/// first request after the reconnect is sent to the Router.
#[test]
fn a_reconnect_closes_a_breaker_the_lost_link_opened() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    for i in 0..3 {
        h.task(c, "{}", ms(i * 200));
        h.tick(ms(i * 200 + 100));
    }
    assert_eq!(h.gw.breaker_state(), BreakerState::Open);
    h.gw.handle_upstream(Script::Link(None), ms(600));
    h.tick(ms(600));
    assert_eq!(h.gw.breaker_state(), BreakerState::Open);
    h.gw.handle_upstream(Script::Link(Some(2)), ms(700));
    h.tick(ms(700));
    assert_eq!(h.gw.breaker_state(), BreakerState::Closed);
    let asked = h.submitted().len();
    h.task(c, "{}", ms(701));
    assert_eq!(
        h.submitted().len(),
        asked + 1,
        "the first request after the reconnect"
    );
}

/// The global in-flight limit sheds with error 7 at once and counts it; per connection, the
/// limit pauses reading and a reply resumes it with ResumeRead.
#[test]
fn global_limit_sheds_and_per_connection_limit_pauses() {
    let mut h = Harness::new(config());
    let a = h.open(ms(0));
    let b = h.open(ms(0));
    h.task(a, "{}", ms(0));
    h.task(a, "{}", ms(0));
    assert!(!h.gw.wants_read(a), "two in flight on a: reading pauses");
    h.task(a, "{}", ms(0));
    assert_eq!(
        h.submitted().len(),
        2,
        "the third frame waits in the buffer, not refused"
    );
    h.task(b, "{}", ms(0));
    h.task(b, "{}", ms(0));
    assert_eq!(h.submitted().len(), 3);
    assert_eq!(h.gw.stats().backpressure_rejections, 1);
    assert!(
        h.frames(b).is_empty(),
        "the refusal waits behind b's first request"
    );
    let b_first = h.submitted()[2];
    h.reply(ok(b_first, "{}"), ms(0));
    let frames = h.frames(b);
    assert_eq!(frames[0].0, kind::RESPONSE_OK);
    assert_eq!(h.errors(b)[0]["code"], 7);
    assert!(
        h.errors(b)[0].get("request_id").is_none(),
        "no id is assigned before admission"
    );
    let first = h.submitted()[0];
    h.reply(ok(first, "{}"), ms(1));
    assert_eq!(
        h.submitted().len(),
        4,
        "the buffered frame is decoded once a slot frees"
    );
    assert!(
        !h.gw.wants_read(a),
        "and a is full again, so reading never resumed"
    );
    assert!(!h.actions.contains(&Action::ResumeRead(a)));
    let second = h.submitted()[1];
    h.reply(ok(second, "{}"), ms(2));
    assert!(h.gw.wants_read(a));
    assert!(
        h.actions.contains(&Action::ResumeRead(a)),
        "the shell must read again"
    );
}

/// The connection limit refuses with error 7 and a close; uids not allowed get error 9 and a
/// close; neither counts against the limit.
#[test]
fn connection_limit_and_uid_refusals() {
    let mut h = Harness::new(config());
    let a = h.open(ms(0));
    let _b = h.open(ms(0));
    let c = h.open(ms(0));
    assert_eq!(h.errors(c)[0]["code"], 7);
    assert!(h.errors(c)[0]["message"]
        .as_str()
        .unwrap()
        .contains("limit of 2"));
    assert!(h.closed(c));
    let stranger = h.gw.handle_client_opened(
        PeerCredentials {
            uid: Some(5),
            gid: None,
            pid: None,
        },
        ms(0),
    );
    h.pump(ms(0));
    assert_eq!(h.errors(stranger)[0]["code"], 9);
    assert!(h.errors(stranger)[0]["message"]
        .as_str()
        .unwrap()
        .contains("uid 5"));
    assert!(h.closed(stranger));
    let unknown = h.gw.handle_client_opened(PeerCredentials::default(), ms(0));
    h.pump(ms(0));
    assert_eq!(h.errors(unknown)[0]["code"], 9);
    let s = h.gw.stats();
    assert_eq!(
        (
            s.connections_total,
            s.connections_rejected_limit,
            s.connections_rejected_uid
        ),
        (5, 1, 2)
    );
    h.gw.handle_client_closed(a, ms(1));
    let d = h.open(ms(1));
    assert!(!h.closed(d), "a freed place admits the next");
    assert_eq!(h.gw.connection_count(), 2);
}

/// A client that leaves cancels its requests upstream; their replies are dropped later.
#[test]
fn leaving_cancels_requests() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, "{}", ms(0));
    h.task(c, "{}", ms(0));
    let ids = h.submitted();
    h.gw.handle_client_closed(c, ms(1));
    assert_eq!(h.gw.upstream().cancelled, ids);
    assert_eq!(h.gw.inflight_len(), 0);
    h.reply(ok(ids[0], "{}"), ms(2));
    assert_eq!(h.gw.stats().dropped_replies, 1);
    assert!(h.gw.is_quiescent());
    assert_eq!(h.gw.connection_count(), 0);
}

/// A half-close (EOF) still gets every answer, then the close.
#[test]
fn half_close_answers_then_closes() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, "{}", ms(0));
    h.gw.handle_client_eof(c, ms(0));
    h.pump(ms(0));
    assert!(!h.closed(c));
    let id = h.submitted()[0];
    h.reply(ok(id, r#"{"x":1}"#), ms(1));
    assert_eq!(
        h.frames(c),
        vec![(kind::RESPONSE_OK, br#"{"x":1}"#.to_vec())]
    );
    assert!(h.closed(c));
    assert!(h.gw.upstream().cancelled.is_empty());
}

/// A partial frame held past the read timeout gets error 5 "read timeout" and a close; a
/// decode error gets its code and a close after the replies owed before it.
#[test]
fn read_timeout_and_decode_errors_close_after_the_last_reply() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.gw.handle_client_bytes(c, &[0, 0, 0], ms(10));
    assert_eq!(h.gw.poll_timeout(), Some(ms(510)));
    h.tick(ms(509));
    assert!(!h.closed(c));
    h.tick(ms(510));
    assert_eq!(h.errors(c)[0]["code"], 5);
    assert!(h.errors(c)[0]["message"]
        .as_str()
        .unwrap()
        .contains("read timeout"));
    assert!(h.closed(c));
    assert_eq!(h.gw.stats().connections_closed_read_timeout, 1);

    let d = h.open(ms(600));
    h.task(d, "{}", ms(600));
    h.gw.handle_client_bytes(d, &[0, 0, 0, 6, 2, kind::PING], ms(600));
    h.pump(ms(600));
    assert!(!h.closed(d), "the task before the bad frame is still owed");
    let id = *h.submitted().last().unwrap();
    h.reply(ok(id, "{}"), ms(601));
    let frames = h.frames(d);
    assert_eq!(frames[0].0, kind::RESPONSE_OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&frames[1].1).unwrap()["error"]["code"],
        1
    );
    assert!(h.closed(d));
}

/// Local answers: PONG, the capabilities JSON, error 2 for other types, error 4 for a bad
/// payload; all in order, and none touches the upstream.
#[test]
fn local_answers_in_order() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.send(c, kind::PING, b"ignored", ms(0));
    h.send(c, kind::CAPABILITIES, b"", ms(0));
    h.send(c, 0x99, b"", ms(0));
    h.send(c, kind::TASK_SUBMIT, b"[1]", ms(0));
    let frames = h.frames(c);
    assert_eq!(frames[0], (kind::PONG, vec![]));
    let caps: Value = serde_json::from_slice(&frames[1].1).unwrap();
    assert_eq!(caps["max_payload_size"], 1018);
    assert_eq!(
        caps["gateway"],
        json!({"name":"ipc-gateway","version":"9.9.9"})
    );
    let e2: Value = serde_json::from_slice(&frames[2].1).unwrap();
    assert_eq!(e2["error"]["message"], "Unsupported message type 0x99");
    let e4: Value = serde_json::from_slice(&frames[3].1).unwrap();
    assert_eq!(e4["error"]["code"], 4);
    assert!(h.submitted().is_empty());
    assert_eq!(h.gw.stats().local_requests, [1, 1, 1]);
    assert!(!h.closed(c));
}

/// Draining: new tasks get error 6, in-flight ones are answered normally, and the drain
/// completes once everything is written; at the drain deadline leftovers get error 6.
#[test]
fn drain_answers_in_flight_refuses_new_and_completes() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, "{}", ms(0));
    assert!(!h.gw.is_shutting_down());
    h.gw.handle_shutdown(ms(1));
    h.pump(ms(1));
    assert!(h.gw.is_shutting_down());
    h.tick(ms(50));
    assert!(
        h.frames(c).is_empty(),
        "before the drain deadline in-flight requests wait"
    );
    assert_eq!(h.gw.inflight_len(), 1);
    h.task(c, "{}", ms(2));
    assert_eq!(h.submitted().len(), 1);
    assert!(!h
        .actions
        .contains(&Action::ShutdownComplete { forced: false }));
    let id = h.submitted()[0];
    h.reply(ok(id, "{}"), ms(3));
    assert!(h
        .actions
        .contains(&Action::ShutdownComplete { forced: false }));
    let frames = h.frames(c);
    assert_eq!(
        frames[0].0,
        kind::RESPONSE_OK,
        "in flight: answered normally"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&frames[1].1).unwrap()["error"]["code"],
        6
    );

    let mut h = Harness::new(GatewayConfig {
        request_timeout: Duration::from_secs(60),
        ..config()
    });
    let c = h.open(ms(0));
    h.task(c, "{}", ms(0));
    h.gw.handle_shutdown(ms(0));
    h.pump(ms(0));
    assert_eq!(h.gw.poll_timeout(), Some(ms(1000)));
    h.tick(ms(1000));
    let e = h.errors(c);
    assert_eq!(
        (e[0]["code"].as_u64(), e[0]["request_id"].is_string()),
        (Some(6), true)
    );
    assert!(h
        .actions
        .contains(&Action::ShutdownComplete { forced: false }));
    assert_eq!(h.gw.upstream().cancelled, h.submitted());
}

/// A client that does not read is closed at the output cap, and its requests are cancelled.
#[test]
fn output_cap_closes_and_cancels() {
    let mut gw = Gateway::<Scripted>::new(config(), Scripted::default());
    let c = gw.handle_client_opened(USER, ms(0));
    gw.handle_client_bytes(c, &encode_frame(kind::TASK_SUBMIT, b"{}"), ms(0));
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(900));
    let mut pings = Vec::new();
    for _ in 0..5 {
        pings.extend_from_slice(&encode_frame(kind::CAPABILITIES, b""));
    }
    gw.handle_client_bytes(c, &pings, ms(0));
    while gw.poll_action().is_some() {}
    let id = gw.upstream().submitted[0].0;
    gw.handle_upstream(
        Script::Event(UpstreamEvent::Reply {
            id,
            payload: Bytes::from(body),
        }),
        ms(1),
    );
    let mut actions = Vec::new();
    while let Some(a) = gw.poll_action() {
        actions.push(a);
    }
    assert!(
        !actions.contains(&Action::Close(c)),
        "capabilities alone stay under 4096"
    );
    gw.handle_client_bytes(c, &encode_frame(kind::TASK_SUBMIT, b"{}"), ms(2));
    gw.handle_client_bytes(c, &encode_frame(kind::TASK_SUBMIT, b"{}"), ms(2));
    let ids: Vec<RequestId> = gw.upstream().submitted.iter().map(|s| s.0).collect();
    let big = format!("{{\"pad\":\"{}\"}}", "y".repeat(3000));
    gw.handle_upstream(
        Script::Event(UpstreamEvent::Reply {
            id: ids[1],
            payload: Bytes::from(big),
        }),
        ms(3),
    );
    let mut actions = Vec::new();
    while let Some(a) = gw.poll_action() {
        actions.push(a);
    }
    assert!(actions.contains(&Action::Close(c)));
    assert_eq!(gw.stats().connections_closed_output_cap, 1);
    assert_eq!(gw.upstream().cancelled, vec![ids[2]]);
    assert_eq!(gw.connection_count(), 0);
}

/// poll_timeout is the earliest of every part's deadline; nothing pending means None.
#[test]
fn poll_timeout_is_the_earliest_deadline() {
    let mut h = Harness::new(config());
    assert_eq!(h.gw.poll_timeout(), None);
    let c = h.open(ms(0));
    h.task(c, "{}", ms(50)); // deadline 150
    h.gw.handle_client_bytes(c, &[0], ms(60)); // read timeout at 560
    assert_eq!(h.gw.poll_timeout(), Some(ms(150)));
    h.tick(ms(150));
    assert_eq!(h.gw.poll_timeout(), Some(ms(560)));
}

/// Quiescent means nothing at all is held: each kind of leftover alone makes it false.
#[test]
fn quiescence_requires_every_part_to_be_empty() {
    let mut h = Harness::new(config());
    assert!(h.gw.is_quiescent());
    let c = h.open(ms(0));
    assert!(h.gw.is_quiescent(), "an idle connection holds nothing");
    // A request in flight.
    h.task(c, "{}", ms(0));
    assert_eq!(h.gw.inflight_len(), 1);
    assert!(!h.gw.is_quiescent());
    h.reply(ok(h.submitted()[0], "{}"), ms(1));
    assert!(h.gw.is_quiescent());
    // Something the upstream still holds.
    h.gw.handle_upstream(Script::Holding(1), ms(1));
    assert!(!h.gw.is_quiescent());
    h.gw.handle_upstream(Script::Holding(0), ms(1));
    // A partial frame, whose read deadline is a timer.
    h.gw.handle_client_bytes(c, &[0, 0], ms(2));
    assert!(!h.gw.is_quiescent());
    h.gw.handle_client_bytes(c, &[0, 6, 1, kind::PING], ms(2));
    // An answer not yet written (the shell has not pumped).
    assert!(!h.gw.is_quiescent(), "the PONG is still queued");
    h.pump(ms(2));
    assert!(h.gw.is_quiescent());
    // An answered reply held behind a waiting request.
    h.task(c, "{}", ms(3));
    h.send(c, kind::PING, b"", ms(3));
    h.reply(ok(h.submitted()[1], "{}"), ms(4));
    assert!(h.gw.is_quiescent());
}

/// The drain completes only once queued replies are written; a client that never reads is
/// given up on at the drain deadline plus a 2 s flush grace, not before.
#[test]
fn drain_waits_for_output_then_gives_up_on_clients_that_do_not_read() {
    let mut gw = Gateway::<Scripted>::new(config(), Scripted::default());
    let c = gw.handle_client_opened(USER, ms(0));
    gw.handle_client_bytes(c, &encode_frame(kind::PING, b""), ms(0));
    gw.handle_shutdown(ms(0));
    let completed = |gw: &mut Gateway<Scripted>| {
        std::iter::from_fn(|| gw.poll_action())
            .any(|a| a == Action::ShutdownComplete { forced: false })
    };
    assert!(!completed(&mut gw), "the PONG is not written yet");
    let queued: usize = gw.client_output(c).map(<[u8]>::len).sum();
    gw.handle_client_written(c, queued - 1, ms(1));
    assert!(!completed(&mut gw), "one byte is still queued");
    gw.handle_client_written(c, 1, ms(1));
    assert!(completed(&mut gw));

    let mut gw = Gateway::<Scripted>::new(config(), Scripted::default());
    let c = gw.handle_client_opened(USER, ms(0));
    gw.handle_client_bytes(c, &encode_frame(kind::PING, b""), ms(0));
    gw.handle_shutdown(ms(0));
    assert_eq!(gw.poll_timeout(), Some(ms(1000)));
    gw.handle_timeout(ms(1000));
    assert!(!completed(&mut gw), "the flush grace has only begun");
    assert_eq!(gw.poll_timeout(), Some(ms(3000)));
    gw.handle_timeout(ms(2999));
    assert!(!completed(&mut gw));
    gw.handle_timeout(ms(3000));
    assert!(
        completed(&mut gw),
        "given up at the deadline plus the grace"
    );
    assert_eq!(gw.poll_timeout(), None, "nothing more to wait for");
}

/// The shell's read size and the core's input bound agree (the invariant allows one frame plus
/// one read of this size).
#[test]
fn read_slack_is_the_shells_read_size() {
    assert_eq!(ipc_gateway_core::gateway::READ_SLACK, 64 * 1024);
}

/// Polls every action the gateway has queued.
fn actions<U: Upstream>(gw: &mut Gateway<U>) -> Vec<Action<U::Action>> {
    std::iter::from_fn(|| gw.poll_action()).collect()
}

/// A gateway over a NATS session whose handshake is done; returns its link.
fn nats_gateway() -> (Gateway<NatsSession>, LinkId) {
    let mut nats = NatsConfig::default();
    nats.set_servers("nats://127.0.0.1:4222").unwrap();
    let mut gw = Gateway::<NatsSession>::new(
        GatewayConfig {
            allowed_uids: AllowedUids::Any,
            ..config()
        },
        nats,
    );
    gw.handle_timeout(ms(0));
    let link = match actions(&mut gw).as_slice() {
        [Action::Upstream(SessionAction::Connect { link, .. })] => *link,
        other => panic!("expected one Connect, got {other:?}"),
    };
    gw.handle_upstream(NatsInput::Connected(link), ms(1));
    gw.handle_upstream(
        NatsInput::Received(link, b"INFO {\"server_id\":\"a\"}\r\n"),
        ms(1),
    );
    assert_eq!(actions(&mut gw), vec![], "CONNECT+SUB+PING are held");
    assert_eq!(gw.poll_timeout(), Some(ms(1)), "and due at once");
    gw.handle_timeout(ms(1));
    assert_eq!(
        actions(&mut gw),
        vec![Action::Upstream(SessionAction::Transmit { link })]
    );
    let written: usize = gw.upstream().output().map(<[u8]>::len).sum();
    gw.handle_upstream(NatsInput::Written(link, written), ms(1));
    gw.handle_upstream(NatsInput::Received(link, b"PONG\r\n"), ms(2));
    (gw, link)
}

/// The call contract's one ordering rule: the NATS flush is held while client actions come out
/// at once; `poll_timeout` reports it due, and `handle_timeout` hands it out after the rest.
#[test]
fn the_upstream_flush_is_held_until_handle_timeout() {
    let (mut gw, link) = nats_gateway();
    let a = gw.handle_client_opened(USER, ms(3));
    let b = gw.handle_client_opened(USER, ms(3));
    gw.handle_client_bytes(a, &encode_frame(kind::TASK_SUBMIT, b"{}"), ms(3));
    gw.handle_client_bytes(b, &encode_frame(kind::PING, b""), ms(3));
    assert_eq!(
        actions(&mut gw),
        vec![Action::Transmit(b)],
        "the PONG is not held"
    );
    gw.handle_timeout(ms(3));
    assert_eq!(
        actions(&mut gw),
        vec![Action::Upstream(SessionAction::Transmit { link })],
        "the request leaves at the turn's handle_timeout"
    );
}

/// The shell stops at ShutdownComplete, so the session's Disconnect comes before it, both
/// after a drain and after a second signal.
#[test]
fn the_upstream_disconnect_comes_before_shutdown_complete() {
    let (mut gw, link) = nats_gateway();
    gw.handle_shutdown(ms(3));
    assert_eq!(
        actions(&mut gw),
        vec![
            Action::Upstream(SessionAction::Disconnect { link }),
            Action::ShutdownComplete { forced: false }
        ]
    );

    let (mut gw, link) = nats_gateway();
    let a = gw.handle_client_opened(USER, ms(3));
    gw.handle_client_bytes(a, &encode_frame(kind::TASK_SUBMIT, b"{}"), ms(3));
    gw.handle_shutdown(ms(4));
    gw.handle_shutdown(ms(5));
    let all = actions(&mut gw);
    let at = |wanted: &Action<SessionAction>| all.iter().position(|a| a == wanted);
    let disconnect = at(&Action::Upstream(SessionAction::Disconnect { link }));
    let done = at(&Action::ShutdownComplete { forced: true });
    assert!(
        disconnect.is_some() && done.is_some() && disconnect < done,
        "{all:?}"
    );
}

// ----- health (gateway.md section 5) -----------------------------------------------------

fn health(gw: &Gateway<Scripted>) -> (&'static str, String) {
    let h = gw.health();
    (
        h.status.name(),
        h.reason.map(|r| r.to_string()).unwrap_or_default(),
    )
}

fn says(status: &'static str, reason: &str) -> (&'static str, String) {
    (status, reason.to_owned())
}

/// No link: DEGRADED ("nats reconnecting") for the grace period, then UNHEALTHY at its exact
/// end, through `poll_timeout` alone, with no other input; a link back is HEALTHY. A short
/// outage is DEGRADED only, and leaves no deadline behind.
#[test]
fn health_follows_the_link_and_the_grace_period_ends_on_time() {
    let mut h = Harness::new(config());
    assert_eq!(health(&h.gw), says("HEALTHY", ""), "before any input");
    h.open(ms(0));
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
    assert_eq!(h.gw.poll_timeout(), None, "nothing to wait for");
    h.gw.handle_upstream(Script::Link(None), ms(100));
    assert_eq!(health(&h.gw), says("DEGRADED", "nats reconnecting"));
    assert_eq!(
        h.gw.poll_timeout(),
        Some(ms(5100)),
        "the grace period's end"
    );
    h.tick(ms(5099));
    assert_eq!(health(&h.gw), says("DEGRADED", "nats reconnecting"));
    assert_eq!(h.gw.poll_timeout(), Some(ms(5100)));
    h.tick(h.gw.poll_timeout().unwrap());
    assert_eq!(health(&h.gw), says("UNHEALTHY", "nats down for 5.0 s"));
    assert_eq!(h.gw.poll_timeout(), None, "the deadline is spent");
    h.tick(ms(7300));
    assert_eq!(
        health(&h.gw),
        says("UNHEALTHY", "nats down for 7.2 s"),
        "the reason grows with the outage"
    );
    h.gw.handle_upstream(Script::Link(Some(2)), ms(8000));
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
    // A short outage.
    h.gw.handle_upstream(Script::Link(None), ms(9000));
    assert_eq!(health(&h.gw), says("DEGRADED", "nats reconnecting"));
    h.gw.handle_upstream(Script::Link(Some(3)), ms(9500));
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
    assert_eq!(h.gw.poll_timeout(), None, "no deadline left behind");
    let changes = &h.gw.stats().health_changes;
    assert_eq!(
        (
            changes.get("DEGRADED"),
            changes.get("UNHEALTHY"),
            changes.get("HEALTHY")
        ),
        (Some(&2), Some(&1), Some(&2)),
        "one count per change, not per input"
    );
}

/// Before the first link was ever up (a NATS session still connecting at start) the gateway
/// counts as connecting, with the grace period from its first input.
#[test]
fn health_before_the_first_link_counts_from_the_first_input() {
    let mut h = Harness {
        gw: Gateway::<Scripted>::new(
            config(),
            Scripted {
                link: None,
                ..Scripted::default()
            },
        ),
        received: BTreeMap::new(),
        actions: Vec::new(),
    };
    assert_eq!(health(&h.gw), says("DEGRADED", "nats connecting"));
    assert_eq!(h.gw.poll_timeout(), None, "no time before the first input");
    h.tick(ms(200));
    assert_eq!(h.gw.poll_timeout(), Some(ms(5200)));
    h.tick(ms(5199));
    assert_eq!(health(&h.gw), says("DEGRADED", "nats connecting"));
    h.tick(ms(5200));
    assert_eq!(health(&h.gw), says("UNHEALTHY", "nats down for 5.0 s"));
    h.gw.handle_upstream(Script::Link(Some(1)), ms(6000));
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
    h.gw.handle_upstream(Script::Link(None), ms(6001));
    assert_eq!(health(&h.gw), says("DEGRADED", "nats reconnecting"));
}

/// The breaker: Open is UNHEALTHY, HalfOpen DEGRADED, Closed again HEALTHY.
#[test]
fn health_follows_the_breaker() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    for i in 0..2 {
        h.task(c, "{}", ms(i * 100));
        h.tick(ms(i * 100 + 100));
    }
    assert_eq!(health(&h.gw), says("HEALTHY", ""), "two timeouts of three");
    h.task(c, "{}", ms(200));
    h.tick(ms(300));
    assert_eq!(h.gw.breaker_state(), BreakerState::Open);
    assert_eq!(health(&h.gw), says("UNHEALTHY", "breaker open"));
    h.tick(ms(1299));
    assert_eq!(health(&h.gw), says("UNHEALTHY", "breaker open"));
    h.tick(ms(1300));
    assert_eq!(h.gw.breaker_state(), BreakerState::HalfOpen);
    assert_eq!(health(&h.gw), says("DEGRADED", "breaker half-open"));
    h.task(c, "{}", ms(1301));
    let probe = *h.submitted().last().unwrap();
    h.reply(ok(probe, "{}"), ms(1302));
    assert_eq!(h.gw.breaker_state(), BreakerState::Closed);
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
    let changes = &h.gw.stats().health_changes;
    assert_eq!(
        (
            changes.get("UNHEALTHY"),
            changes.get("DEGRADED"),
            changes.get("HEALTHY")
        ),
        (Some(&1), Some(&1), Some(&1))
    );
}

/// In flight at 80 % of the global limit or more is DEGRADED: 4 of 5 is, 3 of 5 is not.
#[test]
fn health_follows_the_inflight_limit() {
    let mut h = Harness::new(GatewayConfig {
        max_inflight: 5,
        max_connections: 3,
        ..config()
    });
    let a = h.open(ms(0));
    let b = h.open(ms(0));
    h.task(a, "{}", ms(1));
    h.task(a, "{}", ms(1));
    h.task(b, "{}", ms(1));
    assert_eq!(h.gw.inflight_len(), 3);
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
    h.task(b, "{}", ms(2));
    assert_eq!(health(&h.gw), says("DEGRADED", "in-flight 4 of 5"));
    h.reply(ok(h.submitted()[0], "{}"), ms(3));
    assert_eq!(h.gw.inflight_len(), 3);
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
}

/// A shutdown is UNHEALTHY ("draining") from the signal on, whatever else holds; the
/// reason of several UNHEALTHY rows is the first of the table, and a DEGRADED row never hides
/// an UNHEALTHY one.
#[test]
fn health_while_draining_and_the_precedence_of_reasons() {
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    h.task(c, "{}", ms(0));
    h.gw.handle_shutdown(ms(10));
    assert_eq!(h.gw.shutdown_state().name(), "draining");
    assert_eq!(health(&h.gw), says("UNHEALTHY", "draining"));
    h.tick(ms(1010));
    assert_ne!(h.gw.shutdown_state().name(), "draining");
    assert_eq!(health(&h.gw), says("UNHEALTHY", "draining"));
    assert_eq!(h.gw.stats().health_changes.get("UNHEALTHY"), Some(&1));

    // Breaker Open and no link past the grace period: the breaker names it; the link back
    // closes the breaker the lost link opened, and all is well.
    let mut h = Harness::new(config());
    let c = h.open(ms(0));
    for i in 0..3 {
        h.task(c, "{}", ms(i * 100));
        h.tick(ms(i * 100 + 100));
    }
    h.gw.handle_upstream(Script::Link(None), ms(300));
    assert_eq!(health(&h.gw), says("UNHEALTHY", "breaker open"));
    h.tick(ms(1300)); // HalfOpen, still no link
    assert_eq!(health(&h.gw), says("DEGRADED", "nats reconnecting"));
    h.tick(ms(5300));
    assert_eq!(health(&h.gw), says("UNHEALTHY", "nats down for 5.0 s"));
    h.gw.handle_upstream(Script::Link(Some(2)), ms(5400));
    assert_eq!(h.gw.breaker_state(), BreakerState::Closed);
    assert_eq!(health(&h.gw), says("HEALTHY", ""));
}

/// Each change of status is logged once (`health_changed`, component `health`, from, to,
/// reason), not once per input.
#[test]
fn health_changes_are_logged_once_each() {
    let scenario = || {
        let mut h = Harness::new(config());
        let c = h.open(ms(0));
        h.gw.handle_upstream(Script::Link(None), ms(100));
        for i in 0..10 {
            h.send(c, kind::PING, b"", ms(200 + i * 100));
        }
        h.tick(ms(5100));
        for i in 0..10 {
            h.send(c, kind::PING, b"", ms(5200 + i * 100));
        }
        h.gw.handle_upstream(Script::Link(Some(2)), ms(6500));
        h.send(c, kind::PING, b"", ms(6600));
    };
    let logs = capture_logs(scenario);
    let changes: Vec<Vec<String>> = logs
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.iter().any(|(k, v)| k == "event" && v == "health_changed"))
        .map(|f| {
            ["component", "from", "to", "reason"]
                .iter()
                .map(|name| {
                    f.iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            vec!["health", "HEALTHY", "DEGRADED", "nats reconnecting"],
            vec!["health", "DEGRADED", "UNHEALTHY", "nats down for 5.0 s"],
            vec!["health", "UNHEALTHY", "HEALTHY", ""],
        ]
    );
}

/// `/ready` (gateway.md section 5): ready with a link; "nats not connected" as soon as the
/// link is lost (no grace period: requests sent now would wait or fail), ready again when it
/// is back; "draining" once a shutdown has begun, whatever the link.
#[test]
fn readiness_follows_the_link_and_the_drain() {
    let mut h = Harness::new(config());
    h.open(ms(0));
    assert_eq!(h.gw.readiness(), Ok(()));
    h.gw.handle_upstream(Script::Link(None), ms(100));
    assert_eq!(h.gw.readiness(), Err("nats not connected"));
    assert_eq!(
        health(&h.gw).0,
        "DEGRADED",
        "health still within the grace period"
    );
    h.gw.handle_upstream(Script::Link(Some(2)), ms(200));
    assert_eq!(h.gw.readiness(), Ok(()));
    h.gw.handle_shutdown(ms(300));
    assert_eq!(h.gw.readiness(), Err("draining"));
}

/// gateway.md section 9: a refused credential turns health UNHEALTHY with the server's words
/// at the input that brought them, long before the grace period; the next link that comes up
/// makes it HEALTHY again. Also before any link was ever up (a wrong password at start).
#[test]
fn a_refused_credential_is_unhealthy_at_once_until_a_link_comes_up() {
    let (mut gw, link) = nats_gateway();
    let shown = |gw: &Gateway<NatsSession>| {
        let h = gw.health();
        (
            h.status.name(),
            h.reason.map(|r| r.to_string()).unwrap_or_default(),
        )
    };
    assert_eq!(shown(&gw).0, "HEALTHY");
    gw.handle_upstream(
        NatsInput::Received(link, b"-ERR 'User Authentication Expired'\r\n"),
        ms(10),
    );
    assert_eq!(
        shown(&gw),
        (
            "UNHEALTHY",
            "nats auth failed: User Authentication Expired".to_owned()
        )
    );
    assert_eq!(gw.upstream().stats().auth_failures, 1);
    let connect = |all: Vec<Action<SessionAction>>| {
        all.into_iter().find_map(|a| match a {
            Action::Upstream(SessionAction::Connect { link, .. }) => Some(link),
            _ => None,
        })
    };
    // A link that was up reconnects at once (the first attempt after a loss is immediate);
    // refused again, the next attempt waits for the backoff: never a loop.
    let link = connect(actions(&mut gw)).expect("the first reconnect is immediate");
    gw.handle_upstream(NatsInput::Connected(link), ms(11));
    gw.handle_upstream(
        NatsInput::Received(link, b"INFO {}\r\n-ERR 'Authorization Violation'\r\n"),
        ms(12),
    );
    assert_eq!(
        shown(&gw),
        (
            "UNHEALTHY",
            "nats auth failed: Authorization Violation".to_owned()
        )
    );
    // The turn's handle_timeout (a held flush is due at once) starts no attempt either.
    gw.handle_timeout(ms(12));
    assert_eq!(connect(actions(&mut gw)), None, "no immediate second retry");
    let retry = gw.poll_timeout().unwrap();
    assert!(retry >= ms(12 + 50), "{retry:?}");
    gw.handle_timeout(retry);
    let link = connect(actions(&mut gw)).expect("a new Connect after the backoff");
    gw.handle_upstream(NatsInput::Connected(link), retry);
    gw.handle_upstream(NatsInput::Received(link, b"INFO {}\r\nPONG\r\n"), retry);
    assert_eq!(shown(&gw), ("HEALTHY", String::new()));
}
