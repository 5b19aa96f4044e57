//! The seam between the gateway and whatever answers tasks.
//!
//! The gateway hands each admitted task to an [`Upstream`] and learns how it ended from
//! [`Upstream::poll_event`]. Two implementations exist: the embedded stub Router
//! ([`crate::stub::StubUpstream`]) and, with NATS enabled, the NATS session. Both are sans-IO
//! in the same way as the gateway: they take time as an argument and report deadlines through
//! `poll_timeout`, so the gateway's pump drives them without knowing which one it has.
//!
//! Deadlines belong to the gateway, not the upstream: the gateway times a request out, then
//! calls [`Upstream::cancel`] so the upstream forgets its reply token. An upstream that reports
//! an id the gateway no longer knows is normal (a late or duplicate reply) and is counted.

pub mod stub;

use bytes::Bytes;

use crate::breaker::Outcome;
use crate::error::ErrorCode;
use crate::frame::kind;
use crate::inflight::RequestId;
use crate::payload::TaskPayload;
use crate::time::Instant;

/// Which task message a request came from; the Router request keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Submit,
    Query,
    Cancel,
}

impl TaskKind {
    /// The task kind of an IPC message type, if it is a task message.
    pub fn from_frame_kind(k: u8) -> Option<TaskKind> {
        match k {
            kind::TASK_SUBMIT => Some(TaskKind::Submit),
            kind::TASK_QUERY => Some(TaskKind::Query),
            kind::TASK_CANCEL => Some(TaskKind::Cancel),
            _ => None,
        }
    }

    /// The name used in logs and in the Router request's metadata.
    pub fn method(self) -> &'static str {
        match self {
            TaskKind::Submit => "task_submit",
            TaskKind::Query => "task_query",
            TaskKind::Cancel => "task_cancel",
        }
    }
}

/// One task handed to the upstream.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub id: RequestId,
    pub kind: TaskKind,
    pub payload: TaskPayload,
    pub deadline: Instant,
}

/// What a gateway hands its upstream at construction: both derived once, from the gateway's
/// seed, by [`Identity::derive`] in [`crate::gateway::Gateway::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The request id prefix, so ids differ between gateway instances and the Router sees the
    /// ids the client sees.
    pub instance: u32,
    /// Seeds the upstream's own random choices (inbox name, jitter, server shuffle, trace
    /// ids), on a stream apart from the gateway's.
    pub seed: u64,
}

impl Identity {
    /// The one derivation: the prefix is the first draw of the gateway's seeded RNG; the
    /// upstream draws from a stream of its own.
    pub fn derive(gateway_seed: u64) -> Identity {
        Identity {
            instance: crate::rng::Rng::new(gateway_seed).next_u64() as u32,
            seed: gateway_seed ^ 0x6e61_7473_5f73_6573,
        }
    }
}

/// A request id as the Router and the client see it: `{instance:08x}-{n}`, the text
/// `Gateway::request_id_text` produces. The NATS session formats it only on its own path, so
/// stub mode pays nothing for it.
pub fn request_id_text(instance: u32, id: RequestId) -> String {
    format!("{instance:08x}-{}", id.0)
}

/// Why an upstream gave up on a request without a Router reply. The circuit breaker judges the
/// Router by it ([`crate::breaker::Outcome`]), so it is a type rather than something read off
/// the error code: no upstream can make a link failure count against the Router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// The NATS server answered that nobody subscribes to the Router's subject (503).
    NoResponders,
    /// The link failed it: lost after the write, held in the reconnect buffer until its
    /// deadline, refused by a full buffer.
    Link,
    /// It cannot be carried (too large, unencodable) or the upstream is closing.
    Refused,
}

impl From<FailureCause> for Outcome {
    fn from(cause: FailureCause) -> Outcome {
        match cause {
            FailureCause::NoResponders => Outcome::NoResponders,
            FailureCause::Link => Outcome::LinkFailed,
            FailureCause::Refused => Outcome::Abandoned,
        }
    }
}

/// How a request ended, as reported by the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// The Router answered; the bytes go back to the client verbatim.
    Reply { id: RequestId, payload: Bytes },
    /// The upstream could not get an answer; the client gets this error.
    Failed {
        id: RequestId,
        code: ErrorCode,
        message: String,
        cause: FailureCause,
    },
}

/// A source of answers to tasks, driven by the gateway's pump.
///
/// The gateway owns its upstream and is its only caller: the shell feeds it through
/// [`crate::gateway::Gateway::handle_upstream`] and gets its actions through
/// [`crate::gateway::Gateway::poll_action`] as [`crate::gateway::Action::Upstream`], so that
/// the order of everything is decided in one place.
pub trait Upstream: Sized {
    /// What builds one, apart from its [`Identity`].
    type Config;
    /// What the shell reports about the upstream's own I/O (the NATS socket's events).
    type Input<'a>;
    /// What the shell must do for the upstream (open, write, close the NATS socket).
    type Action: std::fmt::Debug;

    /// Builds the upstream; [`crate::gateway::Gateway::new`] calls it.
    fn new(config: Self::Config, identity: Identity) -> Self;
    /// Takes a request; its outcome arrives later through [`Upstream::poll_event`].
    fn submit(&mut self, request: UpstreamRequest, now: Instant);
    /// Forgets a request whose answer is no longer wanted (timeout, client gone, drain end).
    fn cancel(&mut self, id: RequestId);
    /// An event of the upstream's own I/O.
    fn handle_input(&mut self, input: Self::Input<'_>, now: Instant);
    /// Lets time pass; calling it early is harmless.
    fn handle_timeout(&mut self, now: Instant);
    /// Every client has been answered: flush what is queued and close. Once closed,
    /// [`Upstream::is_closed`] says so.
    fn handle_shutdown(&mut self, now: Instant);
    /// A second signal: close at once, failing whatever is still held.
    fn handle_abort(&mut self, now: Instant);
    /// When [`Upstream::handle_timeout`] next has work to do.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next outcome, polled until `None`.
    fn poll_event(&mut self) -> Option<UpstreamEvent>;
    /// The next thing the shell must do, polled until `None`.
    fn poll_action(&mut self) -> Option<Self::Action>;
    /// Whether the action is the flush of queued output. The gateway holds the flush until
    /// the shell's next `handle_timeout` (at the latest the end of its turn) and hands it out
    /// after everything else, so that requests from many clients leave in one write.
    fn is_flush(action: &Self::Action) -> bool;
    /// Whether a shutdown has closed it (nothing more will be written).
    fn is_closed(&self) -> bool;
    /// Requests the upstream still holds (for the no-leak invariant).
    fn pending(&self) -> usize;
    /// Whether request `id` is on the wire of the link that is up now, so that only the Router
    /// can answer it. Asked when its deadline passes: only such a request timing out counts
    /// against the Router ([`crate::breaker::Outcome::RouterSilent`]); one that never left the
    /// reconnect buffer, or waited in it before it was written, is the link's failure.
    fn awaiting_router(&self, id: RequestId) -> bool;
    /// The link to the Router: `Some(n)` while the n-th link is up, `None` while there is none.
    /// The gateway tells the breaker when a link is lost and when one is back. An upstream with
    /// no link (the stub) is always `Some(0)`.
    fn link(&self) -> Option<u64> {
        Some(0)
    }
    /// Why the link cannot come up by itself: the server refused the credentials or TLS
    /// failed (e.g. `nats auth failed: Authorization Violation`). Set on such a failure,
    /// cleared when a link comes up; health is UNHEALTHY with it at once, since waiting out
    /// the grace period would only hide a mistake that reconnecting cannot fix.
    fn link_failure(&self) -> Option<&str> {
        None
    }
    /// Checks the upstream's own invariants against its own configured bounds; panics with a
    /// description of the first violated one. [`crate::gateway::Gateway::assert_invariants`]
    /// calls it.
    fn assert_invariants(&self);
    /// Whether it holds nothing any more (no request, no buffered byte).
    fn is_quiescent(&self) -> bool {
        self.pending() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request id prefix is the gateway RNG's first draw (ids differ between instances),
    /// and the upstream's seed is a stream apart from the gateway's.
    #[test]
    fn identity_is_derived_once_from_the_gateway_seed() {
        let a = Identity::derive(42);
        assert_eq!(a.instance, crate::rng::Rng::new(42).next_u64() as u32);
        assert_ne!(a.seed, 42, "the upstream draws from its own stream");
        assert_eq!(a, Identity::derive(42), "the same seed, the same identity");
        assert_ne!(a.instance, Identity::derive(43).instance);
    }

    #[test]
    fn task_kinds_are_the_three_task_messages() {
        let kinds: Vec<Option<TaskKind>> = (0..=255u8).map(TaskKind::from_frame_kind).collect();
        assert_eq!(kinds.iter().flatten().count(), 3);
        assert_eq!(kinds[1], Some(TaskKind::Submit));
        assert_eq!(kinds[2], Some(TaskKind::Query));
        assert_eq!(kinds[3], Some(TaskKind::Cancel));
        let methods = [TaskKind::Submit, TaskKind::Query, TaskKind::Cancel].map(TaskKind::method);
        assert_eq!(methods, ["task_submit", "task_query", "task_cancel"]);
    }
}
