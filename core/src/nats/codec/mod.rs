//! NATS client protocol codec, sans-IO (gateway.md section 2).
//!
//! ```text
//!   push(bytes)     CRLF ends a control line       INFO PING PONG +OK -ERR: returned at once
//!  ┌─────────────┐ ───────────────────────────────────────────────────────────────▶ op
//!  │ ControlLine │  MSG / HMSG: sizes judged   ┌─────────┐  total + CRLF arrived
//!  └─────────────┘ ──────────────────────────▶ │ Payload │ ─────────────────────────▶ op
//!         ▲                                    └─────────┘            │
//!         └───────────────────────────────────────────────────────────┘
//!  malformed input in either state ──▶ Failed: the same error on every later call
//! ```
//!
//! [`NatsDecoder`] reads what a server sends; the `encode_*` functions write what a client
//! sends. Hand-written because the only sans-IO NATS codec on crates.io fails on a clustered
//! server's INFO, rejects hostnames in `host`, can hold a complete PING until more bytes
//! arrive and panics on a split `+OK` (gateway.md section 2). Hence the rules here:
//!
//! - A control line is complete at its CRLF and its op is returned then, whatever follows;
//!   a split anywhere (inside CRLF, inside `+OK`) only delays an op until its last byte.
//! - The control line is bounded (default 4096 bytes, nats-server's `MAX_CONTROL_LINE_SIZE`)
//!   and judged on every call, so a line that never ends fails as soon as it passes the bound.
//! - Payload sizes are bounded (default 64 MiB, nats-server's `MAX_PENDING_SIZE`) and judged
//!   from the control line; nothing is reserved for an announced size, so memory grows only
//!   with bytes received. Payloads are slices of the read buffer, not copies.
//! - INFO is read field by field: unknown fields are ignored, `connect_urls` are kept exactly
//!   as sent (a cluster sends `host:port` with no scheme), `host` may be any name.
//! - Errors are sticky and release the buffer: a NATS stream has no resynchronisation point.
//!
//! Text the peer controls (subjects, header values, `-ERR` text) is decoded lossily: a stray
//! non-UTF-8 byte in a reply subject another publisher chose must not cost the connection
//! (and with it every request in flight); a mangled subject then matches no request.

mod decode;
mod encode;

pub use decode::*;
pub use encode::*;

/// Ends every control line and header line, both ways.
const CRLF: &[u8] = b"\r\n";
/// The first word of a header block, both ways.
const HEADER_VERSION: &[u8] = b"NATS/1.0";
