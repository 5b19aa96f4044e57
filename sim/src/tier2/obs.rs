//! What the hosts of one run record for the test to check afterwards. Hosts run on the test's
//! thread (turmoil is single-threaded), so sharing is `Rc<RefCell<…>>`, never a lock.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use super::gateway_host::Shell;
use super::trace::Trace;
use crate::after_outage::{GatewayLog, Mark};

/// One reply frame an IDE host read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: u8,
    pub payload: Vec<u8>,
    pub at: Duration,
}

impl Reply {
    /// The reply as the after-outage and shutdown checks judge it: 0 for a Router reply,
    /// else the error's code and message.
    pub fn judged(&self) -> crate::after_outage::Reply {
        let v: serde_json::Value = serde_json::from_slice(&self.payload).unwrap_or_default();
        let ok = self.kind == ipc_gateway_core::frame::kind::RESPONSE_OK;
        crate::after_outage::Reply {
            at: self.at,
            code: if ok {
                0
            } else {
                v["error"]["code"].as_u64().unwrap_or(0) as u16
            },
            message: v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

/// One request an IDE host sent, and what came back.
#[derive(Debug, Clone)]
pub struct Sent {
    pub tag: String,
    pub behaviour: String,
    pub at: Duration,
    pub reply: Option<Reply>,
}

/// An IDE host's view.
#[derive(Debug, Default, Clone)]
pub struct Client {
    pub sent: Vec<Sent>,
    /// Reply frames beyond the requests sent (a violation of "exactly one reply").
    pub extra_replies: usize,
    /// The connection ended before every reply came (`None`: it did not).
    pub lost_at: Option<Duration>,
    pub done: bool,
}

/// A Router request as the Router hosts saw it on the wire.
#[derive(Debug, Clone)]
pub struct RouterSeen {
    pub router: String,
    pub subject: String,
    pub reply_to: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Duration,
}

/// Everything shared by the hosts of one run.
#[derive(Default)]
pub struct Obs {
    pub trace: Trace,
    pub gateways: BTreeMap<String, Rc<Shell>>,
    pub clients: BTreeMap<String, Client>,
    /// The gateway host each IDE client connects to.
    pub client_gateway: BTreeMap<String, String>,
    pub router_seen: Vec<RouterSeen>,
    /// Connections the nats host accepted: (virtual time, peer host name).
    pub nats_accepts: Vec<(Duration, String)>,
    /// The CONNECT of every connection to the nats host: (peer host name, what it said).
    pub nats_connects: Vec<(String, crate::nats_standin::ConnectInfo)>,
    /// Times the nats host (re)started.
    pub nats_starts: Vec<Duration>,
    /// A task of some host panicked (tokio swallows panics of spawned tasks).
    pub panics: Vec<String>,
    /// Each gateway's link, breaker and requests read, in the order of events (the
    /// after-outage check, [`crate::after_outage`]).
    pub logs: BTreeMap<String, GatewayLog>,
    /// Router requests published on a nats host: (virtual time, the publishing host, the
    /// client's tag). Kept here: a crash drops the stand-in with what it recorded.
    pub published: Vec<(Duration, String, String)>,
    /// Bytes a nats host read from each client connection, by (peer host name, peer port):
    /// what a gateway's NATS send buffer counts as taken (`ShellOptions::nats_sndbuf`).
    pub nats_read: BTreeMap<(String, u16), u64>,
    /// The order of events, for [`Mark`]s.
    ord: u64,
}

impl Obs {
    /// Now, in the order of events.
    pub fn mark(&mut self) -> Mark {
        self.ord += 1;
        Mark {
            ord: self.ord,
            at: sim_now(),
        }
    }
}

pub type SharedObs = Rc<RefCell<Obs>>;

/// The simulation's virtual time, the same for every host.
pub fn sim_now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// Spawns a task on the current host whose panic is recorded rather than lost: tokio drops
/// the panic of a spawned task, and an assertion the test never hears of cannot fail it.
pub fn spawn_watched<F>(obs: &SharedObs, what: String, fut: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + 'static,
{
    struct Guard {
        obs: SharedObs,
        what: String,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            if std::thread::panicking() {
                if let Ok(mut o) = self.obs.try_borrow_mut() {
                    o.panics.push(self.what.clone());
                }
            }
        }
    }
    let guard = Guard {
        obs: obs.clone(),
        what,
    };
    tokio::task::spawn_local(async move {
        let _guard = guard;
        fut.await;
    })
}
