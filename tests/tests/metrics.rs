//! `/metrics` of the real daemon, black box (gateway.md section 5): after a known workload
//! every counter, gauge and histogram reads what happened, in both exposition formats.
//!
//! The exposition is parsed by an independent implementation, the Python `prometheus_client`
//! package's parsers (Debian's `python3-prometheus-client`, which tests/run-all.sh installs),
//! run as `/usr/bin/python3` (the `python3` first on PATH may be a pyenv one that does not see
//! apt packages). A missing parser fails the test: a metrics test that passes without checking
//! anything would be worse than none.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipc_gateway_tests::daemon::{
    expect_closed, expect_echo, expect_error, expect_error_code, expect_pong, recv, send,
    send_json, Daemon,
};
use ipc_gateway_tests::frame::{
    CAPABILITIES, PING, RESPONSE_OK, TASK_CANCEL, TASK_QUERY, TASK_SUBMIT,
};
use ipc_gateway_tests::http_client::{self, Response};
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use serde_json::{json, Value};

/// Generous bound for things that should take milliseconds (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(15);

/// The Python interpreter that sees Debian's packages.
const PYTHON: &str = "/usr/bin/python3";

/// Reads an exposition on stdin with the parser named by argv[1] and prints its families as
/// JSON. Non-finite values are written as strings, which JSON has no numbers for.
const PARSE_PY: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families as prometheus
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
parse = openmetrics if sys.argv[1] == "openmetrics" else prometheus
def num(v):
    return v if math.isfinite(v) else str(v)
out = []
for f in parse(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "unit": f.unit, "help": f.documentation,
                "samples": [[s.name, s.labels, num(s.value)] for s in f.samples]})
print(json.dumps(out))
"#;

/// Every family of gateway.md section 5, by family name as the Python parser reports it
/// (counters without `_total`), with its type.
const FAMILIES: [(&str, &str); 27] = [
    ("ipc_requests", "counter"),
    ("ipc_responses", "counter"),
    ("ipc_request_duration_seconds", "histogram"),
    ("ipc_connections_active", "gauge"),
    ("ipc_connections", "counter"),
    ("ipc_connections_rejected", "counter"),
    ("ipc_inflight", "gauge"),
    ("ipc_backpressure_rejections", "counter"),
    ("ipc_router_timeouts", "counter"),
    ("ipc_router_no_responders", "counter"),
    ("ipc_router_late_replies", "counter"),
    ("ipc_router_duplicate_replies", "counter"),
    ("ipc_circuit_breaker_state", "gauge"),
    ("ipc_circuit_breaker_transitions", "counter"),
    ("nats_connection_state", "gauge"),
    ("nats_reconnects", "counter"),
    ("nats_reconnect_buffer_bytes", "gauge"),
    ("ipc_health_status", "gauge"),
    ("http_requests", "counter"),
    ("http_connections_rejected", "counter"),
    ("audit_write_errors", "counter"),
    ("build_info", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_cpu_seconds", "counter"),
    ("process_start_time_seconds", "gauge"),
];

/// The exposition formats, as `/metrics` negotiates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Prometheus,
    OpenMetrics,
}

/// One HTTP/1.1 GET on a fresh connection; panics on any failure.
fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Response {
    try_http_get(addr, path, accept).unwrap_or_else(|e| panic!("{e}"))
}

fn try_http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Result<Response, String> {
    http_client::get(addr, path, accept, WAIT)
}

/// A parsed exposition: families by name, as the Python parser saw them.
#[derive(Debug)]
struct Exposition {
    families: BTreeMap<String, Value>,
    text: String,
}

impl Exposition {
    fn parse(text: &str, format: Format) -> Exposition {
        let arg = match format {
            Format::Prometheus => "prometheus",
            Format::OpenMetrics => "openmetrics",
        };
        let mut child = Command::new(PYTHON)
            .args(["-c", PARSE_PY, arg])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {PYTHON} (apt-get install python3-prometheus-client): {e}")
            });
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(text.as_bytes())
            .expect("feeding the parser");
        drop(stdin);
        let out = child.wait_with_output().expect("waiting for the parser");
        assert!(
            out.status.success(),
            "the Python {arg} parser rejected the exposition ({}):\n{}\n--- exposition ---\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the parser's JSON");
        let families = list
            .into_iter()
            .map(|f| (f["name"].as_str().unwrap_or_default().to_owned(), f))
            .collect();
        Exposition {
            families,
            text: text.to_owned(),
        }
    }

    /// The one sample called `name` with exactly `labels`; panics if there is not exactly one.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let found: Vec<f64> = self
            .samples()
            .filter(|(n, l, _)| {
                n == name
                    && l.len() == want.len()
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one sample {name}{labels:?}, found {found:?} in:\n{}",
            self.text
        );
        found[0]
    }

    /// Every sample: name, labels, value (`+Inf` for a non-finite string).
    fn samples(&self) -> impl Iterator<Item = (String, BTreeMap<String, String>, f64)> + '_ {
        self.families.values().flat_map(|f| {
            f["samples"].as_array().into_iter().flatten().map(|s| {
                let name = s[0].as_str().unwrap_or_default().to_owned();
                let labels = s[1]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = s[2].as_f64().unwrap_or(f64::INFINITY);
                (name, labels, value)
            })
        })
    }

    /// Every value of `label` among the samples called `name`.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        self.samples()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, l, _)| l.get(label).cloned())
            .collect()
    }

    /// The histogram's buckets as (le, cumulative count), in the order exposed.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        self.samples()
            .filter(|(n, _, _)| *n == format!("{name}_bucket"))
            .map(|(_, l, v)| {
                let le = l.get("le").map_or(f64::NAN, |le| match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    other => other.parse().unwrap_or(f64::NAN),
                });
                (le, v)
            })
            .collect()
    }
}

/// Scrapes one daemon and counts its own successful scrapes, which `http_requests_total`
/// must show (a scrape is counted once answered, so scrape k reads k - 1).
struct Scraper {
    addr: SocketAddr,
    scrapes: u64,
}

impl Scraper {
    fn new(daemon: &mut Daemon) -> Scraper {
        Scraper {
            addr: daemon.http_addr(),
            scrapes: 0,
        }
    }

    fn scrape_as(&mut self, format: Format) -> Exposition {
        let accept = match format {
            Format::Prometheus => None,
            Format::OpenMetrics => Some("application/openmetrics-text; version=1.0.0"),
        };
        let response = http_get(self.addr, "/metrics", accept);
        assert_eq!(
            response.status,
            200,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        self.scrapes += 1;
        let content_type = response
            .headers
            .get("content-type")
            .cloned()
            .unwrap_or_default();
        let text = String::from_utf8(response.body).expect("the exposition is UTF-8");
        match format {
            Format::Prometheus => {
                assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
                assert!(!text.contains("# EOF"), "0.0.4 has no EOF marker");
            }
            Format::OpenMetrics => {
                assert!(
                    content_type.starts_with("application/openmetrics-text; version=1.0.0"),
                    "{content_type}"
                );
                assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
            }
        }
        Exposition::parse(&text, format)
    }

    fn scrape(&mut self) -> Exposition {
        self.scrape_as(Format::Prometheus)
    }

    /// Scrapes until `cond` holds; returns that exposition. Panics after [`WAIT`].
    fn scrape_until(&mut self, what: &str, cond: impl Fn(&Exposition) -> bool) -> Exposition {
        let deadline = Instant::now() + WAIT;
        loop {
            let e = self.scrape();
            if cond(&e) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not true after {WAIT:?}:\n{}",
                e.text
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A daemon with HTTP on a free loopback port.
fn start(env: &[(&str, &str)]) -> Daemon {
    let mut all = vec![("CGW_HTTP_ADDR", "127.0.0.1:0")];
    all.extend_from_slice(env);
    Daemon::start(&all)
}

/// Every family is there, with its type and HELP; the known label values are there from the
/// start; histograms are cumulative with `+Inf` equal to the count.
fn check_shape(e: &Exposition) {
    for (name, kind) in FAMILIES {
        let family = e
            .families
            .get(name)
            .or_else(|| e.families.get(name.strip_suffix("_info").unwrap_or(name)))
            .unwrap_or_else(|| panic!("no family {name} in:\n{}", e.text));
        let family_type = family["type"].as_str().unwrap_or_default();
        // OpenMetrics has a type of its own for build_info.
        assert!(
            family_type == kind || (name == "build_info" && family_type == "info"),
            "{name} is a {family_type}, not a {kind}"
        );
        assert!(
            !family["help"].as_str().unwrap_or_default().is_empty(),
            "{name} has no HELP"
        );
        assert!(
            !family["samples"].as_array().is_none_or(Vec::is_empty),
            "{name} has no sample"
        );
    }
    let mut types = e.label_values("ipc_requests_total", "type");
    types.sort();
    assert_eq!(
        types,
        [
            "cancel",
            "capabilities",
            "ping",
            "query",
            "submit",
            "unsupported"
        ]
    );
    let mut outcomes = e.label_values("ipc_responses_total", "outcome");
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            "frame_too_large",
            "internal_error",
            "invalid_payload",
            "ok",
            "overloaded",
            "permission_denied",
            "router_unavailable",
            "shutting_down",
            "timeout",
            "unsupported_message_type",
            "unsupported_protocol_version"
        ]
    );
    let mut to = e.label_values("ipc_circuit_breaker_transitions_total", "to");
    to.sort();
    assert_eq!(to, ["closed", "half_open", "open"]);
    let mut reasons = e.label_values("ipc_connections_rejected_total", "reason");
    reasons.sort();
    assert_eq!(reasons, ["connection_limit", "uid_not_allowed"]);
    let buckets = e.buckets("ipc_request_duration_seconds");
    assert_eq!(buckets.len(), 20, "19 bounds from 50 µs to 60 s, and +Inf");
    assert_eq!(buckets[0].0, 0.00005);
    assert_eq!(buckets[18].0, 60.0);
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "bounds increase and counts are cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets[19],
        (
            f64::INFINITY,
            e.value("ipc_request_duration_seconds_count", &[])
        )
    );
    assert_eq!(
        e.value("build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
}

/// No client connection open (the daemon has seen every close).
fn quiet(e: &Exposition) -> bool {
    e.value("ipc_connections_active", &[]) == 0.0
}

/// The cumulative count of the bucket with bound `le`.
fn bucket(e: &Exposition, le: f64) -> f64 {
    e.buckets("ipc_request_duration_seconds")
        .into_iter()
        .find(|b| b.0 == le)
        .map_or_else(|| panic!("no bucket le={le}"), |b| b.1)
}

/// Fields of /proc/PID/stat from field 3 (state) on: the command name may contain spaces.
fn proc_stat(pid: u32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = &stat[stat.rfind(')').expect("(comm)") + 1..];
    after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// The process metrics agree with what /proc says about the daemon.
fn check_process(e: &Exposition, pid: u32) {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let fds_outside = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count() as f64;
    // The scrape's own connection is an fd of the daemon's while it is served, and closed
    // or not yet closed around the listing here.
    let fds = e.value("process_open_fds", &[]);
    assert!(
        (fds - fds_outside).abs() <= 2.0,
        "process_open_fds {fds}, /proc/{pid}/fd has {fds_outside}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("the soft open-files limit");
    assert_eq!(e.value("process_max_fds", &[]), soft);
    let rss_kb = ipc_gateway_tests::daemon::rss_kb(pid) as f64;
    let rss = e.value("process_resident_memory_bytes", &[]);
    let tolerance = (rss_kb * 1024.0 * 0.1).max(2.0 * 1024.0 * 1024.0);
    assert!(
        (rss - rss_kb * 1024.0).abs() <= tolerance,
        "process_resident_memory_bytes {rss}, VmRSS {rss_kb} kB"
    );
    let stat = proc_stat(pid);
    // proc(5) numbering: utime 14, stime 15, starttime 22; this vector starts at field 3.
    let cpu_after = (stat[11] + stat[12]) as f64 / ticks;
    let cpu = e.value("process_cpu_seconds_total", &[]);
    assert!(
        cpu >= 0.0 && cpu <= cpu_after + 1.0 / ticks,
        "process_cpu_seconds_total {cpu}, /proc says {cpu_after} s since"
    );
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .expect("/proc/stat")
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .expect("btime");
    let started = btime + stat[19] as f64 / ticks;
    let start = e.value("process_start_time_seconds", &[]);
    assert!(
        (start - started).abs() <= 1.0,
        "process_start_time_seconds {start}, /proc says {started}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 600.0,
        "start {start}, now {now}"
    );
}

/// Stub mode, a known workload over three connections and one refused one: requests by type,
/// responses by outcome, the histogram, connections, the HTTP requests (the scrapes
/// themselves and a 404), and the process figures, in both formats.
#[test]
fn stub_workload_reads_exactly_what_happened() {
    let mut daemon = start(&[("CGW_IPC_MAX_CONNECTIONS", "3")]);
    let mut scraper = Scraper::new(&mut daemon);

    // Before any traffic: every family and known label value, at 0; except the connection
    // the start helper made to see the daemon ready (counted, closed at once).
    let first = scraper.scrape_until("the readiness probe gone", quiet);
    check_shape(&first);
    let probes = first.value("ipc_connections_total", &[]);
    assert!(probes <= 1.0, "one readiness probe at most: {probes}");
    for (name, labels, value) in first.samples() {
        let live = name.starts_with("process_")
            || name == "build_info"
            || name == "nats_connection_state"
            || name == "ipc_connections_total"
            || (name == "http_requests_total"
                && labels.get("path").is_some_and(|p| p == "/metrics"));
        if !live {
            assert_eq!(value, 0.0, "{name}{labels:?} before any traffic");
        }
    }
    assert_eq!(
        first.value(
            "http_requests_total",
            &[("path", "/metrics"), ("code", "200")]
        ),
        (scraper.scrapes - 1) as f64
    );
    assert_eq!(
        first.value("nats_connection_state", &[]),
        1.0,
        "stub mode is always up"
    );

    const SUBMITS: usize = 7;
    const QUERIES: usize = 4;
    const CANCELS: usize = 2;
    const PINGS: usize = 3;
    let mut a = daemon.connect();
    let mut b = daemon.connect();
    let mut c = daemon.connect();
    for n in 0..SUBMITS {
        let payload = json!({"task_type": "t", "n": n});
        send_json(&mut a, TASK_SUBMIT, &payload);
        expect_echo(&recv(&mut a), &payload);
    }
    for n in 0..QUERIES {
        let payload = json!({"q": n});
        send_json(&mut b, TASK_QUERY, &payload);
        expect_echo(&recv(&mut b), &payload);
    }
    for n in 0..CANCELS {
        let payload = json!({"c": n});
        send_json(&mut c, TASK_CANCEL, &payload);
        expect_echo(&recv(&mut c), &payload);
    }
    for _ in 0..PINGS {
        send(&mut c, PING, &[]);
        expect_pong(&mut c);
    }
    send(&mut c, CAPABILITIES, &[]);
    assert_eq!(recv(&mut c).kind, RESPONSE_OK);
    send(&mut a, TASK_SUBMIT, b"[1, 2]");
    expect_error_code(&mut a, 4);
    send(&mut b, 0x99, &[]);
    expect_error_code(&mut b, 2);
    // A fourth connection is over the limit of three: error 7, closed.
    let mut refused = daemon.connect();
    expect_error_code(&mut refused, 7);
    expect_closed(&mut refused);

    // While three are open, the gauge says three.
    let during = scraper.scrape_until("three connections open", |e| {
        e.value("ipc_connections_active", &[]) == 3.0
    });
    assert_eq!(during.value("ipc_inflight", &[]), 0.0);

    let not_found = http_get(scraper.addr, "/no-such-path", None);
    assert_eq!(not_found.status, 404);

    drop((a, b, c, refused));
    let e = scraper.scrape_until("every connection closed", |e| {
        e.value("ipc_connections_active", &[]) == 0.0
    });
    check_shape(&e);
    let tasks = (SUBMITS + 1 + QUERIES + CANCELS) as f64;
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "submit")]),
        (SUBMITS + 1) as f64
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "query")]),
        QUERIES as f64
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "cancel")]),
        CANCELS as f64
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "ping")]),
        PINGS as f64
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "capabilities")]),
        1.0
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "unsupported")]),
        1.0
    );
    // Task replies, PONGs and the capabilities reply are RESPONSE_OK (or PONG) frames.
    let oks = (SUBMITS + QUERIES + CANCELS + PINGS + 1) as f64;
    assert_eq!(e.value("ipc_responses_total", &[("outcome", "ok")]), oks);
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "invalid_payload")]),
        1.0
    );
    assert_eq!(
        e.value(
            "ipc_responses_total",
            &[("outcome", "unsupported_message_type")]
        ),
        1.0
    );
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "overloaded")]),
        1.0
    );
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "timeout")]),
        0.0
    );
    assert_eq!(e.value("ipc_request_duration_seconds_count", &[]), tasks);
    let sum = e.value("ipc_request_duration_seconds_sum", &[]);
    // The stub answers at once: every request took far less than a second in the core.
    assert!(sum >= 0.0 && sum < tasks, "duration sum {sum}");
    assert_eq!(bucket(&e, 1.0), tasks, "the stub answers within a second");
    assert_eq!(e.value("ipc_connections_total", &[]), probes + 4.0);
    assert_eq!(
        e.value(
            "ipc_connections_rejected_total",
            &[("reason", "connection_limit")]
        ),
        1.0
    );
    assert_eq!(
        e.value(
            "ipc_connections_rejected_total",
            &[("reason", "uid_not_allowed")]
        ),
        0.0
    );
    assert_eq!(e.value("ipc_inflight", &[]), 0.0);
    assert_eq!(e.value("ipc_health_status", &[]), 0.0);
    assert_eq!(e.value("ipc_circuit_breaker_state", &[]), 0.0);
    assert_eq!(e.value("ipc_router_timeouts_total", &[]), 0.0);
    assert_eq!(e.value("nats_reconnects_total", &[]), 0.0);
    assert_eq!(e.value("nats_auth_failures_total", &[]), 0.0);
    assert_eq!(e.value("nats_tls_failures_total", &[]), 0.0);
    assert_eq!(e.value("nats_reconnect_buffer_bytes", &[]), 0.0);
    assert_eq!(e.value("audit_write_errors_total", &[]), 0.0);
    // This scrape is counted once answered: it reads the ones before it.
    assert_eq!(
        e.value(
            "http_requests_total",
            &[("path", "/metrics"), ("code", "200")]
        ),
        (scraper.scrapes - 1) as f64
    );
    assert_eq!(
        e.value("http_requests_total", &[("path", "other"), ("code", "404")]),
        1.0
    );
    check_process(&e, daemon.pid());

    // OpenMetrics, asked for by Accept, carries the same values.
    let before = scraper.scrapes;
    let om = scraper.scrape_as(Format::OpenMetrics);
    check_shape(&om);
    assert_eq!(
        om.value("ipc_requests_total", &[("type", "submit")]),
        (SUBMITS + 1) as f64
    );
    assert_eq!(om.value("ipc_responses_total", &[("outcome", "ok")]), oks);
    assert_eq!(om.value("ipc_request_duration_seconds_count", &[]), tasks);
    assert_eq!(om.value("ipc_connections_total", &[]), probes + 4.0);
    assert_eq!(
        om.value(
            "http_requests_total",
            &[("path", "/metrics"), ("code", "200")]
        ),
        before as f64
    );
    check_process(&om, daemon.pid());
}

/// Timeouts, load shedding and the health gauge, in stub mode with a Router slower than the
/// deadline: three requests fill the global in-flight limit of three (DEGRADED: at 80 % or
/// more), a fourth is shed at once (error 7), the three time out at 200 ms.
#[test]
fn timeouts_and_load_shedding_are_counted() {
    let mut daemon = start(&[
        ("CGW_IPC_TIMEOUT_MS", "200"),
        ("CGW_IPC_STUB_DELAY_MS", "5000"),
        ("CGW_IPC_MAX_INFLIGHT", "3"),
    ]);
    let mut scraper = Scraper::new(&mut daemon);
    let mut a = daemon.connect();
    let mut b = daemon.connect();
    const SLOW: usize = 3;
    for n in 0..SLOW {
        send_json(&mut a, TASK_SUBMIT, &json!({"n": n}));
    }
    let full = scraper.scrape_until("three requests in flight", |e| {
        e.value("ipc_inflight", &[]) == SLOW as f64
    });
    assert_eq!(
        full.value("ipc_health_status", &[]),
        1.0,
        "DEGRADED at the in-flight limit"
    );
    send_json(&mut b, TASK_SUBMIT, &json!({"shed": true}));
    expect_error_code(&mut b, 7);
    for _ in 0..SLOW {
        expect_error(&recv(&mut a), 5);
    }
    let e = scraper.scrape_until("nothing in flight", |e| e.value("ipc_inflight", &[]) == 0.0);
    check_shape(&e);
    assert_eq!(e.value("ipc_router_timeouts_total", &[]), SLOW as f64);
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "timeout")]),
        SLOW as f64
    );
    assert_eq!(e.value("ipc_backpressure_rejections_total", &[]), 1.0);
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "overloaded")]),
        1.0
    );
    assert_eq!(e.value("ipc_responses_total", &[("outcome", "ok")]), 0.0);
    assert_eq!(e.value("ipc_health_status", &[]), 0.0);
    // Four answered: the shed one at once, the three at their 200 ms deadline.
    assert_eq!(e.value("ipc_request_duration_seconds_count", &[]), 4.0);
    assert_eq!(bucket(&e, 0.1), 1.0, "only the shed request within 100 ms");
    let sum = e.value("ipc_request_duration_seconds_sum", &[]);
    assert!(sum >= 0.6, "three timeouts of 200 ms each: sum {sum}");
}

/// A connection from a uid that is not allowed: error 9, counted by reason.
#[test]
fn uid_rejections_are_counted() {
    let other_uid = (rustix::process::getuid().as_raw() + 1).to_string();
    let mut daemon = start(&[("CGW_IPC_ALLOWED_UIDS", other_uid.as_str())]);
    let mut scraper = Scraper::new(&mut daemon);
    // The start helper's readiness probe was a connection too, refused like any other.
    let base = scraper.scrape_until("the readiness probe gone", quiet);
    let probes = base.value("ipc_connections_total", &[]);
    assert_eq!(
        base.value(
            "ipc_connections_rejected_total",
            &[("reason", "uid_not_allowed")]
        ),
        probes
    );
    let mut refused = daemon.connect();
    expect_error_code(&mut refused, 9);
    expect_closed(&mut refused);
    let e = scraper.scrape_until("the refused connection gone", |e| {
        e.value("ipc_connections_total", &[]) == probes + 1.0 && quiet(e)
    });
    assert_eq!(
        e.value(
            "ipc_connections_rejected_total",
            &[("reason", "uid_not_allowed")]
        ),
        probes + 1.0
    );
    assert_eq!(
        e.value(
            "ipc_connections_rejected_total",
            &[("reason", "connection_limit")]
        ),
        0.0
    );
    // A refused connection that sent nothing still got its error frame.
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "permission_denied")]),
        probes + 1.0
    );
}

/// Starts the daemon in NATS mode and waits until it is connected.
fn nats_gateway(url: &str, extra: &[(&str, &str)]) -> Daemon {
    let mut env = vec![("CGW_IPC_NATS_ENABLE", "1"), ("CGW_IPC_NATS_URL", url)];
    env.extend_from_slice(extra);
    let daemon = start(&env);
    daemon.wait_stderr_contains(r#""event":"nats_connected""#, WAIT);
    daemon
}

/// The Router double's behaviours, counted exactly: replies, duplicates, timeouts with their
/// late replies, and no responders once the Router is gone.
#[test]
fn router_replies_timeouts_late_duplicate_and_no_responders() {
    let server = NatsServer::start();
    let mut double = RouterDouble::start(&server.url());
    let mut daemon = nats_gateway(
        &server.url(),
        &[
            ("CGW_IPC_TIMEOUT_MS", "300"),
            ("CGW_IPC_BREAKER_FAILURES", "1000"),
        ],
    );
    let mut scraper = Scraper::new(&mut daemon);
    let first = scraper.scrape();
    assert_eq!(first.value("nats_connection_state", &[]), 1.0);
    let mut client = daemon.connect();
    const OK: usize = 2;
    const DUPLICATES: usize = 2;
    const SLOW: usize = 2;
    for n in 0..OK {
        send_json(&mut client, TASK_SUBMIT, &json!({"task_type": "t", "n": n}));
        assert_eq!(recv(&mut client).kind, RESPONSE_OK);
    }
    for n in 0..DUPLICATES {
        send_json(
            &mut client,
            TASK_QUERY,
            &json!({"task_type": "t", "n": n, "double": "duplicate"}),
        );
        assert_eq!(recv(&mut client).kind, RESPONSE_OK);
    }
    for n in 0..SLOW {
        send_json(
            &mut client,
            TASK_SUBMIT,
            &json!({"task_type": "t", "n": n, "double": {"slow_ms": 900}}),
        );
        expect_error(&recv(&mut client), 5);
    }
    // Every reply the double sends arrives: the duplicates' second copies and the late ones.
    double.wait_replies(OK + 2 * DUPLICATES + SLOW, WAIT);
    let e = scraper.scrape_until("late and duplicate replies counted", |e| {
        e.value("ipc_router_late_replies_total", &[]) >= SLOW as f64
            && e.value("ipc_router_duplicate_replies_total", &[]) >= DUPLICATES as f64
    });
    check_shape(&e);
    assert_eq!(e.value("ipc_router_late_replies_total", &[]), SLOW as f64);
    assert_eq!(
        e.value("ipc_router_duplicate_replies_total", &[]),
        DUPLICATES as f64
    );
    assert_eq!(e.value("ipc_router_timeouts_total", &[]), SLOW as f64);
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "timeout")]),
        SLOW as f64
    );
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "ok")]),
        (OK + DUPLICATES) as f64
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "submit")]),
        (OK + SLOW) as f64
    );
    assert_eq!(
        e.value("ipc_requests_total", &[("type", "query")]),
        DUPLICATES as f64
    );
    assert_eq!(
        e.value("ipc_request_duration_seconds_count", &[]),
        (OK + DUPLICATES + SLOW) as f64
    );
    assert!(
        bucket(&e, 0.25) <= (OK + DUPLICATES) as f64,
        "the timeouts took at least their 300 ms deadline"
    );
    assert_eq!(e.value("ipc_router_no_responders_total", &[]), 0.0);
    assert_eq!(e.value("ipc_circuit_breaker_state", &[]), 0.0);

    // The Router goes away. Until the server notices, a request may still be delivered to the
    // dead subscription and time out; after that, NATS answers "no responders" (error 8).
    double.kill();
    let (mut timeouts, mut no_responders) = (SLOW, 0);
    let deadline = Instant::now() + WAIT;
    while no_responders == 0 {
        assert!(
            Instant::now() < deadline,
            "no error 8 after the Router left"
        );
        send_json(
            &mut client,
            TASK_SUBMIT,
            &json!({"task_type": "t", "gone": true}),
        );
        let frame = recv(&mut client);
        let code = ipc_gateway_tests::daemon::check_error(&frame, 8)
            .map(|_| 8)
            .or_else(|_| ipc_gateway_tests::daemon::check_error(&frame, 5).map(|_| 5))
            .unwrap_or_else(|e| panic!("{e}"));
        if code == 8 {
            no_responders += 1;
        } else {
            timeouts += 1;
        }
    }
    let e = scraper.scrape();
    assert_eq!(
        e.value("ipc_router_no_responders_total", &[]),
        no_responders as f64
    );
    assert_eq!(
        e.value("ipc_responses_total", &[("outcome", "router_unavailable")]),
        no_responders as f64
    );
    assert_eq!(e.value("ipc_router_timeouts_total", &[]), timeouts as f64);
    assert_eq!(e.value("nats_reconnects_total", &[]), 0.0);
    check_process(&e, daemon.pid());
}

/// A NATS restart: the connection gauge drops to 0 and comes back, a request sent meanwhile
/// waits in the reconnect buffer (its bytes visible), and the reconnect is counted once.
#[test]
fn nats_restart_is_counted_and_the_buffer_is_visible() {
    let mut server = NatsServer::start();
    let mut daemon = nats_gateway(&server.url(), &[("CGW_HEALTH_GRACE_MS", "60000")]);
    let mut scraper = Scraper::new(&mut daemon);
    let up = scraper.scrape();
    assert_eq!(up.value("nats_connection_state", &[]), 1.0);
    assert_eq!(up.value("nats_reconnects_total", &[]), 0.0);

    server.kill();
    let down = scraper.scrape_until("the NATS connection seen down", |e| {
        e.value("nats_connection_state", &[]) == 0.0
    });
    assert_eq!(
        down.value("ipc_health_status", &[]),
        1.0,
        "DEGRADED within the grace period"
    );
    let mut client: UnixStream = daemon.connect();
    send_json(
        &mut client,
        TASK_SUBMIT,
        &json!({"task_type": "t", "waits": true}),
    );
    let buffered = scraper.scrape_until("the request in the reconnect buffer", |e| {
        e.value("nats_reconnect_buffer_bytes", &[]) > 0.0
    });
    assert_eq!(buffered.value("ipc_inflight", &[]), 1.0);

    server.restart();
    let back = scraper.scrape_until("the NATS connection back", |e| {
        e.value("nats_connection_state", &[]) == 1.0
    });
    assert_eq!(back.value("nats_reconnects_total", &[]), 1.0);
    // Published after the reconnect; nobody serves the subject, so NATS says no responders.
    expect_error(&recv(&mut client), 8);
    let e = scraper.scrape_until("the buffer empty", |e| {
        e.value("nats_reconnect_buffer_bytes", &[]) == 0.0 && e.value("ipc_inflight", &[]) == 0.0
    });
    assert_eq!(e.value("nats_reconnects_total", &[]), 1.0);
    assert_eq!(e.value("ipc_router_no_responders_total", &[]), 1.0);
    assert_eq!(e.value("ipc_health_status", &[]), 0.0);
}

/// More HTTP connections than the 32 allowed: each one over the limit is accepted and closed at
/// once, and counted; the scrapes after they are gone count them all.
#[test]
fn http_connections_over_the_limit_are_counted() {
    const LIMIT: usize = 32;
    const OVER: usize = 3;
    let mut daemon = start(&[]);
    let mut scraper = Scraper::new(&mut daemon);
    let before = scraper.scrape();
    assert_eq!(before.value("http_connections_rejected_total", &[]), 0.0);
    // Connected one after another, so the 32 first take every slot. Idle connections are
    // closed by the server only after its 5 s request timeout, so the ones closed at once
    // are exactly the refused ones.
    let open: Vec<TcpStream> = (0..LIMIT + OVER)
        .map(|i| {
            let s = TcpStream::connect_timeout(&scraper.addr, WAIT)
                .unwrap_or_else(|e| panic!("HTTP connection {i}: {e}"));
            s.set_nonblocking(true).expect("non-blocking");
            s
        })
        .collect();
    // A refused connection reads end of stream (or a reset); an accepted one would block.
    let mut refused = vec![false; open.len()];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        for (stream, refused) in open.iter().zip(refused.iter_mut()) {
            let mut b = [0u8; 16];
            match (&*stream).read(&mut b) {
                Ok(0) => *refused = true,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => *refused = true,
                _ => {}
            }
        }
        if refused.iter().filter(|&&r| r).count() >= OVER || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let closed = refused.iter().filter(|&&r| r).count();
    assert_eq!(
        closed,
        OVER,
        "{OVER} of {} connections refused",
        LIMIT + OVER
    );
    drop(open);
    // The slots free once the server has seen the closes; until then a scrape may be refused
    // itself (and counted), so it is retried and the refusals it met are added.
    let deadline = Instant::now() + WAIT;
    let mut scrape_refusals = 0;
    let e = loop {
        match try_http_get(scraper.addr, "/metrics", None) {
            Ok(r) if r.status == 200 => {
                break Exposition::parse(&String::from_utf8_lossy(&r.body), Format::Prometheus)
            }
            Ok(r) => panic!("GET /metrics: {}", r.status),
            // Refused: accepted and closed before any response.
            Err(e) if e.contains("closed before the head") || e.contains("reset") => {
                scrape_refusals += 1
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "no scrape answered after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        e.value("http_connections_rejected_total", &[]),
        (OVER + scrape_refusals) as f64
    );
}
