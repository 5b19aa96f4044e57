//! IPC frame encoding and blocking reads, from ipc-protocol.md section 2.

use std::io::{self, Read, Write};

pub const HEADER_LEN: usize = 6;
pub const VERSION_1: u8 = 0x01;

pub const TASK_SUBMIT: u8 = 0x01;
pub const TASK_QUERY: u8 = 0x02;
pub const TASK_CANCEL: u8 = 0x03;
pub const RESPONSE_OK: u8 = 0x10;
pub const RESPONSE_ERROR: u8 = 0x11;
pub const PING: u8 = 0xF0;
pub const PONG: u8 = 0xF1;
pub const CAPABILITIES: u8 = 0xF2;

/// One frame as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub version: u8,
    pub kind: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: u8, payload: impl Into<Vec<u8>>) -> Frame {
        Frame {
            version: VERSION_1,
            kind,
            payload: payload.into(),
        }
    }

    /// The payload parsed as JSON (panics with the payload text if it is not JSON: test use).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "frame payload is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.payload)
            )
        })
    }

    /// The `error.code` of a RESPONSE_ERROR frame, if this is one.
    pub fn error_code(&self) -> Option<u64> {
        if self.kind != RESPONSE_ERROR {
            return None;
        }
        self.json()["error"]["code"].as_u64()
    }
}

/// The bytes of a version-1 frame.
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&((HEADER_LEN + payload.len()) as u32).to_be_bytes());
    out.push(VERSION_1);
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// Writes one version-1 frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    w.write_all(&encode(kind, payload))
}

/// Reads exactly one frame; `Ok(None)` on a clean end of stream before any header byte.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if length < HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {length}"),
        ));
    }
    let mut payload = vec![0u8; length - HEADER_LEN];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame {
        version: header[4],
        kind: header[5],
        payload,
    }))
}

/// The total length of the first frame at the start of `buf`, once all of its bytes are there.
///
/// `Ok(None)` while more bytes are needed. An error if the length field is below the header
/// size: no later frame boundary can be found after such a field.
pub fn complete_frame_len(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length < HEADER_LEN {
        let message = format!("frame length {length}");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    Ok((buf.len() >= length).then_some(length))
}
