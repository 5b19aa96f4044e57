//! What a client sends: CONNECT, PUB, HPUB, SUB, UNSUB, PING, PONG, each validated and
//! written into a caller's buffer.

use std::fmt;

use bytes::{BufMut, BytesMut};
use serde::Serialize;

use super::decode::ServerInfo;
use super::{CRLF, HEADER_VERSION};

/// What the gateway says in CONNECT.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct ConnectOptions {
    /// `+OK` after every operation; off, as in every client.
    pub verbose: bool,
    pub pedantic: bool,
    /// May only be true when INFO said `headers: true`.
    pub headers: bool,
    /// Ask for the 503 on requests nobody receives; the server refuses it without `headers`.
    pub no_responders: bool,
    pub name: String,
    pub lang: String,
    pub version: String,
    /// 1: the server may send INFO again at any time (cluster changes, lame duck mode).
    pub protocol: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    /// A user JWT (from a `.creds` file); secret enough to be masked: it is a bearer credential
    /// together with `sig`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    /// The public nkey (`U...`) whose seed signed the nonce; public, shown in logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey: Option<String>,
    /// The INFO nonce signed with the nkey seed, base64url without padding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    pub echo: bool,
}

impl ConnectOptions {
    /// The options for a server that sent `info`: headers and no-responders exactly when the
    /// server supports headers (without them a missing Router looks like a timeout).
    pub fn for_server(name: impl Into<String>, info: &ServerInfo) -> ConnectOptions {
        ConnectOptions {
            verbose: false,
            pedantic: false,
            headers: info.headers,
            no_responders: info.headers,
            name: name.into(),
            lang: "rust".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: 1,
            user: None,
            pass: None,
            auth_token: None,
            jwt: None,
            nkey: None,
            sig: None,
            echo: true,
        }
    }
}

/// Credentials are masked: these options end up in logs.
impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mask = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("ConnectOptions")
            .field("verbose", &self.verbose)
            .field("pedantic", &self.pedantic)
            .field("headers", &self.headers)
            .field("no_responders", &self.no_responders)
            .field("name", &self.name)
            .field("lang", &self.lang)
            .field("version", &self.version)
            .field("protocol", &self.protocol)
            .field("user", &self.user)
            .field("pass", &mask(&self.pass))
            .field("auth_token", &mask(&self.auth_token))
            .field("jwt", &mask(&self.jwt))
            .field("nkey", &self.nkey)
            .field("sig", &mask(&self.sig))
            .field("echo", &self.echo)
            .finish()
    }
}

/// A frame the caller asked for that would corrupt the stream; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsEncodeError {
    /// A subject (or reply subject) that is empty or holds whitespace or control characters.
    InvalidSubject { subject: String },
    /// A header name that is empty or holds `:`, whitespace or control characters.
    InvalidHeaderName { name: String },
    /// A header value holding CR or LF.
    InvalidHeaderValue { name: String },
}

impl fmt::Display for NatsEncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use NatsEncodeError::*;
        match self {
            InvalidSubject { subject } => write!(f, "invalid subject {subject:?}"),
            InvalidHeaderName { name } => write!(f, "invalid header name {name:?}"),
            InvalidHeaderValue { name } => write!(f, "header {name:?} has CR or LF in its value"),
        }
    }
}

impl std::error::Error for NatsEncodeError {}

/// `CONNECT {json}\r\n`. serde_json escapes CR and LF inside strings, so the line is one line.
pub fn encode_connect(options: &ConnectOptions, out: &mut BytesMut) {
    let json = serde_json::to_vec(options).expect("strings and booleans always serialize");
    out.reserve(json.len() + 10);
    out.put_slice(b"CONNECT ");
    out.put_slice(&json);
    out.put_slice(CRLF);
}

/// `PUB <subject> [reply-to] <#bytes>\r\n<payload>\r\n`.
pub fn encode_pub(
    subject: &str,
    reply_to: Option<&str>,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), NatsEncodeError> {
    check_subjects(subject, reply_to)?;
    out.reserve(subject.len() + reply_to.map_or(0, str::len) + payload.len() + 32);
    put_subjects(out, b"PUB ", subject, reply_to);
    put_decimal(out, payload.len() as u64);
    out.put_slice(CRLF);
    out.put_slice(payload);
    out.put_slice(CRLF);
    Ok(())
}

/// `HPUB <subject> [reply-to] <#header bytes> <#total bytes>\r\nNATS/1.0\r\n(Key: Value\r\n)*\r\n<payload>\r\n`.
pub fn encode_hpub(
    subject: &str,
    reply_to: Option<&str>,
    headers: &[(&str, &str)],
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), NatsEncodeError> {
    check_subjects(subject, reply_to)?;
    for (name, value) in headers {
        let bad_name = |b: &u8| *b == b':' || b.is_ascii_whitespace() || b.is_ascii_control();
        if name.is_empty() || name.bytes().any(|b| bad_name(&b)) {
            return Err(NatsEncodeError::InvalidHeaderName {
                name: (*name).to_owned(),
            });
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(NatsEncodeError::InvalidHeaderValue {
                name: (*name).to_owned(),
            });
        }
    }
    let header_len = HEADER_VERSION.len()
        + 2 * CRLF.len()
        + headers
            .iter()
            .map(|(n, v)| n.len() + 2 + v.len() + CRLF.len())
            .sum::<usize>();
    out.reserve(subject.len() + reply_to.map_or(0, str::len) + header_len + payload.len() + 48);
    put_subjects(out, b"HPUB ", subject, reply_to);
    put_decimal(out, header_len as u64);
    out.put_u8(b' ');
    put_decimal(out, (header_len + payload.len()) as u64);
    out.put_slice(CRLF);
    out.put_slice(HEADER_VERSION);
    out.put_slice(CRLF);
    for (name, value) in headers {
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(CRLF);
    }
    out.put_slice(CRLF);
    out.put_slice(payload);
    out.put_slice(CRLF);
    Ok(())
}

/// `SUB <subject> <sid>\r\n`.
pub fn encode_sub(subject: &str, sid: u64, out: &mut BytesMut) -> Result<(), NatsEncodeError> {
    check_subjects(subject, None)?;
    put_subjects(out, b"SUB ", subject, None);
    put_decimal(out, sid);
    out.put_slice(CRLF);
    Ok(())
}

/// `UNSUB <sid> [max_msgs]\r\n`.
pub fn encode_unsub(sid: u64, max_msgs: Option<u64>, out: &mut BytesMut) {
    out.put_slice(b"UNSUB ");
    put_decimal(out, sid);
    if let Some(max) = max_msgs {
        out.put_u8(b' ');
        put_decimal(out, max);
    }
    out.put_slice(CRLF);
}

/// `PING\r\n`.
pub fn encode_ping(out: &mut BytesMut) {
    out.put_slice(b"PING\r\n");
}

/// `PONG\r\n`.
pub fn encode_pong(out: &mut BytesMut) {
    out.put_slice(b"PONG\r\n");
}

fn check_subjects(subject: &str, reply_to: Option<&str>) -> Result<(), NatsEncodeError> {
    for s in std::iter::once(subject).chain(reply_to) {
        if s.is_empty()
            || s.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(NatsEncodeError::InvalidSubject {
                subject: s.to_owned(),
            });
        }
    }
    Ok(())
}

/// `OP subject [reply] ` (with the trailing space).
fn put_subjects(out: &mut BytesMut, op: &[u8], subject: &str, reply_to: Option<&str>) {
    out.put_slice(op);
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    if let Some(reply) = reply_to {
        out.put_slice(reply.as_bytes());
        out.put_u8(b' ');
    }
}

fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
}
