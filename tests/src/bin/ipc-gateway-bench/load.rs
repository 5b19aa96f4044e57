//! The load generator: N connections, each keeping P TASK_SUBMIT frames in flight over the
//! measured window, with the latency of every reply; the same window rules serve the NATS
//! mode's direct clients (`nats::run_direct`).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use ipc_gateway_tests::frame::{self, Frame, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};

/// The name of the gateway run, as printed in the results (the echo runs are named in echo.rs).
pub(crate) const GATEWAY: &str = "gateway";
/// The JSON object that the payload is padded from: `{"task":"bench","pad":"xxx..."}`.
pub(crate) const PAYLOAD_HEAD: &str = r#"{"task":"bench","pad":""#;
pub(crate) const PAYLOAD_TAIL: &str = r#""}"#;
/// The smallest payload the bench can build (the object above with an empty pad).
pub(crate) const MIN_PAYLOAD: usize = PAYLOAD_HEAD.len() + PAYLOAD_TAIL.len();
/// The highest latency the histograms can hold, in microseconds (larger ones are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;
/// How long connections may take to receive their last replies after the measured window
/// before they are shut down and the replies still outstanding are abandoned.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Above this many request bytes outstanding per connection, one thread that both writes and
/// reads could block in a write while the server blocks writing replies that it does not read:
/// each connection then gets a reader and a writer thread.
pub(crate) const SINGLE_THREAD_MAX_BYTES: usize = 64 * 1024;

/// The TASK_SUBMIT payload: a JSON object of exactly `size` bytes.
pub(crate) fn bench_payload(size: usize) -> Result<Vec<u8>> {
    let pad = size
        .checked_sub(MIN_PAYLOAD)
        .ok_or_else(|| anyhow!("payload size {size} is below the minimum {MIN_PAYLOAD}"))?;
    let mut payload = Vec::with_capacity(size);
    payload.extend_from_slice(PAYLOAD_HEAD.as_bytes());
    payload.resize(PAYLOAD_HEAD.len() + pad, b'x');
    payload.extend_from_slice(PAYLOAD_TAIL.as_bytes());
    let value: serde_json::Value =
        serde_json::from_slice(&payload).context("the bench payload is not JSON")?;
    if !value.is_object() || payload.len() != size {
        bail!("the bench payload is not a JSON object of {size} bytes");
    }
    Ok(payload)
}

/// The load, identical for every run.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    pub(crate) connections: usize,
    pub(crate) pipeline: usize,
    pub(crate) payload: Arc<Vec<u8>>,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    /// A reader and a writer thread per connection, rather than one thread doing both.
    pub(crate) split: bool,
}

/// What one connection saw.
pub(crate) struct ConnOutcome {
    pub(crate) latencies: Histogram<u64>,
    pub(crate) ok: u64,
    /// Non-RESPONSE_OK replies in the measured window, by description.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Why the connection stopped before the end of the measured window, if it did.
    pub(crate) failure: Option<String>,
    /// Requests written but never answered (the server was too slow after the end, or failed).
    pub(crate) unanswered: u64,
    /// Replies read, in or out of the measured window.
    pub(crate) replies: u64,
    /// When the last reply was read.
    pub(crate) last_reply: Option<Instant>,
}

/// What one run saw, all connections together.
pub(crate) struct RunResult {
    pub(crate) target: &'static str,
    pub(crate) address: String,
    pub(crate) latencies: Histogram<u64>,
    pub(crate) ok: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) failures: Vec<String>,
    /// Connections cut off because replies were still missing long after the end.
    pub(crate) stalled: Vec<String>,
    pub(crate) unanswered: u64,
    pub(crate) seconds: f64,
}

impl RunResult {
    /// Adds one connection's (or client's) outcome, its failure named after `who`.
    pub(crate) fn absorb(&mut self, who: &str, outcome: &ConnOutcome) -> Result<()> {
        self.latencies
            .add(&outcome.latencies)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        self.ok += outcome.ok;
        for (what, n) in &outcome.errors {
            *self.errors.entry(what.clone()).or_default() += n;
        }
        if let Some(failure) = &outcome.failure {
            self.failures.push(format!("{who}: {failure}"));
        }
        self.unanswered += outcome.unanswered;
        Ok(())
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub(crate) fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// A latency percentile in microseconds (0 when nothing was recorded).
    pub(crate) fn pct(&self, quantile: f64) -> u64 {
        if self.latencies.is_empty() {
            0
        } else {
            self.latencies.value_at_quantile(quantile)
        }
    }

    fn max(&self) -> u64 {
        self.latencies.max()
    }

    /// The figures every report prints, in its column order: p50, p90, p99, p99.9, max (µs).
    pub(crate) fn latency_us(&self) -> [u64; 5] {
        [
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.pct(0.999),
            self.max(),
        ]
    }
}

pub(crate) fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| anyhow!("histogram: {e}"))
}

fn describe_error(reply: &Frame) -> String {
    if reply.kind != RESPONSE_ERROR {
        return format!("reply type 0x{:02X}", reply.kind);
    }
    let code = serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .ok()
        .and_then(|v| v["error"]["code"].as_u64());
    match code {
        Some(code) => format!("RESPONSE_ERROR code {code}"),
        None => "RESPONSE_ERROR without a numeric error.code".to_string(),
    }
}

/// Is a whole frame waiting at the start of `buf`? (A malformed length counts as "yes": the
/// next read reports it.)
fn frame_waiting(buf: &[u8]) -> bool {
    !matches!(frame::complete_frame_len(buf), Ok(None))
}

/// The times that matter for one run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) start: Instant,
    /// Start of the measured window (the end of the warmup).
    pub(crate) from: Instant,
    /// End of the measured window: no new request is written after it.
    pub(crate) end: Instant,
}

impl Window {
    pub(crate) fn starting_now(load: &Load) -> Window {
        let start = Instant::now();
        let from = start + load.warmup;
        let end = from + load.duration;
        Window { start, from, end }
    }
}

impl ConnOutcome {
    pub(crate) fn new(latencies: Histogram<u64>) -> ConnOutcome {
        ConnOutcome {
            latencies,
            ok: 0,
            errors: BTreeMap::new(),
            failure: None,
            unanswered: 0,
            replies: 0,
            last_reply: None,
        }
    }

    /// Counts a reply read at `now` to a request written at `written`.
    fn record(&mut self, reply: &Frame, written: Instant, now: Instant, w: &Window) {
        let ok = reply.kind == RESPONSE_OK;
        self.record_with(ok, || describe_error(reply), written, now, w);
    }

    /// Counts a reply, successful or not (then `describe` names the error), read at `now` to a
    /// request written at `written`.
    pub(crate) fn record_with(
        &mut self,
        ok: bool,
        describe: impl FnOnce() -> String,
        written: Instant,
        now: Instant,
        w: &Window,
    ) {
        self.replies += 1;
        self.last_reply = Some(now);
        if now < w.from || now >= w.end {
            return;
        }
        if ok {
            let micros = u64::try_from(now.duration_since(written).as_micros());
            self.latencies.saturating_record(micros.unwrap_or(u64::MAX));
            self.ok += 1;
        } else {
            *self.errors.entry(describe()).or_default() += 1;
        }
    }

    /// Notes why the connection stopped, if that happened before the end of the window (after
    /// it, a broken connection is the main thread cutting off a slow server, or harmless).
    pub(crate) fn fail(&mut self, what: &str, w: &Window) {
        let now = Instant::now();
        if now < w.end && self.failure.is_none() {
            let secs = now.duration_since(w.start).as_secs_f64();
            let replies = self.replies;
            let message = format!("{what}, after {replies} replies, {secs:.3} s into the run");
            self.failure = Some(message);
        }
    }
}

/// Reads one reply; on end of stream or error, notes the failure and returns `None`.
fn read_reply(r: &mut impl Read, out: &mut ConnOutcome, w: &Window) -> Option<Frame> {
    match frame::read_frame(r) {
        Ok(Some(reply)) => Some(reply),
        Ok(None) => {
            out.fail("the server closed the connection", w);
            None
        }
        Err(e) => {
            out.fail(&format!("read failed ({e})"), w);
            None
        }
    }
}

/// Drives one connection until the end of the measured window, then collects the replies still
/// outstanding (until a shutdown from the main thread interrupts it).
fn drive_connection(stream: UnixStream, load: &Load, w: Window, out: ConnOutcome) -> ConnOutcome {
    if load.split {
        drive_split(&stream, load, &w, out)
    } else {
        drive_single(&stream, load, &w, out)
    }
}

fn reply_buffer(request: &[u8]) -> usize {
    (64 * 1024).max(request.len() * 4)
}

/// One thread writes and reads: after the first P requests, it reads every reply already
/// received, then writes as many new requests in one write.
fn drive_single(stream: &UnixStream, load: &Load, w: &Window, mut out: ConnOutcome) -> ConnOutcome {
    let request = frame::encode(TASK_SUBMIT, &load.payload);
    let batch = request.repeat(load.pipeline);
    let mut reader = BufReader::with_capacity(reply_buffer(&request), stream);
    let mut writer = stream;
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(load.pipeline);
    let mut to_send = load.pipeline;
    let mut sending = true;

    loop {
        // Write the requests owed, in one batch, unless another reply is already buffered:
        // then take that first, so that one write carries several requests.
        if to_send > 0 && (sent.is_empty() || !frame_waiting(reader.buffer())) {
            let now = Instant::now();
            if let Err(e) = writer.write_all(&batch[..to_send * request.len()]) {
                out.fail(&format!("write failed ({e})"), w);
                out.unanswered = sent.len() as u64;
                return out;
            }
            for _ in 0..to_send {
                sent.push_back(now);
            }
            to_send = 0;
        }
        if sent.is_empty() {
            return out;
        }
        let Some(reply) = read_reply(&mut reader, &mut out, w) else {
            out.unanswered = sent.len() as u64;
            return out;
        };
        let now = Instant::now();
        let Some(written) = sent.pop_front() else {
            out.fail("a reply arrived with no request outstanding", w);
            return out;
        };
        out.record(&reply, written, now, w);
        if sending && now >= w.end {
            sending = false;
        }
        if sending {
            to_send += 1;
        }
    }
}

/// What the reader and the writer of one connection share in split mode.
struct Pipe {
    /// When each outstanding request was written, oldest first.
    sent: VecDeque<Instant>,
    /// Requests the writer may write (one per reply read).
    credits: usize,
    writer_done: bool,
    reader_done: bool,
}

impl Pipe {
    fn new(pipeline: usize) -> Pipe {
        Pipe {
            sent: VecDeque::with_capacity(pipeline),
            credits: pipeline,
            writer_done: false,
            reader_done: false,
        }
    }
}

/// A reader (this thread) and a writer thread per connection: neither can block the other, so
/// any amount of outstanding data works. The writer waits for credits (one per reply) and writes
/// all it has in one write.
fn drive_split(stream: &UnixStream, load: &Load, w: &Window, mut out: ConnOutcome) -> ConnOutcome {
    let request = frame::encode(TASK_SUBMIT, &load.payload);
    let pipe = Mutex::new(Pipe::new(load.pipeline));
    let wake = Condvar::new();
    let lock = || pipe.lock().unwrap_or_else(PoisonError::into_inner);

    thread::scope(|scope| {
        let write = || split_writer(stream, &request, load, w, &pipe, &wake);
        let builder = thread::Builder::new().name("bench-writer".to_string());
        let writer = builder.spawn_scoped(scope, write);
        if let Err(e) = writer {
            out.fail(&format!("cannot start a writer thread ({e})"), w);
            return;
        }
        let mut reader = BufReader::with_capacity(reply_buffer(&request), stream);
        let mut replies = Vec::new();
        loop {
            {
                let mut p = lock();
                while p.sent.is_empty() && !p.writer_done {
                    p = wake.wait(p).unwrap_or_else(PoisonError::into_inner);
                }
                if p.sent.is_empty() {
                    return; // the writer has stopped and every request is answered
                }
            }
            // One blocking read, then every reply already buffered.
            let mut broken = false;
            match read_reply(&mut reader, &mut out, w) {
                Some(reply) => replies.push(reply),
                None => broken = true,
            }
            while !broken && frame_waiting(reader.buffer()) {
                match read_reply(&mut reader, &mut out, w) {
                    Some(reply) => replies.push(reply),
                    None => broken = true,
                }
            }
            let now = Instant::now();
            let mut p = lock();
            for reply in replies.drain(..) {
                let Some(written) = p.sent.pop_front() else {
                    out.fail("a reply arrived with no request outstanding", w);
                    broken = true;
                    break;
                };
                out.record(&reply, written, now, w);
                p.credits += 1;
            }
            if broken {
                out.unanswered = p.sent.len() as u64;
                p.reader_done = true;
                drop(p);
                wake.notify_all();
                // The writer may be blocked in a write to a server that does not read.
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            drop(p);
            wake.notify_all();
        }
    });
    out
}

fn split_writer(
    stream: &UnixStream,
    request: &[u8],
    load: &Load,
    w: &Window,
    pipe: &Mutex<Pipe>,
    wake: &Condvar,
) {
    let batch = request.repeat(load.pipeline);
    let mut writer = stream;
    let lock = || pipe.lock().unwrap_or_else(PoisonError::into_inner);
    let mut p = lock();
    loop {
        while p.credits == 0 && !p.reader_done {
            p = wake.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        let now = Instant::now();
        if p.reader_done || now >= w.end {
            break;
        }
        let count = std::mem::take(&mut p.credits);
        for _ in 0..count {
            p.sent.push_back(now);
        }
        drop(p);
        wake.notify_all();
        let written = writer.write_all(&batch[..count * request.len()]);
        p = lock();
        if written.is_err() {
            // The reader sees the broken connection too, and reports it.
            break;
        }
    }
    p.writer_done = true;
    drop(p);
    wake.notify_all();
}

pub(crate) fn connect(path: &Path, what: &str) -> Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| {
        if what == GATEWAY {
            anyhow!(
                "cannot connect to the gateway socket {}: {e}\nis the daemon running? start it \
                 with `cargo run --release -p ipc-gateway` (or pass --socket PATH, or \
                 --echo-only for the baseline alone)",
                path.display()
            )
        } else {
            let path = path.display();
            anyhow!("cannot connect to the {what} socket {path}: {e}")
        }
    })
}

/// Runs the load against the server at `path`.
pub(crate) fn run_load(target: &'static str, path: &Path, load: &Load) -> Result<RunResult> {
    let mut streams = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        streams.push(connect(path, target)?);
    }
    let mut watch = Vec::with_capacity(streams.len());
    for stream in &streams {
        watch.push(stream.try_clone().context("cloning a socket")?);
    }
    let mut hists = Vec::with_capacity(streams.len());
    for _ in 0..streams.len() {
        hists.push(new_histogram()?);
    }

    let window = Window::starting_now(load);
    let (start, end) = (window.start, window.end);
    let mut workers: Vec<JoinHandle<ConnOutcome>> = Vec::with_capacity(streams.len());
    for (i, (stream, hist)) in streams.into_iter().zip(hists).enumerate() {
        let load = load.clone();
        let spawned = thread::Builder::new()
            .name(format!("bench-conn-{i}"))
            .spawn(move || drive_connection(stream, &load, window, ConnOutcome::new(hist)));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                for w in &watch {
                    let _ = w.shutdown(Shutdown::Both);
                }
                for handle in workers {
                    let _ = handle.join();
                }
                bail!("cannot start a connection thread: {e}");
            }
        }
    }

    // Wait for the end of the window, then give the connections a while to collect their last
    // replies; whatever still waits after that is cut off so the bench always ends.
    let deadline = end + DRAIN_GRACE;
    loop {
        let now = Instant::now();
        if workers.iter().all(JoinHandle::is_finished) || now >= deadline {
            break;
        }
        let until_end = end.saturating_duration_since(now);
        let until_deadline = deadline.saturating_duration_since(now);
        let nap = until_end.clamp(Duration::from_millis(10), Duration::from_millis(100));
        thread::sleep(nap.min(until_deadline));
    }
    let mut cut_off = vec![false; workers.len()];
    for ((handle, w), cut) in workers.iter().zip(&watch).zip(&mut cut_off) {
        if !handle.is_finished() {
            *cut = true;
            let _ = w.shutdown(Shutdown::Both);
        }
    }

    let mut result = RunResult {
        target,
        address: path.display().to_string(),
        latencies: new_histogram()?,
        ok: 0,
        errors: BTreeMap::new(),
        failures: Vec::new(),
        stalled: Vec::new(),
        unanswered: 0,
        seconds: load.duration.as_secs_f64(),
    };
    for (i, handle) in workers.into_iter().enumerate() {
        let outcome = match handle.join() {
            Ok(outcome) => outcome,
            Err(_) => {
                let failure = format!("connection {i}: its thread panicked");
                result.failures.push(failure);
                continue;
            }
        };
        result.absorb(&format!("connection {i}"), &outcome)?;
        if cut_off[i] {
            let last = match outcome.last_reply {
                Some(t) => {
                    let secs = t.duration_since(start).as_secs_f64();
                    format!("{secs:.3} s into the run")
                }
                None => "never".to_string(),
            };
            result.stalled.push(format!(
                "connection {i}: {} replies still missing {} s after the end; last reply: {last}",
                outcome.unanswered,
                DRAIN_GRACE.as_secs()
            ));
        }
    }
    Ok(result)
}
