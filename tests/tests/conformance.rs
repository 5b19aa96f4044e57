//! Wire conformance: the golden byte sequences of ipc-protocol.md section 8, message types
//! (section 3), error frames (section 4), payload validation (section 5) and capabilities
//! (section 6), against the real binary in stub mode.

use ipc_gateway_tests::daemon::{
    expect_closed, expect_echo, expect_error, expect_error_code, expect_pong, ping, recv, send,
    send_bytewise, send_json, send_raw, Daemon,
};
use ipc_gateway_tests::frame::{
    CAPABILITIES, PING, RESPONSE_ERROR, RESPONSE_OK, TASK_CANCEL, TASK_QUERY, TASK_SUBMIT,
    VERSION_1,
};
use ipc_gateway_tests::golden::{row, Answer, Row, GOLDEN};
use serde_json::{json, Value};
use std::os::unix::net::UnixStream;

/// Reads the answer to `row`.
fn check_answer_only(stream: &mut UnixStream, row: &Row) {
    match row.answer {
        Answer::Pong => expect_pong(stream),
        Answer::Error(code) => {
            expect_error_code(stream, code);
        }
        Answer::StubEmptyObject => expect_echo(&recv(stream), &json!({})),
    }
}

/// Reads the answer to `row` and checks what follows: closed, or open and still in step
/// (a PING gets exactly a PONG).
fn check_answer(stream: &mut UnixStream, row: &Row) {
    check_answer_only(stream, row);
    if row.closes {
        expect_closed(stream);
    } else {
        ping(stream);
    }
}

fn golden_row_in_one_write(name: &str) {
    let daemon = Daemon::start(&[]);
    let row = row(name);
    let mut stream = daemon.connect();
    send_raw(&mut stream, row.bytes);
    check_answer(&mut stream, row);
}

/// Section 8 row 1: PING is answered by exactly `00 00 00 06 01 F1` and the connection stays
/// open (the second PING in `check_answer` is answered too).
#[test]
fn golden_ping_gets_exact_pong_and_stays_open() {
    golden_row_in_one_write("PING");
}

/// Section 8 row 2: an unknown type gets error 2 and the connection stays open.
#[test]
fn golden_unknown_type_gets_error_2_and_stays_open() {
    golden_row_in_one_write("unknown type 0x99");
}

/// Section 8 row 3: version byte 2 gets error 1, then the connection is closed.
#[test]
fn golden_version_2_gets_error_1_then_closed() {
    golden_row_in_one_write("version 2");
}

/// Section 8 row 4: a length below the header size gets error 4, then closed.
#[test]
fn golden_length_5_gets_error_4_then_closed() {
    golden_row_in_one_write("length 5");
}

/// Section 8 row 5: a header announcing 4 MiB + 1 gets error 3 at once (without the body),
/// then closed.
#[test]
fn golden_length_over_max_gets_error_3_then_closed() {
    golden_row_in_one_write("length 4 MiB + 1 (header only)");
}

/// Section 8 row 6: JSON text sent without framing reads as a length of at least 16 MiB:
/// error 3, then closed.
#[test]
fn golden_raw_json_text_gets_error_3_then_closed() {
    golden_row_in_one_write("raw JSON text");
}

/// Section 8 row 7: TASK_SUBMIT `{}` gets RESPONSE_OK with the stub reply, connection open.
#[test]
fn golden_task_submit_empty_object_gets_stub_reply() {
    golden_row_in_one_write("TASK_SUBMIT {}");
}

/// Every golden row delivered one byte at a time (with a pause after each byte), each on a
/// fresh connection, gets the same answer as in one write.
#[test]
fn golden_rows_split_at_every_byte() {
    let daemon = Daemon::start(&[]);
    for row in GOLDEN {
        let mut stream = daemon.connect();
        let written = send_bytewise(&mut stream, row.bytes, row.closes);
        // Only a closing row may be cut short, and only after the header: the gateway cannot
        // know the frame is bad before it has seen its length.
        assert!(
            written >= 4,
            "{}: gateway closed after {written} bytes",
            row.name
        );
        check_answer(&mut stream, row);
    }
}

/// The open-connection golden rows concatenated into one write get their answers in order.
#[test]
fn golden_open_rows_in_one_write_answered_in_order() {
    let daemon = Daemon::start(&[]);
    let open: Vec<&Row> = GOLDEN.iter().filter(|r| !r.closes).collect();
    let bytes: Vec<u8> = open.iter().flat_map(|r| r.bytes.iter().copied()).collect();
    let mut stream = daemon.connect();
    send_raw(&mut stream, &bytes);
    for row in &open {
        check_answer_only(&mut stream, row);
    }
    ping(&mut stream);
}

/// The same concatenation delivered one byte at a time gets the same answers in order.
#[test]
fn golden_open_rows_concatenated_and_split_at_every_byte() {
    let daemon = Daemon::start(&[]);
    let open: Vec<&Row> = GOLDEN.iter().filter(|r| !r.closes).collect();
    let bytes: Vec<u8> = open.iter().flat_map(|r| r.bytes.iter().copied()).collect();
    let mut stream = daemon.connect();
    send_bytewise(&mut stream, &bytes, false);
    for row in &open {
        check_answer_only(&mut stream, row);
    }
    ping(&mut stream);
}

/// Exactly one reply per request frame, in request order (gateway.md 1.1), holds even when a
/// fatal frame follows: TASK_SUBMIT, PING, then a version-2 frame in one write get the stub
/// reply, PONG, error 1, then the close. The Router stub is slowed down (200 ms) so the fatal
/// frame is decoded long before the submitted request is answered: the gateway must not close
/// the connection (or send error 1) ahead of the pending reply.
#[test]
fn fatal_frame_after_pipelined_requests_keeps_reply_order() {
    let daemon = Daemon::start(&[("CGW_IPC_STUB_DELAY_MS", "200")]);
    let mut bytes = row("TASK_SUBMIT {}").bytes.to_vec();
    bytes.extend_from_slice(row("PING").bytes);
    bytes.extend_from_slice(row("version 2").bytes);
    let mut stream = daemon.connect();
    send_raw(&mut stream, &bytes);
    expect_echo(&recv(&mut stream), &json!({}));
    expect_pong(&mut stream);
    expect_error_code(&mut stream, 1);
    expect_closed(&mut stream);
}

/// A PING's payload is ignored: PING with a payload still gets exactly the 6-byte PONG.
#[test]
fn ping_payload_is_ignored() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    send(&mut stream, PING, b"hello, not even json");
    expect_pong(&mut stream);
    ping(&mut stream);
}

/// CAPABILITIES (0xF2) gets RESPONSE_OK with valid JSON: protocol_version "1.0" and
/// max_payload_size 4194298 (the default maximum frame less the header).
#[test]
fn capabilities_reply_is_json() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    send(&mut stream, CAPABILITIES, &[]);
    let reply = recv(&mut stream);
    assert_eq!(
        (reply.version, reply.kind),
        (VERSION_1, RESPONSE_OK),
        "{reply:?}"
    );
    let caps = reply.json();
    assert_eq!(caps["protocol_version"], json!("1.0"), "{caps}");
    assert_eq!(caps["max_payload_size"], json!(4_194_298), "{caps}");
    ping(&mut stream);
}

/// Types only the gateway may send (0x05..0x07, 0x10, 0x11, 0xF1) and STREAM_SUBSCRIBE
/// (0x04, no streams in v1) get error 2 when a client sends them; the connection stays open
/// through all of them.
#[test]
fn client_sent_gateway_types_get_error_2() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    for kind in [0x04, 0x05, 0x06, 0x07, 0x10, 0x11, 0xF1] {
        send(&mut stream, kind, &[]);
        let reply = recv(&mut stream);
        assert_eq!(
            reply.kind, RESPONSE_ERROR,
            "type {kind:#04X}: expected an error frame, got {reply:?}"
        );
        expect_error(&reply, 2);
    }
    ping(&mut stream);
}

/// A task payload that is not a UTF-8 JSON object gets error 4 and the connection stays open.
#[test]
fn task_payload_that_is_not_a_json_object_gets_error_4_and_stays_open() {
    let daemon = Daemon::start(&[]);
    let cases: [(&str, &[u8]); 5] = [
        ("array", b"[1,2]"),
        ("string", br#""x""#),
        ("not json", b"not json"),
        ("invalid UTF-8 inside a string", b"{\"a\":\"\xFF\"}"),
        ("object followed by garbage", b"{} x"),
    ];
    for (what, payload) in cases {
        let mut stream = daemon.connect();
        send(&mut stream, TASK_SUBMIT, payload);
        let reply = recv(&mut stream);
        assert_eq!(
            reply.kind,
            RESPONSE_ERROR,
            "{what}: expected error 4, got {reply:?} ({:?})",
            String::from_utf8_lossy(&reply.payload)
        );
        expect_error(&reply, 4);
        ping(&mut stream);
    }
}

/// TASK_QUERY and TASK_CANCEL are answered by the stub like TASK_SUBMIT, and an empty task
/// payload counts as `{}`.
#[test]
fn query_cancel_and_empty_payload_get_stub_reply() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    let sent: Value = json!({"task_id": "t-1", "nested": {"a": [1, 2, "x"], "b": null}});
    for kind in [TASK_SUBMIT, TASK_QUERY, TASK_CANCEL] {
        send_json(&mut stream, kind, &sent);
        expect_echo(&recv(&mut stream), &sent);
        send(&mut stream, kind, &[]);
        expect_echo(&recv(&mut stream), &json!({}));
    }
}

/// Error messages are valid JSON even when the cause is hostile text: a payload whose parse
/// error mentions quotes and control characters still yields a parseable error frame.
#[test]
fn error_payloads_are_json_escaped() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    send(&mut stream, TASK_SUBMIT, b"{\"\\\"\n\t\x01\":");
    // expect_error parses the payload as JSON and checks the fields.
    expect_error_code(&mut stream, 4);
    ping(&mut stream);
}
