//! The NATS socket in the mio loop: what [`NatsSession`]'s `SessionAction`s mean in syscalls.
//!
//! The session decides everything (which server, when to give up, when to retry); this file
//! only opens, reads, writes and closes one non-blocking TCP stream and reports back:
//!
//! ```text
//! Connect{host,port} ─▶ Resolving (hostnames only) ─▶ Connecting (try each address) ─▶ Open
//!        ▲                         │ no address                │ all refused     │ EOF, error
//!        └──── session decides ◀───┴── handle_connect_failed ◀─┘   handle_closed ◀┘
//! Disconnect (any phase) ─▶ Idle; a resolution still running is abandoned by generation
//! ```
//!
//! **Name resolution** happens on the [`Resolver`] thread, never on the loop: `getaddrinfo`
//! blocks (a DNS server that does not answer holds it for seconds), and the loop must keep
//! serving clients and keepalives meanwhile. IP literals are connected at once without it.
//! If a lookup hangs, the session's connect timeout fires as for a hanging TCP connect; the
//! late answer carries an old generation and is ignored.
//!
//! Reads and writes go through [`Gateway::handle_upstream`], so a reply or a failure the
//! session produces reaches its client in the same turn.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ipc_gateway_core::nats_session::{NatsSession, SessionAction};
use ipc_gateway_core::stub::StubUpstream;
use ipc_gateway_core::upstream::Upstream;
use ipc_gateway_core::{Gateway, Instant};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token, Waker};
use tracing::{debug, warn};

use crate::handoff;

/// Reads of the NATS socket per turn before clients get theirs.
const READS_PER_TURN: usize = 16;
const READ_BUFFER: usize = 64 * 1024;
/// Slices handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// An upstream the event loop can drive: the stub needs no I/O, the NATS session a socket.
pub trait UpstreamIo: Upstream {
    fn nats(&mut self) -> Option<&mut NatsSession> {
        None
    }
    fn nats_ref(&self) -> Option<&NatsSession> {
        None
    }
}

impl UpstreamIo for StubUpstream {}

impl UpstreamIo for NatsSession {
    fn nats(&mut self) -> Option<&mut NatsSession> {
        Some(self)
    }
    fn nats_ref(&self) -> Option<&NatsSession> {
        Some(self)
    }
}

enum Phase {
    Idle,
    Resolving,
    /// TCP connect in flight to one address; the others wait their turn.
    Connecting {
        rest: Vec<SocketAddr>,
    },
    Open,
}

/// The shell's side of the NATS connection.
pub struct NatsLink {
    token: Token,
    stream: Option<TcpStream>,
    phase: Phase,
    /// Bumped on every Connect and Disconnect, so a stale resolution is recognised.
    generation: u64,
    resolver: Resolver,
    read_buf: Vec<u8>,
    /// The last write hit `WouldBlock`; wait for a writable event.
    write_blocked: bool,
    /// The session announced output; written at the end of the turn, so requests from many
    /// clients leave in one syscall.
    output_pending: bool,
    /// Reads were cut short by the per-turn budget.
    read_again: bool,
}

impl NatsLink {
    /// `token` is for the socket, `waker_token` for the resolver's answers.
    pub fn new(registry: &Registry, token: Token, waker_token: Token) -> io::Result<NatsLink> {
        Ok(NatsLink {
            token,
            stream: None,
            phase: Phase::Idle,
            generation: 0,
            resolver: Resolver::start(Waker::new(registry, waker_token)?)?,
            read_buf: vec![0; READ_BUFFER],
            write_blocked: false,
            output_pending: false,
            read_again: false,
        })
    }

    /// Carries out what the session asked for. Call after anything that fed the session.
    pub fn apply_actions<U: UpstreamIo>(
        &mut self,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        loop {
            let Some(action) = gateway
                .upstream_mut()
                .nats()
                .and_then(NatsSession::poll_action)
            else {
                return;
            };
            match action {
                SessionAction::Connect { host, port } => {
                    self.close(registry);
                    self.generation += 1;
                    match parse_ip(&host) {
                        Some(ip) => {
                            self.connect(vec![SocketAddr::new(ip, port)], gateway, registry, now)
                        }
                        None => {
                            self.phase = Phase::Resolving;
                            if self.resolver.resolve(self.generation, host, port).is_err() {
                                self.phase = Phase::Idle;
                                report(gateway, now, NatsSession::handle_connect_failed);
                            }
                        }
                    }
                }
                SessionAction::Disconnect => {
                    self.close(registry);
                    self.generation += 1;
                }
                SessionAction::Transmit => self.output_pending = true,
            }
        }
    }

    /// The resolver answered (its waker fired).
    pub fn on_resolved<U: UpstreamIo>(
        &mut self,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        while let Some((generation, result)) = self.resolver.answer() {
            if generation != self.generation || !matches!(self.phase, Phase::Resolving) {
                continue;
            }
            match result {
                Ok(addrs) if !addrs.is_empty() => self.connect(addrs, gateway, registry, now),
                Ok(_) | Err(_) => {
                    if let Err(e) = result {
                        warn!(event = "nats_resolve_failed", component = "nats_resilience", error = %e);
                    }
                    self.phase = Phase::Idle;
                    report(gateway, now, NatsSession::handle_connect_failed);
                }
            }
        }
        self.apply_actions(gateway, registry, now);
    }

    /// Readiness of the NATS socket.
    pub fn on_event<U: UpstreamIo>(
        &mut self,
        event: &Event,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        match self.phase {
            Phase::Connecting { .. } => self.check_connected(gateway, registry, now),
            Phase::Open => {
                if event.is_writable() {
                    self.write_blocked = false;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(gateway, registry, now);
                }
                if event.is_writable() {
                    self.flush(gateway, registry, now);
                }
            }
            Phase::Idle | Phase::Resolving => {}
        }
        self.apply_actions(gateway, registry, now);
    }

    /// Whether reads were cut short and must go on next turn without sleeping.
    pub fn wants_read_again(&self) -> bool {
        self.read_again
    }

    /// The reads the per-turn budget postponed.
    pub fn read_postponed<U: UpstreamIo>(
        &mut self,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        if std::mem::take(&mut self.read_again) && matches!(self.phase, Phase::Open) {
            self.read(gateway, registry, now);
            self.apply_actions(gateway, registry, now);
        }
    }

    /// Writes what the session queued, as far as the socket takes it.
    pub fn flush<U: UpstreamIo>(
        &mut self,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        self.output_pending = false;
        loop {
            let (Phase::Open, Some(stream), false) =
                (&self.phase, self.stream.as_mut(), self.write_blocked)
            else {
                return;
            };
            let Some(session) = gateway.upstream_mut().nats() else {
                return;
            };
            let slices: Vec<IoSlice<'_>> = session
                .output()
                .take(MAX_IOVECS)
                .map(IoSlice::new)
                .collect();
            if slices.is_empty() {
                return;
            }
            match stream.write_vectored(&slices) {
                Ok(n) => {
                    drop(slices);
                    gateway.handle_upstream(now, |u| {
                        if let Some(s) = u.nats() {
                            s.consume_output(n);
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    drop(slices);
                    debug!(event = "nats_write_failed", component = "nats_resilience", error = %e);
                    self.lost(gateway, registry, now);
                    return;
                }
            }
            self.apply_actions(gateway, registry, now);
        }
    }

    /// Output the session announced and the end of the turn should write.
    pub fn has_pending_output(&self) -> bool {
        self.output_pending
    }

    fn read<U: UpstreamIo>(&mut self, gateway: &mut Gateway<U>, registry: &Registry, now: Instant) {
        for _ in 0..READS_PER_TURN {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.read(&mut self.read_buf) {
                Ok(0) => return self.lost(gateway, registry, now),
                Ok(n) => {
                    let bytes = &self.read_buf[..n];
                    gateway.handle_upstream(now, |u| {
                        if let Some(s) = u.nats() {
                            s.handle_bytes(bytes, now);
                        }
                    });
                    self.apply_actions(gateway, registry, now);
                    // The session may have dropped the connection over these bytes, and may
                    // already have asked for the next one: that socket is not this stream.
                    if !matches!(self.phase, Phase::Open) || n < self.read_buf.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(event = "nats_read_failed", component = "nats_resilience", error = %e);
                    return self.lost(gateway, registry, now);
                }
            }
        }
        self.read_again = true;
    }

    /// The peer closed or the socket failed: tell the session, which decides what next.
    fn lost<U: UpstreamIo>(&mut self, gateway: &mut Gateway<U>, registry: &Registry, now: Instant) {
        self.close(registry);
        report(gateway, now, NatsSession::handle_closed);
    }

    /// Starts a non-blocking connect to the first address that accepts the attempt.
    fn connect<U: UpstreamIo>(
        &mut self,
        mut addrs: Vec<SocketAddr>,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        addrs.reverse();
        while let Some(addr) = addrs.pop() {
            let Ok(mut stream) = TcpStream::connect(addr) else {
                continue;
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            if registry
                .register(&mut stream, self.token, interest)
                .is_err()
            {
                continue;
            }
            addrs.reverse();
            self.stream = Some(stream);
            self.phase = Phase::Connecting { rest: addrs };
            return;
        }
        self.phase = Phase::Idle;
        report(gateway, now, NatsSession::handle_connect_failed);
    }

    /// A connecting socket became writable or failed: find out which.
    fn check_connected<U: UpstreamIo>(
        &mut self,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    ) {
        let Some(stream) = self.stream.as_ref() else {
            return;
        };
        let failed = match stream.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match stream.peer_addr() {
                Ok(_) => false,
                // Not connected yet: a spurious wakeup; the next event decides.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => true,
            },
        };
        if failed {
            let rest = match std::mem::replace(&mut self.phase, Phase::Idle) {
                Phase::Connecting { rest } => rest,
                _ => Vec::new(),
            };
            self.close(registry);
            return self.connect(rest, gateway, registry, now);
        }
        // Requests are small and latency matters more than segment count.
        let _ = stream.set_nodelay(true);
        self.phase = Phase::Open;
        self.write_blocked = false;
        report(gateway, now, NatsSession::handle_connected);
        // Bytes (the server's INFO) may already be waiting and raise no new edge.
        self.read(gateway, registry, now);
    }

    fn close(&mut self, registry: &Registry) {
        if let Some(mut stream) = self.stream.take() {
            let _ = registry.deregister(&mut stream);
        }
        self.phase = Phase::Idle;
        self.write_blocked = false;
        self.output_pending = false;
        self.read_again = false;
    }
}

/// Tells the session about the socket, delivering whatever outcomes that produced.
fn report<U: UpstreamIo>(
    gateway: &mut Gateway<U>,
    now: Instant,
    input: fn(&mut NatsSession, Instant),
) {
    gateway.handle_upstream(now, |u| {
        if let Some(s) = u.nats() {
            input(s, now);
        }
    });
}

/// `127.0.0.1`, `::1` or `[::1]`.
fn parse_ip(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

type Resolution = (u64, io::Result<Vec<SocketAddr>>);

/// One thread that runs `getaddrinfo` for the loop and wakes it with the answer; the
/// hand-off between the two is [`handoff`], model-checked with loom.
struct Resolver {
    side: handoff::LoopSide<(u64, String, u16), Resolution>,
}

impl Resolver {
    fn start(waker: Waker) -> io::Result<Resolver> {
        let (side, worker) = handoff::channel::<(u64, String, u16), Resolution, _>(waker);
        std::thread::Builder::new()
            .name("nats-resolver".into())
            .spawn(move || {
                // Ends when the loop drops its side.
                while let Some((generation, host, port)) = worker.next_request() {
                    let result = (host.as_str(), port)
                        .to_socket_addrs()
                        .map(|addrs| addrs.collect());
                    if worker.answer((generation, result)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Resolver { side })
    }

    fn resolve(&self, generation: u64, host: String, port: u16) -> Result<(), ()> {
        self.side.submit((generation, host, port)).map_err(|_| ())
    }

    fn answer(&self) -> Option<Resolution> {
        self.side.take_answer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_skip_the_resolver() {
        assert_eq!(parse_ip("127.0.0.1"), Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(parse_ip("[::1]"), "::1".parse().ok());
        assert_eq!(parse_ip("::1"), "::1".parse().ok());
        assert_eq!(parse_ip("localhost"), None);
        assert_eq!(parse_ip("nats.example"), None);
    }
}
