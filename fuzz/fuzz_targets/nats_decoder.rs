//! The NATS decoder: same ops and same error whatever the split, bounded memory, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ipc_gateway_core::fuzzing::nats_decoder(data);
});
