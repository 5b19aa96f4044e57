//! The NATS session driven by an arbitrary byte script, the way the mio shell drives it:
//! socket outcomes only for the socket it was asked to open, output consumed only after
//! `Transmit`, server bytes from a dictionary of real protocol operations (replies to live,
//! cancelled and unknown tokens, 503s, INFO with `connect_urls`, lame duck, -ERR) mixed with
//! raw bytes.
//!
//! Checked after every step: each request gets at most one outcome and none after it was
//! cancelled; outcomes only for submitted requests; the reconnect buffer stays within its
//! bound; `Connect` never comes while a socket is open. At the end every request is cancelled
//! and the session must hold nothing (gateway.md section 1, invariants 1, 3, 4, 5 and 6).

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use crate::inflight::RequestId;
use crate::nats_config::{LinkId, NatsConfig, NatsInput, SessionAction};
use crate::nats_session::{to_base36, NatsSession};
use crate::payload::validate_task_payload;
use crate::time::Instant;
use crate::upstream::{Identity, TaskKind, Upstream, UpstreamEvent, UpstreamRequest};

/// The shell's view of the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Socket {
    None,
    Opening,
    Open,
}

struct Driver {
    s: NatsSession,
    now: Instant,
    socket: Socket,
    /// The link of the last `Connect`, which the shell's reports name.
    link: LinkId,
    transmit: bool,
    next_id: u64,
    submitted: BTreeSet<u64>,
    answered: BTreeSet<u64>,
    cancelled: BTreeSet<u64>,
}

impl Driver {
    /// Carries out the session's actions and checks its outcomes.
    fn pump(&mut self) {
        while let Some(action) = self.s.poll_action() {
            match action {
                SessionAction::Connect { link, .. } => {
                    assert_eq!(
                        self.socket,
                        Socket::None,
                        "Connect with a socket still open"
                    );
                    assert!(link > self.link, "a Connect reused a link id");
                    self.socket = Socket::Opening;
                    self.link = link;
                }
                SessionAction::Disconnect { link } => {
                    assert_eq!(link, self.link, "Disconnect of a link not current");
                    self.socket = Socket::None;
                    self.transmit = false;
                }
                SessionAction::Transmit { .. } => self.transmit = true,
                // An INFO with `tls_required` asks for it. This shell pretends the upgrade
                // happened: the bytes it feeds stay the plaintext a TLS shell would decrypt.
                SessionAction::StartTls { link, .. } => {
                    assert_eq!(link, self.link, "StartTls on a link not current");
                    assert_ne!(self.socket, Socket::None, "StartTls without a socket");
                }
            }
        }
        while let Some(event) = self.s.poll_event() {
            let (UpstreamEvent::Reply { id, .. } | UpstreamEvent::Failed { id, .. }) = event;
            assert!(self.submitted.contains(&id.0), "outcome for unknown {id:?}");
            assert!(
                !self.cancelled.contains(&id.0),
                "outcome after cancel {id:?}"
            );
            assert!(self.answered.insert(id.0), "second outcome for {id:?}");
        }
        self.s.assert_invariants();
        let open = self.submitted.len()
            - self.answered.len()
            - self.cancelled.difference(&self.answered).count();
        assert_eq!(
            self.s.pending(),
            open,
            "pending() disagrees with the outcomes"
        );
    }

    /// A live, answered, cancelled or never-issued token, as the script picks.
    fn token(&self, pick: u8) -> u64 {
        let known: Vec<u64> = self.submitted.iter().copied().collect();
        if known.is_empty() || pick % 8 == 7 {
            return u64::from(pick) + 1000;
        }
        known[usize::from(pick) % known.len()]
    }

    fn server_op(&self, which: u8, pick: u8) -> Vec<u8> {
        let inbox = self.s.inbox();
        let token = to_base36(self.token(pick));
        let body = br#"{"ok":true}"#;
        match which % 12 {
            0 => br#"INFO {"server_id":"a","headers":true,"max_payload":600,"connect_urls":["10.0.0.2:4222","b:4223"]}"#.to_vec(),
            1 => br#"INFO {"server_id":"a","headers":false,"max_payload":1048576}"#.to_vec(),
            2 => br#"INFO {"server_id":"a","headers":true,"ldm":true,"connect_urls":["c:4224"]}"#.to_vec(),
            3 => b"PING".to_vec(),
            4 => b"PONG".to_vec(),
            5 => b"+OK".to_vec(),
            6 => b"-ERR 'Stale Connection'".to_vec(),
            7 => b"-ERR 'Permissions Violation for Publish to \"x\"'".to_vec(),
            8 => {
                let mut m = format!("MSG {inbox}.{token} 1 {}\r\n", body.len()).into_bytes();
                m.extend_from_slice(body);
                m
            }
            9 => format!("HMSG {inbox}.{token} 1 16 16\r\nNATS/1.0 503\r\n\r\n").into_bytes(),
            10 => format!("HMSG {inbox}.{token} 1 14 14\r\nNATS/1.0 x\r\n\r\n").into_bytes(),
            _ => format!("MSG other.{token} 9 2\r\n{{}}").into_bytes(),
        }
        .into_iter()
        .chain(*b"\r\n")
        .collect()
    }
}

/// Drives one session from `data`; panics on a violated invariant.
pub fn nats_session_events(data: &[u8]) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let buffer_bound = 200 + usize::from(next().unwrap_or(0)) * 8;
    let mut config = NatsConfig {
        connect_timeout: Duration::from_millis(50),
        handshake_timeout: Duration::from_millis(80),
        ping_interval: Duration::from_millis(100),
        max_pings_outstanding: 2,
        reconnect_buffer_bytes: buffer_bound,
        recent_answers: 4,
        lame_duck_grace: Duration::from_millis(30),
        drain_timeout: Duration::from_millis(60),
        ..NatsConfig::default()
    };
    let _ = config.set_servers("nats://a:4222,nats://u:p@b:4223");
    let mut d = Driver {
        s: NatsSession::new(
            config,
            Identity {
                instance: 1,
                seed: u64::from(next().unwrap_or(0)),
            },
        ),
        now: Instant::ZERO,
        socket: Socket::None,
        link: LinkId(0),
        transmit: false,
        next_id: 1,
        submitted: BTreeSet::new(),
        answered: BTreeSet::new(),
        cancelled: BTreeSet::new(),
    };
    d.s.handle_timeout(d.now);
    d.pump();

    while let Some(op) = next() {
        match op % 10 {
            0 | 1 => {
                let id = d.next_id;
                d.next_id += 1;
                let size = usize::from(next().unwrap_or(0)) * 4;
                let text = format!(r#"{{"task":"t","pad":"{}"}}"#, "p".repeat(size));
                let Ok(payload) = validate_task_payload(Bytes::from(text)) else {
                    continue;
                };
                d.submitted.insert(id);
                let request = UpstreamRequest {
                    id: RequestId(id),
                    kind: TaskKind::Submit,
                    payload,
                    deadline: d.now + Duration::from_millis(200),
                };
                d.s.submit(request, d.now);
            }
            2 => {
                let id = d.token(next().unwrap_or(0));
                if d.submitted.contains(&id) && !d.answered.contains(&id) {
                    d.cancelled.insert(id);
                }
                d.s.cancel(RequestId(id));
            }
            3 | 4 if d.socket == Socket::Open => {
                let (which, pick) = (next().unwrap_or(0), next().unwrap_or(0));
                let wire = d.server_op(which, pick);
                // Sometimes cut short: the rest never arrives on this connection.
                let cut = usize::from(next().unwrap_or(255)).min(wire.len());
                d.s.handle_input(NatsInput::Received(d.link, &wire[..cut]), d.now);
            }
            5 if d.socket == Socket::Open => {
                let n = usize::from(next().unwrap_or(0) % 16);
                let raw: Vec<u8> = (0..n).map(|_| next().unwrap_or(b'\n')).collect();
                d.s.handle_input(NatsInput::Received(d.link, &raw), d.now);
            }
            6 => match d.socket {
                Socket::Opening if next().unwrap_or(0) % 3 != 0 => {
                    d.socket = Socket::Open;
                    d.s.handle_input(NatsInput::Connected(d.link), d.now);
                }
                Socket::Opening => {
                    d.socket = Socket::None;
                    d.s.handle_input(NatsInput::ConnectFailed(d.link), d.now);
                }
                Socket::Open => {
                    d.socket = Socket::None;
                    d.transmit = false;
                    d.s.handle_input(NatsInput::Closed(d.link), d.now);
                }
                Socket::None => {}
            },
            7 if d.transmit && d.socket == Socket::Open => {
                let queued: usize = d.s.output().map(<[u8]>::len).sum();
                let n = (usize::from(next().unwrap_or(0)) * 16).min(queued);
                d.s.handle_input(NatsInput::Written(d.link, n), d.now);
                if !d.s.has_output() {
                    d.transmit = false;
                }
            }
            8 => {
                d.now = d.now + Duration::from_millis(u64::from(next().unwrap_or(0) % 64));
                d.s.handle_timeout(d.now);
            }
            9 if next().unwrap_or(0) % 8 == 0 => d.s.handle_shutdown(d.now),
            _ => {}
        }
        d.pump();
    }

    // Everything still open is cancelled (the gateway's deadlines); nothing may stay held.
    let open: Vec<u64> = d
        .submitted
        .iter()
        .copied()
        .filter(|id| !d.answered.contains(id) && !d.cancelled.contains(id))
        .collect();
    for id in open {
        d.cancelled.insert(id);
        d.s.cancel(RequestId(id));
        d.pump();
    }
    assert_eq!(d.s.pending(), 0, "requests held after all were cancelled");
    assert_eq!(d.s.buffered_bytes(), 0, "reconnect buffer not empty");
    assert!(
        d.s.recent_answers() <= 4,
        "recent-answers ring over its bound"
    );
}
