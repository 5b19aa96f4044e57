//! `ipc-gateway health`: asks a running daemon for its health over HTTP (gateway.md section 5)
//! and turns the answer into an exit code, for operators, scripts and container healthchecks.
//!
//! A plain HTTP/1.1 GET over `std::net::TcpStream`: the daemon's own HTTP server is all it has
//! to talk to, and a container image without curl still gets a healthcheck. It never looks at
//! the daemon's settings (main.rs dispatches here before parsing them), so a broken environment
//! in the shell that runs the check cannot turn a healthy daemon into a failed check.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The address the daemon listens on when `CGW_HTTP_ADDR` is not set (gateway.md section 7).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// Connect and answer together: a healthcheck that hangs is worse than one that fails.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Far above any /health body; bounds what a wrong peer on the port can make us buffer.
const MAX_RESPONSE: usize = 1 << 20;

/// Exit code for HEALTHY (and for `--live` answered 200).
const EXIT_HEALTHY: u8 = 0;
/// Exit code for DEGRADED: serving, but something needs a look.
const EXIT_DEGRADED: u8 = 1;
/// Exit code for UNHEALTHY, and for a daemon that cannot be reached or answers nonsense: for
/// whoever acts on the code, a daemon that does not answer is as bad as one that says it is down.
const EXIT_UNHEALTHY: u8 = 2;

/// The options of `ipc-gateway health`.
#[derive(clap::Args, Debug, Clone)]
pub struct HealthArgs {
    /// The daemon's HTTP address, HOST:PORT [default: CGW_HTTP_ADDR if set and not `off`,
    /// else 127.0.0.1:8080; an unspecified host such as 0.0.0.0 means this machine]
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,

    /// Ask GET /live instead of /health: exit 0 when the event loop answers 200, 2 otherwise
    /// (for container healthchecks and liveness probes)
    #[arg(long)]
    pub live: bool,
}

/// Runs the check and prints the outcome: the body on stdout, problems on stderr.
pub fn run(args: &HealthArgs) -> ExitCode {
    let (addr, source) = target(args.addr.as_deref(), std::env::var("CGW_HTTP_ADDR").ok());
    let path = if args.live { "/live" } else { "/health" };
    let response = match get(&addr, path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ipc-gateway health: cannot get http://{addr}{path} ({source}): {e}");
            return ExitCode::from(EXIT_UNHEALTHY);
        }
    };
    let body = String::from_utf8_lossy(&response.body);
    if args.live {
        print_body(&body);
        if response.code == 200 {
            return ExitCode::from(EXIT_HEALTHY);
        }
        eprintln!(
            "ipc-gateway health: http://{addr}{path} ({source}) answered {}",
            response.code
        );
        return ExitCode::from(EXIT_UNHEALTHY);
    }
    match health_exit_code(response.code, &body) {
        Ok(code) => {
            print_body(&body);
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("ipc-gateway health: http://{addr}{path} ({source}): {e}");
            ExitCode::from(EXIT_UNHEALTHY)
        }
    }
}

fn print_body(body: &str) {
    if body.ends_with('\n') {
        print!("{body}");
    } else {
        println!("{body}");
    }
}

/// The address to ask and where it came from (named in error messages, so an operator sees
/// whether a stale `CGW_HTTP_ADDR` in the shell is the reason).
fn target(flag: Option<&str>, env: Option<String>) -> (String, &'static str) {
    if let Some(addr) = flag {
        return (addr.to_owned(), "--addr");
    }
    match env {
        Some(v) if !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("off") => {
            (v.trim().to_owned(), "CGW_HTTP_ADDR")
        }
        _ => (DEFAULT_ADDR.to_owned(), "the default address"),
    }
}

/// The exit code for a /health answer: the JSON `status` decides (the daemon sends the same
/// JSON with 200 and with 503); anything else than 200 or 503 with that JSON is not a daemon.
fn health_exit_code(code: u16, body: &str) -> Result<u8, String> {
    if code != 200 && code != 503 {
        return Err(format!("unexpected HTTP status {code}"));
    }
    let json: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("HTTP {code} with a body that is not JSON: {e}"))?;
    match json.get("status").and_then(|s| s.as_str()) {
        Some("HEALTHY") => Ok(EXIT_HEALTHY),
        Some("DEGRADED") => Ok(EXIT_DEGRADED),
        Some("UNHEALTHY") => Ok(EXIT_UNHEALTHY),
        Some(other) => Err(format!("unknown status {other:?}")),
        None => Err("the JSON has no \"status\" string".to_owned()),
    }
}

/// An HTTP answer: its status code and body.
#[derive(Debug, PartialEq)]
struct Response {
    code: u16,
    body: Vec<u8>,
}

/// One GET with `Connection: close`, within [`TIMEOUT`] from the first connect attempt.
fn get(addr: &str, path: &str) -> Result<Response, String> {
    let deadline = Instant::now() + TIMEOUT;
    let candidates: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("not a HOST:PORT address: {e}"))?
        .map(|a| SocketAddr::new(reachable(a.ip()), a.port()))
        .collect();
    let mut last_error = String::from("the name resolves to no address");
    let mut stream = None;
    for candidate in candidates {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last_error = format!("no answer within {TIMEOUT:?}");
            break;
        }
        match TcpStream::connect_timeout(&candidate, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = format!("connecting to {candidate}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ipc-gateway-health\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    set_timeouts(&stream, deadline)?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Stop as soon as the answer is complete, in case the server keeps the connection
        // open despite `Connection: close`.
        if let Some(response) = parse_response(&received)? {
            return Ok(response);
        }
        set_timeouts(&stream, deadline)?;
        match stream.read(&mut chunk) {
            Ok(0) => return parse_at_eof(&received),
            Ok(n) => {
                received.extend_from_slice(&chunk[..n]);
                if received.len() > MAX_RESPONSE {
                    return Err(format!("answer longer than {MAX_RESPONSE} bytes"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!("no complete answer within {TIMEOUT:?}"))
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

/// 0.0.0.0 and :: are what a daemon binds to serve every interface (the container image does);
/// as a destination they are not portable, so a check run next to the daemon asks loopback.
fn reachable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

fn set_timeouts(stream: &TcpStream, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!("no complete answer within {TIMEOUT:?}"));
    }
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(|e| format!("setting socket timeouts: {e}"))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The response in `bytes` if it is complete (`Ok(None)` while more is needed): a status line,
/// headers, then a body delimited by `Content-Length` or chunked encoding. A body delimited
/// only by the end of the connection is completed by [`parse_at_eof`].
fn parse_response(bytes: &[u8]) -> Result<Option<Response>, String> {
    let Some(head_end) = find(bytes, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..head_end])
        .map_err(|_| "the answer's header is not text (not an HTTP server?)".to_owned())?;
    let rest = &bytes[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_code(status_line)?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    if chunked {
        return Ok(dechunk(rest)?.map(|body| Response { code, body }));
    }
    match content_length {
        Some(n) if rest.len() >= n => Ok(Some(Response {
            code,
            body: rest[..n].to_vec(),
        })),
        _ => Ok(None),
    }
}

/// The response once the server closed the connection: complete by length or chunking, or
/// (with neither) everything after the header.
fn parse_at_eof(bytes: &[u8]) -> Result<Response, String> {
    if bytes.is_empty() {
        return Err("the connection closed without an answer".to_owned());
    }
    if let Some(response) = parse_response(bytes)? {
        return Ok(response);
    }
    let Some(head_end) = find(bytes, b"\r\n\r\n") else {
        return Err("the connection closed in the middle of the answer's header".to_owned());
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    if head.contains("content-length:") || head.contains("chunked") {
        return Err("the connection closed before the whole body arrived".to_owned());
    }
    let code = status_code(head.split("\r\n").next().unwrap_or_default())?;
    Ok(Response {
        code,
        body: bytes[head_end + 4..].to_vec(),
    })
}

/// `HTTP/1.x NNN reason` → NNN.
fn status_code(line: &str) -> Result<u16, String> {
    let mut parts = line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.to_ascii_uppercase().starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 answer: {line:?}"));
    }
    parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (100..=599).contains(c))
        .ok_or_else(|| format!("malformed status line {line:?}"))
}

/// The body of a chunked message, or `None` while the last chunk has not arrived.
fn dechunk(mut bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(bytes, b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&bytes[..line_end]).unwrap_or_default();
        // Chunk extensions (";name=value") are allowed and meaningless here.
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if bytes.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[..size]);
        bytes = &bytes[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_field_decides_the_exit_code() {
        let body = |s: &str| format!(r#"{{"status":"{s}","reason":null}}"#);
        assert_eq!(health_exit_code(200, &body("HEALTHY")), Ok(0));
        assert_eq!(health_exit_code(200, &body("DEGRADED")), Ok(1));
        assert_eq!(health_exit_code(503, &body("UNHEALTHY")), Ok(2));
        assert!(health_exit_code(200, &body("FINE")).is_err());
        assert!(health_exit_code(404, &body("HEALTHY")).is_err());
        assert!(health_exit_code(200, "<html>").is_err());
        assert!(health_exit_code(200, "{}").is_err());
    }

    #[test]
    fn the_address_comes_from_the_flag_then_the_variable_then_the_default() {
        let env = |v: &str| Some(v.to_owned());
        assert_eq!(target(Some("h:1"), env("x:2")), ("h:1".into(), "--addr"));
        assert_eq!(target(None, env("x:2")), ("x:2".into(), "CGW_HTTP_ADDR"));
        assert_eq!(target(None, env("off")).0, DEFAULT_ADDR);
        assert_eq!(target(None, env("")).0, DEFAULT_ADDR);
        assert_eq!(target(None, None).0, DEFAULT_ADDR);
    }

    #[test]
    fn unspecified_hosts_are_asked_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0".parse().unwrap()),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            reachable("::".parse().unwrap()),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        let other: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(reachable(other), other);
    }

    #[test]
    fn responses_are_complete_by_length_chunks_or_close() {
        let by_length = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            parse_response(by_length),
            Ok(Some(Response {
                code: 503,
                body: b"{}".to_vec()
            }))
        );
        assert_eq!(parse_response(&by_length[..by_length.len() - 1]), Ok(None));
        assert!(parse_at_eof(&by_length[..by_length.len() - 1]).is_err());

        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n1\r\nd\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().unwrap().body, b"abcd");
        assert_eq!(parse_response(&chunked[..chunked.len() - 7]), Ok(None));

        let until_close = b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nalive";
        assert_eq!(parse_response(until_close), Ok(None));
        assert_eq!(parse_at_eof(until_close).unwrap().body, b"alive");

        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_at_eof(b"").is_err());
    }
}
