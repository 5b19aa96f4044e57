//! The infrastructure under the daemon: a 3-node NATS cluster and the Router doubles, and the
//! faults done to them (one at a time: see schedule.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::Daemon;
use ipc_gateway_tests::nats_load::try_stats;
use ipc_gateway_tests::nats_server::NatsCluster;
use ipc_gateway_tests::router_double::{RouterDouble, DEFAULT_SUBJECT};
use ipc_gateway_tests::secure_nats::ClientCreds;
use rustix::process::Signal;

use crate::observer::Observer;
use crate::schedule::{Kind, Planned, Rng, Target};

/// Longest a node in lame duck mode may take to exit: its 2 s grace period, then at most 1 s
/// per client still connected (LAME_DUCK_CONFIG), with room to spare.
const LAME_DUCK_EXIT_WITHIN: Duration = Duration::from_secs(40);

pub struct Infra {
    pub cluster: NatsCluster,
    /// `None` while crashed.
    pub doubles: Vec<Option<RouterDouble>>,
    /// What the doubles connect with (a CA and a user of their own with `--tls`).
    double_creds: ClientCreds,
}

impl Infra {
    /// Starts `doubles` Router doubles (quiet: a soak would otherwise print kilobytes per
    /// request). Double `i` is given node `i`'s URL first, so that they spread over the nodes.
    pub fn start_doubles(
        cluster: NatsCluster,
        doubles: usize,
        double_creds: ClientCreds,
    ) -> Result<Infra, String> {
        let mut infra = Infra {
            cluster,
            doubles: Vec::new(),
            double_creds,
        };
        for i in 0..doubles {
            let double = infra.start_double(i)?;
            infra.doubles.push(Some(double));
        }
        Ok(infra)
    }

    fn double_urls(&self, i: usize) -> String {
        let n = self.cluster.len();
        (0..n)
            .map(|k| self.cluster.url((i + k) % n))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_double(&self, i: usize) -> Result<RouterDouble, String> {
        RouterDouble::try_start_secured(
            &self.double_urls(i),
            DEFAULT_SUBJECT,
            true,
            &self.double_creds,
        )
    }

    /// The node the daemon is connected to (from its stats line), if it is connected to one.
    pub fn daemon_node(&self, daemon: &Daemon) -> Option<usize> {
        let stats = try_stats(daemon, Duration::from_secs(5)).ok()?;
        let port: u16 = stats["nats_server"]
            .as_str()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()?;
        (0..self.cluster.len()).find(|&i| self.cluster.node(i).port() == port)
    }

    fn resolve_node(&self, target: Target, daemon: &Daemon, rng: &mut Rng) -> (usize, String) {
        let n = self.cluster.len();
        let daemon_on = self.daemon_node(daemon);
        let node = match (target, daemon_on) {
            (Target::Node(i), _) => i % n,
            (_, Some(i)) => i,
            (_, None) => rng.below(n as u64) as usize,
        };
        let how = match daemon_on {
            Some(i) if i == node => ", the daemon's",
            Some(_) => "",
            None => ", daemon not connected",
        };
        let port = self.cluster.node(node).port();
        (node, format!("node {node} (port {port}{how})"))
    }

    /// Runs one fault to its end. `Err` is a failure of the harness (a node or double that
    /// would not come back), not a verdict on the gateway.
    pub fn run(
        &mut self,
        p: &Planned,
        daemon: &Daemon,
        obs: &Observer,
        abort: &AtomicBool,
    ) -> Result<(), String> {
        let mut rng = Rng::new(p.seed);
        match p.kind {
            Kind::NodeKill => {
                let (node, desc) = self.resolve_node(p.target, daemon, &mut rng);
                let slot = obs.fault_started(p, desc);
                self.cluster.kill(node);
                pause(p.duration, abort);
                let t = Instant::now();
                self.cluster.restart(node);
                obs.fault_note(
                    slot,
                    format!("restart took {:.2}s", t.elapsed().as_secs_f64()),
                );
                obs.fault_ended(slot);
            }
            Kind::NodeStop => {
                let (node, desc) = self.resolve_node(p.target, daemon, &mut rng);
                let slot = obs.fault_started(p, desc);
                let server = self.cluster.node(node);
                server.signal(Signal::STOP)?;
                pause(p.duration, abort);
                server.signal(Signal::CONT)?;
                obs.fault_ended(slot);
            }
            Kind::NodeLameDuck => {
                let (node, desc) = self.resolve_node(p.target, daemon, &mut rng);
                let slot = obs.fault_started(p, desc);
                let t = Instant::now();
                self.cluster.node(node).lame_duck()?;
                match self
                    .cluster
                    .node_mut(node)
                    .wait_exited(LAME_DUCK_EXIT_WITHIN)
                {
                    Some(status) => obs.fault_note(
                        slot,
                        format!(
                            "exited {:.2}s after ldm ({status})",
                            t.elapsed().as_secs_f64()
                        ),
                    ),
                    None => obs.fault_note(
                        slot,
                        format!("still running {LAME_DUCK_EXIT_WITHIN:?} after ldm: killed"),
                    ),
                }
                pause(p.duration, abort);
                self.cluster.restart(node);
                obs.fault_ended(slot);
            }
            Kind::DoubleCrash => {
                let Target::Doubles(count) = p.target else {
                    return Err(format!("double_crash without a count: {p}"));
                };
                let mut which: Vec<usize> = (0..self.doubles.len()).collect();
                rng.shuffle(&mut which);
                which.truncate(count.min(which.len()));
                which.sort_unstable();
                let slot = obs.fault_started(p, format!("doubles {which:?}"));
                for &i in &which {
                    if let Some(mut double) = self.doubles[i].take() {
                        double.kill();
                    }
                }
                pause(p.duration, abort);
                for &i in &which {
                    self.doubles[i] = Some(self.start_double(i)?);
                }
                obs.fault_ended(slot);
            }
            other => return Err(format!("{other} is not an infrastructure fault")),
        }
        Ok(())
    }
}

/// Sleeps `d`, or less if the run is aborted.
pub fn pause(d: Duration, abort: &AtomicBool) {
    let until = Instant::now() + d;
    while !abort.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}
