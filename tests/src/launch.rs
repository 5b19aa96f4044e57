//! Processes that the load tools start for themselves, reporting failures as errors rather
//! than panics: a `nats-server` on a free loopback port, an async-nats Router stand-in, the
//! daemon on a socket in its own temporary directory, and a meter of the CPU that each of them
//! uses. `ipc-gateway-bench --mode nats` and `ipc-gateway-stress` share them.

use std::io::{self, BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::StreamExt;
use rustix::process::{kill_process, Pid, Signal};

use crate::frame::{self, RESPONSE_OK, TASK_SUBMIT};

/// The Router's decide subject (router.md section 1), the daemon's default.
pub const SUBJECT: &str = "beamline.router.v1.decide";
/// The stand-in's subscriptions share this queue group: each request reaches one of them.
pub const STANDIN_QUEUE: &str = "bench-standin";
/// The stand-in's answer to every request: a Router success reply (router.md section 4).
pub const STANDIN_REPLY: &str = r#"{"ok":true,"decision":{"provider_id":"bench","priority":50,"expected_latency_ms":0,"expected_cost":0.0,"reason":"bench"},"context":{}}"#;
/// A client payload holding this text gets no reply from a stand-in started with
/// [`StandIn::start_with`] (the gateway times the request out).
pub const STANDIN_SILENT: &str = r#""standin":"silent""#;
/// A client payload holding this text is answered after the stand-in's `late` delay.
pub const STANDIN_LATE: &str = r#""standin":"late""#;
/// Thread names, by which the CPU of this process's parts is told apart in /proc.
pub const STANDIN_THREAD: &str = "standin";
/// How long nats-server and the daemon may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a child's stderr is kept for error messages.
const TAIL_BYTES: usize = 16 * 1024;

/// What a pipe-reading thread fills and others read.
pub type Shared<T> = Arc<Mutex<T>>;

/// Keeps the last [`TAIL_BYTES`] of a pipe, read on a thread until end of stream.
pub fn keep_tail(pipe: impl Read + Send + 'static) -> (Shared<Vec<u8>>, JoinHandle<()>) {
    let (tail, _, handle) = keep_tail_and_lines(pipe, |_| false);
    (tail, handle)
}

/// [`keep_tail`], and besides every whole line for which `keep` is true (for log lines that
/// a long run must not lose to the tail's limit).
pub fn keep_tail_and_lines(
    mut pipe: impl Read + Send + 'static,
    keep: fn(&str) -> bool,
) -> (Shared<Vec<u8>>, Shared<Vec<String>>, JoinHandle<()>) {
    let tail = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::new(Mutex::new(Vec::new()));
    let (sink, lines) = (Arc::clone(&tail), Arc::clone(&kept));
    let handle = thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    for piece in chunk[..n].split_inclusive(|&b| b == b'\n') {
                        line.extend_from_slice(piece);
                        if line.ends_with(b"\n") {
                            let text = String::from_utf8_lossy(&line);
                            if keep(&text) {
                                lock(&lines).push(text.trim_end().to_string());
                            }
                            line.clear();
                        }
                    }
                    let mut tail = lock(&sink);
                    tail.extend_from_slice(&chunk[..n]);
                    let excess = tail.len().saturating_sub(TAIL_BYTES);
                    tail.drain(..excess);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    (tail, kept, handle)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The text kept by [`keep_tail`].
pub fn tail_text(tail: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&lock(tail)).trim_end().to_string()
}

/// A loopback TCP port that nobody listened on a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Kills a child (if it still runs) and reaps it.
pub fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// `nats-server -a 127.0.0.1 -p PORT`, killed on drop. Not [`crate::nats_server::NatsServer`]:
/// that one panics on failure and takes its binary from the environment, where the load tools
/// report errors and take `--nats-server PATH`.
pub struct NatsProcess {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// What `nats-server --version` says.
    pub version: String,
}

impl NatsProcess {
    /// Starts `program` on a free loopback port and waits until it greets a client.
    pub fn start(program: &Path) -> Result<NatsProcess> {
        let version = Command::new(program)
            .arg("--version")
            .output()
            .map(|out| {
                let text = String::from_utf8_lossy(&out.stdout);
                text.trim()
                    .trim_start_matches("nats-server:")
                    .trim()
                    .to_string()
            })
            .with_context(|| {
                format!(
                    "cannot run {} (install the nats-server package, or pass --nats-server PATH)",
                    program.display()
                )
            })?;
        // The port is free when chosen but could be taken before the server binds it: retry.
        let mut last_error = anyhow!("no attempt");
        for _ in 0..5 {
            let port = free_port()?;
            let mut child = Command::new(program)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))?;
            let (tail, drain) = keep_tail(child.stderr.take().expect("piped stderr"));
            match wait_for_nats(&mut child, port) {
                Ok(()) => {
                    let url = format!("nats://127.0.0.1:{port}");
                    // The drain thread ends with the process.
                    drop(drain);
                    return Ok(NatsProcess {
                        child,
                        url,
                        version,
                    });
                }
                Err(e) => {
                    kill_and_reap(&mut child);
                    let _ = drain.join();
                    last_error = anyhow!("{e:#}; its stderr:\n{}", tail_text(&tail));
                }
            }
        }
        Err(last_error.context("nats-server did not start"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Waits until the server on `port` greets a client with INFO.
fn wait_for_nats(child: &mut Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("nats-server exited ({status})");
        }
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line)?;
            if line.starts_with("INFO ") {
                return Ok(());
            }
            bail!("port {port} answered {line:?}, not a NATS INFO");
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on port {port} after {READY_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What the stand-in saw on one of its connections.
#[derive(Default)]
pub struct StandInCounters {
    requests: AtomicU64,
    request_bytes: AtomicU64,
    with_headers: AtomicU64,
}

/// The counters of all stand-in connections at one moment.
#[derive(Debug, Clone, Default)]
pub struct StandInCount {
    pub per_conn: Vec<u64>,
    pub request_bytes: u64,
    pub with_headers: u64,
}

impl StandInCount {
    pub fn requests(&self) -> u64 {
        self.per_conn.iter().sum()
    }

    pub fn since(&self, before: &StandInCount) -> StandInCount {
        let per_conn = self.per_conn.iter().zip(&before.per_conn);
        StandInCount {
            per_conn: per_conn.map(|(a, b)| a - b).collect(),
            request_bytes: self.request_bytes - before.request_bytes,
            with_headers: self.with_headers - before.with_headers,
        }
    }
}

/// A request as the stand-in received it: payload and NATS headers.
pub type Captured = (Bytes, Option<async_nats::HeaderMap>);

/// The Router stand-in: `conns` async-nats connections on the stand-in runtime, each with one
/// subscription to the decide subject in one queue group, answering every request at once.
/// Its tasks run until the runtime shuts down. It keeps the first request that came with NATS
/// headers (the gateway's), for `--direct-envelope`.
pub struct StandIn {
    counters: Vec<Arc<StandInCounters>>,
    sample: Arc<Mutex<Option<Captured>>>,
}

/// Whether a request's bytes hold `marker`.
fn holds(payload: &[u8], marker: &str) -> bool {
    payload
        .windows(marker.len())
        .any(|w| w == marker.as_bytes())
}

impl StandIn {
    /// A stand-in that answers every request at once.
    pub async fn start(url: &str, conns: usize) -> Result<StandIn> {
        StandIn::start_with(url, conns, None).await
    }

    /// With `late: Some(delay)`, a stand-in that looks into each request: one holding
    /// [`STANDIN_SILENT`] is never answered, one holding [`STANDIN_LATE`] is answered after
    /// `delay` (from a task of its own), any other at once.
    pub async fn start_with(url: &str, conns: usize, late: Option<Duration>) -> Result<StandIn> {
        let reply = Bytes::from_static(STANDIN_REPLY.as_bytes());
        let mut counters = Vec::with_capacity(conns);
        let sample: Arc<Mutex<Option<Captured>>> = Arc::default();
        let sampled = Arc::new(AtomicBool::new(false));
        for k in 0..conns {
            let client = async_nats::ConnectOptions::new()
                .name(format!("bench-standin-{k}"))
                .connect(url)
                .await
                .with_context(|| format!("stand-in connection {k} to {url}"))?;
            let mut sub = client
                .queue_subscribe(SUBJECT, STANDIN_QUEUE.to_string())
                .await
                .context("stand-in subscription")?;
            // The subscription is in place at the server before any request is sent.
            client.flush().await.context("stand-in flush")?;
            let count = Arc::new(StandInCounters::default());
            let (answer, seen, reply) = (client, Arc::clone(&count), reply.clone());
            let (sample, sampled) = (Arc::clone(&sample), Arc::clone(&sampled));
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    seen.requests.fetch_add(1, Ordering::Relaxed);
                    let size = msg.payload.len() as u64;
                    seen.request_bytes.fetch_add(size, Ordering::Relaxed);
                    if msg.headers.is_some() {
                        seen.with_headers.fetch_add(1, Ordering::Relaxed);
                        if !sampled.swap(true, Ordering::Relaxed) {
                            let mut sample = sample.lock().unwrap_or_else(PoisonError::into_inner);
                            *sample = Some((msg.payload.clone(), msg.headers.clone()));
                        }
                    }
                    let Some(inbox) = msg.reply else { continue };
                    if let Some(delay) = late {
                        if holds(&msg.payload, STANDIN_SILENT) {
                            continue;
                        }
                        if holds(&msg.payload, STANDIN_LATE) {
                            let (answer, reply) = (answer.clone(), reply.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = answer.publish(inbox, reply).await;
                            });
                            continue;
                        }
                    }
                    if answer.publish(inbox, reply.clone()).await.is_err() {
                        return;
                    }
                }
            });
            counters.push(count);
        }
        Ok(StandIn { counters, sample })
    }

    /// The first request that came with NATS headers.
    pub fn sample(&self) -> Option<Captured> {
        let sample = self.sample.lock().unwrap_or_else(PoisonError::into_inner);
        sample.clone()
    }

    /// Requests seen so far.
    pub fn count(&self) -> StandInCount {
        let mut count = StandInCount::default();
        for c in &self.counters {
            count.per_conn.push(c.requests.load(Ordering::Relaxed));
            count.request_bytes += c.request_bytes.load(Ordering::Relaxed);
            count.with_headers += c.with_headers.load(Ordering::Relaxed);
        }
        count
    }
}

/// The daemon, on a socket in its own temporary directory; killed on drop.
pub struct GatewayDaemon {
    child: Child,
    socket: PathBuf,
    stderr: Shared<Vec<u8>>,
    /// Log lines kept whole however long the run (see [`GatewayDaemon::kept_lines`]).
    kept: Shared<Vec<String>>,
    _dir: tempfile::TempDir,
}

/// The `CGW_*` settings that point the daemon at a NATS server.
pub fn nats_env(url: &str) -> Vec<(String, String)> {
    [
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", url),
        ("CGW_IPC_ROUTER_SUBJECT", SUBJECT),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// Connection and in-flight limits high enough that `connections` clients with `pipeline`
/// requests each in flight are all admitted: for loads where the limits must not be what is
/// measured.
pub fn admit_all_env(connections: usize, pipeline: usize) -> Vec<(String, String)> {
    let inflight_per_conn = pipeline.max(10);
    let inflight = (connections * inflight_per_conn).max(1000);
    vec![
        (
            "CGW_IPC_MAX_CONNECTIONS".to_string(),
            (connections + 8).max(64).to_string(),
        ),
        ("CGW_IPC_MAX_INFLIGHT".to_string(), inflight.to_string()),
        (
            "CGW_IPC_MAX_INFLIGHT_PER_CONN".to_string(),
            inflight_per_conn.to_string(),
        ),
    ]
}

/// The daemon's log lines that [`GatewayDaemon`] keeps whole: `stats` (SIGUSR1), `fd_limit`
/// and every error.
fn kept_log_line(line: &str) -> bool {
    line.contains(r#""event":"stats""#)
        || line.contains(r#""event":"http_listening""#)
        || line.contains(r#""event":"fd_limit""#)
        || line.contains(r#""level":"ERROR""#)
}

impl GatewayDaemon {
    /// Starts the daemon `bin` with `env` (after removing every inherited `CGW_*` variable;
    /// `CGW_HTTP_ADDR` is `off` unless `env` sets it) and waits until a TASK_SUBMIT with
    /// `probe` as payload gets RESPONSE_OK (so, in NATS mode, NATS is connected and the
    /// Router answers).
    pub fn start(bin: &Path, env: &[(String, String)], probe: &[u8]) -> Result<GatewayDaemon> {
        if !bin.is_file() {
            bail!(
                "no daemon executable at {}: build it with `cargo build --release -p \
                 ipc-gateway`, or pass --gateway-bin PATH",
                bin.display()
            );
        }
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let socket = dir.path().join("gw.sock");
        let mut cmd = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CGW_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.env("CGW_IPC_SOCKET_PATH", &socket)
            .env("CGW_HTTP_ADDR", "off")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pipe = child.stderr.take().expect("piped stderr");
        let (stderr, kept, _drain) = keep_tail_and_lines(pipe, kept_log_line);
        let mut daemon = GatewayDaemon {
            child,
            socket,
            stderr,
            kept,
            _dir: dir,
        };
        if let Err(e) = daemon.wait_ready(probe) {
            kill_and_reap(&mut daemon.child);
            let stderr = tail_text(&daemon.stderr);
            bail!("{e:#}\n--- daemon stderr (tail) ---\n{stderr}\n---");
        }
        Ok(daemon)
    }

    fn wait_ready(&mut self, probe: &[u8]) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited at start ({})", describe_status(status));
            }
            match self.probe(probe) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => bail!(
                    "the daemon did not answer a TASK_SUBMIT with RESPONSE_OK within \
                     {READY_TIMEOUT:?}: {e:#}"
                ),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// One TASK_SUBMIT on a fresh connection; Ok if the reply is RESPONSE_OK.
    fn probe(&self, payload: &[u8]) -> Result<()> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        frame::write_frame(&mut stream, TASK_SUBMIT, payload)?;
        match frame::read_frame(&mut stream)? {
            Some(reply) if reply.kind == RESPONSE_OK => Ok(()),
            Some(reply) => bail!(
                "probe reply type 0x{:02X}: {}",
                reply.kind,
                String::from_utf8_lossy(&reply.payload)
            ),
            None => bail!("the daemon closed the probe connection"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket the daemon listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The last lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        tail_text(&self.stderr)
    }

    /// Every `stats`, `fd_limit`, `http_listening` and error line it logged so far.
    pub fn kept_lines(&self) -> Vec<String> {
        lock(&self.kept).clone()
    }

    /// The address of its HTTP endpoints, from the `http_listening` log line (start it with
    /// `CGW_HTTP_ADDR` set, e.g. `127.0.0.1:0`); waits for the line up to [`READY_TIMEOUT`].
    pub fn http_addr(&self) -> Result<std::net::SocketAddr> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let found = lock(&self.kept).iter().find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                if v["event"] != "http_listening" {
                    return None;
                }
                v["addr"].as_str()?.parse().ok()
            });
            if let Some(addr) = found {
                return Ok(addr);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no http_listening log line within {READY_TIMEOUT:?} (is CGW_HTTP_ADDR set?)"
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGUSR1 and returns the `stats` line the daemon logs for it, parsed.
    pub fn stats(&self) -> Result<serde_json::Value> {
        let is_stats = |l: &&String| l.contains(r#""event":"stats""#);
        let before = lock(&self.kept).iter().filter(is_stats).count();
        kill_process(Pid::from_child(&self.child), Signal::USR1).context("kill -USR1")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(line) = lock(&self.kept).iter().filter(is_stats).nth(before) {
                return serde_json::from_str(line).context("the stats line is not JSON");
            }
            if Instant::now() >= deadline {
                bail!("no stats line within {READY_TIMEOUT:?} of SIGUSR1");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> String {
        let pid = Pid::from_child(&self.child);
        if kill_process(pid, Signal::TERM).is_err() {
            kill_and_reap(&mut self.child);
            return "killed".to_string();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return describe_status(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        kill_and_reap(&mut self.child);
        format!("still running {STOP_TIMEOUT:?} after SIGTERM: killed")
    }
}

impl Drop for GatewayDaemon {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

pub fn describe_status(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

/// CPU time (user + system, in clock ticks) of processes and of groups of this process's
/// threads, from /proc.
pub struct CpuMeter {
    ticks_per_second: f64,
    nats_pid: Option<u32>,
    daemon_pid: Option<u32>,
}

/// What [`CpuMeter::snapshot`] read; two of them give a [`CpuUse`].
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    at: Instant,
    nats: u64,
    daemon: u64,
    bench: u64,
    standin: u64,
    /// Every process of the machine (/proc/stat), to see how much others took.
    machine: u64,
}

/// Cores kept busy, on average, between two snapshots.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    pub daemon: Option<f64>,
    pub nats: f64,
    pub standin: f64,
    /// The load generator: the rest of this process (IPC client threads or direct runtime).
    pub client: f64,
    /// Every process of the machine, these included.
    pub machine: f64,
    /// Between the two snapshots.
    pub seconds: f64,
}

impl CpuUse {
    pub fn total(&self) -> f64 {
        self.daemon.unwrap_or(0.0) + self.nats + self.standin + self.client
    }

    /// What processes outside this run took.
    pub fn others(&self) -> f64 {
        (self.machine - self.total()).max(0.0)
    }
}

/// Busy ticks of all CPUs together, from the first line of /proc/stat.
fn machine_busy_ticks() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    at(0) + at(1) + at(2) + at(5) + at(6) + at(7)
}

/// utime + stime of a /proc/.../stat file, and the command name in it.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let mut fields = text.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((name, utime + stime))
}

/// CPU ticks of this process's live threads whose name starts with `prefix`.
fn own_threads_ticks(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let path = format!("{}/stat", task.path().display());
            let (name, ticks) = stat_ticks(&path)?;
            name.starts_with(prefix).then_some(ticks)
        })
        .sum()
}

impl CpuMeter {
    /// A meter of nats-server (if any), the daemon (if any), this process, the stand-in
    /// threads in it and the whole machine.
    pub fn new(nats_pid: Option<u32>, daemon_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            ticks_per_second: rustix::param::clock_ticks_per_second() as f64,
            nats_pid,
            daemon_pid,
        }
    }

    pub fn snapshot(&self) -> CpuSnapshot {
        let process = |pid: Option<u32>| {
            pid.and_then(|pid| stat_ticks(&format!("/proc/{pid}/stat")))
                .map_or(0, |(_, t)| t)
        };
        CpuSnapshot {
            at: Instant::now(),
            nats: process(self.nats_pid),
            daemon: process(self.daemon_pid),
            // The whole process, threads that already ended included.
            bench: stat_ticks("/proc/self/stat").map_or(0, |(_, t)| t),
            standin: own_threads_ticks(STANDIN_THREAD),
            machine: machine_busy_ticks(),
        }
    }

    pub fn between(&self, a: &CpuSnapshot, b: &CpuSnapshot) -> CpuUse {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let cores = |x: u64, y: u64| y.saturating_sub(x) as f64 / self.ticks_per_second / secs;
        let standin = cores(a.standin, b.standin);
        CpuUse {
            daemon: self.daemon_pid.map(|_| cores(a.daemon, b.daemon)),
            nats: cores(a.nats, b.nats),
            standin,
            client: (cores(a.bench, b.bench) - standin).max(0.0),
            machine: cores(a.machine, b.machine),
            seconds: secs,
        }
    }
}
