//! Running under systemd (gateway.md section 10), with the tests acting as systemd: a
//! notification socket of their own (`NOTIFY_SOCKET`, a path or an abstract name) receives
//! `READY=1`, `STATUS=`, `WATCHDOG=1` and `STOPPING=1`; listeners the tests bound are passed
//! in as descriptor 3 (and 4) with `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`; and a restart on
//! such a listener loses no client.

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    check_pong, connect, expect_echo, ping, recv, send_json, submit_echo, wait_until, Daemon,
    IO_TIMEOUT, START_TIMEOUT,
};
use ipc_gateway_tests::frame::{write_frame, PING, TASK_SUBMIT};
use ipc_gateway_tests::http_client;
use rustix::process::Signal;
use serde_json::{json, Value};
use tempfile::TempDir;

/// Longest a notification may take to arrive once its cause happened.
const NOTIFY_WAIT: Duration = Duration::from_secs(10);

/// The test's stand-in for systemd's notification socket.
struct Notify {
    socket: UnixDatagram,
    /// `NOTIFY_SOCKET` for the daemon.
    value: String,
    /// Every line received so far, with the time it was read.
    lines: Vec<(Instant, String)>,
    _dir: Option<TempDir>,
}

impl Notify {
    /// Bound at a path in a fresh temporary directory.
    fn at_path() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Notify::new(socket, path.to_str().unwrap().to_owned(), Some(dir))
    }

    /// Bound in the abstract namespace, under a name no other test uses.
    fn abstract_name() -> Notify {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cgw-test-notify-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Notify::new(socket, format!("@{name}"), None)
    }

    fn new(socket: UnixDatagram, value: String, dir: Option<TempDir>) -> Notify {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Notify {
            socket,
            value,
            lines: Vec::new(),
            _dir: dir,
        }
    }

    fn env(&self) -> (&str, &str) {
        ("NOTIFY_SOCKET", &self.value)
    }

    /// Reads what arrived within `within` (at least one read).
    fn receive_for(&mut self, within: Duration) {
        let until = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let now = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.lines.extend(text.lines().map(|l| (now, l.to_owned())));
            }
            if Instant::now() >= until {
                return;
            }
        }
    }

    /// Waits for a line `line` (exactly; with a trailing `*`, a line starting with the rest)
    /// after the first `from` lines; returns its index and the time it was read.
    fn wait_for_after(&mut self, from: usize, line: &str, within: Duration) -> (usize, Instant) {
        let deadline = Instant::now() + within;
        let matches = |l: &str| match line.strip_suffix('*') {
            Some(prefix) => l.starts_with(prefix),
            None => l == line,
        };
        loop {
            if let Some(i) = self.lines[from.min(self.lines.len())..]
                .iter()
                .position(|(_, l)| matches(l))
            {
                let i = i + from;
                return (i, self.lines[i].0);
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} on NOTIFY_SOCKET within {within:?}; got {:?}",
                self.texts()
            );
            self.receive_for(Duration::from_millis(50));
        }
    }

    fn wait_for(&mut self, line: &str) -> Instant {
        self.wait_for_after(0, line, NOTIFY_WAIT).1
    }

    fn texts(&self) -> Vec<&str> {
        self.lines.iter().map(|(_, l)| l.as_str()).collect()
    }

    fn count(&self, line: &str) -> usize {
        self.lines.iter().filter(|(_, l)| l == line).count()
    }
}

/// A listening Unix socket of the test's own at `dir/gw.sock`, as a socket unit would hold it.
fn test_listener(dir: &Path) -> (PathBuf, UnixListener) {
    let path = dir.join("gw.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (path, listener)
}

/// Polls the SIGUSR1 stats line until `cond` holds for it.
fn wait_stats(daemon: &Daemon, what: &str, cond: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let before = daemon.log_events("stats").len();
        daemon.signal(Signal::USR1);
        wait_until("a stats line after SIGUSR1", START_TIMEOUT, || {
            daemon.log_events("stats").len() > before
        });
        let last = daemon.log_events("stats").pop().unwrap_or_default();
        if cond(&last) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: last stats line {last}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Path NOTIFY_SOCKET: `READY=1` (with the health) arrives once the socket serves, so a
/// client connecting right after it is served without retrying; SIGTERM brings `STOPPING=1`
/// with the draining status; the exit is clean.
#[test]
fn ready_then_serves_and_stopping_on_sigterm() {
    let mut notify = Notify::at_path();
    let mut daemon = Daemon::spawn(&[notify.env()], &[]);
    notify.wait_for("READY=1");
    let mut stream = daemon.connect();
    ping(&mut stream);
    submit_echo(&mut stream, &json!({"n": 1}));
    assert_eq!(notify.texts()[..2], ["READY=1", "STATUS=HEALTHY"]);
    daemon.terminate();
    let (stopping, _) = notify.wait_for_after(0, "STOPPING=1", NOTIFY_WAIT);
    assert_eq!(notify.lines[stopping + 1].1, "STATUS=UNHEALTHY (draining)");
    daemon.expect_clean_exit();
    let stopping = notify.count("STOPPING=1");
    assert_eq!(stopping, 1, "{:?}", notify.texts());
}

/// Abstract-namespace NOTIFY_SOCKET (`@name`), as systemd uses for user managers: the same
/// READY and STOPPING.
#[test]
fn abstract_notify_socket() {
    let mut notify = Notify::abstract_name();
    let mut daemon = Daemon::spawn(&[notify.env()], &[]);
    notify.wait_for("READY=1");
    ping(&mut daemon.connect());
    daemon.terminate();
    notify.wait_for("STOPPING=1");
    daemon.expect_clean_exit();
}

/// WATCHDOG_USEC=400000: `WATCHDOG=1` every 200 ms from the event loop, idle or busy (a
/// client pings throughout, so a ping per loop turn would show as far too many). Over 2 s,
/// 10 are due; the range allows for a loaded machine without allowing either failure.
#[test]
fn watchdog_at_half_the_interval() {
    let mut notify = Notify::at_path();
    let daemon = Daemon::spawn(&[notify.env(), ("WATCHDOG_USEC", "400000")], &[]);
    let ready = notify.wait_for("READY=1");
    let mut stream = daemon.connect();
    let window = Duration::from_secs(2);
    while ready.elapsed() < window {
        ping(&mut stream);
        notify.receive_for(Duration::ZERO);
    }
    let in_window = notify
        .lines
        .iter()
        .filter(|(t, l)| l == "WATCHDOG=1" && t.duration_since(ready) <= window)
        .count();
    assert!(
        (5..=14).contains(&in_window),
        "{in_window} WATCHDOG=1 in {window:?} at a 200 ms interval: {:?}",
        notify.texts()
    );
}

/// WATCHDOG_PID naming another process: the watchdog is that process's, this one sends none
/// (while READY=1 and the rest still come).
#[test]
fn watchdog_pid_of_another_process_means_no_watchdog() {
    let mut notify = Notify::at_path();
    let _daemon = Daemon::spawn(
        &[
            notify.env(),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
        &[],
    );
    notify.wait_for("READY=1");
    // Ten intervals of 50 ms: any watchdog would have spoken.
    notify.receive_for(Duration::from_millis(500));
    assert_eq!(notify.count("WATCHDOG=1"), 0, "{:?}", notify.texts());
}

/// STATUS= follows the health: DEGRADED when 4 of 5 in-flight slots are taken, HEALTHY when
/// they are answered, and nothing when nothing changes.
#[test]
fn status_follows_health_changes() {
    let mut notify = Notify::at_path();
    let daemon = Daemon::spawn(
        &[
            notify.env(),
            ("CGW_IPC_STUB_DELAY_MS", "300"),
            ("CGW_IPC_MAX_INFLIGHT", "5"),
            ("CGW_IPC_MAX_INFLIGHT_PER_CONN", "5"),
        ],
        &[],
    );
    notify.wait_for("READY=1");
    let mut stream = daemon.connect();
    for n in 0..4 {
        send_json(&mut stream, TASK_SUBMIT, &json!({"n": n}));
    }
    let (degraded, _) = notify.wait_for_after(0, "STATUS=DEGRADED (in-flight 4 of 5)", NOTIFY_WAIT);
    for n in 0..4 {
        expect_echo(&recv(&mut stream), &json!({"n": n}));
    }
    notify.wait_for_after(degraded, "STATUS=HEALTHY", NOTIFY_WAIT);
    let statuses: Vec<&str> = notify
        .texts()
        .into_iter()
        .filter(|l| l.starts_with("STATUS="))
        .collect();
    assert_eq!(
        statuses,
        [
            "STATUS=HEALTHY",
            "STATUS=DEGRADED (in-flight 4 of 5)",
            "STATUS=HEALTHY"
        ]
    );
}

/// With NATS enabled and a server that never says hello (a listener the test holds and never
/// serves), READY=1 still comes at once with DEGRADED (nats connecting): the daemon serves
/// while NATS is down. After the grace period the status turns UNHEALTHY.
#[test]
fn ready_does_not_wait_for_nats() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let mut notify = Notify::at_path();
    let daemon = Daemon::spawn(
        &[
            notify.env(),
            ("CGW_IPC_NATS_ENABLE", "1"),
            ("CGW_IPC_NATS_URL", &url),
            ("CGW_HEALTH_GRACE_MS", "300"),
        ],
        &[],
    );
    let (ready, _) = notify.wait_for_after(0, "READY=1", NOTIFY_WAIT);
    assert_eq!(
        notify.lines[ready + 1].1,
        "STATUS=DEGRADED (nats connecting)"
    );
    ping(&mut daemon.connect());
    // The duration is as of the turn that noticed ("0.3 s", or more on a loaded machine).
    notify.wait_for_after(ready, "STATUS=UNHEALTHY (nats down for *", NOTIFY_WAIT);
}

/// Socket activation with one unnamed descriptor: the daemon serves the test's listener
/// instead of binding, says where in `listener_inherited`, and on exit leaves the socket file
/// (and the test's listener) alone.
#[test]
fn inherited_listener_serves_and_its_file_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (path, listener) = test_listener(dir.path());
    let mut notify = Notify::at_path();
    let mut daemon = Daemon::spawn_activated(&path, &[listener.as_fd()], &[notify.env()], &[]);
    notify.wait_for("READY=1");
    let mut stream = daemon.connect();
    ping(&mut stream);
    submit_echo(&mut stream, &json!({"inherited": true}));
    let inherited = daemon.log_events("listener_inherited");
    assert_eq!(inherited.len(), 1, "{}", daemon.stderr());
    assert_eq!(inherited[0]["fd"], json!(3));
    assert_eq!(inherited[0]["address"], json!(path.to_str().unwrap()));
    drop(stream);
    daemon.terminate();
    let status = daemon.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert!(path.exists(), "the socket unit's file was removed");
    // Still the test's listener: a connect queues in its backlog.
    UnixStream::connect(&path).expect("the test's listener still listens");
}

/// Socket activation with `ipc` and `http`: the inherited TCP listener serves `/live`, and
/// CGW_HTTP_ADDR is not bound (it names the test's own, busy, listener: binding it would stop
/// the start with exit code 2).
#[test]
fn inherited_http_listener_serves_live() {
    let dir = tempfile::tempdir().unwrap();
    let (path, unix) = test_listener(dir.path());
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = tcp.local_addr().unwrap();
    let busy = http_addr.to_string();
    let mut notify = Notify::at_path();
    let mut daemon = Daemon::spawn_activated(
        &path,
        &[unix.as_fd(), tcp.as_fd()],
        &[
            notify.env(),
            ("LISTEN_FDNAMES", "ipc:http"),
            ("CGW_HTTP_ADDR", &busy),
        ],
        &[],
    );
    notify.wait_for("READY=1");
    assert_eq!(daemon.http_addr(), http_addr);
    assert_eq!(daemon.log_events("http_inherited").len(), 1);
    let response = http_client::get(http_addr, "/live", None, IO_TIMEOUT);
    assert!(
        response.as_ref().is_ok_and(|r| r.status == 200),
        "GET /live on the inherited listener: {response:?}"
    );
    ping(&mut daemon.connect());
    daemon.terminate();
    let status = daemon.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    std::net::TcpStream::connect(http_addr).expect("the test's TCP listener still listens");
}

/// LISTEN_PID of another process: the descriptors are not ours, so they are left alone (and
/// this is logged) and the daemon binds CGW_IPC_SOCKET_PATH as usual.
#[test]
fn listen_pid_of_another_process_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (_, listener) = test_listener(dir.path());
    let own = dir.path().join("own.sock");
    let mut daemon =
        Daemon::spawn_activated(&own, &[listener.as_fd()], &[("LISTEN_PID", "1")], &[]);
    daemon.wait_ready();
    ping(&mut daemon.connect());
    let ignored = daemon.log_events("listen_fds_ignored");
    assert_eq!(ignored.len(), 1, "{}", daemon.stderr());
    assert!(daemon.log_events("listener_inherited").is_empty());
    daemon.terminate();
    daemon.expect_clean_exit();
}

/// Variables that do not match the descriptors stop the start with exit code 2 and a message
/// naming the variable and what is wrong, one case at a time.
#[test]
fn mismatched_listen_variables_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (_, unix) = test_listener(dir.path());
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let dgram = UnixDatagram::unbound().unwrap();
    let (connected, _peer) = UnixStream::pair().unwrap();
    let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let audit = dir.path().join("audit.jsonl");
    let audit = audit.to_str().unwrap();
    // (what, descriptors passed, variables, what stderr must say)
    type Case<'a> = (
        &'a str,
        Vec<BorrowedFd<'a>>,
        Vec<(&'a str, &'a str)>,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "count not a number",
            vec![unix.as_fd()],
            vec![("LISTEN_FDS", "one")],
            r#"LISTEN_FDS="one" is not a number"#,
        ),
        (
            "more descriptors than names",
            vec![unix.as_fd(), tcp.as_fd()],
            vec![("LISTEN_FDNAMES", "ipc")],
            r#"LISTEN_FDS=2 but LISTEN_FDNAMES="ipc" has 1 names"#,
        ),
        (
            "unknown name",
            vec![unix.as_fd()],
            vec![("LISTEN_FDNAMES", "gateway.socket")],
            r#"unknown name "gateway.socket" for fd 3"#,
        ),
        (
            "a name twice",
            vec![unix.as_fd(), unix.as_fd()],
            vec![("LISTEN_FDNAMES", "ipc:ipc")],
            r#"names "ipc" twice"#,
        ),
        (
            "a datagram socket as ipc",
            vec![dgram.as_fd()],
            vec![],
            "fd 3 (ipc) is a socket of family AF_UNIX and type SOCK_DGRAM",
        ),
        (
            "a TCP listener as ipc",
            vec![tcp.as_fd()],
            vec![("LISTEN_FDNAMES", "ipc")],
            "fd 3 (ipc) is a socket of family AF_INET and type SOCK_STREAM",
        ),
        (
            "a Unix listener as http",
            vec![unix.as_fd(), unix.as_fd()],
            vec![("LISTEN_FDNAMES", "ipc:http")],
            "fd 4 (http) is a socket of family AF_UNIX",
        ),
        (
            "a connected socket",
            vec![connected.as_fd()],
            vec![],
            "fd 3 (ipc) is not listening",
        ),
        (
            "not a socket",
            vec![file.as_fd()],
            vec![],
            "fd 3 (ipc) is not a socket",
        ),
        (
            // With an audit log, whose file the daemon opens at start: the lowest free number
            // is 4, and it must not be taken for the missing descriptor.
            "a descriptor that is not there",
            vec![unix.as_fd()],
            vec![
                ("LISTEN_FDS", "2"),
                ("LISTEN_FDNAMES", "ipc:http"),
                ("CGW_AUDIT_LOG", audit),
            ],
            "fd 4 (http) is not an open file descriptor",
        ),
    ];
    let socket = dir.path().join("unused.sock");
    for (what, fds, env, expected) in cases {
        let mut daemon = Daemon::spawn_activated(&socket, &fds, &env, &[]);
        let status = daemon.wait_exit(START_TIMEOUT);
        let stderr = daemon.stderr();
        assert_eq!(status.code(), Some(2), "{what}: {status}\n{stderr}");
        assert!(
            stderr.contains("ipc-gateway: invalid socket activation: ")
                && stderr.contains(expected),
            "{what}: stderr does not say {expected:?}:\n{stderr}"
        );
        assert!(!socket.exists(), "{what}: bound its own socket anyway");
    }
}

/// One client of the restart test: connect, PING, PONG.
struct Client {
    /// When its connect began.
    started: Instant,
    /// The connect's and then the PING/PONG's outcome.
    outcome: Result<(), String>,
}

/// Connects a client every 2 ms until `stop`, each sending a PING at once (so a client an old
/// daemon accepted has its request in before that daemon's drain ends); a second thread reads
/// the PONGs (so a client queued in the backlog does not hold up the next connect). Returns
/// the handle of the reader, which yields every client once both are done.
fn connect_continuously(
    path: PathBuf,
    stop: Arc<AtomicBool>,
    started: Arc<Mutex<Vec<Instant>>>,
) -> thread::JoinHandle<Vec<Client>> {
    let (tx, rx) = mpsc::channel::<(Instant, Result<UnixStream, String>)>();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let begun = Instant::now();
            let stream = UnixStream::connect(&path)
                .map_err(|e| format!("connect: {e}"))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                    write_frame(&mut s, PING, &[]).map_err(|e| format!("writing a PING: {e}"))?;
                    Ok(s)
                });
            started.lock().unwrap().push(begun);
            if tx.send((begun, stream)).is_err() {
                return;
            }
            // A pace, not a synchronisation: a few hundred clients over the test.
            thread::sleep(Duration::from_millis(2));
        }
    });
    thread::spawn(move || {
        rx.into_iter()
            .map(|(started, stream)| Client {
                started,
                outcome: stream.and_then(|mut s| check_pong(&mut s)),
            })
            .collect()
    })
}

/// Zero-downtime restart on a listener systemd would hold (the test holds its copy): while
/// clients connect every 2 ms, the old daemon gets SIGTERM with 5 requests in flight (stub
/// Router slowed to 500 ms) and a new daemon starts on the same descriptor at once. Every
/// client connects (nothing refused) and gets its PONG (nothing reset), those that connected
/// after the old daemon stopped accepting are served by the new one, and the 5 requests get
/// their normal replies from the old one, which exits 0. Neither removes the socket file.
#[test]
fn restart_on_an_inherited_listener_drops_no_client() {
    let dir = tempfile::tempdir().unwrap();
    let (path, listener) = test_listener(dir.path());
    let common = [
        ("CGW_IPC_STUB_DELAY_MS", "500"),
        // The backlog of the gap is accepted at once by the new daemon.
        ("CGW_IPC_MAX_CONNECTIONS", "4096"),
        ("LISTEN_FDNAMES", "ipc"),
    ];
    let spawn = |notify: &Notify| {
        let mut env = common.to_vec();
        env.push(notify.env());
        Daemon::spawn_activated(&path, &[listener.as_fd()], &env, &[])
    };
    let mut old_notify = Notify::at_path();
    let mut old = spawn(&old_notify);
    old_notify.wait_for("READY=1");

    let mut in_flight: Vec<UnixStream> = (0..5)
        .map(|n| {
            let mut stream = connect(&path);
            send_json(&mut stream, TASK_SUBMIT, &json!({"in_flight": n}));
            stream
        })
        .collect();
    wait_stats(&old, "5 requests in flight in the old daemon", |s| {
        s["inflight"] == json!(5)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Mutex::new(Vec::new()));
    let clients = connect_continuously(path.clone(), Arc::clone(&stop), Arc::clone(&started));
    wait_until("clients served by the old daemon", START_TIMEOUT, || {
        started.lock().unwrap().len() >= 10
    });

    old.terminate();
    let stopped_accepting = old_notify.wait_for("STOPPING=1");
    // At least one client is sure to connect while no process accepts: the new daemon is
    // started only after one began connecting.
    wait_until(
        "a client connecting after STOPPING=1",
        START_TIMEOUT,
        || {
            started
                .lock()
                .unwrap()
                .last()
                .is_some_and(|&t| t > stopped_accepting)
        },
    );
    let mut new_notify = Notify::at_path();
    let new_spawned = Instant::now();
    let mut new = spawn(&new_notify);
    let new_ready = new_notify.wait_for("READY=1");
    wait_until("clients served by the new daemon", START_TIMEOUT, || {
        started
            .lock()
            .unwrap()
            .iter()
            .filter(|&&t| t > new_ready)
            .count()
            >= 20
    });
    stop.store(true, Ordering::Relaxed);
    let clients = clients.join().expect("the client threads");

    let failed: Vec<&String> = clients
        .iter()
        .filter_map(|c| c.outcome.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} clients failed: {failed:?}",
        failed.len(),
        clients.len()
    );
    for (n, stream) in in_flight.iter_mut().enumerate() {
        expect_echo(&recv(stream), &json!({"in_flight": n}));
    }
    let status = old.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(0), "old daemon: {}", old.stderr());
    new.terminate();
    let status = new.wait_exit(START_TIMEOUT);
    assert_eq!(status.code(), Some(0), "new daemon: {}", new.stderr());
    assert!(path.exists(), "the socket file was removed");
    UnixStream::connect(&path).expect("the test's listener still listens");

    // Both have exited, so their logs are complete. The gap: connects begun after the old daemon stopped accepting and before the new one
    // was started. Only the new daemon can have accepted them.
    let gap = clients
        .iter()
        .filter(|c| c.started > stopped_accepting && c.started < new_spawned)
        .count();
    let new_opened = new.log_events("connection_opened").len();
    let old_opened = old.log_events("connection_opened").len();
    eprintln!(
        "{} clients, {gap} in the gap; connections opened: old {old_opened}, new {new_opened}",
        clients.len()
    );
    assert!(gap >= 1, "no client connected in the gap");
    assert!(
        new_opened >= gap,
        "the new daemon opened {new_opened} connections, {gap} clients connected in the gap"
    );
    assert_eq!(
        old_opened + new_opened,
        clients.len() + in_flight.len(),
        "every connection was accepted by exactly one of the daemons"
    );
}
