//! `bomb`: N concurrent connections, each sending R requests with P in flight, through the
//! daemon in stub and in NATS mode. Then the same kind of load over a few connections on the
//! same daemon, as the baseline of the ratios.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ipc_gateway_tests::daemon::status_kb;
use ipc_gateway_tests::launch::admit_all_env;

use super::client::{self, Tally};
use super::{
    client_runtime, cpu_line, machine_line, mib, new_histogram, percentiles, raise_own_fd_limit,
    ratio, wait_settled, Common, Mode, Progress, Rig, RigSpec, Sampler,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent connections.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connections: u32,

    /// Requests each connection sends.
    #[arg(long, value_name = "R", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,

    #[command(flatten)]
    shape: client::Shape,

    /// The modes to run, in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "stub,nats")]
    mode: Vec<Mode>,

    /// Connections of the baseline run (0: none).
    #[arg(long, value_name = "B", default_value_t = 8)]
    baseline_connections: u32,

    /// Requests of the baseline run, over all its connections.
    #[arg(long, value_name = "N", default_value_t = 500_000)]
    baseline_requests: u64,
}

/// What one load run measured.
struct Run {
    connections: usize,
    ok: u64,
    errors: u64,
    secs: f64,
    /// p50, p99, p99.9, max in µs.
    latency: [u64; 4],
    described: String,
    failed: bool,
}

impl Run {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

pub fn run(common: &Common, args: &Args) -> Result<bool> {
    let connections = args.connections as usize;
    let pipeline = args.shape.pipeline as usize;
    raise_own_fd_limit(connections as u64 + 64)?;
    let mut ok = true;
    for &mode in &args.mode {
        ok &= run_mode(common, args, mode, connections, pipeline)?;
    }
    Ok(ok)
}

fn run_mode(
    common: &Common,
    args: &Args,
    mode: Mode,
    connections: usize,
    pipeline: usize,
) -> Result<bool> {
    let payload = client::payload(args.shape.payload_size as usize, "");
    let mut rig = Rig::start(
        common,
        RigSpec {
            mode,
            env: admit_all_env(
                connections.max(args.baseline_connections as usize),
                pipeline,
            ),
            standin_late: None,
            probe: &payload,
        },
    )?;
    let pid = rig.pid();
    println!();
    println!(
        "== bomb, {} mode: {connections} connections x {} requests, {pipeline} in flight each, \
         {}-byte payloads ==",
        mode.name(),
        args.requests,
        args.shape.payload_size
    );
    println!("  {}", machine_line());
    println!("  {}", rig.describe());
    let idle_rss = status_kb(pid, "VmRSS:").unwrap_or(0);
    let idle_fds = super::try_fd_count(pid).unwrap_or(0);
    println!(
        "  daemon idle  RSS {}, {idle_fds} descriptors",
        mib(idle_rss)
    );

    let rt = client_runtime(common)?;
    let request = Arc::new(client::submit(&payload));
    let cpu_from = rig.meter.snapshot();
    let sampler = Sampler::start(pid, Duration::from_millis(200));
    let total = connections as u64 * args.requests;
    let bomb = load(
        common,
        &rt,
        &rig,
        &request,
        connections,
        pipeline,
        args.requests,
        &format!("bomb {}", mode.name()),
        Some(&sampler),
    )?;
    let samples = sampler.finish();
    let cpu = cpu_line(&rig.meter, &cpu_from);
    rig.check_alive()?;
    let peak_rss = status_kb(pid, "VmHWM:").unwrap_or(0);
    let peak_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let peak_sampled = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);

    print_run("bomb", &bomb);
    println!("  {cpu}");
    println!(
        "  daemon       peak RSS (VmHWM) {}, highest sampled {}; peak descriptors {peak_fds} \
         ({} samples, every 200 ms)",
        mib(peak_rss),
        mib(peak_sampled),
        samples.len()
    );
    let complete = bomb.ok + bomb.errors == total;
    if !complete {
        println!(
            "  MISSING: {} of {total} requests answered",
            bomb.ok + bomb.errors
        );
    }

    let mut baseline = None;
    if args.baseline_connections > 0 {
        let b = args.baseline_connections as usize;
        let per = (args.baseline_requests / b as u64).max(1);
        let label = format!("baseline {}", mode.name());
        let run = load(common, &rt, &rig, &request, b, pipeline, per, &label, None)?;
        print_run(&format!("baseline, {b} connections x {per}"), &run);
        baseline = Some(run);
    }
    let (stats, settled) = wait_settled(&rig, Duration::from_secs(30))?;
    println!("  after        {}", super::stats_summary(&stats));
    if let Some(base) = &baseline {
        println!(
            "  ratio {connections} connections / {} connections: throughput {}, p99 latency {}",
            base.connections,
            ratio(bomb.rps(), base.rps()),
            ratio(bomb.latency[1] as f64, base.latency[1] as f64)
        );
    }
    println!(
        "RESULT part=bomb mode={} connections={connections} requests_each={} pipeline={pipeline} \
         rps={:.0} ok={} errors={} p50_us={} p99_us={} p999_us={} max_us={} peak_rss_kb={peak_rss} \
         peak_fds={peak_fds} idle_rss_kb={idle_rss} baseline_rps={:.0}",
        mode.name(),
        args.requests,
        bomb.rps(),
        bomb.ok,
        bomb.errors,
        bomb.latency[0],
        bomb.latency[1],
        bomb.latency[2],
        bomb.latency[3],
        baseline.as_ref().map_or(0.0, Run::rps)
    );
    println!("  daemon stopped: {}", rig.stop());
    rt.shutdown_timeout(Duration::from_secs(1));
    let failed = bomb.failed || baseline.as_ref().is_some_and(|b| b.failed);
    Ok(complete && settled && !failed)
}

#[allow(clippy::too_many_arguments)]
fn load(
    common: &Common,
    rt: &tokio::runtime::Runtime,
    rig: &Rig,
    request: &Arc<Vec<u8>>,
    connections: usize,
    pipeline: usize,
    requests: u64,
    label: &str,
    sampler: Option<&Sampler>,
) -> Result<Run> {
    let streams = client::connect_all(rt, rig.socket(), connections)?;
    let tally = Tally::new();
    let stop = Arc::new(AtomicBool::new(false));
    let total = connections as u64 * requests;
    let progress = {
        let (tally, label) = (Arc::clone(&tally), label.to_string());
        let latest = sampler.map(|s| Arc::clone(&s.samples));
        Progress::start(common.progress, move |secs| {
            let done = tally.ok.load(Ordering::Relaxed) + tally.error_count();
            let daemon = latest
                .as_ref()
                .and_then(|l| super::lock(l).last().copied())
                .map_or(String::new(), |s| {
                    format!(", daemon RSS {}, {} fds", mib(s.rss_kb), s.fds)
                });
            format!(
                "{label}: {secs:.0} s, {done}/{total} replies ({:.0}/s){daemon}",
                done as f64 / secs.max(1e-3)
            )
        })
    };
    let start = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            rt.spawn(client::pipelined(
                stream,
                Arc::clone(request),
                pipeline,
                Some(requests),
                Arc::clone(&stop),
                Arc::clone(&tally),
            ))
        })
        .collect();
    let hists = rt.block_on(futures::future::join_all(tasks));
    let secs = start.elapsed().as_secs_f64();
    drop(progress);
    let mut all = new_histogram();
    for h in hists.into_iter().flatten() {
        let _ = all.add(&h);
    }
    Ok(Run {
        connections,
        ok: tally.ok.load(Ordering::Relaxed),
        errors: tally.error_count(),
        secs,
        latency: percentiles(&all),
        described: tally.describe(),
        failed: tally.failed.load(Ordering::Relaxed) > 0,
    })
}

fn print_run(what: &str, r: &Run) {
    let [p50, p99, p999, max] = r.latency;
    println!(
        "  {what:<12} {:.0} requests/s over {:.2} s; {}",
        r.rps(),
        r.secs,
        r.described
    );
    println!("               latency us: p50 {p50}, p99 {p99}, p99.9 {p999}, max {max}");
}
