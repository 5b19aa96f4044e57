//! Configuration: `CGW_*` environment variables and the matching flags (gateway.md section 7).
//!
//! clap gives both from one definition, and `--help` from the same text. Every value parser
//! names its variable in its error, so an invalid setting stops the start with exit code 2 and
//! a message saying which variable, which value, and what is accepted. Flags win over the
//! environment.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipc_gateway_core::breaker::BreakerConfig;
use ipc_gateway_core::connection::ConnectionLimits;
use ipc_gateway_core::frame::{HEADER_LEN, MAX_FRAME_BYTES};
use ipc_gateway_core::gateway::{AllowedUids, GatewayConfig};
use ipc_gateway_core::nats::auth::{NatsAuth, Secret};
use ipc_gateway_core::nats_config::NatsConfig;
use ipc_gateway_core::nats_pool::ServerUrl;
use ipc_gateway_core::router_envelope::{EnvelopeDefaults, EnvelopeMode};

use crate::nats_security::{SecretSetting, SecretSource, Sources};

/// The kernel's limit on a Unix socket path (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ipc-gateway",
    version,
    // `ipc-gateway --socket-path x health` would mix daemon settings into a subcommand that
    // ignores them; refusing it keeps `health` the first argument, where main.rs looks for it.
    args_conflicts_with_subcommands = true,
    about = "Local gateway between IDE integrations and the Beamline Router",
    long_about = "Local gateway between IDE integrations and the Beamline Router.\n\n\
        Listens on a Unix socket for the framed IPC protocol (v1) and answers every task. \
        With NATS disabled (the default) an embedded stub Router answers at once, so the \
        gateway runs with nothing else installed.\n\n\
        Every option can also be set by the environment variable shown with it; a flag wins \
        over the variable. An invalid value stops the start with exit code 2.",
    after_help = "Logs are JSON lines on stderr. SIGTERM or SIGINT drains: in-flight requests are \
        answered, new ones get error 6; a second signal exits at once."
)]
pub struct Cli {
    /// Unix socket path to listen on (at most 107 bytes)
    #[arg(long, env = "CGW_IPC_SOCKET_PATH", default_value = "/tmp/beamline-gateway.sock",
          value_parser = socket_path("CGW_IPC_SOCKET_PATH"))]
    pub socket_path: PathBuf,

    /// Permissions of the socket file, in octal (0660 lets a group in, with --allowed-uids)
    #[arg(long, env = "CGW_IPC_SOCKET_MODE", default_value = "0600",
          value_parser = octal_mode("CGW_IPC_SOCKET_MODE"))]
    pub socket_mode: u32,

    /// Most client connections at once; one more gets error 7 and is closed
    #[arg(long, env = "CGW_IPC_MAX_CONNECTIONS", default_value = "64",
          value_parser = whole("CGW_IPC_MAX_CONNECTIONS", 1, 100_000))]
    pub max_connections: u64,

    /// Most requests in flight in the whole gateway; one more gets error 7 at once
    #[arg(long, env = "CGW_IPC_MAX_INFLIGHT", default_value = "1000",
          value_parser = whole("CGW_IPC_MAX_INFLIGHT", 1, 1_000_000))]
    pub max_inflight: u64,

    /// Most requests in flight on one connection; reading that connection pauses beyond it
    #[arg(long, env = "CGW_IPC_MAX_INFLIGHT_PER_CONN", default_value = "10",
          value_parser = whole("CGW_IPC_MAX_INFLIGHT_PER_CONN", 1, 100_000))]
    pub max_inflight_per_conn: u64,

    /// Largest accepted frame in bytes, header included (at most 4194304)
    #[arg(long, env = "CGW_IPC_MAX_FRAME_BYTES", default_value = "4194304",
          value_parser = whole("CGW_IPC_MAX_FRAME_BYTES", HEADER_LEN as u64 + 2, MAX_FRAME_BYTES as u64))]
    pub max_frame_bytes: u64,

    /// How long a client may hold a partial frame before error 5 and close, in ms
    #[arg(long, env = "CGW_IPC_READ_TIMEOUT_MS", default_value = "10000",
          value_parser = whole("CGW_IPC_READ_TIMEOUT_MS", 1, 86_400_000))]
    pub read_timeout_ms: u64,

    /// Reply bytes held for a client that does not read, before it is closed
    #[arg(long, env = "CGW_IPC_MAX_UNSENT_BYTES", default_value = "8388608",
          value_parser = whole("CGW_IPC_MAX_UNSENT_BYTES", 1024, 1 << 32))]
    pub max_unsent_bytes: u64,

    /// Peer uids allowed to connect: comma-separated numbers, or * for all [default: own uid and root]
    #[arg(long, env = "CGW_IPC_ALLOWED_UIDS", value_parser = allowed_uids("CGW_IPC_ALLOWED_UIDS"))]
    pub allowed_uids: Option<AllowedUids>,

    /// Request deadline: no reply by then gives error 5, in ms
    #[arg(long, env = "CGW_IPC_TIMEOUT_MS", default_value = "30000",
          value_parser = whole("CGW_IPC_TIMEOUT_MS", 1, 86_400_000))]
    pub timeout_ms: u64,

    /// Forward tasks to the Router over NATS (1) or answer them with the embedded stub (0)
    #[arg(long, env = "CGW_IPC_NATS_ENABLE", default_value = "0",
          value_parser = flag("CGW_IPC_NATS_ENABLE"), action = clap::ArgAction::Set)]
    pub nats_enable: bool,

    /// NATS servers, comma-separated: nats://host:port, nats://user:pass@host:port, nats://token@host:port; tls://host:port requires TLS
    #[arg(long, env = "CGW_IPC_NATS_URL", default_value = "nats://localhost:4222",
          value_parser = nats_urls("CGW_IPC_NATS_URL"))]
    pub nats_url: NatsServers,

    /// NATS TLS: PEM file of the CA certificates that verify the servers [default: the system's store]. Setting it turns TLS on
    #[arg(long, env = "CGW_IPC_NATS_TLS_CA", value_parser = file_path("CGW_IPC_NATS_TLS_CA"))]
    pub nats_tls_ca: Option<PathBuf>,

    /// NATS mutual TLS: PEM file of the client certificate (chain), with --nats-tls-key. Setting it turns TLS on
    #[arg(long, env = "CGW_IPC_NATS_TLS_CERT", value_parser = file_path("CGW_IPC_NATS_TLS_CERT"))]
    pub nats_tls_cert: Option<PathBuf>,

    /// NATS mutual TLS: PEM file of the client certificate's private key
    #[arg(long, env = "CGW_IPC_NATS_TLS_KEY", value_parser = file_path("CGW_IPC_NATS_TLS_KEY"))]
    pub nats_tls_key: Option<PathBuf>,

    /// NATS: start TLS before the server's INFO (servers with handshake_first, nats-server 2.10 and later)
    #[arg(long, env = "CGW_IPC_NATS_TLS_FIRST", default_value = "0",
          value_parser = flag("CGW_IPC_NATS_TLS_FIRST"), action = clap::ArgAction::Set)]
    pub nats_tls_first: bool,

    /// NATS credentials file (JWT and nkey seed, as nsc writes it); re-read on SIGHUP
    #[arg(long, env = "CGW_IPC_NATS_CREDS", value_parser = file_path("CGW_IPC_NATS_CREDS"))]
    pub nats_creds: Option<PathBuf>,

    /// NATS nkey seed (SU...) that signs the server's nonce; prefer --nats-nkey-seed-file
    #[arg(long, env = "CGW_IPC_NATS_NKEY_SEED", hide_env_values = true,
          value_parser = secret("CGW_IPC_NATS_NKEY_SEED"))]
    pub nats_nkey_seed: Option<Secret>,

    /// NATS: file holding the nkey seed; re-read on SIGHUP
    #[arg(long, env = "CGW_IPC_NATS_NKEY_SEED_FILE", value_parser = file_path("CGW_IPC_NATS_NKEY_SEED_FILE"))]
    pub nats_nkey_seed_file: Option<PathBuf>,

    /// NATS authentication token; prefer --nats-token-file
    #[arg(long, env = "CGW_IPC_NATS_TOKEN", hide_env_values = true,
          value_parser = secret("CGW_IPC_NATS_TOKEN"))]
    pub nats_token: Option<Secret>,

    /// NATS: file holding the token; re-read on SIGHUP
    #[arg(long, env = "CGW_IPC_NATS_TOKEN_FILE", value_parser = file_path("CGW_IPC_NATS_TOKEN_FILE"))]
    pub nats_token_file: Option<PathBuf>,

    /// NATS user name, with --nats-password or --nats-password-file
    #[arg(long, env = "CGW_IPC_NATS_USER", value_parser = identifier("CGW_IPC_NATS_USER"))]
    pub nats_user: Option<String>,

    /// NATS password; prefer --nats-password-file
    #[arg(long, env = "CGW_IPC_NATS_PASSWORD", hide_env_values = true,
          value_parser = secret("CGW_IPC_NATS_PASSWORD"))]
    pub nats_password: Option<Secret>,

    /// NATS: file holding the password; re-read on SIGHUP
    #[arg(long, env = "CGW_IPC_NATS_PASSWORD_FILE", value_parser = file_path("CGW_IPC_NATS_PASSWORD_FILE"))]
    pub nats_password_file: Option<PathBuf>,

    /// NATS subject of the Router's decide requests
    #[arg(long, env = "CGW_IPC_ROUTER_SUBJECT", default_value = "beamline.router.v1.decide",
          value_parser = subject("CGW_IPC_ROUTER_SUBJECT"))]
    pub router_subject: String,

    /// Router request envelope: router-v1 or legacy (the C gateway's)
    #[arg(long, env = "CGW_IPC_ENVELOPE", default_value = "router-v1",
          value_parser = envelope("CGW_IPC_ENVELOPE"))]
    pub envelope: EnvelopeMode,

    /// Tenant sent to the Router when the client's payload names none
    #[arg(long, env = "CGW_IPC_TENANT_ID", default_value = "default",
          value_parser = identifier("CGW_IPC_TENANT_ID"))]
    pub tenant_id: String,

    /// Policy sent to the Router when the client's payload names none
    #[arg(long, env = "CGW_IPC_POLICY_ID", default_value = "default",
          value_parser = identifier("CGW_IPC_POLICY_ID"))]
    pub policy_id: String,

    /// NATS: how long one TCP connect may take, in ms
    #[arg(long, env = "CGW_IPC_NATS_CONNECT_TIMEOUT_MS", default_value = "2000",
          value_parser = whole("CGW_IPC_NATS_CONNECT_TIMEOUT_MS", 1, 600_000))]
    pub nats_connect_timeout_ms: u64,

    /// NATS: keepalive ping interval (reset by incoming traffic), in ms
    #[arg(long, env = "CGW_IPC_NATS_PING_INTERVAL_MS", default_value = "20000",
          value_parser = whole("CGW_IPC_NATS_PING_INTERVAL_MS", 10, 86_400_000))]
    pub nats_ping_interval_ms: u64,

    /// NATS: unanswered pings after which the connection is declared dead
    #[arg(long, env = "CGW_IPC_NATS_MAX_PINGS_OUT", default_value = "2",
          value_parser = whole("CGW_IPC_NATS_MAX_PINGS_OUT", 1, 1_000))]
    pub nats_max_pings_out: u64,

    /// NATS: bytes of requests held while disconnected; beyond it requests get error 8
    #[arg(long, env = "CGW_IPC_NATS_RECONNECT_BUFFER_BYTES", default_value = "8388608",
          value_parser = whole("CGW_IPC_NATS_RECONNECT_BUFFER_BYTES", 0, 1 << 32))]
    pub nats_reconnect_buffer_bytes: u64,

    /// Delay of the embedded stub Router's answers, in ms (to try timeouts and draining)
    #[arg(long, env = "CGW_IPC_STUB_DELAY_MS", default_value = "0",
          value_parser = whole("CGW_IPC_STUB_DELAY_MS", 0, 86_400_000))]
    pub stub_delay_ms: u64,

    /// Consecutive Router failures that open the circuit breaker
    #[arg(long, env = "CGW_IPC_BREAKER_FAILURES", default_value = "5",
          value_parser = whole("CGW_IPC_BREAKER_FAILURES", 1, 1_000_000))]
    pub breaker_failures: u64,

    /// First open time of the breaker, doubling on each re-open, in ms
    #[arg(long, env = "CGW_IPC_BREAKER_OPEN_MS", default_value = "5000",
          value_parser = whole("CGW_IPC_BREAKER_OPEN_MS", 1, 86_400_000))]
    pub breaker_open_ms: u64,

    /// Longest open time of the breaker, in ms
    #[arg(long, env = "CGW_IPC_BREAKER_MAX_OPEN_MS", default_value = "60000",
          value_parser = whole("CGW_IPC_BREAKER_MAX_OPEN_MS", 1, 86_400_000))]
    pub breaker_max_open_ms: u64,

    /// Probe requests allowed at a time while the breaker is half-open
    #[arg(long, env = "CGW_IPC_BREAKER_PROBES", default_value = "3",
          value_parser = whole("CGW_IPC_BREAKER_PROBES", 1, 1_000))]
    pub breaker_probes: u64,

    /// Probe successes that close the breaker again
    #[arg(long, env = "CGW_IPC_BREAKER_CLOSE_SUCCESSES", default_value = "2",
          value_parser = whole("CGW_IPC_BREAKER_CLOSE_SUCCESSES", 1, 1_000))]
    pub breaker_close_successes: u64,

    /// On SIGTERM, how long in-flight requests may take before they get error 6, in ms
    #[arg(long, env = "CGW_IPC_DRAIN_MS", default_value = "30000",
          value_parser = whole("CGW_IPC_DRAIN_MS", 0, 86_400_000))]
    pub drain_ms: u64,

    /// How long NATS may be reconnecting before health turns from DEGRADED to UNHEALTHY, in ms
    #[arg(long, env = "CGW_HEALTH_GRACE_MS", default_value = "5000",
          value_parser = whole("CGW_HEALTH_GRACE_MS", 0, 86_400_000))]
    pub health_grace_ms: u64,

    /// Audit log: a JSON Lines file (mode 0600, appended to) of connections accepted, denied and
    /// closed, the configuration and the shutdown; reopened on SIGHUP. `off` disables it
    #[arg(long, env = "CGW_AUDIT_LOG", default_value = "off",
          value_parser = audit_path("CGW_AUDIT_LOG"))]
    pub audit_log: AuditPath,

    /// HTTP health and metrics endpoints: an IP address and port (port 0 picks a free one), or
    /// off. Unset, a busy default port only disables HTTP (with a warning); set, a failed bind
    /// stops the start [default: 127.0.0.1:8080]
    #[arg(long, env = "CGW_HTTP_ADDR", value_parser = http_addr("CGW_HTTP_ADDR"))]
    pub http_addr: Option<HttpAddr>,

    /// Log level: error, warn, info, debug or trace
    #[arg(long, env = "CGW_LOG_LEVEL", default_value = "info",
          value_parser = clap::builder::PossibleValuesParser::new(["error", "warn", "info", "debug", "trace"]))]
    pub log_level: String,

    /// Print the effective configuration as JSON and exit
    #[arg(long)]
    pub check_config: bool,

    /// Operator commands instead of running the daemon
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands. Each runs without the daemon's settings: main.rs dispatches to it before
/// the `CGW_*` environment is parsed (see [`health_args`]).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Ask a running daemon for its health over HTTP: prints GET /health's JSON; exit 0
    /// HEALTHY, 1 DEGRADED, 2 UNHEALTHY or unreachable
    #[command(after_help = "Examples:\n  \
        ipc-gateway health                         # CGW_HTTP_ADDR, else 127.0.0.1:8080\n  \
        ipc-gateway health --addr 127.0.0.1:9100\n  \
        ipc-gateway health --live                  # container HEALTHCHECK: exit 0 on 200\n\n\
        The request times out after 2 s (connect and answer). An address that cannot be \
        reached, or an answer that is not the daemon's, is reported on stderr with exit 2.")]
    Health(crate::health_cli::HealthArgs),
}

/// Parses `ipc-gateway health …` (`args` starts at `health`) with the `health` subcommand's
/// definition alone. Parsing the whole [`Cli`] would read and check every `CGW_*` variable,
/// and a check run from a shell whose environment holds a stale or invalid daemon setting
/// must still reach the daemon. `--help` and bad options exit through clap, as usual.
pub fn health_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> crate::health_cli::HealthArgs {
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command()
        .find_subcommand("health")
        .expect("the health subcommand is defined")
        .clone()
        .bin_name("ipc-gateway health");
    let matches = command.get_matches_from(args);
    crate::health_cli::HealthArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// A validated configuration: the core's part and the shell's part.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket_path: PathBuf,
    pub socket_mode: u32,
    pub stub_delay: Duration,
    pub log_level: String,
    /// `CGW_AUDIT_LOG`; `None` when off.
    pub audit_log: Option<PathBuf>,
    /// Read and checked even in stub mode, so that a mistake shows at start.
    pub nats: NatsSettings,
    /// `CGW_HTTP_ADDR`.
    pub http: HttpSetting,
    pub gateway: GatewayConfig,
}

/// `CGW_AUDIT_LOG`: a path, or `None` for `off` (a newtype: clap reads an `Option` field as
/// an optional flag, and the default must be spelled).
#[derive(Debug, Clone)]
pub struct AuditPath(pub Option<PathBuf>);

/// A value of `CGW_HTTP_ADDR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAddr {
    Off,
    At(SocketAddr),
}

/// The HTTP endpoints' address, and whether the operator chose it: a busy default port only
/// disables HTTP (8080 is often a developer's dev server), a busy chosen one stops the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSetting {
    pub addr: HttpAddr,
    pub explicit: bool,
}

/// `CGW_HTTP_ADDR`'s default.
pub const DEFAULT_HTTP_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8080,
));

/// The configured server list (a newtype: clap reads a `Vec` field as a repeated option).
#[derive(Debug, Clone)]
pub struct NatsServers(pub Vec<ServerUrl>);

/// The NATS settings of gateway.md section 7.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub enabled: bool,
    pub servers: Vec<ServerUrl>,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub max_pings_outstanding: u32,
    pub reconnect_buffer_bytes: usize,
    pub subject: String,
    pub envelope: EnvelopeMode,
    pub tenant_id: String,
    pub policy_id: String,
    /// Certificates and credentials (section 9): where they come from; read by `load`.
    pub security: Sources,
}

/// Why the configuration was refused, naming the variables involved.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl Cli {
    /// Checks what single values cannot, and builds the settings.
    pub fn settings(&self, own_uid: u32, seed: u64) -> Result<Settings, ConfigError> {
        if self.breaker_max_open_ms < self.breaker_open_ms {
            return Err(ConfigError(format!(
                "CGW_IPC_BREAKER_MAX_OPEN_MS ({}) must not be below CGW_IPC_BREAKER_OPEN_MS ({})",
                self.breaker_max_open_ms, self.breaker_open_ms
            )));
        }
        let allowed = self
            .allowed_uids
            .clone()
            .unwrap_or_else(|| AllowedUids::Only(BTreeSet::from([own_uid, 0])));
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let clamp32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(Settings {
            socket_path: self.socket_path.clone(),
            socket_mode: self.socket_mode,
            stub_delay: Duration::from_millis(self.stub_delay_ms),
            log_level: self.log_level.clone(),
            audit_log: self.audit_log.0.clone(),
            http: HttpSetting {
                addr: self.http_addr.unwrap_or(HttpAddr::At(DEFAULT_HTTP_ADDR)),
                explicit: self.http_addr.is_some(),
            },
            nats: NatsSettings {
                enabled: self.nats_enable,
                servers: self.nats_url.0.clone(),
                connect_timeout: Duration::from_millis(self.nats_connect_timeout_ms),
                ping_interval: Duration::from_millis(self.nats_ping_interval_ms),
                max_pings_outstanding: clamp32(self.nats_max_pings_out),
                reconnect_buffer_bytes: clamp(self.nats_reconnect_buffer_bytes),
                subject: self.router_subject.clone(),
                envelope: self.envelope,
                tenant_id: self.tenant_id.clone(),
                policy_id: self.policy_id.clone(),
                security: self.security_sources()?,
            },
            gateway: GatewayConfig {
                max_connections: clamp(self.max_connections),
                max_inflight: clamp(self.max_inflight),
                connection: ConnectionLimits {
                    max_frame_bytes: clamp(self.max_frame_bytes),
                    max_inflight: clamp(self.max_inflight_per_conn),
                    read_timeout: Duration::from_millis(self.read_timeout_ms),
                    max_unsent_bytes: clamp(self.max_unsent_bytes),
                },
                request_timeout: Duration::from_millis(self.timeout_ms),
                drain_timeout: Duration::from_millis(self.drain_ms),
                breaker: BreakerConfig {
                    failures_to_open: clamp32(self.breaker_failures),
                    open_duration: Duration::from_millis(self.breaker_open_ms),
                    max_open_duration: Duration::from_millis(self.breaker_max_open_ms),
                    max_probes: clamp32(self.breaker_probes),
                    successes_to_close: clamp32(self.breaker_close_successes),
                },
                health_grace: Duration::from_millis(self.health_grace_ms),
                allowed_uids: allowed,
                seed,
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
        })
    }
}

impl Cli {
    /// Where the link's secrets come from; the combinations are checked here, the files when
    /// they are read ([`Sources::load`]).
    fn security_sources(&self) -> Result<Sources, ConfigError> {
        let either = |value: &Option<Secret>,
                      var: &'static str,
                      file: &Option<PathBuf>,
                      file_var: &'static str| {
            match (value, file) {
                (Some(_), Some(_)) => Err(ConfigError(format!(
                    "{var} and {file_var} are both set: give the secret or the file holding it"
                ))),
                (Some(v), None) => Ok(Some(SecretSetting {
                    var,
                    source: SecretSource::Value(v.clone()),
                })),
                (None, Some(p)) => Ok(Some(SecretSetting {
                    var: file_var,
                    source: SecretSource::File(p.clone()),
                })),
                (None, None) => Ok(None),
            }
        };
        let sources = Sources {
            ca: self.nats_tls_ca.clone(),
            cert: self.nats_tls_cert.clone(),
            key: self.nats_tls_key.clone(),
            tls_first: self.nats_tls_first,
            creds: self.nats_creds.clone(),
            nkey_seed: either(
                &self.nats_nkey_seed,
                "CGW_IPC_NATS_NKEY_SEED",
                &self.nats_nkey_seed_file,
                "CGW_IPC_NATS_NKEY_SEED_FILE",
            )?,
            token: either(
                &self.nats_token,
                "CGW_IPC_NATS_TOKEN",
                &self.nats_token_file,
                "CGW_IPC_NATS_TOKEN_FILE",
            )?,
            user: self.nats_user.clone(),
            password: either(
                &self.nats_password,
                "CGW_IPC_NATS_PASSWORD",
                &self.nats_password_file,
                "CGW_IPC_NATS_PASSWORD_FILE",
            )?,
        };
        sources.check()?;
        Ok(sources)
    }
}

impl Settings {
    /// The NATS session's configuration. Its seed and request id prefix are not here: the
    /// gateway derives both from its own seed (`Identity::derive` in the core).
    /// `auth` is what [`Sources::load`] read from `self.nats.security`.
    pub fn nats_config(&self, hostname: &str, auth: &NatsAuth) -> NatsConfig {
        let n = &self.nats;
        NatsConfig {
            servers: n.servers.clone(),
            connect_timeout: n.connect_timeout,
            ping_interval: n.ping_interval,
            max_pings_outstanding: n.max_pings_outstanding,
            reconnect_buffer_bytes: n.reconnect_buffer_bytes,
            subject: n.subject.clone(),
            envelope: EnvelopeDefaults {
                mode: n.envelope,
                tenant_id: n.tenant_id.clone(),
                policy_id: n.policy_id.clone(),
            },
            client_name: format!("ipc-gateway@{hostname}"),
            // The gateway has answered every request when it hands over; what remains is
            // output to flush.
            drain_timeout: Duration::from_secs(2),
            auth: auth.clone(),
            tls: n.security.tls_configured(),
            tls_first: n.security.tls_first,
            ..NatsConfig::default()
        }
    }

    /// The effective configuration as JSON, for `--check-config` and the `config_loaded` log.
    pub fn to_json(&self) -> serde_json::Value {
        let g = &self.gateway;
        let uids = match &g.allowed_uids {
            AllowedUids::Any => serde_json::json!("*"),
            AllowedUids::Only(set) => serde_json::json!(set),
        };
        serde_json::json!({
            "socket_path": self.socket_path.display().to_string(),
            "socket_mode": format!("{:04o}", self.socket_mode),
            "max_connections": g.max_connections,
            "max_inflight": g.max_inflight,
            "max_inflight_per_conn": g.connection.max_inflight,
            "max_frame_bytes": g.connection.max_frame_bytes,
            "read_timeout_ms": g.connection.read_timeout.as_millis() as u64,
            "max_unsent_bytes": g.connection.max_unsent_bytes,
            "allowed_uids": uids,
            "upstream": if self.nats.enabled { "nats" } else { "stub" },
            "nats": {
                "enabled": self.nats.enabled,
                // Display masks credentials: secrets never reach --check-config or logs.
                "servers": self.nats.servers.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "subject": self.nats.subject,
                "envelope": match self.nats.envelope {
                    EnvelopeMode::RouterV1 => "router-v1",
                    EnvelopeMode::Legacy => "legacy",
                },
                "tenant_id": self.nats.tenant_id,
                "policy_id": self.nats.policy_id,
                "connect_timeout_ms": self.nats.connect_timeout.as_millis() as u64,
                "ping_interval_ms": self.nats.ping_interval.as_millis() as u64,
                "max_pings_out": self.nats.max_pings_outstanding,
                "reconnect_buffer_bytes": self.nats.reconnect_buffer_bytes,
                // Which certificates and credentials, never a secret's value.
                "security": self.nats.security.to_json(),
            },
            "timeout_ms": g.request_timeout.as_millis() as u64,
            "stub_delay_ms": self.stub_delay.as_millis() as u64,
            "breaker": {
                "failures_to_open": g.breaker.failures_to_open,
                "open_ms": g.breaker.open_duration.as_millis() as u64,
                "max_open_ms": g.breaker.max_open_duration.as_millis() as u64,
                "probes": g.breaker.max_probes,
                "close_successes": g.breaker.successes_to_close,
            },
            "drain_ms": g.drain_timeout.as_millis() as u64,
            "health_grace_ms": g.health_grace.as_millis() as u64,
            "log_level": self.log_level,
            "http_addr": match self.http.addr {
                HttpAddr::Off => "off".to_string(),
                HttpAddr::At(addr) => addr.to_string(),
            },
            "audit_log": self.audit_log.as_ref().map_or_else(
                || "off".to_string(),
                |p| p.display().to_string()
            ),
        })
    }
}

/// `CGW_*` variables in the environment that no option reads (likely typos).
pub fn unknown_variables(vars: impl Iterator<Item = String>) -> Vec<String> {
    use clap::CommandFactory;
    let known: BTreeSet<String> = Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    vars.filter(|v| v.starts_with("CGW_") && !known.contains(v))
        .collect()
}

fn whole(
    var: &'static str,
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!(
            "{var} must be a whole number from {min} to {max}, not {s:?}"
        )),
    }
}

fn http_addr(
    var: &'static str,
) -> impl Fn(&str) -> Result<HttpAddr, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let t = s.trim();
        if t.eq_ignore_ascii_case("off") {
            return Ok(HttpAddr::Off);
        }
        t.parse::<SocketAddr>().map(HttpAddr::At).map_err(|_| {
            format!(
                "{var} must be an IP address and port such as 127.0.0.1:8080 or [::1]:8080 \
                 (port 0 picks a free port), or off, not {s:?}"
            )
        })
    }
}

fn flag(
    var: &'static str,
) -> impl Fn(&str) -> Result<bool, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{var} must be 0 or 1 (or true/false), not {s:?}")),
    }
}

fn nats_urls(
    var: &'static str,
) -> impl Fn(&str) -> Result<NatsServers, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        ServerUrl::parse_list(s)
            .map(NatsServers)
            .map_err(|e| format!("{var}: {e}"))
    }
}

fn subject(
    var: &'static str,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let valid = !s.is_empty()
            && !s.chars().any(|c| c.is_whitespace() || c == '*' || c == '>')
            && s.split('.').all(|token| !token.is_empty());
        if valid {
            Ok(s.to_string())
        } else {
            Err(format!("{var} must be a NATS subject such as beamline.router.v1.decide (dot-separated tokens, no spaces or wildcards), not {s:?}"))
        }
    }
}

fn envelope(
    var: &'static str,
) -> impl Fn(&str) -> Result<EnvelopeMode, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        EnvelopeMode::parse(s.trim())
            .ok_or_else(|| format!("{var} must be router-v1 or legacy, not {s:?}"))
    }
}

/// Tenant and policy ids: what the Router accepts (router.md section 2: non-empty, at most 128
/// bytes).
fn identifier(
    var: &'static str,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        if s.is_empty() || s.len() > 128 {
            Err(format!(
                "{var} must be 1 to 128 bytes long, not {} bytes",
                s.len()
            ))
        } else {
            Ok(s.to_string())
        }
    }
}

fn octal_mode(
    var: &'static str,
) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        match u32::from_str_radix(s.trim(), 8) {
        Ok(v) if v <= 0o777 && v & 0o600 == 0o600 => Ok(v),
        Ok(v) if v <= 0o777 => Err(format!("{var} {s:?} would lock the gateway's own user out: the owner needs read and write (0600 at least)")),
        _ => Err(format!("{var} must be an octal file mode such as 0600 or 0660, not {s:?}")),
    }
    }
}

fn socket_path(
    var: &'static str,
) -> impl Fn(&str) -> Result<PathBuf, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        if s.is_empty() {
            Err(format!("{var} must not be empty"))
        } else if s.len() > MAX_SOCKET_PATH {
            Err(format!(
                "{var} is {} bytes long; a Unix socket path may have at most {MAX_SOCKET_PATH}",
                s.len()
            ))
        } else if s.contains('\0') {
            Err(format!("{var} must not contain a NUL byte"))
        } else {
            Ok(PathBuf::from(s))
        }
    }
}

/// A file the gateway reads (certificates, credentials); whether it can be read is checked
/// when it is read, with the same message at start and in `--check-config`.
fn file_path(
    var: &'static str,
) -> impl Fn(&str) -> Result<PathBuf, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        if s.trim().is_empty() {
            Err(format!("{var} must be a file path, not empty"))
        } else if s.contains('\0') {
            Err(format!("{var} must not contain a NUL byte"))
        } else {
            Ok(PathBuf::from(s))
        }
    }
}

/// A secret given in the environment; its value is never echoed, not even when refused.
fn secret(
    var: &'static str,
) -> impl Fn(&str) -> Result<Secret, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let t = s.trim();
        if t.is_empty() {
            Err(format!("{var} must not be empty"))
        } else {
            Ok(Secret::new(t))
        }
    }
}

fn audit_path(
    var: &'static str,
) -> impl Fn(&str) -> Result<AuditPath, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        if s.trim().is_empty() {
            Err(format!("{var} must be a file path, or off, not empty"))
        } else if s.trim() == "off" {
            Ok(AuditPath(None))
        } else if s.contains('\0') {
            Err(format!("{var} must not contain a NUL byte"))
        } else {
            Ok(AuditPath(Some(PathBuf::from(s))))
        }
    }
}

/// The message (exit code 2) when the audit log cannot be opened at start.
pub fn audit_open_error(path: &std::path::Path, e: &std::io::Error) -> ConfigError {
    ConfigError(format!(
        "CGW_AUDIT_LOG {:?} cannot be opened for append: {e} (it must be a file the gateway \
         can create or append to, or off)",
        path.display().to_string()
    ))
}

fn allowed_uids(
    var: &'static str,
) -> impl Fn(&str) -> Result<AllowedUids, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let s = s.trim();
        if s == "*" {
            return Ok(AllowedUids::Any);
        }
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim) {
            match part.parse::<u32>() {
                Ok(uid) => {
                    set.insert(uid);
                }
                Err(_) => return Err(format!("{var} must be * or a comma-separated list of numeric uids, and {part:?} is not a uid")),
            }
        }
        Ok(AllowedUids::Only(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ipc-gateway").chain(args.iter().copied()))
    }

    /// With no options set, the configuration holds the spec's defaults (socket, mode 0600, limits,
    /// 4 MiB frames, timeouts, breaker) and allows root and the gateway's own uid.
    #[test]
    fn defaults_match_the_spec() {
        let s = parse(&[]).unwrap().settings(1000, 0).unwrap();
        let j = s.to_json();
        assert_eq!(j["socket_path"], "/tmp/beamline-gateway.sock");
        assert_eq!(j["socket_mode"], "0600");
        assert_eq!(
            (
                j["max_connections"].as_u64(),
                j["max_inflight"].as_u64(),
                j["max_inflight_per_conn"].as_u64()
            ),
            (Some(64), Some(1000), Some(10))
        );
        assert_eq!(j["max_frame_bytes"], 4_194_304);
        assert_eq!(j["read_timeout_ms"], 10_000);
        assert_eq!(j["timeout_ms"], 30_000);
        assert_eq!(j["allowed_uids"], serde_json::json!([0, 1000]));
        assert_eq!(j["breaker"]["failures_to_open"], 5);
        assert_eq!(j["health_grace_ms"], 5_000);
        assert_eq!(j["http_addr"], "127.0.0.1:8080");
        assert!(!s.http.explicit);
        let s = parse(&["--health-grace-ms", "750"])
            .unwrap()
            .settings(1000, 0)
            .unwrap();
        assert_eq!(s.gateway.health_grace, Duration::from_millis(750));
    }

    /// A bad value (zero, not a number, a mode the owner cannot read and write, a uid name, an
    /// over-long socket path, too large a frame) exits with code 2 naming its CGW_IPC_ variable.
    #[test]
    fn invalid_values_name_their_variable() {
        for args in [
            &["--max-connections", "0"][..],
            &["--max-connections", "abc"],
            &["--socket-mode", "999"],
            &["--socket-mode", "0400"],
            &["--allowed-uids", "root"],
            &["--socket-path", &"x".repeat(108)],
            &["--max-frame-bytes", "4194305"],
        ] {
            let err = parse(args).unwrap_err().to_string();
            let flag = args[0]
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase();
            assert!(err.contains(&format!("CGW_IPC_{flag}")), "{args:?}: {err}");
            assert_eq!(parse(args).unwrap_err().exit_code(), 2);
        }
    }

    /// NATS settings are validated with NATS off (the default) too, each refusal naming its
    /// variable: a bad URL, subject, envelope or keepalive shows at start, not once NATS is on.
    #[test]
    fn nats_settings_are_checked_even_in_stub_mode() {
        for (args, var) in [
            (
                &["--nats-url", "nats://host:notaport"][..],
                "CGW_IPC_NATS_URL",
            ),
            (&["--router-subject", "a b"], "CGW_IPC_ROUTER_SUBJECT"),
            (&["--router-subject", "a.*"], "CGW_IPC_ROUTER_SUBJECT"),
            (&["--envelope", "v2"], "CGW_IPC_ENVELOPE"),
            (&["--tenant-id", ""], "CGW_IPC_TENANT_ID"),
            (&["--nats-enable", "maybe"], "CGW_IPC_NATS_ENABLE"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.to_string().contains(var), "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
        for (args, var) in [
            (
                &["--nats-ping-interval-ms", "5"][..],
                "CGW_IPC_NATS_PING_INTERVAL_MS",
            ),
            (&["--nats-max-pings-out", "0"], "CGW_IPC_NATS_MAX_PINGS_OUT"),
            (
                &["--nats-connect-timeout-ms", "x"],
                "CGW_IPC_NATS_CONNECT_TIMEOUT_MS",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.to_string().contains(var), "{args:?}: {err}");
        }
    }

    /// The NATS options land in the session's config (servers, keepalive, envelope, tenant, client
    /// name with the hostname); the id prefix is the gateway's, the seed a stream of its own.
    #[test]
    fn nats_settings_reach_the_session() {
        let s = parse(&[
            "--nats-enable",
            "1",
            "--nats-url",
            "nats://10.0.0.1:4333",
            "--nats-ping-interval-ms",
            "250",
            "--nats-max-pings-out",
            "3",
            "--envelope",
            "legacy",
            "--tenant-id",
            "acme",
        ])
        .unwrap()
        .settings(0, 42)
        .unwrap();
        assert_eq!(s.to_json()["upstream"], "nats");
        let c = s.nats_config("box", &NatsAuth::None);
        assert_eq!(c.servers[0].host, "10.0.0.1");
        assert_eq!(c.servers[0].port, 4333);
        assert_eq!(c.ping_interval, Duration::from_millis(250));
        assert_eq!(c.max_pings_outstanding, 3);
        assert_eq!(c.envelope.mode, EnvelopeMode::Legacy);
        assert_eq!(c.envelope.tenant_id, "acme");
        assert_eq!(c.client_name, "ipc-gateway@box");
    }

    /// User names, passwords and tokens in NATS URLs are masked as `***@host` in the effective
    /// configuration JSON (--check-config, the config_loaded log), never shown.
    #[test]
    fn credentials_never_reach_check_config() {
        let cli = parse(&[
            "--nats-url",
            "nats://alice:s3cret@a:4222,nats://t0ken@b:4223",
        ])
        .unwrap();
        let j = cli.settings(0, 0).unwrap().to_json();
        let text = j.to_string();
        assert!(
            !text.contains("s3cret") && !text.contains("t0ken") && !text.contains("alice"),
            "{text}"
        );
        assert_eq!(
            j["nats"]["servers"],
            serde_json::json!(["nats://***@a:4222", "nats://***@b:4223"])
        );
        assert_eq!(j["nats"]["envelope"], "router-v1");
    }

    /// CGW_HTTP_ADDR takes an address with a port or `off`; anything else (a host name, no port)
    /// is refused naming the variable and the value; setting it at all marks it explicit.
    #[test]
    fn http_addr_values() {
        let s = parse(&["--http-addr", "off"])
            .unwrap()
            .settings(0, 0)
            .unwrap();
        assert_eq!(
            s.http,
            HttpSetting {
                addr: HttpAddr::Off,
                explicit: true
            }
        );
        assert_eq!(s.to_json()["http_addr"], "off");
        let s = parse(&["--http-addr", "[::1]:0"])
            .unwrap()
            .settings(0, 0)
            .unwrap();
        assert_eq!(s.http.addr, HttpAddr::At("[::1]:0".parse().unwrap()));
        for bad in ["localhost:8080", "127.0.0.1", "8080", ""] {
            let err = parse(&["--http-addr", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            assert!(
                text.contains("CGW_HTTP_ADDR") && text.contains(&format!("{bad:?}")),
                "{text}"
            );
        }
    }

    /// A secret and its file, or two credential methods, are refused naming the variables;
    /// the value of a secret never appears in `--help` (clap would show the environment's).
    #[test]
    fn nats_secrets_conflicts_name_the_variables() {
        let e = parse(&["--nats-token", "t", "--nats-token-file", "/f"])
            .unwrap()
            .settings(0, 0)
            .unwrap_err();
        assert!(
            e.0.contains("CGW_IPC_NATS_TOKEN and CGW_IPC_NATS_TOKEN_FILE"),
            "{}",
            e.0
        );
        let e = parse(&["--nats-token", "t", "--nats-nkey-seed-file", "/f"])
            .unwrap()
            .settings(0, 0)
            .unwrap_err();
        assert!(
            e.0.contains("CGW_IPC_NATS_NKEY_SEED_FILE and CGW_IPC_NATS_TOKEN"),
            "{}",
            e.0
        );
        use clap::CommandFactory;
        for secret in [
            "CGW_IPC_NATS_TOKEN",
            "CGW_IPC_NATS_PASSWORD",
            "CGW_IPC_NATS_NKEY_SEED",
        ] {
            let arg = Cli::command()
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == secret))
                .cloned()
                .unwrap();
            assert!(arg.is_hide_env_values_set(), "{secret}");
        }
        let s = parse(&["--nats-tls-first", "1", "--nats-tls-ca", "/ca.pem"])
            .unwrap()
            .settings(0, 0)
            .unwrap();
        let c = s.nats_config("h", &NatsAuth::None);
        assert!(c.tls && c.tls_first);
        assert_eq!(s.to_json()["nats"]["security"]["tls"]["ca"], "/ca.pem");
    }

    /// A breaker max open time below the base open time is refused, naming both variables.
    #[test]
    fn cross_checks_name_both_variables() {
        let e = parse(&["--breaker-open-ms", "10", "--breaker-max-open-ms", "5"])
            .unwrap()
            .settings(0, 0)
            .unwrap_err();
        assert!(
            e.0.contains("CGW_IPC_BREAKER_MAX_OPEN_MS") && e.0.contains("CGW_IPC_BREAKER_OPEN_MS"),
            "{}",
            e.0
        );
    }

    /// CGW_IPC_ALLOWED_UIDS takes `*` for any uid, or a comma-separated list (spaces allowed).
    #[test]
    fn allowed_uids_star_and_lists() {
        assert_eq!(
            parse(&["--allowed-uids", "*"]).unwrap().allowed_uids,
            Some(AllowedUids::Any)
        );
        assert_eq!(
            parse(&["--allowed-uids", "5, 7"]).unwrap().allowed_uids,
            Some(AllowedUids::Only(BTreeSet::from([5, 7])))
        );
    }

    /// Only CGW_ variables no option reads (likely typos) are reported; known ones and others not.
    #[test]
    fn unknown_cgw_variables_are_reported() {
        let vars = ["CGW_IPC_MAX_CONECTIONS", "CGW_IPC_TIMEOUT_MS", "PATH"].map(String::from);
        assert_eq!(
            unknown_variables(vars.into_iter()),
            vec!["CGW_IPC_MAX_CONECTIONS".to_string()]
        );
    }
}
