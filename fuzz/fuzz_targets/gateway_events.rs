//! The whole core driven by an arbitrary event script (connects, bytes, half-closes,
//! hang-ups, partial writes, time jumps, shutdown), asserting gateway.md section 1.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ipc_gateway_core::fuzzing::gateway_events(data);
});
