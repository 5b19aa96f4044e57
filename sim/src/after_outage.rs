//! The check both tiers run after every scenario run (gateway.md section 4): after an outage,
//! the first request a gateway admits once its NATS session is Connected again is published
//! to NATS. The breaker judges the Router, not the link, so failures the outage caused must
//! not leave it refusing that request with error 8.
//!
//! Each tier's shell fills one [`GatewayLog`] per gateway as the run goes: after every input
//! whether the session is Connected and what the breaker is ([`GatewayLog::observe`]), and
//! every task request the gateway reads ([`GatewayLog::took`]). All of it is stamped with a
//! [`Mark`], whose `ord` comes from one counter per run, so "after that moment" means after in
//! the order of events, not merely at a later or equal virtual time (a request read at the
//! same instant but before the handshake ended is not one admitted after it). What the NATS
//! stand-in recorded as published, and what each client got back, come in at the end.
//!
//! The moments checked:
//! - the session becomes Connected again after it had been Connected and lost the link (a
//!   bounce, a crash, a partition, a vanished machine, a stale connection …);
//! - the Routers come back after being away (no responders), with the session Connected at
//!   that moment ([`Outage`]; tier 1).
//!
//! For each moment, the request checked is the first task request the gateway read after it
//! (local PINGs and requests shed with error 7 by the in-flight limit are not admissions; a
//! connection at its own in-flight limit reads nothing, so what the gateway read is what it
//! decided on). It must not be refused by the breaker, and it must be on the stand-in's list
//! of publishes from this gateway, at or after the moment. Nothing is checked (counted, not
//! failed) when:
//! - no request was read before the link was lost again (`vacuous`);
//! - the breaker went Open before that request on requests admitted after the moment: the
//!   Router really failed to answer on the live link, which section 4 counts (`excused`).
//!   After a link return that means an opening one request timeout or more after the moment
//!   (sooner, only requests from before the moment can have timed out: the outage held them
//!   up in the reconnect buffer, and an opening on those is the outage's); after a Routers'
//!   return, any opening since they left, or a breaker not Closed when they left;
//! - the link was lost again before the request was answered, so its bytes may never have
//!   reached the server (`cut`).
//!
//! A gateway that was signalled to shut down admits nothing from then on (gateway.md section
//! 8: new requests get error 6): a moment whose first request was read after the signal is
//! `vacuous` too. The shutdown itself is checked by [`crate::shutdown`].

use std::fmt::Write as _;
use std::time::Duration;

/// When something happened: the order of events in the run (`ord`, one counter per run), and
/// the virtual time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    pub ord: u64,
    pub at: Duration,
}

/// What a client got for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub at: Duration,
    /// 0 for a Router reply (RESPONSE_OK), otherwise the error code.
    pub code: u16,
    /// The error message, empty for a Router reply.
    pub message: String,
}

impl Reply {
    /// Refused at admission because the breaker is not admitting (gateway.rs: error 8,
    /// "Router unavailable: circuit breaker open", no request id).
    pub fn breaker_refusal(&self) -> bool {
        self.code == 8 && self.message.contains("circuit breaker")
    }
}

/// The Routers were away (no responders) from `start` until `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    pub start: Mark,
    pub end: Mark,
}

/// One gateway's history, for [`check`].
#[derive(Debug, Default, Clone)]
pub struct GatewayLog {
    /// Every change of "the NATS session is Connected", the first observation included.
    pub link: Vec<(Mark, bool)>,
    /// Every change of the breaker state (its name), the first observation included.
    pub breaker: Vec<(Mark, &'static str)>,
    /// Every transition to Open (one mark per step of the gateway's `open` counter).
    pub opens: Vec<Mark>,
    /// Task requests in the order the gateway read them: (when, the request's marker).
    pub taken: Vec<(Mark, String)>,
    opens_seen: u64,
}

impl GatewayLog {
    /// Records what the gateway's link and breaker show now ([`GatewayLog::observe`]).
    pub fn observe_gateway(
        &mut self,
        mark: Mark,
        gw: &ipc_gateway_core::Gateway<ipc_gateway_core::nats_session::NatsSession>,
    ) {
        let connected =
            gw.upstream().state() == ipc_gateway_core::nats_config::SessionState::Connected;
        let opens = gw
            .stats()
            .breaker_transitions
            .get("open")
            .copied()
            .unwrap_or(0);
        self.observe(mark, connected, gw.breaker_state().name(), opens);
    }

    /// Records what changed since the last call. `opens` is the gateway's count of
    /// transitions to Open (`stats().breaker_transitions["open"]`).
    pub fn observe(&mut self, mark: Mark, connected: bool, breaker: &'static str, opens: u64) {
        if self.link.last().map(|l| l.1) != Some(connected) {
            self.link.push((mark, connected));
        }
        if self.breaker.last().map(|b| b.1) != Some(breaker) {
            self.breaker.push((mark, breaker));
        }
        while self.opens_seen < opens {
            self.opens_seen += 1;
            self.opens.push(mark);
        }
    }

    /// The gateway read a task request (its frame) at `mark`.
    pub fn took(&mut self, mark: Mark, marker: String) {
        self.taken.push((mark, marker));
    }

    fn connected_at(&self, m: Mark) -> bool {
        self.link
            .iter()
            .take_while(|(l, _)| l.ord <= m.ord)
            .last()
            .is_some_and(|l| l.1)
    }

    fn breaker_at(&self, m: Mark) -> &'static str {
        self.breaker
            .iter()
            .take_while(|(b, _)| b.ord <= m.ord)
            .last()
            .map_or("closed", |b| b.1)
    }

    /// The next loss of the link after `m`.
    fn lost_after(&self, m: Mark) -> Option<Mark> {
        self.link
            .iter()
            .find(|(l, up)| l.ord > m.ord && !up)
            .map(|l| l.0)
    }

    /// The breaker's states from `from` on, for a failure message.
    fn breaker_since(&self, from: Mark) -> String {
        let mut s = format!("{} at {:?}", self.breaker_at(from), from.at);
        for (m, state) in self.breaker.iter().filter(|(m, _)| m.ord > from.ord) {
            let _ = write!(s, ", {state} at {:?}", m.at);
        }
        s
    }
}

/// A moment after which the first admitted request must be published.
struct Moment {
    at: Mark,
    /// An opening after this excuses a refusal.
    since: Mark,
    /// … if it came this long after `at` or later.
    not_before: Duration,
    /// The breaker's history is shown from here in a failure.
    history: Mark,
    /// The breaker must have been Closed at `since` (else: excused).
    closed_before: bool,
    what: String,
}

/// What [`check`] found, summed over the gateways (and, by a test, over a sweep).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Moments whose first request was checked and published.
    pub checked: u64,
    pub vacuous: u64,
    pub excused: u64,
    pub cut: u64,
    pub failures: Vec<String>,
}

impl Report {
    pub fn add(&mut self, other: &Report) {
        self.checked += other.checked;
        self.vacuous += other.vacuous;
        self.excused += other.excused;
        self.cut += other.cut;
        self.failures.extend(other.failures.iter().cloned());
    }

    /// One line for a run's summary.
    pub fn line(&self) -> String {
        format!(
            "after-outage: checked={} vacuous={} excused={} cut={} failed={}",
            self.checked,
            self.vacuous,
            self.excused,
            self.cut,
            self.failures.len()
        )
    }
}

/// One gateway's run, for [`check`].
pub struct Gateway<'a> {
    /// The run's seed and the gateway's name, for the failure messages.
    pub seed: u64,
    pub name: &'a str,
    /// The gateway's: a request admitted after the link is back cannot time out sooner, so
    /// an opening sooner than that was caused by requests from before, which the outage
    /// held up.
    pub request_timeout: Duration,
    pub log: &'a GatewayLog,
    /// The Routers' spells away (tier 1).
    pub routers_away: &'a [Outage],
    /// What the stand-in recorded as published from this gateway's connections: (time at
    /// the server, marker).
    pub published: &'a [(Duration, String)],
    /// When the gateway took its first shutdown signal, if it did.
    pub shutdown_at: Option<Mark>,
}

/// Checks one gateway (see the module doc). `reply` finds what the client got for a marker
/// (`None`: the client left before the reply).
pub fn check(gw: &Gateway<'_>, reply: &dyn Fn(&str) -> Option<Reply>, report: &mut Report) {
    let Gateway {
        seed,
        name: gateway,
        request_timeout,
        log,
        routers_away,
        published,
        shutdown_at,
    } = *gw;
    let mut moments: Vec<Moment> = Vec::new();
    let mut was_up = false;
    let mut lost = Mark::default();
    for &(m, up) in &log.link {
        if up && was_up {
            moments.push(Moment {
                at: m,
                since: m,
                not_before: request_timeout,
                history: lost,
                closed_before: false,
                what: format!(
                    "NATS session Connected again at {:?} (link lost at {:?})",
                    m.at, lost.at
                ),
            });
        }
        if !up {
            lost = m;
        }
        was_up |= up;
    }
    for o in routers_away {
        if log.connected_at(o.end) {
            moments.push(Moment {
                at: o.end,
                since: o.start,
                not_before: Duration::ZERO,
                history: o.start,
                closed_before: true,
                what: format!(
                    "Routers back at {:?} after being away since {:?}, NATS session Connected",
                    o.end.at, o.start.at
                ),
            });
        }
    }
    for Moment {
        at: moment,
        since,
        not_before,
        history,
        closed_before,
        what,
    } in moments
    {
        let window_end = log.lost_after(moment);
        let first = log
            .taken
            .iter()
            .find(|(m, marker)| m.ord > moment.ord && reply(marker).is_none_or(|r| r.code != 7));
        let Some((taken, marker)) = first else {
            report.vacuous += 1;
            continue;
        };
        if window_end.is_some_and(|e| e.ord < taken.ord)
            || shutdown_at.is_some_and(|s| s.ord < taken.ord)
        {
            report.vacuous += 1;
            continue;
        }
        let opened = log
            .opens
            .iter()
            .any(|o| o.ord > since.ord && o.ord < taken.ord && o.at >= moment.at + not_before);
        if opened || (closed_before && log.breaker_at(since) != "closed") {
            report.excused += 1;
            continue;
        }
        let r = reply(marker);
        if let Some(r) = r.as_ref().filter(|r| r.breaker_refusal()) {
            report.failures.push(format!(
                "seed {seed}: {gateway}: {what}; the first request it admitted after that, \
                 {marker} (read at {:?}), was refused by the breaker at {:?} with error 8 \
                 \"{}\" instead of being published (breaker: {})",
                taken.at,
                r.at,
                r.message,
                log.breaker_since(history)
            ));
            continue;
        }
        if published
            .iter()
            .any(|(at, m)| m == marker && *at >= moment.at)
        {
            report.checked += 1;
            continue;
        }
        let answered = r.as_ref().map(|r| r.at);
        if window_end.is_some_and(|e| answered.is_none_or(|a| e.at <= a)) {
            report.cut += 1;
            continue;
        }
        report.failures.push(format!(
            "seed {seed}: {gateway}: {what}; the first request it admitted after that, \
             {marker} (read at {:?}), was never published to NATS (reply: {r:?}; breaker: {})",
            taken.at,
            log.breaker_since(history)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ord: u64, ms: u64) -> Mark {
        Mark {
            ord,
            at: Duration::from_millis(ms),
        }
    }

    fn refusal(at: u64) -> Reply {
        Reply {
            at: Duration::from_millis(at),
            code: 8,
            message: "Router unavailable: circuit breaker open".into(),
        }
    }

    /// Up at 1, lost at 2, up again at 10; request "r" read at 11.
    fn bounced() -> GatewayLog {
        let mut log = GatewayLog::default();
        log.observe(m(1, 0), true, "closed", 0);
        log.observe(m(2, 100), false, "closed", 0);
        log.observe(m(3, 150), false, "open", 1);
        log.observe(m(10, 1000), true, "open", 1);
        log.took(m(11, 1000), "r".into());
        log
    }

    fn run(log: &GatewayLog, published: &[(Duration, String)], r: Option<Reply>) -> Report {
        let mut report = Report::default();
        let gw = Gateway {
            seed: 7,
            name: "g0",
            request_timeout: Duration::from_millis(300),
            log,
            routers_away: &[],
            published,
            shutdown_at: None,
        };
        check(&gw, &|_| r.clone(), &mut report);
        report
    }

    #[test]
    fn a_breaker_refusal_after_a_reconnect_fails() {
        let report = run(&bounced(), &[], Some(refusal(1000)));
        assert_eq!(report.failures.len(), 1, "{report:?}");
        let f = &report.failures[0];
        assert!(
            f.contains("seed 7: g0: NATS session Connected again at 1s"),
            "{f}"
        );
        assert!(f.contains("r (read at 1s)"), "{f}");
        assert!(f.contains("breaker: closed at 100ms, open at 150ms"), "{f}");
    }

    #[test]
    fn a_published_request_passes() {
        let ok = Reply {
            at: Duration::from_millis(1010),
            code: 0,
            message: String::new(),
        };
        let report = run(
            &bounced(),
            &[(Duration::from_millis(1005), "r".into())],
            Some(ok),
        );
        assert_eq!(
            (report.checked, report.failures.len()),
            (1, 0),
            "{report:?}"
        );
    }

    #[test]
    fn a_request_neither_published_nor_cut_fails() {
        let timeout = Reply {
            at: Duration::from_millis(2000),
            code: 5,
            message: "Timeout".into(),
        };
        let report = run(&bounced(), &[], Some(timeout));
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert!(report.failures[0].contains("never published"));
    }

    #[test]
    fn an_opening_on_the_new_link_excuses() {
        let mut log = bounced();
        log.observe(m(10, 1000), true, "closed", 1);
        log.taken.clear();
        log.observe(m(12, 1500), true, "open", 2);
        log.took(m(13, 1600), "r".into());
        let report = run(&log, &[], Some(refusal(1600)));
        assert_eq!(
            (report.excused, report.failures.len()),
            (1, 0),
            "{report:?}"
        );
    }

    #[test]
    fn an_opening_on_requests_from_before_the_moment_does_not_excuse() {
        // Requests the outage held in the buffer, written at 1 s with little time left,
        // time out at once: sooner than any request admitted after 1 s could.
        let mut log = bounced();
        log.observe(m(10, 1000), true, "closed", 1);
        log.taken.clear();
        log.observe(m(12, 1001), true, "open", 2);
        log.took(m(13, 1100), "r".into());
        let report = run(&log, &[], Some(refusal(1100)));
        assert_eq!(report.failures.len(), 1, "{report:?}");
    }

    #[test]
    fn a_request_read_before_the_handshake_ended_is_not_the_one() {
        let mut log = bounced();
        log.taken.clear();
        log.took(m(9, 1000), "early".into());
        let report = run(&log, &[], Some(refusal(1000)));
        assert_eq!(
            (report.vacuous, report.failures.len()),
            (1, 0),
            "{report:?}"
        );
    }

    #[test]
    fn the_first_connect_is_no_reconnect() {
        let mut log = GatewayLog::default();
        log.observe(m(1, 0), false, "open", 1);
        log.observe(m(2, 10), true, "open", 1);
        log.took(m(3, 20), "r".into());
        let report = run(&log, &[], Some(refusal(20)));
        assert_eq!(report, Report::default());
    }

    #[test]
    fn routers_back_with_the_breaker_open_since_they_left_fails() {
        let mut log = GatewayLog::default();
        log.observe(m(1, 0), true, "closed", 0);
        log.took(m(5, 900), "r".into());
        let away = Outage {
            start: m(2, 100),
            end: m(4, 800),
        };
        let mut report = Report::default();
        let r = refusal(900);
        let gw = Gateway {
            seed: 7,
            name: "g0",
            request_timeout: Duration::from_millis(300),
            log: &log,
            routers_away: &[away],
            published: &[],
            shutdown_at: None,
        };
        check(&gw, &|_| Some(r.clone()), &mut report);
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert!(report.failures[0].contains("Routers back at 800ms"));
    }

    /// A gateway signalled to shut down refuses what it reads from then on (error 6): the
    /// first request after a reconnect, read after the signal, is not checked.
    #[test]
    fn a_request_read_after_the_shutdown_signal_is_not_the_one() {
        let log = bounced();
        let draining = Reply {
            at: Duration::from_millis(1000),
            code: 6,
            message: "Shutting down: the gateway is draining".into(),
        };
        let mut report = Report::default();
        let gw = Gateway {
            seed: 7,
            name: "g0",
            request_timeout: Duration::from_millis(300),
            log: &log,
            routers_away: &[],
            published: &[],
            shutdown_at: Some(m(10, 1000)),
        };
        check(&gw, &|_| Some(draining.clone()), &mut report);
        assert_eq!(
            (report.vacuous, report.failures.len()),
            (1, 0),
            "{report:?}"
        );
    }
}
