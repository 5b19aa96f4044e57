//! The shutdown check both tiers run after every run that signals a gateway (gateway.md
//! section 8; the core's state machine is `core/src/gateway/shutdown.rs`).
//!
//! Each tier's shell delivers the signals it was given (`Options::signals`) by calling
//! `Gateway::handle_shutdown` and pumping, as the mio shell does on SIGTERM, stops accepting
//! connections at the first one, and on `ShutdownComplete` exits as the mio shell does: it
//! stops at that action (what is still queued behind it is discarded), and the process exit
//! closes every socket it holds. At that moment it takes an [`Exit`] snapshot of the core.
//! At the end, per signalled gateway:
//!
//! - `ShutdownComplete` came, once. Without a second signal it is `forced: false`, after the
//!   first signal and no later than signal + drain timeout + [`FLUSH_GRACE`] + the NATS
//!   session's drain timeout (+ slack); with a second signal before it, it is `forced: true`
//!   at the second signal's virtual time, in the same step.
//! - At `ShutdownComplete` the NATS session is Closed, holds no request and no buffered
//!   byte, the gateway has nothing in flight (quiescent apart from its connections), and the
//!   shell no longer holds a NATS socket: the session's `Disconnect` came before
//!   `ShutdownComplete` and was applied (see [`Socket`]).
//! - Every task request the gateway read before the first signal got exactly one reply: the
//!   Router's, by the drain deadline (signal + drain timeout); error 6 ("the drain timeout
//!   passed") at the drain deadline; error 5 at its own deadline, if that came first; or
//!   error 8 ("the NATS connection was lost") when the session lost its link. Only a forced
//!   exit may leave it unanswered.
//! - Every task request read after the first signal got error 6 ("the gateway is
//!   draining") and was never published to NATS (the stand-in's record of publishes).
//!
//! "Before" and "after" the signal are in the order of events ([`Mark`]), not merely by
//! virtual time. Requests the gateway never read (in its socket when it exited) are counted,
//! not checked: a process that exits leaves them unread.

use std::fmt::Write as _;
use std::time::Duration;

pub use ipc_gateway_core::gateway::FLUSH_GRACE;

use crate::after_outage::{GatewayLog, Mark, Reply};

/// The refusal of a task read while draining (admission).
pub const DRAINING: &str = "Shutting down: the gateway is draining";
/// The error of a request still in flight at the drain deadline.
pub const DRAIN_TIMEOUT: &str = "the drain timeout passed";
/// The error of a request written on a link that was then lost.
pub const LINK_LOST: &str = "connection was lost";

/// The shell's NATS socket when `ShutdownComplete` came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// The shell held none: the session's `Disconnect` was applied, or the link was down.
    None,
    /// The shell still held it, and the session's `Disconnect` for it was queued behind
    /// `ShutdownComplete`, where a shell that stops at `ShutdownComplete` never applies it.
    /// The core emits the upstream's last actions first, so this fails the run.
    DisconnectQueued,
    /// The shell still held it and nothing asked to close it.
    Open,
}

/// The core as the shell saw it on `ShutdownComplete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub mark: Mark,
    pub forced: bool,
    /// The NATS session's state (`SessionState::name`).
    pub session: &'static str,
    pub inflight: usize,
    /// Requests the session holds (on the wire or buffered).
    pub pending: usize,
    pub buffered_bytes: usize,
    /// The session still had bytes for the socket.
    pub session_output: bool,
    pub socket: Socket,
    /// More `ShutdownComplete` actions queued behind the first.
    pub extra: u32,
    /// When the gateway was seen in `ClosingUpstream` at the end of an input, i.e. it waited
    /// for the NATS session's flush and close across inputs (`None`: it closed in the turn
    /// that entered it).
    pub closing_seen: Option<Duration>,
}

impl Exit {
    /// What a shell records of its gateway when it stops at `ShutdownComplete`.
    pub fn snapshot(
        gw: &ipc_gateway_core::Gateway<ipc_gateway_core::nats_session::NatsSession>,
        mark: Mark,
        forced: bool,
        socket: Socket,
        extra: u32,
        closing_seen: Option<Duration>,
    ) -> Exit {
        use ipc_gateway_core::upstream::Upstream as _;
        let s = gw.upstream();
        Exit {
            mark,
            forced,
            session: s.state().name(),
            inflight: gw.inflight_len(),
            pending: s.pending(),
            buffered_bytes: s.buffered_bytes(),
            session_output: s.has_output(),
            socket,
            extra,
            closing_seen,
        }
    }
}

/// One task request of a signalled gateway's clients.
#[derive(Debug, Clone)]
pub struct Request {
    pub marker: String,
    /// When the gateway read it (`None`: never).
    pub taken: Option<Mark>,
    pub reply: Option<Reply>,
    /// On the stand-in's list of publishes.
    pub published: bool,
}

/// One signalled gateway's run, for [`check`].
pub struct Gateway<'a> {
    pub seed: u64,
    pub name: &'a str,
    /// The signals it took, in order (not those that came after its exit).
    pub signals: &'a [Mark],
    /// Signals that came after its exit.
    pub signals_after_exit: u64,
    pub drain_timeout: Duration,
    pub nats_drain_timeout: Duration,
    /// How long after the gateway a client sees a reply (tier 1: 0).
    pub reply_slack: Duration,
    /// Added to the completion bound (network slack, timer ticks).
    pub bound_slack: Duration,
    pub exit: Option<&'a Exit>,
    /// Shutdown and session state at the end of the run, for a failure message.
    pub end_state: String,
    pub requests: &'a [Request],
    /// Its link history: error 8 is allowed where the link was lost.
    pub log: &'a GatewayLog,
}

/// What [`check`] found, summed over gateways (and, by a test, over a sweep).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `ShutdownComplete { forced: false }`, and `{ forced: true }`.
    pub drained: u64,
    pub forced: u64,
    /// Signals that came after the exit (the process was gone: nothing to force).
    pub signals_after_exit: u64,
    /// Completions that waited for the NATS session across inputs.
    pub waited_for_nats: u64,
    /// Requests read before the signal: the Router's reply by the deadline, error 6 at the
    /// deadline, error 5, error 8.
    pub answered: u64,
    pub failed_at_deadline: u64,
    pub timed_out: u64,
    pub lost_with_link: u64,
    /// Requests read after the signal, refused with error 6.
    pub refused: u64,
    /// Requests read but unanswered when a second signal forced the exit.
    pub cut_by_force: u64,
    /// Requests never read (in the socket at the exit).
    pub unread: u64,
    pub failures: Vec<String>,
}

impl Report {
    pub fn add(&mut self, o: &Report) {
        self.drained += o.drained;
        self.forced += o.forced;
        self.signals_after_exit += o.signals_after_exit;
        self.waited_for_nats += o.waited_for_nats;
        self.answered += o.answered;
        self.failed_at_deadline += o.failed_at_deadline;
        self.timed_out += o.timed_out;
        self.lost_with_link += o.lost_with_link;
        self.refused += o.refused;
        self.cut_by_force += o.cut_by_force;
        self.unread += o.unread;
        self.failures.extend(o.failures.iter().cloned());
    }

    /// A full sweep of drain scenarios must have exercised every path it is there for.
    pub fn assert_drains_covered(&self) {
        assert!(self.drained > 0, "no drain completed: {self:?}");
        assert!(
            self.failed_at_deadline > 0,
            "nothing failed at a drain deadline: {self:?}"
        );
        assert!(self.refused > 0, "nothing read after a signal: {self:?}");
        assert!(
            self.waited_for_nats > 0,
            "no shutdown waited for the NATS session's flush: {self:?}"
        );
    }

    /// One line for a run's summary.
    pub fn line(&self) -> String {
        format!(
            "shutdown: drained={} forced={} signals_after_exit={} waited_for_nats={} \
             answered={} failed_at_deadline={} timed_out={} \
             lost_with_link={} refused={} cut_by_force={} unread={} failed={}",
            self.drained,
            self.forced,
            self.signals_after_exit,
            self.waited_for_nats,
            self.answered,
            self.failed_at_deadline,
            self.timed_out,
            self.lost_with_link,
            self.refused,
            self.cut_by_force,
            self.unread,
            self.failures.len()
        )
    }
}

/// Checks one signalled gateway (see the module doc).
pub fn check(gw: &Gateway<'_>, report: &mut Report) {
    let Some(&first) = gw.signals.first() else {
        return;
    };
    let mut fail = |s: String| {
        report
            .failures
            .push(format!("seed {}: {}: {s}", gw.seed, gw.name))
    };
    let deadline = first.at + gw.drain_timeout;
    let bound = deadline + FLUSH_GRACE + gw.nats_drain_timeout + gw.bound_slack;
    let second = gw.signals.get(1).copied();
    let mut counts = Report {
        signals_after_exit: gw.signals_after_exit,
        ..Report::default()
    };
    match gw.exit {
        None => fail(format!(
            "no ShutdownComplete after the signal at {:?} (bound {bound:?}: signal + drain \
             {:?} + flush grace {FLUSH_GRACE:?} + NATS drain {:?} + slack); at the end: {}",
            first.at, gw.drain_timeout, gw.nats_drain_timeout, gw.end_state
        )),
        Some(e) => {
            if e.mark.ord < first.ord {
                fail(format!(
                    "ShutdownComplete at {:?} before the signal",
                    e.mark.at
                ));
            }
            match (e.forced, second) {
                (true, None) => fail(format!(
                    "ShutdownComplete {{ forced: true }} at {:?} without a second signal",
                    e.mark.at
                )),
                (true, Some(s)) => {
                    counts.forced += 1;
                    if e.mark.at != s.at || e.mark.ord < s.ord {
                        fail(format!(
                            "ShutdownComplete {{ forced: true }} at {:?}, not at the second \
                             signal at {:?}",
                            e.mark.at, s.at
                        ));
                    }
                }
                (false, s) => {
                    counts.drained += 1;
                    if let Some(s) = s.filter(|s| e.mark.ord > s.ord) {
                        fail(format!(
                            "the second signal at {:?} did not force the exit: \
                             ShutdownComplete {{ forced: false }} at {:?}",
                            s.at, e.mark.at
                        ));
                    }
                    if e.mark.at > bound {
                        fail(format!(
                            "ShutdownComplete at {:?}, after its bound {bound:?} (signal at \
                             {:?} + drain {:?} + flush grace {FLUSH_GRACE:?} + NATS drain \
                             {:?} + slack)",
                            e.mark.at, first.at, gw.drain_timeout, gw.nats_drain_timeout
                        ));
                    }
                }
            }
            if e.session != "closed" {
                fail(format!(
                    "ShutdownComplete {{ forced: {} }} at {:?} with the NATS session {}, not \
                     closed (requests held {}, output pending {})",
                    e.forced, e.mark.at, e.session, e.pending, e.session_output
                ));
            }
            if e.inflight != 0 || e.pending != 0 || e.buffered_bytes != 0 {
                fail(format!(
                    "not quiescent at ShutdownComplete at {:?}: in flight {}, session pending \
                     {}, reconnect buffer {} bytes",
                    e.mark.at, e.inflight, e.pending, e.buffered_bytes
                ));
            }
            match e.socket {
                Socket::Open => fail(format!(
                    "ShutdownComplete at {:?} with the shell's NATS socket open and no \
                     Disconnect queued for it",
                    e.mark.at
                )),
                Socket::DisconnectQueued => fail(format!(
                    "ShutdownComplete at {:?} came before the session's Disconnect: a shell \
                     that stops at ShutdownComplete leaves the NATS socket open",
                    e.mark.at
                )),
                Socket::None => {}
            }
            if e.extra != 0 {
                fail(format!("ShutdownComplete {} times", e.extra + 1));
            }
            if e.closing_seen.is_some() {
                counts.waited_for_nats += 1;
            }
        }
    }
    let forced = gw.exit.is_some_and(|e| e.forced);
    let losses: Vec<Duration> = gw
        .log
        .link
        .iter()
        .filter(|(_, up)| !up)
        .map(|(m, _)| m.at)
        .collect();
    for r in gw.requests {
        let Some(taken) = r.taken else {
            match &r.reply {
                Some(reply) => fail(format!(
                    "{} was answered ({reply:?}) but never read (harness)",
                    r.marker
                )),
                None => counts.unread += 1,
            }
            continue;
        };
        let before = taken.ord < first.ord;
        let Some(reply) = &r.reply else {
            if forced {
                counts.cut_by_force += 1;
            } else {
                fail(format!(
                    "{} (read at {:?}, {} the signal at {:?}) got no reply",
                    r.marker,
                    taken.at,
                    if before { "before" } else { "after" },
                    first.at
                ));
            }
            continue;
        };
        if !before {
            if r.published {
                fail(format!(
                    "{} read at {:?}, after the signal at {:?}, was published to NATS",
                    r.marker, taken.at, first.at
                ));
            }
            if reply.code == 6 && reply.message.contains(DRAINING) {
                counts.refused += 1;
            } else {
                fail(format!(
                    "{} read at {:?}, after the signal at {:?}, got {} instead of error 6 \
                     \"{DRAINING}\"",
                    r.marker,
                    taken.at,
                    first.at,
                    describe(reply)
                ));
            }
            continue;
        }
        let late = reply.at > deadline + gw.reply_slack;
        let ok = match reply.code {
            0 if !late => {
                counts.answered += 1;
                true
            }
            5 if !late => {
                counts.timed_out += 1;
                true
            }
            6 if reply.message.contains(DRAIN_TIMEOUT) && reply.at >= deadline && !late => {
                counts.failed_at_deadline += 1;
                true
            }
            8 if reply.message.contains(LINK_LOST)
                && !late
                && losses
                    .iter()
                    .any(|l| *l <= reply.at && reply.at <= *l + gw.reply_slack) =>
            {
                counts.lost_with_link += 1;
                true
            }
            _ => false,
        };
        if !ok {
            let mut links = String::new();
            for l in &losses {
                let _ = write!(links, " {l:?}");
            }
            fail(format!(
                "{} read at {:?}, before the signal at {:?}, got {} (drain deadline {deadline:?}; \
                 allowed: the Router's reply or error 5 by the deadline, error 6 \"{DRAIN_TIMEOUT}\" \
                 at it, error 8 \"{LINK_LOST}\" when the link was lost; links lost at:{links})",
                r.marker,
                taken.at,
                first.at,
                describe(reply)
            ));
        }
    }
    report.add(&counts);
}

fn describe(r: &Reply) -> String {
    if r.code == 0 {
        format!("the Router's reply at {:?}", r.at)
    } else {
        format!("error {} \"{}\" at {:?}", r.code, r.message, r.at)
    }
}
