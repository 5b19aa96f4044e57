//! What configures and describes a [`crate::nats_session::NatsSession`]: its settings (defaults
//! are gateway.md section 2's), the states it reports for health and metrics, the socket
//! actions it asks of the shell, and its counters. Kept apart from the state machine so that
//! file holds only transitions.

use std::time::Duration;

use crate::nats::auth::NatsAuth;
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
    /// Tokens remembered after their answer, to tell duplicates from late replies.
    pub recent_answers: usize,
    /// After a lame duck INFO, how long requests already written may still be answered on
    /// this server before the session moves on. nats-server closes lame duck clients only
    /// after its 10 s `lame_duck_grace_period`, so 2 s is safe.
    pub lame_duck_grace: Duration,
    /// How long `handle_shutdown` waits for answers before closing anyway.
    pub drain_timeout: Duration,
    pub decoder_limits: DecoderLimits,
    /// Credentials for servers whose URL carries none (gateway.md section 9).
    pub auth: NatsAuth,
    /// TLS on every connection even if the server does not require it: a `tls://` URL, a CA
    /// or a client certificate was configured. Without it, TLS is used only when INFO says
    /// `tls_required`. See [`NatsConfig::tls_wanted`].
    pub tls: bool,
    /// TLS before INFO (`CGW_IPC_NATS_TLS_FIRST`, nats-server ≥ 2.10 `handshake_first`).
    pub tls_first: bool,
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
            recent_answers: 4096,
            lame_duck_grace: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            decoder_limits: DecoderLimits::default(),
            auth: NatsAuth::None,
            tls: false,
            tls_first: false,
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

    /// Whether every connection upgrades to TLS whatever the server's INFO says: asked for
    /// with [`NatsConfig::tls`] or `tls_first`, or by a `tls://` URL (for all servers, as in
    /// nats.go, since a cluster is secured as a whole).
    pub fn tls_wanted(&self) -> bool {
        self.tls || self.tls_first || self.servers.iter().any(|s| s.tls)
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

/// One socket the session asked for. Every `Connect` names a new link; the shell reports
/// what happens to that socket under its link, and the session ignores reports about any link
/// but its current one (a stale resolution, a read that raced a `Disconnect`), so no shell
/// keeps a generation counter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LinkId(pub u64);

/// What the shell must do with the socket.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionAction {
    /// Open a non-blocking TCP connection for `link`, then report [`NatsInput::Connected`] or
    /// [`NatsInput::ConnectFailed`]. Any previous socket was already closed by a `Disconnect`.
    Connect {
        link: LinkId,
        host: String,
        port: u16,
    },
    /// Close the link's socket; report nothing more about it.
    Disconnect { link: LinkId },
    /// Wrap the link's socket in TLS from now on, checking the certificate against
    /// `server_name`: the session reads and writes plaintext NATS bytes as before, the shell
    /// encrypts them. Output queued after this action (CONNECT) goes through TLS; what the
    /// shell cannot send before the handshake completes, it buffers. A failed handshake or
    /// certificate check is reported as [`NatsInput::TlsFailed`]. Emitted after an INFO that
    /// says `tls_required` (or any INFO when [`NatsConfig::tls_wanted`]), or right after
    /// `Connected` with `tls_first`. The simulations configure no TLS and their server
    /// stand-in never requires it, so their shells only record it.
    StartTls { link: LinkId, server_name: String },
    /// Output is queued for the link: write [`crate::nats_session::NatsSession::output`] and
    /// report [`NatsInput::Written`]. The gateway holds this until the shell's next
    /// `handle_timeout` ([`crate::upstream::Upstream::is_flush`]), so one write carries the
    /// whole turn.
    Transmit { link: LinkId },
}

/// What the shell reports about a link's socket ([`crate::upstream::Upstream::handle_input`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsInput<'a> {
    /// The TCP connection is established.
    Connected(LinkId),
    /// The TCP connection could not be established (refused, no address, unreachable).
    ConnectFailed(LinkId),
    /// Bytes read from the socket.
    Received(LinkId, &'a [u8]),
    /// The shell wrote this many bytes of the session's output.
    Written(LinkId, usize),
    /// The peer closed the socket or it failed.
    Closed(LinkId),
    /// The TLS handshake or the certificate check failed, or a TLS record could not be read
    /// (the reason, naming no secret, e.g. `invalid peer certificate: UnknownIssuer`); the
    /// shell closed the socket.
    TlsFailed(LinkId, &'a str),
}

impl NatsInput<'_> {
    /// The link the report is about.
    pub fn link(&self) -> LinkId {
        match *self {
            NatsInput::Connected(l)
            | NatsInput::ConnectFailed(l)
            | NatsInput::Received(l, _)
            | NatsInput::Written(l, _)
            | NatsInput::Closed(l)
            | NatsInput::TlsFailed(l, _) => l,
        }
    }
}

/// Counters for metrics and tests; monotonic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsStats {
    /// Reports about a link that is no longer the current one, ignored.
    pub stale_inputs: u64,
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
    /// Connections refused for their credentials (`-ERR 'Authorization Violation'` and the
    /// other authentication errors); `nats_auth_failures_total`.
    pub auth_failures: u64,
    /// Connections whose TLS handshake or certificate check failed; `nats_tls_failures_total`.
    pub tls_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config reaches logs through Debug (`--check-config` shows the runtime's own view):
    /// every credential in it is masked, in the servers' URLs and in `auth`.
    #[test]
    fn debug_masks_credentials() {
        use crate::nats::auth::Secret;
        let mut c = NatsConfig::default();
        c.set_servers("nats://u:url-pa55@h:1,tls://url-t0ken@h2:2")
            .unwrap();
        for auth in [
            NatsAuth::Token(Secret::new("cfg-t0ken")),
            NatsAuth::Jwt {
                jwt: Secret::new("eyJ-the-jwt"),
                seed: Secret::new("SUA-the-seed"),
            },
        ] {
            c.auth = auth;
            let text = format!("{c:?}");
            for secret in [
                "url-pa55",
                "url-t0ken",
                "cfg-t0ken",
                "eyJ-the-jwt",
                "SUA-the-seed",
            ] {
                assert!(!text.contains(secret), "{text}");
            }
            assert!(text.contains("tls://***@h2:2"), "{text}");
        }
    }

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
