//! Sans-IO core of `ipc-gateway`.
//!
//! The contract: bytes and events go in through `handle_*` methods with the current time as an
//! argument; what to do comes out of `poll_action`, and when to call back out of
//! `poll_timeout`. Nothing here opens a socket, reads a clock, spawns a thread or draws
//! randomness other than from the configured seed, so the production daemon, the simulators
//! and the fuzzers all drive exactly the same logic. [`gateway::Gateway`] is the entry point;
//! its doc gives the call order.
//!
//! The layout follows the architecture (design.md):
//!
//! - [`ipc`]: what clients speak: [`frame`] (codec), [`connection`] (one client), [`payload`],
//!   [`capabilities`], [`error`].
//! - [`nats`]: the NATS upstream: [`nats_codec`], [`nats_session`], [`nats_pool`],
//!   [`nats_config`], [`router_envelope`].
//! - [`gateway`]: routing between clients, admission, the breaker, the in-flight table and the
//!   upstream; shutdown; health; invariants.
//! - [`upstream`]: the seam to whatever answers tasks, and the embedded [`stub`] Router.
//! - At the top, shared by all: [`breaker`], [`inflight`], [`output_queue`], [`time`],
//!   [`rng`].

#![forbid(unsafe_code)]

pub mod breaker;
pub mod fuzzing;
pub mod gateway;
pub mod inflight;
pub mod ipc;
pub mod nats;
pub mod output_queue;
pub mod rng;
pub mod time;
pub mod upstream;

// The flat paths the crate had before it was grouped into folders, so that its users do not
// churn: `ipc_gateway_core::frame` is `ipc_gateway_core::ipc::frame`, and so on.
pub use ipc::{capabilities, connection, error, frame, payload};
pub use nats::{
    codec as nats_codec, config as nats_config, envelope as router_envelope, pool as nats_pool,
    session as nats_session,
};
pub use upstream::stub;

pub use connection::ConnId;
pub use gateway::{Action, Gateway, GatewayConfig, PeerCredentials};
pub use time::Instant;
