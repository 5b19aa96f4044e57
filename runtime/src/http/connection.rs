//! One HTTP/1.1 connection as a state machine without I/O: bytes in, requests out, a response
//! in, bytes out. The server (`super`) does the syscalls; this file decides what the bytes
//! mean, what the limits are and when the connection ends, so it can be tested byte by byte.
//!
//! ```text
//!   ┌──────────────┐  head complete (httparse)   ┌──────────────┐  all written, keep-alive
//!   │ Reading      │ ──────────────────────────▶ │ Writing      │ ─────────────────────────┐
//!   │ (head ≤ 8 KiB│  head > 8 KiB: 431, close   │ (one response│                          │
//!   │  deadline 5s)│  malformed: 400, close      │  at a time)  │  all written, close      │
//!   └──────────────┘  deadline: 408, close       └──────────────┘ ──────────▶ Done         │
//!          ▲                                                                               │
//!          └───────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! - One response at a time: a pipelined request is parsed only once the previous response
//!   has left, so a client that sends requests without reading the answers holds at most one
//!   response and 8 KiB of input here, whatever it sends (the server stops reading it).
//! - The deadline covers reading a request *and* writing its response: a client that stops
//!   reading is closed after 5 s like one that stops writing, so it cannot keep a slot.
//! - A request with a body (which none of the endpoints takes) is answered and the connection
//!   closed: skipping the body would mean trusting its framing, closing costs nothing.

use std::time::{Duration, Instant};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a request may take to arrive (and its response to leave).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Headers parsed per request; more is a head too large (431) like more than 8 KiB.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Anything else (answered 405 on a known path).
    Other,
}

/// A parsed request: only what the routes need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path, without the query string.
    pub path: String,
    /// The `Accept` header (for `/metrics`'s format).
    pub accept: Option<Vec<u8>>,
}

/// A response the routes built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        let mut body = body.as_bytes().to_vec();
        body.push(b'\n');
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            allow: None,
        }
    }
}

/// What [`Connection::next`] found in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do until more bytes come (or the previous response is still leaving).
    Wait,
    /// A complete request: route it and pass the response to [`Connection::respond`].
    Request(Request),
    /// The input is not a request the server will answer normally: answer with this status
    /// (400 or 431) through [`Connection::respond`]; the connection closes after it.
    Reject(u16),
}

/// What [`Connection::on_deadline`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Expired {
    /// Not yet.
    No,
    /// A request was (or should have been) on its way: answer 408; the connection closes
    /// after it.
    Answer408,
    /// Close without a word: an idle keep-alive connection (a 408 there could cross a
    /// request the client is just sending, RFC 9112 section 9.5), or a client that does not
    /// read its response.
    Close,
}

#[derive(Debug)]
pub struct Connection {
    /// Received bytes not yet parsed (at most one head's worth while reading).
    input: Vec<u8>,
    /// The response being written, and how much of it has left.
    output: Vec<u8>,
    sent: usize,
    /// Close once the output has left (an error, `Connection: close`, HTTP/1.0, the client's
    /// end of stream).
    close_after: bool,
    /// The client closed its sending side: no request will follow the buffered ones.
    eof: bool,
    /// The next request must be complete (or the response gone) by then.
    deadline: Instant,
    /// Responses queued on this connection.
    served: u64,
    /// Whether the current request was parsed with keep-alive.
    keep_alive: bool,
}

impl Connection {
    pub fn new(now: Instant) -> Connection {
        Connection {
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            close_after: false,
            eof: false,
            deadline: now + REQUEST_TIMEOUT,
            served: 0,
            keep_alive: true,
        }
    }

    /// Whether to read from the socket now, and how many bytes at most. Nothing while a
    /// response is leaving (one at a time, module doc) or once the connection is ending;
    /// while reading, one byte more than a head may have, so a head too large is seen.
    pub fn read_room(&self) -> usize {
        if self.close_after || self.eof || self.has_output() {
            return 0;
        }
        (MAX_HEAD + 1).saturating_sub(self.input.len())
    }

    /// Bytes from the socket.
    pub fn on_bytes(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// The client closed its sending side: what is buffered is answered, then the
    /// connection closes.
    pub fn on_eof(&mut self) {
        self.eof = true;
    }

    /// The next thing to answer, if any.
    pub fn next(&mut self) -> Next {
        if self.has_output() || self.close_after {
            return Next::Wait;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let head_len = match parsed.parse(&self.input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.input.len() > MAX_HEAD => {
                return Next::Reject(431)
            }
            Ok(httparse::Status::Partial) => return Next::Wait,
            Err(httparse::Error::TooManyHeaders) => return Next::Reject(431),
            Err(_) => return Next::Reject(400),
        };
        if head_len > MAX_HEAD {
            return Next::Reject(431);
        }
        let method = match parsed.method {
            Some("GET") => Method::Get,
            Some("HEAD") => Method::Head,
            _ => Method::Other,
        };
        let target = parsed.path.unwrap_or("");
        let path = target.split(['?', '#']).next().unwrap_or("").to_owned();
        // HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to
        // keep it (RFC 9112 section 9.3).
        let mut keep_alive = parsed.version == Some(1);
        let mut body = false;
        let mut accept = None;
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                match std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    Some(0) => {}
                    Some(_) => body = true,
                    None => return Next::Reject(400),
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                body = true;
            } else if h.name.eq_ignore_ascii_case("accept") {
                accept = Some(h.value.to_vec());
            }
        }
        self.input.drain(..head_len);
        self.keep_alive = keep_alive && !body;
        Next::Request(Request {
            method,
            path,
            accept,
        })
    }

    /// Queues the response to the request [`Connection::next`] returned (or to its
    /// rejection, or to the deadline's 408). `head_only` for HEAD: the headers say what GET
    /// would send, no body follows. Rejections and 408 close the connection after it.
    pub fn respond(&mut self, response: &Response, head_only: bool, now: Instant) {
        let close = !self.keep_alive || self.eof || matches!(response.status, 400 | 408 | 431);
        self.close_after |= close;
        self.output = encode(response, head_only, self.close_after);
        self.sent = 0;
        self.served += 1;
        self.deadline = now + REQUEST_TIMEOUT;
        // The next request starts with the default again.
        self.keep_alive = true;
    }

    /// The response bytes not yet written.
    pub fn output(&self) -> &[u8] {
        &self.output[self.sent..]
    }

    pub fn has_output(&self) -> bool {
        self.sent < self.output.len()
    }

    /// `n` bytes of [`Connection::output`] were written. Once all are, the connection is
    /// ready for the next request (its deadline restarts: an idle keep-alive client gets
    /// 5 s to send it).
    pub fn on_written(&mut self, n: usize, now: Instant) {
        self.sent = (self.sent + n).min(self.output.len());
        if !self.has_output() {
            self.output = Vec::new();
            self.sent = 0;
            self.deadline = now + REQUEST_TIMEOUT;
        }
    }

    /// Whether the connection has nothing more to do once [`Connection::next`] said `Wait`:
    /// its last response has left, or the client is gone (a partial request left behind can
    /// never complete).
    pub fn is_done(&self) -> bool {
        !self.has_output() && (self.close_after || self.eof)
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The deadline passed (or not: `now` before it is `No`).
    pub fn on_deadline(&mut self, now: Instant) -> Expired {
        if now < self.deadline || self.close_after && !self.has_output() {
            return Expired::No;
        }
        if self.has_output() {
            return Expired::Close;
        }
        if self.input.is_empty() && self.served > 0 {
            return Expired::Close;
        }
        Expired::Answer408
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn encode(response: &Response, head_only: bool, close: bool) -> Vec<u8> {
    use std::fmt::Write;
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    if let Some(allow) = response.allow {
        let _ = write!(head, "Allow: {allow}\r\n");
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Response {
        Response::text(200, "ok")
    }

    /// Runs a connection over `input` delivered in `chunks`, answering every request with 200
    /// and its path as the body; returns the paths seen and whether it ended.
    fn run(chunks: &[&[u8]]) -> (Vec<String>, Vec<u16>, bool) {
        let now = Instant::now();
        let mut c = Connection::new(now);
        let mut paths = Vec::new();
        let mut codes = Vec::new();
        for chunk in chunks {
            c.on_bytes(chunk);
            loop {
                match c.next() {
                    Next::Wait => break,
                    Next::Request(r) => {
                        paths.push(r.path.clone());
                        codes.push(200);
                        c.respond(&ok(), r.method == Method::Head, now);
                    }
                    Next::Reject(code) => {
                        codes.push(code);
                        c.respond(&Response::text(code, "no"), false, now);
                    }
                }
                let n = c.output().len();
                c.on_written(n, now);
            }
        }
        (paths, codes, c.is_done())
    }

    /// A request split at every byte boundary parses to the same single request.
    #[test]
    fn a_request_split_anywhere_is_one_request() {
        let req = b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
        for cut in 0..=req.len() {
            let (paths, codes, done) = run(&[&req[..cut], &req[cut..]]);
            assert_eq!(paths, vec!["/health"], "cut at {cut}");
            assert_eq!(codes, vec![200]);
            assert!(!done, "keep-alive by default (cut at {cut})");
        }
        let bytewise: Vec<&[u8]> = req.chunks(1).collect();
        assert_eq!(run(&bytewise).0, vec!["/health"]);
    }

    /// Pipelined requests are answered one after another, in order, and `Connection: close`
    /// on the last one ends the connection after its response.
    #[test]
    fn pipelined_requests_in_order() {
        let reqs = b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (paths, _, done) = run(&[reqs]);
        assert_eq!(paths, vec!["/a", "/b", "/c"]);
        assert!(done);
    }

    /// While a response is unsent nothing more is read or parsed (one at a time).
    #[test]
    fn one_response_at_a_time() {
        let now = Instant::now();
        let mut c = Connection::new(now);
        c.on_bytes(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        assert!(matches!(c.next(), Next::Request(_)));
        c.respond(&ok(), false, now);
        assert_eq!(c.read_room(), 0);
        assert_eq!(c.next(), Next::Wait);
        c.on_written(3, now);
        assert_eq!(c.next(), Next::Wait);
        let rest = c.output().len();
        c.on_written(rest, now);
        assert!(matches!(c.next(), Next::Request(r) if r.path == "/b"));
    }

    /// A head over 8 KiB is 431 and closes, also when it arrives in small pieces; one of
    /// exactly 8 KiB is fine.
    #[test]
    fn head_limit() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        let (_, codes, done) = run(&big.chunks(1000).collect::<Vec<_>>());
        assert_eq!(codes, vec![431]);
        assert!(done);

        let mut exact = b"GET /x HTTP/1.1\r\nX: ".to_vec();
        exact.resize(MAX_HEAD - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(exact.len(), MAX_HEAD);
        assert_eq!(run(&[&exact]).0, vec!["/x"]);
    }

    /// Garbage is 400 and closes; so is a non-numeric Content-Length.
    #[test]
    fn malformed_is_400() {
        for bad in [
            &b"\x16\x03\x01\x00\xa5\x01\x00\x00"[..],
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"G\0T / HTTP/1.1\r\n\r\n",
        ] {
            let (_, codes, done) = run(&[bad]);
            assert_eq!(codes, vec![400], "{bad:?}");
            assert!(done);
        }
    }

    /// HTTP/1.0 closes unless it asks for keep-alive; a body closes after the answer.
    #[test]
    fn keep_alive_rules() {
        assert!(run(&[b"GET / HTTP/1.0\r\n\r\n"]).2);
        assert!(!run(&[b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"]).2);
        assert!(run(&[b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"]).2);
        assert!(run(&[b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"]).2);
    }

    /// The deadline: 408 for a request under way or never sent, silence for an idle
    /// keep-alive connection and for a client that does not read.
    #[test]
    fn deadlines() {
        let t0 = Instant::now();
        let late = t0 + REQUEST_TIMEOUT;
        let mut c = Connection::new(t0);
        assert_eq!(c.on_deadline(t0), Expired::No);
        c.on_bytes(b"GET / HT");
        assert_eq!(c.on_deadline(late), Expired::Answer408);
        c.respond(&Response::text(408, "slow"), false, late);
        assert!(String::from_utf8_lossy(c.output()).contains("Connection: close"));

        let mut c = Connection::new(t0);
        assert_eq!(c.on_deadline(late), Expired::Answer408);

        let mut c = Connection::new(t0);
        c.on_bytes(b"GET / HTTP/1.1\r\n\r\n");
        assert!(matches!(c.next(), Next::Request(_)));
        c.respond(&ok(), false, t0);
        assert_eq!(
            c.on_deadline(late),
            Expired::Close,
            "not reading its response"
        );
        let n = c.output().len();
        c.on_written(n, t0);
        assert_eq!(c.on_deadline(late), Expired::Close, "idle keep-alive");
    }

    /// HEAD gets GET's headers (Content-Length included) and no body.
    #[test]
    fn head_has_no_body() {
        let now = Instant::now();
        let mut c = Connection::new(now);
        c.respond(&Response::text(200, "hello"), true, now);
        let text = String::from_utf8_lossy(c.output()).into_owned();
        assert!(text.contains("Content-Length: 6\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    /// An end of stream after a complete request still gets the answer, then the end.
    #[test]
    fn eof_after_a_request() {
        let now = Instant::now();
        let mut c = Connection::new(now);
        c.on_bytes(b"GET / HTTP/1.1\r\n\r\n");
        c.on_eof();
        assert!(matches!(c.next(), Next::Request(_)));
        c.respond(&ok(), false, now);
        let n = c.output().len();
        c.on_written(n, now);
        assert!(c.is_done());
    }
}
