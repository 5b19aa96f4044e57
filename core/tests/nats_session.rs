//! Scenario tests of the NATS session through its public surface, against a scripted server:
//! hand-written server bytes (INFO, PONG, MSG, the 503 HMSG as nats-server writes it, -ERR)
//! in, and the client bytes the session queues parsed back out. Each test pins one rule of
//! gateway.md section 2 or router.md sections 3 and 4.

mod common;

use std::time::Duration;

use bytes::Bytes;
use ipc_gateway_core::error::ErrorCode;
use ipc_gateway_core::inflight::RequestId;
use ipc_gateway_core::nats_session::{
    to_base36, LinkId, NatsConfig, NatsInput, NatsSession, SessionAction, SessionState,
    MAX_REPLY_BYTES,
};
use ipc_gateway_core::payload::validate_task_payload;
use ipc_gateway_core::router_envelope::EnvelopeMode;
use ipc_gateway_core::upstream::{Identity, TaskKind, Upstream, UpstreamEvent, UpstreamRequest};
use ipc_gateway_core::Instant;
use proptest::prelude::*;
use serde_json::{json, Value};

use common::{capture_logs, LogCapture};

fn ms(n: u64) -> Instant {
    Instant::ZERO + Duration::from_millis(n)
}

type Headers = Vec<(String, String)>;

/// One operation the session wrote, as a server would read it.
#[derive(Debug, Clone, PartialEq)]
enum ClientOp {
    Connect(Value),
    Sub(String, u64),
    Ping,
    Pong,
    Pub {
        subject: String,
        reply: String,
        headers: Option<Vec<(String, String)>>,
        payload: Vec<u8>,
    },
}

fn parse_client(wire: &[u8]) -> Vec<ClientOp> {
    let mut ops = Vec::new();
    let mut i = 0;
    while i < wire.len() {
        let end = i + wire[i..].windows(2).position(|w| w == b"\r\n").unwrap();
        let line = std::str::from_utf8(&wire[i..end]).unwrap().to_owned();
        i = end + 2;
        let (op, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let args: Vec<&str> = rest.split(' ').collect();
        match op {
            "CONNECT" => ops.push(ClientOp::Connect(serde_json::from_str(rest).unwrap())),
            "SUB" => ops.push(ClientOp::Sub(args[0].into(), args[1].parse().unwrap())),
            "PING" => ops.push(ClientOp::Ping),
            "PONG" => ops.push(ClientOp::Pong),
            "PUB" => {
                let n: usize = args[2].parse().unwrap();
                ops.push(ClientOp::Pub {
                    subject: args[0].into(),
                    reply: args[1].into(),
                    headers: None,
                    payload: wire[i..i + n].to_vec(),
                });
                i += n + 2;
            }
            "HPUB" => {
                let h: usize = args[2].parse().unwrap();
                let t: usize = args[3].parse().unwrap();
                let block = std::str::from_utf8(&wire[i..i + h]).unwrap();
                let mut lines = block.split("\r\n");
                assert_eq!(lines.next(), Some("NATS/1.0"));
                let headers = lines
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once(": ").unwrap();
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                ops.push(ClientOp::Pub {
                    subject: args[0].into(),
                    reply: args[1].into(),
                    headers: Some(headers),
                    payload: wire[i + h..i + t].to_vec(),
                });
                i += t + 2;
            }
            other => panic!("unexpected client op {other}"),
        }
    }
    ops
}

fn info(extra: Value) -> Vec<u8> {
    let mut v = json!({"server_id":"S1","version":"2.10.0","proto":1,"host":"0.0.0.0",
                       "port":4222,"headers":true,"max_payload":1048576});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    format!("INFO {v}\r\n").into_bytes()
}

/// The session plus a shell that connects where told, writes everything, and records.
struct Shell {
    s: NatsSession,
    now: Instant,
    /// The link of the last `Connect`, which every report names.
    link: LinkId,
    /// Bytes written on the current socket.
    wire: Vec<u8>,
    connects: Vec<(String, u16, Instant)>,
    disconnects: usize,
    /// `Transmit` actions seen.
    transmits: usize,
    /// `StartTls` actions: the server name, and how many bytes were on the wire before it
    /// (what went in plaintext).
    tls: Vec<(String, usize)>,
    events: Vec<UpstreamEvent>,
}

impl Shell {
    fn new(config: NatsConfig) -> Shell {
        Shell {
            s: NatsSession::new(config, IDENTITY),
            now: Instant::ZERO,
            link: LinkId(0),
            wire: Vec::new(),
            connects: Vec::new(),
            disconnects: 0,
            transmits: 0,
            tls: Vec::new(),
            events: Vec::new(),
        }
    }

    fn pump(&mut self) {
        self.settle();
        let out: Vec<u8> = self.s.output().flatten().copied().collect();
        self.wire.extend_from_slice(&out);
        self.report(NatsInput::Written(self.link, out.len()));
        while let Some(e) = self.s.poll_event() {
            self.events.push(e);
        }
    }

    /// Like `pump`, but writes nothing: the socket is not writable.
    fn settle(&mut self) {
        while let Some(a) = self.s.poll_action() {
            match a {
                SessionAction::Connect { link, host, port } => {
                    self.connects.push((host, port, self.now));
                    self.link = link;
                    self.wire.clear();
                }
                SessionAction::Disconnect { .. } => self.disconnects += 1,
                SessionAction::Transmit { .. } => self.transmits += 1,
                SessionAction::StartTls { link, server_name } => {
                    assert_eq!(link, self.link, "StartTls names the current link");
                    self.tls.push((server_name, self.wire.len()));
                }
            }
        }
        while let Some(e) = self.s.poll_event() {
            self.events.push(e);
        }
    }

    /// A vectored write that the socket accepts only up to `limit` bytes of: copies from the
    /// output slices in order and reports what it wrote. Returns that count.
    fn write_some(&mut self, limit: usize) -> usize {
        let mut n = 0;
        for slice in self.s.output() {
            let take = slice.len().min(limit - n);
            self.wire.extend_from_slice(&slice[..take]);
            n += take;
            if n == limit {
                break;
            }
        }
        self.report(NatsInput::Written(self.link, n));
        n
    }

    /// Reports a socket event on the current link.
    fn report(&mut self, input: NatsInput<'_>) {
        self.s.handle_input(input, self.now);
    }

    /// Submits without writing anything.
    fn submit_unwritten(&mut self, id: u64, payload: &str) {
        let request = UpstreamRequest {
            id: RequestId(id),
            kind: TaskKind::Submit,
            payload: validate_task_payload(Bytes::copy_from_slice(payload.as_bytes())).unwrap(),
            deadline: self.now + Duration::from_secs(30),
        };
        self.s.submit(request, self.now);
        self.settle();
    }

    fn at(&mut self, t: Instant) {
        self.now = t;
        self.s.handle_timeout(t);
        self.pump();
    }

    fn server(&mut self, bytes: &[u8]) {
        self.report(NatsInput::Received(self.link, bytes));
        self.pump();
    }

    fn connected(&mut self) {
        self.report(NatsInput::Connected(self.link));
        self.pump();
    }

    fn closed(&mut self) {
        self.report(NatsInput::Closed(self.link));
        self.pump();
    }

    /// Starts (or continues) and completes a handshake on the pending connect.
    fn handshake(&mut self, info_bytes: &[u8]) {
        self.connected();
        self.server(info_bytes);
        self.server(b"PONG\r\n");
        assert_eq!(self.s.state(), SessionState::Connected);
    }

    fn submit(&mut self, id: u64, kind: TaskKind, payload: &str) {
        let request = UpstreamRequest {
            id: RequestId(id),
            kind,
            payload: validate_task_payload(Bytes::copy_from_slice(payload.as_bytes())).unwrap(),
            deadline: self.now + Duration::from_secs(30),
        };
        self.s.submit(request, self.now);
        self.pump();
    }

    fn ops(&self) -> Vec<ClientOp> {
        parse_client(&self.wire)
    }

    fn pubs(&self) -> Vec<(String, Option<Headers>, Value)> {
        self.ops()
            .into_iter()
            .filter_map(|o| match o {
                ClientOp::Pub {
                    reply,
                    headers,
                    payload,
                    ..
                } => Some((reply, headers, serde_json::from_slice(&payload).unwrap())),
                _ => None,
            })
            .collect()
    }

    fn reply_subject(&self, id: u64) -> String {
        format!("{}.{}", self.s.inbox(), to_base36(id))
    }

    fn msg(&mut self, id: u64, body: &str) {
        let m = format!(
            "MSG {} 1 {}\r\n{body}\r\n",
            self.reply_subject(id),
            body.len()
        );
        self.server(m.as_bytes());
    }

    fn no_responders(&mut self, id: u64) {
        let m = format!(
            "HMSG {} 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
            self.reply_subject(id)
        );
        self.server(m.as_bytes());
    }

    fn failed(&self) -> Vec<(u64, u16)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                UpstreamEvent::Failed { id, code, .. } => Some((id.0, code.code())),
                _ => None,
            })
            .collect()
    }
}

/// The request id prefix and seed a gateway would hand the session.
const IDENTITY: Identity = Identity {
    instance: 0xabcd_0001,
    seed: 7,
};

fn config(servers: &str) -> NatsConfig {
    let mut c = NatsConfig {
        client_name: "ipc-gateway@test".into(),
        ..NatsConfig::default()
    };
    c.set_servers(servers).unwrap();
    c
}

/// A connected shell on one server.
fn connected(c: NatsConfig, info_bytes: &[u8]) -> Shell {
    let mut sh = Shell::new(c);
    assert_eq!(sh.s.state(), SessionState::Disconnected);
    sh.at(ms(0));
    assert_eq!(sh.connects.len(), 1, "the first connect is immediate");
    sh.handshake(info_bytes);
    sh.wire.clear();
    sh
}

/// The handshake writes CONNECT (credentials from the URL, headers and no_responders because
/// INFO has headers), then the inbox SUB, then PING; buffered requests go only after PONG.
#[test]
fn handshake_bytes_in_order_and_sub_before_the_first_pub() {
    let mut sh = Shell::new(config("nats://alice:s3cret@nats1:4333"));
    sh.at(ms(0));
    assert_eq!(sh.connects, vec![("nats1".into(), 4333, ms(0))]);
    assert_eq!(sh.s.state(), SessionState::Connecting);
    sh.submit(1, TaskKind::Submit, r#"{"a":1}"#);
    sh.connected();
    assert_eq!(sh.s.state(), SessionState::Handshaking);
    assert!(sh.wire.is_empty(), "nothing before INFO");
    sh.server(&info(json!({})));
    let inbox = format!("{}.*", sh.s.inbox());
    assert!(inbox.starts_with("_INBOX.") && inbox.len() == "_INBOX.".len() + 22 + 2);
    let ops = sh.ops();
    assert_eq!(ops.len(), 3, "{ops:?}");
    let ClientOp::Connect(c) = &ops[0] else {
        panic!("{ops:?}")
    };
    assert_eq!(c["verbose"], false);
    assert_eq!(c["pedantic"], false);
    assert_eq!(c["headers"], true);
    assert_eq!(c["no_responders"], true);
    assert_eq!(c["name"], "ipc-gateway@test");
    assert_eq!(c["lang"], "rust");
    assert_eq!(c["user"], "alice");
    assert_eq!(c["pass"], "s3cret");
    assert!(c.get("auth_token").is_none());
    assert_eq!(ops[1], ClientOp::Sub(inbox, 1));
    assert_eq!(ops[2], ClientOp::Ping);
    sh.server(b"PONG\r\n");
    assert_eq!(sh.s.state(), SessionState::Connected);
    let ops = sh.ops();
    assert_eq!(ops.len(), 4);
    assert!(
        matches!(&ops[3], ClientOp::Pub { subject, .. } if subject == "beamline.router.v1.decide")
    );
    assert_eq!(sh.s.server().unwrap(), "nats://***@nats1:4333");
}

/// A token URL sends `auth_token`; a server without headers gets neither headers nor
/// no_responders, and requests go as plain PUB.
#[test]
fn token_auth_and_no_headers_means_plain_pub() {
    let mut sh = connected(
        config("nats://tok123@h:1"),
        &info(json!({"headers": false})),
    );
    sh.submit(5, TaskKind::Query, "{}");
    let mut all = Shell::new(config("nats://tok123@h:1"));
    all.at(ms(0));
    all.connected();
    all.server(&info(json!({"headers": false})));
    let ClientOp::Connect(c) = &all.ops()[0] else {
        panic!()
    };
    assert_eq!(
        (
            c["headers"].clone(),
            c["no_responders"].clone(),
            c["auth_token"].clone()
        ),
        (json!(false), json!(false), json!("tok123"))
    );
    assert!(c.get("user").is_none());
    let pubs = sh.pubs();
    assert_eq!(pubs.len(), 1);
    assert_eq!(pubs[0].0, sh.reply_subject(5));
    assert_eq!(pubs[0].1, None, "PUB, not HPUB");
}

/// router-v1: every field of router.md section 3, from the client's payload where given.
#[test]
fn router_v1_envelope_field_by_field() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    let client = r#"{"command":"task_submit","task_type":"code_completion","tenant_id":"acme","policy_id":"p7","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","file":"a.py","line":42}"#;
    sh.submit(36, TaskKind::Submit, client);
    let pubs = sh.pubs();
    let (reply, headers, body) = &pubs[0];
    assert_eq!(
        reply,
        &format!("{}.10", sh.s.inbox()),
        "token is the id in base 36"
    );
    let span = body["metadata"]["traceparent"].as_str().unwrap()[36..52].to_owned();
    assert_eq!(
        body,
        &json!({"version":"1","request_id":"abcd0001-36","tenant_id":"acme","policy_id":"p7",
                "trace_id":"4bf92f3577b34da6a3ce929d0e0e4736",
                "task":{"type":"code_completion","payload":serde_json::from_str::<Value>(client).unwrap()},
                "metadata":{"ipc_message_type":"task_submit",
                            "traceparent":format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")}})
    );
    assert_eq!(span.len(), 16);
    assert_eq!(
        headers.clone().unwrap(),
        vec![
            ("version".into(), "1".into()),
            ("trace_id".into(), "4bf92f3577b34da6a3ce929d0e0e4736".into()),
            ("span_id".into(), span.clone()),
            ("tenant_id".into(), "acme".into()),
            (
                "traceparent".into(),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01")
            ),
        ]
    );
    // The client's object is embedded byte for byte.
    let ClientOp::Pub { payload, .. } = &sh.ops()[0] else {
        panic!()
    };
    assert!(std::str::from_utf8(payload).unwrap().contains(client));
}

/// Defaults and fallbacks: `task` string as type, else `ide.<method>`; configured tenant and
/// policy; trace id from traceparent, else generated 32 lowercase hex; no null anywhere.
#[test]
fn router_v1_fallbacks_and_trace_id_rules() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(
        1,
        TaskKind::Submit,
        r#"{"task":"code_completion","trace_id":"NOT-VALID"}"#,
    );
    sh.submit(2, TaskKind::Cancel, r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","task":{"x":1},"tenant_id":""}"#);
    sh.submit(
        3,
        TaskKind::Query,
        r#"{"trace_id":"3f2504e0-4f89-41d3-9a0c-0305e82c3301"}"#,
    );
    let pubs = sh.pubs();
    let b1 = &pubs[0].2;
    assert_eq!(b1["task"]["type"], "code_completion");
    assert_eq!(b1["tenant_id"], "default");
    assert_eq!(b1["policy_id"], "default");
    let t1 = b1["trace_id"].as_str().unwrap();
    assert!(
        t1.len() == 32
            && t1
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{t1}"
    );
    let b2 = &pubs[1].2;
    assert_eq!(
        b2["task"]["type"], "ide.task_cancel",
        "a non-string task is not a type"
    );
    assert_eq!(b2["tenant_id"], "default", "an empty tenant is replaced");
    assert_eq!(b2["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(b2["metadata"]["ipc_message_type"], "task_cancel");
    let b3 = &pubs[2].2;
    assert_eq!(b3["trace_id"], "3f2504e0-4f89-41d3-9a0c-0305e82c3301");
    assert_eq!(b3["task"]["type"], "ide.task_query");
    assert!(b3["metadata"]["traceparent"]
        .as_str()
        .unwrap()
        .starts_with("00-3f2504e04f8941d39a0c0305e82c3301-"));
    for (_, _, b) in &pubs {
        assert!(!b.to_string().contains("null"), "{b}");
    }
}

/// legacy: the C gateway's envelope with the client's object as `input`.
#[test]
fn legacy_envelope_field_by_field() {
    let mut c = config("h:1");
    c.envelope.mode = EnvelopeMode::Legacy;
    c.envelope.tenant_id = "t0".into();
    let mut sh = connected(c, &info(json!({})));
    sh.submit(9, TaskKind::Query, r#"{"task":"x","tenant_id":"ignored"}"#);
    assert_eq!(
        sh.pubs()[0].2,
        json!({"from":"ide@localhost","to":"router","message_id":"abcd0001-9","tenant_id":"t0",
               "policy_id":"default","ipc_message_type":"task_query",
               "input":{"task":"x","tenant_id":"ignored"}})
    );
}

/// Replies: verbatim payload (a slice of the read buffer), 503 → error 8, a second reply is a
/// duplicate, a reply after cancel is late, a foreign subject is unknown; nothing leaks.
#[test]
fn reply_mapping_and_counters() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    for id in 1..=3 {
        sh.submit(id, TaskKind::Submit, "{}");
    }
    assert_eq!(sh.s.pending(), 3);
    let body = r#"{"ok":true,"decision":{"provider_id":"openai"}}"#;
    sh.msg(1, body);
    assert_eq!(
        sh.events,
        vec![UpstreamEvent::Reply {
            id: RequestId(1),
            payload: Bytes::from_static(body.as_bytes())
        }]
    );
    sh.no_responders(2);
    let UpstreamEvent::Failed { code, message, .. } = &sh.events[1] else {
        panic!()
    };
    assert_eq!(
        (code.code(), message.as_str()),
        (8, "Router unavailable: no responders")
    );
    sh.msg(1, body);
    assert_eq!(sh.s.stats().duplicate_replies, 1);
    sh.s.cancel(RequestId(3));
    assert_eq!(sh.s.pending(), 0);
    sh.msg(3, "{}");
    sh.msg(77, "{}");
    assert_eq!(
        sh.s.stats().late_replies,
        2,
        "after cancel, and never known"
    );
    sh.server(b"MSG other.subject 1 2\r\n{}\r\n");
    assert_eq!(sh.s.stats().unknown_replies, 1);
    assert_eq!(sh.s.stats().no_responders, 1);
    assert_eq!(sh.events.len(), 2);
    assert_eq!(sh.s.pending(), 0);
}

/// A Router reply too large for an IPC frame becomes error 3 for that request alone: the
/// largest that fits goes through verbatim, one byte more does not, and the connection stays.
#[test]
fn a_reply_over_the_frame_limit_is_error_3() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.submit(2, TaskKind::Submit, "{}");
    sh.msg(1, &"x".repeat(MAX_REPLY_BYTES));
    sh.msg(2, &"x".repeat(MAX_REPLY_BYTES + 1));
    let UpstreamEvent::Reply { payload, .. } = &sh.events[0] else {
        panic!("{:?}", sh.events[0]);
    };
    assert_eq!(payload.len(), MAX_REPLY_BYTES);
    let UpstreamEvent::Failed {
        id, code, message, ..
    } = &sh.events[1]
    else {
        panic!("{:?}", sh.events[1]);
    };
    assert_eq!((id.0, code.code()), (2, 3));
    assert!(message.contains("4194299 bytes"), "{message}");
    assert_eq!(sh.s.state(), SessionState::Connected);
    assert_eq!(sh.s.pending(), 0);
}

/// A stray HMSG with a malformed header block on our inbox is skipped and counted; the
/// connection, and the request the message names, stay as they were.
#[test]
fn unreadable_header_block_costs_nothing() {
    let mut sh = connected(config("h:1"), &info(json!({"headers": true})));
    sh.submit(1, TaskKind::Submit, "{}");
    let m = format!(
        "HMSG {} 1 16 18\r\nNATS/1.0 5x3\r\n\r\n{{}}\r\n",
        sh.reply_subject(1)
    );
    sh.server(m.as_bytes());
    assert_eq!(sh.s.stats().unknown_replies, 1);
    assert_eq!(sh.s.state(), SessionState::Connected);
    assert!(sh.events.is_empty(), "{:?}", sh.events);
    sh.msg(1, "{}");
    assert_eq!(sh.events.len(), 1, "the real reply still reaches request 1");
}

/// The recent-answers ring is bounded: once an answer is forgotten, a repeat counts as late.
#[test]
fn recent_answers_ring_is_bounded() {
    let mut c = config("h:1");
    c.recent_answers = 2;
    let mut sh = connected(c, &info(json!({})));
    for id in 1..=3 {
        sh.submit(id, TaskKind::Submit, "{}");
        sh.msg(id, "{}");
    }
    assert_eq!(sh.s.recent_answers(), 2);
    sh.msg(1, "{}");
    sh.msg(3, "{}");
    assert_eq!(
        (sh.s.stats().late_replies, sh.s.stats().duplicate_replies),
        (1, 1)
    );
}

/// A request over the server's max_payload fails with error 3 and nothing is written.
#[test]
fn over_max_payload_fails_with_3_and_writes_nothing() {
    let mut sh = connected(config("h:1"), &info(json!({"max_payload": 700})));
    sh.submit(
        1,
        TaskKind::Submit,
        &format!(r#"{{"pad":"{}"}}"#, "x".repeat(400)),
    );
    assert_eq!(sh.failed(), vec![(1, 3)]);
    assert!(sh.wire.is_empty());
    assert_eq!(sh.s.pending(), 0);
    sh.submit(2, TaskKind::Submit, "{}");
    assert_eq!(sh.pubs().len(), 1, "a small one still goes");
}

/// A dropped connection fails written requests at once with 8; requests submitted while
/// disconnected wait and go after the SUB on the next connection, in order.
#[test]
fn disconnect_fails_written_and_buffers_new_ones() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.submit(2, TaskKind::Submit, "{}");
    sh.closed();
    assert_eq!(sh.failed(), vec![(1, 8), (2, 8)]);
    assert_eq!(sh.s.stats().failed_on_disconnect, 2);
    assert_eq!(sh.s.state(), SessionState::Reconnecting);
    assert_eq!(sh.connects.len(), 2, "first reconnect attempt is immediate");
    sh.submit(3, TaskKind::Submit, r#"{"n":3}"#);
    sh.submit(4, TaskKind::Submit, r#"{"n":4}"#);
    assert_eq!(sh.s.pending(), 2);
    assert!(sh.s.buffered_bytes() > 0);
    sh.handshake(&info(json!({})));
    let ops = sh.ops();
    assert!(matches!(ops[0], ClientOp::Connect(_)));
    assert!(matches!(ops[1], ClientOp::Sub(_, 1)));
    assert_eq!(ops[2], ClientOp::Ping);
    let pubs = sh.pubs();
    assert_eq!(
        pubs.iter()
            .map(|p| p.2["task"]["payload"]["n"].clone())
            .collect::<Vec<_>>(),
        vec![json!(3), json!(4)]
    );
    assert_eq!(sh.s.buffered_bytes(), 0);
    assert_eq!(sh.s.stats().reconnects, 1);
}

/// Only a request written on the link that is up awaits the Router; one that waited in the
/// reconnect buffer does not, even once written at the reconnect: the outage held it up, and
/// with little of its time left no Router could answer it (gateway.md section 4: a reconnect
/// must not open the breaker on failures the outage caused).
#[test]
fn a_request_held_in_the_reconnect_buffer_never_awaits_the_router() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    assert!(sh.s.awaiting_router(RequestId(1)), "written on a live link");
    sh.closed();
    assert!(!sh.s.awaiting_router(RequestId(1)), "failed with the link");
    sh.submit(2, TaskKind::Submit, "{}");
    assert!(!sh.s.awaiting_router(RequestId(2)), "in the buffer");
    sh.handshake(&info(json!({})));
    assert_eq!(sh.pubs().len(), 1, "written at the reconnect");
    assert!(!sh.s.awaiting_router(RequestId(2)), "held up by the outage");
    sh.submit(3, TaskKind::Submit, "{}");
    assert!(
        sh.s.awaiting_router(RequestId(3)),
        "written on the new link"
    );
}

/// Requests queued but never handed to the socket are not on the wire: they are resent
/// after the reconnect rather than failed.
#[test]
fn unwritten_requests_survive_a_disconnect() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.s.submit(
        UpstreamRequest {
            id: RequestId(1),
            kind: TaskKind::Submit,
            payload: validate_task_payload(Bytes::from_static(b"{}")).unwrap(),
            deadline: ms(30_000),
        },
        ms(0),
    );
    // The shell did not write before the socket failed.
    sh.s.handle_input(NatsInput::Closed(sh.link), ms(0));
    sh.pump();
    assert!(sh.failed().is_empty());
    assert_eq!(sh.s.pending(), 1);
    sh.handshake(&info(json!({})));
    assert_eq!(sh.pubs().len(), 1);
}

/// A full reconnect buffer refuses with 8 at once; cancel frees its bytes.
#[test]
fn full_reconnect_buffer_fails_with_8() {
    let mut c = config("h:1");
    c.reconnect_buffer_bytes = 700;
    let mut sh = Shell::new(c);
    sh.at(ms(0));
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100));
    sh.submit(1, TaskKind::Submit, &payload);
    sh.submit(2, TaskKind::Submit, &payload);
    assert_eq!(sh.failed(), vec![(2, 8)]);
    assert_eq!(sh.s.stats().buffer_full_rejections, 1);
    sh.s.cancel(RequestId(1));
    assert_eq!((sh.s.pending(), sh.s.buffered_bytes()), (0, 0));
    sh.submit(3, TaskKind::Submit, &payload);
    assert_eq!(sh.s.pending(), 1);
}

/// Backoff from a seed: first attempt immediate, then per failed pass a delay in [d/2, d]
/// with d = 100, 200, 400, 800, 1600, 2000, 2000 ms; a success resets it.
#[test]
fn backoff_sequence_with_jitter() {
    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    let mut t = 0;
    let mut delays = Vec::new();
    let mut first_retry = None;
    for _ in 0..7 {
        sh.s.handle_input(NatsInput::ConnectFailed(sh.link), sh.now);
        sh.pump();
        assert_eq!(sh.s.state(), SessionState::Connecting);
        let next = sh.s.poll_timeout().unwrap();
        first_retry.get_or_insert(next);
        let d = (next - ms(t)).as_millis() as u64;
        delays.push(d);
        t = (next - ms(0)).as_millis() as u64;
        sh.at(Instant::from_nanos(next.as_nanos() - 1));
        assert_eq!(sh.connects.len(), delays.len(), "not before the delay");
        sh.at(next);
        assert_eq!(sh.connects.len(), delays.len() + 1);
    }
    for (d, cap) in delays.iter().zip([100, 200, 400, 800, 1600, 2000, 2000]) {
        assert!((cap / 2..=cap).contains(d), "{delays:?}");
    }
    // Deterministic for a seed.
    let mut again = Shell::new(config("h:1"));
    again.at(ms(0));
    again
        .s
        .handle_input(NatsInput::ConnectFailed(again.link), ms(0));
    again.pump();
    assert_eq!(again.s.poll_timeout(), first_retry);
    // A connect timeout counts as a failure too.
    sh.at(sh.now + Duration::from_secs(2));
    assert_eq!(sh.disconnects, 1);
    sh.at(sh.s.poll_timeout().unwrap());
    sh.handshake(&info(json!({})));
    sh.closed();
    assert_eq!(
        sh.connects.last().unwrap().2,
        sh.now,
        "immediate after a success"
    );
}

/// The pool is tried server by server without delay; the backoff comes after a whole pass;
/// the server just lost is tried last.
#[test]
fn rotation_across_servers() {
    let mut sh = Shell::new(config("a:1,b:2,c:3"));
    sh.at(ms(0));
    sh.s.handle_input(NatsInput::ConnectFailed(sh.link), ms(0));
    sh.pump();
    sh.s.handle_input(NatsInput::ConnectFailed(sh.link), ms(0));
    sh.pump();
    assert_eq!(sh.connects.len(), 3, "one immediate pass");
    let mut hosts: Vec<String> = sh.connects.iter().map(|c| c.0.clone()).collect();
    hosts.sort();
    assert_eq!(hosts, ["a", "b", "c"]);
    sh.s.handle_input(NatsInput::ConnectFailed(sh.link), ms(0));
    sh.pump();
    assert_eq!(sh.connects.len(), 3, "backoff after the pass");
    sh.at(sh.s.poll_timeout().unwrap());
    let first = sh.connects[0].0.clone();
    assert_eq!(sh.connects[3].0, first, "the rotation starts again");
    sh.handshake(&info(json!({})));
    sh.closed();
    assert_ne!(sh.connects[4].0, first, "the lost server is tried last");
    assert_eq!(sh.connects[4].2, sh.now);
}

/// connect_urls add learned servers (with the announcing server's credentials) and a later
/// INFO that omits them drops them; configured servers stay.
#[test]
fn connect_urls_added_and_dropped() {
    let mut sh = connected(
        config("nats://u:p@seed:4222"),
        &info(json!({"connect_urls":["10.0.0.2:4222","10.0.0.3:4222"]})),
    );
    let names = |sh: &Shell| {
        sh.s.servers()
            .iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
    };
    // Learned servers come before the current one, so a failover tries them first.
    assert_eq!(
        names(&sh),
        [
            "nats://***@10.0.0.2:4222",
            "nats://***@10.0.0.3:4222",
            "nats://***@seed:4222"
        ]
    );
    assert_eq!(sh.s.servers()[0].user.as_deref(), Some("u"));
    sh.server(&info(
        json!({"connect_urls":["10.0.0.3:4222","10.0.0.4:4222"]}),
    ));
    assert_eq!(
        names(&sh),
        [
            "nats://***@10.0.0.3:4222",
            "nats://***@10.0.0.4:4222",
            "nats://***@seed:4222"
        ]
    );
    sh.server(&info(json!({"connect_urls":["10.0.0.9:4222"]})));
    assert_eq!(
        names(&sh),
        ["nats://***@10.0.0.9:4222", "nats://***@seed:4222"]
    );
    sh.server(&info(json!({"connect_urls":[]})));
    assert_eq!(names(&sh).len(), 2, "an empty list changes nothing");
}

/// Keepalive: a PING every interval of silence, reset by incoming bytes; a server PING gets
/// PONG; more than 2 unanswered → Disconnect and reconnect.
#[test]
fn keepalive_pings_reset_and_stale() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    assert_eq!(sh.s.poll_timeout(), Some(ms(20_000)));
    sh.at(ms(20_000));
    assert_eq!(sh.ops(), vec![ClientOp::Ping]);
    sh.now = ms(25_000);
    sh.server(b"PING\r\n");
    assert_eq!(sh.ops(), vec![ClientOp::Ping, ClientOp::Pong]);
    assert_eq!(
        sh.s.poll_timeout(),
        Some(ms(45_000)),
        "reset by incoming bytes"
    );
    sh.at(ms(45_000));
    sh.at(ms(65_000));
    assert_eq!(sh.s.stats().pings_sent, 3);
    assert_eq!(sh.disconnects, 0);
    sh.at(ms(85_000));
    assert_eq!(sh.disconnects, 1, "third interval without an answer: dead");
    assert_eq!(sh.connects.len(), 2);
    assert_eq!(sh.s.state(), SessionState::Reconnecting);
}

/// Lame duck: requests in flight are still answered; once none awaits, the session moves
/// to another server, and new requests wait for it.
#[test]
fn lame_duck_moves_to_another_server() {
    let mut sh = Shell::new(config("a:1,b:2"));
    sh.at(ms(0));
    sh.handshake(&info(json!({})));
    let first = sh.connects[0].0.clone();
    sh.submit(1, TaskKind::Submit, "{}");
    sh.server(&info(json!({"ldm": true})));
    assert_eq!(sh.disconnects, 0, "request 1 still awaits its answer");
    sh.submit(2, TaskKind::Submit, "{}");
    assert_eq!(sh.pubs().len(), 1, "new requests wait for the next server");
    sh.msg(1, r#"{"ok":true}"#);
    assert!(matches!(sh.events[0], UpstreamEvent::Reply { .. }));
    assert_eq!(sh.disconnects, 1);
    assert_eq!(sh.connects.len(), 2);
    assert_ne!(sh.connects[1].0, first);
    sh.handshake(&info(json!({})));
    assert_eq!(sh.pubs().len(), 1, "request 2 went to the new server");
    assert_eq!(sh.s.stats().lame_duck_switches, 1);
}

/// Lame duck with an unanswered request: the switch happens at the grace end and the
/// request fails with 8.
#[test]
fn lame_duck_grace_ends() {
    let mut sh = Shell::new(config("a:1,b:2"));
    sh.at(ms(0));
    sh.handshake(&info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.server(&info(json!({"ldm": true})));
    assert_eq!(sh.s.poll_timeout(), Some(ms(2_000)));
    sh.at(ms(2_000));
    assert_eq!(sh.failed(), vec![(1, 8)]);
    assert_eq!(sh.disconnects, 1);
}

/// -ERR 'Stale Connection' and 'Authorization Violation' reconnect; a permissions error
/// does not; undecodable bytes reconnect.
#[test]
fn server_errors_and_garbage_reconnect() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.server(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n");
    assert_eq!((sh.disconnects, sh.s.state()), (0, SessionState::Connected));
    sh.server(b"-ERR 'Stale Connection'\r\n");
    assert_eq!(sh.disconnects, 1);
    assert_eq!(sh.connects.len(), 2);
    sh.connected();
    sh.server(&info(json!({})));
    sh.server(b"-ERR 'Authorization Violation'\r\n");
    assert_eq!(sh.disconnects, 2);
    assert_eq!(
        sh.connects.len(),
        2,
        "second failure in the pass waits for the backoff"
    );
    sh.at(sh.s.poll_timeout().unwrap());
    sh.handshake(&info(json!({})));
    sh.server(b"\x00\x01garbage\r\n");
    assert_eq!(sh.disconnects, 3);
    assert_eq!(sh.s.state(), SessionState::Reconnecting);
}

/// A server that does not complete the handshake in 5 s is dropped.
#[test]
fn handshake_timeout() {
    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    sh.connected();
    assert_eq!(sh.s.poll_timeout(), Some(ms(5_000)));
    sh.at(ms(5_000));
    assert_eq!(sh.disconnects, 1);
}

/// Drain: nothing new, buffered work fails with 6, answers still arrive, then Disconnect.
#[test]
fn drain_waits_for_answers_then_closes() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.s.handle_shutdown(sh.now);
    sh.pump();
    assert_eq!(sh.s.state(), SessionState::Draining);
    sh.submit(2, TaskKind::Submit, "{}");
    assert_eq!(sh.failed(), vec![(2, 6)]);
    sh.msg(1, "{}");
    assert_eq!(sh.disconnects, 1);
    assert_eq!(sh.s.state(), SessionState::Closed);
    assert_eq!((sh.s.pending(), sh.s.poll_timeout()), (0, None));
}

/// A bad server entry is a configuration error naming it, credentials masked.
#[test]
fn bad_server_url_is_an_error() {
    let mut c = NatsConfig::default();
    let e = c
        .set_servers("nats://ok:4222,nats://u:pw@bad:port")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "bad NATS server entry \"nats://***@bad:port\": the port must be a number from 1 to 65535"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Submit,
    Cancel(usize),
    Reply(usize),
    NoResponders(usize),
    Disconnect,
    Reconnect,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Submit),
        2 => (0..64usize).prop_map(Op::Cancel),
        3 => (0..64usize).prop_map(Op::Reply),
        1 => (0..64usize).prop_map(Op::NoResponders),
        1 => Just(Op::Disconnect),
        2 => Just(Op::Reconnect),
        2 => (0..30_000u64).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Whatever happens, every submitted id gets exactly one outcome unless cancelled, and
    /// nothing is held once everything is answered, failed or cancelled.
    #[test]
    fn every_request_ends_once_and_nothing_leaks(ops in proptest::collection::vec(op(), 1..80)) {
        let mut c = config("a:1,b:2");
        c.reconnect_buffer_bytes = 2_000;
        let mut sh = connected(c, &info(json!({})));
        let mut submitted = Vec::new();
        let mut cancelled = std::collections::BTreeSet::new();
        let mut t = 0u64;
        for op in ops {
            match op {
                Op::Submit => {
                    let id = submitted.len() as u64 + 1;
                    submitted.push(id);
                    sh.submit(id, TaskKind::Submit, "{}");
                }
                Op::Cancel(i) => if let Some(&id) = submitted.get(i) {
                    cancelled.insert(id);
                    sh.s.cancel(RequestId(id));
                    sh.pump();
                },
                Op::Reply(i) => if let Some(&id) = submitted.get(i) {
                    if sh.s.state() == SessionState::Connected { sh.msg(id, "{}"); }
                },
                Op::NoResponders(i) => if let Some(&id) = submitted.get(i) {
                    if sh.s.state() == SessionState::Connected { sh.no_responders(id); }
                },
                Op::Disconnect => sh.closed(),
                Op::Reconnect => {
                    for _ in 0..3 {
                        if sh.s.state() == SessionState::Reconnecting {
                            sh.connected();
                        }
                        if sh.s.state() == SessionState::Handshaking {
                            sh.server(&info(json!({})));
                            sh.server(b"PONG\r\n");
                            break;
                        }
                        match sh.s.poll_timeout() {
                            Some(next) if next > sh.now && sh.s.state() == SessionState::Reconnecting => {
                                t = (next - ms(0)).as_millis() as u64 + 1;
                                sh.at(ms(t));
                            }
                            _ => break,
                        }
                    }
                }
                Op::Advance(d) => { t += d; sh.at(ms(t)); }
            }
        }
        // Answer everything still held, on a live connection, then cancel what remains.
        for &id in &submitted { if sh.s.state() == SessionState::Connected { sh.msg(id, "{}"); } }
        for &id in &submitted { if sh.s.pending() > 0 { cancelled.insert(id); sh.s.cancel(RequestId(id)); sh.pump(); } }
        prop_assert_eq!(sh.s.pending(), 0);
        prop_assert_eq!(sh.s.buffered_bytes(), 0);
        let mut outcomes = std::collections::BTreeMap::<u64, usize>::new();
        for e in &sh.events {
            let id = match e { UpstreamEvent::Reply { id, .. } | UpstreamEvent::Failed { id, .. } => id.0 };
            *outcomes.entry(id).or_default() += 1;
        }
        for &id in &submitted {
            let n = outcomes.get(&id).copied().unwrap_or(0);
            if cancelled.contains(&id) {
                prop_assert!(n <= 1, "id {} got {} outcomes", id, n);
            } else {
                prop_assert_eq!(n, 1, "id {} got {} outcomes", id, n);
            }
        }
        let _ = ErrorCode::RouterUnavailable;
    }
}

/// Where each PUB/HPUB/PING/PONG frame of client bytes starts.
fn frame_starts(wire: &[u8]) -> Vec<usize> {
    let ops = ["PUB ", "HPUB ", "PING\r\n", "PONG\r\n"];
    let mut starts = Vec::new();
    let mut i = 0;
    while i < wire.len() {
        starts.push(i);
        let end = i + wire[i..].windows(2).position(|w| w == b"\r\n").unwrap();
        let line = std::str::from_utf8(&wire[i..end]).unwrap();
        assert!(
            ops.iter().any(|o| format!("{line}\r\n").starts_with(o)),
            "{line}"
        );
        let args: Vec<&str> = line.split(' ').collect();
        i = end + 2;
        match args[0] {
            "PUB" => i += args[3].parse::<usize>().unwrap() + 2,
            "HPUB" => i += args[4].parse::<usize>().unwrap() + 2,
            _ => {}
        }
    }
    starts
}

fn output_bytes(s: &NatsSession) -> Vec<u8> {
    s.output().flatten().copied().collect()
}

fn pub_numbers(sh: &Shell) -> Vec<(String, Value)> {
    sh.pubs()
        .into_iter()
        .map(|(reply, _, body)| (reply, body["task"]["payload"]["n"].clone()))
        .collect()
}

/// The shell writes the output in pieces of any size (one byte, across frame ends, exactly
/// to a frame end, nothing at all); each time the output it is given next starts at the
/// first byte it has not written, so the server receives the frames whole and in order.
#[test]
fn partial_writes_continue_exactly_where_the_shell_stopped() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    assert!(!sh.s.has_output(), "everything was written");
    assert_eq!(sh.s.output().count(), 0);
    for id in 1..=3 {
        sh.submit_unwritten(id, &format!(r#"{{"n":{id}}}"#));
        assert!(sh.s.has_output());
    }
    sh.s.handle_input(NatsInput::Received(sh.link, b"PING\r\n"), sh.now);
    sh.settle();
    let expected = output_bytes(&sh.s);
    let starts = frame_starts(&expected);
    assert_eq!(starts.len(), 4, "three requests and a PONG");
    sh.s.handle_input(NatsInput::Written(sh.link, 0), sh.now);
    assert_eq!(
        output_bytes(&sh.s),
        expected,
        "writing nothing changes nothing"
    );
    let first = starts[1];
    let sizes = [1, 9, first - 10, 0, 2, 250, 600, 77, 1];
    let mut sizes = sizes.iter().cycle();
    while sh.s.has_output() {
        let n = sh.write_some(*sizes.next().unwrap());
        assert!(n <= expected.len());
        assert_eq!(
            output_bytes(&sh.s),
            expected[sh.wire.len()..],
            "the output resumes at byte {} of {}",
            sh.wire.len(),
            expected.len()
        );
        assert_eq!(sh.s.has_output(), sh.wire.len() < expected.len());
    }
    assert_eq!(sh.wire, expected);
    assert_eq!(
        pub_numbers(&sh),
        (1..=3)
            .map(|id| (sh.reply_subject(id), json!(id)))
            .collect::<Vec<_>>()
    );
    assert_eq!(sh.ops().last(), Some(&ClientOp::Pong));
    // Output queued after a complete write starts fresh.
    sh.submit_unwritten(4, r#"{"n":4}"#);
    let next = output_bytes(&sh.s);
    assert!(next.starts_with(b"HPUB ") && frame_starts(&next).len() == 1);
}

/// On a disconnect, a request of which the shell wrote at least one byte is on the wire and
/// fails with 8; one whose first byte was never written goes back to the buffer and is
/// resent, in order, after the next handshake.
#[test]
fn partly_written_request_fails_unwritten_one_is_resent() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    for id in 1..=3 {
        sh.submit_unwritten(id, &format!(r#"{{"n":{id}}}"#));
    }
    let starts = frame_starts(&output_bytes(&sh.s));
    // All of request 1, in two writes, and the first byte of request 2.
    assert_eq!(sh.write_some(starts[1] - 5), starts[1] - 5);
    assert_eq!(sh.write_some(6), 6);
    sh.closed();
    assert_eq!(sh.failed(), vec![(1, 8), (2, 8)]);
    assert_eq!(sh.s.stats().failed_on_disconnect, 2);
    assert_eq!(sh.s.pending(), 1);
    assert!(sh.s.buffered_bytes() > 0);
    assert_eq!(sh.connects.len(), 2);
    sh.handshake(&info(json!({})));
    assert_eq!(pub_numbers(&sh), vec![(sh.reply_subject(3), json!(3))]);
    assert_eq!(sh.s.buffered_bytes(), 0);
    sh.msg(3, "{}");
    assert!(matches!(sh.events.last(), Some(UpstreamEvent::Reply { id, .. }) if id.0 == 3));
}

/// The same with the write ending exactly at the end of request 1: request 2 was not
/// started, so requests 2 and 3 are both resent, in submit order.
#[test]
fn write_ending_at_a_frame_end_leaves_the_next_request_unsent() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    for id in 1..=3 {
        sh.submit_unwritten(id, &format!(r#"{{"n":{id}}}"#));
    }
    let starts = frame_starts(&output_bytes(&sh.s));
    sh.write_some(3);
    sh.write_some(starts[1] - 3);
    sh.closed();
    assert_eq!(sh.failed(), vec![(1, 8)]);
    assert_eq!(sh.s.stats().failed_on_disconnect, 1);
    sh.handshake(&info(json!({})));
    assert_eq!(
        pub_numbers(&sh),
        vec![
            (sh.reply_subject(2), json!(2)),
            (sh.reply_subject(3), json!(3))
        ]
    );
}

/// A socket that closes during the TCP connect is a failed attempt: the next server is
/// tried at once; after the whole pass failed, the backoff applies. No Disconnect: the
/// shell already has no socket.
#[test]
fn closed_during_the_tcp_connect_tries_the_next_server() {
    let mut sh = Shell::new(config("a:1,b:2"));
    sh.at(ms(0));
    sh.closed();
    assert_eq!(sh.connects.len(), 2);
    assert_ne!(sh.connects[0].0, sh.connects[1].0);
    assert_eq!(sh.s.state(), SessionState::Connecting);
    sh.closed();
    assert_eq!(sh.connects.len(), 2, "backoff after the pass");
    assert!(sh.s.poll_timeout().unwrap() > sh.now);
    assert_eq!(sh.disconnects, 0);
    sh.at(sh.s.poll_timeout().unwrap());
    assert_eq!(sh.connects.len(), 3);
}

/// With no socket (waiting out the backoff), a stray close report changes nothing: no new
/// attempt, the same retry time.
#[test]
fn closed_while_waiting_to_retry_changes_nothing() {
    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    sh.s.handle_input(NatsInput::ConnectFailed(sh.link), ms(0));
    sh.pump();
    let retry = sh.s.poll_timeout().unwrap();
    assert!(retry > ms(0));
    sh.now = ms(10);
    sh.closed();
    assert_eq!(sh.s.poll_timeout(), Some(retry));
    assert_eq!((sh.connects.len(), sh.disconnects), (1, 0));
    assert_eq!(sh.s.stats().connect_attempts, 1);
    assert_eq!(sh.s.state(), SessionState::Connecting);
    sh.at(retry);
    assert_eq!(sh.connects.len(), 2);
}

/// close: everything held (on the wire or buffered) fails with 6, the socket is closed once,
/// and afterwards nothing happens: socket events, time and new requests are refused.
#[test]
fn close_fails_everything_and_then_ignores_the_socket() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.submit_unwritten(2, "{}");
    assert!(sh.s.has_output());
    sh.s.handle_abort(ms(5));
    sh.pump();
    assert_eq!(sh.failed(), vec![(1, 6), (2, 6)]);
    assert_eq!(sh.disconnects, 1);
    assert_eq!(sh.s.state(), SessionState::Closed);
    assert_eq!((sh.s.pending(), sh.s.poll_timeout()), (0, None));
    assert!(!sh.s.has_output(), "nothing more is written");
    let written = sh.wire.len();
    sh.s.handle_abort(ms(6));
    sh.closed();
    sh.server(b"PING\r\n");
    assert!(!sh.s.has_output(), "a closed session answers nothing");
    sh.s.handle_shutdown(ms(7));
    sh.at(ms(60_000));
    assert_eq!((sh.connects.len(), sh.disconnects), (1, 1));
    assert_eq!(sh.s.state(), SessionState::Closed);
    sh.submit(3, TaskKind::Submit, "{}");
    assert_eq!(sh.failed(), vec![(1, 6), (2, 6), (3, 6)]);
    assert_eq!(sh.wire.len(), written);
}

/// Draining with no connection up fails the buffered requests with 6 and closes at once;
/// the shell is told to close a socket only if there is one (a TCP connect in progress).
#[test]
fn begin_drain_without_a_connection_closes_at_once() {
    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    sh.s.handle_input(NatsInput::ConnectFailed(sh.link), ms(0));
    sh.pump();
    sh.submit(1, TaskKind::Submit, "{}");
    sh.s.handle_shutdown(ms(1));
    sh.pump();
    assert_eq!(sh.failed(), vec![(1, 6)]);
    assert_eq!(sh.s.state(), SessionState::Closed);
    assert_eq!(sh.disconnects, 0, "no socket to close");
    assert_eq!(sh.s.poll_timeout(), None);
    sh.at(ms(60_000));
    assert_eq!(sh.connects.len(), 1);

    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.s.handle_shutdown(ms(1));
    sh.pump();
    assert_eq!(sh.failed(), vec![(1, 6)]);
    assert_eq!(sh.s.state(), SessionState::Closed);
    assert_eq!(
        sh.disconnects, 1,
        "the TCP connect in progress is abandoned"
    );
}

/// The drain timeout counts from the first begin_drain: a second call does not extend it.
/// When it passes, what is still unanswered fails with 6 and the socket is closed.
#[test]
fn drain_timeout_counts_from_the_first_begin_drain() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.s.handle_shutdown(ms(0));
    sh.pump();
    sh.now = ms(10_000);
    sh.s.handle_shutdown(ms(10_000));
    sh.pump();
    assert_eq!(sh.s.state(), SessionState::Draining);
    sh.at(ms(29_999));
    assert!(sh.failed().is_empty());
    sh.at(ms(30_000));
    assert_eq!(sh.failed(), vec![(1, 6)]);
    assert_eq!(sh.disconnects, 1);
    assert_eq!(sh.s.state(), SessionState::Closed);
}

/// `cancel` carries no time: the session acts at the latest time it has seen. Cancelling
/// the last awaited request of a lame duck server moves on at once, and the new TCP connect
/// gets its whole 2 s from then.
#[test]
fn cancel_acts_at_the_latest_time_seen() {
    let mut sh = Shell::new(config("a:1,b:2"));
    sh.at(ms(0));
    sh.handshake(&info(json!({})));
    sh.at(ms(10_000));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.server(&info(json!({"ldm": true})));
    sh.at(ms(11_000));
    assert_eq!(sh.disconnects, 0);
    sh.s.cancel(RequestId(1));
    sh.pump();
    assert_eq!((sh.disconnects, sh.connects.len()), (1, 2));
    assert_eq!(sh.s.poll_timeout(), Some(ms(13_000)));
    sh.at(ms(12_999));
    assert_eq!(sh.disconnects, 1, "the connect has not timed out");
    sh.handshake(&info(json!({})));
}

/// What one request costs in the reconnect buffer, measured on a disconnected session.
fn buffer_cost(payload: &str) -> usize {
    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    sh.submit(1, TaskKind::Submit, payload);
    sh.s.buffered_bytes()
}

/// Unwritten requests go back to the reconnect buffer only while it has room, in submit
/// order; one that does not fit fails with 8 like a request on the wire.
#[test]
fn unwritten_requests_return_to_the_buffer_only_if_they_fit() {
    let small = r#"{"n":2}"#;
    let big = format!(r#"{{"n":1,"pad":"{}"}}"#, "x".repeat(1000));
    let (s, b) = (buffer_cost(small), buffer_cost(&big));
    assert!(b > s + s / 2, "the big one alone is over the limit");
    let mut c = config("h:1");
    c.reconnect_buffer_bytes = s + s / 2;
    let mut sh = connected(c, &info(json!({})));
    sh.submit_unwritten(1, &big);
    sh.submit_unwritten(2, small);
    sh.submit_unwritten(3, &small.replace('2', "3"));
    sh.closed();
    assert_eq!(sh.failed(), vec![(1, 8), (3, 8)]);
    assert_eq!(sh.s.buffered_bytes(), s);
    sh.handshake(&info(json!({})));
    assert_eq!(pub_numbers(&sh), vec![(sh.reply_subject(2), json!(2))]);
}

/// While draining, a dropped connection ends the session: requests still queued for the
/// socket fail (nothing is buffered for a connection that will not come), nothing is left.
#[test]
fn connection_lost_while_draining_fails_what_was_queued() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.submit_unwritten(2, "{}");
    sh.s.handle_shutdown(sh.now);
    sh.settle();
    assert_eq!(sh.s.state(), SessionState::Draining);
    sh.closed();
    assert_eq!(sh.failed(), vec![(1, 8), (2, 8)]);
    assert_eq!((sh.s.pending(), sh.s.buffered_bytes()), (0, 0));
    assert_eq!(sh.s.state(), SessionState::Closed);
    assert_eq!(sh.connects.len(), 1);
}

impl LogCapture {
    /// The `server` field of each event named `name`.
    fn servers(&self, name: &str) -> Vec<String> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .filter(|f| f.iter().any(|(k, v)| k == "event" && v == name))
            .map(|f| {
                f.iter()
                    .find(|(k, _)| k == "server")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// gateway.md section 6: NATS state changes are logged naming the server, and credentials
/// in NATS URLs are always masked.
#[test]
fn state_change_logs_name_the_server_with_credentials_masked() {
    let scenario = || {
        let mut sh = Shell::new(config("nats://alice:s3cret@nats1:4333"));
        sh.at(ms(0));
        sh.s.handle_input(NatsInput::ConnectFailed(sh.link), ms(0));
        sh.pump();
        sh.at(sh.s.poll_timeout().unwrap());
        sh.handshake(&info(json!({})));
        sh.closed();
    };
    // Other tests run in parallel threads without a subscriber: see capture_logs.
    let logs = capture_logs(scenario);
    let masked = "nats://***@nats1:4333".to_owned();
    for name in [
        "nats_connecting",
        "nats_connect_failed",
        "nats_tcp_connected",
        "nats_connected",
        "nats_disconnected",
    ] {
        let servers = logs.servers(name);
        assert!(!servers.is_empty(), "no {name} event");
        assert!(servers.iter().all(|s| *s == masked), "{name}: {servers:?}");
    }
    let all = logs.0.lock().unwrap();
    assert!(!format!("{all:?}").contains("s3cret"));
}

/// max_payload is a limit the request may reach: a request whose payload (header block
/// plus body) is exactly max_payload is sent; one byte less of limit and it fails with 3.
#[test]
fn request_exactly_at_max_payload_is_sent() {
    let payload = r#"{"n":1}"#;
    let mut probe = connected(config("h:1"), &info(json!({})));
    probe.submit(1, TaskKind::Submit, payload);
    let line_end = probe.wire.windows(2).position(|w| w == b"\r\n").unwrap();
    let line = std::str::from_utf8(&probe.wire[..line_end])
        .unwrap()
        .to_owned();
    let total: u64 = line.split(' ').nth(4).unwrap().parse().unwrap();
    let mut sh = connected(config("h:1"), &info(json!({ "max_payload": total })));
    sh.submit(1, TaskKind::Submit, payload);
    assert!(sh.failed().is_empty());
    assert_eq!(pub_numbers(&sh), vec![(sh.reply_subject(1), json!(1))]);
    let mut sh = connected(config("h:1"), &info(json!({ "max_payload": total - 1 })));
    sh.submit(1, TaskKind::Submit, payload);
    assert_eq!(sh.failed(), vec![(1, 3)]);
}

/// The reconnect buffer may be filled exactly: with room for two requests, two are held
/// and the third is refused with 8.
#[test]
fn reconnect_buffer_fills_exactly() {
    let payload = "{}";
    let cost = buffer_cost(payload);
    let mut c = config("h:1");
    c.reconnect_buffer_bytes = 2 * cost;
    let mut sh = Shell::new(c);
    sh.at(ms(0));
    for id in 1..=3 {
        sh.submit(id, TaskKind::Submit, payload);
    }
    assert_eq!(sh.failed(), vec![(3, 8)]);
    assert_eq!(sh.s.buffered_bytes(), 2 * cost);
    assert_eq!(sh.s.pending(), 2);
}

/// The buffer's bound is conservative: a request is never admitted to a reconnect buffer
/// smaller than the bytes it will put on the wire.
#[test]
fn reconnect_buffer_never_admits_more_than_its_bytes_on_the_wire() {
    for payload in [
        "{}",
        r#"{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
    ] {
        let mut probe = connected(config("h:1"), &info(json!({})));
        probe.submit(1, TaskKind::Submit, payload);
        let frame = probe.wire.len();
        let mut c = config("h:1");
        c.reconnect_buffer_bytes = frame - 1;
        let mut sh = Shell::new(c);
        sh.at(ms(0));
        sh.submit(1, TaskKind::Submit, payload);
        assert_eq!(sh.failed(), vec![(1, 8)], "a {frame}-byte frame");
        let mut c = config("h:1");
        c.reconnect_buffer_bytes = buffer_cost(payload);
        assert!(buffer_cost(payload) >= frame);
        let mut sh = Shell::new(c);
        sh.at(ms(0));
        sh.submit(1, TaskKind::Submit, payload);
        sh.handshake(&info(json!({})));
        assert_eq!(sh.ops().len(), 4, "CONNECT, SUB, PING, then the request");
    }
}

/// Draining while a lame duck server holds new requests back: those buffered requests fail
/// with 6 at once and free their bytes; the written one is still answered; then the
/// session closes with nothing left.
#[test]
fn drain_fails_buffered_requests_at_once() {
    let mut sh = Shell::new(config("a:1,b:2"));
    sh.at(ms(0));
    sh.handshake(&info(json!({})));
    sh.submit(1, TaskKind::Submit, "{}");
    sh.server(&info(json!({"ldm": true})));
    sh.submit(2, TaskKind::Submit, "{}");
    assert!(sh.s.buffered_bytes() > 0);
    sh.s.handle_shutdown(sh.now);
    sh.pump();
    assert_eq!(sh.failed(), vec![(2, 6)]);
    assert_eq!((sh.s.pending(), sh.s.buffered_bytes()), (1, 0));
    assert_eq!(sh.s.state(), SessionState::Draining);
    sh.msg(1, "{}");
    assert!(matches!(sh.events.last(), Some(UpstreamEvent::Reply { id, .. }) if id.0 == 1));
    assert_eq!(sh.s.state(), SessionState::Closed);
    assert_eq!((sh.disconnects, sh.connects.len()), (1, 1));
}

/// Cancel withdraws the cancelled request's outcome if it was not polled yet, and only it.
#[test]
fn cancel_withdraws_only_its_own_unpolled_outcome() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    for id in 1..=3 {
        sh.submit(id, TaskKind::Submit, "{}");
    }
    sh.s.handle_input(NatsInput::Closed(sh.link), sh.now);
    sh.s.cancel(RequestId(2));
    sh.pump();
    assert_eq!(sh.failed(), vec![(1, 8), (3, 8)]);
}

/// Timers fire at their instant, not before: no keepalive PING before the interval, no
/// handshake timeout before 5 s, no connect timeout before 2 s.
#[test]
fn timers_do_not_fire_early() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.at(ms(19_999));
    assert!(sh.wire.is_empty());
    assert_eq!(sh.s.stats().pings_sent, 0);
    sh.at(ms(20_000));
    assert_eq!(sh.ops(), vec![ClientOp::Ping]);

    let mut sh = Shell::new(config("h:1"));
    sh.at(ms(0));
    sh.at(ms(1_999));
    assert_eq!(
        (sh.disconnects, sh.s.state()),
        (0, SessionState::Connecting)
    );
    sh.connected();
    sh.at(ms(4_999));
    sh.server(&info(json!({})));
    sh.at(ms(5_999));
    assert_eq!(
        (sh.disconnects, sh.s.state()),
        (0, SessionState::Handshaking)
    );
    sh.at(ms(6_999));
    assert_eq!(sh.disconnects, 1, "5 s after the TCP connect");
}

/// The `envelope` setting accepts exactly its two spellings.
#[test]
fn envelope_mode_spellings() {
    assert_eq!(
        EnvelopeMode::parse("router-v1"),
        Some(EnvelopeMode::RouterV1)
    );
    assert_eq!(EnvelopeMode::parse("legacy"), Some(EnvelopeMode::Legacy));
    assert_eq!(EnvelopeMode::parse("Legacy"), None);
    assert_eq!(EnvelopeMode::parse(""), None);
}

/// A `traceparent` of version 00 has exactly four parts; a later version may carry more
/// (W3C trace context 3.2.4), and its trace id is still used.
#[test]
fn traceparent_extra_parts_only_for_later_versions() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    let trace = "0af7651916cd43dd8448eb211c80319c";
    for (id, version) in [(1, "00"), (2, "01")] {
        let tp = format!("{version}-{trace}-b7ad6b7169203331-01-extra");
        sh.submit(
            id,
            TaskKind::Submit,
            &json!({ "traceparent": tp }).to_string(),
        );
    }
    let pubs = sh.pubs();
    assert_ne!(
        pubs[0].2["trace_id"], trace,
        "a malformed version 00 is ignored"
    );
    assert_eq!(pubs[1].2["trace_id"], trace);
}

/// `Transmit` tells a shell that output is waiting: it comes when output is queued while
/// none was, once until the shell has written all of it, and again for output queued after
/// that or on a new connection.
#[test]
fn transmit_is_announced_when_output_becomes_pending() {
    let mut sh = connected(config("h:1"), &info(json!({})));
    let before = sh.transmits;
    sh.submit_unwritten(1, "{}");
    assert_eq!(sh.transmits, before + 1);
    sh.submit_unwritten(2, "{}");
    sh.write_some(10);
    sh.settle();
    assert_eq!(
        sh.transmits,
        before + 1,
        "still announced: not all written yet"
    );
    let rest = output_bytes(&sh.s).len();
    sh.write_some(rest);
    sh.submit_unwritten(3, "{}");
    assert_eq!(
        sh.transmits,
        before + 2,
        "new output after a complete write"
    );
    // The connection drops with output unwritten; the next one announces its handshake.
    sh.s.handle_input(NatsInput::Closed(sh.link), sh.now);
    sh.settle();
    let before = sh.transmits;
    sh.s.handle_input(NatsInput::Connected(sh.link), sh.now);
    sh.s.handle_input(NatsInput::Received(sh.link, &info(json!({}))), sh.now);
    sh.settle();
    assert_eq!(sh.transmits, before + 1);
    assert!(sh.s.has_output());
}

// ----- securing the link (gateway.md section 9) ---------------------------------------------

/// Plain `nats://` to a server that does not ask for TLS: no StartTls, ever.
#[test]
fn no_tls_unless_asked() {
    let sh = connected(config("nats://h:1"), &info(json!({"tls_available": true})));
    assert!(sh.tls.is_empty(), "{:?}", sh.tls);
}

/// INFO `tls_required`: StartTls right after INFO, before CONNECT (nothing written in
/// plaintext), checking the URL's host.
#[test]
fn tls_required_upgrades_after_info_before_connect() {
    let mut sh = Shell::new(config("nats://nats.example:4222"));
    sh.at(ms(0));
    sh.connected();
    assert!(sh.tls.is_empty(), "not before INFO without tls_first");
    sh.server(&info(json!({"tls_required": true})));
    assert_eq!(sh.tls, vec![("nats.example".to_owned(), 0)]);
    assert!(matches!(sh.ops()[0], ClientOp::Connect(_)));
    sh.server(b"PONG\r\n");
    assert_eq!(sh.s.state(), SessionState::Connected);
    // A later INFO (cluster change) does not upgrade again.
    sh.server(&info(json!({"tls_required": true})));
    assert_eq!(sh.tls.len(), 1);
}

/// A `tls://` URL or a configured CA/client certificate (`NatsConfig::tls`) upgrades even if
/// the server only offers TLS; `tls_first` upgrades on TCP connect, before INFO.
#[test]
fn tls_wanted_tls_url_and_tls_first() {
    let mut sh = Shell::new(config("tls://a.example:1"));
    sh.at(ms(0));
    sh.connected();
    sh.server(&info(json!({"tls_available": true})));
    assert_eq!(sh.tls, vec![("a.example".to_owned(), 0)]);

    let mut c = config("10.1.2.3:1");
    c.tls = true;
    let mut sh = Shell::new(c);
    sh.at(ms(0));
    sh.connected();
    sh.server(&info(json!({"tls_required": true})));
    assert_eq!(sh.tls, vec![("10.1.2.3".to_owned(), 0)]);

    let mut c = config("nats://b.example:1");
    c.tls_first = true;
    let mut sh = Shell::new(c);
    sh.at(ms(0));
    sh.connected();
    assert_eq!(sh.tls, vec![("b.example".to_owned(), 0)], "before INFO");
    sh.server(&info(json!({"tls_required": true})));
    assert_eq!(sh.tls.len(), 1, "not twice");
    assert!(matches!(sh.ops()[0], ClientOp::Connect(_)));
}

/// TLS wanted and a server without it: refused (never plaintext), counted as a TLS failure,
/// health's reason set, and the retry waits for the backoff.
#[test]
fn tls_wanted_but_not_offered_is_a_tls_failure() {
    let mut sh = Shell::new(config("tls://h:1"));
    sh.at(ms(0));
    sh.connected();
    sh.server(&info(json!({})));
    assert!(sh.tls.is_empty());
    assert!(
        sh.ops().is_empty(),
        "no CONNECT in plaintext: {:?}",
        sh.ops()
    );
    assert_eq!(sh.disconnects, 1);
    assert_eq!(sh.s.stats().tls_failures, 1);
    assert_eq!(
        sh.s.link_failure(),
        Some("nats tls failed: TLS is configured but the server does not offer it")
    );
    assert_eq!(sh.connects.len(), 1, "no immediate retry");
}

/// The shell's TLS failure: counted, logged once with server and reason, health reason set,
/// reconnect under the backoff (a server that keeps failing is tried once per delay, with
/// the delay growing to its cap); a link that comes up clears it.
#[test]
fn tls_failures_back_off_and_clear_when_a_link_comes_up() {
    let scenario = || {
        let mut sh = Shell::new(config("nats://h.example:1"));
        sh.at(ms(0));
        let mut retries = Vec::new();
        for _ in 0..8 {
            sh.connected();
            sh.server(&info(json!({"tls_required": true})));
            let link = sh.link;
            sh.report(NatsInput::TlsFailed(
                link,
                "invalid peer certificate: UnknownIssuer",
            ));
            sh.pump();
            assert_eq!(
                sh.s.link_failure(),
                Some("nats tls failed: invalid peer certificate: UnknownIssuer")
            );
            let next = sh.s.poll_timeout().unwrap();
            assert!(next > sh.now, "a failure is never retried at once");
            retries.push(next - sh.now);
            sh.at(next);
        }
        assert_eq!(sh.s.stats().tls_failures, 8);
        assert!(
            retries.iter().all(|d| *d >= Duration::from_millis(50)),
            "{retries:?}"
        );
        assert!(
            retries[7] >= Duration::from_secs(1),
            "backs off to the cap: {retries:?}"
        );
        assert_eq!(sh.disconnects, 0, "the shell closed the socket itself");
        assert!(sh.s.last_error().unwrap().contains("UnknownIssuer"));
        sh.handshake(&info(json!({"tls_required": true})));
        assert_eq!(sh.s.link_failure(), None);
    };
    scenario();
    let logs = capture_logs(scenario);
    let events = logs.0.lock().unwrap();
    let tls_lines: Vec<_> = events
        .iter()
        .filter(|e| {
            e.iter()
                .any(|(k, v)| k == "event" && v == "nats_tls_failed")
        })
        .collect();
    assert_eq!(tls_lines.len(), 8, "one line per attempt");
    let line = tls_lines[0];
    assert!(line
        .iter()
        .any(|(k, v)| k == "server" && v == "nats://h.example:1"));
    assert!(line
        .iter()
        .any(|(k, v)| k == "error" && v.contains("UnknownIssuer")));
    assert!(
        !events
            .iter()
            .any(|e| e.iter().any(|(_, v)| v == "nats_handshake_failed")),
        "the failure is not logged twice"
    );
}

/// Every authentication error nats-server sends counts as an auth failure with the server's
/// words as health's reason, and reconnects under the backoff; a permissions error does not.
#[test]
fn auth_errors_are_counted_and_back_off() {
    for text in [
        "Authorization Violation",
        "Authentication Timeout",
        "User Authentication Expired",
        "User Authentication Revoked",
        "Account Authentication Expired",
    ] {
        let mut sh = Shell::new(config("nats://u:wrong@h:1"));
        sh.at(ms(0));
        sh.connected();
        sh.server(&info(json!({"auth_required": true})));
        sh.server(format!("-ERR '{text}'\r\n").as_bytes());
        assert_eq!(sh.s.stats().auth_failures, 1, "{text}");
        assert_eq!(
            sh.s.link_failure(),
            Some(format!("nats auth failed: {text}").as_str())
        );
        assert_eq!(sh.disconnects, 1);
        assert!(
            sh.s.poll_timeout().unwrap() > sh.now,
            "{text}: no immediate retry"
        );
        assert_eq!(sh.connects.len(), 1);
        let last = sh.s.last_error().unwrap();
        assert!(last.contains(text) && !last.contains("wrong"), "{last}");
    }
    let mut sh = connected(config("h:1"), &info(json!({})));
    sh.server(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n");
    assert_eq!(sh.s.stats().auth_failures, 0);
    assert_eq!(sh.s.link_failure(), None);
}

fn connect_fields(c: NatsConfig, info_extra: Value) -> Value {
    let mut sh = Shell::new(c);
    sh.at(ms(0));
    sh.connected();
    sh.server(&info(info_extra));
    match &sh.ops()[0] {
        ClientOp::Connect(c) => c.clone(),
        other => panic!("{other:?}"),
    }
}

/// CONNECT carries each method's fields, and only those: user + password and token from the
/// configuration; the nkey's public key and the nonce signed with its seed; the JWT and the
/// signature. URL userinfo wins over the configured credentials.
#[test]
fn connect_fields_for_each_method() {
    use ipc_gateway_core::nats::auth::{NatsAuth, Secret};
    let with = |auth: NatsAuth| {
        let mut c = config("h:1");
        c.auth = auth;
        c
    };
    let c = connect_fields(
        with(NatsAuth::UserPassword {
            user: "alice".into(),
            password: Secret::new("pw"),
        }),
        json!({}),
    );
    assert_eq!(
        (c["user"].as_str(), c["pass"].as_str()),
        (Some("alice"), Some("pw"))
    );
    assert!(c.get("auth_token").is_none() && c.get("sig").is_none());

    let c = connect_fields(with(NatsAuth::Token(Secret::new("t0k"))), json!({}));
    assert_eq!(c["auth_token"], "t0k");
    assert!(c.get("user").is_none());

    let kp = nkeys::KeyPair::new_user();
    let seed = Secret::new(kp.seed().unwrap());
    let c = connect_fields(
        with(NatsAuth::Nkey { seed: seed.clone() }),
        json!({"nonce": "abcDEF123"}),
    );
    assert_eq!(c["nkey"], kp.public_key());
    let sig = data_encoding::BASE64URL_NOPAD
        .decode(c["sig"].as_str().unwrap().as_bytes())
        .unwrap();
    nkeys::KeyPair::from_public_key(&kp.public_key())
        .unwrap()
        .verify(b"abcDEF123", &sig)
        .unwrap();
    assert!(c.get("jwt").is_none());

    let c = connect_fields(
        with(NatsAuth::Jwt {
            jwt: Secret::new("eyJ.x.y"),
            seed,
        }),
        json!({"nonce": "n0"}),
    );
    assert_eq!(c["jwt"], "eyJ.x.y");
    assert!(c.get("nkey").is_none());
    let sig = data_encoding::BASE64URL_NOPAD
        .decode(c["sig"].as_str().unwrap().as_bytes())
        .unwrap();
    kp.verify(b"n0", &sig).unwrap();

    let mut url_wins = config("nats://bob:b0b@h:1");
    url_wins.auth = NatsAuth::Token(Secret::new("t0k"));
    let c = connect_fields(url_wins, json!({}));
    assert_eq!(
        (c["user"].as_str(), c.get("auth_token")),
        (Some("bob"), None)
    );
}

/// `set_auth` (SIGHUP's rotation): the next CONNECT carries the new credentials.
#[test]
fn rotated_credentials_are_used_on_the_next_connect() {
    use ipc_gateway_core::nats::auth::{NatsAuth, Secret};
    let mut c = config("h:1");
    c.auth = NatsAuth::Token(Secret::new("old"));
    let mut sh = connected(c, &info(json!({})));
    sh.s.set_auth(NatsAuth::Token(Secret::new("new")));
    sh.closed();
    sh.connected();
    sh.server(&info(json!({})));
    let ClientOp::Connect(c) = &sh.ops()[0] else {
        panic!()
    };
    assert_eq!(c["auth_token"], "new");
}
