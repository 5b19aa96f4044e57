//! The IPC frame decoder: same frames and same error whatever the split, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ipc_gateway_core::fuzzing::frame_decoder(data);
});
