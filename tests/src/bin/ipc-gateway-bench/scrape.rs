//! Scraping `/metrics` during a gateway run, to measure what a Prometheus server costs the IPC
//! path (`--scrape-rate`, `--scrape-rounds`).
//!
//! One thread GETs `/metrics` at a fixed rate on a fresh connection each time (as Prometheus
//! does when keep-alive is off, the more expensive case: an accept and a close per scrape),
//! reads the whole response and counts it. The daemon serves HTTP on its one event-loop thread
//! beside the IPC clients, so whatever a scrape costs is taken from them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipc_gateway_tests::http_client;

/// How long one scrape may take before it counts as failed.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the scraping thread saw.
#[derive(Debug, Default)]
pub(crate) struct ScrapeStats {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    /// Body bytes of the last successful scrape.
    pub(crate) last_bytes: usize,
    /// The slowest successful scrape, from connect to the end of the body.
    pub(crate) slowest: Duration,
    pub(crate) total: Duration,
    pub(crate) first_error: Option<String>,
}

impl ScrapeStats {
    pub(crate) fn mean(&self) -> Duration {
        if self.ok == 0 {
            Duration::ZERO
        } else {
            self.total / u32::try_from(self.ok).unwrap_or(u32::MAX)
        }
    }
}

/// A running scraper; [`Scraper::finish`] stops it.
pub(crate) struct Scraper {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<ScrapeStats>,
}

impl Scraper {
    /// Starts scraping `addr` `rate` times a second, the first scrape at once.
    pub(crate) fn start(addr: SocketAddr, rate: f64) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let handle = thread::spawn(move || {
            let mut stats = ScrapeStats::default();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    // Short naps, so that finish() does not wait a whole interval.
                    thread::sleep((next - now).min(Duration::from_millis(20)));
                    continue;
                }
                // A fixed schedule, not "interval after the last one": a slow scrape does not
                // lower the rate; missed slots are skipped rather than fired in a burst.
                next += interval;
                if next < now {
                    next = now + interval;
                }
                let started = Instant::now();
                match scrape_once(addr) {
                    Ok(bytes) => {
                        let took = started.elapsed();
                        stats.ok += 1;
                        stats.last_bytes = bytes;
                        stats.total += took;
                        stats.slowest = stats.slowest.max(took);
                    }
                    Err(e) => {
                        stats.failed += 1;
                        stats.first_error.get_or_insert(e);
                    }
                }
            }
            stats
        });
        Scraper { stop, handle }
    }

    /// Stops scraping and returns what was seen.
    pub(crate) fn finish(self) -> ScrapeStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_else(|_| ScrapeStats {
            first_error: Some("the scraping thread panicked".to_string()),
            ..ScrapeStats::default()
        })
    }
}

/// One `GET /metrics` on a fresh connection, read to the end (the request says
/// `Connection: close`); returns the body's length.
fn scrape_once(addr: SocketAddr) -> Result<usize, String> {
    let response = http_client::get(addr, "/metrics", None, SCRAPE_TIMEOUT)?;
    if response.status != 200 {
        return Err(format!("GET /metrics answered {}", response.status));
    }
    Ok(response.body.len())
}
