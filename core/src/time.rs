//! The core's own notion of time.
//!
//! An [`Instant`] is a count of nanoseconds from an arbitrary zero chosen by the shell. The core
//! never reads a clock: the runtime passes the monotonic clock's reading, the simulator passes
//! virtual time, and both therefore print the same numbers for the same inputs.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time, in nanoseconds from an arbitrary zero.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The zero point: shells usually start here.
    pub const ZERO: Instant = Instant(0);

    pub const fn from_nanos(nanos: u64) -> Instant {
        Instant(nanos)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`, zero if `earlier` is in the future.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    /// Saturates rather than overflowing: a deadline of "practically never" stays valid.
    fn add(self, d: Duration) -> Instant {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;

    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_a_huge_duration_saturates_instead_of_wrapping() {
        let t = Instant::from_nanos(5) + Duration::from_secs(u64::MAX);
        assert_eq!(t.as_nanos(), u64::MAX);
    }

    #[test]
    fn subtraction_is_elapsed_time_and_never_negative() {
        let a = Instant::from_nanos(1_500);
        let b = Instant::from_nanos(500);
        assert_eq!(a - b, Duration::from_nanos(1_000));
        assert_eq!(b - a, Duration::ZERO);
        assert_eq!(
            format!("{:?}", Instant::from_nanos(1_000_000_123)),
            "1.000000123s"
        );
    }
}
