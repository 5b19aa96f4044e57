//! The NATS server killed or frozen under load (gateway.md sections 1, 2 and 4): a real
//! nats-server, the Router double (src/router_double.rs) on it, the daemon in NATS mode with
//! its default settings but a 4 s request deadline, and pipelined clients throughout.
//!
//! - A kill with SIGKILL (no lame duck, no goodbye) and a restart 2 s, 15 s or (with
//!   `CGW_LONG_TESTS=1`) 60 s later: every request gets exactly one reply, OK, 5 (its deadline
//!   passed while the server was away) or 8 (it was on the wire when the connection dropped),
//!   none later than its deadline + 1 s; the first success comes within 2.5 s of the server
//!   accepting connections again (gateway.md: a server that returns is used within 2 s, the
//!   longest backoff, plus the handshake), and every request sent after it succeeds. The
//!   breaker keeps its defaults: the requests lost at the kill and those that time out in the
//!   reconnect buffer are the link's failures, not the Router's, and must not keep users out
//!   after the server is back (section 4). The 4 s deadline makes the longer outages time
//!   requests out in the reconnect buffer, the case that used to open the breaker.
//! - SIGSTOP of the server for 10 s with the default 30 s deadline: every request is answered
//!   by its deadline, and PINGs to the daemon stay fast while it waits.
//! - Twenty kill/restart cycles: afterwards, with traffic stopped, the daemon's open file
//!   descriptors are exactly what they were and its RSS is back near where it was; nothing is
//!   left in flight.

use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{peak_rss_kb, ping, rss_kb, wait_until, Daemon};
use ipc_gateway_tests::nats_load::{
    check_all_ok_sent_after, check_outcomes_and_deadlines, fd_count, fd_listing,
    nats_connected_count, router_double_success, start_nats_daemon, stats, summary, Load, Outcome,
};
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use rustix::process::Signal;
use serde_json::{json, Value};

/// The request deadline. Longer than the outage, so a request buffered while the server is
/// away may still succeed; short enough that the deadline bound below means something.
const TIMEOUT_MS: u64 = 4000;
/// How late after its deadline a reply may come (scheduling slack on a loaded 2-core machine).
const LATE_SLACK: Duration = Duration::from_secs(1);
/// The outage of the measured kill (the scenario).
const OUTAGE: Duration = Duration::from_secs(2);
/// The first success after the server is back, at the latest: the longest backoff (2 s) plus
/// the handshake and a round trip.
const FIRST_SUCCESS_WITHIN: Duration = Duration::from_millis(2500);
/// Generous bound for things that normally take milliseconds.
const WITHIN: Duration = Duration::from_secs(20);

fn start_daemon(server: &NatsServer) -> Daemon {
    start_nats_daemon(&server.url(), TIMEOUT_MS)
}

/// `clients` connections with 8 requests each in flight, as fast as replies come, each reply
/// checked against its request.
fn pipelined_load(daemon: &Daemon, clients: usize) -> Load {
    Load::start(
        daemon,
        clients,
        8,
        Duration::ZERO,
        payload,
        router_double_success(),
    )
}

fn payload(client: usize, n: u64) -> Value {
    json!({"task_type": "restart_test", "client": client, "n": n})
}

/// Waits until traffic is over and the daemon holds nothing: no client connection, nothing
/// in flight, nothing waiting for NATS or in its reconnect buffer, connected. Returns the
/// last stats line.
fn wait_settled(daemon: &Daemon) -> Value {
    let mut last = Value::Null;
    wait_until(
        "the daemon settles (no connection, nothing in flight, connected)",
        WITHIN,
        || {
            last = stats(daemon);
            last["connections"] == json!(0)
                && last["inflight"] == json!(0)
                && last["upstream_pending"] == json!(0)
                && last["reconnect_buffer_bytes"] == json!(0)
                && last["nats_state"] == json!("connected")
        },
    );
    last
}

/// SIGKILL under load (8 pipelined clients), restart after 2 s.
#[test]
fn sigkill_under_load_then_restart_after_two_seconds() {
    kill_under_load_then_restart(OUTAGE);
}

/// The same after 15 s: requests wait in the reconnect buffer until their deadline, which
/// must not open the breaker either.
#[test]
fn sigkill_under_load_then_restart_after_fifteen_seconds() {
    kill_under_load_then_restart(Duration::from_secs(15));
}

/// The same after 60 s, in the long suite only (`CGW_LONG_TESTS=1`): a minute of outage
/// would double the default run's longest test.
#[test]
fn sigkill_under_load_then_restart_after_sixty_seconds() {
    if std::env::var("CGW_LONG_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: the 60 s outage runs with CGW_LONG_TESTS=1 tests/run-all.sh");
        return;
    }
    kill_under_load_then_restart(Duration::from_secs(60));
}

/// Kills nats-server under pipelined load, restarts it after `outage` and checks every reply,
/// the recovery time, and that nothing after the recovery is turned away.
fn kill_under_load_then_restart(outage: Duration) {
    let mut server = NatsServer::start();
    let _double = RouterDouble::start(&server.url());
    let daemon = start_daemon(&server);
    let load = pipelined_load(&daemon, 8);
    load.wait_more_oks(200, WITHIN);

    let killed_at = Instant::now();
    server.kill();
    // The outage itself: the scenario, not a wait for a condition.
    thread::sleep(outage);
    let restart_begun = Instant::now();
    server.restart();
    // restart() returns once the server answers a client with INFO: it is accepting.
    let back_at = Instant::now();
    let first_ok = load.wait_ok_after(restart_begun, WITHIN);
    load.wait_more_oks(200, WITHIN);
    let records = load.stop();

    eprintln!(
        "outage {outage:?}: {}; first success {:?} after the server accepted again (restart \
         took {:?})",
        summary(&records),
        first_ok.saturating_duration_since(back_at),
        back_at - restart_begun
    );
    check_outcomes_and_deadlines(&records, Duration::from_millis(TIMEOUT_MS) + LATE_SLACK);
    // The kill really cut the Router off: no success from 1 s after the kill (replies read by
    // the daemon just before it may still be on their way to the clients) until the restart.
    let during = records.iter().find(|r| {
        r.outcome == Outcome::Ok
            && r.answered >= killed_at + Duration::from_secs(1)
            && r.answered < restart_begun
    });
    assert!(
        during.is_none(),
        "a success while nats-server was down: {during:?}"
    );
    // 64 requests are outstanding at all times and the Router double is the slowest link, so
    // some were written to the killed server and are waiting for a reply: they fail at once
    // with error 8 (gateway.md section 2), they are neither sent again after the reconnect
    // (they would succeed) nor left to their deadline (error 5).
    let on_the_wire = records
        .iter()
        .filter(|r| r.outcome == Outcome::Error(8) && r.sent < killed_at)
        .count();
    assert!(
        on_the_wire > 0,
        "no request sent before the kill got error 8: were the requests on the wire sent \
         again, or left to time out?"
    );
    if outage + Duration::from_secs(1) < Duration::from_millis(TIMEOUT_MS) {
        // A request sent before the kill and not yet written waits in the reconnect buffer
        // and is sent once the server is back, well within its deadline.
        let timed_out = records
            .iter()
            .find(|r| r.outcome == Outcome::Error(5) && r.sent < killed_at);
        assert!(
            timed_out.is_none(),
            "a request sent before the kill timed out instead of failing at once with error 8 \
             or succeeding after the restart: {timed_out:?}"
        );
    } else {
        // The outage outlasted the deadline: requests waited in the reconnect buffer until
        // it passed. These, with the ones lost at the kill, used to open the breaker.
        let buffered_out = records
            .iter()
            .filter(|r| r.outcome == Outcome::Error(5))
            .count();
        assert!(
            buffered_out >= 5,
            "only {buffered_out} requests timed out during a {outage:?} outage with a \
             {TIMEOUT_MS} ms deadline"
        );
    }
    assert!(
        first_ok <= back_at + FIRST_SUCCESS_WITHIN,
        "first success {:?} after nats-server accepted connections again (at most \
         {FIRST_SUCCESS_WITHIN:?})",
        first_ok - back_at
    );
    // Recovered means recovered: nothing sent after the first success is turned away.
    check_all_ok_sent_after(&records, first_ok, "the first success");
    let last = wait_settled(&daemon);
    assert_eq!(last["reconnects"], json!(1), "stats: {last}");
    assert_eq!(last["breaker"], json!("closed"), "stats: {last}");
}

/// nats-server frozen with SIGSTOP for 10 s under load, with the default 30 s deadline: the
/// requests it holds wait for it and are answered after SIGCONT, every one by its deadline,
/// and the daemon answers PINGs at once the whole time (it never waits on NATS).
#[test]
fn sigstop_for_ten_seconds_answers_everything_by_its_deadline() {
    const DEFAULT_TIMEOUT_MS: u64 = 30_000;
    const FROZEN: Duration = Duration::from_secs(10);
    /// A PING answered later than this means the daemon waited on something.
    const PING_BOUND: Duration = Duration::from_millis(500);
    let server = NatsServer::start();
    let _double = RouterDouble::start(&server.url());
    let daemon = start_nats_daemon(&server.url(), DEFAULT_TIMEOUT_MS);
    let load = pipelined_load(&daemon, 4);
    load.wait_more_oks(200, WITHIN);

    let mut pinger = daemon.connect();
    let stopped_at = Instant::now();
    server.signal(Signal::STOP).unwrap();
    let mut slowest_ping = Duration::ZERO;
    while stopped_at.elapsed() < FROZEN {
        let t = Instant::now();
        ping(&mut pinger);
        slowest_ping = slowest_ping.max(t.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    drop(pinger);
    let resumed_at = Instant::now();
    server.signal(Signal::CONT).unwrap();
    load.wait_ok_after(resumed_at, WITHIN);
    load.wait_more_oks(200, WITHIN);
    let records = load.stop();

    eprintln!(
        "{}; slowest PING while nats-server was stopped: {slowest_ping:?}",
        summary(&records)
    );
    check_outcomes_and_deadlines(
        &records,
        Duration::from_millis(DEFAULT_TIMEOUT_MS) + LATE_SLACK,
    );
    let frozen_oks = records
        .iter()
        .filter(|r| {
            r.outcome == Outcome::Ok
                && r.answered >= stopped_at + Duration::from_secs(1)
                && r.answered < resumed_at
        })
        .count();
    assert_eq!(frozen_oks, 0, "successes while nats-server was stopped");
    assert!(
        slowest_ping <= PING_BOUND,
        "a PING took {slowest_ping:?} while nats-server was stopped (bound {PING_BOUND:?})"
    );
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.outcome != Outcome::Ok)
        .collect();
    assert!(
        failed.is_empty(),
        "a 10 s freeze is shorter than the deadline and the keepalive: nothing should fail, \
         but {} did, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let last = wait_settled(&daemon);
    assert_eq!(last["reconnects"], json!(0), "stats: {last}");
}

/// Twenty kill/restart cycles under light load, then everything is back where it was.
///
/// The 2 s gap of the issue is the measured case above; here the server comes back after
/// 300 ms so that twenty cycles fit in well under a minute. The gateway still finds it gone
/// on its immediate attempt and goes through its backoff each time.
#[test]
fn twenty_kill_restart_cycles_leak_nothing() {
    const CYCLES: u64 = 20;
    const GAP: Duration = Duration::from_millis(300);
    let mut server = NatsServer::start();
    let _double = RouterDouble::start(&server.url());
    let daemon = start_daemon(&server);
    let pid = daemon.pid();

    // Each cycle: traffic flows, kill, restart after GAP, the daemon connects again.
    let cycle = |server: &mut NatsServer, load: &Load| {
        load.wait_more_oks(20, WITHIN);
        let connections = nats_connected_count(&daemon);
        server.kill();
        thread::sleep(GAP);
        server.restart();
        wait_until(
            "the daemon connects to the restarted server",
            WITHIN,
            || nats_connected_count(&daemon) > connections,
        );
    };
    let light_load = || {
        Load::start(
            &daemon,
            2,
            4,
            Duration::from_millis(10),
            payload,
            router_double_success(),
        )
    };

    // Warm up, one cycle included, so the baseline has every buffer and table the cycles
    // use at their working size.
    let load = light_load();
    cycle(&mut server, &load);
    load.wait_more_oks(20, WITHIN);
    let mut records = load.stop();
    wait_settled(&daemon);
    let fds_before = fd_count(pid);
    let rss_before = rss_kb(pid);
    let fd_listing_before = fd_listing(pid);

    let load = light_load();
    for _ in 0..CYCLES {
        cycle(&mut server, &load);
    }
    load.wait_more_oks(20, WITHIN);
    records.extend(load.stop());
    let last = wait_settled(&daemon);

    eprintln!("{}", summary(&records));
    check_outcomes_and_deadlines(&records, Duration::from_millis(TIMEOUT_MS) + LATE_SLACK);
    assert_eq!(
        last["reconnects"],
        json!(CYCLES + 1),
        "one reconnect per cycle; stats: {last}"
    );
    // Closing a client or a NATS socket is asynchronous in the daemon: wait for the count to
    // come back before judging it.
    let fds_settled = (0..200).any(|_| {
        thread::sleep(Duration::from_millis(10));
        fd_count(pid) == fds_before
    });
    assert!(
        fds_settled,
        "open fds {} after {CYCLES} cycles, {fds_before} before\nbefore:\n{fd_listing_before}\n\
         after:\n{}",
        fd_count(pid),
        fd_listing(pid)
    );
    let rss_after = rss_kb(pid);
    let allowed = rss_before + (rss_before / 4).max(2048);
    eprintln!(
        "fds {fds_before} → {}; RSS {rss_before} kB → {rss_after} kB (peak {} kB)",
        fd_count(pid),
        peak_rss_kb(pid)
    );
    assert!(
        rss_after <= allowed,
        "RSS {rss_after} kB after {CYCLES} cycles, {rss_before} kB before (allowed {allowed} kB)"
    );
}
