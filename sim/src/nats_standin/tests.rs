//! Unit tests of the stand-in: the wire protocol as the server speaks it, and its records.

use super::*;

const T0: Instant = Instant::ZERO;

fn s(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

fn connected(server: &mut NatsStandin, headers: bool) -> ConnId {
    let c = server.open(T0).unwrap();
    let info = s(server.take_output(c));
    assert!(
        info.starts_with("INFO {") && info.ends_with("}\r\n"),
        "{info}"
    );
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"headers\":{headers},\"no_responders\":{headers}}}\r\n"
    );
    server.handle_bytes(c, connect.as_bytes(), T0);
    c
}

/// The INFO queued on open is JSON with the configured max_payload, headers, ldm and connect_urls.
#[test]
fn info_carries_configured_fields() {
    let mut server = NatsStandin::new(ServerConfig {
        connect_urls: vec!["10.0.0.2:4222".into()],
        max_payload: 600,
        ldm: true,
        ..ServerConfig::default()
    });
    let c = server.open(T0).unwrap();
    let info = s(server.take_output(c));
    let json: serde_json::Value =
        serde_json::from_str(info.strip_prefix("INFO ").unwrap().trim()).unwrap();
    assert_eq!(json["max_payload"], 600);
    assert_eq!(json["headers"], true);
    assert_eq!(json["ldm"], true);
    assert_eq!(json["connect_urls"][0], "10.0.0.2:4222");
}

/// A PING fed one byte at a time and a lowercase `ping` each get one PONG: operations are
/// reassembled across reads and verbs are case-insensitive.
#[test]
fn ping_pong_and_split_input() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let c = connected(&mut server, true);
    for b in b"PI NG\r\n".iter().filter(|b| **b != b' ') {
        server.handle_bytes(c, &[*b], T0);
    }
    server.handle_bytes(c, b"ping\r\n", T0);
    assert_eq!(s(server.take_output(c)), "PONG\r\nPONG\r\n");
}

/// `*` matches exactly one token and `>` one or more trailing ones; wildcards are valid only in
/// subscriptions, as whole tokens with `>` last, and an empty token is never valid.
#[test]
fn wildcards_match_as_nats_does() {
    assert!(subject_matches("a.*", "a.b"));
    assert!(!subject_matches("a.*", "a.b.c"));
    assert!(!subject_matches("a.*", "a"));
    assert!(subject_matches("a.>", "a.b.c"));
    assert!(!subject_matches("a.>", "a"));
    assert!(subject_matches("_INBOX.x.*", "_INBOX.x.1z"));
    assert!(subject_matches("*.b.>", "a.b.c.d"));
    assert!(!subject_matches("a.b", "a.c"));
    assert!(valid_subject("a.*.>", true));
    assert!(!valid_subject("a.>.b", true));
    assert!(!valid_subject("a..b", false));
    assert!(!valid_subject("a.*", false));
}

/// A PUB reaches a wildcard subscriber as MSG with its sid and the reply, and is recorded; after
/// UNSUB nothing arrives, and a requester that did not ask for no_responders hears nothing.
#[test]
fn pub_to_subscriber_delivers_msg_and_is_recorded() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let sub = connected(&mut server, false);
    let publisher = connected(&mut server, false);
    server.handle_bytes(sub, b"SUB foo.* 7\r\n", T0);
    server.handle_bytes(publisher, b"PUB foo.bar in.1 5\r\nhello\r\n", T0);
    assert_eq!(
        s(server.take_output(sub)),
        "MSG foo.bar 7 in.1 5\r\nhello\r\n"
    );
    assert_eq!(server.published().len(), 1);
    let p = &server.published()[0];
    assert_eq!(
        (p.subject.as_str(), p.reply.as_deref()),
        ("foo.bar", Some("in.1"))
    );
    assert_eq!(p.payload, b"hello");
    // UNSUB stops delivery; a publish with nobody listening and no no_responders: silence.
    server.handle_bytes(sub, b"UNSUB 7\r\n", T0);
    server.handle_bytes(publisher, b"PUB foo.bar in.1 2\r\nhi\r\n", T0);
    assert!(server.take_output(sub).is_empty());
    assert!(server.take_output(publisher).is_empty());
}

/// `UNSUB <sid> <max>` keeps the subscription for exactly max more deliveries, then drops it.
#[test]
fn unsub_with_max_stops_after_that_many() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let sub = connected(&mut server, false);
    server.handle_bytes(sub, b"SUB a.> 1\r\nUNSUB 1 2\r\n", T0);
    for _ in 0..3 {
        server.publish("a.b.c", None, None, b"x");
    }
    assert_eq!(s(server.take_output(sub)).matches("MSG").count(), 2);
}

/// An HPUB fed byte by byte is recorded with its header lines (version line dropped) and payload,
/// and reaches a subscriber as an HMSG with the same header block and sizes, byte for byte.
#[test]
fn hpub_is_parsed_and_delivered_as_hmsg() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let sub = connected(&mut server, true);
    let publisher = connected(&mut server, true);
    server.handle_bytes(sub, b"SUB r 1\r\n", T0);
    let block = "NATS/1.0\r\nversion: 1\r\ntrace_id: ab\r\n\r\n";
    let wire = format!(
        "HPUB r inbox.9 {} {}\r\n{block}{{}}\r\n",
        block.len(),
        block.len() + 2
    );
    // Split at every byte boundary.
    for b in wire.as_bytes() {
        server.handle_bytes(publisher, &[*b], T0);
    }
    let p = &server.published()[0];
    assert_eq!(
        p.headers.as_deref().unwrap(),
        [
            ("version".into(), "1".into()),
            ("trace_id".into(), "ab".into())
        ]
    );
    assert_eq!(p.payload, b"{}");
    let out = s(server.take_output(sub));
    assert_eq!(
        out,
        format!(
            "HMSG r 1 inbox.9 {} {}\r\n{block}{{}}\r\n",
            block.len(),
            block.len() + 2
        )
    );
}

/// A request nobody receives earns a header-only 503 HMSG on the requester's inbox only when its
/// CONNECT asked for headers and no_responders; otherwise the server stays silent.
#[test]
fn no_responders_503_only_when_asked_for() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let c = connected(&mut server, true);
    server.handle_bytes(c, b"SUB _INBOX.abc.* 1\r\n", T0);
    server.handle_bytes(c, b"PUB decide _INBOX.abc.z 2\r\n{}\r\n", T0);
    assert_eq!(
        s(server.take_output(c)),
        "HMSG _INBOX.abc.z 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
    );
    let plain = connected(&mut server, false);
    server.handle_bytes(
        plain,
        b"SUB _INBOX.d.* 1\r\nPUB decide _INBOX.d.z 2\r\n{}\r\n",
        T0,
    );
    assert!(server.take_output(plain).is_empty());
}

/// An in-process subscriber receives a client's request with its reply subject, and what it
/// publishes on that reply reaches the client's inbox subscription as a plain MSG.
#[test]
fn local_subscriber_receives_and_replies() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let c = connected(&mut server, false);
    server.handle_bytes(c, b"SUB _INBOX.q.* 1\r\n", T0);
    let router = server.subscribe_local("beamline.router.v1.decide");
    server.handle_bytes(
        c,
        b"PUB beamline.router.v1.decide _INBOX.q.5 2\r\n{}\r\n",
        T0,
    );
    let got = server.take_local();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].sub, router);
    assert_eq!(got[0].reply.as_deref(), Some("_INBOX.q.5"));
    server.publish("_INBOX.q.5", None, None, b"{\"ok\":true}");
    assert_eq!(
        s(server.take_output(c)),
        "MSG _INBOX.q.5 1 11\r\n{\"ok\":true}\r\n"
    );
}

/// Violations are fatal as in nats-server: an unknown verb or a PUB over max_payload (judged from
/// its control line) gets its `-ERR` and a server-side close; a PUB before CONNECT is closed too.
#[test]
fn garbage_earns_err_and_close() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let c = connected(&mut server, false);
    server.handle_bytes(c, b"HELLO\r\n", T0);
    assert!(!server.is_open(c));
    assert_eq!(server.take_server_closed(), vec![c]);
    assert_eq!(
        s(server.take_closed_output(c)),
        "-ERR 'Unknown Protocol Operation'\r\n"
    );
    // Publishing before CONNECT is refused too.
    let d = server.open(T0).unwrap();
    server.handle_bytes(d, b"PUB a 1\r\nx\r\n", T0);
    assert!(!server.is_open(d));
    // An oversized payload.
    let mut small = NatsStandin::new(ServerConfig {
        max_payload: 4,
        ..ServerConfig::default()
    });
    let e = connected(&mut small, false);
    small.handle_bytes(e, b"PUB a 5\r\n", T0);
    assert_eq!(
        s(small.take_closed_output(e)),
        "-ERR 'Maximum Payload Violation'\r\n"
    );
}

/// go_down closes every connection and refuses opens until go_up; every attempt, refused or
/// accepted, is recorded with the time it was made.
#[test]
fn down_refuses_and_attempts_are_counted_with_time() {
    let mut server = NatsStandin::new(ServerConfig::default());
    let a = server.open(T0).unwrap();
    assert_eq!(server.go_down(), vec![a]);
    let t1 = Instant::from_nanos(5);
    assert_eq!(server.open(t1), None);
    server.go_up();
    assert!(server.open(t1).is_some());
    let seen: Vec<(u64, bool)> = server
        .attempts()
        .iter()
        .map(|a| (a.at.as_nanos(), a.accepted))
        .collect();
    assert_eq!(seen, [(0, true), (5, false), (5, true)]);
}

/// With ping_interval the server PINGs every interval and, after max_pings_out unanswered, closes
/// with `-ERR 'Stale Connection'`; any bytes from the client (a PONG) reset the count.
#[test]
fn server_keepalive_pings_then_declares_stale() {
    let mut server = NatsStandin::new(ServerConfig {
        ping_interval: Some(Duration::from_secs(1)),
        max_pings_out: 2,
        ..ServerConfig::default()
    });
    let c = connected(&mut server, false);
    let at = |s: u64| Instant::ZERO + Duration::from_secs(s);
    assert_eq!(server.poll_timeout(), Some(at(1)));
    server.handle_timeout(at(1));
    server.handle_timeout(at(2));
    assert_eq!(s(server.take_output(c)), "PING\r\nPING\r\n");
    server.handle_timeout(at(3));
    assert!(!server.is_open(c));
    assert_eq!(
        s(server.take_closed_output(c)),
        "-ERR 'Stale Connection'\r\n"
    );
    // A client that answers stays.
    let d = connected(&mut server, false);
    server.handle_timeout(at(4));
    server.handle_bytes(d, b"PONG\r\n", at(4));
    server.handle_timeout(at(5));
    server.handle_timeout(at(6));
    assert!(server.is_open(d));
}

/// encode_header_block's output parses back to the same headers, a status-only block parses to
/// no headers, and a block whose version line is not NATS/1.0 is refused.
#[test]
fn header_blocks_round_trip() {
    let h = vec![("a".to_owned(), "1".to_owned())];
    assert_eq!(parse_header_block(&encode_header_block(None, &h)), Some(h));
    assert_eq!(parse_header_block(b"NATS/1.0 503\r\n\r\n"), Some(vec![]));
    assert_eq!(parse_header_block(b"HTTP/1.0\r\n\r\n"), None);
}
