//! Clients that come and go while Router replies are on their way (found by
//! `ipc-gateway-stress leak --mode nats`).
//!
//! When a client leaves with requests in flight, the daemon may learn it from a failed write
//! of a Router reply, in the middle of a batch of events that still holds the departed
//! socket's hang-up. A new client accepted in the same batch must not inherit that event: it
//! was closed with its requests unanswered ("connection reset by peer"), about one in a
//! hundred clients under this churn.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{self, Daemon};
use ipc_gateway_tests::frame::{self, RESPONSE_OK, TASK_SUBMIT};
use ipc_gateway_tests::launch::StandIn;
use ipc_gateway_tests::nats_server::NatsServer;

/// Clients churning at once.
const CLIENTS: usize = 16;
/// How long they churn.
const CHURN: Duration = Duration::from_secs(8);
/// Requests each client sends on each connection.
const REQUESTS: usize = 10;

#[test]
fn clients_leaving_mid_flight_never_close_a_new_client() {
    let server = NatsServer::start();
    let url = server.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _standin = rt.block_on(StandIn::start(&url, 2)).unwrap();
    let daemon = Daemon::start(&[
        ("CGW_IPC_NATS_ENABLE", "1"),
        ("CGW_IPC_NATS_URL", &url),
        ("CGW_IPC_MAX_CONNECTIONS", "1000"),
    ]);
    daemon.wait_stderr_contains(r#""event":"nats_connected""#, daemon::START_TIMEOUT);

    let request = frame::encode(TASK_SUBMIT, b"{}").repeat(REQUESTS);
    let completed = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let until = Instant::now() + CHURN;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (request, completed, failures) = (
                request.clone(),
                Arc::clone(&completed),
                Arc::clone(&failures),
            );
            let socket = daemon.socket_path().to_path_buf();
            thread::spawn(move || {
                let mut round = w;
                while Instant::now() < until {
                    round += 1;
                    let mut conn = daemon::connect(&socket);
                    if round % 2 == 0 {
                        // Gone with its requests in flight, after reading a few replies.
                        let _ = conn.write_all(&request);
                        let _ =
                            (0..round % 3).try_for_each(|_| frame::read_frame(&mut conn).map(drop));
                        continue;
                    }
                    match whole_round_trip(&mut conn, &request) {
                        Ok(()) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("client {w}: {e}")),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let completed = completed.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} clients lost their connection with requests unanswered, e.g. {:?}",
        failures.len(),
        failures.len() as u64 + completed,
        &failures[..failures.len().min(5)]
    );
    assert!(completed >= 100, "only {completed} clients completed");
}

/// Every reply OK, then PING and exactly a PONG.
fn whole_round_trip(conn: &mut std::os::unix::net::UnixStream, request: &[u8]) -> io::Result<()> {
    conn.write_all(request)?;
    for n in 0..REQUESTS {
        match frame::read_frame(conn)? {
            Some(f) if f.kind == RESPONSE_OK => {}
            Some(f) => return Err(io::Error::other(format!("reply {n}: type {:#04X}", f.kind))),
            None => return Err(io::Error::other(format!("closed before reply {n}"))),
        }
    }
    conn.write_all(&frame::encode(frame::PING, &[]))?;
    let mut pong = [0u8; 6];
    conn.read_exact(&mut pong)?;
    if pong != daemon::PONG_BYTES {
        return Err(io::Error::other(format!("{pong:02X?} instead of a PONG")));
    }
    Ok(())
}
