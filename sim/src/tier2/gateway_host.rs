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
//! - one timer sleeps until `poll_timeout` and calls `handle_timeout`.
//!
//! turmoil's writes never block (a segment is queued on the simulated link at once), so a
//! write is one synchronous `poll_write`; IPC clients use TCP because turmoil simulates no
//! Unix sockets.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

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

use super::obs::{spawn_watched, SharedObs};

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
            let action = self.gateway.borrow_mut().poll_action();
            let Some(action) = action else { break };
            self.apply(action);
        }
        self.gateway.borrow().assert_invariants();
        self.observe();
        self.wake.notify_one();
    }

    /// Notes the link and the breaker after every input (the after-outage check).
    fn observe(&self) {
        let g = self.gateway.borrow();
        let up = g.upstream().state() == SessionState::Connected;
        let breaker = g.breaker_state().name();
        let opens = g
            .stats()
            .breaker_transitions
            .get("open")
            .copied()
            .unwrap_or(0);
        let mut obs = self.obs.borrow_mut();
        let mark = obs.mark();
        obs.logs
            .entry(self.name.clone())
            .or_default()
            .observe(mark, up, breaker, opens);
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
        let bytes: Vec<u8> = self
            .gateway
            .borrow()
            .upstream()
            .output()
            .flat_map(|s| s.iter().copied())
            .collect();
        if bytes.is_empty() {
            return;
        }
        let (link, result) = {
            let mut nats = self.nats.borrow_mut();
            let link = nats.link;
            let Some(write) = nats.write.as_mut() else {
                return;
            };
            (link, write_now(write, &bytes))
        };
        match result {
            Ok(n) => self
                .gateway
                .borrow_mut()
                .handle_upstream(NatsInput::Written(link, n), now),
            Err(_) => self.nats_lost(link, now),
        }
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
        self.nats.borrow_mut().write = Some(write);
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
            let next = self.gateway.borrow().poll_timeout();
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
                    let now = self.now();
                    if self.gateway.borrow().poll_timeout().is_some_and(|t| t <= now) {
                        self.gateway.borrow_mut().handle_timeout(now);
                        self.pump();
                    }
                }
            }
        }
    }
}

/// Runs one gateway host until the simulation ends.
pub async fn run(name: String, gateway: Gateway<NatsSession>, obs: SharedObs) -> turmoil::Result {
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
    });
    obs.borrow_mut()
        .gateways
        .insert(name.clone(), shell.clone());
    let timer = shell.clone();
    spawn_watched(&obs, format!("{name}: timer"), timer.timer());
    loop {
        let (stream, peer) = listener.accept().await?;
        let now = shell.now();
        let id = shell.gateway.borrow_mut().handle_client_opened(
            PeerCredentials {
                uid: Some(1000),
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
