//! The NATS session: one long-lived connection to a NATS cluster, sans-IO (gateway.md
//! section 2). It is the gateway's [`Upstream`] when NATS is enabled.
//!
//! The link's states are the variants of [`link::Link`]; `set_link` is the one transition:
//!
//! ```text
//!        retry_at              TCP up              INFO: CONNECT+SUB+PING        PONG
//!  Down ──────────▶ Opening ──────────▶ AwaitInfo ──────────────────────▶ AwaitPong ─────▶ Up
//!   ▲  ▲ refused,      │                    │ handshake timeout, -ERR,        │           │ │
//!   │  │ connect       │                    │ closed, garbage                 │ (INFO ldm │ │
//!   │  └─ timeout ─────┘                    ▼                                 │  first:   │ │
//!   └──────────── next server; after a whole pass, a jittered backoff ◀───────┘  LameDuck)│ │
//!   ▲                                                                                     │ │
//!   ├──── closed, -ERR, garbage, pings unanswered ◀───────────────────────────────────────┘ │
//!   │                                                          INFO ldm, other servers known │
//!   └──── nothing written awaits a reply, or leave_at ◀──── LameDuck ◀──────────────────────┘
//!
//!  Up / LameDuck ── handle_shutdown ──▶ Draining ── nothing awaits, output flushed,
//!                                                   close_at, or link lost ──▶ Closed
//!  any other state ── handle_shutdown, handle_abort ──▶ Closed
//! ```
//!
//! TLS (gateway.md section 9) is the shell's: the session only says when. In `AwaitInfo`, an
//! INFO with `tls_required` (or any INFO when the configuration wants TLS) emits
//! `SessionAction::StartTls` before CONNECT is queued, so no credential leaves in plaintext;
//! with `tls_first` it is emitted on TCP up, before INFO. The session keeps reading and writing
//! plaintext. A refused credential (`-ERR 'Authorization Violation'` and its kin) or a failed
//! TLS handshake (`NatsInput::TlsFailed`) ends the attempt like any handshake failure, under
//! the same backoff, and sets [`Upstream::link_failure`] until a link comes up.
//!
//! The keepalive (a PING every `ping_interval`, any incoming byte answers) runs in `Up`,
//! `LameDuck` and `Draining`. `SessionState` (health, metrics) is a coarser view: Down and
//! Opening are Connecting or Reconnecting, AwaitInfo and AwaitPong are Handshaking, Up and
//! LameDuck are Connected.
//!
//! The file layout follows the two halves: [`link`] moves the link (connect, handshake,
//! keepalive, lame duck, reconnect), [`publish`] publishes requests and matches replies.
//!
//! Requests: a Router request is built at submit ([`crate::router_envelope`]) and published
//! with a reply subject `<inbox>.<token>` under one wildcard subscription `<inbox>.*`; the
//! token is the request id in base 36, so the token table *is* the request table. While not
//! connected, requests wait in a byte-bounded reconnect buffer and are sent, after the SUB, in
//! order once the next server answered PONG. Requests already on the wire when a connection
//! drops fail at once with error 8: their replies cannot be trusted to arrive. Requests whose
//! bytes the shell never started writing are not on the wire, so they go back to the buffer.
//!
//! Deadlines belong to the gateway: it cancels a request that timed out, and the session
//! forgets its token, so a reply arriving later is counted as late. A ring of recently
//! answered tokens tells duplicates (a second Router answered) from late replies.
//!
//! Where gateway.md is silent the session does what nats.go does, as noted at each place.

use std::collections::VecDeque;

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::error::ErrorCode;
use crate::inflight::RequestId;
use crate::nats::requests::{Pending, Place, RequestBook};
use crate::nats_codec::NatsDecoder;
pub use crate::nats_config::{
    LinkId, NatsConfig, NatsInput, NatsStats, SessionAction, SessionState,
};
use crate::nats_pool::{ServerPool, ServerUrl};
use crate::output_queue::OutputQueue;
use crate::rng::Rng;
use crate::router_envelope::build_router_request;
use crate::time::Instant;
mod link;
mod publish;

use publish::header_block_len;
pub use publish::{from_base36, to_base36};

use crate::upstream::{
    request_id_text, FailureCause, Identity, Upstream, UpstreamEvent, UpstreamRequest,
};
use link::Link;

/// The largest Router reply an IPC frame can carry (ipc-protocol.md section 2).
pub const MAX_REPLY_BYTES: usize = crate::frame::MAX_FRAME_BYTES - crate::frame::HEADER_LEN;

/// A reply token's longest spelling plus its dot: `u64::MAX` in base 36 is 13 characters;
/// rounded up. Part of a buffered request's cost ([`NatsConfig::reconnect_buffer_bytes`]).
const REPLY_TOKEN_MAX: usize = 16;

/// The rest of an `HPUB <subject> <reply> <hdr_len> <total_len>\r\n…\r\n` frame beyond
/// subject, reply and payload: the op, three spaces, two sizes of up to 10 digits and two
/// CRLFs come to 31 bytes at most; rounded up.
const PUB_LINE_OVERHEAD: usize = 32;

/// The subscription id of the reply inbox: the only subscription this client makes.
const INBOX_SID: u64 = 1;

/// Who ended a stream: when the session ends it, the shell must be told to close the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClosedBy {
    /// The peer closed it, or it failed: the shell already knows.
    Peer,
    /// The session gives it up (protocol error, stale, lame duck): `Disconnect` the shell.
    Session,
}

/// The NATS session.
///
/// It is driven through [`Upstream`] by the gateway's pump (`Gateway::handle_upstream`,
/// `Gateway::poll_action`), which documents the call contract: socket events go in as
/// [`NatsInput`] values naming their link, let time pass with `handle_timeout` (the first
/// call starts connecting), and the socket actions come out as [`SessionAction`]s.
#[derive(Debug)]
pub struct NatsSession {
    config: NatsConfig,
    /// The request id prefix, so the Router sees the ids the client sees.
    instance: u32,
    rng: Rng,
    pool: ServerPool,
    link: Link,
    /// The link of the latest `Connect`; reports about any other are stale.
    link_id: LinkId,
    started: bool,
    ever_connected: bool,
    /// Links that completed their handshake, this one included: the link's number for
    /// [`Upstream::link`].
    links_up: u64,
    current: Option<ServerUrl>,
    /// What the last INFO said; kept while disconnected to judge buffered requests.
    server_headers: bool,
    server_max_payload: Option<u64>,
    decoder: NatsDecoder,
    /// `_INBOX.<random>`; replies come to `<inbox>.<token>`.
    inbox: String,
    /// Requests held, the reconnect buffer, recently answered tokens.
    requests: RequestBook,
    out: OutputQueue<Bytes>,
    /// Bytes ever queued / ever written on the current connection.
    queued_total: u64,
    written_total: u64,
    transmit_announced: bool,
    actions: VecDeque<SessionAction>,
    events: VecDeque<UpstreamEvent>,
    /// The latest time seen, for inputs that carry none (`cancel`).
    now: Instant,
    stats: NatsStats,
    /// Why the last connection attempt failed or the last link was lost, with the server
    /// (`/health`'s `nats.last_error`); kept after a reconnect, so an operator sees what the
    /// last outage was.
    last_error: Option<String>,
    /// The link asked the shell for TLS (`StartTls`); reset with each `Connect`.
    tls_started: bool,
    /// The credential method CONNECT carried on this link, for `nats_authenticated`.
    auth_method: &'static str,
    /// The server refused the credentials or TLS failed, and no link came up since:
    /// health is UNHEALTHY with this reason at once ([`Upstream::link_failure`]).
    link_failure: Option<String>,
}

impl NatsSession {
    pub fn new(mut config: NatsConfig, identity: Identity) -> NatsSession {
        let mut rng = Rng::new(identity.seed);
        if config.servers.is_empty() {
            config.servers = vec![ServerUrl {
                host: "localhost".to_owned(),
                port: crate::nats_pool::DEFAULT_PORT,
                user: None,
                pass: None,
                token: None,
                tls: false,
                tls_name: None,
            }];
        }
        // nuid-like: 22 base-62 characters, as nats.go's inboxes.
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let nuid: String = (0..22)
            .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len() as u64) as usize]))
            .collect();
        let pool = ServerPool::new(config.servers.clone(), config.backoff, &mut rng);
        NatsSession {
            requests: RequestBook::new(config.recent_answers),
            decoder: NatsDecoder::new(config.decoder_limits),
            config,
            instance: identity.instance,
            rng,
            pool,
            link: Link::Down {
                retry_at: Instant::ZERO,
            },
            link_id: LinkId(0),
            started: false,
            ever_connected: false,
            links_up: 0,
            current: None,
            server_headers: false,
            server_max_payload: None,
            inbox: format!("_INBOX.{nuid}"),
            out: OutputQueue::default(),
            queued_total: 0,
            written_total: 0,
            transmit_announced: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            now: Instant::ZERO,
            stats: NatsStats::default(),
            last_error: None,
            tls_started: false,
            auth_method: "none",
            link_failure: None,
        }
    }

    // ----- transport inputs -----------------------------------------------------------------

    /// What the shell reports about a link's socket. Reports about a link other than the
    /// latest `Connect`'s are stale (the shell already closed that socket) and are ignored.
    pub fn handle_input(&mut self, input: NatsInput<'_>, now: Instant) {
        self.record_now(now);
        if input.link() != self.link_id {
            self.stats.stale_inputs += 1;
            debug!(
                event = "nats_stale_input",
                component = "nats_resilience",
                link = input.link().0,
                current = self.link_id.0
            );
            return;
        }
        match input {
            NatsInput::Connected(_) => self.handle_connected(now),
            NatsInput::ConnectFailed(_) => self.handle_connect_failed(now),
            NatsInput::Received(_, bytes) => self.handle_bytes(bytes, now),
            NatsInput::Written(_, n) => self.handle_written(n),
            NatsInput::Closed(_) => self.handle_closed(now),
            NatsInput::TlsFailed(_, reason) => self.handle_tls_failed(reason, now),
        }
    }

    /// New credentials (SIGHUP re-read their files): the next CONNECT carries them; the link
    /// that is up keeps going (the server checked it at its CONNECT).
    pub fn set_auth(&mut self, auth: crate::nats::auth::NatsAuth) {
        self.config.auth = auth;
    }

    /// Why the last attempt was refused (credentials, TLS), until a link comes up.
    pub fn link_failure(&self) -> Option<&str> {
        self.link_failure.as_deref()
    }

    /// The TCP connection asked for by the last `Connect` is established.
    fn handle_connected(&mut self, now: Instant) {
        self.record_now(now);
        if let Link::Opening { .. } = self.link {
            self.decoder = NatsDecoder::new(self.config.decoder_limits);
            let deadline = now + self.config.handshake_timeout;
            self.set_link(Link::AwaitInfo { deadline }, "tcp connected");
            debug!(event = "nats_tcp_connected", component = "nats_resilience", server = %self.server_text());
            if self.config.tls_first {
                // The server (handshake_first) says nothing until the TLS handshake is done.
                self.start_tls();
            }
        }
    }

    /// TLS failed on the current link; the shell closed the socket. Like a refused
    /// credential: counted, logged once with the server and the reason, health UNHEALTHY
    /// with it, and the next attempt under the normal backoff (a fixed certificate is picked
    /// up then).
    fn handle_tls_failed(&mut self, reason: &str, now: Instant) {
        self.record_now(now);
        if !self.link.has_stream() {
            return;
        }
        self.stats.tls_failures += 1;
        warn!(event = "nats_tls_failed", component = "nats_resilience",
              server = %self.server_text(), error = %reason);
        self.link_failed(
            now,
            "tls failed",
            format!("nats tls failed: {reason}"),
            ClosedBy::Peer,
        );
    }

    /// The TCP connection asked for by the last `Connect` failed.
    fn handle_connect_failed(&mut self, now: Instant) {
        self.record_now(now);
        if let Link::Opening { .. } = self.link {
            self.attempt_failed(now, "connect failed");
        }
    }

    /// Bytes read from the socket.
    fn handle_bytes(&mut self, bytes: &[u8], now: Instant) {
        self.record_now(now);
        if !self.link.has_stream() {
            return;
        }
        // Any incoming byte proves the connection alive: the keepalive restarts.
        if self.link.is_up() {
            let fresh = self.fresh_keepalive(now);
            self.set_link(self.link.with_keepalive(fresh), "bytes received");
        }
        self.decoder.push(bytes);
        while self.link.has_stream() {
            match self.decoder.next_op() {
                Ok(Some(op)) => self.handle_op(op, now),
                Ok(None) => break,
                Err(e) => {
                    warn!(event = "nats_protocol_error", component = "nats_resilience",
                          server = %self.server_text(), error = %e);
                    self.lose(now, "protocol error", ClosedBy::Session);
                }
            }
        }
    }

    /// The socket was closed by the peer or failed.
    fn handle_closed(&mut self, now: Instant) {
        self.record_now(now);
        match self.link {
            Link::Opening { .. } => self.attempt_failed(now, "connect failed"),
            l if l.has_stream() => self.lose(now, "connection closed", ClosedBy::Peer),
            _ => {}
        }
    }

    /// The shell wrote `n` bytes of [`NatsSession::output`].
    fn handle_written(&mut self, n: usize) {
        self.written_total += n as u64;
        self.out.consume(n);
        if self.out.is_empty() {
            self.transmit_announced = false;
            self.check_drain();
        }
    }

    /// Shutdown: nothing new is sent, buffered requests fail with error 6, answers to
    /// requests on the wire still arrive; once they are in (or cancelled, or the drain
    /// timeout passed) and the output is flushed, the socket is closed.
    fn begin_shutdown(&mut self, now: Instant) {
        self.record_now(now);
        if matches!(self.link, Link::Draining { .. } | Link::Closed) {
            return;
        }
        info!(
            event = "nats_draining",
            component = "nats_resilience",
            awaiting = self.requests.len()
        );
        self.fail_buffered(
            ErrorCode::ShuttingDown,
            "Shutting down: NATS is draining",
            FailureCause::Refused,
        );
        let mut close_at = now + self.config.drain_timeout;
        if let Link::LameDuck { leave_at, .. } = self.link {
            close_at = close_at.min(leave_at);
        }
        match self.link {
            Link::Up { keepalive } | Link::LameDuck { keepalive, .. } => {
                self.set_link(
                    Link::Draining {
                        keepalive,
                        close_at,
                    },
                    "shutdown",
                );
                self.check_drain();
            }
            _ => self.close(now),
        }
    }

    /// Closes at once: everything still held fails with error 6.
    fn close(&mut self, now: Instant) {
        self.record_now(now);
        if self.link == Link::Closed {
            return;
        }
        let ids = self.requests.ids();
        for id in ids {
            self.fail(
                id,
                ErrorCode::ShuttingDown,
                "Shutting down: the NATS connection is closed",
                FailureCause::Refused,
            );
        }
        self.finish_close();
    }

    // ----- outputs --------------------------------------------------------------------------

    /// The queued bytes, in order, for a vectored write.
    pub fn output(&self) -> impl Iterator<Item = &[u8]> {
        self.out.output()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn state(&self) -> SessionState {
        match self.link {
            Link::Closed => SessionState::Closed,
            Link::Draining { .. } => SessionState::Draining,
            Link::Up { .. } | Link::LameDuck { .. } => SessionState::Connected,
            Link::AwaitInfo { .. } | Link::AwaitPong { .. } => SessionState::Handshaking,
            Link::Down { .. } | Link::Opening { .. } => match (self.started, self.ever_connected) {
                (false, _) => SessionState::Disconnected,
                (true, false) => SessionState::Connecting,
                (true, true) => SessionState::Reconnecting,
            },
        }
    }

    pub fn stats(&self) -> &NatsStats {
        &self.stats
    }

    /// Why the last attempt failed or the last link was lost, naming the server (credentials
    /// masked); `None` if nothing has failed yet.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The server of the current or last attempt, credentials masked.
    pub fn server(&self) -> Option<String> {
        self.current.as_ref().map(ToString::to_string)
    }

    /// The servers in rotation order (configured and learned).
    pub fn servers(&self) -> Vec<ServerUrl> {
        self.pool.servers().cloned().collect()
    }

    /// `_INBOX.<random>`: replies come to `<inbox>.<token>`.
    pub fn inbox(&self) -> &str {
        &self.inbox
    }

    /// Bytes held in the reconnect buffer.
    pub fn buffered_bytes(&self) -> usize {
        self.requests.buffered_bytes()
    }

    /// Requests waiting in the reconnect buffer (the rest of `pending()` is on the wire).
    pub fn buffered_requests(&self) -> usize {
        self.requests.buffered_count()
    }

    /// Tokens remembered as recently answered (bounded by `recent_answers`).
    pub fn recent_answers(&self) -> usize {
        self.requests.recent_len()
    }

    /// The session's invariants, against its own configured bounds (gateway.md section 2);
    /// panics with the first one violated. Meant for simulators and fuzzers.
    pub fn assert_invariants(&self) {
        assert!(
            self.requests.buffered_bytes() <= self.config.reconnect_buffer_bytes,
            "reconnect buffer holds {} bytes, over its bound of {}",
            self.requests.buffered_bytes(),
            self.config.reconnect_buffer_bytes
        );
        assert!(
            self.requests.recent_len() <= self.config.recent_answers,
            "recent-answers ring holds {}, over its bound of {}",
            self.requests.recent_len(),
            self.config.recent_answers
        );
        // Requests already written fail at once when the connection drops; only requests
        // never written may wait (in the buffer) while not connected.
        if !self.link.is_up() {
            assert_eq!(
                self.requests.len(),
                self.requests.buffered_count(),
                "a written request outlived its connection ({:?})",
                self.state()
            );
        }
        if self.link == Link::Closed {
            assert_eq!(self.requests.len(), 0, "a closed session holds requests");
            assert!(self.out.is_empty(), "a closed session holds output");
        }
    }

    /// Inputs that carry no time (`cancel`) use the latest one seen.
    fn record_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn server_text(&self) -> String {
        self.server().unwrap_or_default()
    }
}

impl Upstream for NatsSession {
    fn link_failure(&self) -> Option<&str> {
        NatsSession::link_failure(self)
    }

    type Config = NatsConfig;
    type Input<'a> = NatsInput<'a>;
    type Action = SessionAction;

    fn new(config: NatsConfig, identity: Identity) -> NatsSession {
        NatsSession::new(config, identity)
    }

    fn handle_input(&mut self, input: NatsInput<'_>, now: Instant) {
        NatsSession::handle_input(self, input, now);
    }

    fn poll_action(&mut self) -> Option<SessionAction> {
        self.actions.pop_front()
    }

    fn is_flush(action: &SessionAction) -> bool {
        matches!(action, SessionAction::Transmit { .. })
    }

    /// Nothing new is sent, buffered requests fail with error 6, answers to requests on the
    /// wire still arrive; once they are in (or cancelled, or the drain timeout passed) and
    /// the output is flushed, the socket is closed.
    fn handle_shutdown(&mut self, now: Instant) {
        self.begin_shutdown(now);
    }

    fn handle_abort(&mut self, now: Instant) {
        self.close(now);
    }

    fn is_closed(&self) -> bool {
        self.link == Link::Closed
    }

    fn assert_invariants(&self) {
        NatsSession::assert_invariants(self);
    }

    fn is_quiescent(&self) -> bool {
        self.requests.len() == 0 && self.requests.buffered_bytes() == 0
    }

    fn submit(&mut self, request: UpstreamRequest, now: Instant) {
        self.record_now(now);
        let id = request.id;
        let refuse = |s: &mut NatsSession, code: ErrorCode, message: String, cause| {
            s.events.push_back(UpstreamEvent::Failed {
                id,
                code,
                message,
                cause,
            });
        };
        if matches!(self.link, Link::Draining { .. } | Link::Closed) {
            return refuse(
                self,
                ErrorCode::ShuttingDown,
                "Shutting down: the NATS session is closing".to_owned(),
                FailureCause::Refused,
            );
        }
        if self.requests.contains(id) {
            // Caller misuse (ids are never reused); the first request keeps its outcome.
            warn!(
                event = "nats_duplicate_request_id",
                component = "nats_resilience",
                request_id = id.0
            );
            return;
        }
        let rid = request_id_text(self.instance, id);
        let rr = build_router_request(
            &self.config.envelope,
            &rid,
            request.kind,
            &request.payload,
            &mut self.rng,
        );
        // What the request costs in the reconnect buffer: its bytes on the wire, so that
        // `reconnect_buffer_bytes` bounds what a reconnect writes at once.
        let size = self.config.subject.len()
            + self.inbox.len()
            + REPLY_TOKEN_MAX
            + header_block_len(&rr.headers)
            + rr.body.len()
            + PUB_LINE_OVERHEAD;
        let pending = Pending::new(request.deadline, rr.body, rr.headers, size);
        if let Some(message) = self.too_large(&pending) {
            return refuse(
                self,
                ErrorCode::FrameTooLarge,
                message,
                FailureCause::Refused,
            );
        }
        if self.can_publish() {
            self.requests.insert_written(id, pending, self.queued_total);
            self.write_request(id);
        } else if self.requests.buffered_bytes() + size > self.config.reconnect_buffer_bytes {
            self.stats.buffer_full_rejections += 1;
            refuse(
                self,
                ErrorCode::RouterUnavailable,
                "Router unavailable: NATS is disconnected and the reconnect buffer is full"
                    .to_owned(),
                FailureCause::Link,
            );
        } else {
            self.requests.insert_buffered(id, pending);
        }
    }

    fn cancel(&mut self, id: RequestId) {
        self.requests.remove(id);
        // An outcome not yet polled is withdrawn too: the caller no longer wants it.
        self.events.retain(|e| match e {
            UpstreamEvent::Reply { id: e, .. } | UpstreamEvent::Failed { id: e, .. } => *e != id,
        });
        self.check_drain();
        let now = self.now;
        self.check_lame_duck(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.record_now(now);
        match self.link {
            Link::Down { retry_at } if now >= retry_at => self.start_attempt(now),
            Link::Opening { deadline } if now >= deadline => {
                self.actions
                    .push_back(SessionAction::Disconnect { link: self.link_id });
                self.attempt_failed(now, "connect timeout");
            }
            Link::AwaitInfo { deadline } | Link::AwaitPong { deadline, .. } if now >= deadline => {
                self.lose(now, "handshake timeout", ClosedBy::Session);
            }
            link => {
                if let Some(k) = link.keepalive().filter(|k| now >= k.next_ping) {
                    self.keepalive_due(link, k, now);
                }
            }
        }
        self.check_lame_duck(now);
        if let Link::Draining { close_at, .. } = self.link {
            if now >= close_at {
                self.close(now);
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Opening { deadline }
            | Link::AwaitInfo { deadline }
            | Link::AwaitPong { deadline, .. } => Some(deadline),
            Link::Up { keepalive } => Some(keepalive.next_ping),
            Link::LameDuck {
                keepalive,
                leave_at: end,
            }
            | Link::Draining {
                keepalive,
                close_at: end,
            } => Some(keepalive.next_ping.min(end)),
            Link::Closed => None,
        }
    }

    fn poll_event(&mut self) -> Option<UpstreamEvent> {
        self.events.pop_front()
    }

    /// Buffered requests plus requests on the wire awaiting their reply.
    fn pending(&self) -> usize {
        self.requests.len()
    }

    /// On the wire of the link that is up: some of its bytes were written to the socket.
    /// A frame still queued behind a full socket has not reached the Router, and one that
    /// waited in the reconnect buffer was held up by the outage: written at the reconnect
    /// with little of its time left, its timeout is the outage's, not the Router's.
    fn awaiting_router(&self, id: RequestId) -> bool {
        self.link.is_up()
            && self.requests.get(id).is_some_and(|p| {
                !p.held()
                    && matches!(p.place(), Place::Written { start } if start < self.written_total)
            })
    }

    fn link(&self) -> Option<u64> {
        self.link.is_up().then_some(self.links_up)
    }
}
