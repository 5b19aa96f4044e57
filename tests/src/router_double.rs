//! Running the `router-double` binary (src/bin/router-double.rs, router.md section 5) for
//! black-box tests.
//!
//! [`RouterDouble::start`] spawns it against a NATS server and returns once it has subscribed
//! (it prints `ready`). Everything it prints afterwards is one JSON object per line: a
//! `"event":"request"` line per request it received (with `subject`, `reply`, `reply_prefix`,
//! `headers`, `request` (parsed), `body` (exact text), `outcome`), a `"event":"replied"` line
//! per reply it sent (`body` is the exact reply text), and
//! `"disconnected"` / `"reconnected"` lines; [`RouterDouble::requests`] and
//! [`RouterDouble::replies`] return them. Dropping it (or [`RouterDouble::kill`]) kills the
//! process; when a test panics, the drop prints its output.
//!
//! ```no_run
//! use ipc_gateway_tests::nats_server::NatsServer;
//! use ipc_gateway_tests::router_double::RouterDouble;
//! let server = NatsServer::start();
//! let double = RouterDouble::start(&server.url());
//! // ... drive the gateway; the client payload {"double":"slow_ms"...} picks the behaviour
//! assert_eq!(double.request_count(), 0);
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;

use crate::secure_nats::ClientCreds;

/// The decide subject (router.md section 1).
pub const DEFAULT_SUBJECT: &str = "beamline.router.v1.decide";
/// Longest the double may take to connect and subscribe.
pub const DOUBLE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The double's binary: `ROUTER_DOUBLE_BIN` if set, otherwise built once per test process
/// (`cargo build -p ipc-gateway-tests --bin router-double`, a no-op under `cargo test`, which
/// has built it already).
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        crate::daemon::workspace_binary("ROUTER_DOUBLE_BIN", "ipc-gateway-tests", "router-double")
    })
}

/// A running `router-double` process. Dropping it kills the process.
pub struct RouterDouble {
    child: Option<Child>,
    pid: u32,
    /// Held open: the double exits when its stdin closes (`--exit-on-stdin-eof`), so it
    /// cannot outlive the test process even if this value is leaked.
    _stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    pipe_readers: Vec<JoinHandle<()>>,
}

impl RouterDouble {
    /// Starts the double on [`DEFAULT_SUBJECT`] of the server(s) at `url` and waits until it
    /// has subscribed.
    pub fn start(url: &str) -> RouterDouble {
        RouterDouble::start_with(url, DEFAULT_SUBJECT)
    }

    /// Starts the double on `subject` of the server(s) at `url` (comma-separated URLs are
    /// accepted) and waits until it has subscribed.
    pub fn start_with(url: &str, subject: &str) -> RouterDouble {
        RouterDouble::try_start(url, subject, false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the double, `--quiet` if `quiet` (no line per request or reply: for long runs,
    /// where [`RouterDouble::requests`] and [`RouterDouble::replies`] stay empty), and waits
    /// until it has subscribed; `Err` says why it could not.
    pub fn try_start(url: &str, subject: &str, quiet: bool) -> Result<RouterDouble, String> {
        RouterDouble::try_start_secured(url, subject, quiet, &ClientCreds::default())
    }

    /// Starts the double on [`DEFAULT_SUBJECT`] of a secured server (TLS, credentials:
    /// gateway.md section 9) with `creds` and waits until it has subscribed.
    pub fn start_secured(url: &str, creds: &ClientCreds) -> RouterDouble {
        RouterDouble::try_start_secured(url, DEFAULT_SUBJECT, false, creds)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RouterDouble::try_start`] with credentials and TLS settings.
    pub fn try_start_secured(
        url: &str,
        subject: &str,
        quiet: bool,
        creds: &ClientCreds,
    ) -> Result<RouterDouble, String> {
        let mut command = Command::new(binary());
        command.args(["--url", url, "--subject", subject, "--exit-on-stdin-eof"]);
        command.args(creds.to_args());
        if quiet {
            command.arg("--quiet");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", binary().display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout_reader = {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                let mut ready = Some(ready_tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line == "ready" {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    lock(&lines).push(line);
                }
            })
        };
        let stderr_reader = crate::daemon::append_to(stderr_pipe, Arc::clone(&stderr));
        let pid = child.id();
        let mut double = RouterDouble {
            child: Some(child),
            pid,
            _stdin: stdin,
            lines,
            stderr,
            pipe_readers: vec![stdout_reader, stderr_reader],
        };
        match ready_rx.recv_timeout(DOUBLE_START_TIMEOUT) {
            Ok(()) => Ok(double),
            Err(_) => {
                double.kill();
                Err(format!(
                    "router-double not ready on {url} ({subject}) after {DOUBLE_START_TIMEOUT:?}; stderr:\n{}",
                    double.stderr()
                ))
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the process (SIGKILL) and waits for it: from then on nobody answers on its
    /// subject (once the server has noticed the connection is gone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self._stdin = None;
        for reader in self.pipe_readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Every JSON line printed so far (requests, replies, connection events), in order.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.lines)
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `"event":"request"` lines so far: one per request received, in arrival order.
    pub fn requests(&self) -> Vec<Value> {
        self.events_named("request")
    }

    /// The `"event":"replied"` lines so far: one per reply published.
    pub fn replies(&self) -> Vec<Value> {
        self.events_named("replied")
    }

    /// How many requests the double has received so far.
    pub fn request_count(&self) -> usize {
        self.requests().len()
    }

    /// Waits until the double has received at least `n` requests; returns them all. Panics
    /// after `within`.
    pub fn wait_requests(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_events("request", n, within)
    }

    /// Waits until the double has published at least `n` replies; returns them all. Panics
    /// after `within`.
    pub fn wait_replies(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_events("replied", n, within)
    }

    /// Everything the double wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    fn events_named(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    fn wait_events(&self, name: &str, n: usize, within: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        let what = format!("router-double: {n} {name} events");
        crate::daemon::wait_until(&what, within, || {
            got = self.events_named(name);
            got.len() >= n
        });
        got
    }
}

impl Drop for RouterDouble {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let lines = lock(&self.lines);
            let tail = &lines[lines.len().saturating_sub(50)..];
            eprintln!(
                "--- router-double (pid {}) stdout (last {} lines): ---\n{}\n--- stderr: ---\n{}",
                self.pid,
                tail.len(),
                tail.join("\n"),
                self.stderr()
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
