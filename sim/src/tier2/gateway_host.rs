//! The `gateway` host: the core's `Gateway<NatsSession>` in a small single-threaded tokio
//! shell over turmoil TCP. It mirrors the mio shell's call discipline
//! (runtime/src/event_loop.rs, runtime/src/nats_link.rs) and differs only in syscalls:
//!
//! - every input (accept, client bytes, end of stream, NATS socket events, timer) is fed to
//!   the core, then [`Shell::pump`] polls `poll_action` until `None` and acts, in the core's
//!   order: writes only after `Transmit`, the NATS output only on the session's `Transmit`;
//! - NATS socket events are reported under the session's link id; the session drops reports
//!   about a link it gave up, so the shell keeps no generation of its own;
//! - a client is read only while `wants_read` says so; `ResumeRead` wakes its reader;
//! - `Connect{host,port}` becomes `turmoil::net::TcpStream::connect`; the core's own connect
//!   and handshake deadlines decide when an attempt has failed (a `Disconnect` aborts the
//!   attempt), the shell only reports success, refusal and loss;
//! - one timer sleeps until `poll_timeout` and calls `handle_timeout`;
//! - a shutdown signal (`ShellOptions::signals`, SIGTERM in the mio shell) calls
//!   `handle_shutdown` and pumps; the first closes the listener. On `ShutdownComplete` the
//!   shell exits as the mio shell does: it stops at that action (what is queued behind it is
//!   discarded, after a look for the snapshot in [`Shell::exit`]), and every socket closes as
//!   at a process exit; nothing reaches the core from then on.
//!
//! turmoil's writes never block (a segment is queued on the simulated link at once), so a
//! write is one synchronous `poll_write`. With `ShellOptions::nats_sndbuf` the NATS socket
//! has a send buffer instead: bytes written that the nats host has not read yet count
//! against it, a write takes only what fits, and the rest goes when there is room (checked
//! every millisecond, the write-readiness edge), as the mio shell does after `WouldBlock`.
//! IPC clients use TCP because turmoil simulates no Unix sockets.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use ipc_gateway_core::frame::{FrameDecoder, MAX_FRAME_BYTES};
use ipc_gateway_core::nats_config::SessionState;
use ipc_gateway_core::nats_session::{LinkId, NatsInput, NatsSession, SessionAction};
use ipc_gateway_core::upstream::TaskKind;
use ipc_gateway_core::{Action, ConnId, Gateway, Instant, PeerCredentials};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use turmoil::net::{TcpListener, TcpStream};

use super::obs::{sim_now, spawn_watched, SharedObs};
use crate::after_outage::Mark;
use crate::health::{HealthWatch, Seen};
use crate::shutdown::{Exit, Socket};

/// The port IDE hosts connect to.
pub const IPC_PORT: u16 = 9000;

const READ_BUFFER: usize = 64 * 1024;

struct ClientIo {
    write: OwnedWriteHalf,
    /// Wakes the reader: `ResumeRead`, or `Close`.
    kick: Rc<Notify>,
    closed: Rc<Cell<bool>>,
}

#[derive(Default)]
struct NatsIo {
    /// The session's link the socket is for.
    link: LinkId,
    write: Option<OwnedWriteHalf>,
    /// The attempt and, once up, the reader; aborted on `Disconnect` and on the next
    /// `Connect`, so it never reports about a socket the shell dropped.
    task: Option<JoinHandle<()>>,
    /// The socket's local port: the nats host counts what it read by it.
    local_port: Option<u16>,
    /// Bytes written to this socket.
    written: u64,
    /// The last write did not fit in the send buffer.
    blocked: bool,
}

/// What a gateway host does besides the core's bidding.
#[derive(Debug, Clone, Default)]
pub struct ShellOptions {
    /// Shutdown signals, at these virtual times.
    pub signals: Vec<Duration>,
    /// The NATS socket's send buffer in bytes (`None`: writes are taken whole).
    pub nats_sndbuf: Option<usize>,
}

/// One gateway host's shell; the test inspects its gateway after the run.
pub struct Shell {
    pub name: String,
    pub gateway: RefCell<Gateway<NatsSession>>,
    clients: RefCell<BTreeMap<ConnId, ClientIo>>,
    nats: RefCell<NatsIo>,
    /// Wakes the timer: the core's next deadline may have changed.
    wake: Notify,
    base: tokio::time::Instant,
    obs: SharedObs,
    /// When the core said `ShutdownComplete`, and whether a second signal forced it.
    pub shutdown_complete: Cell<Option<(Instant, bool)>>,
    /// The shutdown signals it took (not those after its exit).
    pub signals: RefCell<Vec<Mark>>,
    /// Signals that came after its exit (ignored: the process is gone).
    pub signals_after_exit: Cell<u64>,
    /// The core on `ShutdownComplete`; from then on the shell has exited.
    pub exit: RefCell<Option<Exit>>,
    /// Every change of `Gateway::shutdown_state` seen after an input: (virtual time, name).
    pub shutdown_log: RefCell<Vec<(Duration, &'static str)>>,
    /// The first signal closes the listener.
    stop_accepting: Notify,
    nats_sndbuf: Option<usize>,
    /// Health as checked after every input ([`crate::health`]).
    pub health: RefCell<HealthWatch>,
    /// What the health check found wrong (the test asserts there is nothing).
    pub health_failures: RefCell<Vec<String>>,
}

impl Shell {
    pub fn now(&self) -> Instant {
        let d = tokio::time::Instant::now() - self.base;
        Instant::from_nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    fn record(&self, event: std::fmt::Arguments<'_>) {
        let nanos = self.now().as_nanos();
        self.obs.borrow_mut().trace.record(nanos, &self.name, event);
    }

    /// Carries out everything the core asked for, in the core's order, until it asks for
    /// nothing more.
    fn pump(self: &Rc<Self>) {
        loop {
            if self.exited() {
                break; // the process is gone; what it saw last is still noted
            }
            let action = self.gateway.borrow_mut().poll_action();
            let Some(action) = action else { break };
            self.apply(action);
        }
        self.gateway.borrow().assert_invariants();
        self.observe();
        self.check_health();
        let state = self.gateway.borrow().shutdown_state().name();
        let mut log = self.shutdown_log.borrow_mut();
        if log.last().map(|s| s.1) != Some(state) {
            log.push((sim_now(), state));
        }
        drop(log);
        self.wake.notify_one();
    }

    /// Whether the shell has exited (after `ShutdownComplete`).
    pub fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// A shutdown signal: the core starts (or, the second time, forces) its shutdown; the
    /// first closes the listener.
    fn signal(self: &Rc<Self>) {
        if self.exited() {
            self.signals_after_exit
                .set(self.signals_after_exit.get() + 1);
            self.record(format_args!("signal after the exit"));
            return;
        }
        let mark = self.obs.borrow_mut().mark();
        self.signals.borrow_mut().push(mark);
        let n = self.signals.borrow().len();
        self.record(format_args!("signal {n}"));
        if n == 1 {
            self.stop_accepting.notify_one();
        }
        let now = self.now();
        self.gateway.borrow_mut().handle_shutdown(now);
        self.pump();
    }

    /// `ShutdownComplete`: the shell exits, as the mio shell does. What the core still had
    /// queued is discarded (looked at for the snapshot); every socket closes, as at a process
    /// exit; nothing reaches the core any more.
    fn exit(self: &Rc<Self>, forced: bool) {
        let mark = self.obs.borrow_mut().mark();
        let mut discarded = Vec::new();
        let mut disconnect_queued = false;
        let mut extra = 0;
        loop {
            let action = self.gateway.borrow_mut().poll_action();
            let Some(action) = action else { break };
            match action {
                Action::Upstream(SessionAction::Disconnect { .. }) => disconnect_queued = true,
                Action::ShutdownComplete { .. } => extra += 1,
                _ => {}
            }
            discarded.push(format!("{action:?}"));
        }
        self.record(format_args!("exit forced={forced} discarded {discarded:?}"));
        let held = {
            let nats = self.nats.borrow();
            nats.write.is_some() || nats.task.as_ref().is_some_and(|t| !t.is_finished())
        };
        let socket = match (held, disconnect_queued) {
            (false, _) => Socket::None,
            (true, true) => Socket::DisconnectQueued,
            (true, false) => Socket::Open,
        };
        let closing_seen = self
            .shutdown_log
            .borrow()
            .iter()
            .find(|(_, st)| *st == "closing_upstream")
            .map(|(t, _)| *t);
        let exit = Exit::snapshot(
            &self.gateway.borrow(),
            mark,
            forced,
            socket,
            extra,
            closing_seen,
        );
        *self.exit.borrow_mut() = Some(exit);
        self.close_nats();
        let clients = std::mem::take(&mut *self.clients.borrow_mut());
        for (_, c) in clients {
            c.closed.set(true);
            c.kick.notify_one();
        }
        self.stop_accepting.notify_one();
        self.wake.notify_one();
    }

    /// Notes the link and the breaker after every input (the after-outage check).
    fn observe(&self) {
        let g = self.gateway.borrow();
        let mut obs = self.obs.borrow_mut();
        let mark = obs.mark();
        obs.logs
            .entry(self.name.clone())
            .or_default()
            .observe_gateway(mark, &g);
    }

    /// The core's health against what this shell sees ([`crate::health`]).
    fn check_health(&self) {
        let g = self.gateway.borrow();
        let seen = Seen {
            up: g.upstream().state() == SessionState::Connected,
            breaker: g.breaker_state(),
            shutdown: g.shutdown_state(),
            inflight: g.inflight_len(),
            max_inflight: g.config().max_inflight,
            grace: g.config().health_grace,
        };
        let checked = self.health.borrow_mut().check(self.now(), seen, g.health());
        if let Err(e) = checked {
            self.record(format_args!("health check failed: {e}"));
            self.health_failures
                .borrow_mut()
                .push(format!("{}: {e}", self.name));
        }
    }

    /// Notes the task requests in bytes read from a client, before the core sees them.
    fn note_read(&self, frames: &mut FrameDecoder, bytes: &[u8]) {
        frames.push(bytes);
        while let Ok(Some(frame)) = frames.next_frame() {
            if TaskKind::from_frame_kind(frame.kind).is_none() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap_or_default();
            let Some(tag) = v["tag"].as_str() else {
                continue;
            };
            let mut obs = self.obs.borrow_mut();
            let mark = obs.mark();
            obs.logs
                .entry(self.name.clone())
                .or_default()
                .took(mark, tag.to_owned());
        }
    }

    fn apply(self: &Rc<Self>, action: Action<SessionAction>) {
        let now = self.now();
        match action {
            Action::Transmit(id) => {
                self.record(format_args!("transmit {}", id.0));
                self.write_client(id, now);
            }
            Action::ResumeRead(id) => {
                self.record(format_args!("resume {}", id.0));
                if let Some(c) = self.clients.borrow().get(&id) {
                    c.kick.notify_one();
                }
            }
            Action::Close(id) => {
                self.record(format_args!("close {}", id.0));
                if let Some(c) = self.clients.borrow_mut().remove(&id) {
                    c.closed.set(true);
                    c.kick.notify_one();
                }
            }
            Action::Upstream(action) => self.apply_session(action),
            Action::ShutdownComplete { forced } => {
                self.record(format_args!("shutdown_complete forced={forced}"));
                self.shutdown_complete.set(Some((self.now(), forced)));
                self.exit(forced);
            }
        }
    }

    /// Writes the connection's output; turmoil takes it whole.
    fn write_client(self: &Rc<Self>, id: ConnId, now: Instant) {
        loop {
            let bytes: Vec<u8> = self
                .gateway
                .borrow()
                .client_output(id)
                .flat_map(|s| s.iter().copied())
                .collect();
            if bytes.is_empty() {
                return;
            }
            let result = {
                let mut clients = self.clients.borrow_mut();
                let Some(c) = clients.get_mut(&id) else {
                    return;
                };
                write_now(&mut c.write, &bytes)
            };
            match result {
                Ok(n) => self.gateway.borrow_mut().handle_client_written(id, n, now),
                Err(_) => {
                    self.drop_client(id, now);
                    return;
                }
            }
        }
    }

    /// The client's socket failed: forget it in the core and close it.
    fn drop_client(self: &Rc<Self>, id: ConnId, now: Instant) {
        if let Some(c) = self.clients.borrow_mut().remove(&id) {
            c.closed.set(true);
            c.kick.notify_one();
        } else {
            return;
        }
        self.record(format_args!("client_gone {}", id.0));
        self.gateway.borrow_mut().handle_client_closed(id, now);
    }

    fn apply_session(self: &Rc<Self>, action: SessionAction) {
        match action {
            SessionAction::Connect { link, host, port } => {
                self.record(format_args!("nats_connect {host}:{port}"));
                self.close_nats();
                self.nats.borrow_mut().link = link;
                let shell = self.clone();
                let task =
                    spawn_watched(&self.obs, format!("{}: nats link", self.name), async move {
                        shell.nats_link(link, host, port).await
                    });
                self.nats.borrow_mut().task = Some(task);
            }
            SessionAction::Disconnect { .. } => {
                self.record(format_args!("nats_disconnect"));
                self.close_nats();
            }
            SessionAction::Transmit { .. } => self.flush_nats(),
            // The simulations configure no TLS and the stand-in's INFO never requires it;
            // were it asked for, the bytes would stay the plaintext a TLS shell decrypts.
            SessionAction::StartTls { .. } => {
                self.record(format_args!("nats_start_tls"));
            }
        }
    }

    /// Drops the NATS socket and any attempt in progress.
    fn close_nats(&self) {
        let mut nats = self.nats.borrow_mut();
        if let Some(task) = nats.task.take() {
            task.abort();
        }
        nats.write = None;
    }

    fn flush_nats(self: &Rc<Self>) {
        let now = self.now();
        let mut bytes: Vec<u8> = self
            .gateway
            .borrow()
            .upstream()
            .output()
            .flat_map(|s| s.iter().copied())
            .collect();
        self.nats.borrow_mut().blocked = false;
        if bytes.is_empty() {
            return;
        }
        let room = self.nats_room();
        if let Some(room) = room.filter(|r| *r < bytes.len()) {
            self.record(format_args!("nats_write {room} of {}", bytes.len()));
            self.nats.borrow_mut().blocked = true;
            bytes.truncate(room);
            if room == 0 {
                return;
            }
        }
        let (link, result) = {
            let mut nats = self.nats.borrow_mut();
            let link = nats.link;
            let Some(write) = nats.write.as_mut() else {
                return;
            };
            let result = write_now(write, &bytes);
            if let Ok(n) = result {
                nats.written += n as u64;
            }
            (link, result)
        };
        match result {
            Ok(n) => self
                .gateway
                .borrow_mut()
                .handle_upstream(NatsInput::Written(link, n), now),
            Err(_) => self.nats_lost(link, now),
        }
    }

    /// Room in the NATS socket's send buffer: its size less what the nats host has not read
    /// yet (`None`: unbounded).
    fn nats_room(&self) -> Option<usize> {
        let cap = self.nats_sndbuf?;
        let nats = self.nats.borrow();
        let port = nats.local_port?;
        let read = self
            .obs
            .borrow()
            .nats_read
            .get(&(self.name.clone(), port))
            .copied()
            .unwrap_or(0);
        Some(cap.saturating_sub(nats.written.saturating_sub(read) as usize))
    }

    fn nats_lost(self: &Rc<Self>, link: LinkId, now: Instant) {
        self.record(format_args!("nats_lost"));
        self.close_nats();
        self.gateway
            .borrow_mut()
            .handle_upstream(NatsInput::Closed(link), now);
    }

    /// One connection attempt and, once up, its reader.
    async fn nats_link(self: Rc<Self>, link: LinkId, host: String, port: u16) {
        let connected = TcpStream::connect((host.as_str(), port)).await;
        let now = self.now();
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                self.record(format_args!("nats_connect_failed {}", e.kind()));
                self.gateway
                    .borrow_mut()
                    .handle_upstream(NatsInput::ConnectFailed(link), now);
                self.pump();
                return;
            }
        };
        let (mut read, write) = stream.into_split();
        {
            let mut nats = self.nats.borrow_mut();
            nats.local_port = write.local_addr().ok().map(|a| a.port());
            nats.written = 0;
            nats.blocked = false;
            nats.write = Some(write);
        }
        self.record(format_args!("nats_connected"));
        self.gateway
            .borrow_mut()
            .handle_upstream(NatsInput::Connected(link), now);
        self.pump();
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            let n = read.read(&mut buf).await;
            let now = self.now();
            match n {
                Ok(0) | Err(_) => {
                    self.nats_lost(link, now);
                    self.pump();
                    return;
                }
                Ok(n) => {
                    self.gateway
                        .borrow_mut()
                        .handle_upstream(NatsInput::Received(link, &buf[..n]), now);
                    self.pump();
                }
            }
        }
    }

    async fn client_reader(
        self: Rc<Self>,
        id: ConnId,
        mut read: OwnedReadHalf,
        kick: Rc<Notify>,
        closed: Rc<Cell<bool>>,
    ) {
        let mut buf = vec![0u8; READ_BUFFER];
        // A second decoder, for the after-outage check only: which requests were read when.
        let mut frames = FrameDecoder::new(MAX_FRAME_BYTES);
        loop {
            if closed.get() {
                return;
            }
            let wants = self.gateway.borrow().wants_read(id);
            let n = tokio::select! {
                biased;
                _ = kick.notified() => continue,
                n = read.read(&mut buf), if wants => n,
            };
            if closed.get() {
                return;
            }
            let now = self.now();
            match n {
                Ok(0) => {
                    self.record(format_args!("eof {}", id.0));
                    self.gateway.borrow_mut().handle_client_eof(id, now);
                    self.pump();
                    // Nothing more can come; the core closes once it has answered.
                    return;
                }
                Ok(n) => {
                    self.note_read(&mut frames, &buf[..n]);
                    self.gateway
                        .borrow_mut()
                        .handle_client_bytes(id, &buf[..n], now);
                    self.pump();
                }
                Err(_) => {
                    self.drop_client(id, now);
                    self.pump();
                    return;
                }
            }
        }
    }

    async fn timer(self: Rc<Self>) {
        loop {
            if self.exited() {
                return;
            }
            let next = self.gateway.borrow().poll_timeout();
            // A blocked NATS write looks for room every millisecond (write readiness).
            let retry = self
                .nats
                .borrow()
                .blocked
                .then(|| self.now() + std::time::Duration::from_millis(1));
            let next = [next, retry].into_iter().flatten().min();
            let sleep = match next {
                Some(t) => {
                    let at = self.base + std::time::Duration::from_nanos(t.as_nanos());
                    tokio::time::sleep_until(at)
                }
                None => tokio::time::sleep(std::time::Duration::from_secs(3600)),
            };
            tokio::select! {
                biased;
                _ = self.wake.notified() => {}
                _ = sleep => {
                    if self.exited() {
                        return;
                    }
                    let now = self.now();
                    let mut moved = false;
                    if self.nats.borrow().blocked {
                        self.flush_nats();
                        moved = true;
                    }
                    if self.gateway.borrow().poll_timeout().is_some_and(|t| t <= now) {
                        self.gateway.borrow_mut().handle_timeout(now);
                        moved = true;
                    }
                    if moved {
                        self.pump();
                    }
                }
            }
        }
    }
}

/// Runs one gateway host until the simulation ends (after an exit, the host stays up with
/// nothing open).
pub async fn run(
    name: String,
    gateway: Gateway<NatsSession>,
    obs: SharedObs,
    options: ShellOptions,
) -> turmoil::Result {
    let listener = TcpListener::bind(("0.0.0.0", IPC_PORT)).await?;
    let shell = Rc::new(Shell {
        name: name.clone(),
        gateway: RefCell::new(gateway),
        clients: RefCell::new(BTreeMap::new()),
        nats: RefCell::new(NatsIo::default()),
        wake: Notify::new(),
        base: tokio::time::Instant::now(),
        obs: obs.clone(),
        shutdown_complete: Cell::new(None),
        signals: RefCell::new(Vec::new()),
        signals_after_exit: Cell::new(0),
        exit: RefCell::new(None),
        shutdown_log: RefCell::new(Vec::new()),
        stop_accepting: Notify::new(),
        nats_sndbuf: options.nats_sndbuf,
        health: RefCell::new(HealthWatch::default()),
        health_failures: RefCell::new(Vec::new()),
    });
    obs.borrow_mut()
        .gateways
        .insert(name.clone(), shell.clone());
    let timer = shell.clone();
    spawn_watched(&obs, format!("{name}: timer"), timer.timer());
    if !options.signals.is_empty() {
        let signaller = shell.clone();
        let signals = options.signals.clone();
        spawn_watched(&obs, format!("{name}: signals"), async move {
            for at in signals {
                tokio::time::sleep(at.saturating_sub(sim_now())).await;
                signaller.signal();
            }
        });
    }
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shell.stop_accepting.notified() => break,
            accepted = listener.accept() => accepted?,
        };
        let now = shell.now();
        let id = shell.gateway.borrow_mut().handle_client_opened(
            PeerCredentials {
                uid: Some(1000),
                gid: None,
                pid: None,
            },
            now,
        );
        shell.record(format_args!("accept {} {}", id.0, peer.port()));
        let (read, write) = stream.into_split();
        let kick = Rc::new(Notify::new());
        let closed = Rc::new(Cell::new(false));
        shell.clients.borrow_mut().insert(
            id,
            ClientIo {
                write,
                kick: kick.clone(),
                closed: closed.clone(),
            },
        );
        let reader = shell.clone();
        spawn_watched(
            &obs,
            format!("{name}: client {}", id.0),
            reader.client_reader(id, read, kick, closed),
        );
        shell.pump();
    }
    // The listener is closed: connects are refused from now on.
    drop(listener);
    std::future::pending::<()>().await;
    Ok(())
}

/// One `poll_write` with a waker that is never used: turmoil's writes complete at once.
pub fn write_now<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<usize> {
    let waker = Waker::from(Arc::new(NoopWake));
    let mut cx = Context::from_waker(&waker);
    match Pin::new(w).poll_write(&mut cx, bytes) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
    }
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}
