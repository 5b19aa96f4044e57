//! The `nats` host: the tier-1 NATS server stand-in ([`crate::nats_standin`], sans-IO, the real
//! wire protocol) behind a turmoil listener on port 4222, a task per connection feeding it
//! bytes and writing what it queues for every connection (a message published on one
//! connection is output for another). A crash of the host drops the stand-in with it: a
//! restarted server starts empty, as a killed nats-server does.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use ipc_gateway_core::Instant;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use turmoil::net::tcp::OwnedWriteHalf;
use turmoil::net::TcpListener;

use super::gateway_host::write_now;
use super::obs::{sim_now, spawn_watched, SharedObs};
use super::router::NATS_PORT;
use crate::nats_standin::{ConnId, NatsStandin, ServerConfig};

/// The Routers' subject: what the gateways publish their requests to.
const SUBJECT: &str = "beamline.router.v1.decide";

struct Server {
    standin: RefCell<NatsStandin>,
    writes: RefCell<BTreeMap<ConnId, OwnedWriteHalf>>,
    wake: Notify,
}

fn now() -> Instant {
    Instant::from_nanos(u64::try_from(sim_now().as_nanos()).unwrap_or(u64::MAX))
}

impl Server {
    /// Writes what the stand-in queued for any connection; closes what it closed.
    fn flush(&self) {
        let ids = self.standin.borrow().conn_ids();
        for id in ids {
            if !self.standin.borrow().has_output(id) {
                continue;
            }
            let bytes = self.standin.borrow_mut().take_output(id);
            let failed = match self.writes.borrow_mut().get_mut(&id) {
                Some(w) => write_now(w, &bytes).is_err(),
                None => false,
            };
            if failed {
                self.standin.borrow_mut().close(id);
                self.writes.borrow_mut().remove(&id);
            }
        }
        let closed = self.standin.borrow_mut().take_server_closed();
        for id in closed {
            // The last words (`-ERR '…'`) of a connection the server closed.
            let bytes = self.standin.borrow_mut().take_closed_output(id);
            if let Some(mut w) = self.writes.borrow_mut().remove(&id) {
                let _ = write_now(&mut w, &bytes);
            }
        }
        self.wake.notify_one();
    }
}

/// Runs the nats host until it is crashed.
pub async fn run(config: ServerConfig, obs: SharedObs) -> turmoil::Result {
    obs.borrow_mut().nats_starts.push(sim_now());
    let listener = TcpListener::bind(("0.0.0.0", NATS_PORT)).await?;
    let server = Rc::new(Server {
        standin: RefCell::new(NatsStandin::new(config)),
        writes: RefCell::new(BTreeMap::new()),
        wake: Notify::new(),
    });
    let keepalive = server.clone();
    spawn_watched(&obs, "nats: keepalive".into(), async move {
        loop {
            let next = keepalive.standin.borrow().poll_timeout();
            match next {
                Some(t) => {
                    let wait = std::time::Duration::from_nanos(
                        t.as_nanos().saturating_sub(now().as_nanos()),
                    );
                    tokio::select! {
                        biased;
                        _ = keepalive.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {
                            keepalive.standin.borrow_mut().handle_timeout(now());
                            keepalive.flush();
                        }
                    }
                }
                None => keepalive.wake.notified().await,
            }
        }
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let who = turmoil::reverse_lookup(peer.ip()).unwrap_or_else(|| peer.ip().to_string());
        obs.borrow_mut().nats_accepts.push((sim_now(), who.clone()));
        let Some(id) = server.standin.borrow_mut().open(now()) else {
            continue;
        };
        let (mut read, write) = stream.into_split();
        server.writes.borrow_mut().insert(id, write);
        server.flush();
        let conn = server.clone();
        let what = format!("nats: conn {} from {who}", id.0);
        let o = obs.clone();
        spawn_watched(&obs, what, async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !conn.standin.borrow().is_open(id) {
                            break;
                        }
                        *o.borrow_mut()
                            .nats_read
                            .entry((who.clone(), peer.port()))
                            .or_default() += n as u64;
                        let had_connect = conn.standin.borrow().connect_info(id).is_some();
                        let published = conn.standin.borrow().published().len();
                        conn.standin.borrow_mut().handle_bytes(id, &buf[..n], now());
                        for p in &conn.standin.borrow().published()[published..] {
                            if p.subject != SUBJECT {
                                continue;
                            }
                            let body: serde_json::Value =
                                serde_json::from_slice(&p.payload).unwrap_or_default();
                            if let Some(tag) = body["task"]["payload"]["tag"].as_str() {
                                o.borrow_mut().published.push((
                                    sim_now(),
                                    who.clone(),
                                    tag.to_owned(),
                                ));
                            }
                        }
                        if !had_connect {
                            if let Some(info) = conn.standin.borrow().connect_info(id) {
                                o.borrow_mut()
                                    .nats_connects
                                    .push((who.clone(), info.clone()));
                            }
                        }
                        conn.flush();
                    }
                }
            }
            conn.standin.borrow_mut().close(id);
            conn.writes.borrow_mut().remove(&id);
            conn.flush();
        });
    }
}
