//! The clients: what the well-behaved load sends and how its replies are checked, and the
//! misbehaving clients of the traffic faults (churn, garbage frames, never-readers).
//!
//! Every request carries a unique `id` in its JSON payload. The Router double echoes the
//! request it received (`received.request.task.payload`), so an OK reply must carry the `id` of
//! the request it answers: a mix-up or a reply out of order shows as a different id.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{self, check_closed, check_error, check_ping, is_closed};
use ipc_gateway_tests::frame::{self, Frame, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};
use ipc_gateway_tests::golden::{Answer, GOLDEN};
use ipc_gateway_tests::nats_load::{OkCheck, PayloadFn};
use serde_json::{json, Value};

use crate::observer::Observer;
use crate::schedule::{request_rng, Rng};

/// The gateway's partial-frame read timeout (ipc-protocol.md section 7; the default is kept).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The frame type of STREAM_SUBSCRIBE, an error (code 2) in protocol v1.
const STREAM_SUBSCRIBE: u8 = 0x04;
/// The payload of a never-reader's requests: large replies fill the daemon's per-connection
/// output limit (8 MiB) quickly, and the double still echoes them (it echoes up to 64 KiB).
const NEVER_READER_PAD: usize = 48 * 1024;

/// What the Router double is asked to do with the load's requests now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal = 0,
    /// Some requests get a slow reply, some slower than the deadline.
    Slow = 1,
    /// Some requests get two replies.
    Duplicate = 2,
}

/// The current [`Mode`], shared by the load's payload function and the traffic track.
#[derive(Default)]
pub struct Traffic(AtomicU8);

impl Traffic {
    pub fn set(&self, mode: Mode) {
        self.0.store(mode as u8, Ordering::SeqCst);
    }

    pub fn mode(&self) -> Mode {
        match self.0.load(Ordering::SeqCst) {
            1 => Mode::Slow,
            2 => Mode::Duplicate,
            _ => Mode::Normal,
        }
    }
}

/// The payload of request `n` of well-behaved client `c`: a unique id, and now and then a
/// `double` field that asks the Router double for a Router error class, a slow reply or a
/// duplicate (per the current [`Mode`]). The choices are seeded by `(seed, c, n)`.
///
/// Slow replies go to the even clients only. Replies come in request order, so a client with
/// a slow request outstanding waits for it: the odd clients keep the throughput up, and show
/// that one client's slow Router replies do not hold up another's.
pub fn well_behaved_payload(seed: u64, timeout_ms: u64, traffic: Arc<Traffic>) -> PayloadFn {
    Arc::new(move |c, n| {
        let mut rng = request_rng(seed, c, n);
        let mut payload = json!({"task_type": "chaos", "id": format!("w{c}-{n}")});
        let mode = match traffic.mode() {
            Mode::Slow if c % 2 == 1 => Mode::Normal,
            mode => mode,
        };
        if let Some(double) = double_field(&mut rng, mode, timeout_ms) {
            payload["double"] = double;
        }
        payload
    })
}

fn double_field(rng: &mut Rng, mode: Mode, timeout_ms: u64) -> Option<Value> {
    match mode {
        // Mostly well within the deadline; a fifth around it, either side (late replies, and
        // replies racing the deadline).
        Mode::Slow if rng.chance(0.12) => {
            let slow_ms = if rng.chance(0.8) {
                rng.between(50, timeout_ms / 2)
            } else {
                rng.between(timeout_ms.saturating_sub(500), timeout_ms + 2000)
            };
            Some(json!({"slow_ms": slow_ms}))
        }
        Mode::Duplicate if rng.chance(0.3) => Some(json!("duplicate")),
        // Router-level errors are replies too (RESPONSE_OK with the Router's bytes).
        _ if rng.chance(0.02) => {
            let classes = ["policy_not_found", "decision_failed", "internal"];
            Some(json!(classes[rng.below(3) as usize]))
        }
        _ => None,
    }
}

/// An OK reply must be the Router double's reply to the request with the same `id`.
pub fn echo_check() -> OkCheck {
    Arc::new(|sent, body| {
        let echoed = &body["received"]["request"]["task"]["payload"]["id"];
        if echoed != &sent["id"] {
            return Err(format!(
                "the reply echoes id {echoed}, the request had id {}",
                sent["id"]
            ));
        }
        if !body["ok"].is_boolean() {
            return Err("the reply has no boolean `ok`: not a Router reply".to_owned());
        }
        Ok(())
    })
}

/// Checks a misbehaving client's reply to a well-formed request `sent`: an echo of its id, or
/// error 5 or 8.
fn check_reply(sent: &Value, frame: &Frame) -> Result<(), String> {
    match frame.kind {
        RESPONSE_OK => {
            let body: Value = serde_json::from_slice(&frame.payload)
                .map_err(|e| format!("OK reply is not JSON: {e}"))?;
            echo_check()(sent, &body)
        }
        RESPONSE_ERROR => check_error(frame, 5)
            .or_else(|_| check_error(frame, 8))
            .map(|_| ())
            .map_err(|_| {
                format!(
                    "error reply other than 5 or 8 to {sent}: {}",
                    String::from_utf8_lossy(&frame.payload)
                )
            }),
        other => Err(format!("frame type {other:#04X} in reply to {sent}")),
    }
}

fn connect(socket: &Path, read_timeout: Duration) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(read_timeout))
        .and_then(|()| stream.set_write_timeout(Some(daemon::IO_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok(stream)
}

fn read_reply(stream: &mut UnixStream) -> Result<Frame, String> {
    match frame::read_frame(stream) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err("the connection closed where a reply was expected".to_owned()),
        Err(e) => Err(format!("reading a reply: {e}")),
    }
}

/// Client churn until `until`: connect, pipeline 1–10 requests (half of them slow, so that
/// they are in flight), read fewer replies than requests, and vanish (close, or shut down one
/// or both directions first). The replies read must be right. Returns (connections,
/// requests).
pub fn churn(socket: &Path, mut rng: Rng, until: Instant, obs: &Observer) -> (u64, u64) {
    let deadline = obs.deadline;
    let (mut connections, mut requests) = (0, 0);
    while Instant::now() < until {
        connections += 1;
        if let Err(e) = churn_once(socket, &mut rng, connections, deadline, &mut requests) {
            obs.violation("churn", e);
        }
        thread::sleep(Duration::from_millis(rng.between(20, 200)));
    }
    (connections, requests)
}

fn churn_once(
    socket: &Path,
    rng: &mut Rng,
    conn: u64,
    deadline: Duration,
    requests: &mut u64,
) -> Result<(), String> {
    let mut stream = connect(socket, deadline + Duration::from_secs(5))?;
    let k = rng.between(1, 10);
    // Read fewer replies than requests; the ones left are mostly slow, so that they are still
    // in flight when the client vanishes.
    let read = rng.below(k);
    let mut sent = Vec::new();
    for i in 0..k {
        let mut payload = json!({"task_type": "chaos_churn", "id": format!("churn{conn}-{i}")});
        if i >= read && rng.chance(0.7) {
            payload["double"] = json!({"slow_ms": rng.between(100, 3000)});
        }
        frame::write_frame(&mut stream, TASK_SUBMIT, payload.to_string().as_bytes())
            .map_err(|e| format!("churn connection {conn}: writing request {i}: {e}"))?;
        sent.push(payload);
        *requests += 1;
    }
    for payload in sent.iter().take(read as usize) {
        let frame = read_reply(&mut stream).map_err(|e| format!("churn connection {conn}: {e}"))?;
        check_reply(payload, &frame).map_err(|e| format!("churn connection {conn}: {e}"))?;
    }
    match rng.below(3) {
        0 => {}
        1 => {
            let _ = stream.shutdown(Shutdown::Write);
        }
        _ => {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    Ok(())
}

/// One malformed input and what the gateway must answer.
#[derive(Debug, Clone, Copy)]
enum Garbage {
    /// A golden row of ipc-protocol.md section 8 that is answered with an error frame.
    Golden(usize),
    /// TASK_SUBMIT whose payload is not JSON: error 4, open.
    NotJson,
    /// TASK_SUBMIT whose payload is JSON but not an object: error 4, open.
    NotObject,
    /// A client sends RESPONSE_OK: error 2, open.
    ClientSentResponse,
    /// STREAM_SUBSCRIBE in v1: error 2, open.
    StreamSubscribe,
    /// Three good requests, then a version-2 frame: three replies in order, error 1, closed.
    PipelinedThenVersion2,
    /// Three bytes of a header, then nothing: error 5 after the read timeout, closed.
    PartialFrame,
}

impl Garbage {
    fn pick(rng: &mut Rng) -> Garbage {
        let golden: Vec<usize> = GOLDEN
            .iter()
            .enumerate()
            .filter(|(_, row)| matches!(row.answer, Answer::Error(_)))
            .map(|(i, _)| i)
            .collect();
        let others = [
            Garbage::NotJson,
            Garbage::NotObject,
            Garbage::ClientSentResponse,
            Garbage::StreamSubscribe,
            Garbage::PipelinedThenVersion2,
            Garbage::PartialFrame,
        ];
        let i = rng.below((golden.len() + others.len()) as u64) as usize;
        match golden.get(i) {
            Some(&row) => Garbage::Golden(row),
            None => others[i - golden.len()],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Garbage::Golden(i) => GOLDEN[i].name,
            Garbage::NotJson => "TASK_SUBMIT not JSON",
            Garbage::NotObject => "TASK_SUBMIT JSON array",
            Garbage::ClientSentResponse => "client sends RESPONSE_OK",
            Garbage::StreamSubscribe => "STREAM_SUBSCRIBE in v1",
            Garbage::PipelinedThenVersion2 => "3 requests then version 2",
            Garbage::PartialFrame => "partial frame held",
        }
    }
}

/// Sends `count` malformed inputs, each on its own connection and thread (a partial frame
/// waits for the read timeout). Returns the threads, to join, and the names of the cases.
pub fn garbage(
    socket: &Path,
    mut rng: Rng,
    count: usize,
    obs: &Arc<Observer>,
) -> (Vec<JoinHandle<()>>, Vec<String>) {
    let mut names = Vec::new();
    let handles = (0..count)
        .map(|k| {
            let case = Garbage::pick(&mut rng);
            names.push(case.name().to_owned());
            let socket = socket.to_path_buf();
            let obs = Arc::clone(obs);
            let id = rng.next_u64() % 1_000_000;
            thread::spawn(move || {
                if let Err(e) = garbage_once(&socket, case, &format!("g{id}-{k}"), &obs) {
                    obs.violation("garbage", format!("{}: {e}", case.name()));
                }
            })
        })
        .collect();
    (handles, names)
}

fn garbage_once(socket: &Path, case: Garbage, id: &str, obs: &Observer) -> Result<(), String> {
    let read_timeout = match case {
        Garbage::PartialFrame => READ_TIMEOUT + Duration::from_secs(10),
        Garbage::PipelinedThenVersion2 => obs.deadline + Duration::from_secs(5),
        _ => daemon::IO_TIMEOUT,
    };
    let mut stream = connect(socket, read_timeout)?;
    let write = |stream: &mut UnixStream, bytes: &[u8]| {
        stream
            .write_all(bytes)
            .map_err(|e| format!("writing the garbage: {e}"))
    };
    let (code, closes) = match case {
        Garbage::Golden(i) => {
            let row = &GOLDEN[i];
            write(&mut stream, row.bytes)?;
            match row.answer {
                Answer::Error(code) => (code, row.closes),
                other => {
                    return Err(format!(
                        "golden row {:?} is not garbage: {other:?}",
                        row.name
                    ))
                }
            }
        }
        Garbage::NotJson => {
            write(
                &mut stream,
                &frame::encode(TASK_SUBMIT, b"{\"id\": not json"),
            )?;
            (4, false)
        }
        Garbage::NotObject => {
            write(&mut stream, &frame::encode(TASK_SUBMIT, b"[1,2,3]"))?;
            (4, false)
        }
        Garbage::ClientSentResponse => {
            write(&mut stream, &frame::encode(RESPONSE_OK, b"{}"))?;
            (2, false)
        }
        Garbage::StreamSubscribe => {
            write(&mut stream, &frame::encode(STREAM_SUBSCRIBE, b"{}"))?;
            (2, false)
        }
        Garbage::PipelinedThenVersion2 => {
            let sent: Vec<Value> = (0..3)
                .map(|i| json!({"task_type": "chaos_garbage", "id": format!("{id}-{i}")}))
                .collect();
            let mut bytes = Vec::new();
            for payload in &sent {
                bytes.extend(frame::encode(TASK_SUBMIT, payload.to_string().as_bytes()));
            }
            bytes.extend_from_slice(&[0x00, 0x00, 0x00, 0x06, 0x02, 0xF0]);
            write(&mut stream, &bytes)?;
            for payload in &sent {
                check_reply(payload, &read_reply(&mut stream)?)?;
            }
            (1, true)
        }
        Garbage::PartialFrame => {
            write(&mut stream, &[0x00, 0x00, 0x00])?;
            (5, true)
        }
    };
    let started = Instant::now();
    let frame = read_reply(&mut stream)?;
    check_error(&frame, code)?;
    if let Garbage::PartialFrame = case {
        let waited = started.elapsed();
        if waited + Duration::from_millis(200) < READ_TIMEOUT {
            return Err(format!(
                "error 5 after {waited:?}, before the read timeout of {READ_TIMEOUT:?}"
            ));
        }
    }
    if closes {
        check_closed(&mut stream)
    } else {
        check_ping(&mut stream).map_err(|e| format!("the connection should stay open: {e}"))
    }
}

/// A client that writes large requests until `until` and never reads. The daemon must close
/// it once its unsent replies pass the per-connection limit (8 MiB by default), and keep
/// serving everyone else. Returns what happened, for the fault's notes.
pub fn never_reader(socket: &Path, until: Instant, id: u64) -> Result<String, String> {
    let mut stream = connect(socket, daemon::IO_TIMEOUT)?;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("non-blocking: {e}"))?;
    let (mut requests, mut written) = (0u64, 0usize);
    let mut pending: Vec<u8> = Vec::new();
    let started = Instant::now();
    while Instant::now() < until {
        if pending.is_empty() {
            let payload = json!({
                "task_type": "chaos_never_reader",
                "id": format!("nr{id}-{requests}"),
                "pad": "x".repeat(NEVER_READER_PAD),
            });
            pending = frame::encode(TASK_SUBMIT, payload.to_string().as_bytes());
            requests += 1;
        }
        match stream.write(&pending) {
            Ok(n) => {
                written += n;
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_closed(&e) => {
                return Ok(format!(
                    "closed by the daemon after {:.1}s ({requests} requests, {:.1} MiB written)",
                    started.elapsed().as_secs_f64(),
                    written as f64 / (1 << 20) as f64
                ))
            }
            Err(e) => return Err(format!("writing: {e}")),
        }
    }
    Ok(format!(
        "vanished after {:.1}s, still open ({requests} requests, {:.1} MiB written)",
        started.elapsed().as_secs_f64(),
        written as f64 / (1 << 20) as f64
    ))
}
