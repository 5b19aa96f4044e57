//! Health (gateway.md section 5): HEALTHY, DEGRADED or UNHEALTHY, from the gateway's own state
//! and the time it is given (no clock reads), so every shell and both simulations see the same.
//!
//! ```text
//!   condition, in the order the reason is picked             status      reason
//!   a shutdown has begun (any state but Running)             UNHEALTHY   "draining"
//!   breaker Open                                             UNHEALTHY   "breaker open"
//!   no link, and the last attempt's credentials or TLS       UNHEALTHY   "nats auth failed:
//!     were refused (Upstream::link_failure), at once                      Authorization Violation"
//!   no link for the grace period or longer                   UNHEALTHY   "nats down for 7.2 s"
//!   no link for less than the grace period, one was up       DEGRADED    "nats reconnecting"
//!   no link for less than the grace period, none ever up     DEGRADED    "nats connecting"
//!   breaker HalfOpen                                         DEGRADED    "breaker half-open"
//!   in flight >= 80 % of GatewayConfig::max_inflight         DEGRADED    "in-flight 850 of 1000"
//!   none of these (NATS connected or stub mode)              HEALTHY     none
//!
//!                  any DEGRADED row               grace over, still no link
//!   ┌─────────┐ ─────────────────▶ ┌──────────┐ ──────────────────────────▶ ┌───────────┐
//!   │ Healthy │                    │ Degraded │                             │ Unhealthy │
//!   └─────────┘ ◀───────────────── └──────────┘ ◀────────────────────────── └───────────┘
//!        ▲  │        all clear                     link back, breaker half-opens  ▲  │
//!        │  └───────── breaker opens, shutdown, grace over (straight) ──────────┘  │
//!        └───────────────────────────── all clear ─────────────────────────────────┘
//!                      (also straight: credentials or TLS refused)
//! ```
//!
//! The worst applicable status wins, and the reason is the first row of that status that
//! applies. The labels are [`HealthStatus`]'s variants; [`assess`] is the one function that
//! decides, and [`Gateway::update_health`] the one place that changes the gateway's health: at
//! the end of every input, and so at the grace period's end too, which is a deadline of
//! [`Gateway::poll_timeout`]: the change to UNHEALTHY happens at that exact instant, not at
//! the next input. A change of status is logged once (`health_changed`) and counted
//! ([`super::GatewayStats::health_changes`]); a new reason under the same status is not a
//! change (the reason of an outage grows with it).
//!
//! A refused credential or a failed TLS handshake ([`Upstream::link_failure`]) is UNHEALTHY
//! at once, not after the grace period: reconnecting cannot fix it, an operator must, and a
//! DEGRADED "reconnecting" would hide the reason for five seconds. It clears when a link
//! comes up (someone fixed the server or the files and the next attempt succeeded).
//!
//! "No link" is the upstream's [`Upstream::link`] being `None` (the stub always has one). The
//! outage is timed from the first input that finds no link. Before the first link was ever
//! up (the NATS session still connecting at start), the gateway counts as reconnecting, with
//! the grace period counted from its first input: the core has no time before that (the
//! shell's first call, normally the `handle_timeout` that starts the session). Until that
//! input, a gateway without a link is DEGRADED ("nats connecting") with no deadline.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{Gateway, Shutdown};
use crate::breaker::BreakerState;
use crate::time::Instant;
use crate::upstream::Upstream;

/// How healthy the gateway is; the order is from best to worst, so the worst of several is
/// their maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthStatus {
    /// The name in `/health`, logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "HEALTHY",
            HealthStatus::Degraded => "DEGRADED",
            HealthStatus::Unhealthy => "UNHEALTHY",
        }
    }

    /// The value of the `ipc_health_status` gauge: 0 healthy, 1 degraded, 2 unhealthy.
    pub fn value(self) -> u8 {
        match self {
            HealthStatus::Healthy => 0,
            HealthStatus::Degraded => 1,
            HealthStatus::Unhealthy => 2,
        }
    }
}

/// What made the gateway less than healthy (the rows of the module doc's table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthReason {
    /// A shutdown has begun (draining, flushing, closing the upstream, done).
    Draining,
    BreakerOpen,
    /// No link, and the server refused the credentials or TLS failed: the upstream's words,
    /// e.g. `nats auth failed: Authorization Violation` (shared: health is read every turn).
    NatsLinkFailed(Arc<str>),
    /// No link for the grace period or longer; `down_for` as of the last input.
    NatsDown {
        down_for: Duration,
    },
    /// No link for less than the grace period, after one was up.
    NatsReconnecting,
    /// No link for less than the grace period, and none was ever up.
    NatsConnecting,
    BreakerHalfOpen,
    /// At least 80 % of the global in-flight limit is taken.
    InFlight {
        inflight: usize,
        limit: usize,
    },
}

impl fmt::Display for HealthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HealthReason::Draining => f.write_str("draining"),
            HealthReason::BreakerOpen => f.write_str("breaker open"),
            HealthReason::NatsLinkFailed(ref why) => f.write_str(why),
            HealthReason::NatsDown { down_for } => {
                write!(f, "nats down for {:.1} s", down_for.as_secs_f64())
            }
            HealthReason::NatsReconnecting => f.write_str("nats reconnecting"),
            HealthReason::NatsConnecting => f.write_str("nats connecting"),
            HealthReason::BreakerHalfOpen => f.write_str("breaker half-open"),
            HealthReason::InFlight { inflight, limit } => {
                write!(f, "in-flight {inflight} of {limit}")
            }
        }
    }
}

/// The gateway's health: a status and, unless healthy, what made it so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: HealthStatus,
    pub reason: Option<HealthReason>,
}

impl Health {
    pub const HEALTHY: Health = Health {
        status: HealthStatus::Healthy,
        reason: None,
    };
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            None => f.write_str(self.status.name()),
            Some(reason) => write!(f, "{} ({reason})", self.status.name()),
        }
    }
}

/// The upstream's link, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHealth {
    /// A link is up (or there is none to have: the stub).
    Up,
    /// No link for `down_for`; `ever_up` says whether one was up before.
    Down { down_for: Duration, ever_up: bool },
}

/// Everything health depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthInputs {
    pub shutdown: Shutdown,
    pub breaker: BreakerState,
    pub link: LinkHealth,
    /// [`Upstream::link_failure`]: counts only while there is no link.
    pub link_failure: Option<Arc<str>>,
    pub grace: Duration,
    pub inflight: usize,
    pub max_inflight: usize,
}

/// The one decision: the module doc's table, top row first within each status.
pub fn assess(i: &HealthInputs) -> Health {
    let unhealthy = if i.shutdown != Shutdown::Running {
        Some(HealthReason::Draining)
    } else if i.breaker == BreakerState::Open {
        Some(HealthReason::BreakerOpen)
    } else if let (LinkHealth::Down { .. }, Some(why)) = (i.link, &i.link_failure) {
        Some(HealthReason::NatsLinkFailed(why.clone()))
    } else {
        match i.link {
            LinkHealth::Down { down_for, .. } if down_for >= i.grace => {
                Some(HealthReason::NatsDown { down_for })
            }
            _ => None,
        }
    };
    if let Some(reason) = unhealthy {
        return Health {
            status: HealthStatus::Unhealthy,
            reason: Some(reason),
        };
    }
    let degraded = if let LinkHealth::Down { ever_up, .. } = i.link {
        Some(if ever_up {
            HealthReason::NatsReconnecting
        } else {
            HealthReason::NatsConnecting
        })
    } else if i.breaker == BreakerState::HalfOpen {
        Some(HealthReason::BreakerHalfOpen)
    } else if busy(i.inflight, i.max_inflight) {
        Some(HealthReason::InFlight {
            inflight: i.inflight,
            limit: i.max_inflight,
        })
    } else {
        None
    };
    match degraded {
        Some(reason) => Health {
            status: HealthStatus::Degraded,
            reason: Some(reason),
        },
        None => Health::HEALTHY,
    }
}

/// In-flight at or above 80 % of the limit, in integers (850 of 1000 is, 799 is not).
pub fn busy(inflight: usize, limit: usize) -> bool {
    (inflight as u128) * 5 >= (limit as u128) * 4
}

impl<U: Upstream> Gateway<U> {
    /// The health as of the last input (cheap: nothing is computed). The status is exact at
    /// every instant a shell may look, since the grace period's end is a deadline; the
    /// duration in a "nats down" reason is as of the last input.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The health of a gateway that has had no input yet (module doc).
    pub(super) fn initial_health(config: &super::GatewayConfig, upstream: &U) -> Health {
        let link = match upstream.link() {
            Some(_) => LinkHealth::Up,
            None => LinkHealth::Down {
                down_for: Duration::ZERO,
                ever_up: false,
            },
        };
        assess(&HealthInputs {
            shutdown: Shutdown::Running,
            breaker: BreakerState::Closed,
            link,
            link_failure: None,
            grace: config.health_grace,
            inflight: 0,
            max_inflight: config.max_inflight,
        })
    }

    /// The one transition function, at the end of every input: re-assesses, keeps the grace
    /// deadline, and logs and counts a change of status.
    pub(super) fn update_health(&mut self, now: Instant) {
        let grace = self.config.health_grace;
        let link = match self.link_down_since {
            None => LinkHealth::Up,
            Some(since) => LinkHealth::Down {
                down_for: now - since,
                ever_up: self.ever_linked,
            },
        };
        // Compared before it is shared, so an unchanged failure costs no allocation per input.
        let link_failure = match (self.upstream.link_failure(), &self.health.reason) {
            (None, _) => None,
            (Some(now), Some(HealthReason::NatsLinkFailed(was))) if **was == *now => {
                Some(was.clone())
            }
            (Some(now), _) => Some(Arc::from(now)),
        };
        let next = assess(&HealthInputs {
            shutdown: self.shutdown,
            breaker: self.breaker.state(),
            link,
            link_failure,
            grace,
            inflight: self.inflight.len(),
            max_inflight: self.config.max_inflight,
        });
        self.health_deadline = self
            .link_down_since
            .map(|since| since + grace)
            .filter(|&end| end > now);
        let from = self.health.status;
        self.health = next.clone();
        if next.status == from {
            return;
        }
        *self
            .stats
            .health_changes
            .entry(next.status.name())
            .or_default() += 1;
        let reason = next
            .reason
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        if next.status == HealthStatus::Healthy {
            info!(
                event = "health_changed",
                component = "health",
                from = from.name(),
                to = next.status.name(),
                reason
            );
        } else {
            warn!(
                event = "health_changed",
                component = "health",
                from = from.name(),
                to = next.status.name(),
                reason
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> HealthInputs {
        HealthInputs {
            shutdown: Shutdown::Running,
            breaker: BreakerState::Closed,
            link: LinkHealth::Up,
            link_failure: None,
            grace: Duration::from_secs(5),
            inflight: 0,
            max_inflight: 1000,
        }
    }

    fn down(ms: u64, ever_up: bool) -> LinkHealth {
        LinkHealth::Down {
            down_for: Duration::from_millis(ms),
            ever_up,
        }
    }

    fn shown(h: Health) -> (&'static str, String) {
        (
            h.status.name(),
            h.reason.map(|r| r.to_string()).unwrap_or_default(),
        )
    }

    fn refused(why: &str) -> Option<Arc<str>> {
        Some(Arc::from(why))
    }

    /// Every row of the module doc's table, alone.
    #[test]
    fn each_row_of_the_table() {
        let rows: Vec<(HealthInputs, (&str, &str))> = vec![
            (inputs(), ("HEALTHY", "")),
            (
                HealthInputs {
                    shutdown: Shutdown::ClosingUpstream,
                    ..inputs()
                },
                ("UNHEALTHY", "draining"),
            ),
            (
                HealthInputs {
                    breaker: BreakerState::Open,
                    ..inputs()
                },
                ("UNHEALTHY", "breaker open"),
            ),
            (
                HealthInputs {
                    link: down(10, true),
                    link_failure: refused("nats auth failed: Authorization Violation"),
                    ..inputs()
                },
                ("UNHEALTHY", "nats auth failed: Authorization Violation"),
            ),
            (
                HealthInputs {
                    link: down(7200, true),
                    ..inputs()
                },
                ("UNHEALTHY", "nats down for 7.2 s"),
            ),
            (
                HealthInputs {
                    link: down(4999, true),
                    ..inputs()
                },
                ("DEGRADED", "nats reconnecting"),
            ),
            (
                HealthInputs {
                    link: down(0, false),
                    ..inputs()
                },
                ("DEGRADED", "nats connecting"),
            ),
            (
                HealthInputs {
                    breaker: BreakerState::HalfOpen,
                    ..inputs()
                },
                ("DEGRADED", "breaker half-open"),
            ),
            (
                HealthInputs {
                    inflight: 850,
                    ..inputs()
                },
                ("DEGRADED", "in-flight 850 of 1000"),
            ),
            (
                HealthInputs {
                    inflight: 799,
                    ..inputs()
                },
                ("HEALTHY", ""),
            ),
        ];
        for (i, (status, reason)) in rows {
            assert_eq!(shown(assess(&i)), (status, reason.to_string()), "{i:?}");
        }
    }

    /// A refused credential or TLS failure is UNHEALTHY at once, before the grace period,
    /// also before any link was ever up; it yields to draining and an open breaker, and
    /// means nothing while a link is up (the session clears it then anyway).
    #[test]
    fn a_refused_link_is_unhealthy_at_once() {
        let tls = refused("nats tls failed: invalid peer certificate: UnknownIssuer");
        for ever_up in [false, true] {
            let i = HealthInputs {
                link: down(0, ever_up),
                link_failure: tls.clone(),
                ..inputs()
            };
            assert_eq!(
                shown(assess(&i)),
                (
                    "UNHEALTHY",
                    "nats tls failed: invalid peer certificate: UnknownIssuer".into()
                )
            );
        }
        let draining = HealthInputs {
            shutdown: Shutdown::ClosingUpstream,
            link: down(0, true),
            link_failure: tls.clone(),
            ..inputs()
        };
        assert_eq!(shown(assess(&draining)).1, "draining");
        let open = HealthInputs {
            breaker: BreakerState::Open,
            link: down(0, true),
            link_failure: tls.clone(),
            ..inputs()
        };
        assert_eq!(shown(assess(&open)).1, "breaker open");
        let up = HealthInputs {
            link_failure: tls,
            ..inputs()
        };
        assert_eq!(shown(assess(&up)), ("HEALTHY", String::new()));
    }

    /// The grace period ends at its exact length: down that long is UNHEALTHY.
    #[test]
    fn the_grace_boundary() {
        let at = |ms| {
            assess(&HealthInputs {
                link: down(ms, true),
                ..inputs()
            })
            .status
        };
        assert_eq!(at(4999), HealthStatus::Degraded);
        assert_eq!(at(5000), HealthStatus::Unhealthy);
    }

    /// 80 % in integers: 4 of 5 is busy, 3 of 5 is not; a limit of 3 is busy at 3.
    #[test]
    fn eighty_percent_of_the_limit() {
        assert!(busy(800, 1000) && !busy(799, 1000));
        assert!(busy(4, 5) && !busy(3, 5));
        assert!(busy(3, 3) && !busy(2, 3));
    }

    /// The worst applicable status wins; within it, the first row of the table names it.
    #[test]
    fn the_worst_wins_and_the_first_row_names_it() {
        let all_bad = HealthInputs {
            shutdown: Shutdown::Draining {
                deadline: Instant::ZERO,
            },
            breaker: BreakerState::Open,
            link: down(9000, true),
            inflight: 1000,
            ..inputs()
        };
        assert_eq!(shown(assess(&all_bad)), ("UNHEALTHY", "draining".into()));
        let open_and_down = HealthInputs {
            shutdown: Shutdown::Running,
            ..all_bad
        };
        assert_eq!(
            shown(assess(&open_and_down)),
            ("UNHEALTHY", "breaker open".into())
        );
        let degraded_link_busy_half_open = HealthInputs {
            breaker: BreakerState::HalfOpen,
            link: down(10, true),
            ..open_and_down
        };
        assert_eq!(
            shown(assess(&degraded_link_busy_half_open)),
            ("DEGRADED", "nats reconnecting".into())
        );
        let half_open_and_busy = HealthInputs {
            link: LinkHealth::Up,
            ..degraded_link_busy_half_open
        };
        assert_eq!(
            shown(assess(&half_open_and_busy)),
            ("DEGRADED", "breaker half-open".into())
        );
        // A degraded row never hides an unhealthy one.
        let busy_and_down = HealthInputs {
            breaker: BreakerState::Closed,
            link: down(5000, false),
            ..half_open_and_busy
        };
        assert_eq!(busy_and_down.inflight, 1000);
        assert_eq!(assess(&busy_and_down).status, HealthStatus::Unhealthy);
    }

    #[test]
    fn names_and_values() {
        let all = [
            HealthStatus::Healthy,
            HealthStatus::Degraded,
            HealthStatus::Unhealthy,
        ];
        assert_eq!(
            all.map(HealthStatus::name),
            ["HEALTHY", "DEGRADED", "UNHEALTHY"]
        );
        assert_eq!(all.map(HealthStatus::value), [0, 1, 2]);
        assert!(HealthStatus::Healthy < HealthStatus::Degraded);
        assert!(HealthStatus::Degraded < HealthStatus::Unhealthy);
        let h = Health {
            status: HealthStatus::Unhealthy,
            reason: Some(HealthReason::BreakerOpen),
        };
        assert_eq!(h.to_string(), "UNHEALTHY (breaker open)");
        assert_eq!(Health::HEALTHY.to_string(), "HEALTHY");
    }
}
