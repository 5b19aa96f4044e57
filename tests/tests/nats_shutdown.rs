//! Shutdown in NATS mode, end to end (gateway.md section 8): SIGTERM with requests in flight
//! to a slow Router. Each in-flight request gets its reply, or error 6 at the drain deadline;
//! new requests get error 6; the NATS connection is flushed and closed, as the server itself
//! reports it (nats-server's monitoring `/connz`); the process exits 0 and the socket file is
//! gone.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    expect_error_code, ping, recv, send_json, wait_until, Daemon, START_TIMEOUT,
};
use ipc_gateway_tests::frame::{RESPONSE_OK, TASK_SUBMIT};
use ipc_gateway_tests::nats_load::{nats_connected_count, router_double_success};
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use serde_json::{json, Value};

/// The drain timeout the test sets: long enough for the fast replies, short for the slow.
const DRAIN: Duration = Duration::from_millis(1500);
/// The Router's delay for the requests that finish during the drain.
const FAST_MS: u64 = 300;
/// The Router's delay for the requests still in flight at the drain deadline.
const SLOW_MS: u64 = 20_000;
/// How late after the drain deadline error 6 may come (scheduling slack on a loaded machine).
const LATE_SLACK: Duration = Duration::from_secs(1);

fn task(n: u64, delay_ms: u64) -> Value {
    json!({"task_type": "shutdown_test", "n": n, "double": {"slow_ms": delay_ms}})
}

/// The gateway's connections in a `/connz` answer.
fn gateway_connections(connz: &Value) -> Vec<Value> {
    connz["connections"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|c| {
                    c["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("ipc-gateway"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_in_nats_mode_drains_then_flushes_and_closes_the_nats_connection() {
    let server = NatsServer::start_monitored();
    let double = RouterDouble::start(&server.url());
    let drain_ms = DRAIN.as_millis().to_string();
    let url = server.url();
    let mut daemon = Daemon::start(&[
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", &url),
        ("CGW_IPC_DRAIN_MS", &drain_ms),
    ]);
    wait_until("the daemon connects to NATS", START_TIMEOUT, || {
        nats_connected_count(&daemon) >= 1
    });
    let open = gateway_connections(&server.connz(""));
    assert_eq!(open.len(), 1, "the gateway's NATS connections: {open:?}");
    let cid = open[0]["cid"].clone();

    // Requests on two connections, so the fast ones' replies are not queued behind the slow.
    let mut fast: UnixStream = daemon.connect();
    let mut slow: UnixStream = daemon.connect();
    let mut late: UnixStream = daemon.connect();
    ping(&mut late);
    for n in 0..3 {
        send_json(&mut fast, TASK_SUBMIT, &task(n, FAST_MS));
    }
    for n in 3..5 {
        send_json(&mut slow, TASK_SUBMIT, &task(n, SLOW_MS));
    }
    // All five are at the Router: in flight for real when the signal comes.
    double.wait_requests(5, START_TIMEOUT);

    let signalled = Instant::now();
    daemon.terminate();
    let socket = daemon.socket_path().to_path_buf();
    wait_until("socket file removed after SIGTERM", START_TIMEOUT, || {
        !socket.exists()
    });
    send_json(&mut late, TASK_SUBMIT, &task(5, FAST_MS));
    let refused = expect_error_code(&mut late, 6);
    assert!(
        signalled.elapsed() < DRAIN,
        "the new request was refused only after the drain deadline: {refused}"
    );

    let check = router_double_success();
    for n in 0..3 {
        let frame = recv(&mut fast);
        assert_eq!(frame.kind, RESPONSE_OK, "request {n}: {frame:?}");
        check(&task(n, FAST_MS), &frame.json())
            .unwrap_or_else(|e| panic!("request {n}: {e}: {}", frame.json()));
    }
    for n in 3..5 {
        let error = expect_error_code(&mut slow, 6);
        let at = signalled.elapsed();
        assert!(
            at + Duration::from_millis(100) >= DRAIN && at <= DRAIN + LATE_SLACK,
            "request {n}: error 6 {at:?} after SIGTERM, the drain deadline is {DRAIN:?}: {error}"
        );
    }
    daemon.expect_clean_exit();

    // The server's view: the gateway's one connection is closed by the client, and every
    // request the gateway published reached it (flushed before the close).
    let mut closed = Vec::new();
    wait_until(
        "nats-server lists the gateway's connection as closed",
        START_TIMEOUT,
        || {
            closed = gateway_connections(&server.connz("state=closed"));
            !closed.is_empty()
        },
    );
    assert_eq!(closed.len(), 1, "closed gateway connections: {closed:?}");
    let conn = &closed[0];
    assert_eq!(conn["cid"], cid, "{conn}");
    assert_eq!(conn["reason"], json!("Client Closed"), "{conn}");
    assert_eq!(conn["in_msgs"], json!(5), "requests published: {conn}");
    assert!(
        gateway_connections(&server.connz("")).is_empty(),
        "the gateway still has an open NATS connection"
    );
    let log = daemon.stderr();
    assert!(log.contains("\"event\":\"nats_closed\""), "{log}");
}
