//! `ide-*` hosts: IPC clients that pipeline TASK_SUBMIT frames (at most `window` unanswered)
//! and read one reply per request. v1 has no correlation id, so the reply read next belongs to
//! the oldest request unanswered; the tests check it against the request's `tag`, which the
//! Router echoes. A client that waits longer than `reply_deadline` for its oldest reply
//! records a hang and stops.

use std::time::Duration;

use ipc_gateway_core::frame::{encode_frame, kind, FrameDecoder};
use tokio::io::AsyncReadExt;
use turmoil::net::TcpStream;

use super::gateway_host::{write_now, IPC_PORT};
use super::obs::{sim_now, Reply, Sent, SharedObs};

/// One request: the behaviour the Router is asked for and, for `slow`, its delay.
#[derive(Debug, Clone)]
pub struct Req {
    pub behaviour: &'static str,
    pub ms: u64,
    /// Extra client fields, e.g. `"trace_id":"…"`, spliced into the JSON object.
    pub extra: String,
    /// Wait this long before sending it (with `window` 1: after the previous reply).
    pub pause: Duration,
    /// The whole JSON object instead of the usual one; `{tag}` is replaced by the tag.
    pub raw: Option<&'static str>,
}

impl Req {
    pub fn new(behaviour: &'static str, ms: u64) -> Req {
        Req {
            behaviour,
            ms,
            extra: String::new(),
            pause: Duration::ZERO,
            raw: None,
        }
    }

    pub fn raw(mut self, raw: &'static str) -> Req {
        self.raw = Some(raw);
        self
    }

    pub fn after(mut self, pause: Duration) -> Req {
        self.pause = pause;
        self
    }

    pub fn with(mut self, extra: &str) -> Req {
        self.extra = extra.to_owned();
        self
    }
}

#[derive(Debug, Clone)]
pub struct IdeSpec {
    pub name: String,
    pub gateway: String,
    pub start_delay: Duration,
    pub requests: Vec<Req>,
    /// Requests sent before waiting for replies.
    pub window: usize,
    /// How long the oldest request may wait for its reply.
    pub reply_deadline: Duration,
    /// Send everything, then hang up without reading (replies after the client left).
    pub leave: bool,
}

/// The JSON object the client sends for request `i`.
pub fn payload(name: &str, i: usize, r: &Req) -> Vec<u8> {
    if let Some(raw) = r.raw {
        return raw.replace("{tag}", &format!("{name}/{i}")).into_bytes();
    }
    format!(
        "{{\"command\":\"task_submit\",\"task_type\":\"code_completion\",\"tag\":\"{name}/{i}\",\
         \"sim\":{{\"b\":\"{}\",\"ms\":{}}},\"file\":\"a.py\",\"line\":{i}{}{}}}",
        r.behaviour,
        r.ms,
        if r.extra.is_empty() { "" } else { "," },
        r.extra
    )
    .into_bytes()
}

/// Runs one IDE host to completion; the outcome is in `obs.clients[name]`.
pub async fn run(spec: IdeSpec, obs: SharedObs) -> turmoil::Result {
    tokio::time::sleep(spec.start_delay).await;
    let name = spec.name.clone();
    obs.borrow_mut().clients.entry(name.clone()).or_default();
    obs.borrow_mut()
        .client_gateway
        .insert(name.clone(), spec.gateway.clone());
    let mut stream = loop {
        match TcpStream::connect((spec.gateway.as_str(), IPC_PORT)).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut decoder = FrameDecoder::new(ipc_gateway_core::frame::MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 64 * 1024];
    let mut next = 0usize;
    let mut answered = 0usize;
    let total = spec.requests.len();
    // When request `next` may go: set once the window has room for it, `pause` later.
    let mut due: Option<Duration> = None;
    while answered < total {
        // Send what is due while the window allows. Reading never waits for a pause, so a
        // reply's time is when it arrived.
        while next < total && next - answered < spec.window {
            let r = &spec.requests[next];
            let at = *due.get_or_insert(sim_now() + r.pause);
            if sim_now() < at {
                break;
            }
            due = None;
            let frame = encode_frame(kind::TASK_SUBMIT, &payload(&name, next, r));
            if write_now(&mut stream, &frame).is_err() {
                obs.borrow_mut().clients.get_mut(&name).unwrap().lost_at = Some(sim_now());
                return Ok(());
            }
            obs.borrow_mut()
                .clients
                .get_mut(&name)
                .unwrap()
                .sent
                .push(Sent {
                    tag: format!("{name}/{next}"),
                    behaviour: r.behaviour.to_owned(),
                    at: sim_now(),
                    reply: None,
                });
            next += 1;
        }
        if spec.leave && next == total {
            obs.borrow_mut().clients.get_mut(&name).unwrap().done = true;
            // The host stays up: a finished turmoil client receives nothing, and the
            // gateway must meet a closed socket (RST), not a silent void.
            drop(stream);
            tokio::time::sleep(Duration::from_secs(3)).await;
            return Ok(());
        }
        let now = sim_now();
        let deadline = (answered < next)
            .then(|| obs.borrow().clients[&name].sent[answered].at + spec.reply_deadline);
        let wake = [deadline, due].into_iter().flatten().min().unwrap_or(now);
        let wait = wake.saturating_sub(now).max(Duration::from_millis(1));
        let n = match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Err(_) if deadline.is_some_and(|d| sim_now() >= d) => {
                // A hang: the test reports the request without a reply.
                obs.borrow_mut().clients.get_mut(&name).unwrap().done = true;
                return Ok(());
            }
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => {
                obs.borrow_mut().clients.get_mut(&name).unwrap().lost_at = Some(sim_now());
                return Ok(());
            }
            Ok(Ok(n)) => n,
        };
        decoder.push(&buf[..n]);
        while let Ok(Some(frame)) = decoder.next_frame() {
            let mut o = obs.borrow_mut();
            let nanos = sim_now().as_nanos() as u64;
            // The payload's hash: request and trace ids in it come from the gateway's seed.
            let hash = frame.payload.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
            let line = format_args!(
                "reply {} kind {:#x} {} bytes {hash:016x}",
                answered,
                frame.kind,
                frame.payload.len()
            );
            o.trace.record(nanos, &name, line);
            let c = o.clients.get_mut(&name).unwrap();
            if answered < c.sent.len() {
                c.sent[answered].reply = Some(Reply {
                    kind: frame.kind,
                    payload: frame.payload.to_vec(),
                    at: sim_now(),
                });
                answered += 1;
            } else {
                c.extra_replies += 1;
            }
        }
    }
    // Anything more would be a reply without a request.
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
    {
        if n > 0 {
            decoder.push(&buf[..n]);
            while let Ok(Some(_)) = decoder.next_frame() {
                obs.borrow_mut()
                    .clients
                    .get_mut(&name)
                    .unwrap()
                    .extra_replies += 1;
            }
        }
    }
    obs.borrow_mut().clients.get_mut(&name).unwrap().done = true;
    Ok(())
}
