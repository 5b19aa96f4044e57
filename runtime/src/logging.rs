//! JSON Lines on stderr (gateway.md section 6): one object per line, event fields at the top
//! level, UTC timestamps with milliseconds.
//!
//! tracing-subscriber's JSON formatter does the escaping and field handling; the only piece
//! written here is the timestamp, because its default format is not the one the spec names and
//! pulling in a calendar crate for one format string is more than this needs.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::audit::{AuditLayer, AuditLog};

/// Installs the global subscriber: the stderr log at `level` (error, warn, info, debug, trace)
/// and, if configured, the audit log. Each has its own filter, so the audit log gets its
/// events (all at info or above) whatever the stderr level.
pub fn init(level: &str, audit: Option<AuditLog>) {
    let filter = EnvFilter::new(format!("warn,ipc_gateway={level},ipc_gateway_core={level}"));
    let stderr = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_timer(UtcMillis)
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let audit = audit.map(|log| {
        AuditLayer(log).with_filter(
            Targets::new()
                .with_target("ipc_gateway", Level::INFO)
                .with_target("ipc_gateway_core", Level::INFO),
        )
    });
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit)
        .init();
}

/// `2026-11-22T12:00:00.000Z`.
struct UtcMillis;

impl FormatTime for UtcMillis {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        w.write_str(&utc_millis(since.as_millis() as u64))
    }
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn utc_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let mut s = String::with_capacity(24);
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    );
    s
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(utc_millis(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-22T12:00:00.123Z
        assert_eq!(utc_millis(1_795_348_800_123), "2026-11-22T12:00:00.123Z");
        // A leap day.
        assert_eq!(utc_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_millis(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
