//! What a server sends: [`NatsDecoder`] turns bytes into [`ServerOp`]s (module doc of
//! [`super`] for the rules).

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{CRLF, HEADER_VERSION};

/// Default bound on a control line, CRLF excluded (nats-server's `MAX_CONTROL_LINE_SIZE`).
pub const DEFAULT_MAX_CONTROL_LINE: usize = 4096;
/// Default bound on an INFO line. A server's INFO grows with its cluster (`connect_urls`) and
/// is not bound by `MAX_CONTROL_LINE_SIZE` (that limit is the server's on what clients send),
/// so INFO gets its own, larger bound.
pub const DEFAULT_MAX_INFO_LINE: usize = 64 * 1024;
/// Default bound on what one MSG/HMSG may carry, headers included: nats-server refuses a
/// `max_payload` above its 64 MiB `MAX_PENDING_SIZE`, so no server sends more.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// The status a server puts in a header-only reply to a request nobody could receive.
pub const NO_RESPONDERS: u16 = 503;

/// `NATS/1.0\r\n\r\n`: the smallest header block.
const MIN_HEADER_LEN: usize = 12;

/// The decoder's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Longest control line accepted, CRLF excluded.
    pub max_control_line: usize,
    /// Longest INFO line accepted (at least `max_control_line` in effect), CRLF excluded.
    pub max_info_line: usize,
    /// Largest MSG payload or HMSG total (headers + payload) accepted.
    pub max_payload: usize,
}

impl Default for DecoderLimits {
    fn default() -> DecoderLimits {
        DecoderLimits {
            max_control_line: DEFAULT_MAX_CONTROL_LINE,
            max_info_line: DEFAULT_MAX_INFO_LINE,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// The INFO fields the gateway uses; every one may be absent (or `null`), others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerInfo {
    pub server_id: Option<String>,
    pub server_name: Option<String>,
    pub version: Option<String>,
    pub proto: Option<i64>,
    /// What the server listens on: an address (`0.0.0.0`) or a name, taken as given.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The server understands HPUB/HMSG (and can answer no-responders with a 503).
    pub headers: bool,
    pub max_payload: Option<u64>,
    /// Other servers of the cluster, as sent: usually `host:port` without a scheme.
    pub connect_urls: Vec<String>,
    /// Lame duck mode: the server is about to close; move to another one.
    pub ldm: bool,
    pub auth_required: bool,
    pub tls_required: bool,
    /// The server accepts TLS without requiring it (`allow_non_tls`): a client that wants TLS
    /// may upgrade.
    pub tls_available: bool,
    pub nonce: Option<String>,
    pub client_id: Option<u64>,
}

/// One operation sent by a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    Info(ServerInfo),
    Msg {
        subject: String,
        sid: u64,
        reply_to: Option<String>,
        payload: Bytes,
    },
    HMsg {
        subject: String,
        sid: u64,
        reply_to: Option<String>,
        /// The status on the version line (`NATS/1.0 503`), if any.
        status: Option<u16>,
        description: Option<String>,
        /// `Key: Value` lines in order; repeated keys stay separate entries.
        headers: Vec<(String, String)>,
        payload: Bytes,
    },
    /// An HMSG whose header block is malformed. Its length was announced correctly, so the
    /// stream stays readable: one stray publisher's bad message must not cost the connection
    /// and every request on it. The message's content cannot be trusted and is not returned.
    Unreadable {
        subject: String,
        sid: u64,
        reason: &'static str,
    },
    Ping,
    Pong,
    Ok,
    /// The text of `-ERR 'text'`, without the quotes.
    Err(String),
}

impl ServerOp {
    /// True for the header-only 503 a server sends when a request had no subscriber.
    pub fn is_no_responders(&self) -> bool {
        matches!(
            self,
            ServerOp::HMsg {
                status: Some(NO_RESPONDERS),
                ..
            }
        )
    }
}

/// Why the server's byte stream cannot be decoded any further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsDecodeError {
    /// No CRLF within `max` bytes.
    ControlLineTooLong { max: usize },
    /// A control line ended by LF without CR.
    BareLineFeed,
    /// Not a server operation (client operations such as PUB count as unknown too).
    UnknownOperation { op: String },
    /// An operation with the wrong number of arguments.
    WrongArgumentCount { op: &'static str, count: usize },
    /// An argument that must be a decimal number is not one, or does not fit 64 bits.
    BadNumber {
        op: &'static str,
        field: &'static str,
    },
    /// An announced MSG size or HMSG total above the configured maximum.
    PayloadTooLarge { size: u64, max: usize },
    /// An HMSG header size above its total, or too small for `NATS/1.0\r\n\r\n`.
    BadHeaderSize { header: u64, total: u64 },
    /// The announced payload is not followed by CRLF.
    MissingPayloadTerminator,
    /// INFO arguments that are not the JSON object INFO must carry.
    InvalidInfo { reason: String },
}

impl fmt::Display for NatsDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use NatsDecodeError::*;
        match self {
            ControlLineTooLong { max } => write!(f, "control line longer than {max} bytes"),
            BareLineFeed => write!(f, "control line ended by LF without CR"),
            UnknownOperation { op } => write!(f, "unknown operation {op:?}"),
            WrongArgumentCount { op, count } => write!(f, "{op} with {count} arguments"),
            BadNumber { op, field } => write!(f, "{op} {field} is not a decimal number"),
            PayloadTooLarge { size, max } => write!(f, "payload of {size} bytes over {max}"),
            BadHeaderSize { header, total } => write!(f, "header size {header} of {total}"),
            MissingPayloadTerminator => write!(f, "payload not followed by CRLF"),
            InvalidInfo { reason } => write!(f, "invalid INFO: {reason}"),
        }
    }
}

impl std::error::Error for NatsDecodeError {}

/// Incremental decoder for one connection's byte stream from a NATS server.
///
/// Call order: [`push`](NatsDecoder::push) what was read, then
/// [`next_op`](NatsDecoder::next_op) until it returns `Ok(None)`. On a new connection, start a
/// new decoder.
#[derive(Debug)]
pub struct NatsDecoder {
    buf: BytesMut,
    limits: DecoderLimits,
    state: State,
    /// How much of the pending control line was already searched for LF, so that a line
    /// arriving a byte at a time costs linear time.
    scanned: usize,
    failed: Option<NatsDecodeError>,
}

#[derive(Debug)]
enum State {
    ControlLine,
    Payload(PendingMsg),
}

/// A MSG/HMSG whose control line is read and whose payload is still arriving.
#[derive(Debug)]
struct PendingMsg {
    subject: String,
    sid: u64,
    reply_to: Option<String>,
    /// `Some` for HMSG.
    header_len: Option<usize>,
    total_len: usize,
}

impl Default for NatsDecoder {
    fn default() -> NatsDecoder {
        NatsDecoder::new(DecoderLimits::default())
    }
}

impl NatsDecoder {
    pub fn new(limits: DecoderLimits) -> NatsDecoder {
        NatsDecoder {
            buf: BytesMut::new(),
            limits,
            state: State::ControlLine,
            scanned: 0,
            failed: None,
        }
    }

    /// Appends bytes read from the server. Bytes after a decode error are discarded.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete operation, `Ok(None)` if more bytes are needed, or the error that
    /// ended the stream (returned again on every later call).
    #[must_use = "operations are only returned once"]
    pub fn next_op(&mut self) -> Result<Option<ServerOp>, NatsDecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        self.step().inspect_err(|err| {
            self.failed = Some(err.clone());
            // The rest of the stream is unreadable: give its memory back now.
            self.buf = BytesMut::new();
            self.state = State::ControlLine;
            self.scanned = 0;
        })
    }

    /// True while bytes of an incomplete operation are held.
    pub fn holds_partial_op(&self) -> bool {
        self.failed.is_none() && (!self.buf.is_empty() || matches!(self.state, State::Payload(_)))
    }

    /// Bytes currently buffered.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Capacity currently allocated (for the bounded-memory checks).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn step(&mut self) -> Result<Option<ServerOp>, NatsDecodeError> {
        if let State::ControlLine = self.state {
            let Some(newline) = self.find_line_end()? else {
                return Ok(None);
            };
            let line = self
                .buf
                .get(..newline.saturating_sub(1))
                .unwrap_or_default();
            let parsed = parse_control_line(line, &self.limits)?;
            self.buf.advance(newline + 1);
            self.scanned = 0;
            match parsed {
                Line::Op(op) => return Ok(Some(op)),
                Line::Msg(pending) => self.state = State::Payload(pending),
            }
        }
        let State::Payload(pending) = &self.state else {
            return Ok(None);
        };
        let total = pending.total_len;
        // The terminator is judged byte by byte as it arrives, so a stream cut short and the
        // same stream completed later fail the same way.
        let end = self.buf.get(total..).unwrap_or_default();
        let end = end.get(..CRLF.len()).unwrap_or(end);
        if !CRLF.starts_with(end) {
            return Err(NatsDecodeError::MissingPayloadTerminator);
        }
        if end.len() < CRLF.len() {
            return Ok(None);
        }
        let State::Payload(pending) = std::mem::replace(&mut self.state, State::ControlLine) else {
            return Ok(None);
        };
        let body = self.buf.split_to(total).freeze();
        self.buf.advance(CRLF.len());
        let PendingMsg {
            subject,
            sid,
            reply_to,
            header_len,
            ..
        } = pending;
        let Some(header_len) = header_len else {
            return Ok(Some(ServerOp::Msg {
                subject,
                sid,
                reply_to,
                payload: body,
            }));
        };
        let block = match parse_header_block(body.get(..header_len).unwrap_or_default()) {
            Ok(block) => block,
            Err(reason) => {
                return Ok(Some(ServerOp::Unreadable {
                    subject,
                    sid,
                    reason,
                }))
            }
        };
        Ok(Some(ServerOp::HMsg {
            subject,
            sid,
            reply_to,
            status: block.status,
            description: block.description,
            headers: block.headers,
            payload: body.slice(header_len.min(body.len())..),
        }))
    }

    /// The index of the LF ending the pending control line, once it has arrived.
    ///
    /// The length is judged before the CR, so that whatever the split, a line that passes the
    /// bound is always `ControlLineTooLong` and never first something else.
    fn find_line_end(&mut self) -> Result<Option<usize>, NatsDecodeError> {
        let max = self.line_limit();
        let too_long = NatsDecodeError::ControlLineTooLong { max };
        let unscanned = self.buf.get(self.scanned..).unwrap_or_default();
        let Some(found) = unscanned.iter().position(|b| *b == b'\n') else {
            self.scanned = self.buf.len();
            if line_len(&self.buf) > max {
                return Err(too_long);
            }
            return Ok(None);
        };
        let newline = self.scanned + found;
        let before = self.buf.get(..newline).unwrap_or_default();
        if line_len(before) > max {
            return Err(too_long);
        }
        if before.last() != Some(&b'\r') {
            return Err(NatsDecodeError::BareLineFeed);
        }
        Ok(Some(newline))
    }
}

impl NatsDecoder {
    /// The bound on the pending control line: INFO's when it starts with `INFO` (a line
    /// shorter than four bytes is within either bound, so the split does not matter).
    fn line_limit(&self) -> usize {
        let info = self
            .buf
            .get(..4)
            .is_some_and(|op| op.eq_ignore_ascii_case(b"INFO"));
        if info {
            self.limits.max_info_line.max(self.limits.max_control_line)
        } else {
            self.limits.max_control_line
        }
    }
}

/// Length of a control line whose LF has not arrived: a final CR may still start its CRLF.
fn line_len(bytes: &[u8]) -> usize {
    bytes.len() - usize::from(bytes.last() == Some(&b'\r'))
}

enum Line {
    Op(ServerOp),
    Msg(PendingMsg),
}

fn is_sep(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_seps(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !is_sep(*b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_sep(*b)).map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or_default()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses one control line, CRLF excluded.
fn parse_control_line(line: &[u8], limits: &DecoderLimits) -> Result<Line, NatsDecodeError> {
    let op_end = line.iter().position(|b| is_sep(*b)).unwrap_or(line.len());
    let (op, rest) = line.split_at(op_end);
    let rest = trim_seps(rest);
    let bare = |name: &'static str, op: ServerOp| {
        let count = rest.split(|b| is_sep(*b)).filter(|a| !a.is_empty()).count();
        if count == 0 {
            Ok(Line::Op(op))
        } else {
            Err(NatsDecodeError::WrongArgumentCount { op: name, count })
        }
    };
    if op.eq_ignore_ascii_case(b"MSG") {
        parse_msg_args(rest, false, limits)
    } else if op.eq_ignore_ascii_case(b"HMSG") {
        parse_msg_args(rest, true, limits)
    } else if op.eq_ignore_ascii_case(b"PING") {
        bare("PING", ServerOp::Ping)
    } else if op.eq_ignore_ascii_case(b"PONG") {
        bare("PONG", ServerOp::Pong)
    } else if op.eq_ignore_ascii_case(b"+OK") {
        bare("+OK", ServerOp::Ok)
    } else if op.eq_ignore_ascii_case(b"-ERR") {
        // nats-server writes `-ERR '%s'`; the text itself may hold quotes
        // (`Permissions Violation for Publish to "x"`), so only the outer pair goes.
        let text = rest
            .strip_prefix(b"'")
            .and_then(|t| t.strip_suffix(b"'"))
            .unwrap_or(rest);
        Ok(Line::Op(ServerOp::Err(lossy(text))))
    } else if op.eq_ignore_ascii_case(b"INFO") {
        parse_info(rest).map(|info| Line::Op(ServerOp::Info(info)))
    } else {
        Err(NatsDecodeError::UnknownOperation {
            op: lossy(op.get(..16).unwrap_or(op)),
        })
    }
}

/// `MSG <subject> <sid> [reply-to] <#bytes>` or
/// `HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>`.
fn parse_msg_args(
    rest: &[u8],
    has_headers: bool,
    limits: &DecoderLimits,
) -> Result<Line, NatsDecodeError> {
    let op = if has_headers { "HMSG" } else { "MSG" };
    let mut args: [&[u8]; 5] = [&[]; 5];
    let mut count = 0;
    for arg in rest.split(|b| is_sep(*b)).filter(|a| !a.is_empty()) {
        if let Some(slot) = args.get_mut(count) {
            *slot = arg;
        }
        count += 1;
    }
    let wrong_count = NatsDecodeError::WrongArgumentCount { op, count };
    let (subject, sid, reply_to, header, total) = match (has_headers, args.get(..count)) {
        (false, Some([subject, sid, size])) => (subject, sid, None, None, size),
        (false, Some([subject, sid, reply, size])) => (subject, sid, Some(reply), None, size),
        (true, Some([subject, sid, hdr, total])) => (subject, sid, None, Some(hdr), total),
        (true, Some([subject, sid, reply, hdr, total])) => {
            (subject, sid, Some(reply), Some(hdr), total)
        }
        _ => return Err(wrong_count),
    };
    let number =
        |arg: &[u8], field| parse_decimal(arg).ok_or(NatsDecodeError::BadNumber { op, field });
    let sid = number(sid, "sid")?;
    let total = number(total, "size")?;
    let header = match header {
        Some(header) => {
            let header = number(header, "header size")?;
            if header > total || header < MIN_HEADER_LEN as u64 {
                return Err(NatsDecodeError::BadHeaderSize { header, total });
            }
            Some(header)
        }
        None => None,
    };
    let max = limits.max_payload;
    let too_large = NatsDecodeError::PayloadTooLarge { size: total, max };
    let total_len = usize::try_from(total).map_err(|_| too_large.clone())?;
    if total_len > max {
        return Err(too_large);
    }
    Ok(Line::Msg(PendingMsg {
        subject: lossy(subject),
        sid,
        reply_to: reply_to.map(|r| lossy(r)),
        // header <= total, which fits usize.
        header_len: header.map(|h| h as usize),
        total_len,
    }))
}

/// An unsigned decimal that fits u64: digits only, no sign, no spaces.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let digit = d.checked_sub(b'0').filter(|v| *v < 10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Reads INFO field by field, so an error names the field, and a field this client does not
/// use cannot fail the connection.
fn parse_info(json: &[u8]) -> Result<ServerInfo, NatsDecodeError> {
    let mut map: Map<String, Value> =
        serde_json::from_slice(json).map_err(|e| NatsDecodeError::InvalidInfo {
            reason: format!("not a JSON object: {e}"),
        })?;
    let mut take = |key: &'static str| map.remove(key).filter(|v| !v.is_null());
    Ok(ServerInfo {
        server_id: field(take("server_id"), "server_id")?,
        server_name: field(take("server_name"), "server_name")?,
        version: field(take("version"), "version")?,
        proto: field(take("proto"), "proto")?,
        host: field(take("host"), "host")?,
        port: field(take("port"), "port")?,
        headers: field(take("headers"), "headers")?.unwrap_or_default(),
        max_payload: field(take("max_payload"), "max_payload")?,
        connect_urls: field(take("connect_urls"), "connect_urls")?.unwrap_or_default(),
        ldm: field(take("ldm"), "ldm")?.unwrap_or_default(),
        auth_required: field(take("auth_required"), "auth_required")?.unwrap_or_default(),
        tls_required: field(take("tls_required"), "tls_required")?.unwrap_or_default(),
        tls_available: field(take("tls_available"), "tls_available")?.unwrap_or_default(),
        nonce: field(take("nonce"), "nonce")?,
        client_id: field(take("client_id"), "client_id")?,
    })
}

fn field<T: DeserializeOwned>(
    value: Option<Value>,
    key: &'static str,
) -> Result<Option<T>, NatsDecodeError> {
    value
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| NatsDecodeError::InvalidInfo {
            reason: format!("field {key}: {e}"),
        })
}

struct HeaderBlock {
    status: Option<u16>,
    description: Option<String>,
    headers: Vec<(String, String)>,
}

/// `NATS/1.0[ status[ description]]\r\n(Key: Value\r\n)*\r\n`, exactly the declared length.
/// The header block of an HMSG, or why it is malformed.
fn parse_header_block(block: &[u8]) -> Result<HeaderBlock, &'static str> {
    let bad = |reason: &'static str| reason;
    let mut lines = CrlfLines { rest: block };
    let version = lines
        .next()
        .ok_or(bad("the header block does not end with an empty line"))?;
    let (status, description) = parse_version_line(version).ok_or(bad(
        "the first line is not NATS/1.0 with an optional 3-digit status",
    ))?;
    let mut headers = Vec::new();
    loop {
        let line = lines
            .next()
            .ok_or(bad("the header block does not end with an empty line"))?;
        if line.is_empty() {
            break;
        }
        if line.iter().any(|b| *b == b'\r' || *b == b'\n') {
            return Err(bad("a header line holds a bare CR or LF"));
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(bad("a header line has no colon"))?;
        let (name, value) = line.split_at(colon);
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(bad("a header name is empty or holds whitespace"));
        }
        let value = trim_seps(value.get(1..).unwrap_or_default());
        headers.push((lossy(name), lossy(value)));
    }
    if !lines.rest.is_empty() {
        return Err(bad("the header block ends before its declared length"));
    }
    Ok(HeaderBlock {
        status,
        description,
        headers,
    })
}

/// `NATS/1.0`, optionally followed by a 3-digit status and a description (the shape nats.go's
/// `DecodeHeadersMsg` accepts); `None` if malformed.
fn parse_version_line(line: &[u8]) -> Option<(Option<u16>, Option<String>)> {
    let rest = line.strip_prefix(HEADER_VERSION)?;
    if rest.first().is_some_and(|b| !is_sep(*b)) {
        return None;
    }
    let rest = trim_seps(rest);
    if rest.is_empty() {
        return Some((None, None));
    }
    let (code, after) = rest.split_at_checked(3)?;
    if !code.iter().all(u8::is_ascii_digit) || after.first().is_some_and(|b| !is_sep(*b)) {
        return None;
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let description = trim_seps(after);
    Some((
        Some(status),
        (!description.is_empty()).then(|| lossy(description)),
    ))
}

/// Lines ended by CRLF; a last piece without CRLF is not yielded.
struct CrlfLines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for CrlfLines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let at = self.rest.windows(2).position(|w| w == CRLF)?;
        let (line, rest) = self.rest.split_at(at);
        self.rest = rest.get(CRLF.len()..).unwrap_or_default();
        Some(line)
    }
}
