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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use ipc_gateway_tests::figures::ratio;
use ipc_gateway_tests::frame::HEADER_LEN;
use ipc_gateway_tests::launch::{
    admit_all_env, nats_env, Captured, CpuMeter, CpuUse, GatewayDaemon, NatsProcess, StandIn,
    StandInCount, STANDIN_QUEUE, STANDIN_REPLY, STANDIN_THREAD, SUBJECT,
};
use tokio::runtime::Runtime;

use crate::cli::{usage_error, Args};
use crate::load::{
    bench_payload, new_histogram, run_load, ConnOutcome, Load, RunResult, Window, DRAIN_GRACE,
    GATEWAY, SINGLE_THREAD_MAX_BYTES,
};
use crate::report::{kernel_release, print_counts, print_memory, print_run_notes};

/// The name of the direct runs, as printed in the results.
const DIRECT: &str = "direct";
/// The direct runs that send the gateway's own request (`--direct-envelope`).
const DIRECT_ENV: &str = "direct-env";
/// The thread name of the direct clients' runtime (its CPU is the load generator's).
const DIRECT_THREAD: &str = "direct-nats";

/// Options of `--mode nats`. All are optional so that stub mode can refuse them.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "NATS mode (--mode nats)")]
pub(super) struct NatsArgs {
    /// The nats-server executable, started on a free loopback port and killed at the end
    /// [default: nats-server, from PATH].
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,

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
    for (set, flag) in [
        (args.scrape_rate > 0.0, "--scrape-rate"),
        (args.scrape_rounds.is_some(), "--scrape-rounds"),
        (args.http_addr.is_some(), "--http-addr"),
    ] {
        if set {
            usage_error(&format!("{flag} applies to stub mode only"));
        }
    }
    let n = &args.nats;
    let gateway_bin = if n.direct_only {
        None
    } else if let Some(bin) = &args.gateway_bin {
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

/// The daemon in NATS mode, its limits high enough for the whole load; ready once a request
/// went through to the stand-in.
fn start_daemon(
    bin: &Path,
    url: &str,
    connections: usize,
    pipeline: usize,
) -> Result<GatewayDaemon> {
    let mut env = nats_env(url);
    env.extend(admit_all_env(connections, pipeline));
    GatewayDaemon::start(bin, &env, &bench_payload(256)?)
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

    let server = NatsProcess::start(&s.nats_server)?;
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
        Some(bin) => match start_daemon(bin, &url, connections, max_pipeline) {
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
            d.socket().display()
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

    let meter = CpuMeter::new(Some(server.pid()), daemon.as_ref().map(GatewayDaemon::pid));
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
                measure(GATEWAY, &mut || run_load(GATEWAY, d.socket(), &load))?;
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
