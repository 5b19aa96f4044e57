//! `latency`: one connection measures PING and small-task round trips, one at a time, first on
//! the idle daemon and then while N other connections hammer it with pipelined load. The same
//! connection in both phases, so the ratio is the cost of sharing the daemon's thread.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use ipc_gateway_tests::frame::{self, PING, PONG, RESPONSE_OK};
use ipc_gateway_tests::launch::admit_all_env;

use super::client::{self, Tally};
use super::{
    client_runtime, cpu_line, machine_line, new_histogram, percentiles, raise_own_fd_limit, ratio,
    wait_settled, Common, Mode, Progress, Rig, RigSpec,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Connections hammering the daemon while the one connection measures.
    #[arg(long, value_name = "N", default_value_t = 999,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    hammer: u32,

    /// The hammering load; the measured task has the same payload size.
    #[command(flatten)]
    shape: client::Shape,

    /// Round trips measured in each phase (idle, loaded), PING and small task alternately.
    #[arg(long, value_name = "N", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(2..))]
    samples: u64,

    /// A phase also ends after this many seconds, with fewer round trips. Under full load one
    /// round trip waits for a whole turn of the daemon over every hammering connection: tens
    /// of ms with 999 of them in stub mode, over 100 ms in NATS mode.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_secs: u64,

    /// Seconds of hammering before the loaded phase is measured.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    warmup: u64,

    /// The modes to run, in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "stub")]
    mode: Vec<Mode>,
}

/// The measuring connection's round trips of one phase.
struct Phase {
    ping: Histogram<u64>,
    task: Histogram<u64>,
    secs: f64,
}

pub fn run(common: &Common, args: &Args) -> Result<bool> {
    raise_own_fd_limit(u64::from(args.hammer) + 64)?;
    let mut ok = true;
    for &mode in &args.mode {
        ok &= run_mode(common, args, mode)?;
    }
    Ok(ok)
}

fn run_mode(common: &Common, args: &Args, mode: Mode) -> Result<bool> {
    let hammer = args.hammer as usize;
    let pipeline = args.shape.pipeline as usize;
    let payload = client::payload(args.shape.payload_size as usize, "");
    let mut rig = Rig::start(
        common,
        RigSpec {
            mode,
            env: admit_all_env(hammer + 1, pipeline),
            standin_late: None,
            probe: &payload,
        },
    )?;
    println!();
    println!(
        "== latency, {} mode: 1 measuring connection, {hammer} hammering with {pipeline} in \
         flight each, {}-byte payloads, {} round trips per phase ==",
        mode.name(),
        args.shape.payload_size,
        args.samples
    );
    println!("  {}", machine_line());
    println!("  {}", rig.describe());

    let mut probe = UnixStream::connect(rig.socket()).context("the measuring connection")?;
    probe.set_read_timeout(Some(Duration::from_secs(30)))?;
    let task = client::submit(&payload);
    let limit = Duration::from_secs(args.max_secs);
    let idle = measure(&mut probe, &task, args.samples, limit)?;

    let rt = client_runtime(common)?;
    let streams = client::connect_all(&rt, rig.socket(), hammer)?;
    let tally = Tally::new();
    let stop = Arc::new(AtomicBool::new(false));
    let request = Arc::new(task.clone());
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let (request, stop, tally) =
                (Arc::clone(&request), Arc::clone(&stop), Arc::clone(&tally));
            rt.spawn(client::pipelined(s, request, pipeline, None, stop, tally))
        })
        .collect();
    // Every hammering connection has had a reply, then the warmup.
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.started.load(Ordering::Relaxed) < hammer as u64 {
        if Instant::now() >= deadline {
            bail!(
                "the hammering connections did not all get a reply within 60 s: {}",
                tally.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(args.warmup));
    let before = tally.ok.load(Ordering::Relaxed);
    let cpu_from = rig.meter.snapshot();
    let loaded = {
        let tally = Arc::clone(&tally);
        let _progress = Progress::start(common.progress, move |secs| {
            format!(
                "latency {}: {secs:.0} s into the loaded phase, hammer {} OK",
                mode.name(),
                tally.ok.load(Ordering::Relaxed)
            )
        });
        measure(&mut probe, &task, args.samples, limit)?
    };
    let hammered = tally.ok.load(Ordering::Relaxed) - before;
    let cpu = cpu_line(&rig.meter, &cpu_from);
    stop.store(true, Ordering::SeqCst);
    rt.block_on(futures::future::join_all(tasks));
    rig.check_alive()?;

    println!(
        "  {:<28} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "round trip (us)", "count", "p50", "p99", "p99.9", "max"
    );
    let rows = [
        ("PING, idle daemon", &idle.ping),
        ("PING, under load", &loaded.ping),
        ("small task, idle daemon", &idle.task),
        ("small task, under load", &loaded.task),
    ];
    for (name, h) in rows {
        let [p50, p99, p999, max] = percentiles(h);
        let count = h.len();
        println!("  {name:<28} {count:>7} {p50:>8} {p99:>8} {p999:>8} {max:>8}");
    }
    for (name, a, b) in [
        ("PING", &loaded.ping, &idle.ping),
        ("small task", &loaded.task, &idle.task),
    ] {
        let (x, y) = (percentiles(a), percentiles(b));
        println!(
            "  ratio loaded/idle, {name:<10}  p50 {}, p99 {}, p99.9 {}",
            ratio(x[0] as f64, y[0] as f64),
            ratio(x[1] as f64, y[1] as f64),
            ratio(x[2] as f64, y[2] as f64)
        );
    }
    println!(
        "  hammer       {:.0} requests/s during the loaded phase ({:.2} s); {}",
        hammered as f64 / loaded.secs,
        loaded.secs,
        tally.describe()
    );
    println!("  {cpu}");
    drop(probe);
    let (stats, settled) = wait_settled(&rig, Duration::from_secs(30))?;
    println!("  after        {}", super::stats_summary(&stats));
    for (kind, idle_h, loaded_h) in [
        ("ping", &idle.ping, &loaded.ping),
        ("task", &idle.task, &loaded.task),
    ] {
        let (i, l) = (percentiles(idle_h), percentiles(loaded_h));
        println!(
            "RESULT part=latency mode={} kind={kind} hammer={hammer} pipeline={pipeline} \
             idle_p50_us={} idle_p99_us={} idle_p999_us={} loaded_p50_us={} loaded_p99_us={} \
             loaded_p999_us={}",
            mode.name(),
            i[0],
            i[1],
            i[2],
            l[0],
            l[1],
            l[2]
        );
    }
    println!("  daemon stopped: {}", rig.stop());
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(settled && tally.failed.load(Ordering::Relaxed) == 0)
}

/// `samples` round trips on `conn`, PING and `task` alternately, one at a time, or fewer if
/// `limit` passes first.
fn measure(conn: &mut UnixStream, task: &[u8], samples: u64, limit: Duration) -> Result<Phase> {
    let ping = frame::encode(PING, &[]);
    let (mut ping_h, mut task_h) = (new_histogram(), new_histogram());
    let start = Instant::now();
    for i in 0..samples {
        if start.elapsed() >= limit && i >= 2 {
            break;
        }
        let (bytes, hist, want) = if i % 2 == 0 {
            (&ping[..], &mut ping_h, PONG)
        } else {
            (task, &mut task_h, RESPONSE_OK)
        };
        let at = Instant::now();
        conn.write_all(bytes)
            .context("writing on the measuring connection")?;
        let reply = frame::read_frame(conn)
            .context("reading on the measuring connection")?
            .context("the daemon closed the measuring connection")?;
        let micros = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
        hist.saturating_record(micros);
        if reply.kind != want {
            bail!(
                "the measuring connection got type 0x{:02X} where 0x{want:02X} was due: {}",
                reply.kind,
                String::from_utf8_lossy(&reply.payload)
            );
        }
    }
    // Nothing may be left unread.
    conn.set_nonblocking(true)?;
    let extra = conn.read(&mut [0u8; 1]);
    conn.set_nonblocking(false)?;
    if matches!(extra, Ok(n) if n > 0) {
        bail!("the measuring connection got more replies than requests");
    }
    Ok(Phase {
        ping: ping_h,
        task: task_h,
        secs: start.elapsed().as_secs_f64(),
    })
}
