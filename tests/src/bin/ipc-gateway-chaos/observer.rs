//! The outside observer: judges every reply the well-behaved clients get against gateway.md
//! section 1, collects violations from every source, and keeps the fault log (when each fault
//! ran, and when the next success came after it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc_gateway_tests::nats_load::{outcome_problem, Outcome, Record};

use crate::schedule::Planned;

/// One broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Seconds since the start of the run.
    pub at: f64,
    /// Who saw it: `client`, `churn`, `garbage`, `daemon`, …
    pub source: String,
    pub text: String,
}

/// One fault as it ran.
#[derive(Debug, Clone)]
pub struct FaultRun {
    pub planned: Planned,
    /// What it acted on, resolved (e.g. `node 2 (port 4567)`).
    pub target: String,
    pub started: Instant,
    /// When the fault was over: the node accepting again, the double subscribed again, the
    /// burst ended.
    pub ended: Option<Instant>,
    /// What happened, for the summary (e.g. the garbage cases sent).
    pub notes: Vec<String>,
}

/// Shared by every thread of the run.
pub struct Observer {
    pub start: Instant,
    /// The request timeout plus the allowed lateness: no reply may take longer.
    pub deadline: Duration,
    shutting_down: AtomicBool,
    violations: Mutex<Vec<Violation>>,
    outcomes: Mutex<BTreeMap<String, u64>>,
    faults: Mutex<Vec<FaultRun>>,
}

impl Observer {
    pub fn new(start: Instant, deadline: Duration) -> Observer {
        Observer {
            start,
            deadline,
            shutting_down: AtomicBool::new(false),
            violations: Mutex::new(Vec::new()),
            outcomes: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Seconds since the start of the run.
    pub fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }

    /// From now on error 6 is an allowed answer (the daemon was told to shut down).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Judges one reply of a well-behaved client.
    pub fn record(&self, r: &Record) {
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        if let Some(problem) = outcome_problem(r, self.deadline, shutting_down) {
            self.violation_at(r.answered, "client", problem);
        }
        let key = match r.outcome {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Error(code) => format!("error {code}"),
        };
        *lock(&self.outcomes).entry(key).or_default() += 1;
    }

    pub fn violation(&self, source: &str, text: impl Into<String>) {
        self.violation_at(Instant::now(), source, text);
    }

    pub fn violation_at(&self, at: Instant, source: &str, text: impl Into<String>) {
        let v = Violation {
            at: self.secs(at),
            source: source.to_owned(),
            text: text.into(),
        };
        eprintln!("VIOLATION [{:7.1}s] {}: {}", v.at, v.source, v.text);
        lock(&self.violations).push(v);
    }

    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.violations).clone()
    }

    pub fn violation_count(&self) -> usize {
        lock(&self.violations).len()
    }

    /// Replies so far by outcome (`ok`, `error 5`, …).
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        lock(&self.outcomes).clone()
    }

    /// A fault starts; returns its slot for [`Observer::fault_note`] and
    /// [`Observer::fault_ended`].
    pub fn fault_started(&self, planned: &Planned, target: String) -> usize {
        let mut faults = lock(&self.faults);
        faults.push(FaultRun {
            planned: planned.clone(),
            target,
            started: Instant::now(),
            ended: None,
            notes: Vec::new(),
        });
        faults.len() - 1
    }

    pub fn fault_note(&self, slot: usize, note: impl Into<String>) {
        if let Some(f) = lock(&self.faults).get_mut(slot) {
            f.notes.push(note.into());
        }
    }

    pub fn fault_ended(&self, slot: usize) {
        if let Some(f) = lock(&self.faults).get_mut(slot) {
            f.ended = Some(Instant::now());
        }
    }

    pub fn faults(&self) -> Vec<FaultRun> {
        lock(&self.faults).clone()
    }

    /// The faults running now, by name (for the progress line).
    pub fn active_faults(&self) -> Vec<String> {
        lock(&self.faults)
            .iter()
            .filter(|f| f.ended.is_none())
            .map(|f| format!("{} {}", f.planned.kind, f.target))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
