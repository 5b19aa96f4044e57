//! Socket activation (`sd_listen_fds(3)`, gateway.md section 10): listeners systemd bound and
//! passed in as fds 3, 4, … with `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`.
//!
//! - Names: `ipc` is the Unix listener, `http` the HTTP listener (`FileDescriptorName=` in the
//!   socket unit). A single descriptor without a name (`LISTEN_FDNAMES` unset, or the name
//!   empty or libsystemd's `unknown`) is the IPC listener.
//! - `LISTEN_PID` other than ours: the variables were meant for another process (a parent
//!   that did not clear them). They are ignored, as `sd_listen_fds` does, and this is logged.
//! - Anything else that does not add up is refused with a message naming the variable and
//!   what is wrong (exit code 2 in main.rs), never guessed at: a count that is not a number,
//!   names that do not match the count, an unknown or repeated name, a descriptor that is not
//!   open, or not a listening stream socket of the family its name says.
//! - Taken descriptors are made close-on-exec and non-blocking.
//!
//! [`plan`] decides from the variables alone (pure, tested below); [`take`] takes the
//! descriptors at the very start of `main`, before the process opens anything itself (or a
//! number systemd did not pass, claimed by a wrong `LISTEN_FDS`, could by then be one of our
//! own files); [`Taken::into_listeners`] checks them once logging is up.

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;

use rustix::io::FdFlags;
use rustix::net::{AddressFamily, SocketType};
use tracing::{info, warn};

use crate::systemd::take_var;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The variables of socket activation, read once at start.
#[derive(Debug, Default, Clone)]
struct ListenEnv {
    pid: Option<OsString>,
    fds: Option<OsString>,
    names: Option<OsString>,
}

impl ListenEnv {
    /// Reads the variables and removes them from the environment, so that no child process
    /// takes the descriptors for its own (what `sd_listen_fds`'s `unset_environment` does).
    ///
    /// Call it before any thread exists: `remove_var` races with other threads reading the
    /// environment (the workspace is edition 2021, where it is not yet marked `unsafe`).
    fn take() -> ListenEnv {
        ListenEnv {
            pid: take_var("LISTEN_PID"),
            fds: take_var("LISTEN_FDS"),
            names: take_var("LISTEN_FDNAMES"),
        }
    }
}

/// What a passed descriptor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Ipc,
    Http,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Ipc => "ipc",
            Role::Http => "http",
        }
    }
}

/// The listeners systemd passed in.
#[derive(Debug, Default)]
pub struct ListenFds {
    pub ipc: Option<UnixListener>,
    pub http: Option<TcpListener>,
}

/// Why the variables or descriptors cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ActivationError(pub String);

/// What the variables say, before any descriptor is touched.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// No socket activation: bind as configured.
    None,
    /// The variables are for another process; the reason is logged.
    Ignore(String),
    /// Take these descriptors for these roles.
    Take(Vec<(RawFd, Role)>),
}

fn text<'a>(name: &str, value: &'a OsString) -> Result<&'a str, ActivationError> {
    value
        .to_str()
        .ok_or_else(|| ActivationError(format!("{name}={value:?} is not valid UTF-8")))
}

/// Decides from the variables alone.
fn plan(env: &ListenEnv, own_pid: u32) -> Result<Plan, ActivationError> {
    let Some(pid) = &env.pid else {
        return Ok(match &env.fds {
            None => Plan::None,
            Some(_) => Plan::Ignore(
                "LISTEN_FDS is set without LISTEN_PID, so it may be meant for another process"
                    .to_owned(),
            ),
        });
    };
    let pid_text = text("LISTEN_PID", pid)?;
    let pid: u32 = pid_text
        .parse()
        .map_err(|_| ActivationError(format!("LISTEN_PID={pid_text:?} is not a process id")))?;
    if pid != own_pid {
        return Ok(Plan::Ignore(format!(
            "LISTEN_PID={pid} is not this process ({own_pid}): the descriptors are not ours"
        )));
    }
    let Some(fds) = &env.fds else {
        return Err(ActivationError(format!(
            "LISTEN_PID={pid} is this process but LISTEN_FDS is not set"
        )));
    };
    let fds_text = text("LISTEN_FDS", fds)?;
    let count: usize = fds_text.parse().map_err(|_| {
        ActivationError(format!(
            "LISTEN_FDS={fds_text:?} is not a number of file descriptors"
        ))
    })?;
    let names_text = match &env.names {
        Some(names) => Some(text("LISTEN_FDNAMES", names)?),
        None => None,
    };
    let names: Vec<&str> = match names_text {
        None | Some("") => Vec::new(),
        Some(names) => names.split(':').collect(),
    };
    let unnamed = |name: &str| name.is_empty() || name == "unknown";
    let roles: Vec<Role> =
        if names.is_empty() || (count == 1 && names.len() == 1 && unnamed(names[0])) {
            match count {
                0 => Vec::new(),
                1 => vec![Role::Ipc],
                n => {
                    return Err(ActivationError(format!(
                        "LISTEN_FDS={n} without names in LISTEN_FDNAMES: with more than one \
                     descriptor each must be named ipc or http (FileDescriptorName= in the \
                     socket unit)"
                    )))
                }
            }
        } else {
            let names_text = names_text.unwrap_or_default();
            if names.len() != count {
                return Err(ActivationError(format!(
                    "LISTEN_FDS={count} but LISTEN_FDNAMES={names_text:?} has {} names: each \
                 descriptor needs one",
                    names.len()
                )));
            }
            let mut roles = Vec::with_capacity(count);
            for (i, name) in names.iter().enumerate() {
                let fd = FIRST_FD + i as RawFd;
                let role = match *name {
                    "ipc" => Role::Ipc,
                    "http" => Role::Http,
                    other => {
                        return Err(ActivationError(format!(
                        "LISTEN_FDNAMES={names_text:?}: unknown name {other:?} for fd {fd}; the \
                         gateway takes \"ipc\" (its Unix socket) and \"http\" \
                         (FileDescriptorName= in the socket unit)"
                    )))
                    }
                };
                if roles.contains(&role) {
                    return Err(ActivationError(format!(
                        "LISTEN_FDNAMES={names_text:?} names {:?} twice",
                        role.name()
                    )));
                }
                roles.push(role);
            }
            roles
        };
    Ok(Plan::Take(
        roles
            .into_iter()
            .enumerate()
            .map(|(i, role)| (FIRST_FD + i as RawFd, role))
            .collect(),
    ))
}

/// The descriptors systemd passed, owned but not yet checked.
#[derive(Debug, Default)]
pub struct Taken {
    fds: Vec<(RawFd, Role, OwnedFd)>,
    /// Why the variables were ignored, to be logged.
    ignored: Option<String>,
}

/// Reads (and removes) the variables and takes the descriptors they name. Call it first thing
/// in `main`: no other thread may exist yet (see [`ListenEnv::take`]), and nothing of the
/// process's own may have taken a descriptor number yet.
pub fn take(own_pid: u32) -> Result<Taken, ActivationError> {
    let env = ListenEnv::take();
    let planned = match plan(&env, own_pid)? {
        Plan::None => return Ok(Taken::default()),
        Plan::Ignore(why) => {
            return Ok(Taken {
                fds: Vec::new(),
                ignored: Some(why),
            })
        }
        Plan::Take(planned) => planned,
    };
    // Every descriptor is taken before any is checked, so that each one is owned (and closed
    // on a refusal) whatever the first error is.
    let mut fds = Vec::with_capacity(planned.len());
    for (fd, role) in planned {
        let owned = take_fd(fd).ok_or_else(|| {
            ActivationError(format!(
                "LISTEN_FDS: fd {fd} ({}) is not an open file descriptor",
                role.name()
            ))
        })?;
        fds.push((fd, role, owned));
    }
    Ok(Taken { fds, ignored: None })
}

impl Taken {
    /// The listeners, checked and logged; empty without socket activation.
    pub fn into_listeners(self) -> Result<ListenFds, ActivationError> {
        if let Some(why) = &self.ignored {
            warn!(event = "listen_fds_ignored", component = "systemd", reason = %why,
                  "socket activation variables ignored; binding as configured");
        }
        into_listeners(self.fds)
    }
}

fn into_listeners(fds: Vec<(RawFd, Role, OwnedFd)>) -> Result<ListenFds, ActivationError> {
    let mut out = ListenFds::default();
    for (fd, role, owned) in fds {
        let described = format!("LISTEN_FDS: fd {fd} ({})", role.name());
        check_listener(&owned, role)
            .map_err(|why| ActivationError(format!("{described} {why}")))?;
        rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC)
            .map_err(|e| ActivationError(format!("{described}: cannot set close-on-exec: {e}")))?;
        match role {
            Role::Ipc => {
                let listener = UnixListener::from(owned);
                listener.set_nonblocking(true).map_err(|e| {
                    ActivationError(format!("{described}: cannot make it non-blocking: {e}"))
                })?;
                let addr = listener.local_addr().ok();
                let path = addr.as_ref().and_then(|a| a.as_pathname());
                let name = match (path, addr.as_ref().and_then(|a| a.as_abstract_name())) {
                    (Some(path), _) => path.display().to_string(),
                    (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
                    (None, None) => "(unnamed)".to_owned(),
                };
                info!(event = "listener_inherited", component = "systemd", fd, role = "ipc",
                      address = %name, "IPC listener taken from systemd");
                out.ipc = Some(listener);
            }
            Role::Http => {
                let listener = TcpListener::from(owned);
                listener.set_nonblocking(true).map_err(|e| {
                    ActivationError(format!("{described}: cannot make it non-blocking: {e}"))
                })?;
                let address = listener
                    .local_addr()
                    .map_or_else(|_| "(unknown)".to_owned(), |a| a.to_string());
                info!(event = "listener_inherited", component = "systemd", fd, role = "http",
                      address = %address, "HTTP listener taken from systemd");
                out.http = Some(listener);
            }
        }
    }
    Ok(out)
}

/// Takes ownership of descriptor `fd` if it is open.
fn take_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only reads the descriptor's flags; on a number that is not open
    // it fails with EBADF and touches nothing.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    if !open {
        return None;
    }
    // SAFETY: the descriptor is open (just checked; no other thread exists yet at this
    // point of start-up to close it), and nothing else in the process owns it: the
    // socket-activation protocol hands descriptors LISTEN_FDS from 3 on to the process named
    // by LISTEN_PID (checked by `plan`), this runs before the process opens anything of its
    // own, and this is the only code that takes them.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is a listening stream socket of `role`'s family; `Err` ends a sentence that
/// starts with the descriptor's description.
fn check_listener(fd: &OwnedFd, role: Role) -> Result<(), String> {
    let expected = match role {
        Role::Ipc => "a listening AF_UNIX SOCK_STREAM socket",
        Role::Http => "a listening AF_INET or AF_INET6 SOCK_STREAM socket",
    };
    let socket_type = rustix::net::sockopt::socket_type(fd)
        .map_err(|e| format!("is not a socket ({e}); expected {expected}"))?;
    let family = rustix::net::sockopt::socket_domain(fd)
        .map_err(|e| format!("has no readable address family ({e}); expected {expected}"))?;
    let family_ok = match role {
        Role::Ipc => family == AddressFamily::UNIX,
        Role::Http => family == AddressFamily::INET || family == AddressFamily::INET6,
    };
    if !family_ok || socket_type != SocketType::STREAM {
        return Err(format!(
            "is a socket of family {} and type {}; expected {expected}",
            family_name(family),
            type_name(socket_type)
        ));
    }
    let listening = rustix::net::sockopt::socket_acceptconn(fd)
        .map_err(|e| format!("cannot be asked whether it listens ({e}); expected {expected}"))?;
    if !listening {
        return Err(format!("is not listening; expected {expected}"));
    }
    Ok(())
}

fn family_name(family: AddressFamily) -> String {
    match family {
        f if f == AddressFamily::UNIX => "AF_UNIX".to_owned(),
        f if f == AddressFamily::INET => "AF_INET".to_owned(),
        f if f == AddressFamily::INET6 => "AF_INET6".to_owned(),
        f => format!("{}", f.as_raw()),
    }
}

fn type_name(socket_type: SocketType) -> String {
    match socket_type {
        t if t == SocketType::STREAM => "SOCK_STREAM".to_owned(),
        t if t == SocketType::DGRAM => "SOCK_DGRAM".to_owned(),
        t if t == SocketType::SEQPACKET => "SOCK_SEQPACKET".to_owned(),
        t => format!("{}", t.as_raw()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 4242;

    fn env(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ListenEnv {
        ListenEnv {
            pid: pid.map(OsString::from),
            fds: fds.map(OsString::from),
            names: names.map(OsString::from),
        }
    }

    fn take(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Plan {
        plan(&env(pid, fds, names), PID).unwrap()
    }

    fn refused(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> String {
        plan(&env(pid, fds, names), PID).unwrap_err().0
    }

    #[test]
    fn plans_roles_from_names_or_a_single_unnamed_fd() {
        assert_eq!(take(None, None, None), Plan::None);
        assert_eq!(take(Some("4242"), Some("0"), None), Plan::Take(vec![]));
        assert_eq!(
            take(Some("4242"), Some("1"), None),
            Plan::Take(vec![(3, Role::Ipc)])
        );
        assert_eq!(
            take(Some("4242"), Some("1"), Some("unknown")),
            Plan::Take(vec![(3, Role::Ipc)])
        );
        assert_eq!(
            take(Some("4242"), Some("1"), Some("http")),
            Plan::Take(vec![(3, Role::Http)])
        );
        assert_eq!(
            take(Some("4242"), Some("2"), Some("http:ipc")),
            Plan::Take(vec![(3, Role::Http), (4, Role::Ipc)])
        );
    }

    #[test]
    fn another_pid_or_no_pid_is_ignored() {
        assert!(
            matches!(take(Some("1"), Some("1"), None), Plan::Ignore(why) if why.contains("LISTEN_PID=1"))
        );
        assert!(matches!(take(None, Some("1"), None), Plan::Ignore(_)));
    }

    #[test]
    fn mismatches_are_refused_naming_the_variable() {
        let cases = [
            (Some("me"), Some("1"), None, "LISTEN_PID=\"me\""),
            (Some("4242"), None, None, "LISTEN_FDS is not set"),
            (
                Some("4242"),
                Some("one"),
                None,
                "LISTEN_FDS=\"one\" is not a number",
            ),
            (
                Some("4242"),
                Some("-1"),
                None,
                "LISTEN_FDS=\"-1\" is not a number",
            ),
            (Some("4242"), Some("2"), None, "LISTEN_FDS=2 without names"),
            (
                Some("4242"),
                Some("2"),
                Some("ipc"),
                "LISTEN_FDS=2 but LISTEN_FDNAMES=\"ipc\" has 1 names",
            ),
            (
                Some("4242"),
                Some("1"),
                Some("ipc:http"),
                "LISTEN_FDS=1 but LISTEN_FDNAMES",
            ),
            (
                Some("4242"),
                Some("1"),
                Some("gateway.socket"),
                "unknown name \"gateway.socket\" for fd 3",
            ),
            (
                Some("4242"),
                Some("2"),
                Some("ipc:ipc"),
                "names \"ipc\" twice",
            ),
            (
                Some("4242"),
                Some("2"),
                Some("ipc:"),
                "unknown name \"\" for fd 4",
            ),
        ];
        for (pid, fds, names, expected) in cases {
            let message = refused(pid, fds, names);
            assert!(
                message.contains(expected),
                "{pid:?} {fds:?} {names:?}: {message:?} does not say {expected:?}"
            );
        }
    }

    #[test]
    fn checks_family_type_and_listening() {
        let dir = std::env::temp_dir().join(format!("cgw-activation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let unix = OwnedFd::from(UnixListener::bind(dir.join("l.sock")).unwrap());
        let tcp = OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap());
        let (pair, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let pair = OwnedFd::from(pair);
        let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert_eq!(check_listener(&unix, Role::Ipc), Ok(()));
        assert_eq!(check_listener(&tcp, Role::Http), Ok(()));
        let ipc_as_http = check_listener(&unix, Role::Http).unwrap_err();
        assert!(ipc_as_http.contains("family AF_UNIX"), "{ipc_as_http}");
        let http_as_ipc = check_listener(&tcp, Role::Ipc).unwrap_err();
        assert!(http_as_ipc.contains("family AF_INET"), "{http_as_ipc}");
        assert!(check_listener(&pair, Role::Ipc)
            .unwrap_err()
            .contains("not listening"));
        assert!(check_listener(&udp, Role::Http)
            .unwrap_err()
            .contains("SOCK_DGRAM"));
        assert!(check_listener(&file, Role::Ipc)
            .unwrap_err()
            .contains("not a socket"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
