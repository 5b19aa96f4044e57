//! A NATS URL with a host name, black box: the name goes through the daemon's resolver
//! thread (runtime/src/handoff.rs, model-checked with loom) and the loop connects to what it
//! answers. Every other NATS test uses IP literals, which skip the resolver.

use std::time::Duration;

use ipc_gateway_tests::daemon::{ping, recv, send_json, wait_until, Daemon};
use ipc_gateway_tests::frame::{RESPONSE_OK, TASK_SUBMIT};
use ipc_gateway_tests::nats_load::stats;
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use serde_json::{json, Value};

/// Generous bound for things that should take milliseconds (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(10);

/// Starts the daemon against `url`, waits for the connection, and checks a request gets the
/// Router double's reply through it.
fn connects_and_serves(url: &str, double: &RouterDouble) -> Daemon {
    let daemon = Daemon::start(&[("CGW_IPC_NATS_ENABLE", "1"), ("CGW_IPC_NATS_URL", url)]);
    daemon.wait_stderr_contains(r#""event":"nats_connected""#, WAIT);
    let mut client = daemon.connect();
    let payload = json!({"task_type": "resolve_test", "n": 1});
    send_json(&mut client, TASK_SUBMIT, &payload);
    let frame = recv(&mut client);
    assert_eq!(
        frame.kind,
        RESPONSE_OK,
        "{frame:?}: {}",
        String::from_utf8_lossy(&frame.payload)
    );
    let reply: Value = serde_json::from_slice(&frame.payload).expect("the reply is JSON");
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(
        reply["received"]["request"]["task"]["payload"], payload,
        "{reply}"
    );
    assert_eq!(double.wait_requests(1, WAIT).len(), 1);
    daemon
}

#[test]
fn a_host_name_url_is_resolved_and_served() {
    let server = NatsServer::start();
    let double = RouterDouble::start(&server.url());
    let url = format!("nats://localhost:{}", server.port());
    let daemon = connects_and_serves(&url, &double);
    let s = stats(&daemon);
    assert!(
        s["nats_server"]
            .as_str()
            .is_some_and(|u| u.contains("localhost")),
        "connected through the configured name: {s}"
    );
}

/// A name that does not resolve (`.invalid` is reserved, RFC 6761) is reported and tried
/// again on the session's backoff, each time a new request and answer through the hand-off,
/// while the loop goes on serving its clients.
#[test]
fn an_unresolvable_name_is_retried_while_the_loop_serves() {
    let port = ipc_gateway_tests::nats_server::free_port();
    let url = format!("nats://ipc-gateway-test.invalid:{port}");
    let daemon = Daemon::start(&[("CGW_IPC_NATS_ENABLE", "1"), ("CGW_IPC_NATS_URL", &url)]);
    let mut client = daemon.connect();
    wait_until("three failed resolutions", WAIT, || {
        ping(&mut client);
        daemon
            .stderr()
            .matches(r#""event":"nats_resolve_failed""#)
            .count()
            >= 3
    });
    assert!(!daemon.stderr().contains(r#""event":"nats_connected""#));
}
