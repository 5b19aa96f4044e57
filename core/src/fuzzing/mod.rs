//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the ordinary tests that replay
//! their committed corpus, so that stable `cargo test` exercises every corpus file.
//!
//! [`frame_decoder`] checks that the IPC decoder gives the same frames and the same error
//! whatever the split. [`gateway_events`] reads the input as a script of shell events
//! (connects, bytes, half-closes, hang-ups, partial writes, time jumps, shutdown) against a gateway with a
//! delayed stub upstream and small limits, and asserts the invariants of gateway.md section 1
//! that apply without NATS: exactly one reply per request frame, in order, each task reply
//! echoing its own request; nothing held once time has run out; limits never exceeded; no panic.
//! [`nats_decoder`] does for the NATS decoder what `frame_decoder` does for IPC, and
//! [`nats_session_events`] drives the NATS session from a script of socket events and server
//! operations.

mod nats_session;

pub use nats_session::nats_session_events;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::connection::{ConnId, ConnectionLimits};
use crate::frame::{kind, DecodeError, FrameDecoder, HEADER_LEN};
use crate::gateway::{Action, AllowedUids, Gateway, GatewayConfig, PeerCredentials};
use crate::stub::{StubConfig, StubUpstream};
use crate::time::Instant;
use crate::upstream::TaskKind;

/// Feeds `data` to a decoder whole and in pieces whose sizes come from `data` itself.
pub fn frame_decoder(data: &[u8]) {
    let max = 64 + data.first().copied().unwrap_or(0) as usize * 16;
    let whole = decode_all(data, &[data.len().max(1)], max);
    let split = decode_all(data, &split_sizes(data), max);
    assert_eq!(
        whole, split,
        "decoding depended on how the bytes were split"
    );
}

/// Piece sizes for the split half of a decoder check, taken from the input itself (1 to 7
/// bytes, cycling), so the fuzzer controls the splits too.
fn split_sizes(data: &[u8]) -> Vec<usize> {
    let sizes: Vec<usize> = data
        .iter()
        .take(16)
        .map(|b| (*b as usize % 7) + 1)
        .collect();
    if sizes.is_empty() {
        vec![1]
    } else {
        sizes
    }
}

/// `data` cut into consecutive pieces of the given sizes, cycling through them.
fn pieces<'a>(data: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = data;
    sizes.iter().cycle().map_while(move |&n| {
        if rest.is_empty() {
            return None;
        }
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

type Decoded = (Vec<(u8, Vec<u8>)>, Option<DecodeError>);

fn decode_all(data: &[u8], sizes: &[usize], max: usize) -> Decoded {
    let mut d = FrameDecoder::new(max);
    let mut frames = Vec::new();
    for piece in pieces(data, sizes) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() + HEADER_LEN <= max.max(HEADER_LEN));
                    frames.push((f.kind, f.payload.to_vec()));
                }
                Ok(None) => {
                    assert!(
                        d.buffered_len() < max,
                        "decoder holds a whole frame it did not return"
                    );
                    break;
                }
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

/// What the simulated client of one connection expects back.
#[derive(Debug, Default)]
struct Peer {
    /// Bytes the "socket" holds that the gateway has not read yet (it paused reading).
    unread: VecDeque<u8>,
    /// Independent decode of what the client sent: one expected reply per frame.
    sent: Option<FrameDecoder>,
    expected: VecDeque<Expect>,
    /// Reply bytes received so far, decoded as they complete.
    received: Vec<u8>,
    stream_failed: bool,
    gone: bool,
    /// The client shut down its sending side; the gateway learns it once `unread` is empty.
    eof: bool,
    eof_sent: bool,
    /// A readiness edge is pending: new bytes arrived, the client half-closed, or the gateway
    /// said `ResumeRead`. Like the mio shell, the driver reads only then, so a gateway that
    /// forgets `ResumeRead` after a pause leaves bytes unread and fails the final checks.
    readable: bool,
    /// The gateway announced output with `Transmit` and it is not all written yet. The driver
    /// writes only then, so a missing `Transmit` stalls the replies.
    transmitting: bool,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Pong,
    Capabilities,
    /// A task: a stub echo of this payload, or an error frame.
    Task(Vec<u8>),
    /// The error frame that ends the stream, with this code.
    Error(u16),
}

/// Drives a whole gateway from an arbitrary byte script; panics on a violated invariant.
pub fn gateway_events(data: &[u8]) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let delay_ms = u64::from(next().unwrap_or(0) % 50);
    let config = GatewayConfig {
        max_connections: 3,
        max_inflight: 6,
        connection: ConnectionLimits {
            max_frame_bytes: 256,
            max_inflight: 2,
            read_timeout: Duration::from_millis(300),
            max_unsent_bytes: 2048,
        },
        request_timeout: Duration::from_millis(40),
        drain_timeout: Duration::from_millis(100),
        allowed_uids: AllowedUids::Any,
        seed: 7,
        ..GatewayConfig::default()
    };
    let stub = StubConfig {
        delay: Duration::from_millis(delay_ms),
    };
    let mut gw: Gateway<StubUpstream> = Gateway::new(config, stub);
    let mut now = Instant::ZERO;
    let mut peers: BTreeMap<ConnId, Peer> = BTreeMap::new();
    let mut order: Vec<ConnId> = Vec::new();
    let mut shut_down = false;
    let mut cap_closes_seen = 0u64;

    while let Some(op) = next() {
        let pick = |peers: &BTreeMap<ConnId, Peer>, order: &[ConnId], b: Option<u8>| {
            let live: Vec<ConnId> = order
                .iter()
                .copied()
                .filter(|c| peers.get(c).is_some_and(|p| !p.gone))
                .collect();
            (!live.is_empty()).then(|| live[b.unwrap_or(0) as usize % live.len()])
        };
        match op % 7 {
            0 if !shut_down => {
                let id = gw.handle_client_opened(
                    PeerCredentials {
                        uid: Some(1),
                        gid: Some(1),
                        pid: Some(2),
                    },
                    now,
                );
                let mut peer = Peer {
                    sent: Some(FrameDecoder::new(256)),
                    ..Peer::default()
                };
                if peer_refused(&gw, id) {
                    peer.expected.push_back(Expect::Error(0));
                    peer.sent = None;
                }
                peers.insert(id, peer);
                order.push(id);
            }
            1 | 2 => {
                // Some bytes, biased towards well-formed frames so that requests get through.
                let Some(id) = pick(&peers, &order, next()) else {
                    continue;
                };
                if peers.get(&id).is_some_and(|p| p.eof) {
                    continue; // nothing is sent after a half-close
                }
                let chunk = if op % 7 == 1 {
                    frame_from(&mut next)
                } else {
                    let n = next().unwrap_or(0) % 12;
                    (0..n).map(|_| next().unwrap_or(0)).collect()
                };
                let peer = peers.get_mut(&id).expect("picked");
                peer.readable = true;
                if gw.is_closing(id) {
                    // The gateway already queued its last reply (read timeout, decode error,
                    // refusal): what the client sends now is never read.
                    peer.sent = None;
                }
                expect_replies(peer, &chunk);
                peer.unread.extend(chunk);
            }
            3 => {
                let Some(id) = pick(&peers, &order, next()) else {
                    continue;
                };
                gw.handle_client_closed(id, now);
                if let Some(p) = peers.get_mut(&id) {
                    p.gone = true;
                }
            }
            4 => {
                now = now + Duration::from_millis(u64::from(next().unwrap_or(0)));
                gw.handle_timeout(now);
            }
            6 => {
                let Some(id) = pick(&peers, &order, next()) else {
                    continue;
                };
                if let Some(p) = peers.get_mut(&id) {
                    p.eof = true;
                    p.readable = true;
                }
            }
            5 if !shut_down => {
                shut_down = true;
                gw.handle_shutdown(now);
            }
            _ => {}
        }
        pump(
            &mut gw,
            &mut peers,
            now,
            next().unwrap_or(0) as usize * 8,
            &mut cap_closes_seen,
        );
        gw.assert_invariants();
    }
    // Traffic stops; let every deadline pass and every byte be written.
    for _ in 0..10_000 {
        pump(&mut gw, &mut peers, now, usize::MAX, &mut cap_closes_seen);
        match gw.poll_timeout() {
            Some(t) => {
                now = now.max(t);
                gw.handle_timeout(now);
            }
            None => break,
        }
    }
    pump(&mut gw, &mut peers, now, usize::MAX, &mut cap_closes_seen);
    gw.assert_invariants();
    assert!(
        gw.is_quiescent(),
        "something is still held after all deadlines passed"
    );
    for (id, peer) in &peers {
        if peer.gone || !peer.unread.is_empty() {
            continue;
        }
        assert!(
            peer.expected.is_empty() || peer.stream_failed,
            "{id:?}: requests without replies: {:?}",
            peer.expected
        );
    }
}

fn peer_refused<U: crate::upstream::Upstream>(gw: &Gateway<U>, id: ConnId) -> bool {
    !gw.wants_read(id)
}

/// A well-formed frame (any type, a small payload that is sometimes a JSON object).
fn frame_from(next: &mut impl FnMut() -> Option<u8>) -> Vec<u8> {
    let k = match next().unwrap_or(0) % 6 {
        0 => kind::PING,
        1 => kind::CAPABILITIES,
        2 => 0x99,
        3 => kind::TASK_QUERY,
        _ => kind::TASK_SUBMIT,
    };
    let payload: Vec<u8> = match next().unwrap_or(0) % 4 {
        0 => Vec::new(),
        1 => b"[1]".to_vec(),
        _ => format!("{{\"n\":{}}}", next().unwrap_or(0)).into_bytes(),
    };
    crate::frame::encode_frame(k, &payload).to_vec()
}

/// Records the replies the client is owed for the bytes it is about to send.
fn expect_replies(peer: &mut Peer, chunk: &[u8]) {
    let Some(dec) = peer.sent.as_mut() else {
        return;
    };
    dec.push(chunk);
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => peer.expected.push_back(match f.kind {
                kind::PING => Expect::Pong,
                kind::CAPABILITIES => Expect::Capabilities,
                k if TaskKind::from_frame_kind(k).is_some() => {
                    Expect::Task(if f.payload.is_empty() {
                        b"{}".to_vec()
                    } else {
                        f.payload.to_vec()
                    })
                }
                _ => Expect::Error(2),
            }),
            Ok(None) => break,
            Err(_) => {
                peer.expected.push_back(Expect::Error(0));
                peer.sent = None;
                break;
            }
        }
    }
}

/// Plays the shell: feeds unread bytes while the gateway wants them, writes up to `budget`
/// bytes of output per connection, and checks each complete reply against what was expected.
fn pump(
    gw: &mut Gateway<StubUpstream>,
    peers: &mut BTreeMap<ConnId, Peer>,
    now: Instant,
    budget: usize,
    cap_closes_seen: &mut u64,
) {
    for _ in 0..10_000 {
        let mut progressed = false;
        let ids: Vec<ConnId> = peers.keys().copied().collect();
        for id in ids {
            let peer = peers.get_mut(&id).expect("listed");
            if peer.gone {
                continue;
            }
            if peer.readable && !gw.wants_read(id) {
                // The shell stops reading; only a new edge or ResumeRead restarts it.
                peer.readable = false;
            }
            if peer.readable && !peer.unread.is_empty() {
                let take = peer.unread.len().min(97);
                let chunk: Vec<u8> = peer.unread.drain(..take).collect();
                gw.handle_client_bytes(id, &chunk, now);
                progressed = true;
            }
            let peer = peers.get_mut(&id).expect("listed");
            if peer.readable
                && peer.eof
                && !peer.eof_sent
                && peer.unread.is_empty()
                && gw.wants_read(id)
            {
                peer.eof_sent = true;
                gw.handle_client_eof(id, now);
                progressed = true;
            }
            let peer = peers.get_mut(&id).expect("listed");
            if peer.readable && peer.unread.is_empty() && (!peer.eof || peer.eof_sent) {
                peer.readable = false;
            }
            if !peer.transmitting {
                continue;
            }
            let out: Vec<u8> = gw
                .client_output(id)
                .flat_map(|s| s.to_vec())
                .take(budget)
                .collect();
            if !out.is_empty() {
                let n = out.len();
                peers
                    .get_mut(&id)
                    .expect("listed")
                    .received
                    .extend_from_slice(&out);
                gw.handle_client_written(id, n, now);
                check_replies(peers.get_mut(&id).expect("listed"));
                progressed = true;
            }
            if gw.client_output(id).next().is_none() {
                peers.get_mut(&id).expect("listed").transmitting = false;
            }
        }
        while let Some(action) = gw.poll_action() {
            match action {
                Action::Transmit(id) => {
                    if let Some(p) = peers.get_mut(&id) {
                        assert!(!p.transmitting, "{id:?}: Transmit announced twice");
                        p.transmitting = true;
                    }
                }
                Action::ResumeRead(id) => {
                    if let Some(p) = peers.get_mut(&id) {
                        p.readable = true;
                    }
                }
                Action::ShutdownComplete { .. } | Action::Close(_) => {}
                Action::Upstream(never) => match never {},
            }
            if let Action::Close(id) = action {
                if let Some(p) = peers.get_mut(&id) {
                    p.gone = true;
                    p.unread.clear();
                    check_replies(p);
                    let cut_off = !p.expected.is_empty() && !p.stream_failed;
                    // A close with replies still owed is only allowed at the output cap,
                    // where the client's own refusal to read is the cause.
                    if cut_off {
                        *cap_closes_seen += 1;
                        assert!(
                            gw.stats().connections_closed_output_cap >= *cap_closes_seen,
                            "{id:?} closed owing {:?}",
                            p.expected
                        );
                    }
                }
            }
            progressed = true;
        }
        if !progressed {
            return;
        }
    }
    panic!("the gateway did not settle");
}

fn is_read_timeout(f: &crate::frame::Frame) -> bool {
    f.kind == kind::RESPONSE_ERROR
        && serde_json::from_slice::<serde_json::Value>(&f.payload).is_ok_and(|v| {
            v["error"]["code"] == 5
                && v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("read timeout"))
        })
}

fn check_replies(peer: &mut Peer) {
    let mut d = FrameDecoder::new(usize::MAX);
    d.push(&peer.received);
    let mut consumed = 0;
    while let Ok(Some(f)) = d.next_frame() {
        consumed += HEADER_LEN + f.payload.len();
        if is_read_timeout(&f) {
            // A partial frame held too long ends the stream; everything sent before it was
            // answered first.
            assert!(
                peer.expected.is_empty(),
                "read timeout overtook replies {:?}",
                peer.expected
            );
            peer.stream_failed = true;
            peer.sent = None;
            continue;
        }
        let Some(expect) = peer.expected.pop_front() else {
            panic!(
                "a reply nobody asked for: type {:#x} {:?}",
                f.kind,
                String::from_utf8_lossy(&f.payload)
            );
        };
        match expect {
            Expect::Pong => assert_eq!((f.kind, f.payload.len()), (kind::PONG, 0)),
            Expect::Capabilities => assert_eq!(f.kind, kind::RESPONSE_OK),
            Expect::Task(payload) => {
                if f.kind == kind::RESPONSE_OK {
                    let echo = crate::stub::StubUpstream::reply_for(&payload);
                    assert_eq!(f.payload, echo, "a reply for another request");
                } else {
                    assert_eq!(f.kind, kind::RESPONSE_ERROR);
                }
            }
            Expect::Error(code) => {
                assert_eq!(f.kind, kind::RESPONSE_ERROR);
                if code != 0 {
                    let v: serde_json::Value =
                        serde_json::from_slice(&f.payload).expect("error JSON");
                    assert_eq!(v["error"]["code"], code);
                }
                if peer.sent.is_none() {
                    peer.stream_failed = true;
                }
            }
        }
    }
    peer.received.drain(..consumed);
}

/// Feeds `data` to a NATS decoder whole and in pieces whose sizes come from `data` itself:
/// both must give the same ops and the same error, and between calls the decoder may hold no
/// more than one bounded control line or one bounded payload.
pub fn nats_decoder(data: &[u8]) {
    let first = data.first().copied().unwrap_or(0) as usize;
    let limits = crate::nats_codec::DecoderLimits {
        max_control_line: 16 + first * 4,
        max_info_line: 16 + first * 8,
        max_payload: 64 + (first % 16) * 64,
    };
    let whole = nats_decode_all(data, &[data.len().max(1)], limits);
    let split = nats_decode_all(data, &split_sizes(data), limits);
    assert_eq!(
        whole, split,
        "NATS decoding depended on how the bytes were split"
    );
}

type NatsDecoded = (
    Vec<crate::nats_codec::ServerOp>,
    Option<crate::nats_codec::NatsDecodeError>,
);

fn nats_decode_all(
    data: &[u8],
    sizes: &[usize],
    limits: crate::nats_codec::DecoderLimits,
) -> NatsDecoded {
    let mut d = crate::nats_codec::NatsDecoder::new(limits);
    let mut ops = Vec::new();
    for piece in pieces(data, sizes) {
        d.push(piece);
        loop {
            match d.next_op() {
                Ok(Some(op)) => ops.push(op),
                Ok(None) => {
                    let held = limits
                        .max_control_line
                        .max(limits.max_info_line)
                        .max(limits.max_payload)
                        + 1;
                    assert!(
                        d.buffered_len() <= held,
                        "decoder holds {} bytes, more than one line or payload",
                        d.buffered_len()
                    );
                    break;
                }
                Err(e) => {
                    assert!(d.next_op() == Err(e.clone()), "error not sticky");
                    assert_eq!(d.buffered_len(), 0, "buffer kept after an error");
                    return (ops, Some(e));
                }
            }
        }
    }
    (ops, None)
}
