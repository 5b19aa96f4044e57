//! Tier 2 of the simulation (design.md section 4): the core in a small tokio shell over
//! turmoil's simulated TCP, with hosts `nats` (the NATS server stand-in), `gateway-*`,
//! `router-*` and `ide-*`, and faults from turmoil (partition/repair, hold/release,
//! crash/bounce, latency and jitter) plus misbehaving Routers.
//!
//! A run takes one `u64` seed. Everything random comes from it: turmoil's RNG (latency,
//! jitter), each gateway's seed (request ids, inbox, reconnect jitter) and the scenario's
//! swarm options. [`Run::new`] prints the seed and every option derived from it; the caller
//! ([`seeds`]) prints the replay command on failure. [`Run::check_invariants`] ends with the
//! after-outage check ([`crate::after_outage`]): the shell notes its link, breaker and the
//! requests it reads ([`obs::Obs::logs`]), the nats host what was published. The action trace of every gateway shell
//! and every IDE reply is hashed into a digest ([`trace::Trace`]): the same seed gives the same
//! digest.

pub mod gateway_host;
pub mod ide;
pub mod nats_host;
pub mod obs;
pub mod router;
pub mod seeds;
pub mod trace;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use ipc_gateway_core::breaker::BreakerConfig;
use ipc_gateway_core::gateway::GatewayConfig;
use ipc_gateway_core::nats_config::NatsConfig;
use ipc_gateway_core::nats_session::NatsSession;
use ipc_gateway_core::rng::Rng;
use ipc_gateway_core::upstream::Upstream;
use ipc_gateway_core::Gateway;
use rand::SeedableRng;

use crate::after_outage::{check, Gateway as Checked, Reply, Report};
use crate::nats_standin::ServerConfig;
use ide::IdeSpec;
use obs::{Obs, SharedObs};
use router::RouterSpec;

/// Every setting of a run; printed at its start.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub gateways: usize,
    pub routers: usize,
    /// Routers subscribe only after this long.
    pub router_start: Duration,
    pub min_latency: Duration,
    pub max_latency: Duration,
    pub request_timeout: Duration,
    pub ping_interval: Duration,
    pub max_pings_out: u32,
    pub connect_timeout: Duration,
    pub per_conn_inflight: usize,
    pub max_inflight: usize,
    pub breaker: BreakerConfig,
    pub server_headers: bool,
    /// Hard stop: a run that is still going then has hung.
    pub duration: Duration,
    /// Shutdown signals: (gateway, virtual time), delivered by a task of the gateway host.
    pub signals: Vec<(usize, Duration)>,
    /// The gateway's drain timeout and the NATS session's.
    pub drain_timeout: Duration,
    pub nats_drain_timeout: Duration,
    /// The gateways' NATS send buffer ([`gateway_host::ShellOptions::nats_sndbuf`]).
    pub nats_sndbuf: Option<usize>,
    /// `GatewayConfig::health_grace`.
    pub health_grace: Duration,
}

impl Options {
    /// The defaults every scenario starts from, with latency drawn from the seed.
    pub fn from_seed(seed: u64) -> Options {
        let mut rng = Rng::new(seed ^ 0x7469_6572_3200_0000);
        let min = 1 + rng.below(3);
        let max = min + rng.below(8);
        Options {
            seed,
            gateways: 1,
            routers: 1,
            router_start: Duration::ZERO,
            min_latency: Duration::from_millis(min),
            max_latency: Duration::from_millis(max),
            request_timeout: Duration::from_millis(1000),
            ping_interval: Duration::from_secs(2),
            max_pings_out: 2,
            connect_timeout: Duration::from_millis(500),
            per_conn_inflight: 10,
            max_inflight: 1000,
            breaker: BreakerConfig {
                failures_to_open: 5,
                open_duration: Duration::from_millis(500),
                max_open_duration: Duration::from_secs(4),
                max_probes: 3,
                successes_to_close: 2,
            },
            server_headers: true,
            duration: Duration::from_secs(120),
            signals: Vec::new(),
            drain_timeout: GatewayConfig::default().drain_timeout,
            nats_drain_timeout: NatsConfig::default().drain_timeout,
            nats_sndbuf: None,
            health_grace: GatewayConfig::default().health_grace,
        }
    }

    /// A draw from this run's seed for scenario choices, independent of the latency draw.
    pub fn rng(&self, stream: u64) -> Rng {
        Rng::new(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream)
    }

    pub fn gateway_seed(&self, i: usize) -> u64 {
        self.seed
            .wrapping_add(1 + i as u64)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9)
    }

    pub fn gateway_name(i: usize) -> String {
        format!("gateway-{i}")
    }
}

/// The slack allowed on top of a deadline: scheduling, a few network hops, a timer tick.
pub fn slack(opts: &Options) -> Duration {
    opts.max_latency * 4 + Duration::from_millis(20)
}

/// One simulation run.
pub struct Run {
    pub sim: turmoil::Sim<'static>,
    pub obs: SharedObs,
    pub opts: Options,
    /// Set by the scenario when clients are expected to leave or lose replies.
    pub lenient_clients: Vec<String>,
    /// What the after-outage check found ([`Run::check_invariants`] runs it).
    pub after_outage: Report,
    /// What the shutdown check found ([`Run::check_invariants`] runs it when gateways are
    /// signalled).
    pub shutdown: crate::shutdown::Report,
}

impl Run {
    /// Builds the hosts `nats`, `gateway-*`, `router-*` (IDE hosts are added by the scenario).
    pub fn new(opts: Options, server: ServerConfig) -> Run {
        println!("tier2 options: {opts:?}");
        println!(
            "tier2 nats server: headers={} max_payload={} connect_urls={:?} ping_interval={:?}",
            server.headers, server.max_payload, server.connect_urls, server.ping_interval
        );
        let mut builder = turmoil::Builder::new();
        builder
            .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
            .simulation_duration(opts.duration)
            .tick_duration(Duration::from_millis(1))
            .min_message_latency(opts.min_latency)
            .max_message_latency(opts.max_latency)
            .tcp_capacity(1 << 16);
        let rng = rand::rngs::SmallRng::seed_from_u64(opts.seed);
        let mut sim = builder.build_with_rng(Box::new(rng));
        let obs: SharedObs = Rc::new(RefCell::new(Obs::default()));

        let o = obs.clone();
        sim.host("nats", move || nats_host::run(server.clone(), o.clone()));
        for i in 0..opts.gateways {
            let name = Options::gateway_name(i);
            let o = obs.clone();
            let (gc, nc) = gateway_configs(&opts, i);
            let host = name.clone();
            let shell = gateway_host::ShellOptions {
                signals: opts
                    .signals
                    .iter()
                    .filter(|(g, _)| *g == i)
                    .map(|(_, at)| *at)
                    .collect(),
                nats_sndbuf: opts.nats_sndbuf,
            };
            sim.host(host.as_str(), move || {
                let gateway = Gateway::<NatsSession>::new(gc.clone(), nc.clone());
                gateway_host::run(name.clone(), gateway, o.clone(), shell.clone())
            });
        }
        for i in 0..opts.routers {
            let spec = RouterSpec {
                name: format!("router-{i}"),
                server: "nats".into(),
                subject: "beamline.router.v1.decide".into(),
                start_delay: opts.router_start,
                reconnect_delay: Duration::from_millis(100),
            };
            let o = obs.clone();
            sim.host(spec.name.clone().as_str(), move || {
                router::run(spec.clone(), o.clone())
            });
        }
        Run {
            sim,
            obs,
            opts,
            lenient_clients: Vec::new(),
            after_outage: Report::default(),
            shutdown: crate::shutdown::Report::default(),
        }
    }

    /// Many IDE clients on one host (one connection each): hosts cost a runtime tick each
    /// per simulated millisecond, connections almost nothing.
    pub fn ide_fleet(&mut self, host: &str, specs: Vec<IdeSpec>) {
        let o = self.obs.clone();
        self.sim.client(host, async move {
            let tasks: Vec<_> = specs
                .into_iter()
                .map(|spec| {
                    let what = format!("fleet: {}", spec.name);
                    obs::spawn_watched(&o, what, {
                        let o = o.clone();
                        async move {
                            let _ = ide::run(spec, o).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
            Ok(())
        });
    }

    /// One more NATS server host (not clustered with `nats`: it routes only its own clients).
    pub fn nats_server(&mut self, name: &str, server: ServerConfig) {
        let o = self.obs.clone();
        self.sim
            .host(name, move || nats_host::run(server.clone(), o.clone()));
    }

    /// One more Router host.
    pub fn router(&mut self, spec: RouterSpec) {
        let o = self.obs.clone();
        let name = spec.name.clone();
        self.sim
            .host(name.as_str(), move || router::run(spec.clone(), o.clone()));
    }

    pub fn ide(&mut self, spec: IdeSpec) {
        let o = self.obs.clone();
        let name = spec.name.clone();
        self.sim.client(name.as_str(), ide::run(spec, o));
    }

    /// Steps until virtual time `t` (or every client is done, if `stop_when_done`).
    pub fn run_until(&mut self, t: Duration) {
        while self.sim.elapsed() < t {
            self.step();
        }
    }

    fn step(&mut self) -> bool {
        match self.sim.step() {
            Ok(done) => done,
            Err(e) => panic!("simulation failed at {:?}: {e}", self.sim.elapsed()),
        }
    }

    /// Steps until every client is done, then `settle` more (deadlines pass, nothing leaks).
    pub fn finish(&mut self, settle: Duration) {
        while !self.step() {}
        let end = self.sim.elapsed() + settle;
        self.run_until(end);
    }

    pub fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    pub fn digest(&self) -> u64 {
        self.obs.borrow().trace.digest()
    }

    pub fn shell(&self, i: usize) -> Rc<gateway_host::Shell> {
        self.obs.borrow().gateways[&Options::gateway_name(i)].clone()
    }

    /// The invariants of gateway.md section 1, after the run.
    pub fn check_invariants(&mut self) {
        let obs = self.obs.borrow();
        // 6. Never dies of input: no task panicked, every gateway still runs.
        assert!(obs.panics.is_empty(), "tasks panicked: {:?}", obs.panics);
        // Health agreed with what each shell saw, after every input, and every spell
        // without NATS met the grace period (gateway.md section 5, `crate::health`).
        for shell in obs.gateways.values() {
            let failures = shell.health_failures.borrow();
            assert!(
                failures.is_empty(),
                "{} health check failures, first: {}",
                failures.len(),
                failures[0]
            );
            let grace = shell.gateway.borrow().config().health_grace;
            if let Err(e) = shell.health.borrow().check_outages(grace) {
                panic!("{}: {e}", shell.name);
            }
        }
        drop(obs);
        for i in 0..self.opts.gateways {
            assert!(
                self.sim.is_host_running(Options::gateway_name(i).as_str()),
                "gateway-{i} stopped"
            );
        }
        // Clients of a signalled gateway lose their connection when it exits; the shutdown
        // check judges their replies.
        let signalled: Vec<String> = self
            .opts
            .signals
            .iter()
            .map(|(g, _)| Options::gateway_name(*g))
            .collect();
        let lenient_shutdown = |name: &str| {
            let o = self.obs.borrow();
            o.client_gateway
                .get(name)
                .is_some_and(|g| signalled.contains(g))
        };
        let obs = self.obs.borrow();
        let slack = slack(&self.opts);
        for (name, c) in &obs.clients {
            let lenient = self.lenient_clients.contains(name) || lenient_shutdown(name);
            // 1. Exactly one reply per request, in request order.
            assert_eq!(c.extra_replies, 0, "{name}: replies without a request");
            assert!(c.done || c.lost_at.is_some(), "{name}: never finished");
            if !lenient {
                assert!(
                    c.lost_at.is_none(),
                    "{name}: connection lost at {:?}",
                    c.lost_at
                );
            }
            let windows = c
                .sent
                .len()
                .div_ceil(self.opts.per_conn_inflight.max(1))
                .max(1) as u32;
            for (i, s) in c.sent.iter().enumerate() {
                let Some(r) = &s.reply else {
                    assert!(
                        lenient,
                        "{name}: request {i} ({}) sent at {:?} got no reply (hang)",
                        s.behaviour, s.at
                    );
                    continue;
                };
                // 3. No mix-up: a Router reply carries the tag of the request it answers.
                if r.kind == ipc_gateway_core::frame::kind::RESPONSE_OK {
                    let v: serde_json::Value = serde_json::from_slice(&r.payload)
                        .unwrap_or_else(|e| panic!("{name}: reply {i} is not JSON: {e}"));
                    let tag = v["decision"]["metadata"]["tag"]
                        .as_str()
                        .or(v["error"]["details"]["tag"].as_str());
                    assert_eq!(
                        tag,
                        Some(s.tag.as_str()),
                        "{name}: reply {i} answers another request: {v}"
                    );
                } else {
                    assert_eq!(
                        r.kind,
                        ipc_gateway_core::frame::kind::RESPONSE_ERROR,
                        "{name}: reply {i} kind"
                    );
                }
                // 2. No hang: answered by its deadline (+ slack; a pipelined request waits
                // for a free in-flight slot before its deadline starts).
                let bound = self.opts.request_timeout * windows + slack;
                assert!(
                    r.at - s.at <= bound,
                    "{name}: request {i} ({}) answered after {:?} > {bound:?}",
                    s.behaviour,
                    r.at - s.at
                );
            }
        }
        for (name, shell) in &obs.gateways {
            let g = shell.gateway.borrow();
            g.assert_invariants();
            if shell.exited() {
                // Checked as it was at its exit (the shutdown check): a forced exit may leave
                // replies unwritten in its connections.
                continue;
            }
            // 4. No leak, once traffic stopped and deadlines passed.
            assert!(
                g.is_quiescent(),
                "{name}: not quiescent: inflight={} upstream_pending={} connections={}",
                g.inflight_len(),
                g.upstream().pending(),
                g.connection_count()
            );
            // 5. Bounded memory: the session checks its own bounds in assert_invariants.
        }
        drop(obs);
        self.check_after_outage();
        if !self.opts.signals.is_empty() {
            self.check_shutdown();
        }
    }

    /// The shutdown check ([`crate::shutdown`]) over every signalled gateway: the drain,
    /// `ShutdownComplete` and the exit. Its counts stay in [`Run::shutdown`].
    pub fn check_shutdown(&mut self) {
        let obs = self.obs.borrow();
        let mut report = crate::shutdown::Report::default();
        for (name, shell) in &obs.gateways {
            let signals = shell.signals.borrow().clone();
            if signals.is_empty() {
                continue;
            }
            let default_log = crate::after_outage::GatewayLog::default();
            let log = obs.logs.get(name).unwrap_or(&default_log);
            let mut requests = Vec::new();
            for (client, c) in &obs.clients {
                if obs.client_gateway.get(client) != Some(name) {
                    continue;
                }
                for s in &c.sent {
                    let taken = log.taken.iter().find(|(_, t)| *t == s.tag).map(|(m, _)| *m);
                    let reply = s.reply.as_ref().map(obs::Reply::judged);
                    let published = obs
                        .published
                        .iter()
                        .any(|(_, who, tag)| who == name && *tag == s.tag);
                    requests.push(crate::shutdown::Request {
                        marker: s.tag.clone(),
                        taken,
                        reply,
                        published,
                    });
                }
            }
            let g = shell.gateway.borrow();
            let s = g.upstream();
            let exit = shell.exit.borrow().clone();
            let gw = crate::shutdown::Gateway {
                seed: self.opts.seed,
                name,
                signals: &signals,
                signals_after_exit: shell.signals_after_exit.get(),
                drain_timeout: self.opts.drain_timeout,
                nats_drain_timeout: self.opts.nats_drain_timeout,
                reply_slack: slack(&self.opts),
                bound_slack: slack(&self.opts),
                exit: exit.as_ref(),
                end_state: format!(
                    "shutdown {}, NATS session {} (requests held {}, output pending {})",
                    g.shutdown_state().name(),
                    s.state().name(),
                    s.pending(),
                    s.has_output()
                ),
                requests: &requests,
                log,
            };
            crate::shutdown::check(&gw, &mut report);
        }
        drop(obs);
        println!("tier2 seed={} {}", self.opts.seed, report.line());
        assert!(
            report.failures.is_empty(),
            "the shutdown went wrong:\n{}",
            report.failures.join("\n")
        );
        self.shutdown = report;
    }

    /// The after-outage check ([`crate::after_outage`]) over every gateway: once a gateway's
    /// NATS session is Connected again, the first request it admits is published, not
    /// refused by the breaker. Its counts stay in [`Run::after_outage`].
    pub fn check_after_outage(&mut self) {
        let obs = self.obs.borrow();
        let mut report = Report::default();
        let reply = |tag: &str| -> Option<Reply> {
            let (client, i) = tag.rsplit_once('/')?;
            let r = obs
                .clients
                .get(client)?
                .sent
                .get(i.parse::<usize>().ok()?)?;
            r.reply.as_ref().map(obs::Reply::judged)
        };
        for (name, log) in &obs.logs {
            let published: Vec<(Duration, String)> = obs
                .published
                .iter()
                .filter(|(_, who, _)| who == name)
                .map(|(at, _, tag)| (*at, tag.clone()))
                .collect();
            let gw = Checked {
                seed: self.opts.seed,
                name,
                request_timeout: self.opts.request_timeout,
                log,
                routers_away: &[],
                published: &published,
                shutdown_at: obs
                    .gateways
                    .get(name.as_str())
                    .and_then(|s| s.signals.borrow().first().copied()),
            };
            check(&gw, &reply, &mut report);
        }
        drop(obs);
        println!("tier2 seed={} {}", self.opts.seed, report.line());
        assert!(
            report.failures.is_empty(),
            "after an outage the breaker refused or lost the first request:\n{}",
            report.failures.join("\n")
        );
        self.after_outage = report;
    }

    /// Prints the run's summary line.
    pub fn summary(&self) {
        let obs = self.obs.borrow();
        let replies: usize = obs
            .clients
            .values()
            .map(|c| c.sent.iter().filter(|s| s.reply.is_some()).count())
            .sum();
        println!(
            "tier2 seed={} t={:?} trace_lines={} digest={:016x} replies={} router_requests={} nats_accepts={}",
            self.opts.seed,
            self.sim.elapsed(),
            obs.trace.len(),
            obs.trace.digest(),
            replies,
            obs.router_seen.len(),
            obs.nats_accepts.len()
        );
    }
}

/// The gateway and NATS session configuration of gateway `i`.
pub fn gateway_configs(opts: &Options, i: usize) -> (GatewayConfig, NatsConfig) {
    let seed = opts.gateway_seed(i);
    let mut gc = GatewayConfig {
        max_inflight: opts.max_inflight,
        request_timeout: opts.request_timeout,
        drain_timeout: opts.drain_timeout,
        breaker: opts.breaker,
        health_grace: opts.health_grace,
        seed,
        ..GatewayConfig::default()
    };
    gc.connection.max_inflight = opts.per_conn_inflight;
    let mut nc = NatsConfig {
        connect_timeout: opts.connect_timeout,
        handshake_timeout: opts.connect_timeout * 2,
        ping_interval: opts.ping_interval,
        max_pings_outstanding: opts.max_pings_out,
        client_name: format!("ipc-gateway@{}", Options::gateway_name(i)),
        drain_timeout: opts.nats_drain_timeout,
        ..NatsConfig::default()
    };
    nc.set_servers("nats://nats:4222")
        .expect("a valid server list");
    (gc, nc)
}
