//! Circuit breaker (gateway.md section 4).
//!
//! ```text
//!                 failures_to_open consecutive failures
//!   ┌────────┐ ───────────────────────────────────────▶ ┌──────┐
//!   │ Closed │                                          │ Open │ ◀─┐ any probe fails
//!   └────────┘ ◀──────────┐                             └──────┘   │ (open time doubles,
//!        ▲                │ successes_to_close              │       │  up to max_open)
//!        │                │ probe successes                 │ open  │
//!        │           ┌──────────┐ ◀────────────────────────┘ time  │
//!        └───────────│ HalfOpen │ ─────────────────────────────────┘
//!                    └──────────┘   at most max_probes probes at a time
//! ```
//!
//! Failures are timeouts, no-responders and connections lost with the request sent; any Router
//! reply, a Router-level error included, is a success. While Open every request is refused at
//! once, so a dead Router costs clients nothing but error 8.
//!
//! Every admitted request carries a [`Permit`] naming the breaker epoch it was admitted in.
//! Outcomes are counted only for the epoch they belong to: a slow request admitted while Closed
//! that fails after the breaker has opened and half-opened must not re-open it, and a probe
//! whose client left releases its slot without counting either way. The open time returns to
//! its base value once the breaker closes.

use std::time::Duration;

use crate::time::Instant;

/// Breaker settings; defaults are gateway.md's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures_to_open: u32,
    pub open_duration: Duration,
    pub max_open_duration: Duration,
    pub max_probes: u32,
    pub successes_to_close: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures_to_open: 5,
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            max_probes: 3,
            successes_to_close: 2,
        }
    }
}

/// The breaker's state, for health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Admission ticket for one request: the breaker epoch it was admitted in. A permit of the
/// current epoch while HalfOpen is a probe, since HalfOpen admits nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    epoch: u64,
}

/// How a request ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// The request ended without telling anything about the Router (its client left).
    Abandoned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probes: u32, successes: u32 },
}

/// The breaker state machine.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: State,
    /// Incremented on every transition; permits of other epochs do not count.
    epoch: u64,
    /// How long the next opening lasts.
    next_open: Duration,
    transitions: Vec<BreakerState>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            config,
            state: State::Closed { failures: 0 },
            epoch: 0,
            next_open: config.open_duration,
            transitions: Vec::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Admits a request, or `None` if the breaker refuses it (answer error 8).
    pub fn try_acquire(&mut self, now: Instant) -> Option<Permit> {
        self.handle_timeout(now);
        match &mut self.state {
            State::Closed { .. } => Some(Permit { epoch: self.epoch }),
            State::Open { .. } => None,
            State::HalfOpen { probes, .. } => {
                if *probes >= self.config.max_probes {
                    return None;
                }
                *probes += 1;
                Some(Permit { epoch: self.epoch })
            }
        }
    }

    /// Records how an admitted request ended.
    pub fn record(&mut self, permit: Permit, outcome: Outcome, now: Instant) {
        self.handle_timeout(now);
        if permit.epoch != self.epoch {
            return;
        }
        match (&mut self.state, outcome) {
            (State::Closed { failures }, Outcome::Failure) => {
                *failures += 1;
                if *failures >= self.config.failures_to_open {
                    self.open(now);
                }
            }
            (State::Closed { failures }, Outcome::Success) => *failures = 0,
            (State::HalfOpen { probes, successes }, outcome) => {
                *probes = probes.saturating_sub(1);
                match outcome {
                    Outcome::Failure => self.open(now),
                    Outcome::Success => {
                        *successes += 1;
                        if *successes >= self.config.successes_to_close {
                            self.next_open = self.config.open_duration;
                            self.transition(State::Closed { failures: 0 });
                        }
                    }
                    Outcome::Abandoned => {}
                }
            }
            _ => {}
        }
    }

    /// Moves Open to HalfOpen once the open time has passed. Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::Open { until } = self.state {
            if now >= until {
                self.transition(State::HalfOpen {
                    probes: 0,
                    successes: 0,
                });
            }
        }
    }

    /// When the breaker next changes state by itself.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// States entered since the last call, oldest first (for logs and metrics).
    pub fn poll_transition(&mut self) -> Option<BreakerState> {
        if self.transitions.is_empty() {
            None
        } else {
            Some(self.transitions.remove(0))
        }
    }

    fn open(&mut self, now: Instant) {
        let duration = self.next_open;
        self.next_open = (duration * 2).min(self.config.max_open_duration);
        self.transition(State::Open {
            until: now + duration,
        });
    }

    fn transition(&mut self, to: State) {
        self.state = to;
        self.epoch += 1;
        self.transitions.push(self.state());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn at(secs: u64) -> Instant {
        Instant::ZERO + Duration::from_secs(secs)
    }

    fn fail_n(b: &mut CircuitBreaker, n: u32, now: Instant) {
        for _ in 0..n {
            let p = b.try_acquire(now).expect("admitted");
            b.record(p, Outcome::Failure, now);
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 4, at(0));
        let p = b.try_acquire(at(0)).unwrap();
        b.record(p, Outcome::Success, at(0));
        fail_n(&mut b, 4, at(0));
        assert_eq!(b.state(), BreakerState::Closed);
        fail_n(&mut b, 1, at(0));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire(at(1)), None);
        assert_eq!(b.poll_timeout(), Some(at(5)));
        assert_eq!(b.poll_transition(), Some(BreakerState::Open));
        assert_eq!(b.poll_transition(), None);
    }

    #[test]
    fn half_open_admits_three_probes_and_closes_after_two_successes() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 5, at(0));
        b.handle_timeout(at(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(at(5)).unwrap()).collect();
        assert_eq!(b.try_acquire(at(5)), None, "a fourth probe");
        b.record(probes[0], Outcome::Success, at(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(probes[1], Outcome::Success, at(5));
        assert_eq!(b.state(), BreakerState::Closed);
        // The third probe's late failure belongs to an older epoch.
        b.record(probes[2], Outcome::Failure, at(5));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn reopening_doubles_the_open_time_up_to_the_cap_and_closing_resets_it() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 5, at(0));
        let mut now = at(0);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let until = b.poll_timeout().unwrap();
            seen.push((until - now).as_secs());
            now = until;
            let p = b.try_acquire(now).unwrap();
            b.record(p, Outcome::Failure, now);
        }
        assert_eq!(seen, vec![5, 10, 20, 40, 60, 60]);
        now = b.poll_timeout().unwrap();
        for _ in 0..2 {
            let p = b.try_acquire(now).unwrap();
            b.record(p, Outcome::Success, now);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        fail_n(&mut b, 5, now);
        assert_eq!(b.poll_timeout(), Some(now + 5 * S));
    }

    #[test]
    fn abandoned_probe_frees_its_slot_without_counting() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 5, at(0));
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(at(6)).unwrap()).collect();
        b.record(probes[0], Outcome::Abandoned, at(6));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(at(6)).is_some());
    }

    #[test]
    fn stale_failures_from_before_opening_do_not_count_in_half_open() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        let old: Vec<Permit> = (0..6).map(|_| b.try_acquire(at(0)).unwrap()).collect();
        for p in &old[..5] {
            b.record(*p, Outcome::Failure, at(0));
        }
        b.handle_timeout(at(5));
        b.record(old[5], Outcome::Failure, at(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    /// A deliberately plain model of gateway.md section 4, written separately from the breaker.
    #[derive(Debug)]
    struct Model {
        cfg: BreakerConfig,
        state: &'static str,
        failures: u32,
        open_until: u64,
        open_ms: u64,
        probes: Vec<u64>,
        successes: u32,
    }

    impl Model {
        fn tick(&mut self, now: u64) {
            if self.state == "open" && now >= self.open_until {
                self.state = "half_open";
                self.probes.clear();
                self.successes = 0;
            }
        }
        fn open(&mut self, now: u64) {
            self.state = "open";
            self.open_until = now + self.open_ms;
            self.open_ms = (self.open_ms * 2).min(self.cfg.max_open_duration.as_millis() as u64);
            self.failures = 0;
        }
    }

    /// Starts a new model generation whenever the model's state changed.
    fn bump(m: &Model, last: &mut &'static str, generation: &mut u64) {
        if m.state != *last {
            *generation += 1;
            *last = m.state;
        }
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Advance(u64),
        Acquire,
        Finish(usize, u8),
    }

    fn arb_ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u64..3_000).prop_map(Ev::Advance),
            Just(Ev::Acquire),
            (any::<usize>(), 0u8..3).prop_map(|(i, o)| Ev::Finish(i, o)),
        ]
    }

    proptest! {
        /// The breaker agrees with the plain model on every admission and every state.
        #[test]
        fn breaker_matches_reference_model(events in proptest::collection::vec(arb_ev(), 1..300)) {
            let cfg = BreakerConfig {
                failures_to_open: 3,
                open_duration: Duration::from_millis(1_000),
                max_open_duration: Duration::from_millis(4_000),
                max_probes: 2,
                successes_to_close: 2,
            };
            let mut b = CircuitBreaker::new(cfg);
            let mut m = Model { cfg, state: "closed", failures: 0, open_until: 0, open_ms: 1_000, probes: vec![], successes: 0 };
            let mut now = 0u64;
            let mut next_id = 0u64;
            // (model id, admitted in state, model generation, permit)
            let mut outstanding: Vec<(u64, &'static str, u64, Permit)> = Vec::new();
            let mut generation = 0u64;
            let mut last_state = "closed";
            for ev in events {
                match ev {
                    Ev::Advance(ms) => now += ms,
                    Ev::Acquire => {
                        m.tick(now);
                        bump(&m, &mut last_state, &mut generation);
                        let model_admits = match m.state {
                            "closed" => true,
                            "half_open" => (m.probes.len() as u32) < cfg.max_probes,
                            _ => false,
                        };
                        let got = b.try_acquire(Instant::ZERO + Duration::from_millis(now));
                        prop_assert_eq!(got.is_some(), model_admits);
                        if let Some(p) = got {
                            next_id += 1;
                            if m.state == "half_open" { m.probes.push(next_id); }
                            outstanding.push((next_id, m.state, generation, p));
                        }
                    }
                    Ev::Finish(i, o) if !outstanding.is_empty() => {
                        let (id, admitted_in, gen, permit) = outstanding.remove(i % outstanding.len());
                        m.tick(now);
                        bump(&m, &mut last_state, &mut generation);
                        let outcome = [Outcome::Success, Outcome::Failure, Outcome::Abandoned][o as usize];
                        let current = gen == generation;
                        b.record(permit, outcome, Instant::ZERO + Duration::from_millis(now));
                        if current {
                            match (m.state, admitted_in, outcome) {
                                ("closed", _, Outcome::Failure) => {
                                    m.failures += 1;
                                    if m.failures >= cfg.failures_to_open { m.open(now); }
                                }
                                ("closed", _, Outcome::Success) => m.failures = 0,
                                ("half_open", "half_open", _) => {
                                    m.probes.retain(|p| *p != id);
                                    match outcome {
                                        Outcome::Failure => m.open(now),
                                        Outcome::Success => {
                                            m.successes += 1;
                                            if m.successes >= cfg.successes_to_close {
                                                m.state = "closed";
                                                m.failures = 0;
                                                m.open_ms = 1_000;
                                            }
                                        }
                                        Outcome::Abandoned => {}
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Ev::Finish(..) => {}
                }
                b.handle_timeout(Instant::ZERO + Duration::from_millis(now));
                m.tick(now);
                bump(&m, &mut last_state, &mut generation);
                prop_assert_eq!(b.state().name(), m.state);
            }
        }
    }
}
