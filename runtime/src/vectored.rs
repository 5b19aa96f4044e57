//! One vectored write, shared by the client sockets and the NATS socket.

use std::io::{self, IoSlice, Write};

/// Slices handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// What one write did.
#[derive(Debug)]
pub enum WriteStep {
    /// Nothing was queued.
    Empty,
    /// This many bytes went out; report them to the core, then write again.
    Wrote(usize),
    /// The socket is full: wait for writability.
    Blocked,
    /// The socket failed.
    Failed(io::Error),
}

/// Writes up to [`MAX_IOVECS`] of the queued slices in one syscall (retrying on `EINTR`).
/// The caller reports `Wrote(n)` to the core before the next call, which drops those bytes
/// from the queue.
pub fn write_once<'a, W: Write>(
    socket: &mut W,
    queued: impl Iterator<Item = &'a [u8]>,
) -> WriteStep {
    let slices: Vec<IoSlice<'_>> = queued.take(MAX_IOVECS).map(IoSlice::new).collect();
    if slices.is_empty() {
        return WriteStep::Empty;
    }
    loop {
        match socket.write_vectored(&slices) {
            Ok(n) => return WriteStep::Wrote(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WriteStep::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return WriteStep::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `room` bytes, then would block.
    struct Small {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for Small {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Writes in slice order, stops where the socket is full, and tells empty from blocked.
    #[test]
    fn writes_in_order_and_reports_each_outcome() {
        let mut s = Small {
            room: 4,
            got: Vec::new(),
        };
        let queued: [&[u8]; 2] = [b"ab", b"cdef"];
        let mut offset = 0;
        loop {
            let rest = queued.concat();
            match write_once(
                &mut s,
                std::iter::once(&rest[offset..]).filter(|b| !b.is_empty()),
            ) {
                WriteStep::Wrote(n) => offset += n,
                WriteStep::Blocked => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(s.got, b"abcd");
        assert!(matches!(
            write_once(&mut s, std::iter::empty()),
            WriteStep::Empty
        ));
    }
}
