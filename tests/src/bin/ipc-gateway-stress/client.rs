//! Client connections on one tokio runtime: many connections cost a task each, not a thread,
//! so the load generator does not crowd the daemon off a small machine.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use ipc_gateway_tests::frame::{self, Frame, HEADER_LEN, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{lock, new_histogram};

/// The shape of a pipelined load, as the parts that drive one take it.
#[derive(clap::Args, Debug)]
pub struct Shape {
    /// Requests in flight on each loading connection.
    #[arg(long, value_name = "P", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub pipeline: u32,

    /// Bytes of each TASK_SUBMIT payload (a JSON object).
    #[arg(long, value_name = "S", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(12..=1_000_000))]
    pub payload_size: u64,
}

/// Reads one frame; `Ok(None)` at a clean end of stream before a header byte.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if length < HEADER_LEN {
        let message = format!("frame length {length}");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    let mut payload = vec![0u8; length - HEADER_LEN];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        version: header[4],
        kind: header[5],
        payload,
    }))
}

/// The error code of a RESPONSE_ERROR frame (0 if it has none).
pub fn error_code(reply: &Frame) -> u64 {
    serde_json::from_slice::<serde_json::Value>(&reply.payload)
        .ok()
        .and_then(|v| v["error"]["code"].as_u64())
        .unwrap_or(0)
}

/// Is a whole frame waiting at the start of `buf`? (A malformed length counts as "yes": the
/// next read reports it.)
fn frame_waiting(buf: &[u8]) -> bool {
    !matches!(frame::complete_frame_len(buf), Ok(None))
}

/// A TASK_SUBMIT payload: a JSON object of exactly `size` bytes (at least 12), holding `mark`
/// (a `"key":"value"` pair, or empty).
pub fn payload(size: usize, mark: &str) -> Vec<u8> {
    let head = if mark.is_empty() {
        r#"{"pad":""#.to_string()
    } else {
        format!(r#"{{{mark},"pad":""#)
    };
    let mut out = head.into_bytes();
    let pad = size.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(br#""}"#);
    out
}

/// Replies counted over every connection of a run.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    /// Every other reply, by error code (0: a reply type other than RESPONSE_OK/ERROR).
    pub errors: Mutex<BTreeMap<u64, u64>>,
    /// Connections that ended in an I/O error or an early close, with the first few reasons.
    pub failed: AtomicU64,
    pub failures: Mutex<Vec<String>>,
    /// Connections that got at least one reply.
    pub started: AtomicU64,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally::default())
    }

    pub fn count(&self, reply: &Frame) {
        if reply.kind == RESPONSE_OK {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            let code = if reply.kind == RESPONSE_ERROR {
                error_code(reply)
            } else {
                0
            };
            *lock(&self.errors).entry(code).or_default() += 1;
        }
    }

    pub fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut list = lock(&self.failures);
        if list.len() < 5 {
            list.push(why);
        }
    }

    pub fn error_count(&self) -> u64 {
        lock(&self.errors).values().sum()
    }

    /// `N OK, errors: code 7 x12, ...; K connections failed: why...`.
    pub fn describe(&self) -> String {
        let errors: Vec<String> = lock(&self.errors)
            .iter()
            .map(|(code, n)| format!("code {code} x{n}"))
            .collect();
        let mut text = format!(
            "{} OK, {} errors{}",
            self.ok.load(Ordering::Relaxed),
            self.error_count(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join(", "))
            }
        );
        let failed = self.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let why = lock(&self.failures).join("; ");
            text += &format!("; {failed} connections FAILED: {why}");
        }
        text
    }
}

/// Opens `n` connections with blocking connects (a full listen backlog makes a blocking
/// connect wait, where a non-blocking one would fail), then hands them to the runtime.
pub fn connect_all(rt: &tokio::runtime::Runtime, path: &Path, n: usize) -> Result<Vec<UnixStream>> {
    let _guard = rt.enter();
    (0..n)
        .map(|i| {
            let std = StdStream::connect(path)
                .with_context(|| format!("connection {i} to {}", path.display()))?;
            std.set_nonblocking(true)?;
            UnixStream::from_std(std).context("registering a connection with tokio")
        })
        .collect()
}

/// One pipelined connection: keeps `pipeline` copies of `request` (one encoded frame) in
/// flight until `count` were sent (`None`: until `stop`), reads every reply and records its
/// latency. Ends after the last reply; an I/O error or a close ends it early (counted as a
/// failure unless `stop` was set).
pub async fn pipelined(
    stream: UnixStream,
    request: Arc<Vec<u8>>,
    pipeline: usize,
    count: Option<u64>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Histogram<u64> {
    let mut hist = new_histogram();
    if let Err(e) = drive(stream, &request, pipeline, count, &stop, &tally, &mut hist).await {
        if !stop.load(Ordering::Relaxed) {
            tally.fail(e.to_string());
        }
    }
    hist
}

async fn drive(
    stream: UnixStream,
    request: &[u8],
    pipeline: usize,
    count: Option<u64>,
    stop: &AtomicBool,
    tally: &Tally,
    hist: &mut Histogram<u64>,
) -> io::Result<()> {
    let batch = request.repeat(pipeline);
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, rd);
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(pipeline);
    let mut written = 0u64;
    let more = |written: u64| !stop.load(Ordering::Relaxed) && count.is_none_or(|c| written < c);
    let mut to_send = count.map_or(pipeline, |c| pipeline.min(c as usize));
    let mut first = true;
    loop {
        // Write what is owed in one batch, unless a reply is already buffered: take that
        // first, so that one write carries several requests.
        if to_send > 0 && (sent.is_empty() || !frame_waiting(reader.buffer())) {
            wr.write_all(&batch[..to_send * request.len()]).await?;
            let now = Instant::now();
            sent.extend(std::iter::repeat_n(now, to_send));
            written += to_send as u64;
            to_send = 0;
        }
        let Some(at) = sent.pop_front() else {
            return Ok(());
        };
        let Some(reply) = read_frame(&mut reader).await? else {
            let missing = sent.len() + 1;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the daemon closed the connection with {missing} replies missing"),
            ));
        };
        let micros = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
        hist.saturating_record(micros);
        tally.count(&reply);
        if first {
            first = false;
            tally.started.fetch_add(1, Ordering::Relaxed);
        }
        if more(written + to_send as u64) {
            to_send += 1;
        }
    }
}

/// A whole TASK_SUBMIT frame for `payload`.
pub fn submit(payload: &[u8]) -> Vec<u8> {
    frame::encode(TASK_SUBMIT, payload)
}
