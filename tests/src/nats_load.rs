//! What the NATS fault tests share: pipelined client load that records every reply, the
//! daemon's `stats` line (SIGUSR1) and its open file descriptors.
//!
//! [`Load`] runs N client connections, each on its own thread, each keeping up to `window`
//! requests outstanding (pipelined: written before the earlier replies are read). Replies come
//! in request order per connection (ipc-protocol.md), so reply k of a connection belongs to
//! request k; every reply is recorded with its request's send time. When the load stops, each
//! client reads the replies it still waits for and then sends a PING whose PONG must be the
//! very next frame: a reply beyond one per request would show up there.
//!
//! What a client finds wrong (a reply that does not pass the check, a frame that is not a
//! reply, a reply missing after [`crate::daemon::IO_TIMEOUT`], the connection closed under
//! it) is a [`Failure`]. [`Load::stop`] panics with every failure, which fails a test;
//! [`Load::finish`] returns them, for a tool that reports instead of panicking (the chaos
//! soak). A client goes on after a wrong reply (its stream is still in step) and stops at an
//! I/O failure.
//!
//! Keep `window` at or below the daemon's per-connection in-flight limit (10 by default): the
//! daemon then reads every request as soon as it is written, so the send time recorded here
//! is (within scheduling noise) when the request's deadline started.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;

use crate::daemon::{self, Daemon};
use crate::frame::{self, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error(u64),
}

/// One request and its reply.
#[derive(Debug, Clone)]
pub struct Record {
    pub client: usize,
    pub n: u64,
    pub sent: Instant,
    pub answered: Instant,
    pub outcome: Outcome,
}

impl Record {
    pub fn latency(&self) -> Duration {
        self.answered - self.sent
    }
}

/// Something a client found wrong: on which client, at which request (if one), when.
#[derive(Debug, Clone)]
pub struct Failure {
    pub client: usize,
    pub n: Option<u64>,
    pub at: Instant,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.n {
            Some(n) => write!(f, "client {} request {n}: {}", self.client, self.message),
            None => write!(f, "client {}: {}", self.client, self.message),
        }
    }
}

/// Checks a RESPONSE_OK body against the payload the client sent (the reply must be for that
/// request); `Err` says what is wrong.
pub type OkCheck = Arc<dyn Fn(&Value, &Value) -> Result<(), String> + Send + Sync>;
/// The payload of request `n` of client `c`.
pub type PayloadFn = Arc<dyn Fn(usize, u64) -> Value + Send + Sync>;
/// Called on the client's thread with every record as it is made.
pub type RecordHook = Arc<dyn Fn(&Record) + Send + Sync>;

/// Everything a [`Load`] can be told; [`LoadConfig::new`] has the defaults.
#[derive(Clone)]
pub struct LoadConfig {
    pub socket: PathBuf,
    pub clients: usize,
    pub window: usize,
    /// Pause after each reply before sending again (zero: as fast as replies come).
    pub pause: Duration,
    /// If not zero: write a whole window, read every reply, pause this long, and so on. This
    /// paces the load without leaving replies unread while the client sleeps, so that the
    /// latencies recorded stay exact (with `pause`, a reply that comes during the pause is
    /// read late).
    pub idle_pause: Duration,
    pub payload: PayloadFn,
    /// An OK reply must pass `check(sent payload, reply body)`.
    pub check: OkCheck,
    /// Sees every record as it is made (e.g. live throughput); none by default.
    pub on_record: Option<RecordHook>,
    /// Keep every record for [`Load::records`] and the result (default true; a long run that
    /// only needs `on_record` saves the memory).
    pub keep_records: bool,
}

impl LoadConfig {
    /// `clients` connections to `socket`, `window` requests outstanding on each, no pause,
    /// every record kept, no hook.
    pub fn new(
        socket: PathBuf,
        clients: usize,
        window: usize,
        payload: PayloadFn,
        check: OkCheck,
    ) -> LoadConfig {
        LoadConfig {
            socket,
            clients,
            window,
            pause: Duration::ZERO,
            idle_pause: Duration::ZERO,
            payload,
            check,
            on_record: None,
            keep_records: true,
        }
    }
}

/// What a finished [`Load`] leaves: its records, its failures, and how many requests were
/// still waiting for a reply when the daemon closed the connection after
/// [`Load::expect_shutdown`] (in all, and of those, how many were written before that call).
#[derive(Debug, Default)]
pub struct LoadResult {
    pub records: Vec<Record>,
    pub failures: Vec<Failure>,
    pub unanswered_at_shutdown: u64,
    pub unanswered_sent_before_shutdown: u64,
}

/// Pipelined load on N client connections; see the module documentation.
pub struct Load {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    clients: Vec<JoinHandle<()>>,
}

/// What the clients of one load share.
#[derive(Default)]
struct Shared {
    records: Mutex<Vec<Record>>,
    failures: Mutex<Vec<Failure>>,
    oks: AtomicU64,
    shutting_down: AtomicBool,
    shutdown_at: Mutex<Option<Instant>>,
    unanswered_at_shutdown: AtomicU64,
    unanswered_sent_before_shutdown: AtomicU64,
}

impl Load {
    /// Starts `clients` connections to `daemon`, each with up to `window` requests
    /// outstanding, pausing `pause` after each reply before sending again (zero: as fast as
    /// replies come). Request `n` of client `c` carries `payload(c, n)`; an OK reply must pass
    /// `check(sent payload, reply body)`.
    pub fn start(
        daemon: &Daemon,
        clients: usize,
        window: usize,
        pause: Duration,
        payload: impl Fn(usize, u64) -> Value + Send + Sync + 'static,
        check: OkCheck,
    ) -> Load {
        let mut config = LoadConfig::new(
            daemon.socket_path().to_path_buf(),
            clients,
            window,
            Arc::new(payload),
            check,
        );
        config.pause = pause;
        Load::start_with(config)
    }

    /// Starts the load `config` describes.
    pub fn start_with(config: LoadConfig) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let clients = (0..config.clients)
            .map(|c| {
                let client = Client {
                    id: c,
                    config: config.clone(),
                    stop: Arc::clone(&stop),
                    shared: Arc::clone(&shared),
                };
                thread::spawn(move || client.run())
            })
            .collect();
        Load {
            stop,
            shared,
            clients,
        }
    }

    /// OK replies so far.
    pub fn ok_count(&self) -> u64 {
        self.shared.oks.load(Ordering::SeqCst)
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.shared.records).clone()
    }

    /// A copy of the failures so far.
    pub fn failures(&self) -> Vec<Failure> {
        lock(&self.shared.failures).clone()
    }

    /// From now on the daemon may close the connections (it was told to shut down): a client
    /// whose connection closes ends quietly, and the requests it still waited for are counted
    /// in [`LoadResult::unanswered_at_shutdown`] instead of being failures.
    pub fn expect_shutdown(&self) {
        *lock(&self.shared.shutdown_at) = Some(Instant::now());
        self.shared.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The earliest OK reply received at or after `t`, if any yet.
    pub fn first_ok_after(&self, t: Instant) -> Option<Instant> {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.outcome == Outcome::Ok && r.answered >= t)
            .map(|r| r.answered)
            .min()
    }

    /// Waits for an OK reply received at or after `t`; panics after `within`.
    pub fn wait_ok_after(&self, t: Instant, within: Duration) -> Instant {
        let mut found = None;
        daemon::wait_until("an OK reply after the given instant", within, || {
            found = self.first_ok_after(t);
            found.is_some()
        });
        found.expect("set by the wait")
    }

    /// Waits until `n` more OK replies than now have arrived; panics after `within`.
    pub fn wait_more_oks(&self, n: u64, within: Duration) {
        let target = self.ok_count() + n;
        daemon::wait_until(&format!("{n} more OK replies"), within, || {
            self.ok_count() >= target
        });
    }

    /// Stops sending; every client reads its outstanding replies and checks that a PONG
    /// follows them. Returns every record; panics if a client found anything wrong.
    pub fn stop(self) -> Vec<Record> {
        let result = self.finish();
        assert!(
            result.failures.is_empty(),
            "load clients failed:\n{}",
            result
                .failures
                .iter()
                .map(Failure::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        result.records
    }

    /// Like [`Load::stop`], but returns the failures instead of panicking.
    pub fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::SeqCst);
        for (c, client) in self.clients.into_iter().enumerate() {
            if let Err(e) = client.join() {
                let text = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                lock(&self.shared.failures).push(Failure {
                    client: c,
                    n: None,
                    at: Instant::now(),
                    message: format!("the client thread panicked: {text}"),
                });
            }
        }
        LoadResult {
            records: std::mem::take(&mut *lock(&self.shared.records)),
            failures: std::mem::take(&mut *lock(&self.shared.failures)),
            unanswered_at_shutdown: self.shared.unanswered_at_shutdown.load(Ordering::SeqCst),
            unanswered_sent_before_shutdown: self
                .shared
                .unanswered_sent_before_shutdown
                .load(Ordering::SeqCst),
        }
    }
}

struct Client {
    id: usize,
    config: LoadConfig,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

/// Why a client stopped early.
enum Ended {
    /// The daemon closed the connection after [`Load::expect_shutdown`]: not a failure.
    Shutdown,
    Failed(Failure),
}

impl Client {
    fn run(self) {
        let mut outstanding: VecDeque<(u64, Instant, Value)> = VecDeque::new();
        match self.serve(&mut outstanding) {
            Ok(()) => {}
            Err(Ended::Shutdown) => {
                let at = lock(&self.shared.shutdown_at).unwrap_or_else(Instant::now);
                let before = outstanding.iter().filter(|(_, sent, _)| *sent < at).count();
                self.shared
                    .unanswered_at_shutdown
                    .fetch_add(outstanding.len() as u64, Ordering::SeqCst);
                self.shared
                    .unanswered_sent_before_shutdown
                    .fetch_add(before as u64, Ordering::SeqCst);
            }
            Err(Ended::Failed(failure)) => lock(&self.shared.failures).push(failure),
        }
    }

    fn failure(&self, n: Option<u64>, message: String) -> Failure {
        Failure {
            client: self.id,
            n,
            at: Instant::now(),
            message,
        }
    }

    /// An I/O error on the connection: the end of the client, quietly if the daemon is
    /// shutting down and closed the connection.
    fn io_error(&self, n: Option<u64>, what: &str, e: &io::Error) -> Ended {
        let closed = daemon::is_closed(e) || e.kind() == io::ErrorKind::UnexpectedEof;
        if closed && self.shared.shutting_down.load(Ordering::SeqCst) {
            Ended::Shutdown
        } else {
            Ended::Failed(self.failure(n, format!("{what}: {e}")))
        }
    }

    /// The client's work; on early end, `outstanding` holds the requests left unanswered.
    fn serve(&self, outstanding: &mut VecDeque<(u64, Instant, Value)>) -> Result<(), Ended> {
        let config = &self.config;
        let mut stream = UnixStream::connect(&config.socket).map_err(|e| {
            Ended::Failed(self.failure(
                None,
                format!("connecting to {}: {e}", config.socket.display()),
            ))
        })?;
        for set in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
            set(&stream, Some(daemon::IO_TIMEOUT))
                .map_err(|e| Ended::Failed(self.failure(None, format!("socket timeout: {e}"))))?;
        }
        let mut next = 0u64;
        // With an idle pause, a window is written only once the previous one is all answered.
        let mut filling = true;
        loop {
            if filling && !self.stop.load(Ordering::SeqCst) && outstanding.len() < config.window {
                let payload = (config.payload)(self.id, next);
                let bytes = frame::encode(TASK_SUBMIT, payload.to_string().as_bytes());
                outstanding.push_back((next, Instant::now(), payload));
                io::Write::write_all(&mut stream, &bytes)
                    .map_err(|e| self.io_error(Some(next), "writing the request", &e))?;
                next += 1;
                continue;
            }
            filling = config.idle_pause.is_zero();
            let Some(&(n, sent, ref payload)) = outstanding.front() else {
                break;
            };
            let frame = match frame::read_frame(&mut stream) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    let what = format!(
                        "the connection closed with {} requests unanswered",
                        outstanding.len()
                    );
                    return Err(self.io_error(Some(n), &what, &eof));
                }
                Err(e) => {
                    let what = format!(
                        "reading the reply (read timeout {:?}, {} requests unanswered)",
                        daemon::IO_TIMEOUT,
                        outstanding.len()
                    );
                    return Err(self.io_error(Some(n), &what, &e));
                }
            };
            let answered = Instant::now();
            let outcome = self.judge(n, payload, &frame);
            outstanding.pop_front();
            if let Some(outcome) = outcome {
                let record = Record {
                    client: self.id,
                    n,
                    sent,
                    answered,
                    outcome,
                };
                if let Some(hook) = &config.on_record {
                    hook(&record);
                }
                if outcome == Outcome::Ok {
                    self.shared.oks.fetch_add(1, Ordering::SeqCst);
                }
                if config.keep_records {
                    lock(&self.shared.records).push(record);
                }
            }
            if !config.pause.is_zero() {
                thread::sleep(config.pause);
            }
            if outstanding.is_empty() && !config.idle_pause.is_zero() {
                if !self.stop.load(Ordering::SeqCst) {
                    thread::sleep(config.idle_pause);
                }
                filling = true;
            }
        }
        // One reply per request: the frame after the last reply is the PONG.
        match daemon::check_ping(&mut stream) {
            Ok(()) => Ok(()),
            Err(_) if self.shared.shutting_down.load(Ordering::SeqCst) => Err(Ended::Shutdown),
            Err(e) => Err(Ended::Failed(self.failure(
                None,
                format!("after the last reply: {e} (a reply too many, or the connection closed)"),
            ))),
        }
    }

    /// The outcome of a reply; `None` (and a failure recorded) if the reply is wrong.
    fn judge(&self, n: u64, payload: &Value, frame: &frame::Frame) -> Option<Outcome> {
        let body: Result<Value, String> = serde_json::from_slice(&frame.payload).map_err(|e| {
            format!(
                "reply payload is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&frame.payload)
            )
        });
        let judged = match (frame.kind, body) {
            (_, Err(e)) => Err(e),
            (RESPONSE_OK, Ok(body)) => (self.config.check)(payload, &body)
                .map(|()| Outcome::Ok)
                .map_err(|e| format!("wrong OK reply: {e}\n  sent {payload}\n  got {body}")),
            (RESPONSE_ERROR, Ok(body)) => match body["error"]["code"].as_u64() {
                Some(code) => daemon::check_error(frame, code).map(|_| Outcome::Error(code)),
                None => Err(format!("error frame without a numeric code: {body}")),
            },
            (other, Ok(_)) => Err(format!("unexpected frame type {other:#04X}: {frame:?}")),
        };
        judged
            .map_err(|e| lock(&self.shared.failures).push(self.failure(Some(n), e)))
            .ok()
    }
}

/// What is wrong with `r`, if anything: its outcome is not OK, 5 or 8 (or 6 when
/// `shutting_down`), or it came later than `deadline` (the request timeout plus slack).
pub fn outcome_problem(r: &Record, deadline: Duration, shutting_down: bool) -> Option<String> {
    let allowed = match r.outcome {
        Outcome::Ok | Outcome::Error(5) | Outcome::Error(8) => true,
        Outcome::Error(6) => shutting_down,
        Outcome::Error(_) => false,
    };
    if !allowed {
        let expected = if shutting_down {
            "OK, 5, 8 or 6"
        } else {
            "OK, 5 or 8"
        };
        return Some(format!(
            "client {} request {}: {:?} (expected {expected})",
            r.client, r.n, r.outcome
        ));
    }
    (r.latency() > deadline).then(|| {
        format!(
            "client {} request {}: {:?} after {:?}, past {deadline:?}",
            r.client,
            r.n,
            r.outcome,
            r.latency()
        )
    })
}

/// Every reply is OK, 5 or 8 and came by `deadline` (the request timeout plus slack).
pub fn check_outcomes_and_deadlines(records: &[Record], deadline: Duration) {
    for r in records {
        if let Some(problem) = outcome_problem(r, deadline, false) {
            panic!("{problem}");
        }
    }
}

/// Every request sent at or after `t` succeeded: after a recovery nothing is turned away (an
/// Open breaker left over from an outage would answer error 8). `moment` names `t` in the
/// failure message.
pub fn check_all_ok_sent_after(records: &[Record], t: Instant, moment: &str) {
    let failed: Vec<&Record> = records
        .iter()
        .filter(|r| r.sent >= t && r.outcome != Outcome::Ok)
        .collect();
    assert!(
        failed.is_empty(),
        "{} requests sent after {moment} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
}

/// Starts the daemon in NATS mode on the servers `urls` (comma-separated), with the request
/// deadline `timeout_ms` and every other setting at its default, and waits until it has
/// connected.
pub fn start_nats_daemon(urls: &str, timeout_ms: u64) -> Daemon {
    let timeout = timeout_ms.to_string();
    let daemon = Daemon::start(&[
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", urls),
        ("CGW_IPC_TIMEOUT_MS", &timeout),
    ]);
    daemon::wait_until(
        "the daemon connects to NATS",
        Duration::from_secs(20),
        || nats_connected_count(&daemon) >= 1,
    );
    daemon
}

/// `N requests: a OK, b error 5, c error 8; slowest reply d`, for the test's output.
pub fn summary(records: &[Record]) -> String {
    let count = |o: Outcome| records.iter().filter(|r| r.outcome == o).count();
    format!(
        "{} requests: {} OK, {} error 5, {} error 8; slowest reply {:?}",
        records.len(),
        count(Outcome::Ok),
        count(Outcome::Error(5)),
        count(Outcome::Error(8)),
        records
            .iter()
            .map(Record::latency)
            .max()
            .unwrap_or_default()
    )
}

/// Sends SIGUSR1 and returns the `"event":"stats"` line the daemon logs for it, parsed.
pub fn stats(daemon: &Daemon) -> Value {
    try_stats(daemon, daemon::START_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// [`stats`] without the panic: `Err` if the signal fails or no new line comes within
/// `within`.
pub fn try_stats(daemon: &Daemon, within: Duration) -> Result<Value, String> {
    let before = stats_lines(&daemon.stderr()).len();
    daemon.try_signal(Signal::USR1)?;
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = stats_lines(&daemon.stderr()).into_iter().nth(before) {
            return Ok(line);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no stats line within {within:?} after SIGUSR1 to pid {}",
                daemon.pid()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn stats_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter(|l| l.contains("\"event\":\"stats\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// How many times the daemon has logged `"event":"nats_connected"` (once per connection
/// that completed its handshake).
pub fn nats_connected_count(daemon: &Daemon) -> usize {
    daemon
        .stderr()
        .matches("\"event\":\"nats_connected\"")
        .count()
}

/// The number of open file descriptors of process `pid` (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> usize {
    try_fd_count(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// [`fd_count`] without the panic (the process may be gone).
pub fn try_fd_count(pid: u32) -> Result<usize, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .map_err(|e| format!("reading /proc/{pid}/fd: {e}"))
}

/// The entries of /proc/PID/fd with what they point to, for a failure message.
pub fn fd_listing(pid: u32) -> String {
    let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    format!("{} -> {target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.join("\n")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The [`OkCheck`] for replies of the Router double (src/router_double.rs): a success
/// (`"ok":true`) whose `received.request` is the router-v1 envelope around the payload sent.
pub fn router_double_success() -> OkCheck {
    Arc::new(|sent, body| {
        if body["ok"] != Value::Bool(true) {
            return Err("not a success reply".to_owned());
        }
        let embedded = &body["received"]["request"]["task"]["payload"];
        if embedded != sent {
            return Err(format!(
                "the Router double answered a request for {embedded}"
            ));
        }
        Ok(())
    })
}
