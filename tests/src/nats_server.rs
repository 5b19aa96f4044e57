//! Real `nats-server` processes for the NATS tests: one server, or a cluster.
//!
//! Each server listens on loopback only, on a port picked free at start; it keeps that port
//! across [`NatsServer::kill`] and [`NatsServer::restart`], so a client configured with its
//! [`NatsServer::url`] reconnects to the same address. The binary is `nats-server` on `PATH`
//! (Debian's package; `tests/run-all.sh` installs it), or `NATS_SERVER_BIN`. Dropping a
//! server or cluster kills its processes; when a test panics, the drop prints the server's
//! log (stderr) under the test output.
//!
//! ```no_run
//! use ipc_gateway_tests::nats_server::{NatsCluster, NatsServer};
//! let mut server = NatsServer::start();
//! let url = server.url(); // nats://127.0.0.1:PORT
//! server.kill(); // SIGKILL: clients see the connection drop, no goodbye
//! server.restart(); // same port, waits until it accepts clients
//!
//! let mut cluster = NatsCluster::start(3);
//! let all = cluster.urls(); // "nats://127.0.0.1:P1,nats://127.0.0.1:P2,..."
//! cluster.kill(0);
//! cluster.restart(0);
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use rustix::process::{kill_process, Pid, Signal};

use crate::daemon::append_to;
use std::time::{Duration, Instant};

/// Longest a server may take to accept clients (and a cluster to form its routes).
pub const NATS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The `nats-server` binary: `NATS_SERVER_BIN` if set, otherwise `nats-server` on `PATH`.
pub fn binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
}

/// A loopback TCP port that was free a moment ago (the kernel picked it). Another process may
/// take it before it is used; [`NatsServer::start`] retries with a new one if so.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"))
}

/// One `nats-server` process (or a stopped one that can be restarted on the same port).
pub struct NatsServer {
    /// The binary (see [`binary`]; [`NatsServer::start_binary`] picks another).
    bin: PathBuf,
    /// Whether clients must start TLS before INFO (`handshake_first`): then no INFO line
    /// comes in plaintext and readiness is read from the server's log instead.
    tls_first: bool,
    port: u16,
    /// The HTTP monitoring port (`-m`), for servers started with monitoring.
    monitor_port: Option<u16>,
    /// Extra arguments (cluster settings), given again on every restart.
    extra: Vec<String>,
    child: Option<Child>,
    /// How many times the process was spawned.
    spawns: usize,
    /// The log of every run so far (stderr; nats-server logs there).
    log: Arc<Mutex<Vec<u8>>>,
    pipe_readers: Vec<JoinHandle<()>>,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts clients.
    pub fn start() -> NatsServer {
        NatsServer::start_with_args(&[])
    }

    /// Like [`NatsServer::start`], with extra `nats-server` arguments (e.g. `["-c", path]` for
    /// a configuration file; the port and address flags always win over the file).
    pub fn start_with_args(args: &[&str]) -> NatsServer {
        NatsServer::start_on_free_ports(binary(), args, false, false)
    }

    /// Starts a server with the configuration file `config` (see
    /// `secure_nats::ServerConf`); [`NatsServer::reload`] re-reads it after a test rewrote it.
    pub fn start_with_config(config: &Path) -> NatsServer {
        let config = config.to_string_lossy();
        NatsServer::start_with_args(&["-c", &config])
    }

    /// Like [`NatsServer::start_with_args`] with the binary `bin` (e.g. a current nats-server
    /// for `handshake_first`); `tls_first` says that the configuration makes clients start
    /// TLS before INFO, so readiness cannot be an INFO line.
    pub fn start_binary(bin: PathBuf, args: &[&str], tls_first: bool) -> NatsServer {
        NatsServer::start_on_free_ports(bin, args, false, tls_first)
    }

    /// Like [`NatsServer::start`], with the HTTP monitoring endpoints (`/connz`, ...) on a
    /// free loopback port of their own; see [`NatsServer::connz`].
    pub fn start_monitored() -> NatsServer {
        NatsServer::start_on_free_ports(binary(), &[], true, false)
    }

    fn start_on_free_ports(
        bin: PathBuf,
        args: &[&str],
        monitored: bool,
        tls_first: bool,
    ) -> NatsServer {
        let mut last = String::new();
        // A port may be taken between picking it and the server binding it: try a few.
        for _ in 0..5 {
            let mut extra: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            let monitor_port = monitored.then(free_port);
            if let Some(m) = monitor_port {
                extra.extend(["-m".to_owned(), m.to_string()]);
            }
            let mut server = NatsServer {
                bin: bin.clone(),
                tls_first,
                port: free_port(),
                monitor_port,
                extra,
                child: None,
                spawns: 0,
                log: Arc::new(Mutex::new(Vec::new())),
                pipe_readers: Vec::new(),
            };
            server.spawn();
            match server.wait_accepting() {
                Ok(()) => return server,
                Err(e) => last = format!("{e}\n{}", server.log()),
            }
        }
        panic!("nats-server did not start: {last}");
    }

    /// Port-agnostic constructor for [`NatsCluster`]: not started yet.
    fn unstarted(port: u16, extra: Vec<String>) -> NatsServer {
        NatsServer {
            bin: binary(),
            tls_first: false,
            port,
            monitor_port: None,
            extra,
            child: None,
            spawns: 0,
            log: Arc::new(Mutex::new(Vec::new())),
            pipe_readers: Vec::new(),
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `tls://127.0.0.1:PORT` (the same server; the scheme asks the client for TLS).
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// The client port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the running server; `None` after [`NatsServer::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `GET /connz?<query>` from the monitoring port, parsed (e.g. `state=closed`, to see
    /// the connections that ended, with their reason and message counts). Panics if the
    /// server was not started with [`NatsServer::start_monitored`] or does not answer.
    pub fn connz(&self, query: &str) -> serde_json::Value {
        let port = self.monitor_port.expect("started without monitoring");
        let mut stream = TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))
            .unwrap_or_else(|e| panic!("connecting to the monitoring port {port}: {e}"));
        stream
            .set_read_timeout(Some(NATS_START_TIMEOUT))
            .expect("setting a read timeout");
        write!(
            stream,
            "GET /connz?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .expect("writing the /connz request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("reading /connz: {e}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .unwrap_or_else(|| panic!("no body in the /connz response: {response:?}"));
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/connz is not JSON ({e}): {body}"))
    }

    /// Kills the server with SIGKILL (no lame-duck, no goodbye to clients) and waits for it
    /// to be gone. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for reader in self.pipe_readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Sends `signal` to the running server (e.g. SIGSTOP / SIGCONT to freeze it: its sockets
    /// stay open, nothing is answered). `Err` if it is not running.
    pub fn signal(&self, signal: Signal) -> Result<(), String> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| format!("nats-server on port {} is not running", self.port))?;
        kill_process(Pid::from_child(child), signal)
            .map_err(|e| format!("kill({}, {signal:?}): {e}", child.id()))?;
        if signal == Signal::STOP {
            // kill() only queues the stop: each thread stops when it is next scheduled, and
            // on a loaded machine one may still answer a client meanwhile. Frozen means
            // every thread has stopped.
            let pid = child.id();
            let deadline = Instant::now() + NATS_START_TIMEOUT;
            while !all_threads_stopped(pid) {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "nats-server {pid} did not stop within {NATS_START_TIMEOUT:?}"
                    ));
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    }

    /// Puts the server into lame duck mode (`nats-server --signal ldm=PID`): it stops
    /// accepting, tells its clients (INFO `ldm:true`), closes them one by one after its grace
    /// period and exits. See [`LAME_DUCK_CONFIG`] for durations short enough for a test.
    pub fn lame_duck(&self) -> Result<(), String> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("nats-server on port {} is not running", self.port))?;
        let out = Command::new(&self.bin)
            .arg("--signal")
            .arg(format!("ldm={pid}"))
            .output()
            .map_err(|e| format!("running {} --signal ldm={pid}: {e}", binary().display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nats-server --signal ldm={pid}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Makes the running server re-read its configuration file (`nats-server --signal
    /// reload=PID`, which nats-server 2.9 supports, as SIGHUP), and waits until its log says
    /// it did (`Reloaded server configuration`); `Err` with the log if the reload failed
    /// (nats-server then keeps the old configuration and logs why).
    pub fn reload(&self) -> Result<(), String> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("nats-server on port {} is not running", self.port))?;
        let before = self.log().matches("Reloaded server configuration").count();
        let out = Command::new(&self.bin)
            .arg("--signal")
            .arg(format!("reload={pid}"))
            .output()
            .map_err(|e| format!("running {} --signal reload={pid}: {e}", self.bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "nats-server --signal reload={pid}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let deadline = Instant::now() + NATS_START_TIMEOUT;
        loop {
            let log = self.log();
            if log.matches("Reloaded server configuration").count() > before {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server {pid} did not log a reload within {NATS_START_TIMEOUT:?}:\n{log}"
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the server process has exited by itself (e.g. at the end of lame duck
    /// mode) and returns its status; `None` if it is still running after `within`.
    pub fn wait_exited(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                None => return None,
                Some(Ok(Some(status))) => return Some(status),
                Some(Ok(None)) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Some(_) => return None,
            }
        }
    }

    /// Starts the server again on the same port (after [`NatsServer::kill`]; kills it first
    /// if it is still running) and waits until it accepts clients. Panics if it cannot.
    pub fn restart(&mut self) {
        self.kill();
        // The port was ours a moment ago; nats-server binds with SO_REUSEADDR, so only another
        // process taking it in between can stop it. Retry a few times before giving up.
        let deadline = Instant::now() + NATS_START_TIMEOUT;
        loop {
            self.spawn();
            match self.wait_accepting() {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    self.kill();
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!(
                    "nats-server restart on port {}: {e}\n{}",
                    self.port,
                    self.log()
                ),
            }
        }
    }

    /// How many times the server has been spawned (each run logs `Server is ready` once).
    fn runs(&self) -> usize {
        self.spawns
    }

    /// Everything the server logged so far, over all its runs.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.extra)
            .args(["-a", "127.0.0.1", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.bin.display()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        self.pipe_readers
            .push(append_to(out, Arc::clone(&self.log)));
        self.pipe_readers
            .push(append_to(err, Arc::clone(&self.log)));
        self.child = Some(child);
        self.spawns += 1;
    }

    /// Waits until the server answers a TCP client with its INFO line.
    fn wait_accepting(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + NATS_START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("nats-server exited ({status})"));
                }
            }
            if self.tls_first {
                // No plaintext INFO: the log line that follows the listener's bind, and a TCP
                // connect to be sure it is this run's listener that answers.
                let runs = self.log().matches("Server is ready").count();
                let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
                if runs >= self.runs()
                    && TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
                {
                    return Ok(());
                }
            } else if read_info(self.port).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server not accepting on port {} after {NATS_START_TIMEOUT:?}",
                    self.port
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "--- nats-server on port {} log: ---\n{}",
                self.port,
                self.log()
            );
        }
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in /proc/PID/task/*/stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let (_, after_name) = stat.rsplit_once(") ")?;
                after_name.chars().next()
            })
            .is_some_and(|state| state == 'T')
    })
}

/// Connects to `port`, reads the server's first line and returns its INFO JSON.
fn read_info(port: u16) -> io::Result<serde_json::Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let json = line
        .strip_prefix("INFO ")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("not INFO: {line:?}")))?;
    serde_json::from_str(json.trim()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A `nats-server` configuration file for lame duck mode in tests: the shortest duration the
/// server accepts (30 s, spread over the clients still connected, at most 1 s between two) and
/// a 2 s grace period (10 s by default) during which clients are told to move before the first
/// is closed. A server with a handful of clients leaves lame duck mode within a few seconds.
pub const LAME_DUCK_CONFIG: &str = "lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"2s\"\n";

/// A cluster of `nats-server` nodes on loopback, fully meshed by routes.
///
/// Node `i` has a client port ([`NatsCluster::node`]`(i).port()`) and a cluster (route) port;
/// every node lists every other node's route URL in `--routes`, so a restarted node rejoins.
/// Interest travels between nodes asynchronously: a subscription made on one node is seen on
/// another only shortly after the subscriber's flush.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each accepts clients and knows every other node (its
    /// INFO lists their client URLs in `connect_urls`).
    pub fn start(n: usize) -> NatsCluster {
        NatsCluster::start_with_args(n, &[])
    }

    /// Like [`NatsCluster::start`], with extra `nats-server` arguments for every node (e.g.
    /// `["-c", path]` for a configuration file such as [`LAME_DUCK_CONFIG`]; the address, port
    /// and cluster flags always win over the file).
    pub fn start_with_args(n: usize, args: &[&str]) -> NatsCluster {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        NatsCluster::start_per_node(binary(), n, |_| args.clone(), |_| false)
    }

    /// Like [`NatsCluster::start_with_args`] with arguments of each node's own (`args(i)`,
    /// e.g. a configuration file with node `i`'s certificate), the binary `bin`, and
    /// `tls_first(i)` true for the nodes whose clients start TLS before INFO (their INFO is
    /// not read; the other nodes' INFO shows that they joined).
    pub fn start_per_node(
        bin: PathBuf,
        n: usize,
        args: impl Fn(usize) -> Vec<String>,
        tls_first: impl Fn(usize) -> bool,
    ) -> NatsCluster {
        assert!(n >= 1, "a cluster has at least one node");
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "gw-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        // Distinct ports: the kernel may hand out a port again once its probe socket is closed.
        let mut ports: Vec<u16> = Vec::with_capacity(2 * n);
        while ports.len() < 2 * n {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let route_ports = ports.split_off(n);
        let client_ports = ports;
        let nodes = (0..n)
            .map(|i| {
                let routes = route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let mut extra: Vec<String> = args(i);
                extra.extend([
                    "-n".to_owned(),
                    format!("{name}-node{i}"),
                    "--cluster_name".to_owned(),
                    name.clone(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                ]);
                if !routes.is_empty() {
                    extra.extend(["--routes".to_owned(), routes]);
                }
                let mut node = NatsServer::unstarted(client_ports[i], extra);
                node.bin = bin.clone();
                node.tls_first = tls_first(i);
                node
            })
            .collect();
        let mut cluster = NatsCluster { nodes };
        for node in &mut cluster.nodes {
            node.spawn();
        }
        for node in &mut cluster.nodes {
            if let Err(e) = node.wait_accepting() {
                panic!("cluster node on port {}: {e}\n{}", node.port, node.log());
            }
        }
        cluster.wait_meshed();
        cluster
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Node `i`, for [`NatsServer::kill`] / [`NatsServer::restart`] directly.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Every node's client URL, comma-separated (what `CGW_IPC_NATS_URL` accepts).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` on its ports and waits until the running nodes are meshed again.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_meshed();
    }

    /// Waits until every running node's INFO lists the client URL of every other running node.
    fn wait_meshed(&mut self) {
        let deadline = Instant::now() + NATS_START_TIMEOUT;
        loop {
            let running: Vec<u16> = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.is_running().then_some(n.port))
                .collect();
            let readable: Vec<u16> = self
                .nodes
                .iter_mut()
                .filter_map(|n| (n.is_running() && !n.tls_first).then_some(n.port))
                .collect();
            let meshed = readable.iter().all(|&port| {
                let Ok(info) = read_info(port) else {
                    return false;
                };
                let urls: Vec<&str> = info["connect_urls"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|u| u.as_str()).collect())
                    .unwrap_or_default();
                running
                    .iter()
                    .filter(|&&other| other != port)
                    .all(|other| urls.iter().any(|u| u.ends_with(&format!(":{other}"))))
            });
            if meshed {
                return;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self.nodes.iter().map(NatsServer::log).collect();
                panic!(
                    "nats cluster not meshed after {NATS_START_TIMEOUT:?}:\n{}",
                    logs.join("\n---\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_starts_kills_and_restarts_on_its_port() {
        let mut server = NatsServer::start();
        let port = server.port();
        assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
        let pid = server.pid().expect("running");
        assert!(read_info(port).is_ok());
        server.kill();
        assert_eq!(server.pid(), None);
        assert!(!server.is_running());
        assert!(
            read_info(port).is_err(),
            "port {port} still answers after kill"
        );
        server.restart();
        assert_eq!(server.port(), port);
        assert_ne!(server.pid(), Some(pid));
        assert!(read_info(port).is_ok());
        let pid = server.pid().unwrap();
        drop(server);
        // Killed and reaped by the drop.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "nats-server {pid} survived the drop"
        );
    }

    #[test]
    fn server_freezes_thaws_and_leaves_in_lame_duck_mode() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("lame-duck.conf");
        std::fs::write(&conf, LAME_DUCK_CONFIG).unwrap();
        let mut server = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
        server.signal(Signal::STOP).unwrap();
        assert!(
            read_info(server.port()).is_err(),
            "a stopped server answered"
        );
        server.signal(Signal::CONT).unwrap();
        assert!(read_info(server.port()).is_ok());
        server.lame_duck().unwrap();
        let status = server
            .wait_exited(Duration::from_secs(20))
            .expect("nats-server exits after lame duck mode");
        assert!(status.success(), "{status}");
        server.restart();
        assert!(read_info(server.port()).is_ok());
    }

    #[test]
    fn cluster_meshes_and_survives_a_node() {
        let mut cluster = NatsCluster::start(3);
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster.urls().split(',').count(), 3);
        cluster.kill(1);
        assert!(read_info(cluster.node(1).port()).is_err());
        assert!(read_info(cluster.node(0).port()).is_ok());
        cluster.restart(1);
        let info = read_info(cluster.node(1).port()).unwrap();
        assert_eq!(info["cluster"], cluster.nodes[0].extra[3].as_str());
    }
}
