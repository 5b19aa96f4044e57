//! Tier 2 scenarios (issue 4, items 2–5): the core in its tokio shell over turmoil TCP, the
//! NATS stand-in, Router and IDE hosts, under faults. Each test runs its seeds (see
//! `sim::tier2::seeds`: SIM_SEED replays one, SIM_SEEDS=N sweeps), prints each seed and its
//! options, checks gateway.md section 1's invariants after every run plus its own, and on
//! failure prints the replay command.

use std::time::Duration;

use sim::nats_standin::ServerConfig;
use sim::tier2::ide::{IdeSpec, Req};
use sim::tier2::seeds::{for_each_seed, regressions, seeds};
use sim::tier2::{Options, Run};

const REGRESSIONS: &str = include_str!("tier2_seeds.txt");

fn run_seeds(test: &str, default_count: usize, f: impl Fn(u64)) {
    let list = seeds(test, default_count, &regressions(REGRESSIONS, test));
    for_each_seed(test, &list, f);
}

fn ide(name: &str, gateway: usize, requests: Vec<Req>, window: usize) -> IdeSpec {
    IdeSpec {
        name: name.to_owned(),
        gateway: Options::gateway_name(gateway),
        start_delay: Duration::from_millis(200),
        requests,
        window,
        gap: Duration::ZERO,
        reply_deadline: Duration::from_secs(10),
        leave: false,
        read_pause: Duration::ZERO,
    }
}

/// The replies of one client, as (kind, parsed JSON).
fn replies(run: &Run, client: &str) -> Vec<(u8, serde_json::Value)> {
    run.obs.borrow().clients[client]
        .sent
        .iter()
        .map(|s| {
            let r = s.reply.as_ref().expect("a reply");
            (r.kind, serde_json::from_slice(&r.payload).unwrap_or_default())
        })
        .collect()
}

const OK: u8 = 0x10;
const ERR: u8 = 0x11;

/// (a) Pipelined clients on two gateways all get their Router replies, in order.
#[test]
fn happy_path_pipelined() {
    run_seeds("happy_path_pipelined", 2, |seed| {
        let mut opts = Options::from_seed(seed);
        let mut rng = opts.rng(1);
        opts.gateways = 2;
        opts.routers = 1 + rng.below(2) as usize;
        let clients = 2 + rng.below(3) as usize;
        let per = 10 + rng.below(20) as usize;
        let window = 1 + rng.below(10) as usize;
        println!("tier2 happy_path_pipelined: clients={clients} requests_each={per} window={window}");
        let mut run = Run::new(opts, ServerConfig::default());
        for c in 0..clients {
            run.ide(ide(&format!("ide-{c}"), c % 2, (0..per).map(|_| Req::new("ok", 0)).collect(), window));
        }
        run.finish(Duration::from_secs(2));
        run.summary();
        run.check_invariants();
        for c in 0..clients {
            for (i, (kind, v)) in replies(&run, &format!("ide-{c}")).iter().enumerate() {
                assert_eq!(*kind, OK, "ide-{c} reply {i}: {v}");
                assert_eq!(v["ok"], true);
            }
        }
    });
}
