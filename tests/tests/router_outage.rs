//! The Router away and the Router failing, with NATS up (gateway.md section 4): a real
//! nats-server, the Router double (src/router_double.rs), the daemon in NATS mode with the
//! default breaker settings, and client load throughout.
//!
//! - The Router restarted (killed, back 5 s later): while it is away every request gets
//!   error 8 at once (no responders), which is not a Router failure, so the breaker stays
//!   Closed and the first request after the Router subscribes again succeeds, within 1 s.
//! - A Router that really fails (takes requests and lets them time out) opens the breaker;
//!   once it answers again, the breaker closes within its open duration plus two probes.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{recv, send_json, wait_until};
use ipc_gateway_tests::frame::TASK_SUBMIT;
use ipc_gateway_tests::nats_load::{
    check_all_ok_sent_after, check_outcomes_and_deadlines, router_double_success,
    start_nats_daemon, stats, summary, Load, Outcome,
};
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use serde_json::{json, Value};

/// How late after its deadline a reply may come (scheduling slack on a loaded 2-core machine).
const LATE_SLACK: Duration = Duration::from_secs(1);
/// Generous bound for things that normally take milliseconds.
const WITHIN: Duration = Duration::from_secs(20);
/// The breaker's default open duration (gateway.md section 4).
const DEFAULT_OPEN: Duration = Duration::from_secs(5);

/// The Router killed and back after 5 s: error 8 at once while it is away, the breaker never
/// opens, and everything sent after it subscribed again succeeds, the first within 1 s.
#[test]
fn router_restart_costs_only_its_own_gap() {
    const TIMEOUT_MS: u64 = 4000;
    const GAP: Duration = Duration::from_secs(5);
    const FIRST_SUCCESS_WITHIN: Duration = Duration::from_secs(1);
    let server = NatsServer::start();
    let mut double = RouterDouble::start(&server.url());
    let daemon = start_nats_daemon(&server.url(), TIMEOUT_MS);
    // A short pause per reply: while the Router is away replies come at once, and the load
    // should not spin.
    let load = Load::start(
        &daemon,
        4,
        4,
        Duration::from_millis(2),
        |c, n| json!({"task_type": "router_restart", "client": c, "n": n}),
        router_double_success(),
    );
    load.wait_more_oks(100, WITHIN);

    let killed_at = Instant::now();
    double.kill();
    // The Router's absence itself. The load above is closed-loop and the Router is its
    // slowest link, so at the kill every window may be full of requests the Router took with
    // it: then no client sends anything until those time out, and the gateway, never told
    // that the Router is gone, rightly counts them as a silent Router (one run in five under
    // a CPU hog). IDE clients do not wait for each other: open-loop requests, one per fresh
    // connection every 100 ms, keep asking during the gap, as they would.
    let mut asked_in_gap: Vec<(Instant, UnixStream)> = Vec::new();
    while killed_at.elapsed() < GAP {
        let mut stream = daemon.connect();
        let n = asked_in_gap.len();
        send_json(
            &mut stream,
            TASK_SUBMIT,
            &json!({"task_type": "router_restart", "gap": n}),
        );
        asked_in_gap.push((Instant::now(), stream));
        thread::sleep(Duration::from_millis(100));
    }
    let double = RouterDouble::start(&server.url());
    // start() returns once the double has subscribed and flushed: the server routes to it.
    let subscribed_at = Instant::now();
    let first_ok = load.wait_ok_after(subscribed_at, WITHIN);
    load.wait_more_oks(100, WITHIN);
    let records = load.stop();
    // The open-loop requests: those the Router took with it time out (5), the rest get no
    // responders (8) at once.
    let gap_codes: Vec<u64> = asked_in_gap
        .iter_mut()
        .map(|(_, stream)| recv(stream).error_code().unwrap_or(0))
        .collect();
    assert!(
        gap_codes.iter().all(|&c| c == 5 || c == 8) && gap_codes.contains(&8),
        "requests sent while the Router was away: {gap_codes:?}"
    );

    eprintln!(
        "{}; first success {:?} after the Router subscribed again",
        summary(&records),
        first_ok - subscribed_at
    );
    check_outcomes_and_deadlines(&records, Duration::from_millis(TIMEOUT_MS) + LATE_SLACK);
    let away: Vec<_> = records
        .iter()
        .filter(|r| r.sent >= killed_at + Duration::from_secs(1) && r.answered < subscribed_at)
        .collect();
    assert!(
        away.len() >= 10,
        "only {} requests while the Router was away",
        away.len()
    );
    let not_no_responders = away.iter().find(|r| r.outcome != Outcome::Error(8));
    assert!(
        not_no_responders.is_none(),
        "while the Router was away every request gets error 8: {not_no_responders:?}"
    );
    // No responders is answered by the server at once, not at the deadline.
    let slow = away
        .iter()
        .find(|r| r.latency() > Duration::from_millis(TIMEOUT_MS / 2));
    assert!(
        slow.is_none(),
        "a no-responders error took half the deadline: {slow:?}"
    );
    assert!(
        first_ok <= subscribed_at + FIRST_SUCCESS_WITHIN,
        "first success {:?} after the Router subscribed again (at most \
         {FIRST_SUCCESS_WITHIN:?})",
        first_ok - subscribed_at
    );
    check_all_ok_sent_after(&records, subscribed_at, "the Router subscribed again");
    let last = stats(&daemon);
    assert_eq!(last["breaker"], json!("closed"), "stats: {last}");
    assert!(
        last["no_responders"].as_u64().unwrap_or(0) >= away.len() as u64,
        "stats: {last}"
    );
    drop(double);
}

/// A Router that takes requests and lets them time out opens the breaker (error 8 at once
/// from then on); once it answers again, the breaker closes within its open duration plus two
/// probe round trips.
#[test]
fn failing_router_opens_the_breaker_which_closes_once_it_answers() {
    const TIMEOUT_MS: u64 = 1000;
    /// Two probes' round trips and the test's own polling, on a loaded machine.
    const PROBES_SLACK: Duration = Duration::from_secs(2);
    let server = NatsServer::start();
    let _double = RouterDouble::start(&server.url());
    let daemon = start_nats_daemon(&server.url(), TIMEOUT_MS);
    let silent = Arc::new(AtomicBool::new(false));
    let payload = {
        let silent = Arc::clone(&silent);
        move |c: usize, n: u64| -> Value {
            if silent.load(Ordering::SeqCst) {
                json!({"task_type": "failing_router", "client": c, "n": n, "double": "silent"})
            } else {
                json!({"task_type": "failing_router", "client": c, "n": n})
            }
        }
    };
    let load = Load::start(
        &daemon,
        2,
        4,
        Duration::from_millis(5),
        payload,
        router_double_success(),
    );
    load.wait_more_oks(50, WITHIN);

    silent.store(true, Ordering::SeqCst);
    let mut last = Value::Null;
    wait_until("the breaker opens on Router timeouts", WITHIN, || {
        last = stats(&daemon);
        last["breaker"] == json!("open")
    });
    let answers_again_at = Instant::now();
    silent.store(false, Ordering::SeqCst);
    wait_until(
        "the breaker closes once the Router answers again",
        DEFAULT_OPEN + WITHIN,
        || {
            last = stats(&daemon);
            last["breaker"] == json!("closed")
        },
    );
    let closed_within = answers_again_at.elapsed();
    load.wait_more_oks(50, WITHIN);
    let records = load.stop();

    eprintln!(
        "{}; breaker closed {closed_within:?} after the Router answered again; stats: {last}",
        summary(&records)
    );
    check_outcomes_and_deadlines(&records, Duration::from_millis(TIMEOUT_MS) + LATE_SLACK);
    let timeouts = records
        .iter()
        .filter(|r| r.outcome == Outcome::Error(5))
        .count();
    assert!(timeouts >= 5, "only {timeouts} Router timeouts");
    let refused_while_open = records
        .iter()
        .filter(|r| {
            r.outcome == Outcome::Error(8)
                && r.sent > answers_again_at - Duration::from_millis(500)
                && r.latency() < Duration::from_millis(TIMEOUT_MS / 2)
        })
        .count();
    assert!(
        refused_while_open > 0,
        "no request was refused at once while the breaker was open"
    );
    assert!(
        closed_within <= DEFAULT_OPEN + PROBES_SLACK,
        "the breaker closed {closed_within:?} after the Router answered again (at most the \
         open duration {DEFAULT_OPEN:?} plus two probes, {PROBES_SLACK:?})"
    );
}
