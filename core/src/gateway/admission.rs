//! Admission: whether a task request may go to the upstream, decided in one function.
//!
//! The checks run in the order of gateway.md section 1 and the first that fails decides the
//! error: draining (6), invalid payload (4), the global in-flight limit (7), the circuit
//! breaker (8). The per-connection limit is not here: the connection stops decoding at it, so
//! a request over it waits rather than failing.

use bytes::Bytes;
use tracing::info;

use super::Gateway;
use crate::breaker::Permit;
use crate::connection::ConnId;
use crate::error::ErrorCode;
use crate::payload::{validate_task_payload, TaskPayload};
use crate::time::Instant;
use crate::upstream::Upstream;

/// Why a task request was refused: the code and the message of its error frame.
pub(super) type Refusal = (ErrorCode, String);

impl<U: Upstream> Gateway<U> {
    /// Admits a task request, or says why not. An admitted request holds a breaker permit.
    pub(super) fn admit(
        &mut self,
        conn: ConnId,
        payload: Bytes,
        now: Instant,
    ) -> Result<(TaskPayload, Permit), Refusal> {
        if self.is_shutting_down() {
            return Err((
                ErrorCode::ShuttingDown,
                "Shutting down: the gateway is draining".to_owned(),
            ));
        }
        let payload = validate_task_payload(payload).map_err(|m| (ErrorCode::InvalidPayload, m))?;
        if self.inflight.len() >= self.config.max_inflight {
            self.stats.backpressure_rejections += 1;
            info!(
                event = "backpressure_reject",
                component = "ipc_backpressure",
                conn_id = conn.0,
                inflight = self.inflight.len(),
                limit = self.config.max_inflight
            );
            return Err((
                ErrorCode::Overloaded,
                format!("Overloaded: {} requests in flight", self.inflight.len()),
            ));
        }
        let Some(permit) = self.breaker.try_acquire(now) else {
            return Err((
                ErrorCode::RouterUnavailable,
                "Router unavailable: circuit breaker open".to_owned(),
            ));
        };
        Ok((payload, permit))
    }
}
