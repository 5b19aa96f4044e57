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

use cli::{usage_error, Args, Mode};
use echo::{run_echo, ECHO, ECHO_1T};
use load::{bench_payload, connect, run_load, Load, RunResult, GATEWAY, SINGLE_THREAD_MAX_BYTES};
use report::{print_comparison, print_memory, print_result, print_settings};

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
    let echo_run = !args.no_echo;
    // --gateway-bin: the daemon is ours, with its default settings (clap keeps --socket, --pid
    // and --echo-only out); its socket and pid stand for --socket and --pid.
    let daemon = match &args.gateway_bin {
        Some(bin) => Some(GatewayDaemon::start(bin, &[], &bench_payload(256)?)?),
        None => None,
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

    let mut runs: Vec<RunResult> = Vec::with_capacity(3);
    let echoes_first = echo_run && (args.echo_first || !gateway_run);
    if echoes_first {
        runs.push(run_echo(ECHO, &load)?);
        runs.push(run_echo(ECHO_1T, &load)?);
    }
    if gateway_run {
        runs.push(run_load(GATEWAY, socket, &load)?);
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
    if let Some(pid) = pid {
        println!();
        print_memory(pid, "after");
    }
    if let Some(d) = daemon {
        let pid = d.pid();
        println!("daemon pid {pid} stopped: {}", d.stop());
    }
    let failed = runs.iter().any(|r| !r.failures.is_empty());
    if failed {
        eprintln!("ipc-gateway-bench: some connections failed during the run (see FAILED above)");
    }
    Ok(!failed)
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
