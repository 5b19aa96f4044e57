//! Configuration and security (gateway.md section 7, ipc-protocol.md section 1): invalid
//! values, `--check-config`, `--help`, unknown variables, the socket file's mode, the uid
//! allow-list and the socket path length limit.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    expect_closed, expect_error_code, ping, run, submit_echo, Daemon, START_TIMEOUT,
};
use serde_json::json;

/// Every variable the daemon contract names.
const VARIABLES: &[&str] = &[
    "CGW_IPC_SOCKET_PATH",
    "CGW_IPC_SOCKET_MODE",
    "CGW_IPC_MAX_CONNECTIONS",
    "CGW_IPC_MAX_INFLIGHT",
    "CGW_IPC_MAX_INFLIGHT_PER_CONN",
    "CGW_IPC_MAX_FRAME_BYTES",
    "CGW_IPC_READ_TIMEOUT_MS",
    "CGW_IPC_MAX_UNSENT_BYTES",
    "CGW_IPC_ALLOWED_UIDS",
    "CGW_IPC_TIMEOUT_MS",
    "CGW_IPC_STUB_DELAY_MS",
    "CGW_IPC_DRAIN_MS",
    "CGW_HEALTH_GRACE_MS",
    "CGW_AUDIT_LOG",
    "CGW_LOG_LEVEL",
];

/// A path of exactly `len` bytes inside `dir`.
fn path_of_len(dir: &Path, len: usize) -> String {
    let mut path = format!("{}/", dir.display());
    assert!(path.len() < len, "temporary directory path too long");
    while path.len() < len {
        path.push('s');
    }
    path
}

/// Any invalid value stops the start with exit code 2 and a message naming the variable and
/// the value; `--check-config` validates the same way. The cases run concurrently.
#[test]
fn invalid_values_exit_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let long_path = path_of_len(dir.path(), 108);
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("CGW_IPC_MAX_CONNECTIONS", "abc".into(), &[]),
        ("CGW_IPC_MAX_CONNECTIONS", "0".into(), &[]),
        ("CGW_IPC_MAX_CONNECTIONS", "-3".into(), &[]),
        ("CGW_IPC_SOCKET_MODE", "999".into(), &[]),
        ("CGW_IPC_SOCKET_MODE", "rw".into(), &[]),
        ("CGW_IPC_READ_TIMEOUT_MS", "-1".into(), &[]),
        ("CGW_IPC_READ_TIMEOUT_MS", "soon".into(), &[]),
        ("CGW_IPC_SOCKET_PATH", long_path, &[]),
        ("CGW_IPC_MAX_INFLIGHT", "many".into(), &[]),
        ("CGW_IPC_MAX_INFLIGHT_PER_CONN", "1.5".into(), &[]),
        ("CGW_IPC_MAX_FRAME_BYTES", "4M".into(), &[]),
        ("CGW_IPC_MAX_FRAME_BYTES", "5".into(), &[]),
        ("CGW_IPC_MAX_UNSENT_BYTES", "lots".into(), &[]),
        ("CGW_IPC_ALLOWED_UIDS", "alice".into(), &[]),
        ("CGW_IPC_TIMEOUT_MS", "30s".into(), &[]),
        ("CGW_IPC_STUB_DELAY_MS", "-5".into(), &[]),
        ("CGW_IPC_DRAIN_MS", "forever".into(), &[]),
        ("CGW_HEALTH_GRACE_MS", "5s".into(), &[]),
        ("CGW_IPC_MAX_CONNECTIONS", "abc".into(), &["--check-config"]),
    ];
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(var, value, args)| {
            thread::spawn(move || {
                let finished = run(&[(var, &value)], args);
                (var, value, args, finished)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for handle in runs {
        let (var, value, args, finished) = handle.join().unwrap();
        let named = finished.stderr.contains(var) && finished.stderr.contains(value.as_str());
        if finished.status.code() != Some(2) || !named {
            failures.push(format!(
                "{var}={value:?} {args:?}: {} (want exit 2 and a message naming the variable \
                 and the value); stderr:\n{}",
                finished.status, finished.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `--check-config` prints the effective configuration on stdout (our socket path and a value
/// we set among it) and exits 0 without serving.
#[test]
fn check_config_prints_configuration_and_exits_0() {
    let mut daemon = Daemon::spawn(&[("CGW_IPC_MAX_CONNECTIONS", "17")], &["--check-config"]);
    let status = daemon.wait_exit(START_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr:\n{}",
        daemon.stderr()
    );
    let stdout = daemon.stdout();
    let socket = daemon.socket_path().to_string_lossy().into_owned();
    assert!(
        stdout.contains(&socket) && stdout.contains("17"),
        "stdout does not show the effective configuration (socket {socket}, max connections \
         17):\n{stdout}"
    );
    assert!(
        !daemon.socket_path().exists(),
        "--check-config left a socket file"
    );
}

/// `--help` exits 0 and lists every configuration variable.
#[test]
fn help_lists_every_variable() {
    let finished = run(&[], &["--help"]);
    assert_eq!(finished.status.code(), Some(0), "{finished:?}");
    let missing: Vec<_> = VARIABLES
        .iter()
        .filter(|var| !finished.stdout.contains(*var))
        .collect();
    assert!(
        missing.is_empty(),
        "--help does not mention {missing:?}:\n{}",
        finished.stdout
    );
}

/// An unknown CGW_* variable (a typo) is warned about by name, and the daemon still starts.
#[test]
fn unknown_variable_is_warned_about() {
    let daemon = Daemon::start(&[("CGW_IPC_MAX_CONECTIONS", "5")]);
    ping(&mut daemon.connect());
    daemon.wait_stderr_contains("CGW_IPC_MAX_CONECTIONS", Duration::from_secs(5));
}

/// Watches for the socket file from the moment the daemon is spawned and returns the mode it
/// had when first seen, then waits until the daemon is ready.
fn mode_at_first_sight(daemon: &mut Daemon) -> u32 {
    let deadline = Instant::now() + START_TIMEOUT;
    let mode = loop {
        if let Ok(meta) = std::fs::symlink_metadata(daemon.socket_path()) {
            assert!(meta.file_type().is_socket(), "{:?}", meta.file_type());
            break meta.permissions().mode() & 0o777;
        }
        if let Some(status) = daemon.poll_exit() {
            panic!("exited ({status}) before creating its socket");
        }
        assert!(
            Instant::now() < deadline,
            "no socket file after {START_TIMEOUT:?}"
        );
        thread::yield_now();
    };
    daemon.wait_ready();
    mode
}

/// The socket file is 0600 by default, and already so the first time it can be seen (set at
/// bind, not by a chmod afterwards).
#[test]
fn socket_mode_defaults_to_0600_from_creation() {
    assert_socket_mode(&[], 0o600);
}

/// CGW_IPC_SOCKET_MODE=0660 gives a 0660 socket file, from creation.
#[test]
fn socket_mode_is_configurable() {
    assert_socket_mode(&[("CGW_IPC_SOCKET_MODE", "0660")], 0o660);
}

/// Starts a daemon with `env` and checks the socket file's mode at first sight and after.
fn assert_socket_mode(env: &[(&str, &str)], expected: u32) {
    let mut daemon = Daemon::spawn(env, &[]);
    let first = mode_at_first_sight(&mut daemon);
    let now = std::fs::metadata(daemon.socket_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        (first, now),
        (expected, expected),
        "modes {first:o} then {now:o}"
    );
}

/// A peer whose uid is not allowed (CGW_IPC_ALLOWED_UIDS=12345; the tests run as another uid)
/// gets error 9 and is closed.
#[test]
fn disallowed_uid_gets_error_9_and_is_closed() {
    let own_uid = rustix::process::getuid().as_raw();
    assert_ne!(own_uid, 12345, "the test needs a uid other than 12345");
    let daemon = Daemon::start(&[("CGW_IPC_ALLOWED_UIDS", "12345")]);
    let mut stream = daemon.connect();
    expect_error_code(&mut stream, 9);
    expect_closed(&mut stream);
}

/// Our own uid in a list, or `*`, lets the connection in.
#[test]
fn allowed_uids_admit_listed_uid_and_wildcard() {
    let own_uid = rustix::process::getuid().as_raw().to_string();
    let list = format!("12345,{own_uid}");
    for allowed in [own_uid.as_str(), list.as_str(), "*"] {
        let daemon = Daemon::start(&[("CGW_IPC_ALLOWED_UIDS", allowed)]);
        let mut stream = daemon.connect();
        ping(&mut stream);
        submit_echo(&mut stream, &json!({"allowed": allowed}));
    }
}

/// A socket path of exactly 107 bytes (the kernel limit) is accepted and served.
#[test]
fn socket_path_of_107_bytes_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_of_len(dir.path(), 107);
    let mut daemon = Daemon::spawn_at(Path::new(&path), &[], &[]);
    daemon.wait_ready();
    ping(&mut daemon.connect());
}
