//! The client half of the wire protocol, as the server reads it: one operation at a time
//! (`CONNECT`, `PING`, `PONG`, `SUB`, `UNSUB`, `PUB`, `HPUB`) out of a connection's input
//! buffer, and the header block of an `HPUB`. Pure functions; the server state machine in
//! the parent module applies what they return.

#[derive(Debug)]
pub(super) enum ClientOp {
    Connect(String),
    Ping,
    Pong,
    Sub {
        subject: String,
        sid: u64,
    },
    Unsub {
        sid: u64,
        max: Option<u64>,
    },
    Pub {
        subject: String,
        reply: Option<String>,
        headers: Option<Vec<(String, String)>>,
        payload: Vec<u8>,
    },
}

pub(super) enum Parse {
    Incomplete,
    Error(&'static str),
    Op(ClientOp, usize),
}

/// The longest control line accepted (nats-server's `max_control_line` default is 4 KiB).
const MAX_CONTROL_LINE: usize = 4096;

pub(super) fn parse_op(input: &[u8], max_payload: u64) -> Parse {
    let Some(eol) = input.windows(2).position(|w| w == b"\r\n") else {
        if input.len() > MAX_CONTROL_LINE {
            return Parse::Error("Maximum Control Line Exceeded");
        }
        return Parse::Incomplete;
    };
    let Ok(line) = std::str::from_utf8(&input[..eol]) else {
        return Parse::Error("Unknown Protocol Operation");
    };
    let after = eol + 2;
    let (verb, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let args: Vec<&str> = rest.split_ascii_whitespace().collect();
    let num = |s: &str| s.parse::<u64>().ok();
    match verb.to_ascii_uppercase().as_str() {
        "CONNECT" => Parse::Op(ClientOp::Connect(rest.trim().to_owned()), after),
        "PING" if args.is_empty() => Parse::Op(ClientOp::Ping, after),
        "PONG" if args.is_empty() => Parse::Op(ClientOp::Pong, after),
        "SUB" => {
            // SUB <subject> [queue group] <sid>
            let (subject, sid) = match args.as_slice() {
                [s, sid] | [s, _, sid] => (*s, num(sid)),
                _ => return Parse::Error("Unknown Protocol Operation"),
            };
            match sid {
                Some(sid) => Parse::Op(
                    ClientOp::Sub {
                        subject: subject.to_owned(),
                        sid,
                    },
                    after,
                ),
                None => Parse::Error("Unknown Protocol Operation"),
            }
        }
        "UNSUB" => match args.as_slice() {
            [sid] => match num(sid) {
                Some(sid) => Parse::Op(ClientOp::Unsub { sid, max: None }, after),
                None => Parse::Error("Unknown Protocol Operation"),
            },
            [sid, max] => match (num(sid), num(max)) {
                (Some(sid), Some(max)) => Parse::Op(
                    ClientOp::Unsub {
                        sid,
                        max: Some(max),
                    },
                    after,
                ),
                _ => Parse::Error("Unknown Protocol Operation"),
            },
            _ => Parse::Error("Unknown Protocol Operation"),
        },
        "PUB" => {
            let (subject, reply, n) = match args.as_slice() {
                [s, n] => (*s, None, num(n)),
                [s, r, n] => (*s, Some(*r), num(n)),
                _ => return Parse::Error("Unknown Protocol Operation"),
            };
            let Some(n) = n else {
                return Parse::Error("Unknown Protocol Operation");
            };
            if n > max_payload {
                return Parse::Error("Maximum Payload Violation");
            }
            let n = n as usize;
            if input.len() < after + n + 2 {
                return Parse::Incomplete;
            }
            if &input[after + n..after + n + 2] != b"\r\n" {
                return Parse::Error("Unknown Protocol Operation");
            }
            Parse::Op(
                ClientOp::Pub {
                    subject: subject.to_owned(),
                    reply: reply.map(str::to_owned),
                    headers: None,
                    payload: input[after..after + n].to_vec(),
                },
                after + n + 2,
            )
        }
        "HPUB" => {
            let (subject, reply, h, t) = match args.as_slice() {
                [s, h, t] => (*s, None, num(h), num(t)),
                [s, r, h, t] => (*s, Some(*r), num(h), num(t)),
                _ => return Parse::Error("Unknown Protocol Operation"),
            };
            let (Some(h), Some(t)) = (h, t) else {
                return Parse::Error("Unknown Protocol Operation");
            };
            if h > t || h < 12 {
                return Parse::Error("Unknown Protocol Operation");
            }
            if t > max_payload {
                return Parse::Error("Maximum Payload Violation");
            }
            let (h, t) = (h as usize, t as usize);
            if input.len() < after + t + 2 {
                return Parse::Incomplete;
            }
            if &input[after + t..after + t + 2] != b"\r\n" {
                return Parse::Error("Unknown Protocol Operation");
            }
            let Some(headers) = parse_header_block(&input[after..after + h]) else {
                return Parse::Error("Bad Header Block");
            };
            Parse::Op(
                ClientOp::Pub {
                    subject: subject.to_owned(),
                    reply: reply.map(str::to_owned),
                    headers: Some(headers),
                    payload: input[after + h..after + t].to_vec(),
                },
                after + t + 2,
            )
        }
        _ => Parse::Error("Unknown Protocol Operation"),
    }
}

/// `NATS/1.0\r\n(Key: Value\r\n)*\r\n` → the key/value lines; `None` when malformed.
pub fn parse_header_block(block: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(block).ok()?;
    let body = text.strip_suffix("\r\n\r\n")?;
    let mut lines = body.split("\r\n");
    let version = lines.next()?;
    if !version.starts_with("NATS/1.0") {
        return None;
    }
    lines
        .map(|l| {
            let (k, v) = l.split_once(':')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}
