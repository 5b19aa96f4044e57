//! `ipc-gateway-stress`: the stress suite of the issue "Availability under faults" (items 4
//! and 5). Each part starts what it needs (the daemon, and in NATS mode a `nats-server` on a
//! free loopback port and the async-nats Router stand-in of `ipc-gateway-bench`), loads the
//! daemon and prints figures: throughput, latency percentiles, the daemon's peak RSS and
//! descriptors, ratios where a baseline exists. Nothing here is a timed assertion; the exit
//! status is 1 only when something broke (the daemon died, a reply was missing or wrong, a
//! memory bound computed from the configuration was exceeded, the daemon did not settle).
//!
//! - `bomb`: many connections (1000) each sending many requests (5000), pipelined.
//! - `memory`: clients push maximum-size frames and never read, up to every limit; peak RSS
//!   against a bound computed from the configuration, and RSS after the clients leave.
//! - `latency`: 999 connections hammering while one connection measures PING and small-task
//!   latency, against the same connection on the idle daemon.
//! - `leak`: churn (connect, pipeline, disconnect mid-flight, timeouts, partial frames, output
//!   cap, reconnects) with the daemon's RSS and descriptors sampled each second; the slopes by
//!   least squares, a CSV and an SVG plot.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use ipc_gateway_tests::daemon::status_kb;
use ipc_gateway_tests::figures::ratio;
use ipc_gateway_tests::launch::{
    nats_env, CpuMeter, CpuSnapshot, CpuUse, GatewayDaemon, NatsProcess, StandIn, STANDIN_THREAD,
};
use ipc_gateway_tests::nats_load::try_fd_count;
use tokio::runtime::Runtime;

// Directories without main.rs are not binary targets: cargo leaves them alone.
#[path = "ipc-gateway-stress/bomb.rs"]
mod bomb;
#[path = "ipc-gateway-stress/client.rs"]
mod client;
#[path = "ipc-gateway-stress/latency.rs"]
mod latency;
#[path = "ipc-gateway-stress/leak.rs"]
mod leak;
#[path = "ipc-gateway-stress/memory.rs"]
mod memory;
#[path = "ipc-gateway-stress/plot.rs"]
mod plot;

/// Stress suite for ipc-gateway: connection bomb, memory destruction, latency torture and leak
/// detection. Every part starts its own daemon (and, in NATS mode, nats-server on a free
/// loopback port and an async-nats Router stand-in), prints its figures and stops what it
/// started. Figures, not timed assertions: the exit status is 1 only if something broke (the
/// daemon died, replies were missing or wrong, the memory bound was exceeded, the daemon did
/// not settle after the load), 2 for bad options.
///
/// Build first: cargo build --release -p ipc-gateway -p ipc-gateway-tests
#[derive(Parser, Debug)]
#[command(name = "ipc-gateway-stress", version)]
struct Cli {
    #[command(subcommand)]
    part: Part,

    #[command(flatten)]
    common: Common,
}

/// Options every part takes.
#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// The daemon executable [default: ipc-gateway beside this executable].
    #[arg(long, value_name = "PATH", global = true)]
    gateway_bin: Option<PathBuf>,

    /// The nats-server executable for NATS mode.
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        default_value = "nats-server"
    )]
    nats_server: PathBuf,

    /// Where CSV files and plots go.
    #[arg(
        long,
        value_name = "DIR",
        global = true,
        default_value = "target/stress"
    )]
    out: PathBuf,

    /// Worker threads of the client runtime (one tokio runtime drives every connection).
    #[arg(long, value_name = "T", global = true, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    client_threads: u16,

    /// Seconds between progress lines on stderr.
    #[arg(long, value_name = "SECS", global = true, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    progress: u64,
}

#[derive(Subcommand, Debug)]
enum Part {
    /// Connection bomb: N concurrent connections x R pipelined requests each, in stub and NATS
    /// mode; throughput, latency percentiles, the daemon's peak RSS and descriptors, and the
    /// ratio to the same requests over a few connections.
    Bomb(bomb::Args),
    /// Memory destruction: clients push maximum-size frames and never read, up to every limit
    /// (connections, in-flight per connection, unsent bytes, frame size); the daemon's peak RSS
    /// against a bound computed from its configuration, then RSS after the clients leave.
    Memory(memory::Args),
    /// Latency torture: N-1 connections hammer with pipelined load while one connection
    /// measures PING and small-task latency, against the same connection on the idle daemon.
    Latency(latency::Args),
    /// Leak detection: churn of every kind for --secs while the daemon's RSS and descriptors
    /// are sampled each second; least-squares slopes, a CSV and an SVG plot in --out.
    Leak(leak::Args),
}

/// Which upstream the daemon uses.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The embedded stub Router (CGW_IPC_NATS_ENABLE=0).
    Stub,
    /// NATS: nats-server on a free loopback port and the async-nats Router stand-in.
    Nats,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Stub => "stub",
            Mode::Nats => "nats",
        }
    }
}

/// A daemon started for one run, with nats-server and the stand-in in NATS mode; all
/// stopped on drop.
struct Rig {
    mode: Mode,
    daemon: Option<GatewayDaemon>,
    standin: Option<StandIn>,
    standin_rt: Option<Runtime>,
    nats: Option<NatsProcess>,
    meter: CpuMeter,
}

/// What a [`Rig`] is started with.
struct RigSpec<'a> {
    mode: Mode,
    /// `CGW_*` settings on top of the NATS ones.
    env: Vec<(String, String)>,
    /// The stand-in answers requests marked late after this delay, and marked silent never
    /// (`None`: it answers everything at once).
    standin_late: Option<Duration>,
    /// The payload of the readiness probe (answered RESPONSE_OK once ready).
    probe: &'a [u8],
}

impl Rig {
    fn start(common: &Common, spec: RigSpec<'_>) -> Result<Rig> {
        let bin = gateway_bin(common)?;
        let mut env = Vec::new();
        let (mut nats, mut standin, mut standin_rt) = (None, None, None);
        if spec.mode == Mode::Nats {
            let server = NatsProcess::start(&common.nats_server)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(STANDIN_THREAD)
                .enable_all()
                .build()
                .context("cannot start the stand-in's tokio runtime")?;
            standin = Some(rt.block_on(StandIn::start_with(&server.url, 2, spec.standin_late))?);
            env.extend(nats_env(&server.url));
            nats = Some(server);
            standin_rt = Some(rt);
        }
        env.extend(spec.env);
        let daemon = GatewayDaemon::start(&bin, &env, spec.probe)?;
        let meter = CpuMeter::new(nats.as_ref().map(NatsProcess::pid), Some(daemon.pid()));
        Ok(Rig {
            mode: spec.mode,
            daemon: Some(daemon),
            standin,
            standin_rt,
            nats,
            meter,
        })
    }

    fn daemon(&self) -> &GatewayDaemon {
        self.daemon
            .as_ref()
            .expect("the daemon runs until the rig is stopped")
    }

    fn pid(&self) -> u32 {
        self.daemon().pid()
    }

    fn socket(&self) -> &Path {
        self.daemon().socket()
    }

    /// Fails with the daemon's last log lines if it is no longer running.
    fn check_alive(&mut self) -> Result<()> {
        let daemon = self.daemon.as_mut().expect("running");
        if daemon.is_running() {
            return Ok(());
        }
        bail!(
            "the daemon died during the run\n--- daemon stderr (tail) ---\n{}",
            daemon.stderr_tail()
        )
    }

    /// One line about the rig, printed before a run.
    fn describe(&self) -> String {
        let nats = match &self.nats {
            Some(n) => format!(
                ", nats-server {} (pid {}) at {}, stand-in 2 async-nats connections",
                n.version,
                n.pid(),
                n.url
            ),
            None => String::new(),
        };
        format!(
            "daemon pid {} in {} mode, socket {}{nats}",
            self.pid(),
            self.mode.name(),
            self.socket().display()
        )
    }

    /// SIGTERM to the daemon; returns how it ended.
    fn stop(mut self) -> String {
        let status = self
            .daemon
            .take()
            .map(GatewayDaemon::stop)
            .unwrap_or_default();
        drop(self.standin.take());
        if let Some(rt) = self.standin_rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        status
    }
}

fn gateway_bin(common: &Common) -> Result<PathBuf> {
    if let Some(bin) = &common.gateway_bin {
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
    Ok(dir.join("ipc-gateway"))
}

/// The tokio runtime that drives the client connections.
fn client_runtime(common: &Common) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(common.client_threads))
        .thread_name("stress-client")
        .enable_all()
        .build()
        .context("cannot start the client runtime")
}

/// Raises this process's soft open-file limit to the hard limit (each client connection is a
/// descriptor) and fails early if `needed` descriptors will not fit.
fn raise_own_fd_limit(needed: u64) -> Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let (old, hard) = (limit.current, limit.maximum);
    if let (Some(soft), Some(hard)) = (old, hard) {
        if soft < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            setrlimit(Resource::Nofile, raised).context("raising RLIMIT_NOFILE")?;
            println!("  client       open-file limit raised from {soft} to {hard}");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    if let Some(soft) = now {
        if soft < needed {
            bail!(
                "this process may open {soft} files but needs about {needed}: raise the hard \
                 limit (ulimit -Hn) or use fewer connections"
            );
        }
    }
    Ok(())
}

/// One sample of the daemon: seconds since sampling started, VmRSS in kB, open descriptors.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kb: u64,
    fds: u64,
}

fn sample_now(pid: u32, since: Instant) -> Option<Sample> {
    Some(Sample {
        secs: since.elapsed().as_secs_f64(),
        rss_kb: status_kb(pid, "VmRSS:")?,
        fds: try_fd_count(pid).ok()? as u64,
    })
}

/// Samples the daemon's RSS and descriptors every `every` on a thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (flag, sink) = (Arc::clone(&stop), Arc::clone(&samples));
        let since = Instant::now();
        let thread = thread::spawn(move || {
            let mut next = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                if let Some(s) = sample_now(pid, since) {
                    lock(&sink).push(s);
                }
                next += every;
                // Wake at the next tick, or soon after a stop.
                while !flag.load(Ordering::SeqCst) && Instant::now() < next {
                    let left = next.saturating_duration_since(Instant::now());
                    thread::sleep(left.min(Duration::from_millis(50)));
                }
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// The samples so far.
    fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).clone()
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Prints `line()` to stderr every `every` seconds until dropped: the progress of a long run.
struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    fn start(every: u64, line: impl Fn(f64) -> String + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let since = Instant::now();
        let thread = thread::spawn(move || {
            let every = Duration::from_secs(every);
            let mut next = Instant::now() + every;
            while !flag.load(Ordering::SeqCst) {
                if Instant::now() >= next {
                    eprintln!("  ... {}", line(since.elapsed().as_secs_f64()));
                    next += every;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// p50, p99, p99.9 and max of a histogram, in µs (zeros when empty).
fn percentiles(h: &Histogram<u64>) -> [u64; 4] {
    if h.is_empty() {
        return [0; 4];
    }
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// CPU of every party between two snapshots, as one line.
fn cpu_line(meter: &CpuMeter, from: &CpuSnapshot) -> String {
    let c: CpuUse = meter.between(from, &meter.snapshot());
    let daemon = c.daemon.unwrap_or(0.0);
    format!(
        "CPU (cores)  daemon {daemon:.2}, nats-server {:.2}, stand-in {:.2}, client {:.2}; \
         other processes {:.2} (of {} CPUs)",
        c.nats,
        c.standin,
        c.client,
        c.others(),
        thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// The 1-minute load average and what else is running, for the record of a run.
fn machine_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine      {} CPUs, kernel {}, load average {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        load.join(" ")
    )
}

/// Waits until the daemon holds no connection, request or timer (its `stats` line after
/// SIGUSR1), for at most `within`; returns the last stats line and whether it settled.
fn wait_settled(rig: &Rig, within: Duration) -> Result<(serde_json::Value, bool)> {
    let deadline = Instant::now() + within;
    loop {
        let stats = rig.daemon().stats()?;
        let zero = |k: &str| stats[k].as_u64() == Some(0);
        let settled = zero("connections") && zero("inflight") && zero("upstream_pending");
        if settled || Instant::now() >= deadline {
            return Ok((stats, settled));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon's counters from a stats line, as printed after a run.
fn stats_summary(stats: &serde_json::Value) -> String {
    let keys = [
        "connections",
        "inflight",
        "upstream_pending",
        "requests",
        "router_timeouts",
        "dropped_replies",
        "late_replies",
        "backpressure_rejections",
        "breaker",
        "reconnects",
        "failed_on_disconnect",
    ];
    keys.iter()
        .filter(|k| !stats[**k].is_null())
        .map(|k| format!("{k}={}", stats[*k]))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.part {
        Part::Bomb(args) => bomb::run(&cli.common, args),
        Part::Memory(args) => memory::run(&cli.common, args),
        Part::Latency(args) => latency::run(&cli.common, args),
        Part::Leak(args) => leak::run(&cli.common, args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("ipc-gateway-stress: FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ipc-gateway-stress: {e:#}");
            ExitCode::FAILURE
        }
    }
}
