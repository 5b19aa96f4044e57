//! Support for the black-box tests and the load generator.
//!
//! Everything here is written from `shared/spec/ipc-protocol.md` alone and shares no code with
//! `ipc-gateway-core`, so that a misreading of the spec in the core cannot hide itself by being
//! repeated in its tests.

pub mod daemon;
pub mod figures;
pub mod frame;
pub mod golden;
pub mod http_client;
pub mod launch;
pub mod nats_load;
pub mod nats_server;
pub mod router_double;
pub mod secure_nats;
