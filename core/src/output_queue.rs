//! Bytes queued for a socket, written by the shell with vectored writes: one type for the
//! client connections' reply frames and the NATS session's protocol output.
//!
//! The shell writes [`OutputQueue::output`] as far as the socket takes it and reports the
//! count; [`OutputQueue::consume`] drops exactly those bytes, so the next write continues
//! where the socket stopped, even in the middle of a chunk.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::frame::ReplyFrame;

/// One queued unit: its length on the wire and its bytes from an offset on.
pub trait Chunk {
    fn wire_len(&self) -> usize;
    /// The chunk's bytes from `offset` on, as one or more non-empty slices.
    fn slices_from(&self, offset: usize) -> impl Iterator<Item = &[u8]>;
}

impl Chunk for Bytes {
    fn wire_len(&self) -> usize {
        self.len()
    }
    fn slices_from(&self, offset: usize) -> impl Iterator<Item = &[u8]> {
        self.get(offset..).into_iter().filter(|s| !s.is_empty())
    }
}

impl Chunk for ReplyFrame {
    fn wire_len(&self) -> usize {
        ReplyFrame::wire_len(self)
    }
    fn slices_from(&self, offset: usize) -> impl Iterator<Item = &[u8]> {
        ReplyFrame::slices_from(self, offset)
    }
}

/// Chunks in write order, the first possibly partly written.
#[derive(Debug)]
pub struct OutputQueue<T> {
    chunks: VecDeque<T>,
    /// Bytes of `chunks[0]` already written.
    offset: usize,
}

impl<T> Default for OutputQueue<T> {
    fn default() -> Self {
        OutputQueue {
            chunks: VecDeque::new(),
            offset: 0,
        }
    }
}

impl<T: Chunk> OutputQueue<T> {
    pub fn push(&mut self, chunk: T) {
        self.chunks.push_back(chunk);
    }

    /// The queued bytes, in order, for a vectored write.
    pub fn output(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.slices_from(if i == 0 { self.offset } else { 0 }))
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Drops the first `n` bytes after the shell wrote them (more than is queued drops all).
    /// Returns how many whole chunks left the queue.
    pub fn consume(&mut self, mut n: usize) -> usize {
        let mut finished = 0;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let rest = front.wire_len() - self.offset;
            if n >= rest {
                n -= rest;
                self.offset = 0;
                self.chunks.pop_front();
                finished += 1;
            } else {
                self.offset += n;
                n = 0;
            }
        }
        finished
    }

    /// Bytes of the first chunk already written.
    pub fn front_offset(&self) -> usize {
        self.offset
    }

    /// Forgets everything queued (the socket is gone).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(q: &OutputQueue<Bytes>) -> Vec<u8> {
        q.output().flatten().copied().collect()
    }

    /// Partial writes continue mid-chunk, whole chunks are counted as they leave, and a write
    /// covering everything empties the queue.
    #[test]
    fn consume_continues_where_the_socket_stopped() {
        let mut q = OutputQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"de"));
        assert_eq!(q.consume(2), 0);
        assert_eq!(all(&q), b"cde");
        assert_eq!(q.front_offset(), 2);
        assert_eq!(q.consume(2), 1);
        assert_eq!(all(&q), b"e");
        assert_eq!(q.consume(5), 1);
        assert!(q.is_empty());
        assert_eq!(q.consume(1), 0, "nothing left to drop");
    }

    /// A reply frame is written header first, and a cut inside it resumes in the body.
    #[test]
    fn reply_frames_resume_inside_the_body() {
        let frame = ReplyFrame::new(crate::frame::kind::RESPONSE_OK, Bytes::from_static(b"xyz"));
        let whole: Vec<u8> = Chunk::slices_from(&frame, 0).flatten().copied().collect();
        let mut q = OutputQueue::default();
        q.push(frame);
        assert_eq!(q.consume(whole.len() - 2), 0);
        let rest: Vec<u8> = q.output().flatten().copied().collect();
        assert_eq!(rest, &whole[whole.len() - 2..]);
    }
}
