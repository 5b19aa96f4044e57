//! Deterministic simulations of `ipc-gateway-core` (design.md section 4).
//!
//! This crate is empty until the simulation work (the Router end-to-end scenarios under a pure
//! harness and turmoil) lands. Until then the stub-mode invariants of gateway.md section 1 are
//! exercised by the core's event-script driver, `ipc_gateway_core::fuzzing::gateway_events`,
//! from core's property tests and the fuzz corpus.
