//! Shutdown (gateway.md section 8) as one state machine, with the upstream's close in it.
//!
//! ```text
//!          handle_shutdown          every client answered and written
//! Running ───────────────▶ Draining ─────────────────────────────────────┐
//!                            │ drain deadline: leftovers get error 6       │
//!                            ▼                                             ▼
//!                         Flushing ── written, or FLUSH_GRACE over ──▶ ClosingUpstream
//!                                                                         │ upstream closed
//!  any state but Done ── handle_shutdown again (second signal) ──┐        ▼
//!                         upstream aborted                       └────▶ Done: ShutdownComplete
//! ```
//!
//! The labels are the variants of [`Shutdown`]; [`Gateway::advance_shutdown`] is the one
//! place that moves between them, and [`Gateway::enter_shutdown`] the one place that acts on
//! entering a state. `ShutdownComplete` is emitted only once the upstream is closed, so the
//! NATS session's flush and close happen before the shell exits, in every shell alike.

use std::time::Duration;

use tracing::{info, warn};

use super::{Action, Gateway};
use crate::breaker::Outcome;
use crate::error::{error_frame, ErrorCode};
use crate::time::Instant;
use crate::upstream::Upstream;

/// After the drain deadline, how long pending reply bytes may still be flushed before the
/// gateway gives up on clients that do not read.
pub const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// Where the gateway is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Serving.
    Running,
    /// A signal came: new tasks get error 6, tasks in flight are answered until `deadline`.
    Draining { deadline: Instant },
    /// The drain deadline passed and the leftovers got error 6: reply bytes are written
    /// until `give_up_at`; clients that do not read are not waited for beyond it.
    Flushing { give_up_at: Instant },
    /// Every client is answered (or given up on): the upstream flushes and closes.
    ClosingUpstream,
    /// `ShutdownComplete` was emitted: the shell exits.
    Done,
}

impl Shutdown {
    /// The name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Shutdown::Running => "running",
            Shutdown::Draining { .. } => "draining",
            Shutdown::Flushing { .. } => "flushing",
            Shutdown::ClosingUpstream => "closing_upstream",
            Shutdown::Done => "done",
        }
    }

    /// When the state ends by itself.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Shutdown::Draining { deadline } => Some(deadline),
            Shutdown::Flushing { give_up_at } => Some(give_up_at),
            Shutdown::Running | Shutdown::ClosingUpstream | Shutdown::Done => None,
        }
    }
}

impl<U: Upstream> Gateway<U> {
    /// SIGTERM/SIGINT: new task requests get error 6; requests in flight are answered until
    /// the drain timeout, then get error 6; reply bytes are flushed; the upstream flushes and
    /// closes; then the shell is told `ShutdownComplete { forced: false }`. A second call (a
    /// second signal) aborts the upstream and emits `ShutdownComplete { forced: true }` at
    /// once. The shell closes the listener itself.
    pub fn handle_shutdown(&mut self, now: Instant) {
        match self.shutdown {
            Shutdown::Running => {
                info!(
                    event = "shutdown_started",
                    component = "ipc_bridge",
                    inflight = self.inflight.len(),
                    connections = self.clients.len(),
                    drain_ms = self.config.drain_timeout.as_millis() as u64
                );
                let deadline = now + self.config.drain_timeout;
                self.enter_shutdown(Shutdown::Draining { deadline }, now);
            }
            Shutdown::Done => {}
            Shutdown::Draining { .. } | Shutdown::Flushing { .. } | Shutdown::ClosingUpstream => {
                warn!(
                    event = "shutdown_forced",
                    component = "ipc_bridge",
                    phase = self.shutdown.name(),
                    inflight = self.inflight.len(),
                    "second signal: exiting at once"
                );
                self.upstream.handle_abort(now);
                self.deliver_outcomes(now);
                self.shutdown = Shutdown::Done;
                self.emit_shutdown_complete(now, true);
            }
        }
        self.finish_turn(now);
    }

    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown != Shutdown::Running
    }

    /// Whether new requests can succeed now (`/ready`, gateway.md section 5): not draining,
    /// a link up (NATS connected, or the stub), the breaker not Open. `Err` is the one line
    /// saying why not. Unlike [`Gateway::health`], a link lost within the grace period is
    /// already not ready: requests sent now wait in the reconnect buffer or fail.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.shutdown != Shutdown::Running {
            Err("draining")
        } else if self.breaker.state() == crate::breaker::BreakerState::Open {
            Err("breaker open")
        } else if self.upstream.link().is_none() {
            Err("nats not connected")
        } else {
            Ok(())
        }
    }

    /// Where the shutdown is.
    pub fn shutdown_state(&self) -> Shutdown {
        self.shutdown
    }

    /// The one transition function: moves on while the current state's exit condition holds.
    pub(super) fn advance_shutdown(&mut self, now: Instant) {
        loop {
            let next = match self.shutdown {
                Shutdown::Running | Shutdown::Done => return,
                Shutdown::Draining { deadline } => {
                    if self.clients_flushed() {
                        Shutdown::ClosingUpstream
                    } else if now >= deadline {
                        Shutdown::Flushing {
                            give_up_at: deadline + FLUSH_GRACE,
                        }
                    } else {
                        return;
                    }
                }
                Shutdown::Flushing { give_up_at } => {
                    if self.clients_flushed() || now >= give_up_at {
                        Shutdown::ClosingUpstream
                    } else {
                        return;
                    }
                }
                Shutdown::ClosingUpstream => {
                    if self.upstream.is_closed() {
                        Shutdown::Done
                    } else {
                        return;
                    }
                }
            };
            self.enter_shutdown(next, now);
        }
    }

    /// What entering a state does; the only place that changes `self.shutdown`, apart from
    /// the second signal.
    fn enter_shutdown(&mut self, next: Shutdown, now: Instant) {
        info!(
            event = "shutdown_phase",
            component = "ipc_bridge",
            from = self.shutdown.name(),
            to = next.name()
        );
        self.shutdown = next;
        match next {
            Shutdown::Running | Shutdown::Draining { .. } => {}
            Shutdown::Flushing { .. } => self.fail_leftovers(now),
            Shutdown::ClosingUpstream => self.upstream.handle_shutdown(now),
            Shutdown::Done => {
                info!(
                    event = "shutdown_complete",
                    component = "ipc_bridge",
                    flushed = self.clients_flushed()
                );
                self.emit_shutdown_complete(now, false);
            }
        }
    }

    /// The last action: whatever the upstream asked for on its way out (the `Disconnect` of
    /// its socket) goes before it, since the shell stops at `ShutdownComplete`. A flush still
    /// held is dropped: a closed upstream has no output.
    fn emit_shutdown_complete(&mut self, now: Instant, forced: bool) {
        self.collect_upstream_actions(now);
        self.held_flush = None;
        self.actions.push_back(Action::ShutdownComplete { forced });
    }

    /// Every request in flight holds a slot on its connection (`assert_invariants`), so no
    /// unanswered slot anywhere also means nothing in flight.
    fn clients_flushed(&self) -> bool {
        self.clients
            .values()
            .all(|c| c.conn.unanswered_slots() == 0 && !c.conn.has_output())
    }

    /// The drain deadline passed: what is still in flight gets error 6.
    fn fail_leftovers(&mut self, now: Instant) {
        for id in self.inflight.ids() {
            if let Some(entry) = self.inflight.remove(id) {
                self.upstream.cancel(id);
                self.breaker.record(entry.permit, Outcome::Abandoned, now);
                let rid = self.request_id_text(id);
                let frame = error_frame(
                    ErrorCode::ShuttingDown,
                    "Shutting down: the drain timeout passed before the Router replied",
                    Some(&rid),
                );
                self.complete(id, entry, frame, ErrorCode::ShuttingDown.code(), now);
            }
        }
        self.resume_decoding(now);
    }
}
