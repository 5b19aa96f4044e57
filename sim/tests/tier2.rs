//! Tier 2 scenarios (issue 4, items 2–5): the core in its tokio shell over turmoil TCP, the
//! NATS stand-in, Router and IDE hosts, under faults. Each test runs its seeds (see
//! `sim::tier2::seeds`: SIM_SEED replays one, SIM_SEEDS=N sweeps), prints each seed and its
//! options, checks gateway.md section 1's invariants after every run plus its own, and on
//! failure prints the replay command.

use std::time::Duration;

use ipc_gateway_core::gateway::HealthStatus;
use sim::nats_standin::ServerConfig;
use sim::tier2::ide::{IdeSpec, Req};
use sim::tier2::seeds::{for_each_seed, regressions, seeds};
use sim::tier2::{slack, Options, Run};

const REGRESSIONS: &str = include_str!("tier2_seeds.txt");

fn run_seeds(test: &str, default_count: usize, f: impl Fn(u64)) {
    let list = seeds(test, default_count, &regressions(REGRESSIONS, test));
    for_each_seed(test, &list, f);
}

fn ide(name: &str, gateway: usize, requests: Vec<Req>, window: usize) -> IdeSpec {
    IdeSpec {
        name: name.to_owned(),
        gateway: Options::gateway_name(gateway),
        start_delay: Duration::from_millis(200),
        requests,
        window,
        reply_deadline: Duration::from_secs(10),
        leave: false,
    }
}

/// The replies of one client, as (kind, parsed JSON).
fn replies(run: &Run, client: &str) -> Vec<(u8, serde_json::Value)> {
    run.obs.borrow().clients[client]
        .sent
        .iter()
        .map(|s| {
            let r = s.reply.as_ref().expect("a reply");
            (
                r.kind,
                serde_json::from_slice(&r.payload).unwrap_or_default(),
            )
        })
        .collect()
}

const OK: u8 = 0x10;
const ERR: u8 = 0x11;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Asserts a reply is the error frame with `code`.
fn assert_error(reply: &(u8, serde_json::Value), code: u64, what: &str) {
    assert_eq!(
        reply.0, ERR,
        "{what}: expected error {code}, got {}",
        reply.1
    );
    assert_eq!(reply.1["error"]["code"], code, "{what}: {}", reply.1);
}

/// Asserts a reply is the Router's answer (RESPONSE_OK), `ok` or the Router error `class`.
fn assert_router(reply: &(u8, serde_json::Value), class: Option<&str>, what: &str) {
    assert_eq!(
        reply.0, OK,
        "{what}: expected a Router reply, got {}",
        reply.1
    );
    match class {
        None => assert_eq!(reply.1["ok"], true, "{what}: {}", reply.1),
        Some(c) => assert_eq!(reply.1["error"]["code"], c, "{what}: {}", reply.1),
    }
}

/// (a) Pipelined clients on two gateways all get their Router replies, in order.
#[test]
fn happy_path_pipelined() {
    run_seeds("happy_path_pipelined", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        let mut rng = opts.rng(1);
        opts.gateways = 2;
        opts.routers = 1 + rng.below(2) as usize;
        let clients = 2 + rng.below(3) as usize;
        let per = 10 + rng.below(20) as usize;
        let window = 1 + rng.below(10) as usize;
        println!(
            "tier2 happy_path_pipelined: clients={clients} requests_each={per} window={window}"
        );
        let mut run = Run::new(opts, ServerConfig::default());
        for c in 0..clients {
            run.ide(ide(
                &format!("ide-{c}"),
                c % 2,
                (0..per).map(|_| Req::new("ok", 0)).collect(),
                window,
            ));
        }
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        for c in 0..clients {
            for (i, (kind, v)) in replies(&run, &format!("ide-{c}")).iter().enumerate() {
                assert_eq!(*kind, OK, "ide-{c} reply {i}: {v}");
                assert_eq!(v["ok"], true);
            }
        }
    });
}

/// (c) Every Router error class reaches the client verbatim as RESPONSE_OK; no responders is
/// error 8 at once; a Router that drops its connection instead of answering is a timeout
/// (error 5); a request over the server's max_payload is error 3 before anything is sent.
#[test]
fn router_errors() {
    run_seeds("router_errors", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        opts.router_start = ms(1500);
        let server = ServerConfig {
            max_payload: 4096,
            ..ServerConfig::default()
        };
        let mut run = Run::new(opts.clone(), server);
        // Before any Router subscribed: no responders.
        run.ide(ide(
            "ide-early",
            0,
            vec![Req::new("ok", 0), Req::new("ok", 0)],
            2,
        ));
        let big = format!("\"blob\":\"{}\"", "x".repeat(5000));
        let mut main = ide(
            "ide-main",
            0,
            vec![
                Req::new("policy_not_found", 0),
                Req::new("decision_failed", 0),
                Req::new("internal", 0),
                Req::new("ok", 0),
                Req::new("disconnect", 0),
                // The Router reconnects 100 ms after dropping; wait for it.
                Req::new("ok", 0).after(ms(300)),
                Req::new("ok", 0).with(&big),
                Req::new("ok", 0),
            ],
            1,
        );
        main.start_delay = ms(2500);
        run.ide(main);
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        let early = replies(&run, "ide-early");
        for (i, r) in early.iter().enumerate() {
            assert_error(r, 8, &format!("no responders {i}"));
            assert!(
                r.1["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("no responders"),
                "{}",
                r.1
            );
        }
        let sent = &run.obs.borrow().clients["ide-early"].sent;
        for s in sent {
            let took = s.reply.as_ref().unwrap().at - s.at;
            assert!(
                took < opts.request_timeout / 2,
                "no responders must answer at once, took {took:?}"
            );
        }
        let main = replies(&run, "ide-main");
        assert_router(&main[0], Some("policy_not_found"), "policy_not_found");
        assert_router(&main[1], Some("decision_failed"), "decision_failed");
        assert_router(&main[2], Some("internal"), "internal");
        assert_router(&main[3], None, "ok");
        assert_error(&main[4], 5, "Router dropped its connection");
        assert_router(&main[5], None, "ok after the Router reconnected");
        assert_error(&main[6], 3, "over max_payload");
        assert_router(&main[7], None, "ok after error 3");
        let g = run.shell(0);
        let g = g.gateway.borrow();
        assert!(g.upstream().stats().no_responders >= 2);
        let seen = run
            .obs
            .borrow()
            .router_seen
            .iter()
            .filter(|r| r.body.len() > 4096)
            .count();
        assert_eq!(seen, 0, "the oversized request must not be published");
    });
}

/// (d) Timeouts and late replies: a slow Router's reply after the deadline, a silent Router,
/// a duplicate reply, replies after the client left, and a reply that arrives after the
/// gateway reconnected are all dropped and counted; none reaches a client.
#[test]
fn timeouts_and_late_replies() {
    run_seeds("timeouts_and_late_replies", 2, |seed| {
        let opts = Options::from_seed(seed);
        let mut run = Run::new(opts.clone(), ServerConfig::default());
        run.ide(ide(
            "ide-a",
            0,
            vec![
                Req::new("slow", 1500),
                Req::new("silent", 0),
                Req::new("dup", 0),
                Req::new("ok", 0),
            ],
            4,
        ));
        // Hangs up right after sending: the first reply's write meets a closed socket, the
        // second's fails, and the third reply arrives for a client already forgotten.
        let mut leaver = ide(
            "ide-leaver",
            0,
            vec![
                Req::new("slow", 100),
                Req::new("slow", 400),
                Req::new("slow", 700),
            ],
            3,
        );
        leaver.leave = true;
        run.ide(leaver);
        run.lenient_clients.push("ide-leaver".into());
        // A slow request in flight when nats restarts: error 8 at once; the Router sends its
        // reply after both reconnected, to the same inbox.
        let mut c = ide(
            "ide-c",
            0,
            vec![Req::new("slow", 600), Req::new("ok", 0).after(ms(1000))],
            1,
        );
        c.start_delay = ms(3000);
        run.ide(c);
        run.run_until(ms(3200));
        run.sim.bounce("nats");
        run.finish(Duration::from_secs(3));
        run.summary();
        run.check_invariants();
        let a = replies(&run, "ide-a");
        assert_error(&a[0], 5, "slow past the deadline");
        assert_error(&a[1], 5, "silent");
        assert_router(&a[2], None, "dup");
        assert_router(&a[3], None, "ok");
        let c = replies(&run, "ide-c");
        assert_error(&c[0], 8, "in flight when nats restarted");
        assert_router(&c[1], None, "after the reconnect");
        let took = {
            let o = run.obs.borrow();
            let s = &o.clients["ide-c"].sent[0];
            s.reply.as_ref().unwrap().at - s.at
        };
        assert!(
            took < ms(600),
            "a request on a lost connection fails at once, took {took:?}"
        );
        let g = run.shell(0);
        let g = g.gateway.borrow();
        let st = g.upstream().stats();
        println!(
            "tier2 nats stats: {st:?}; gateway dropped_replies={}",
            g.stats().dropped_replies
        );
        // ide-a's slow reply, the leaver's last one, ide-c's after the reconnect.
        assert!(st.late_replies >= 3, "late replies counted: {st:?}");
        assert!(st.duplicate_replies >= 1, "duplicate counted: {st:?}");
        assert!(st.failed_on_disconnect >= 1, "{st:?}");
        assert!(st.reconnects >= 1, "{st:?}");
    });
}

/// (g) The breaker's whole lifecycle: five timeouts open it; while open, requests get error 8
/// at once and nothing is published; after the open time one probe goes through (HalfOpen); a
/// failed probe re-opens it for twice as long; two successful probes close it.
#[test]
fn breaker_lifecycle() {
    run_seeds("breaker_lifecycle", 2, |seed| {
        let opts = Options::from_seed(seed);
        let open = opts.breaker.open_duration;
        let mut run = Run::new(opts.clone(), ServerConfig::default());
        let mut reqs: Vec<Req> = (0..5).map(|_| Req::new("silent", 0)).collect();
        reqs.push(Req::new("ok", 0)); // 5: open → error 8 at once
        reqs.push(Req::new("silent", 0).after(open + ms(100))); // 6: probe fails → re-open (2×)
        reqs.push(Req::new("ok", 0).after(open + ms(100))); // 7: still open (2× not over)
        reqs.push(Req::new("ok", 0).after(open + ms(100))); // 8: probe succeeds
        reqs.push(Req::new("ok", 0)); // 9: second success closes
        reqs.push(Req::new("ok", 0)); // 10: closed
        run.ide(ide("ide-0", 0, reqs, 1));
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        let r = replies(&run, "ide-0");
        for (i, reply) in r.iter().enumerate().take(5) {
            assert_error(reply, 5, &format!("silent {i}"));
        }
        assert_error(&r[5], 8, "breaker open");
        assert!(
            r[5].1["error"]["message"]
                .as_str()
                .unwrap_or("")
                .to_lowercase()
                .contains("breaker"),
            "{}",
            r[5].1
        );
        assert_error(&r[6], 5, "failed probe");
        assert_error(&r[7], 8, "re-opened for twice as long");
        assert_router(&r[8], None, "probe 1");
        assert_router(&r[9], None, "probe 2");
        assert_router(&r[10], None, "closed");
        let o = run.obs.borrow();
        let published = o.router_seen.len();
        assert_eq!(published, 5 + 1 + 3, "nothing is published while open");
        let g = o.gateways["gateway-0"].gateway.borrow();
        let t = &g.stats().breaker_transitions;
        assert_eq!(t.get("open"), Some(&2), "{t:?}");
        assert_eq!(t.get("half_open"), Some(&2), "{t:?}");
        assert_eq!(t.get("closed"), Some(&1), "{t:?}");
        assert_eq!(g.breaker_state().name(), "closed");
        // Health (gateway.md section 5): UNHEALTHY while Open, DEGRADED while probing, twice
        // each, then HEALTHY; the session was up throughout.
        let health = o.gateways["gateway-0"].health.borrow();
        let seq: Vec<(&str, &str)> = health
            .log
            .iter()
            .map(|c| (c.status.name(), c.reason.as_str()))
            .filter(|(_, r)| r.starts_with("breaker") || r.is_empty())
            .collect();
        assert_eq!(
            seq,
            [
                ("HEALTHY", ""),
                ("UNHEALTHY", "breaker open"),
                ("DEGRADED", "breaker half-open"),
                ("UNHEALTHY", "breaker open"),
                ("DEGRADED", "breaker half-open"),
                ("HEALTHY", ""),
            ],
            "{}",
            health.line()
        );
    });
}

/// (h) A vanished machine: the gateway is partitioned from nats, then nats is crashed, so no
/// FIN ever arrives; only the keepalive notices, within ping interval × (max pings + 1). A
/// request in flight then fails with error 8; once nats is back the gateway recovers.
#[test]
fn vanished_machine_keepalive() {
    run_seeds("vanished_machine_keepalive", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        let mut rng = opts.rng(8);
        opts.ping_interval = ms(200 + rng.below(300));
        opts.max_pings_out = 1 + rng.below(3) as u32;
        opts.request_timeout = ms(5000);
        let bound = opts.ping_interval * (opts.max_pings_out + 1);
        println!("tier2 vanished_machine_keepalive: detection bound {bound:?}");
        let mut run = Run::new(opts.clone(), ServerConfig::default());
        let mut inflight = ide(
            "ide-0",
            0,
            vec![Req::new("ok", 0), Req::new("slow", 4000).after(ms(600))],
            1,
        );
        inflight.start_delay = ms(300);
        run.ide(inflight);
        let mut later = ide("ide-1", 0, vec![Req::new("ok", 0), Req::new("ok", 0)], 2);
        later.start_delay = ms(1000) + bound * 3 + ms(2000);
        run.ide(later);
        run.run_until(ms(1000));
        let shell = run.shell(0);
        assert_eq!(
            shell.gateway.borrow().upstream().state().name(),
            "connected"
        );
        let cut = run.now();
        run.sim.partition("gateway-0", "nats");
        run.sim.crash("nats");
        while shell.gateway.borrow().upstream().state().name() == "connected" {
            assert!(
                run.now() < cut + bound * 4,
                "the gateway never noticed the vanished server"
            );
            run.run_until(run.now() + ms(1));
        }
        let noticed = run.now() - cut;
        println!("tier2 vanished_machine_keepalive: noticed after {noticed:?} (bound {bound:?})");
        assert!(
            noticed <= bound + ms(5),
            "noticed after {noticed:?} > {bound:?}"
        );
        run.sim.repair("gateway-0", "nats");
        run.sim.bounce("nats");
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        let r = replies(&run, "ide-0");
        assert_router(&r[0], None, "before");
        assert_error(&r[1], 8, "in flight when the server vanished");
        // Health (gateway.md section 5): DEGRADED while reconnecting after the keepalive
        // noticed, UNHEALTHY ("nats down") from the grace period's end if the outage outlasted
        // it (`check_outages`, in check_invariants), HEALTHY once back.
        let health = shell.health.borrow();
        let cut = ipc_gateway_core::Instant::ZERO + cut;
        let end = ipc_gateway_core::Instant::ZERO + run.now();
        assert!(
            health.saw(HealthStatus::Degraded, "nats reconnecting", cut, end),
            "{}",
            health.line()
        );
        assert_eq!(
            health.log.last().map(|c| c.status),
            Some(HealthStatus::Healthy),
            "{}",
            health.line()
        );
        for (i, r) in replies(&run, "ide-1").iter().enumerate() {
            assert_router(r, None, &format!("after recovery {i}"));
        }
        assert_eq!(
            shell.gateway.borrow().upstream().state().name(),
            "connected"
        );
    });
}

/// The largest share of `times` that falls in any window of `width`.
fn max_window_share(times: &[Duration], width: Duration) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= width {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best as f64 / sorted.len() as f64
}

/// (e) Reconnect storm: many gateways on one nats host that is killed and restarted again
/// and again. Every gateway reconnects after every restart, no request hangs, every gateway
/// serves again afterwards, and the jittered backoff spreads the reconnects: no 100 ms window
/// after a restart holds more than `MAX_SHARE` of them. Downtimes of 4.5–6 s put every
/// gateway's backoff at its 2 s ceiling, where a delay is uniform on [1 s, 2 s]: 50 gateways
/// then put about 10–28 % of their reconnects in the busiest 100 ms (seen over 24 restarts);
/// without jitter they would all land in the same few milliseconds. The breaker is in play,
/// and the after-outage check must see every gateway's first request after every restart
/// published.
#[test]
fn reconnect_storm() {
    const MAX_SHARE: f64 = 0.35;
    run_seeds("reconnect_storm", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        let mut rng = opts.rng(5);
        opts.gateways = std::env::var("SIM_STORM_GATEWAYS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(50);
        // The breaker stays in play: under gateway.md section 4 the requests the outages fail
        // do not count, so it must not be open when a gateway is back (the after-outage
        // check, run for every gateway and restart). Three failures open it (500 ms doubling
        // to 4 s): fewer than the requests each client has failed by a crash of 4.5 s or more,
        // so that a breaker counting those would be open at the return. When they counted,
        // seed 10952965305461587542 met it still open after the last recovery.
        opts.breaker.failures_to_open = 3;
        let cycles = std::env::var("SIM_STORM_CYCLES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3);
        let downs: Vec<Duration> = (0..cycles).map(|_| ms(4500 + rng.below(1500))).collect();
        println!(
            "tier2 reconnect_storm: gateways={} downtimes={downs:?}",
            opts.gateways
        );
        let mut run = Run::new(opts.clone(), ServerConfig::default());
        let total: Duration = downs.iter().map(|d| *d + ms(3000)).sum::<Duration>() + ms(2000);
        let per = (total.as_millis() / 700) as usize + 6;
        let fleet = (0..opts.gateways)
            .map(|g| {
                let reqs = (0..per).map(|_| Req::new("ok", 0).after(ms(500))).collect();
                let mut c = ide(&format!("ide-{g}"), g, reqs, 1);
                c.start_delay = ms(300 + rng.below(200));
                c
            })
            .collect();
        run.ide_fleet("ide-fleet", fleet);
        let started = std::time::Instant::now();
        let mut t = ms(2000);
        let mut restarts = Vec::new();
        for d in &downs {
            run.run_until(t);
            run.sim.crash("nats");
            t += *d;
            run.run_until(t);
            run.sim.bounce("nats");
            restarts.push(run.now());
            t += ms(3000);
        }
        run.finish(Duration::from_secs(2));
        println!("tier2 reconnect_storm: wall time {:?}", started.elapsed());
        run.summary();
        run.check_invariants();
        // The after-outage check saw every gateway's first request after every restart.
        let checked = run.after_outage.checked;
        assert!(
            checked >= (opts.gateways * cycles) as u64,
            "after-outage: only {checked} reconnects checked for {} gateways and {cycles} \
             restarts: {:?}",
            opts.gateways,
            run.after_outage
        );
        let o = run.obs.borrow();
        for (k, &r) in restarts.iter().enumerate() {
            let end = r + ms(2900);
            let times: Vec<Duration> = o
                .nats_accepts
                .iter()
                .filter(|(at, who)| *at >= r && *at < end && who.starts_with("gateway-"))
                .map(|(at, _)| *at)
                .collect();
            let who: std::collections::BTreeSet<&String> = o
                .nats_accepts
                .iter()
                .filter(|(at, who)| *at >= r && *at < end && who.starts_with("gateway-"))
                .map(|(_, w)| w)
                .collect();
            let share = max_window_share(&times, ms(100));
            let first = times.iter().min().map(|t| *t - r);
            let last = times.iter().max().map(|t| *t - r);
            println!(
                "tier2 reconnect_storm: restart {k} at {r:?}: {} accepts from {} gateways, first {first:?} last {last:?} after, max share in 100 ms {share:.3}",
                times.len(),
                who.len()
            );
            assert_eq!(
                who.len(),
                opts.gateways,
                "restart {k}: every gateway reconnects"
            );
            assert!(
                share <= MAX_SHARE,
                "restart {k}: {share:.3} of the reconnects in one 100 ms window"
            );
        }
        let last = *restarts.last().unwrap() + ms(2900);
        for (name, c) in &o.clients {
            let after: Vec<_> = c.sent.iter().filter(|s| s.at >= last).collect();
            assert!(
                !after.is_empty(),
                "{name}: sent nothing after the last recovery"
            );
            for s in after {
                let r = s.reply.as_ref().unwrap();
                assert_eq!(
                    r.kind,
                    OK,
                    "{name}: after recovery: {}",
                    String::from_utf8_lossy(&r.payload)
                );
            }
        }
        for (name, shell) in &o.gateways {
            assert_eq!(
                shell.gateway.borrow().upstream().state().name(),
                "connected",
                "{name}"
            );
        }
    });
}

/// A swarm run (TigerBeetle's VOPR style): a fault schedule, the Router behaviour mix, client
/// count, pipelining and latency all drawn from the seed. Faults between gateway and nats:
/// hold/release, partition/repair (segments lost: the stream stalls until the keepalive gives
/// up), bounce and crash of nats. Every reply must be the Router's (with the right tag) or
/// error 5/8; afterwards a fresh client must be served normally.
fn swarm(seed: u64) -> Run {
    let mut opts = Options::from_seed(seed);
    let mut rng = opts.rng(9);
    opts.routers = 1 + rng.below(2) as usize;
    opts.ping_interval = ms(300 + rng.below(700));
    let behaviours = [
        "ok",
        "ok",
        "ok",
        "policy_not_found",
        "internal",
        "slow",
        "dup",
        "silent",
    ];
    let clients = 1 + rng.below(3) as usize;
    let mut plan = Vec::new();
    for c in 0..clients {
        let n = 10 + rng.below(30) as usize;
        let window = 1 + rng.below(8) as usize;
        let reqs: Vec<Req> = (0..n)
            .map(|_| {
                let b = behaviours[rng.below(behaviours.len() as u64) as usize];
                Req::new(b, rng.below(1500)).after(ms(rng.below(300)))
            })
            .collect();
        plan.push((format!("ide-{c}"), reqs, window));
    }
    let mut faults = Vec::new();
    let mut t = ms(500 + rng.below(1000));
    for _ in 0..1 + rng.below(4) {
        let kind = [
            "hold",
            "partition",
            "bounce",
            "crash",
            "jitter",
            "slow_router",
        ][rng.below(6) as usize];
        let d = ms(100 + rng.below(1500));
        faults.push((t, kind, d, ms(50 + rng.below(350))));
        t += d + ms(200 + rng.below(1500));
    }
    println!(
        "tier2 swarm: routers={} ping_interval={:?} clients={:?} faults={faults:?}",
        opts.routers,
        opts.ping_interval,
        plan.iter()
            .map(|(n, r, w)| (n.clone(), r.len(), *w))
            .collect::<Vec<_>>()
    );
    let calm = t + opts.ping_interval * (opts.max_pings_out + 1) + ms(3000);
    let mut run = Run::new(opts, ServerConfig::default());
    for (name, reqs, window) in plan {
        run.ide(ide(&name, 0, reqs, window));
    }
    let (min_latency, max_latency) = (run.opts.min_latency, run.opts.max_latency);
    for (at, kind, d, jitter) in faults {
        run.run_until(at);
        match kind {
            "hold" => run.sim.hold("gateway-0", "nats"),
            "partition" => run.sim.partition("gateway-0", "nats"),
            "crash" => run.sim.crash("nats"),
            // Latency and its jitter on the gateway's NATS link: up to 50–400 ms a segment.
            "jitter" => run
                .sim
                .set_link_max_message_latency("gateway-0", "nats", jitter),
            // A Router far away: its replies come late, some after the deadline.
            "slow_router" => run.sim.set_link_latency("router-0", "nats", jitter * 2),
            _ => run.sim.bounce("nats"),
        }
        run.run_until(at + d);
        match kind {
            "hold" => run.sim.release("gateway-0", "nats"),
            "partition" => run.sim.repair("gateway-0", "nats"),
            "crash" => run.sim.bounce("nats"),
            "jitter" => run
                .sim
                .set_link_max_message_latency("gateway-0", "nats", max_latency),
            "slow_router" => run.sim.set_link_latency("router-0", "nats", min_latency),
            _ => {}
        }
    }
    run.run_until(calm);
    run.finish(Duration::ZERO);
    // Once the other clients are done, the breaker may still be open for up to its longest
    // open time; after that a sequential client is served (two probes close it).
    let mut last = ide(
        "ide-after",
        0,
        (0..5).map(|_| Req::new("ok", 0)).collect(),
        1,
    );
    last.start_delay = run.opts.breaker.max_open_duration + ms(100);
    run.ide(last);
    run.finish(Duration::from_secs(3));
    run.summary();
    run.check_invariants();
    let o = run.obs.borrow();
    for (name, c) in &o.clients {
        for (i, s) in c.sent.iter().enumerate() {
            let r = s.reply.as_ref().unwrap();
            if name == "ide-after" {
                assert_eq!(
                    r.kind,
                    OK,
                    "{name} {i}: {}",
                    String::from_utf8_lossy(&r.payload)
                );
            } else if r.kind == ERR {
                let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
                let code = v["error"]["code"].as_u64().unwrap_or(0);
                assert!(
                    code == 5 || code == 8,
                    "{name} {i} ({}): unexpected {v}",
                    s.behaviour
                );
            }
        }
    }
    drop(o);
    run
}

/// The swarm: random faults and Router behaviours, the invariants after every run.
#[test]
fn swarm_faults() {
    run_seeds("swarm_faults", 6, |seed| {
        swarm(seed);
    });
}

/// One seed twice gives the same action trace (same digest); another seed gives another.
#[test]
fn same_seed_same_digest() {
    run_seeds("same_seed_same_digest", 1, |seed| {
        let a = swarm(seed);
        let b = swarm(seed);
        let (da, la) = (a.digest(), a.obs.borrow().trace.len());
        let (db, lb) = (b.digest(), b.obs.borrow().trace.len());
        println!("tier2 digests: {da:016x} ({la} lines) and {db:016x} ({lb} lines)");
        assert!(la > 0);
        assert_eq!((da, la), (db, lb), "the same seed must give the same trace");
        let c = swarm(seeds_mix(seed));
        assert_ne!(c.digest(), da, "another seed, another trace");
    });
}

fn seeds_mix(seed: u64) -> u64 {
    sim::tier2::seeds::mix(seed ^ 1)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn has_null(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.iter().any(has_null),
        serde_json::Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

/// (b) Subjects, headers and envelope: what the Router hosts received on the wire, field by
/// field against router.md sections 2 and 3, for a server with headers (HPUB with `version`,
/// `trace_id`, `span_id`, `tenant_id`, `traceparent`) and one without (plain PUB); and the
/// CONNECT the gateway sent (headers and no_responders exactly when the server has headers).
#[test]
fn subjects_headers_envelope() {
    const TRACE: &str = "0123456789abcdef0123456789abcdef";
    const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const UUID: &str = "123e4567-e89b-42d3-a456-426614174000";
    run_seeds("subjects_headers_envelope", 2, |seed| {
        for headers in [true, false] {
            let opts = Options::from_seed(seed);
            let server = ServerConfig {
                headers,
                ..ServerConfig::default()
            };
            let mut run = Run::new(opts.clone(), server);
            let long_tenant = format!("\"tenant_id\":\"{}\"", "t".repeat(200));
            let reqs = vec![
                Req::new("ok", 0),
                Req::new("ok", 0).with("\"tenant_id\":\"acme\",\"policy_id\":\"p7\""),
                Req::new("ok", 0).with(&format!("\"trace_id\":\"{TRACE}\"")),
                Req::new("ok", 0).with("\"trace_id\":\"NOT-A-TRACE\""),
                Req::new("ok", 0).with(&format!(
                    "\"traceparent\":\"00-{PARENT_TRACE}-00f067aa0ba902b7-01\""
                )),
                Req::new("ok", 0).with(&format!("\"trace_id\":\"{UUID}\"")),
                Req::new("ok", 0).with("\"tenant_id\":\"\",\"policy_id\":\"\""),
                Req::new("ok", 0).with(&long_tenant),
                Req::new("ok", 0).raw(
                    "{\"task\":\"code_completion\",\"file\":\"test.py\",\"line\":42,\"context\":\"def hello_world():\",\"tag\":\"{tag}\"}",
                ),
                Req::new("ok", 0).raw("{\"tag\":\"{tag}\",\"file\":\"x.rs\",\"note\":\"no type\"}"),
            ];
            let expect_tenant = [
                "default", "acme", "default", "default", "default", "default", "default",
                "default", "default", "default",
            ];
            let expect_policy = [
                "default", "p7", "default", "default", "default", "default", "default", "default",
                "default", "default",
            ];
            let expect_type = ["code_completion"; 8]
                .into_iter()
                .chain(["code_completion", "ide.task_submit"])
                .collect::<Vec<_>>();
            let n = reqs.len();
            run.ide(ide("ide-0", 0, reqs.clone(), 3));
            run.finish(Duration::from_secs(2));
            run.summary();
            run.check_invariants();
            let o = run.obs.borrow();
            // The CONNECT.
            let connect: Vec<_> = o
                .nats_connects
                .iter()
                .filter(|(w, _)| w == "gateway-0")
                .collect();
            assert!(!connect.is_empty());
            for (_, c) in connect {
                assert_eq!(
                    (c.headers, c.no_responders),
                    (headers, headers),
                    "CONNECT {}",
                    c.raw
                );
                assert!(!c.verbose, "CONNECT {}", c.raw);
                assert_eq!(
                    c.name.as_deref(),
                    Some("ipc-gateway@gateway-0"),
                    "CONNECT {}",
                    c.raw
                );
            }
            let prefix =
                ipc_gateway_core::upstream::Identity::derive(opts.gateway_seed(0)).instance;
            let mut ids = std::collections::BTreeSet::new();
            let seen: Vec<_> = o.router_seen.iter().collect();
            assert_eq!(seen.len(), n, "one Router request per client request");
            for (i, r) in seen.iter().enumerate() {
                let what = format!("request {i} (headers={headers})");
                assert_eq!(r.subject, "beamline.router.v1.decide", "{what}");
                let reply = r.reply_to.as_deref().unwrap_or("");
                let parts: Vec<&str> = reply.split('.').collect();
                assert!(
                    parts.len() == 3 && parts[0] == "_INBOX" && parts[1].len() == 22,
                    "{what}: reply subject {reply}"
                );
                let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON body");
                sim::tier2::router::validate(&body)
                    .unwrap_or_else(|e| panic!("{what}: the Router rejects it: {e}: {body}"));
                assert!(!has_null(&body), "{what}: null in {body}");
                let client: serde_json::Value =
                    serde_json::from_slice(&sim::tier2::ide::payload("ide-0", i, &reqs[i]))
                        .unwrap();
                assert_eq!(
                    body["task"]["payload"], client,
                    "{what}: payload embedded unchanged"
                );
                assert_eq!(body["version"], "1", "{what}");
                let rid = body["request_id"].as_str().unwrap();
                assert!(
                    rid.starts_with(&format!("{prefix:08x}-")),
                    "{what}: request id {rid}"
                );
                assert!(
                    ids.insert(rid.to_owned()),
                    "{what}: request id {rid} reused"
                );
                assert_eq!(body["tenant_id"], expect_tenant[i], "{what}");
                assert_eq!(body["policy_id"], expect_policy[i], "{what}");
                assert_eq!(body["task"]["type"], expect_type[i], "{what}");
                assert_eq!(
                    body["metadata"]["ipc_message_type"], "task_submit",
                    "{what}"
                );
                let trace = body["trace_id"].as_str().unwrap();
                match i {
                    2 => assert_eq!(trace, TRACE, "{what}"),
                    4 => assert_eq!(trace, PARENT_TRACE, "{what}"),
                    5 => assert_eq!(trace, UUID, "{what}"),
                    _ => assert!(is_hex(trace, 32), "{what}: generated trace id {trace}"),
                }
                let tp = body["metadata"]["traceparent"].as_str().unwrap();
                let tp_parts: Vec<&str> = tp.split('-').collect();
                assert_eq!(tp_parts.len(), 4, "{what}: traceparent {tp}");
                assert_eq!((tp_parts[0], tp_parts[3]), ("00", "01"), "{what}: {tp}");
                assert_eq!(tp_parts[1], trace.replace('-', ""), "{what}: {tp}");
                assert!(is_hex(tp_parts[2], 16), "{what}: span id in {tp}");
                let h = |name: &str| {
                    r.headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                if headers {
                    assert_eq!(h("version"), Some("1"), "{what}: {:?}", r.headers);
                    assert_eq!(h("trace_id"), Some(trace), "{what}: {:?}", r.headers);
                    assert_eq!(h("span_id"), Some(tp_parts[2]), "{what}: {:?}", r.headers);
                    assert_eq!(
                        h("tenant_id"),
                        body["tenant_id"].as_str(),
                        "{what}: {:?}",
                        r.headers
                    );
                    assert_eq!(h("traceparent"), Some(tp), "{what}: {:?}", r.headers);
                } else {
                    assert!(
                        r.headers.is_empty(),
                        "{what}: plain PUB without headers: {:?}",
                        r.headers
                    );
                }
            }
            drop(o);
            for (i, r) in replies(&run, "ide-0").iter().enumerate() {
                assert_router(r, None, &format!("reply {i}"));
                // The Router's reply comes back verbatim: its context echoes our request id.
                assert!(r.1["context"]["request_id"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{prefix:08x}-"))));
            }
        }
    });
}

/// (f) Backpressure: a client pipelining far past the per-connection in-flight limit is read
/// only as slots free up (the core pauses reading and resumes it), gets every reply in order,
/// and never has more than the limit at the Router; past the global in-flight limit, requests
/// get error 7 at once (load shedding) while those admitted are answered normally.
#[test]
fn backpressure() {
    run_seeds("backpressure", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        let mut rng = opts.rng(6);
        opts.per_conn_inflight = 2 + rng.below(3) as usize;
        let n = 20 + rng.below(20) as usize;
        println!(
            "tier2 backpressure: per_conn_inflight={} requests={n}",
            opts.per_conn_inflight
        );
        let mut run = Run::new(opts.clone(), ServerConfig::default());
        run.ide(ide(
            "ide-pipeline",
            0,
            (0..n).map(|_| Req::new("slow", 50)).collect(),
            n,
        ));
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        for (i, r) in replies(&run, "ide-pipeline").iter().enumerate() {
            assert_router(r, None, &format!("pipelined {i}"));
        }
        let o = run.obs.borrow();
        // At the Router, never more than the limit outstanding: request k+limit can only
        // arrive after reply k left the gateway.
        let seen: Vec<Duration> = o.router_seen.iter().map(|r| r.at).collect();
        let answered: Vec<Duration> = o.clients["ide-pipeline"]
            .sent
            .iter()
            .map(|s| s.reply.as_ref().unwrap().at)
            .collect();
        let limit = opts.per_conn_inflight;
        for k in 0..n - limit {
            assert!(
                seen[k + limit] + opts.max_latency * 2 >= answered[k] - opts.max_latency * 2,
                "request {} reached the Router at {:?}, before request {k} was answered at {:?}",
                k + limit,
                seen[k + limit],
                answered[k]
            );
        }
        let g = o.gateways["gateway-0"].gateway.borrow();
        assert_eq!(g.stats().backpressure_rejections, 0);
        drop(g);
        drop(o);

        // Global limit: 4 in flight for the whole gateway.
        let mut opts = Options::from_seed(seed);
        opts.max_inflight = 4;
        let mut run = Run::new(opts.clone(), ServerConfig::default());
        run.ide(ide(
            "ide-a",
            0,
            (0..4).map(|_| Req::new("slow", 400)).collect(),
            4,
        ));
        let mut b = ide("ide-b", 0, (0..4).map(|_| Req::new("ok", 0)).collect(), 4);
        b.start_delay = ms(400);
        run.ide(b);
        let mut c = ide("ide-c", 0, (0..4).map(|_| Req::new("ok", 0)).collect(), 4);
        c.start_delay = ms(1500);
        run.ide(c);
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        for (i, r) in replies(&run, "ide-a").iter().enumerate() {
            assert_router(r, None, &format!("admitted {i}"));
        }
        for (i, r) in replies(&run, "ide-b").iter().enumerate() {
            assert_error(r, 7, &format!("shed {i}"));
        }
        for (i, r) in replies(&run, "ide-c").iter().enumerate() {
            assert_router(r, None, &format!("after the load {i}"));
        }
        let o = run.obs.borrow();
        for s in &o.clients["ide-b"].sent {
            let took = s.reply.as_ref().unwrap().at - s.at;
            assert!(
                took <= slack(&opts),
                "shedding answers at once, took {took:?}"
            );
        }
        assert_eq!(
            o.gateways["gateway-0"]
                .gateway
                .borrow()
                .stats()
                .backpressure_rejections,
            4
        );
    });
}

/// The server's own keepalive and -ERR: with the gateway's PONGs lost (one-way partition),
/// the stand-in sends `-ERR 'Stale Connection'` and closes, long before the gateway's own
/// keepalive (20 s) would act. The gateway takes the -ERR as the end of the connection: the
/// request on the wire fails with error 8 at once, it reconnects once the path is back, and
/// serves again.
#[test]
fn server_stale_connection_err() {
    run_seeds("server_stale_connection_err", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        opts.ping_interval = Duration::from_secs(20);
        opts.request_timeout = Duration::from_secs(5);
        let mut rng = opts.rng(11);
        let server_ping = ms(150 + rng.below(200));
        let server = ServerConfig {
            ping_interval: Some(server_ping),
            max_pings_out: 2,
            ..ServerConfig::default()
        };
        let mut run = Run::new(opts.clone(), server);
        let mut c = ide(
            "ide-0",
            0,
            vec![Req::new("ok", 0), Req::new("ok", 0).after(ms(700))],
            1,
        );
        c.start_delay = ms(300);
        run.ide(c);
        let mut later = ide("ide-1", 0, vec![Req::new("ok", 0), Req::new("ok", 0)], 2);
        later.start_delay = ms(6000);
        run.ide(later);
        run.run_until(ms(1000));
        let shell = run.shell(0);
        assert_eq!(
            shell.gateway.borrow().upstream().state().name(),
            "connected"
        );
        run.sim.partition_oneway("gateway-0", "nats");
        let cut = run.now();
        while shell.gateway.borrow().upstream().state().name() == "connected" {
            assert!(
                run.now() < cut + ms(3000),
                "the gateway ignored the server's -ERR"
            );
            run.run_until(run.now() + ms(1));
        }
        let noticed = run.now() - cut;
        println!("tier2 server_stale_connection_err: server ping {server_ping:?}, gateway lost the connection after {noticed:?}");
        assert!(noticed <= server_ping * 4 + slack(&opts), "{noticed:?}");
        run.run_until(cut + ms(2500));
        run.sim.repair_oneway("gateway-0", "nats");
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        let r = replies(&run, "ide-0");
        assert_router(&r[0], None, "before");
        assert_error(&r[1], 8, "on the wire when the server gave up");
        for (i, r) in replies(&run, "ide-1").iter().enumerate() {
            assert_router(r, None, &format!("after repair {i}"));
        }
        let g = shell.gateway.borrow();
        assert!(g.upstream().stats().reconnects >= 1);
        assert_eq!(g.upstream().state().name(), "connected");
    });
}

/// INFO `connect_urls`: the gateway, configured with `nats` only, learns `nats-b` from INFO
/// and, when `nats` dies for good, moves there within one pass (no backoff inside a pass);
/// requests are then answered by the Router on `nats-b`.
///
/// This test found that servers learned from INFO were appended behind the server just
/// taken, so the server just lost was tried again first and the move cost a whole connect
/// timeout (seed 7166909783351885898: on nats-b after 505 ms). Fixed in nats_pool.rs; the
/// bound is now the slack alone, no connect timeout.
#[test]
fn cluster_failover_connect_urls() {
    run_seeds("cluster_failover_connect_urls", 2, |seed| {
        let opts = Options::from_seed(seed);
        let server = ServerConfig {
            connect_urls: vec!["nats-b:4222".into()],
            ..ServerConfig::default()
        };
        let mut run = Run::new(opts.clone(), server);
        run.nats_server(
            "nats-b",
            ServerConfig {
                server_id: "SIMSTANDIN-B".into(),
                ..ServerConfig::default()
            },
        );
        run.router(sim::tier2::router::RouterSpec {
            name: "router-b".into(),
            server: "nats-b".into(),
            subject: "beamline.router.v1.decide".into(),
            start_delay: Duration::ZERO,
            reconnect_delay: ms(100),
        });
        run.ide(ide(
            "ide-0",
            0,
            vec![Req::new("ok", 0), Req::new("ok", 0)],
            1,
        ));
        let mut after = ide("ide-1", 0, (0..4).map(|_| Req::new("ok", 0)).collect(), 2);
        after.start_delay = ms(2000);
        run.ide(after);
        run.run_until(ms(1000));
        let shell = run.shell(0);
        let servers: Vec<String> = shell
            .gateway
            .borrow()
            .upstream()
            .servers()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(
            servers.iter().any(|s| s.contains("nats-b:4222")),
            "learned from INFO: {servers:?}"
        );
        run.sim.crash("nats");
        let cut = run.now();
        while shell
            .gateway
            .borrow()
            .upstream()
            .server()
            .is_none_or(|s| !s.contains("nats-b"))
            || shell.gateway.borrow().upstream().state().name() != "connected"
        {
            assert!(
                run.now() <= cut + slack(&opts),
                "the gateway did not move to nats-b within one pass"
            );
            run.run_until(run.now() + ms(1));
        }
        println!(
            "tier2 cluster_failover_connect_urls: on nats-b after {:?}",
            run.now() - cut
        );
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        for (i, r) in replies(&run, "ide-0").iter().enumerate() {
            assert_router(r, None, &format!("before {i}"));
            assert_eq!(r.1["decision"]["metadata"]["router"], "router-0");
        }
        for (i, r) in replies(&run, "ide-1").iter().enumerate() {
            assert_router(r, None, &format!("after the failover {i}"));
            assert_eq!(
                r.1["decision"]["metadata"]["router"], "router-b",
                "answered through nats-b"
            );
        }
    });
}

/// What a shutdown scenario does besides the signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Slow Routers hold requests at the signal; in half the seeds the gateways' NATS links
    /// are held from before the signals until past the drain deadlines.
    Drain,
    /// The nats host goes away shortly after the signals: crashed and restarted, or
    /// partitioned and crashed (a vanished machine), then back.
    Outage,
    /// A second signal follows the first during the drain.
    Twice,
}

/// A shutdown run (gateway.md section 8): 1–2 gateways, each signalled at 0.9–1.3 s while
/// slow Routers hold its requests. Per gateway: a client whose one request the Router holds
/// past the drain deadline (so the drain lasts until it, and a second signal meets it), a
/// prober that keeps sending across the signal (its requests after it are refused), and two
/// clients with a Router behaviour mix. `Run::check_invariants` runs the shutdown check
/// (`sim::shutdown`) besides the usual ones.
fn shutdown_run(seed: u64, stop: Stop) -> Run {
    let mut opts = Options::from_seed(seed);
    let mut rng = opts.rng(20);
    opts.gateways = 1 + rng.below(2) as usize;
    let drain = 400 + rng.below(800);
    opts.drain_timeout = ms(drain);
    opts.nats_drain_timeout = ms(200 + rng.below(600));
    opts.request_timeout = ms(drain / 2 + rng.below(drain * 2));
    opts.nats_sndbuf = Some(200 + rng.below(1000) as usize);
    // The breaker is not what these runs are about (silent Routers would open it).
    opts.breaker.failures_to_open = 1_000_000;
    let mut firsts = Vec::new();
    for g in 0..opts.gateways {
        let at = ms(900 + rng.below(400));
        firsts.push(at);
        opts.signals.push((g, at));
        if stop == Stop::Twice {
            // While the held request (sent 100 ms before the first) is still in flight.
            let within = drain.min(opts.request_timeout.as_millis() as u64 - 100);
            opts.signals.push((g, at + ms(rng.below(within.max(1)))));
        }
    }
    let first = *firsts.iter().min().unwrap();
    let last = *firsts.iter().max().unwrap();
    let mut fleet = Vec::new();
    for (g, signal) in firsts.iter().enumerate() {
        let mut holder = ide(
            &format!("ide-{g}-hold"),
            g,
            vec![Req::new("slow", 10_000)],
            1,
        );
        holder.start_delay = *signal - ms(100);
        fleet.push(holder);
        let probes = (0..30).map(|_| Req::new("ok", 0).after(ms(60))).collect();
        fleet.push(ide(&format!("ide-{g}-probe"), g, probes, 1));
        for c in 0..2 {
            let n = 8 + rng.below(12) as usize;
            let reqs = (0..n)
                .map(|_| {
                    let (b, d) = match rng.below(10) {
                        0..=2 => ("ok", 0),
                        3 | 4 => ("slow", rng.below(drain / 2)),
                        5 | 6 => ("slow", drain / 2 + rng.below(drain)),
                        7 | 8 => ("slow", drain + rng.below(drain * 2)),
                        _ => ("silent", 0),
                    };
                    Req::new(b, d).after(ms(rng.below(150)))
                })
                .collect();
            let mut spec = ide(&format!("ide-{g}-{c}"), g, reqs, 1 + rng.below(3) as usize);
            spec.start_delay = ms(200 + rng.below(300));
            fleet.push(spec);
        }
    }
    let hold = stop == Stop::Drain && rng.below(2) == 0;
    let hold_end = last + ms(drain + 1 + rng.below(1500));
    let outage_at = last + ms(rng.below(300));
    let down = ms(100 + rng.below(drain + 1500));
    let vanish = rng.below(2) == 0;
    println!(
        "tier2 shutdown {stop:?}: gateways={} drain={:?} nats_drain={:?} timeout={:?} sndbuf={:?} \
         signals={:?} hold={} outage={}",
        opts.gateways,
        opts.drain_timeout,
        opts.nats_drain_timeout,
        opts.request_timeout,
        opts.nats_sndbuf,
        opts.signals,
        if hold {
            format!("{:?}..{hold_end:?}", first - ms(200))
        } else {
            "none".into()
        },
        if stop == Stop::Outage {
            format!(
                "{}@{outage_at:?} for {down:?}",
                if vanish { "vanish" } else { "crash" }
            )
        } else {
            "none".into()
        }
    );
    let gateways: Vec<String> = (0..opts.gateways).map(Options::gateway_name).collect();
    let mut run = Run::new(opts.clone(), ServerConfig::default());
    run.ide_fleet("ide-fleet", fleet);
    if hold {
        run.run_until(first - ms(200));
        for g in &gateways {
            run.sim.hold(g.as_str(), "nats");
        }
        run.run_until(hold_end);
        for g in &gateways {
            run.sim.release(g.as_str(), "nats");
        }
    }
    if stop == Stop::Outage {
        run.run_until(outage_at);
        if vanish {
            for g in &gateways {
                run.sim.partition(g.as_str(), "nats");
            }
        }
        run.sim.crash("nats");
        run.run_until(outage_at + down);
        if vanish {
            for g in &gateways {
                run.sim.repair(g.as_str(), "nats");
            }
        }
        run.sim.bounce("nats");
    }
    // Past every gateway's bound, so that a shutdown that hangs is seen as one.
    let bound = last + opts.drain_timeout + sim::shutdown::FLUSH_GRACE + opts.nats_drain_timeout;
    run.run_until(bound + slack(&opts) + ms(50));
    run.finish(ms(100));
    run.summary();
    run.check_invariants();
    // Health (gateway.md section 5): from the first signal on, UNHEALTHY ("draining") and
    // nothing else until the exit.
    for i in 0..opts.gateways {
        let shell = run.shell(i);
        let health = shell.health.borrow();
        let Some(from) = health.log.iter().position(|c| c.reason == "draining") else {
            panic!("gateway-{i} never draining: {}", health.line());
        };
        assert!(
            health.log[from..]
                .iter()
                .all(|c| c.status == HealthStatus::Unhealthy),
            "gateway-{i}: {}",
            health.line()
        );
    }
    run
}

/// Runs a shutdown scenario over its seeds and sums what the shutdown check counted.
fn shutdown_seeds(test: &str, stop: Stop) -> sim::shutdown::Report {
    let total = std::cell::RefCell::new(sim::shutdown::Report::default());
    run_seeds(test, 8, |seed| {
        let run = shutdown_run(seed, stop);
        total.borrow_mut().add(&run.shutdown);
    });
    let total = total.into_inner();
    println!("tier2 {test}: {}", total.line());
    total
}

/// (i) SIGTERM while slow Routers hold requests: what each gateway read before the signal
/// gets the Router's reply by the drain deadline or error 6 at it, what it reads after gets
/// error 6 and is never published, and `ShutdownComplete { forced: false }` comes once, with
/// the NATS session closed, within signal + drain + flush grace + NATS drain (+ slack).
#[test]
fn shutdown_drain_slow_router() {
    let s = shutdown_seeds("shutdown_drain_slow_router", Stop::Drain);
    assert_eq!(s.forced, 0, "{s:?}");
    if full_sweep() {
        s.assert_drains_covered();
    }
}

/// Sweep-wide counts only make sense over a sweep, not over one replayed seed.
fn full_sweep() -> bool {
    std::env::var_os("SIM_SEED").is_none()
}

/// (j) The nats host crashes or vanishes shortly after the signals, requests in flight: the
/// same checks; requests lost with the connection get error 8 (or error 6 at the deadline,
/// when they waited in the reconnect buffer), and the shutdown still completes in its bound.
#[test]
fn shutdown_nats_outage_during_drain() {
    let s = shutdown_seeds("shutdown_nats_outage_during_drain", Stop::Outage);
    assert_eq!(s.forced, 0, "{s:?}");
    if full_sweep() {
        assert!(s.drained > 0, "{s:?}");
        assert!(s.lost_with_link > 0, "no request lost with the link: {s:?}");
    }
}

/// (k) A second signal during the drain: `ShutdownComplete { forced: true }` at its virtual
/// time, the NATS session closed, no panic, the invariants held.
#[test]
fn shutdown_second_signal() {
    let s = shutdown_seeds("shutdown_second_signal", Stop::Twice);
    // The held request keeps every drain going until the second signal.
    assert_eq!(s.drained, 0, "{s:?}");
    if full_sweep() {
        assert!(s.forced > 0 && s.cut_by_force > 0, "{s:?}");
    }
}

/// A shutdown run replays: the same seed, the same trace (signals, exits and partial NATS
/// writes included).
#[test]
fn shutdown_same_seed_same_digest() {
    run_seeds("shutdown_same_seed_same_digest", 1, |seed| {
        for stop in [Stop::Drain, Stop::Outage, Stop::Twice] {
            let a = shutdown_run(seed, stop).digest();
            let b = shutdown_run(seed, stop).digest();
            assert_eq!(a, b, "{stop:?}: the same seed must give the same trace");
        }
    });
}
