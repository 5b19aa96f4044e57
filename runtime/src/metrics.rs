//! `/metrics`: the Prometheus exposition of the gateway's state (gateway.md section 5).
//!
//! This file is the interface between the HTTP server (`crate::http`, which serves the bytes
//! and counts its own requests) and the exposition: [`render`] takes one [`Scrape`] and a
//! [`Format`] and returns the body.
//!
//! The values live in the core's counters (`GatewayStats`, `NatsStats`), which the core keeps
//! from injected time anyway, so nothing here counts twice: each scrape copies them into a
//! [`Snapshot`], a `prometheus_client` [`Collector`] that writes every family with constant
//! metrics, and lets the crate's encoders write text format 0.0.4 or OpenMetrics 1.0. A
//! registry of live `Counter`s would mean incrementing atomics beside every core counter on
//! the IPC path; a snapshot costs only the scrape.
//!
//! Every labelled family exports its known label values from the start, at 0, so that
//! `rate()` and `increase()` see the first event rather than a series that appears with it.

use std::collections::BTreeMap;
use std::fmt;

use ipc_gateway_core::breaker::BreakerState;
use ipc_gateway_core::error::ErrorCode;
use ipc_gateway_core::gateway::{
    DurationHistogram, GatewayStats, HealthStatus, LOCAL_REQUEST_KINDS,
};
use ipc_gateway_core::nats_session::NatsStats;
use ipc_gateway_core::Gateway;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tracing::warn;

use crate::nats_link::UpstreamIo;

/// What the HTTP side counts itself (the core never sees HTTP).
#[derive(Debug, Default, Clone)]
pub struct HttpCounters {
    /// Requests answered, by path label (`/health`, `/ready`, `/live`, `/metrics`, `other`)
    /// and status code.
    pub requests: BTreeMap<(&'static str, u16), u64>,
    /// Connections accepted and closed at once because the limit was reached.
    pub connections_rejected: u64,
}

/// Everything one scrape reads.
pub struct Scrape<'a, U: UpstreamIo> {
    pub gateway: &'a Gateway<U>,
    pub http: &'a HttpCounters,
    /// `CGW_AUDIT_LOG` write failures (0 without an audit log).
    pub audit_write_errors: u64,
}

/// The exposition format, chosen by the request's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Text format 0.0.4, the default.
    Prometheus,
    /// When `Accept` names `application/openmetrics-text`.
    OpenMetrics,
}

impl Format {
    pub fn from_accept(accept: Option<&[u8]>) -> Format {
        let asks = |a: &[u8]| {
            a.windows(b"application/openmetrics-text".len())
                .any(|w| w.eq_ignore_ascii_case(b"application/openmetrics-text"))
        };
        match accept {
            Some(a) if asks(a) => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The exposition body in `format`.
pub fn render<U: UpstreamIo>(scrape: &Scrape<'_, U>, format: Format) -> Vec<u8> {
    render_snapshot(Snapshot::take(scrape, ProcessStats::read()), format)
}

fn render_snapshot(snapshot: Snapshot, format: Format) -> Vec<u8> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(16 * 1024);
    let encoded = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail and every name and label here is a constant, so an
    // error would be a bug of this file; a scrape must never take the process down for it.
    if encoded.is_err() {
        warn!(
            event = "metrics_encode_failed",
            component = "http",
            bytes = out.len()
        );
    }
    out.into_bytes()
}

/// `ipc_responses_total{outcome}`: `ok` for RESPONSE_OK (and PONG), otherwise the error's
/// name in ipc-protocol.md section 4, in lower_snake case.
const OUTCOMES: [(ErrorCode, &str); 10] = [
    (
        ErrorCode::UnsupportedVersion,
        "unsupported_protocol_version",
    ),
    (ErrorCode::UnsupportedType, "unsupported_message_type"),
    (ErrorCode::FrameTooLarge, "frame_too_large"),
    (ErrorCode::InvalidPayload, "invalid_payload"),
    (ErrorCode::Timeout, "timeout"),
    (ErrorCode::ShuttingDown, "shutting_down"),
    (ErrorCode::Overloaded, "overloaded"),
    (ErrorCode::RouterUnavailable, "router_unavailable"),
    (ErrorCode::PermissionDenied, "permission_denied"),
    (ErrorCode::Internal, "internal_error"),
];

/// `ipc_requests_total{type}` for the task types, in `GatewayStats::task_requests` order.
const TASK_TYPES: [&str; 3] = ["submit", "query", "cancel"];

/// The HTTP paths exported at 0 before their first request (with code 200).
const HTTP_PATHS: [&str; 4] = ["/health", "/ready", "/live", "/metrics"];

/// The label of a response code (`responses` is keyed by the wire code, 0 for success).
fn outcome_label(code: u16) -> String {
    if code == 0 {
        return "ok".to_owned();
    }
    OUTCOMES
        .iter()
        .find(|(e, _)| e.code() == code)
        .map_or_else(|| format!("code_{code}"), |(_, name)| (*name).to_owned())
}

/// `ipc_circuit_breaker_state`: 0 closed, 1 half-open, 2 open (the order of severity).
fn breaker_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// What the process's own /proc files say; `None` where one could not be read (a scrape then
/// leaves that sample out rather than inventing a value).
#[derive(Debug, Default, Clone, PartialEq)]
struct ProcessStats {
    resident_bytes: Option<u64>,
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads /proc/self/stat, /proc/stat (boot time) and /proc/self/fd, and the open-file
    /// limit. A handful of small reads: scraping every second costs nothing measurable.
    fn read() -> ProcessStats {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().map(stat_fields).unwrap_or_default();
        // Field numbers as in proc(5); `stat_fields` starts at field 3 (state).
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        ProcessStats {
            resident_bytes: field(24).map(|pages| pages * page),
            cpu_seconds: field(14)
                .zip(field(15))
                .map(|(user, system)| (user + system) as f64 / ticks),
            start_time_seconds: field(22)
                .zip(boot_time)
                .map(|(start, boot)| boot as f64 + start as f64 / ticks),
            open_fds: open_fds(),
            max_fds: rustix::process::getrlimit(rustix::process::Resource::Nofile).current,
        }
    }
}

/// The fields of /proc/self/stat after the command name, which is in parentheses and may
/// itself contain spaces and parentheses: everything after the *last* `)`.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rfind(')')
        .map(|i| stat[i + 1..].split_whitespace().collect())
        .unwrap_or_default()
}

/// Open file descriptors: the entries of /proc/self/fd, less the one the listing itself holds
/// open while it is read.
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let n = entries.filter(|e| e.is_ok()).count() as u64;
    Some(n.saturating_sub(1))
}

/// One scrape's values, owned, so that the registry's collector can outlive the borrow of
/// the gateway for the length of the encoding.
#[derive(Debug)]
struct Snapshot {
    stats: GatewayStats,
    nats: NatsStats,
    reconnect_buffer_bytes: u64,
    link_up: bool,
    connections_active: u64,
    inflight: u64,
    breaker: BreakerState,
    health: HealthStatus,
    http: HttpCounters,
    audit_write_errors: u64,
    process: ProcessStats,
}

impl Snapshot {
    fn take<U: UpstreamIo>(scrape: &Scrape<'_, U>, process: ProcessStats) -> Snapshot {
        let gateway = scrape.gateway;
        let report = gateway.upstream().report();
        Snapshot {
            stats: gateway.stats().clone(),
            nats: report.nats,
            reconnect_buffer_bytes: report.buffered_bytes as u64,
            // The link health judges by: a NATS session is up once Connected; the stub's
            // upstream is always there.
            link_up: gateway.upstream().link().is_some(),
            connections_active: gateway.connection_count() as u64,
            inflight: gateway.inflight_len() as u64,
            breaker: gateway.breaker_state(),
            health: gateway.health().status,
            http: scrape.http.clone(),
            audit_write_errors: scrape.audit_write_errors,
            process,
        }
    }
}

/// `ipc_request_duration_seconds` from the core's histogram.
struct RequestDurations<'a>(&'a DurationHistogram);

impl EncodeMetric for RequestDurations<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        // Per-bucket counts; the encoders make them cumulative. The +Inf bucket is passed
        // explicitly: the OpenMetrics encoder writes only the buckets it is given.
        let buckets: Vec<(f64, u64)> = self
            .0
            .buckets()
            .map(|(bound, n)| (bound.map_or(f64::INFINITY, |b| b.as_secs_f64()), n))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum().as_secs_f64(),
            self.0.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One unlabelled metric. Counter names are given without `_total`, which the encoders add.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, unit, metric.metric_type())?;
    metric.encode(m)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    single(enc, name, help, None, &ConstCounter::new(value))
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    single(enc, name, help, None, &ConstGauge::new(value))
}

/// A labelled counter family, one sample per label set.
fn counters<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (S, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &self.stats;
        let e = &mut enc;

        let types = TASK_TYPES
            .iter()
            .zip(s.task_requests)
            .chain(LOCAL_REQUEST_KINDS.iter().zip(s.local_requests))
            .map(|(t, n)| ([("type", *t)], n));
        counters(
            e,
            "ipc_requests",
            "Request frames received, by type: submit, query, cancel (task requests, sent to \
             the Router), ping, capabilities, unsupported (answered locally).",
            types,
        )?;
        let mut responses: BTreeMap<String, u64> = std::iter::once("ok".to_owned())
            .chain(OUTCOMES.iter().map(|(_, name)| (*name).to_owned()))
            .map(|o| (o, 0))
            .collect();
        for (&code, &n) in &s.responses {
            *responses.entry(outcome_label(code)).or_default() += n;
        }
        counters(
            e,
            "ipc_responses",
            "Reply frames queued, by outcome: ok for RESPONSE_OK, otherwise the error \
             (ipc-protocol.md section 4).",
            responses.into_iter().map(|(o, n)| ([("outcome", o)], n)),
        )?;
        single(
            e,
            "ipc_request_duration",
            "Task requests answered, by time from the decoded frame to the queued reply.",
            Some(&Unit::Seconds),
            &RequestDurations(&s.request_duration),
        )?;
        gauge(
            e,
            "ipc_connections_active",
            "Client connections open now (refused ones still flushing their error included).",
            self.connections_active as i64,
        )?;
        counter(
            e,
            "ipc_connections",
            "Client connections accepted, refused ones included.",
            s.connections_total,
        )?;
        counters(
            e,
            "ipc_connections_rejected",
            "Client connections refused with an error frame, by reason: connection_limit \
             (error 7), uid_not_allowed (error 9).",
            [
                (
                    [("reason", "connection_limit")],
                    s.connections_rejected_limit,
                ),
                ([("reason", "uid_not_allowed")], s.connections_rejected_uid),
            ],
        )?;
        gauge(
            e,
            "ipc_inflight",
            "Task requests waiting for the Router now.",
            self.inflight as i64,
        )?;
        counter(
            e,
            "ipc_backpressure_rejections",
            "Task requests refused with error 7 because the global in-flight limit was reached.",
            s.backpressure_rejections,
        )?;
        counter(
            e,
            "ipc_router_timeouts",
            "Task requests answered with error 5 because the Router did not reply by the deadline.",
            s.router_timeouts,
        )?;
        counter(
            e,
            "ipc_router_no_responders",
            "Task requests answered with error 8 because NATS said no Router was subscribed.",
            self.nats.no_responders,
        )?;
        counter(
            e,
            "ipc_router_late_replies",
            "Router replies dropped because their request had already been answered, timed \
             out or cancelled.",
            self.nats.late_replies + s.dropped_replies,
        )?;
        counter(
            e,
            "ipc_router_duplicate_replies",
            "Router replies dropped because another reply for the same request came first.",
            self.nats.duplicate_replies,
        )?;
        gauge(
            e,
            "ipc_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            breaker_value(self.breaker),
        )?;
        let transitions = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ]
        .map(|to| {
            let n = s.breaker_transitions.get(to.name()).copied().unwrap_or(0);
            ([("to", to.name())], n)
        });
        counters(
            e,
            "ipc_circuit_breaker_transitions",
            "Circuit breaker transitions, by the state entered: closed, open, half_open.",
            transitions,
        )?;
        gauge(
            e,
            "nats_connection_state",
            "1 while the NATS connection is up (handshake done; always 1 in stub mode, whose \
             embedded Router is always there), 0 otherwise.",
            i64::from(self.link_up),
        )?;
        counter(
            e,
            "nats_reconnects",
            "NATS connections established after an earlier one was lost.",
            self.nats.reconnects,
        )?;
        counter(
            e,
            "nats_auth_failures",
            "NATS connections refused for their credentials.",
            self.nats.auth_failures,
        )?;
        counter(
            e,
            "nats_tls_failures",
            "NATS connections whose TLS handshake or certificate check failed.",
            self.nats.tls_failures,
        )?;
        single(
            e,
            "nats_reconnect_buffer",
            "Requests waiting in the reconnect buffer for NATS to come back, in bytes.",
            Some(&Unit::Bytes),
            &ConstGauge::new(self.reconnect_buffer_bytes as i64),
        )?;
        gauge(
            e,
            "ipc_health_status",
            "Health (GET /health): 0 HEALTHY, 1 DEGRADED, 2 UNHEALTHY.",
            i64::from(self.health.value()),
        )?;
        let mut http: BTreeMap<(&str, u16), u64> =
            HTTP_PATHS.iter().map(|&p| ((p, 200), 0)).collect();
        for (&(path, code), &n) in &self.http.requests {
            *http.entry((path, code)).or_default() += n;
        }
        counters(
            e,
            "http_requests",
            "HTTP requests answered, by path (/health, /ready, /live, /metrics, other) and \
             status code.",
            http.into_iter().map(|((path, code), n)| {
                ([("path", path.to_owned()), ("code", code.to_string())], n)
            }),
        )?;
        counter(
            e,
            "http_connections_rejected",
            "HTTP connections accepted and closed at once because the connection limit was \
             reached.",
            self.http.connections_rejected,
        )?;
        counter(
            e,
            "audit_write_errors",
            "Audit log (CGW_AUDIT_LOG) writes that failed.",
            self.audit_write_errors,
        )?;
        single(
            e,
            "build",
            "The gateway's version; always 1.",
            None,
            &Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        )?;
        self.encode_process(e)
    }
}

impl Snapshot {
    fn encode_process(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let p = &self.process;
        if let Some(bytes) = p.resident_bytes {
            single(
                e,
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(&Unit::Bytes),
                &ConstGauge::new(bytes as i64),
            )?;
        }
        if let Some(n) = p.open_fds {
            gauge(e, "process_open_fds", "Open file descriptors.", n as i64)?;
        }
        if let Some(n) = p.max_fds {
            gauge(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit).",
                i64::try_from(n).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(secs) = p.cpu_seconds {
            single(
                e,
                "process_cpu",
                "User and system CPU time spent, in seconds.",
                Some(&Unit::Seconds),
                &ConstCounter::new(secs),
            )?;
        }
        if let Some(secs) = p.start_time_seconds {
            single(
                e,
                "process_start_time",
                "Start time of the process since the Unix epoch, in seconds.",
                Some(&Unit::Seconds),
                &ConstGauge::new(secs),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ipc_gateway_core::frame::{encode_frame, kind};
    use ipc_gateway_core::stub::{StubConfig, StubUpstream};
    use ipc_gateway_core::{Action, ConnId, GatewayConfig, Instant, PeerCredentials};

    use super::*;

    /// Every family of gateway.md section 5, by the name its samples carry.
    const FAMILIES: [&str; 30] = [
        "ipc_requests_total",
        "ipc_responses_total",
        "ipc_request_duration_seconds",
        "ipc_connections_active",
        "ipc_connections_total",
        "ipc_connections_rejected_total",
        "ipc_inflight",
        "ipc_backpressure_rejections_total",
        "ipc_router_timeouts_total",
        "ipc_router_no_responders_total",
        "ipc_router_late_replies_total",
        "ipc_router_duplicate_replies_total",
        "ipc_circuit_breaker_state",
        "ipc_circuit_breaker_transitions_total",
        "nats_connection_state",
        "nats_reconnects_total",
        "nats_auth_failures_total",
        "nats_tls_failures_total",
        "nats_reconnect_buffer_bytes",
        "ipc_health_status",
        "http_requests_total",
        "http_connections_rejected_total",
        "audit_write_errors_total",
        "build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        // The histogram's series, checked for HELP/TYPE through its family name above.
        "ipc_request_duration_seconds_count",
    ];

    /// One sample line: name, labels, value.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A small parser of sample lines (the black-box tests use Python's prometheus_client
    /// as the independent one). Label values here contain no quotes or commas.
    fn samples(text: &str) -> Vec<Sample> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("name and value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => {
                        let body = rest.strip_suffix('}').expect("closing brace");
                        let labels = body
                            .split(',')
                            .filter(|kv| !kv.is_empty())
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').expect("label=value");
                                (k.to_owned(), v.trim_matches('"').to_owned())
                            })
                            .collect();
                        (name, labels)
                    }
                    None => (series, BTreeMap::new()),
                };
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("value of {line:?}")),
                };
                Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                }
            })
            .collect()
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one {name}{labels:?}, got {found:?}"
        );
        found[0].value
    }

    /// The family name in `# TYPE` lines: 0.0.4 names counters with `_total`; OpenMetrics
    /// names the family without it, and `build_info` is the info family `build`.
    fn family(sample_name: &str, format: Format) -> String {
        let base = sample_name.strip_suffix("_count").unwrap_or(sample_name);
        match format {
            Format::Prometheus => base.to_owned(),
            Format::OpenMetrics if base == "build_info" => "build".to_owned(),
            Format::OpenMetrics => base.strip_suffix("_total").unwrap_or(base).to_owned(),
        }
    }

    struct Shell {
        gw: Gateway<StubUpstream>,
        now: Instant,
    }

    impl Shell {
        fn new(delay: Duration) -> Shell {
            Shell {
                gw: Gateway::new(GatewayConfig::default(), StubConfig { delay }),
                now: Instant::ZERO,
            }
        }

        fn pump(&mut self) {
            while let Some(action) = self.gw.poll_action() {
                match action {
                    Action::Transmit(id) => {
                        let n: usize = self.gw.client_output(id).map(<[u8]>::len).sum();
                        self.gw.handle_client_written(id, n, self.now);
                    }
                    Action::Upstream(never) => match never {},
                    Action::ResumeRead(_) | Action::Close(_) | Action::ShutdownComplete { .. } => {}
                }
            }
        }

        fn send(&mut self, conn: ConnId, k: u8, payload: &[u8]) {
            self.gw
                .handle_client_bytes(conn, &encode_frame(k, payload), self.now);
            self.pump();
        }

        fn advance(&mut self, d: Duration) {
            self.now = self.now + d;
            self.gw.handle_timeout(self.now);
            self.pump();
        }

        fn render(&self, http: &HttpCounters, format: Format) -> String {
            let scrape = Scrape {
                gateway: &self.gw,
                http,
                audit_write_errors: 3,
            };
            String::from_utf8(render(&scrape, format)).expect("UTF-8")
        }
    }

    /// A known workload on the stub: three submits (one with an invalid payload), a query and
    /// a PING, answered after 3 ms; then one connection closed.
    fn workload() -> Shell {
        let mut sh = Shell::new(Duration::from_millis(3));
        let a = sh
            .gw
            .handle_client_opened(PeerCredentials::default(), sh.now);
        let b = sh
            .gw
            .handle_client_opened(PeerCredentials::default(), sh.now);
        sh.pump();
        sh.send(a, kind::TASK_SUBMIT, b"{}");
        sh.send(a, kind::TASK_SUBMIT, b"{}");
        sh.send(b, kind::TASK_QUERY, b"{}");
        sh.send(b, kind::TASK_SUBMIT, b"[1]");
        sh.send(b, kind::PING, b"");
        assert_eq!(sh.gw.inflight_len(), 3);
        sh.advance(Duration::from_millis(3));
        assert_eq!(sh.gw.inflight_len(), 0);
        sh.gw.handle_client_closed(b, sh.now);
        sh.pump();
        sh
    }

    fn http_counters() -> HttpCounters {
        HttpCounters {
            requests: BTreeMap::from([(("/metrics", 200), 4), (("other", 404), 1)]),
            connections_rejected: 2,
        }
    }

    #[test]
    fn every_family_has_help_and_type_in_both_formats() {
        let sh = workload();
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = sh.render(&http_counters(), format);
            let got = samples(&text);
            for name in FAMILIES {
                let fam = family(name, format);
                assert!(
                    text.contains(&format!("\n# HELP {fam} "))
                        || text.starts_with(&format!("# HELP {fam} ")),
                    "{format:?}: no HELP for {fam}:\n{text}"
                );
                assert!(
                    text.contains(&format!("\n# TYPE {fam} ")),
                    "{format:?}: no TYPE for {fam}:\n{text}"
                );
                assert!(
                    got.iter()
                        .any(|s| s.name == name || s.name.starts_with(&format!("{name}_"))),
                    "{format:?}: no sample of {name}"
                );
            }
            let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
            let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
            assert_eq!(helps, types, "one HELP and one TYPE per family");
            assert_eq!(helps, FAMILIES.len() - 1);
        }
    }

    #[test]
    fn openmetrics_ends_with_eof_and_prometheus_has_none() {
        let sh = workload();
        let om = sh.render(&http_counters(), Format::OpenMetrics);
        assert!(om.ends_with("\n# EOF\n"), "{om}");
        assert_eq!(om.matches("# EOF").count(), 1);
        let prom = sh.render(&http_counters(), Format::Prometheus);
        assert!(!prom.contains("# EOF"));
        assert!(prom.ends_with('\n'));
        // 0.0.4 has no UNIT lines; OpenMetrics names the unit of the families that have one.
        assert!(!prom.contains("# UNIT"));
        assert!(om.contains("# UNIT ipc_request_duration_seconds seconds\n"));
        assert!(om.contains("# UNIT process_resident_memory_bytes bytes\n"));
    }

    /// The values are what the workload did.
    #[test]
    fn values_are_what_happened() {
        let sh = workload();
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let s = samples(&sh.render(&http_counters(), format));
            let v = |name: &str, labels: &[(&str, &str)]| value(&s, name, labels);
            assert_eq!(v("ipc_requests_total", &[("type", "submit")]), 3.0);
            assert_eq!(v("ipc_requests_total", &[("type", "query")]), 1.0);
            assert_eq!(v("ipc_requests_total", &[("type", "cancel")]), 0.0);
            assert_eq!(v("ipc_requests_total", &[("type", "ping")]), 1.0);
            assert_eq!(v("ipc_requests_total", &[("type", "capabilities")]), 0.0);
            assert_eq!(v("ipc_responses_total", &[("outcome", "ok")]), 4.0);
            assert_eq!(
                v("ipc_responses_total", &[("outcome", "invalid_payload")]),
                1.0
            );
            assert_eq!(v("ipc_responses_total", &[("outcome", "timeout")]), 0.0);
            assert_eq!(v("ipc_request_duration_seconds_count", &[]), 4.0);
            let sum = v("ipc_request_duration_seconds_sum", &[]);
            assert!(
                (sum - 0.009).abs() < 1e-12,
                "three replies after 3 ms: {sum}"
            );
            assert_eq!(
                v("ipc_request_duration_seconds_bucket", &[("le", "+Inf")]),
                4.0
            );
            assert_eq!(v("ipc_connections_active", &[]), 1.0);
            assert_eq!(v("ipc_connections_total", &[]), 2.0);
            assert_eq!(
                v(
                    "ipc_connections_rejected_total",
                    &[("reason", "connection_limit")]
                ),
                0.0
            );
            assert_eq!(v("ipc_inflight", &[]), 0.0);
            assert_eq!(v("ipc_circuit_breaker_state", &[]), 0.0);
            for to in ["closed", "open", "half_open"] {
                assert_eq!(
                    v("ipc_circuit_breaker_transitions_total", &[("to", to)]),
                    0.0
                );
            }
            assert_eq!(
                v("nats_connection_state", &[]),
                1.0,
                "the stub is always connected"
            );
            assert_eq!(v("nats_reconnect_buffer_bytes", &[]), 0.0);
            assert_eq!(v("ipc_health_status", &[]), 0.0);
            assert_eq!(
                v(
                    "http_requests_total",
                    &[("path", "/metrics"), ("code", "200")]
                ),
                4.0
            );
            assert_eq!(
                v("http_requests_total", &[("path", "other"), ("code", "404")]),
                1.0
            );
            assert_eq!(
                v(
                    "http_requests_total",
                    &[("path", "/health"), ("code", "200")]
                ),
                0.0
            );
            assert_eq!(v("http_connections_rejected_total", &[]), 2.0);
            assert_eq!(v("audit_write_errors_total", &[]), 3.0);
            assert_eq!(
                v("build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
                1.0
            );
        }
    }

    /// Buckets are cumulative, in increasing `le` order, end with `+Inf` equal to the count,
    /// and the workload's observations sit where their durations put them.
    #[test]
    fn histogram_buckets_are_cumulative_and_inf_is_the_count() {
        let sh = workload();
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let s = samples(&sh.render(&http_counters(), format));
            let buckets: Vec<(f64, f64)> = s
                .iter()
                .filter(|x| x.name == "ipc_request_duration_seconds_bucket")
                .map(|x| {
                    let le = &x.labels["le"];
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le")
                    };
                    (le, x.value)
                })
                .collect();
            assert_eq!(buckets.len(), 20, "19 bounds and +Inf");
            assert_eq!(buckets[0].0, 0.00005);
            assert_eq!(buckets[18].0, 60.0);
            assert!(buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
            let count = value(&s, "ipc_request_duration_seconds_count", &[]);
            assert_eq!(buckets[19], (f64::INFINITY, count));
            let at = |le: f64| buckets.iter().find(|b| b.0 == le).map(|b| b.1);
            assert_eq!(at(0.00005), Some(1.0), "the refusal, answered at once");
            assert_eq!(at(0.0025), Some(1.0), "nothing between 50 µs and 2.5 ms");
            assert_eq!(at(0.005), Some(4.0), "the three replies after 3 ms");
        }
    }

    /// Error codes map to the names of ipc-protocol.md section 4, and every outcome is there
    /// at 0 before it first happens.
    #[test]
    fn outcomes_are_the_protocol_names_and_start_at_zero() {
        assert_eq!(outcome_label(0), "ok");
        assert_eq!(outcome_label(1), "unsupported_protocol_version");
        assert_eq!(outcome_label(8), "router_unavailable");
        assert_eq!(outcome_label(99), "internal_error");
        let sh = Shell::new(Duration::ZERO);
        let s = samples(&sh.render(&HttpCounters::default(), Format::Prometheus));
        let outcomes: Vec<&str> = s
            .iter()
            .filter(|x| x.name == "ipc_responses_total")
            .map(|x| x.labels["outcome"].as_str())
            .collect();
        assert_eq!(outcomes.len(), 11);
        assert!(s
            .iter()
            .filter(|x| x.name.starts_with("ipc_"))
            .all(|x| x.value == 0.0
                || x.name == "ipc_request_duration_seconds_bucket"
                || x.name == "ipc_health_status"));
    }

    #[test]
    fn breaker_encoding_is_by_severity() {
        assert_eq!(breaker_value(BreakerState::Closed), 0);
        assert_eq!(breaker_value(BreakerState::HalfOpen), 1);
        assert_eq!(breaker_value(BreakerState::Open), 2);
    }

    /// The process figures agree with what the kernel says about this test process.
    #[test]
    fn process_stats_agree_with_proc() {
        let p = ProcessStats::read();
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .expect("VmRSS");
        let rss = p.resident_bytes.expect("rss") as f64;
        assert!(
            (rss - (rss_kb * 1024) as f64).abs() < 16.0 * 1024.0 * 1024.0,
            "{rss} vs {rss_kb} kB"
        );
        assert!(
            p.open_fds.expect("fds") >= 3,
            "stdin, stdout, stderr at least"
        );
        assert_eq!(
            p.max_fds,
            rustix::process::getrlimit(rustix::process::Resource::Nofile).current
        );
        assert!(p.cpu_seconds.expect("cpu") >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let start = p.start_time_seconds.expect("start");
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "started at {start}, now {now}"
        );
    }

    #[test]
    fn stat_fields_survive_a_command_name_with_parentheses() {
        let fields = stat_fields("42 (a) b (c)) S 1 2 3");
        assert_eq!(fields, ["S", "1", "2", "3"]);
        assert!(stat_fields("garbage").is_empty());
    }
}
