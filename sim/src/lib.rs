//! Deterministic simulations of `ipc-gateway-core` (design.md section 4).
//!
//! - [`after_outage`]: the check both tiers run after every run: after an outage, the first
//!   request admitted once NATS is Connected again is published, not refused by the breaker.
//! - [`health`]: the check both tiers run after every input: the core's health agrees with
//!   what the shell sees (gateway.md section 5).
//! - [`nats_standin`]: a sans-IO NATS server stand-in speaking the real client protocol.
//! - [`router`]: Router behaviours (router.md section 5) as in-process subscribers of it.
//! - [`shutdown`]: the check both tiers run after every run that signals a gateway: the
//!   drain, its end and the exit (gateway.md section 8).
//! - [`tier1`]: the pure in-process harness.
//! - [`tier2`]: the core in a tokio shell over turmoil TCP, with `nats`, `router-*` and
//!   `ide-*` hosts, under network faults.
//!
//! Keep this file a plain list of modules: each simulation tier adds its own line.

pub mod after_outage;
pub mod health;
pub mod nats_standin;
pub mod router;
pub mod shutdown;
pub mod tier1;
pub mod tier2;
