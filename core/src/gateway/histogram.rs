//! The request-duration histogram behind `ipc_request_duration_seconds` (gateway.md section 5).
//!
//! Durations come from the injected [`Instant`](crate::Instant)s the gateway is fed, never
//! from a clock read here, so the simulations see the same counts the daemon exports. Fixed
//! buckets rather than a log-linear sketch: Prometheus needs the same `le` bounds on every
//! scrape and every instance to sum and compare them, and twenty `u64`s cost nothing to keep.

use std::time::Duration;

/// Upper bounds of the buckets, 50 µs to 60 s (the request timeout is 30 s by default and at
/// most a minute is a sensible setting); the `+Inf` bucket above the last is implicit.
pub const REQUEST_DURATION_BOUNDS: [Duration; 19] = [
    Duration::from_micros(50),
    Duration::from_micros(100),
    Duration::from_micros(250),
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_micros(2_500),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2_500),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// Counts of observed durations per bucket, with their total count and sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationHistogram {
    /// Per bucket, *not* cumulative: `buckets[i]` counts durations in
    /// `(bounds[i-1], bounds[i]]`; the last entry is the `+Inf` bucket. Kept per bucket so
    /// one observation is one increment; the exposition sums them up.
    buckets: [u64; REQUEST_DURATION_BOUNDS.len() + 1],
    count: u64,
    sum: Duration,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            buckets: [0; REQUEST_DURATION_BOUNDS.len() + 1],
            count: 0,
            sum: Duration::ZERO,
        }
    }
}

impl DurationHistogram {
    /// Counts one duration in the first bucket whose bound it does not exceed (Prometheus
    /// buckets are `le`, less than or equal).
    pub fn observe(&mut self, d: Duration) {
        let i = REQUEST_DURATION_BOUNDS.partition_point(|&bound| bound < d);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(d);
    }

    /// `(upper bound, observations in this bucket alone)` from the lowest bound up, the
    /// `+Inf` bucket last with bound `None`.
    pub fn buckets(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        REQUEST_DURATION_BOUNDS
            .iter()
            .map(|&b| Some(b))
            .chain(std::iter::once(None))
            .zip(self.buckets.iter().copied())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> Duration {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_strictly_increasing_from_50us_to_60s() {
        assert!(REQUEST_DURATION_BOUNDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(REQUEST_DURATION_BOUNDS[0], Duration::from_micros(50));
        assert_eq!(REQUEST_DURATION_BOUNDS[18], Duration::from_secs(60));
    }

    /// A duration equal to a bound belongs to that bound's bucket (`le`); one just above it to
    /// the next; anything beyond the last bound to `+Inf`.
    #[test]
    fn observations_land_in_the_le_bucket() {
        let mut h = DurationHistogram::default();
        for d in [
            Duration::ZERO,
            Duration::from_micros(50),
            Duration::from_nanos(50_001),
            Duration::from_secs(60),
            Duration::from_secs(61),
        ] {
            h.observe(d);
        }
        let per_bucket: Vec<u64> = h.buckets().map(|(_, n)| n).collect();
        assert_eq!(per_bucket.len(), 20);
        assert_eq!(per_bucket[0], 2, "0 and exactly 50 µs are <= 50 µs");
        assert_eq!(per_bucket[1], 1, "50.001 µs is in (50 µs, 100 µs]");
        assert_eq!(per_bucket[18], 1, "exactly 60 s is <= 60 s");
        assert_eq!(per_bucket[19], 1, "61 s is only in +Inf");
        assert_eq!(per_bucket.iter().sum::<u64>(), h.count());
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum(), Duration::from_nanos(121_000_100_001));
        assert_eq!(h.buckets().last().map(|(b, _)| b), Some(None));
    }
}
