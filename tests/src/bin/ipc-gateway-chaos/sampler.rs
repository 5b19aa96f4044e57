//! Once a second: the daemon's RSS and open fds (from /proc) and its `stats` line (SIGUSR1:
//! in-flight, connections, breaker, NATS state …); a progress line every few seconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{try_rss_kb, Daemon};
use ipc_gateway_tests::nats_load::{try_fd_count, try_stats};
use serde_json::Value;

use crate::observer::Observer;

/// How long the daemon may take to log its stats line after SIGUSR1 before the sample says
/// it did not (the event loop is stuck, or the daemon is gone).
const STATS_WITHIN: Duration = Duration::from_secs(5);

/// One sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the start of the run.
    pub t: f64,
    pub rss_kib: Option<u64>,
    pub fds: Option<usize>,
    pub stats: Option<Value>,
}

impl Sample {
    pub fn stat_u64(&self, key: &str) -> Option<u64> {
        self.stats.as_ref()?[key].as_u64()
    }

    pub fn stat_str(&self, key: &str) -> Option<&str> {
        self.stats.as_ref()?[key].as_str()
    }
}

/// Takes one sample now.
pub fn sample(daemon: &Daemon, obs: &Observer) -> Result<Sample, String> {
    let pid = daemon.pid();
    let stats = try_stats(daemon, STATS_WITHIN);
    let sample = Sample {
        t: obs.secs(Instant::now()),
        rss_kib: try_rss_kb(pid).ok(),
        fds: try_fd_count(pid).ok(),
        stats: stats.as_ref().ok().cloned(),
    };
    stats.map(|_| sample)
}

/// Samples every second until `stop`; prints a progress line every `progress`. A daemon that
/// stops answering (gone, or its event loop stuck) is a violation and sets `abort`.
pub fn run(
    daemon: &Daemon,
    obs: &Observer,
    samples: &Mutex<Vec<Sample>>,
    stop: &AtomicBool,
    abort: &AtomicBool,
    progress: Duration,
) {
    let mut next = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_replies = 0u64;
    while !stop.load(Ordering::SeqCst) {
        match sample(daemon, obs) {
            Ok(s) => {
                if last_progress.elapsed() >= progress {
                    let replies: u64 = obs.outcomes().values().sum();
                    let rate =
                        (replies - last_replies) as f64 / last_progress.elapsed().as_secs_f64();
                    println!("{}", progress_line(&s, obs, rate));
                    last_progress = Instant::now();
                    last_replies = replies;
                }
                lock(samples).push(s);
            }
            Err(e) => {
                obs.violation("daemon", format!("not answering: {e}"));
                abort.store(true, Ordering::SeqCst);
                return;
            }
        }
        next += Duration::from_secs(1);
        while !stop.load(Ordering::SeqCst) && Instant::now() < next {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn progress_line(s: &Sample, obs: &Observer, rate: f64) -> String {
    let outcomes = obs.outcomes();
    let count = |k: &str| outcomes.get(k).copied().unwrap_or(0);
    let active = obs.active_faults();
    format!(
        "[{:6.1}s] replies {} (ok {}, e5 {}, e8 {}) {:.0}/s | in-flight {} conns {} | rss {:.1} MiB fds {} | breaker {} nats {} {} | violations {} | now: {}",
        s.t,
        outcomes.values().sum::<u64>(),
        count("ok"),
        count("error 5"),
        count("error 8"),
        rate,
        s.stat_u64("inflight").unwrap_or(0),
        s.stat_u64("connections").unwrap_or(0),
        s.rss_kib.unwrap_or(0) as f64 / 1024.0,
        s.fds.unwrap_or(0),
        s.stat_str("breaker").unwrap_or("?"),
        s.stat_str("nats_state").unwrap_or("?"),
        s.stat_str("nats_server").unwrap_or(""),
        obs.violation_count(),
        if active.is_empty() { "-".to_owned() } else { active.join(", ") }
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
