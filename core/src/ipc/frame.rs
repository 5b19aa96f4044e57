//! IPC frame codec (ipc-protocol.md section 2).
//!
//! ```text
//! offset 0  u32 big-endian  length  = total frame size including this 6-byte header
//! offset 4  u8              version = 0x01
//! offset 5  u8              type
//! offset 6  length-6 bytes  payload
//! ```
//!
//! [`FrameDecoder`] is fed bytes exactly as they were read, split anywhere, many frames at once.
//! Its buffer grows only with bytes actually received: a header that announces 4 MiB reserves
//! nothing until the payload arrives, so a client cannot make the gateway allocate by lying.
//! The header is judged as early as it can be: the length as soon as 4 bytes are in (so raw
//! JSON text, whose first bytes read as a length of hundreds of MiB, is refused at once), the
//! version at the 5th byte. After an error the decoder is dead: the byte stream has no
//! resynchronisation point, so the connection must close.

use bytes::{Buf, Bytes, BytesMut};

/// Size of the frame header.
pub const HEADER_LEN: usize = 6;
/// The only protocol version this gateway speaks.
pub const PROTOCOL_VERSION: u8 = 0x01;
/// Largest frame the protocol allows, header included (4 MiB).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Message type codes (ipc-protocol.md section 3).
pub mod kind {
    pub const TASK_SUBMIT: u8 = 0x01;
    pub const TASK_QUERY: u8 = 0x02;
    pub const TASK_CANCEL: u8 = 0x03;
    pub const STREAM_SUBSCRIBE: u8 = 0x04;
    pub const STREAM_DATA: u8 = 0x05;
    pub const STREAM_COMPLETE: u8 = 0x06;
    pub const STREAM_ERROR: u8 = 0x07;
    pub const RESPONSE_OK: u8 = 0x10;
    pub const RESPONSE_ERROR: u8 = 0x11;
    pub const PING: u8 = 0xF0;
    pub const PONG: u8 = 0xF1;
    pub const CAPABILITIES: u8 = 0xF2;
}

/// One decoded frame. The payload is a slice of the connection's read buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Bytes,
}

/// Why the byte stream cannot be decoded any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The length field is below the header size (error 4).
    TooShort { length: u32 },
    /// The length field exceeds the configured maximum (error 3).
    TooLarge { length: u32, max: usize },
    /// The version byte is not one we speak (error 1).
    UnsupportedVersion { version: u8 },
}

/// Incremental decoder for one connection's byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame: usize,
    failed: Option<DecodeError>,
}

impl FrameDecoder {
    /// `max_frame` is the largest accepted frame including its header; it is clamped to the
    /// protocol's 4 MiB and to at least a bare header.
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            max_frame: max_frame.clamp(HEADER_LEN, MAX_FRAME_BYTES),
            failed: None,
        }
    }

    /// Appends bytes read from the client. Bytes after a decode error are discarded.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that ended
    /// the stream (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let Some(length) = self.check_header() else {
            return Ok(None);
        };
        let length = match length {
            Ok(length) => length,
            Err(err) => {
                self.failed = Some(err);
                // The rest of the stream is unreadable: give its memory back now.
                self.buf = BytesMut::new();
                return Err(err);
            }
        };
        if self.buf.len() < length {
            return Ok(None);
        }
        let kind = self.buf[5];
        // Skip the header in place: a second split would cost a reference count per frame.
        self.buf.advance(HEADER_LEN);
        Ok(Some(Frame {
            kind,
            payload: self.buf.split_to(length - HEADER_LEN).freeze(),
        }))
    }

    /// Validates as much of the header as has arrived; `None` if nothing can be judged yet.
    fn check_header(&self) -> Option<Result<usize, DecodeError>> {
        let b = &self.buf;
        if b.len() < 4 {
            return None;
        }
        let length = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if (length as usize) < HEADER_LEN {
            return Some(Err(DecodeError::TooShort { length }));
        }
        if length as usize > self.max_frame {
            return Some(Err(DecodeError::TooLarge {
                length,
                max: self.max_frame,
            }));
        }
        let version = *b.get(4)?;
        if version != PROTOCOL_VERSION {
            return Some(Err(DecodeError::UnsupportedVersion { version }));
        }
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Ok(length as usize))
    }

    /// True while bytes of an incomplete frame are held (drives the read timeout).
    pub fn holds_partial_frame(&self) -> bool {
        self.failed.is_none() && !self.buf.is_empty()
    }

    /// Bytes currently buffered.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Capacity currently allocated (for the bounded-memory checks).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// The 6-byte header of a version-1 frame with a payload of `payload_len` bytes.
///
/// Replies may exceed the incoming frame limit (an echo of a 4 MiB request is larger), so the
/// only bound here is the u32 length field; payloads beyond it are a caller bug.
pub fn encode_header(kind: u8, payload_len: usize) -> [u8; HEADER_LEN] {
    let total = u32::try_from(HEADER_LEN + payload_len).expect("reply payload exceeds 4 GiB");
    let l = total.to_be_bytes();
    [l[0], l[1], l[2], l[3], PROTOCOL_VERSION, kind]
}

/// A reply frame as it waits to be written: the header inline, the payload as received from the
/// upstream (often a slice of its read buffer), so the payload is never copied to prepend six
/// bytes; the shell writes both with one vectored write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyFrame {
    header: [u8; HEADER_LEN],
    body: Bytes,
}

impl ReplyFrame {
    pub fn new(kind: u8, body: Bytes) -> ReplyFrame {
        ReplyFrame {
            header: encode_header(kind, body.len()),
            body,
        }
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    pub fn kind(&self) -> u8 {
        self.header[5]
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The frame's bytes from `offset` on, as at most two slices (header rest, body rest).
    pub fn slices_from(&self, offset: usize) -> impl Iterator<Item = &[u8]> {
        let head = self.header.get(offset..).unwrap_or_default();
        let body = self
            .body
            .get(offset.saturating_sub(HEADER_LEN)..)
            .unwrap_or_default();
        [head, body].into_iter().filter(|s| !s.is_empty())
    }
}

/// A whole version-1 frame in one buffer.
pub fn encode_frame(kind: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(kind, payload.len()));
    out.extend_from_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(dec: &mut FrameDecoder) -> (Vec<Frame>, Option<DecodeError>) {
        let mut frames = Vec::new();
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, None),
                Err(e) => return (frames, Some(e)),
            }
        }
    }

    #[test]
    fn protocol_constants_match_the_spec() {
        assert_eq!(
            (HEADER_LEN, PROTOCOL_VERSION, MAX_FRAME_BYTES),
            (6, 1, 4_194_304)
        );
    }

    #[test]
    fn smallest_frame_is_a_bare_header() {
        let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
        d.push(&[0, 0, 0, 6, 1, 0xF0]);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(f.kind, kind::PING);
        assert!(f.payload.is_empty());
        assert!(!d.holds_partial_frame());
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn length_below_header_is_too_short() {
        let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
        d.push(&[0, 0, 0, 5, 1, 0xF0]);
        assert_eq!(d.next_frame(), Err(DecodeError::TooShort { length: 5 }));
        // The error is sticky and later bytes are ignored.
        d.push(&[0, 0, 0, 6, 1, 0xF0]);
        assert_eq!(d.next_frame(), Err(DecodeError::TooShort { length: 5 }));
        assert_eq!(d.buffered_len(), 0);
        assert!(!d.holds_partial_frame());
    }

    #[test]
    fn oversized_length_is_refused_from_the_length_field_alone() {
        let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
        d.push(&[0x00, 0x40, 0x00]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[0x01]);
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::TooLarge {
                length: 0x0040_0001,
                max: MAX_FRAME_BYTES
            })
        );
    }

    #[test]
    fn exactly_the_maximum_is_accepted() {
        let mut d = FrameDecoder::new(16);
        d.push(&encode_frame(kind::TASK_SUBMIT, b"0123456789"));
        assert_eq!(d.next_frame().unwrap().unwrap().payload.len(), 10);
        d.push(&encode_frame(kind::TASK_SUBMIT, b"0123456789a"));
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::TooLarge {
                length: 17,
                max: 16
            })
        ));
    }

    #[test]
    fn raw_json_text_is_a_huge_length() {
        let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
        d.push(b"{\"ta");
        assert!(matches!(d.next_frame(), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn version_is_checked_at_the_fifth_byte() {
        let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
        d.push(&[0, 0, 0, 6]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.holds_partial_frame());
        d.push(&[2]);
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn announced_size_is_not_allocated_before_it_arrives() {
        let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
        d.push(&encode_header(
            kind::TASK_SUBMIT,
            MAX_FRAME_BYTES - HEADER_LEN,
        ));
        d.push(b"{\"a\":1");
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered_len(), 12);
        assert!(d.buffered_capacity() >= 12);
        assert!(
            d.buffered_capacity() < 64 * 1024,
            "capacity {} after 12 bytes",
            d.buffered_capacity()
        );
    }

    #[test]
    fn reply_frame_slices_resume_at_any_offset() {
        let f = ReplyFrame::new(kind::RESPONSE_OK, Bytes::from_static(b"abc"));
        let whole = encode_frame(kind::RESPONSE_OK, b"abc");
        assert_eq!(f.wire_len(), whole.len());
        for offset in 0..=f.wire_len() {
            let rest: Vec<u8> = f.slices_from(offset).flatten().copied().collect();
            assert_eq!(rest, &whole[offset..], "offset {offset}");
            assert!(f.slices_from(offset).all(|s| !s.is_empty()));
        }
    }

    #[test]
    fn header_encodes_total_length_big_endian() {
        assert_eq!(encode_header(kind::PONG, 0), [0, 0, 0, 6, 1, 0xF1]);
        assert_eq!(encode_header(0x10, 0x0102_0304 - 6), [1, 2, 3, 4, 1, 0x10]);
        assert_eq!(
            &encode_frame(0x01, b"{}")[..],
            &[0, 0, 0, 8, 1, 1, b'{', b'}']
        );
    }

    fn arb_frames() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)),
            0..12,
        )
    }

    proptest! {
        /// Decoding does not depend on how the bytes are split across reads.
        #[test]
        fn decoding_is_independent_of_splits(
            frames in arb_frames(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let stream: Vec<u8> = frames.iter().flat_map(|(k, p)| encode_frame(*k, p).to_vec()).collect();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut d = FrameDecoder::new(MAX_FRAME_BYTES);
            let mut got = Vec::new();
            for w in points.windows(2) {
                d.push(&stream[w[0]..w[1]]);
                let (mut fs, err) = decode_all(&mut d);
                prop_assert_eq!(err, None);
                got.append(&mut fs);
            }
            let got: Vec<(u8, Vec<u8>)> = got.into_iter().map(|f| (f.kind, f.payload.to_vec())).collect();
            prop_assert_eq!(got, frames);
            prop_assert!(!d.holds_partial_frame());
        }

        /// Any byte stream either decodes or fails with the error its first bad header names,
        /// and the same bytes split differently fail the same way.
        #[test]
        fn arbitrary_bytes_fail_the_same_way_whatever_the_split(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut whole = FrameDecoder::new(32);
            whole.push(&bytes);
            let a = decode_all(&mut whole);
            let at = cut.index(bytes.len() + 1);
            let mut split = FrameDecoder::new(32);
            split.push(&bytes[..at]);
            let (mut frames, first_err) = decode_all(&mut split);
            let b = if first_err.is_some() {
                (frames, first_err)
            } else {
                split.push(&bytes[at..]);
                let (mut more, err) = decode_all(&mut split);
                frames.append(&mut more);
                (frames, err)
            };
            prop_assert_eq!(a, b);
        }
    }
}
