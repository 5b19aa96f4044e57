//! The command line: every option of both modes (the NATS ones are in `nats::NatsArgs`), their
//! parsers, and the usage errors that clap cannot see.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipc_gateway_tests::frame::HEADER_LEN;

use crate::load::{MIN_PAYLOAD, PAYLOAD_HEAD, PAYLOAD_TAIL};
use crate::nats;

/// The gateway's socket unless --socket says otherwise (ipc-protocol.md section 1).
const DEFAULT_SOCKET: &str = "/tmp/beamline-gateway.sock";
/// The largest payload that fits a 4 MiB frame (ipc-protocol.md section 2).
const MAX_PAYLOAD: usize = 4 * 1024 * 1024 - HEADER_LEN;

/// Load generator for ipc-gateway: N connections, each keeping P TASK_SUBMIT requests in
/// flight, with per-request latency percentiles. By default it also runs the same load against
/// two bare framed echo servers in this process and prints the gateway's ratio to each:
/// "echo", thread per connection (the reference floor, free to use every core), and "echo-1t",
/// a single-threaded mio event loop like the gateway's (the floor for a one-thread server, so
/// the gateway's ratio to it is the cost of its own code).
///
/// Only the measured window (after the warmup) counts: requests/s is the number of RESPONSE_OK
/// replies received in it divided by its length, and latencies are those of these replies.
/// Any other reply type is counted as an error and reported, never fatal.
///
/// Every run ends by itself: no new request is written after the window, and connections whose
/// replies are still missing 2 s later are cut off (reported as STALLED). The echo servers
/// return each frame as it came, except for the type byte, set to RESPONSE_OK. The exit status
/// is 1 if the gateway cannot be reached or a connection broke during a run, 2 for bad options.
///
/// --mode nats starts its own nats-server (on a free loopback port), a Router stand-in
/// (async-nats, replying to every request with a small success JSON) and the daemon with
/// CGW_IPC_NATS_ENABLE=1, then for each --pipeline setting runs the IPC load through the
/// gateway and the same load sent directly with async-nats request(), N clients each with P
/// requests in flight, and prints both, the ratio gateway/direct, the CPU each process used and
/// the daemon's RSS. If the daemon cannot start, the direct path is still measured (exit 1).
#[derive(Parser, Debug)]
#[command(name = "ipc-gateway-bench", version)]
pub(crate) struct Args {
    /// Path of the gateway's Unix socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,

    /// Number of connections, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) connections: u32,

    /// Requests kept outstanding on each connection: P are written at the start, then one new
    /// request for every reply [default: 16; with --mode nats, 1,16]. --mode nats takes a
    /// comma-separated list and runs each setting in turn.
    #[arg(long, value_name = "P", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) pipeline: Option<Vec<u32>>,

    /// Size in bytes of each TASK_SUBMIT payload, a JSON object padded to exactly this size
    /// (at least 25, the size of `{"task":"bench","pad":""}`). The frame adds a 6-byte header.
    #[arg(long, value_name = "S", default_value_t = 256, value_parser = parse_payload_size)]
    pub(crate) payload_size: usize,

    /// Length of the measured window in seconds (fractions allowed, e.g. 2.5).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration,
          allow_negative_numbers = true)]
    pub(crate) duration: Duration,

    /// Seconds of load before the measured window, left out of every figure.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_warmup,
          allow_negative_numbers = true)]
    pub(crate) warmup: Duration,

    /// Pid of the gateway daemon: its peak RSS (VmHWM) and current RSS (VmRSS) from
    /// /proc/PID/status are printed before and after the load.
    #[arg(long, value_name = "PID")]
    pub(crate) pid: Option<u32>,

    /// The daemon executable. --mode nats always starts one [default there: ipc-gateway in the
    /// directory of this bench's executable; build it with `cargo build --release -p
    /// ipc-gateway`]. In stub mode, only if given: the bench starts it with its default settings
    /// on a socket in a temporary directory, loads it instead of --socket, prints its memory as
    /// --pid does, and stops it at the end.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["socket", "pid", "echo_only"])]
    pub(crate) gateway_bin: Option<PathBuf>,

    /// Skip both echo baselines: load the gateway only.
    #[arg(long, conflicts_with = "echo_only")]
    pub(crate) no_echo: bool,

    /// Run only the two echo baselines, echo then echo-1t (no gateway needed; --socket is
    /// ignored).
    #[arg(long)]
    pub(crate) echo_only: bool,

    /// Run both echo baselines (echo, then echo-1t) before the gateway rather than after it.
    #[arg(long, conflicts_with_all = ["no_echo", "echo_only"])]
    pub(crate) echo_first: bool,

    /// Give each connection a reader and a writer thread. The default is one thread that
    /// writes a batch of requests, then reads the replies (cheaper, so closer to the server's
    /// own cost); split I/O is chosen anyway when P × (S + 6) exceeds 64 KiB, where one thread
    /// could block in a write while the server blocks writing replies to it.
    #[arg(long)]
    pub(crate) split_io: bool,

    /// `stub`: load a daemon in its default stub mode (already running at --socket, or started
    /// with --gateway-bin) and the echo floors.
    /// `nats`: start nats-server, a Router stand-in and the daemon in NATS mode, and compare the
    /// gateway path with the same load sent directly over NATS (see the options below).
    #[arg(long, value_enum, default_value_t = Mode::Stub)]
    pub(crate) mode: Mode,

    /// Scrape the daemon's GET /metrics this many times a second during each gateway run (0:
    /// never), on a fresh connection each time, and report the scrapes. Needs --gateway-bin
    /// (the bench then starts the daemon with HTTP on a free loopback port) or --http-addr.
    #[arg(long, value_name = "N", default_value_t = 0.0, value_parser = parse_rate)]
    pub(crate) scrape_rate: f64,

    /// Where the daemon at --socket serves HTTP (its CGW_HTTP_ADDR), for scraping.
    #[arg(long, value_name = "ADDR", conflicts_with = "gateway_bin")]
    pub(crate) http_addr: Option<SocketAddr>,

    /// What scraping costs: K rounds of two gateway runs each, one without scraping and one
    /// scraping at --scrape-rate (10 a second if unset), the order alternating by round so
    /// that drift over the run weighs on both alike. Prints every run, each round's ratio
    /// (scraped / not scraped requests/s) and the overall one. No echo runs.
    #[arg(long, value_name = "K", conflicts_with = "echo_only",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) scrape_rounds: Option<u32>,

    #[command(flatten)]
    pub(crate) nats: nats::NatsArgs,
}

/// What the bench measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The daemon at --socket (or started with --gateway-bin) against the two echo floors.
    Stub,
    /// The gateway's NATS path against async-nats request-reply, both to the same stand-in.
    Nats,
}

fn parse_payload_size(text: &str) -> Result<usize, String> {
    let size: usize = text.parse().map_err(|e| format!("not a byte count: {e}"))?;
    if size < MIN_PAYLOAD {
        return Err(format!(
            "{size} bytes is too small: the payload is a JSON object of at least {MIN_PAYLOAD} \
             bytes ({PAYLOAD_HEAD}{PAYLOAD_TAIL})"
        ));
    }
    if size > MAX_PAYLOAD {
        let most = MAX_PAYLOAD;
        return Err(format!("{size} bytes is too large: at most {most}"));
    }
    Ok(size)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|e| format!("not a number: {e}"))?;
    if !(0.0..=1000.0).contains(&rate) {
        return Err(format!("{text} is not between 0 and 1000 scrapes a second"));
    }
    Ok(rate)
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let parsed = text.parse::<f64>();
    let secs = parsed.map_err(|e| format!("not a number of seconds: {e}"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{text} is not between 0 and 86400 seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_seconds(text)?;
    if duration < Duration::from_millis(1) {
        return Err("the measured window must be at least 0.001 s".to_string());
    }
    Ok(duration)
}

fn parse_warmup(text: &str) -> Result<Duration, String> {
    parse_seconds(text)
}

/// Reports a bad combination of options the way clap reports its own errors (exit status 2).
pub(crate) fn usage_error(message: &str) -> ! {
    let mut command = <Args as clap::CommandFactory>::command();
    command
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}
