//! Tier 1: the pure in-process harness (design.md section 4).
//!
//! One `u64` seed decides everything of a run, TigerBeetle-VOPR "swarm" style: how many
//! gateways, Routers and clients, pipeline depths, latencies, the Router behaviour mix and
//! the fault schedule ([`Options::swarm`]). [`sweep`] runs a scenario over the committed
//! regression seeds and a default number of fresh seeds (`SIM_SEEDS=N` for more), or one
//! seed (`SIM_SEED=…`); each run prints its seed and options on one line, and a failure
//! prints the seed, the options, the end of the action trace and the command that replays
//! it.

pub mod client;
pub mod world;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use ipc_gateway_core::breaker::BreakerConfig;
use ipc_gateway_core::nats_config::NatsConfig;
use ipc_gateway_core::nats_pool::Backoff;
use ipc_gateway_core::rng::Rng;
use ipc_gateway_core::Instant;

use crate::router::{Behaviour, ERROR_CLASSES};
pub use world::{Fault, Options, World};

/// The scenarios of the issue, (a) to (h), and the shutdown ones (gateway.md section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Happy,
    Headers,
    Errors,
    Timeouts,
    Storm,
    Backpressure,
    Breaker,
    Vanish,
    /// Each gateway is signalled while slow Routers hold its requests; in half the runs the
    /// NATS network holds bytes from before the signal until past the drain deadline.
    Drain,
    /// As `Drain`, and the NATS server bounces or vanishes shortly after the signals.
    DrainOutage,
    /// As `Drain`, and a second signal follows the first during the drain.
    SecondSignal,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn between(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    lo + rng.below(hi - lo + 1)
}

fn at_ms(n: u64) -> Instant {
    Instant::ZERO + ms(n)
}

/// A breaker as deployed (gateway.md section 4's ranges around the defaults), for scenarios
/// whose outages must not open it: under section 4 only a Router that takes requests and
/// does not answer them opens it, and a reconnect never inherits an opening the outage
/// caused. Open spells of seconds outlast the outages, so an opening the outage caused
/// would still be there when the link is back (the after-outage check).
fn deployed_breaker(r: &mut Rng) -> BreakerConfig {
    let open = between(r, 1000, 5000);
    BreakerConfig {
        failures_to_open: between(r, 1, 5) as u32,
        open_duration: ms(open),
        max_open_duration: ms(open * between(r, 2, 12)),
        max_probes: between(r, 1, 3) as u32,
        successes_to_close: between(r, 1, 3) as u32,
    }
}

impl Options {
    /// Every option of a run, from its seed.
    pub fn swarm(scenario: Scenario, seed: u64) -> Options {
        let mut r = Rng::new(seed);
        let per_conn = between(&mut r, 2, 10) as usize;
        let timeout = between(&mut r, 200, 800);
        let lat_hi = between(&mut r, 0, 20);
        let mut o = Options {
            seed,
            gateways: between(&mut r, 1, 3) as usize,
            routers: between(&mut r, 1, 2) as usize,
            clients_per_gateway: between(&mut r, 1, 5) as usize,
            requests_per_client: between(&mut r, 3, 25) as usize,
            traffic_until: None,
            late_client: None,
            pipeline: between(&mut r, 1, per_conn as u64) as usize,
            leave_permille: 0,
            mix: vec![(Behaviour::Ok, 1)],
            ping_frames_permille: between(&mut r, 0, 100),
            net_latency: (ms(0), ms(lat_hi)),
            router_latency: (ms(between(&mut r, 0, 5)), ms(between(&mut r, 5, 40))),
            client_spread: ms(between(&mut r, 0, 500)),
            think: ms(0),
            request_timeout: ms(timeout),
            max_inflight: 1000,
            per_conn_inflight: per_conn,
            // Breaker out of the way unless the scenario is about it or has outages
            // (`deployed_breaker`).
            breaker: BreakerConfig {
                failures_to_open: 1_000_000,
                ..BreakerConfig::default()
            },
            ping_interval: ms(between(&mut r, 300, 2000)),
            max_pings_out: between(&mut r, 1, 3) as u32,
            connect_timeout: ms(between(&mut r, 50, 300)),
            backoff: Backoff {
                initial: ms(between(&mut r, 10, 100)),
                max: ms(between(&mut r, 200, 1000)),
            },
            server_headers: true,
            faults: Vec::new(),
            signals: Vec::new(),
            drain_timeout: ms(5000),
            nats_drain_timeout: NatsConfig::default().drain_timeout,
            nats_sndbuf: None,
            health_grace: ms(5000),
        };
        let slow_short = Behaviour::Slow(ms(between(&mut r, 1, timeout / 2)));
        let slow_late = Behaviour::Slow(ms(timeout + between(&mut r, 1, timeout)));
        match scenario {
            Scenario::Happy => {}
            Scenario::Headers => {
                o.server_headers = r.below(3) != 0;
            }
            Scenario::Errors => {
                o.mix = vec![(Behaviour::Ok, 4)];
                for c in ERROR_CLASSES {
                    o.mix.push((Behaviour::Error(c.to_owned()), 2));
                }
                o.mix
                    .push((Behaviour::Disconnect(ms(between(&mut r, 50, 400))), 1));
                match r.below(3) {
                    0 => o.routers = 0, // nobody subscribed: every request meets a 503
                    1 => {
                        let at = at_ms(between(&mut r, 100, 1500));
                        let away = ms(between(&mut r, 100, 1000));
                        o.faults.push((at, Fault::RoutersAway { away }));
                    }
                    _ => {}
                }
                o.think = ms(between(&mut r, 0, 50));
            }
            Scenario::Timeouts => {
                o.mix = vec![
                    (Behaviour::Ok, 4),
                    (slow_short, 2),
                    (slow_late, 2),
                    (Behaviour::Silent, 1),
                    (Behaviour::Duplicate, 1),
                ];
                o.leave_permille = between(&mut r, 0, 400);
                o.think = ms(between(&mut r, 0, 100));
                if r.below(2) == 0 {
                    let at = at_ms(between(&mut r, 100, 1500));
                    let down = ms(between(&mut r, 10, 500));
                    o.faults.push((at, Fault::Bounce { down }));
                }
                if r.below(3) == 0 {
                    let at = at_ms(between(&mut r, 100, 1500));
                    let hold = ms(between(&mut r, 10, timeout * 2));
                    o.faults.push((at, Fault::Hold { hold }));
                }
                // Half the runs with the breaker in play: silent and slow Routers open it
                // for real, and the bounces must not.
                if r.below(2) == 0 {
                    o.breaker = deployed_breaker(&mut r);
                }
            }
            Scenario::Storm => {
                o.gateways = between(&mut r, 50, 60) as usize;
                o.routers = 1;
                o.clients_per_gateway = 1;
                o.requests_per_client = between(&mut r, 4, 10) as usize;
                o.pipeline = 2.min(per_conn);
                o.think = ms(between(&mut r, 200, 600));
                o.ping_frames_permille = 0;
                o.client_spread = ms(300);
                // gateway.md's schedule: 100 ms doubling to 2 s, jittered.
                o.backoff = Backoff::default();
                o.ping_interval = ms(5000);
                o.connect_timeout = ms(500);
                let mut t = between(&mut r, 500, 1000);
                for _ in 0..between(&mut r, 3, 4) {
                    let down = between(&mut r, 1500, 3500);
                    o.faults.push((at_ms(t), Fault::Bounce { down: ms(down) }));
                    t += down + between(&mut r, 3000, 4000);
                }
                o.breaker = deployed_breaker(&mut r);
                // The clients may be done by the first restart: one more per gateway from
                // about then shows what each admits once reconnected (after-outage check).
                if let Some((at, Fault::Bounce { down })) = o.faults.first() {
                    let late = *at + *down + ms(between(&mut r, 0, 1000));
                    o.late_client = Some((late, late + o.think * 6));
                }
            }
            Scenario::Backpressure => {
                o.max_inflight = between(&mut r, 2, 8) as usize;
                o.per_conn_inflight = between(&mut r, 1, 3) as usize;
                o.clients_per_gateway = between(&mut r, 3, 8) as usize;
                o.pipeline = between(&mut r, o.per_conn_inflight as u64 + 1, 8) as usize;
                o.router_latency = (ms(between(&mut r, 5, 30)), ms(between(&mut r, 30, 120)));
                o.client_spread = ms(between(&mut r, 0, 50));
            }
            Scenario::Breaker => {
                o.breaker = BreakerConfig {
                    failures_to_open: between(&mut r, 2, 5) as u32,
                    open_duration: ms(between(&mut r, 100, 400)),
                    max_open_duration: ms(between(&mut r, 400, 1500)),
                    max_probes: between(&mut r, 1, 3) as u32,
                    successes_to_close: between(&mut r, 1, 3) as u32,
                };
                o.think = ms(between(&mut r, 40, 60));
                o.pipeline = 1;
                o.client_spread = ms(50);
                let timeout = o.request_timeout.as_millis() as u64;
                let failures = u64::from(o.breaker.failures_to_open);
                // One request and its reply, at the most: think time and four network hops.
                let cycle = o.think.as_millis() as u64 + 4 * o.net_latency.1.as_millis() as u64;
                // 1. The Routers restart: away, so requests meet no responders, long enough
                // that counting those as failures (the old rule) would open the breaker
                // whatever was drawn: each client meets one per cycle. (Seed
                // 7887520389705641494 once drew too short a spell for that.) They leave
                // cleanly, answering what they took: no request of theirs times out.
                let away_at = between(&mut r, 300, 800);
                let away = between(&mut r, 800, 2000).max(failures * cycle + 200);
                o.faults
                    .push((at_ms(away_at), Fault::RoutersAway { away: ms(away) }));
                // 2. The Routers hang: they take requests and answer none, so requests time
                // out on a connected link, long enough for `failures` of them in a row from
                // a single client.
                let silent_at = away_at + away + between(&mut r, 300, 800);
                // The clients of a gateway (pipeline 1) meet it together: a timeout each per
                // round.
                let rounds = failures.div_ceil(o.clients_per_gateway as u64) + 1;
                let silent = between(&mut r, 800, 2000).max(rounds * (timeout + cycle) + 200);
                o.faults.push((
                    at_ms(silent_at),
                    Fault::RoutersSilent { silent: ms(silent) },
                ));
                // Traffic goes on well past the Routers' recovery: the last probe taken while
                // they hung times out, the longest open spell passes, the probes succeed.
                let busy = silent_at
                    + silent
                    + timeout
                    + o.breaker.max_open_duration.as_millis() as u64
                    + 1500;
                o.requests_per_client = (busy / 40) as usize + 10;
                o.traffic_until = Some(at_ms(busy));
                o.ping_frames_permille = 0;
            }
            Scenario::Vanish => {
                o.ping_interval = ms(between(&mut r, 200, 600));
                o.requests_per_client = between(&mut r, 10, 30) as usize;
                o.think = ms(between(&mut r, 50, 200));
                let at = at_ms(between(&mut r, 500, 1500));
                let away = o.ping_interval * (o.max_pings_out + 2) + ms(between(&mut r, 0, 2000));
                o.faults.push((at, Fault::Vanish { away }));
                o.breaker = deployed_breaker(&mut r);
                // One more client per gateway, through the outage and until the gateways are
                // back for a while (the backoff ceiling, the handshake, a second more): the
                // others may have run out of requests by then, and what a gateway admits
                // once reconnected must be seen (the after-outage check).
                let late = at + ms(between(&mut r, 0, 500));
                o.late_client = Some((late, at + away + o.backoff.max + ms(1000)));
            }
            Scenario::Drain | Scenario::DrainOutage | Scenario::SecondSignal => {
                shutdown_options(&mut o, &mut r, scenario);
            }
        }
        // Drawn last, so that every other option stays what it was: around the outages'
        // lengths, so that some outlast the grace period and some do not.
        o.health_grace = ms(between(&mut r, 50, 4000));
        o
    }

    /// One line: the seed and every option derived from it.
    pub fn summary(&self) -> String {
        let mix: Vec<String> = self
            .mix
            .iter()
            .map(|(b, w)| format!("{}x{w}", b.text()))
            .collect();
        format!(
            "seed={} gws={} routers={} clients={}x{} until={:?} late={:?} pipe={} leave={}‰ \
             ping={}‰ mix=[{}] net={:?}..{:?} router={:?}..{:?} spread={:?} think={:?} timeout={:?} \
             inflight={}/{} breaker={}/{:?}/{:?}/{}/{} keepalive={:?}x{} connect={:?} \
             backoff={:?}..{:?} headers={} faults={:?} signals={:?} drain={:?} nats_drain={:?} \
             sndbuf={:?} grace={:?}",
            self.seed,
            self.gateways,
            self.routers,
            self.clients_per_gateway,
            self.requests_per_client,
            self.traffic_until,
            self.late_client,
            self.pipeline,
            self.leave_permille,
            self.ping_frames_permille,
            mix.join(","),
            self.net_latency.0,
            self.net_latency.1,
            self.router_latency.0,
            self.router_latency.1,
            self.client_spread,
            self.think,
            self.request_timeout,
            self.max_inflight,
            self.per_conn_inflight,
            self.breaker.failures_to_open,
            self.breaker.open_duration,
            self.breaker.max_open_duration,
            self.breaker.max_probes,
            self.breaker.successes_to_close,
            self.ping_interval,
            self.max_pings_out,
            self.connect_timeout,
            self.backoff.initial,
            self.backoff.max,
            self.server_headers,
            self.faults,
            self.signals,
            self.drain_timeout,
            self.nats_drain_timeout,
            self.nats_sndbuf,
            self.health_grace
        )
    }
}

/// The shutdown scenarios' options (gateway.md section 8): drawn after everything the other
/// scenarios draw, so theirs stay as they were.
fn shutdown_options(o: &mut Options, r: &mut Rng, scenario: Scenario) {
    let drain = between(r, 300, 1500);
    o.drain_timeout = ms(drain);
    o.nats_drain_timeout = ms(between(r, 100, 1000));
    // Around the drain: some requests time out before its deadline, most do not.
    o.request_timeout = ms(between(r, drain / 2, drain * 3));
    // A NATS socket that takes a few Router requests at a time.
    o.nats_sndbuf = Some(between(r, 200, 1200) as usize);
    o.requests_per_client = between(r, 10, 40) as usize;
    o.think = ms(between(r, 0, 100));
    // The Routers hold requests: answered well within the drain, around its end, past it,
    // never.
    o.mix = vec![
        (Behaviour::Ok, 3),
        (Behaviour::Slow(ms(between(r, 1, drain / 2))), 2),
        (Behaviour::Slow(ms(between(r, drain / 2, drain * 3 / 2))), 2),
        (Behaviour::Slow(ms(between(r, drain, drain * 3))), 2),
        (Behaviour::Silent, 1),
    ];
    // Every gateway is signalled while its clients are busy (they start by 520 ms).
    let mut firsts = Vec::new();
    for g in 0..o.gateways {
        let at = between(r, 300, 700);
        firsts.push(at);
        o.signals.push((at_ms(at), g));
    }
    let (first, last) = (
        *firsts.iter().min().unwrap_or(&300),
        *firsts.iter().max().unwrap_or(&300),
    );
    match scenario {
        Scenario::Drain => {
            // Half the runs: the network holds every byte from before the first signal until
            // past the last drain deadline. Publishes pile up behind the full send buffer,
            // and each session must flush them (or give up at its own drain timeout)
            // before it closes.
            if r.below(2) == 0 {
                let start = first - between(r, 50, 250);
                let end = last + drain + between(r, 1, 1500);
                o.faults.push((
                    at_ms(start),
                    Fault::Hold {
                        hold: ms(end - start),
                    },
                ));
            }
        }
        Scenario::DrainOutage => {
            // The server goes away shortly after the signals, requests in flight.
            let at = last + between(r, 0, (drain / 2).min(300));
            let down = ms(between(r, 50, drain + 1500));
            let fault = if r.below(2) == 0 {
                Fault::Bounce { down }
            } else {
                Fault::Vanish { away: down }
            };
            o.faults.push((at_ms(at), fault));
        }
        _ => {
            // A second signal during the drain (sometimes at the same instant, sometimes
            // after the drain already ended).
            for (g, at) in firsts.iter().enumerate() {
                let second = at + between(r, 0, drain + 500);
                o.signals.push((at_ms(second), g));
            }
        }
    }
    o.signals.sort();
}

/// The next request of a client's plan.
pub fn plan_request(o: &Options, rng: &mut Rng, marker: String) -> client::ReqSpec {
    if rng.below(1000) < o.ping_frames_permille {
        return client::ReqSpec {
            kind: client::PING,
            behaviour: Behaviour::Ok,
            marker,
        };
    }
    let total: u32 = o.mix.iter().map(|(_, w)| w).sum();
    let mut pick = rng.below(u64::from(total)) as u32;
    let mut behaviour = Behaviour::Ok;
    for (b, w) in &o.mix {
        if pick < *w {
            behaviour = b.clone();
            break;
        }
        pick -= w;
    }
    client::ReqSpec {
        kind: 1 + rng.below(3) as u8,
        behaviour,
        marker,
    }
}

/// The committed regression seeds: lines `<test name> <seed>`, `#` comments.
const REGRESSION_SEEDS: &str = include_str!("../../regression-seeds.txt");

pub fn regression_seeds(test: &str) -> Vec<u64> {
    REGRESSION_SEEDS
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(t, _)| *t == test)
        .filter_map(|(_, s)| s.trim().parse().ok())
        .collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The seeds a test runs: `SIM_SEED` alone, else the regression seeds and `SIM_SEEDS` (or
/// `default`) fresh ones derived from the test name.
pub fn seeds(test: &str, default: u64) -> Vec<u64> {
    if let Some(s) = env_u64("SIM_SEED") {
        return vec![s];
    }
    let n = env_u64("SIM_SEEDS").unwrap_or(default);
    let base = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng::new(base);
    let mut all = regression_seeds(test);
    all.extend((0..n).map(|_| rng.next_u64() >> 1));
    all
}

/// Runs one seed of a scenario: the world, then the general invariants, the after-outage
/// check ([`crate::after_outage`]), the shutdown and health checks, then `check`.
/// Returns the world; panics with the replay command on any failure.
pub fn run_one(
    test: &str,
    scenario: Scenario,
    seed: u64,
    tweak: &dyn Fn(&mut Options),
    check: &dyn Fn(&World) -> Vec<String>,
) -> World {
    let mut opts = Options::swarm(scenario, seed);
    tweak(&mut opts);
    let summary = opts.summary();
    let verbose = std::env::var_os("SIM_VERBOSE").is_some();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut w = World::new(opts);
        w.run();
        w.check_quiescent();
        w.check_after_outage();
        w.check_shutdown();
        w.check_health();
        let more = check(&w);
        w.failures.extend(more);
        w
    }));
    let replay = format!("SIM_SEED={seed} cargo test -p sim --test tier1 {test}");
    match outcome {
        Ok(w) if w.failures.is_empty() => {
            println!(
                "tier1 {test} seed={seed} digest={:016x} steps={} t={:?} {}{}{}",
                w.digest(),
                w.steps,
                w.now,
                w.after_outage.line(),
                if w.opts.signals.is_empty() {
                    String::new()
                } else {
                    format!(" {}", w.shutdown.line())
                },
                if verbose {
                    format!(" {summary}")
                } else {
                    String::new()
                }
            );
            w
        }
        Ok(w) => {
            eprintln!("tier1 {test} FAILED {summary}");
            eprintln!("last actions:");
            for l in w.trace_tail() {
                eprintln!("  {l}");
            }
            for f in w.failures.iter().take(20) {
                eprintln!("  failure: {f}");
            }
            panic!(
                "{test}: seed {seed} failed ({} failures, first: {}); replay: {replay}",
                w.failures.len(),
                w.failures[0]
            );
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            eprintln!("tier1 {test} PANICKED {summary}");
            panic!("{test}: seed {seed} panicked: {msg}; replay: {replay}");
        }
    }
}

/// Runs a scenario over its seeds (see [`seeds`]); returns the worlds' summaries for
/// scenario-wide checks.
pub fn sweep(
    test: &str,
    scenario: Scenario,
    default_seeds: u64,
    check: &dyn Fn(&World) -> Vec<String>,
) -> usize {
    let seeds = seeds(test, default_seeds);
    for &seed in &seeds {
        run_one(test, scenario, seed, &|_| {}, check);
    }
    seeds.len()
}

/// The largest number of `times` within any `window`, among those in `[from, to)`.
pub fn max_in_window(
    times: &[Instant],
    from: Instant,
    to: Instant,
    window: Duration,
) -> (usize, usize) {
    let mut t: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= from && *t < to)
        .collect();
    t.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..t.len() {
        while t[i] - t[j] >= window {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    (best, t.len())
}
