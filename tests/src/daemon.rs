//! Starting the real `ipc-gateway` binary for black-box tests, and the client-side checks the
//! test files share.
//!
//! Every test gets its own daemon listening on a socket in its own temporary directory, so the
//! tests of one file run in parallel threads without seeing each other. Every blocking read and
//! write on a client socket has a timeout ([`IO_TIMEOUT`]): a broken daemon fails a test instead
//! of hanging it. When a test panics while a [`Daemon`] is alive, dropping it prints the
//! daemon's stderr (its JSON log lines) under the test's output.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::frame::{self, Frame, PING, RESPONSE_ERROR, RESPONSE_OK, VERSION_1};

/// Longest any single blocking read or write on a client socket may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest the daemon may take to become ready, or to exit when it is expected to.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The exact bytes of a PONG (ipc-protocol.md section 8).
pub const PONG_BYTES: [u8; 6] = [0x00, 0x00, 0x00, 0x06, 0x01, 0xF1];

/// The variables through which a service manager talks to the daemon (gateway.md section 10).
/// Never inherited from the test's own environment: a test run inside a systemd service would
/// otherwise have every daemon notify that service's manager or take its descriptors.
const SYSTEMD_VARIABLES: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// How a spawned daemon's stdin and stdout are set up.
enum Stdio01 {
    /// stdin from /dev/null, stdout collected.
    Usual,
    /// Descriptors to be moved to 3 (and 4) by the shell of [`Daemon::spawn_activated`]:
    /// the first is the child's stdin, the second its stdout.
    Passed(Vec<OwnedFd>),
}

/// The daemon binary: `IPC_GATEWAY_BIN` if set, otherwise built once per test process.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("IPC_GATEWAY_BIN", "ipc-gateway", "ipc-gateway"))
}

/// A binary of this workspace: the path in `override_var` if set, otherwise
/// `cargo build -p <package> --bin <bin>` (a no-op under `cargo test`, which built it already)
/// and its path in the target directory. The build uses the profile of the running executable
/// ([`own_profile`]): a tool run with `cargo run --release` gets release builds of the daemon
/// and the double, a test run gets debug builds as before.
pub fn workspace_binary(override_var: &str, package: &str, bin: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_var) {
        return PathBuf::from(path);
    }
    let profile = own_profile();
    let mut cargo = Command::new(env!("CARGO"));
    // `cargo test` runs this process with the package's CARGO_MANIFEST_DIR, CARGO_PKG_* etc.
    // set. Build scripts that watch them (ring's watches CARGO_MANIFEST_DIR, and the `nats`
    // crate pulls ring in) would see them change between the outer `cargo test` and this
    // build, and every test run would rebuild ring and everything above it twice.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || matches!(
                &*key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_BIN_NAME"
            )
        {
            cargo.env_remove(&*key);
        }
    }
    cargo.args(["build", "-p", package, "--bin", bin]);
    if profile == Profile::Release {
        cargo.arg("--release");
    }
    let out = cargo
        .current_dir(workspace_dir())
        .output()
        .expect("running cargo build");
    assert!(
        out.status.success(),
        "cargo build -p {package} --bin {bin} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir().join(profile.dir()).join(bin)
}

/// The cargo profile a binary is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// Its directory under the target directory.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// The profile the running executable was built with, read from where it lives
/// (`target/release/…` or `target/release/deps/…` is release; anything else is debug).
pub fn own_profile() -> Profile {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent();
    let dir = match dir {
        Some(d) if d.file_name().is_some_and(|n| n == "deps") => d.parent(),
        other => other,
    };
    if dir
        .and_then(Path::file_name)
        .is_some_and(|n| n == "release")
    {
        Profile::Release
    } else {
        Profile::Debug
    }
}

/// The workspace (the parent of tests/).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target directory: `CARGO_TARGET_DIR` (relative to the workspace, where cargo
/// runs) if set, otherwise `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    // Joining an absolute CARGO_TARGET_DIR replaces the base.
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace_dir().join(dir))
        .unwrap_or_else(|| workspace_dir().join("target"))
}

/// A running (or finished) `ipc-gateway` process. Dropping it kills the process.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    pipe_readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
    // Kept only so the directory outlives the process.
    _dir: Option<TempDir>,
}

impl Daemon {
    /// Starts a daemon on a socket in a fresh temporary directory and waits until it is ready.
    pub fn start(env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::spawn(env, &[]);
        daemon.wait_ready();
        daemon
    }

    /// Starts a daemon on a socket in a fresh temporary directory without waiting for it.
    pub fn spawn(env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let socket = dir.path().join("gw.sock");
        let mut daemon = Daemon::spawn_at(&socket, env, args);
        daemon._dir = Some(dir);
        daemon
    }

    /// Starts a daemon on `socket` (the caller owns its directory) without waiting for it.
    ///
    /// Every inherited `CGW_*` variable (and `RUST_LOG`) is removed so the developer's shell
    /// cannot leak in; `CGW_IPC_SOCKET_PATH` is `socket` and `CGW_HTTP_ADDR` is `off` (parallel
    /// daemons would fight over the default port) unless `env` says otherwise.
    pub fn spawn_at(socket: &Path, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Daemon::spawn_command(Command::new(binary()), socket, env, args, Stdio01::Usual)
    }

    /// Starts a daemon the way systemd's socket activation does, without waiting for it:
    /// `fds` (at most two) become its descriptors 3 and 4, `LISTEN_FDS` is their number and
    /// `LISTEN_PID` the daemon's pid, unless `env` sets them (so a test can get them wrong).
    /// `socket` is where the test's listener is bound ([`Daemon::connect`] goes there).
    ///
    /// [`Daemon::wait_ready`] proves nothing here (a connect succeeds on the test's listener
    /// before the daemon runs): wait for `READY=1` or a reply instead. With two descriptors
    /// the daemon's stdout is /dev/null, since it carried the second one.
    ///
    /// The descriptors travel as the child's stdin and stdout, which the standard library
    /// places after the fork (race-free, whatever other threads spawn meanwhile), and a shell
    /// moves them to 3 and 4, sets `LISTEN_PID=$$` and `exec`s the daemon under that same pid.
    pub fn spawn_activated(
        socket: &Path,
        fds: &[BorrowedFd<'_>],
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        assert!(
            fds.len() <= 2,
            "stdin and stdout carry at most two descriptors"
        );
        let passed: Vec<OwnedFd> = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned().expect("dup of a passed descriptor"))
            .collect();
        let moves = match passed.len() {
            0 => "",
            1 => "exec 3<&0 0</dev/null; ",
            _ => "exec 3<&0 4<&1 0</dev/null 1>/dev/null; ",
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                r#"{moves}: "${{LISTEN_PID:=$$}}"; export LISTEN_PID; exec "$0" "$@""#
            ))
            .arg(binary());
        if !env.iter().any(|(k, _)| *k == "LISTEN_FDS") {
            cmd.env("LISTEN_FDS", fds.len().to_string());
        }
        Daemon::spawn_command(cmd, socket, env, args, Stdio01::Passed(passed))
    }

    /// Starts a daemon whose open-file limit, soft and hard, is `nofile` (through the shell's
    /// `ulimit -n`, which needs no privilege) and waits until it is ready.
    pub fn start_with_fd_limit(nofile: u64, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_under_ulimit("-n", nofile, env)
    }

    /// Starts a daemon whose soft open-file limit is `nofile`, its hard limit left as this
    /// process has it (`ulimit -S -n`), and waits until it is ready.
    pub fn start_with_soft_fd_limit(nofile: u64, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_under_ulimit("-Sn", nofile, env)
    }

    fn start_under_ulimit(option: &str, nofile: u64, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let socket = dir.path().join("gw.sock");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"ulimit "$1" "$2" && exec "$0""#)
            .arg(binary())
            .arg(option)
            .arg(nofile.to_string());
        let mut daemon = Daemon::spawn_command(cmd, &socket, env, &[], Stdio01::Usual);
        daemon._dir = Some(dir);
        daemon.wait_ready();
        daemon
    }

    fn spawn_command(
        mut cmd: Command,
        socket: &Path,
        env: &[(&str, &str)],
        args: &[&str],
        stdio: Stdio01,
    ) -> Daemon {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CGW_")
                || key == "RUST_LOG"
                || SYSTEMD_VARIABLES.iter().any(|v| key == *v)
            {
                cmd.env_remove(key);
            }
        }
        cmd.env("CGW_IPC_SOCKET_PATH", socket)
            .env("CGW_HTTP_ADDR", "off")
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Stdio01::Passed(passed) = stdio {
            let mut passed = passed.into_iter();
            if let Some(first) = passed.next() {
                cmd.stdin(Stdio::from(first));
            }
            if let Some(second) = passed.next() {
                cmd.stdout(Stdio::from(second));
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binary().display()));
        // Our copies of passed descriptors went with `cmd` (dropped here): only the child and
        // the test's own listener hold them now.
        drop(cmd);
        let (stdout, stdout_reader) = match child.stdout.take() {
            Some(pipe) => collect_pipe(pipe),
            None => (Arc::default(), thread::spawn(|| {})),
        };
        let (stderr, stderr_reader) = collect_pipe(child.stderr.take().expect("piped stderr"));
        let socket = env
            .iter()
            .find(|(key, _)| *key == "CGW_IPC_SOCKET_PATH")
            .map_or_else(|| socket.to_path_buf(), |(_, path)| PathBuf::from(path));
        Daemon {
            child,
            socket,
            stdout,
            stderr,
            pipe_readers: vec![stdout_reader, stderr_reader],
            status: None,
            _dir: None,
        }
    }

    /// Waits until a connect to the socket succeeds; panics if the process exits first or
    /// is not ready within [`START_TIMEOUT`].
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.poll_exit() {
                panic!("ipc-gateway exited ({status}) before it became ready");
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipc-gateway not ready on {} after {START_TIMEOUT:?}",
                self.socket.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The socket path the daemon was told to use.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new client connection with read and write timeouts of [`IO_TIMEOUT`].
    pub fn connect(&self) -> UnixStream {
        connect(&self.socket)
    }

    pub fn signal(&self, signal: Signal) {
        self.try_signal(signal).unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Daemon::signal`] without the panic.
    pub fn try_signal(&self, signal: Signal) -> Result<(), String> {
        kill_process(Pid::from_child(&self.child), signal)
            .map_err(|e| format!("kill({}, {signal:?}): {e}", self.pid()))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// The exit status if the process has exited (then its output is complete).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                self.status = Some(status);
                for reader in self.pipe_readers.drain(..) {
                    let _ = reader.join();
                }
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Waits for the process to exit; panics if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.poll_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ipc-gateway (pid {}) still running after {within:?}",
                self.pid()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit after a SIGTERM or SIGINT and checks what gateway.md section 8
    /// promises: exit status 0 and the socket file gone.
    pub fn expect_clean_exit(&mut self) {
        let status = self.wait_exit(START_TIMEOUT);
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after the signal: {status}"
        );
        assert!(
            !self.socket.exists(),
            "socket file {} still there after exit",
            self.socket.display()
        );
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    /// The daemon's JSON log lines so far whose `event` is `name`.
    pub fn log_events(&self, name: &str) -> Vec<Value> {
        self.stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == name)
            .collect()
    }

    /// Everything the daemon wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stdout)).into_owned()
    }

    /// The address of the HTTP endpoints, from the `http_listening` log line (start the daemon
    /// with `CGW_HTTP_ADDR` set, e.g. `127.0.0.1:0`: spawned daemons have HTTP off otherwise);
    /// waits for the line up to [`START_TIMEOUT`], panics if none comes or the daemon exits.
    pub fn http_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let found = self.stderr().lines().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                if v["event"] != "http_listening" {
                    return None;
                }
                v["addr"].as_str()?.parse().ok()
            });
            if let Some(addr) = found {
                return addr;
            }
            if let Some(status) = self.poll_exit() {
                panic!("ipc-gateway exited ({status}) without logging http_listening");
            }
            assert!(
                Instant::now() < deadline,
                "no http_listening log line after {START_TIMEOUT:?} (is CGW_HTTP_ADDR set?)"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stderr contains `needle`; panics after `within`.
    pub fn wait_stderr_contains(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "ipc-gateway stderr does not mention {needle:?} after {within:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let stderr = self.stderr();
            // The tail is where the failure is; a pipelining test logs thousands of lines.
            let tail_from = stderr
                .char_indices()
                .rev()
                .nth(20_000)
                .map_or(0, |(i, _)| i);
            eprintln!(
                "--- ipc-gateway (pid {}) exit {:?}; stderr{}: ---\n{}\n--- stdout: ---\n{}",
                self.pid(),
                self.status,
                if tail_from > 0 { " (tail)" } else { "" },
                &stderr[tail_from..],
                self.stdout()
            );
        }
    }
}

/// What a daemon that ran to completion left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the daemon (socket in a fresh temporary directory unless `env` sets one) and waits
/// for it to exit by itself; panics if it is still running after [`START_TIMEOUT`].
pub fn run(env: &[(&str, &str)], args: &[&str]) -> Finished {
    let mut daemon = Daemon::spawn(env, args);
    let status = daemon.wait_exit(START_TIMEOUT);
    Finished {
        status,
        stdout: daemon.stdout(),
        stderr: daemon.stderr(),
    }
}

fn lock(buf: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    buf.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies a pipe into a shared buffer on a thread until end of stream.
fn collect_pipe(pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let handle = append_to(pipe, Arc::clone(&buf));
    (buf, handle)
}

/// A thread that appends everything `pipe` yields to `sink` until EOF, so a child process
/// never blocks on a full pipe and its output can be read at any time.
pub fn append_to(
    mut pipe: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => lock(&sink).extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// A client connection to `path` with read and write timeouts of [`IO_TIMEOUT`].
pub fn connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Writes one version-1 frame; panics on failure.
pub fn send(stream: &mut UnixStream, kind: u8, payload: &[u8]) {
    frame::write_frame(stream, kind, payload)
        .unwrap_or_else(|e| panic!("writing a frame of type {kind:#04X}: {e}"));
}

/// Writes one version-1 frame whose payload is `value` as JSON text; panics on failure.
pub fn send_json(stream: &mut UnixStream, kind: u8, value: &Value) {
    send(stream, kind, value.to_string().as_bytes());
}

/// Writes raw bytes; panics on failure.
pub fn send_raw(stream: &mut UnixStream, bytes: &[u8]) {
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("writing {} raw bytes: {e}", bytes.len()));
}

/// Writes `bytes` one at a time with a short pause after each. With `may_close`, a write
/// failing because the gateway closed the connection ends the writing quietly (the gateway
/// may answer and close as soon as it has seen enough); the number of bytes written is
/// returned.
pub fn send_bytewise(stream: &mut UnixStream, bytes: &[u8], may_close: bool) -> usize {
    for (i, byte) in bytes.iter().enumerate() {
        match stream.write_all(std::slice::from_ref(byte)) {
            Ok(()) => {}
            Err(e) if may_close && is_closed(&e) => return i,
            Err(e) => panic!("writing byte {i} of {}: {e}", bytes.len()),
        }
        thread::sleep(Duration::from_millis(1));
    }
    bytes.len()
}

/// Whether an I/O error means the peer closed the connection.
pub fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// Reads one frame; panics on end of stream, error or timeout.
pub fn recv(stream: &mut UnixStream) -> Frame {
    match frame::read_frame(stream) {
        Ok(Some(frame)) => frame,
        Ok(None) => panic!("connection closed where a frame was expected"),
        Err(e) => panic!("reading a frame (timeout {IO_TIMEOUT:?}): {e}"),
    }
}

/// Asserts that the next bytes are exactly a PONG (`00 00 00 06 01 F1`).
pub fn expect_pong(stream: &mut UnixStream) {
    check_pong(stream).unwrap_or_else(|e| panic!("{e}"));
}

/// [`expect_pong`] without the panic.
pub fn check_pong(stream: &mut UnixStream) -> Result<(), String> {
    let mut got = [0u8; 6];
    stream
        .read_exact(&mut got)
        .map_err(|e| format!("reading a PONG: {e}"))?;
    if got == PONG_BYTES {
        Ok(())
    } else {
        Err(format!("expected exactly the PONG bytes, got {got:02X?}"))
    }
}

/// PING, then assert the reply is exactly a PONG: the connection is open and in step.
pub fn ping(stream: &mut UnixStream) {
    send(stream, PING, &[]);
    expect_pong(stream);
}

/// [`ping`] without the panic.
pub fn check_ping(stream: &mut UnixStream) -> Result<(), String> {
    frame::write_frame(stream, PING, &[]).map_err(|e| format!("writing a PING: {e}"))?;
    check_pong(stream)
}

/// Asserts `frame` is a version-1 RESPONSE_ERROR whose payload is
/// `{"ok":false,"error":{"code":code,"message":"…","retryable":bool,…}}` with `code` a JSON
/// number; returns the `error` object.
pub fn expect_error(frame: &Frame, code: u64) -> Value {
    check_error(frame, code).unwrap_or_else(|e| panic!("{e}"))
}

/// [`expect_error`] without the panic: `Err` says what is wrong.
pub fn check_error(frame: &Frame, code: u64) -> Result<Value, String> {
    if (frame.version, frame.kind) != (VERSION_1, RESPONSE_ERROR) {
        return Err(format!(
            "expected an error frame (code {code}), got {frame:?} ({:?})",
            String::from_utf8_lossy(&frame.payload)
        ));
    }
    let body: Value = serde_json::from_slice(&frame.payload).map_err(|e| {
        format!(
            "error frame payload is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&frame.payload)
        )
    })?;
    let error = &body["error"];
    let problem = if body["ok"] != json!(false) {
        Some("ok must be false")
    } else if !error["code"].is_u64() {
        Some("error.code must be a JSON number")
    } else if error["code"] != json!(code) {
        Some("wrong error.code")
    } else if error["message"].as_str().is_none_or(str::is_empty) {
        Some("error.message must be a non-empty string")
    } else if !error["retryable"].is_boolean() {
        Some("error.retryable must be a boolean")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!("{problem} (expected code {code}): {body}")),
        None => Ok(error.clone()),
    }
}

/// Reads the next frame and asserts it is an error frame with `code`; returns `error`.
pub fn expect_error_code(stream: &mut UnixStream, code: u64) -> Value {
    expect_error(&recv(stream), code)
}

/// Asserts the gateway has closed the connection: a read returns end of stream or a reset,
/// not more bytes and not a timeout.
pub fn expect_closed(stream: &mut UnixStream) {
    check_closed(stream).unwrap_or_else(|e| panic!("{e}"));
}

/// [`expect_closed`] without the panic: `Err` says what came instead of the end of stream.
pub fn check_closed(stream: &mut UnixStream) -> Result<(), String> {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => Err(format!(
            "expected the connection to be closed, got {n} more bytes: {:02X?}",
            &buf[..n]
        )),
        Err(e) => Err(format!(
            "expected the connection to be closed within {:?}: {e}",
            stream.read_timeout().ok().flatten()
        )),
    }
}

/// The stub Router's reply for a request whose payload parses as `sent`
/// (gateway.md section 3).
pub fn stub_reply(sent: &Value) -> Value {
    json!({"message_id": "stub", "status": "ok", "result": {"echo": sent}})
}

/// Asserts `frame` is a version-1 RESPONSE_OK carrying exactly the stub reply for `sent`.
pub fn expect_echo(frame: &Frame, sent: &Value) {
    assert_eq!(
        (frame.version, frame.kind),
        (VERSION_1, RESPONSE_OK),
        "expected RESPONSE_OK echoing {}, got {frame:?} ({:?})",
        abbreviate(&sent.to_string()),
        abbreviate(&String::from_utf8_lossy(&frame.payload))
    );
    let got = frame.json();
    if got != stub_reply(sent) {
        panic!(
            "stub reply mismatch:\n  sent {}\n  got  {}",
            abbreviate(&sent.to_string()),
            abbreviate(&got.to_string())
        );
    }
}

/// Sends TASK_SUBMIT with `payload`, reads the reply and asserts it is the stub echo.
pub fn submit_echo(stream: &mut UnixStream, payload: &Value) {
    send_json(stream, frame::TASK_SUBMIT, payload);
    expect_echo(&recv(stream), payload);
}

/// A JSON object of exactly `len` bytes (`len >= 10`): `{"pad":"xx…x"}`.
pub fn object_of_len(len: usize) -> Vec<u8> {
    const FRAME: usize = r#"{"pad":""}"#.len();
    assert!(len >= FRAME, "no object of {len} bytes with a pad field");
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(br#"{"pad":""#);
    out.resize(len - 2, b'x');
    out.extend_from_slice(br#""}"#);
    assert_eq!(out.len(), len);
    out
}

/// Polls `cond` every 10 ms; panics with `what` if it is not true within `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not true after {within:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The process's current resident set size in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS:").unwrap_or_else(|e| panic!("{e}"))
}

/// [`rss_kb`] without the panic (the process may be gone).
pub fn try_rss_kb(pid: u32) -> Result<u64, String> {
    proc_status_kb(pid, "VmRSS:")
}

/// The process's peak resident set size so far in KiB (`VmHWM` in /proc/PID/status).
pub fn peak_rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmHWM:").unwrap_or_else(|e| panic!("{e}"))
}

/// A kB figure of /proc/PID/status (`field` with its colon, e.g. `"VmRSS:"`); `None` if the
/// process is gone or has no such line.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    proc_status_kb(pid, field).ok()
}

fn proc_status_kb(pid: u32, field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse().ok())
        .ok_or_else(|| format!("no {field} line in /proc/{pid}/status"))
}

fn abbreviate(text: &str) -> String {
    const MAX: usize = 300;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let cut = (0..=MAX)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_of_len_is_exact_and_parses() {
        for len in [10, 11, 8192, 4_194_298] {
            let bytes = object_of_len(len);
            assert_eq!(bytes.len(), len);
            assert!(serde_json::from_slice::<Value>(&bytes).unwrap().is_object());
        }
    }

    #[test]
    fn stub_reply_shape() {
        assert_eq!(
            stub_reply(&json!({"n": 1})).to_string(),
            r#"{"message_id":"stub","result":{"echo":{"n":1}},"status":"ok"}"#
        );
    }
}
