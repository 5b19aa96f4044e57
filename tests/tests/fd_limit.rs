//! The daemon raises its own open-file limit (RLIMIT_NOFILE) from the soft to the hard limit
//! at start and logs it: a service manager's soft limit (often 1024) must not cap
//! `CGW_IPC_MAX_CONNECTIONS` when the hard limit allows more.

use std::os::unix::net::UnixStream;

use ipc_gateway_tests::daemon::{self, Daemon};
use ipc_gateway_tests::frame::PING;
use ipc_gateway_tests::nats_load::fd_count;
use rustix::process::{getrlimit, Resource};
use serde_json::Value;

/// The soft limit the daemon is started with.
const LOW_SOFT: u64 = 64;
/// Clients held at once: well past the old soft limit.
const CLIENTS: u64 = 3 * LOW_SOFT;

/// The daemon's `fd_limit` log line, parsed.
fn fd_limit_line(daemon: &Daemon) -> Value {
    // The log reaches us through a pipe drained by another thread: the daemon's socket may
    // accept before the line written ahead of it has been read here (seen under a CPU hog).
    daemon.wait_stderr_contains(r#""event":"fd_limit""#, daemon::START_TIMEOUT);
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains(r#""event":"fd_limit""#))
        .unwrap_or_else(|| panic!("no fd_limit line in the daemon's log:\n{stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("fd_limit line is not JSON ({e}): {line}"))
}

/// The soft `Max open files` of a process, from /proc/PID/limits.
fn soft_nofile_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable limits line: {line}"))
}

#[test]
fn soft_fd_limit_is_raised_to_the_hard_limit_and_logged() {
    let hard = getrlimit(Resource::Nofile)
        .maximum
        .expect("a finite hard RLIMIT_NOFILE (Linux has no unlimited one)");
    assert!(
        hard >= CLIENTS + 64,
        "the hard open-file limit {hard} is too low for this test (needs {})",
        CLIENTS + 64
    );
    let daemon = Daemon::start_with_soft_fd_limit(
        LOW_SOFT,
        &[("CGW_IPC_MAX_CONNECTIONS", &(CLIENTS + 16).to_string())],
    );

    let line = fd_limit_line(&daemon);
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["old"], LOW_SOFT, "{line}");
    assert_eq!(line["new"], hard, "{line}");
    assert_eq!(line["hard"], hard, "{line}");
    assert_eq!(soft_nofile_of(daemon.pid()), hard);

    // More clients than the old soft limit has descriptors, every one served.
    let mut clients: Vec<UnixStream> = (0..CLIENTS).map(|_| daemon.connect()).collect();
    for client in &mut clients {
        daemon::ping(client);
    }
    let open = fd_count(daemon.pid()) as u64;
    assert!(
        open > LOW_SOFT + CLIENTS / 2,
        "the daemon holds {open} descriptors with {CLIENTS} clients"
    );
    assert!(
        !daemon.stderr().contains("accept failed"),
        "{}",
        daemon.stderr()
    );
    // And the first client is still in step after all the others.
    daemon::send(&mut clients[0], PING, b"");
    daemon::expect_pong(&mut clients[0]);
}

/// A soft limit already at the hard limit is left alone, and said so.
#[test]
fn fd_limit_already_at_the_hard_limit_is_left_alone() {
    // `ulimit -n` sets both limits.
    let daemon = Daemon::start_with_fd_limit(256, &[]);
    let line = fd_limit_line(&daemon);
    assert_eq!(
        (&line["old"], &line["new"], &line["hard"]),
        (&256.into(), &256.into(), &256.into()),
        "{line}"
    );
    assert_eq!(soft_nofile_of(daemon.pid()), 256);
}
