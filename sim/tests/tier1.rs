//! Tier-1 scenarios (a)–(h) of the simulation issue and the shutdown scenarios (i)–(k), each
//! over a sweep of seeds.
//!
//! Every run checks the invariants of gateway.md section 1 (exactly one reply per request in
//! order, no hang, no mix-up, no leak, bounded memory; `assert_invariants` after every step),
//! the health check of gateway.md section 5 (`sim::health`, after every step and over every
//! spell without NATS) and the scenario's own. `SIM_SEED=<seed>` replays one seed, `SIM_SEEDS=<n>` sets the sweep
//! size, `SIM_VERBOSE=1` prints every run's options.

use std::collections::BTreeMap;
use std::time::Duration;

use ipc_gateway_core::breaker::BreakerState;
use ipc_gateway_core::gateway::HealthStatus;
use ipc_gateway_core::inflight::RequestId;
use ipc_gateway_core::nats_config::SessionState;
use ipc_gateway_core::nats_session::to_base36;
use ipc_gateway_core::Instant;
use sim::router::{validate, ERROR_CLASSES};
use sim::tier1::world::SUBJECT;
use sim::tier1::{max_in_window, run_one, seeds, sweep, Fault, Options, Scenario, World};
use std::cell::RefCell;

fn tally(w: &World) -> BTreeMap<u16, u64> {
    let mut t = BTreeMap::new();
    for c in &w.clients {
        for (k, v) in &c.tally {
            *t.entry(*k).or_default() += v;
        }
    }
    t
}

/// Sums over a sweep, for checks that a scenario exercised what it is about.
#[derive(Default, Debug)]
struct Seen {
    runs: u64,
    codes: BTreeMap<u16, u64>,
    router_errors: BTreeMap<u16, u64>,
    late: u64,
    duplicates: u64,
    dropped: u64,
    left: u64,
    failed_on_disconnect: u64,
    resume_reads: u64,
    no_responders: u64,
    /// Reconnects whose first admitted request the after-outage check saw published.
    reconnects_checked: u64,
    /// What the shutdown check counted.
    shutdown: sim::shutdown::Report,
    /// Spells without NATS shorter and longer than the health grace period.
    short_outages: u64,
    long_outages: u64,
}

impl Seen {
    fn add(&mut self, w: &World) {
        self.runs += 1;
        for (k, v) in tally(w) {
            *self.codes.entry(k).or_default() += v;
        }
        for c in &w.clients {
            for (k, v) in &c.router_errors {
                *self.router_errors.entry(*k).or_default() += v;
            }
            self.left += u64::from(c.left);
        }
        for n in &w.nodes {
            let s = n.gw.upstream().stats();
            self.late += s.late_replies;
            self.duplicates += s.duplicate_replies;
            self.failed_on_disconnect += s.failed_on_disconnect;
            self.no_responders += s.no_responders;
            self.dropped += n.gw.stats().dropped_replies;
            if let Ok((short, long)) = n.health.check_outages(w.opts.health_grace) {
                self.short_outages += short as u64;
                self.long_outages += long as u64;
            }
        }
        self.resume_reads += w.resume_reads;
        self.reconnects_checked += w.after_outage.checked;
        self.shutdown.add(&w.shutdown);
    }
}

/// Runs a scenario's sweep, collecting sums; `check` adds per-run checks.
fn sweep_seen(
    test: &str,
    scenario: Scenario,
    n: u64,
    check: &dyn Fn(&World) -> Vec<String>,
) -> Seen {
    let seen = RefCell::new(Seen::default());
    sweep(test, scenario, n, &|w| {
        seen.borrow_mut().add(w);
        check(w)
    });
    seen.into_inner()
}

/// Sweep-wide checks only make sense over a sweep, not over one replayed seed.
fn full_sweep() -> bool {
    std::env::var_os("SIM_SEED").is_none()
}

/// (a) With healthy Routers, pipelined requests get only success replies, never an error code.
#[test]
fn a_happy_path_pipelined() {
    let seen = sweep_seen("a_happy_path_pipelined", Scenario::Happy, 200, &|w| {
        let t = tally(w);
        let errors: u64 = t.iter().filter(|(k, _)| **k != 0).map(|(_, v)| v).sum();
        let mut f = Vec::new();
        if errors != 0 {
            f.push(format!("happy path produced error replies: {t:?}"));
        }
        f
    });
    assert!(seen.codes.get(&0).copied().unwrap_or(0) > 0);
}

/// (b) Every publish: the Router subject, a router.md-valid envelope with the client payload, reply
/// `<inbox>.<request id in base 36>`, and headers (and CONNECT flags) iff the server offers them.
#[test]
fn b_subjects_headers_and_envelope() {
    sweep(
        "b_subjects_headers_and_envelope",
        Scenario::Headers,
        150,
        &|w| {
            let mut f = Vec::new();
            let headers = w.opts.server_headers;
            for p in w.server.published() {
                let Some(&g) = w.conn_owner.get(&p.conn) else {
                    f.push(format!("publish from an unknown connection {:?}", p.conn));
                    continue;
                };
                let node = &w.nodes[g];
                let inbox = node.gw.upstream().inbox();
                if p.subject != SUBJECT {
                    f.push(format!("published to {}", p.subject));
                }
                if p.headers.is_some() != headers {
                    f.push(format!(
                        "headers {:?} with server headers={headers}",
                        p.headers
                    ));
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&p.payload).unwrap_or_default();
                for v in validate(&body, p.headers.as_deref()) {
                    f.push(format!("router.md section 2/3: {v}"));
                }
                // The reply token is the request id's number; the request id carries this
                // gateway's prefix.
                let rid = body["request_id"].as_str().unwrap_or_default();
                let prefix = node.gw.request_id_text(RequestId(0));
                let prefix = prefix.trim_end_matches('0');
                let n: Option<u64> = rid.strip_prefix(prefix).and_then(|n| n.parse().ok());
                match (n, p.reply.as_deref()) {
                    (Some(n), Some(reply)) if reply == format!("{inbox}.{}", to_base36(n)) => {}
                    _ => f.push(format!(
                        "request id {rid} / reply {:?} / inbox {inbox}",
                        p.reply
                    )),
                }
                if body["task"]["payload"]["m"].is_null() {
                    f.push("client payload not embedded".to_owned());
                }
            }
            for (c, _) in w.conn_owner.iter() {
                if let Some(info) = w.server.connect_info(*c) {
                    if info.headers != headers || info.no_responders != headers {
                        f.push(format!(
                            "CONNECT {} with server headers={headers}",
                            info.raw
                        ));
                    }
                }
            }
            if w.server.published().is_empty() {
                f.push("nothing published".to_owned());
            }
            f
        },
    );
}

/// (c) Every Router error class reaches a client, the session meets no-responders and clients get
/// error 8; with no Router subscribed, no client ever gets a Router reply.
#[test]
fn c_router_errors_no_responders_disconnects() {
    let seen = sweep_seen(
        "c_router_errors_no_responders_disconnects",
        Scenario::Errors,
        200,
        &|w| {
            let mut f = Vec::new();
            if w.opts.routers == 0 {
                let task_ok = w
                    .clients
                    .iter()
                    .map(|c| c.router_errors.values().sum::<u64>())
                    .sum::<u64>();
                if task_ok != 0 {
                    f.push(format!("{task_ok} Router replies without a Router"));
                }
            }
            f
        },
    );
    if full_sweep() {
        for (i, class) in ERROR_CLASSES.iter().enumerate() {
            assert!(
                seen.router_errors.get(&(i as u16)).copied().unwrap_or(0) > 0,
                "class {class} never seen: {seen:?}"
            );
        }
        assert!(seen.no_responders > 0, "no 503 seen: {seen:?}");
        assert!(
            seen.codes.get(&8).copied().unwrap_or(0) > 0,
            "no error 8: {seen:?}"
        );
    }
}

/// (d) Replies for requests already answered, timed out or abandoned die in the NATS session and
/// never reach the gateway; the sweep must see timeouts, late and duplicate replies, and leavers.
#[test]
fn d_timeouts_and_late_replies() {
    let seen = sweep_seen(
        "d_timeouts_and_late_replies",
        Scenario::Timeouts,
        250,
        &|w| {
            let mut f = Vec::new();
            for (g, n) in w.nodes.iter().enumerate() {
                let s = n.gw.upstream().stats();
                // Every reply that reached the session for a token no longer wanted was dropped,
                // never delivered: the gateway saw none of them as a second answer.
                if n.gw.stats().dropped_replies != 0 {
                    f.push(format!(
                        "g{g}: {} outcomes for requests already gone reached the gateway",
                        n.gw.stats().dropped_replies
                    ));
                }
                let _ = s;
            }
            f
        },
    );
    if full_sweep() {
        assert!(
            seen.codes.get(&5).copied().unwrap_or(0) > 0,
            "no timeout: {seen:?}"
        );
        assert!(seen.late > 0, "no late reply: {seen:?}");
        assert!(seen.duplicates > 0, "no duplicate: {seen:?}");
        assert!(
            seen.left > 0,
            "no client left with requests in flight: {seen:?}"
        );
        assert!(
            seen.failed_on_disconnect > 0,
            "no request failed on disconnect: {seen:?}"
        );
        assert!(
            seen.reconnects_checked > 0,
            "after-outage: no reconnect checked: {seen:?}"
        );
    }
}

/// The bound on the share of reconnect attempts any 100 ms window holds after a restart.
const STORM_SHARE_BOUND: f64 = 0.35;

/// (e) After each NATS restart the jittered backoff puts at most 35% of the 50-60 gateways'
/// reconnect attempts in any 100 ms window, and every gateway reconnects and ends Connected.
#[test]
fn e_reconnect_storm() {
    let seen = sweep_seen("e_reconnect_storm", Scenario::Storm, 10, &|w| {
        let mut f = Vec::new();
        let attempts: Vec<_> = w.server.attempts().iter().map(|a| a.at).collect();
        for (i, &r) in w.restarts.iter().enumerate() {
            let (most, total) = max_in_window(
                &attempts,
                r,
                r + Duration::from_millis(2500),
                Duration::from_millis(100),
            );
            let share = most as f64 / total.max(1) as f64;
            println!(
                "  storm restart {i}: largest 100 ms window {most} of {total} attempts ({:.0}%)",
                share * 100.0
            );
            if total < w.opts.gateways {
                f.push(format!(
                    "restart {i}: only {total} attempts for {} gateways",
                    w.opts.gateways
                ));
            }
            if share > STORM_SHARE_BOUND {
                f.push(format!("restart {i} at {r:?}: {most} of {total} attempts in one 100 ms window ({:.0}%)", share * 100.0));
            }
            for (g, n) in w.nodes.iter().enumerate() {
                if !n.reconnected_at.iter().any(|t| *t >= r) {
                    f.push(format!("g{g} never reconnected after restart {i}"));
                }
            }
        }
        for (g, n) in w.nodes.iter().enumerate() {
            if n.gw.upstream().state() != SessionState::Connected {
                f.push(format!("g{g} ends {:?}", n.gw.upstream().state()));
            }
        }
        if w.restarts.len() != w.opts.faults.len() {
            f.push("not every bounce ended".to_owned());
        }
        f
    });
    if full_sweep() {
        assert!(
            seen.reconnects_checked > 0,
            "after-outage: no reconnect checked: {seen:?}"
        );
        // Health (gateway.md section 5): restarts shorter than the grace period were seen
        // DEGRADED only, longer ones UNHEALTHY from the grace period's end
        // (`HealthWatch::check_outages`, run for every seed); the sweep met both.
        assert!(
            seen.short_outages > 0 && seen.long_outages > 0,
            "health: outages short {} long {}: {seen:?}",
            seen.short_outages,
            seen.long_outages
        );
    }
}

/// (f) Over the in-flight limits every shed request gets error 7 (one per counted rejection), no
/// other error appears, and the sweep sees the gateway pause and resume reading a client.
#[test]
fn f_backpressure_shedding_and_paused_reads() {
    let seen = sweep_seen(
        "f_backpressure_shedding_and_paused_reads",
        Scenario::Backpressure,
        200,
        &|w| {
            let mut f = Vec::new();
            let t = tally(w);
            let shed: u64 = w
                .nodes
                .iter()
                .map(|n| n.gw.stats().backpressure_rejections)
                .sum();
            if shed != t.get(&7).copied().unwrap_or(0) {
                f.push(format!(
                    "{shed} sheddings but {:?} error-7 replies",
                    t.get(&7)
                ));
            }
            if t.keys().any(|k| *k != 0 && *k != 7) {
                f.push(format!("unexpected codes under backpressure: {t:?}"));
            }
            f
        },
    );
    if full_sweep() {
        assert!(
            seen.codes.get(&7).copied().unwrap_or(0) > 0,
            "no shedding: {seen:?}"
        );
        assert!(
            seen.resume_reads > 0,
            "reads never paused and resumed: {seen:?}"
        );
    }
}

/// When the Routers hung (scenario g's `RoutersSilent`).
fn hung_at(w: &World) -> Instant {
    w.opts
        .faults
        .iter()
        .find_map(|(at, f)| matches!(f, Fault::RoutersSilent { .. }).then_some(*at))
        .expect("scenario g has Routers that hang")
}

/// (g) Routers away (no responders) never open the breaker and the first request after they return
/// succeeds; Routers that hang open it, it refuses requests, half-opens and ends Closed.
#[test]
fn g_breaker_lifecycle() {
    sweep("g_breaker_lifecycle", Scenario::Breaker, 120, &|w| {
        let mut f = Vec::new();
        let hung = hung_at(w) - Instant::ZERO;
        let Some(back) = w.routers_away.first() else {
            return vec!["the Routers never came back".to_owned()];
        };
        for (g, n) in w.nodes.iter().enumerate() {
            // 1. The Routers' restart (no responders) is not a failure: the breaker stays
            // Closed until they hang, though the old rule would have opened it.
            let no_responders = n.gw.upstream().stats().no_responders;
            if no_responders < u64::from(w.opts.breaker.failures_to_open) {
                f.push(format!(
                    "g{g}: only {no_responders} no-responders while the Routers were away: \
                     too few to have opened the breaker under the old rule (harness)"
                ));
            }
            if let Some(o) = n.log.opens.iter().find(|o| o.at < hung) {
                f.push(format!(
                    "g{g}: breaker opened at {:?}, before the Routers hung at {hung:?} \
                     (away {:?}..{:?}: no responders must not count)",
                    o.at, back.start.at, back.end.at
                ));
            }
            let clients: Vec<_> = w.clients.iter().filter(|c| c.gw == g).collect();
            let answer = |m: &str| clients.iter().find_map(|c| c.answers.get(m));
            for (m, a) in clients.iter().flat_map(|c| &c.answers) {
                if a.breaker_refusal() && a.at < hung {
                    f.push(format!(
                        "g{g}: {m} refused by the breaker at {:?}, before the Routers hung",
                        a.at
                    ));
                }
            }
            // The first request after they subscribe again succeeds.
            match n.log.taken.iter().find(|(t, _)| t.ord > back.end.ord) {
                Some((t, m)) => match answer(m) {
                    Some(a) if a.code == 0 => {}
                    other => f.push(format!(
                        "g{g}: the first request after the Routers came back at {:?}, {m} \
                         (read at {:?}), got {other:?}",
                        back.end.at, t.at
                    )),
                },
                None => f.push(format!(
                    "g{g}: no request after the Routers came back at {:?} (harness)",
                    back.end.at
                )),
            }
            // 2. Routers that hang open it; it half-opens, probes, and closes once they
            // answer again.
            let tr = &n.gw.stats().breaker_transitions;
            for to in ["open", "half_open", "closed"] {
                if tr.get(to).copied().unwrap_or(0) == 0 {
                    f.push(format!("g{g}: breaker never went {to}: {tr:?}"));
                }
            }
            if n.gw.breaker_state() != BreakerState::Closed {
                f.push(format!("g{g}: breaker ends {:?}", n.gw.breaker_state()));
            }
            let refused = clients
                .iter()
                .flat_map(|c| c.answers.values())
                .filter(|a| a.breaker_refusal())
                .count();
            if refused == 0 {
                f.push(format!(
                    "g{g}: no request refused while the breaker was open"
                ));
            }
            // 3. Health (gateway.md section 5): UNHEALTHY while the breaker was Open,
            // DEGRADED while it probed, HEALTHY once it closed and the run went quiet.
            let h = &n.health;
            let end = w.now;
            let saw = |status, reason| h.saw(status, reason, Instant::ZERO, end);
            if !saw(HealthStatus::Unhealthy, "breaker open")
                || !saw(HealthStatus::Degraded, "breaker half-open")
                || h.log.last().map(|c| c.status) != Some(HealthStatus::Healthy)
            {
                f.push(format!("g{g}: health {}", h.line()));
            }
            for o in &n.log.opens {
                if h.status_at(Instant::ZERO + o.at) != Some(HealthStatus::Unhealthy) {
                    f.push(format!(
                        "g{g}: breaker opened at {:?}, health {}",
                        o.at,
                        h.line()
                    ));
                }
            }
        }
        f
    });
}

/// (h) A NATS machine that vanishes silently is noticed by keepalive within ping_interval times
/// (max_pings_out + 1) plus a round trip, and every gateway ends Connected again.
#[test]
fn h_vanished_machine_keepalive() {
    let seen = sweep_seen(
        "h_vanished_machine_keepalive",
        Scenario::Vanish,
        150,
        &|w| {
            let mut f = Vec::new();
            let o = &w.opts;
            let bound = o.ping_interval * (o.max_pings_out + 1)
                + o.net_latency.1 * 2
                + Duration::from_millis(1);
            for (i, &v) in w.vanished_at.iter().enumerate() {
                for (g, n) in w.nodes.iter().enumerate() {
                    if !n.up_at_vanish.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    match n.lost_times.iter().find(|t| **t >= v) {
                        Some(t) if *t - v <= bound => {}
                        other => f.push(format!(
                            "g{g}: vanish at {v:?} noticed at {other:?}, bound {bound:?}"
                        )),
                    }
                }
            }
            for (g, n) in w.nodes.iter().enumerate() {
                if n.gw.upstream().state() != SessionState::Connected {
                    f.push(format!("g{g} ends {:?}", n.gw.upstream().state()));
                }
            }
            f
        },
    );
    if full_sweep() {
        assert!(
            seen.reconnects_checked > 0,
            "after-outage: no reconnect checked: {seen:?}"
        );
    }
}

/// (i) SIGTERM while slow Routers hold requests: what was read before the signal gets the
/// Router's reply by the drain deadline or error 6 at it, what is read after gets error 6 and
/// is never published, and `ShutdownComplete { forced: false }` comes once, with the NATS
/// session closed, within signal + drain + flush grace + NATS drain. In half the runs the
/// network holds the NATS bytes across the drain deadline, so the session has output to
/// flush when the gateway reaches it (the shutdown check, `sim::shutdown`).
#[test]
fn i_shutdown_drain_slow_router() {
    let seen = sweep_seen(
        "i_shutdown_drain_slow_router",
        Scenario::Drain,
        200,
        &draining_is_unhealthy,
    );
    if full_sweep() {
        let s = &seen.shutdown;
        s.assert_drains_covered();
        assert!(s.answered > 0, "no Router reply during a drain: {s:?}");
    }
}

/// Health (gateway.md section 5): from its first signal on, a gateway is UNHEALTHY
/// ("draining"), and nothing else, until it exits.
fn draining_is_unhealthy(w: &World) -> Vec<String> {
    let mut f = Vec::new();
    for (g, n) in w.nodes.iter().enumerate() {
        let Some(signal) = n.signals.first() else {
            continue;
        };
        let at = Instant::ZERO + signal.at;
        let h = &n.health;
        if !h.saw(HealthStatus::Unhealthy, "draining", at, at) {
            f.push(format!("g{g}: signalled at {at:?}, health {}", h.line()));
        }
        if let Some(c) = h
            .log
            .iter()
            .find(|c| c.at >= at && c.status != HealthStatus::Unhealthy)
        {
            f.push(format!(
                "g{g}: signalled at {at:?}, {} ({}) at {:?}",
                c.status.name(),
                c.reason,
                c.at
            ));
        }
    }
    f
}

/// (j) The NATS server bounces or vanishes shortly after the signals, requests in flight: the
/// same checks, and requests lost with the connection get error 8 (or error 6 at the
/// deadline, when they waited in the reconnect buffer); the shutdown still completes within
/// its bound, with the session closed.
#[test]
fn j_shutdown_nats_outage_during_drain() {
    let seen = sweep_seen(
        "j_shutdown_nats_outage_during_drain",
        Scenario::DrainOutage,
        200,
        &draining_is_unhealthy,
    );
    if full_sweep() {
        let s = &seen.shutdown;
        assert!(s.drained > 0, "no drain completed: {s:?}");
        assert!(s.lost_with_link > 0, "no request lost with the link: {s:?}");
        assert!(s.refused > 0, "nothing read after a signal: {s:?}");
    }
}

/// (k) A second signal during the drain: `ShutdownComplete { forced: true }` at that instant,
/// the NATS session closed, no panic, the invariants held throughout.
#[test]
fn k_shutdown_second_signal() {
    let seen = sweep_seen(
        "k_shutdown_second_signal",
        Scenario::SecondSignal,
        200,
        &draining_is_unhealthy,
    );
    if full_sweep() {
        let s = &seen.shutdown;
        assert!(s.forced > 0, "no forced exit: {s:?}");
        assert!(
            s.cut_by_force > 0,
            "no forced exit with requests still in flight: {s:?}"
        );
    }
}

/// Runs are deterministic: a seed replays to the same trace digest, and a neighbouring seed gives
/// another (the trace records enough to tell runs apart).
#[test]
fn same_seed_same_digest() {
    let test = "same_seed_same_digest";
    for seed in seeds(test, 3) {
        let a = run_one(test, Scenario::Timeouts, seed, &|_| {}, &|_| Vec::new()).digest();
        let b = run_one(test, Scenario::Timeouts, seed, &|_| {}, &|_| Vec::new()).digest();
        assert_eq!(a, b, "seed {seed}: two runs, two digests; replay: SIM_SEED={seed} cargo test -p sim --test tier1 {test}");
        let c = run_one(test, Scenario::Timeouts, seed ^ 1, &|_| {}, &|_| Vec::new()).digest();
        assert_ne!(
            a,
            c,
            "seeds {seed} and {} gave the same digest: the trace records too little",
            seed ^ 1
        );
    }
}

/// The shutdown scenarios replay too: signals, the exit and the NATS send buffer are in the
/// trace.
#[test]
fn shutdown_same_seed_same_digest() {
    let test = "shutdown_same_seed_same_digest";
    for seed in seeds(test, 3) {
        for scenario in [
            Scenario::Drain,
            Scenario::DrainOutage,
            Scenario::SecondSignal,
        ] {
            let a = run_one(test, scenario, seed, &|_| {}, &|_| Vec::new()).digest();
            let b = run_one(test, scenario, seed, &|_| {}, &|_| Vec::new()).digest();
            assert_eq!(a, b, "{scenario:?} seed {seed}: two runs, two digests; replay: SIM_SEED={seed} cargo test -p sim --test tier1 {test}");
        }
    }
}

/// A run's options are a function of scenario and seed alone (same seed, same summary; another
/// seed, another), and the summary starts with the seed, for replay.
#[test]
fn options_are_derived_from_the_seed_only() {
    let a = Options::swarm(Scenario::Storm, 7).summary();
    assert_eq!(a, Options::swarm(Scenario::Storm, 7).summary());
    assert_ne!(a, Options::swarm(Scenario::Storm, 8).summary());
    assert!(a.starts_with("seed=7 gws="), "{a}");
}

/// regression-seeds.txt is compiled in and parsed: the smoke seed it lists for (a) is found.
#[test]
fn regression_seed_file_is_read() {
    // The file's own example line keeps this honest: a typo in the parser drops all seeds.
    assert!(!sim::tier1::regression_seeds("a_happy_path_pipelined").is_empty());
}
