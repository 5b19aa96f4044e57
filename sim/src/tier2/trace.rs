//! The action trace of a run and its digest: every action the gateway shells carried out
//! and every reply an IDE host read, with the virtual time. Two runs of one seed must give
//! the same digest (design.md section 4); the digest is printed with the seed.

use std::fmt::Write as _;

/// FNV-1a over the trace lines; no allocation per line is kept, only the count and hash.
#[derive(Debug, Clone)]
pub struct Trace {
    hash: u64,
    lines: u64,
    /// The last lines, for a failure report (SIM_VERBOSE prints them all as they come).
    tail: std::collections::VecDeque<String>,
    verbose: bool,
}

const TAIL: usize = 64;

impl Default for Trace {
    fn default() -> Trace {
        Trace {
            hash: 0xcbf2_9ce4_8422_2325,
            lines: 0,
            tail: std::collections::VecDeque::new(),
            verbose: std::env::var_os("SIM_VERBOSE").is_some(),
        }
    }
}

impl Trace {
    /// Records one event at `nanos` of virtual time on `host`.
    pub fn record(&mut self, nanos: u64, host: &str, event: std::fmt::Arguments<'_>) {
        let mut line = String::new();
        let _ = write!(
            line,
            "{}.{:06} {host} {event}",
            nanos / 1_000_000_000,
            (nanos / 1000) % 1_000_000
        );
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.lines += 1;
        if self.verbose {
            eprintln!("{line}");
        }
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    pub fn digest(&self) -> u64 {
        self.hash
    }

    pub fn len(&self) -> u64 {
        self.lines
    }

    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// The last lines recorded.
    pub fn tail(&self) -> impl Iterator<Item = &String> {
        self.tail.iter()
    }
}
