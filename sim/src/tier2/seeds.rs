//! Which seeds a test runs, and the replay line printed when one fails.
//!
//! - `SIM_SEED=<n>`: replay exactly that seed (decimal or 0x-hex).
//! - `SIM_SEEDS=<n>`: a long sweep: `n` seeds from `SIM_SEED_BASE` (default: from the clock,
//!   printed), besides the committed regression seeds.
//! - neither: the committed regression seeds plus the test's small default sweep of fixed
//!   seeds, sized for CI.
//! - `SIM_VERBOSE=1`: print every trace line as it is recorded.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// splitmix64: spreads consecutive indexes over the seed space.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn parse(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The regression seeds of `scenario` from a committed list (`<scenario> <seed> [# why]`).
pub fn regressions(list: &str, scenario: &str) -> Vec<u64> {
    list.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == scenario).then(|| parse(w.next()?)).flatten()
        })
        .collect()
}

/// The seeds to run for one test.
pub fn seeds(scenario: &str, default_count: usize, regression: &[u64]) -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| parse(&s)) {
        return vec![seed];
    }
    let mut out = regression.to_vec();
    match std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    {
        Some(n) => {
            let base = std::env::var("SIM_SEED_BASE")
                .ok()
                .and_then(|s| parse(&s))
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0)
                });
            println!("tier2 {scenario}: sweep of {n} seeds from SIM_SEED_BASE={base}");
            out.extend((0..n as u64).map(|i| mix(base.wrapping_add(i))));
        }
        None => {
            let salt = scenario.bytes().fold(0u64, |h, b| mix(h ^ u64::from(b)));
            out.extend((0..default_count as u64).map(|i| mix(salt.wrapping_add(i))));
        }
    }
    out
}

/// Runs `f` for each seed; a failure prints the seed and the command that replays it.
pub fn for_each_seed(test: &str, seeds: &[u64], f: impl Fn(u64)) {
    for &seed in seeds {
        println!("tier2 {test}: seed={seed}");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(seed))) {
            eprintln!(
                "\ntier2 {test} FAILED with seed={seed}\nreplay: SIM_SEED={seed} cargo test -p sim --test tier2 {test} -- --exact --nocapture\n"
            );
            resume_unwind(panic);
        }
    }
}
