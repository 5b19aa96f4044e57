//! The gateway: routes value messages between client connections, admission, the circuit
//! breaker, the in-flight table and the upstream. It is the one pump every shell drives: the
//! mio daemon, both simulation tiers and the fuzzer differ only in syscalls.
//!
//! # The call contract
//!
//! 1. **Feed what happened**, each with the current time: [`Gateway::handle_client_opened`],
//!    [`Gateway::handle_client_bytes`], [`Gateway::handle_client_written`],
//!    [`Gateway::handle_client_eof`], [`Gateway::handle_client_closed`],
//!    [`Gateway::handle_upstream`] (the upstream's own I/O, as values),
//!    [`Gateway::handle_shutdown`], and [`Gateway::handle_timeout`] whenever the instant from
//!    [`Gateway::poll_timeout`] has passed (calling it early is harmless). Time must never go
//!    backwards. Inputs may be batched: a shell may feed every event of one readiness batch
//!    before it polls.
//! 2. **Poll [`Gateway::poll_action`] until `None`** and act: write a connection's
//!    [`Gateway::client_output`] on `Transmit`, close on `Close`, read again on `ResumeRead`,
//!    do the upstream's I/O on `Upstream` (open, write, close its socket), exit on
//!    `ShutdownComplete`. Acting may feed new inputs; keep polling.
//! 3. **Sleep** until [`Gateway::poll_timeout`] or the next I/O event, whichever comes first.
//!
//! The order of actions is decided here, once: everything comes out in the order it arose,
//! except the upstream's flush of queued output (the NATS `Transmit`). That one is held, and
//! [`Gateway::poll_timeout`] reports it due at once; the [`Gateway::handle_timeout`] call a
//! shell makes once that instant has passed (the mio shell: once per loop turn, after every
//! readiness event of the turn) hands it out, after everything else. So replies go to each
//! client as soon as its event is handled, and the requests of every client served in a turn
//! leave for NATS in one write.
//!
//! ```no_run
//! use ipc_gateway_core::stub::{StubConfig, StubUpstream};
//! use ipc_gateway_core::{Action, Gateway, GatewayConfig, Instant, PeerCredentials};
//!
//! let mut gateway: Gateway<StubUpstream> =
//!     Gateway::new(GatewayConfig::default(), StubConfig::default());
//! let mut now = Instant::ZERO;
//! let conn = gateway.handle_client_opened(PeerCredentials::default(), now);
//! loop {
//!     // 1. Feed: bytes a client sent (a PING frame here), and time.
//!     gateway.handle_client_bytes(conn, &[0, 0, 0, 6, 1, 0x10], now);
//!     if gateway.poll_timeout().is_some_and(|t| t <= now) {
//!         gateway.handle_timeout(now);
//!     }
//!     // 2. Poll until None, and act.
//!     while let Some(action) = gateway.poll_action() {
//!         match action {
//!             Action::Transmit(id) => {
//!                 let n: usize = gateway.client_output(id).map(<[u8]>::len).sum();
//!                 // ... write those bytes to the socket, then:
//!                 gateway.handle_client_written(id, n, now);
//!             }
//!             Action::ResumeRead(_id) => { /* read the socket again */ }
//!             Action::Close(_id) => { /* close the socket */ }
//!             Action::Upstream(never) => match never {},
//!             Action::ShutdownComplete { .. } => return,
//!         }
//!     }
//!     // 3. Sleep until poll_timeout() or the next socket event.
//!     now = gateway.poll_timeout().unwrap_or(now);
//! }
//! ```
//!
//! Every request frame gets exactly one reply, in order per connection; every request handed
//! to the upstream leaves the in-flight table exactly once (reply, timeout, client gone, or
//! drain end), and a reply for a request that already left is dropped and counted.

mod admission;
mod health;
mod histogram;
mod invariants;
mod shutdown;

pub use health::{assess, Health, HealthInputs, HealthReason, HealthStatus, LinkHealth};
pub use histogram::{DurationHistogram, REQUEST_DURATION_BOUNDS};
pub use shutdown::{Shutdown, FLUSH_GRACE};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker, Outcome};
use crate::capabilities::capabilities_json;
use crate::connection::{ClientConnection, ConnId, ConnectionLimits};
use crate::error::{error_frame, ErrorCode};
use crate::frame::{kind, DecodeError, Frame, ReplyFrame, MAX_FRAME_BYTES};
use crate::inflight::{InFlight, InFlightTable, RequestId};
use crate::time::Instant;
use crate::upstream::{FailureCause, Identity, TaskKind, Upstream, UpstreamEvent, UpstreamRequest};

/// Which peer uids may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedUids {
    Any,
    Only(BTreeSet<u32>),
}

impl AllowedUids {
    /// An unknown uid (credentials unavailable) is allowed only when any uid is.
    pub fn allows(&self, uid: Option<u32>) -> bool {
        match (self, uid) {
            (AllowedUids::Any, _) => true,
            (AllowedUids::Only(set), Some(uid)) => set.contains(&uid),
            (AllowedUids::Only(_), None) => false,
        }
    }
}

/// Everything the gateway's behaviour depends on.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub max_connections: usize,
    pub max_inflight: usize,
    pub connection: ConnectionLimits,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    pub breaker: BreakerConfig,
    /// How long the upstream may have no link before health turns from DEGRADED to UNHEALTHY
    /// (gateway.md section 5, `CGW_HEALTH_GRACE_MS`).
    pub health_grace: Duration,
    pub allowed_uids: AllowedUids,
    /// Seeds every random choice (request id prefix now; NATS jitter and inbox later).
    pub seed: u64,
    /// Reported in the capabilities reply.
    pub version: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_connections: 64,
            max_inflight: 1000,
            connection: ConnectionLimits {
                max_frame_bytes: MAX_FRAME_BYTES,
                max_inflight: 10,
                read_timeout: Duration::from_secs(10),
                max_unsent_bytes: 8 * 1024 * 1024,
            },
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            breaker: BreakerConfig::default(),
            health_grace: Duration::from_secs(5),
            allowed_uids: AllowedUids::Any,
            seed: 0,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Peer credentials read by the shell at accept (`None` where the OS did not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerCredentials {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

/// What the shell must do; `A` is the upstream's own action type.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<A> {
    /// The connection has reply bytes queued: write [`Gateway::client_output`] until it is
    /// empty (waiting for writability as needed) and report with `handle_client_written`.
    Transmit(ConnId),
    /// Close the socket now. The gateway has forgotten the connection.
    Close(ConnId),
    /// Reading had paused for backpressure and may go on. Read now: bytes already waiting in
    /// the socket will not raise a new readiness event.
    ResumeRead(ConnId),
    /// The upstream's I/O: for NATS, open, write or close its socket
    /// ([`crate::nats_session::SessionAction`]).
    Upstream(A),
    /// The shutdown is over (clients answered, upstream closed), or a second signal forced
    /// it: exit.
    ShutdownComplete { forced: bool },
}

/// Counters for metrics and tests. Monotonic unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayStats {
    pub connections_total: u64,
    pub connections_rejected_limit: u64,
    pub connections_rejected_uid: u64,
    pub connections_closed_output_cap: u64,
    pub connections_closed_read_timeout: u64,
    /// Task requests by IPC type: submit, query, cancel.
    pub task_requests: [u64; 3],
    /// Requests answered locally, by kind: [`LOCAL_REQUEST_KINDS`].
    pub local_requests: [u64; 3],
    /// Replies by outcome: index is the error code, 0 for RESPONSE_OK.
    pub responses: BTreeMap<u16, u64>,
    pub backpressure_rejections: u64,
    pub router_timeouts: u64,
    /// Upstream replies for requests that had already left (late, duplicate or unknown).
    pub dropped_replies: u64,
    pub breaker_transitions: BTreeMap<&'static str, u64>,
    /// Task requests answered (the Router's reply, a timeout, a refusal): from when the frame
    /// was decoded to when the reply was queued for the client.
    pub request_duration: DurationHistogram,
    /// Changes of health status, by the status changed to ([`HealthStatus::name`]).
    pub health_changes: BTreeMap<&'static str, u64>,
}

/// What `GatewayStats::local_requests` counts, by index: PING, CAPABILITIES, and any type
/// answered with error 2.
pub const LOCAL_REQUEST_KINDS: [&str; 3] = ["ping", "capabilities", "unsupported"];

/// Per-connection bookkeeping around the connection state machine.
#[derive(Debug)]
struct Client {
    conn: ClientConnection,
    peer: PeerCredentials,
    /// Counts against the connection limit (refused connections do not).
    admitted: bool,
    /// A `Transmit` was announced and the output queue has not been emptied since.
    transmitting: bool,
    /// What the shell was last told about reading.
    reading: bool,
    /// The read deadline registered in `read_deadlines`.
    read_deadline: Option<Instant>,
    /// Task requests answered on this connection (the Router's reply, or an error such as a
    /// timeout or an admission refusal); logged with `connection_closed`.
    served: u64,
}

/// The gateway state machine. See the module doc for the call order.
pub struct Gateway<U: Upstream> {
    config: GatewayConfig,
    upstream: U,
    clients: BTreeMap<ConnId, Client>,
    admitted_connections: usize,
    inflight: InFlightTable,
    breaker: CircuitBreaker,
    /// The upstream's link as last seen, to notice losses and returns.
    last_link: Option<u64>,
    /// Since when the upstream has had no link: the first input that found none (health).
    link_down_since: Option<Instant>,
    /// Whether a link was ever up (health: reconnecting rather than connecting).
    ever_linked: bool,
    /// As of the last input ([`Gateway::health`]).
    health: Health,
    /// The end of the grace period of the outage going on, while it is ahead.
    health_deadline: Option<Instant>,
    /// The newest request answered "no responders": older requests that time out went away
    /// with the Router ([`Outcome::RouterLeft`]). Ids grow in submit order, which is publish
    /// order.
    newest_no_responders: Option<RequestId>,
    read_deadlines: BTreeSet<(Instant, ConnId)>,
    actions: VecDeque<Action<U::Action>>,
    /// The upstream's flush and since when it is held; `handle_timeout` hands it out (module
    /// doc).
    held_flush: Option<(Instant, U::Action)>,
    next_conn: u64,
    /// Prefix of request ids, from the seed, so ids differ between gateway instances.
    instance: u32,
    capabilities: Bytes,
    shutdown: Shutdown,
    /// Connections whose decoding may go on because a reply freed an in-flight slot. Worked
    /// off at the end of the turn rather than at once: answering from inside the upstream's
    /// reply path would recurse once per pipelined frame.
    to_resume: BTreeSet<ConnId>,
    stats: GatewayStats,
}

impl<U: Upstream> Gateway<U> {
    /// Builds the gateway and its upstream, deriving the upstream's [`Identity`] (request id
    /// prefix, seed) from the gateway's seed.
    pub fn new(config: GatewayConfig, upstream: U::Config) -> Gateway<U> {
        let identity = Identity::derive(config.seed);
        let instance = identity.instance;
        let upstream = U::new(upstream, identity);
        Gateway {
            capabilities: capabilities_json(config.connection.max_frame_bytes, &config.version),
            breaker: CircuitBreaker::new(config.breaker),
            last_link: None,
            link_down_since: None,
            ever_linked: false,
            health: Self::initial_health(&config, &upstream),
            health_deadline: None,
            newest_no_responders: None,
            config,
            upstream,
            clients: BTreeMap::new(),
            admitted_connections: 0,
            inflight: InFlightTable::new(),
            read_deadlines: BTreeSet::new(),
            actions: VecDeque::new(),
            held_flush: None,
            next_conn: 0,
            instance,
            shutdown: Shutdown::Running,
            to_resume: BTreeSet::new(),
            stats: GatewayStats::default(),
        }
    }

    // ----- inputs -------------------------------------------------------------------------

    /// A client connected. Returns its id; a refused client gets its error frame through the
    /// usual `Transmit` and is then closed.
    pub fn handle_client_opened(&mut self, peer: PeerCredentials, now: Instant) -> ConnId {
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        self.stats.connections_total += 1;
        let mut client = Client {
            conn: ClientConnection::new(self.config.connection),
            peer,
            admitted: false,
            transmitting: false,
            reading: true,
            read_deadline: None,
            served: 0,
        };
        let refusal = if !self.config.allowed_uids.allows(peer.uid) {
            self.stats.connections_rejected_uid += 1;
            Some((
                ErrorCode::PermissionDenied,
                format!(
                    "Permission denied: uid {} is not allowed",
                    fmt_opt(peer.uid)
                ),
            ))
        } else if self.admitted_connections >= self.config.max_connections {
            self.stats.connections_rejected_limit += 1;
            Some((
                ErrorCode::Overloaded,
                format!(
                    "Overloaded: connection limit of {} reached",
                    self.config.max_connections
                ),
            ))
        } else {
            None
        };
        match refusal {
            Some((code, message)) => {
                warn!(event = "connection_rejected", component = "ipc_bridge", conn_id = id.0,
                      uid = peer.uid, gid = peer.gid, pid = peer.pid, reason = code.name(),
                      %message);
                let slot = client.conn.open_slot(None);
                client.conn.answer(slot, error_frame(code, &message, None));
                client.conn.begin_close();
                self.count_response(code.code());
            }
            None => {
                client.admitted = true;
                self.admitted_connections += 1;
                info!(
                    event = "connection_opened",
                    component = "ipc_bridge",
                    conn_id = id.0,
                    uid = peer.uid,
                    gid = peer.gid,
                    pid = peer.pid
                );
            }
        }
        self.clients.insert(id, client);
        self.settle(id, now);
        self.finish_turn(now);
        id
    }

    /// Bytes read from a client's socket.
    pub fn handle_client_bytes(&mut self, id: ConnId, bytes: &[u8], now: Instant) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.conn.handle_bytes(bytes, now);
            self.process_frames(id, now);
        }
        self.finish_turn(now);
    }

    /// The shell wrote `n` bytes of the connection's output.
    pub fn handle_client_written(&mut self, id: ConnId, n: usize, now: Instant) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.conn.handle_written(n);
            if !client.conn.has_output() {
                client.transmitting = false;
            }
            self.settle(id, now);
        }
        self.finish_turn(now);
    }

    /// The client shut down its sending side (read returned end of stream): what it asked is
    /// still answered, then the connection closes. A partial frame it left is dropped.
    pub fn handle_client_eof(&mut self, id: ConnId, now: Instant) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.conn.begin_close();
            self.settle(id, now);
        }
        self.finish_turn(now);
    }

    /// The client hung up or its socket failed. The shell has already dropped the socket; its
    /// requests are cancelled and their replies, if any come, are dropped.
    pub fn handle_client_closed(&mut self, id: ConnId, now: Instant) {
        self.forget_client(id, "peer_closed", now);
        self.finish_turn(now);
    }

    /// Lets time pass: stub replies fall due, requests time out, partial frames time out, the
    /// breaker half-opens, the drain ends, the health grace period ends. Calling it early is
    /// harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.upstream.handle_timeout(now);
        self.deliver_outcomes(now);
        while let Some((id, entry)) = self.inflight.pop_expired(now) {
            let outcome = if !self.upstream.awaiting_router(id) {
                Outcome::LinkFailed
            } else if self.newest_no_responders.is_some_and(|newer| newer > id) {
                Outcome::RouterLeft
            } else {
                Outcome::RouterSilent
            };
            self.upstream.cancel(id);
            self.breaker.record(entry.permit, outcome, now);
            self.stats.router_timeouts += 1;
            let rid = self.request_id_text(id);
            let message = format!(
                "Timeout: the Router did not reply within {} ms",
                self.config.request_timeout.as_millis()
            );
            self.complete(
                id,
                entry,
                error_frame(ErrorCode::Timeout, &message, Some(&rid)),
                ErrorCode::Timeout.code(),
                now,
            );
        }
        while let Some(&(deadline, id)) = self.read_deadlines.first() {
            if deadline > now {
                break;
            }
            self.read_deadlines.remove(&(deadline, id));
            if let Some(client) = self.clients.get_mut(&id) {
                client.read_deadline = None;
                let message = format!(
                    "Timeout: read timeout, a partial frame was held for more than {} ms",
                    self.config.connection.read_timeout.as_millis()
                );
                warn!(
                    event = "read_timeout",
                    component = "ipc_bridge",
                    conn_id = id.0
                );
                self.stats.connections_closed_read_timeout += 1;
                self.answer_local_and_close(id, ErrorCode::Timeout, &message, now);
            }
        }
        self.breaker.handle_timeout(now);
        self.finish_turn(now);
        if let Some((_, flush)) = self.held_flush.take() {
            self.actions.push_back(Action::Upstream(flush));
        }
    }

    // ----- outputs ------------------------------------------------------------------------

    /// The next thing the shell must do.
    pub fn poll_action(&mut self) -> Option<Action<U::Action>> {
        self.actions.pop_front()
    }

    /// When [`Gateway::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.inflight.next_deadline(),
            self.read_deadlines.first().map(|&(t, _)| t),
            self.breaker.poll_timeout(),
            self.upstream.poll_timeout(),
            self.shutdown.deadline(),
            self.health_deadline,
            self.held_flush.as_ref().map(|(since, _)| *since),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The connection's queued reply bytes, in order, for a vectored write.
    pub fn client_output(&self, id: ConnId) -> impl Iterator<Item = &[u8]> {
        self.clients
            .get(&id)
            .into_iter()
            .flat_map(|c| c.conn.output())
    }

    /// Whether the gateway has stopped reading this connection for good (its last reply is
    /// queued): bytes the client sends from now on are discarded unread.
    pub fn is_closing(&self, id: ConnId) -> bool {
        self.clients.get(&id).is_none_or(|c| c.conn.is_closing())
    }

    /// Whether the shell should read from this connection now.
    pub fn wants_read(&self, id: ConnId) -> bool {
        self.clients.get(&id).is_some_and(|c| c.conn.wants_read())
    }

    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Open connections, refused ones still flushing their error included.
    pub fn connection_count(&self) -> usize {
        self.clients.len()
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub fn upstream(&self) -> &U {
        &self.upstream
    }

    /// For settings that change no state the gateway tracks and produce no action, such as
    /// the NATS credentials re-read on SIGHUP (used from the next connection on).
    pub fn upstream_mut(&mut self) -> &mut U {
        &mut self.upstream
    }

    /// An event of the upstream's own I/O (for NATS, what happened to its socket); the
    /// outcomes it produced reach their clients in the same turn.
    pub fn handle_upstream(&mut self, input: U::Input<'_>, now: Instant) {
        self.upstream.handle_input(input, now);
        self.deliver_outcomes(now);
        self.finish_turn(now);
    }

    // ----- routing ------------------------------------------------------------------------

    fn process_frames(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(client) = self.clients.get_mut(&id) else {
                return;
            };
            match client.conn.next_frame(now) {
                None => break,
                Some(Ok(frame)) => self.handle_frame(id, frame, now),
                Some(Err(err)) => {
                    let (code, message) = decode_error_reply(err);
                    warn!(event = "error", component = "ipc_bridge", conn_id = id.0,
                          code = code.code(), %message);
                    self.answer_local_and_close(id, code, &message, now);
                    break;
                }
            }
        }
        self.settle(id, now);
    }

    fn handle_frame(&mut self, id: ConnId, frame: Frame, now: Instant) {
        let Some(task) = TaskKind::from_frame_kind(frame.kind) else {
            let reply = match frame.kind {
                kind::PING => {
                    self.stats.local_requests[0] += 1;
                    ReplyFrame::new(kind::PONG, Bytes::new())
                }
                kind::CAPABILITIES => {
                    self.stats.local_requests[1] += 1;
                    ReplyFrame::new(kind::RESPONSE_OK, self.capabilities.clone())
                }
                other => {
                    self.stats.local_requests[2] += 1;
                    let message = format!("Unsupported message type 0x{other:02X}");
                    self.count_response(ErrorCode::UnsupportedType.code());
                    return self
                        .answer_local(id, error_frame(ErrorCode::UnsupportedType, &message, None));
                }
            };
            self.count_response(0);
            return self.answer_local(id, reply);
        };
        self.stats.task_requests[task as usize] += 1;
        debug!(
            event = "request_received",
            component = "ipc_bridge",
            conn_id = id.0,
            method = task.method(),
            payload_size = frame.payload.len()
        );
        let admitted = self.admit(id, frame.payload, now);
        let (payload, permit) = match admitted {
            Ok(ok) => ok,
            Err((code, message)) => {
                self.count_response(code.code());
                if let Some(client) = self.clients.get_mut(&id) {
                    client.served += 1;
                }
                // Refused at once, so decoded and answered at the same instant: still a
                // request answered, or the histogram's count would not match the requests.
                self.stats.request_duration.observe(Duration::ZERO);
                return self.answer_local(id, error_frame(code, &message, None));
            }
        };
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let deadline = now + self.config.request_timeout;
        let rid = self.inflight.insert(InFlight {
            conn: id,
            slot: client.conn.next_slot(),
            deadline,
            started: now,
            permit,
            kind: frame.kind,
        });
        client.conn.open_slot(Some(rid));
        let request = UpstreamRequest {
            id: rid,
            kind: task,
            payload,
            deadline,
        };
        self.upstream.submit(request, now);
        self.deliver_outcomes(now);
    }

    /// Hands the upstream's outcomes to their requests' clients.
    fn deliver_outcomes(&mut self, now: Instant) {
        while let Some(event) = self.upstream.poll_event() {
            let (id, reply, code, outcome) = match event {
                UpstreamEvent::Reply { id, payload } => (
                    id,
                    ReplyFrame::new(kind::RESPONSE_OK, payload),
                    0,
                    Outcome::RouterReplied,
                ),
                UpstreamEvent::Failed {
                    id,
                    code,
                    message,
                    cause,
                } => {
                    if cause == FailureCause::NoResponders {
                        self.newest_no_responders = self.newest_no_responders.max(Some(id));
                    }
                    let rid = self.request_id_text(id);
                    (
                        id,
                        error_frame(code, &message, Some(&rid)),
                        code.code(),
                        Outcome::from(cause),
                    )
                }
            };
            match self.inflight.remove(id) {
                None => {
                    self.stats.dropped_replies += 1;
                    debug!(
                        event = "reply_dropped",
                        component = "ipc_bridge",
                        request_id = id.0
                    );
                }
                Some(entry) => {
                    self.breaker.record(entry.permit, outcome, now);
                    self.complete(id, entry, reply, code, now);
                }
            }
        }
    }

    /// Delivers the answer to a request that just left the in-flight table.
    fn complete(
        &mut self,
        id: RequestId,
        entry: InFlight,
        reply: ReplyFrame,
        code: u16,
        now: Instant,
    ) {
        self.count_response(code);
        let Some(client) = self.clients.get_mut(&entry.conn) else {
            return;
        };
        let answered = client.conn.answer(entry.slot, reply);
        client.served += 1;
        assert!(
            answered,
            "request {id:?} had no open slot on {:?}",
            entry.conn
        );
        self.stats.request_duration.observe(now - entry.started);
        client.conn.update_read_timer(now);
        debug!(
            event = "response_sent",
            component = "ipc_bridge",
            conn_id = entry.conn.0,
            request_id = id.0,
            outcome = code,
            duration_us = (now - entry.started).as_micros() as u64
        );
        // Decoding may have paused on this connection's in-flight limit: go on with what is
        // buffered (at the end of the turn) before telling the shell to read more.
        self.to_resume.insert(entry.conn);
    }

    fn answer_local(&mut self, id: ConnId, reply: ReplyFrame) {
        if let Some(client) = self.clients.get_mut(&id) {
            let slot = client.conn.open_slot(None);
            client.conn.answer(slot, reply);
        }
    }

    fn answer_local_and_close(&mut self, id: ConnId, code: ErrorCode, message: &str, now: Instant) {
        self.count_response(code.code());
        self.answer_local(id, error_frame(code, message, None));
        if let Some(client) = self.clients.get_mut(&id) {
            client.conn.begin_close();
        }
        self.settle(id, now);
    }

    /// Tells the shell what changed on one connection, and closes it when it is done or over
    /// its output cap.
    fn settle(&mut self, id: ConnId, now: Instant) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if client.conn.over_output_cap() {
            self.stats.connections_closed_output_cap += 1;
            warn!(
                event = "output_cap_reached",
                component = "ipc_backpressure",
                conn_id = id.0,
                cap = self.config.connection.max_unsent_bytes
            );
            self.forget_client(id, "output_cap", now);
            self.actions.push_back(Action::Close(id));
            return;
        }
        if client.conn.is_finished() {
            self.forget_client(id, "closed_after_reply", now);
            self.actions.push_back(Action::Close(id));
            return;
        }
        if client.conn.has_output() && !client.transmitting {
            client.transmitting = true;
            self.actions.push_back(Action::Transmit(id));
        }
        let wants = client.conn.wants_read();
        if wants && !client.reading {
            self.actions.push_back(Action::ResumeRead(id));
        }
        client.reading = wants;
        let deadline = client.conn.read_deadline();
        if deadline != client.read_deadline {
            if let Some(old) = client.read_deadline.take() {
                self.read_deadlines.remove(&(old, id));
            }
            if let Some(new) = deadline {
                self.read_deadlines.insert((new, id));
            }
            client.read_deadline = deadline;
        }
    }

    /// Removes a connection and cancels everything it had in flight.
    fn forget_client(&mut self, id: ConnId, reason: &'static str, now: Instant) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        if let Some(d) = client.read_deadline {
            self.read_deadlines.remove(&(d, id));
        }
        if client.admitted {
            self.admitted_connections -= 1;
        }
        let requests: Vec<RequestId> = client.conn.waiting_requests().collect();
        let cancelled = requests.len();
        for rid in requests {
            if let Some(entry) = self.inflight.remove(rid) {
                self.upstream.cancel(rid);
                self.breaker.record(entry.permit, Outcome::Abandoned, now);
            }
        }
        info!(
            event = "connection_closed",
            component = "ipc_bridge",
            conn_id = id.0,
            uid = client.peer.uid,
            gid = client.peer.gid,
            pid = client.peer.pid,
            reason,
            requests_served = client.served,
            cancelled
        );
    }

    /// Tells the breaker when the upstream's link was lost and when one is back, so that a
    /// reconnect never inherits an Open breaker the outage caused (breaker.rs, module doc),
    /// and notes since when there has been no link (health.rs).
    fn observe_link(&mut self, now: Instant) {
        let link = self.upstream.link();
        match link {
            None => {
                self.link_down_since.get_or_insert(now);
            }
            Some(_) => {
                self.link_down_since = None;
                self.ever_linked = true;
            }
        }
        if link == self.last_link {
            return;
        }
        if self.last_link.is_some() {
            self.breaker.handle_link_lost(now);
        }
        if link.is_some() {
            self.breaker.handle_link_restored(now);
        }
        self.last_link = link;
    }

    /// End of every input: paused connections go on decoding, breaker transitions are logged
    /// and counted, the shutdown moves on, the upstream's actions join the queue, and health
    /// is re-assessed.
    fn finish_turn(&mut self, now: Instant) {
        self.resume_decoding(now);
        self.observe_link(now);
        while let Some(t) = self.breaker.poll_transition() {
            *self
                .stats
                .breaker_transitions
                .entry(t.to.name())
                .or_default() += 1;
            warn!(
                event = "breaker_transition",
                component = "circuit_breaker",
                to = t.to.name(),
                cause = t.cause.name(),
                count = t.count,
                open_ms = t.open_for.as_millis() as u64
            );
        }
        self.advance_shutdown(now);
        self.collect_upstream_actions(now);
        self.update_health(now);
    }

    /// Connections whose replies freed in-flight slots decode what they buffered.
    fn resume_decoding(&mut self, now: Instant) {
        while let Some(id) = self.to_resume.pop_first() {
            self.process_frames(id, now);
        }
    }

    /// Moves the upstream's actions into the one queue. The flush is held until the next
    /// `handle_timeout` (module doc); it stays due from the first instant it was held.
    fn collect_upstream_actions(&mut self, now: Instant) {
        while let Some(action) = self.upstream.poll_action() {
            if U::is_flush(&action) {
                let since = self.held_flush.take().map_or(now, |(since, _)| since);
                self.held_flush = Some((since, action));
            } else {
                self.actions.push_back(Action::Upstream(action));
            }
        }
    }

    fn count_response(&mut self, code: u16) {
        *self.stats.responses.entry(code).or_default() += 1;
    }

    /// The request id as the Router and the client see it.
    pub fn request_id_text(&self, id: RequestId) -> String {
        crate::upstream::request_id_text(self.instance, id)
    }
}

/// How many bytes one read may add beyond a whole frame (the shell's read buffer size).
pub const READ_SLACK: usize = 64 * 1024;

fn decode_error_reply(err: DecodeError) -> (ErrorCode, String) {
    match err {
        DecodeError::TooShort { length } => (
            ErrorCode::InvalidPayload,
            format!("Invalid payload: frame length {length} is shorter than the 6-byte header"),
        ),
        DecodeError::TooLarge { length, max } => (
            ErrorCode::FrameTooLarge,
            format!("Frame too large: length {length} exceeds the maximum of {max} bytes"),
        ),
        DecodeError::UnsupportedVersion { version } => (
            ErrorCode::UnsupportedVersion,
            format!("Unsupported protocol version {version}: this gateway speaks version 1"),
        ),
    }
}

fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "unknown".to_string(), |v| v.to_string())
}
