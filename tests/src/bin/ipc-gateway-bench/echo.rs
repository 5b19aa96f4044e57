//! The two echo floors that the stub mode measures beside the gateway, each a bare framed echo
//! server in this process on a temporary socket: `echo` (a thread per connection) and `echo-1t`
//! (one thread running a mio event loop, the gateway's architecture).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipc_gateway_tests::frame::{self, RESPONSE_OK};
use mio::net::{UnixListener as MioListener, UnixStream as MioStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use crate::load::{run_load, Load, RunResult};

/// The thread-per-connection echo floor.
pub(crate) const ECHO: &str = "echo";
/// The single-threaded (mio event loop) echo floor.
pub(crate) const ECHO_1T: &str = "echo-1t";

/// Runs the load against one of the echo floors, started for this run only.
pub(crate) fn run_echo(target: &'static str, load: &Load) -> Result<RunResult> {
    if target == ECHO_1T {
        let server = EchoLoopServer::start()?;
        let result = run_load(target, &server.path, load);
        drop(server);
        result
    } else {
        let server = EchoServer::start()?;
        let result = run_load(target, &server.path, load);
        drop(server);
        result
    }
}

/// The thread-per-connection echo baseline, "echo": a bare framed echo server on a temporary
/// socket, a thread per connection with blocking I/O, every complete frame of a read written
/// back in one write, nothing validated. The only change to a frame is its type byte, set to
/// RESPONSE_OK so that the client treats echo replies exactly like gateway replies. Its
/// connections run in parallel on every core: the reference floor, not the floor of a
/// single-threaded server (that is `EchoLoopServer`). Stopped and its socket file removed on
/// drop.
struct EchoServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start() -> Result<EchoServer> {
        let name = format!("ipc-gateway-bench-echo-{}.sock", std::process::id());
        let path = std::env::temp_dir().join(name);
        // A file of this name can only be left over from an earlier bench with our pid.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot bind the echo socket {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let spawned = thread::Builder::new()
            .name("echo-accept".to_string())
            .spawn(move || echo_accept(listener, &stop_flag));
        match spawned {
            Ok(handle) => {
                let thread = Some(handle);
                Ok(EchoServer { path, stop, thread })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                bail!("cannot start the echo server thread: {e}")
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor; it sees the flag and returns.
        let _ = UnixStream::connect(&self.path);
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn echo_accept(listener: UnixListener, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        // Connection threads end when their client closes; nobody waits for them.
        let _ = thread::Builder::new()
            .name("echo-conn".to_string())
            .spawn(move || echo_connection(conn));
    }
}

fn echo_connection(mut conn: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= ECHO_MAX_BUFFER {
                return; // a frame this large is not from this bench
            }
            buf.resize(buf.len() * 2, 0);
        }
        match conn.read(&mut buf[filled..]) {
            Ok(0) => return,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let mut done = 0;
        loop {
            match frame::complete_frame_len(&buf[done..filled]) {
                Ok(Some(len)) => {
                    // The type byte: the client counts anything but RESPONSE_OK as an error.
                    buf[done + 5] = RESPONSE_OK;
                    done += len;
                }
                Ok(None) => break,
                Err(_) => return, // length below 6: no frame boundary to be found any more
            }
        }
        if done > 0 {
            if conn.write_all(&buf[..done]).is_err() {
                return;
            }
            buf.copy_within(done..filled, 0);
            filled -= done;
        }
    }
}

/// The token of the echo-1t listener.
const ECHO_LISTENER: Token = Token(0);
/// The token of the waker that stops the echo-1t loop.
const ECHO_WAKER: Token = Token(1);
/// Connection `i` of the echo-1t loop has the token `ECHO_FIRST_CONN + i`.
const ECHO_FIRST_CONN: usize = 2;
/// Above this many bytes of replies waiting for the client, the echo-1t loop stops reading from
/// that connection until they are written: the backpressure that the thread-per-connection echo
/// gets from its blocking write.
const ECHO_OUTPUT_LIMIT: usize = 1024 * 1024;
/// A frame this large is not from this bench: both echo servers drop the connection.
const ECHO_MAX_BUFFER: usize = 16 * 1024 * 1024;

/// The single-threaded echo baseline, "echo-1t": one thread runs an edge-triggered mio event
/// loop on a temporary socket, the gateway's own architecture without the gateway's code. Frames
/// come back as the thread-per-connection echo returns them (type byte set to RESPONSE_OK,
/// nothing validated). Stopped and its socket file removed on drop.
struct EchoLoopServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl EchoLoopServer {
    fn start() -> Result<EchoLoopServer> {
        let name = format!("ipc-gateway-bench-echo-1t-{}.sock", std::process::id());
        let path = std::env::temp_dir().join(name);
        // A file of this name can only be left over from an earlier bench with our pid.
        let _ = std::fs::remove_file(&path);
        let listener = MioListener::bind(&path)
            .with_context(|| format!("cannot bind the echo-1t socket {}", path.display()))?;
        match EchoLoopServer::spawn(listener, &path) {
            Ok(server) => Ok(server),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn spawn(mut listener: MioListener, path: &Path) -> Result<EchoLoopServer> {
        let poll = Poll::new().context("cannot create the echo-1t poll")?;
        let registry = poll.registry();
        registry
            .register(&mut listener, ECHO_LISTENER, Interest::READABLE)
            .context("cannot register the echo-1t listener")?;
        let waker = Waker::new(registry, ECHO_WAKER).context("cannot create the echo-1t waker")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("echo-1t".to_string())
            .spawn(move || echo_loop(poll, listener, &stop_flag))
            .context("cannot start the echo-1t thread")?;
        Ok(EchoLoopServer {
            path: path.to_path_buf(),
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoLoopServer {
    fn drop(&mut self) {
        // The waker ends the poll at once; the loop also checks the flag every 50 ms, in case
        // the wake could not be delivered.
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(handle) = self.thread.take() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("ipc-gateway-bench: the echo-1t loop failed: {e}"),
                Err(_) => eprintln!("ipc-gateway-bench: the echo-1t thread panicked"),
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One client of the echo-1t loop.
struct EchoConn {
    stream: MioStream,
    /// Bytes read and not yet echoed (at most a partial frame between events).
    input: Vec<u8>,
    filled: usize,
    /// Complete frames waiting to be written, from `output[sent..]`.
    output: Vec<u8>,
    sent: usize,
    /// The socket may hold unread bytes: the last read did not end in WouldBlock or a short read
    /// (edge-triggered: no new readable event comes for bytes already there).
    may_read: bool,
    /// The last write ended in WouldBlock: wait for a writable event before writing again.
    write_blocked: bool,
    /// WRITABLE is part of the registered interest.
    write_interest: bool,
}

/// The connection is over (end of stream, error, or a frame too large for this bench).
struct Closed;

impl EchoConn {
    fn new(stream: MioStream) -> EchoConn {
        EchoConn {
            stream,
            input: vec![0; 64 * 1024],
            filled: 0,
            output: Vec::with_capacity(64 * 1024),
            sent: 0,
            may_read: false,
            write_blocked: false,
            write_interest: false,
        }
    }

    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Reads what the socket holds (while the replies owed stay below the limit) and writes as
    /// much of the replies as the socket takes.
    fn pump(&mut self) -> Result<(), Closed> {
        loop {
            while self.may_read && self.pending() < ECHO_OUTPUT_LIMIT {
                self.read_once()?;
            }
            self.flush()?;
            // Reading stopped at the output limit and the output is now written: read on.
            if self.write_blocked || !self.may_read {
                return Ok(());
            }
        }
    }

    /// One read; every complete frame read is queued for writing.
    fn read_once(&mut self) -> Result<(), Closed> {
        if self.filled == self.input.len() {
            if self.input.len() >= ECHO_MAX_BUFFER {
                return Err(Closed);
            }
            self.input.resize(self.input.len() * 2, 0);
        }
        let room = self.input.len() - self.filled;
        match self.stream.read(&mut self.input[self.filled..]) {
            Ok(0) => return Err(Closed),
            Ok(n) => {
                self.filled += n;
                if n < room {
                    // A short read emptied the socket; new bytes bring a new readable event.
                    self.may_read = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.may_read = false;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(_) => return Err(Closed),
        }
        let mut done = 0;
        loop {
            match frame::complete_frame_len(&self.input[done..self.filled]) {
                Ok(Some(len)) => {
                    // The type byte, as in the thread-per-connection echo.
                    self.input[done + 5] = RESPONSE_OK;
                    done += len;
                }
                Ok(None) => break,
                Err(_) => return Err(Closed), // length below 6: no frame boundary any more
            }
        }
        if done > 0 {
            // Drop what was written once it is at least half of the output: each byte is moved
            // at most once on average, however many partial writes a large frame takes.
            if self.sent > 0 && self.sent >= self.output.len() / 2 {
                self.output.drain(..self.sent);
                self.sent = 0;
            }
            self.output.extend_from_slice(&self.input[..done]);
            self.input.copy_within(done..self.filled, 0);
            self.filled -= done;
        }
        Ok(())
    }

    /// Writes until the output is gone or the socket is full.
    fn flush(&mut self) -> Result<(), Closed> {
        while !self.write_blocked && self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(0) => return Err(Closed),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Closed),
            }
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
        Ok(())
    }

    /// Interest is READABLE, plus WRITABLE only while replies wait for room in the socket (as
    /// in the gateway's loop): no writable events, and no re-registration, while writes go
    /// through at once.
    fn update_interest(&mut self, registry: &Registry, token: Token) -> Result<(), Closed> {
        let wanted = self.pending() > 0;
        if wanted == self.write_interest {
            return Ok(());
        }
        let interest = if wanted {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        registry
            .reregister(&mut self.stream, token, interest)
            .map_err(|_| Closed)?;
        self.write_interest = wanted;
        Ok(())
    }
}

/// The echo-1t event loop: runs until `stop` is set (and the waker fires, or 50 ms pass).
fn echo_loop(mut poll: Poll, mut listener: MioListener, stop: &AtomicBool) -> io::Result<()> {
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<EchoConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            match event.token() {
                ECHO_WAKER => {}
                ECHO_LISTENER => echo_accept_all(&listener, poll.registry(), &mut conns, &mut free),
                token => {
                    let Some(index) = token.0.checked_sub(ECHO_FIRST_CONN) else {
                        continue;
                    };
                    let Some(conn) = conns.get_mut(index).and_then(Option::as_mut) else {
                        continue;
                    };
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        conn.may_read = true;
                    }
                    if event.is_writable() || event.is_write_closed() || event.is_error() {
                        conn.write_blocked = false;
                    }
                    let served = conn.pump();
                    let served = served.and_then(|()| conn.update_interest(poll.registry(), token));
                    if served.is_err() {
                        if let Some(mut conn) = conns[index].take() {
                            let _ = poll.registry().deregister(&mut conn.stream);
                            free.push(index);
                        }
                    }
                }
            }
        }
    }
    let _ = poll.registry().deregister(&mut listener);
    Ok(())
}

/// Accepts every pending client of the echo-1t listener (edge-triggered: until WouldBlock).
fn echo_accept_all(
    listener: &MioListener,
    registry: &Registry,
    conns: &mut Vec<Option<EchoConn>>,
    free: &mut Vec<usize>,
) {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // WouldBlock: all accepted. Anything else (EMFILE...): the clients already
            // connected keep being served, and the bench reports the connect that failed.
            Err(_) => return,
        };
        let index = free.pop().unwrap_or(conns.len());
        let token = Token(ECHO_FIRST_CONN + index);
        if registry
            .register(&mut stream, token, Interest::READABLE)
            .is_err()
        {
            free.push(index);
            continue;
        }
        let conn = Some(EchoConn::new(stream));
        match conns.get_mut(index) {
            Some(slot) => *slot = conn,
            None => conns.push(conn),
        }
    }
}
