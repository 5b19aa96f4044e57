//! The link: connect, handshake, keepalive, lame duck, drain and reconnect, over the
//! [`Link`] states the module diagram in [`super`] draws. [`NatsSession::set_link`] is the
//! one transition function; the server operations that move the link (INFO, PING, PONG,
//! -ERR) are handled here too.

use bytes::BytesMut;
use tracing::{debug, info, warn};

use super::{ClosedBy, NatsSession, INBOX_SID};
use crate::error::ErrorCode;
use crate::nats_codec::{
    encode_connect, encode_ping, encode_pong, encode_sub, ConnectOptions, NatsDecoder, ServerInfo,
    ServerOp,
};
use crate::nats_config::SessionAction;
use crate::time::Instant;
use crate::upstream::FailureCause;

/// The keepalive of an established link: when the next PING goes out, and how many went
/// unanswered (any incoming byte answers them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Keepalive {
    pub(super) next_ping: Instant,
    pub(super) pings_out: u32,
}

/// The link's life; the module doc draws it. Lame duck and draining are states of an
/// established link, so the timers that end them live in their variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    /// No socket; the next attempt starts at `retry_at`.
    Down { retry_at: Instant },
    /// TCP connect in progress.
    Opening { deadline: Instant },
    /// TCP up, waiting for the server's INFO.
    AwaitInfo { deadline: Instant },
    /// CONNECT, SUB and PING sent, waiting for PONG. An INFO may already have announced lame
    /// duck mode: the link then comes up as `LameDuck`, leaving at `lame_duck`.
    AwaitPong {
        deadline: Instant,
        lame_duck: Option<Instant>,
    },
    /// Connected: requests are published.
    Up { keepalive: Keepalive },
    /// The server is shutting down: nothing new is published; the session moves on once
    /// nothing written awaits a reply, or at `leave_at`.
    LameDuck {
        keepalive: Keepalive,
        leave_at: Instant,
    },
    /// Shutdown: nothing new is published; answers still arrive; closed once nothing written
    /// awaits a reply and the output is flushed, or at `close_at`.
    Draining {
        keepalive: Keepalive,
        close_at: Instant,
    },
    /// For good.
    Closed,
}

impl Link {
    /// A TCP stream exists (handshaking or established).
    pub(super) fn has_stream(self) -> bool {
        matches!(self, Link::AwaitInfo { .. } | Link::AwaitPong { .. }) || self.is_up()
    }

    /// The handshake completed: requests written on it can be answered.
    pub(super) fn is_up(self) -> bool {
        self.keepalive().is_some()
    }

    pub(super) fn keepalive(self) -> Option<Keepalive> {
        match self {
            Link::Up { keepalive }
            | Link::LameDuck { keepalive, .. }
            | Link::Draining { keepalive, .. } => Some(keepalive),
            _ => None,
        }
    }

    /// The same state with another keepalive.
    pub(super) fn with_keepalive(self, keepalive: Keepalive) -> Link {
        match self {
            Link::Up { .. } => Link::Up { keepalive },
            Link::LameDuck { leave_at, .. } => Link::LameDuck {
                keepalive,
                leave_at,
            },
            Link::Draining { close_at, .. } => Link::Draining {
                keepalive,
                close_at,
            },
            other => other,
        }
    }

    /// The label in the module diagram and in logs.
    pub(super) fn name(self) -> &'static str {
        match self {
            Link::Down { .. } => "down",
            Link::Opening { .. } => "opening",
            Link::AwaitInfo { .. } => "await_info",
            Link::AwaitPong { .. } => "await_pong",
            Link::Up { .. } => "up",
            Link::LameDuck { .. } => "lame_duck",
            Link::Draining { .. } => "draining",
            Link::Closed => "closed",
        }
    }
}

impl NatsSession {
    // ----- internals: connection lifecycle --------------------------------------------------

    /// The one transition function of the link: every change of state goes through it and
    /// is logged (at debug level; the milestones have their own info lines).
    pub(super) fn set_link(&mut self, next: Link, reason: &'static str) {
        if self.link.name() != next.name() {
            debug!(
                event = "nats_link",
                component = "nats_resilience",
                from = self.link.name(),
                to = next.name(),
                reason
            );
        }
        self.link = next;
    }

    pub(super) fn fresh_keepalive(&self, now: Instant) -> Keepalive {
        Keepalive {
            next_ping: now + self.config.ping_interval,
            pings_out: 0,
        }
    }

    pub(super) fn start_attempt(&mut self, now: Instant) {
        let Some(url) = self.pool.take_next() else {
            return;
        };
        self.started = true;
        self.stats.connect_attempts += 1;
        info!(event = "nats_connecting", component = "nats_resilience", server = %url,
              attempt = self.stats.connect_attempts);
        self.link_id.0 += 1;
        self.tls_started = false;
        self.auth_method = "none";
        self.actions.push_back(SessionAction::Connect {
            link: self.link_id,
            host: url.host.clone(),
            port: url.port,
        });
        self.current = Some(url);
        let deadline = now + self.config.connect_timeout;
        self.set_link(Link::Opening { deadline }, "connecting");
    }

    /// An attempt ended before the handshake: try the next server, or back off.
    pub(super) fn attempt_failed(&mut self, now: Instant, reason: &'static str) {
        self.last_error = Some(format!("{reason} ({})", self.server_text()));
        warn!(event = "nats_connect_failed", component = "nats_resilience",
              server = %self.server_text(), reason);
        self.schedule_next(now);
    }

    pub(super) fn schedule_next(&mut self, now: Instant) {
        let delay = self.pool.delay_before_next(&mut self.rng);
        info!(
            event = "nats_reconnect_scheduled",
            component = "nats_resilience",
            delay_ms = delay.as_millis() as u64
        );
        if delay.is_zero() {
            self.start_attempt(now);
        } else {
            self.set_link(
                Link::Down {
                    retry_at: now + delay,
                },
                "backing off",
            );
        }
    }

    /// An established stream ended (handshake or connected).
    pub(super) fn lose(&mut self, now: Instant, reason: &'static str, closed_by: ClosedBy) {
        self.lose_logged(now, reason, closed_by, true);
    }

    /// The server refused the credentials, or TLS failed: the caller has logged it (once,
    /// with the server's words); health shows `failure` until a link comes up; the next
    /// attempt comes under the normal backoff like any failed attempt, so a server that keeps
    /// refusing costs one attempt per backoff delay, never a loop.
    pub(super) fn link_failed(
        &mut self,
        now: Instant,
        reason: &'static str,
        failure: String,
        closed_by: ClosedBy,
    ) {
        let server = self.server_text();
        self.lose_logged(now, reason, closed_by, false);
        // More useful to an operator than the short reason: what went wrong, and where.
        self.last_error = Some(format!("{failure} ({server})"));
        self.link_failure = Some(failure);
    }

    /// Asks the shell to wrap the link in TLS, checking the certificate against the server's
    /// name (the URL's host; for a learned server, see `ServerPool::apply_connect_urls`).
    pub(super) fn start_tls(&mut self) {
        let server_name = self
            .current
            .as_ref()
            .map_or_else(String::new, |u| u.server_name().to_owned());
        self.tls_started = true;
        debug!(event = "nats_tls_start", component = "nats_resilience",
               server = %self.server_text(), server_name = %server_name);
        self.actions.push_back(SessionAction::StartTls {
            link: self.link_id,
            server_name,
        });
    }

    fn lose_logged(&mut self, now: Instant, reason: &'static str, closed_by: ClosedBy, log: bool) {
        self.last_error = Some(format!("{reason} ({})", self.server_text()));
        if closed_by == ClosedBy::Session {
            self.actions
                .push_back(SessionAction::Disconnect { link: self.link_id });
        }
        let was_up = self.link.is_up();
        let draining = matches!(self.link, Link::Draining { .. });
        self.set_link(Link::Down { retry_at: now }, reason);
        self.decoder = NatsDecoder::new(self.config.decoder_limits);
        // Frames the shell never began to write are not on the wire: they may go again.
        let mut failed = 0u64;
        for (id, start) in self.requests.written() {
            let unsent = start >= self.written_total;
            let fits = !draining
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
        } else if log {
            warn!(event = "nats_handshake_failed", component = "nats_resilience",
                  server = %self.server_text(), reason);
        }
        if draining {
            // A drain that loses its link is over: nothing is left to wait for.
            return self.finish_close();
        }
        self.schedule_next(now);
    }

    pub(super) fn finish_close(&mut self) {
        if self.link.has_stream() || matches!(self.link, Link::Opening { .. }) {
            self.actions
                .push_back(SessionAction::Disconnect { link: self.link_id });
        }
        self.set_link(Link::Closed, "closed");
        self.out.clear();
        self.transmit_announced = false;
        info!(event = "nats_closed", component = "nats_resilience");
    }

    pub(super) fn check_drain(&mut self) {
        // Called on every flush: the scan of the requests is left for when it can matter.
        if !matches!(self.link, Link::Draining { .. }) || !self.out.is_empty() {
            return;
        }
        if !self.requests.any_written() {
            self.finish_close();
        }
    }

    /// In lame duck mode, moves on once nothing written awaits an answer, or at the grace end.
    pub(super) fn check_lame_duck(&mut self, now: Instant) {
        let Link::LameDuck { leave_at, .. } = self.link else {
            return;
        };
        if !self.requests.any_written() || now >= leave_at {
            self.stats.lame_duck_switches += 1;
            self.lose(now, "lame duck", ClosedBy::Session);
        }
    }

    pub(super) fn enter_up(&mut self, now: Instant) {
        let lame_duck = match self.link {
            Link::AwaitPong { lame_duck, .. } => lame_duck,
            _ => None,
        };
        self.links_up += 1;
        self.link_failure = None;
        // The audit log's record (gateway.md section 6): who we are to the server, never how.
        info!(event = "nats_authenticated", component = "nats_resilience",
              server = %self.server_text(), auth_method = self.auth_method, tls = self.tls_started);
        let keepalive = self.fresh_keepalive(now);
        match lame_duck {
            None => self.set_link(Link::Up { keepalive }, "handshake done"),
            Some(leave_at) => self.set_link(
                Link::LameDuck {
                    keepalive,
                    leave_at,
                },
                "handshake done on a lame duck server",
            ),
        }
        if lame_duck.is_none() {
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
        if lame_duck.is_some() {
            self.check_lame_duck(now);
        } else {
            self.flush_buffer(now);
        }
    }

    /// The ping time came: send one, or declare the link stale when too many went unanswered.
    pub(super) fn keepalive_due(&mut self, link: Link, k: Keepalive, now: Instant) {
        // nats.go counts the ping about to be sent: more than the maximum unanswered means
        // the connection is stale.
        if k.pings_out + 1 > self.config.max_pings_outstanding {
            warn!(event = "nats_stale_connection", component = "nats_resilience",
                  server = %self.server_text(), pings_out = k.pings_out);
            return self.lose(now, "pings unanswered", ClosedBy::Session);
        }
        self.stats.pings_sent += 1;
        let mut b = BytesMut::new();
        encode_ping(&mut b);
        self.push_out(b.freeze());
        let next = Keepalive {
            next_ping: now + self.config.ping_interval,
            pings_out: k.pings_out + 1,
        };
        self.set_link(link.with_keepalive(next), "ping sent");
    }

    // ----- internals: server operations -----------------------------------------------------

    pub(super) fn handle_op(&mut self, op: ServerOp, now: Instant) {
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

    pub(super) fn handle_info(&mut self, info: ServerInfo, now: Instant) {
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
            if !self.tls_started {
                let wanted = self.config.tls_wanted();
                if wanted && !info.tls_required && !info.tls_available {
                    // As nats.go's ErrSecureConnWanted: never fall back to plaintext.
                    self.stats.tls_failures += 1;
                    let why = "TLS is configured but the server does not offer it";
                    warn!(event = "nats_tls_failed", component = "nats_resilience",
                          server = %self.server_text(), error = why);
                    return self.link_failed(
                        now,
                        "tls failed",
                        format!("nats tls failed: {why}"),
                        ClosedBy::Session,
                    );
                }
                if wanted || info.tls_required {
                    self.start_tls();
                }
            }
            let mut options = ConnectOptions::for_server(self.config.client_name.clone(), &info);
            let url_auth = self.current.as_ref().filter(|u| u.has_credentials());
            if let Some(url) = url_auth {
                options.user.clone_from(&url.user);
                options.pass.clone_from(&url.pass);
                options.auth_token.clone_from(&url.token);
                self.auth_method = if url.token.is_some() {
                    "token"
                } else {
                    "user_password"
                };
            } else {
                if let Err(e) = self.config.auth.apply(&mut options, info.nonce.as_deref()) {
                    // Checked at start and at every reload, so only a bug gets here; refusing
                    // to connect is still better than connecting as nobody.
                    self.stats.auth_failures += 1;
                    warn!(event = "nats_auth_failed", component = "nats_resilience",
                          server = %self.server_text(), error = %e);
                    return self.link_failed(
                        now,
                        "auth failed",
                        format!("nats auth failed: {e}"),
                        ClosedBy::Session,
                    );
                }
                self.auth_method = self.config.auth.method();
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
            self.set_link(
                Link::AwaitPong {
                    deadline,
                    lame_duck: None,
                },
                "INFO received",
            );
        }
        if info.ldm {
            self.handle_lame_duck(now);
        }
    }

    pub(super) fn handle_lame_duck(&mut self, now: Instant) {
        if matches!(
            self.link,
            Link::LameDuck { .. }
                | Link::AwaitPong {
                    lame_duck: Some(_),
                    ..
                }
        ) {
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
        let leave_at = now + self.config.lame_duck_grace;
        match self.link {
            Link::AwaitPong { deadline, .. } => self.set_link(
                Link::AwaitPong {
                    deadline,
                    lame_duck: Some(leave_at),
                },
                "lame duck",
            ),
            Link::Up { keepalive } => self.set_link(
                Link::LameDuck {
                    keepalive,
                    leave_at,
                },
                "lame duck",
            ),
            Link::Draining {
                keepalive,
                close_at,
            } => self.set_link(
                Link::Draining {
                    keepalive,
                    close_at: close_at.min(leave_at),
                },
                "lame duck",
            ),
            _ => {}
        }
        self.check_lame_duck(now);
    }

    /// Like nats.go's `processErr`: a permissions or subject error concerns one publish and
    /// the server keeps the connection; anything else ('Stale Connection', 'Authorization
    /// Violation', 'Maximum Connections Exceeded', ...) is followed by the server closing it.
    /// Unlike nats.go, no error closes the session for good: the contract is to reconnect
    /// without a cap on attempts.
    pub(super) fn handle_err(&mut self, text: &str, now: Instant) {
        let lower = text.to_ascii_lowercase();
        if is_auth_error(&lower) {
            self.stats.auth_failures += 1;
            warn!(event = "nats_auth_failed", component = "nats_resilience",
                  server = %self.server_text(), error = %text, auth_method = self.auth_method);
            return self.link_failed(
                now,
                "auth failed",
                format!("nats auth failed: {text}"),
                ClosedBy::Session,
            );
        }
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
            // More useful to an operator than "server error": what the server said.
            self.last_error = Some(format!("server error: {text} ({})", self.server_text()));
        }
    }
}

/// The `-ERR` texts by which nats-server refuses a client's credentials (nats.go's
/// `checkAuthError` list, plus the timeout for a CONNECT that never came or came too late):
/// the server closes the connection after each.
fn is_auth_error(lower: &str) -> bool {
    [
        "authorization violation",
        "authentication timeout",
        "user authentication expired",
        "user authentication revoked",
        "account authentication expired",
    ]
    .iter()
    .any(|p| lower.starts_with(p))
}
