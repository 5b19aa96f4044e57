//! `ipc-gateway-chaos`: a chaos soak of the real daemon in NATS mode (issue "Availability
//! under faults", item 3).
//!
//! It starts a 3-node nats-server cluster on loopback, a few Router doubles (router-double)
//! and the daemon (`CGW_IPC_NATS_ENABLE=1`, every node in `CGW_IPC_NATS_URL`, default breaker,
//! `CGW_IPC_TIMEOUT_MS` 5000 unless `--timeout-ms`), puts a steady pipelined load on it, and
//! injects faults on a schedule drawn from `--seed` (schedule.rs): nodes killed, frozen and
//! put in lame duck mode, doubles crashed, slow and duplicate replies, client churn, garbage
//! frames, clients that never read. An outside observer (observer.rs) checks gateway.md
//! section 1 on every reply of the well-behaved clients; the end state (nothing in flight,
//! fds and RSS back to baseline) and a shutdown under load are checked after the chaos.
//! Exit status: 0 no violation, 1 violations (listed), 2 the harness itself failed.

mod clients;
mod infra;
mod observer;
mod report;
mod sampler;
mod schedule;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipc_gateway_tests::daemon::{self, own_profile, target_dir, try_rss_kb, Daemon};
use ipc_gateway_tests::nats_load::{
    fd_listing, nats_connected_count, try_fd_count, try_stats, Load, LoadConfig, LoadResult, Record,
};
use ipc_gateway_tests::nats_server::{self, NatsCluster, LAME_DUCK_CONFIG};
use ipc_gateway_tests::router_double;
use ipc_gateway_tests::secure_nats::{tls_cluster_with, Auth, ClientCreds, TestPki};
use rustix::process::Signal;
use serde_json::{json, Value};

use crate::clients::{Mode, Traffic};
use crate::infra::{pause, Infra};
use crate::observer::Observer;
use crate::sampler::Sample;
use crate::schedule::{Kind, Planned, Rng, Shape};

/// How late after its deadline a reply may come (gateway.md section 1: "a small scheduling
/// slack"; a loaded 2-core machine).
const LATE_SLACK: Duration = Duration::from_secs(1);
/// The cluster's size.
const NODES: usize = 3;
/// The password users of `--tls`: the daemon's and the doubles'.
const TLS_GATEWAY_USER: (&str, &str) = ("gateway", "chaos-gateway-pass");
const TLS_DOUBLE_USER: (&str, &str) = ("router-double", "chaos-double-pass");

/// The daemon's drain timeout (CGW_IPC_DRAIN_MS default), for the wait at shutdown.
const DRAIN: Duration = Duration::from_secs(30);
/// Generous bound for setup steps that normally take milliseconds.
const SETUP_WITHIN: Duration = Duration::from_secs(30);

/// Chaos soak of ipc-gateway in NATS mode: a 3-node nats-server cluster on loopback, Router
/// doubles, pipelined clients, and faults on a seeded schedule; checks the invariants of
/// gateway.md section 1 from the outside.
///
/// The run: setup and warm-up, then SECS seconds of faults (the schedule is printed first),
/// then the end-state checks (in-flight 0, open fds back to the baseline exactly, RSS within
/// --rss-slack-mib of the baseline taken under load after a warm-up that includes one client
/// that never reads, so the heap has reached its working size) and a SIGTERM under
/// load (exit 0; error 6 allowed from then on). A progress line comes every few seconds.
///
/// Every reply to a well-behaved client must be the one reply to its request, in order
/// (the Router double echoes the request's unique id), OK or error 5 or 8, and no later than
/// the request timeout + 1 s. Misbehaving clients must get what ipc-protocol.md names.
///
/// Output in --out (default: the cargo target directory's chaos/): summary.txt, samples.csv
/// (one row a second: RSS, fds, in-flight, throughput, breaker, NATS state, active faults),
/// plot.svg (the same, with the faults shaded), schedule.txt, daemon.log, nats-node*.log.
///
/// Exit status: 0 no violation; 1 violations (listed in the summary); 2 the harness failed
/// (a nats-server or double that would not start), which says nothing about the gateway.
///
/// The daemon and router-double binaries are built like the tests build them, with this
/// binary's profile (release under `cargo run --release`); IPC_GATEWAY_BIN and
/// ROUTER_DOUBLE_BIN override them; NATS_SERVER_BIN overrides nats-server on PATH.
#[derive(Parser, Debug)]
#[command(name = "ipc-gateway-chaos", verbatim_doc_comment)]
struct Args {
    /// Seed of the fault schedule and of every per-request choice.
    #[arg(long, env = "CHAOS_SEED", default_value_t = 1)]
    seed: u64,
    /// Length of the chaos phase in seconds (setup, warm-up and the end checks add about 15 s).
    #[arg(long, env = "CHAOS_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..))]
    secs: u64,
    /// Directory for the outputs [default: <target dir>/chaos].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Well-behaved client connections.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=32))]
    clients: u64,
    /// Requests each well-behaved client keeps outstanding (at most the daemon's
    /// per-connection in-flight limit, 10).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=10))]
    window: u64,
    /// Pause of a client between windows, in ms (paces the load: about clients × window /
    /// pause requests per second).
    #[arg(long, default_value_t = 100)]
    pause_ms: u64,
    /// Router double instances (each replies to every request: no queue group).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=8))]
    doubles: u64,
    /// The daemon's request timeout (CGW_IPC_TIMEOUT_MS), lowered from the 30 s default so
    /// that timeouts happen within a run.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    timeout_ms: u64,
    /// How far above its baseline (under load, after a warm-up that includes one
    /// never-reader) the daemon's RSS may be at the end, in MiB.
    #[arg(long, default_value_t = 8)]
    rss_slack_mib: u64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    progress_secs: u64,
    /// Print the schedule for the seed and exit.
    #[arg(long)]
    schedule_only: bool,
    /// Secure the NATS link (gateway.md section 9): TLS with a test CA (a certificate per
    /// node) and password users, the daemon's and the doubles' own.
    #[arg(long)]
    tls: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // A helper that panics (a nats-server that will not restart) is a harness failure:
    // report it as one, after the processes have been dropped (killed).
    match panic::catch_unwind(AssertUnwindSafe(|| run(&args))) {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::from(1),
        Ok(Err(e)) => {
            eprintln!("ipc-gateway-chaos: harness error (no verdict on the gateway): {e:#}");
            ExitCode::from(2)
        }
        Err(panic) => {
            eprintln!(
                "ipc-gateway-chaos: harness error (no verdict on the gateway): {}",
                panic_text(&*panic)
            );
            ExitCode::from(2)
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs everything; `Ok(true)` when no invariant was violated.
fn run(args: &Args) -> Result<bool> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("chaos"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let shape = Shape {
        secs: args.secs,
        nodes: NODES,
        doubles: args.doubles as usize,
    };
    let plan = schedule::generate(args.seed, shape);
    let schedule_text = plan
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n");
    println!(
        "ipc-gateway-chaos: seed {}, {} s of chaos; schedule (seconds after the chaos starts):\n{schedule_text}",
        args.seed, args.secs
    );
    std::fs::write(out.join("schedule.txt"), format!("{schedule_text}\n"))
        .context("writing schedule.txt")?;
    if args.schedule_only {
        return Ok(true);
    }

    let nats = nats_server::binary();
    let version = std::process::Command::new(&nats).arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        bail!(
            "cannot run {} --version: install nats-server (Debian: apt-get install nats-server) \
             or point NATS_SERVER_BIN at one",
            nats.display()
        );
    }
    let gateway_bin = daemon::binary();
    let double_bin = router_double::binary();
    println!(
        "binaries ({:?} profile): {}, {}",
        own_profile(),
        gateway_bin.display(),
        double_bin.display()
    );
    let run_start = Instant::now();
    let obs = Arc::new(Observer::new(run_start, ms(args.timeout_ms) + LATE_SLACK));

    // The cluster, with lame duck durations short enough for a run.
    let conf_dir = tempfile::tempdir().context("creating a temporary directory")?;
    let conf = conf_dir.path().join("lame-duck.conf");
    std::fs::write(&conf, LAME_DUCK_CONFIG).context("writing the nats-server config")?;
    let conf_arg = conf.to_string_lossy().into_owned();
    let timeout = args.timeout_ms.to_string();
    let mut env: Vec<(String, String)> = vec![
        ("CGW_IPC_NATS_ENABLE".into(), "1".into()),
        ("CGW_IPC_TIMEOUT_MS".into(), timeout),
    ];
    let (cluster, double_creds) = if args.tls {
        let pki = TestPki::create(conf_dir.path());
        let auth = Auth::users(&[TLS_DOUBLE_USER, TLS_GATEWAY_USER]);
        let cluster = tls_cluster_with(conf_dir.path(), &pki, NODES, &auth, LAME_DUCK_CONFIG);
        let urls = cluster.urls().replace("nats://", "tls://");
        env.extend([
            ("CGW_IPC_NATS_URL".into(), urls),
            (
                "CGW_IPC_NATS_TLS_CA".into(),
                pki.ca.to_string_lossy().into_owned(),
            ),
            ("CGW_IPC_NATS_USER".into(), TLS_GATEWAY_USER.0.into()),
            ("CGW_IPC_NATS_PASSWORD".into(), TLS_GATEWAY_USER.1.into()),
        ]);
        let creds = ClientCreds::default()
            .ca(&pki.ca)
            .user_pass(TLS_DOUBLE_USER.0, TLS_DOUBLE_USER.1);
        (cluster, creds)
    } else {
        let cluster = NatsCluster::start_with_args(NODES, &["-c", &conf_arg]);
        env.push(("CGW_IPC_NATS_URL".into(), cluster.urls()));
        (cluster, ClientCreds::default())
    };
    let mut infra = Infra::start_doubles(cluster, args.doubles as usize, double_creds)
        .map_err(anyhow::Error::msg)
        .context("starting the Router doubles")?;
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut daemon = Daemon::start(&env_refs);
    let setup = format!(
        "{NODES}-node nats-server cluster{}, {} router doubles, daemon pid {} with \
         CGW_IPC_TIMEOUT_MS={} and default breaker; {} clients, window {}, {} ms between windows",
        if args.tls {
            " (TLS with a test CA, password users)"
        } else {
            ""
        },
        args.doubles,
        daemon.pid(),
        args.timeout_ms,
        args.clients,
        args.window,
        args.pause_ms
    );
    println!("{setup}");
    wait_for("the daemon connects to NATS", SETUP_WITHIN, || {
        nats_connected_count(&daemon) >= 1
    })?;
    let pid = daemon.pid();
    // The readiness probe's connection must be gone from the daemon before fds are counted.
    settle(&daemon, SETUP_WITHIN).map_err(|last| {
        anyhow::anyhow!(
            "the daemon did not settle before the load (no connection, NATS connected): {last}"
        )
    })?;
    let fds_baseline = try_fd_count(pid).map_err(anyhow::Error::msg)?;
    let fds_listing_baseline = fd_listing(pid);

    let traffic = Arc::new(Traffic::default());
    let stop_sampler = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let mut end_state = Vec::new();
    let mut harness_error = None;
    let mut chaos_from = 0.0;
    let mut rss_baseline = 0;
    let mut load_result = LoadResult::default();

    thread::scope(|scope| {
        scope.spawn(|| {
            sampler::run(
                &daemon,
                &obs,
                &samples,
                &stop_sampler,
                &abort,
                Duration::from_secs(args.progress_secs),
            )
        });
        let load = start_load(args, &daemon, &obs, &traffic);
        let result = (|| -> Result<()> {
            wait_for("100 OK replies (warm-up)", SETUP_WITHIN, || {
                load.ok_count() >= 100 || abort.load(Ordering::SeqCst)
            })?;
            // A never-reader grows the daemon's heap by its output cap (8 MiB), which the
            // allocator keeps after the connection is closed: grow it once before the
            // baseline, so that the end check measures growth, not the first high-water mark.
            let until = Instant::now() + Duration::from_secs(20);
            let note = clients::never_reader(daemon.socket_path(), until, 0)
                .map_err(anyhow::Error::msg)
                .context("the warm-up never-reader")?;
            println!(
                "[{:6.1}s] warm-up never-reader: {note}",
                obs.secs(Instant::now())
            );
            let oks = load.ok_count();
            wait_for(
                "10 OK replies after the warm-up never-reader",
                SETUP_WITHIN,
                || load.ok_count() >= oks + 10 || abort.load(Ordering::SeqCst),
            )?;
            rss_baseline = try_rss_kb(pid).map_err(anyhow::Error::msg)?;
            let chaos_start = Instant::now();
            chaos_from = obs.secs(chaos_start);
            println!(
                "[{chaos_from:6.1}s] chaos starts (baseline: {fds_baseline} fds idle, RSS {:.1} MiB under load)",
                rss_baseline as f64 / 1024.0
            );
            let garbage_threads = thread::scope(|inner| {
                let traffic_track = inner.spawn(|| {
                    traffic_track(
                        &plan,
                        chaos_start,
                        daemon.socket_path(),
                        &traffic,
                        &obs,
                        &abort,
                    )
                });
                let infra_result =
                    infra_track(&plan, chaos_start, &mut infra, &daemon, &obs, &abort);
                if infra_result.is_err() {
                    abort.store(true, Ordering::SeqCst);
                }
                pause(
                    (chaos_start + Duration::from_secs(args.secs))
                        .saturating_duration_since(Instant::now()),
                    &abort,
                );
                let threads = traffic_track.join().unwrap_or_default();
                infra_result.map(|()| threads)
            })?;
            println!(
                "[{:6.1}s] chaos over; stopping the load",
                obs.secs(Instant::now())
            );
            for t in garbage_threads {
                let _ = t.join();
            }
            Ok(())
        })();
        load_result = load.finish();
        if let Err(e) = result {
            harness_error = Some(format!("{e:#}"));
        }
        if harness_error.is_none() && !abort.load(Ordering::SeqCst) {
            end_state = check_end_state(
                args,
                &daemon,
                &obs,
                fds_baseline,
                &fds_listing_baseline,
                rss_baseline,
            );
        }
        stop_sampler.store(true, Ordering::SeqCst);
    });
    for f in &load_result.failures {
        obs.violation_at(f.at, "client", f.to_string());
    }

    // SIGTERM under load: every reply still valid (error 6 allowed), exit 0.
    let mut records = load_result.records;
    // Recovery is measured on the chaos load only, not on the shutdown's.
    if harness_error.is_none() && !abort.load(Ordering::SeqCst) {
        let (line, shutdown_records) = shutdown_under_load(args, &mut daemon, &obs);
        end_state.push(line);
        records.extend(shutdown_records);
    }
    let run_secs = report::since(run_start);

    // Evidence: the logs of everything.
    std::fs::write(out.join("daemon.log"), daemon.stderr()).context("writing daemon.log")?;
    drop(daemon);
    for i in 0..NODES {
        let log = infra.cluster.node(i).log();
        std::fs::write(out.join(format!("nats-node{i}.log")), log)
            .with_context(|| format!("writing nats-node{i}.log"))?;
    }
    drop(infra);

    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    let faults = report::fault_rows(obs.faults(), &records, &obs);
    let last_stats = samples.iter().rev().find_map(|s| s.stats.clone());
    let totals = report::Totals {
        seed: args.seed,
        secs: args.secs,
        chaos_from,
        run_secs,
        setup,
        end_state,
        daemon_counters: daemon_counters(last_stats.as_ref()),
        harness_error: harness_error.clone(),
    };
    let violations = obs.violations();
    let summary = report::summary(&totals, &records, &faults, &violations);
    let title = format!(
        "ipc-gateway-chaos seed {} ({} s of chaos, timeout {} ms): {} violations",
        args.seed,
        args.secs,
        args.timeout_ms,
        violations.len()
    );
    report::write_csv(&out.join("samples.csv"), &samples, &records, &faults, &obs)?;
    report::write_svg(
        &out.join("plot.svg"),
        &title,
        &samples,
        &records,
        &faults,
        &obs,
    )
    .context("drawing plot.svg")?;
    std::fs::write(out.join("summary.txt"), &summary).context("writing summary.txt")?;
    println!("\n{summary}");
    println!(
        "outputs in {}: summary.txt samples.csv plot.svg schedule.txt daemon.log nats-node*.log",
        out.display()
    );
    if let Some(e) = harness_error {
        bail!("{e}");
    }
    Ok(violations.is_empty())
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Polls `cond` every 20 ms for up to `within`.
fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The well-behaved load: every reply judged by the observer as it comes.
fn start_load(args: &Args, daemon: &Daemon, obs: &Arc<Observer>, traffic: &Arc<Traffic>) -> Load {
    let mut config = LoadConfig::new(
        daemon.socket_path().to_path_buf(),
        args.clients as usize,
        args.window as usize,
        clients::well_behaved_payload(args.seed, args.timeout_ms, Arc::clone(traffic)),
        clients::echo_check(),
    );
    config.idle_pause = ms(args.pause_ms);
    let obs = Arc::clone(obs);
    config.on_record = Some(Arc::new(move |r: &Record| obs.record(r)));
    Load::start_with(config)
}

/// Waits until `p` is due (or the run is aborted: then `false`) and announces it.
fn wait_for_turn(p: &Planned, chaos_start: Instant, obs: &Observer, abort: &AtomicBool) -> bool {
    pause(
        (chaos_start + p.at).saturating_duration_since(Instant::now()),
        abort,
    );
    if abort.load(Ordering::SeqCst) {
        return false;
    }
    println!("[{:6.1}s] fault {p}", obs.secs(Instant::now()));
    true
}

/// The infrastructure faults, one after the other, each no earlier than planned.
fn infra_track(
    plan: &[Planned],
    chaos_start: Instant,
    infra: &mut Infra,
    daemon: &Daemon,
    obs: &Observer,
    abort: &AtomicBool,
) -> Result<()> {
    for p in plan.iter().filter(|p| p.kind.is_infra()) {
        if !wait_for_turn(p, chaos_start, obs, abort) {
            break;
        }
        match panic::catch_unwind(AssertUnwindSafe(|| infra.run(p, daemon, obs, abort))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("fault #{} ({}): {e}", p.index, p.kind),
            Err(panic) => bail!("fault #{} ({}): {}", p.index, p.kind, panic_text(&*panic)),
        }
    }
    Ok(())
}

/// The traffic faults, one after the other; returns the garbage clients' threads (a partial
/// frame waits for the daemon's read timeout), to join.
fn traffic_track(
    plan: &[Planned],
    chaos_start: Instant,
    socket: &Path,
    traffic: &Traffic,
    obs: &Arc<Observer>,
    abort: &AtomicBool,
) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for p in plan.iter().filter(|p| !p.kind.is_infra()) {
        if !wait_for_turn(p, chaos_start, obs, abort) {
            break;
        }
        let slot = obs.fault_started(p, p.target.to_string());
        let rng = Rng::new(p.seed);
        let until = Instant::now() + p.duration;
        match p.kind {
            Kind::SlowReplies | Kind::DuplicateReplies => {
                let mode = if p.kind == Kind::SlowReplies {
                    Mode::Slow
                } else {
                    Mode::Duplicate
                };
                traffic.set(mode);
                pause(p.duration, abort);
                traffic.set(Mode::Normal);
            }
            Kind::ClientChurn => {
                let (connections, requests) = clients::churn(socket, rng, until, obs);
                obs.fault_note(
                    slot,
                    format!("{connections} connections, {requests} requests"),
                );
            }
            Kind::GarbageFrames => {
                let (handles, names) = clients::garbage(socket, rng, p.count, obs);
                obs.fault_note(slot, names.join(", "));
                threads.extend(handles);
            }
            Kind::NeverReader => match clients::never_reader(socket, until, p.seed) {
                Ok(note) => obs.fault_note(slot, note),
                Err(e) => obs.violation("never_reader", e),
            },
            other => obs.violation("harness", format!("{other} on the traffic track")),
        }
        obs.fault_ended(slot);
    }
    threads
}

/// Waits until the daemon holds nothing: no client connection, nothing in flight, nothing
/// waiting for NATS or in its reconnect buffer, NATS connected. Returns the stats line that
/// showed it, or the last one seen.
fn settle(daemon: &Daemon, within: Duration) -> Result<Value, Value> {
    let mut last = Value::Null;
    let settled = wait_for("the daemon settles", within, || {
        last = try_stats(daemon, Duration::from_secs(5)).unwrap_or(Value::Null);
        let zero = |k: &str| last[k] == json!(0);
        let ok = zero("connections")
            && zero("inflight")
            && zero("upstream_pending")
            && zero("reconnect_buffer_bytes")
            && last["nats_state"] == json!("connected");
        if !ok {
            thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    settled.map(|()| last.clone()).map_err(|_| last)
}

/// After the chaos, with the load stopped: the daemon settles (nothing in flight, no
/// connection, NATS connected), its fds come back to the baseline exactly and its RSS to
/// within the slack. Returns the lines for the summary; what fails is a violation.
fn check_end_state(
    args: &Args,
    daemon: &Daemon,
    obs: &Observer,
    fds_baseline: usize,
    fds_listing_baseline: &str,
    rss_baseline: u64,
) -> Vec<String> {
    let mut lines = Vec::new();
    let pid = daemon.pid();
    // Slow replies cannot keep a request in flight past its deadline.
    let within = obs.deadline + Duration::from_secs(10);
    let started = Instant::now();
    match settle(daemon, within) {
        Ok(_) => lines.push(format!(
            "settled {:.1}s after the load stopped: in-flight 0, connections 0, upstream pending 0, reconnect buffer 0, NATS connected",
            started.elapsed().as_secs_f64()
        )),
        Err(last) => obs.violation(
            "end",
            format!("the daemon did not settle within {within:?} after the load stopped (no leak: in-flight, connections, upstream pending, reconnect buffer 0; NATS connected): {last}"),
        ),
    }
    // Closing sockets is asynchronous in the daemon: give the count a moment to come back.
    let mut fds = None;
    let _ = wait_for("fds back to the baseline", Duration::from_secs(5), || {
        fds = try_fd_count(pid).ok();
        fds == Some(fds_baseline)
    });
    let fds_text = fds.map_or("?".to_owned(), |f| f.to_string());
    lines.push(format!(
        "open fds {fds_baseline} (idle, before the load) -> {fds_text} (allowed: exactly the baseline)"
    ));
    if fds != Some(fds_baseline) {
        obs.violation(
            "end",
            format!(
                "open fds {fds_text}, baseline {fds_baseline}\nbaseline:\n{fds_listing_baseline}\nnow:\n{}",
                fd_listing(pid)
            ),
        );
    }
    let rss = try_rss_kb(pid).unwrap_or(0);
    let allowed = rss_baseline + args.rss_slack_mib * 1024;
    lines.push(format!(
        "RSS {:.1} MiB (under load, after warm-up) -> {:.1} MiB idle (allowed: {:.1} MiB, +{} MiB)",
        rss_baseline as f64 / 1024.0,
        rss as f64 / 1024.0,
        allowed as f64 / 1024.0,
        args.rss_slack_mib
    ));
    if rss > allowed {
        obs.violation(
            "end",
            format!("RSS {rss} KiB at the end, baseline {rss_baseline} KiB, allowed {allowed} KiB"),
        );
    }
    lines
}

/// SIGTERM with two clients pipelining: every reply valid (error 6 allowed from the signal
/// on), the daemon exits 0 within the drain timeout. Returns the summary line and the
/// records.
fn shutdown_under_load(
    args: &Args,
    daemon: &mut Daemon,
    obs: &Arc<Observer>,
) -> (String, Vec<Record>) {
    let traffic = Arc::new(Traffic::default());
    let mut config = LoadConfig::new(
        daemon.socket_path().to_path_buf(),
        2,
        args.window as usize,
        clients::well_behaved_payload(args.seed ^ 0x5d, args.timeout_ms, traffic),
        clients::echo_check(),
    );
    // Paced like the main load: a breaker still open after the chaos answers at once, and an
    // unpaced client would spin on error 8.
    config.idle_pause = ms(args.pause_ms);
    let hook_obs = Arc::clone(obs);
    config.on_record = Some(Arc::new(move |r: &Record| hook_obs.record(r)));
    let load = Load::start_with(config);
    if wait_for("20 OK replies before SIGTERM", SETUP_WITHIN, || {
        load.ok_count() >= 20
    })
    .is_err()
    {
        obs.violation(
            "shutdown",
            "no traffic flowed after the chaos (20 OK replies not within 30 s)",
        );
    }
    obs.begin_shutdown();
    load.expect_shutdown();
    let signalled = Instant::now();
    if let Err(e) = daemon.try_signal(Signal::TERM) {
        obs.violation("shutdown", e);
    }
    let within = DRAIN + obs.deadline + Duration::from_secs(5);
    let mut status = None;
    let _ = wait_for("the daemon exits after SIGTERM", within, || {
        status = daemon.poll_exit();
        status.is_some()
    });
    let took = signalled.elapsed().as_secs_f64();
    let result = load.finish();
    for f in &result.failures {
        obs.violation_at(f.at, "shutdown client", f.to_string());
    }
    let line = match status {
        Some(s) if s.success() => format!(
            "SIGTERM under load: exit 0 after {took:.2}s; {} replies; left unanswered when the daemon closed: {} requests ({} of them written before the SIGTERM)",
            result.records.len(),
            result.unanswered_at_shutdown,
            result.unanswered_sent_before_shutdown
        ),
        Some(s) => {
            obs.violation("shutdown", format!("the daemon exited with {s} after SIGTERM"));
            format!("SIGTERM under load: {s} after {took:.2}s")
        }
        None => {
            obs.violation("shutdown", format!("the daemon still runs {within:?} after SIGTERM"));
            format!("SIGTERM under load: still running after {within:?}")
        }
    };
    if status.is_some() && !daemon.stderr().contains("\"event\":\"shutdown_complete\"") {
        obs.violation("shutdown", "no shutdown_complete log line");
    }
    (line, result.records)
}

/// The daemon's own counters from its last stats line.
fn daemon_counters(stats: Option<&Value>) -> String {
    let Some(s) = stats else {
        return "no stats line".to_owned();
    };
    let keys = [
        "requests",
        "router_timeouts",
        "late_replies",
        "duplicate_replies",
        "unknown_replies",
        "no_responders",
        "failed_on_disconnect",
        "reconnects",
        "backpressure_rejections",
    ];
    keys.iter()
        .map(|k| format!("{k} {}", s[*k]))
        .collect::<Vec<_>>()
        .join(", ")
}
