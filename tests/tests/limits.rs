//! Limits and fairness (ipc-protocol.md section 7, gateway.md section 1): pipelining, the
//! connection limit, slow-loris protection, clients that never read, the in-flight limits,
//! the request deadline and the maximum frame size.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use ipc_gateway_tests::daemon::{
    expect_closed, expect_echo, expect_error, expect_error_code, is_closed, object_of_len,
    peak_rss_kb, ping, recv, rss_kb, send, send_json, send_raw, submit_echo, Daemon, PONG_BYTES,
};
use ipc_gateway_tests::frame::{
    self, CAPABILITIES, PING, PONG, RESPONSE_ERROR, RESPONSE_OK, TASK_SUBMIT,
};
use serde_json::json;

/// 1000 TASK_SUBMIT frames pipelined on one connection (written by one thread while another
/// reads) get exactly 1000 replies, reply i echoing request i; a PING after them gets the next
/// frame, a PONG, so there was no extra reply.
#[test]
fn thousand_pipelined_requests_answered_in_order() {
    const N: u64 = 1000;
    let daemon = Daemon::start(&[]);
    let mut reader = daemon.connect();
    let mut writer = reader.try_clone().unwrap();
    let writing = thread::spawn(move || {
        for n in 0..N {
            frame::write_frame(
                &mut writer,
                TASK_SUBMIT,
                json!({"n": n}).to_string().as_bytes(),
            )?;
        }
        frame::write_frame(&mut writer, PING, &[])
    });
    for n in 0..N {
        let reply = recv(&mut reader);
        expect_echo(&reply, &json!({"n": n}));
    }
    let after = recv(&mut reader);
    assert_eq!(
        (after.kind, after.payload.len()),
        (PONG, 0),
        "frame after the 1000 replies: {after:?}"
    );
    writing.join().unwrap().expect("writing the requests");
}

/// With the default limit of 64 connections, 64 connections all get PONG; the 65th gets
/// error 7 and is closed; once one of the 64 is closed a new connection is served again.
#[test]
fn connection_limit_rejects_with_error_7_then_recovers() {
    let daemon = Daemon::start(&[]);
    // One at a time, each answered before the next connect: by the 64th the gateway has long
    // noticed that the readiness probe of Daemon::start hung up, so it cannot count against us.
    let mut open: Vec<_> = (0..64)
        .map(|_| {
            let mut stream = daemon.connect();
            ping(&mut stream);
            stream
        })
        .collect();
    let mut extra = daemon.connect();
    expect_error_code(&mut extra, 7);
    expect_closed(&mut extra);
    for stream in &mut open {
        ping(stream);
    }

    drop(open.pop());
    // The gateway notices the close asynchronously: retry briefly while it still says 7.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = daemon.connect();
        // A rejected connection may already be closed when the PING goes out; its error
        // frame is still there to read.
        match frame::write_frame(&mut stream, PING, &[]) {
            Err(e) if !is_closed(&e) => panic!("writing a PING: {e}"),
            _ => {}
        }
        let reply = recv(&mut stream);
        if reply.kind == PONG {
            assert!(reply.payload.is_empty(), "{reply:?}");
            break;
        }
        expect_error(&reply, 7);
        assert!(
            Instant::now() < deadline,
            "still refused with error 7 five seconds after a connection was closed"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Slow-loris: a client that sends 3 bytes of a header and waits gets error 5 and is closed,
/// no earlier than the read timeout (500 ms, allowing 100 ms of timer slack) and within a
/// few seconds.
#[test]
fn partial_header_times_out_with_error_5() {
    let daemon = Daemon::start(&[("CGW_IPC_READ_TIMEOUT_MS", "500")]);
    let mut stream = daemon.connect();
    let started = Instant::now();
    send_raw(&mut stream, &[0x00, 0x00, 0x00]);
    expect_error_code(&mut stream, 5);
    let waited = started.elapsed();
    expect_closed(&mut stream);
    assert!(
        waited >= Duration::from_millis(400),
        "timed out after only {waited:?} (read timeout 500 ms)"
    );
    assert!(
        waited <= Duration::from_secs(5),
        "took {waited:?} to time out (read timeout 500 ms)"
    );
}

/// Slow-loris by drip-feed: the limit is on how long a partial frame is held, not on the gap
/// between bytes. A 24-byte frame dripped one byte every 100 ms (2.4 s in all, every gap
/// well under the 500 ms read timeout) gets error 5 and is closed instead of an answer.
#[test]
fn dripped_frame_times_out_with_error_5() {
    let daemon = Daemon::start(&[("CGW_IPC_READ_TIMEOUT_MS", "500")]);
    let mut stream = daemon.connect();
    let mut writer = stream.try_clone().unwrap();
    let bytes = frame::encode(TASK_SUBMIT, br#"{"drip":"0123456"}"#);
    assert_eq!(bytes.len(), 24);
    let dripping = thread::spawn(move || {
        for byte in bytes {
            if writer.write_all(&[byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let reply = recv(&mut stream);
    assert_eq!(
        reply.kind,
        RESPONSE_ERROR,
        "a frame dripped over 2.4 s was answered ({:?}) despite a 500 ms read timeout",
        String::from_utf8_lossy(&reply.payload)
    );
    expect_error(&reply, 5);
    expect_closed(&mut stream);
    dripping.join().unwrap();
}

/// The read timeout applies to partial frames only: a connection idle between frames for
/// twice the read timeout is still served.
#[test]
fn idle_connection_without_partial_frame_is_kept() {
    let daemon = Daemon::start(&[("CGW_IPC_READ_TIMEOUT_MS", "300")]);
    let mut stream = daemon.connect();
    thread::sleep(Duration::from_millis(700));
    ping(&mut stream);
    thread::sleep(Duration::from_millis(700));
    submit_echo(&mut stream, &json!({"after": "idle"}));
}

/// A client that writes 256 KiB requests and never reads is closed once its unsent replies
/// pass CGW_IPC_MAX_UNSENT_BYTES (1 MiB): its writes fail with EPIPE/ECONNRESET within 128 MiB
/// of requests. The daemon's peak RSS stays under 64 MiB (the cap, one maximum frame being
/// read and one being parsed, with room to spare; without the cap the replies alone would
/// pass it), and it keeps serving other clients.
#[test]
fn client_that_never_reads_is_closed_and_memory_stays_bounded() {
    const MAX_REQUESTS: usize = 512;
    let daemon = Daemon::start(&[("CGW_IPC_MAX_UNSENT_BYTES", "1048576")]);
    let request = frame::encode(TASK_SUBMIT, &object_of_len(256 * 1024));
    let mut hog = daemon.connect();
    let mut sent = 0;
    let closed = loop {
        if sent == MAX_REQUESTS {
            break None;
        }
        match hog.write_all(&request) {
            Ok(()) => sent += 1,
            Err(e) if is_closed(&e) => break Some(e),
            Err(e) => panic!(
                "request {sent}: write failed without the connection being closed \
                 (the gateway neither reads nor closes): {e}"
            ),
        }
    };
    let peak_kb = peak_rss_kb(daemon.pid());
    let closed = closed.unwrap_or_else(|| {
        panic!(
            "{MAX_REQUESTS} requests of 256 KiB written and never read, yet the connection \
             is still open (peak RSS {peak_kb} KiB)"
        )
    });
    eprintln!(
        "closed after {sent} requests ({closed}); peak RSS {peak_kb} KiB, now {} KiB",
        rss_kb(daemon.pid())
    );
    assert!(
        peak_kb < 64 * 1024,
        "peak RSS {peak_kb} KiB with a 1 MiB cap on unsent bytes"
    );

    let mut other = daemon.connect();
    ping(&mut other);
    submit_echo(&mut other, &json!({"still": "serving"}));
}

/// Global in-flight limit 2 (stub Router slowed to 500 ms): of 3 requests pipelined on one
/// connection the third gets error 7 (load shedding, in its place in the reply order) and the
/// first two are answered; afterwards a new request is admitted again.
#[test]
fn global_inflight_limit_sheds_with_error_7() {
    let daemon = Daemon::start(&[
        ("CGW_IPC_MAX_INFLIGHT", "2"),
        ("CGW_IPC_STUB_DELAY_MS", "500"),
    ]);
    let mut stream = daemon.connect();
    for n in 0..3 {
        send_json(&mut stream, TASK_SUBMIT, &json!({"n": n}));
    }
    expect_echo(&recv(&mut stream), &json!({"n": 0}));
    expect_echo(&recv(&mut stream), &json!({"n": 1}));
    expect_error_code(&mut stream, 7);
    submit_echo(&mut stream, &json!({"n": 3}));
}

/// Per-connection in-flight limit 2 is backpressure, not rejection: 6 requests pipelined with
/// a 300 ms stub Router are all answered in order, and no sooner than three rounds of the
/// stub delay (so no more than 2 were ever in flight); 60 ms of timer slack allowed.
#[test]
fn per_connection_inflight_limit_is_backpressure() {
    let daemon = Daemon::start(&[
        ("CGW_IPC_MAX_INFLIGHT_PER_CONN", "2"),
        ("CGW_IPC_STUB_DELAY_MS", "300"),
    ]);
    let mut stream = daemon.connect();
    let started = Instant::now();
    for n in 0..6 {
        send_json(&mut stream, TASK_SUBMIT, &json!({"n": n}));
    }
    for n in 0..6 {
        expect_echo(&recv(&mut stream), &json!({"n": n}));
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3 * 300 - 60),
        "6 requests answered in {took:?}: more than 2 were in flight at once"
    );
}

/// The request deadline (CGW_IPC_TIMEOUT_MS 200 ms) beats a slow Router (1 s): the request
/// gets error 5, retryable, with a request_id, and the connection stays open. The Router's
/// late reply is dropped: after it would have arrived, a PING is answered by exactly a PONG.
#[test]
fn request_deadline_gives_error_5_and_late_reply_is_dropped() {
    let daemon = Daemon::start(&[
        ("CGW_IPC_TIMEOUT_MS", "200"),
        ("CGW_IPC_STUB_DELAY_MS", "1000"),
    ]);
    let mut stream = daemon.connect();
    let started = Instant::now();
    send(&mut stream, TASK_SUBMIT, br#"{"slow":true}"#);
    let error = expect_error_code(&mut stream, 5);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "timed out after only {waited:?} with a 200 ms deadline"
    );
    assert_eq!(error["retryable"], json!(true), "{error}");
    assert!(
        error["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "a timed-out request was assigned an id, so the error carries it: {error}"
    );
    thread::sleep(Duration::from_millis(1300).saturating_sub(started.elapsed()));
    ping(&mut stream);
}

/// CGW_IPC_MAX_FRAME_BYTES lowers the maximum frame: with 1024, a 1024-byte frame is answered,
/// a 1025-byte frame gets error 3 and the connection is closed, and CAPABILITIES advertises a
/// max_payload_size of 1018.
#[test]
fn configured_max_frame_bytes_is_enforced_and_advertised() {
    let daemon = Daemon::start(&[("CGW_IPC_MAX_FRAME_BYTES", "1024")]);
    let mut stream = daemon.connect();
    let fits = object_of_len(1024 - 6);
    send(&mut stream, TASK_SUBMIT, &fits);
    expect_echo(&recv(&mut stream), &serde_json::from_slice(&fits).unwrap());
    send(&mut stream, CAPABILITIES, &[]);
    let caps = recv(&mut stream);
    assert_eq!(caps.kind, RESPONSE_OK, "{caps:?}");
    assert_eq!(
        caps.json()["max_payload_size"],
        json!(1018),
        "{:?}",
        caps.json()
    );

    let mut over = daemon.connect();
    send(&mut over, TASK_SUBMIT, &object_of_len(1024 - 6 + 1));
    expect_error_code(&mut over, 3);
    expect_closed(&mut over);
    ping(&mut stream);
}

/// A whole frame one byte over the default maximum (4194305 bytes, body included) gets
/// error 3 and the connection is closed; the writer may see the close before it finishes.
#[test]
fn frame_one_byte_over_default_max_gets_error_3() {
    let daemon = Daemon::start(&[]);
    let mut stream = daemon.connect();
    let mut writer = stream.try_clone().unwrap();
    let writing = thread::spawn(move || {
        let bytes = frame::encode(TASK_SUBMIT, &object_of_len(4_194_304 - 6 + 1));
        assert_eq!(bytes.len(), 4_194_305);
        match writer.write_all(&bytes) {
            Ok(()) => {}
            Err(e) if is_closed(&e) => {}
            Err(e) => panic!("writing the oversized frame: {e}"),
        }
    });
    expect_error_code(&mut stream, 3);
    expect_closed(&mut stream);
    writing.join().unwrap();
}

/// Out of file descriptors, the daemon keeps serving its clients, and the connections that
/// waited in the listen backlog are accepted once descriptors free up, with no new connection
/// needed to wake it (edge-triggered epoll raises no new event for a backlog that was
/// already there; the daemon retries accept on a timer).
#[test]
fn backlog_is_accepted_once_file_descriptors_free_up() {
    // The limit caps descriptor numbers and new ones take the lowest free number: probe an
    // idle daemon's lowest free one and allow three more.
    let probe = Daemon::start(&[]);
    // The socket accepts as soon as it is bound, before the event loop has made its own
    // descriptors (epoll, signal pipe); a PONG means they exist. Read earlier, on a loaded
    // machine, the probe found too few, and no client fitted under the limit.
    ping(&mut probe.connect());
    let used: std::collections::BTreeSet<u64> =
        std::fs::read_dir(format!("/proc/{}/fd", probe.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
    drop(probe);
    let lowest_free = (0..)
        .find(|fd| !used.contains(fd))
        .expect("a free descriptor number");
    let daemon =
        Daemon::start_with_fd_limit(lowest_free + 3, &[("CGW_IPC_MAX_CONNECTIONS", "1000")]);
    // Connect until the daemon says it cannot accept: from then on clients wait in the
    // backlog. Whether a client was served or refused is read from what the daemon does (a
    // PONG, or an "accept failed" log line), never from how long it took, so a loaded
    // machine only makes the test slower. (The probe can be off by one if it still held its
    // readiness connection, so count, don't assume.)
    let refusals = || daemon.stderr().matches("accept failed").count();
    let mut served: Vec<UnixStream> = Vec::new();
    let mut waiting: Vec<UnixStream> = Vec::new();
    let mut pong = [0u8; 6];
    while waiting.is_empty() {
        assert!(served.len() < 8, "the descriptor limit did not bite");
        let before = refusals();
        let mut s = daemon.connect();
        send(&mut s, PING, b"");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "neither served nor refused");
            if s.read_exact(&mut pong).is_ok() {
                served.push(s);
                break;
            }
            if refusals() > before {
                waiting.push(s);
                break;
            }
        }
    }
    assert!(served.len() >= 2, "only {} clients fit", served.len());
    for _ in 0..2 {
        let mut s = daemon.connect();
        send(&mut s, PING, b"");
        waiting.push(s);
    }
    ping(&mut served[0]); // clients already connected are still served
    drop(served); // descriptors free up for the waiting clients
    for s in &mut waiting {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut pong)
            .expect("a backlog connection was never served");
        assert_eq!(pong, PONG_BYTES);
    }
    assert!(
        daemon.stderr().contains("accept failed"),
        "{}",
        daemon.stderr()
    );
}
