//! Router behaviours (router.md section 5) as in-process subscribers of the NATS stand-in.
//!
//! A [`Router`] subscribes to the decide subject on a [`NatsStandin`], validates each request
//! as the real Router does (router.md section 2, plus the headers of section 3), and answers
//! after a latency according to a behaviour chosen *per request* by the client payload's
//! `"sim"` field, so one Router serves a whole scenario:
//!
//! | `sim` | behaviour |
//! |---|---|
//! | absent, `ok` | decision reply echoing `request_id`, `trace_id` and the client's marker `m` |
//! | `err:<class>` | Router error reply (`invalid_request`, `policy_not_found`, `decision_failed`, `internal`) |
//! | `slow:<ms>` | reply after that delay (drives timeouts and late replies) |
//! | `silent` | never reply |
//! | `dup` | reply twice |
//! | `disc:<ms>` | the Router drops off NATS for that long, and sends the reply when back |
//!
//! "Absent" (no Router subscribed, a 503) is simply a world without a Router, or one whose
//! Router is disconnected or has left ([`Router::leave`], cleanly: what it took is still
//! answered). A whole Router can also hang ([`Router::hang`]): subscribed, it takes every
//! request and answers none, until [`Router::wake`].

use std::collections::BTreeMap;
use std::time::Duration;

use ipc_gateway_core::rng::Rng;
use ipc_gateway_core::Instant;
use serde_json::Value;

use crate::nats_standin::{LocalMsg, LocalSubId, NatsStandin};

/// The Router error classes a behaviour can produce.
pub const ERROR_CLASSES: [&str; 4] = [
    "invalid_request",
    "policy_not_found",
    "decision_failed",
    "internal",
];

/// How the Router treats one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    Ok,
    Error(String),
    Slow(Duration),
    Silent,
    Duplicate,
    Disconnect(Duration),
}

impl Behaviour {
    /// Reads the client payload's `sim` field.
    pub fn parse(sim: Option<&str>) -> Behaviour {
        let Some(sim) = sim else {
            return Behaviour::Ok;
        };
        let ms = |s: &str| Duration::from_millis(s.parse().unwrap_or(0));
        match sim.split_once(':') {
            Some(("err", class)) => Behaviour::Error(class.to_owned()),
            Some(("slow", n)) => Behaviour::Slow(ms(n)),
            Some(("disc", n)) => Behaviour::Disconnect(ms(n)),
            _ => match sim {
                "silent" => Behaviour::Silent,
                "dup" => Behaviour::Duplicate,
                _ => Behaviour::Ok,
            },
        }
    }

    /// The text for the client payload's `sim` field.
    pub fn text(&self) -> String {
        match self {
            Behaviour::Ok => "ok".to_owned(),
            Behaviour::Error(c) => format!("err:{c}"),
            Behaviour::Slow(d) => format!("slow:{}", d.as_millis()),
            Behaviour::Silent => "silent".to_owned(),
            Behaviour::Duplicate => "dup".to_owned(),
            Behaviour::Disconnect(d) => format!("disc:{}", d.as_millis()),
        }
    }
}

/// One request as the Router received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub request_id: String,
    pub marker: Option<String>,
    pub behaviour: Behaviour,
    pub reply: Option<String>,
}

#[derive(Debug, Clone)]
struct Outgoing {
    subject: String,
    payload: Vec<u8>,
}

/// One Router instance.
#[derive(Debug)]
pub struct Router {
    pub name: String,
    subject: String,
    sub: Option<LocalSubId>,
    /// Processing latency, drawn uniformly from this range for every reply.
    latency: (Duration, Duration),
    rng: Rng,
    scheduled: BTreeMap<(Instant, u64), Outgoing>,
    seq: u64,
    /// Disconnected until then; replies due meanwhile are held and sent on return.
    away_until: Option<Instant>,
    /// Its server went down: what it was about to send is lost, until it subscribes again.
    cut_off: bool,
    /// Takes requests and never answers them (a hung Router), until [`Router::wake`].
    silent: bool,
    held: Vec<Outgoing>,
    pub seen: Vec<Seen>,
    /// Contract violations found in requests (router.md sections 2 and 3).
    pub violations: Vec<String>,
    pub replies_sent: u64,
}

impl Router {
    pub fn new(
        name: &str,
        subject: &str,
        latency: (Duration, Duration),
        seed: u64,
        server: &mut NatsStandin,
    ) -> Router {
        Router {
            name: name.to_owned(),
            subject: subject.to_owned(),
            sub: Some(server.subscribe_local(subject)),
            latency,
            rng: Rng::new(seed),
            scheduled: BTreeMap::new(),
            seq: 0,
            away_until: None,
            cut_off: false,
            silent: false,
            held: Vec::new(),
            seen: Vec::new(),
            violations: Vec::new(),
            replies_sent: 0,
        }
    }

    pub fn sub(&self) -> Option<LocalSubId> {
        self.sub
    }

    pub fn is_connected(&self) -> bool {
        self.sub.is_some()
    }

    /// Replies still to be sent (scheduled or held while away).
    pub fn outstanding(&self) -> usize {
        self.scheduled.len() + self.held.len()
    }

    /// The server went down: the Router's subscription is gone with it; it comes back with
    /// [`Router::resubscribe`] once the server is up.
    pub fn lose_server(&mut self) {
        self.sub = None;
        self.cut_off = true;
    }

    /// The Router leaves NATS (its requests find no responders) until `resubscribe`. It
    /// leaves as a Router restarting cleanly does (a NATS drain): it takes nothing more, and
    /// still answers the requests it took, so that its absence shows as no responders only.
    pub fn leave(&mut self, server: &mut NatsStandin) {
        if let Some(sub) = self.sub.take() {
            server.unsubscribe_local(sub);
        }
    }

    pub fn resubscribe(&mut self, server: &mut NatsStandin) {
        if self.sub.is_none() && self.away_until.is_none() {
            self.sub = Some(server.subscribe_local(&self.subject));
            self.cut_off = false;
        }
    }

    /// The Router hangs: it stays subscribed and takes requests, and answers none of those
    /// it takes from now on, whatever their behaviour, until [`Router::wake`].
    pub fn hang(&mut self) {
        self.silent = true;
    }

    pub fn wake(&mut self) {
        self.silent = false;
    }

    fn draw_latency(&mut self) -> Duration {
        let (lo, hi) = self.latency;
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.rng.below(span + 1))
    }

    fn schedule(&mut self, at: Instant, out: Outgoing) {
        self.seq += 1;
        self.scheduled.insert((at, self.seq), out);
    }

    /// A request delivered to this Router's subscription.
    pub fn on_request(&mut self, msg: &LocalMsg, now: Instant, server: &mut NatsStandin) {
        let parsed: Option<Value> = serde_json::from_slice(&msg.payload).ok();
        let problems = parsed
            .as_ref()
            .map(|v| validate(v, msg.headers.as_deref()))
            .unwrap_or_else(|| vec!["request body is not JSON".to_owned()]);
        let v = parsed.unwrap_or(Value::Null);
        let client = &v["task"]["payload"];
        let behaviour = Behaviour::parse(client["sim"].as_str());
        let request_id = v["request_id"].as_str().unwrap_or_default().to_owned();
        let marker = client["m"].as_str().map(str::to_owned);
        for p in &problems {
            self.violations
                .push(format!("{}: request {request_id}: {p}", self.name));
        }
        self.seen.push(Seen {
            at: now,
            request_id: request_id.clone(),
            marker: marker.clone(),
            behaviour: behaviour.clone(),
            reply: msg.reply.clone(),
        });
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        let trace_id = v["trace_id"].as_str().unwrap_or_default();
        let context = serde_json::json!({"request_id": request_id, "trace_id": trace_id});
        let body = |ok: Option<&str>| -> Vec<u8> {
            let v = match ok {
                None => serde_json::json!({"ok": true,
                    "decision": {"provider_id": "sim", "priority": 50, "reason": "weighted"},
                    "context": context, "echo": marker}),
                Some(code) => serde_json::json!({"ok": false,
                    "error": {"code": code, "message": "simulated", "details": {}},
                    "context": context, "echo": marker}),
            };
            v.to_string().into_bytes()
        };
        let invalid = !problems.is_empty();
        let latency = self.draw_latency();
        let out = |payload| Outgoing {
            subject: reply.clone(),
            payload,
        };
        match behaviour {
            _ if self.silent => {}
            _ if invalid => self.schedule(now + latency, out(body(Some("invalid_request")))),
            Behaviour::Ok => self.schedule(now + latency, out(body(None))),
            Behaviour::Error(class) => self.schedule(now + latency, out(body(Some(&class)))),
            Behaviour::Slow(d) => self.schedule(now + latency + d, out(body(None))),
            Behaviour::Silent => {}
            Behaviour::Duplicate => {
                self.schedule(now + latency, out(body(None)));
                let again = self.draw_latency();
                self.schedule(now + latency + again, out(body(None)));
            }
            Behaviour::Disconnect(d) => {
                // Off NATS at once; the reply is produced meanwhile and sent on return.
                if let Some(sub) = self.sub.take() {
                    server.unsubscribe_local(sub);
                }
                let back = now + d;
                self.away_until = Some(self.away_until.map_or(back, |a| a.max(back)));
                self.held.push(out(body(None)));
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.scheduled.keys().next().map(|k| k.0), self.away_until]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends replies that fell due; returns on return from a disconnect.
    pub fn handle_timeout(&mut self, now: Instant, server: &mut NatsStandin) {
        if self.away_until.is_some_and(|t| t <= now) {
            self.away_until = None;
            if server.is_up() {
                self.sub = Some(server.subscribe_local(&self.subject));
                self.cut_off = false;
            }
            for out in std::mem::take(&mut self.held) {
                if server.is_up() {
                    self.replies_sent += 1;
                    server.publish(&out.subject, None, None, &out.payload);
                }
            }
        }
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let out = entry.remove();
            if self.away_until.is_some() {
                self.held.push(out);
            } else if server.is_up() && !self.cut_off {
                self.replies_sent += 1;
                server.publish(&out.subject, None, None, &out.payload);
            }
            // A Router cut off by a server bounce loses what it was about to send.
        }
    }
}

fn is_lower_hex(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_uuid_v4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && parts[2].starts_with('4')
}

/// What the Router's validator (router.md section 2) and the header contract (section 3)
/// would object to in a `router-v1` request; empty when it is acceptable.
pub fn validate(v: &Value, headers: Option<&[(String, String)]>) -> Vec<String> {
    let mut p = Vec::new();
    let Some(obj) = v.as_object() else {
        return vec!["request is not a JSON object".to_owned()];
    };
    if obj.values().any(Value::is_null) {
        p.push("a top-level field is null".to_owned());
    }
    let text = |k: &str| v[k].as_str();
    let header =
        |k: &str| headers.and_then(|h| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()));
    let version = header("version").or(text("version"));
    if version != Some("1") {
        p.push(format!("version is {version:?}, not \"1\""));
    }
    for k in ["tenant_id", "request_id"] {
        match text(k) {
            Some(s) if !s.is_empty() && s.len() <= 128 => {}
            other => p.push(format!("{k} is {other:?}: required, 1..=128 bytes")),
        }
    }
    if v["task"]["type"].as_str().is_none_or(|s| s.is_empty()) {
        p.push("task.type missing or empty".to_owned());
    }
    match &v["task"]["payload"] {
        Value::Object(_) if v["task"]["payload"].to_string().len() >= 10 => {}
        other => p.push(format!(
            "task.payload {other} is not an object of >= 10 bytes"
        )),
    }
    let trace_id = text("trace_id");
    if let Some(t) = trace_id {
        if !is_lower_hex(t, 32) && !is_uuid_v4(t) {
            p.push(format!(
                "trace_id {t:?} is neither 32 lowercase hex nor a UUID v4"
            ));
        }
    }
    if let Some(pid) = obj.get("policy_id") {
        if pid.as_str().is_none_or(|s| s.is_empty()) {
            p.push("policy_id is not a non-empty string".to_owned());
        }
    }
    let tp = v["metadata"]["traceparent"].as_str();
    if let Some(tp) = tp {
        let parts: Vec<&str> = tp.split('-').collect();
        let ok = parts.len() == 4
            && parts[0] == "00"
            && is_lower_hex(parts[1], 32)
            && is_lower_hex(parts[2], 16)
            && parts[3] == "01";
        if !ok {
            p.push(format!("metadata.traceparent {tp:?} malformed"));
        } else if trace_id.is_some_and(|t| is_lower_hex(t, 32) && t != parts[1]) {
            p.push("traceparent does not carry the trace_id".to_owned());
        }
    }
    if !["task_submit", "task_query", "task_cancel"]
        .contains(&v["metadata"]["ipc_message_type"].as_str().unwrap_or(""))
    {
        p.push("metadata.ipc_message_type missing".to_owned());
    }
    if let Some(h) = headers {
        for k in ["version", "trace_id", "span_id", "tenant_id", "traceparent"] {
            if !h.iter().any(|(n, _)| n == k) {
                p.push(format!("header {k} missing"));
            }
        }
        if header("trace_id").is_some() && header("trace_id") != trace_id {
            p.push("header trace_id differs from the body".to_owned());
        }
        if header("tenant_id").is_some() && header("tenant_id") != text("tenant_id") {
            p.push("header tenant_id differs from the body".to_owned());
        }
        if header("traceparent").is_some() && header("traceparent") != tp {
            p.push("header traceparent differs from metadata.traceparent".to_owned());
        }
        if let (Some(span), Some(tp)) = (header("span_id"), tp) {
            if !is_lower_hex(span, 16) || !tp.contains(span) {
                p.push("header span_id is not the traceparent's span".to_owned());
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats_standin::ServerConfig;

    fn request(sim: &str) -> Vec<u8> {
        serde_json::json!({"version":"1","request_id":"0000abcd-1","tenant_id":"default",
            "policy_id":"default","trace_id":"0123456789abcdef0123456789abcdef",
            "task":{"type":"code_completion","payload":{"task":"code_completion","sim":sim,"m":"c1-1"}},
            "metadata":{"ipc_message_type":"task_submit",
                "traceparent":"00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"}})
        .to_string()
        .into_bytes()
    }

    fn headers() -> Vec<(String, String)> {
        [
            ("version", "1"),
            ("trace_id", "0123456789abcdef0123456789abcdef"),
            ("span_id", "0123456789abcdef"),
            ("tenant_id", "default"),
            (
                "traceparent",
                "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
            ),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .to_vec()
    }

    fn at(ms: u64) -> Instant {
        Instant::ZERO + Duration::from_millis(ms)
    }

    fn world() -> (NatsStandin, Router, crate::nats_standin::ConnId) {
        let mut server = NatsStandin::new(ServerConfig::default());
        let ms = Duration::from_millis(10);
        let router = Router::new("r1", "decide", (ms, ms), 1, &mut server);
        let c = server.open(at(0)).unwrap();
        server.take_output(c);
        server.handle_bytes(c, b"CONNECT {}\r\nSUB in.* 1\r\n", at(0));
        (server, router, c)
    }

    fn send(
        server: &mut NatsStandin,
        router: &mut Router,
        c: crate::nats_standin::ConnId,
        sim: &str,
        now: Instant,
    ) {
        let body = request(sim);
        let mut wire = format!("PUB decide in.1 {}\r\n", body.len()).into_bytes();
        wire.extend_from_slice(&body);
        wire.extend_from_slice(b"\r\n");
        server.handle_bytes(c, &wire, now);
        for m in server.take_local() {
            router.on_request(&m, now, server);
        }
    }

    #[test]
    fn a_valid_request_passes_validation() {
        let v: Value = serde_json::from_slice(&request("ok")).unwrap();
        assert_eq!(validate(&v, Some(&headers())), Vec::<String>::new());
        let mut bad = v.clone();
        bad["trace_id"] = Value::from("XYZ");
        bad["tenant_id"] = Value::from("");
        assert_eq!(validate(&bad, None).len(), 2, "{:?}", validate(&bad, None));
        let mut h = headers();
        h.remove(2);
        assert_eq!(validate(&v, Some(&h)), ["header span_id missing"]);
    }

    #[test]
    fn ok_reply_echoes_request_id_and_marker_after_latency() {
        let (mut server, mut router, c) = world();
        send(&mut server, &mut router, c, "ok", at(0));
        assert_eq!(router.poll_timeout(), Some(at(10)));
        router.handle_timeout(at(9), &mut server);
        assert!(server.take_output(c).is_empty());
        router.handle_timeout(at(10), &mut server);
        let out = String::from_utf8(server.take_output(c)).unwrap();
        assert!(out.starts_with("MSG in.1 1 "), "{out}");
        assert!(out.contains(r#""request_id":"0000abcd-1""#) && out.contains(r#""echo":"c1-1""#));
        assert!(router.violations.is_empty());
    }

    #[test]
    fn behaviours_error_slow_silent_dup_disconnect() {
        let (mut server, mut router, c) = world();
        send(&mut server, &mut router, c, "err:policy_not_found", at(0));
        send(&mut server, &mut router, c, "slow:100", at(0));
        send(&mut server, &mut router, c, "silent", at(0));
        send(&mut server, &mut router, c, "dup", at(0));
        router.handle_timeout(at(50), &mut server);
        let out = String::from_utf8(server.take_output(c)).unwrap();
        assert!(out.contains("policy_not_found"));
        assert_eq!(
            out.matches("MSG").count(),
            3,
            "error + two duplicates: {out}"
        );
        router.handle_timeout(at(110), &mut server);
        assert_eq!(
            String::from_utf8(server.take_output(c))
                .unwrap()
                .matches("MSG")
                .count(),
            1
        );
        send(&mut server, &mut router, c, "disc:500", at(200));
        assert!(!router.is_connected());
        // While away, a request finds nobody: the stand-in has no subscriber for it.
        send(&mut server, &mut router, c, "ok", at(300));
        assert_eq!(router.seen.len(), 5);
        router.handle_timeout(at(700), &mut server);
        assert!(router.is_connected());
        let out = String::from_utf8(server.take_output(c)).unwrap();
        assert_eq!(out.matches("MSG").count(), 1, "the held reply, late: {out}");
        assert_eq!(router.outstanding(), 0);
    }

    #[test]
    fn behaviour_text_round_trips() {
        for b in [
            Behaviour::Ok,
            Behaviour::Error("internal".into()),
            Behaviour::Slow(Duration::from_millis(7)),
            Behaviour::Silent,
            Behaviour::Duplicate,
            Behaviour::Disconnect(Duration::from_millis(9)),
        ] {
            assert_eq!(Behaviour::parse(Some(&b.text())), b);
        }
    }
}
