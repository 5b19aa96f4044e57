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
//! The breaker judges the **Router**, not the NATS link (gateway.md section 4). How a request
//! ended comes in as an [`Outcome`], whose variants name every kind there is, and the breaker
//! alone decides what each one means ([`Outcome::verdict`]): the only failure is
//! [`Outcome::RouterSilent`], a request written to a connected server that then timed out; the
//! only success is [`Outcome::RouterReplied`] (a Router-level error is a reply). No responders,
//! requests the Router took with it when it went away, everything the link causes, and
//! abandoned requests count neither way. While Open every
//! request is refused at once, so a dead Router costs clients nothing but error 8.
//!
//! The link is judged by the session, but one thing it tells the breaker: when a link is lost,
//! what the breaker learnt on it is suspect. A request that timed out on a link that then turned
//! out dead (a stale connection is only detected after missed PINGs) was the link's fault as
//! likely as the Router's. So [`CircuitBreaker::handle_link_lost`] forgets the failures counted
//! while Closed, and marks an Open or HalfOpen breaker as caused by the outage;
//! [`CircuitBreaker::handle_link_restored`] then closes it, so that a reconnect never inherits
//! an Open breaker and the first request after the handshake is served. The open time is not
//! reset by that: a Router that really fails re-opens the breaker for the doubled time. It
//! returns to its base once the Router answers, in HalfOpen or in Closed (without the latter,
//! a soak with many outages ratcheted it to 60 s for good).
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

/// How an admitted request ended. Every kind is named, so that no caller has to decide what
/// counts against the Router: [`Outcome::verdict`] does, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The Router answered (a Router-level error is an answer too).
    RouterReplied,
    /// Written to a connected server, and its deadline passed without a reply.
    RouterSilent,
    /// The server answered that nobody subscribes to the Router's subject (NATS 503). Asking an
    /// absent Router costs nothing, and counting it would keep users out after it is back.
    NoResponders,
    /// Written to a connected server and timed out, but a request written after it was
    /// answered "no responders": the Router went away (crashed, restarted) with it. That is the
    /// Router's absence, which the server reports at once, not a Router that takes requests
    /// and does not answer; counting it would open the breaker just as the Router comes back.
    RouterLeft,
    /// The link failed it: the connection dropped after the write, it waited in the reconnect
    /// buffer until its deadline, or the buffer was full.
    LinkFailed,
    /// It ended without telling anything about the Router: its client left, the drain ended,
    /// it or its reply was too large, the session was closing.
    Abandoned,
}

/// What an [`Outcome`] tells about the Router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    Neutral,
}

impl Outcome {
    /// The one place that decides what counts against the Router (gateway.md section 4).
    pub fn verdict(self) -> Verdict {
        match self {
            Outcome::RouterReplied => Verdict::Success,
            Outcome::RouterSilent => Verdict::Failure,
            Outcome::NoResponders
            | Outcome::RouterLeft
            | Outcome::LinkFailed
            | Outcome::Abandoned => Verdict::Neutral,
        }
    }
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
    /// Open or HalfOpen on what a since-lost link told: closes when a link is back.
    caused_by_outage: bool,
    transitions: Vec<Transition>,
}

/// One state change and what caused it, for the `breaker_transition` log line (gateway.md
/// section 4: transitions are logged with the counts that caused them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub to: BreakerState,
    pub cause: TransitionCause,
    /// The count behind the cause: consecutive Router timeouts, or probe successes.
    pub count: u32,
    /// How long the breaker stays Open (zero for other states).
    pub open_for: Duration,
}

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionCause {
    /// `count` consecutive requests timed out at the Router.
    RouterTimeouts,
    /// A probe timed out at the Router.
    ProbeTimedOut,
    /// The open time passed.
    OpenTimePassed,
    /// `count` probes were answered.
    ProbesAnswered,
    /// A link is back after the outage that left the breaker Open or HalfOpen.
    LinkRestored,
}

impl TransitionCause {
    pub fn name(self) -> &'static str {
        match self {
            TransitionCause::RouterTimeouts => "router_timeouts",
            TransitionCause::ProbeTimedOut => "probe_timed_out",
            TransitionCause::OpenTimePassed => "open_time_passed",
            TransitionCause::ProbesAnswered => "probes_answered",
            TransitionCause::LinkRestored => "link_restored",
        }
    }
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            config,
            state: State::Closed { failures: 0 },
            epoch: 0,
            next_open: config.open_duration,
            caused_by_outage: false,
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
        match (&mut self.state, outcome.verdict()) {
            (State::Closed { failures }, Verdict::Failure) => {
                *failures += 1;
                if *failures >= self.config.failures_to_open {
                    let count = *failures;
                    self.open(now, TransitionCause::RouterTimeouts, count);
                }
            }
            (State::Closed { failures }, Verdict::Success) => {
                // A Router that answers while Closed is healthy: its next opening starts
                // from the base time again. (A breaker closed by a reconnect rather than by
                // answered probes has not shown that yet.)
                *failures = 0;
                self.next_open = self.config.open_duration;
            }
            (State::HalfOpen { probes, successes }, verdict) => {
                *probes = probes.saturating_sub(1);
                match verdict {
                    Verdict::Failure => self.open(now, TransitionCause::ProbeTimedOut, 1),
                    Verdict::Success => {
                        *successes += 1;
                        if *successes >= self.config.successes_to_close {
                            let count = *successes;
                            self.next_open = self.config.open_duration;
                            self.transition(
                                State::Closed { failures: 0 },
                                TransitionCause::ProbesAnswered,
                                count,
                            );
                        }
                    }
                    Verdict::Neutral => {}
                }
            }
            _ => {}
        }
    }

    /// The upstream's link was lost: failures counted on it are forgotten, and an Open or
    /// HalfOpen breaker is marked as the outage's doing (see the module doc).
    pub fn handle_link_lost(&mut self, now: Instant) {
        self.handle_timeout(now);
        match &mut self.state {
            State::Closed { failures } => *failures = 0,
            State::Open { .. } | State::HalfOpen { .. } => self.caused_by_outage = true,
        }
    }

    /// A link is up again: a breaker the outage left Open or HalfOpen closes, so the first
    /// request after the handshake is served.
    pub fn handle_link_restored(&mut self, now: Instant) {
        self.handle_timeout(now);
        if std::mem::take(&mut self.caused_by_outage) && self.state() != BreakerState::Closed {
            self.transition(
                State::Closed { failures: 0 },
                TransitionCause::LinkRestored,
                0,
            );
        }
    }

    /// Moves Open to HalfOpen once the open time has passed. Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::Open { until } = self.state {
            if now >= until {
                self.transition(
                    State::HalfOpen {
                        probes: 0,
                        successes: 0,
                    },
                    TransitionCause::OpenTimePassed,
                    0,
                );
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

    /// Transitions since the last call, oldest first (for logs and metrics).
    pub fn poll_transition(&mut self) -> Option<Transition> {
        if self.transitions.is_empty() {
            None
        } else {
            Some(self.transitions.remove(0))
        }
    }

    fn open(&mut self, now: Instant, cause: TransitionCause, count: u32) {
        let duration = self.next_open;
        self.next_open = (duration * 2).min(self.config.max_open_duration);
        self.transition(
            State::Open {
                until: now + duration,
            },
            cause,
            count,
        );
        if let Some(t) = self.transitions.last_mut() {
            t.open_for = duration;
        }
    }

    fn transition(&mut self, to: State, cause: TransitionCause, count: u32) {
        if matches!(to, State::Closed { .. } | State::Open { .. }) {
            // A new judgement: Closed starts afresh, and an opening decided on a live link
            // is the Router's, whatever an earlier link did.
            self.caused_by_outage = false;
        }
        self.state = to;
        self.epoch += 1;
        self.transitions.push(Transition {
            to: self.state(),
            cause,
            count,
            open_for: Duration::ZERO,
        });
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
            b.record(p, Outcome::RouterSilent, now);
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 4, at(0));
        let p = b.try_acquire(at(0)).unwrap();
        b.record(p, Outcome::RouterReplied, at(0));
        fail_n(&mut b, 4, at(0));
        assert_eq!(b.state(), BreakerState::Closed);
        fail_n(&mut b, 1, at(0));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire(at(1)), None);
        assert_eq!(b.poll_timeout(), Some(at(5)));
        assert_eq!(
            b.poll_transition(),
            Some(Transition {
                to: BreakerState::Open,
                cause: TransitionCause::RouterTimeouts,
                count: 5,
                open_for: 5 * S,
            })
        );
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
        b.record(probes[0], Outcome::RouterReplied, at(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(probes[1], Outcome::RouterReplied, at(5));
        assert_eq!(b.state(), BreakerState::Closed);
        // The third probe's late failure belongs to an older epoch.
        b.record(probes[2], Outcome::RouterSilent, at(5));
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
            b.record(p, Outcome::RouterSilent, now);
        }
        assert_eq!(seen, vec![5, 10, 20, 40, 60, 60]);
        now = b.poll_timeout().unwrap();
        for _ in 0..2 {
            let p = b.try_acquire(now).unwrap();
            b.record(p, Outcome::RouterReplied, now);
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
            b.record(*p, Outcome::RouterSilent, at(0));
        }
        b.handle_timeout(at(5));
        b.record(old[5], Outcome::RouterSilent, at(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn only_a_router_timeout_counts_as_a_failure() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        for outcome in [
            Outcome::NoResponders,
            Outcome::LinkFailed,
            Outcome::Abandoned,
        ] {
            for _ in 0..10 {
                let p = b.try_acquire(at(0)).unwrap();
                b.record(p, outcome, at(0));
            }
            assert_eq!(
                b.state(),
                BreakerState::Closed,
                "{outcome:?} opened the breaker"
            );
        }
        fail_n(&mut b, 5, at(0));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn neutral_outcomes_do_not_reset_the_failure_count() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 4, at(0));
        let p = b.try_acquire(at(0)).unwrap();
        b.record(p, Outcome::NoResponders, at(0));
        fail_n(&mut b, 1, at(0));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_lost_link_forgets_the_failures_counted_on_it() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 4, at(0));
        b.handle_link_lost(at(1));
        b.handle_link_restored(at(2));
        fail_n(&mut b, 4, at(2));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_reconnect_does_not_inherit_an_open_breaker_the_outage_caused() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 5, at(0));
        b.handle_link_lost(at(1));
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "still open while the link is down"
        );
        b.handle_link_restored(at(2));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(
            b.try_acquire(at(2)).is_some(),
            "the first request after reconnect"
        );
        // The open time was not reset: a Router that really fails re-opens for longer.
        fail_n(&mut b, 5, at(2));
        assert_eq!(b.poll_timeout(), Some(at(12)));
    }

    #[test]
    fn a_router_answering_after_a_reconnect_resets_the_open_time() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        fail_n(&mut b, 5, at(0));
        b.handle_link_lost(at(1));
        b.handle_link_restored(at(2));
        let p = b.try_acquire(at(2)).unwrap();
        b.record(p, Outcome::RouterReplied, at(2));
        fail_n(&mut b, 5, at(3));
        assert_eq!(
            b.poll_timeout(),
            Some(at(8)),
            "the base 5 s, not the doubled 10 s"
        );
    }

    #[test]
    fn an_opening_on_a_live_link_survives_a_reconnect_that_came_before_it() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        b.handle_link_lost(at(0));
        b.handle_link_restored(at(1));
        fail_n(&mut b, 5, at(2));
        b.handle_link_restored(at(3));
        assert_eq!(b.state(), BreakerState::Open);
    }

    /// A deliberately plain model of gateway.md section 4, written separately from the breaker:
    /// states as strings, link events as a flag, outcomes judged by their own match.
    #[derive(Debug)]
    struct Model {
        cfg: BreakerConfig,
        state: &'static str,
        failures: u32,
        open_until: u64,
        open_ms: u64,
        probes: Vec<u64>,
        successes: u32,
        /// Open or half-open when a link was lost: closes when one is back.
        outage: bool,
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
            self.outage = false;
        }
        fn close(&mut self) {
            self.state = "closed";
            self.failures = 0;
            self.outage = false;
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
        LinkLost,
        LinkRestored,
    }

    fn arb_ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            4 => (0u64..3_000).prop_map(Ev::Advance),
            4 => Just(Ev::Acquire),
            6 => (any::<usize>(), 0u8..6).prop_map(|(i, o)| Ev::Finish(i, o)),
            1 => Just(Ev::LinkLost),
            1 => Just(Ev::LinkRestored),
        ]
    }

    const OUTCOMES: [Outcome; 6] = [
        Outcome::RouterReplied,
        Outcome::RouterSilent,
        Outcome::NoResponders,
        Outcome::RouterLeft,
        Outcome::LinkFailed,
        Outcome::Abandoned,
    ];

    proptest! {
        /// The breaker agrees with the plain model on every admission and every state, over
        /// sequences that mix link losses and returns with every kind of outcome.
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
            let mut m = Model { cfg, state: "closed", failures: 0, open_until: 0, open_ms: 1_000, probes: vec![], successes: 0, outage: false };
            let mut now = 0u64;
            let mut next_id = 0u64;
            // (model id, admitted in state, model generation, permit)
            let mut outstanding: Vec<(u64, &'static str, u64, Permit)> = Vec::new();
            let mut generation = 0u64;
            let mut last_state = "closed";
            let t = |ms: u64| Instant::ZERO + Duration::from_millis(ms);
            for ev in events {
                m.tick(now);
                bump(&m, &mut last_state, &mut generation);
                match ev {
                    Ev::Advance(ms) => now += ms,
                    Ev::Acquire => {
                        let model_admits = match m.state {
                            "closed" => true,
                            "half_open" => (m.probes.len() as u32) < cfg.max_probes,
                            _ => false,
                        };
                        let got = b.try_acquire(t(now));
                        prop_assert_eq!(got.is_some(), model_admits);
                        if let Some(p) = got {
                            next_id += 1;
                            if m.state == "half_open" { m.probes.push(next_id); }
                            outstanding.push((next_id, m.state, generation, p));
                        }
                    }
                    Ev::LinkLost => {
                        b.handle_link_lost(t(now));
                        match m.state {
                            "closed" => m.failures = 0,
                            _ => m.outage = true,
                        }
                    }
                    Ev::LinkRestored => {
                        b.handle_link_restored(t(now));
                        if m.outage && m.state != "closed" { m.close(); }
                        m.outage = false;
                    }
                    Ev::Finish(i, o) if !outstanding.is_empty() => {
                        let (id, admitted_in, gen, permit) = outstanding.remove(i % outstanding.len());
                        let outcome = OUTCOMES[o as usize];
                        let current = gen == generation;
                        b.record(permit, outcome, t(now));
                        // Only the Router's silence is a failure, only its reply a success.
                        let (failure, success) = match outcome {
                            Outcome::RouterSilent => (true, false),
                            Outcome::RouterReplied => (false, true),
                            _ => (false, false),
                        };
                        if current {
                            match (m.state, admitted_in) {
                                ("closed", _) if failure => {
                                    m.failures += 1;
                                    if m.failures >= cfg.failures_to_open { m.open(now); }
                                }
                                ("closed", _) if success => {
                                    m.failures = 0;
                                    m.open_ms = 1_000;
                                }
                                ("half_open", "half_open") => {
                                    m.probes.retain(|p| *p != id);
                                    if failure {
                                        m.open(now);
                                    } else if success {
                                        m.successes += 1;
                                        if m.successes >= cfg.successes_to_close {
                                            m.close();
                                            m.open_ms = 1_000;
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Ev::Finish(..) => {}
                }
                b.handle_timeout(t(now));
                m.tick(now);
                bump(&m, &mut last_state, &mut generation);
                prop_assert_eq!(b.state().name(), m.state);
            }
        }
    }
}
