//! The NATS session against a misbehaving server (gateway.md sections 1 and 2): a fake NATS
//! server written here, on a loopback TCP port, speaks just enough of the protocol to get the
//! gateway connected and to play the Router, then misbehaves on command: garbage bytes, a
//! fatal `-ERR`, silence (no PONG to the gateway's keepalive PINGs).
//!
//! Every scenario checks the same contract:
//! - the gateway drops the bad connection (the fake sees it closed) and connects again (the
//!   fake sees a new connection);
//! - a request that was on the wire when the connection failed (the fake received it and held
//!   its reply) gets exactly one reply, error 8 (retryable), and is not sent again on the new
//!   connection; a request whose Router reply arrived just before the failure gets exactly one
//!   reply, its own;
//! - a request made while the new connection is still handshaking waits in the reconnect
//!   buffer and succeeds once the handshake completes;
//! - a request made afterwards succeeds (RESPONSE_OK carrying the fake Router's reply), and no
//!   stray frame follows (a PING gets the next frame, a PONG).
//!
//! A fake rather than nats-server because a real server cannot be made to send garbage or to
//! ignore PINGs; the real server's faults (kill, restart, cluster) are in nats_restart.rs and
//! nats_cluster.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use ipc_gateway_tests::daemon::{expect_error, ping, recv, run, send_json, wait_until, Daemon};
use ipc_gateway_tests::frame::{Frame, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT};
use serde_json::{json, Value};

/// The Router subject the gateway publishes to by default (router.md section 1).
const ROUTER_SUBJECT: &str = "beamline.router.v1.decide";
/// What the fake sends first on every connection (the INFO of a nats-server 2.9 without
/// cluster), headers on so that the gateway uses HPUB as it does with a real server.
const INFO: &str = "INFO {\"server_id\":\"fake\",\"version\":\"2.9.10\",\"headers\":true,\
                    \"max_payload\":1048576,\"proto\":1}\r\n";
/// The request deadline: long enough that a request lost with its connection can only be
/// answered by the disconnect (error 8), never by the deadline (error 5), even on a loaded
/// machine; short enough that a gateway that forgets it answers within the read timeout.
const TIMEOUT_MS: &str = "10000";
/// How long the gateway may take to notice a failure and reconnect: the first reconnect
/// attempt is immediate (gateway.md section 2), so this is all scheduling slack.
const RECONNECT_WITHIN: Duration = Duration::from_secs(10);
/// The ping interval for the keepalive test. 20 s by default, and the connection is declared
/// dead only after 2 unanswered pings, a minute: too slow for a test.
const PING_INTERVAL_VAR: &str = "CGW_IPC_NATS_PING_INTERVAL_MS";
const PING_INTERVAL_MS: &str = "300";

// ----- the fake server ----------------------------------------------------------------------

/// One request the fake received on the Router subject.
#[derive(Debug, Clone)]
struct RouterRequest {
    /// The reply subject (`<inbox>.<token>`).
    reply: String,
    /// `task.payload` of the router-v1 envelope: the client's JSON object.
    client_payload: Value,
}

/// One TCP connection from the gateway, as the fake sees it.
struct Conn {
    /// 0 for the first connection, then 1, 2, ...
    id: usize,
    writer: Mutex<TcpStream>,
    /// The gateway's handshake PING was answered: from here on the gateway is connected.
    handshaken: AtomicBool,
    /// The gateway closed the connection (the fake read end of stream or an error).
    closed: AtomicBool,
    /// Requests are recorded but not answered.
    hold: AtomicBool,
    /// Nothing at all is written any more: no PONG, no reply.
    silent: AtomicBool,
    /// PINGs received (after the handshake) while silent.
    pings_ignored: AtomicUsize,
    /// The sid of the gateway's (only) subscription, its reply inbox.
    inbox_sid: Mutex<Option<String>>,
    requests: Mutex<Vec<RouterRequest>>,
}

impl Conn {
    fn write(&self, bytes: &[u8]) {
        // The gateway may have closed the connection already; that is for the test to judge.
        let _ = lock(&self.writer).write_all(bytes);
    }

    /// The bytes of the fake Router's reply to `request` on this connection:
    /// `MSG <reply> <sid> <len>` and `{"ok":true,"fake_conn":<id>,"echo":<client payload>}`.
    fn reply_bytes(&self, request: &RouterRequest) -> Vec<u8> {
        let sid = lock(&self.inbox_sid)
            .clone()
            .expect("the gateway published before subscribing its inbox");
        let body =
            json!({"ok": true, "fake_conn": self.id, "echo": request.client_payload}).to_string();
        let mut out = format!("MSG {} {sid} {}\r\n", request.reply, body.len()).into_bytes();
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }

    fn requests(&self) -> Vec<RouterRequest> {
        lock(&self.requests).clone()
    }

    /// The client payloads of the requests received, in order.
    fn client_payloads(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .map(|r| r.client_payload)
            .collect()
    }
}

#[derive(Default)]
struct Shared {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// New connections get no INFO while set: the gateway waits in its handshake.
    hold_info: AtomicBool,
    stopping: AtomicBool,
}

/// A fake NATS server on 127.0.0.1, one thread per connection. Dropping it closes everything.
struct FakeNats {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeNats {
    fn start() -> FakeNats {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake NATS server");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        thread::spawn(move || accept_loop(listener, accepting));
        FakeNats { addr, shared }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn connection_count(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Connection `id` (panics if the gateway has not opened it).
    fn conn(&self, id: usize) -> Arc<Conn> {
        let conns = lock(&self.shared.conns);
        Arc::clone(
            conns
                .get(id)
                .unwrap_or_else(|| panic!("no connection {id}; {} so far", conns.len())),
        )
    }

    /// Waits until the gateway has opened connection `id` (TCP accepted).
    fn wait_accepted(&self, id: usize) -> Arc<Conn> {
        wait_until(
            &format!("the gateway opens NATS connection {id}"),
            RECONNECT_WITHIN,
            || self.connection_count() > id,
        );
        self.conn(id)
    }

    /// Waits until connection `id` has completed its handshake (PING answered).
    fn wait_handshaken(&self, id: usize) -> Arc<Conn> {
        let conn = self.wait_accepted(id);
        wait_until(
            &format!("NATS connection {id} completes its handshake"),
            RECONNECT_WITHIN,
            || conn.handshaken.load(Ordering::SeqCst),
        );
        conn
    }

    fn set_hold_info(&self, hold: bool) {
        self.shared.hold_info.store(hold, Ordering::SeqCst);
    }
}

impl Drop for FakeNats {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        for conn in lock(&self.shared.conns).iter() {
            let _ = lock(&conn.writer).shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let mut conns = lock(&shared.conns);
        let conn = Arc::new(Conn {
            id: conns.len(),
            writer: Mutex::new(stream.try_clone().expect("cloning a TCP stream")),
            handshaken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            pings_ignored: AtomicUsize::new(0),
            inbox_sid: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
        });
        conns.push(Arc::clone(&conn));
        drop(conns);
        let shared = Arc::clone(&shared);
        thread::spawn(move || {
            serve(&conn, stream, &shared);
            conn.closed.store(true, Ordering::SeqCst);
        });
    }
}

/// Speaks the server side of the protocol on one connection until the gateway closes it.
fn serve(conn: &Conn, stream: TcpStream, shared: &Shared) {
    while shared.hold_info.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(5));
    }
    conn.write(INFO.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let mut words = text.split_ascii_whitespace();
        let op = words.next().unwrap_or("").to_ascii_uppercase();
        let args: Vec<&str> = words.collect();
        match op.as_str() {
            "CONNECT" | "PONG" | "UNSUB" | "" => {}
            "SUB" => {
                // SUB <subject> [queue] <sid>
                let sid = args.last().expect("SUB without a sid").to_string();
                *lock(&conn.inbox_sid) = Some(sid);
            }
            "PING" => {
                if conn.silent.load(Ordering::SeqCst) {
                    conn.pings_ignored.fetch_add(1, Ordering::SeqCst);
                } else {
                    conn.write(b"PONG\r\n");
                    conn.handshaken.store(true, Ordering::SeqCst);
                }
            }
            "PUB" | "HPUB" => {
                // PUB <subject> [reply] <len>; HPUB <subject> [reply] <header len> <total len>
                let fixed = if op == "PUB" { 2 } else { 3 };
                let total: usize = args
                    .last()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bad {op} line from the gateway: {text:?}"));
                let reply = (args.len() > fixed).then(|| args[1].to_owned());
                let header_len: usize = if op == "HPUB" {
                    args[args.len() - 2].parse().expect("HPUB header length")
                } else {
                    0
                };
                let mut body = vec![0u8; total + 2];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let payload = &body[header_len..total];
                if args.first() != Some(&ROUTER_SUBJECT) {
                    continue;
                }
                let envelope: Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
                    panic!(
                        "the gateway's Router request is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(payload)
                    )
                });
                let request = RouterRequest {
                    reply: reply.expect("a Router request without a reply subject"),
                    client_payload: envelope["task"]["payload"].clone(),
                };
                lock(&conn.requests).push(request.clone());
                if !conn.hold.load(Ordering::SeqCst) && !conn.silent.load(Ordering::SeqCst) {
                    conn.write(&conn.reply_bytes(&request));
                }
            }
            other => panic!("the fake NATS server got an unexpected operation {other:?}"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ----- the client side ----------------------------------------------------------------------

fn start_daemon(fake: &FakeNats, extra: &[(&str, &str)]) -> Daemon {
    let url = fake.url();
    let mut env = vec![
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", url.as_str()),
        ("CGW_IPC_TIMEOUT_MS", TIMEOUT_MS),
    ];
    env.extend_from_slice(extra);
    Daemon::start(&env)
}

fn task(n: u64) -> Value {
    json!({"n": n, "task_type": "fault_test"})
}

fn submit(stream: &mut UnixStream, n: u64) {
    send_json(stream, TASK_SUBMIT, &task(n));
}

/// Asserts `frame` is the fake Router's reply to task `n`; returns the fake connection it
/// came through.
fn expect_fake_reply(frame: &Frame, n: u64) -> u64 {
    assert_eq!(
        frame.kind,
        RESPONSE_OK,
        "expected RESPONSE_OK for task {n}, got {frame:?} ({})",
        String::from_utf8_lossy(&frame.payload)
    );
    let body = frame.json();
    assert_eq!(body["echo"], task(n), "reply for task {n}: {body}");
    body["fake_conn"].as_u64().expect("fake_conn in the reply")
}

/// Asserts `frame` is error 8 marked retryable (gateway.md section 2: requests on the wire
/// when the connection drops fail at once with error 8).
fn expect_unavailable(frame: &Frame, n: u64) {
    assert_eq!(
        frame.kind,
        RESPONSE_ERROR,
        "task {n} was on the wire when the connection failed: expected error 8, got {frame:?} \
         ({})",
        String::from_utf8_lossy(&frame.payload)
    );
    let error = expect_error(frame, 8);
    assert_eq!(error["retryable"], json!(true), "error 8: {error}");
}

/// Makes it (all but) certain the daemon has read what was written on other connections
/// before now: a PING round trip on a fresh connection.
fn barrier(daemon: &Daemon) {
    ping(&mut daemon.connect());
}

/// The common scenario. `fault` is applied to the first NATS connection (by the test thread)
/// with tasks 1 and 2 on the wire, their replies held; `reply_first` says whether the fake
/// Router's reply to task 2 goes out in the same write just before the fault.
///
/// Then: task 1 gets error 8; task 2 gets its own reply if it went out, else error 8; the
/// gateway closes the first connection and opens a second, on which the fake holds INFO until
/// task 3 (sent meanwhile) is in the gateway's reconnect buffer; task 3 and task 4 (sent once
/// connected) get their replies through the second connection; nothing of tasks 1 and 2 is
/// sent again; no stray frame follows.
fn fault_then_recover(
    extra_env: &[(&str, &str)],
    reply_first: bool,
    fault: impl FnOnce(&Conn),
) -> (FakeNats, Daemon) {
    let fake = FakeNats::start();
    let daemon = start_daemon(&fake, extra_env);
    let first = fake.wait_handshaken(0);
    let mut client = daemon.connect();

    // The fake and the gateway work together.
    submit(&mut client, 0);
    assert_eq!(expect_fake_reply(&recv(&mut client), 0), 0);

    first.hold.store(true, Ordering::SeqCst);
    submit(&mut client, 1);
    submit(&mut client, 2);
    wait_until("the fake receives tasks 1 and 2", RECONNECT_WITHIN, || {
        first.requests().len() == 3
    });
    assert_eq!(first.client_payloads(), vec![task(0), task(1), task(2)]);
    fake.set_hold_info(true);
    if reply_first {
        let reply = first.reply_bytes(&first.requests()[2]);
        first.write(&reply);
    }
    fault(&first);

    expect_unavailable(&recv(&mut client), 1);
    let second_reply = recv(&mut client);
    if reply_first && second_reply.kind == RESPONSE_OK {
        assert_eq!(expect_fake_reply(&second_reply, 2), 0);
    } else {
        expect_unavailable(&second_reply, 2);
    }

    wait_until(
        "the gateway closes the failed NATS connection",
        RECONNECT_WITHIN,
        || first.closed.load(Ordering::SeqCst),
    );
    // The second connection is accepted, its INFO held: the gateway is handshaking.
    let second = fake.wait_accepted(1);
    submit(&mut client, 3);
    barrier(&daemon);
    assert!(
        !second.handshaken.load(Ordering::SeqCst),
        "precondition: task 3 must be sent before the handshake completes"
    );
    fake.set_hold_info(false);
    assert_eq!(
        expect_fake_reply(&recv(&mut client), 3),
        1,
        "task 3 (buffered while reconnecting) must go out on the second connection"
    );
    submit(&mut client, 4);
    assert_eq!(expect_fake_reply(&recv(&mut client), 4), 1);
    ping(&mut client);
    assert_eq!(
        second.client_payloads(),
        vec![task(3), task(4)],
        "requests already written on the failed connection must not be sent again"
    );
    (fake, daemon)
}

// ----- scenarios ----------------------------------------------------------------------------

/// An unknown operation line (`XYZZY`) from the server: protocol error, reconnect.
#[test]
fn garbage_line_reconnects_and_keeps_serving() {
    fault_then_recover(&[], false, |conn| conn.write(b"XYZZY\r\n"));
}

/// The Router's reply to task 2 and the garbage arrive in one write: task 2 keeps its reply
/// (it arrived before the failure, error 8 is also accepted), task 1 gets error 8.
#[test]
fn garbage_after_a_reply_in_the_same_write() {
    fault_then_recover(&[], true, |conn| conn.write(b"XYZZY\r\n"));
}

/// 64 KiB of binary junk without a line end: far more than a control line may hold (4 KiB
/// in nats-server), so a gateway with bounded memory must give up on it.
#[test]
fn binary_junk_reconnects_and_keeps_serving() {
    // A fixed pseudo-random sequence (xorshift), no LF, so it is never a complete line.
    let mut x: u32 = 0x9E37_79B9;
    let junk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x as u8 {
                b'\n' => 0xFF,
                b => b,
            }
        })
        .collect();
    fault_then_recover(&[], false, |conn| conn.write(&junk));
}

/// A fatal server error the server does not follow by closing (a real one would): the
/// gateway must not wait for the close, it reconnects.
#[test]
fn authorization_violation_reconnects_and_keeps_serving() {
    fault_then_recover(&[], false, |conn| {
        conn.write(b"-ERR 'Authorization Violation'\r\n")
    });
}

#[test]
fn unknown_protocol_operation_error_reconnects_and_keeps_serving() {
    fault_then_recover(&[], true, |conn| {
        conn.write(b"-ERR 'Unknown Protocol Operation'\r\n")
    });
}

/// The control case: a permissions error concerns one publish and the server keeps the
/// connection (nats.go does the same), so the gateway keeps it too: the held request is
/// answered normally and there is no second connection. Without this, a gateway that drops the
/// connection on any input at all would pass the tests above.
#[test]
fn permissions_violation_keeps_the_connection() {
    let fake = FakeNats::start();
    let daemon = start_daemon(&fake, &[]);
    let first = fake.wait_handshaken(0);
    let mut client = daemon.connect();
    first.hold.store(true, Ordering::SeqCst);
    submit(&mut client, 1);
    wait_until("the fake receives task 1", RECONNECT_WITHIN, || {
        first.requests().len() == 1
    });
    first.write(b"-ERR 'Permissions Violation for Publish to \"other.subject\"'\r\n");
    // Something after the error on the same connection, then the held reply.
    first.write(b"PING\r\n");
    let reply = first.reply_bytes(&first.requests()[0]);
    first.write(&reply);
    assert_eq!(expect_fake_reply(&recv(&mut client), 1), 0);
    first.hold.store(false, Ordering::SeqCst);
    submit(&mut client, 2);
    assert_eq!(expect_fake_reply(&recv(&mut client), 2), 0);
    ping(&mut client);
    assert!(!first.closed.load(Ordering::SeqCst));
    assert_eq!(fake.connection_count(), 1, "the gateway reconnected");
}

/// The server stops answering anything, PINGs included, without closing: after 2 unanswered
/// keepalive PINGs the gateway declares the connection dead and reconnects. Needs a short ping
/// interval (the default 20 s makes it a minute).
#[test]
fn unanswered_pings_declare_the_connection_dead() {
    assert!(
        run(&[], &["--help"]).stdout.contains(PING_INTERVAL_VAR),
        "this test needs {PING_INTERVAL_VAR} (the keepalive ping interval) to exist"
    );
    let (fake, _daemon) =
        fault_then_recover(&[(PING_INTERVAL_VAR, PING_INTERVAL_MS)], false, |conn| {
            conn.silent.store(true, Ordering::SeqCst)
        });
    let first = fake.conn(0);
    assert_eq!(
        first.pings_ignored.load(Ordering::SeqCst),
        2,
        "PINGs the gateway sent on the silent connection before declaring it dead (max pings \
         outstanding: 2)"
    );
}
