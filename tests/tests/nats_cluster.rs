//! Failover in a NATS cluster and server discovery (gateway.md section 2: servers learned from
//! INFO `connect_urls` are added to the rotation).
//!
//! Three nats-server nodes on loopback, fully meshed; the Router double on node 2. The daemon
//! is configured with node 0 only (or nodes 0 and 1), so the other nodes are known to it only
//! from the `connect_urls` of node 0's INFO. Killing the configured node(s) under load: traffic
//! continues through a node the daemon was never told about, which proves the discovery as
//! well as the failover; every request still gets exactly one reply by its deadline + 1 s.
//!
//! The breaker keeps its default settings: the requests that fail together at the kill are
//! the link's failures, not the Router's, and do not open it (gateway.md section 4).

use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::wait_until;
use ipc_gateway_tests::nats_load::{
    check_outcomes_and_deadlines, nats_connected_count, router_double_success, start_nats_daemon,
    stats, summary, Load,
};
use ipc_gateway_tests::nats_server::NatsCluster;
use ipc_gateway_tests::router_double::RouterDouble;
use serde_json::{json, Value};

const TIMEOUT_MS: u64 = 4000;
const LATE_SLACK: Duration = Duration::from_secs(1);
const WITHIN: Duration = Duration::from_secs(20);
/// The node the Router double is on; never killed.
const DOUBLE_NODE: usize = 2;

fn payload(client: usize, n: u64) -> Value {
    json!({"task_type": "cluster_test", "client": client, "n": n})
}

/// The port of the server in a stats line (`nats_server`, e.g. `127.0.0.1:4222`).
fn stats_port(stats: &Value) -> Option<u16> {
    stats["nats_server"]
        .as_str()?
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// Configures the daemon with the nodes `configured`, kills the nodes `killed` one after the
/// other under load (waiting after each kill until the daemon is connected elsewhere), and
/// checks that traffic goes on through a node it was not configured with.
fn failover(configured: &[usize], killed: &[usize]) {
    let mut cluster = NatsCluster::start(3);
    let _double = RouterDouble::start(&cluster.url(DOUBLE_NODE));
    let urls: Vec<String> = configured.iter().map(|&i| cluster.url(i)).collect();
    let daemon = start_nats_daemon(&urls.join(","), TIMEOUT_MS);
    let load = Load::start(
        &daemon,
        4,
        4,
        Duration::ZERO,
        payload,
        router_double_success(),
    );
    load.wait_more_oks(100, WITHIN);

    let ports: Vec<u16> = (0..cluster.len()).map(|i| cluster.node(i).port()).collect();
    let mut kill_times = Vec::new();
    for &node in killed {
        // The daemon is on a configured node at first (it knows no other before its first
        // INFO); after a kill it may be anywhere. Kill the one it is on when it is one of
        // ours to kill, so that every kill is a failover.
        let before = stats(&daemon);
        let on = stats_port(&before).expect("nats_server in the stats line");
        assert!(
            ports.contains(&on),
            "the daemon is on port {on}, not a cluster node: {before}"
        );
        let connections = nats_connected_count(&daemon);
        kill_times.push(Instant::now());
        cluster.kill(node);
        if on == ports[node] {
            wait_until("the daemon connects to another node", WITHIN, || {
                nats_connected_count(&daemon) > connections
            });
        }
    }
    let last_kill = *kill_times.last().expect("at least one node killed");
    load.wait_ok_after(last_kill + Duration::from_secs(1), WITHIN);
    load.wait_more_oks(100, WITHIN);
    let now_on = stats(&daemon);
    let records = load.stop();

    let port = stats_port(&now_on).expect("nats_server in the stats line");
    let configured_ports: Vec<u16> = configured.iter().map(|&i| ports[i]).collect();
    assert!(
        ports.contains(&port) && !configured_ports.contains(&port),
        "after the kills the daemon should be on a node it learned from connect_urls, not one \
         of {configured_ports:?}: {now_on}"
    );
    assert_eq!(now_on["nats_state"], json!("connected"), "{now_on}");

    eprintln!("{}; now on port {port}", summary(&records));
    check_outcomes_and_deadlines(&records, Duration::from_millis(TIMEOUT_MS) + LATE_SLACK);
}

/// Configured with node 0 only; node 0 is killed; traffic goes on through node 1 or 2.
#[test]
fn failover_to_a_node_learned_from_connect_urls() {
    failover(&[0], &[0]);
}

/// Configured with nodes 0 and 1; both are killed; traffic goes on through node 2, which
/// only node 0's or node 1's INFO named.
#[test]
fn failover_when_every_configured_node_is_gone() {
    failover(&[0, 1], &[0, 1]);
}
