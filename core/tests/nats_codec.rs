//! The NATS codec against the wire as nats-server writes it: golden bytes both ways, the
//! clustered INFO and the no-responders 503 the only other sans-IO codec gets wrong, and
//! properties over splits, arbitrary bytes and endless lines.

use bytes::{Bytes, BytesMut};
use ipc_gateway_core::nats_codec::*;
use proptest::prelude::*;

fn decode_all(d: &mut NatsDecoder) -> (Vec<ServerOp>, Option<NatsDecodeError>) {
    let mut ops = Vec::new();
    loop {
        match d.next_op() {
            Ok(Some(op)) => ops.push(op),
            Ok(None) => return (ops, None),
            Err(e) => return (ops, Some(e)),
        }
    }
}

fn decode(bytes: &[u8]) -> (Vec<ServerOp>, Option<NatsDecodeError>) {
    let mut d = NatsDecoder::default();
    d.push(bytes);
    decode_all(&mut d)
}

fn one(bytes: &[u8]) -> ServerOp {
    let (mut ops, err) = decode(bytes);
    assert_eq!(err, None, "{:?}", String::from_utf8_lossy(bytes));
    assert_eq!(ops.len(), 1, "{ops:?}");
    ops.remove(0)
}

fn error(bytes: &[u8]) -> NatsDecodeError {
    let (_, err) = decode(bytes);
    err.unwrap_or_else(|| panic!("no error for {:?}", String::from_utf8_lossy(bytes)))
}

fn msg(subject: &str, sid: u64, reply: Option<&str>, payload: &'static [u8]) -> ServerOp {
    ServerOp::Msg {
        subject: subject.into(),
        sid,
        reply_to: reply.map(Into::into),
        payload: Bytes::from_static(payload),
    }
}

fn info(json: &str) -> ServerInfo {
    match one(format!("INFO {json}\r\n").as_bytes()) {
        ServerOp::Info(info) => info,
        other => panic!("{other:?}"),
    }
}

/// A 2.10 cluster member's INFO, fields in nats-server's `Info` order.
const CLUSTER_INFO: &str = r#"{"server_id":"NCXMJZYQEWUDJFLYLSTHKJ3F2QAVXKDDYV3FMWX4WUIXIFWEWDVRFFM7","server_name":"nats-a","version":"2.10.22","proto":1,"git_commit":"240e9a4","go":"go1.22.8","host":"0.0.0.0","port":4222,"headers":true,"max_payload":1048576,"jetstream":true,"client_id":12,"client_ip":"10.0.0.9","cluster":"gw-cluster","connect_urls":["10.0.0.2:4222","nats-b:4222"]}"#;

/// A clustered server's INFO decodes, with `connect_urls` kept as sent (no scheme).
#[test]
fn clustered_info_keeps_connect_urls_as_sent() {
    let i = info(CLUSTER_INFO);
    assert_eq!(i.connect_urls, ["10.0.0.2:4222", "nats-b:4222"]);
    assert_eq!(i.host.as_deref(), Some("0.0.0.0"));
    assert_eq!(i.server_name.as_deref(), Some("nats-a"));
    assert_eq!(i.version.as_deref(), Some("2.10.22"));
    assert_eq!(
        (i.proto, i.port, i.client_id),
        (Some(1), Some(4222), Some(12))
    );
    assert_eq!(i.max_payload, Some(1_048_576));
    assert!(i.headers && !i.ldm && !i.auth_required && !i.tls_required);
    // The same server advertising a name (`client_advertise`, or `host` set to one).
    let named = info(&CLUSTER_INFO.replace("\"0.0.0.0\"", "\"nats-a.example.internal\""));
    assert_eq!(named.host.as_deref(), Some("nats-a.example.internal"));
    assert_eq!(named.connect_urls, i.connect_urls);
}

/// `host` may be a name, `ldm` and auth fields are read, and `null` counts as absent.
#[test]
fn info_with_hostname_lame_duck_and_nulls() {
    let i = info(
        r#"{"server_id":"N1","host":"nats-a.internal","port":4222,"ldm":true,"auth_required":true,"tls_required":true,"nonce":"nZ3x","connect_urls":null,"max_payload":null,"xkey":"XA","unknown":{"a":[1]}}"#,
    );
    assert_eq!(i.host.as_deref(), Some("nats-a.internal"));
    assert!(i.ldm && i.auth_required && i.tls_required && !i.headers);
    assert_eq!(i.nonce.as_deref(), Some("nZ3x"));
    assert!(i.connect_urls.is_empty());
    assert_eq!(i.max_payload, None);
    assert_eq!(info("{}"), ServerInfo::default());
}

/// Invalid INFO fails, and the error says what is wrong (and which field).
#[test]
fn invalid_info_names_the_problem() {
    let reason = |bytes: &[u8]| match error(bytes) {
        NatsDecodeError::InvalidInfo { reason } => reason,
        other => panic!("{other:?}"),
    };
    assert!(reason(b"INFO {\"port\":\"x\"}\r\n").contains("port"));
    assert!(reason(b"INFO {\"port\":70000}\r\n").contains("port"));
    assert!(reason(b"INFO {\"connect_urls\":[1]}\r\n").contains("connect_urls"));
    assert!(reason(b"INFO {\"headers\":1}\r\n").contains("headers"));
    assert!(reason(b"INFO [1]\r\n").contains("JSON object"));
    assert!(reason(b"INFO {\"a\":\r\n").contains("JSON object"));
    assert!(reason(b"INFO\r\n").contains("JSON object"));
}

/// MSG as the protocol documentation shows it, with and without reply subject.
#[test]
fn msg_golden() {
    assert_eq!(
        one(b"MSG FOO.BAR 9 11\r\nHello World\r\n"),
        msg("FOO.BAR", 9, None, b"Hello World")
    );
    assert_eq!(
        one(b"MSG FOO.BAR 9 INBOX.34 11\r\nHello World\r\n"),
        msg("FOO.BAR", 9, Some("INBOX.34"), b"Hello World")
    );
    // The declared size delimits the payload, CRLF inside it included.
    assert_eq!(
        one(b"MSG a 1 4\r\n\r\n\r\n\r\n"),
        msg("a", 1, None, b"\r\n\r\n")
    );
    assert_eq!(one(b"MSG a 1 0\r\n\r\n"), msg("a", 1, None, b""));
}

/// HMSG as documented: header block parsed, payload after it.
#[test]
fn hmsg_golden() {
    let op = one(
        b"HMSG FOO.BAR 9 INBOX.69 34 45\r\nNATS/1.0\r\nFoodGroup: vegetable\r\n\r\nHello World\r\n",
    );
    assert_eq!(
        op,
        ServerOp::HMsg {
            subject: "FOO.BAR".into(),
            sid: 9,
            reply_to: Some("INBOX.69".into()),
            status: None,
            description: None,
            headers: vec![("FoodGroup".into(), "vegetable".into())],
            payload: Bytes::from_static(b"Hello World"),
        }
    );
    let ServerOp::HMsg {
        headers, status, description, payload, ..
    } = one(b"HMSG MORNING.MENU 2 47 51\r\nNATS/1.0\r\nBREAKFAST: donut\r\nBREAKFAST: eggs\r\n\r\nYum!\r\n")
    else {
        panic!()
    };
    assert_eq!(
        headers,
        [
            ("BREAKFAST".into(), "donut".into()),
            ("BREAKFAST".into(), "eggs".into())
        ]
    );
    assert_eq!(
        (status, description, &payload[..]),
        (None, None, &b"Yum!"[..])
    );
}

/// nats-server 2.2–2.11 answers a request nobody receives with exactly these bytes
/// (`client.go`: `"HMSG %s %s 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"`): 16 = 14 + 2.
#[test]
fn no_responders_503_as_nats_server_sends_it() {
    let wire = b"HMSG _INBOX.x.1 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n";
    assert_eq!(b"NATS/1.0 503\r\n\r\n".len(), 16);
    let op = one(wire);
    assert!(op.is_no_responders());
    assert_eq!(
        op,
        ServerOp::HMsg {
            subject: "_INBOX.x.1".into(),
            sid: 1,
            reply_to: None,
            status: Some(503),
            description: None,
            headers: vec![],
            payload: Bytes::new(),
        }
    );
}

/// 2.12+ adds the request's subject as `Nats-Subject` (header length 32 + subject length).
#[test]
fn no_responders_503_with_nats_subject_header() {
    let subject = "beamline.router.v1.decide";
    let block = format!("NATS/1.0 503\r\nNats-Subject: {subject}\r\n\r\n");
    assert_eq!(block.len(), 32 + subject.len());
    let wire = format!("HMSG _INBOX.x.2 1 {0} {0}\r\n{block}\r\n", block.len());
    let op = one(wire.as_bytes());
    assert!(op.is_no_responders());
    let ServerOp::HMsg {
        headers, payload, ..
    } = op
    else {
        panic!()
    };
    assert_eq!(headers, [("Nats-Subject".into(), subject.into())]);
    assert!(payload.is_empty());
}

/// The brief's example carries an extra token: five arguments make `0` a reply subject.
#[test]
fn an_extra_token_before_the_sizes_is_a_reply_subject() {
    let op = one(b"HMSG _INBOX.x.1 1 0 16 16\r\nNATS/1.0 503\r\n\r\n\r\n");
    let ServerOp::HMsg {
        reply_to, status, ..
    } = op
    else {
        panic!()
    };
    assert_eq!((reply_to.as_deref(), status), (Some("0"), Some(503)));
}

/// Status with a description, values trimmed, a payload after headers.
#[test]
fn hmsg_status_description_and_trimming() {
    let block = "NATS/1.0 408 Request Timeout\r\nK:  v w \r\nEmpty:\r\n\r\n";
    let wire = format!(
        "HMSG s 7 {} {}\r\n{block}late\r\n",
        block.len(),
        block.len() + 4
    );
    let ServerOp::HMsg {
        status,
        description,
        headers,
        payload,
        ..
    } = one(wire.as_bytes())
    else {
        panic!()
    };
    assert_eq!(
        (status, description.as_deref()),
        (Some(408), Some("Request Timeout"))
    );
    assert_eq!(
        headers,
        [("K".into(), "v w".into()), ("Empty".into(), String::new())]
    );
    assert_eq!(&payload[..], b"late");
}

/// PING, PONG, +OK and the -ERR texts nats-server sends (`-ERR '%s'`).
#[test]
fn control_ops_and_real_err_strings() {
    assert_eq!(one(b"PING\r\n"), ServerOp::Ping);
    assert_eq!(one(b"PONG\r\n"), ServerOp::Pong);
    assert_eq!(one(b"+OK\r\n"), ServerOp::Ok);
    for text in [
        "Stale Connection",
        "Unknown Protocol Operation",
        "Authorization Violation",
        "Maximum Payload Violation",
        "Permissions Violation for Publish to \"x\"",
        "Permissions Violation for Subscription to \"_INBOX.a.*\"",
        "",
    ] {
        assert_eq!(
            one(format!("-ERR '{text}'\r\n").as_bytes()),
            ServerOp::Err(text.into())
        );
    }
    assert_eq!(
        one(b"-ERR unquoted text \r\n"),
        ServerOp::Err("unquoted text".into())
    );
}

/// Operation names are case-insensitive; arguments are separated by runs of spaces or tabs.
#[test]
fn case_and_separators() {
    let (ops, err) = decode(
        b"ping\r\nPoNg\r\n+ok\r\n-err 'x'\r\ninfo {\"port\":1}\r\nmsg\t a \t 1  2\r\nhi\r\nhMsG a 1\t_R 12 12\r\nNATS/1.0\r\n\r\n\r\n",
    );
    assert_eq!(err, None);
    assert_eq!(ops.len(), 7);
    assert_eq!(ops[5], msg("a", 1, None, b"hi"));
    assert!(matches!(&ops[6], ServerOp::HMsg { reply_to: Some(r), .. } if r == "_R"));
}

/// A complete PING is returned at once; splits inside CRLF and inside `+OK` only delay.
#[test]
fn complete_ops_are_returned_at_once_and_splits_only_delay() {
    let mut d = NatsDecoder::default();
    d.push(b"PING\r\n");
    assert_eq!(d.next_op(), Ok(Some(ServerOp::Ping)));
    assert_eq!(d.next_op(), Ok(None));
    assert!(!d.holds_partial_op());
    for piece in [&b"+"[..], b"O", b"K", b"\r"] {
        d.push(piece);
        assert_eq!(d.next_op(), Ok(None));
        assert!(d.holds_partial_op());
    }
    d.push(b"\nMSG a 1 2\r");
    assert_eq!(d.next_op(), Ok(Some(ServerOp::Ok)));
    assert_eq!(d.next_op(), Ok(None));
    d.push(b"\nh");
    assert_eq!(d.next_op(), Ok(None));
    d.push(b"i\r");
    assert_eq!(d.next_op(), Ok(None));
    d.push(b"\n");
    assert_eq!(d.next_op(), Ok(Some(msg("a", 1, None, b"hi"))));
    assert!(!d.holds_partial_op());
}

/// Malformed input is an error, the error is sticky, and the buffer is released.
#[test]
fn malformed_input_fails_for_good() {
    use NatsDecodeError::*;
    let cases: &[(&[u8], NatsDecodeError)] = &[
        (
            b"MSG a x 2\r\n",
            BadNumber {
                op: "MSG",
                field: "sid",
            },
        ),
        (
            b"MSG a 1 -2\r\n",
            BadNumber {
                op: "MSG",
                field: "size",
            },
        ),
        (
            b"MSG a 1 99999999999999999999\r\n",
            BadNumber {
                op: "MSG",
                field: "size",
            },
        ),
        (
            b"HMSG a 1 1x 20\r\n",
            BadNumber {
                op: "HMSG",
                field: "header size",
            },
        ),
        (
            b"MSG a 1\r\n",
            WrongArgumentCount {
                op: "MSG",
                count: 2,
            },
        ),
        (
            b"MSG a 1 b c 2\r\n",
            WrongArgumentCount {
                op: "MSG",
                count: 5,
            },
        ),
        (
            b"HMSG a 1 12\r\n",
            WrongArgumentCount {
                op: "HMSG",
                count: 3,
            },
        ),
        (
            b"PING x\r\n",
            WrongArgumentCount {
                op: "PING",
                count: 1,
            },
        ),
        (
            b"HMSG a 1 20 12\r\n",
            BadHeaderSize {
                header: 20,
                total: 12,
            },
        ),
        (
            b"HMSG a 1 4 4\r\n",
            BadHeaderSize {
                header: 4,
                total: 4,
            },
        ),
        (b"MSG a 1 2\r\nhiXX", MissingPayloadTerminator),
        (b"MSG a 1 2\r\nhi\rX", MissingPayloadTerminator),
        (b"FOO\r\n", UnknownOperation { op: "FOO".into() }),
        (b"PUB a 1\r\nx\r\n", UnknownOperation { op: "PUB".into() }),
        (b"\r\n", UnknownOperation { op: String::new() }),
        (b"PING\n", BareLineFeed),
    ];
    for (wire, want) in cases {
        let mut d = NatsDecoder::default();
        d.push(wire);
        assert_eq!(
            d.next_op().as_ref(),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
        d.push(b"PING\r\n");
        assert_eq!(d.next_op().as_ref(), Err(want));
        assert_eq!(d.buffered_len(), 0);
        assert!(!d.holds_partial_op());
        assert!(!want.to_string().is_empty());
    }
}

/// A header block that does not match its declared length, or is not a NATS/1.0 block.
#[test]
fn bad_header_blocks() {
    // The message is skipped and the stream goes on: its length was announced correctly.
    let reason = |block: &str| {
        let wire = format!("HMSG a 1 {0} {0}\r\n{block}\r\nPING\r\n", block.len());
        let mut d = NatsDecoder::default();
        d.push(wire.as_bytes());
        let reason = match d.next_op() {
            Ok(Some(ServerOp::Unreadable {
                subject,
                sid: 1,
                reason,
            })) if subject == "a" => reason,
            other => panic!("{block:?}: {other:?}"),
        };
        assert_eq!(d.next_op(), Ok(Some(ServerOp::Ping)), "{block:?}");
        reason
    };
    assert!(reason("NATS/1.0\r\n\r\nxx").contains("before its declared length"));
    assert!(reason("NATS/1.0\r\nK: v\r\n").contains("empty line"));
    assert!(reason("NATS/1.0\r\nK: v\r\nxx").contains("empty line"));
    assert!(reason("HTTP/1.1\r\n\r\n").contains("NATS/1.0"));
    assert!(reason("NATS/1.0x\r\n\r\n").contains("NATS/1.0"));
    assert!(reason("NATS/1.0 50\r\n\r\n").contains("status"));
    assert!(reason("NATS/1.0 5034\r\n\r\n").contains("status"));
    assert!(reason("NATS/1.0 abc\r\n\r\n").contains("status"));
    assert!(reason("NATS/1.0\r\nno colon\r\n\r\n").contains("colon"));
    assert!(reason("NATS/1.0\r\n: v\r\n\r\n").contains("name"));
    assert!(reason("NATS/1.0\r\nA B: v\r\n\r\n").contains("name"));
    assert!(reason("NATS/1.0\r\nK: a\nb\r\n\r\n").contains("bare CR or LF"));
}

/// Non-UTF-8 bytes from the peer are replaced, not fatal.
#[test]
fn non_utf8_text_is_decoded_lossily() {
    let op = one(b"MSG _INBOX.a.\xff 1 0\r\n\r\n");
    assert_eq!(op, msg("_INBOX.a.\u{fffd}", 1, None, b""));
    assert_eq!(one(b"-ERR '\xfe'\r\n"), ServerOp::Err("\u{fffd}".into()));
}

/// The defaults are nats-server's own bounds: MAX_CONTROL_LINE_SIZE and MAX_PENDING_SIZE.
#[test]
fn default_limits_are_the_servers() {
    assert_eq!(DEFAULT_MAX_CONTROL_LINE, 4096);
    assert_eq!(DEFAULT_MAX_PAYLOAD, 67_108_864);
}

/// An announced size above the limit fails from the control line alone, and an allowed huge
/// size reserves nothing before its bytes arrive.
#[test]
fn payload_sizes_are_bounded_and_not_preallocated() {
    let limit = DEFAULT_MAX_PAYLOAD as u64;
    assert_eq!(
        error(format!("MSG a 1 {}\r\n", limit + 1).as_bytes()),
        NatsDecodeError::PayloadTooLarge {
            size: limit + 1,
            max: DEFAULT_MAX_PAYLOAD
        }
    );
    assert!(matches!(
        error(format!("HMSG a 1 12 {}\r\n", limit + 1).as_bytes()),
        NatsDecodeError::PayloadTooLarge { .. }
    ));
    let mut d = NatsDecoder::default();
    d.push(format!("MSG a 1 {limit}\r\n0123456789").as_bytes());
    assert_eq!(d.next_op(), Ok(None));
    assert_eq!(d.buffered_len(), 10);
    assert!(d.buffered_capacity() >= 10);
    assert!(
        d.buffered_capacity() < 64 * 1024,
        "capacity {}",
        d.buffered_capacity()
    );
    assert!(d.holds_partial_op());
}

/// The control line bound: exactly the limit passes, one byte more fails before any CRLF.
#[test]
fn control_line_bound_is_exact() {
    let limits = DecoderLimits {
        max_control_line: 64,
        max_info_line: 64,
        max_payload: 1024,
    };
    let line = format!("-ERR '{}'", "e".repeat(64 - 7));
    assert_eq!(line.len(), 64);
    let mut d = NatsDecoder::new(limits);
    d.push(line.as_bytes());
    d.push(b"\r");
    assert_eq!(d.next_op(), Ok(None));
    d.push(b"\n");
    assert!(matches!(d.next_op(), Ok(Some(ServerOp::Err(_)))));
    let mut d = NatsDecoder::new(limits);
    d.push(line.as_bytes());
    assert_eq!(d.next_op(), Ok(None));
    d.push(b"x");
    assert_eq!(
        d.next_op(),
        Err(NatsDecodeError::ControlLineTooLong { max: 64 })
    );
    assert_eq!(d.buffered_len(), 0);
    // A long line whose LF arrives in the same read fails the same way, never as BareLineFeed.
    let mut d = NatsDecoder::new(limits);
    d.push(format!("{line}xx\n").as_bytes());
    assert_eq!(
        d.next_op(),
        Err(NatsDecodeError::ControlLineTooLong { max: 64 })
    );
}

/// A large cluster's INFO (here 300 `connect_urls`, about 6 KB) is over the 4096-byte control
/// line bound but decodes under INFO's own bound; other operations keep the tight one.
#[test]
fn info_has_its_own_larger_bound() {
    let urls: Vec<String> = (0..300)
        .map(|i| format!("10.1.{}.{}:4222", i / 250, i % 250))
        .collect();
    let line = format!("INFO {}\r\n", serde_json::json!({"connect_urls": urls}));
    assert!(line.len() > DEFAULT_MAX_CONTROL_LINE);
    let mut d = NatsDecoder::default();
    for chunk in line.as_bytes().chunks(1000) {
        d.push(chunk);
    }
    match d.next_op() {
        Ok(Some(ServerOp::Info(i))) => assert_eq!(i.connect_urls.len(), 300),
        other => panic!("{other:?}"),
    }
    let limits = DecoderLimits {
        max_control_line: 64,
        max_info_line: 128,
        max_payload: 1024,
    };
    let mut d = NatsDecoder::new(limits);
    d.push(format!("info {{\"x\":\"{}\"}}\r\n", "a".repeat(100)).as_bytes());
    assert!(matches!(d.next_op(), Ok(Some(ServerOp::Info(_)))));
    d.push(format!("INFO {{\"x\":\"{}\"}}", "a".repeat(130)).as_bytes());
    assert_eq!(
        d.next_op(),
        Err(NatsDecodeError::ControlLineTooLong { max: 128 })
    );
    let mut d = NatsDecoder::new(limits);
    d.push(format!("-ERR '{}'", "e".repeat(100)).as_bytes());
    assert_eq!(
        d.next_op(),
        Err(NatsDecodeError::ControlLineTooLong { max: 64 })
    );
}

fn ns(bytes: &BytesMut) -> &str {
    std::str::from_utf8(bytes).expect("encoders write text here")
}

/// Encoders write the documented bytes.
#[test]
fn encoder_golden() {
    let mut out = BytesMut::new();
    encode_pub("FOO", None, b"Hello NATS!", &mut out).unwrap();
    encode_pub("FRONT.DOOR", Some("INBOX.22"), b"Knock Knock", &mut out).unwrap();
    encode_pub("NOTIFY", None, b"", &mut out).unwrap();
    assert_eq!(
        ns(&out),
        "PUB FOO 11\r\nHello NATS!\r\nPUB FRONT.DOOR INBOX.22 11\r\nKnock Knock\r\nPUB NOTIFY 0\r\n\r\n"
    );
    let mut out = BytesMut::new();
    encode_hpub("FOO", None, &[("Bar", "Baz")], b"Hello NATS!", &mut out).unwrap();
    assert_eq!(
        ns(&out),
        "HPUB FOO 22 33\r\nNATS/1.0\r\nBar: Baz\r\n\r\nHello NATS!\r\n"
    );
    let mut out = BytesMut::new();
    let menu = [("BREAKFAST", "donut"), ("LUNCH", "burger")];
    encode_hpub(
        "FRONT.DOOR",
        Some("INBOX.22"),
        &menu,
        b"Knock Knock",
        &mut out,
    )
    .unwrap();
    assert_eq!(
        ns(&out),
        "HPUB FRONT.DOOR INBOX.22 45 56\r\nNATS/1.0\r\nBREAKFAST: donut\r\nLUNCH: burger\r\n\r\nKnock Knock\r\n"
    );
    let mut out = BytesMut::new();
    encode_hpub("NOTIFY", None, &[("Bar", "Baz")], b"", &mut out).unwrap();
    encode_hpub("N", None, &[], b"x", &mut out).unwrap();
    assert_eq!(
        ns(&out),
        "HPUB NOTIFY 22 22\r\nNATS/1.0\r\nBar: Baz\r\n\r\n\r\nHPUB N 12 13\r\nNATS/1.0\r\n\r\nx\r\n"
    );
    let mut out = BytesMut::new();
    encode_sub("_INBOX.abc.*", 1, &mut out).unwrap();
    encode_unsub(1, None, &mut out);
    encode_unsub(18_446_744_073_709_551_615, Some(5), &mut out);
    encode_ping(&mut out);
    encode_pong(&mut out);
    assert_eq!(
        ns(&out),
        "SUB _INBOX.abc.* 1\r\nUNSUB 1\r\nUNSUB 18446744073709551615 5\r\nPING\r\nPONG\r\n"
    );
}

/// CONNECT: the fields the spec asks for, credentials only when set, one line always.
#[test]
fn connect_golden() {
    let server = ServerInfo {
        headers: true,
        ..ServerInfo::default()
    };
    let mut opts = ConnectOptions::for_server("ipc-gateway@host", &server);
    opts.version = "0.1.0".into();
    let mut out = BytesMut::new();
    encode_connect(&opts, &mut out);
    assert_eq!(
        ns(&out),
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"name\":\"ipc-gateway@host\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1,\"echo\":true}\r\n"
    );
    opts.user = Some("u".into());
    opts.pass = Some("secret".into());
    opts.auth_token = Some("tok".into());
    opts.name = "a\r\nb".into();
    let mut out = BytesMut::new();
    encode_connect(&opts, &mut out);
    let text = ns(&out);
    assert!(text.contains(r#""name":"a\r\nb""#), "{text}");
    assert!(
        text.contains(r#""protocol":1,"user":"u","pass":"secret","auth_token":"tok","echo":true}"#)
    );
    assert_eq!(text.matches("\r\n").count(), 1);
    let debug = format!("{opts:?}");
    assert!(
        !debug.contains("secret") && !debug.contains("tok\""),
        "{debug}"
    );
    assert!(
        debug.starts_with("ConnectOptions {")
            && debug.contains(r#"pass: Some("***")"#)
            && debug.contains(r#"auth_token: Some("***")"#)
            && debug.contains(r#"user: Some("u")"#),
        "the masked fields are still shown: {debug}"
    );
    // Without server headers, neither headers nor no_responders (the server refuses the latter
    // alone).
    let plain = ConnectOptions::for_server("g", &ServerInfo::default());
    assert!(!plain.headers && !plain.no_responders);
}

/// Caller misuse is refused before anything is written.
#[test]
fn encoders_refuse_corrupt_frames() {
    let mut out = BytesMut::new();
    for subject in ["", "a b", "a\tb", "a\r\nb", "a\0"] {
        assert!(matches!(
            encode_pub(subject, None, b"", &mut out),
            Err(NatsEncodeError::InvalidSubject { .. })
        ));
        assert!(encode_sub(subject, 1, &mut out).is_err());
        assert!(encode_pub("ok", Some(subject), b"", &mut out).is_err());
        assert!(encode_hpub("ok", Some(subject), &[], b"", &mut out).is_err());
    }
    for name in ["", "a:b", "a b", "a\r", "a\n"] {
        assert_eq!(
            encode_hpub("s", None, &[(name, "v")], b"", &mut out),
            Err(NatsEncodeError::InvalidHeaderName { name: name.into() })
        );
    }
    for value in ["a\r", "a\nb", "\r\n"] {
        assert_eq!(
            encode_hpub("s", None, &[("K", "ok"), ("N", value)], b"", &mut out),
            Err(NatsEncodeError::InvalidHeaderValue { name: "N".into() })
        );
    }
    assert!(out.is_empty());
    assert!(!NatsEncodeError::InvalidSubject {
        subject: "a b".into()
    }
    .to_string()
    .is_empty());
}

/// What HPUB writes is what HMSG delivers: the server copies the block, so our decoder must
/// read our encoder's block back.
#[test]
fn hpub_block_reads_back_as_hmsg() {
    let mut out = BytesMut::new();
    let headers = [
        ("version", "1"),
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ];
    encode_hpub(
        "beamline.router.v1.decide",
        Some("_INBOX.g.7"),
        &headers,
        b"{}",
        &mut out,
    )
    .unwrap();
    let text = ns(&out);
    let (line, rest) = text.split_once("\r\n").unwrap();
    let args: Vec<&str> = line.split(' ').collect();
    let hmsg = format!(
        "HMSG {} 3 {} {} {}\r\n{rest}",
        args[1], args[2], args[3], args[4]
    );
    let ServerOp::HMsg {
        headers: got,
        payload,
        reply_to,
        ..
    } = one(hmsg.as_bytes())
    else {
        panic!()
    };
    let want: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        (got, &payload[..], reply_to.as_deref()),
        (want, &b"{}"[..], Some("_INBOX.g.7"))
    );
}

// ---- properties ----------------------------------------------------------------------------

/// How the test server spells ops: case and separator runs vary, as the protocol allows.
#[derive(Debug, Clone, Copy)]
struct Style {
    lower: bool,
    sep: &'static str,
}

/// A server-side encoder for the ops a server sends (tests only).
fn encode_server(op: &ServerOp, style: Style) -> Vec<u8> {
    let name = |n: &str| {
        if style.lower {
            n.to_lowercase()
        } else {
            n.to_owned()
        }
    };
    let s = style.sep;
    let reply = |r: &Option<String>| r.as_ref().map(|r| format!("{r}{s}")).unwrap_or_default();
    let mut out = Vec::new();
    match op {
        ServerOp::Info(info) => {
            out.extend(format!("{}{s}", name("INFO")).bytes());
            out.extend(serde_json::to_vec(info).unwrap());
        }
        ServerOp::Msg {
            subject,
            sid,
            reply_to,
            payload,
        } => {
            let r = reply(reply_to);
            out.extend(
                format!(
                    "{}{s}{subject}{s}{sid}{s}{r}{}\r\n",
                    name("MSG"),
                    payload.len()
                )
                .bytes(),
            );
            out.extend_from_slice(payload);
        }
        ServerOp::HMsg {
            subject,
            sid,
            reply_to,
            status,
            description,
            headers,
            payload,
        } => {
            let mut block = String::from("NATS/1.0");
            if let Some(status) = status {
                block += &format!(" {status}");
                if let Some(d) = description {
                    block += &format!(" {d}");
                }
            }
            block += "\r\n";
            for (k, v) in headers {
                block += &format!("{k}: {v}\r\n");
            }
            block += "\r\n";
            let (h, t, r) = (block.len(), block.len() + payload.len(), reply(reply_to));
            out.extend(
                format!(
                    "{}{s}{subject}{s}{sid}{s}{r}{h}{s}{t}\r\n{block}",
                    name("HMSG")
                )
                .bytes(),
            );
            out.extend_from_slice(payload);
        }
        ServerOp::Ping => out.extend(name("PING").bytes()),
        ServerOp::Pong => out.extend(name("PONG").bytes()),
        ServerOp::Ok => out.extend(name("+OK").bytes()),
        ServerOp::Err(text) => out.extend(format!("{}{s}'{text}'", name("-ERR")).bytes()),
        ServerOp::Unreadable { subject, sid, .. } => {
            let block = "NATS/1.0 x\r\n\r\n";
            let h = block.len();
            out.extend(
                format!(
                    "{}{s}{subject}{s}{sid}{s}{h}{s}{h}\r\n{block}",
                    name("HMSG")
                )
                .bytes(),
            );
        }
    }
    out.extend(b"\r\n");
    out
}

fn arb_info() -> impl Strategy<Value = ServerInfo> {
    let text = || proptest::option::of("[A-Za-z0-9._-]{1,20}");
    (
        (
            text(),
            text(),
            text(),
            proptest::option::of(0i64..3),
            proptest::option::of(prop_oneof![
                Just("0.0.0.0".to_string()),
                "[a-z][a-z0-9.-]{0,20}"
            ]),
        ),
        (
            proptest::option::of(any::<u16>()),
            any::<bool>(),
            proptest::option::of(any::<u64>()),
        ),
        proptest::collection::vec("[a-z0-9.-]{1,12}:[0-9]{1,5}", 0..4),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            text(),
            proptest::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (server_id, server_name, version, proto, host),
                (port, headers, max_payload),
                connect_urls,
                (ldm, auth_required, tls_required, nonce, client_id),
            )| ServerInfo {
                server_id,
                server_name,
                version,
                proto,
                host,
                port,
                headers,
                max_payload,
                connect_urls,
                ldm,
                auth_required,
                tls_required,
                tls_available: false,
                nonce,
                client_id,
            },
        )
}

fn arb_op() -> impl Strategy<Value = ServerOp> {
    let subject = || "[A-Za-z0-9_.>*-]{1,24}";
    let reply = || proptest::option::of("_INBOX\\.[A-Za-z0-9]{1,8}\\.[0-9]{1,4}");
    let payload = || proptest::collection::vec(any::<u8>(), 0..200).prop_map(Bytes::from);
    let status = proptest::option::of((
        100u16..1000,
        proptest::option::of("[A-Za-z]([A-Za-z ]{0,14}[A-Za-z])?"),
    ));
    let header = ("[A-Za-z0-9-]{1,12}", "([!-~]([ -~]{0,16}[!-~])?)?");
    prop_oneof![
        arb_info().prop_map(ServerOp::Info),
        (subject(), any::<u64>(), reply(), payload()).prop_map(
            |(subject, sid, reply_to, payload)| ServerOp::Msg {
                subject,
                sid,
                reply_to,
                payload
            }
        ),
        (
            subject(),
            any::<u64>(),
            reply(),
            status,
            proptest::collection::vec(header, 0..4),
            payload()
        )
            .prop_map(|(subject, sid, reply_to, status, headers, payload)| {
                ServerOp::HMsg {
                    subject,
                    sid,
                    reply_to,
                    status: status.as_ref().map(|s| s.0),
                    description: status.and_then(|s| s.1),
                    headers,
                    payload,
                }
            }),
        Just(ServerOp::Ping),
        Just(ServerOp::Pong),
        Just(ServerOp::Ok),
        "[ -~]{0,30}".prop_map(ServerOp::Err),
    ]
}

fn arb_style() -> impl Strategy<Value = Style> {
    (
        any::<bool>(),
        prop_oneof![Just(" "), Just("\t"), Just("  "), Just(" \t ")],
    )
        .prop_map(|(lower, sep)| Style { lower, sep })
}

/// Sorted cut points over `len` bytes, 0 and `len` included.
fn cut_points(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.extend([0, len]);
    points.sort_unstable();
    points
}

/// Pushes `stream` in the pieces between `points`, draining after each push.
fn decode_split(
    stream: &[u8],
    points: &[usize],
    limits: DecoderLimits,
) -> (Vec<ServerOp>, Option<NatsDecodeError>) {
    let mut d = NatsDecoder::new(limits);
    let mut ops = Vec::new();
    for w in points.windows(2) {
        d.push(&stream[w[0]..w[1]]);
        let (mut more, err) = decode_all(&mut d);
        ops.append(&mut more);
        if err.is_some() {
            return (ops, err);
        }
    }
    (ops, None)
}

/// Streams biased towards protocol fragments, so arbitrary input reaches deep states.
fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(b"MSG a 1 ".to_vec()),
        Just(b"HMSG a 1 ".to_vec()),
        Just(b"NATS/1.0 503".to_vec()),
        Just(b"PING".to_vec()),
        Just(b"+OK".to_vec()),
        Just(b"-ERR 'x'".to_vec()),
        Just(b"INFO {}".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\t".to_vec()),
        (0u8..30).prop_map(|n| format!("{n} ").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..6),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(fragment, 0..30).prop_map(|f| f.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any sequence of server ops decodes to the same ops however the stream is split.
    #[test]
    fn ops_decode_the_same_whatever_the_split(
        ops in proptest::collection::vec((arb_op(), arb_style()), 0..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..30),
    ) {
        let stream: Vec<u8> = ops.iter().flat_map(|(op, style)| encode_server(op, *style)).collect();
        let points = cut_points(&cuts, stream.len());
        let (got, err) = decode_split(&stream, &points, DecoderLimits::default());
        prop_assert_eq!(err, None);
        let want: Vec<ServerOp> = ops.into_iter().map(|(op, _)| op).collect();
        prop_assert_eq!(got, want);
    }

    /// Arbitrary bytes never panic and give the same ops and the same error whatever the split.
    #[test]
    fn arbitrary_bytes_fail_the_same_way_whatever_the_split(
        stream in arb_stream(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        max_control_line in 4usize..64,
    ) {
        let limits = DecoderLimits { max_control_line, max_info_line: max_control_line * 2, max_payload: 64 };
        let whole = decode_split(&stream, &[0, stream.len()], limits);
        let split = decode_split(&stream, &cut_points(&cuts, stream.len()), limits);
        prop_assert_eq!(whole, split);
    }

    /// A line that never ends fails at the first read that takes it past the bound (not
    /// later), after the ops before it, and memory stays within a line and a read.
    #[test]
    fn an_endless_line_fails_once_past_the_bound(
        max in 16usize..512,
        body in proptest::collection::vec(any::<u8>().prop_filter("no LF", |b| *b != b'\n'), 600..1200),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let mut stream = b"PING\r\n".to_vec();
        stream.extend(&body);
        // The first prefix of the line whose length (a final CR aside) passes the bound.
        let fails_at = 6 + (1..=body.len())
            .find(|k| k - usize::from(body[k - 1] == b'\r') > max)
            .expect("the body is longer than any bound tried");
        let mut d = NatsDecoder::new(DecoderLimits { max_control_line: max, max_info_line: max, max_payload: 1024 });
        let (mut pushed, mut i, mut ops) = (0, 0, Vec::new());
        loop {
            let n = chunks[i % chunks.len()].min(stream.len() - pushed);
            i += 1;
            d.push(&stream[pushed..pushed + n]);
            pushed += n;
            prop_assert!(d.buffered_capacity() <= 2 * (max + 6 + 64) + 64, "capacity {}", d.buffered_capacity());
            let (mut more, err) = decode_all(&mut d);
            ops.append(&mut more);
            if pushed < fails_at {
                prop_assert_eq!(err, None);
            } else {
                prop_assert_eq!(err, Some(NatsDecodeError::ControlLineTooLong { max }));
                break;
            }
        }
        prop_assert_eq!(ops, vec![ServerOp::Ping]);
        prop_assert_eq!(d.buffered_len(), 0);
    }
}

/// Sizes and sids are plain decimal digits: the byte after '9' (':') is not a digit.
#[test]
fn numbers_are_decimal_digits_only() {
    for line in [
        &b"MSG a 1 1:\r\n"[..],
        b"MSG a : 1\r\n",
        b"MSG a 1 /\r\n",
        b"MSG a 1 -1\r\n",
    ] {
        assert!(
            matches!(error(line), NatsDecodeError::BadNumber { .. }),
            "{:?} -> {:?}",
            String::from_utf8_lossy(line),
            error(line)
        );
    }
}
