//! `memory`: clients push maximum-size frames as fast as the daemon takes them and never read a
//! reply, more clients than the connection limit, for `--secs`. The stub Router holds each
//! reply for `--stub-delay-ms`, so every connection fills its in-flight slots with maximum-size
//! requests, then its output queue up to the unsent-bytes cap, and is closed; its client
//! reconnects and does it again. The daemon's peak RSS is compared with a bound computed from
//! its configuration; then the clients leave and RSS is watched falling back.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipc_gateway_tests::daemon::status_kb;

use super::client;
use super::{machine_line, mib, plot, wait_settled, Common, Mode, Progress, Rig, RigSpec, Sampler};

/// The daemon's read buffer: how many bytes one read may add beyond a whole frame
/// (`READ_SLACK` in the core).
const READ_SLACK: u64 = 64 * 1024;
/// Room for what the daemon holds that no limit governs: the allocator's own bookkeeping and
/// rounding, the log writer, the in-flight table and slot queues.
const BASE_HEADROOM_KB: u64 = 16 * 1024;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The daemon's connection limit (CGW_IPC_MAX_CONNECTIONS); --extra-clients more clients
    /// than this push frames.
    #[arg(long, value_name = "C", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,

    /// Clients beyond the connection limit (they are refused with error 7 until a slot frees).
    #[arg(long, value_name = "N", default_value_t = 8)]
    extra_clients: u64,

    /// The largest frame, header included (CGW_IPC_MAX_FRAME_BYTES); every frame pushed is this
    /// large.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(64..=4 * 1024 * 1024))]
    frame_bytes: u64,

    /// Reply bytes held for one client (CGW_IPC_MAX_UNSENT_BYTES).
    #[arg(long, value_name = "BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    unsent_bytes: u64,

    /// Requests in flight per connection (CGW_IPC_MAX_INFLIGHT_PER_CONN).
    #[arg(long, value_name = "P", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    inflight_per_conn: u64,

    /// Requests in flight in the whole daemon (CGW_IPC_MAX_INFLIGHT).
    #[arg(long, value_name = "I", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_inflight: u64,

    /// How long the stub Router holds each reply (CGW_IPC_STUB_DELAY_MS), so that requests
    /// stay in flight.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    stub_delay_ms: u64,

    /// Seconds the clients push.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    secs: u64,

    /// Seconds RSS is watched after the clients left and the daemon settled.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    settle_secs: u64,
}

/// The memory bound and its parts, in kB.
struct Bound {
    base: u64,
    per_connection: u64,
    in_flight: u64,
    total: u64,
}

/// What the daemon may hold at most, from its configuration (see the module documentation of
/// the core's `connection` and `frame` modules):
///
/// - per connection: the decoder's buffer, at most a frame plus one read, which may have
///   grown by doubling to twice that (2 (F + S)); the output queue, up to the unsent-bytes cap
///   plus the reply that crossed it (U + F);
/// - per request in flight, at most min(C x P, I) of them: the stub's reply, as large as the
///   frame (F);
/// - a base: the idle daemon's RSS plus a fixed headroom.
fn bound(args: &Args, idle_kb: u64) -> Bound {
    let (c, f, u) = (args.connections, args.frame_bytes, args.unsent_bytes);
    let per_connection = (2 * (f + READ_SLACK) + u + f) / 1024;
    let requests = (c * args.inflight_per_conn).min(args.max_inflight);
    let in_flight = requests * f / 1024;
    let base = idle_kb + BASE_HEADROOM_KB;
    Bound {
        base,
        per_connection,
        in_flight,
        total: base + c * per_connection + in_flight,
    }
}

/// What the pushing clients saw.
#[derive(Default)]
struct Counts {
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Connections the daemon closed (output cap, or refused at the connection limit).
    closed: AtomicU64,
    connects: AtomicU64,
}

pub fn run(common: &Common, args: &Args) -> Result<bool> {
    let f = args.frame_bytes;
    let env = [
        ("CGW_IPC_MAX_CONNECTIONS", args.connections),
        ("CGW_IPC_MAX_FRAME_BYTES", f),
        ("CGW_IPC_MAX_UNSENT_BYTES", args.unsent_bytes),
        ("CGW_IPC_MAX_INFLIGHT_PER_CONN", args.inflight_per_conn),
        ("CGW_IPC_MAX_INFLIGHT", args.max_inflight),
        ("CGW_IPC_STUB_DELAY_MS", args.stub_delay_ms),
        ("CGW_IPC_TIMEOUT_MS", args.stub_delay_ms + 30_000),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    let mut rig = Rig::start(
        common,
        RigSpec {
            mode: Mode::Stub,
            env,
            standin_late: None,
            probe: b"{}",
        },
    )?;
    let pid = rig.pid();
    let clients = args.connections + args.extra_clients;
    println!();
    println!(
        "== memory: {clients} clients push {f}-byte frames and never read, for {} s ==",
        args.secs
    );
    println!("  {}", machine_line());
    println!("  {}", rig.describe());
    println!(
        "  limits       connections C={}, frame F={f}, unsent U={}, in flight per connection \
         P={}, in flight I={}, stub delay {} ms",
        args.connections,
        args.unsent_bytes,
        args.inflight_per_conn,
        args.max_inflight,
        args.stub_delay_ms
    );
    let idle = status_kb(pid, "VmRSS:").unwrap_or(0);
    let b = bound(args, idle);
    println!(
        "  bound        base + C x (2 (F + S) + U + F) + min(C x P, I) x F, S = {READ_SLACK} \
         (one read)"
    );
    println!(
        "               = {} ({} idle + {} headroom) + {} x {} + {} = {}",
        mib(b.base),
        mib(idle),
        mib(BASE_HEADROOM_KB),
        args.connections,
        mib(b.per_connection),
        mib(b.in_flight),
        mib(b.total)
    );

    let frame = Arc::new(client::submit(&client::payload(f as usize - 6, "")));
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let sampler = Sampler::start(pid, Duration::from_millis(100));
    let started = Instant::now();
    let pushers: Vec<_> = (0..clients)
        .map(|_| {
            let (frame, stop, counts) =
                (Arc::clone(&frame), Arc::clone(&stop), Arc::clone(&counts));
            let socket = rig.socket().to_path_buf();
            thread::spawn(move || push(&socket, &frame, &stop, &counts))
        })
        .collect();
    {
        let counts = Arc::clone(&counts);
        let samples = Arc::clone(&sampler.samples);
        let _progress = Progress::start(common.progress, move |secs| {
            let rss = super::lock(&samples).last().map_or(0, |s| s.rss_kb);
            format!(
                "memory: {secs:.0} s, {} frames pushed, {} connections closed by the daemon, \
                 daemon RSS {}",
                counts.frames.load(Ordering::Relaxed),
                counts.closed.load(Ordering::Relaxed),
                mib(rss)
            )
        });
        while started.elapsed() < Duration::from_secs(args.secs) && rig.check_alive().is_ok() {
            thread::sleep(Duration::from_millis(100));
        }
    }
    let peak = status_kb(pid, "VmHWM:").unwrap_or(0);
    stop.store(true, Ordering::SeqCst);
    for p in pushers {
        let _ = p.join();
    }
    let left = started.elapsed().as_secs_f64();
    rig.check_alive()?;
    let held = peak <= b.total;
    println!(
        "  pushed       {} frames ({}) in {:.1} s over {} connections; the daemon closed {}",
        counts.frames.load(Ordering::Relaxed),
        mib(counts.bytes.load(Ordering::Relaxed) / 1024),
        left,
        counts.connects.load(Ordering::Relaxed),
        counts.closed.load(Ordering::Relaxed)
    );
    println!(
        "  peak RSS     {} (VmHWM) against the bound {}: {} ({:.0}% of it)",
        mib(peak),
        mib(b.total),
        if held { "HELD" } else { "EXCEEDED" },
        peak as f64 * 100.0 / b.total as f64
    );

    let (stats, settled) = wait_settled(&rig, Duration::from_secs(args.stub_delay_ms / 1000 + 30))?;
    let settled_at = started.elapsed().as_secs_f64();
    println!(
        "  settled      {:.1} s after the clients left: {}",
        settled_at - left,
        super::stats_summary(&stats)
    );
    let watch_from = Instant::now();
    while watch_from.elapsed() < Duration::from_secs(args.settle_secs) {
        thread::sleep(Duration::from_millis(100));
    }
    let samples = sampler.finish();
    let after = status_kb(pid, "VmRSS:").unwrap_or(0);
    let returned =
        peak.saturating_sub(after) as f64 * 100.0 / peak.saturating_sub(idle).max(1) as f64;
    println!(
        "  RSS after    {} once settled and {} s quiet (idle was {}, peak {}): {:.0}% of the \
         growth given back",
        mib(after),
        args.settle_secs,
        mib(idle),
        mib(peak),
        returned
    );
    std::fs::create_dir_all(&common.out)
        .with_context(|| format!("creating {}", common.out.display()))?;
    let csv = common.out.join("memory.csv");
    let svg = common.out.join("memory.svg");
    plot::write_csv(&csv, &samples)?;
    let extras = plot::Extras {
        marks: vec![(left, "clients gone"), (settled_at, "settled")],
        rss_limit: Some((b.total, "bound from the configuration")),
        ..Default::default()
    };
    let title = "memory destruction: daemon RSS and descriptors";
    plot::write_svg(&svg, title, &samples, &extras)?;
    println!("  samples      {} and {}", csv.display(), svg.display());
    println!(
        "RESULT part=memory connections={} frame_bytes={f} unsent_bytes={} inflight_per_conn={} \
         max_inflight={} idle_rss_kb={idle} peak_rss_kb={peak} bound_kb={} held={held} \
         after_rss_kb={after}",
        args.connections, args.unsent_bytes, args.inflight_per_conn, args.max_inflight, b.total
    );
    println!("  daemon stopped: {}", rig.stop());
    Ok(held && settled)
}

/// One pushing client: connects, writes frames until the daemon closes the connection (or
/// refuses it), never reads, and connects again, until `stop`.
fn push(socket: &std::path::Path, frame: &[u8], stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut conn) = UnixStream::connect(socket) else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        counts.connects.fetch_add(1, Ordering::Relaxed);
        // Short write timeouts, so that a client blocked by a paused daemon sees `stop`.
        let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
        let mut offset = 0;
        let mut whole = 0u64;
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match conn.write(&frame[offset..]) {
                Ok(0) => break,
                Ok(n) => {
                    offset += n;
                    counts.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if offset == frame.len() {
                        offset = 0;
                        whole += 1;
                        counts.frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        counts.closed.fetch_add(1, Ordering::Relaxed);
        if whole == 0 {
            // Refused at the connection limit: try again a little later, not in a tight loop.
            thread::sleep(Duration::from_millis(20));
        }
    }
}
