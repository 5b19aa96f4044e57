//! The mio shell: one thread, one `Poll`, turning readiness into core events and core actions
//! into syscalls. No logic lives here that a simulator would need to repeat: limits, deadlines,
//! ordering and closing decisions are the core's.
//!
//! Each turn: wait for readiness or the core's next deadline → for each event (accept, read,
//! write, signals, the upstream's socket) feed the core, then poll `poll_action` until `None`
//! and act, so a client's reply is written before the next client is read → `handle_timeout`
//! once the core's deadline has passed (this also releases the NATS flush the core held
//! during the turn) → act again → repeat. The order of actions is the core's (`Gateway`'s
//! call contract); this file only turns them into syscalls.
//!
//! - Edge-triggered: on readiness a socket is read until `WouldBlock`; a connection gets at
//!   most [`READS_PER_TURN`] reads per turn (pelikan's fairness rule), the rest waits for the
//!   next turn, which then does not sleep.
//! - Client sockets are registered for read readiness only; write interest is added while a
//!   write is blocked and dropped once the output is flushed. Permanent write interest would
//!   wake the loop every time a client reads (an EPOLLOUT edge per read), which cost more
//!   than the occasional re-registration in the bench.
//! - A read shorter than the buffer means the socket was emptied at that moment; any later
//!   data raises a new edge, so the extra read that would only return `WouldBlock` is skipped.
//! - When the core pauses reading (backpressure) the shell simply stops reading; on
//!   `ResumeRead` it reads at once, because bytes already queued raise no new edge.
//! - Rust ignores SIGPIPE for us, so a write to a vanished client is an `EPIPE` error, never a
//!   dead process.
//! - With NATS enabled, the session's socket is one more source here
//!   ([`crate::nats_link::NatsLink`]). The core holds the session's `Transmit` until the
//!   turn's `handle_timeout`, so the requests of every client served in the turn leave in one
//!   syscall.
//! - SIGUSR1 logs one `stats` line (counters, in-flight and reply-token counts), so an
//!   operator or a test can see that nothing leaks without an HTTP endpoint.
//! - The HTTP endpoints ([`crate::http`]) are sources of this loop too (tokens 4..=36). They
//!   only read the gateway, so their events produce no core actions; their request deadlines
//!   join the poll timeout, and their postponed work keeps the loop from sleeping, like
//!   `read_again`. On SIGTERM only the IPC listener closes: HTTP is served until the process
//!   exits, so `/ready` can say "draining" through the drain.
//! - SIGHUP reopens the audit log (logrotate's `create` mode); without one it is logged and
//!   otherwise ignored (it no longer ends the process, as its default action would).
//! - systemd ([`crate::systemd::Notifier`]): `READY=1` before the first poll, `STATUS=` when
//!   a turn ends with another health, `WATCHDOG=1` from the turns themselves (its deadline is
//!   part of the poll timeout, so an idle loop still sends it and a stuck one does not), and
//!   `STOPPING=1` once the first SIGTERM/SIGINT has closed the listener.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::time::Duration;

use ipc_gateway_core::gateway::READ_SLACK;
use ipc_gateway_core::{Action, ConnId, Gateway, Instant, PeerCredentials};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use tracing::{error, info, warn};

use crate::audit::AuditLog;
use crate::http::{self, HttpServer};
use crate::listener::BoundSocket;
use crate::nats_link::{UpstreamIo, UpstreamLink};
use crate::systemd::Notifier;
use crate::vectored::{write_once, WriteStep};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// The upstream's socket, and its helper thread's waker.
const UPSTREAM: Token = Token(2);
const UPSTREAM_WAKER: Token = Token(3);
// Tokens 4..=36 are the HTTP listener and its connections (crate::http); the gap to 64
// leaves room for more sources without renumbering clients.
const FIRST_CLIENT: usize = 64;

/// After `accept` fails (out of file descriptors, say), when to try again: edge-triggered
/// epoll raises no new event for connections already waiting in the backlog, and retrying at
/// once would spin while the condition lasts.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Reads one connection may do in one turn before others get theirs.
const READS_PER_TURN: usize = 16;
/// Unread input discarded before closing, so the client sees our last frame and then EOF
/// rather than a reset; bounded so a flooding client cannot keep us here.
const DISCARD_BEFORE_CLOSE: usize = 1024 * 1024;

/// How the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Drained after a signal.
    Drained,
    /// A second signal during the drain.
    Interrupted,
}

struct Client {
    stream: UnixStream,
    id: ConnId,
    /// The last write hit `WouldBlock`; wait for a writable event.
    write_blocked: bool,
    /// Registered for writable events (only while output is backed up).
    write_interest: bool,
}

/// A monotonic clock expressed as the core's `Instant`.
struct Clock(std::time::Instant);

impl Clock {
    fn now(&self) -> Instant {
        Instant::from_nanos(u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Clients by token, with token reuse. Tokens are slots; the core's `ConnId` is never reused.
///
/// A slot emptied while a batch of events is being handled is not reused before the next
/// poll: the batch may still hold an event of the socket that had it (a hang-up, say, when a
/// reply write to a client that left failed earlier in the batch), and that event would be
/// taken for the new client's and could close it.
#[derive(Default)]
struct Clients {
    slots: Vec<Option<Client>>,
    free: Vec<usize>,
    /// Emptied since the last poll; free from the next one.
    released: Vec<usize>,
    by_conn: std::collections::BTreeMap<ConnId, usize>,
}

impl Clients {
    /// The token the next [`Clients::insert`] will use, so the socket can be registered
    /// under it before it is stored.
    fn vacant(&self) -> Token {
        Token(FIRST_CLIENT + self.free.last().copied().unwrap_or(self.slots.len()))
    }

    fn insert(&mut self, client: Client) -> Token {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.by_conn.insert(client.id, index);
        self.slots[index] = Some(client);
        Token(FIRST_CLIENT + index)
    }

    fn get_mut(&mut self, token: Token) -> Option<&mut Client> {
        self.slots
            .get_mut(token.0.checked_sub(FIRST_CLIENT)?)?
            .as_mut()
    }

    fn token_of(&self, id: ConnId) -> Option<Token> {
        self.by_conn.get(&id).map(|i| Token(FIRST_CLIENT + i))
    }

    fn remove(&mut self, token: Token) -> Option<Client> {
        let index = token.0.checked_sub(FIRST_CLIENT)?;
        let client = self.slots.get_mut(index)?.take()?;
        self.by_conn.remove(&client.id);
        self.released.push(index);
        Some(client)
    }

    /// Called before each poll: the slots emptied since the last one may be reused, since no
    /// event of their old sockets can come any more (those sockets are deregistered).
    fn recycle(&mut self) {
        self.free.append(&mut self.released);
    }
}

/// The daemon's event loop around a gateway.
pub struct EventLoop<U: UpstreamIo> {
    poll: Poll,
    gateway: Gateway<U>,
    socket: Option<BoundSocket>,
    signals: Signals,
    clients: Clients,
    clock: Clock,
    read_buf: Vec<u8>,
    /// Connections whose read budget ran out with bytes possibly left.
    read_again: BTreeSet<Token>,
    /// `accept` failed; the backlog is retried at this time.
    accept_again: Option<std::time::Instant>,
    /// The upstream's I/O (the NATS socket; nothing for the stub).
    link: U::Link,
    /// `CGW_AUDIT_LOG`, for SIGHUP and the stats line (its records come through tracing).
    audit: Option<AuditLog>,
    /// `/health`, `/ready`, `/live`, `/metrics`; served until the process exits, through the
    /// drain (gateway.md section 8: `/ready` says 503 meanwhile).
    http: HttpServer,
    /// systemd's notifications (inert without `NOTIFY_SOCKET`).
    notifier: Notifier,
}

impl<U: UpstreamIo> EventLoop<U> {
    /// `http_listener`: the bound (or inherited) HTTP listener, `None` without HTTP.
    pub fn new(
        gateway: Gateway<U>,
        mut socket: BoundSocket,
        http_listener: Option<std::net::TcpListener>,
        audit: Option<AuditLog>,
        notifier: Notifier,
        link_config: U::LinkConfig,
    ) -> io::Result<EventLoop<U>> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket.listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let link = U::open_link(poll.registry(), UPSTREAM, UPSTREAM_WAKER, link_config)?;
        let http = HttpServer::new(http_listener, poll.registry())?;
        Ok(EventLoop {
            poll,
            gateway,
            socket: Some(socket),
            signals,
            clients: Clients::default(),
            clock: Clock(std::time::Instant::now()),
            read_buf: vec![0; READ_SLACK],
            read_again: BTreeSet::new(),
            accept_again: None,
            link,
            audit,
            http,
            notifier,
        })
    }

    /// Runs until the shutdown completes or a second signal arrives.
    pub fn run(&mut self) -> io::Result<Exit> {
        let mut events = Events::with_capacity(1024);
        // The listener is registered and nothing has been accepted yet: connections made from
        // now on wait in the backlog until the first poll.
        self.notifier
            .ready(&self.gateway.health(), std::time::Instant::now());
        loop {
            let timeout = if self.read_again.is_empty()
                && !self.link.wants_read_again()
                && !self.http.has_pending()
            {
                let now = self.clock.now();
                let core = self.gateway.poll_timeout().map(|t| {
                    if t <= now {
                        // Due already (a NATS flush the core holds for handle_timeout).
                        Duration::ZERO
                    } else {
                        // Round up to the next millisecond: epoll's resolution, and waking
                        // a little late is harmless while waking early spins.
                        (t - now) + Duration::from_micros(999)
                    }
                });
                let wall = std::time::Instant::now();
                let accept = self.accept_again.map(|t| t.saturating_duration_since(wall));
                let http = self.http.next_deadline().map(http::timeout_until);
                let watchdog = self.notifier.watchdog_timeout(wall);
                core.into_iter()
                    .chain(accept)
                    .chain(http)
                    .chain(watchdog)
                    .min()
            } else {
                Some(Duration::ZERO)
            };
            self.clients.recycle();
            self.http.recycle();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = self.clock.now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    SIGNALS => self.on_signals(now),
                    UPSTREAM => {
                        self.link
                            .on_event(event, &mut self.gateway, self.poll.registry(), now);
                    }
                    UPSTREAM_WAKER => {
                        self.link
                            .on_resolved(&mut self.gateway, self.poll.registry(), now);
                    }
                    // HTTP only reads the gateway: it produces no core actions.
                    token if HttpServer::owns(token) => {
                        let ctx = http::Ctx {
                            gateway: &self.gateway,
                            audit_write_errors: self
                                .audit
                                .as_ref()
                                .map_or(0, AuditLog::write_errors),
                        };
                        self.http.on_event(token, event, self.poll.registry(), &ctx);
                        continue;
                    }
                    // EPOLLHUP: the client closed both directions (a half-close raises only
                    // RDHUP), so nobody will read replies. Its requests are cancelled now,
                    // not when a reply write fails, which may be after the deadline.
                    token if event.is_write_closed() => self.drop_client(token, now),
                    token => {
                        if event.is_writable() {
                            if let Some(c) = self.clients.get_mut(token) {
                                c.write_blocked = false;
                            }
                            self.write(token, now);
                        }
                        if event.is_readable() || event.is_read_closed() {
                            self.read(token, now);
                        }
                    }
                }
                // Write what this event produced before reading the next connection: its
                // client can send its next requests while we serve the others.
                if let Some(exit) = self.apply_actions(now) {
                    return Ok(exit);
                }
            }
            for token in std::mem::take(&mut self.read_again) {
                self.read(token, now);
            }
            self.link
                .read_postponed(&mut self.gateway, self.poll.registry(), now);
            if let Some(exit) = self.apply_actions(now) {
                return Ok(exit);
            }
            let ctx = http::Ctx {
                gateway: &self.gateway,
                audit_write_errors: self.audit.as_ref().map_or(0, AuditLog::write_errors),
            };
            self.http.on_turn_end(self.poll.registry(), &ctx);
            if self
                .accept_again
                .is_some_and(|t| t <= std::time::Instant::now())
            {
                self.accept_again = None;
                self.accept(now);
            }
            let now = self.clock.now();
            if self.gateway.poll_timeout().is_some_and(|t| t <= now) {
                self.gateway.handle_timeout(now);
            }
            if let Some(exit) = self.apply_actions(now) {
                return Ok(exit);
            }
            self.notifier.health(&self.gateway.health());
            self.notifier.on_turn(std::time::Instant::now());
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(socket) = self.socket.as_ref() else {
                return;
            };
            match socket.listener.accept() {
                Ok((mut stream, _)) => {
                    let token = self.clients.vacant();
                    let interest = Interest::READABLE;
                    if let Err(e) = self.poll.registry().register(&mut stream, token, interest) {
                        error!(event = "error", component = "ipc_bridge", error = %e, "cannot register a client; closing it");
                        continue;
                    }
                    let peer = peer_credentials(&stream);
                    let id = self.gateway.handle_client_opened(peer, now);
                    let inserted = self.clients.insert(Client {
                        stream,
                        id,
                        write_blocked: false,
                        write_interest: false,
                    });
                    debug_assert_eq!(inserted, token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the clients already connected keep being served and
                    // the backlog is tried again shortly.
                    warn!(event = "error", component = "ipc_bridge", error = %e, "accept failed; retrying in 100 ms");
                    self.accept_again = Some(std::time::Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// A signal: SIGUSR1 logs the stats line; SIGHUP reopens the audit log; SIGTERM and
    /// SIGINT go to the core, which decides between a drain and, on the second, an exit at
    /// once.
    fn on_signals(&mut self, now: Instant) {
        let signals: Vec<i32> = self.signals.pending().collect();
        for signal in signals {
            if signal == SIGUSR1 {
                self.log_stats();
                continue;
            }
            if signal == SIGHUP {
                self.reopen_audit();
                // Rotated NATS credentials and certificates: the next (re)connect uses them.
                self.link.reload(&mut self.gateway);
                continue;
            }
            info!(event = "signal_received", component = "ipc_bridge", signal);
            self.close_listener();
            self.gateway.handle_shutdown(now);
            // After the listener is gone: whatever connects from now on waits for a successor
            // (on an inherited listener) instead of being accepted here and refused.
            self.notifier.stopping(&self.gateway.health());
        }
    }

    /// SIGHUP. A path that cannot be opened keeps the old descriptor (records go on into the
    /// renamed file) and is logged; the next SIGHUP tries again.
    fn reopen_audit(&mut self) {
        let Some(audit) = &self.audit else {
            info!(
                event = "signal_received",
                component = "ipc_bridge",
                signal = SIGHUP,
                "SIGHUP: no audit log to reopen (CGW_AUDIT_LOG is off)"
            );
            return;
        };
        match audit.reopen() {
            Ok(()) => info!(event = "audit_reopened", component = "audit",
                            path = %audit.path().display()),
            Err(e) => error!(event = "audit_reopen_failed", component = "audit",
                             path = %audit.path().display(), error = %e,
                             "cannot reopen the audit log; still writing to the old file"),
        }
    }

    /// Stops accepting and removes the socket file, so new clients fail fast and a successor
    /// can bind the path while we drain. An inherited listener (socket activation) is only
    /// deregistered and dropped: systemd holds its own copy, so connections keep queueing in
    /// its backlog for the next process, and its file stays where the socket unit made it.
    fn close_listener(&mut self) {
        if let Some(mut socket) = self.socket.take() {
            let _ = self.poll.registry().deregister(&mut socket.listener);
            socket.remove_file();
        }
    }

    fn read(&mut self, token: Token, now: Instant) {
        for _ in 0..READS_PER_TURN {
            let Some(client) = self.clients.get_mut(token) else {
                return;
            };
            let id = client.id;
            if !self.gateway.wants_read(id) {
                return;
            }
            match client.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    self.gateway.handle_client_eof(id, now);
                    return;
                }
                Ok(n) => {
                    self.gateway
                        .handle_client_bytes(id, &self.read_buf[..n], now);
                    if n < self.read_buf.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_client(token, now);
                    return;
                }
            }
        }
        self.read_again.insert(token);
    }

    fn write(&mut self, token: Token, now: Instant) {
        loop {
            let Some(client) = self.clients.get_mut(token) else {
                return;
            };
            if client.write_blocked {
                return;
            }
            let id = client.id;
            match write_once(&mut client.stream, self.gateway.client_output(id)) {
                WriteStep::Wrote(n) => self.gateway.handle_client_written(id, n, now),
                WriteStep::Empty => {
                    if client.write_interest {
                        client.write_interest = false;
                        let readable = Interest::READABLE;
                        let _ =
                            self.poll
                                .registry()
                                .reregister(&mut client.stream, token, readable);
                    }
                    return;
                }
                WriteStep::Blocked => {
                    client.write_blocked = true;
                    if client.write_interest {
                        return;
                    }
                    client.write_interest = true;
                    let both = Interest::READABLE | Interest::WRITABLE;
                    let registered =
                        self.poll
                            .registry()
                            .reregister(&mut client.stream, token, both);
                    if registered.is_err() {
                        self.drop_client(token, now);
                    }
                    return;
                }
                WriteStep::Failed(_) => {
                    self.drop_client(token, now);
                    return;
                }
            }
        }
    }

    /// The client's socket failed or hung up: forget it in the core and close it.
    fn drop_client(&mut self, token: Token, now: Instant) {
        if let Some(mut client) = self.clients.remove(token) {
            let _ = self.poll.registry().deregister(&mut client.stream);
            self.read_again.remove(&token);
            self.gateway.handle_client_closed(client.id, now);
        }
    }

    /// Carries out the core's actions, in the core's order, until it asks for nothing more;
    /// the exit once the core says the shutdown is complete.
    fn apply_actions(&mut self, now: Instant) -> Option<Exit> {
        while let Some(action) = self.gateway.poll_action() {
            match action {
                Action::Transmit(id) => {
                    if let Some(token) = self.clients.token_of(id) {
                        self.write(token, now);
                    }
                }
                Action::ResumeRead(id) => {
                    if let Some(token) = self.clients.token_of(id) {
                        self.read(token, now);
                    }
                }
                Action::Close(id) => {
                    if let Some(token) = self.clients.token_of(id) {
                        if let Some(mut client) = self.clients.remove(token) {
                            let _ = self.poll.registry().deregister(&mut client.stream);
                            self.read_again.remove(&token);
                            discard_unread(&mut client.stream, &mut self.read_buf);
                        }
                    }
                }
                Action::Upstream(action) => {
                    self.link
                        .apply(action, &mut self.gateway, self.poll.registry(), now);
                }
                Action::ShutdownComplete { forced } => {
                    return Some(if forced {
                        Exit::Interrupted
                    } else {
                        Exit::Drained
                    });
                }
            }
        }
        None
    }

    /// One line with what an operator (or a test) needs to see that nothing leaks.
    fn log_stats(&self) {
        let g = &self.gateway;
        let stats = g.stats();
        let upstream = g.upstream().report();
        let ns = &upstream.nats;
        info!(
            event = "stats",
            component = "ipc_bridge",
            connections = g.connection_count(),
            inflight = g.inflight_len(),
            upstream_pending = g.upstream().pending(),
            requests = stats.task_requests.iter().sum::<u64>(),
            router_timeouts = stats.router_timeouts,
            dropped_replies = stats.dropped_replies,
            backpressure_rejections = stats.backpressure_rejections,
            breaker = g.breaker_state().name(),
            upstream = upstream.kind,
            nats_state = upstream.state,
            nats_server = upstream.server,
            reconnect_buffer_bytes = upstream.buffered_bytes,
            late_replies = ns.late_replies,
            duplicate_replies = ns.duplicate_replies,
            unknown_replies = ns.unknown_replies,
            no_responders = ns.no_responders,
            failed_on_disconnect = ns.failed_on_disconnect,
            connect_attempts = ns.connect_attempts,
            reconnects = ns.reconnects,
            auth_failures = ns.auth_failures,
            tls_failures = ns.tls_failures,
            audit_write_errors = self.audit.as_ref().map_or(0, AuditLog::write_errors),
            "stats"
        );
    }
}

fn discard_unread(stream: &mut UnixStream, buf: &mut [u8]) {
    let mut total = 0;
    while total < DISCARD_BEFORE_CLOSE {
        match stream.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// SO_PEERCRED: who is on the other end, read once at accept.
fn peer_credentials(stream: &UnixStream) -> PeerCredentials {
    match rustix::net::sockopt::socket_peercred(stream) {
        Ok(cred) => PeerCredentials {
            uid: Some(cred.uid.as_raw()),
            gid: Some(cred.gid.as_raw()),
            pid: Some(cred.pid.as_raw_nonzero().get()),
        },
        Err(_) => PeerCredentials::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: u64) -> Client {
        let (stream, _peer) = UnixStream::pair().expect("socketpair");
        Client {
            stream,
            id: ConnId(id),
            write_blocked: false,
            write_interest: false,
        }
    }

    #[test]
    fn a_slot_emptied_in_a_batch_is_reused_only_after_the_next_poll() {
        let mut clients = Clients::default();
        let first = clients.insert(client(1));
        assert!(clients.remove(first).is_some());
        // Same batch: a stale event for `first` must not find a new client there.
        let second = clients.insert(client(2));
        assert_ne!(second, first);
        assert!(clients.get_mut(first).is_none());
        // After the next poll the slot is free again.
        clients.recycle();
        assert_eq!(clients.vacant(), first);
        assert_eq!(clients.insert(client(3)), first);
        assert_eq!(clients.token_of(ConnId(3)), Some(first));
        assert_eq!(clients.token_of(ConnId(2)), Some(second));
    }
}
