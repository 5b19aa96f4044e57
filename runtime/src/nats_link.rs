//! The NATS socket in the mio loop: what [`NatsSession`]'s `SessionAction`s mean in syscalls.
//!
//! The session decides everything (which server, when to give up, when to retry); this file
//! only opens, reads, writes and closes one non-blocking TCP stream and reports back:
//!
//! ```text
//! Connect{link,host,port} ─▶ Resolving (hostnames only) ─▶ Connecting (each address) ─▶ Open
//!        ▲                           │ no address                │ all refused    │ EOF, error
//!        └────── session decides ◀───┴────── ConnectFailed ◀─────┘        Closed ◀┘
//! Disconnect (any phase) ─▶ Idle; a resolution still running is abandoned (it names an old link)
//! ```
//!
//! **Name resolution** happens on the [`Resolver`] thread, never on the loop: `getaddrinfo`
//! blocks (a DNS server that does not answer holds it for seconds), and the loop must keep
//! serving clients and keepalives meanwhile. IP literals are connected at once without it.
//! If a lookup hangs, the session's connect timeout fires as for a hanging TCP connect; the
//! late answer names a link that is no longer being resolved and is ignored.
//!
//! **TLS** (gateway.md section 9) wraps the same stream when the session says `StartTls`
//! (after the plaintext INFO, or at once with `tls_first`): from then on the session's output
//! goes into a rustls [`ClientConnection`], which holds it until the handshake is done and
//! encrypts it, and what the socket gives is decrypted before the session sees it. The
//! handshake advances on the loop's readiness events like any read or write, so it never
//! stalls IPC. A TLS error closes the socket and is reported as `TlsFailed` with rustls'
//! reason and the name checked; the session decides what next.
//!
//! Every report goes through [`Gateway::handle_upstream`] as a [`NatsInput`] naming the
//! session's link, so a reply or a failure it produces reaches its client in the same turn,
//! and a report about a link the session has given up is dropped by the session itself.
//! Writes happen on `Transmit`, which the gateway holds until the turn's `handle_timeout`:
//! the requests of every client served in one loop turn leave in one syscall.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use ipc_gateway_core::nats_session::{LinkId, NatsInput, NatsSession, NatsStats, SessionAction};
use ipc_gateway_core::stub::StubUpstream;
use ipc_gateway_core::upstream::Upstream;
use ipc_gateway_core::{Gateway, Instant};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token, Waker};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use tracing::{debug, error, info, warn};

use crate::handoff;
use crate::nats_security::{Loaded, Roots, Sources};
use crate::vectored::{write_once, WriteStep};

/// Reads of the NATS socket per turn before clients get theirs.
const READS_PER_TURN: usize = 16;
const READ_BUFFER: usize = 64 * 1024;

/// What an operator's `stats` line says about the upstream.
#[derive(Debug, Default)]
pub struct UpstreamReport {
    pub kind: &'static str,
    pub state: &'static str,
    pub server: String,
    pub buffered_bytes: usize,
    pub nats: NatsStats,
    /// Why the last attempt failed or the last link was lost (`/health`).
    pub last_error: Option<String>,
}

/// An upstream the event loop can drive: its [`Upstream::Action`]s in syscalls.
pub trait UpstreamIo: Upstream {
    /// The shell's side of the upstream's I/O.
    type Link: UpstreamLink<Self>;
    /// What the link needs besides the registry (the NATS link's certificates and secrets).
    type LinkConfig;
    /// `token` is for a socket, `waker_token` for a helper thread's answers.
    fn open_link(
        registry: &Registry,
        token: Token,
        waker_token: Token,
        config: Self::LinkConfig,
    ) -> io::Result<Self::Link>;
    /// For the `stats` line.
    fn report(&self) -> UpstreamReport;
}

/// What the event loop asks of an upstream's I/O side.
pub trait UpstreamLink<U: Upstream> {
    /// Carries out one action of the upstream.
    fn apply(
        &mut self,
        action: U::Action,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    );
    /// Readiness of the link's socket.
    fn on_event(
        &mut self,
        event: &Event,
        gateway: &mut Gateway<U>,
        registry: &Registry,
        now: Instant,
    );
    /// The link's helper thread answered (its waker fired).
    fn on_resolved(&mut self, gateway: &mut Gateway<U>, registry: &Registry, now: Instant);
    /// Whether reads were cut short and must go on next turn without sleeping.
    fn wants_read_again(&self) -> bool;
    /// The reads the per-turn budget postponed.
    fn read_postponed(&mut self, gateway: &mut Gateway<U>, registry: &Registry, now: Instant);
    /// SIGHUP: re-read the files the link's credentials and certificates come from; the next
    /// connection uses them.
    fn reload(&mut self, _gateway: &mut Gateway<U>) {}
}

/// The stub has no I/O.
pub struct NoLink;

impl UpstreamIo for StubUpstream {
    type Link = NoLink;
    type LinkConfig = ();
    fn open_link(_: &Registry, _: Token, _: Token, _: ()) -> io::Result<NoLink> {
        Ok(NoLink)
    }
    fn report(&self) -> UpstreamReport {
        UpstreamReport {
            kind: "stub",
            state: "disabled",
            ..UpstreamReport::default()
        }
    }
}

impl UpstreamLink<StubUpstream> for NoLink {
    fn apply(
        &mut self,
        action: std::convert::Infallible,
        _: &mut Gateway<StubUpstream>,
        _: &Registry,
        _: Instant,
    ) {
        match action {}
    }
    fn on_event(&mut self, _: &Event, _: &mut Gateway<StubUpstream>, _: &Registry, _: Instant) {}
    fn on_resolved(&mut self, _: &mut Gateway<StubUpstream>, _: &Registry, _: Instant) {}
    fn wants_read_again(&self) -> bool {
        false
    }
    fn read_postponed(&mut self, _: &mut Gateway<StubUpstream>, _: &Registry, _: Instant) {}
}

/// The NATS link's certificates and secrets: where they come from (for SIGHUP), and what
/// was read at start.
pub struct NatsLinkConfig {
    pub sources: Sources,
    pub loaded: Loaded,
}

impl UpstreamIo for NatsSession {
    type Link = NatsLink;
    type LinkConfig = NatsLinkConfig;
    fn open_link(
        registry: &Registry,
        token: Token,
        waker_token: Token,
        config: NatsLinkConfig,
    ) -> io::Result<NatsLink> {
        NatsLink::new(registry, token, waker_token, config)
    }
    fn report(&self) -> UpstreamReport {
        UpstreamReport {
            kind: "nats",
            state: self.state().name(),
            server: self.server().unwrap_or_default(),
            buffered_bytes: self.buffered_bytes(),
            nats: self.stats().clone(),
            last_error: self.last_error().map(str::to_owned),
        }
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
    /// The session's link this socket (or resolution) is for.
    link: LinkId,
    resolver: Resolver,
    read_buf: Vec<u8>,
    /// The last write hit `WouldBlock`; wait for a writable event.
    write_blocked: bool,
    /// Reads were cut short by the per-turn budget.
    read_again: bool,
    /// Where the certificates and credentials come from, for SIGHUP.
    sources: Sources,
    /// The TLS settings for the next `StartTls` (replaced on SIGHUP).
    tls_config: Arc<ClientConfig>,
    /// The TLS session over `stream`, from `StartTls` on; `None` in plaintext.
    tls: Option<ClientConnection>,
    /// The name the server's certificate is checked against, for error messages.
    tls_name: String,
}

impl UpstreamLink<NatsSession> for NatsLink {
    fn apply(
        &mut self,
        action: SessionAction,
        gateway: &mut Gateway<NatsSession>,
        registry: &Registry,
        now: Instant,
    ) {
        match action {
            SessionAction::Connect { link, host, port } => {
                self.close(registry);
                self.link = link;
                match parse_ip(&host) {
                    Some(ip) => {
                        self.connect(vec![SocketAddr::new(ip, port)], gateway, registry, now)
                    }
                    None => {
                        self.phase = Phase::Resolving;
                        if self.resolver.resolve(link, host, port).is_err() {
                            self.phase = Phase::Idle;
                            gateway.handle_upstream(NatsInput::ConnectFailed(link), now);
                        }
                    }
                }
            }
            SessionAction::Disconnect { .. } => self.close(registry),
            SessionAction::Transmit { .. } => self.flush(gateway, registry, now),
            SessionAction::StartTls { link, server_name } => {
                self.start_tls(link, server_name, gateway, registry, now)
            }
        }
    }

    /// The certificates and the credentials are re-read apart: a file that fails keeps what
    /// was loaded before for its part (logged, naming the variable and the file), the other
    /// part still rotates.
    fn reload(&mut self, gateway: &mut Gateway<NatsSession>) {
        match self.sources.tls_config(Roots::System) {
            Ok(tls) => {
                self.tls_config = Arc::new(tls);
                info!(
                    event = "nats_credentials_reloaded",
                    component = "nats_resilience",
                    part = "tls",
                    "TLS certificates re-read; the next connection uses them"
                );
            }
            Err(e) => {
                error!(event = "nats_credentials_reload_failed", component = "nats_resilience",
                             part = "tls", error = %e.0,
                             "cannot re-read the NATS TLS files; keeping the ones loaded before")
            }
        }
        match self.sources.auth() {
            Ok(auth) => {
                info!(
                    event = "nats_credentials_reloaded",
                    component = "nats_resilience",
                    part = "auth",
                    auth_method = auth.method(),
                    "NATS credentials re-read; the next connection uses them"
                );
                gateway.upstream_mut().set_auth(auth);
            }
            Err(e) => {
                error!(event = "nats_credentials_reload_failed", component = "nats_resilience",
                             part = "auth", error = %e.0,
                             "cannot re-read the NATS credentials; keeping the ones loaded before")
            }
        }
    }

    fn on_resolved(
        &mut self,
        gateway: &mut Gateway<NatsSession>,
        registry: &Registry,
        now: Instant,
    ) {
        while let Some((link, result)) = self.resolver.answer() {
            if link != self.link || !matches!(self.phase, Phase::Resolving) {
                continue;
            }
            match result {
                Ok(addrs) if !addrs.is_empty() => self.connect(addrs, gateway, registry, now),
                Ok(_) | Err(_) => {
                    if let Err(e) = result {
                        warn!(event = "nats_resolve_failed", component = "nats_resilience", error = %e);
                    }
                    self.phase = Phase::Idle;
                    gateway.handle_upstream(NatsInput::ConnectFailed(link), now);
                }
            }
        }
    }

    fn on_event(
        &mut self,
        event: &Event,
        gateway: &mut Gateway<NatsSession>,
        registry: &Registry,
        now: Instant,
    ) {
        match self.phase {
            Phase::Connecting { .. } => self.check_connected(gateway, registry, now),
            Phase::Open => {
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(gateway, registry, now);
                }
                if event.is_writable() && self.write_blocked {
                    // The session's Transmit came while the socket was full: the rest goes
                    // now.
                    self.write_blocked = false;
                    self.flush(gateway, registry, now);
                }
            }
            Phase::Idle | Phase::Resolving => {}
        }
    }

    fn wants_read_again(&self) -> bool {
        self.read_again
    }

    fn read_postponed(
        &mut self,
        gateway: &mut Gateway<NatsSession>,
        registry: &Registry,
        now: Instant,
    ) {
        if std::mem::take(&mut self.read_again) && matches!(self.phase, Phase::Open) {
            self.read(gateway, registry, now);
        }
    }
}

impl NatsLink {
    fn new(
        registry: &Registry,
        token: Token,
        waker_token: Token,
        config: NatsLinkConfig,
    ) -> io::Result<NatsLink> {
        Ok(NatsLink {
            sources: config.sources,
            tls_config: config.loaded.tls,
            tls: None,
            tls_name: String::new(),
            token,
            stream: None,
            phase: Phase::Idle,
            link: LinkId::default(),
            resolver: Resolver::start(Waker::new(registry, waker_token)?)?,
            read_buf: vec![0; READ_BUFFER],
            write_blocked: false,
            read_again: false,
        })
    }

    /// `StartTls`: wraps the open stream; the ClientHello goes at once.
    fn start_tls(
        &mut self,
        link: LinkId,
        server_name: String,
        gateway: &mut Gateway<NatsSession>,
        registry: &Registry,
        now: Instant,
    ) {
        if link != self.link || !matches!(self.phase, Phase::Open) || self.tls.is_some() {
            return;
        }
        self.tls_name.clone_from(&server_name);
        let bare = server_name.trim_start_matches('[').trim_end_matches(']');
        let started = ServerName::try_from(bare.to_owned())
            .map_err(|e| format!("{e}"))
            .and_then(|name| {
                ClientConnection::new(self.tls_config.clone(), name).map_err(|e| e.to_string())
            });
        match started {
            Ok(conn) => {
                self.tls = Some(conn);
                self.flush(gateway, registry, now);
            }
            Err(why) => self.tls_failed(&why, gateway, registry, now),
        }
    }

    /// The TLS session failed: close, and tell the session why and for which name.
    fn tls_failed(
        &mut self,
        why: &dyn std::fmt::Display,
        gateway: &mut Gateway<NatsSession>,
        registry: &Registry,
        now: Instant,
    ) {
        let reason = format!("{why} (server name {})", self.tls_name);
        self.close(registry);
        gateway.handle_upstream(NatsInput::TlsFailed(self.link, &reason), now);
    }

    /// Writes what the session queued, as far as the socket takes it.
    fn flush(&mut self, gateway: &mut Gateway<NatsSession>, registry: &Registry, now: Instant) {
        if self.tls.is_some() {
            return self.flush_tls(gateway, registry, now);
        }
        loop {
            let (Phase::Open, Some(stream), false) =
                (&self.phase, self.stream.as_mut(), self.write_blocked)
            else {
                return;
            };
            match write_once(stream, gateway.upstream().output()) {
                WriteStep::Empty => return,
                WriteStep::Wrote(n) => {
                    gateway.handle_upstream(NatsInput::Written(self.link, n), now);
                }
                WriteStep::Blocked => {
                    self.write_blocked = true;
                    return;
                }
                WriteStep::Failed(e) => {
                    debug!(event = "nats_write_failed", component = "nats_resilience", error = %e);
                    return self.lost(gateway, registry, now);
                }
            }
        }
    }

    /// `flush` over TLS: the session's bytes go into rustls (which holds them until the
    /// handshake is done), and rustls' records (handshake messages too) onto the socket.
    /// `Written` counts what rustls took: from then on the bytes are the link's to deliver.
    fn flush_tls(&mut self, gateway: &mut Gateway<NatsSession>, registry: &Registry, now: Instant) {
        loop {
            let (Phase::Open, Some(stream), Some(tls), false) = (
                &self.phase,
                self.stream.as_mut(),
                self.tls.as_mut(),
                self.write_blocked,
            ) else {
                return;
            };
            let mut taken = 0;
            for slice in gateway.upstream().output() {
                // rustls' writer takes what fits under its buffer limit and fails only once
                // the connection is closed for writing, which the read side reports.
                let n = tls.writer().write(slice).unwrap_or(0);
                taken += n;
                if n < slice.len() {
                    break;
                }
            }
            let sent = send_tls(tls, stream);
            if taken > 0 {
                gateway.handle_upstream(NatsInput::Written(self.link, taken), now);
            }
            match sent {
                Ok(true) if taken > 0 => {}
                Ok(true) => return,
                Ok(false) => {
                    self.write_blocked = true;
                    return;
                }
                Err(e) => {
                    debug!(event = "nats_write_failed", component = "nats_resilience", error = %e);
                    return self.lost(gateway, registry, now);
                }
            }
        }
    }

    /// `read` over TLS: records in, plaintext to the session, and whatever the handshake
    /// must answer (and the plaintext it held) out.
    fn read_tls(&mut self, gateway: &mut Gateway<NatsSession>, registry: &Registry, now: Instant) {
        for _ in 0..READS_PER_TURN {
            let (Some(stream), Some(tls)) = (self.stream.as_mut(), self.tls.as_mut()) else {
                return;
            };
            match tls.read_tls(stream) {
                Ok(0) if tls.is_handshaking() => {
                    let why = "the server closed the connection during the TLS handshake";
                    return self.tls_failed(&why, gateway, registry, now);
                }
                Ok(0) => return self.lost(gateway, registry, now),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(event = "nats_read_failed", component = "nats_resilience", error = %e);
                    return self.lost(gateway, registry, now);
                }
            }
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // The alert rustls queued tells the server why; best effort.
                    let _ = send_tls(tls, stream);
                    return self.tls_failed(&e, gateway, registry, now);
                }
            };
            let peer_closed = state.peer_has_closed();
            let mut plaintext = state.plaintext_bytes_to_read();
            while plaintext > 0 {
                let n = match tls.reader().read(&mut self.read_buf) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                plaintext -= n.min(plaintext);
                gateway.handle_upstream(NatsInput::Received(self.link, &self.read_buf[..n]), now);
            }
            if peer_closed {
                return self.lost(gateway, registry, now);
            }
            self.flush(gateway, registry, now);
        }
        self.read_again = true;
    }

    fn read(&mut self, gateway: &mut Gateway<NatsSession>, registry: &Registry, now: Instant) {
        if self.tls.is_some() {
            return self.read_tls(gateway, registry, now);
        }
        for _ in 0..READS_PER_TURN {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.read(&mut self.read_buf) {
                Ok(0) => return self.lost(gateway, registry, now),
                Ok(n) => {
                    let bytes = &self.read_buf[..n];
                    gateway.handle_upstream(NatsInput::Received(self.link, bytes), now);
                    if n < self.read_buf.len() {
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

    /// The peer closed or the socket failed: drop it and tell the session, which decides
    /// what next.
    fn lost(&mut self, gateway: &mut Gateway<NatsSession>, registry: &Registry, now: Instant) {
        self.close(registry);
        gateway.handle_upstream(NatsInput::Closed(self.link), now);
    }

    /// Starts a non-blocking connect to the first address that accepts the attempt.
    fn connect(
        &mut self,
        mut addrs: Vec<SocketAddr>,
        gateway: &mut Gateway<NatsSession>,
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
        gateway.handle_upstream(NatsInput::ConnectFailed(self.link), now);
    }

    /// A connecting socket became writable or failed: find out which.
    fn check_connected(
        &mut self,
        gateway: &mut Gateway<NatsSession>,
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
        gateway.handle_upstream(NatsInput::Connected(self.link), now);
        // Bytes (the server's INFO) may already be waiting and raise no new edge.
        self.read(gateway, registry, now);
    }

    fn close(&mut self, registry: &Registry) {
        if let Some(mut stream) = self.stream.take() {
            let _ = registry.deregister(&mut stream);
        }
        self.phase = Phase::Idle;
        self.write_blocked = false;
        self.read_again = false;
        self.tls = None;
    }
}

/// Writes rustls' pending records: `Ok(true)` when all went, `Ok(false)` when the socket is
/// full (wait for writability).
fn send_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// `127.0.0.1`, `::1` or `[::1]`.
fn parse_ip(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

type Resolution = (LinkId, io::Result<Vec<SocketAddr>>);

/// One thread that runs `getaddrinfo` for the loop and wakes it with the answer; the
/// hand-off between the two is [`handoff`], model-checked with loom.
struct Resolver {
    side: handoff::LoopSide<(LinkId, String, u16), Resolution>,
}

impl Resolver {
    fn start(waker: Waker) -> io::Result<Resolver> {
        let (side, worker) = handoff::channel::<(LinkId, String, u16), Resolution, _>(waker);
        std::thread::Builder::new()
            .name("nats-resolver".into())
            .spawn(move || {
                // Ends when the loop drops its side.
                while let Some((link, host, port)) = worker.next_request() {
                    let result = (host.as_str(), port)
                        .to_socket_addrs()
                        .map(|addrs| addrs.collect());
                    if worker.answer((link, result)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Resolver { side })
    }

    fn resolve(&self, link: LinkId, host: String, port: u16) -> Result<(), ()> {
        self.side.submit((link, host, port)).map_err(|_| ())
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
