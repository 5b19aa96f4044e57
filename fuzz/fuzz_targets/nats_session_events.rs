//! The NATS session driven by a script of socket events and server operations: one outcome
//! per request, none after cancel, bounded buffer, nothing held at the end, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ipc_gateway_core::fuzzing::nats_session_events(data);
});
