//! The tier-1 world: gateways (the production core, `Gateway<NatsSession>`), the NATS
//! stand-in, Router behaviours and IDE clients as plain structs, joined by byte queues with
//! latency, under a virtual clock that jumps to the next deadline.
//!
//! The shell is modelled on the mio one: a session's bytes are written only after
//! `Transmit`, a client's bytes are read only on a readiness edge (new bytes, `ResumeRead`)
//! and only while the gateway wants to read; socket outcomes are reported under the session's
//! link id, so the session itself drops reports about a link it gave up. The order of
//! actions and the moment NATS output is flushed are the core's (`Gateway::poll_action`).

use std::collections::BTreeMap;
use std::time::Duration;

use ipc_gateway_core::breaker::BreakerConfig;
use ipc_gateway_core::connection::ConnectionLimits;
use ipc_gateway_core::frame::MAX_FRAME_BYTES;
use ipc_gateway_core::gateway::{AllowedUids, Shutdown};
use ipc_gateway_core::nats_config::{LinkId, NatsConfig, NatsInput, SessionAction, SessionState};
use ipc_gateway_core::nats_pool::Backoff;
use ipc_gateway_core::nats_session::NatsSession;
use ipc_gateway_core::rng::Rng;
use ipc_gateway_core::upstream::Upstream;
use ipc_gateway_core::{Action, ConnId, Gateway, GatewayConfig, Instant, PeerCredentials};

use super::client::{Client, Expect};
use crate::after_outage::{self, GatewayLog, Mark, Outage, Report};
use crate::health::{HealthWatch, Seen};
use crate::nats_standin::{self, NatsStandin, ServerConfig};
use crate::router::Router;
use crate::shutdown::{self, Exit, Socket};

pub const SUBJECT: &str = "beamline.router.v1.decide";

/// A fault and when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The server process restarts: connections closed, connects refused for `down`.
    Bounce { down: Duration },
    /// The server machine vanishes: nothing is delivered either way and connects hang, for
    /// `away`; then it comes back as a fresh process.
    Vanish { away: Duration },
    /// Every byte on the network is held (not lost) until the hold ends.
    Hold { hold: Duration },
    /// Every Router leaves NATS for `away` (requests meet no responders).
    RoutersAway { away: Duration },
    /// Every Router hangs for `silent`: subscribed, it takes requests and answers none.
    RoutersSilent { silent: Duration },
}

/// Everything a run depends on, all derived from the seed.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub gateways: usize,
    pub routers: usize,
    pub clients_per_gateway: usize,
    pub requests_per_client: usize,
    /// Clients write no new request from then on.
    pub traffic_until: Option<Instant>,
    /// One more client per gateway (`g<n>late`, pipeline 1), writing from the first instant
    /// until the second.
    pub late_client: Option<(Instant, Instant)>,
    pub pipeline: usize,
    /// Share (per mille) of clients that hang up with requests in flight.
    pub leave_permille: u64,
    /// Router behaviours and weights, as `sim` texts.
    pub mix: Vec<(crate::router::Behaviour, u32)>,
    pub ping_frames_permille: u64,
    pub net_latency: (Duration, Duration),
    pub router_latency: (Duration, Duration),
    pub client_spread: Duration,
    /// A client's pause between a reply and its next request.
    pub think: Duration,
    pub request_timeout: Duration,
    pub max_inflight: usize,
    pub per_conn_inflight: usize,
    pub breaker: BreakerConfig,
    pub ping_interval: Duration,
    pub max_pings_out: u32,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    pub server_headers: bool,
    pub faults: Vec<(Instant, Fault)>,
    /// Shutdown signals (SIGTERM, SIGINT): when, and to which gateway. The shell calls
    /// `Gateway::handle_shutdown` and pumps; from the first on it accepts no connection.
    pub signals: Vec<(Instant, usize)>,
    /// The gateway's drain timeout (`GatewayConfig::drain_timeout`).
    pub drain_timeout: Duration,
    /// The NATS session's own drain timeout (`NatsConfig::drain_timeout`).
    pub nats_drain_timeout: Duration,
    /// The send buffer of each gateway's NATS socket, in bytes: the shell writes only what
    /// fits and the rest when the server has taken bytes (a write-readiness edge), as the mio
    /// shell does after `WouldBlock`. `None`: every write is taken whole.
    pub nats_sndbuf: Option<usize>,
    /// `GatewayConfig::health_grace`: how long without NATS is DEGRADED rather than UNHEALTHY.
    pub health_grace: Duration,
}

#[derive(Debug)]
enum Ev {
    ConnectDone {
        gw: usize,
        link: LinkId,
    },
    /// Bytes on the stand-in connection `conn` from gateway `gw`'s link `link`: lost if it
    /// closed meanwhile. Their arrival frees the gateway's send buffer.
    ToServer {
        conn: nats_standin::ConnId,
        gw: usize,
        link: LinkId,
        bytes: Vec<u8>,
    },
    ToGw {
        gw: usize,
        link: LinkId,
        bytes: Vec<u8>,
    },
    LinkClosed {
        gw: usize,
        link: LinkId,
    },
    ClientStart {
        client: usize,
    },
    ClientWake {
        client: usize,
    },
    Fault(Fault),
    FaultEnd(Fault),
    /// A shutdown signal to gateway `gw`.
    Signal {
        gw: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// The shell's socket for the session's link: what a real shell would hold.
enum LinkState {
    Idle,
    Connecting(LinkId),
    Open(LinkId, nats_standin::ConnId),
}

impl LinkState {
    /// Whether the shell still holds an open socket for `link`.
    fn is_open(self, link: LinkId) -> bool {
        matches!(self, LinkState::Open(l, _) if l == link)
    }
}

pub struct Node {
    pub gw: Gateway<NatsSession>,
    link: LinkState,
    clients: BTreeMap<ConnId, usize>,
    /// When the core said `ShutdownComplete`, and whether a second signal forced it.
    pub shutdown_complete: Option<(Instant, bool)>,
    /// The shutdown signals it took, in the order of events.
    pub signals: Vec<Mark>,
    /// Signals that came after its exit (ignored: the process is gone).
    pub signals_after_exit: u64,
    /// The core on `ShutdownComplete`; from then on the node is gone (the process exited):
    /// no input reaches it, its sockets are closed.
    pub exit: Option<Exit>,
    /// Every change of `Gateway::shutdown_state`, as seen at the end of an input.
    pub shutdown_log: Vec<(Instant, &'static str)>,
    /// Bytes written to the NATS socket that the server has not taken yet (`nats_sndbuf`).
    unacked: usize,
    /// The last NATS write did not fit: the rest goes when bytes arrive at the server.
    write_blocked: bool,
    /// When the session last stopped being Connected (for keepalive checks).
    pub lost_at: Option<Instant>,
    /// Every time the session stopped being Connected.
    pub lost_times: Vec<Instant>,
    pub reconnected_at: Vec<Instant>,
    /// Whether the session was Connected when each vanish began.
    pub up_at_vanish: Vec<bool>,
    /// Link, breaker and requests read, in the order of events (the after-outage check).
    pub log: GatewayLog,
    /// Health as checked after every input ([`crate::health`]).
    pub health: HealthWatch,
}

/// What a run produced, for the per-scenario checks.
pub struct World {
    pub opts: Options,
    pub now: Instant,
    pub nodes: Vec<Node>,
    pub server: NatsStandin,
    pub routers: Vec<Router>,
    pub clients: Vec<Client>,
    queue: BTreeMap<(Instant, u64), Ev>,
    seq: u64,
    rng: Rng,
    /// Per-direction FIFO: the last delivery time of each gateway's stream, each way.
    last_up: Vec<Instant>,
    last_down: Vec<Instant>,
    vanished: bool,
    hold_until: Instant,
    pub restarts: Vec<Instant>,
    /// Which gateway each stand-in connection belonged to.
    pub conn_owner: BTreeMap<nats_standin::ConnId, usize>,
    pub resume_reads: u64,
    pub vanished_at: Vec<Instant>,
    pub faults_done: usize,
    pub signals_done: usize,
    digest: u64,
    pub steps: u64,
    pub failures: Vec<String>,
    /// Every Routers-away spell that ended, and the one going on.
    pub routers_away: Vec<Outage>,
    away_since: Option<Mark>,
    /// The order of events, for [`Mark`]s.
    ord: u64,
    /// What the after-outage check found (set by [`World::check_after_outage`]).
    pub after_outage: Report,
    /// What the shutdown check found (set by [`World::check_shutdown`]).
    pub shutdown: shutdown::Report,
    trace_tail: Vec<String>,
    /// `SIM_TRACE=1`: print every trace line as it happens (replaying one seed).
    print_trace: bool,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hard stop on virtual time: a run still busy then has hung.
const HORIZON: Duration = Duration::from_secs(900);

impl World {
    pub fn new(opts: Options) -> World {
        let mut rng = Rng::new(opts.seed ^ 0x5157_0001);
        let mut server = NatsStandin::new(ServerConfig {
            headers: opts.server_headers,
            ..ServerConfig::default()
        });
        let routers = (0..opts.routers)
            .map(|i| {
                Router::new(
                    &format!("router{i}"),
                    SUBJECT,
                    opts.router_latency,
                    rng.next_u64(),
                    &mut server,
                )
            })
            .collect();
        let expect = Expect {
            request_timeout: opts.request_timeout,
            per_conn_limit: opts.per_conn_inflight,
            slack: Duration::from_millis(50) + opts.net_latency.1 * 4,
            shutdown: !opts.signals.is_empty(),
        };
        let mut nodes = Vec::new();
        let mut clients = Vec::new();
        for g in 0..opts.gateways {
            let gw_seed = rng.next_u64();
            let config = GatewayConfig {
                max_connections: 64,
                max_inflight: opts.max_inflight,
                connection: ConnectionLimits {
                    max_frame_bytes: MAX_FRAME_BYTES,
                    max_inflight: opts.per_conn_inflight,
                    read_timeout: Duration::from_secs(10),
                    max_unsent_bytes: 8 * 1024 * 1024,
                },
                request_timeout: opts.request_timeout,
                drain_timeout: opts.drain_timeout,
                breaker: opts.breaker,
                health_grace: opts.health_grace,
                allowed_uids: AllowedUids::Any,
                seed: gw_seed,
                version: "sim".to_owned(),
            };
            let mut nats = NatsConfig {
                connect_timeout: opts.connect_timeout,
                handshake_timeout: opts.connect_timeout * 2,
                ping_interval: opts.ping_interval,
                max_pings_outstanding: opts.max_pings_out,
                backoff: opts.backoff,
                client_name: format!("ipc-gateway@sim{g}"),
                subject: SUBJECT.to_owned(),
                drain_timeout: opts.nats_drain_timeout,
                ..NatsConfig::default()
            };
            nats.set_servers("nats://nats.sim:4222").expect("valid url");
            nodes.push(Node {
                gw: Gateway::<NatsSession>::new(config, nats),
                link: LinkState::Idle,
                clients: BTreeMap::new(),
                shutdown_complete: None,
                signals: Vec::new(),
                signals_after_exit: 0,
                exit: None,
                shutdown_log: Vec::new(),
                unacked: 0,
                write_blocked: false,
                lost_at: None,
                lost_times: Vec::new(),
                reconnected_at: Vec::new(),
                up_at_vanish: Vec::new(),
                log: GatewayLog::default(),
                health: HealthWatch::default(),
            });
            for c in 0..opts.clients_per_gateway {
                let name = format!("g{g}c{c}");
                let plan = (0..opts.requests_per_client)
                    .map(|r| super::plan_request(&opts, &mut rng, format!("{name}r{r}")))
                    .collect();
                let start = Instant::ZERO
                    + Duration::from_millis(20)
                    + Duration::from_nanos(rng.below(opts.client_spread.as_nanos() as u64 + 1));
                let leave = (rng.below(1000) < opts.leave_permille)
                    .then(|| rng.below(opts.requests_per_client as u64) as usize);
                let mut client = Client::new(name, g, start, plan, opts.pipeline, leave, expect);
                client.stop_at = opts.traffic_until;
                clients.push(client);
            }
            if let Some((start, stop)) = opts.late_client {
                let name = format!("g{g}late");
                // Enough to write until `stop`: at least a think time per request.
                let n = (stop - start).as_millis()
                    / opts.think.max(Duration::from_millis(1)).as_millis()
                    + 1;
                let plan = (0..n)
                    .map(|r| super::plan_request(&opts, &mut rng, format!("{name}r{r}")))
                    .collect();
                let mut late = Client::new(name, g, start, plan, 1, None, expect);
                late.stop_at = Some(stop);
                clients.push(late);
            }
        }
        let n = nodes.len();
        let mut w = World {
            opts,
            now: Instant::ZERO,
            nodes,
            server,
            routers,
            clients,
            queue: BTreeMap::new(),
            seq: 0,
            rng,
            last_up: vec![Instant::ZERO; n],
            last_down: vec![Instant::ZERO; n],
            vanished: false,
            hold_until: Instant::ZERO,
            restarts: Vec::new(),
            conn_owner: BTreeMap::new(),
            resume_reads: 0,
            vanished_at: Vec::new(),
            faults_done: 0,
            signals_done: 0,
            digest: FNV_OFFSET,
            steps: 0,
            failures: Vec::new(),
            routers_away: Vec::new(),
            away_since: None,
            ord: 0,
            after_outage: Report::default(),
            shutdown: shutdown::Report::default(),
            trace_tail: Vec::new(),
            print_trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        for i in 0..w.clients.len() {
            let at = w.clients[i].start_at;
            w.push(at, Ev::ClientStart { client: i });
        }
        for (at, f) in w.opts.faults.clone() {
            w.push(at, Ev::Fault(f));
        }
        for (at, gw) in w.opts.signals.clone() {
            w.push(at, Ev::Signal { gw });
        }
        w
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The last trace lines, for a failure report.
    pub fn trace_tail(&self) -> &[String] {
        &self.trace_tail
    }

    fn trace(&mut self, line: String) {
        for b in line.as_bytes().iter().chain(b"\n") {
            self.digest = (self.digest ^ u64::from(*b)).wrapping_mul(FNV_PRIME);
        }
        if self.print_trace {
            eprintln!("  {line}");
        }
        if self.trace_tail.len() >= 40 {
            self.trace_tail.remove(0);
        }
        self.trace_tail.push(line);
    }

    /// Now, in the order of events.
    fn mark(&mut self) -> Mark {
        self.ord += 1;
        Mark {
            ord: self.ord,
            at: self.now - Instant::ZERO,
        }
    }

    /// Notes gateway `g`'s link and breaker, at the start and end of every [`World::pump`]:
    /// the start sees what the input changed before anything nested runs.
    fn observe(&mut self, g: usize) {
        let mark = self.mark();
        let node = &mut self.nodes[g];
        node.log.observe_gateway(mark, &node.gw);
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.opts.net_latency;
        lo + Duration::from_nanos(self.rng.below(hi.saturating_sub(lo).as_nanos() as u64 + 1))
    }

    /// When bytes sent now on this stream arrive: after the latency, after what was sent
    /// before (TCP keeps order), and after a hold.
    fn arrival(&mut self, gw: usize, up: bool) -> Instant {
        let at = (self.now + self.latency()).max(self.hold_until);
        let last = if up {
            &mut self.last_up[gw]
        } else {
            &mut self.last_down[gw]
        };
        let at = at.max(*last);
        *last = at;
        at
    }

    /// Runs until traffic has stopped and every deadline has passed.
    pub fn run(&mut self) {
        let quiet = self.opts.request_timeout * 3
            + self.opts.ping_interval * (self.opts.max_pings_out + 2)
            + Duration::from_secs(2)
            + self
                .opts
                .mix
                .iter()
                .map(|(b, _)| match b {
                    crate::router::Behaviour::Slow(d) | crate::router::Behaviour::Disconnect(d) => {
                        *d
                    }
                    _ => Duration::ZERO,
                })
                .max()
                .unwrap_or_default()
            // A shutdown may take its drain, the flush grace and the session's drain.
            + if self.opts.signals.is_empty() {
                Duration::ZERO
            } else {
                self.opts.drain_timeout + shutdown::FLUSH_GRACE + self.opts.nats_drain_timeout
            };
        let mut traffic_end: Option<Instant> = None;
        for g in 0..self.nodes.len() {
            self.nodes[g].gw.handle_timeout(self.now);
            self.pump(g);
        }
        loop {
            self.steps += 1;
            let next = [
                self.queue.keys().next().map(|k| k.0),
                self.nodes
                    .iter()
                    .filter(|n| n.exit.is_none())
                    .filter_map(|n| n.gw.poll_timeout())
                    .min(),
                self.routers.iter().filter_map(Router::poll_timeout).min(),
                self.server.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next else { break };
            self.now = self.now.max(next);
            if self.now > Instant::ZERO + HORIZON {
                self.failures.push(format!(
                    "hang: virtual time passed {HORIZON:?} with traffic still going"
                ));
                break;
            }
            if traffic_end.is_none()
                && self.clients.iter().all(Client::finished)
                && self.faults_done == self.opts.faults.len()
                && self.signals_done == self.opts.signals.len()
            {
                traffic_end = Some(self.now);
            }
            if traffic_end.is_some_and(|t| self.now > t + quiet) {
                break;
            }
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let ev = entry.remove();
                self.handle(ev);
            }
            for g in 0..self.nodes.len() {
                if self.nodes[g].exit.is_none()
                    && self.nodes[g]
                        .gw
                        .poll_timeout()
                        .is_some_and(|t| t <= self.now)
                {
                    self.nodes[g].gw.handle_timeout(self.now);
                    self.pump(g);
                }
            }
            let mut router_moved = false;
            for r in 0..self.routers.len() {
                if self.routers[r]
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.routers[r].handle_timeout(self.now, &mut self.server);
                    router_moved = true;
                }
            }
            if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
                self.server.handle_timeout(self.now);
                router_moved = true;
            }
            if router_moved {
                self.route_server();
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::ClientStart { client } => {
                let g = self.clients[client].gw;
                if !self.nodes[g].signals.is_empty() {
                    // The shell closed its listener at the signal.
                    self.trace(format!("{now:?} g{g} client {client} refused"));
                    self.clients[client].refuse();
                    return;
                }
                let conn = self.nodes[g]
                    .gw
                    .handle_client_opened(PeerCredentials::default(), now);
                self.trace(format!("{now:?} g{g} client {client} opened {conn:?}"));
                self.clients[client].conn = Some(conn);
                self.nodes[g].clients.insert(conn, client);
                self.clients[client].fill(now);
                self.pump(g);
                self.client_edge(client);
            }
            Ev::ClientWake { client } => {
                self.clients[client].fill(now);
                self.client_edge(client);
            }
            Ev::ConnectDone { gw, link } => {
                if self.nodes[gw].exit.is_some()
                    || self.nodes[gw].link != LinkState::Connecting(link)
                {
                    return; // the session gave this attempt up; the shell closed its socket
                }
                if self.vanished {
                    return; // the SYN goes nowhere: the session's connect timeout decides
                }
                match self.server.open(now) {
                    Some(c) => {
                        self.nodes[gw].link = LinkState::Open(link, c);
                        self.conn_owner.insert(c, gw);
                        self.trace(format!("{now:?} g{gw} tcp up {c:?}"));
                        self.nodes[gw]
                            .gw
                            .handle_upstream(NatsInput::Connected(link), now);
                        self.pump(gw);
                        self.route_server();
                    }
                    None => {
                        self.nodes[gw].link = LinkState::Idle;
                        self.trace(format!("{now:?} g{gw} tcp refused"));
                        self.nodes[gw]
                            .gw
                            .handle_upstream(NatsInput::ConnectFailed(link), now);
                        self.pump(gw);
                    }
                }
            }
            Ev::ToServer {
                conn,
                gw,
                link,
                bytes,
            } => {
                if self.vanished {
                    return; // lost, and never acknowledged: the send buffer stays full
                }
                if self
                    .nodes
                    .iter()
                    .any(|n| matches!(n.link, LinkState::Open(_, c) if c == conn))
                {
                    self.server.handle_bytes(conn, &bytes, now);
                    self.route_server();
                }
                let node = &mut self.nodes[gw];
                if node.link == LinkState::Open(link, conn) {
                    node.unacked = node.unacked.saturating_sub(bytes.len());
                    if node.write_blocked {
                        // Room in the send buffer: a write-readiness edge.
                        self.flush_nats(gw);
                        self.pump(gw);
                    }
                }
            }
            Ev::ToGw { gw, link, bytes } => {
                if !self.nodes[gw].link.is_open(link) {
                    return;
                }
                self.trace(format!("{now:?} g{gw} rx {}", bytes.len()));
                self.nodes[gw]
                    .gw
                    .handle_upstream(NatsInput::Received(link, &bytes), now);
                self.pump(gw);
            }
            Ev::LinkClosed { gw, link } => {
                if !self.nodes[gw].link.is_open(link) {
                    return;
                }
                self.nodes[gw].link = LinkState::Idle;
                self.trace(format!("{now:?} g{gw} link closed"));
                self.nodes[gw]
                    .gw
                    .handle_upstream(NatsInput::Closed(link), now);
                self.pump(gw);
            }
            Ev::Fault(f) => self.fault(f),
            Ev::FaultEnd(f) => self.fault_end(f),
            Ev::Signal { gw } => {
                self.signals_done += 1;
                if self.nodes[gw].exit.is_some() {
                    self.nodes[gw].signals_after_exit += 1;
                    self.trace(format!("{now:?} g{gw} signal after the exit"));
                    return;
                }
                let mark = self.mark();
                self.nodes[gw].signals.push(mark);
                self.trace(format!(
                    "{now:?} g{gw} signal {}",
                    self.nodes[gw].signals.len()
                ));
                self.nodes[gw].gw.handle_shutdown(now);
                self.pump(gw);
            }
        }
    }

    fn fault(&mut self, f: Fault) {
        let now = self.now;
        self.trace(format!("{now:?} fault {f:?}"));
        match &f {
            Fault::Bounce { down } => {
                let closed = self.server.go_down();
                for r in &mut self.routers {
                    r.lose_server();
                }
                self.close_links(&closed);
                self.push(now + *down, Ev::FaultEnd(f.clone()));
            }
            Fault::Vanish { away } => {
                self.vanished = true;
                self.vanished_at.push(now);
                for n in &mut self.nodes {
                    let up = n.gw.upstream().state() == SessionState::Connected;
                    n.up_at_vanish.push(up);
                }
                self.push(now + *away, Ev::FaultEnd(f.clone()));
            }
            Fault::Hold { hold } => {
                self.hold_until = self.hold_until.max(now + *hold);
                self.push(now + *hold, Ev::FaultEnd(f.clone()));
            }
            Fault::RoutersAway { away } => {
                for r in &mut self.routers {
                    r.leave(&mut self.server);
                }
                self.away_since = Some(self.mark());
                self.push(now + *away, Ev::FaultEnd(f.clone()));
            }
            Fault::RoutersSilent { silent } => {
                for r in &mut self.routers {
                    r.hang();
                }
                self.push(now + *silent, Ev::FaultEnd(f.clone()));
            }
        }
    }

    /// The server closed these connections: each gateway on one learns it after the latency.
    fn close_links(&mut self, closed: &[nats_standin::ConnId]) {
        for g in 0..self.nodes.len() {
            if let LinkState::Open(link, c) = self.nodes[g].link {
                if closed.contains(&c) {
                    let at = self.arrival(g, false);
                    self.push(at, Ev::LinkClosed { gw: g, link });
                }
            }
        }
    }

    fn fault_end(&mut self, f: Fault) {
        let now = self.now;
        self.trace(format!("{now:?} fault over {f:?}"));
        self.faults_done += 1;
        match f {
            Fault::Bounce { .. } => {
                self.server.go_up();
                self.restarts.push(now);
                for r in &mut self.routers {
                    r.resubscribe(&mut self.server);
                }
            }
            Fault::Vanish { .. } => {
                // A fresh process on the same address: old connections are gone, and the
                // next segment a gateway sends on one gets a reset.
                self.vanished = false;
                let closed = self.server.go_down();
                self.server.go_up();
                self.restarts.push(now);
                for r in &mut self.routers {
                    r.lose_server();
                    r.resubscribe(&mut self.server);
                }
                self.close_links(&closed);
            }
            Fault::Hold { .. } => {}
            Fault::RoutersAway { .. } => {
                for r in &mut self.routers {
                    r.resubscribe(&mut self.server);
                }
                if let Some(start) = self.away_since.take() {
                    let end = self.mark();
                    self.routers_away.push(Outage { start, end });
                }
            }
            Fault::RoutersSilent { .. } => {
                for r in &mut self.routers {
                    r.wake();
                }
            }
        }
    }

    /// After the server took input: Routers get their requests, and server bytes go out.
    fn route_server(&mut self) {
        let now = self.now;
        loop {
            let msgs = self.server.take_local();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                if let Some(r) = self.routers.iter().position(|r| r.sub() == Some(m.sub)) {
                    self.routers[r].on_request(&m, now, &mut self.server);
                }
            }
        }
        for g in 0..self.nodes.len() {
            let LinkState::Open(link, c) = self.nodes[g].link else {
                continue;
            };
            if self.server.has_output(c) && !self.vanished {
                let bytes = self.server.take_output(c);
                let at = self.arrival(g, false);
                self.push(at, Ev::ToGw { gw: g, link, bytes });
            }
        }
        for c in self.server.take_server_closed() {
            let bytes = self.server.take_closed_output(c);
            let owner = self
                .nodes
                .iter()
                .enumerate()
                .find_map(|(g, n)| match n.link {
                    LinkState::Open(link, open) if open == c => Some((g, link)),
                    _ => None,
                });
            if let Some((g, link)) = owner {
                let at = self.arrival(g, false);
                self.push(at, Ev::ToGw { gw: g, link, bytes });
                let at = self.arrival(g, false);
                self.push(at, Ev::LinkClosed { gw: g, link });
            }
        }
    }

    /// Carries out what gateway `g` asked for, in the core's order, until it asks nothing
    /// more.
    fn pump(&mut self, g: usize) {
        let now = self.now;
        if self.nodes[g].exit.is_some() {
            return; // the process is gone
        }
        self.observe(g);
        while let Some(a) = self.nodes[g].gw.poll_action() {
            self.trace(format!("{now:?} g{g} {a:?}"));
            match a {
                Action::Transmit(conn) => {
                    let bytes: Vec<u8> = self.nodes[g]
                        .gw
                        .client_output(conn)
                        .flatten()
                        .copied()
                        .collect();
                    self.nodes[g]
                        .gw
                        .handle_client_written(conn, bytes.len(), now);
                    if let Some(&c) = self.nodes[g].clients.get(&conn) {
                        if !self.clients[c].left {
                            self.clients[c].on_bytes(&bytes, now);
                            self.client_progress(c);
                        }
                    }
                }
                Action::Close(conn) => {
                    if let Some(c) = self.nodes[g].clients.remove(&conn) {
                        if !self.clients[c].left {
                            self.clients[c].on_closed();
                        }
                    }
                }
                Action::ResumeRead(conn) => {
                    self.resume_reads += 1;
                    if let Some(&c) = self.nodes[g].clients.get(&conn) {
                        self.client_edge(c);
                    }
                }
                Action::Upstream(SessionAction::Connect { link, .. }) => {
                    self.nodes[g].link = LinkState::Connecting(link);
                    self.nodes[g].unacked = 0;
                    self.nodes[g].write_blocked = false;
                    let at = self.arrival(g, true);
                    self.push(at, Ev::ConnectDone { gw: g, link });
                }
                Action::Upstream(SessionAction::Disconnect { .. }) => {
                    if let LinkState::Open(_, c) = self.nodes[g].link {
                        self.server.close(c);
                    }
                    self.nodes[g].link = LinkState::Idle;
                    self.nodes[g].unacked = 0;
                    self.nodes[g].write_blocked = false;
                }
                Action::Upstream(SessionAction::Transmit { .. }) => self.flush_nats(g),
                // The simulations configure no TLS and the stand-in's INFO never requires it;
                // were it asked for, the bytes would stay the plaintext a TLS shell decrypts.
                Action::Upstream(SessionAction::StartTls { .. }) => {}
                Action::ShutdownComplete { forced } => {
                    self.nodes[g].shutdown_complete.get_or_insert((now, forced));
                    self.exit(g, forced);
                }
            }
        }
        let node = &mut self.nodes[g];
        let up = node.gw.upstream().state() == SessionState::Connected;
        match (up, node.lost_at) {
            (false, None) if node.gw.upstream().stats().connect_attempts > 0 => {
                node.lost_at = Some(now);
                node.lost_times.push(now);
            }
            (true, Some(_)) => {
                node.lost_at = None;
                node.reconnected_at.push(now);
            }
            _ => {}
        }
        self.observe(g);
        let node = &mut self.nodes[g];
        let state = node.gw.shutdown_state().name();
        if node.shutdown_log.last().map(|s| s.1) != Some(state) {
            node.shutdown_log.push((now, state));
        }
        self.nodes[g].gw.assert_invariants();
        self.watch_health(g);
    }

    /// After the run: every spell without NATS against the grace period
    /// ([`crate::health::HealthWatch::check_outages`]); the per-input check ran in `pump`.
    pub fn check_health(&mut self) {
        for g in 0..self.nodes.len() {
            if let Err(e) = self.nodes[g].health.check_outages(self.opts.health_grace) {
                self.failures.push(format!("g{g} {e}"));
            }
        }
    }

    /// The core's health against what this shell sees ([`crate::health`]).
    fn watch_health(&mut self, g: usize) {
        let now = self.now;
        let node = &mut self.nodes[g];
        let gw = &node.gw;
        let seen = Seen {
            up: gw.upstream().state() == SessionState::Connected,
            breaker: gw.breaker_state(),
            shutdown: gw.shutdown_state(),
            inflight: gw.inflight_len(),
            max_inflight: self.opts.max_inflight,
            grace: self.opts.health_grace,
        };
        if let Err(e) = node.health.check(now, seen, gw.health()) {
            self.failures.push(format!("g{g} {e}"));
        }
    }

    /// Writes the session's output to the NATS socket, as much as its send buffer takes
    /// (`Options::nats_sndbuf`); the rest waits for bytes to arrive at the server.
    fn flush_nats(&mut self, g: usize) {
        let now = self.now;
        let LinkState::Open(link, conn) = self.nodes[g].link else {
            return;
        };
        let mut bytes: Vec<u8> = self.nodes[g]
            .gw
            .upstream()
            .output()
            .flatten()
            .copied()
            .collect();
        self.nodes[g].write_blocked = false;
        if let Some(cap) = self.opts.nats_sndbuf {
            let room = cap.saturating_sub(self.nodes[g].unacked);
            let all = bytes.len();
            if room < all {
                self.nodes[g].write_blocked = true;
                bytes.truncate(room);
                self.trace(format!("{now:?} g{g} nats wrote {room} of {all}"));
                if room == 0 {
                    return;
                }
            }
            self.nodes[g].unacked += bytes.len();
        }
        self.nodes[g]
            .gw
            .handle_upstream(NatsInput::Written(link, bytes.len()), now);
        let at = self.arrival(g, true);
        self.push(
            at,
            Ev::ToServer {
                conn,
                gw: g,
                link,
                bytes,
            },
        );
    }

    /// `ShutdownComplete`: the shell exits, as the mio shell does. What the core still had
    /// queued is discarded (looked at for the snapshot), the process exit closes every
    /// socket: the NATS connection (the stand-in sees it close) and each client's.
    fn exit(&mut self, g: usize, forced: bool) {
        let now = self.now;
        let mark = self.mark();
        let node = &mut self.nodes[g];
        let mut discarded = Vec::new();
        let mut disconnect_queued = false;
        let mut extra = 0;
        while let Some(a) = node.gw.poll_action() {
            match a {
                Action::Upstream(SessionAction::Disconnect { .. }) => disconnect_queued = true,
                Action::ShutdownComplete { .. } => extra += 1,
                _ => {}
            }
            discarded.push(format!("{a:?}"));
        }
        let socket = match node.link {
            LinkState::Idle => Socket::None,
            _ if disconnect_queued => Socket::DisconnectQueued,
            _ => Socket::Open,
        };
        let closing_seen = node
            .shutdown_log
            .iter()
            .find(|(_, st)| *st == "closing_upstream")
            .map(|(t, _)| *t - Instant::ZERO);
        node.exit = Some(Exit::snapshot(
            &node.gw,
            mark,
            forced,
            socket,
            extra,
            closing_seen,
        ));
        if let LinkState::Open(_, c) = node.link {
            self.server.close(c);
        }
        node.link = LinkState::Idle;
        node.unacked = 0;
        node.write_blocked = false;
        let clients: Vec<usize> = std::mem::take(&mut node.clients).into_values().collect();
        self.trace(format!(
            "{now:?} g{g} exit forced={forced} discarded {discarded:?}"
        ));
        for c in clients {
            self.clients[c].on_gateway_exit(forced);
        }
    }

    /// A client got replies: it may leave, write more, or half-close.
    fn client_progress(&mut self, c: usize) {
        let now = self.now;
        let g = self.clients[c].gw;
        let Some(conn) = self.clients[c].conn else {
            return;
        };
        if self.clients[c].wants_to_leave() {
            self.clients[c].leave();
            self.nodes[g].clients.remove(&conn);
            self.trace(format!("{now:?} g{g} client {c} hangs up"));
            self.nodes[g].gw.handle_client_closed(conn, now);
            return;
        }
        if self.opts.think.is_zero() || self.clients[c].finished() {
            self.clients[c].fill(now);
            self.client_edge(c);
        } else {
            let at = now + self.opts.think;
            self.push(at, Ev::ClientWake { client: c });
        }
    }

    /// A readiness edge on the client's socket: the shell reads if the gateway wants to.
    fn client_edge(&mut self, c: usize) {
        let now = self.now;
        let g = self.clients[c].gw;
        let Some(conn) = self.clients[c].conn else {
            return;
        };
        if self.clients[c].left || self.clients[c].closed_by_gateway {
            return;
        }
        if self.nodes[g].gw.shutdown_state() == Shutdown::Done {
            // The core said `ShutdownComplete` and the shell, nested in its action loop,
            // has not reached it yet: the mio shell reads nothing between the two, it exits
            // at it. What the client wrote stays unread.
            self.pump(g);
            return;
        }
        if !self.clients[c].unread.is_empty() && self.nodes[g].gw.wants_read(conn) {
            let bytes = std::mem::take(&mut self.clients[c].unread);
            for marker in std::mem::take(&mut self.clients[c].unread_tasks) {
                let mark = self.mark();
                self.nodes[g].log.took(mark, marker);
            }
            self.nodes[g].gw.handle_client_bytes(conn, &bytes, now);
        }
        if self.clients[c].finished()
            && self.clients[c].unread.is_empty()
            && !self.clients[c].eof_sent
        {
            self.clients[c].eof_sent = true;
            self.nodes[g].gw.handle_client_eof(conn, now);
        }
        self.pump(g);
    }

    /// The after-outage check ([`after_outage`]) over every gateway; its failures join the
    /// run's, its counts stay in [`World::after_outage`].
    pub fn check_after_outage(&mut self) {
        let mut report = Report::default();
        for (g, n) in self.nodes.iter().enumerate() {
            let published: Vec<(Duration, String)> = self
                .server
                .published()
                .iter()
                .filter(|p| p.subject == SUBJECT && self.conn_owner.get(&p.conn) == Some(&g))
                .filter_map(|p| {
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).ok()?;
                    let marker = body["task"]["payload"]["m"].as_str()?.to_owned();
                    Some((p.at - Instant::ZERO, marker))
                })
                .collect();
            let clients: Vec<&Client> = self.clients.iter().filter(|c| c.gw == g).collect();
            let reply = |marker: &str| clients.iter().find_map(|c| c.answers.get(marker).cloned());
            let gw = after_outage::Gateway {
                seed: self.opts.seed,
                name: &format!("g{g}"),
                request_timeout: self.opts.request_timeout,
                log: &n.log,
                routers_away: &self.routers_away,
                published: &published,
                shutdown_at: n.signals.first().copied(),
            };
            after_outage::check(&gw, &reply, &mut report);
        }
        self.failures.extend(report.failures.iter().cloned());
        self.after_outage = report;
    }

    /// The shutdown check ([`shutdown`]) over every gateway that took a signal; its failures
    /// join the run's, its counts stay in [`World::shutdown`].
    pub fn check_shutdown(&mut self) {
        let mut report = shutdown::Report::default();
        for (g, n) in self.nodes.iter().enumerate() {
            if n.signals.is_empty() {
                continue;
            }
            let published: std::collections::BTreeSet<String> = self
                .server
                .published()
                .iter()
                .filter(|p| p.subject == SUBJECT && self.conn_owner.get(&p.conn) == Some(&g))
                .filter_map(|p| {
                    let body: serde_json::Value = serde_json::from_slice(&p.payload).ok()?;
                    Some(body["task"]["payload"]["m"].as_str()?.to_owned())
                })
                .collect();
            let clients: Vec<&Client> = self.clients.iter().filter(|c| c.gw == g).collect();
            let reply = |marker: &str| clients.iter().find_map(|c| c.answers.get(marker).cloned());
            let mut requests: Vec<shutdown::Request> = n
                .log
                .taken
                .iter()
                .map(|(mark, marker)| shutdown::Request {
                    marker: marker.clone(),
                    taken: Some(*mark),
                    reply: reply(marker),
                    published: published.contains(marker),
                })
                .collect();
            for c in &clients {
                for (marker, r) in &c.answers {
                    if !n.log.taken.iter().any(|(_, m)| m == marker) {
                        requests.push(shutdown::Request {
                            marker: marker.clone(),
                            taken: None,
                            reply: Some(r.clone()),
                            published: published.contains(marker),
                        });
                    }
                }
            }
            let s = n.gw.upstream();
            let gw = shutdown::Gateway {
                seed: self.opts.seed,
                name: &format!("g{g}"),
                signals: &n.signals,
                signals_after_exit: n.signals_after_exit,
                drain_timeout: self.opts.drain_timeout,
                nats_drain_timeout: self.opts.nats_drain_timeout,
                reply_slack: Duration::ZERO,
                bound_slack: Duration::from_millis(1),
                exit: n.exit.as_ref(),
                end_state: format!(
                    "shutdown {}, NATS session {} (requests held {}, output pending {})",
                    n.gw.shutdown_state().name(),
                    s.state().name(),
                    s.pending(),
                    s.has_output()
                ),
                requests: &requests,
                log: &n.log,
            };
            shutdown::check(&gw, &mut report);
        }
        for c in &self.clients {
            report.unread += c.unread_at_exit as u64;
        }
        self.failures.extend(report.failures.iter().cloned());
        self.shutdown = report;
    }

    /// The no-leak invariant, once traffic stopped and deadlines passed.
    pub fn check_quiescent(&mut self) {
        for (g, n) in self.nodes.iter().enumerate() {
            let gw = &n.gw;
            let s = gw.upstream();
            // A gateway that exited is checked as it was then (the shutdown check): its
            // connections may still hold what a forced exit left unwritten.
            if n.exit.is_none() && !gw.is_quiescent() {
                self.failures.push(format!(
                    "leak on g{g}: quiescent={} inflight={} session pending={} buffered={} conns={}",
                    gw.is_quiescent(),
                    gw.inflight_len(),
                    s.pending(),
                    s.buffered_bytes(),
                    gw.connection_count()
                ));
            }
        }
        for c in &self.clients {
            if !c.finished() {
                self.failures.push(format!(
                    "hang: {} still has {} requests unanswered",
                    c.name(),
                    c.outstanding()
                ));
            }
            self.failures.extend(c.failures.iter().cloned());
        }
        for r in &self.routers {
            self.failures.extend(r.violations.iter().cloned());
        }
    }
}
