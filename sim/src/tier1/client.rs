//! An IDE client as a plain struct: writes IPC frames, pipelines, decodes replies with its
//! own decoder and checks each reply against the request at the head of its queue.
//!
//! Checked per reply (gateway.md section 1): there is a request for it (exactly one reply,
//! in order); a RESPONSE_OK echoes *this* request's marker (no mix-up) and its Router
//! behaviour (an error class comes back as that class, a silent Router never answers); an
//! error frame carries an allowed code; a timeout never comes early; and every reply comes by
//! its deadline plus slack (no hang). When its gateway exits (shutdown), nothing it read may
//! be left unanswered unless a second signal forced the exit.

use std::collections::VecDeque;
use std::time::Duration;

use ipc_gateway_core::Instant;
use serde_json::Value;

use crate::after_outage::Reply;
use crate::router::Behaviour;

pub const PING: u8 = 0xF0;
pub const PONG: u8 = 0xF1;
pub const RESPONSE_OK: u8 = 0x10;
pub const RESPONSE_ERROR: u8 = 0x11;

/// One request a client will send.
#[derive(Debug, Clone)]
pub struct ReqSpec {
    /// TASK_SUBMIT/QUERY/CANCEL, or PING.
    pub kind: u8,
    pub behaviour: Behaviour,
    pub marker: String,
}

#[derive(Debug, Clone)]
struct Sent {
    spec: ReqSpec,
    at: Instant,
    /// Requests ahead of it on the connection when it was written.
    ahead: usize,
}

/// What the client knows of the gateway's settings, to judge replies.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub request_timeout: Duration,
    pub per_conn_limit: usize,
    pub slack: Duration,
    /// The run signals gateways: error 6 (shutting down) is allowed, without a request id
    /// when refused at admission (the shutdown check judges each one).
    pub shutdown: bool,
}

/// Replies by outcome: index 0 RESPONSE_OK (Router reply), otherwise the error code.
pub type Tally = std::collections::BTreeMap<u16, u64>;

#[derive(Debug)]
pub struct Client {
    pub gw: usize,
    pub conn: Option<ipc_gateway_core::ConnId>,
    pub start_at: Instant,
    plan: VecDeque<ReqSpec>,
    pipeline: usize,
    /// Hang up after this many replies, with requests still in flight.
    leave_after: Option<usize>,
    outstanding: VecDeque<Sent>,
    rx: Vec<u8>,
    /// Bytes written to the socket the gateway has not read yet.
    pub unread: Vec<u8>,
    /// The markers of the task requests (not PINGs) in `unread`, in order.
    pub unread_tasks: Vec<String>,
    /// What came back for each task request, by marker (for the after-outage check).
    pub answers: std::collections::BTreeMap<String, Reply>,
    pub replies: usize,
    pub tally: Tally,
    /// Router error classes seen in RESPONSE_OK frames.
    pub router_errors: Tally,
    pub eof_sent: bool,
    /// Writes no new request from then on (what is left of the plan is dropped).
    pub stop_at: Option<Instant>,
    pub left: bool,
    pub closed_by_gateway: bool,
    /// The gateway had stopped accepting when this client tried to connect.
    pub refused: bool,
    /// Requests it had written that the gateway never read when it exited.
    pub unread_at_exit: usize,
    pub failures: Vec<String>,
    expect: Expect,
    name: String,
}

impl Client {
    pub fn new(
        name: String,
        gw: usize,
        start_at: Instant,
        plan: Vec<ReqSpec>,
        pipeline: usize,
        leave_after: Option<usize>,
        expect: Expect,
    ) -> Client {
        Client {
            gw,
            conn: None,
            start_at,
            plan: plan.into(),
            pipeline: pipeline.max(1),
            leave_after,
            outstanding: VecDeque::new(),
            rx: Vec::new(),
            unread: Vec::new(),
            unread_tasks: Vec::new(),
            answers: std::collections::BTreeMap::new(),
            replies: 0,
            tally: Tally::new(),
            router_errors: Tally::new(),
            eof_sent: false,
            stop_at: None,
            left: false,
            closed_by_gateway: false,
            refused: false,
            unread_at_exit: 0,
            failures: Vec::new(),
            expect,
            name,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// All asked, all answered (or gone).
    pub fn finished(&self) -> bool {
        self.left || self.closed_by_gateway || (self.plan.is_empty() && self.outstanding.is_empty())
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Writes requests up to the pipeline depth.
    pub fn fill(&mut self, now: Instant) {
        if self.stop_at.is_some_and(|t| now >= t) {
            self.plan.clear();
        }
        while self.outstanding.len() < self.pipeline && !self.left && !self.closed_by_gateway {
            let Some(spec) = self.plan.pop_front() else {
                break;
            };
            let payload = if spec.kind == PING {
                Vec::new()
            } else {
                serde_json::json!({"task": "code_completion", "file": "a.py", "line": 42,
                    "sim": spec.behaviour.text(), "m": spec.marker})
                .to_string()
                .into_bytes()
            };
            let len = (payload.len() + 6) as u32;
            self.unread.extend_from_slice(&len.to_be_bytes());
            self.unread.push(1);
            self.unread.push(spec.kind);
            self.unread.extend_from_slice(&payload);
            if spec.kind != PING {
                self.unread_tasks.push(spec.marker.clone());
            }
            self.outstanding.push_back(Sent {
                ahead: self.outstanding.len(),
                spec,
                at: now,
            });
        }
    }

    /// Whether the client should hang up now (it received enough replies).
    pub fn wants_to_leave(&self) -> bool {
        !self.left
            && self.leave_after.is_some_and(|n| self.replies >= n)
            && !self.outstanding.is_empty()
    }

    pub fn leave(&mut self) {
        self.left = true;
        self.outstanding.clear();
        self.unread.clear();
        self.unread_tasks.clear();
    }

    /// Its connect was refused: the gateway's shell closed its listener at a shutdown signal.
    pub fn refuse(&mut self) {
        self.refused = true;
        self.closed_by_gateway = true;
        self.plan.clear();
    }

    /// The gateway's process exited (after `ShutdownComplete`) and its socket closed. What
    /// the gateway read must have been answered, unless a second signal forced the exit;
    /// what it never read (still in the socket) is lost, as with any process that exits.
    pub fn on_gateway_exit(&mut self, forced: bool) {
        if self.left || self.closed_by_gateway {
            return;
        }
        self.closed_by_gateway = true;
        let unread = self.unread_frames();
        self.unread_at_exit = unread;
        let read = self.outstanding.len() - unread;
        if read > 0 && !forced {
            self.fail(format!(
                "the gateway exited (drained, not forced) with {read} requests it had read \
                 unanswered"
            ));
        }
        self.outstanding.clear();
        self.plan.clear();
        self.unread.clear();
        self.unread_tasks.clear();
    }

    /// Whole frames in `unread`.
    fn unread_frames(&self) -> usize {
        let mut n = 0;
        let mut at = 0;
        while at + 4 <= self.unread.len() {
            let b = &self.unread[at..at + 4];
            at += u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            n += 1;
        }
        n
    }

    /// The gateway closed the connection.
    pub fn on_closed(&mut self) {
        self.closed_by_gateway = true;
        if !self.outstanding.is_empty() || !self.plan.is_empty() && !self.eof_sent {
            let n = self.outstanding.len();
            self.fail(format!(
                "closed by the gateway with {n} requests unanswered"
            ));
        }
    }

    fn fail(&mut self, what: String) {
        self.failures.push(format!("{}: {what}", self.name));
    }

    /// Reply bytes read from the socket.
    pub fn on_bytes(&mut self, bytes: &[u8], now: Instant) {
        self.rx.extend_from_slice(bytes);
        loop {
            if self.rx.len() < 6 {
                return;
            }
            let len = u32::from_be_bytes([self.rx[0], self.rx[1], self.rx[2], self.rx[3]]) as usize;
            if len < 6 || self.rx[4] != 1 {
                let head = self.rx[..6].to_vec();
                self.fail(format!("undecodable reply header {head:?}"));
                self.rx.clear();
                return;
            }
            if self.rx.len() < len {
                return;
            }
            let frame: Vec<u8> = self.rx.drain(..len).collect();
            self.on_reply(frame[5], &frame[6..], now);
        }
    }

    fn on_reply(&mut self, kind: u8, body: &[u8], now: Instant) {
        self.replies += 1;
        let Some(sent) = self.outstanding.pop_front() else {
            return self.fail(format!("reply 0x{kind:02x} with no request outstanding"));
        };
        let marker = &sent.spec.marker;
        let e = self.expect;
        let bound = sent.at
            + e.request_timeout * (1 + (sent.ahead / e.per_conn_limit.max(1)) as u32)
            + e.slack;
        if now > bound {
            self.fail(format!(
                "request {marker} sent at {:?} answered at {now:?}, after its bound {bound:?}",
                sent.at
            ));
        }
        if sent.spec.kind == PING {
            if kind != PONG {
                self.fail(format!("PING {marker} answered with 0x{kind:02x}"));
            }
            *self.tally.entry(0).or_default() += 1;
            return;
        }
        let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let answer = Reply {
            at: now - Instant::ZERO,
            code: if kind == RESPONSE_OK {
                0
            } else {
                json["error"]["code"].as_u64().unwrap_or(0) as u16
            },
            message: json["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        self.answers.insert(marker.clone(), answer);
        match kind {
            RESPONSE_OK => {
                *self.tally.entry(0).or_default() += 1;
                let echo = json["echo"].as_str();
                if echo != Some(marker.as_str()) {
                    return self.fail(format!(
                        "mix-up: request {marker} got the reply for {echo:?}"
                    ));
                }
                match (&sent.spec.behaviour, json["ok"].as_bool()) {
                    (Behaviour::Silent, _) => {
                        self.fail(format!("a silent Router answered {marker}"))
                    }
                    (Behaviour::Error(class), Some(false)) => {
                        let code = json["error"]["code"].as_str();
                        if code != Some(class.as_str()) {
                            self.fail(format!(
                                "{marker}: expected Router error {class}, got {code:?}"
                            ));
                        }
                        let idx = crate::router::ERROR_CLASSES
                            .iter()
                            .position(|c| c == class)
                            .unwrap_or(99) as u16;
                        *self.router_errors.entry(idx).or_default() += 1;
                    }
                    (Behaviour::Error(_), _) => {
                        self.fail(format!("{marker}: expected a Router error"))
                    }
                    (_, Some(true)) => {}
                    (b, ok) => self.fail(format!("{marker}: behaviour {b:?} got ok={ok:?}")),
                }
            }
            RESPONSE_ERROR => {
                let code = json["error"]["code"].as_u64().unwrap_or(0) as u16;
                *self.tally.entry(code).or_default() += 1;
                let allowed = [5, 7, 8].contains(&code) || (code == 6 && e.shutdown);
                if !allowed {
                    self.fail(format!("{marker}: unexpected error code {code}: {json}"));
                }
                if code == 5 && now < sent.at + e.request_timeout {
                    self.fail(format!(
                        "{marker}: timeout at {now:?}, before its deadline (sent {:?})",
                        sent.at
                    ));
                }
                if json["error"]["request_id"].is_null() && code != 7 && code != 8 && code != 6 {
                    self.fail(format!("{marker}: error {code} without request_id"));
                }
            }
            other => self.fail(format!("{marker}: reply of type 0x{other:02x}")),
        }
    }
}
