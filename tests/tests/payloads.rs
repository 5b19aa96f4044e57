//! Payload sizes (ipc-protocol.md section 5: payloads up to the maximum frame are accepted,
//! where the C gateway broke at about 8 KB), against the stub Router's echo.

use ipc_gateway_tests::daemon::{
    expect_echo, expect_error_code, object_of_len, ping, recv, send, Daemon,
};
use ipc_gateway_tests::frame::{RESPONSE_OK, TASK_SUBMIT};
use serde_json::{json, Value};

/// The largest payload of the default 4 MiB frame.
const MAX_PAYLOAD: usize = 4_194_304 - 6;

fn echo_of_len(len: usize) {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    let payload = object_of_len(len);
    send(&mut stream, TASK_SUBMIT, &payload);
    let reply = recv(&mut stream);
    assert_eq!(
        reply.kind,
        RESPONSE_OK,
        "{len}-byte payload answered with type {:#04X}: {:?}",
        reply.kind,
        String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(500)])
    );
    let sent: Value = serde_json::from_slice(&payload).unwrap();
    expect_echo(&reply, &sent);
    ping(&mut stream);
}

/// The smallest payloads. One byte cannot be a JSON object, so the 1-byte case is `7` and
/// must get error 4 (connection open); the smallest object is `{}`, 2 bytes, echoed.
#[test]
fn smallest_payloads() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    send(&mut stream, TASK_SUBMIT, b"7");
    expect_error_code(&mut stream, 4);
    send(&mut stream, TASK_SUBMIT, b"{}");
    expect_echo(&recv(&mut stream), &json!({}));
}

/// An 8 KiB object (where the C gateway broke) is echoed.
#[test]
fn payload_8_kib_is_echoed() {
    echo_of_len(8 * 1024);
}

/// A 1 MiB object is echoed.
#[test]
fn payload_1_mib_is_echoed() {
    echo_of_len(1024 * 1024);
}

/// The largest payload, 4194298 bytes (the frame is exactly 4 MiB), is accepted and echoed.
/// The reply frame is larger than 4 MiB: the limit is on incoming frames, and the stub's
/// reply is the Router's answer, returned verbatim.
#[test]
fn payload_of_maximum_size_is_echoed() {
    echo_of_len(MAX_PAYLOAD);
}
