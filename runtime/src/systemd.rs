//! systemd's service notifications (`sd_notify(3)`, gateway.md section 10), written here in a
//! few lines over a Unix datagram socket rather than through libsystemd or a crate.
//!
//! - `READY=1` (with the first `STATUS=`) when the event loop starts: the IPC listener is
//!   bound or inherited, and no connection has been served yet. NATS may still be connecting:
//!   the daemon serves while it is down, so waiting for it would only delay dependants.
//! - `STATUS=<status> (<reason>)` when the health changes: its status, or the kind of its
//!   reason ("nats down for 5.0 s" growing to "… 6.0 s" is not a change, or systemd would be
//!   told on every turn of an outage).
//! - `WATCHDOG=1` every half of `WATCHDOG_USEC`, from the event loop's own turns, so that a
//!   stuck loop stops them and systemd restarts it. Not when `WATCHDOG_PID` names another
//!   process (the variables were meant for a parent, as `sd_watchdog_enabled(3)` says).
//! - `STOPPING=1` when the drain begins, with the draining status in the same datagram: an
//!   idle gateway finishes its shutdown within that turn, before any later `STATUS=`.
//!
//! Without `NOTIFY_SOCKET` nothing is sent and nothing is logged. A failed send is logged once
//! and is never fatal: a service manager that stopped listening must not stop the gateway.
//! The socket is non-blocking: a full receive queue loses a datagram instead of stalling the
//! event loop.
//!
//! [`Notifier`] is the one state machine here: the health last reported and the watchdog's
//! next deadline. Time comes in as arguments, so the tests below drive it without sleeping.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use ipc_gateway_core::gateway::{Health, HealthReason, HealthStatus};
use tracing::{info, warn};

/// systemd's variables for notifications, read once at start.
#[derive(Debug, Default, Clone)]
pub struct NotifyEnv {
    pub notify_socket: Option<OsString>,
    pub watchdog_usec: Option<OsString>,
    pub watchdog_pid: Option<OsString>,
}

impl NotifyEnv {
    /// Reads the variables and removes them from the environment, so that no child process
    /// takes them for its own (what `sd_notify`'s `unset_environment` does).
    ///
    /// Call it before any thread exists: `remove_var` races with other threads reading the
    /// environment (the workspace is edition 2021, where it is not yet marked `unsafe`).
    pub fn take() -> NotifyEnv {
        NotifyEnv {
            notify_socket: take_var("NOTIFY_SOCKET"),
            watchdog_usec: take_var("WATCHDOG_USEC"),
            watchdog_pid: take_var("WATCHDOG_PID"),
        }
    }
}

/// Reads an environment variable and removes it, so that no child process takes what
/// systemd meant for this one (`sd_notify`'s and `sd_listen_fds`'s `unset_environment`).
/// Only while no other thread exists: `remove_var` races with threads reading the environment
/// (the workspace is edition 2021, where it is not yet marked `unsafe`).
pub fn take_var(name: &str) -> Option<std::ffi::OsString> {
    let value = std::env::var_os(name);
    std::env::remove_var(name);
    value
}

/// Where the datagrams go.
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for logs.
    name: String,
}

/// The key that decides whether a health is news: the status and the kind of reason.
type HealthKey = (HealthStatus, Option<std::mem::Discriminant<HealthReason>>);

fn key(health: &Health) -> HealthKey {
    (
        health.status,
        health.reason.as_ref().map(std::mem::discriminant),
    )
}

/// Sends the notifications; inert when systemd did not ask for them.
pub struct Notifier {
    target: Option<Target>,
    /// Half of `WATCHDOG_USEC`; `None` without a watchdog.
    watchdog_interval: Option<Duration>,
    /// When the next `WATCHDOG=1` is due (set by [`Notifier::ready`]).
    watchdog_next: Option<Instant>,
    /// The health last reported in `STATUS=`.
    reported: Option<HealthKey>,
    /// `STOPPING=1` was sent (a second signal sends nothing more).
    stopping: bool,
    /// A send failed and was logged; later failures are not.
    failure_logged: bool,
}

impl Notifier {
    /// A notifier that sends nothing (no `NOTIFY_SOCKET`).
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog_interval: None,
            watchdog_next: None,
            reported: None,
            stopping: false,
            failure_logged: false,
        }
    }

    /// From the variables read at start. A value systemd would never set (a relative
    /// `NOTIFY_SOCKET`, a `WATCHDOG_USEC` that is no number) is logged and that part is off:
    /// these describe the service manager, not the gateway's configuration, and the gateway
    /// serves as well without them.
    pub fn new(env: &NotifyEnv, own_pid: u32) -> Notifier {
        let mut notifier = Notifier::disabled();
        let Some(raw) = &env.notify_socket else {
            return notifier;
        };
        let name = raw.to_string_lossy().into_owned();
        let target = notify_addr(raw.as_bytes()).and_then(|addr| {
            let socket = UnixDatagram::unbound()
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|e| format!("cannot create the notification socket: {e}"))?;
            Ok(Target {
                socket,
                addr,
                name: name.clone(),
            })
        });
        match target {
            Ok(target) => notifier.target = Some(target),
            Err(why) => {
                warn!(event = "systemd_notify_disabled", component = "systemd",
                      notify_socket = %name, reason = %why,
                      "NOTIFY_SOCKET is unusable; not notifying systemd");
                return notifier;
            }
        }
        match watchdog_interval(env, own_pid) {
            Ok(interval) => notifier.watchdog_interval = interval,
            Err(why) => warn!(event = "systemd_watchdog_disabled", component = "systemd",
                              reason = %why, "systemd watchdog variables unusable; no WATCHDOG=1"),
        }
        info!(
            event = "systemd_notify",
            component = "systemd",
            notify_socket = %name,
            watchdog_ms = notifier.watchdog_interval.map(|d| d.as_millis() as u64),
            "notifying systemd"
        );
        notifier
    }

    /// `READY=1` with the first `STATUS=`; starts the watchdog's schedule.
    pub fn ready(&mut self, health: &Health, now: Instant) {
        if self.target.is_none() {
            return;
        }
        self.reported = Some(key(health));
        self.watchdog_next = self.watchdog_interval.map(|i| now + i);
        self.send(&format!("READY=1\nSTATUS={health}"));
    }

    /// `STATUS=` if the health changed since the last report.
    pub fn health(&mut self, health: &Health) {
        if self.target.is_none() || self.reported == Some(key(health)) {
            return;
        }
        self.reported = Some(key(health));
        self.send(&format!("STATUS={health}"));
    }

    /// `STOPPING=1` with the health (draining by now), once.
    pub fn stopping(&mut self, health: &Health) {
        if self.target.is_none() || self.stopping {
            return;
        }
        self.stopping = true;
        self.reported = Some(key(health));
        self.send(&format!("STOPPING=1\nSTATUS={health}"));
    }

    /// How long until the next `WATCHDOG=1` is due, for the event loop's poll timeout.
    pub fn watchdog_timeout(&self, now: Instant) -> Option<Duration> {
        self.watchdog_next
            .map(|next| next.saturating_duration_since(now))
    }

    /// Sends `WATCHDOG=1` if it is due. Called once per turn of the event loop: a turn that
    /// never comes (a stuck loop) sends nothing, which is the point.
    pub fn on_turn(&mut self, now: Instant) {
        let (Some(next), Some(interval)) = (self.watchdog_next, self.watchdog_interval) else {
            return;
        };
        if now < next {
            return;
        }
        // From now, not from `next`: after a long turn, one ping, not a burst of catch-ups.
        self.watchdog_next = Some(now + interval);
        self.send("WATCHDOG=1");
    }

    fn send(&mut self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(e) = target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            if !self.failure_logged {
                self.failure_logged = true;
                warn!(event = "systemd_notify_failed", component = "systemd",
                      notify_socket = %target.name, message, error = %e,
                      "cannot notify systemd; serving on (further failures are not logged)");
            }
        }
    }
}

/// `NOTIFY_SOCKET` as an address: an absolute path, or `@name` in the abstract namespace.
fn notify_addr(raw: &[u8]) -> Result<SocketAddr, String> {
    let addr = match raw.first() {
        Some(b'/') => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(raw)),
        Some(b'@') => SocketAddr::from_abstract_name(&raw[1..]),
        _ => {
            return Err(
                "neither an absolute path nor an abstract @name (the only kinds supported)"
                    .to_owned(),
            )
        }
    };
    addr.map_err(|e: io::Error| format!("not a usable socket address: {e}"))
}

/// Half of `WATCHDOG_USEC`, if the watchdog is on and meant for this process.
fn watchdog_interval(env: &NotifyEnv, own_pid: u32) -> Result<Option<Duration>, String> {
    let Some(usec) = &env.watchdog_usec else {
        return Ok(None);
    };
    if let Some(pid) = &env.watchdog_pid {
        let pid: u32 = pid
            .to_str()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("WATCHDOG_PID={pid:?} is not a process id"))?;
        if pid != own_pid {
            info!(
                event = "systemd_watchdog_disabled",
                component = "systemd",
                watchdog_pid = pid,
                "WATCHDOG_PID names another process; no WATCHDOG=1 from this one"
            );
            return Ok(None);
        }
    }
    let usec: u64 = usec
        .to_str()
        .and_then(|u| u.parse().ok())
        .filter(|&u| u > 0)
        .ok_or_else(|| format!("WATCHDOG_USEC={usec:?} is not a positive number"))?;
    Ok(Some(Duration::from_micros(usec) / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(usec: Option<&str>, pid: Option<&str>) -> NotifyEnv {
        NotifyEnv {
            notify_socket: None,
            watchdog_usec: usec.map(OsString::from),
            watchdog_pid: pid.map(OsString::from),
        }
    }

    #[test]
    fn notify_socket_paths_and_abstract_names() {
        let path = notify_addr(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abs = notify_addr(b"@sd-notify/1").unwrap();
        assert_eq!(abs.as_abstract_name(), Some(&b"sd-notify/1"[..]));
        assert!(notify_addr(b"relative/path").is_err());
        assert!(notify_addr(b"").is_err());
        assert!(notify_addr(b"vsock:2:1234").is_err());
    }

    #[test]
    fn watchdog_is_half_the_period_and_only_for_our_pid() {
        assert_eq!(watchdog_interval(&env(None, None), 7), Ok(None));
        assert_eq!(
            watchdog_interval(&env(Some("400000"), None), 7),
            Ok(Some(Duration::from_millis(200)))
        );
        assert_eq!(
            watchdog_interval(&env(Some("400000"), Some("7")), 7),
            Ok(Some(Duration::from_millis(200)))
        );
        assert_eq!(
            watchdog_interval(&env(Some("400000"), Some("8")), 7),
            Ok(None)
        );
        assert!(watchdog_interval(&env(Some("0"), None), 7).is_err());
        assert!(watchdog_interval(&env(Some("soon"), None), 7).is_err());
        assert!(watchdog_interval(&env(Some("400000"), Some("me")), 7).is_err());
    }

    /// A receiver bound in a fresh directory, and a notifier aimed at it.
    fn pair(usec: Option<&str>) -> (tempfile_dir::Dir, UnixDatagram, Notifier) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let env = NotifyEnv {
            notify_socket: Some(path.into_os_string()),
            watchdog_usec: usec.map(OsString::from),
            watchdog_pid: None,
        };
        (dir, receiver, Notifier::new(&env, std::process::id()))
    }

    fn received(receiver: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = receiver.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    /// The state machine's transitions: ready, a status only on a change of status or kind
    /// of reason, the watchdog at its interval and only once per due time, stopping once.
    #[test]
    fn sends_ready_status_changes_watchdog_and_stopping() {
        let (_dir, receiver, mut n) = pair(Some("400000"));
        let t0 = Instant::now();
        let connecting = Health {
            status: HealthStatus::Degraded,
            reason: Some(HealthReason::NatsConnecting),
        };
        n.ready(&connecting, t0);
        assert_eq!(
            received(&receiver),
            ["READY=1\nSTATUS=DEGRADED (nats connecting)"]
        );
        assert_eq!(n.watchdog_timeout(t0), Some(Duration::from_millis(200)));
        n.health(&connecting);
        n.on_turn(t0 + Duration::from_millis(199));
        assert!(received(&receiver).is_empty());
        n.on_turn(t0 + Duration::from_millis(250));
        n.on_turn(t0 + Duration::from_millis(260));
        assert_eq!(received(&receiver), ["WATCHDOG=1"]);
        assert_eq!(
            n.watchdog_timeout(t0 + Duration::from_millis(260)),
            Some(Duration::from_millis(190))
        );
        let down = |secs| Health {
            status: HealthStatus::Unhealthy,
            reason: Some(HealthReason::NatsDown {
                down_for: Duration::from_secs(secs),
            }),
        };
        n.health(&down(5));
        n.health(&down(6));
        n.health(&Health::HEALTHY);
        assert_eq!(
            received(&receiver),
            ["STATUS=UNHEALTHY (nats down for 5.0 s)", "STATUS=HEALTHY"]
        );
        let draining = Health {
            status: HealthStatus::Unhealthy,
            reason: Some(HealthReason::Draining),
        };
        n.stopping(&draining);
        n.stopping(&draining);
        n.health(&draining);
        assert_eq!(
            received(&receiver),
            ["STOPPING=1\nSTATUS=UNHEALTHY (draining)"]
        );
    }

    /// Without NOTIFY_SOCKET nothing is scheduled (so the loop's timeout is untouched).
    #[test]
    fn unset_notify_socket_is_inert() {
        let mut n = Notifier::new(&env(Some("400000"), None), std::process::id());
        n.ready(&Health::HEALTHY, Instant::now());
        assert_eq!(n.watchdog_timeout(Instant::now()), None);
    }

    /// A receiver that went away: sends fail quietly after the first log, nothing panics.
    #[test]
    fn a_vanished_receiver_is_not_fatal() {
        let (dir, receiver, mut n) = pair(None);
        drop(receiver);
        drop(dir);
        n.ready(&Health::HEALTHY, Instant::now());
        n.stopping(&Health::HEALTHY);
        assert!(n.failure_logged);
    }

    /// A private temporary directory without the tempfile crate (not a dependency here).
    mod tempfile_dir {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(pub PathBuf);

        impl Dir {
            pub fn new() -> Dir {
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "cgw-systemd-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
