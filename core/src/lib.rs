//! Sans-IO core of `ipc-gateway`.
//!
//! The contract: bytes and events go in through `handle_*` methods with the current time as an
//! argument; what to do comes out of `poll_action`, and when to call back out of
//! `poll_timeout`. Nothing here opens a socket, reads a clock, spawns a thread or draws
//! randomness other than from the configured seed, so the production daemon, the simulators
//! and the fuzzers all drive exactly the same logic. [`gateway::Gateway`] is the entry point;
//! its doc gives the call order.
//!
//! One state machine per module: [`frame`] (IPC codec), [`connection`] (one client),
//! [`inflight`] (requests and deadlines), [`breaker`] (circuit breaker), [`stub`] (the embedded
//! Router), routed together by [`gateway`].
//! [`nats_codec`] speaks the NATS client protocol (INFO … -ERR in, CONNECT … PONG out);
//! [`nats_session`] is the NATS upstream (connect, keepalive, reconnect, request-reply) over
//! [`nats_pool`] (servers, backoff), `nats_requests` (its request book and reconnect buffer)
//! and [`router_envelope`] (the Router request), configured by [`nats_config`].

#![forbid(unsafe_code)]

pub mod breaker;
pub mod capabilities;
pub mod connection;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod gateway;
pub mod inflight;
pub mod nats_codec;
pub mod nats_config;
pub mod nats_pool;
mod nats_requests;
pub mod nats_session;
pub mod payload;
pub mod rng;
pub mod router_envelope;
pub mod stub;
pub mod time;
pub mod upstream;

pub use connection::ConnId;
pub use gateway::{Action, Gateway, GatewayConfig, PeerCredentials};
pub use time::Instant;
