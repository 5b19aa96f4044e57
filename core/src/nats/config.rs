//! What configures and describes a [`crate::nats_session::NatsSession`]: its settings (defaults
//! are gateway.md section 2's), the states it reports for health and metrics, the socket
//! actions it asks of the shell, and its counters. Kept apart from the state machine so that
//! file holds only transitions.

use std::time::Duration;

use crate::nats_codec::DecoderLimits;
use crate::nats_pool::{Backoff, ServerUrl, ServerUrlError};
use crate::router_envelope::EnvelopeDefaults;

/// Everything the session's behaviour depends on. Defaults are gateway.md's.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Configured servers; see [`NatsConfig::set_servers`]. Empty means `localhost:4222`.
    pub servers: Vec<ServerUrl>,
    /// How long one TCP connect may take.
    pub connect_timeout: Duration,
    /// From TCP up to PONG.
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    /// Pings without any reply after which the connection is declared dead.
    pub max_pings_outstanding: u32,
    pub backoff: Backoff,
    /// Bytes of whole requests held while disconnected.
    pub reconnect_buffer_bytes: usize,
    pub subject: String,
    pub envelope: EnvelopeDefaults,
    /// CONNECT `name`, e.g. `ipc-gateway@<host>`.
    pub client_name: String,
    /// Seeds the inbox name, jitter, server shuffle and trace ids.
    pub seed: u64,
    /// The gateway's request id prefix ([`crate::upstream::instance_prefix`] of its seed), so
    /// the Router sees the ids the client sees.
    pub request_id_prefix: u32,
    /// Tokens remembered after their answer, to tell duplicates from late replies.
    pub recent_answers: usize,
    /// After a lame duck INFO, how long requests already written may still be answered on
    /// this server before the session moves on. nats-server closes lame duck clients only
    /// after its 10 s `lame_duck_grace_period`, so 2 s is safe.
    pub lame_duck_grace: Duration,
    /// How long `begin_drain` waits for answers before closing anyway.
    pub drain_timeout: Duration,
    pub decoder_limits: DecoderLimits,
}

impl Default for NatsConfig {
    fn default() -> NatsConfig {
        NatsConfig {
            servers: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            max_pings_outstanding: 2,
            backoff: Backoff::default(),
            reconnect_buffer_bytes: 8 * 1024 * 1024,
            subject: "beamline.router.v1.decide".to_owned(),
            envelope: EnvelopeDefaults::default(),
            client_name: "ipc-gateway".to_owned(),
            seed: 0,
            request_id_prefix: 0,
            recent_answers: 4096,
            lame_duck_grace: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            decoder_limits: DecoderLimits::default(),
        }
    }
}

impl NatsConfig {
    /// Sets the servers from a comma-separated list (`nats://user:pass@host:port`,
    /// `nats://token@host:port`, `host:port`); the error names the bad entry.
    pub fn set_servers(&mut self, list: &str) -> Result<(), ServerUrlError> {
        self.servers = ServerUrl::parse_list(list)?;
        Ok(())
    }
}

/// The session's state, for health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Created; the first connect starts at the first `handle_timeout`.
    Disconnected,
    /// Trying to connect, never connected yet.
    Connecting,
    /// TCP is up; INFO, CONNECT, SUB, PING → PONG in progress.
    Handshaking,
    Connected,
    /// Lost a connection; waiting for the backoff or connecting again.
    Reconnecting,
    /// Shutting down: answers still arrive, nothing new is sent.
    Draining,
    Closed,
}

impl SessionState {
    /// The name used in `/health` and logs.
    pub fn name(self) -> &'static str {
        match self {
            SessionState::Disconnected => "disconnected",
            SessionState::Connecting => "connecting",
            SessionState::Handshaking => "handshaking",
            SessionState::Connected => "connected",
            SessionState::Reconnecting => "reconnecting",
            SessionState::Draining => "draining",
            SessionState::Closed => "closed",
        }
    }
}

/// What the shell must do with the socket.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionAction {
    /// Open a non-blocking TCP connection, then report `handle_connected` or
    /// `handle_connect_failed`. Any previous socket was already closed by a `Disconnect`.
    Connect { host: String, port: u16 },
    /// Close the socket; report nothing more about it.
    Disconnect,
    /// Output is queued: write [`crate::nats_session::NatsSession::output`] and report with `consume_output`.
    Transmit,
}

/// Counters for metrics and tests; monotonic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsStats {
    pub connect_attempts: u64,
    /// Connections that reached Connected after an earlier one was lost.
    pub reconnects: u64,
    /// Replies whose token was never answered here: cancelled, failed, or unknown.
    pub late_replies: u64,
    /// Replies for a token answered recently (another Router instance replied too).
    pub duplicate_replies: u64,
    /// Messages that are not `<inbox>.<token>` on our subscription.
    pub unknown_replies: u64,
    pub no_responders: u64,
    /// Requests on the wire that failed because their connection dropped.
    pub failed_on_disconnect: u64,
    pub buffer_full_rejections: u64,
    pub pings_sent: u64,
    pub lame_duck_switches: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These names are what /health and the logs show.
    #[test]
    fn state_names() {
        let names = [
            SessionState::Disconnected,
            SessionState::Connecting,
            SessionState::Handshaking,
            SessionState::Connected,
            SessionState::Reconnecting,
            SessionState::Draining,
            SessionState::Closed,
        ]
        .map(SessionState::name);
        assert_eq!(
            names,
            [
                "disconnected",
                "connecting",
                "handshaking",
                "connected",
                "reconnecting",
                "draining",
                "closed"
            ]
        );
    }
}
