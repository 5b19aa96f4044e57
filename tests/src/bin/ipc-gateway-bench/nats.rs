//! `--mode nats`: the gateway's NATS path against plain async-nats request-reply, in one run.
//!
//! The bench starts everything itself: a `nats-server` on a free loopback port, a Router
//! stand-in (async-nats on its own tokio runtime and threads: `--standin-conns` connections in
//! one queue group, each answering every request with a fixed Router success reply), and the
//! daemon with `CGW_IPC_NATS_ENABLE=1` pointed at that server. Then, for each `--pipeline`
//! setting, `--repeat` times:
//!
//! - `gateway`: the usual IPC load (N connections, each keeping P TASK_SUBMIT frames in flight)
//!   through the daemon, which wraps each payload in a Router envelope and publishes it with a
//!   reply inbox;
//! - `direct`: N async-nats clients, each keeping P `request()` calls in flight with the same
//!   JSON payload, to the same stand-in through the same server;
//! - with `--direct-envelope`, `direct-env`: the direct load again, but every request is the
//!   one the gateway publishes (its Router envelope and NATS headers, captured by the
//!   stand-in), which splits the gap into "a larger request" and "the hop through the daemon".
//!
//! Both runs use the same window rules as stub mode (warmup, measured window, 2 s to drain).
//! Every run reports the CPU that each process used, so that the limit can be seen: on a small
//! machine the four parties (load generator, daemon, nats-server, stand-in) share the cores.

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
use futures::stream::{FuturesUnordered, StreamExt};
use rustix::process::{kill_process, Pid, Signal};
use tokio::runtime::Runtime;

use super::{
    bench_payload, frame, kernel_release, new_histogram, print_counts, print_memory,
    print_run_notes, ratio, run_load, usage_error, Args, ConnOutcome, Load, RunResult, Window,
    DRAIN_GRACE, GATEWAY, HEADER_LEN, RESPONSE_OK, SINGLE_THREAD_MAX_BYTES, TASK_SUBMIT,
};

/// The Router's decide subject (router.md section 1), the daemon's default.
const SUBJECT: &str = "beamline.router.v1.decide";
/// The name of the direct runs, as printed in the results.
const DIRECT: &str = "direct";
/// The direct runs that send the gateway's own request (`--direct-envelope`).
const DIRECT_ENV: &str = "direct-env";
/// The stand-in's subscriptions share this queue group: each request reaches one of them.
const STANDIN_QUEUE: &str = "bench-standin";
/// The stand-in's answer to every request: a Router success reply (router.md section 4).
const STANDIN_REPLY: &str = r#"{"ok":true,"decision":{"provider_id":"bench","priority":50,"expected_latency_ms":0,"expected_cost":0.0,"reason":"bench"},"context":{}}"#;
/// Thread names, by which the CPU of this process's parts is told apart in /proc.
const STANDIN_THREAD: &str = "standin";
const DIRECT_THREAD: &str = "direct-nats";
/// How long nats-server and the daemon may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a child's stderr is kept for error messages.
const TAIL_BYTES: usize = 16 * 1024;

/// Options of `--mode nats`. All are optional so that stub mode can refuse them.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "NATS mode (--mode nats)")]
pub(super) struct NatsArgs {
    /// The nats-server executable, started on a free loopback port and killed at the end
    /// [default: nats-server, from PATH].
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,

    /// The daemon executable [default: ipc-gateway in the directory of this bench's
    /// executable; build it with `cargo build --release -p ipc-gateway`].
    #[arg(long, value_name = "PATH")]
    gateway_bin: Option<PathBuf>,

    /// NATS connections of the Router stand-in, one subscription each in one queue group
    /// [default: 2].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=64))]
    standin_conns: Option<u32>,

    /// Worker threads of the stand-in's tokio runtime [default: 1].
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..=64))]
    standin_threads: Option<u32>,

    /// Worker threads of the tokio runtime that drives the direct clients [default: 1].
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..=64))]
    direct_threads: Option<u32>,

    /// Runs of each setting, gateway then direct each time [default: 1].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: Option<u32>,

    /// Run the direct path only: no daemon is started.
    #[arg(long)]
    direct_only: bool,

    /// After each direct run, run "direct-env": the same direct load, but each request is the
    /// gateway's own (its Router envelope and NATS headers, as the stand-in received it).
    /// Against "direct" it is the cost of the larger request; against "gateway" it is the cost
    /// of the hop through the daemon alone.
    #[arg(long, conflicts_with = "direct_only")]
    direct_envelope: bool,
}

impl NatsArgs {
    /// The NATS options given on the command line, by flag.
    fn given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut note = |set: bool, flag| {
            if set {
                given.push(flag);
            }
        };
        note(self.nats_server.is_some(), "--nats-server");
        note(self.gateway_bin.is_some(), "--gateway-bin");
        note(self.standin_conns.is_some(), "--standin-conns");
        note(self.standin_threads.is_some(), "--standin-threads");
        note(self.direct_threads.is_some(), "--direct-threads");
        note(self.repeat.is_some(), "--repeat");
        note(self.direct_only, "--direct-only");
        note(self.direct_envelope, "--direct-envelope");
        given
    }
}

/// Stub mode takes none of the NATS options.
pub(super) fn reject_nats_options(args: &Args) {
    let given = args.nats.given();
    if !given.is_empty() {
        let verb = if given.len() == 1 { "applies" } else { "apply" };
        usage_error(&format!("{} only {verb} to --mode nats", given.join(", ")));
    }
}

/// The NATS-mode settings, defaults resolved.
struct Settings {
    pipelines: Vec<usize>,
    repeat: u32,
    nats_server: PathBuf,
    gateway_bin: Option<PathBuf>,
    standin_conns: usize,
    standin_threads: usize,
    direct_threads: usize,
}

fn settings(args: &Args) -> Result<Settings> {
    for (set, flag) in [
        (args.echo_only, "--echo-only"),
        (args.echo_first, "--echo-first"),
        (args.pid.is_some(), "--pid"),
    ] {
        if set {
            usage_error(&format!(
                "{flag} does not apply to --mode nats (no echo floors; the bench starts the \
                 daemon itself)"
            ));
        }
    }
    let n = &args.nats;
    let gateway_bin = if n.direct_only {
        None
    } else if let Some(bin) = &n.gateway_bin {
        Some(bin.clone())
    } else {
        let exe = std::env::current_exe().context("cannot find this bench's executable")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
        Some(dir.join("ipc-gateway"))
    };
    let pipelines = match &args.pipeline {
        Some(list) => list.iter().map(|&p| p as usize).collect(),
        None => vec![1, 16],
    };
    Ok(Settings {
        pipelines,
        repeat: n.repeat.unwrap_or(1),
        nats_server: n
            .nats_server
            .clone()
            .unwrap_or_else(|| "nats-server".into()),
        gateway_bin,
        standin_conns: n.standin_conns.unwrap_or(2) as usize,
        standin_threads: n.standin_threads.unwrap_or(1) as usize,
        direct_threads: n.direct_threads.unwrap_or(1) as usize,
    })
}

/// Keeps the last [`TAIL_BYTES`] of a pipe, read on a thread until end of stream.
fn keep_tail(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let tail = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&tail);
    let handle = thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let mut tail = sink.lock().unwrap_or_else(PoisonError::into_inner);
                    tail.extend_from_slice(&chunk[..n]);
                    let excess = tail.len().saturating_sub(TAIL_BYTES);
                    tail.drain(..excess);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    (tail, handle)
}

fn tail_text(tail: &Mutex<Vec<u8>>) -> String {
    let tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
    String::from_utf8_lossy(&tail).trim_end().to_string()
}

/// A loopback TCP port that nobody listened on a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Kills a child (if it still runs) and reaps it.
fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// `nats-server -a 127.0.0.1 -p PORT`, killed on drop. Not the test library's
/// `nats_server::NatsServer`: that one panics on failure and takes its binary from the
/// environment, where the bench reports errors and takes `--nats-server PATH`.
struct NatsServer {
    child: Child,
    url: String,
    version: String,
}

impl NatsServer {
    fn start(program: &Path) -> Result<NatsServer> {
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
                    return Ok(NatsServer {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
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
struct StandInCounters {
    requests: AtomicU64,
    request_bytes: AtomicU64,
    with_headers: AtomicU64,
}

/// The counters of all stand-in connections at one moment.
#[derive(Debug, Clone, Default)]
struct StandInCount {
    per_conn: Vec<u64>,
    request_bytes: u64,
    with_headers: u64,
}

impl StandInCount {
    fn requests(&self) -> u64 {
        self.per_conn.iter().sum()
    }

    fn since(&self, before: &StandInCount) -> StandInCount {
        let per_conn = self.per_conn.iter().zip(&before.per_conn);
        StandInCount {
            per_conn: per_conn.map(|(a, b)| a - b).collect(),
            request_bytes: self.request_bytes - before.request_bytes,
            with_headers: self.with_headers - before.with_headers,
        }
    }
}

/// A request as the stand-in received it: payload and NATS headers.
type Captured = (Bytes, Option<async_nats::HeaderMap>);

/// The Router stand-in: `conns` async-nats connections on the stand-in runtime, each with one
/// subscription to the decide subject in one queue group, answering every request at once.
/// Its tasks run until the runtime shuts down. It keeps the first request that came with NATS
/// headers (the gateway's), for `--direct-envelope`.
struct StandIn {
    counters: Vec<Arc<StandInCounters>>,
    sample: Arc<Mutex<Option<Captured>>>,
}

impl StandIn {
    async fn start(url: &str, conns: usize) -> Result<StandIn> {
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
                    if let Some(inbox) = msg.reply {
                        if answer.publish(inbox, reply.clone()).await.is_err() {
                            return;
                        }
                    }
                }
            });
            counters.push(count);
        }
        Ok(StandIn { counters, sample })
    }

    /// The first request that came with NATS headers.
    fn sample(&self) -> Option<Captured> {
        let sample = self.sample.lock().unwrap_or_else(PoisonError::into_inner);
        sample.clone()
    }

    fn count(&self) -> StandInCount {
        let mut count = StandInCount::default();
        for c in &self.counters {
            count.per_conn.push(c.requests.load(Ordering::Relaxed));
            count.request_bytes += c.request_bytes.load(Ordering::Relaxed);
            count.with_headers += c.with_headers.load(Ordering::Relaxed);
        }
        count
    }
}

/// The daemon in NATS mode, on a socket in its own temporary directory; killed on drop.
struct GatewayDaemon {
    child: Child,
    socket: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
    _dir: tempfile::TempDir,
}

impl GatewayDaemon {
    /// Starts the daemon and waits until a TASK_SUBMIT through it gets RESPONSE_OK (so NATS is
    /// connected and the stand-in answers).
    fn start(bin: &Path, url: &str, connections: usize, pipeline: usize) -> Result<GatewayDaemon> {
        if !bin.is_file() {
            bail!(
                "no daemon executable at {}: build it with `cargo build --release -p \
                 ipc-gateway`, or pass --gateway-bin PATH (or --direct-only)",
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
        // The limits must not be what is measured: every request of the load is admitted.
        let inflight_per_conn = pipeline.max(10);
        let inflight = (connections * inflight_per_conn).max(1000);
        cmd.env("CGW_IPC_SOCKET_PATH", &socket)
            .env("CGW_HTTP_ADDR", "off")
            .env("CGW_IPC_NATS_ENABLE", "1")
            .env("CGW_IPC_NATS_URL", url)
            .env("CGW_IPC_ROUTER_SUBJECT", SUBJECT)
            .env(
                "CGW_IPC_MAX_CONNECTIONS",
                (connections + 8).max(64).to_string(),
            )
            .env("CGW_IPC_MAX_INFLIGHT", inflight.to_string())
            .env(
                "CGW_IPC_MAX_INFLIGHT_PER_CONN",
                inflight_per_conn.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let (stderr, _drain) = keep_tail(child.stderr.take().expect("piped stderr"));
        let mut daemon = GatewayDaemon {
            child,
            socket,
            stderr,
            _dir: dir,
        };
        if let Err(e) = daemon.wait_ready() {
            kill_and_reap(&mut daemon.child);
            let stderr = tail_text(&daemon.stderr);
            bail!("{e:#}\n--- daemon stderr (tail) ---\n{stderr}\n---");
        }
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited at start ({})", describe_status(status));
            }
            match self.probe() {
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
    fn probe(&self) -> Result<()> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let payload = bench_payload(256)?;
        frame::write_frame(&mut stream, TASK_SUBMIT, &payload)?;
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited after [`STOP_TIMEOUT`].
    fn stop(mut self) -> String {
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

fn describe_status(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

/// CPU time (user + system, in clock ticks) of processes and of groups of this process's
/// threads, from /proc.
struct CpuMeter {
    ticks_per_second: f64,
    nats_pid: u32,
    daemon_pid: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
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
struct CpuUse {
    daemon: Option<f64>,
    nats: f64,
    standin: f64,
    /// The load generator: the rest of this process (IPC client threads or direct runtime).
    client: f64,
    /// Every process of the machine, these included.
    machine: f64,
    /// Between the two snapshots.
    seconds: f64,
}

impl CpuUse {
    fn total(&self) -> f64 {
        self.daemon.unwrap_or(0.0) + self.nats + self.standin + self.client
    }

    /// What processes outside this run took.
    fn others(&self) -> f64 {
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
    fn snapshot(&self) -> CpuSnapshot {
        let process = |pid: Option<u32>| {
            pid.and_then(|pid| stat_ticks(&format!("/proc/{pid}/stat")))
                .map_or(0, |(_, t)| t)
        };
        CpuSnapshot {
            at: Instant::now(),
            nats: process(Some(self.nats_pid)),
            daemon: process(self.daemon_pid),
            // The whole process, threads that already ended included.
            bench: stat_ticks("/proc/self/stat").map_or(0, |(_, t)| t),
            standin: own_threads_ticks(STANDIN_THREAD),
            machine: machine_busy_ticks(),
        }
    }

    fn between(&self, a: &CpuSnapshot, b: &CpuSnapshot) -> CpuUse {
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

/// Counts one reply (or request error) of a direct client, as `ConnOutcome::record` does for
/// frames.
fn record_request(
    out: &mut ConnOutcome,
    reply: &Result<async_nats::Message, async_nats::RequestError>,
    written: Instant,
    now: Instant,
    w: &Window,
) {
    out.record_with(
        reply.is_ok(),
        || match reply {
            Ok(_) => "reply".to_string(),
            Err(e) => format!("request error: {}", e.kind()),
        },
        written,
        now,
        w,
    );
}

/// One direct client: P `request()` calls in flight until the end of the window, then the
/// replies still owed, until [`DRAIN_GRACE`] after the end. Returns whether it was cut off.
async fn drive_direct(
    client: async_nats::Client,
    request: Captured,
    pipeline: usize,
    w: Window,
    mut out: ConnOutcome,
) -> (ConnOutcome, bool) {
    let client = &client;
    let (payload, headers) = (&request.0, &request.1);
    let request = || async move {
        let written = Instant::now();
        let reply = match headers {
            Some(h) => {
                let (h, payload) = (h.clone(), payload.clone());
                client.request_with_headers(SUBJECT, h, payload).await
            }
            None => client.request(SUBJECT, payload.clone()).await,
        };
        (written, reply)
    };
    let mut inflight = FuturesUnordered::new();
    for _ in 0..pipeline {
        inflight.push(request());
    }
    let deadline = tokio::time::Instant::from_std(w.end + DRAIN_GRACE);
    let mut sending = true;
    loop {
        let (written, reply) = match tokio::time::timeout_at(deadline, inflight.next()).await {
            Ok(Some(done)) => done,
            Ok(None) => return (out, false),
            Err(_) => {
                out.unanswered = inflight.len() as u64;
                return (out, true);
            }
        };
        let now = Instant::now();
        record_request(&mut out, &reply, written, now, &w);
        if let Err(e) = &reply {
            if e.kind() == async_nats::RequestErrorKind::Other {
                // The client or its connection failed: stop, as an IPC connection does.
                out.fail(&format!("request failed ({e})"), &w);
                sending = false;
            }
        }
        if sending && now >= w.end {
            sending = false;
        }
        if sending {
            inflight.push(request());
        }
    }
}

/// The direct path: N fresh async-nats clients on `rt`, each driven by one task sending
/// `request` (payload and headers) again and again.
fn run_direct(
    target: &'static str,
    rt: &Runtime,
    url: &str,
    load: &Load,
    request: &Captured,
) -> Result<RunResult> {
    let clients = rt.block_on(async {
        let mut clients = Vec::with_capacity(load.connections);
        for i in 0..load.connections {
            let client = async_nats::ConnectOptions::new()
                .name(format!("bench-direct-{i}"))
                .connect(url)
                .await
                .with_context(|| format!("direct client {i} cannot connect to {url}"))?;
            clients.push(client);
        }
        Ok::<_, anyhow::Error>(clients)
    })?;
    let mut hists = Vec::with_capacity(clients.len());
    for _ in 0..clients.len() {
        hists.push(new_histogram()?);
    }
    let window = Window::starting_now(load);
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(hists)
        .map(|(client, hist)| {
            let out = ConnOutcome::new(hist);
            rt.spawn(drive_direct(
                client,
                request.clone(),
                load.pipeline,
                window,
                out,
            ))
        })
        .collect();
    let outcomes = rt.block_on(futures::future::join_all(tasks));

    let mut result = RunResult {
        target,
        address: url.to_string(),
        latencies: new_histogram()?,
        ok: 0,
        errors: Default::default(),
        failures: Vec::new(),
        stalled: Vec::new(),
        unanswered: 0,
        seconds: load.duration.as_secs_f64(),
    };
    for (i, joined) in outcomes.into_iter().enumerate() {
        let Ok((outcome, cut_off)) = joined else {
            result
                .failures
                .push(format!("client {i}: its task panicked"));
            continue;
        };
        result.absorb(&format!("client {i}"), &outcome)?;
        if cut_off {
            result.stalled.push(format!(
                "client {i}: {} replies still missing {} s after the end",
                outcome.unanswered,
                DRAIN_GRACE.as_secs()
            ));
        }
    }
    Ok(result)
}

/// One measured run and what was around it.
struct NatsRun {
    pipeline: usize,
    repeat: u32,
    result: RunResult,
    cpu: CpuUse,
    standin: StandInCount,
}

impl NatsRun {
    /// CPU time per request (µs) of a share of cores: the stand-in answered every request of
    /// the run, warmup and drain included, over the same span as the CPU figures.
    fn per_request(&self, cores: f64) -> Option<f64> {
        let answered = self.standin.requests();
        (answered > 0).then(|| cores * self.cpu.seconds * 1e6 / answered as f64)
    }

    /// All the run's own processes together, µs of CPU per request.
    fn cpu_us_per_request(&self) -> Option<f64> {
        self.per_request(self.cpu.total())
    }
}

fn print_run(run: &NatsRun, connections: usize, repeats: u32) {
    let r = &run.result;
    let (p, rep) = (run.pipeline, run.repeat);
    println!();
    let of = if repeats > 1 {
        format!(", run {rep} of {repeats}")
    } else {
        String::new()
    };
    println!(
        "== {} ({}), {connections} connections x {p} in flight{of} ==",
        r.target, r.address
    );
    print_counts(r, "successful replies");
    let [p50, p90, p99, p999, max] = r.latency_us();
    let c = &run.cpu;
    let daemon = c
        .daemon
        .map_or(String::new(), |d| format!("daemon {d:.2}, "));
    println!(
        "  CPU (cores)    {daemon}nats-server {:.2}, stand-in {:.2}, load generator {:.2}; \
         sum {:.2}; other processes {:.2} (whole run, warmup included)",
        c.nats,
        c.standin,
        c.client,
        c.total(),
        c.others()
    );
    if let Some(total) = run.cpu_us_per_request() {
        let us = |cores: f64| run.per_request(cores).unwrap_or(0.0);
        let daemon = c
            .daemon
            .map_or(String::new(), |d| format!("daemon {:.1}, ", us(d)));
        println!(
            "  CPU us/request {daemon}nats-server {:.1}, stand-in {:.1}, load generator {:.1}; \
             sum {total:.1}",
            us(c.nats),
            us(c.standin),
            us(c.client)
        );
    }
    let s = &run.standin;
    let requests = s.requests();
    let mean = s.request_bytes.checked_div(requests).unwrap_or(0);
    let per_conn: Vec<String> = s.per_conn.iter().map(u64::to_string).collect();
    println!(
        "  stand-in       {requests} requests answered (per connection: {}), {mean} bytes of \
         payload each on average, {} with NATS headers",
        per_conn.join(" / "),
        s.with_headers
    );
    print_run_notes(r);
    let daemon_cpu = c
        .daemon
        .map_or(String::new(), |d| format!(" cpu_daemon={d:.2}"));
    let per_request = run.cpu_us_per_request().unwrap_or(0.0);
    println!(
        "RESULT mode=nats target={} connections={connections} pipeline={p} run={rep} rps={:.1} \
         requests={} errors={} p50_us={p50} p90_us={p90} p99_us={p99} p999_us={p999} \
         max_us={max}{daemon_cpu} cpu_nats={:.2} cpu_standin={:.2} cpu_client={:.2} \
         cpu_others={:.2} cpu_us_per_request={per_request:.1}",
        r.target,
        r.rps(),
        r.ok,
        r.error_count(),
        c.nats,
        c.standin,
        c.client,
        c.others(),
    );
}

/// What the gateway publishes for one TASK_SUBMIT, as the stand-in received it.
fn print_captured(sample: Option<&Captured>) {
    const SHOW: usize = 600;
    let Some((payload, headers)) = sample else {
        println!("  (the stand-in received no request with NATS headers from the gateway)");
        return;
    };
    let text = String::from_utf8_lossy(payload);
    let shown: String = text.chars().take(SHOW).collect();
    let more = if shown.len() < text.len() { "..." } else { "" };
    println!(
        "  the gateway's NATS request, as the stand-in received it: {} bytes of payload",
        payload.len()
    );
    println!("    {shown}{more}");
    if let Some(headers) = headers {
        let mut list: Vec<String> = headers
            .iter()
            .map(|(name, values)| {
                let values: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
                format!("{name}: {}", values.join(", "))
            })
            .collect();
        list.sort();
        println!("    headers: {}", list.join("; "));
    }
}

/// min–max of some figures, as text.
fn range(values: &[f64], decimals: usize) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.is_empty() {
        "n/a".to_string()
    } else if values.len() == 1 || lo == hi {
        format!("{lo:.decimals$}")
    } else {
        format!("{lo:.decimals$}-{hi:.decimals$}")
    }
}

/// The table of every run, then per setting the ranges and the gateway/direct ratios.
fn print_summary(runs: &[NatsRun], connections: usize, pipelines: &[usize]) {
    println!();
    println!(
        "{:<8} {:>4} {:<10} {:>12} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10}",
        "setting",
        "run",
        "target",
        "requests/s",
        "p50_us",
        "p99_us",
        "p99.9_us",
        "max_us",
        "errors",
        "cpu_us/req"
    );
    for run in runs {
        let r = &run.result;
        let [p50, _, p99, p999, max] = r.latency_us();
        let cpu = run
            .cpu_us_per_request()
            .map_or("n/a".to_string(), |c| format!("{c:.1}"));
        println!(
            "{:<8} {:>4} {:<10} {:>12.1} {p50:>8} {p99:>8} {p999:>8} {max:>8} {:>7} {cpu:>10}",
            format!("{connections}x{}", run.pipeline),
            run.repeat,
            r.target,
            r.rps(),
            r.error_count()
        );
    }
    for &p in pipelines {
        println!();
        let setting = format!("{connections}x{p}");
        let of = |target: &str| -> Vec<&NatsRun> {
            let same = |run: &&NatsRun| run.pipeline == p && run.result.target == target;
            runs.iter().filter(same).collect()
        };
        let rps = |v: &[&NatsRun]| v.iter().map(|r| r.result.rps()).collect::<Vec<_>>();
        let pct =
            |v: &[&NatsRun], q: f64| v.iter().map(|r| r.result.pct(q) as f64).collect::<Vec<_>>();
        for name in [GATEWAY, DIRECT, DIRECT_ENV] {
            let v = of(name);
            if !v.is_empty() {
                println!(
                    "{setting:<6} {name:<10} requests/s {:>17}   p50 us {:>11}   p99 us {:>11}",
                    range(&rps(&v), 0),
                    range(&pct(&v, 0.5), 0),
                    range(&pct(&v, 0.99), 0)
                );
            }
        }
        // Each run of `a` against the run of `b` of the same round.
        let ratios = |a: &str, b: &str| -> Vec<f64> {
            of(a)
                .iter()
                .filter_map(|x| {
                    let y = of(b).into_iter().find(|y| y.repeat == x.repeat)?;
                    (y.result.rps() > 0.0).then(|| x.result.rps() / y.result.rps())
                })
                .collect()
        };
        for (a, b) in [
            (GATEWAY, DIRECT),
            (GATEWAY, DIRECT_ENV),
            (DIRECT_ENV, DIRECT),
        ] {
            let each = ratios(a, b);
            if each.is_empty() {
                continue;
            }
            let list: Vec<String> = each.iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "{setting:<6} ratio {a}/{b} (requests/s) = {}   (each run: {})",
                range(&each, 2),
                list.join(", ")
            );
            for (i, x) in each.iter().enumerate() {
                println!(
                    "RATIO connections={connections} pipeline={p} run={} {}_over_{}={x:.3}",
                    i + 1,
                    a.replace('-', "_"),
                    b.replace('-', "_")
                );
            }
        }
        let mean_p50 = |v: &[&NatsRun]| pct(v, 0.5).iter().sum::<f64>() / v.len().max(1) as f64;
        let (gateway, direct) = (of(GATEWAY), of(DIRECT));
        if !gateway.is_empty() && !direct.is_empty() {
            println!(
                "{setting:<6} p50 latency ratio gateway/direct (mean p50s) = {}",
                ratio(mean_p50(&gateway), mean_p50(&direct))
            );
        }
    }
}

/// `--mode nats`.
pub(super) fn run(args: &Args) -> Result<bool> {
    let s = settings(args)?;
    let payload = bench_payload(args.payload_size)?;
    let connections = args.connections as usize;
    let max_pipeline = s.pipelines.iter().copied().max().unwrap_or(1);

    let server = NatsServer::start(&s.nats_server)?;
    let url = server.url.clone();
    let standin_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(s.standin_threads)
        .thread_name(STANDIN_THREAD)
        .enable_all()
        .build()
        .context("cannot start the stand-in's tokio runtime")?;
    let direct_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(s.direct_threads)
        .thread_name(DIRECT_THREAD)
        .enable_all()
        .build()
        .context("cannot start the direct clients' tokio runtime")?;
    let standin = standin_rt.block_on(StandIn::start(&url, s.standin_conns))?;

    let mut gateway_error = None;
    let daemon = match &s.gateway_bin {
        None => None,
        Some(bin) => match GatewayDaemon::start(bin, &url, connections, max_pipeline) {
            Ok(daemon) => Some(daemon),
            Err(e) => {
                gateway_error = Some(format!("{e:#}"));
                None
            }
        },
    };

    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let list: Vec<String> = s.pipelines.iter().map(usize::to_string).collect();
    println!("ipc-gateway-bench --mode nats");
    println!("  connections  {connections}");
    println!(
        "  pipeline     {} requests in flight per connection, each setting in turn",
        list.join(", ")
    );
    println!(
        "  payload      {} bytes of JSON: a TASK_SUBMIT payload to the gateway, the NATS request \
         payload direct",
        args.payload_size
    );
    println!(
        "  duration     {:.3} s measured, after {:.3} s of warmup; {} run(s) of each setting",
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        s.repeat
    );
    println!("  machine      {cpus} CPUs, kernel {}", kernel_release());
    println!(
        "  nats-server  {} ({}), pid {}, at {url}",
        s.nats_server.display(),
        server.version,
        server.pid()
    );
    println!(
        "  stand-in     {} async-nats connection(s) in queue group {STANDIN_QUEUE} on {} tokio \
         thread(s), subject {SUBJECT}, replying with {} bytes: {STANDIN_REPLY}",
        s.standin_conns,
        s.standin_threads,
        STANDIN_REPLY.len()
    );
    println!(
        "  direct       {connections} async-nats clients on {} tokio thread(s), each keeping P \
         client.request() calls in flight",
        s.direct_threads
    );
    match (&daemon, &s.gateway_bin) {
        (Some(d), Some(bin)) => println!(
            "  gateway      {} (pid {}), socket {}, CGW_IPC_NATS_ENABLE=1 CGW_IPC_NATS_URL={url}",
            bin.display(),
            d.pid(),
            d.socket.display()
        ),
        _ if args.nats.direct_only => println!("  gateway      not run (--direct-only)"),
        _ => println!("  gateway      NOT RUN: the daemon could not be started (below)"),
    }
    let mut order = if daemon.is_some() {
        "gateway, then direct".to_string()
    } else {
        "direct only".to_string()
    };
    if s.repeat > 1 {
        order = format!("{order}; {} times each, the settings interleaved", s.repeat);
    }
    println!("  runs         for each setting: {order}");
    if let Some(e) = &gateway_error {
        println!();
        println!("GATEWAY NOT STARTED: {e}");
    }
    if let Some(d) = &daemon {
        print_memory(d.pid(), "before");
    }

    let meter = CpuMeter {
        ticks_per_second: rustix::param::clock_ticks_per_second() as f64,
        nats_pid: server.pid(),
        daemon_pid: daemon.as_ref().map(GatewayDaemon::pid),
    };
    let mut runs: Vec<NatsRun> = Vec::new();
    let mut shown_request = false;
    for repeat in 1..=s.repeat {
        for &pipeline in &s.pipelines {
            let outstanding = (HEADER_LEN + args.payload_size).saturating_mul(pipeline);
            let load = Load {
                connections,
                pipeline,
                payload: Arc::new(payload.clone()),
                warmup: args.warmup,
                duration: args.duration,
                split: args.split_io || outstanding > SINGLE_THREAD_MAX_BYTES,
            };
            let mut measure = |what: &str, go: &mut dyn FnMut() -> Result<RunResult>| {
                let (count, cpu) = (standin.count(), meter.snapshot());
                let result = go().with_context(|| format!("the {what} run"))?;
                let cpu = meter.between(&cpu, &meter.snapshot());
                let standin = standin.count().since(&count);
                let run = NatsRun {
                    pipeline,
                    repeat,
                    result,
                    cpu,
                    standin,
                };
                print_run(&run, connections, s.repeat);
                runs.push(run);
                Ok::<_, anyhow::Error>(())
            };
            if let Some(d) = &daemon {
                measure(GATEWAY, &mut || run_load(GATEWAY, &d.socket, &load))?;
                if !shown_request {
                    shown_request = true;
                    print_captured(standin.sample().as_ref());
                }
            }
            let bare: Captured = (Bytes::from(payload.clone()), None);
            measure(DIRECT, &mut || {
                run_direct(DIRECT, &direct_rt, &url, &load, &bare)
            })?;
            if args.nats.direct_envelope && daemon.is_some() {
                let Some(envelope) = standin.sample() else {
                    bail!(
                        "--direct-envelope: the stand-in has not seen a request from the gateway"
                    );
                };
                measure(DIRECT_ENV, &mut || {
                    run_direct(DIRECT_ENV, &direct_rt, &url, &load, &envelope)
                })?;
            }
            if let Some(d) = &daemon {
                print_memory(d.pid(), &format!("after {connections}x{pipeline}"));
            }
        }
    }

    print_summary(&runs, connections, &s.pipelines);
    if let Some(d) = daemon {
        println!();
        print_memory(d.pid(), "at the end");
        let pid = d.pid();
        println!("daemon pid {pid} stopped: {}", d.stop());
    }
    drop(standin);
    standin_rt.shutdown_timeout(Duration::from_secs(1));
    direct_rt.shutdown_timeout(Duration::from_secs(1));
    drop(server);

    let failed = runs.iter().any(|r| !r.result.failures.is_empty());
    if failed {
        eprintln!("ipc-gateway-bench: some connections failed during the run (see FAILED above)");
    }
    if let Some(e) = gateway_error {
        let first = e.lines().next().unwrap_or_default();
        eprintln!("ipc-gateway-bench: the gateway path was not measured: {first}");
        return Ok(false);
    }
    Ok(!failed)
}
