//! The core's own cost per request, without sockets: 8 connections, 16 pipelined 256-byte
//! TASK_SUBMIT frames per "read", stub upstream, output consumed as a shell would.
//!
//! Baseline in the same run: decoding the same frames and encoding a reply frame of the same
//! size (the least any gateway must do). Prints ns/request for both and the ratio, so the figure
//! survives a noisy, shared machine. Run: `cargo bench -p ipc-gateway-core --bench core_throughput`.

// A benchmark is a shell around the core: reading the wall clock is its job.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant as WallClock};

use ipc_gateway_core::frame::{encode_frame, kind, FrameDecoder, MAX_FRAME_BYTES};
use ipc_gateway_core::stub::{StubConfig, StubUpstream};
use ipc_gateway_core::{Gateway, GatewayConfig, Instant, PeerCredentials};

const CONNECTIONS: usize = 8;
const PIPELINE: usize = 16;
const PAYLOAD: usize = 256;
const ROUNDS: usize = 40_000;

fn payload() -> Vec<u8> {
    let head = br#"{"task":"bench","pad":""#;
    let mut p = head.to_vec();
    p.extend(std::iter::repeat_n(b'x', PAYLOAD - head.len() - 2));
    p.extend_from_slice(b"\"}");
    p
}

fn batch() -> Vec<u8> {
    let frame = encode_frame(kind::TASK_SUBMIT, &payload());
    frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * PIPELINE)
        .collect()
}

fn gateway_run(batch: &[u8]) -> Duration {
    let mut gw: Gateway<StubUpstream> =
        Gateway::new(GatewayConfig::default(), StubConfig::default());
    let now = Instant::ZERO;
    let conns: Vec<_> = (0..CONNECTIONS)
        .map(|_| gw.handle_client_opened(PeerCredentials::default(), now))
        .collect();
    let start = WallClock::now();
    let mut written = 0usize;
    for _ in 0..ROUNDS {
        for &c in &conns {
            gw.handle_client_bytes(c, batch, now);
        }
        while gw.poll_action().is_some() {}
        for &c in &conns {
            let n: usize = gw.client_output(c).map(<[u8]>::len).sum();
            written += n;
            gw.handle_client_written(c, n, now);
        }
    }
    black_box(written);
    start.elapsed()
}

fn baseline_run(batch: &[u8]) -> Duration {
    let reply_len = 70 + PAYLOAD;
    let reply_body = vec![b'x'; reply_len];
    let mut decoders: Vec<FrameDecoder> = (0..CONNECTIONS)
        .map(|_| FrameDecoder::new(MAX_FRAME_BYTES))
        .collect();
    let start = WallClock::now();
    let mut written = 0usize;
    for _ in 0..ROUNDS {
        for d in &mut decoders {
            d.push(batch);
            while let Ok(Some(f)) = d.next_frame() {
                black_box(&f);
                written += encode_frame(kind::RESPONSE_OK, &reply_body).len();
            }
        }
    }
    black_box(written);
    start.elapsed()
}

fn main() {
    let batch = batch();
    let requests = (ROUNDS * CONNECTIONS * PIPELINE) as f64;
    // Warm up both, then take the best of three to damp a shared machine's noise.
    let _ = (gateway_run(&batch), baseline_run(&batch));
    let best = |f: &dyn Fn() -> Duration| (0..3).map(|_| f()).min().unwrap_or_default();
    let gw = best(&|| gateway_run(&batch));
    let base = best(&|| baseline_run(&batch));
    let ns = |d: Duration| d.as_nanos() as f64 / requests;
    println!("core_throughput: {CONNECTIONS} connections x {PIPELINE} pipelined x {PAYLOAD}-byte payloads, {requests} requests, best of 3");
    println!(
        "  gateway core (validate, admit, in-flight, stub, order, output)  {:8.1} ns/request",
        ns(gw)
    );
    println!(
        "  baseline (decode + encode a reply frame only)                  {:8.1} ns/request",
        ns(base)
    );
    println!("  ratio core/baseline = {:.2}", ns(gw) / ns(base));
}
