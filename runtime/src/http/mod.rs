//! The HTTP endpoints (gateway.md section 5) inside the daemon's mio loop: no second runtime,
//! no thread per request, nothing that can make the IPC side wait.
//!
//! - [`bind`] is separate from the loop, so a listener can come from elsewhere (socket
//!   activation) and the start-up rules of `CGW_HTTP_ADDR` live in one place.
//! - [`HttpServer`] owns the listener and at most [`MAX_CONNECTIONS`] connections on tokens
//!   [`LISTENER`] and [`FIRST_CONN`]`..`; one more is accepted and closed at once, and
//!   counted. The per-connection rules (parsing, limits, keep-alive, deadlines) are
//!   `connection.rs`; the answers are `routes.rs`.
//! - Bounded work per event: at most [`READS_PER_EVENT`] reads and [`REQUESTS_PER_EVENT`]
//!   answers per connection, the rest goes on next turn (the loop then does not sleep), so a
//!   client pipelining requests cannot hold the loop.
//! - Writes are non-blocking; write interest is registered only while a write is blocked.
//! - A slot emptied while the loop handles a batch of events is reused only after the next
//!   poll, as for IPC clients: a stale event of the old socket must not reach a new one.

mod connection;
mod routes;

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipc_gateway_core::Gateway;
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use tracing::{info, warn};

use self::connection::{Connection, Expired, Method, Next, Response};
use self::routes::{View, OTHER};
use crate::config::{HttpAddr, HttpSetting};
use crate::metrics::HttpCounters;
use crate::nats_link::UpstreamIo;

/// Most HTTP connections at once.
pub const MAX_CONNECTIONS: usize = 32;
pub const LISTENER: Token = Token(4);
pub const FIRST_CONN: usize = 5;
/// One past the last connection token (`Token(5)..=Token(36)`).
pub const END_CONN: usize = FIRST_CONN + MAX_CONNECTIONS;
/// Reads of one connection per event; a head is at most 8 KiB, so this is plenty for a
/// well-behaved client.
const READS_PER_EVENT: usize = 4;
/// Requests answered on one connection per event (pipelining).
const REQUESTS_PER_EVENT: usize = 8;
const READ_CHUNK: usize = 4096;

/// Why the HTTP listener could not be set up (exit code 2: it names the setting).
#[derive(Debug)]
pub struct BindError(pub String);

/// Binds `CGW_HTTP_ADDR` (gateway.md section 5): `None` when HTTP is off, or when the default
/// address was not chosen by the operator and is busy (warned about: 8080 is often a
/// developer's dev server, which must not keep the gateway from serving IPC). An address the
/// operator chose that cannot be bound is an error. Logs `http_listening` with the bound
/// address (port 0 picks one), and warns when the address is not loopback.
pub fn bind(setting: &HttpSetting) -> Result<Option<std::net::TcpListener>, BindError> {
    let HttpAddr::At(addr) = setting.addr else {
        info!(
            event = "http_disabled",
            component = "http",
            "HTTP endpoints off (CGW_HTTP_ADDR=off)"
        );
        return Ok(None);
    };
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) if !setting.explicit => {
            warn!(event = "http_disabled", component = "http", addr = %addr, error = %e,
                  "cannot listen on the default HTTP address; serving IPC without HTTP \
                   (set CGW_HTTP_ADDR to another address, e.g. 127.0.0.1:0 for a free port, \
                   or to off)");
            return Ok(None);
        }
        Err(e) => {
            return Err(BindError(format!(
                "CGW_HTTP_ADDR {:?} cannot be bound: {e} (it must be a free local IP address \
                 and port such as 127.0.0.1:8080, port 0 for any free port, or off)",
                addr.to_string()
            )))
        }
    };
    listening(&listener)?;
    Ok(Some(listener))
}

/// Logs `http_listening` for a listener however it was obtained (bound here or inherited).
pub fn listening(listener: &std::net::TcpListener) -> Result<(), BindError> {
    let bound = listener
        .local_addr()
        .map_err(|e| BindError(format!("CGW_HTTP_ADDR: cannot read the bound address: {e}")))?;
    info!(event = "http_listening", component = "http", addr = %bound);
    if !is_loopback(bound.ip()) {
        warn!(event = "http_exposed", component = "http", addr = %bound,
              "HTTP endpoints reachable from other hosts: /health and /metrics carry no \
               authentication; bind 127.0.0.1 unless something else protects them");
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

struct Slot {
    stream: TcpStream,
    conn: Connection,
    /// Registered for writable events (only while a write is blocked).
    write_interest: bool,
}

/// The HTTP side of the event loop.
pub struct HttpServer {
    listener: Option<TcpListener>,
    slots: Vec<Option<Slot>>,
    /// Emptied since the last poll; free from the next one (module doc).
    released: Vec<usize>,
    /// Connections (and the listener, as `None`) whose budget ran out: serviced next turn.
    again: BTreeSet<Option<usize>>,
    counters: HttpCounters,
    /// For `uptime_seconds`.
    started: Instant,
    buf: Vec<u8>,
}

impl HttpServer {
    /// The server around `listener` (`None`: HTTP off; the server then does nothing).
    pub fn new(
        listener: Option<std::net::TcpListener>,
        registry: &Registry,
    ) -> io::Result<HttpServer> {
        let listener = match listener {
            None => None,
            Some(std) => {
                std.set_nonblocking(true)?;
                let mut listener = TcpListener::from_std(std);
                registry.register(&mut listener, LISTENER, Interest::READABLE)?;
                Some(listener)
            }
        };
        Ok(HttpServer {
            listener,
            slots: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            released: Vec::new(),
            again: BTreeSet::new(),
            counters: HttpCounters::default(),
            started: Instant::now(),
            buf: vec![0; READ_CHUNK],
        })
    }

    /// Whether `token` is one of the HTTP side's.
    pub fn owns(token: Token) -> bool {
        token == LISTENER || (FIRST_CONN..END_CONN).contains(&token.0)
    }

    /// Before each poll: slots emptied since the last one may be reused.
    pub fn recycle(&mut self) {
        self.released.clear();
    }

    /// Whether work was postponed: the loop must not sleep.
    pub fn has_pending(&self) -> bool {
        !self.again.is_empty()
    }

    /// The earliest request deadline, for the loop's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots.iter().flatten().map(|s| s.conn.deadline()).min()
    }

    /// Readiness of one of [`HttpServer::owns`]'s tokens.
    pub fn on_event<U: UpstreamIo>(
        &mut self,
        token: Token,
        event: &Event,
        registry: &Registry,
        view: &Ctx<'_, U>,
    ) {
        if token == LISTENER {
            self.accept(registry);
            return;
        }
        let index = token.0 - FIRST_CONN;
        if self.slots.get(index).is_none_or(Option::is_none) {
            return;
        }
        if event.is_error() {
            self.close(index, registry);
            return;
        }
        self.service(index, registry, view);
    }

    /// The work postponed last turn, and the deadlines that passed.
    pub fn on_turn_end<U: UpstreamIo>(&mut self, registry: &Registry, view: &Ctx<'_, U>) {
        for entry in std::mem::take(&mut self.again) {
            match entry {
                None => self.accept(registry),
                Some(index) => self.service(index, registry, view),
            }
        }
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            match slot.conn.on_deadline(now) {
                Expired::No => {}
                Expired::Close => self.close(index, registry),
                Expired::Answer408 => {
                    let response = Response::text(408, "request not complete within 5 s");
                    slot.conn.respond(&response, false, now);
                    self.count(OTHER, 408);
                    self.service(index, registry, view);
                }
            }
        }
    }

    fn accept(&mut self, registry: &Registry) {
        for _ in 0..MAX_CONNECTIONS * 2 {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let free = (0..self.slots.len())
                .find(|&i| self.slots[i].is_none() && !self.released.contains(&i));
            if free.is_none() && self.slots.iter().flatten().count() < MAX_CONNECTIONS {
                // Under the limit, but the only free slots were emptied in this batch: the
                // backlog waits for the next turn rather than being refused.
                self.again.insert(None);
                return;
            }
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let Some(index) = free else {
                        // Over the limit: accepted and closed at once (gateway.md section 5),
                        // so a flood of idle connections cannot fill the backlog either.
                        self.counters.connections_rejected += 1;
                        drop(stream);
                        continue;
                    };
                    let token = Token(FIRST_CONN + index);
                    if registry
                        .register(&mut stream, token, Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.slots[index] = Some(Slot {
                        stream,
                        conn: Connection::new(Instant::now()),
                        write_interest: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: IPC goes on; the backlog is tried next turn.
                    warn!(event = "error", component = "http", error = %e, "HTTP accept failed");
                    self.again.insert(None);
                    return;
                }
            }
        }
        // Budget spent with connections possibly still waiting: more next turn.
        self.again.insert(None);
    }

    /// Reads, answers and writes what one connection allows now, within the per-event budget.
    fn service<U: UpstreamIo>(&mut self, index: usize, registry: &Registry, view: &Ctx<'_, U>) {
        let mut reads = 0;
        let mut answers = 0;
        loop {
            let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            // Write first: one response at a time (connection.rs).
            if slot.conn.has_output() {
                match slot.stream.write(slot.conn.output()) {
                    // A socket that takes nothing without saying WouldBlock is broken; trying
                    // again would spin.
                    Ok(0) => {
                        self.close(index, registry);
                        return;
                    }
                    Ok(n) => {
                        slot.conn.on_written(n, Instant::now());
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if !slot.write_interest {
                            slot.write_interest = true;
                            let both = Interest::READABLE | Interest::WRITABLE;
                            if registry
                                .reregister(&mut slot.stream, Token(FIRST_CONN + index), both)
                                .is_err()
                            {
                                self.close(index, registry);
                            }
                        }
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.close(index, registry);
                        return;
                    }
                }
            }
            if slot.write_interest {
                slot.write_interest = false;
                let _ = registry.reregister(
                    &mut slot.stream,
                    Token(FIRST_CONN + index),
                    Interest::READABLE,
                );
            }
            if answers == REQUESTS_PER_EVENT {
                self.again.insert(Some(index));
                return;
            }
            match slot.conn.next() {
                Next::Request(request) => {
                    answers += 1;
                    let ctx = View {
                        gateway: view.gateway,
                        counters: &self.counters,
                        audit_write_errors: view.audit_write_errors,
                        uptime: self.started.elapsed(),
                    };
                    let (label, response) = routes::route(&request, &ctx);
                    let code = response.status;
                    slot.conn
                        .respond(&response, request.method == Method::Head, Instant::now());
                    self.count(label, code);
                    continue;
                }
                Next::Reject(code) => {
                    let why = if code == 431 {
                        "request head larger than 8 KiB"
                    } else {
                        "malformed request"
                    };
                    answers += 1;
                    slot.conn
                        .respond(&Response::text(code, why), false, Instant::now());
                    self.count(OTHER, code);
                    continue;
                }
                Next::Wait => {}
            }
            if slot.conn.is_done() {
                self.close(index, registry);
                return;
            }
            let room = slot.conn.read_room();
            if room == 0 {
                return;
            }
            if reads == READS_PER_EVENT {
                self.again.insert(Some(index));
                return;
            }
            reads += 1;
            let want = room.min(self.buf.len());
            match slot.stream.read(&mut self.buf[..want]) {
                Ok(0) => slot.conn.on_eof(),
                Ok(n) => slot.conn.on_bytes(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(index, registry);
                    return;
                }
            }
        }
    }

    fn count(&mut self, label: &'static str, code: u16) {
        *self.counters.requests.entry((label, code)).or_default() += 1;
    }

    fn close(&mut self, index: usize, registry: &Registry) {
        if let Some(mut slot) = self.slots.get_mut(index).and_then(Option::take) {
            let _ = registry.deregister(&mut slot.stream);
            // Unread bytes would turn the close into a reset, which can destroy the response
            // still in the client's receive path; what is left is read away (bounded).
            let _ = slot.stream.shutdown(std::net::Shutdown::Write);
            for _ in 0..4 {
                match slot.stream.read(&mut self.buf) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            self.released.push(index);
            self.again.remove(&Some(index));
        }
    }
}

/// What the routes read from the rest of the loop.
pub struct Ctx<'a, U: UpstreamIo> {
    pub gateway: &'a Gateway<U>,
    pub audit_write_errors: u64,
}

/// How long until `deadline`, rounded up to epoll's millisecond.
pub fn timeout_until(deadline: Instant) -> Duration {
    let now = Instant::now();
    if deadline <= now {
        Duration::ZERO
    } else {
        (deadline - now) + Duration::from_micros(999)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy address the operator did not choose (the default) disables HTTP and lets the
    /// daemon start; the same address chosen explicitly is an error naming the variable and
    /// the address; `off` binds nothing; port 0 binds a free port. (The default itself is
    /// not bound here: 8080 may belong to someone else on the machine.)
    #[test]
    fn bind_rules() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let implicit = HttpSetting {
            addr: HttpAddr::At(busy),
            explicit: false,
        };
        assert!(matches!(bind(&implicit), Ok(None)));
        let explicit = HttpSetting {
            explicit: true,
            ..implicit
        };
        let err = bind(&explicit).unwrap_err().0;
        assert!(
            err.contains("CGW_HTTP_ADDR") && err.contains(&busy.to_string()),
            "{err}"
        );
        let off = HttpSetting {
            addr: HttpAddr::Off,
            explicit: true,
        };
        assert!(matches!(bind(&off), Ok(None)));
        let any = HttpSetting {
            addr: HttpAddr::At("127.0.0.1:0".parse().unwrap()),
            explicit: true,
        };
        let bound = bind(&any).unwrap().unwrap();
        assert_ne!(bound.local_addr().unwrap().port(), 0);
    }
}
