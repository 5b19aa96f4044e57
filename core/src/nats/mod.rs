//! The NATS side: the gateway's upstream when NATS is enabled (gateway.md section 2).
//!
//! [`codec`] speaks the NATS client protocol (INFO … -ERR in, CONNECT … PONG out);
//! [`session`] is the NATS upstream (connect, keepalive, reconnect, request-reply) over
//! [`pool`] (servers, backoff), `requests` (its request book and reconnect buffer) and
//! [`envelope`] (the Router request), configured by [`config`]; [`auth`] fills CONNECT's
//! credentials.

pub mod auth;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod pool;
mod requests;
pub mod session;
