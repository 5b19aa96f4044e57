//! One client connection: its byte stream in, its replies out, in request order.
//!
//! ```text
//!          waiting slots reach max_inflight              last slot answered and written
//!   Open ─────────────────────────────────▶ Paused        Closing ──────────────────────▶ gone
//!    ▲ │   (stop decoding and reading;        │              ▲
//!    │ │    nothing is refused)               │              │ decode error, read timeout,
//!    │ └──── a reply frees a slot ◀───────────┘              │ refused at accept, end of
//!    └───────────────────────────────────────────────────────┘ stream (the error, if any,
//!                                                               is the last reply)
//! ```
//!
//! The labels are the variants of [`ConnState`]; [`ClientConnection::transition`] is the one
//! place that moves between them.
//!
//! v1 frames carry no correlation id, so every request gets a *slot* in a queue at the moment
//! it is decoded, and replies leave strictly from the front of that queue: a fast local answer
//! (PONG) waits behind a slow Router reply that was asked for first. Answered slots at the
//! front move to the output queue, which the shell writes with vectored writes.
//!
//! Memory is bounded per connection: the decoder holds at most one partial frame plus what one
//! read brought; at most `max_inflight` slots wait for the upstream before decoding pauses;
//! and answered-but-unsent bytes (with a per-slot overhead, so a flood of tiny PONGs counts
//! too) are capped: past the cap the gateway closes the connection.

use std::collections::VecDeque;
use std::time::Duration;

use crate::frame::{DecodeError, Frame, FrameDecoder, ReplyFrame};
use crate::inflight::RequestId;
use crate::output_queue::OutputQueue;
use crate::time::Instant;

/// Connection ids come from a counter in the gateway and are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What one held reply slot costs beyond its bytes, so that many tiny replies count.
const SLOT_OVERHEAD: usize = 64;

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_frame_bytes: usize,
    pub max_inflight: usize,
    pub read_timeout: Duration,
    pub max_unsent_bytes: usize,
}

/// Where a connection is (the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Reading and decoding.
    Open,
    /// `max_inflight` requests wait for the upstream: decoding and reading stop until a reply
    /// frees a slot. Bytes already read wait, and the read timer does not run: they are held
    /// because of us, not because of the client.
    Paused,
    /// The last reply is queued: nothing more is decoded; the connection goes once every
    /// slot is answered and written.
    Closing,
}

/// What moves a connection between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnEvent {
    /// The number of slots waiting for the upstream changed.
    WaitingChanged,
    /// The reply just queued is the last.
    Close,
}

#[derive(Debug)]
enum Slot {
    /// A local answer is being prepared (filled in the same call).
    Local,
    /// Waiting for the upstream's answer to this request.
    Upstream(RequestId),
    Answered(ReplyFrame),
}

/// The connection state machine.
#[derive(Debug)]
pub struct ClientConnection {
    limits: ConnectionLimits,
    decoder: FrameDecoder,
    /// Reply slots in request order; `slots[0]` has sequence number `first_seq`.
    slots: VecDeque<Slot>,
    first_seq: u64,
    /// Slots waiting for the upstream (counts against `limits.max_inflight`).
    waiting: usize,
    /// Answered replies not yet written, oldest first.
    out: OutputQueue<ReplyFrame>,
    /// Bytes of `out` plus answered slots still held behind a waiting one, with overhead.
    held_bytes: usize,
    /// When the incomplete frame now buffered started arriving.
    partial_since: Option<Instant>,
    state: ConnState,
}

impl ClientConnection {
    pub fn new(limits: ConnectionLimits) -> ClientConnection {
        ClientConnection {
            limits,
            decoder: FrameDecoder::new(limits.max_frame_bytes),
            slots: VecDeque::new(),
            first_seq: 0,
            waiting: 0,
            out: OutputQueue::default(),
            held_bytes: 0,
            partial_since: None,
            state: ConnState::Open,
        }
    }

    /// Takes bytes read from the socket. Bytes that arrive while closing are discarded.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant) {
        if self.state != ConnState::Closing {
            self.decoder.push(bytes);
        }
        self.update_partial(now);
    }

    /// The next frame to act on, or `None` when more bytes are needed, the in-flight limit is
    /// reached, or the connection is closing.
    pub fn next_frame(&mut self, now: Instant) -> Option<Result<Frame, DecodeError>> {
        if self.state != ConnState::Open {
            return None;
        }
        let next = self.decoder.next_frame().transpose();
        self.update_partial(now);
        next
    }

    /// Whether the shell should read from the socket now.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Open
    }

    /// Where the connection is.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The one transition function (the module diagram).
    fn transition(&mut self, event: ConnEvent) {
        let next = match (self.state, event) {
            (ConnState::Closing, _) | (_, ConnEvent::Close) => ConnState::Closing,
            _ if self.waiting >= self.limits.max_inflight => ConnState::Paused,
            _ => ConnState::Open,
        };
        if next != ConnState::Open {
            // Paused or closing: what is buffered now waits on us, or will never be read.
            self.partial_since = None;
        }
        self.state = next;
    }

    /// The sequence number the next [`Self::open_slot`] will return.
    pub fn next_slot(&self) -> u64 {
        self.first_seq + self.slots.len() as u64
    }

    /// Opens the reply slot for the request just decoded: `Some(id)` if its answer comes later
    /// from the upstream, `None` if it is answered right away with [`Self::answer`].
    pub fn open_slot(&mut self, waiting: Option<RequestId>) -> u64 {
        let seq = self.next_slot();
        self.slots
            .push_back(waiting.map_or(Slot::Local, Slot::Upstream));
        if waiting.is_some() {
            self.waiting += 1;
            self.transition(ConnEvent::WaitingChanged);
        }
        seq
    }

    /// Fills slot `seq` with its reply frame; answers at the front move to the output queue.
    /// Returns false for an unknown or already answered slot.
    pub fn answer(&mut self, seq: u64, reply: ReplyFrame) -> bool {
        let Some(index) = seq.checked_sub(self.first_seq) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return false;
        };
        let was_waiting = match slot {
            Slot::Answered(_) => return false,
            Slot::Upstream(_) => true,
            Slot::Local => false,
        };
        self.held_bytes += reply.wire_len() + SLOT_OVERHEAD;
        *slot = Slot::Answered(reply);
        if was_waiting {
            self.waiting -= 1;
            self.transition(ConnEvent::WaitingChanged);
        }
        while let Some(Slot::Answered(_)) = self.slots.front() {
            if let Some(Slot::Answered(frame)) = self.slots.pop_front() {
                self.out.push(frame);
            }
            self.first_seq += 1;
        }
        true
    }

    /// The requests of this connection still waiting for the upstream, oldest first.
    pub fn waiting_requests(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.slots.iter().filter_map(|s| match s {
            Slot::Upstream(id) => Some(*id),
            _ => None,
        })
    }

    /// Stops decoding: the reply just queued is the connection's last.
    pub fn begin_close(&mut self) {
        self.transition(ConnEvent::Close);
    }

    pub fn is_closing(&self) -> bool {
        self.state == ConnState::Closing
    }

    /// Closing and everything answered and written: the socket may be closed now.
    pub fn is_finished(&self) -> bool {
        self.is_closing() && self.slots.is_empty() && self.out.is_empty()
    }

    /// Reply bytes held for this client exceed the cap: it is not reading.
    pub fn over_output_cap(&self) -> bool {
        self.held_bytes > self.limits.max_unsent_bytes
    }

    /// The queued reply bytes, in order, for a vectored write.
    pub fn output(&self) -> impl Iterator<Item = &[u8]> {
        self.out.output()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The shell wrote the first `n` bytes of [`Self::output`].
    pub fn handle_written(&mut self, n: usize) {
        let finished = self.out.consume(n);
        self.held_bytes = self.held_bytes.saturating_sub(n + finished * SLOT_OVERHEAD);
    }

    /// The instant at which the partial frame now held times out.
    pub fn read_deadline(&self) -> Option<Instant> {
        self.partial_since.map(|t| t + self.limits.read_timeout)
    }

    /// Requests of this connection still waiting for the upstream.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Slots opened but not yet written out (answered or not).
    pub fn unanswered_slots(&self) -> usize {
        self.slots.len()
    }

    /// Reply bytes held for the client (queued or answered behind a waiting slot), each reply
    /// counted with its per-slot overhead: what the output cap is compared with.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Bytes the decoder holds (for the bounded-memory invariant).
    pub fn buffered_input(&self) -> usize {
        self.decoder.buffered_len()
    }

    /// The read timeout runs only while an incomplete frame is held *and* we are reading: a
    /// connection paused by backpressure holds bytes because of us, not because of the client.
    fn update_partial(&mut self, now: Instant) {
        let holding = self.wants_read() && self.decoder.holds_partial_frame();
        match (holding, self.partial_since) {
            (true, None) => self.partial_since = Some(now),
            (false, Some(_)) => self.partial_since = None,
            _ => {}
        }
    }

    /// Re-evaluates the read timer after the in-flight count changed.
    pub fn update_read_timer(&mut self, now: Instant) {
        self.update_partial(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, kind};
    use bytes::Bytes;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_frame_bytes: 1024,
            max_inflight: 2,
            read_timeout: Duration::from_secs(10),
            max_unsent_bytes: 1_000,
        }
    }

    fn reply(body: &'static [u8]) -> ReplyFrame {
        ReplyFrame::new(kind::RESPONSE_OK, Bytes::from_static(body))
    }

    /// The payloads of the complete frames queued for output.
    impl ClientConnection {
        /// Decodes the next frame and opens an upstream slot for it.
        fn open_slot_for_next(&mut self, now: Instant) -> u64 {
            assert!(matches!(self.next_frame(now), Some(Ok(_))));
            let seq = self.next_slot();
            self.open_slot(Some(RequestId(seq)))
        }
    }

    fn out(c: &ClientConnection) -> Vec<u8> {
        let bytes: Vec<u8> = c.output().flat_map(|s| s.to_vec()).collect();
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&bytes);
        let mut payloads = Vec::new();
        while let Ok(Some(f)) = d.next_frame() {
            payloads.extend_from_slice(&f.payload);
        }
        payloads
    }

    #[test]
    fn replies_leave_in_request_order() {
        let mut c = ClientConnection::new(limits());
        let a = c.open_slot(Some(RequestId(1)));
        let b = c.open_slot(None);
        assert!(c.answer(b, reply(b"B")));
        assert!(!c.has_output(), "B must wait for A");
        assert_eq!(c.waiting_requests().collect::<Vec<_>>(), vec![RequestId(1)]);
        assert!(c.answer(a, reply(b"A")));
        assert_eq!(out(&c), b"AB");
        assert!(!c.answer(a, reply(b"again")), "a slot is answered once");
        assert_eq!(c.waiting(), 0);
        assert_eq!(c.waiting_requests().count(), 0);
    }

    #[test]
    fn in_flight_limit_pauses_decoding_until_a_reply() {
        let mut c = ClientConnection::new(limits());
        let t = Instant::ZERO;
        for _ in 0..3 {
            c.handle_bytes(&encode_frame(kind::TASK_SUBMIT, b"{}"), t);
        }
        let mut seqs = Vec::new();
        while let Some(Ok(_)) = c.next_frame(t) {
            seqs.push(c.open_slot(Some(RequestId(seqs.len() as u64))));
        }
        assert_eq!(seqs.len(), 2);
        assert!(!c.wants_read());
        assert_eq!(c.read_deadline(), None, "paused by us: no read timeout");
        c.answer(seqs[0], reply(b"x"));
        assert!(c.wants_read());
        assert!(matches!(c.next_frame(t), Some(Ok(_))));
    }

    #[test]
    fn partial_frame_starts_the_read_timer_and_a_whole_one_stops_it() {
        let mut c = ClientConnection::new(limits());
        c.handle_bytes(&[0, 0, 0], Instant::from_nanos(5));
        assert_eq!(
            c.read_deadline(),
            Some(Instant::from_nanos(5) + Duration::from_secs(10))
        );
        c.handle_bytes(&[6, 1], Instant::from_nanos(9));
        assert_eq!(
            c.read_deadline(),
            Some(Instant::from_nanos(5) + Duration::from_secs(10)),
            "more bytes of the same frame do not reset it"
        );
        c.handle_bytes(&[kind::PING], Instant::from_nanos(11));
        assert!(matches!(c.next_frame(Instant::from_nanos(11)), Some(Ok(_))));
        assert_eq!(c.read_deadline(), None);
    }

    #[test]
    fn partial_writes_resume_mid_frame_and_the_output_cap() {
        let mut c = ClientConnection::new(limits());
        let s = c.open_slot(None);
        c.answer(s, reply(b"hello"));
        let whole: Vec<u8> = c.output().flat_map(|s| s.to_vec()).collect();
        c.handle_written(8);
        let rest: Vec<u8> = c.output().flat_map(|s| s.to_vec()).collect();
        assert_eq!(rest, &whole[8..]);
        c.handle_written(3);
        assert!(!c.has_output());
        for _ in 0..15 {
            let s = c.open_slot(None);
            c.answer(s, reply(b""));
        }
        assert!(
            c.over_output_cap(),
            "15 tiny replies with overhead exceed 1000"
        );
    }

    /// Held bytes count each reply with its overhead, shrink as bytes are written, and the cap
    /// is exceeded only strictly above it.
    #[test]
    fn held_bytes_are_exact_and_the_cap_is_strictly_above() {
        let mut c = ClientConnection::new(limits());
        assert_eq!((c.held_bytes(), c.over_output_cap()), (0, false));
        // 6 header + 930 body + 64 overhead = exactly the 1000-byte cap: not over.
        let s = c.open_slot(None);
        c.answer(
            s,
            ReplyFrame::new(kind::RESPONSE_OK, Bytes::from(vec![b'x'; 930])),
        );
        assert_eq!((c.held_bytes(), c.over_output_cap()), (1000, false));
        let s = c.open_slot(None);
        c.answer(s, reply(b""));
        assert_eq!((c.held_bytes(), c.over_output_cap()), (1070, true));
        c.handle_written(100);
        assert_eq!(c.held_bytes(), 970, "partial writes count byte by byte");
        c.handle_written(836);
        assert_eq!(
            c.held_bytes(),
            70,
            "a finished frame gives back its overhead too"
        );
        c.handle_written(6);
        assert_eq!((c.held_bytes(), c.has_output()), (0, false));
    }

    /// Answered replies held behind a waiting slot count against the cap before they can be
    /// written, and slots are counted until written.
    #[test]
    fn replies_held_behind_a_waiting_slot_count() {
        let mut c = ClientConnection::new(limits());
        let waiting = c.open_slot(Some(RequestId(1)));
        let s = c.open_slot(None);
        c.answer(s, reply(b"pong"));
        assert_eq!(
            (c.unanswered_slots(), c.held_bytes(), c.has_output()),
            (2, 74, false)
        );
        c.answer(waiting, reply(b"x"));
        assert_eq!(
            (c.unanswered_slots(), c.held_bytes(), c.has_output()),
            (0, 145, true)
        );
    }

    /// After a reply frees a slot, `refresh` restarts the read timer for a partial frame that
    /// waited while reading was paused, from the moment reading resumes.
    #[test]
    fn refresh_restarts_the_read_timer_after_a_pause() {
        let mut c = ClientConnection::new(limits());
        let t0 = Instant::ZERO;
        let mut bytes = encode_frame(kind::TASK_SUBMIT, b"{}").to_vec();
        bytes.extend_from_slice(&encode_frame(kind::TASK_SUBMIT, b"{}"));
        bytes.extend_from_slice(&[0, 0, 0]);
        c.handle_bytes(&bytes, t0);
        assert_eq!(c.buffered_input(), bytes.len());
        let a = c.open_slot_for_next(t0);
        let _b = c.open_slot_for_next(t0);
        assert_eq!(c.buffered_input(), 3);
        assert_eq!(
            c.read_deadline(),
            None,
            "paused: the partial frame is not the client's fault"
        );
        let later = t0 + Duration::from_secs(3);
        c.answer(a, reply(b"x"));
        c.update_read_timer(later);
        assert_eq!(c.read_deadline(), Some(later + Duration::from_secs(10)));
    }

    #[test]
    fn closing_finishes_only_when_everything_is_written() {
        let mut c = ClientConnection::new(limits());
        let a = c.open_slot(Some(RequestId(9)));
        let e = c.open_slot(None);
        c.answer(e, reply(b"err"));
        c.begin_close();
        assert!(!c.wants_read());
        c.handle_bytes(b"ignored", Instant::ZERO);
        assert_eq!(c.buffered_input(), 0);
        assert!(
            !c.is_finished(),
            "the earlier request is still owed a reply"
        );
        c.answer(a, reply(b"ok"));
        assert!(!c.is_finished());
        c.handle_written(6 + 2 + 6 + 3);
        assert!(c.is_finished());
    }
}
