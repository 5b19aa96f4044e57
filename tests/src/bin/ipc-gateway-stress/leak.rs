//! `leak`: churn of every kind a client can cause, for `--secs`, while the daemon's RSS and
//! open descriptors are sampled each second. Ten minutes of an IDE's life compressed: each
//! worker goes round the scenarios below, each on a fresh connection (so every scenario is
//! also a reconnect). The least-squares slope of RSS and descriptors over the churn (after a
//! warmup) must be about zero, and once the clients stop the daemon must hold no connection,
//! request or timer, and exactly the descriptors it had idle.
//!
//! Requests that must time out carry marks that both Router doubles understand: the stand-in
//! (`"standin":"silent"`, `"standin":"late"`) and `router-double` (`"double":"silent"`,
//! `"double":{"slow_ms":N}`); the stub ignores them and answers after its delay.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipc_gateway_tests::frame::{self, CAPABILITIES, PING, PONG, RESPONSE_ERROR, RESPONSE_OK};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use super::client::{self, read_frame};
use super::plot::{self, least_squares};
use super::{
    client_runtime, cpu_line, lock, machine_line, mib, raise_own_fd_limit, sample_now,
    wait_settled, Common, Mode, Progress, Rig, RigSpec, Sample, Sampler,
};

/// The daemon's unsent-bytes cap in this part, so the output-cap scenario is cheap.
const UNSENT_CAP: u64 = 64 * 1024;
/// Requests the output-cap scenario writes without reading a reply.
const OUTPUT_CAP_REQUESTS: usize = 4096;
/// Longest one scenario may take before it counts as hung.
const SCENARIO_LIMIT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of churn (600 is the issue's ten minutes).
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(4..=86_400))]
    secs: u64,

    /// Concurrent churning clients.
    #[arg(long, value_name = "W", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    workers: u32,

    /// Seconds at the start left out of the slopes (allocator and tables growing to their
    /// working size) [default: a sixth of --secs, at least 2].
    #[arg(long, value_name = "SECS")]
    warmup: Option<u64>,

    /// The modes to run, in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "stub,nats")]
    mode: Vec<Mode>,

    /// The scenarios each worker goes round, in this order [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,

    /// The request deadline (CGW_IPC_TIMEOUT_MS); silent and late requests get error 5 after it.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    timeout_ms: u64,

    /// The stub Router's delay (CGW_IPC_STUB_DELAY_MS), so that stub requests are in flight
    /// when clients leave; above --timeout-ms every stub request times out.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    stub_delay_ms: u64,

    /// How long a partial frame may be held (CGW_IPC_READ_TIMEOUT_MS).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    read_timeout_ms: u64,

    /// Churn an already running daemon at this socket instead of starting one (--mode is then
    /// ignored). Configure it as this part would: request deadline --timeout-ms, read timeout
    /// --read-timeout-ms, CGW_IPC_MAX_UNSENT_BYTES=65536 (the output-cap scenario overruns
    /// about 1 MB), CGW_IPC_BREAKER_FAILURES=1000000 (timeouts must not open the breaker), and
    /// enough connections.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// With --socket: the daemon's pid, to sample its RSS and descriptors.
    #[arg(long, value_name = "PID", requires = "socket")]
    pid: Option<u32>,
}

/// What a client can do to the daemon; each worker goes round them in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Scenario {
    /// 10 pipelined requests, every reply read, then PING.
    Complete,
    /// 10 pipelined requests, a few replies read, then gone.
    MidFlight,
    /// Requests the Router never answers: error 5 at the deadline.
    Timeout,
    /// Requests the Router answers after the deadline: error 5, then a late reply dropped.
    Late,
    /// Half a frame, then gone.
    PartialLeave,
    /// Half a frame held: error 5 "read timeout" and closed.
    PartialHeld,
    /// Many requests, no reply read: closed at the unsent-bytes cap.
    OutputCap,
    /// CAPABILITIES and PING.
    Local,
    /// A frame of version 2: error 1 and closed.
    BadVersion,
}

/// Counts of the whole churn.
#[derive(Default)]
struct Churn {
    runs: Mutex<BTreeMap<Scenario, u64>>,
    requests: AtomicU64,
    /// Replies by kind: "OK", "error 5", ...
    replies: Mutex<BTreeMap<String, u64>>,
    /// What the protocol forbids (a wrong reply, a missing close, a hang), first few.
    violations: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Churn {
    fn reply(&self, f: &frame::Frame) {
        let key = match f.kind {
            RESPONSE_OK => "OK".to_string(),
            RESPONSE_ERROR => format!("error {}", client::error_code(f)),
            PONG => "PONG".to_string(),
            k => format!("type 0x{k:02X}"),
        };
        *lock(&self.replies).entry(key).or_default() += 1;
    }

    fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut list = lock(&self.examples);
        if list.len() < 8 {
            list.push(what);
        }
    }
}

/// Settings the scenarios need.
#[derive(Clone)]
struct Plan {
    scenarios: Vec<Scenario>,
    socket: PathBuf,
    timeout: Duration,
    read_timeout: Duration,
}

pub fn run(common: &Common, args: &Args) -> Result<bool> {
    raise_own_fd_limit(u64::from(args.workers) * 2 + 64)?;
    if let Some(socket) = &args.socket {
        return run_one(common, args, None, socket.clone(), args.pid, "external");
    }
    let mut ok = true;
    for &mode in &args.mode {
        let env = [
            // A worker reconnects as soon as it closed; the daemon may not have seen the close
            // yet.
            ("CGW_IPC_MAX_CONNECTIONS", u64::from(args.workers) * 4 + 16),
            // Silent and late requests are Router failures to the breaker, which would then
            // answer everything with error 8 and leave the Router paths unexercised.
            ("CGW_IPC_BREAKER_FAILURES", 1_000_000),
            ("CGW_IPC_TIMEOUT_MS", args.timeout_ms),
            ("CGW_IPC_STUB_DELAY_MS", args.stub_delay_ms),
            ("CGW_IPC_READ_TIMEOUT_MS", args.read_timeout_ms),
            ("CGW_IPC_MAX_UNSENT_BYTES", UNSENT_CAP),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
        let late = Duration::from_millis(args.timeout_ms * 2);
        let rig = Rig::start(
            common,
            RigSpec {
                mode,
                env,
                standin_late: Some(late),
                probe: b"{}",
            },
        )?;
        let (socket, pid) = (rig.socket().to_path_buf(), Some(rig.pid()));
        ok &= run_one(common, args, Some(rig), socket, pid, mode.name())?;
    }
    Ok(ok)
}

fn run_one(
    common: &Common,
    args: &Args,
    mut rig: Option<Rig>,
    socket: PathBuf,
    pid: Option<u32>,
    name: &str,
) -> Result<bool> {
    println!();
    println!(
        "== leak, {name}: {} workers churning for {} s (deadline {} ms, read timeout {} ms) ==",
        args.workers, args.secs, args.timeout_ms, args.read_timeout_ms
    );
    println!("  {}", machine_line());
    let mut idle_fds = None;
    if let Some(rig) = &rig {
        println!("  {}", rig.describe());
        // Idle: the readiness probe's connection is gone.
        let (_, settled) = wait_settled(rig, Duration::from_secs(10))?;
        if !settled {
            bail!("the daemon did not settle before the churn");
        }
        idle_fds = pid
            .and_then(|p| sample_now(p, Instant::now()))
            .map(|s| s.fds);
    } else {
        println!(
            "  daemon at {} (pid {})",
            socket.display(),
            pid.map_or("unknown".into(), |p| p.to_string())
        );
    }
    let warmup = args
        .warmup
        .unwrap_or((args.secs / 6).max(2))
        .min(args.secs / 2);
    let rt = client_runtime(common)?;
    let plan = Plan {
        scenarios: if args.scenarios.is_empty() {
            <Scenario as clap::ValueEnum>::value_variants().to_vec()
        } else {
            args.scenarios.clone()
        },
        socket,
        timeout: Duration::from_millis(args.timeout_ms),
        read_timeout: Duration::from_millis(args.read_timeout_ms),
    };
    let churn = Arc::new(Churn::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = pid.map(|p| Sampler::start(p, Duration::from_secs(1)));
    let cpu_from = rig.as_ref().map(|r| r.meter.snapshot());
    let started = Instant::now();
    let workers: Vec<_> = (0..args.workers as usize)
        .map(|w| {
            rt.spawn(worker(
                w,
                plan.clone(),
                Arc::clone(&stop),
                Arc::clone(&churn),
            ))
        })
        .collect();
    {
        let churn = Arc::clone(&churn);
        let samples = sampler.as_ref().map(|s| Arc::clone(&s.samples));
        let _progress = Progress::start(common.progress, move |secs| {
            let last = samples.as_ref().and_then(|s| lock(s).last().copied());
            let daemon = last.map_or(String::new(), |s| {
                format!(", daemon RSS {}, {} fds", mib(s.rss_kb), s.fds)
            });
            let runs: u64 = lock(&churn.runs).values().sum();
            format!(
                "leak: {secs:.0} s, {runs} scenarios, {} requests, {} violations{daemon}",
                churn.requests.load(Ordering::Relaxed),
                churn.violations.load(Ordering::Relaxed)
            )
        });
        while started.elapsed() < Duration::from_secs(args.secs) {
            if let Some(rig) = rig.as_mut() {
                rig.check_alive()?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let churn_end = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    rt.block_on(futures::future::join_all(workers));
    let cpu = match (&rig, &cpu_from) {
        (Some(r), Some(from)) => cpu_line(&r.meter, from),
        _ => String::new(),
    };

    let runs = lock(&churn.runs).clone();
    let runs_text: Vec<String> = runs.iter().map(|(s, n)| format!("{s:?} {n}")).collect();
    let replies: Vec<String> = lock(&churn.replies)
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "  churn        {} scenarios in {churn_end:.1} s: {}",
        runs.values().sum::<u64>(),
        runs_text.join(", ")
    );
    println!(
        "  requests     {} sent; replies: {}",
        churn.requests.load(Ordering::Relaxed),
        replies.join(", ")
    );
    let violations = churn.violations.load(Ordering::Relaxed);
    if violations > 0 {
        println!(
            "  VIOLATIONS   {violations}: {}",
            lock(&churn.examples).join("; ")
        );
    } else {
        println!("  violations   0 (every reply as the protocol says, every close where due)");
    }
    if !cpu.is_empty() {
        println!("  {cpu}");
    }

    let mut ok = violations == 0;
    let mut settled_at = None;
    if let Some(rig) = rig.as_mut() {
        rig.check_alive()?;
        let (stats, settled) = wait_settled(rig, Duration::from_secs(30))?;
        settled_at = Some(started.elapsed().as_secs_f64());
        println!(
            "  settled      {} ({:.1} s after the churn): {}",
            if settled { "yes" } else { "NO" },
            settled_at.unwrap_or(0.0) - churn_end,
            super::stats_summary(&stats)
        );
        ok &= settled;
        // A few quiet seconds on the plot after the churn.
        std::thread::sleep(Duration::from_secs(3));
    }
    let Some(sampler) = sampler else {
        rt.shutdown_timeout(Duration::from_secs(1));
        return Ok(ok);
    };
    let samples = sampler.finish();
    let fit_of = |f: fn(&Sample) -> f64| {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.secs >= warmup as f64 && s.secs <= churn_end)
            .map(|s| (s.secs, f(s)))
            .collect();
        least_squares(&points)
    };
    let rss_fit = fit_of(|s| s.rss_kb as f64);
    let fds_fit = fit_of(|s| s.fds as f64);
    let in_window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.secs >= warmup as f64 && s.secs <= churn_end)
        .collect();
    let rss_range = min_max(in_window.iter().map(|s| s.rss_kb));
    let fds_range = min_max(in_window.iter().map(|s| s.fds));
    let minutes = (churn_end - warmup as f64) / 60.0;
    if let (Some(r), Some(f)) = (rss_fit, fds_fit) {
        let mean_rss =
            in_window.iter().map(|s| s.rss_kb as f64).sum::<f64>() / in_window.len() as f64;
        let rss_change = r.slope * 60.0 * minutes;
        let rss_flat = rss_change.abs() < (0.02 * mean_rss).max(512.0);
        let fds_flat = (f.slope * 60.0 * minutes).abs() < 1.0;
        println!(
            "  RSS slope    {:+.1} kB/min over {} samples from {warmup} s to {churn_end:.0} s \
             (RSS {}..{}): {}",
            r.slope * 60.0,
            in_window.len(),
            mib(rss_range.0),
            mib(rss_range.1),
            if rss_flat { "about zero" } else { "NOT FLAT" }
        );
        println!(
            "  fds slope    {:+.2} fds/min (open descriptors {}..{}): {}",
            f.slope * 60.0,
            fds_range.0,
            fds_range.1,
            if fds_flat { "about zero" } else { "NOT FLAT" }
        );
        println!(
            "RESULT part=leak mode={name} secs={} workers={} rss_slope_kb_per_min={:.1} \
             fds_slope_per_min={:.3} rss_min_kb={} rss_max_kb={} fds_min={} fds_max={}",
            args.secs,
            args.workers,
            r.slope * 60.0,
            f.slope * 60.0,
            rss_range.0,
            rss_range.1,
            fds_range.0,
            fds_range.1
        );
    } else {
        println!("  slopes       too few samples after the {warmup} s warmup");
    }
    if let (Some(idle), Some(last)) = (idle_fds, samples.last()) {
        let same = last.fds == idle;
        println!(
            "  descriptors  {} after the churn, {idle} before it: {}",
            last.fds,
            if same {
                "all given back"
            } else {
                "NOT ALL GIVEN BACK"
            }
        );
        ok &= same;
    }
    std::fs::create_dir_all(&common.out)
        .with_context(|| format!("creating {}", common.out.display()))?;
    let csv = common.out.join(format!("leak-{name}.csv"));
    let svg = common.out.join(format!("leak-{name}.svg"));
    plot::write_csv(&csv, &samples)?;
    let mut marks = vec![(warmup as f64, "warmup over"), (churn_end, "churn over")];
    if let Some(t) = settled_at {
        marks.push((t, "settled"));
    }
    let title = format!("leak detection ({name}): daemon RSS and descriptors under churn");
    let extras = plot::Extras {
        fits: rss_fit.zip(fds_fit),
        marks,
        rss_limit: None,
    };
    plot::write_svg(&svg, &title, &samples, &extras)?;
    println!("  samples      {} and {}", csv.display(), svg.display());
    if let Some(rig) = rig.take() {
        println!("  daemon stopped: {}", rig.stop());
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(ok)
}

fn min_max(values: impl Iterator<Item = u64>) -> (u64, u64) {
    values.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// One churning client: scenario after scenario on fresh connections until `stop`.
async fn worker(index: usize, plan: Plan, stop: Arc<AtomicBool>, churn: Arc<Churn>) {
    let mut round = index;
    while !stop.load(Ordering::Relaxed) {
        let scenario = plan.scenarios[round % plan.scenarios.len()];
        round += 1;
        match tokio::time::timeout(SCENARIO_LIMIT, play(scenario, round, &plan, &churn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => churn.violation(format!("{scenario:?}: {e:#}")),
            Err(_) => churn.violation(format!("{scenario:?}: hung for {SCENARIO_LIMIT:?}")),
        }
        *lock(&churn.runs).entry(scenario).or_default() += 1;
    }
}

/// The marks of requests the Router must not answer in time (see the module documentation).
fn silent_mark() -> &'static str {
    r#""standin":"silent","double":"silent""#
}

fn late_mark(plan: &Plan) -> String {
    let slow = plan.timeout.as_millis() * 2;
    format!(r#""standin":"late","double":{{"slow_ms":{slow}}}"#)
}

/// Plays one scenario; `Err` is a violation of the protocol by the daemon.
async fn play(scenario: Scenario, round: usize, plan: &Plan, churn: &Churn) -> Result<()> {
    let mut conn = UnixStream::connect(&plan.socket).await.context("connect")?;
    let small = client::submit(&client::payload(64, ""));
    match scenario {
        Scenario::Complete => {
            send(&mut conn, &small.repeat(10), churn, 10).await?;
            for _ in 0..10 {
                expect(&mut conn, churn, &[RESPONSE_OK], &[5]).await?;
            }
            ping(&mut conn, churn).await?;
        }
        Scenario::MidFlight => {
            let late = client::submit(&client::payload(64, &late_mark(plan)));
            let mut batch = small.repeat(5);
            batch.extend(late.repeat(5));
            send(&mut conn, &batch, churn, 10).await?;
            for _ in 0..round % 3 {
                expect(&mut conn, churn, &[RESPONSE_OK], &[5]).await?;
            }
        }
        Scenario::Timeout | Scenario::Late => {
            let mark = if scenario == Scenario::Timeout {
                silent_mark().to_string()
            } else {
                late_mark(plan)
            };
            let request = client::submit(&client::payload(64, &mark));
            send(&mut conn, &request.repeat(3), churn, 3).await?;
            for _ in 0..3 {
                expect(&mut conn, churn, &[RESPONSE_OK], &[5]).await?;
            }
            ping(&mut conn, churn).await?;
        }
        Scenario::PartialLeave => {
            conn.write_all(&small[..small.len() / 2]).await?;
        }
        Scenario::PartialHeld => {
            conn.write_all(&small[..small.len() / 2]).await?;
            let start = Instant::now();
            expect(&mut conn, churn, &[], &[5]).await?;
            if start.elapsed() + Duration::from_millis(50) < plan.read_timeout {
                bail!(
                    "read timeout after {:?}, before {:?}",
                    start.elapsed(),
                    plan.read_timeout
                );
            }
            expect_closed(&mut conn).await?;
        }
        Scenario::OutputCap => {
            // Replies of at least 134 bytes (the stand-in's) to 4096 requests: far more than
            // the socket buffer and the 64 KiB cap hold together. The daemon closes the
            // connection while this is still being written.
            let request = client::submit(&client::payload(256, ""));
            let _ = conn.write_all(&request.repeat(OUTPUT_CAP_REQUESTS)).await;
            churn
                .requests
                .fetch_add(OUTPUT_CAP_REQUESTS as u64, Ordering::Relaxed);
            // Whatever replies made it, then the close.
            loop {
                match read_frame(&mut conn).await {
                    Ok(Some(f)) => churn.reply(&f),
                    Ok(None) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Scenario::Local => {
            conn.write_all(&frame::encode(CAPABILITIES, &[])).await?;
            expect(&mut conn, churn, &[RESPONSE_OK], &[]).await?;
            ping(&mut conn, churn).await?;
        }
        Scenario::BadVersion => {
            let mut bad = frame::encode(PING, &[]);
            bad[4] = 2;
            conn.write_all(&bad).await?;
            expect(&mut conn, churn, &[], &[1]).await?;
            expect_closed(&mut conn).await?;
        }
    }
    Ok(())
}

async fn send(conn: &mut UnixStream, bytes: &[u8], churn: &Churn, requests: u64) -> Result<()> {
    conn.write_all(bytes).await.context("write")?;
    churn.requests.fetch_add(requests, Ordering::Relaxed);
    Ok(())
}

/// Reads one frame: one of the `kinds`, or an error frame with one of the `codes`.
async fn expect(conn: &mut UnixStream, churn: &Churn, kinds: &[u8], codes: &[u64]) -> Result<()> {
    let Some(f) = read_frame(conn).await.context("read")? else {
        bail!("closed where a reply was due");
    };
    churn.reply(&f);
    let fits = kinds.contains(&f.kind)
        || (f.kind == RESPONSE_ERROR && codes.contains(&client::error_code(&f)));
    if !fits {
        bail!(
            "got type 0x{:02X} {}, expected types {kinds:02X?} or error codes {codes:?}",
            f.kind,
            String::from_utf8_lossy(&f.payload)
        );
    }
    Ok(())
}

async fn ping(conn: &mut UnixStream, churn: &Churn) -> Result<()> {
    conn.write_all(&frame::encode(PING, &[])).await?;
    expect(conn, churn, &[PONG], &[]).await
}

async fn expect_closed(conn: &mut UnixStream) -> Result<()> {
    match read_frame(conn).await {
        Ok(None) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Ok(Some(f)) => bail!("a frame of type 0x{:02X} where the close was due", f.kind),
        Err(e) => Err(e.into()),
    }
}
