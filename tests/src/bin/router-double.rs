//! `router-double`: a Router test double (router.md section 5).
//!
//! Subscribes to the decide subject (no queue group) through a real NATS server with the
//! synchronous `nats` crate (an independent NATS implementation, sharing no code with the
//! gateway), validates every request as the Router does (router.md section 2) and answers in
//! the Router's reply shapes (section 4). What it does with one request is chosen by the field
//! `double` of the client's object embedded in the request (`task.payload` in the `router-v1`
//! envelope, `input` in the `legacy` one):
//!
//! | `double` | reply |
//! |---|---|
//! | absent, `"ok"` | a decision (`ok:true`) echoing `request_id` and `trace_id` in `context` |
//! | `"policy_not_found"`, `"decision_failed"`, `"internal"` | that Router error class |
//! | `"silent"` | none at all |
//! | `"duplicate"` | the same reply twice (`received.copy` 1, then 2) |
//! | `{"slow_ms":N}` | the reply after N ms, sent from its own thread (others are not held up) |
//! | `{"reply":R,"slow_ms":N,"copies":K}` | the general form: content R (as above), delay, copies (0 = silent) |
//!
//! A request that fails validation is answered `invalid_request` (with the delay and copies
//! its `double` asks for, when that can be read). An unknown `double` value is answered with
//! the error code `double_usage`, which no test expects, so a typo fails the test.
//!
//! Every reply carries, besides the Router's fields, `"received":{"seq","subject","reply",
//! "reply_prefix","headers","request","copy"}`: what the double saw, so a test can check the
//! gateway's request field by field. `headers` is `null` for a message without headers,
//! otherwise an object from header name to value (an array of values if a name repeats). A
//! request body over 64 KiB is not echoed (`request_omitted_bytes` instead), so that the reply
//! stays under the server's max_payload; one that is not JSON comes back as `raw` text.
//!
//! Stdout, one line each: `ready` once subscribed and flushed; then a JSON object per request
//! (`"event":"request"`, the same fields plus `body`, the request's exact text), per reply sent
//! (`"event":"replied"`, with `body`, the reply's exact text), and per NATS connection event
//! (`"event":"disconnected"` / `"reconnected"`); with `--quiet`, only `ready` and the connection
//! events (a long soak would otherwise print kilobytes per request). `--exit-on-stdin-eof` makes it exit when its
//! stdin closes (the test helper uses this so an orphaned double does not outlive its test).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{json, Map, Value};

/// Router test double: answers decide requests on a NATS subject (router.md section 5).
#[derive(Parser, Debug)]
#[command(name = "router-double")]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// The decide subject to serve.
    #[arg(long, default_value = "beamline.router.v1.decide")]
    subject: String,
    /// The NATS client name (shows in the server's connz).
    #[arg(long, default_value = "router-double")]
    name: String,
    /// Exit (status 0) when stdin reaches end of file.
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Print no line per request and per reply (only `ready` and connection events).
    #[arg(long)]
    quiet: bool,
    /// Credentials and TLS for a secured server (gateway.md section 9): the double connects
    /// to the same servers as the gateway, as a user of its own.
    #[command(flatten)]
    creds: ipc_gateway_tests::secure_nats::ClientCreds,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("router-double: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.exit_on_stdin_eof {
        thread::spawn(|| {
            let mut sink = [0u8; 256];
            let mut stdin = io::stdin();
            loop {
                match stdin.read(&mut sink) {
                    Ok(0) => std::process::exit(0),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => std::process::exit(0),
                }
            }
        });
    }
    let conn = args
        .creds
        .nats_options()
        .with_name(&args.name)
        .max_reconnects(None)
        // Reconnect quickly and steadily: tests restart servers and wait for the double.
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .disconnect_callback(|| emit(&json!({"event": "disconnected"})))
        .reconnect_callback(|| emit(&json!({"event": "reconnected"})))
        .connect(args.url.as_str())
        .with_context(|| format!("connecting to {}", args.url))?;
    let sub = conn
        .subscribe(&args.subject)
        .with_context(|| format!("subscribing to {}", args.subject))?;
    conn.flush().context("flushing the subscription")?;
    {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    let seq = Arc::new(AtomicU64::new(0));
    for msg in sub.messages() {
        let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
        handle(&conn, msg, n, args.quiet);
    }
    Ok(())
}

/// Requests larger than this are not echoed back in `received.request` (only on stdout).
const ECHO_LIMIT: usize = 64 * 1024;

/// Writes one JSON line on stdout.
fn emit(line: &Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Serves one request: decides the reply and sends it (now, or later from its own thread).
/// With `quiet`, nothing is printed.
fn handle(conn: &nats::Connection, msg: nats::Message, seq: u64, quiet: bool) {
    let headers = headers_json(msg.headers.as_ref());
    let parsed: Option<Value> = serde_json::from_slice(&msg.data).ok();
    let plan = plan(parsed.as_ref(), msg.headers.as_ref());
    let reply_prefix = msg.reply.as_deref().map(|r| {
        r.rsplit_once('.')
            .map_or(r, |(prefix, _)| prefix)
            .to_owned()
    });
    let mut received = Map::new();
    received.insert("seq".into(), json!(seq));
    received.insert("subject".into(), json!(msg.subject));
    received.insert("reply".into(), json!(msg.reply));
    received.insert("reply_prefix".into(), json!(reply_prefix));
    received.insert("headers".into(), headers);
    let raw = String::from_utf8_lossy(&msg.data).into_owned();
    match &parsed {
        // A reply carrying a large request would itself exceed the server's max_payload.
        Some(_) if msg.data.len() > ECHO_LIMIT => {
            received.insert("request_omitted_bytes".into(), json!(msg.data.len()))
        }
        Some(v) => received.insert("request".into(), v.clone()),
        None => received.insert("raw".into(), json!(raw)),
    };
    let mut log = received.clone();
    log.insert("event".into(), json!("request"));
    log.insert("body".into(), json!(raw));
    if let Some(v) = &parsed {
        log.insert("request".into(), v.clone());
    }
    log.insert("outcome".into(), json!(plan.outcome));
    log.insert("copies".into(), json!(plan.copies));
    log.insert("delay_ms".into(), json!(plan.delay_ms));
    if !quiet {
        emit(&Value::Object(log));
    }

    let Some(reply_to) = msg.reply.clone() else {
        return;
    };
    if plan.copies == 0 {
        return;
    }
    let send = {
        let conn = conn.clone();
        let body = plan.body;
        move || {
            for copy in 1..=plan.copies {
                let mut body = body.clone();
                let mut received = received.clone();
                received.insert("copy".into(), json!(copy));
                body["received"] = Value::Object(received);
                let text = body.to_string();
                let result = conn.publish(&reply_to, &text);
                if !quiet {
                    emit(&json!({
                        "event": "replied", "seq": seq, "copy": copy, "reply": reply_to,
                        "body": text, "error": result.err().map(|e| e.to_string()),
                    }));
                }
            }
        }
    };
    if plan.delay_ms == 0 {
        send();
    } else {
        let delay = Duration::from_millis(plan.delay_ms);
        thread::spawn(move || {
            thread::sleep(delay);
            send();
        });
    }
}

/// The headers as a JSON object (`null` when the message had none).
fn headers_json(headers: Option<&nats::header::HeaderMap>) -> Value {
    let Some(headers) = headers else {
        return Value::Null;
    };
    let mut out = BTreeMap::new();
    for (name, values) in headers.iter() {
        let mut values: Vec<&String> = values.iter().collect();
        values.sort();
        let value = match values.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        out.insert(name.clone(), value);
    }
    json!(out)
}

/// What to answer one request: the reply body (without `received`), when, how many times.
#[derive(Debug)]
struct Plan {
    /// `ok`, an error code, or `silent`.
    outcome: String,
    body: Value,
    delay_ms: u64,
    copies: u64,
}

/// The timing and content the client's `double` field asks for.
#[derive(Debug, PartialEq)]
struct Behaviour {
    reply: String,
    delay_ms: u64,
    copies: u64,
}

impl Default for Behaviour {
    fn default() -> Behaviour {
        Behaviour {
            reply: "ok".into(),
            delay_ms: 0,
            copies: 1,
        }
    }
}

const REPLY_CLASSES: [&str; 4] = ["ok", "policy_not_found", "decision_failed", "internal"];

/// Reads the `double` field (absent means the default behaviour).
fn behaviour(double: Option<&Value>) -> Result<Behaviour, String> {
    let mut b = Behaviour::default();
    match double {
        None => {}
        Some(Value::String(s)) => match s.as_str() {
            "silent" => b.copies = 0,
            "duplicate" => b.copies = 2,
            class if REPLY_CLASSES.contains(&class) => b.reply = class.to_owned(),
            other => return Err(format!("unknown double behaviour {other:?}")),
        },
        Some(Value::Object(o)) => {
            for (key, value) in o {
                match (key.as_str(), value) {
                    ("reply", Value::String(r)) if REPLY_CLASSES.contains(&r.as_str()) => {
                        b.reply = r.clone();
                    }
                    ("slow_ms", v) if v.is_u64() => b.delay_ms = v.as_u64().unwrap_or(0),
                    ("copies", v) if v.is_u64() => b.copies = v.as_u64().unwrap_or(1),
                    _ => return Err(format!("unknown double setting {key:?}: {value}")),
                }
            }
        }
        Some(other) => return Err(format!("double must be a string or object, got {other}")),
    }
    Ok(b)
}

/// Decides the reply for one request (router.md sections 2 and 4).
fn plan(request: Option<&Value>, headers: Option<&nats::header::HeaderMap>) -> Plan {
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(String::as_str)
            .map(str::to_owned)
    };
    let validated = match request {
        Some(req) => validate(req, header("version").as_deref()),
        None => Err(Invalid::new("", "request is not JSON")),
    };
    let request_id = request.and_then(request_id_of);
    let embedded = request.and_then(embedded_payload);
    let wanted = behaviour(embedded.and_then(|p| p.get("double")));
    let mut context = Map::new();
    if let Some(id) = &request_id {
        context.insert("request_id".into(), json!(id));
    }
    let (behaviour, body) = match (validated, wanted) {
        (Err(invalid), wanted) => {
            let body = json!({
                "ok": false,
                "error": {
                    "code": "invalid_request",
                    "message": invalid.message,
                    "intake_error_code": "SCHEMA_VALIDATION_FAILED",
                    "details": {"field": invalid.field},
                },
                "context": context,
            });
            let mut b = wanted.unwrap_or_default();
            b.reply = "invalid_request".into();
            (b, body)
        }
        (Ok(_), Err(usage)) => {
            let body = json!({
                "ok": false,
                "error": {"code": "double_usage", "message": usage},
                "context": context,
            });
            let b = Behaviour {
                reply: "double_usage".into(),
                ..Behaviour::default()
            };
            (b, body)
        }
        (Ok(trace_id), Ok(b)) => {
            let body = if b.reply == "ok" {
                let trace_id = trace_id.or_else(|| header("trace_id"));
                if let Some(t) = trace_id {
                    context.insert("trace_id".into(), json!(t));
                }
                json!({
                    "ok": true,
                    "decision": {
                        "provider_id": "openai",
                        "priority": 50,
                        "expected_latency_ms": 0,
                        "expected_cost": 0.0,
                        "reason": "weighted",
                        "metadata": {},
                    },
                    "context": context,
                })
            } else {
                json!({
                    "ok": false,
                    "error": {
                        "code": b.reply,
                        "message": format!("router double: {}", b.reply),
                        "intake_error_code": b.reply.to_uppercase(),
                        "details": {},
                    },
                    "context": context,
                })
            };
            (b, body)
        }
    };
    Plan {
        outcome: if behaviour.copies == 0 {
            "silent".into()
        } else {
            behaviour.reply
        },
        body,
        delay_ms: behaviour.delay_ms,
        copies: behaviour.copies,
    }
}

/// The request's id: `request_id` (router-v1) or `message_id` (legacy), if it is a string.
fn request_id_of(req: &Value) -> Option<String> {
    req.get("request_id")
        .or_else(|| req.get("message_id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The client's object: `task.payload` (router-v1) or `input` (legacy).
fn embedded_payload(req: &Value) -> Option<&Value> {
    if is_legacy(req) {
        req.get("input")
    } else {
        req.get("task").and_then(|t| t.get("payload"))
    }
}

/// The legacy envelope is recognised by `input` without `task`.
fn is_legacy(req: &Value) -> bool {
    req.get("input").is_some() && req.get("task").is_none()
}

/// Why a request is rejected: the offending field and a message.
#[derive(Debug)]
struct Invalid {
    field: String,
    message: String,
}

impl Invalid {
    fn new(field: &str, message: impl Into<String>) -> Invalid {
        Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Validates a request as the Router does (router.md section 2; for the legacy envelope, its
/// shape in section 3). Returns the request's `trace_id`, if it has one.
fn validate(req: &Value, version_header: Option<&str>) -> Result<Option<String>, Invalid> {
    let Some(obj) = req.as_object() else {
        return Err(Invalid::new("", "request is not a JSON object"));
    };
    if let Some(path) = null_path(req, String::new()) {
        return Err(Invalid::new(&path, format!("{path} is null")));
    }
    if is_legacy(req) {
        validate_legacy(obj)?;
        return Ok(None);
    }
    let version = match (version_header, obj.get("version")) {
        (Some(h), _) => h.to_owned(),
        (None, Some(Value::String(v))) => v.clone(),
        (None, Some(other)) => {
            return Err(Invalid::new(
                "version",
                format!("version must be a string, got {other}"),
            ))
        }
        (None, None) => return Err(Invalid::new("version", "version is required")),
    };
    if version != "1" {
        return Err(Invalid::new(
            "version",
            format!("unsupported version {version:?}"),
        ));
    }
    bounded_string(obj, "tenant_id", 128)?;
    bounded_string(obj, "request_id", 128)?;
    let Some(task) = obj.get("task").and_then(Value::as_object) else {
        return Err(Invalid::new("task", "task must be an object"));
    };
    match task.get("type") {
        Some(Value::String(t)) if !t.is_empty() => {}
        _ => {
            return Err(Invalid::new(
                "task.type",
                "task.type must be a non-empty string",
            ))
        }
    }
    match (task.get("payload"), task.get("payload_ref")) {
        (Some(Value::Object(p)), _) => {
            let len = Value::Object(p.clone()).to_string().len();
            if len < 10 {
                return Err(Invalid::new(
                    "task.payload",
                    format!("task.payload encodes to {len} bytes, fewer than 10"),
                ));
            }
        }
        (Some(other), _) => {
            return Err(Invalid::new(
                "task.payload",
                format!("task.payload must be an object, got {other}"),
            ))
        }
        (None, Some(Value::String(_))) => {}
        (None, _) => {
            return Err(Invalid::new(
                "task.payload",
                "task.payload (object) or task.payload_ref (string) is required",
            ))
        }
    }
    let trace_id = match obj.get("trace_id") {
        None => None,
        Some(Value::String(t)) if is_w3c_trace_id(t) || is_uuid_v4(t, false) => Some(t.clone()),
        Some(other) => {
            return Err(Invalid::new(
                "trace_id",
                format!("trace_id must be 32 lowercase hex or a UUID v4, got {other}"),
            ))
        }
    };
    if let Some(p) = obj.get("policy_id") {
        if !matches!(p.as_str(), Some(p) if !p.is_empty()) {
            return Err(Invalid::new(
                "policy_id",
                "policy_id must be a non-empty string",
            ));
        }
    }
    let ids = ["run_id", "flow_id", "step_id"];
    let present = ids.iter().filter(|k| obj.contains_key(**k)).count();
    if present != 0 && present != ids.len() {
        return Err(Invalid::new(
            "run_id",
            "run_id, flow_id and step_id come all three together",
        ));
    }
    for key in ids {
        if let Some(v) = obj.get(key) {
            if !v
                .as_str()
                .is_some_and(|s| is_uuid_v4(s, true) || is_ulid(s))
            {
                return Err(Invalid::new(
                    key,
                    format!("{key} must be a UUID v4 or a ULID"),
                ));
            }
        }
    }
    if let Some(k) = obj.get("idempotency_key") {
        if !matches!(k.as_str(), Some(k) if k.len() <= 256) {
            return Err(Invalid::new(
                "idempotency_key",
                "idempotency_key must be a string of at most 256 bytes",
            ));
        }
    }
    for key in ["metadata", "constraints"] {
        if obj.get(key).is_some_and(|v| !v.is_object()) {
            return Err(Invalid::new(key, format!("{key} must be an object")));
        }
    }
    Ok(trace_id)
}

/// The legacy envelope: `{"from","to":"router","message_id","tenant_id","policy_id","input":{}}`.
fn validate_legacy(obj: &Map<String, Value>) -> Result<(), Invalid> {
    bounded_string(obj, "from", usize::MAX)?;
    if obj.get("to").and_then(Value::as_str) != Some("router") {
        return Err(Invalid::new("to", "to must be \"router\""));
    }
    bounded_string(obj, "message_id", 128)?;
    bounded_string(obj, "tenant_id", 128)?;
    bounded_string(obj, "policy_id", usize::MAX)?;
    if !obj.get("input").is_some_and(Value::is_object) {
        return Err(Invalid::new("input", "input must be an object"));
    }
    Ok(())
}

/// `obj[key]` is a non-empty string of at most `max` bytes.
fn bounded_string(obj: &Map<String, Value>, key: &str, max: usize) -> Result<(), Invalid> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(()),
        Some(Value::String(s)) if s.is_empty() => {
            Err(Invalid::new(key, format!("{key} must not be empty")))
        }
        Some(Value::String(s)) => Err(Invalid::new(
            key,
            format!("{key} is {} bytes, more than {max}", s.len()),
        )),
        Some(other) => Err(Invalid::new(
            key,
            format!("{key} must be a string, got {other}"),
        )),
        None => Err(Invalid::new(key, format!("{key} is required"))),
    }
}

/// The path of the first `null` in `v`, if any.
fn null_path(v: &Value, path: String) -> Option<String> {
    match v {
        Value::Null => Some(if path.is_empty() { "$".into() } else { path }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| null_path(item, format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, item)| {
            let sub = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            null_path(item, sub)
        }),
        _ => None,
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A W3C trace-id: 32 lowercase hex characters, not all zero.
fn is_w3c_trace_id(s: &str) -> bool {
    s.len() == 32 && is_lower_hex(s) && s.bytes().any(|b| b != b'0')
}

/// A UUID version 4 (`xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx`), lowercase unless
/// `any_case`.
fn is_uuid_v4(s: &str, any_case: bool) -> bool {
    let lowered;
    let s = if any_case {
        lowered = s.to_ascii_lowercase();
        lowered.as_str()
    } else {
        s
    };
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

/// A ULID: 26 Crockford base-32 characters (no I, L, O, U), the first at most `7`.
fn is_ulid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 26
        && b[0] <= b'7'
        && b.iter().all(|c| {
            let c = c.to_ascii_uppercase();
            c.is_ascii_digit()
                || (c.is_ascii_uppercase() && !matches!(c, b'I' | b'L' | b'O' | b'U'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Value {
        json!({
            "version": "1",
            "request_id": "req-1",
            "tenant_id": "default",
            "policy_id": "default",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "task": {"type": "code_completion", "payload": {"file": "a.py", "line": 42}},
            "metadata": {"ipc_message_type": "task_submit",
                         "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        })
    }

    fn rejects(req: Value, field: &str) {
        match validate(&req, None) {
            Err(invalid) => assert_eq!(invalid.field, field, "{req} → {invalid:?}"),
            Ok(_) => panic!("accepted {req}"),
        }
    }

    #[test]
    fn accepts_the_gateway_shape() {
        assert_eq!(
            validate(&valid(), None).unwrap().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let mut req = valid();
        req["trace_id"] = json!("3f2504e0-4f89-41d3-9a0c-0305e82c3301");
        req["run_id"] = json!("01ARZ3NDEKTSV4RRFFQ69G5FAV");
        req["flow_id"] = json!("3F2504E0-4F89-41D3-9A0C-0305E82C3301");
        req["step_id"] = json!("01arz3ndektsv4rrffq69g5fav");
        req["idempotency_key"] = json!("k".repeat(256));
        req["task"]["payload"] = json!({"a": "1234"});
        assert!(validate(&req, None).is_ok(), "{req}");
        req.as_object_mut().unwrap().remove("trace_id");
        req["task"] = json!({"type": "t", "payload_ref": "s3://x"});
        assert_eq!(validate(&req, None).unwrap(), None);
    }

    #[test]
    fn rejects_each_rule() {
        let with = |key: &str, value: Value| {
            let mut req = valid();
            req[key] = value;
            req
        };
        let without = |key: &str| {
            let mut req = valid();
            req.as_object_mut().unwrap().remove(key);
            req
        };
        rejects(with("version", json!("2")), "version");
        rejects(with("version", json!(1)), "version");
        rejects(without("version"), "version");
        rejects(without("tenant_id"), "tenant_id");
        rejects(with("tenant_id", json!("")), "tenant_id");
        rejects(with("tenant_id", json!("t".repeat(129))), "tenant_id");
        rejects(with("request_id", json!("r".repeat(129))), "request_id");
        rejects(with("request_id", json!(7)), "request_id");
        rejects(without("task"), "task");
        rejects(
            with("task", json!({"payload": {"abcdefgh": 1}})),
            "task.type",
        );
        rejects(
            with("task", json!({"type": "", "payload": {"abcdefgh": 1}})),
            "task.type",
        );
        // {"a":"12"} is 10 bytes: accepted; {"a":"1"} is 9: rejected.
        assert!(validate(
            &with("task", json!({"type": "t", "payload": {"a": "12"}})),
            None
        )
        .is_ok());
        rejects(
            with("task", json!({"type": "t", "payload": {"a": "1"}})),
            "task.payload",
        );
        rejects(
            with(
                "task",
                json!({"type": "t", "payload": "{\"a\":\"1234567\"}"}),
            ),
            "task.payload",
        );
        rejects(with("task", json!({"type": "t"})), "task.payload");
        for bad in [
            "4BF92F3577B34DA6A3CE929D0E0E4736",
            "4bf92f3577b34da6a3ce929d0e0e473",
            "00000000000000000000000000000000",
            "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            "3f2504e0-4f89-41d3-7a0c-0305e82c3301",
            "3F2504E0-4F89-41D3-9A0C-0305E82C3301",
        ] {
            rejects(with("trace_id", json!(bad)), "trace_id");
        }
        rejects(with("policy_id", json!("")), "policy_id");
        rejects(
            with("run_id", json!("01ARZ3NDEKTSV4RRFFQ69G5FAV")),
            "run_id",
        );
        let mut ids = valid();
        ids["run_id"] = json!("01ARZ3NDEKTSV4RRFFQ69G5FAV");
        ids["flow_id"] = json!("01ARZ3NDEKTSV4RRFFQ69G5FAV");
        ids["step_id"] = json!("81ARZ3NDEKTSV4RRFFQ69G5FAV");
        rejects(ids, "step_id");
        rejects(
            with("idempotency_key", json!("k".repeat(257))),
            "idempotency_key",
        );
        rejects(with("metadata", json!("x")), "metadata");
        rejects(with("constraints", json!([])), "constraints");
        let mut null_inside = valid();
        null_inside["task"]["payload"]["x"] = Value::Null;
        rejects(null_inside, "task.payload.x");
        rejects(with("policy_id", Value::Null), "policy_id");
    }

    #[test]
    fn version_header_wins() {
        let mut req = valid();
        req["version"] = json!("2");
        assert!(validate(&req, Some("1")).is_ok());
        assert_eq!(validate(&valid(), Some("2")).unwrap_err().field, "version");
        req.as_object_mut().unwrap().remove("version");
        assert!(validate(&req, Some("1")).is_ok());
    }

    #[test]
    fn legacy_envelope() {
        let req = json!({"from": "ide@localhost", "to": "router", "message_id": "m1",
                         "tenant_id": "default", "policy_id": "default",
                         "ipc_message_type": "task_submit", "input": {"double": "ok"}});
        assert!(is_legacy(&req));
        assert_eq!(validate(&req, None).unwrap(), None);
        assert_eq!(embedded_payload(&req), Some(&json!({"double": "ok"})));
        for (key, bad) in [
            ("to", json!("nobody")),
            ("message_id", json!("")),
            ("tenant_id", json!("t".repeat(129))),
            ("input", json!({"x": null})),
            ("from", json!(1)),
        ] {
            let mut r = req.clone();
            r[key] = bad;
            assert!(validate(&r, None).is_err(), "{r}");
        }
    }

    #[test]
    fn behaviours() {
        assert_eq!(behaviour(None).unwrap(), Behaviour::default());
        assert_eq!(behaviour(Some(&json!("silent"))).unwrap().copies, 0);
        assert_eq!(behaviour(Some(&json!("duplicate"))).unwrap().copies, 2);
        assert_eq!(
            behaviour(Some(&json!("internal"))).unwrap().reply,
            "internal"
        );
        let slow = behaviour(Some(&json!({"slow_ms": 800}))).unwrap();
        assert_eq!(
            (slow.reply.as_str(), slow.delay_ms, slow.copies),
            ("ok", 800, 1)
        );
        let general = behaviour(Some(
            &json!({"reply": "decision_failed", "slow_ms": 5, "copies": 3}),
        ))
        .unwrap();
        assert_eq!(
            (general.reply.as_str(), general.delay_ms, general.copies),
            ("decision_failed", 5, 3)
        );
        assert!(behaviour(Some(&json!("slow"))).is_err());
        assert!(behaviour(Some(&json!({"slow": 1}))).is_err());
        assert!(behaviour(Some(&json!(3))).is_err());
    }

    #[test]
    fn plans() {
        let ok = plan(Some(&valid()), None);
        assert_eq!(ok.outcome, "ok");
        assert_eq!(ok.body["ok"], json!(true));
        assert_eq!(
            ok.body["context"],
            json!({"request_id": "req-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"})
        );
        let mut req = valid();
        req["task"]["payload"]["double"] = json!("policy_not_found");
        let p = plan(Some(&req), None);
        assert_eq!(p.body["error"]["code"], json!("policy_not_found"));
        assert_eq!(p.body["context"], json!({"request_id": "req-1"}));
        req["task"]["payload"]["double"] = json!("silent");
        assert_eq!(plan(Some(&req), None).copies, 0);
        req["task"]["payload"]["double"] = json!("bogus");
        assert_eq!(
            plan(Some(&req), None).body["error"]["code"],
            json!("double_usage")
        );
        req["tenant_id"] = json!("");
        let p = plan(Some(&req), None);
        assert_eq!(p.outcome, "invalid_request");
        assert_eq!(p.body["error"]["details"]["field"], json!("tenant_id"));
        let p = plan(None, None);
        assert_eq!(p.outcome, "invalid_request");
        assert_eq!(p.body["context"], json!({}));
    }
}
