//! What the stub mode prints: the settings, each run's figures, the table of all runs and the
//! gateway's ratios to the echo floors, and the daemon's memory (shared with the NATS mode).

use std::path::Path;
use std::thread;

use anyhow::{Context, Result};
use ipc_gateway_tests::figures::ratio;

use crate::cli::Args;
use crate::echo::{ECHO, ECHO_1T};
use crate::load::{Load, RunResult, GATEWAY};

/// The settings of a stub-mode run, before any load: `frame_len` is the size of one request
/// frame, `outstanding` the request bytes in flight on each connection, `socket` the gateway's.
pub(crate) fn print_settings(
    args: &Args,
    load: &Load,
    frame_len: usize,
    outstanding: usize,
    socket: &Path,
) {
    let gateway_run = !args.echo_only;
    let echo_run = !args.no_echo;
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
        println!("  gateway      {}", socket.display());
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
}

pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
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

pub(crate) fn print_memory(pid: u32, when: &str) {
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
pub(crate) fn print_counts(r: &RunResult, counted: &str) {
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
pub(crate) fn print_run_notes(r: &RunResult) {
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

pub(crate) fn print_result(r: &RunResult) {
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
pub(crate) fn print_comparison(runs: &[&RunResult]) {
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
