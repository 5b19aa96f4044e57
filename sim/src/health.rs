//! The health check both tiers run after every input (gateway.md section 5): what
//! `Gateway::health` says must agree with what the shell itself sees of the gateway.
//!
//! The shell's view is its own: whether the NATS session is Connected (`state()`, not the
//! core's link bookkeeping), since when it has not been (noted by the shell at the end of the
//! input that showed it), the breaker, the shutdown state and the requests in flight. From
//! those it derives the status the table of section 5 gives, and the core's must be that:
//!
//! - breaker Open, or a shutdown begun ⇒ UNHEALTHY;
//! - not Connected for the grace period or longer ⇒ UNHEALTHY; for less ⇒ DEGRADED at least;
//! - breaker HalfOpen, or in flight ≥ 80 % of the limit ⇒ DEGRADED at least;
//! - Connected, breaker Closed, in flight < 80 %, running ⇒ HEALTHY.
//!
//! Every change of status (or of the kind of reason) is noted ([`HealthWatch::log`]) for the scenarios' own checks (a
//! short reconnect shows DEGRADED, an open breaker UNHEALTHY, a drain UNHEALTHY).

use std::mem::Discriminant;
use std::time::Duration;

use ipc_gateway_core::breaker::BreakerState;
use ipc_gateway_core::gateway::{Health, HealthReason, HealthStatus, Shutdown};
use ipc_gateway_core::Instant;

/// What the shell sees of one gateway after an input.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The NATS session is Connected.
    pub up: bool,
    pub breaker: BreakerState,
    pub shutdown: Shutdown,
    pub inflight: usize,
    pub max_inflight: usize,
    pub grace: Duration,
}

/// One change of status: when, to what, and the reason the core gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub at: Instant,
    pub status: HealthStatus,
    pub reason: String,
}

/// One gateway's health as the shell watched it.
#[derive(Debug, Default, Clone)]
pub struct HealthWatch {
    /// Since when the session has not been Connected, as the shell saw it.
    down_since: Option<Instant>,
    /// Every spell without a Connected session: from, until (`None`: still going), and the
    /// status the check that began it saw.
    pub outages: Vec<(Instant, Option<Instant>, HealthStatus)>,
    /// The last check: when, and the status then.
    last_check: Option<(Instant, HealthStatus)>,
    /// Every change of status or of the kind of reason, the first observation included.
    pub log: Vec<Change>,
    last: Option<(HealthStatus, Option<Discriminant<HealthReason>>)>,
}

impl HealthWatch {
    /// Checks the core's health against the shell's view at `now`; returns what is wrong.
    pub fn check(&mut self, now: Instant, seen: Seen, health: Health) -> Result<(), String> {
        // Nothing happened between two checks (every input is checked), so a grace period
        // that ended in between, with the gateway not yet UNHEALTHY, should have been a
        // wakeup of its own (`poll_timeout`): the change is due at that instant.
        let missed = match (self.down_since, self.last_check) {
            (Some(since), Some((last, status))) => {
                let end = since + seen.grace;
                (status != HealthStatus::Unhealthy && last < end && end < now).then_some(end)
            }
            _ => None,
        };
        self.last_check = Some((now, health.status));
        if seen.up {
            if self.down_since.take().is_some() {
                if let Some(o) = self.outages.last_mut() {
                    o.1 = Some(now);
                }
            }
        } else if self.down_since.is_none() {
            self.down_since = Some(now);
            self.outages.push((now, None, health.status));
        }
        let kind = health.reason.as_ref().map(std::mem::discriminant);
        if self.last != Some((health.status, kind)) {
            self.last = Some((health.status, kind));
            self.log.push(Change {
                at: now,
                status: health.status,
                reason: health
                    .reason
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
            });
        }
        let down_for = self.down_since.map(|since| now - since);
        let expected = [
            (seen.breaker == BreakerState::Open).then_some(HealthStatus::Unhealthy),
            (seen.shutdown != Shutdown::Running).then_some(HealthStatus::Unhealthy),
            down_for.map(|d| {
                if d >= seen.grace {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Degraded
                }
            }),
            (seen.breaker == BreakerState::HalfOpen).then_some(HealthStatus::Degraded),
            (seen.inflight * 5 >= seen.max_inflight * 4).then_some(HealthStatus::Degraded),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(HealthStatus::Healthy);
        if let Some(end) = missed {
            return Err(format!(
                "health: the grace period ended at {end:?} without a wakeup; the next input \
                 came at {now:?} (status {health})"
            ));
        }
        if health.status == expected {
            return Ok(());
        }
        Err(format!(
            "health at {now:?}: the core says {health}, the shell sees {} (not connected for \
             {down_for:?}, grace {:?}, breaker {}, shutdown {}, in flight {} of {})",
            expected.name(),
            seen.grace,
            seen.breaker.name(),
            seen.shutdown.name(),
            seen.inflight,
            seen.max_inflight
        ))
    }

    /// Whether a change to `status` with a reason starting with `reason` was seen in
    /// `[from, to]`.
    pub fn saw(&self, status: HealthStatus, reason: &str, from: Instant, to: Instant) -> bool {
        self.log.iter().any(|c| {
            c.status == status && c.reason.starts_with(reason) && c.at >= from && c.at <= to
        })
    }

    /// The status at `at` (the last change at or before it).
    pub fn status_at(&self, at: Instant) -> Option<HealthStatus> {
        self.log
            .iter()
            .take_while(|c| c.at <= at)
            .last()
            .map(|c| c.status)
    }

    /// Checks every spell without NATS against the grace period: a shorter one is not
    /// HEALTHY at its start and never "nats down"; a longer one turns UNHEALTHY ("nats down")
    /// at the grace period's exact end, unless it already was for another reason. Returns
    /// (short spells, long spells) seen, or what is wrong.
    pub fn check_outages(&self, grace: Duration) -> Result<(usize, usize), String> {
        let (mut short, mut long) = (0, 0);
        for &(from, to, first) in &self.outages {
            let end = from + grace;
            match to {
                Some(to) if to - from < grace => {
                    short += 1;
                    if first == HealthStatus::Healthy {
                        return Err(format!("no link from {from:?}: still HEALTHY"));
                    }
                    if let Some(c) = self
                        .log
                        .iter()
                        .find(|c| c.at >= from && c.at < to && c.reason.starts_with("nats down"))
                    {
                        return Err(format!(
                            "no link {from:?}..{to:?}, shorter than the grace {grace:?}: {} \
                             ({}) at {:?}",
                            c.status.name(),
                            c.reason,
                            c.at
                        ));
                    }
                }
                Some(to) if to <= end => {}
                _ if self.last_check.is_some_and(|(t, _)| t < end) => {} // not reached
                _ => {
                    long += 1;
                    let before = self
                        .log
                        .iter()
                        .take_while(|c| c.at < end)
                        .last()
                        .map(|c| c.status);
                    if before == Some(HealthStatus::Unhealthy) {
                        continue;
                    }
                    if !self.saw(HealthStatus::Unhealthy, "nats down", end, end) {
                        return Err(format!(
                            "no link from {from:?} until {to:?}: not UNHEALTHY (nats down) at \
                             the grace period's end {end:?}: {}",
                            self.line()
                        ));
                    }
                }
            }
        }
        Ok((short, long))
    }

    /// The log in one line, for failure messages.
    pub fn line(&self) -> String {
        self.log
            .iter()
            .map(|c| format!("{:?} {} ({})", c.at, c.status.name(), c.reason))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
