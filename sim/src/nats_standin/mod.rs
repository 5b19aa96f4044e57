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

mod parser;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use ipc_gateway_core::Instant;

pub use parser::parse_header_block;
use parser::{parse_op, ClientOp, Parse};

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

#[cfg(test)]
mod tests;
