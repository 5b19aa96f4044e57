//! The NATS session: one long-lived connection to a NATS cluster, sans-IO (gateway.md
//! section 2). It is the gateway's [`Upstream`] when NATS is enabled.
//!
//! ```text
//!             start / retry timer          TCP up           INFO: CONNECT+SUB+PING      PONG
//! Disconnected ──────────────▶ Connecting ─────────▶ Handshaking ───────────────────────────▶ Connected
//!                                ▲    │ refused, 2 s timeout    │ 5 s timeout, -ERR, closed     │
//!                                │    ▼                         ▼                               │
//!                             Reconnecting ◀── next server in the rotation; after a whole pass │
//!                                ▲             failed, a jittered backoff (nats_pool.rs)        │
//!                                └──── closed, -ERR, garbage, pings unanswered, lame duck ◀─────┘
//!  begin_drain: Draining (flush, answers still arrive) ──▶ Disconnect ──▶ Closed
//! ```
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

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use crate::error::ErrorCode;
use crate::inflight::RequestId;
use crate::nats::requests::{Pending, Place, RequestBook};
use crate::nats_codec::{
    encode_connect, encode_hpub, encode_ping, encode_pong, encode_pub, encode_sub, ConnectOptions,
    NatsDecoder, ServerInfo, ServerOp,
};
pub use crate::nats_config::{
    LinkId, NatsConfig, NatsInput, NatsStats, SessionAction, SessionState,
};
use crate::nats_pool::{ServerPool, ServerUrl};
use crate::output_queue::OutputQueue;
use crate::rng::Rng;
use crate::router_envelope::build_router_request;
use crate::time::Instant;
use crate::upstream::{
    request_id_text, FailureCause, Identity, Upstream, UpstreamEvent, UpstreamRequest,
};

/// The largest Router reply an IPC frame can carry (ipc-protocol.md section 2).
pub const MAX_REPLY_BYTES: usize = crate::frame::MAX_FRAME_BYTES - crate::frame::HEADER_LEN;

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

/// The socket's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No socket; the next attempt starts at `retry_at`.
    Down {
        retry_at: Instant,
    },
    /// TCP connect in progress.
    Opening {
        deadline: Instant,
    },
    AwaitInfo {
        deadline: Instant,
    },
    AwaitPong {
        deadline: Instant,
    },
    Up {
        next_ping: Instant,
        pings_out: u32,
    },
    Closed,
}

impl Link {
    fn has_stream(self) -> bool {
        matches!(
            self,
            Link::AwaitInfo { .. } | Link::AwaitPong { .. } | Link::Up { .. }
        )
    }
}

/// The NATS session.
///
/// Call order (the shell, or the gateway's pump for the [`Upstream`] half):
/// 1. Report socket events: `handle_connected`, `handle_connect_failed`, `handle_bytes`,
///    `handle_closed`; let time pass with `handle_timeout` (the first call starts connecting).
/// 2. Drain `poll_action` and act (connect, close, write [`NatsSession::output`] then
///    `consume_output`); drain `poll_event` for request outcomes.
/// 3. Sleep until `poll_timeout` or the next socket event.
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
    /// Switch servers at this instant (or once nothing written awaits a reply).
    lame_duck: Option<Instant>,
    /// Draining until this deadline.
    draining: Option<Instant>,
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
            lame_duck: None,
            draining: None,
            inbox: format!("_INBOX.{nuid}"),
            out: OutputQueue::default(),
            queued_total: 0,
            written_total: 0,
            transmit_announced: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            now: Instant::ZERO,
            stats: NatsStats::default(),
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
        }
    }

    /// The TCP connection asked for by the last `Connect` is established.
    fn handle_connected(&mut self, now: Instant) {
        self.record_now(now);
        if let Link::Opening { .. } = self.link {
            self.decoder = NatsDecoder::new(self.config.decoder_limits);
            self.link = Link::AwaitInfo {
                deadline: now + self.config.handshake_timeout,
            };
            debug!(event = "nats_tcp_connected", component = "nats_resilience", server = %self.server_text());
        }
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
        if let Link::Up { .. } = self.link {
            self.link = Link::Up {
                next_ping: now + self.config.ping_interval,
                pings_out: 0,
            };
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
        if self.draining.is_some() || self.link == Link::Closed {
            return;
        }
        info!(
            event = "nats_draining",
            component = "nats_resilience",
            awaiting = self.requests.len()
        );
        self.draining = Some(now + self.config.drain_timeout);
        self.fail_buffered(
            ErrorCode::ShuttingDown,
            "Shutting down: NATS is draining",
            FailureCause::Refused,
        );
        if matches!(self.link, Link::Up { .. }) {
            self.check_drain();
        } else {
            self.close(now);
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
            _ if self.draining.is_some() => SessionState::Draining,
            Link::Up { .. } => SessionState::Connected,
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
        if !matches!(self.link, Link::Up { .. }) {
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

    // ----- internals: connection lifecycle --------------------------------------------------

    /// Inputs that carry no time (`cancel`) use the latest one seen.
    fn record_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn server_text(&self) -> String {
        self.server().unwrap_or_default()
    }

    fn start_attempt(&mut self, now: Instant) {
        let Some(url) = self.pool.take_next() else {
            return;
        };
        self.started = true;
        self.stats.connect_attempts += 1;
        info!(event = "nats_connecting", component = "nats_resilience", server = %url,
              attempt = self.stats.connect_attempts);
        self.link_id.0 += 1;
        self.actions.push_back(SessionAction::Connect {
            link: self.link_id,
            host: url.host.clone(),
            port: url.port,
        });
        self.current = Some(url);
        self.link = Link::Opening {
            deadline: now + self.config.connect_timeout,
        };
    }

    /// An attempt ended before the handshake: try the next server, or back off.
    fn attempt_failed(&mut self, now: Instant, reason: &'static str) {
        warn!(event = "nats_connect_failed", component = "nats_resilience",
              server = %self.server_text(), reason);
        self.schedule_next(now);
    }

    fn schedule_next(&mut self, now: Instant) {
        if self.draining.is_some() {
            self.finish_close();
            return;
        }
        let delay = self.pool.delay_before_next(&mut self.rng);
        info!(
            event = "nats_reconnect_scheduled",
            component = "nats_resilience",
            delay_ms = delay.as_millis() as u64
        );
        if delay.is_zero() {
            self.start_attempt(now);
        } else {
            self.link = Link::Down {
                retry_at: now + delay,
            };
        }
    }

    /// An established stream ended (handshake or connected).
    fn lose(&mut self, now: Instant, reason: &'static str, closed_by: ClosedBy) {
        if closed_by == ClosedBy::Session {
            self.actions
                .push_back(SessionAction::Disconnect { link: self.link_id });
        }
        let was_up = matches!(self.link, Link::Up { .. });
        self.link = Link::Down { retry_at: now };
        self.lame_duck = None;
        self.decoder = NatsDecoder::new(self.config.decoder_limits);
        // Frames the shell never began to write are not on the wire: they may go again.
        let mut failed = 0u64;
        for (id, start) in self.requests.written() {
            let unsent = start >= self.written_total;
            let fits = self.draining.is_none()
                && self.requests.get(id).is_some_and(|p| {
                    self.requests.buffered_bytes() + p.size <= self.config.reconnect_buffer_bytes
                });
            if unsent && fits {
                self.requests.rebuffer(id);
            } else {
                failed += 1;
                self.fail(
                    id,
                    ErrorCode::RouterUnavailable,
                    "Router unavailable: the NATS connection was lost after the request was sent",
                    FailureCause::Link,
                );
            }
        }
        self.stats.failed_on_disconnect += failed;
        self.out.clear();
        self.queued_total = 0;
        self.written_total = 0;
        self.transmit_announced = false;
        if was_up {
            warn!(event = "nats_disconnected", component = "nats_resilience",
                  server = %self.server_text(), reason, failed_requests = failed);
        } else {
            warn!(event = "nats_handshake_failed", component = "nats_resilience",
                  server = %self.server_text(), reason);
        }
        self.schedule_next(now);
    }

    fn finish_close(&mut self) {
        if self.link.has_stream() || matches!(self.link, Link::Opening { .. }) {
            self.actions
                .push_back(SessionAction::Disconnect { link: self.link_id });
        }
        self.link = Link::Closed;
        self.out.clear();
        self.transmit_announced = false;
        info!(event = "nats_closed", component = "nats_resilience");
    }

    fn check_drain(&mut self) {
        // Called on every flush: the scan of the requests is left for when it can matter.
        if self.draining.is_none() || !matches!(self.link, Link::Up { .. }) || !self.out.is_empty()
        {
            return;
        }
        if !self.requests.any_written() {
            self.finish_close();
        }
    }

    /// In lame duck mode, moves on once nothing written awaits an answer, or at the grace end.
    fn check_lame_duck(&mut self, now: Instant) {
        let Some(deadline) = self.lame_duck else {
            return;
        };
        let awaiting = self.requests.any_written();
        if matches!(self.link, Link::Up { .. }) && (!awaiting || now >= deadline) {
            self.stats.lame_duck_switches += 1;
            self.lose(now, "lame duck", ClosedBy::Session);
        }
    }

    fn enter_up(&mut self, now: Instant) {
        self.links_up += 1;
        self.link = Link::Up {
            next_ping: now + self.config.ping_interval,
            pings_out: 0,
        };
        if self.lame_duck.is_none() {
            // A lame duck server does not reset the backoff: with it, reconnecting could spin.
            self.pool.connected();
        }
        if self.ever_connected {
            self.stats.reconnects += 1;
        }
        self.ever_connected = true;
        info!(event = "nats_connected", component = "nats_resilience",
              server = %self.server_text(), headers = self.server_headers,
              buffered = self.requests.buffered_count());
        if self.lame_duck.is_some() {
            self.check_lame_duck(now);
        } else {
            self.flush_buffer(now);
        }
    }

    // ----- internals: server operations -----------------------------------------------------

    fn handle_op(&mut self, op: ServerOp, now: Instant) {
        match op {
            ServerOp::Info(info) => self.handle_info(info, now),
            ServerOp::Ping => {
                let mut b = BytesMut::new();
                encode_pong(&mut b);
                self.push_out(b.freeze());
            }
            ServerOp::Pong => {
                if let Link::AwaitPong { .. } = self.link {
                    self.enter_up(now);
                }
            }
            ServerOp::Ok => {}
            ServerOp::Err(text) => self.handle_err(&text, now),
            ServerOp::Unreadable {
                subject, reason, ..
            } => {
                self.stats.unknown_replies += 1;
                warn!(event = "nats_reply_unreadable", component = "nats_resilience",
                      subject = %subject, reason);
            }
            op @ (ServerOp::Msg { .. } | ServerOp::HMsg { .. }) => {
                if let Link::AwaitInfo { .. } = self.link {
                    warn!(event = "nats_protocol_error", component = "nats_resilience",
                          server = %self.server_text(), error = "message before INFO");
                    return self.lose(now, "protocol error", ClosedBy::Session);
                }
                self.handle_msg(op, now);
            }
        }
    }

    fn handle_info(&mut self, info: ServerInfo, now: Instant) {
        self.server_headers = info.headers;
        self.server_max_payload = info.max_payload;
        if let Some(current) = self.current.clone() {
            let change = self.pool.apply_connect_urls(&info.connect_urls, &current);
            for url in &change.added {
                info!(event = "nats_server_added", component = "nats_resilience", server = %url);
            }
            for url in &change.removed {
                info!(event = "nats_server_removed", component = "nats_resilience", server = %url);
            }
        }
        if let Link::AwaitInfo { deadline } = self.link {
            let mut options = ConnectOptions::for_server(self.config.client_name.clone(), &info);
            if let Some(url) = &self.current {
                options.user.clone_from(&url.user);
                options.pass.clone_from(&url.pass);
                options.auth_token.clone_from(&url.token);
            }
            let mut b = BytesMut::new();
            encode_connect(&options, &mut b);
            // The inbox is subscribed before anything is published, on every connection.
            let inbox = format!("{}.*", self.inbox);
            if encode_sub(&inbox, INBOX_SID, &mut b).is_err() {
                // The inbox is our own alphanumeric text: this cannot fail.
                return self.lose(now, "invalid inbox", ClosedBy::Session);
            }
            encode_ping(&mut b);
            self.push_out(b.freeze());
            self.link = Link::AwaitPong { deadline };
        }
        if info.ldm {
            self.handle_lame_duck(now);
        }
    }

    fn handle_lame_duck(&mut self, now: Instant) {
        if self.lame_duck.is_some() {
            return;
        }
        if self.pool.len() <= 1 {
            // Nowhere else to go: stay until the server closes us, then reconnect as usual.
            warn!(event = "nats_lame_duck", component = "nats_resilience",
                  server = %self.server_text(), other_servers = 0);
            return;
        }
        warn!(event = "nats_lame_duck", component = "nats_resilience",
              server = %self.server_text(), other_servers = self.pool.len() - 1);
        self.lame_duck = Some(now + self.config.lame_duck_grace);
        self.check_lame_duck(now);
    }

    /// Like nats.go's `processErr`: a permissions or subject error concerns one publish and
    /// the server keeps the connection; anything else ('Stale Connection', 'Authorization
    /// Violation', 'Maximum Connections Exceeded', ...) is followed by the server closing it.
    /// Unlike nats.go, no error closes the session for good: the contract is to reconnect
    /// without a cap on attempts.
    fn handle_err(&mut self, text: &str, now: Instant) {
        let lower = text.to_ascii_lowercase();
        let benign = [
            "permissions violation",
            "invalid publish subject",
            "invalid subject",
        ]
        .iter()
        .any(|p| lower.starts_with(p));
        warn!(event = "nats_server_error", component = "nats_resilience",
              server = %self.server_text(), error = %text, fatal = !benign);
        if !benign {
            self.lose(now, "server error", ClosedBy::Session);
        }
    }

    fn handle_msg(&mut self, op: ServerOp, now: Instant) {
        let no_responders = op.is_no_responders();
        let (subject, sid, payload) = match op {
            ServerOp::Msg {
                subject,
                sid,
                payload,
                ..
            }
            | ServerOp::HMsg {
                subject,
                sid,
                payload,
                ..
            } => (subject, sid, payload),
            _ => return,
        };
        let token = subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(from_base36)
            .filter(|_| sid == INBOX_SID);
        let Some(token) = token else {
            self.stats.unknown_replies += 1;
            debug!(event = "nats_reply_unknown", component = "nats_resilience", subject = %subject);
            return;
        };
        let id = RequestId(token);
        let written = self
            .requests
            .get(id)
            .is_some_and(|p| matches!(p.place(), Place::Written { .. }));
        if !written {
            if self.requests.is_recent(token) {
                self.stats.duplicate_replies += 1;
            } else {
                self.stats.late_replies += 1;
            }
            debug!(
                event = "nats_reply_dropped",
                component = "nats_resilience",
                request_id = token,
                duplicate = self.requests.is_recent(token)
            );
            return;
        }
        self.requests.remove(id);
        self.requests.remember(token);
        if no_responders {
            self.stats.no_responders += 1;
            self.events.push_back(UpstreamEvent::Failed {
                id,
                code: ErrorCode::RouterUnavailable,
                message: "Router unavailable: no responders".to_owned(),
                cause: FailureCause::NoResponders,
            });
        } else if payload.len() > MAX_REPLY_BYTES {
            // A server may allow up to 64 MiB; an IPC frame carries 4 MiB. Error 3 for this
            // request rather than a frame clients would refuse.
            let message = format!(
                "Frame too large: the Router's reply is {} bytes, over the {MAX_REPLY_BYTES} \
                 bytes an IPC frame can carry",
                payload.len()
            );
            self.events.push_back(UpstreamEvent::Failed {
                id,
                code: ErrorCode::FrameTooLarge,
                message,
                cause: FailureCause::Refused,
            });
        } else {
            self.events.push_back(UpstreamEvent::Reply { id, payload });
        }
        self.check_drain();
        self.check_lame_duck(now);
    }

    // ----- internals: requests --------------------------------------------------------------

    fn push_out(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.queued_total += bytes.len() as u64;
        self.out.push(bytes);
        if !self.transmit_announced {
            self.transmit_announced = true;
            self.actions
                .push_back(SessionAction::Transmit { link: self.link_id });
        }
    }

    fn can_publish(&self) -> bool {
        matches!(self.link, Link::Up { .. }) && self.lame_duck.is_none() && self.draining.is_none()
    }

    /// What the server compares with `max_payload`: the payload, plus the header block for HPUB.
    fn wire_payload_len(&self, p: &Pending) -> usize {
        if self.server_headers {
            header_block_len(&p.headers) + p.body.len()
        } else {
            p.body.len()
        }
    }

    fn too_large(&self, p: &Pending) -> Option<String> {
        let max = self.server_max_payload?;
        let len = self.wire_payload_len(p);
        (len as u64 > max).then(|| {
            format!(
                "Frame too large: the Router request is {len} bytes, over the NATS server's \
                 max_payload of {max}"
            )
        })
    }

    fn write_request(&mut self, id: RequestId) {
        let Some(p) = self.requests.get(id) else {
            return;
        };
        let reply = format!("{}.{}", self.inbox, to_base36(id.0));
        let mut b = BytesMut::new();
        let encoded = if self.server_headers {
            let headers: Vec<(&str, &str)> =
                p.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            encode_hpub(
                &self.config.subject,
                Some(&reply),
                &headers,
                &p.body,
                &mut b,
            )
        } else {
            encode_pub(&self.config.subject, Some(&reply), &p.body, &mut b)
        };
        if let Err(e) = encoded {
            let message = format!("Internal error: cannot publish the Router request: {e}");
            return self.fail(id, ErrorCode::Internal, &message, FailureCause::Refused);
        }
        self.requests.mark_written(id, self.queued_total);
        self.push_out(b.freeze());
    }

    /// Sends the reconnect buffer in submit order (after the SUB, already queued).
    fn flush_buffer(&mut self, now: Instant) {
        while self.can_publish() {
            let Some(id) = self.requests.pop_buffered() else {
                break;
            };
            let Some(p) = self.requests.get(id) else {
                continue;
            };
            if p.deadline <= now {
                self.fail(
                    id,
                    ErrorCode::Timeout,
                    "Timeout: the deadline passed while NATS was disconnected",
                    FailureCause::Link,
                );
            } else if let Some(message) = self.too_large(p) {
                self.fail(
                    id,
                    ErrorCode::FrameTooLarge,
                    &message,
                    FailureCause::Refused,
                );
            } else {
                self.write_request(id);
            }
        }
    }

    /// Removes a request (wherever it is) and reports it failed.
    fn fail(&mut self, id: RequestId, code: ErrorCode, message: &str, cause: FailureCause) {
        if self.requests.remove(id).is_some() {
            self.events.push_back(UpstreamEvent::Failed {
                id,
                code,
                message: message.to_owned(),
                cause,
            });
        }
    }

    fn fail_buffered(&mut self, code: ErrorCode, message: &str, cause: FailureCause) {
        let ids = self.requests.buffered_ids();
        for id in ids {
            self.fail(id, code, message, cause);
        }
    }
}

impl Upstream for NatsSession {
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
        if self.draining.is_some() || self.link == Link::Closed {
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
        let size = self.config.subject.len()
            + self.inbox.len()
            + 16
            + header_block_len(&rr.headers)
            + rr.body.len()
            + 32;
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
            Link::AwaitInfo { deadline } | Link::AwaitPong { deadline } if now >= deadline => {
                self.lose(now, "handshake timeout", ClosedBy::Session);
            }
            Link::Up {
                next_ping,
                pings_out,
            } if now >= next_ping => {
                // nats.go counts the ping about to be sent: more than the maximum unanswered
                // means the connection is stale.
                if pings_out + 1 > self.config.max_pings_outstanding {
                    warn!(event = "nats_stale_connection", component = "nats_resilience",
                          server = %self.server_text(), pings_out);
                    self.lose(now, "pings unanswered", ClosedBy::Session);
                } else {
                    self.stats.pings_sent += 1;
                    let mut b = BytesMut::new();
                    encode_ping(&mut b);
                    self.push_out(b.freeze());
                    self.link = Link::Up {
                        next_ping: now + self.config.ping_interval,
                        pings_out: pings_out + 1,
                    };
                }
            }
            _ => {}
        }
        self.check_lame_duck(now);
        if self.draining.is_some_and(|d| now >= d) && self.link != Link::Closed {
            self.close(now);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let link = match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Opening { deadline }
            | Link::AwaitInfo { deadline }
            | Link::AwaitPong { deadline } => Some(deadline),
            Link::Up { next_ping, .. } => Some(next_ping),
            Link::Closed => None,
        };
        let open = self.link != Link::Closed;
        [
            link,
            self.lame_duck
                .filter(|_| matches!(self.link, Link::Up { .. })),
            self.draining.filter(|_| open),
        ]
        .into_iter()
        .flatten()
        .min()
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
        matches!(self.link, Link::Up { .. })
            && self.requests.get(id).is_some_and(|p| {
                !p.held()
                    && matches!(p.place(), Place::Written { start } if start < self.written_total)
            })
    }

    fn link(&self) -> Option<u64> {
        matches!(self.link, Link::Up { .. }).then_some(self.links_up)
    }
}

/// `NATS/1.0\r\n` + `Name: Value\r\n`… + `\r\n`, as `encode_hpub` writes it.
fn header_block_len(headers: &[(&'static str, String)]) -> usize {
    12 + headers
        .iter()
        .map(|(n, v)| n.len() + 2 + v.len() + 2)
        .sum::<usize>()
}

/// A request id as a reply token: short, and only `[0-9a-z]`, which is valid in a subject.
pub fn to_base36(mut n: u64) -> String {
    let mut digits = Vec::new();
    loop {
        let d = (n % 36) as u32;
        digits.push(char::from_digit(d, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

/// The inverse of [`to_base36`], accepting only its canonical spelling (lowercase, no
/// leading zero), so one request has exactly one token.
pub fn from_base36(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 13 || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            _ => return None,
        };
        n.checked_mul(36)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_canonical() {
        for n in [0, 1, 35, 36, 1_000_000, u64::MAX] {
            assert_eq!(from_base36(&to_base36(n)), Some(n));
        }
        assert_eq!(to_base36(36), "10");
        assert_eq!(from_base36("01"), None);
        assert_eq!(from_base36("A"), None);
        assert_eq!(from_base36(""), None);
        assert_eq!(from_base36("zzzzzzzzzzzzz"), None, "overflows u64");
        assert_eq!(from_base36("*"), None);
    }

    #[test]
    fn header_block_len_matches_the_encoder() {
        let headers = vec![("version", "1".to_owned()), ("trace_id", "abc".to_owned())];
        let borrowed: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut b = BytesMut::new();
        encode_hpub("s", None, &borrowed, b"xy", &mut b).unwrap();
        let line_end = b.iter().position(|c| *c == b'\n').unwrap();
        let line = std::str::from_utf8(&b[..line_end - 1]).unwrap();
        assert_eq!(
            line,
            format!(
                "HPUB s {} {}",
                header_block_len(&headers),
                header_block_len(&headers) + 2
            )
        );
        assert_eq!(b.len(), line_end + 1 + header_block_len(&headers) + 2 + 2);
    }
}
