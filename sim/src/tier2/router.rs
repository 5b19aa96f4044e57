//! `router-*` hosts: Router test doubles (router.md section 5) that subscribe to the decide
//! subject on the `nats` host and answer each request as the client's payload asks
//! (`"sim":{"b":<behaviour>,"ms":<delay>}`): `ok`, the error classes `policy_not_found`,
//! `decision_failed`, `internal`, `slow` (reply after `ms`), `silent`, `dup` (reply twice),
//! `disconnect` (drop the connection instead of answering). A request that fails router.md
//! section 2's validation gets `invalid_request`, like the real Router.
//!
//! Written with the core's NATS codec (`nats_codec`), not an independent client: the stand-in
//! server between them speaks the wire protocol on its own, and the requests the Routers
//! record are checked field by field against router.md in the tests. Like the real Router,
//! replies that fall due while disconnected are queued and sent after the next connect
//! (late replies after a reconnect).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use ipc_gateway_core::nats_codec::{
    encode_connect, encode_ping, encode_pong, encode_pub, encode_sub, ConnectOptions, NatsDecoder,
    ServerOp,
};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use turmoil::net::tcp::OwnedWriteHalf;
use turmoil::net::TcpStream;

use super::gateway_host::write_now;
use super::obs::{sim_now, spawn_watched, RouterSeen, SharedObs};

pub const NATS_PORT: u16 = 4222;

/// One Router host's settings.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    pub name: String,
    /// The nats host it connects to.
    pub server: String,
    pub subject: String,
    /// Subscribe only after this long (no responders before).
    pub start_delay: Duration,
    /// Wait before reconnecting after a loss.
    pub reconnect_delay: Duration,
}

struct State {
    spec: RouterSpec,
    obs: SharedObs,
    write: RefCell<Option<OwnedWriteHalf>>,
    /// Replies that fell due while disconnected: (reply subject, body).
    queued: RefCell<Vec<(String, Vec<u8>)>>,
}

impl State {
    fn publish(&self, reply_to: &str, body: &[u8]) {
        let mut b = BytesMut::new();
        if encode_pub(reply_to, None, body, &mut b).is_err() {
            return;
        }
        let mut w = self.write.borrow_mut();
        let sent = match w.as_mut() {
            Some(w) => write_now(w, &b).is_ok(),
            None => false,
        };
        if !sent {
            *w = None;
            self.queued
                .borrow_mut()
                .push((reply_to.to_owned(), body.to_vec()));
        }
    }
}

/// Runs one Router host forever (turmoil restarts it from here after a bounce).
pub async fn run(spec: RouterSpec, obs: SharedObs) -> turmoil::Result {
    tokio::time::sleep(spec.start_delay).await;
    let state = Rc::new(State {
        spec,
        obs,
        write: RefCell::new(None),
        queued: RefCell::new(Vec::new()),
    });
    loop {
        let _ = session(&state).await;
        *state.write.borrow_mut() = None;
        tokio::time::sleep(state.spec.reconnect_delay).await;
    }
}

async fn session(state: &Rc<State>) -> std::io::Result<()> {
    let stream = TcpStream::connect((state.spec.server.as_str(), NATS_PORT)).await?;
    let (mut read, write) = stream.into_split();
    *state.write.borrow_mut() = Some(write);
    let mut decoder = NatsDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut subscribed = false;
    loop {
        let n = read.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        decoder.push(&buf[..n]);
        loop {
            let op = match decoder.next_op() {
                Ok(Some(op)) => op,
                Ok(None) => break,
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            };
            match op {
                ServerOp::Info(info) if !subscribed => {
                    subscribed = true;
                    let mut b = BytesMut::new();
                    let mut options = ConnectOptions::for_server(state.spec.name.clone(), &info);
                    options.no_responders = false;
                    encode_connect(&options, &mut b);
                    encode_sub(&state.spec.subject, 1, &mut b).map_err(std::io::Error::other)?;
                    encode_ping(&mut b);
                    send(state, &b)?;
                    let queued = std::mem::take(&mut *state.queued.borrow_mut());
                    for (reply_to, body) in queued {
                        state.publish(&reply_to, &body);
                    }
                }
                ServerOp::Ping => {
                    let mut b = BytesMut::new();
                    encode_pong(&mut b);
                    send(state, &b)?;
                }
                ServerOp::Msg {
                    subject,
                    reply_to,
                    payload,
                    ..
                } => {
                    let keep = on_request(state, subject, reply_to, Vec::new(), payload.to_vec());
                    if !keep {
                        return Ok(());
                    }
                }
                ServerOp::HMsg {
                    subject,
                    reply_to,
                    headers,
                    payload,
                    ..
                } => {
                    let keep = on_request(state, subject, reply_to, headers, payload.to_vec());
                    if !keep {
                        return Ok(());
                    }
                }
                ServerOp::Err(_) => return Ok(()),
                _ => {}
            }
        }
    }
}

fn send(state: &State, bytes: &[u8]) -> std::io::Result<()> {
    match state.write.borrow_mut().as_mut() {
        Some(w) => write_now(w, bytes).map(drop),
        None => Err(std::io::ErrorKind::NotConnected.into()),
    }
}

/// Answers one request as its payload asks. Returns false to drop the connection.
fn on_request(
    state: &Rc<State>,
    subject: String,
    reply_to: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> bool {
    state.obs.borrow_mut().router_seen.push(RouterSeen {
        router: state.spec.name.clone(),
        subject,
        reply_to: reply_to.clone(),
        headers,
        body: body.clone(),
        at: sim_now(),
    });
    let Some(reply_to) = reply_to else {
        return true;
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let payload = &request["task"]["payload"];
    let behaviour = payload["sim"]["b"].as_str().unwrap_or("ok").to_owned();
    let delay = Duration::from_millis(payload["sim"]["ms"].as_u64().unwrap_or(0));
    let reply = match validate(&request) {
        Err(why) => error_reply(&request, "invalid_request", why),
        Ok(()) => match behaviour.as_str() {
            "policy_not_found" | "decision_failed" | "internal" => {
                error_reply(&request, &behaviour, "simulated")
            }
            "silent" => return true,
            "disconnect" => return false,
            _ => ok_reply(&request, &state.spec.name),
        },
    };
    match behaviour.as_str() {
        "slow" => {
            let st = state.clone();
            spawn_watched(
                &state.obs,
                format!("{}: slow reply", state.spec.name),
                async move {
                    tokio::time::sleep(delay).await;
                    st.publish(&reply_to, &reply);
                },
            );
        }
        "dup" => {
            state.publish(&reply_to, &reply);
            state.publish(&reply_to, &reply);
        }
        _ => state.publish(&reply_to, &reply),
    }
    true
}

fn ok_reply(request: &Value, router: &str) -> Vec<u8> {
    let tag = request["task"]["payload"]["tag"].clone();
    serde_json::to_vec(&serde_json::json!({
        "ok": true,
        "decision": {"provider_id": "openai", "priority": 50, "expected_latency_ms": 0,
                     "expected_cost": 0.0, "reason": "weighted",
                     "metadata": {"tag": tag, "router": router}},
        "context": {"request_id": request["request_id"], "trace_id": request["trace_id"]}
    }))
    .unwrap_or_default()
}

fn error_reply(request: &Value, code: &str, message: &str) -> Vec<u8> {
    let tag = request["task"]["payload"]["tag"].clone();
    serde_json::to_vec(&serde_json::json!({
        "ok": false,
        "error": {"code": code, "message": message, "intake_error_code": code.to_uppercase(),
                  "details": {"tag": tag}},
        "context": {"request_id": request["request_id"]}
    }))
    .unwrap_or_default()
}

/// The Router's decide validation (router.md section 2), as far as it concerns the gateway.
pub fn validate(r: &Value) -> Result<(), &'static str> {
    let Some(obj) = r.as_object() else {
        return Err("request is not an object");
    };
    if obj.values().any(Value::is_null) {
        return Err("null value");
    }
    if r["version"] != "1" {
        return Err("version must be \"1\"");
    }
    let bounded =
        |v: &Value, max: usize| v.as_str().is_some_and(|s| !s.is_empty() && s.len() <= max);
    if !bounded(&r["tenant_id"], 128) {
        return Err("tenant_id");
    }
    if !bounded(&r["request_id"], 128) {
        return Err("request_id");
    }
    if !bounded(&r["task"]["type"], usize::MAX) {
        return Err("task.type");
    }
    let payload = &r["task"]["payload"];
    let payload_ok = payload.is_object()
        && serde_json::to_vec(payload).is_ok_and(|b| b.len() >= 10)
        || r["task"]["payload_ref"].is_string();
    if !payload_ok {
        return Err("task.payload");
    }
    if let Some(t) = obj.get("trace_id") {
        let s = t.as_str().unwrap_or("");
        let hex32 = s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex32 && !is_uuid_v4(s) {
            return Err("trace_id");
        }
    }
    if let Some(p) = obj.get("policy_id") {
        if !p.is_string() {
            return Err("policy_id");
        }
    }
    for k in ["metadata", "constraints"] {
        if obj.get(k).is_some_and(|v| !v.is_object()) {
            return Err("metadata/constraints must be objects");
        }
    }
    Ok(())
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
        && b[14] == b'4'
}
