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
//! `--mode nats` (module `nats`) measures the daemon's NATS path instead: it starts nats-server,
//! a Router stand-in and the daemon itself, and compares the gateway with the same load sent
//! straight over NATS by async-nats clients.
//!
//! The modules: `cli` (the options and --help), `load` (the load generator and its
//! per-connection drivers), `echo` (the two echo floors), `report` (what is printed) and `nats`
//! (the whole NATS mode).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Parser;
use ipc_gateway_tests::frame::HEADER_LEN;
use ipc_gateway_tests::launch::GatewayDaemon;

mod cli;
mod echo;
mod load;
mod nats;
mod report;
mod scrape;

use cli::{usage_error, Args, Mode};
use echo::{run_echo, ECHO, ECHO_1T};
use load::{bench_payload, connect, run_load, Load, RunResult, GATEWAY, SINGLE_THREAD_MAX_BYTES};
use report::{print_comparison, print_memory, print_result, print_settings};
use scrape::{ScrapeStats, Scraper};

/// The label of gateway runs with /metrics scraped meanwhile.
const GATEWAY_SCRAPED: &str = "gateway+scrape";
/// The scrape rate of --scrape-rounds when --scrape-rate is not given: ten times the usual
/// Prometheus interval of a second, an upper bound of what an operator would configure.
const DEFAULT_SCRAPE_RATE: f64 = 10.0;

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
    // Comparing scraped with unscraped runs is a run of the gateway alone.
    let echo_run = !args.no_echo && args.scrape_rounds.is_none();
    let scrape_rate = match (args.scrape_rate, args.scrape_rounds) {
        (rate, _) if rate > 0.0 => Some(rate),
        (_, Some(_)) => Some(DEFAULT_SCRAPE_RATE),
        _ => None,
    };
    if scrape_rate.is_some() && args.gateway_bin.is_none() && args.http_addr.is_none() {
        usage_error("scraping /metrics needs --gateway-bin or --http-addr");
    }
    // --gateway-bin: the daemon is ours, with its default settings (clap keeps --socket, --pid
    // and --echo-only out) and HTTP on a free port when it is to be scraped; its socket and
    // pid stand for --socket and --pid.
    let daemon = match &args.gateway_bin {
        Some(bin) => {
            let env = match scrape_rate {
                Some(_) => vec![("CGW_HTTP_ADDR".to_string(), "127.0.0.1:0".to_string())],
                None => Vec::new(),
            };
            Some(GatewayDaemon::start(bin, &env, &bench_payload(256)?)?)
        }
        None => None,
    };
    let http_addr = match (&daemon, args.http_addr) {
        (Some(d), _) if scrape_rate.is_some() => Some(d.http_addr()?),
        (_, addr) => addr,
    };
    let socket = daemon
        .as_ref()
        .map_or(args.socket.as_path(), GatewayDaemon::socket);
    let pid = daemon.as_ref().map(GatewayDaemon::pid).or(args.pid);
    if gateway_run {
        // Fail before any run, not after the echo baseline, if the gateway is not there.
        drop(connect(socket, "gateway")?);
    }
    if let Some(pid) = args.pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--pid {pid}: no such process");
        }
    }

    print_settings(&args, &load, frame_len, outstanding, socket);
    if let (Some(d), Some(bin)) = (&daemon, &args.gateway_bin) {
        println!(
            "  daemon       {} (pid {}), started by the bench",
            bin.display(),
            d.pid()
        );
    }
    if let Some(pid) = pid {
        print_memory(pid, "before");
    }

    if let (Some(rounds), Some(rate), Some(addr)) = (args.scrape_rounds, scrape_rate, http_addr) {
        let ok = scrape_rounds(rounds, rate, addr, socket, &load)?;
        finish(pid, daemon);
        return Ok(ok);
    }
    let mut runs: Vec<RunResult> = Vec::with_capacity(3);
    let echoes_first = echo_run && (args.echo_first || !gateway_run);
    if echoes_first {
        runs.push(run_echo(ECHO, &load)?);
        runs.push(run_echo(ECHO_1T, &load)?);
    }
    if gateway_run {
        let scraper = scrape_rate
            .zip(http_addr)
            .map(|(rate, addr)| Scraper::start(addr, rate));
        let target = if scraper.is_some() {
            GATEWAY_SCRAPED
        } else {
            GATEWAY
        };
        let result = run_load(target, socket, &load);
        if let Some(stats) = scraper.map(Scraper::finish) {
            print_scrapes(&stats);
        }
        runs.push(result?);
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
    finish(pid, daemon);
    let failed = runs.iter().any(|r| !r.failures.is_empty());
    if failed {
        eprintln!("ipc-gateway-bench: some connections failed during the run (see FAILED above)");
    }
    Ok(!failed)
}

/// One line about the scrapes of a run; the `SCRAPES` line is for scripts.
fn print_scrapes(s: &ScrapeStats) {
    println!(
        "SCRAPES ok={} failed={} body_bytes={} mean_ms={:.2} max_ms={:.2}",
        s.ok,
        s.failed,
        s.last_bytes,
        s.mean().as_secs_f64() * 1e3,
        s.slowest.as_secs_f64() * 1e3
    );
    if let Some(e) = &s.first_error {
        println!("  first scrape error: {e}");
    }
}

/// `--scrape-rounds`: each round runs the gateway once without and once with scraping, in an
/// order that alternates by round; prints each round's ratio and the overall one (the sum of
/// the scraped runs' requests/s over the sum of the unscraped runs'), and the median ratio.
/// Returns false if a run or a scrape failed.
fn scrape_rounds(
    rounds: u32,
    rate: f64,
    addr: std::net::SocketAddr,
    socket: &Path,
    load: &Load,
) -> Result<bool> {
    println!("  scraping     GET http://{addr}/metrics {rate}/s, {rounds} rounds");
    let mut ratios = Vec::new();
    let (mut sum_off, mut sum_on) = (0.0, 0.0);
    let mut ok = true;
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        let (mut off, mut on) = (0.0, 0.0);
        for scraped in order {
            let scraper = scraped.then(|| Scraper::start(addr, rate));
            let target = if scraped { GATEWAY_SCRAPED } else { GATEWAY };
            let result = run_load(target, socket, load)?;
            print_result(&result);
            if let Some(stats) = scraper.map(Scraper::finish) {
                print_scrapes(&stats);
                ok &= stats.failed == 0 && stats.ok > 0;
            }
            ok &= result.failures.is_empty();
            if scraped {
                on = result.rps();
            } else {
                off = result.rps();
            }
        }
        let ratio = if off > 0.0 { on / off } else { 0.0 };
        println!("ROUND {round} scrape_off_rps={off:.1} scrape_on_rps={on:.1} ratio={ratio:.4}");
        ratios.push(ratio);
        sum_off += off;
        sum_on += on;
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let overall = if sum_off > 0.0 { sum_on / sum_off } else { 0.0 };
    println!();
    println!(
        "SCRAPE_COST rounds={rounds} rate={rate} overall_ratio={overall:.4} median_ratio={median:.4} \
         min_ratio={:.4} max_ratio={:.4}",
        ratios[0],
        ratios[ratios.len() - 1]
    );
    if !ok {
        eprintln!("ipc-gateway-bench: a run or a scrape failed (see above)");
    }
    Ok(ok)
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

/// After the runs: the daemon's memory, and our own daemon stopped.
fn finish(pid: Option<u32>, daemon: Option<GatewayDaemon>) {
    if let Some(pid) = pid {
        println!();
        print_memory(pid, "after");
    }
    if let Some(d) = daemon {
        let pid = d.pid();
        println!("daemon pid {pid} stopped: {}", d.stop());
    }
}
