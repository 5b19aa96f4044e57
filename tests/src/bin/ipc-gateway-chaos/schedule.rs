//! The seeded fault schedule: a small deterministic RNG, the kinds of fault, and the plan.
//!
//! Two tracks run side by side. The **infrastructure** track (NATS nodes and Router doubles)
//! runs one fault at a time, because restarting a node waits for the cluster to mesh, which a
//! frozen node would prevent. The **traffic** track (what clients and the Router do to
//! requests) runs beside it. Each track deals its kinds from a shuffled deck, so every kind
//! comes up once before any comes up twice: a 30 s run sees every kind.

use std::fmt;
use std::time::Duration;

/// SplitMix64: tiny, deterministic, and plenty to pick faults with. (The core has the same
/// generator in `ipc_gateway_core::rng`; this package deliberately depends on nothing of the
/// core, see src/lib.rs, and ten lines are not worth the exception.)
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A duration uniform in `[lo, hi)` seconds, to the millisecond.
    pub fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_millis(((lo + (hi - lo) * self.unit()) * 1000.0) as u64)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// An independent generator for a sub-task, drawn from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A generator for one request's choices: the same seed, client and request number always
/// give the same choices.
pub fn request_rng(seed: u64, client: usize, n: u64) -> Rng {
    let mut rng = Rng::new(seed ^ ((client as u64) << 48) ^ n.wrapping_mul(0x2545_F491_4F6C_DD1D));
    rng.next_u64();
    rng
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// SIGKILL a NATS node, restart it on its ports after `duration`.
    NodeKill,
    /// SIGSTOP a NATS node for `duration`, then SIGCONT.
    NodeStop,
    /// Lame duck mode (`nats-server --signal ldm=PID`): the node tells its clients to move,
    /// closes them and exits; it is restarted `duration` after it exited.
    NodeLameDuck,
    /// SIGKILL `count` Router doubles, restart them after `duration`.
    DoubleCrash,
    /// For `duration`, some requests ask the double for a slow reply, some beyond the deadline.
    SlowReplies,
    /// For `duration`, some requests ask the double to reply twice.
    DuplicateReplies,
    /// For `duration`, clients connect, pipeline a few requests and vanish mid-flight.
    ClientChurn,
    /// `count` connections each send a malformed frame (ipc-protocol.md sections 4 and 8).
    GarbageFrames,
    /// For `duration`, a client writes large requests and never reads a reply.
    NeverReader,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::NodeKill,
        Kind::NodeStop,
        Kind::NodeLameDuck,
        Kind::DoubleCrash,
        Kind::SlowReplies,
        Kind::DuplicateReplies,
        Kind::ClientChurn,
        Kind::GarbageFrames,
        Kind::NeverReader,
    ];
    const INFRA: [Kind; 4] = [
        Kind::NodeKill,
        Kind::NodeStop,
        Kind::NodeLameDuck,
        Kind::DoubleCrash,
    ];
    const TRAFFIC: [Kind; 5] = [
        Kind::SlowReplies,
        Kind::DuplicateReplies,
        Kind::ClientChurn,
        Kind::GarbageFrames,
        Kind::NeverReader,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::NodeKill => "node_kill",
            Kind::NodeStop => "node_stop",
            Kind::NodeLameDuck => "node_ldm",
            Kind::DoubleCrash => "double_crash",
            Kind::SlowReplies => "slow_replies",
            Kind::DuplicateReplies => "dup_replies",
            Kind::ClientChurn => "client_churn",
            Kind::GarbageFrames => "garbage",
            Kind::NeverReader => "never_reader",
        }
    }

    pub fn is_infra(self) -> bool {
        Kind::INFRA.contains(&self)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a fault acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The node the daemon is connected to when the fault starts.
    DaemonNode,
    Node(usize),
    /// That many Router doubles (the first ones).
    Doubles(usize),
    /// Connections or requests (traffic faults).
    Traffic,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::DaemonNode => f.write_str("daemon's node"),
            Target::Node(i) => write!(f, "node {i}"),
            Target::Doubles(n) => write!(f, "{n} double(s)"),
            Target::Traffic => f.write_str("traffic"),
        }
    }
}

/// One planned fault.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its number in the schedule (1-based, by start time).
    pub index: usize,
    /// When it starts, from the start of the chaos phase; the infrastructure track starts a
    /// fault no earlier than this, later if the one before it overran.
    pub at: Duration,
    pub kind: Kind,
    pub target: Target,
    pub duration: Duration,
    /// How many (garbage connections).
    pub count: usize,
    /// The seed of its own choices.
    pub seed: u64,
}

impl fmt::Display for Planned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<3} at {:>6.1}s  {:<13} {:<14} for {:>4.1}s",
            self.index,
            self.at.as_secs_f64(),
            self.kind.name(),
            self.target.to_string(),
            self.duration.as_secs_f64()
        )?;
        if self.count > 0 {
            write!(f, "  x{}", self.count)?;
        }
        Ok(())
    }
}

/// What the schedule is generated for.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub secs: u64,
    pub nodes: usize,
    pub doubles: usize,
}

/// The schedule for `seed`: both tracks, sorted by start time.
pub fn generate(seed: u64, shape: Shape) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let end = Duration::from_secs(shape.secs);
    let mut plan = Vec::new();

    // Infrastructure: from 2 s on, leaving the last 3 s for traffic to flow again.
    let mut deck = Deck::new(&Kind::INFRA, rng.fork());
    let mut at = Duration::from_secs(2);
    while at + Duration::from_secs(3) <= end {
        let kind = deck.next();
        let node_target = |rng: &mut Rng| {
            if rng.chance(0.5) {
                Target::DaemonNode
            } else {
                Target::Node(rng.below(shape.nodes as u64) as usize)
            }
        };
        let (target, duration, overhead) = match kind {
            Kind::NodeKill => (node_target(&mut rng), rng.secs(1.0, 4.0), 0.5),
            // Up to 7 s: longer than the 5 s request timeout, so that requests written to a
            // frozen server time out (the gateway cannot tell it from a silent Router until
            // its PINGs go unanswered).
            Kind::NodeStop => (node_target(&mut rng), rng.secs(1.0, 7.0), 0.0),
            // The grace period (2 s) and closing the clients come before the exit.
            Kind::NodeLameDuck => (node_target(&mut rng), rng.secs(0.5, 2.0), 4.0),
            _ => {
                let n = rng.between(1, shape.doubles as u64) as usize;
                (Target::Doubles(n), rng.secs(1.0, 4.0), 0.5)
            }
        };
        // Every fault ends (its node back, its doubles subscribed) a second before the chaos
        // phase does, while the load still runs to measure the recovery.
        let overhead = Duration::from_secs_f64(overhead);
        let Some(room) = end.checked_sub(at + overhead + Duration::from_secs(1)) else {
            break;
        };
        if room < Duration::from_secs(1) {
            break;
        }
        let duration = duration.min(room);
        plan.push(Planned {
            index: 0,
            at,
            kind,
            target,
            duration,
            count: 0,
            seed: rng.next_u64(),
        });
        at += duration + overhead + rng.secs(1.5, 4.0);
    }

    // Traffic: from 1 s on.
    let mut deck = Deck::new(&Kind::TRAFFIC, rng.fork());
    let mut at = Duration::from_secs(1);
    while at + Duration::from_secs(2) <= end {
        let kind = deck.next();
        let (duration, count) = match kind {
            Kind::GarbageFrames => (Duration::ZERO, rng.between(3, 8) as usize),
            _ => (rng.secs(2.0, 5.0).min(end - at - Duration::from_secs(1)), 0),
        };
        plan.push(Planned {
            index: 0,
            at,
            kind,
            target: Target::Traffic,
            duration,
            count,
            seed: rng.next_u64(),
        });
        at += duration + rng.secs(0.5, 2.0);
    }

    plan.sort_by_key(|p| (p.at, p.kind));
    for (i, p) in plan.iter_mut().enumerate() {
        p.index = i + 1;
    }
    plan
}

/// Deals kinds from a shuffled deck, reshuffled when empty.
struct Deck {
    kinds: Vec<Kind>,
    left: Vec<Kind>,
    rng: Rng,
}

impl Deck {
    fn new(kinds: &[Kind], rng: Rng) -> Deck {
        Deck {
            kinds: kinds.to_vec(),
            left: Vec::new(),
            rng,
        }
    }

    fn next(&mut self) -> Kind {
        if self.left.is_empty() {
            self.left = self.kinds.clone();
            self.rng.shuffle(&mut self.left);
        }
        self.left.pop().expect("a deck has kinds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        secs: 30,
        nodes: 3,
        doubles: 3,
    };

    #[test]
    fn same_seed_same_schedule() {
        let a: Vec<String> = generate(7, SHAPE).iter().map(|p| p.to_string()).collect();
        let b: Vec<String> = generate(7, SHAPE).iter().map(|p| p.to_string()).collect();
        assert_eq!(a, b);
        let c: Vec<String> = generate(8, SHAPE).iter().map(|p| p.to_string()).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn thirty_seconds_see_every_kind() {
        for seed in 0..50 {
            let plan = generate(seed, SHAPE);
            for kind in Kind::ALL {
                assert!(
                    plan.iter().any(|p| p.kind == kind),
                    "seed {seed}: no {kind} in {plan:#?}"
                );
            }
            for p in &plan {
                assert!(
                    p.at + p.duration < Duration::from_secs(SHAPE.secs),
                    "seed {seed}: {p} ends after the chaos phase"
                );
            }
        }
    }

    #[test]
    fn rng_ranges() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert!(rng.between(3, 8) >= 3 && rng.between(3, 8) <= 8);
            let d = rng.secs(1.0, 4.0);
            assert!(d >= Duration::from_secs(1) && d < Duration::from_secs(4));
        }
    }
}
