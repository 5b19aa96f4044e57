//! `ipc-gateway-bench`: a load generator for the IPC gateway, with two echo baselines.
//!
//! Every connection keeps exactly `--pipeline` TASK_SUBMIT frames outstanding for the whole run
//! and measures, for each request, the time from writing it to reading its reply (replies come
//! back in request order on a connection, ipc-protocol.md section 2). The same load is then run
//! against two bare framed echo servers inside this process, which cost the same socket work as
//! the gateway and do nothing else:
//!
//! - `echo`, thread per connection with blocking I/O: the reference floor. Its socket syscalls
//!   and wakeups spread over every core of the machine, so `gateway/echo` mixes the cost of the
//!   gateway's single-threaded architecture with the cost of the gateway's own code.
//! - `echo-1t`, one thread running an edge-triggered mio event loop, the gateway's own
//!   architecture: `gateway/echo-1t` is the cost of the gateway's code alone, and
//!   `echo-1t` against `echo` is the cost of serving everything from one thread.
//!
//! `--mode nats` (module `nats`, in `nats.rs`) measures the daemon's NATS
//! path instead: it starts nats-server, a Router stand-in and the daemon itself, and compares
//! the gateway with the same load sent straight over NATS by async-nats clients.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use ipc_gateway_tests::figures::ratio;
use ipc_gateway_tests::frame::{self, Frame, HEADER_LEN, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};
use mio::net::{UnixListener as MioListener, UnixStream as MioStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

mod nats;

/// The names of the runs, as printed in the results.
const GATEWAY: &str = "gateway";
/// The thread-per-connection echo floor.
const ECHO: &str = "echo";
/// The single-threaded (mio event loop) echo floor.
const ECHO_1T: &str = "echo-1t";
/// The gateway's socket unless --socket says otherwise (ipc-protocol.md section 1).
const DEFAULT_SOCKET: &str = "/tmp/beamline-gateway.sock";
/// The JSON object that the payload is padded from: `{"task":"bench","pad":"xxx..."}`.
const PAYLOAD_HEAD: &str = r#"{"task":"bench","pad":""#;
const PAYLOAD_TAIL: &str = r#""}"#;
/// The smallest payload the bench can build (the object above with an empty pad).
const MIN_PAYLOAD: usize = PAYLOAD_HEAD.len() + PAYLOAD_TAIL.len();
/// The largest payload that fits a 4 MiB frame (ipc-protocol.md section 2).
const MAX_PAYLOAD: usize = 4 * 1024 * 1024 - HEADER_LEN;
/// The highest latency the histograms can hold, in microseconds (larger ones are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;
/// How long connections may take to receive their last replies after the measured window
/// before they are shut down and the replies still outstanding are abandoned.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Above this many request bytes outstanding per connection, one thread that both writes and
/// reads could block in a write while the server blocks writing replies that it does not read:
/// each connection then gets a reader and a writer thread.
const SINGLE_THREAD_MAX_BYTES: usize = 64 * 1024;

/// Load generator for ipc-gateway: N connections, each keeping P TASK_SUBMIT requests in
/// flight, with per-request latency percentiles. By default it also runs the same load against
/// two bare framed echo servers in this process and prints the gateway's ratio to each:
/// "echo", thread per connection (the reference floor, free to use every core), and "echo-1t",
/// a single-threaded mio event loop like the gateway's (the floor for a one-thread server, so
/// the gateway's ratio to it is the cost of its own code).
///
/// Only the measured window (after the warmup) counts: requests/s is the number of RESPONSE_OK
/// replies received in it divided by its length, and latencies are those of these replies.
/// Any other reply type is counted as an error and reported, never fatal.
///
/// Every run ends by itself: no new request is written after the window, and connections whose
/// replies are still missing 2 s later are cut off (reported as STALLED). The echo servers
/// return each frame as it came, except for the type byte, set to RESPONSE_OK. The exit status
/// is 1 if the gateway cannot be reached or a connection broke during a run, 2 for bad options.
///
/// --mode nats starts its own nats-server (on a free loopback port), a Router stand-in
/// (async-nats, replying to every request with a small success JSON) and the daemon with
/// CGW_IPC_NATS_ENABLE=1, then for each --pipeline setting runs the IPC load through the
/// gateway and the same load sent directly with async-nats request(), N clients each with P
/// requests in flight, and prints both, the ratio gateway/direct, the CPU each process used and
/// the daemon's RSS. If the daemon cannot start, the direct path is still measured (exit 1).
#[derive(Parser, Debug)]
#[command(name = "ipc-gateway-bench", version)]
struct Args {
    /// Path of the gateway's Unix socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Number of connections, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    connections: u32,

    /// Requests kept outstanding on each connection: P are written at the start, then one new
    /// request for every reply [default: 16; with --mode nats, 1,16]. --mode nats takes a
    /// comma-separated list and runs each setting in turn.
    #[arg(long, value_name = "P", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pipeline: Option<Vec<u32>>,

    /// Size in bytes of each TASK_SUBMIT payload, a JSON object padded to exactly this size
    /// (at least 25, the size of `{"task":"bench","pad":""}`). The frame adds a 6-byte header.
    #[arg(long, value_name = "S", default_value_t = 256, value_parser = parse_payload_size)]
    payload_size: usize,

    /// Length of the measured window in seconds (fractions allowed, e.g. 2.5).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration,
          allow_negative_numbers = true)]
    duration: Duration,

    /// Seconds of load before the measured window, left out of every figure.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_warmup,
          allow_negative_numbers = true)]
    warmup: Duration,

    /// Pid of the gateway daemon: its peak RSS (VmHWM) and current RSS (VmRSS) from
    /// /proc/PID/status are printed before and after the load.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,

    /// Skip both echo baselines: load the gateway only.
    #[arg(long, conflicts_with = "echo_only")]
    no_echo: bool,

    /// Run only the two echo baselines, echo then echo-1t (no gateway needed; --socket is
    /// ignored).
    #[arg(long)]
    echo_only: bool,

    /// Run both echo baselines (echo, then echo-1t) before the gateway rather than after it.
    #[arg(long, conflicts_with_all = ["no_echo", "echo_only"])]
    echo_first: bool,

    /// Give each connection a reader and a writer thread. The default is one thread that
    /// writes a batch of requests, then reads the replies (cheaper, so closer to the server's
    /// own cost); split I/O is chosen anyway when P × (S + 6) exceeds 64 KiB, where one thread
    /// could block in a write while the server blocks writing replies to it.
    #[arg(long)]
    split_io: bool,

    /// `stub`: load an already running daemon (in its default stub mode) and the echo floors.
    /// `nats`: start nats-server, a Router stand-in and the daemon in NATS mode, and compare the
    /// gateway path with the same load sent directly over NATS (see the options below).
    #[arg(long, value_enum, default_value_t = Mode::Stub)]
    mode: Mode,

    #[command(flatten)]
    nats: nats::NatsArgs,
}

/// What the bench measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The daemon at --socket against the two echo floors.
    Stub,
    /// The gateway's NATS path against async-nats request-reply, both to the same stand-in.
    Nats,
}

fn parse_payload_size(text: &str) -> Result<usize, String> {
    let size: usize = text.parse().map_err(|e| format!("not a byte count: {e}"))?;
    if size < MIN_PAYLOAD {
        return Err(format!(
            "{size} bytes is too small: the payload is a JSON object of at least {MIN_PAYLOAD} \
             bytes ({PAYLOAD_HEAD}{PAYLOAD_TAIL})"
        ));
    }
    if size > MAX_PAYLOAD {
        let most = MAX_PAYLOAD;
        return Err(format!("{size} bytes is too large: at most {most}"));
    }
    Ok(size)
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let parsed = text.parse::<f64>();
    let secs = parsed.map_err(|e| format!("not a number of seconds: {e}"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{text} is not between 0 and 86400 seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_seconds(text)?;
    if duration < Duration::from_millis(1) {
        return Err("the measured window must be at least 0.001 s".to_string());
    }
    Ok(duration)
}

fn parse_warmup(text: &str) -> Result<Duration, String> {
    parse_seconds(text)
}

/// The TASK_SUBMIT payload: a JSON object of exactly `size` bytes.
fn bench_payload(size: usize) -> Result<Vec<u8>> {
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
struct Load {
    connections: usize,
    pipeline: usize,
    payload: Arc<Vec<u8>>,
    warmup: Duration,
    duration: Duration,
    /// A reader and a writer thread per connection, rather than one thread doing both.
    split: bool,
}

/// What one connection saw.
struct ConnOutcome {
    latencies: Histogram<u64>,
    ok: u64,
    /// Non-RESPONSE_OK replies in the measured window, by description.
    errors: BTreeMap<String, u64>,
    /// Why the connection stopped before the end of the measured window, if it did.
    failure: Option<String>,
    /// Requests written but never answered (the server was too slow after the end, or failed).
    unanswered: u64,
    /// Replies read, in or out of the measured window.
    replies: u64,
    /// When the last reply was read.
    last_reply: Option<Instant>,
}

/// What one run saw, all connections together.
struct RunResult {
    target: &'static str,
    address: String,
    latencies: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    failures: Vec<String>,
    /// Connections cut off because replies were still missing long after the end.
    stalled: Vec<String>,
    unanswered: u64,
    seconds: f64,
}

impl RunResult {
    /// Adds one connection's (or client's) outcome, its failure named after `who`.
    fn absorb(&mut self, who: &str, outcome: &ConnOutcome) -> Result<()> {
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

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// A latency percentile in microseconds (0 when nothing was recorded).
    fn pct(&self, quantile: f64) -> u64 {
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
    fn latency_us(&self) -> [u64; 5] {
        [
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.pct(0.999),
            self.max(),
        ]
    }
}

fn new_histogram() -> Result<Histogram<u64>> {
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
struct Window {
    start: Instant,
    /// Start of the measured window (the end of the warmup).
    from: Instant,
    /// End of the measured window: no new request is written after it.
    end: Instant,
}

impl Window {
    fn starting_now(load: &Load) -> Window {
        let start = Instant::now();
        let from = start + load.warmup;
        let end = from + load.duration;
        Window { start, from, end }
    }
}

impl ConnOutcome {
    fn new(latencies: Histogram<u64>) -> ConnOutcome {
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
    fn record_with(
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
    fn fail(&mut self, what: &str, w: &Window) {
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

fn connect(path: &Path, what: &str) -> Result<UnixStream> {
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
fn run_load(target: &'static str, path: &Path, load: &Load) -> Result<RunResult> {
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

/// The thread-per-connection echo baseline, "echo": a bare framed echo server on a temporary
/// socket, a thread per connection with blocking I/O, every complete frame of a read written
/// back in one write, nothing validated. The only change to a frame is its type byte, set to
/// RESPONSE_OK so that the client treats echo replies exactly like gateway replies. Its
/// connections run in parallel on every core: the reference floor, not the floor of a
/// single-threaded server (that is `EchoLoopServer`). Stopped and its socket file removed on
/// drop.
struct EchoServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start() -> Result<EchoServer> {
        let name = format!("ipc-gateway-bench-echo-{}.sock", std::process::id());
        let path = std::env::temp_dir().join(name);
        // A file of this name can only be left over from an earlier bench with our pid.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot bind the echo socket {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let spawned = thread::Builder::new()
            .name("echo-accept".to_string())
            .spawn(move || echo_accept(listener, &stop_flag));
        match spawned {
            Ok(handle) => {
                let thread = Some(handle);
                Ok(EchoServer { path, stop, thread })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                bail!("cannot start the echo server thread: {e}")
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor; it sees the flag and returns.
        let _ = UnixStream::connect(&self.path);
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn echo_accept(listener: UnixListener, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        // Connection threads end when their client closes; nobody waits for them.
        let _ = thread::Builder::new()
            .name("echo-conn".to_string())
            .spawn(move || echo_connection(conn));
    }
}

fn echo_connection(mut conn: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= ECHO_MAX_BUFFER {
                return; // a frame this large is not from this bench
            }
            buf.resize(buf.len() * 2, 0);
        }
        match conn.read(&mut buf[filled..]) {
            Ok(0) => return,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let mut done = 0;
        loop {
            match frame::complete_frame_len(&buf[done..filled]) {
                Ok(Some(len)) => {
                    // The type byte: the client counts anything but RESPONSE_OK as an error.
                    buf[done + 5] = RESPONSE_OK;
                    done += len;
                }
                Ok(None) => break,
                Err(_) => return, // length below 6: no frame boundary to be found any more
            }
        }
        if done > 0 {
            if conn.write_all(&buf[..done]).is_err() {
                return;
            }
            buf.copy_within(done..filled, 0);
            filled -= done;
        }
    }
}

/// The token of the echo-1t listener.
const ECHO_LISTENER: Token = Token(0);
/// The token of the waker that stops the echo-1t loop.
const ECHO_WAKER: Token = Token(1);
/// Connection `i` of the echo-1t loop has the token `ECHO_FIRST_CONN + i`.
const ECHO_FIRST_CONN: usize = 2;
/// Above this many bytes of replies waiting for the client, the echo-1t loop stops reading from
/// that connection until they are written: the backpressure that the thread-per-connection echo
/// gets from its blocking write.
const ECHO_OUTPUT_LIMIT: usize = 1024 * 1024;
/// A frame this large is not from this bench: both echo servers drop the connection.
const ECHO_MAX_BUFFER: usize = 16 * 1024 * 1024;

/// The single-threaded echo baseline, "echo-1t": one thread runs an edge-triggered mio event
/// loop on a temporary socket, the gateway's own architecture without the gateway's code. Frames
/// come back as the thread-per-connection echo returns them (type byte set to RESPONSE_OK,
/// nothing validated). Stopped and its socket file removed on drop.
struct EchoLoopServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl EchoLoopServer {
    fn start() -> Result<EchoLoopServer> {
        let name = format!("ipc-gateway-bench-echo-1t-{}.sock", std::process::id());
        let path = std::env::temp_dir().join(name);
        // A file of this name can only be left over from an earlier bench with our pid.
        let _ = std::fs::remove_file(&path);
        let listener = MioListener::bind(&path)
            .with_context(|| format!("cannot bind the echo-1t socket {}", path.display()))?;
        match EchoLoopServer::spawn(listener, &path) {
            Ok(server) => Ok(server),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn spawn(mut listener: MioListener, path: &Path) -> Result<EchoLoopServer> {
        let poll = Poll::new().context("cannot create the echo-1t poll")?;
        let registry = poll.registry();
        registry
            .register(&mut listener, ECHO_LISTENER, Interest::READABLE)
            .context("cannot register the echo-1t listener")?;
        let waker = Waker::new(registry, ECHO_WAKER).context("cannot create the echo-1t waker")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("echo-1t".to_string())
            .spawn(move || echo_loop(poll, listener, &stop_flag))
            .context("cannot start the echo-1t thread")?;
        Ok(EchoLoopServer {
            path: path.to_path_buf(),
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoLoopServer {
    fn drop(&mut self) {
        // The waker ends the poll at once; the loop also checks the flag every 50 ms, in case
        // the wake could not be delivered.
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(handle) = self.thread.take() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("ipc-gateway-bench: the echo-1t loop failed: {e}"),
                Err(_) => eprintln!("ipc-gateway-bench: the echo-1t thread panicked"),
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One client of the echo-1t loop.
struct EchoConn {
    stream: MioStream,
    /// Bytes read and not yet echoed (at most a partial frame between events).
    input: Vec<u8>,
    filled: usize,
    /// Complete frames waiting to be written, from `output[sent..]`.
    output: Vec<u8>,
    sent: usize,
    /// The socket may hold unread bytes: the last read did not end in WouldBlock or a short read
    /// (edge-triggered: no new readable event comes for bytes already there).
    may_read: bool,
    /// The last write ended in WouldBlock: wait for a writable event before writing again.
    write_blocked: bool,
    /// WRITABLE is part of the registered interest.
    write_interest: bool,
}

/// The connection is over (end of stream, error, or a frame too large for this bench).
struct Closed;

impl EchoConn {
    fn new(stream: MioStream) -> EchoConn {
        EchoConn {
            stream,
            input: vec![0; 64 * 1024],
            filled: 0,
            output: Vec::with_capacity(64 * 1024),
            sent: 0,
            may_read: false,
            write_blocked: false,
            write_interest: false,
        }
    }

    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Reads what the socket holds (while the replies owed stay below the limit) and writes as
    /// much of the replies as the socket takes.
    fn pump(&mut self) -> Result<(), Closed> {
        loop {
            while self.may_read && self.pending() < ECHO_OUTPUT_LIMIT {
                self.read_once()?;
            }
            self.flush()?;
            // Reading stopped at the output limit and the output is now written: read on.
            if self.write_blocked || !self.may_read {
                return Ok(());
            }
        }
    }

    /// One read; every complete frame read is queued for writing.
    fn read_once(&mut self) -> Result<(), Closed> {
        if self.filled == self.input.len() {
            if self.input.len() >= ECHO_MAX_BUFFER {
                return Err(Closed);
            }
            self.input.resize(self.input.len() * 2, 0);
        }
        let room = self.input.len() - self.filled;
        match self.stream.read(&mut self.input[self.filled..]) {
            Ok(0) => return Err(Closed),
            Ok(n) => {
                self.filled += n;
                if n < room {
                    // A short read emptied the socket; new bytes bring a new readable event.
                    self.may_read = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.may_read = false;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(_) => return Err(Closed),
        }
        let mut done = 0;
        loop {
            match frame::complete_frame_len(&self.input[done..self.filled]) {
                Ok(Some(len)) => {
                    // The type byte, as in the thread-per-connection echo.
                    self.input[done + 5] = RESPONSE_OK;
                    done += len;
                }
                Ok(None) => break,
                Err(_) => return Err(Closed), // length below 6: no frame boundary any more
            }
        }
        if done > 0 {
            // Drop what was written once it is at least half of the output: each byte is moved
            // at most once on average, however many partial writes a large frame takes.
            if self.sent > 0 && self.sent >= self.output.len() / 2 {
                self.output.drain(..self.sent);
                self.sent = 0;
            }
            self.output.extend_from_slice(&self.input[..done]);
            self.input.copy_within(done..self.filled, 0);
            self.filled -= done;
        }
        Ok(())
    }

    /// Writes until the output is gone or the socket is full.
    fn flush(&mut self) -> Result<(), Closed> {
        while !self.write_blocked && self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(0) => return Err(Closed),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Closed),
            }
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
        Ok(())
    }

    /// Interest is READABLE, plus WRITABLE only while replies wait for room in the socket (as
    /// in the gateway's loop): no writable events, and no re-registration, while writes go
    /// through at once.
    fn update_interest(&mut self, registry: &Registry, token: Token) -> Result<(), Closed> {
        let wanted = self.pending() > 0;
        if wanted == self.write_interest {
            return Ok(());
        }
        let interest = if wanted {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        registry
            .reregister(&mut self.stream, token, interest)
            .map_err(|_| Closed)?;
        self.write_interest = wanted;
        Ok(())
    }
}

/// The echo-1t event loop: runs until `stop` is set (and the waker fires, or 50 ms pass).
fn echo_loop(mut poll: Poll, mut listener: MioListener, stop: &AtomicBool) -> io::Result<()> {
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<EchoConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            match event.token() {
                ECHO_WAKER => {}
                ECHO_LISTENER => echo_accept_all(&listener, poll.registry(), &mut conns, &mut free),
                token => {
                    let Some(index) = token.0.checked_sub(ECHO_FIRST_CONN) else {
                        continue;
                    };
                    let Some(conn) = conns.get_mut(index).and_then(Option::as_mut) else {
                        continue;
                    };
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        conn.may_read = true;
                    }
                    if event.is_writable() || event.is_write_closed() || event.is_error() {
                        conn.write_blocked = false;
                    }
                    let served = conn.pump();
                    let served = served.and_then(|()| conn.update_interest(poll.registry(), token));
                    if served.is_err() {
                        if let Some(mut conn) = conns[index].take() {
                            let _ = poll.registry().deregister(&mut conn.stream);
                            free.push(index);
                        }
                    }
                }
            }
        }
    }
    let _ = poll.registry().deregister(&mut listener);
    Ok(())
}

/// Accepts every pending client of the echo-1t listener (edge-triggered: until WouldBlock).
fn echo_accept_all(
    listener: &MioListener,
    registry: &Registry,
    conns: &mut Vec<Option<EchoConn>>,
    free: &mut Vec<usize>,
) {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // WouldBlock: all accepted. Anything else (EMFILE...): the clients already
            // connected keep being served, and the bench reports the connect that failed.
            Err(_) => return,
        };
        let index = free.pop().unwrap_or(conns.len());
        let token = Token(ECHO_FIRST_CONN + index);
        if registry
            .register(&mut stream, token, Interest::READABLE)
            .is_err()
        {
            free.push(index);
            continue;
        }
        let conn = Some(EchoConn::new(stream));
        match conns.get_mut(index) {
            Some(slot) => *slot = conn,
            None => conns.push(conn),
        }
    }
}

/// VmHWM and VmRSS of a process, as printed in /proc/PID/status.
fn memory_of(pid: u32) -> Result<(String, String)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|rest| rest.trim().to_string())
            .unwrap_or_else(|| "?".to_string())
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

fn print_memory(pid: u32, when: &str) {
    match memory_of(pid) {
        Ok((hwm, rss)) => {
            println!("daemon pid {pid} {when}: peak RSS (VmHWM) {hwm}, current RSS (VmRSS) {rss}");
            let kb = |s: &str| s.trim_end_matches("kB").trim().to_string();
            println!(
                "MEM pid={pid} when={} vmhwm_kb={} vmrss_kb={}",
                when.replace(' ', "_"),
                kb(&hwm),
                kb(&rss)
            );
        }
        Err(e) => println!("daemon pid {pid} {when}: {e:#}"),
    }
}

/// Throughput, request and error counts, and the latency percentiles of a run; `counted`
/// names what a request is (a RESPONSE_OK reply, a successful NATS reply).
fn print_counts(r: &RunResult, counted: &str) {
    let (rps, secs, ok) = (r.rps(), r.seconds, r.ok);
    println!("  requests/s     {rps:>12.1}   ({counted} / {secs:.3} s)");
    println!("  requests       {ok:>12}   ({counted} in the window)");
    let errors: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    if errors.is_empty() {
        println!("  errors         {:>12}", 0);
    } else {
        let (count, list) = (r.error_count(), errors.join(", "));
        println!("  errors         {count:>12}   ({list})");
    }
    println!("  latency us        p50       p90       p99     p99.9       max");
    let [p50, p90, p99, p999, max] = r.latency_us();
    println!("               {p50:>9} {p90:>9} {p99:>9} {p999:>9} {max:>9}");
}

/// What went wrong in a run, if anything: unanswered, stalled and failed connections.
fn print_run_notes(r: &RunResult) {
    if r.unanswered > 0 {
        println!(
            "  note: {} requests were still unanswered when the run stopped (not counted)",
            r.unanswered
        );
    }
    for stalled in &r.stalled {
        println!("  STALLED {stalled}");
    }
    for failure in &r.failures {
        println!("  FAILED {failure}");
    }
    if r.ok == 0 {
        println!("  WARNING: no successful reply in the measured window");
    }
}

fn print_result(r: &RunResult) {
    println!();
    println!("== {} ({}) ==", r.target, r.address);
    print_counts(r, "RESPONSE_OK replies");
    print_run_notes(r);
    let [p50, p90, p99, p999, max] = r.latency_us();
    println!(
        "RESULT target={} rps={:.1} requests={} errors={} p50_us={p50} p90_us={p90} \
         p99_us={p99} p999_us={p999} max_us={max}",
        r.target,
        r.rps(),
        r.ok,
        r.error_count(),
    );
}

/// The table of every run, then the gateway's ratios to each echo floor that ran.
fn print_comparison(runs: &[&RunResult]) {
    println!();
    println!(
        "{:<9} {:>12} {:>10} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "target",
        "requests/s",
        "requests",
        "errors",
        "p50_us",
        "p90_us",
        "p99_us",
        "p99.9_us",
        "max_us"
    );
    for r in runs {
        let [p50, p90, p99, p999, max] = r.latency_us();
        println!(
            "{:<9} {:>12.1} {:>10} {:>7} {p50:>8} {p90:>8} {p99:>8} {p999:>9} {max:>8}",
            r.target,
            r.rps(),
            r.ok,
            r.error_count(),
        );
    }
    let find = |target: &str| runs.iter().find(|r| r.target == target);
    let echo = find(ECHO);
    let echo_1t = find(ECHO_1T);
    if echo.is_some() {
        println!(
            "  {ECHO:<8} = echo floor, a thread per connection: spreads the socket work over every \
             core (the reference floor)"
        );
    }
    if echo_1t.is_some() {
        println!(
            "  {ECHO_1T:<8} = echo floor, one thread running an edge-triggered mio loop: the \
             gateway's architecture without its code"
        );
    }
    let Some(gateway) = find(GATEWAY) else {
        return;
    };
    if let Some(e) = echo {
        println!(
            "ratio gateway/echo (thread per connection) = {}",
            ratio(gateway.rps(), e.rps())
        );
    }
    if let Some(e) = echo_1t {
        println!(
            "ratio gateway/echo-1t (single-threaded, same architecture as the gateway) = {}",
            ratio(gateway.rps(), e.rps())
        );
    }
    if let Some(e) = echo {
        println!(
            "p50 latency ratio gateway/echo (thread per connection) = {}",
            ratio(gateway.pct(0.5) as f64, e.pct(0.5) as f64)
        );
    }
    if let Some(e) = echo_1t {
        println!(
            "p50 latency ratio gateway/echo-1t (single-threaded, same architecture as the \
             gateway) = {}",
            ratio(gateway.pct(0.5) as f64, e.pct(0.5) as f64)
        );
    }
    if echo.is_some() && echo_1t.is_some() {
        println!(
            "  (gateway/echo-1t is the cost of the gateway's own code; echo-1t against echo is \
             the cost of serving every connection from one thread on this machine)"
        );
    }
}

/// Runs the load against one of the echo floors, started for this run only.
fn run_echo(target: &'static str, load: &Load) -> Result<RunResult> {
    if target == ECHO_1T {
        let server = EchoLoopServer::start()?;
        let result = run_load(target, &server.path, load);
        drop(server);
        result
    } else {
        let server = EchoServer::start()?;
        let result = run_load(target, &server.path, load);
        drop(server);
        result
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

fn run(args: Args) -> Result<bool> {
    if args.mode == Mode::Nats {
        return nats::run(&args);
    }
    nats::reject_nats_options(&args);
    let pipeline = match args.pipeline.as_deref() {
        None | Some([]) => 16,
        Some(&[p]) => p as usize,
        Some(_) => usage_error("--pipeline takes a single value unless --mode nats"),
    };
    let payload = bench_payload(args.payload_size)?;
    let frame_len = HEADER_LEN + args.payload_size;
    let outstanding = frame_len.saturating_mul(pipeline);
    let load = Load {
        connections: args.connections as usize,
        pipeline,
        payload: Arc::new(payload),
        warmup: args.warmup,
        duration: args.duration,
        split: args.split_io || outstanding > SINGLE_THREAD_MAX_BYTES,
    };
    let gateway_run = !args.echo_only;
    let echo_run = !args.no_echo;
    if gateway_run {
        // Fail before any run, not after the echo baseline, if the gateway is not there.
        drop(connect(&args.socket, "gateway")?);
    }
    if let Some(pid) = args.pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--pid {pid}: no such process");
        }
    }

    let cpus = match thread::available_parallelism() {
        Ok(n) => n.to_string(),
        Err(_) => "?".to_string(),
    };
    println!("ipc-gateway-bench");
    println!("  connections  {}", load.connections);
    println!(
        "  pipeline     {} requests outstanding per connection ({} in all)",
        load.pipeline,
        load.pipeline * load.connections
    );
    println!(
        "  payload      {} bytes of TASK_SUBMIT JSON ({} bytes a frame)",
        args.payload_size, frame_len
    );
    println!(
        "  duration     {:.3} s measured, after {:.3} s of warmup",
        load.duration.as_secs_f64(),
        load.warmup.as_secs_f64()
    );
    println!("  machine      {cpus} CPUs, kernel {}", kernel_release());
    if gateway_run {
        println!("  gateway      {}", args.socket.display());
    }
    let order = match (gateway_run, echo_run, args.echo_first) {
        (true, true, false) => {
            "gateway, then echo (thread per connection), then echo-1t (one thread)"
        }
        (true, true, true) => {
            "echo (thread per connection), then echo-1t (one thread), then gateway"
        }
        (true, false, _) => "gateway only",
        _ => "echo (thread per connection), then echo-1t (one thread); no gateway",
    };
    println!("  runs         {order}");
    let io = if load.split {
        "a reader and a writer thread per connection"
    } else {
        "one thread per connection, writing batches and reading replies"
    };
    println!("  client I/O   {io} ({outstanding} request bytes outstanding per connection)");
    if let Some(pid) = args.pid {
        print_memory(pid, "before");
    }

    let mut runs: Vec<RunResult> = Vec::with_capacity(3);
    let echoes_first = echo_run && (args.echo_first || !gateway_run);
    if echoes_first {
        runs.push(run_echo(ECHO, &load)?);
        runs.push(run_echo(ECHO_1T, &load)?);
    }
    if gateway_run {
        runs.push(run_load(GATEWAY, &args.socket, &load)?);
    }
    if echo_run && !echoes_first {
        runs.push(run_echo(ECHO, &load)?);
        runs.push(run_echo(ECHO_1T, &load)?);
    }

    for r in &runs {
        print_result(r);
    }
    if runs.len() > 1 {
        let all: Vec<&RunResult> = runs.iter().collect();
        print_comparison(&all);
    }
    if let Some(pid) = args.pid {
        println!();
        print_memory(pid, "after");
    }
    let failed = runs.iter().any(|r| !r.failures.is_empty());
    if failed {
        eprintln!("ipc-gateway-bench: some connections failed during the run (see FAILED above)");
    }
    Ok(!failed)
}

/// Reports a bad combination of options the way clap reports its own errors (exit status 2).
fn usage_error(message: &str) -> ! {
    let mut command = <Args as clap::CommandFactory>::command();
    command
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ipc-gateway-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
