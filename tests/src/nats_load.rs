//! What the NATS fault tests share: pipelined client load that records every reply, the
//! daemon's `stats` line (SIGUSR1) and its open file descriptors.
//!
//! [`Load`] runs N client connections, each on its own thread, each keeping up to `window`
//! requests outstanding (pipelined: written before the earlier replies are read). Replies come
//! in request order per connection (ipc-protocol.md), so reply k of a connection belongs to
//! request k; every reply is recorded with its request's send time. When the load stops, each
//! client reads the replies it still waits for and then sends a PING whose PONG must be the
//! very next frame: a reply beyond one per request would show up there. A client whose reply
//! does not come within [`crate::daemon::IO_TIMEOUT`] panics, which fails the test when
//! [`Load::stop`] joins it.
//!
//! Keep `window` at or below the daemon's per-connection in-flight limit (10 by default): the
//! daemon then reads every request as soon as it is written, so the send time recorded here
//! is (within scheduling noise) when the request's deadline started.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::Value;

use crate::daemon::{self, Daemon};
use crate::frame::{RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};

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

/// Checks a RESPONSE_OK body against the payload the client sent (the reply must be for that
/// request); `Err` says what is wrong.
pub type OkCheck = Arc<dyn Fn(&Value, &Value) -> Result<(), String> + Send + Sync>;

/// Pipelined load on N client connections; see the module documentation.
pub struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    oks: Arc<AtomicU64>,
    clients: Vec<JoinHandle<()>>,
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
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let oks = Arc::new(AtomicU64::new(0));
        let payload = Arc::new(payload);
        let clients = (0..clients)
            .map(|c| {
                let client = Client {
                    id: c,
                    socket: daemon.socket_path().to_path_buf(),
                    window,
                    pause,
                    stop: Arc::clone(&stop),
                    records: Arc::clone(&records),
                    oks: Arc::clone(&oks),
                    payload: Arc::clone(&payload) as Arc<dyn Fn(usize, u64) -> Value + Send + Sync>,
                    check: Arc::clone(&check),
                };
                thread::spawn(move || client.run())
            })
            .collect();
        Load {
            stop,
            records,
            oks,
            clients,
        }
    }

    /// OK replies so far.
    pub fn ok_count(&self) -> u64 {
        self.oks.load(Ordering::SeqCst)
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.records).clone()
    }

    /// The earliest OK reply received at or after `t`, if any yet.
    pub fn first_ok_after(&self, t: Instant) -> Option<Instant> {
        lock(&self.records)
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
    /// follows them. Returns every record; panics (re-raising) if a client failed.
    pub fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        let mut failed = Vec::new();
        for (c, client) in self.clients.into_iter().enumerate() {
            if let Err(e) = client.join() {
                let text = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failed.push(format!("client {c}: {text}"));
            }
        }
        assert!(
            failed.is_empty(),
            "load clients failed:\n{}",
            failed.join("\n")
        );
        let records = lock(&self.records).clone();
        records
    }
}

struct Client {
    id: usize,
    socket: PathBuf,
    window: usize,
    pause: Duration,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    oks: Arc<AtomicU64>,
    payload: Arc<dyn Fn(usize, u64) -> Value + Send + Sync>,
    check: OkCheck,
}

impl Client {
    fn run(self) {
        let mut stream: UnixStream = daemon::connect(&self.socket);
        let mut outstanding: VecDeque<(u64, Instant, Value)> = VecDeque::new();
        let mut next = 0u64;
        loop {
            if !self.stop.load(Ordering::SeqCst) && outstanding.len() < self.window {
                let payload = (self.payload)(self.id, next);
                daemon::send_json(&mut stream, TASK_SUBMIT, &payload);
                outstanding.push_back((next, Instant::now(), payload));
                next += 1;
                continue;
            }
            let Some((n, sent, payload)) = outstanding.pop_front() else {
                break;
            };
            let frame = daemon::recv(&mut stream);
            let answered = Instant::now();
            let outcome = match frame.kind {
                RESPONSE_OK => {
                    let body = frame.json();
                    if let Err(e) = (self.check)(&payload, &body) {
                        panic!("client {} request {n}: wrong OK reply: {e}\n  sent {payload}\n  got {body}", self.id);
                    }
                    Outcome::Ok
                }
                RESPONSE_ERROR => {
                    let code = frame.error_code().unwrap_or_else(|| {
                        panic!(
                            "client {} request {n}: error frame without a numeric code: {frame:?}",
                            self.id
                        )
                    });
                    daemon::expect_error(&frame, code);
                    Outcome::Error(code)
                }
                other => panic!(
                    "client {} request {n}: unexpected frame type {other:#04X}: {frame:?}",
                    self.id
                ),
            };
            lock(&self.records).push(Record {
                client: self.id,
                n,
                sent,
                answered,
                outcome,
            });
            if outcome == Outcome::Ok {
                self.oks.fetch_add(1, Ordering::SeqCst);
            }
            if !self.pause.is_zero() {
                thread::sleep(self.pause);
            }
        }
        // One reply per request: the frame after the last reply is the PONG.
        daemon::ping(&mut stream);
    }
}

/// Every reply is OK, 5 or 8 and came by `deadline` (the request timeout plus slack).
pub fn check_outcomes_and_deadlines(records: &[Record], deadline: Duration) {
    for r in records {
        assert!(
            matches!(
                r.outcome,
                Outcome::Ok | Outcome::Error(5) | Outcome::Error(8)
            ),
            "client {} request {}: {:?} (expected OK, 5 or 8)",
            r.client,
            r.n,
            r.outcome
        );
        assert!(
            r.latency() <= deadline,
            "client {} request {}: {:?} after {:?}, past {deadline:?}",
            r.client,
            r.n,
            r.outcome,
            r.latency()
        );
    }
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
    let before = stats_lines(&daemon.stderr()).len();
    daemon.signal(Signal::USR1);
    let mut line = None;
    daemon::wait_until("a stats line after SIGUSR1", daemon::START_TIMEOUT, || {
        let lines = stats_lines(&daemon.stderr());
        line = lines.get(before).cloned();
        line.is_some()
    });
    line.expect("set by the wait")
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
    try_fd_count(pid).unwrap_or_else(|| panic!("cannot read /proc/{pid}/fd (is {pid} running?)"))
}

/// [`fd_count`], `None` if the process is gone.
pub fn try_fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
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
