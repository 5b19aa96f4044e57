//! Process lifecycle (gateway.md section 8, ipc-protocol.md sections 1 and 7): shutdown on
//! SIGTERM/SIGINT with drain, clients that vanish with requests in flight, a second instance
//! on the same path, a stale socket file, and the log format.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    expect_echo, expect_error_code, ping, recv, send_json, submit_echo, wait_until, Daemon,
    START_TIMEOUT,
};
use ipc_gateway_tests::frame::TASK_SUBMIT;
use rustix::process::Signal;
use serde_json::{json, Value};

fn submit(stream: &mut UnixStream, n: u64) {
    send_json(stream, TASK_SUBMIT, &json!({"n": n}));
}

/// Makes it (all but) certain the daemon has read what was written on other connections
/// before now: a PING round trip on a fresh connection. The daemon reads connections that
/// became readable earlier no later than this one.
fn barrier(daemon: &Daemon) {
    ping(&mut daemon.connect());
}

/// SIGTERM with 5 requests in flight (stub Router slowed to 2 s): the socket file is removed,
/// a request sent on the open connection after that gets error 6, the 5 get their normal
/// replies first (in order), and the process exits 0.
#[test]
fn sigterm_drains_requests_in_flight() {
    let mut daemon = Daemon::start(&[("CGW_IPC_STUB_DELAY_MS", "2000")]);
    let mut stream = daemon.connect();
    for n in 0..5 {
        submit(&mut stream, n);
    }
    barrier(&daemon);
    let signalled = Instant::now();
    daemon.terminate();
    let socket = daemon.socket_path().to_path_buf();
    wait_until("socket file removed after SIGTERM", START_TIMEOUT, || {
        !socket.exists()
    });
    submit(&mut stream, 5);
    let sent_late = signalled.elapsed();
    // A precondition, not a speed check: request 5 must reach a gateway still draining.
    assert!(
        sent_late < Duration::from_millis(1500),
        "request 5 was only sent {sent_late:?} after SIGTERM, too close to the 2 s replies"
    );
    for n in 0..5 {
        expect_echo(&recv(&mut stream), &json!({"n": n}));
    }
    expect_error_code(&mut stream, 6);
    daemon.expect_clean_exit();
}

/// SIGINT on an idle daemon: it removes the socket file and exits 0.
#[test]
fn sigint_exits_0_and_removes_socket() {
    let mut daemon = Daemon::start(&[]);
    ping(&mut daemon.connect());
    daemon.signal(Signal::INT);
    daemon.expect_clean_exit();
}

/// A request still in flight when the drain timeout (300 ms) ends gets error 6, and the
/// process exits 0 without waiting for the (5 s) stub Router.
#[test]
fn drain_timeout_answers_leftovers_with_error_6() {
    let mut daemon = Daemon::start(&[
        ("CGW_IPC_DRAIN_MS", "300"),
        ("CGW_IPC_STUB_DELAY_MS", "5000"),
    ]);
    let mut stream = daemon.connect();
    submit(&mut stream, 0);
    barrier(&daemon);
    daemon.terminate();
    expect_error_code(&mut stream, 6);
    let status = daemon.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(0), "exit status after drain: {status}");
}

/// A second signal during the drain exits at once: with a request held 20 s by the stub and a
/// 30 s drain, the process is gone within 5 s of the second SIGTERM.
#[test]
fn second_signal_exits_at_once() {
    let mut daemon = Daemon::start(&[
        ("CGW_IPC_DRAIN_MS", "30000"),
        ("CGW_IPC_STUB_DELAY_MS", "20000"),
    ]);
    let mut stream = daemon.connect();
    submit(&mut stream, 0);
    barrier(&daemon);
    daemon.terminate();
    let socket = daemon.socket_path().to_path_buf();
    wait_until("socket file removed after SIGTERM", START_TIMEOUT, || {
        !socket.exists()
    });
    assert!(daemon.is_running(), "exited before the drain was over");
    daemon.terminate();
    daemon.wait_exit(Duration::from_secs(5));
}

/// Clients that disconnect with requests in flight cost nothing later (ipc-protocol.md 7): one
/// sends 10 requests and closes at once, another sends 25 (more than the per-connection limit
/// of 10, so the gateway has stopped reading it) and closes. Once their stub replies are due
/// (four 300 ms rounds), the process is alive and another connection is served.
#[test]
fn clients_vanishing_with_requests_in_flight_cost_nothing() {
    let mut daemon = Daemon::start(&[("CGW_IPC_STUB_DELAY_MS", "300")]);
    for count in [10, 25] {
        let mut gone = daemon.connect();
        for n in 0..count {
            submit(&mut gone, n);
        }
        drop(gone);
    }
    let mut other = daemon.connect();
    ping(&mut other);
    for round in 0..4 {
        submit_echo(&mut other, &json!({"round": round}));
    }
    assert!(daemon.is_running(), "the daemon died");
    ping(&mut other);
    ping(&mut daemon.connect());
}

/// A second daemon on the path of a live one refuses to start (exit 1, "another gateway is
/// listening") and leaves the first one's socket alone: the first keeps serving new
/// connections.
#[test]
fn second_instance_on_live_socket_is_refused() {
    let first = Daemon::start(&[]);
    let mut second = Daemon::spawn_at(first.socket_path(), &[], &[]);
    let status = second.wait_exit(START_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(1),
        "second instance: {status}; stderr:\n{}",
        second.stderr()
    );
    assert!(
        second.stderr().contains("another gateway is listening"),
        "second instance stderr:\n{}",
        second.stderr()
    );
    assert!(
        first.socket_path().exists(),
        "the first one's socket file was removed"
    );
    let mut stream = first.connect();
    ping(&mut stream);
    submit_echo(&mut stream, &json!({"first": "still serving"}));
}

/// A stale socket file (nobody listens on it) is replaced: the daemon starts, serves, and the
/// new socket file has mode 0600.
#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(
        path.exists(),
        "the stale socket file should stay after the listener is dropped"
    );
    let mut daemon = Daemon::spawn_at(&path, &[], &[]);
    daemon.wait_ready();
    let mut stream = daemon.connect();
    ping(&mut stream);
    submit_echo(&mut stream, &json!({"stale": "replaced"}));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode of the replacement socket: {mode:o}");
}

/// Logs are JSON Lines on stderr: after a start, a request and a SIGTERM shutdown, every line
/// the daemon wrote there is a JSON object, and there is at least one.
#[test]
fn stderr_is_json_lines() {
    let mut daemon = Daemon::start(&[]);
    submit_echo(&mut daemon.connect(), &json!({"log": "me"}));
    daemon.terminate();
    let status = daemon.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{status}");
    let stderr = daemon.stderr();
    let mut lines = 0;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(
            value.is_object(),
            "stderr line is not a JSON object: {line}"
        );
        lines += 1;
    }
    assert!(lines > 0, "no log lines at all on stderr");
}
