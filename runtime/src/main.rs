//! `ipc-gateway`: the daemon. Parses the configuration, sets up logging and the socket (or
//! takes it from systemd), and runs the event loop around the core with the stub upstream or,
//! with NATS enabled, the NATS session.

mod activation;
mod audit;
mod config;
mod event_loop;
mod handoff;
mod health_cli;
mod http;
mod listener;
mod logging;
mod metrics;
mod nats_link;
mod nats_security;
mod sync;
mod systemd;
mod vectored;

use std::hash::{BuildHasher, Hasher};
use std::process::ExitCode;

use clap::Parser;
use ipc_gateway_core::nats_session::NatsSession;
use ipc_gateway_core::stub::{StubConfig, StubUpstream};
use ipc_gateway_core::Gateway;
use tracing::{error, info, warn};

use crate::config::Cli;
use crate::event_loop::{EventLoop, Exit};
use crate::listener::BoundSocket;
use crate::nats_link::UpstreamIo;

/// Exit code for a configuration the daemon refuses (clap uses 2 for its own errors too).
const EXIT_CONFIG: u8 = 2;
/// Exit code when the daemon cannot start or run (socket in use, poll failure).
const EXIT_FAILURE: u8 = 1;
/// Exit code after a second signal cut the drain short (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    // Not the daemon: reads none of its settings (see config::health_args) and leaves
    // systemd's variables and descriptors below alone.
    if std::env::args_os().nth(1).is_some_and(|a| a == "health") {
        return health_cli::run(&config::health_args(std::env::args_os().skip(1)));
    }
    // First of all, while this is the only thread (removing variables races with threads that
    // read the environment): systemd's variables, taken out so no child inherits them; and the
    // descriptors of socket activation, before this process opens any of its own. Errors wait
    // until logging is up.
    let notify_env = systemd::NotifyEnv::take();
    let inherited = activation::take(std::process::id());
    fix_malloc_mmap_threshold();
    let cli = Cli::parse();
    // Not reached while `health` can only be the first argument (see the Cli's
    // args_conflicts_with_subcommands); kept so a subcommand can never start a daemon.
    if let Some(config::Command::Health(args)) = &cli.command {
        return health_cli::run(args);
    }
    let own_uid = rustix::process::getuid().as_raw();
    let settings = match cli.settings(own_uid, random_seed()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ipc-gateway: invalid configuration: {}", e.0);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Certificates and credentials are read now, so a missing file or a malformed seed stops
    // the start (exit 2) naming the variable and the file; --check-config reads them too. The
    // system's trust store only when a link may need it.
    let roots = if settings.nats.enabled && !cli.check_config {
        nats_security::Roots::System
    } else {
        nats_security::Roots::Skip
    };
    let security = match settings.nats.security.load(roots) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("ipc-gateway: invalid configuration: {}", e.0);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&settings.to_json()).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    // Opened before logging starts, so that `config_loaded` is the file's first record of this
    // run; a path that cannot be opened is a bad setting like any other (exit code 2).
    let audit = match &settings.audit_log {
        None => None,
        Some(path) => match audit::AuditLog::open(path) {
            Ok(opened) => Some(opened),
            Err(e) => {
                let e = config::audit_open_error(path, &e);
                eprintln!("ipc-gateway: invalid configuration: {}", e.0);
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    logging::init(
        &settings.log_level,
        audit.as_ref().map(|(log, _)| log.clone()),
    );
    if let Some((log, tightened)) = &audit {
        audit::log_tightened(&log.path(), *tightened);
    }
    let audit = audit.map(|(log, _)| log);
    for var in config::unknown_variables(std::env::vars().map(|(k, _)| k)) {
        warn!(event = "unknown_setting", component = "config", variable = %var,
              "unknown CGW_* variable ignored (a typo?); see ipc-gateway --help");
    }
    info!(event = "config_loaded", component = "config", config = %settings.to_json());
    raise_fd_limit();

    let inherited = match inherited.and_then(activation::Taken::into_listeners) {
        Ok(fds) => fds,
        Err(e) => {
            error!(event = "error", component = "systemd", error = %e, "cannot start");
            eprintln!("ipc-gateway: invalid socket activation: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Bound apart from the loop, so that a listener handed in by the service manager can take
    // its place; and before the IPC socket, so that refusing CGW_HTTP_ADDR leaves no socket
    // file behind. An inherited `http` listener wins: the socket unit chose the address.
    let http_listener = match inherited.http {
        Some(listener) => {
            info!(
                event = "http_inherited",
                component = "http",
                "HTTP listener taken from systemd; CGW_HTTP_ADDR is not bound"
            );
            http::listening(&listener).map(|()| Some(listener))
        }
        None => http::bind(&settings.http),
    };
    let http_listener = match http_listener {
        Ok(l) => l,
        Err(e) => {
            error!(event = "error", component = "http", error = %e.0, "cannot start");
            eprintln!("ipc-gateway: invalid configuration: {}", e.0);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let upstream_kind = if settings.nats.enabled {
        "nats"
    } else {
        "stub"
    };
    let socket = match inherited.ipc {
        Some(listener) => {
            // systemd's socket unit decides the path and the mode; CGW_IPC_SOCKET_PATH and
            // CGW_IPC_SOCKET_MODE do not apply (the listener_inherited line has the address).
            info!(
                event = "listening",
                component = "ipc_bridge",
                inherited = true,
                upstream = upstream_kind
            );
            BoundSocket::inherited(listener)
        }
        None => match BoundSocket::bind(&settings.socket_path, settings.socket_mode) {
            Ok(s) => {
                info!(event = "listening", component = "ipc_bridge",
                      path = %settings.socket_path.display(),
                      mode = format!("{:04o}", settings.socket_mode), upstream = upstream_kind);
                s
            }
            Err(e) => {
                error!(event = "error", component = "ipc_bridge", error = %e, "cannot start");
                eprintln!("ipc-gateway: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        },
    };
    let notifier = systemd::Notifier::new(&notify_env, std::process::id());

    let result = if settings.nats.enabled {
        let nats = settings.nats_config(&hostname(), &security.auth);
        let link = nats_link::NatsLinkConfig {
            sources: settings.nats.security.clone(),
            loaded: security,
        };
        run(
            Gateway::<NatsSession>::new(settings.gateway.clone(), nats),
            socket,
            http_listener,
            audit,
            notifier,
            link,
        )
    } else {
        let stub = StubConfig {
            delay: settings.stub_delay,
        };
        run(
            Gateway::<StubUpstream>::new(settings.gateway.clone(), stub),
            socket,
            http_listener,
            audit,
            notifier,
            (),
        )
    };
    match result {
        Ok(Exit::Drained) => ExitCode::SUCCESS,
        Ok(Exit::Interrupted) => ExitCode::from(EXIT_INTERRUPTED),
        Err(e) => {
            error!(event = "error", component = "ipc_bridge", error = %e, "event loop failed");
            eprintln!("ipc-gateway: event loop failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run<U: UpstreamIo>(
    gateway: Gateway<U>,
    socket: BoundSocket,
    http_listener: Option<std::net::TcpListener>,
    audit: Option<audit::AuditLog>,
    notifier: systemd::Notifier,
    link_config: U::LinkConfig,
) -> std::io::Result<Exit> {
    EventLoop::new(gateway, socket, http_listener, audit, notifier, link_config)
        .and_then(|mut event_loop| event_loop.run())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and logs both values (`fd_limit`). Each
/// client costs one descriptor, and distributions often start services with a soft limit of
/// 1024 under a much higher hard limit: without this, `--max-connections` above about a
/// thousand would end in `accept` failing with EMFILE. Failing to raise it is logged, not
/// fatal: the daemon still serves as many clients as the old limit allows.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is "unlimited". As a soft limit it needs no raising; as a hard limit Linux never
    // reports it for NOFILE (the ceiling is fs.nr_open), and asking for it would fail.
    let (Some(old), Some(hard)) = (limit.current, limit.maximum) else {
        info!(
            event = "fd_limit",
            component = "ipc_bridge",
            unlimited = true,
            "open-file limit is unlimited; left as it is"
        );
        return;
    };
    let new = old.max(hard);
    if new == old {
        info!(
            event = "fd_limit",
            component = "ipc_bridge",
            old,
            new,
            hard,
            "open-file limit already at the hard limit"
        );
        return;
    }
    let raised = Rlimit {
        current: Some(new),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => info!(
            event = "fd_limit",
            component = "ipc_bridge",
            old,
            new,
            hard,
            "open-file limit raised to the hard limit"
        ),
        Err(e) => warn!(event = "fd_limit", component = "ipc_bridge", old, new = old, hard,
                        error = %e, "cannot raise the open-file limit; keeping the old one"),
    }
}

/// Keeps large buffers in memory mappings of their own, so that RSS falls back once they are
/// freed.
///
/// glibc's malloc serves blocks of 128 KiB and more from their own mappings, unmapped when
/// freed, but it raises that threshold to the size of every such block freed (up to 32 MiB):
/// after the first 4 MiB frame, frames and replies come from the heap, which glibc gives back
/// to the system only from its top. With the stress suite's memory part (64 clients pushing
/// 4 MiB frames), 2.8 GiB of a 3.3 GiB peak stayed resident after the clients left. Setting
/// the threshold turns the adjustment off. Smaller blocks, all that ordinary traffic uses,
/// are unaffected. An operator's `MALLOC_MMAP_THRESHOLD_` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_malloc_mmap_threshold() {
    use std::ffi::c_int;
    /// `M_MMAP_THRESHOLD` in glibc's malloc.h.
    const M_MMAP_THRESHOLD: c_int = -3;
    /// glibc's own default, kept fixed.
    const THRESHOLD: c_int = 128 * 1024;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // SAFETY: mallopt takes two integers and only changes the allocator's parameters, under
    // the allocator's own lock; it may be called at any time.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

/// The CONNECT `name` suffix, so the server's connection list tells gateways apart.
fn hostname() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// A per-process seed for the core's random choices: the standard library's hasher keys come
/// from the OS's random source, which saves a dependency for eight bytes.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}
