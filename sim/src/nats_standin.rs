//! A sans-IO NATS *server* stand-in that speaks the real client wire protocol.
//!
//! Written from the protocol description (nats.io "Client Protocol"), not from the gateway's
//! codec, so that the two implementations check each other. One [`NatsStandin`] is one
//! server: clients connect with [`NatsStandin::open`] (refused while the server is down),
//! feed bytes with [`NatsStandin::handle_bytes`] and collect server bytes with
//! [`NatsStandin::take_output`]. Time is an argument everywhere; nothing here reads a clock.
//!
//! ```text
//!  open(now) ──▶ INFO queued ──▶ CONNECT / PING / SUB / UNSUB / PUB / HPUB parsed
//!      │                              │ PUB with reply, nobody subscribed,
//!      │ refused while down           │ client asked headers+no_responders ─▶ HMSG 503
//!      ▼                              ▼ otherwise MSG/HMSG to every matching subscription
//!  attempts recorded          published messages recorded (subject, reply, headers, payload)
//! ```
//!
//! Besides socket clients, in-process subscribers ([`NatsStandin::subscribe_local`]) receive
//! messages through [`NatsStandin::take_local`]; the Router behaviours in
//! [`crate::router`] use them. Garbage from a client earns `-ERR` and the connection is closed
//! by the server, as nats-server does; the caller learns of it through
//! [`NatsStandin::take_server_closed`].

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use ipc_gateway_core::Instant;

/// A connection to the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// An in-process subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalSubId(pub u64);

/// What the server announces and how it behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub server_id: String,
    pub headers: bool,
    pub max_payload: u64,
    pub connect_urls: Vec<String>,
    pub ldm: bool,
    /// Server-side keepalive: PING every interval, `-ERR 'Stale Connection'` and close after
    /// this many unanswered. `None`: the server never pings.
    pub ping_interval: Option<Duration>,
    pub max_pings_out: u32,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            server_id: "SIMSTANDIN".to_owned(),
            headers: true,
            max_payload: 1024 * 1024,
            connect_urls: Vec::new(),
            ldm: false,
            ping_interval: None,
            max_pings_out: 2,
        }
    }
}

/// One message a socket client published (PUB or HPUB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub conn: ConnId,
    pub at: Instant,
    pub subject: String,
    pub reply: Option<String>,
    /// `None` for PUB; for HPUB the header lines (the version line is checked, not kept).
    pub headers: Option<Vec<(String, String)>>,
    pub payload: Vec<u8>,
}

/// A message delivered to an in-process subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMsg {
    pub sub: LocalSubId,
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Option<Vec<(String, String)>>,
    pub payload: Vec<u8>,
}

/// One connection attempt as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub at: Instant,
    pub accepted: bool,
}

/// What the CONNECT said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectInfo {
    pub headers: bool,
    pub no_responders: bool,
    pub verbose: bool,
    pub name: Option<String>,
    pub raw: String,
}

#[derive(Debug, Clone)]
struct Sub {
    subject: String,
    /// Deliveries left before an `UNSUB <sid> <max>` takes effect.
    remaining: Option<u64>,
}

#[derive(Debug, Default)]
struct Conn {
    input: Vec<u8>,
    output: Vec<u8>,
    connect: Option<ConnectInfo>,
    subs: BTreeMap<u64, Sub>,
    next_ping: Option<Instant>,
    pings_out: u32,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StandinStats {
    pub msgs_delivered: u64,
    pub no_responders_sent: u64,
    pub errors_sent: u64,
    pub pings_received: u64,
}

/// The server. See the module doc.
#[derive(Debug)]
pub struct NatsStandin {
    config: ServerConfig,
    up: bool,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    local: BTreeMap<LocalSubId, String>,
    next_local: u64,
    local_inbox: VecDeque<LocalMsg>,
    published: Vec<Published>,
    attempts: Vec<Attempt>,
    server_closed: Vec<ConnId>,
    closed_output: BTreeMap<ConnId, Vec<u8>>,
    stats: StandinStats,
}

impl NatsStandin {
    pub fn new(config: ServerConfig) -> NatsStandin {
        NatsStandin {
            config,
            up: true,
            conns: BTreeMap::new(),
            next_conn: 0,
            local: BTreeMap::new(),
            next_local: 0,
            local_inbox: VecDeque::new(),
            published: Vec::new(),
            attempts: Vec::new(),
            server_closed: Vec::new(),
            closed_output: BTreeMap::new(),
            stats: StandinStats::default(),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut ServerConfig {
        &mut self.config
    }

    // ----- connections ----------------------------------------------------------------------

    /// A client connects. `None`: refused (the server is down). The INFO is queued at once.
    pub fn open(&mut self, now: Instant) -> Option<ConnId> {
        self.attempts.push(Attempt {
            at: now,
            accepted: self.up,
        });
        if !self.up {
            return None;
        }
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        let mut conn = Conn::default();
        conn.output.extend_from_slice(self.info_line(id).as_bytes());
        conn.next_ping = self.config.ping_interval.map(|p| now + p);
        self.conns.insert(id, conn);
        Some(id)
    }

    fn info_line(&self, id: ConnId) -> String {
        let info = serde_json::json!({
            "server_id": self.config.server_id,
            "server_name": self.config.server_id,
            "version": "2.10.0-sim",
            "proto": 1,
            "host": "0.0.0.0",
            "port": 4222,
            "headers": self.config.headers,
            "max_payload": self.config.max_payload,
            "client_id": id.0,
            "connect_urls": self.config.connect_urls,
            "ldm": self.config.ldm,
        });
        format!("INFO {info}\r\n")
    }

    /// Sends a fresh INFO to every connection (e.g. after changing `connect_urls` or `ldm`).
    pub fn broadcast_info(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let line = self.info_line(id);
            if let Some(c) = self.conns.get_mut(&id) {
                c.output.extend_from_slice(line.as_bytes());
            }
        }
    }

    /// The client closed its socket (or the network lost it): forget the connection.
    pub fn close(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    pub fn is_open(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Open connection ids, in order.
    pub fn conn_ids(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    /// Connections the server itself closed since the last call (after `-ERR`, a stale
    /// connection, or [`NatsStandin::go_down`]). Their final bytes are still in `take_output`.
    pub fn take_server_closed(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.server_closed)
    }

    /// The server process stops: every connection is closed and connects are refused until
    /// [`NatsStandin::go_up`]. In-process subscribers lose their subscriptions too (they
    /// were connections of the same process). Returns the closed connections.
    pub fn go_down(&mut self) -> Vec<ConnId> {
        self.up = false;
        self.local.clear();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        self.conns.clear();
        ids
    }

    pub fn go_up(&mut self) {
        self.up = true;
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Server bytes for a connection, taken (the caller models the network).
    pub fn take_output(&mut self, conn: ConnId) -> Vec<u8> {
        self.conns
            .get_mut(&conn)
            .map(|c| std::mem::take(&mut c.output))
            .unwrap_or_default()
    }

    pub fn has_output(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !c.output.is_empty())
    }

    /// What the connection's CONNECT said, once it came.
    pub fn connect_info(&self, conn: ConnId) -> Option<&ConnectInfo> {
        self.conns.get(&conn).and_then(|c| c.connect.as_ref())
    }

    /// The subjects a connection subscribes to, by sid.
    pub fn subscriptions(&self, conn: ConnId) -> Vec<(u64, String)> {
        self.conns
            .get(&conn)
            .map(|c| {
                c.subs
                    .iter()
                    .map(|(s, sub)| (*s, sub.subject.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    // ----- records --------------------------------------------------------------------------

    pub fn published(&self) -> &[Published] {
        &self.published
    }

    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    pub fn stats(&self) -> &StandinStats {
        &self.stats
    }

    // ----- keepalive ------------------------------------------------------------------------

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.next_ping).min()
    }

    /// Server-side keepalive (only with `ping_interval`).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(interval) = self.config.ping_interval else {
            return;
        };
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.next_ping.is_some_and(|t| t <= now) {
                if c.pings_out >= self.config.max_pings_out {
                    self.fatal(id, "Stale Connection");
                    continue;
                }
                c.pings_out += 1;
                c.output.extend_from_slice(b"PING\r\n");
                c.next_ping = Some(now + interval);
            }
        }
    }

    // ----- in-process subscribers and publishing ---------------------------------------------

    /// Subscribes an in-process party (a Router behaviour) to a subject pattern.
    pub fn subscribe_local(&mut self, subject: &str) -> LocalSubId {
        self.next_local += 1;
        let id = LocalSubId(self.next_local);
        self.local.insert(id, subject.to_owned());
        id
    }

    pub fn unsubscribe_local(&mut self, id: LocalSubId) {
        self.local.remove(&id);
    }

    /// Messages delivered to in-process subscribers, in delivery order.
    pub fn take_local(&mut self) -> Vec<LocalMsg> {
        self.local_inbox.drain(..).collect()
    }

    /// Publishes from an in-process party. Returns how many subscriptions received it.
    pub fn publish(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&[(String, String)]>,
        payload: &[u8],
    ) -> usize {
        self.route(subject, reply, headers, payload)
    }

    fn route(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&[(String, String)]>,
        payload: &[u8],
    ) -> usize {
        let mut delivered = 0;
        let local: Vec<LocalSubId> = self
            .local
            .iter()
            .filter(|(_, pattern)| subject_matches(pattern, subject))
            .map(|(id, _)| *id)
            .collect();
        for sub in local {
            delivered += 1;
            self.local_inbox.push_back(LocalMsg {
                sub,
                subject: subject.to_owned(),
                reply: reply.map(str::to_owned),
                headers: headers.map(<[(String, String)]>::to_vec),
                payload: payload.to_vec(),
            });
        }
        let header_block = headers.map(|h| encode_header_block(None, h));
        for conn in self.conns.values_mut() {
            let mut done = Vec::new();
            for (sid, sub) in &mut conn.subs {
                if !subject_matches(&sub.subject, subject) {
                    continue;
                }
                delivered += 1;
                write_msg(
                    &mut conn.output,
                    subject,
                    *sid,
                    reply,
                    header_block.as_deref(),
                    payload,
                );
                if let Some(r) = sub.remaining.as_mut() {
                    *r = r.saturating_sub(1);
                    if *r == 0 {
                        done.push(*sid);
                    }
                }
            }
            for sid in done {
                conn.subs.remove(&sid);
            }
        }
        self.stats.msgs_delivered += delivered as u64;
        delivered
    }

    // ----- the client protocol --------------------------------------------------------------

    /// Bytes from a client. Unknown connections are ignored.
    pub fn handle_bytes(&mut self, conn: ConnId, bytes: &[u8], now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.input.extend_from_slice(bytes);
        // Any traffic from the client answers the keepalive.
        c.pings_out = 0;
        if let Some(p) = self.config.ping_interval {
            c.next_ping = Some(now + p);
        }
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            match parse_op(&c.input, self.config.max_payload) {
                Parse::Incomplete => return,
                Parse::Error(text) => {
                    self.fatal(conn, text);
                    return;
                }
                Parse::Op(op, used) => {
                    c.input.drain(..used);
                    self.apply(conn, op, now);
                }
            }
        }
    }

    fn fatal(&mut self, conn: ConnId, text: &str) {
        if let Some(mut c) = self.conns.remove(&conn) {
            self.stats.errors_sent += 1;
            c.output
                .extend_from_slice(format!("-ERR '{text}'\r\n").as_bytes());
            // Keep the final bytes readable: put the connection back, marked closed.
            let out = std::mem::take(&mut c.output);
            self.closed_output.insert(conn, out);
            self.server_closed.push(conn);
        }
    }

    fn apply(&mut self, conn: ConnId, op: ClientOp, now: Instant) {
        match op {
            ClientOp::Connect(json) => {
                let v: serde_json::Value = match serde_json::from_str(&json) {
                    Ok(v) => v,
                    Err(_) => return self.fatal(conn, "Invalid CONNECT"),
                };
                let flag = |k: &str| v.get(k).and_then(serde_json::Value::as_bool) == Some(true);
                let info = ConnectInfo {
                    headers: flag("headers"),
                    no_responders: flag("no_responders"),
                    verbose: flag("verbose"),
                    name: v.get("name").and_then(|n| n.as_str()).map(str::to_owned),
                    raw: json,
                };
                if info.no_responders && !info.headers {
                    return self.fatal(conn, "no responders requires headers support");
                }
                if info.headers && !self.config.headers {
                    return self.fatal(conn, "headers not supported");
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.connect = Some(info);
                }
                self.ok(conn);
            }
            ClientOp::Ping => {
                self.stats.pings_received += 1;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.output.extend_from_slice(b"PONG\r\n");
                }
            }
            ClientOp::Pong => {}
            ClientOp::Sub { subject, sid } => {
                if !valid_subject(&subject, true) {
                    return self.fatal(conn, "Invalid Subject");
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.subs.insert(
                        sid,
                        Sub {
                            subject,
                            remaining: None,
                        },
                    );
                }
                self.ok(conn);
            }
            ClientOp::Unsub { sid, max } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    match max {
                        Some(m) if m > 0 => {
                            if let Some(s) = c.subs.get_mut(&sid) {
                                s.remaining = Some(m);
                            }
                        }
                        _ => {
                            c.subs.remove(&sid);
                        }
                    }
                }
                self.ok(conn);
            }
            ClientOp::Pub {
                subject,
                reply,
                headers,
                payload,
            } => {
                if self
                    .conns
                    .get(&conn)
                    .and_then(|c| c.connect.as_ref())
                    .is_none()
                {
                    // nats-server requires CONNECT first.
                    return self.fatal(conn, "Authorization Violation");
                }
                if !valid_subject(&subject, false)
                    || reply.as_deref().is_some_and(|r| !valid_subject(r, false))
                {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.output
                            .extend_from_slice(b"-ERR 'Invalid Publish Subject'\r\n");
                    }
                    self.stats.errors_sent += 1;
                    return;
                }
                if headers.is_some()
                    && !self
                        .conns
                        .get(&conn)
                        .and_then(|c| c.connect.as_ref())
                        .is_some_and(|i| i.headers)
                {
                    return self.fatal(conn, "Unknown Protocol Operation");
                }
                self.published.push(Published {
                    conn,
                    at: now,
                    subject: subject.clone(),
                    reply: reply.clone(),
                    headers: headers.clone(),
                    payload: payload.clone(),
                });
                self.ok(conn);
                let n = self.route(&subject, reply.as_deref(), headers.as_deref(), &payload);
                if n == 0 {
                    if let Some(reply) = reply {
                        self.no_responders(conn, &reply);
                    }
                }
            }
        }
    }

    fn ok(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.connect.as_ref().is_some_and(|i| i.verbose) {
                c.output.extend_from_slice(b"+OK\r\n");
            }
        }
    }

    /// nats-server's answer to a request nobody receives, when the requester asked for it:
    /// a header-only message with status 503 on the reply subject, to the requester only.
    fn no_responders(&mut self, conn: ConnId, reply: &str) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c
            .connect
            .as_ref()
            .is_some_and(|i| i.headers && i.no_responders)
        {
            return;
        }
        let sids: Vec<u64> = c
            .subs
            .iter()
            .filter(|(_, s)| subject_matches(&s.subject, reply))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in sids {
            self.stats.no_responders_sent += 1;
            c.output.extend_from_slice(
                format!("HMSG {reply} {sid} 16 16\r\nNATS/1.0 503\r\n\r\n\r\n").as_bytes(),
            );
        }
    }
}

// The closed connections' final bytes live beside the open ones.
impl NatsStandin {
    /// The final bytes (`-ERR …`) of a connection the server closed, taken.
    pub fn take_closed_output(&mut self, conn: ConnId) -> Vec<u8> {
        self.closed_output.remove(&conn).unwrap_or_default()
    }
}

fn write_msg(
    out: &mut Vec<u8>,
    subject: &str,
    sid: u64,
    reply: Option<&str>,
    header_block: Option<&[u8]>,
    payload: &[u8],
) {
    let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
    match header_block {
        None => out.extend_from_slice(
            format!("MSG {subject} {sid}{reply} {}\r\n", payload.len()).as_bytes(),
        ),
        Some(h) => out.extend_from_slice(
            format!(
                "HMSG {subject} {sid}{reply} {} {}\r\n",
                h.len(),
                h.len() + payload.len()
            )
            .as_bytes(),
        ),
    }
    if let Some(h) = header_block {
        out.extend_from_slice(h);
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `NATS/1.0[ status]\r\n(Key: Value\r\n)*\r\n`.
pub fn encode_header_block(status: Option<u16>, headers: &[(String, String)]) -> Vec<u8> {
    let mut b = match status {
        Some(s) => format!("NATS/1.0 {s}\r\n"),
        None => "NATS/1.0\r\n".to_owned(),
    };
    for (k, v) in headers {
        b.push_str(&format!("{k}: {v}\r\n"));
    }
    b.push_str("\r\n");
    b.into_bytes()
}

/// Whether `subject` matches the subscription `pattern` (`*` one token, `>` the rest, at
/// least one token).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A subject is non-empty tokens without whitespace; wildcards only where allowed, and as
/// whole tokens (`>` last).
pub fn valid_subject(subject: &str, wildcards: bool) -> bool {
    if subject.is_empty()
        || subject
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return false;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && match *t {
                "*" => wildcards,
                ">" => wildcards && i + 1 == tokens.len(),
                t => !t.contains(['*', '>']) || !wildcards,
            }
    })
}

#[derive(Debug)]
enum ClientOp {
    Connect(String),
    Ping,
    Pong,
    Sub {
        subject: String,
        sid: u64,
    },
    Unsub {
        sid: u64,
        max: Option<u64>,
    },
    Pub {
        subject: String,
        reply: Option<String>,
        headers: Option<Vec<(String, String)>>,
        payload: Vec<u8>,
    },
}

enum Parse {
    Incomplete,
    Error(&'static str),
    Op(ClientOp, usize),
}

/// The longest control line accepted (nats-server's `max_control_line` default is 4 KiB).
const MAX_CONTROL_LINE: usize = 4096;

fn parse_op(input: &[u8], max_payload: u64) -> Parse {
    let Some(eol) = input.windows(2).position(|w| w == b"\r\n") else {
        if input.len() > MAX_CONTROL_LINE {
            return Parse::Error("Maximum Control Line Exceeded");
        }
        return Parse::Incomplete;
    };
    let Ok(line) = std::str::from_utf8(&input[..eol]) else {
        return Parse::Error("Unknown Protocol Operation");
    };
    let after = eol + 2;
    let (verb, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let args: Vec<&str> = rest.split_ascii_whitespace().collect();
    let num = |s: &str| s.parse::<u64>().ok();
    match verb.to_ascii_uppercase().as_str() {
        "CONNECT" => Parse::Op(ClientOp::Connect(rest.trim().to_owned()), after),
        "PING" if args.is_empty() => Parse::Op(ClientOp::Ping, after),
        "PONG" if args.is_empty() => Parse::Op(ClientOp::Pong, after),
        "SUB" => {
            // SUB <subject> [queue group] <sid>
            let (subject, sid) = match args.as_slice() {
                [s, sid] | [s, _, sid] => (*s, num(sid)),
                _ => return Parse::Error("Unknown Protocol Operation"),
            };
            match sid {
                Some(sid) => Parse::Op(
                    ClientOp::Sub {
                        subject: subject.to_owned(),
                        sid,
                    },
                    after,
                ),
                None => Parse::Error("Unknown Protocol Operation"),
            }
        }
        "UNSUB" => match args.as_slice() {
            [sid] => match num(sid) {
                Some(sid) => Parse::Op(ClientOp::Unsub { sid, max: None }, after),
                None => Parse::Error("Unknown Protocol Operation"),
            },
            [sid, max] => match (num(sid), num(max)) {
                (Some(sid), Some(max)) => Parse::Op(
                    ClientOp::Unsub {
                        sid,
                        max: Some(max),
                    },
                    after,
                ),
                _ => Parse::Error("Unknown Protocol Operation"),
            },
            _ => Parse::Error("Unknown Protocol Operation"),
        },
        "PUB" => {
            let (subject, reply, n) = match args.as_slice() {
                [s, n] => (*s, None, num(n)),
                [s, r, n] => (*s, Some(*r), num(n)),
                _ => return Parse::Error("Unknown Protocol Operation"),
            };
            let Some(n) = n else {
                return Parse::Error("Unknown Protocol Operation");
            };
            if n > max_payload {
                return Parse::Error("Maximum Payload Violation");
            }
            let n = n as usize;
            if input.len() < after + n + 2 {
                return Parse::Incomplete;
            }
            if &input[after + n..after + n + 2] != b"\r\n" {
                return Parse::Error("Unknown Protocol Operation");
            }
            Parse::Op(
                ClientOp::Pub {
                    subject: subject.to_owned(),
                    reply: reply.map(str::to_owned),
                    headers: None,
                    payload: input[after..after + n].to_vec(),
                },
                after + n + 2,
            )
        }
        "HPUB" => {
            let (subject, reply, h, t) = match args.as_slice() {
                [s, h, t] => (*s, None, num(h), num(t)),
                [s, r, h, t] => (*s, Some(*r), num(h), num(t)),
                _ => return Parse::Error("Unknown Protocol Operation"),
            };
            let (Some(h), Some(t)) = (h, t) else {
                return Parse::Error("Unknown Protocol Operation");
            };
            if h > t || h < 12 {
                return Parse::Error("Unknown Protocol Operation");
            }
            if t > max_payload {
                return Parse::Error("Maximum Payload Violation");
            }
            let (h, t) = (h as usize, t as usize);
            if input.len() < after + t + 2 {
                return Parse::Incomplete;
            }
            if &input[after + t..after + t + 2] != b"\r\n" {
                return Parse::Error("Unknown Protocol Operation");
            }
            let Some(headers) = parse_header_block(&input[after..after + h]) else {
                return Parse::Error("Bad Header Block");
            };
            Parse::Op(
                ClientOp::Pub {
                    subject: subject.to_owned(),
                    reply: reply.map(str::to_owned),
                    headers: Some(headers),
                    payload: input[after + h..after + t].to_vec(),
                },
                after + t + 2,
            )
        }
        _ => Parse::Error("Unknown Protocol Operation"),
    }
}

/// `NATS/1.0\r\n(Key: Value\r\n)*\r\n` → the key/value lines; `None` when malformed.
pub fn parse_header_block(block: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(block).ok()?;
    let body = text.strip_suffix("\r\n\r\n")?;
    let mut lines = body.split("\r\n");
    let version = lines.next()?;
    if !version.starts_with("NATS/1.0") {
        return None;
    }
    lines
        .map(|l| {
            let (k, v) = l.split_once(':')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant::ZERO;

    fn s(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    fn connected(server: &mut NatsStandin, headers: bool) -> ConnId {
        let c = server.open(T0).unwrap();
        let info = s(server.take_output(c));
        assert!(
            info.starts_with("INFO {") && info.ends_with("}\r\n"),
            "{info}"
        );
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"headers\":{headers},\"no_responders\":{headers}}}\r\n"
        );
        server.handle_bytes(c, connect.as_bytes(), T0);
        c
    }

    #[test]
    fn info_carries_configured_fields() {
        let mut server = NatsStandin::new(ServerConfig {
            connect_urls: vec!["10.0.0.2:4222".into()],
            max_payload: 600,
            ldm: true,
            ..ServerConfig::default()
        });
        let c = server.open(T0).unwrap();
        let info = s(server.take_output(c));
        let json: serde_json::Value =
            serde_json::from_str(info.strip_prefix("INFO ").unwrap().trim()).unwrap();
        assert_eq!(json["max_payload"], 600);
        assert_eq!(json["headers"], true);
        assert_eq!(json["ldm"], true);
        assert_eq!(json["connect_urls"][0], "10.0.0.2:4222");
    }

    #[test]
    fn ping_pong_and_split_input() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let c = connected(&mut server, true);
        for b in b"PI NG\r\n".iter().filter(|b| **b != b' ') {
            server.handle_bytes(c, &[*b], T0);
        }
        server.handle_bytes(c, b"ping\r\n", T0);
        assert_eq!(s(server.take_output(c)), "PONG\r\nPONG\r\n");
    }

    #[test]
    fn wildcards_match_as_nats_does() {
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(!subject_matches("a.*", "a"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("_INBOX.x.*", "_INBOX.x.1z"));
        assert!(subject_matches("*.b.>", "a.b.c.d"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(valid_subject("a.*.>", true));
        assert!(!valid_subject("a.>.b", true));
        assert!(!valid_subject("a..b", false));
        assert!(!valid_subject("a.*", false));
    }

    #[test]
    fn pub_to_subscriber_delivers_msg_and_is_recorded() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let sub = connected(&mut server, false);
        let publisher = connected(&mut server, false);
        server.handle_bytes(sub, b"SUB foo.* 7\r\n", T0);
        server.handle_bytes(publisher, b"PUB foo.bar in.1 5\r\nhello\r\n", T0);
        assert_eq!(
            s(server.take_output(sub)),
            "MSG foo.bar 7 in.1 5\r\nhello\r\n"
        );
        assert_eq!(server.published().len(), 1);
        let p = &server.published()[0];
        assert_eq!(
            (p.subject.as_str(), p.reply.as_deref()),
            ("foo.bar", Some("in.1"))
        );
        assert_eq!(p.payload, b"hello");
        // UNSUB stops delivery; a publish with nobody listening and no no_responders: silence.
        server.handle_bytes(sub, b"UNSUB 7\r\n", T0);
        server.handle_bytes(publisher, b"PUB foo.bar in.1 2\r\nhi\r\n", T0);
        assert!(server.take_output(sub).is_empty());
        assert!(server.take_output(publisher).is_empty());
    }

    #[test]
    fn unsub_with_max_stops_after_that_many() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let sub = connected(&mut server, false);
        server.handle_bytes(sub, b"SUB a.> 1\r\nUNSUB 1 2\r\n", T0);
        for _ in 0..3 {
            server.publish("a.b.c", None, None, b"x");
        }
        assert_eq!(s(server.take_output(sub)).matches("MSG").count(), 2);
    }

    #[test]
    fn hpub_is_parsed_and_delivered_as_hmsg() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let sub = connected(&mut server, true);
        let publisher = connected(&mut server, true);
        server.handle_bytes(sub, b"SUB r 1\r\n", T0);
        let block = "NATS/1.0\r\nversion: 1\r\ntrace_id: ab\r\n\r\n";
        let wire = format!(
            "HPUB r inbox.9 {} {}\r\n{block}{{}}\r\n",
            block.len(),
            block.len() + 2
        );
        // Split at every byte boundary.
        for b in wire.as_bytes() {
            server.handle_bytes(publisher, &[*b], T0);
        }
        let p = &server.published()[0];
        assert_eq!(
            p.headers.as_deref().unwrap(),
            [
                ("version".into(), "1".into()),
                ("trace_id".into(), "ab".into())
            ]
        );
        assert_eq!(p.payload, b"{}");
        let out = s(server.take_output(sub));
        assert_eq!(
            out,
            format!(
                "HMSG r 1 inbox.9 {} {}\r\n{block}{{}}\r\n",
                block.len(),
                block.len() + 2
            )
        );
    }

    #[test]
    fn no_responders_503_only_when_asked_for() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let c = connected(&mut server, true);
        server.handle_bytes(c, b"SUB _INBOX.abc.* 1\r\n", T0);
        server.handle_bytes(c, b"PUB decide _INBOX.abc.z 2\r\n{}\r\n", T0);
        assert_eq!(
            s(server.take_output(c)),
            "HMSG _INBOX.abc.z 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
        );
        let plain = connected(&mut server, false);
        server.handle_bytes(
            plain,
            b"SUB _INBOX.d.* 1\r\nPUB decide _INBOX.d.z 2\r\n{}\r\n",
            T0,
        );
        assert!(server.take_output(plain).is_empty());
    }

    #[test]
    fn local_subscriber_receives_and_replies() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let c = connected(&mut server, false);
        server.handle_bytes(c, b"SUB _INBOX.q.* 1\r\n", T0);
        let router = server.subscribe_local("beamline.router.v1.decide");
        server.handle_bytes(
            c,
            b"PUB beamline.router.v1.decide _INBOX.q.5 2\r\n{}\r\n",
            T0,
        );
        let got = server.take_local();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].sub, router);
        assert_eq!(got[0].reply.as_deref(), Some("_INBOX.q.5"));
        server.publish("_INBOX.q.5", None, None, b"{\"ok\":true}");
        assert_eq!(
            s(server.take_output(c)),
            "MSG _INBOX.q.5 1 11\r\n{\"ok\":true}\r\n"
        );
    }

    #[test]
    fn garbage_earns_err_and_close() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let c = connected(&mut server, false);
        server.handle_bytes(c, b"HELLO\r\n", T0);
        assert!(!server.is_open(c));
        assert_eq!(server.take_server_closed(), vec![c]);
        assert_eq!(
            s(server.take_closed_output(c)),
            "-ERR 'Unknown Protocol Operation'\r\n"
        );
        // Publishing before CONNECT is refused too.
        let d = server.open(T0).unwrap();
        server.handle_bytes(d, b"PUB a 1\r\nx\r\n", T0);
        assert!(!server.is_open(d));
        // An oversized payload.
        let mut small = NatsStandin::new(ServerConfig {
            max_payload: 4,
            ..ServerConfig::default()
        });
        let e = connected(&mut small, false);
        small.handle_bytes(e, b"PUB a 5\r\n", T0);
        assert_eq!(
            s(small.take_closed_output(e)),
            "-ERR 'Maximum Payload Violation'\r\n"
        );
    }

    #[test]
    fn down_refuses_and_attempts_are_counted_with_time() {
        let mut server = NatsStandin::new(ServerConfig::default());
        let a = server.open(T0).unwrap();
        assert_eq!(server.go_down(), vec![a]);
        let t1 = Instant::from_nanos(5);
        assert_eq!(server.open(t1), None);
        server.go_up();
        assert!(server.open(t1).is_some());
        let seen: Vec<(u64, bool)> = server
            .attempts()
            .iter()
            .map(|a| (a.at.as_nanos(), a.accepted))
            .collect();
        assert_eq!(seen, [(0, true), (5, false), (5, true)]);
    }

    #[test]
    fn server_keepalive_pings_then_declares_stale() {
        let mut server = NatsStandin::new(ServerConfig {
            ping_interval: Some(Duration::from_secs(1)),
            max_pings_out: 2,
            ..ServerConfig::default()
        });
        let c = connected(&mut server, false);
        let at = |s: u64| Instant::ZERO + Duration::from_secs(s);
        assert_eq!(server.poll_timeout(), Some(at(1)));
        server.handle_timeout(at(1));
        server.handle_timeout(at(2));
        assert_eq!(s(server.take_output(c)), "PING\r\nPING\r\n");
        server.handle_timeout(at(3));
        assert!(!server.is_open(c));
        assert_eq!(
            s(server.take_closed_output(c)),
            "-ERR 'Stale Connection'\r\n"
        );
        // A client that answers stays.
        let d = connected(&mut server, false);
        server.handle_timeout(at(4));
        server.handle_bytes(d, b"PONG\r\n", at(4));
        server.handle_timeout(at(5));
        server.handle_timeout(at(6));
        assert!(server.is_open(d));
    }

    #[test]
    fn header_blocks_round_trip() {
        let h = vec![("a".to_owned(), "1".to_owned())];
        assert_eq!(parse_header_block(&encode_header_block(None, &h)), Some(h));
        assert_eq!(parse_header_block(b"NATS/1.0 503\r\n\r\n"), Some(vec![]));
        assert_eq!(parse_header_block(b"HTTP/1.0\r\n\r\n"), None);
    }
}
