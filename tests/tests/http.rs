//! The HTTP endpoints (gateway.md section 5) of the real binary, asked with a real HTTP client
//! (`curl`) in every health state (stub, NATS up, NATS down past the grace period, breaker
//! Open, draining), and with raw sockets for what a client library would not send: garbage,
//! oversized heads, a dribbling client, a flood of idle connections. Through all of it, IPC
//! replies must stay prompt.
//!
//! Every daemon here binds `127.0.0.1:0` and the test reads the bound address from its
//! `http_listening` line ([`Daemon::http_addr`]): no port is picked twice, 8080 is never used.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    check_ping, expect_error, recv, send_json, wait_until, Daemon, START_TIMEOUT,
};
use ipc_gateway_tests::frame::TASK_SUBMIT;
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use serde_json::{json, Value};

/// Generous bound for what should take milliseconds (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(10);
/// How long an IPC PING round trip may take while HTTP clients misbehave: a behavioural bound
/// (nothing waits on HTTP), not a benchmark.
const IPC_PROMPT: Duration = Duration::from_secs(1);
const HTTP_ANY: (&str, &str) = ("CGW_HTTP_ADDR", "127.0.0.1:0");

/// One HTTP exchange as curl saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Header lines, names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Runs curl with `args` against `path` and parses the response it printed (`-i`).
fn curl(addr: SocketAddr, path: &str, args: &[&str]) -> Result<Reply, String> {
    let out = Command::new("curl")
        .args(["-s", "-S", "-i", "--max-time", "10"])
        .args(args)
        .arg(format!("http://{addr}{path}"))
        .output()
        .map_err(|e| format!("running curl (is it installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl {path} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// A raw response: status line, headers, body.
fn parse(text: &str) -> Result<Reply, String> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    curl(addr, path, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `path` until `cond` holds for its reply; returns that reply.
fn wait_reply(addr: SocketAddr, path: &str, what: &str, cond: impl Fn(&Reply) -> bool) -> Reply {
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = curl(addr, path, &[]);
        match reply {
            Ok(r) if cond(&r) => return r,
            other => assert!(
                Instant::now() < deadline,
                "{what}: not seen within {WAIT:?}; last {path}: {other:?}"
            ),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Every endpoint's code in the current state, with GET and with HEAD: `/health` and
/// `/ready` as given, `/live` and `/metrics` 200 whatever the health.
fn assert_codes(addr: SocketAddr, state: &str, health: u16, ready: u16) {
    for (path, code) in [
        ("/health", health),
        ("/ready", ready),
        ("/live", 200),
        ("/metrics", 200),
    ] {
        let got = get(addr, path);
        assert_eq!(got.status, code, "GET {path} when {state}: {got:?}");
        let head = curl(addr, path, &["-I"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(head.status, code, "HEAD {path} when {state}: {head:?}");
    }
}

/// A daemon with HTTP on a free loopback port, and that port.
fn daemon(env: &[(&str, &str)]) -> (Daemon, SocketAddr) {
    let mut all = vec![HTTP_ANY];
    all.extend_from_slice(env);
    let mut daemon = Daemon::start(&all);
    let addr = daemon.http_addr();
    (daemon, addr)
}

/// A raw TCP connection with read and write timeouts.
fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Reads until the server closes; the bytes, or what went wrong.
fn read_to_close(s: &mut TcpStream) -> Result<String, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => {
                return Ok(String::from_utf8_lossy(&out).into_owned())
            }
            Err(e) => {
                return Err(format!(
                    "reading until close: {e} after {:?}",
                    String::from_utf8_lossy(&out)
                ))
            }
        }
    }
}

/// One IPC PING round trip on a fresh connection must take less than [`IPC_PROMPT`].
fn assert_ipc_prompt(daemon: &Daemon, while_: &str) {
    let mut client = daemon.connect();
    for _ in 0..5 {
        let started = Instant::now();
        check_ping(&mut client).unwrap_or_else(|e| panic!("PING while {while_}: {e}"));
        let took = started.elapsed();
        assert!(
            took < IPC_PROMPT,
            "PING took {took:?} while {while_} (bound {IPC_PROMPT:?})"
        );
    }
}

/// The NATS server, a Router double on it, and a gateway connected to it with HTTP on.
fn nats_gateway(extra: &[(&str, &str)]) -> (NatsServer, RouterDouble, Daemon, SocketAddr) {
    let server = NatsServer::start();
    let double = RouterDouble::start(&server.url());
    let url = server.url();
    let mut env = vec![
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", url.as_str()),
    ];
    env.extend_from_slice(extra);
    let (daemon, addr) = daemon(&env);
    daemon.wait_stderr_contains(r#""event":"nats_connected""#, WAIT);
    (server, double, daemon, addr)
}

/// Stub mode: /health is HEALTHY with every field of the spec in the spec's order, /ready,
/// /live and /metrics answer 200 with their content types; HEAD gets GET's headers without
/// a body; other methods 405 with Allow; unknown paths 404.
#[test]
fn stub_mode_endpoints() {
    let (daemon, addr) = daemon(&[]);
    let health = get(addr, "/health");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.header("content-type"), Some("application/json"));
    let order: Vec<&str> = [
        "status",
        "reason",
        "uptime_seconds",
        "connections",
        "inflight",
        "nats",
        "breaker",
        "version",
    ]
    .to_vec();
    let mut last = 0;
    for key in &order {
        let at = health
            .body
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {}", health.body));
        assert!(at >= last, "{key} out of the spec's order: {}", health.body);
        last = at;
    }
    let j = health.json();
    assert_eq!(j["status"], "HEALTHY");
    assert_eq!(j["reason"], Value::Null);
    assert!(j["uptime_seconds"].is_u64(), "{j}");
    assert!(j["connections"].is_u64() && j["inflight"] == 0, "{j}");
    assert_eq!(j["nats"]["state"], "disabled");
    assert!(
        j["nats"]["reconnects"] == 0 && j["nats"]["last_error"].is_null(),
        "{j}"
    );
    assert_eq!(j["breaker"], "closed");
    assert!(j["version"].as_str().is_some_and(|v| !v.is_empty()), "{j}");

    let ready = get(addr, "/ready");
    assert_eq!((ready.status, ready.body.trim()), (200, "ready"));
    assert_codes(addr, "in stub mode", 200, 200);
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let open = curl(
        addr,
        "/metrics",
        &["-H", "Accept: application/openmetrics-text; version=1.0.0"],
    )
    .unwrap();
    assert!(
        open.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{open:?}"
    );

    for path in ["/health", "/ready", "/live", "/metrics"] {
        let head = curl(addr, path, &["-I"]).unwrap();
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body: {head:?}");
        let length: usize = head
            .header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path}: no Content-Length: {head:?}"));
        assert!(length > 0, "HEAD {path}");
        for method in ["POST", "PUT", "DELETE"] {
            let r = curl(addr, path, &["-X", method]).unwrap();
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}");
        }
    }
    for path in ["/", "/healthz", "/health/x", "/metricsx"] {
        assert_eq!(get(addr, path).status, 404, "{path}");
    }
    // `connections` counts IPC clients as they come and go.
    let clients: Vec<_> = (0..3).map(|_| daemon.connect()).collect();
    wait_reply(addr, "/health", "three IPC connections", |r| {
        r.json()["connections"] == 3
    });
    drop(clients);
    wait_reply(addr, "/health", "no IPC connection", |r| {
        r.json()["connections"] == 0
    });
    // Query strings do not change the path.
    assert_eq!(get(addr, "/live?verbose=1").status, 200);
    drop(daemon);
}

/// NATS up (real nats-server, Router double): HEALTHY and ready, `nats.state` connected with
/// the server named. Then nats-server dies: once the grace period (300 ms) is over /health is
/// 503 UNHEALTHY "nats down", `last_error` says why, /ready 503 "nats not connected"; every
/// answer on the way is DEGRADED with 200 or UNHEALTHY with 503, never a mismatch.
#[test]
fn nats_up_then_down_past_the_grace_period() {
    let (mut server, _double, daemon, addr) = nats_gateway(&[("CGW_HEALTH_GRACE_MS", "300")]);
    let health = wait_reply(addr, "/health", "HEALTHY with NATS up", |r| {
        r.status == 200 && r.json()["status"] == "HEALTHY"
    });
    let j = health.json();
    assert_eq!(j["nats"]["state"], "connected", "{j}");
    assert!(
        j["nats"]["server"]
            .as_str()
            .is_some_and(|s| s.contains(&server.port().to_string())),
        "{j}"
    );
    let ready = get(addr, "/ready");
    assert_eq!((ready.status, ready.body.trim()), (200, "ready"));
    assert_codes(addr, "NATS is up", 200, 200);

    server.kill();
    let down = wait_reply(addr, "/health", "UNHEALTHY after the grace period", |r| {
        let j = r.json();
        let status = j["status"].as_str().unwrap_or("").to_owned();
        let expected_code = if status == "UNHEALTHY" { 503 } else { 200 };
        assert_eq!(
            r.status, expected_code,
            "code does not match the status: {j}"
        );
        status == "UNHEALTHY"
    });
    let j = down.json();
    assert!(
        j["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("nats down for")),
        "{j}"
    );
    assert!(
        j["nats"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{j}"
    );
    assert_ne!(j["nats"]["state"], "connected", "{j}");
    let ready = get(addr, "/ready");
    assert_eq!(
        (ready.status, ready.body.trim()),
        (503, "nats not connected")
    );
    assert_codes(addr, "NATS is down past the grace period", 503, 503);
    assert_ipc_prompt(&daemon, "NATS is down");
}

/// The breaker opens after two Router timeouts (a silent Router double): /health is 503
/// UNHEALTHY "breaker open" with `breaker` "open", /ready 503 "breaker open".
#[test]
fn breaker_open_is_unhealthy_and_not_ready() {
    let (_server, _double, daemon, addr) = nats_gateway(&[
        ("CGW_IPC_TIMEOUT_MS", "200"),
        ("CGW_IPC_BREAKER_FAILURES", "2"),
        ("CGW_IPC_BREAKER_OPEN_MS", "60000"),
        ("CGW_IPC_BREAKER_MAX_OPEN_MS", "60000"),
    ]);
    assert_eq!(get(addr, "/ready").status, 200);
    let mut client = daemon.connect();
    for n in 0..2 {
        send_json(
            &mut client,
            TASK_SUBMIT,
            &json!({"task_type": "t", "n": n, "double": "silent"}),
        );
        expect_error(&recv(&mut client), 5);
    }
    let health = wait_reply(addr, "/health", "breaker open", |r| {
        r.json()["breaker"] == "open"
    });
    assert_eq!(health.status, 503, "{health:?}");
    let j = health.json();
    assert_eq!(
        (j["status"].as_str(), j["reason"].as_str()),
        (Some("UNHEALTHY"), Some("breaker open")),
        "{j}"
    );
    let ready = get(addr, "/ready");
    assert_eq!((ready.status, ready.body.trim()), (503, "breaker open"));
    assert_codes(addr, "the breaker is open", 503, 503);
}

/// After SIGTERM with a request in flight (a 5 s stub delay) the IPC socket is gone at once,
/// but HTTP keeps answering through the drain: /ready and /health 503 "draining", /live 200.
/// The request is still answered, and the process exits 0.
#[test]
fn draining_is_503_while_the_drain_lasts() {
    let (mut daemon, addr) = daemon(&[
        ("CGW_IPC_STUB_DELAY_MS", "5000"),
        ("CGW_IPC_DRAIN_MS", "20000"),
    ]);
    let mut client = daemon.connect();
    send_json(&mut client, TASK_SUBMIT, &json!({"n": 1}));
    wait_until("request in flight", WAIT, || {
        get(addr, "/health").json()["inflight"] == 1
    });
    daemon.terminate();
    wait_until("socket file removed", WAIT, || {
        !daemon.socket_path().exists()
    });
    let ready = get(addr, "/ready");
    assert_eq!((ready.status, ready.body.trim()), (503, "draining"));
    let health = get(addr, "/health");
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["reason"], "draining");
    assert_codes(addr, "draining", 503, 503);
    assert!(
        daemon.is_running(),
        "the drain ended before the in-flight request was answered"
    );
    let reply = recv(&mut client);
    assert_eq!(
        reply.kind,
        ipc_gateway_tests::frame::RESPONSE_OK,
        "{reply:?}"
    );
    daemon.expect_clean_exit();
}

/// Garbage is answered 400 and closed; a head over 8 KiB 431 and closed; a head just under
/// the limit is served. The daemon stays up and IPC is answered throughout.
#[test]
fn malformed_and_oversized_requests() {
    let (daemon, addr) = daemon(&[]);
    let mut s = raw(addr);
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        .unwrap();
    let text = read_to_close(&mut s).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");

    let mut s = raw(addr);
    let mut big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.resize(9 * 1024, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    // The daemon may answer and close before it has read everything: a failed write is fine.
    let _ = s.write_all(&big);
    let text = read_to_close(&mut s).unwrap();
    assert!(text.starts_with("HTTP/1.1 431 "), "{text:?}");

    let mut s = raw(addr);
    let mut fits = b"GET /live HTTP/1.1\r\nConnection: close\r\nX-Big: ".to_vec();
    fits.resize(8 * 1024 - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    s.write_all(&fits).unwrap();
    let text = read_to_close(&mut s).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
    assert_ipc_prompt(&daemon, "after garbage");
}

/// Keep-alive: curl fetches two URLs over one connection; two pipelined requests on one raw
/// connection get two answers in order; `Connection: close` and HTTP/1.0 close after one.
#[test]
fn keep_alive_is_honoured() {
    let (_daemon, addr) = daemon(&[]);
    let out = Command::new("curl")
        .args(["-s", "-w", "%{num_connects}\n", "--max-time", "10"])
        // One -o per URL: both bodies are discarded, only the counts are printed.
        .args(["-o", "/dev/null", "-o", "/dev/null"])
        .arg(format!("http://{addr}/live"))
        .arg(format!("http://{addr}/ready"))
        .output()
        .expect("running curl");
    assert!(out.status.success(), "{out:?}");
    let connects: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        connects,
        ["1", "0"],
        "the second request opened a new connection"
    );

    let mut s = raw(addr);
    s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = read_to_close(&mut s).unwrap();
    let first = text.find("live\n").expect("the /live answer");
    let second = text.find("ready\n").expect("the /ready answer");
    assert!(first < second, "{text:?}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text:?}");

    let mut s = raw(addr);
    s.write_all(b"GET /live HTTP/1.0\r\n\r\n").unwrap();
    let text = read_to_close(&mut s).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200 ") && text.contains("Connection: close"),
        "{text:?}"
    );
}

/// A client dribbling a header (one line every 200 ms, never finishing) gets 408 about 5 s
/// after it connected and is closed; IPC PINGs stay prompt meanwhile.
#[test]
fn slowloris_gets_408_and_is_closed() {
    let (daemon, addr) = daemon(&[]);
    let mut s = raw(addr);
    s.set_nonblocking(true).unwrap();
    let started = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let mut got = Vec::new();
    let mut closed = false;
    let mut buf = [0u8; 1024];
    let mut next_ping = Instant::now();
    while started.elapsed() < Duration::from_secs(15) && !closed {
        // Writes may fail once the daemon has closed: the reading below then sees it.
        let _ = s.write_all(b"X-Dribble: a\r\n");
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if Instant::now() >= next_ping {
            assert_ipc_prompt(&daemon, "a client dribbles a header");
            next_ping = Instant::now() + Duration::from_secs(1);
        }
        thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(closed, "still open after {took:?}: {text:?}");
    assert!(text.starts_with("HTTP/1.1 408 "), "{text:?}");
    assert!(
        took >= Duration::from_millis(4800) && took < Duration::from_secs(10),
        "408 after {took:?}, expected about 5 s"
    );
}

/// 100 idle connections: 32 are kept, the other 68 are closed at once; IPC is answered
/// promptly meanwhile; once the idle ones time out (5 s) /health answers again.
#[test]
fn at_most_32_connections() {
    let (daemon, addr) = daemon(&[]);
    let conns: Vec<TcpStream> = (0..100).map(|_| raw(addr)).collect();
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    let is_closed = |c: &TcpStream| {
        let mut b = [0u8; 16];
        match (&*c).read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    };
    let mut closed = vec![false; conns.len()];
    wait_until(
        "68 of 100 connections closed at once",
        Duration::from_secs(4),
        || {
            for (i, c) in conns.iter().enumerate() {
                if !closed[i] && is_closed(c) {
                    closed[i] = true;
                }
            }
            closed.iter().filter(|&&c| c).count() >= 68
        },
    );
    assert_eq!(
        closed.iter().filter(|&&c| c).count(),
        68,
        "more than 68 closed before the request deadline"
    );
    assert_ipc_prompt(&daemon, "100 idle HTTP connections are attached");
    let health = wait_reply(addr, "/health", "/health once idle ones are closed", |r| {
        r.status == 200
    });
    assert_eq!(health.json()["status"], "HEALTHY");
    drop(conns);
}

/// With slowloris, idle, and garbage-flooding HTTP clients attached at once, IPC PING round
/// trips stay prompt, and /live still answers once the limit frees up.
#[test]
fn http_clients_never_delay_ipc() {
    let (daemon, addr) = daemon(&[]);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut s = raw(addr);
        s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ").unwrap();
        clients.push(s);
    }
    for _ in 0..10 {
        clients.push(raw(addr));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || {
            let junk = vec![b'x'; 64 * 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    continue;
                };
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = s.write_all(&junk);
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_ipc_prompt(
            &daemon,
            "slowloris, idle and flooding HTTP clients are attached",
        );
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    drop(clients);
    wait_reply(addr, "/live", "/live after the storm", |r| r.status == 200);
}

/// CGW_HTTP_ADDR set to an address in use stops the start with exit 2 naming the variable
/// and the address; `off` logs no `http_listening`; --check-config shows the setting.
#[test]
fn http_addr_setting() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let mut d = Daemon::spawn(&[("CGW_HTTP_ADDR", busy.as_str())], &[]);
    let status = d.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{}", d.stderr());
    let stderr = d.stderr();
    assert!(
        stderr.contains("CGW_HTTP_ADDR") && stderr.contains(&busy),
        "{stderr}"
    );

    let mut off = Daemon::start(&[("CGW_HTTP_ADDR", "off")]);
    assert_ipc_prompt(&off, "HTTP is off");
    assert!(!off.stderr().contains("http_listening"), "{}", off.stderr());
    off.terminate();
    off.expect_clean_exit();

    let checked =
        ipc_gateway_tests::daemon::run(&[("CGW_HTTP_ADDR", "127.0.0.1:0")], &["--check-config"]);
    let j: Value = serde_json::from_str(&checked.stdout).unwrap();
    assert_eq!(j["http_addr"], "127.0.0.1:0");
    drop(taken);
}
