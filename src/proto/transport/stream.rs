//! Per-stream state: the send half (bounded send buffer, in-order ack tracking, retransmission
//! ranges, FIN) and the receive half (reassembly buffer bounded by the stream window, FIN and
//! per-stream flow control).

use super::codes::ResetReason;
use super::dest::Destination;
use super::ranges::RangeSet;
use super::ring::ByteRing;

/// Stream identifier. Bit 0 tells the initiator: 0 = client, 1 = server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl StreamId {
    pub fn is_client_initiated(self) -> bool {
        self.0 & 1 == 0
    }

    /// Sequence number among the streams opened by the same side.
    pub fn seq(self) -> u64 {
        self.0 >> 1
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream {}", self.0)
    }
}

/// Large enough never to be hit in practice: the number of ack / retransmit ranges of a send
/// half is bounded by the number of tracked in-flight packets.
const SEND_RANGE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinState {
    /// The application has not finished the stream.
    Open,
    /// FIN requested and waiting to be (re)sent.
    Pending,
    /// FIN sent, not yet acknowledged.
    Sent,
    /// FIN acknowledged.
    Acked,
}

/// A chunk selected for transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: usize,
    pub fin: bool,
    /// Bytes never sent before (they consume session flow-control credit).
    pub new_bytes: u64,
}

#[derive(Debug)]
pub struct SendHalf {
    buf: ByteRing,
    /// Offset of the first byte in `buf` (everything below is acknowledged).
    base: u64,
    /// Next never-sent offset.
    next: u64,
    /// Peer's limit for this stream (MAX_STREAM_DATA).
    pub max_data: u64,
    acked: RangeSet,
    retransmit: RangeSet,
    pub fin: FinState,
}

impl SendHalf {
    pub fn new(buffer_limit: usize, max_data: u64) -> Self {
        Self {
            buf: ByteRing::with_retain(buffer_limit, SEND_RETAIN),
            base: 0,
            next: 0,
            max_data,
            acked: RangeSet::new(SEND_RANGE_LIMIT),
            retransmit: RangeSet::new(SEND_RANGE_LIMIT),
            fin: FinState::Open,
        }
    }

    /// Offset one past the last byte written by the application.
    pub fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Highest offset ever sent (the final size if the stream is reset now).
    pub fn sent_end(&self) -> u64 {
        self.next
    }

    /// Bytes written by the application and never sent yet.
    pub fn unsent(&self) -> u64 {
        self.end() - self.next
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of storage the send buffer holds (its memory cost, at least [`Self::buffered`]).
    pub fn memory(&self) -> usize {
        self.buf.capacity()
    }

    pub fn limit(&self) -> usize {
        self.buf.limit()
    }

    pub fn free_space(&self) -> usize {
        self.buf.limit() - self.buf.len()
    }

    /// Bytes written beyond the peer's flow-control limit: they cannot be sent until it raises
    /// the limit (its application reads).
    pub fn beyond_window(&self) -> u64 {
        self.end().saturating_sub(self.max_data)
    }

    /// How much more the application may write: the buffer's free space, and no more than
    /// `beyond` bytes beyond the peer's flow-control limit (see `Streams::beyond_window_room`).
    pub fn writable_room(&self, beyond: u64) -> usize {
        let flow = self
            .max_data
            .saturating_add(beyond)
            .saturating_sub(self.end());
        self.free_space()
            .min(usize::try_from(flow).unwrap_or(usize::MAX))
    }

    pub fn write(&mut self, data: &[u8]) -> usize {
        self.buf.push(data)
    }

    /// Space for up to `max` more bytes, filled in place (see [`ByteRing::spare`]).
    pub fn spare(&mut self, max: usize) -> &mut [u8] {
        self.buf.spare(max)
    }

    /// Queues `n` bytes written into the last [`SendHalf::spare`] slice; returns how many were
    /// queued (at most what that slice held).
    pub fn commit(&mut self, n: usize) -> usize {
        self.buf.commit(n)
    }

    /// All data and the FIN are acknowledged.
    pub fn is_complete(&self) -> bool {
        self.fin == FinState::Acked && self.buf.is_empty()
    }

    /// Something could be sent given `session_credit` bytes of new-data credit.
    pub fn has_sendable(&self, session_credit: u64) -> bool {
        !self.retransmit.is_empty()
            || (self.next < self.end() && self.next < self.max_data && session_credit > 0)
            || (self.fin == FinState::Pending && self.next == self.end())
    }

    fn fin_with(&self, chunk_end: u64) -> bool {
        self.fin == FinState::Pending && chunk_end == self.end()
    }

    /// Picks the next chunk (retransmissions first, then new data), at most `max_len` bytes.
    /// Returns `None` if nothing can be sent.
    pub fn next_chunk(&mut self, max_len: usize, session_credit: u64) -> Option<Chunk> {
        // Retransmissions: skip anything acknowledged meanwhile.
        while let Some(r) = self.retransmit.first() {
            let start = r.start.max(self.base);
            if start >= r.end {
                self.retransmit.remove(r);
                continue;
            }
            // Trim leading acked bytes.
            if let Some(a) = self
                .acked
                .iter()
                .find(|a| a.start <= start && a.end > start)
            {
                self.retransmit.remove(r.start..a.end);
                continue;
            }
            let mut end = r.end.min(start + max_len as u64);
            // Do not resend bytes the peer already acknowledged further up.
            if let Some(a) = self.acked.iter().find(|a| a.start > start && a.start < end) {
                end = a.start;
            }
            self.retransmit.remove(r.start..end);
            let fin = self.fin_with(end);
            if fin {
                self.fin = FinState::Sent;
            }
            return Some(Chunk {
                offset: start,
                len: (end - start) as usize,
                fin,
                new_bytes: 0,
            });
        }
        let limit = self
            .end()
            .min(self.max_data)
            .min(self.next.saturating_add(session_credit))
            .min(self.next + max_len as u64);
        let len = limit.saturating_sub(self.next);
        let fin = self.fin_with(self.next + len);
        if len == 0 && !fin {
            return None;
        }
        let chunk = Chunk {
            offset: self.next,
            len: len as usize,
            fin,
            new_bytes: len,
        };
        self.next += len;
        if fin {
            self.fin = FinState::Sent;
        }
        Some(chunk)
    }

    /// Copies the bytes of a chunk previously returned by [`SendHalf::next_chunk`].
    pub fn copy_chunk(&self, offset: u64, out: &mut [u8]) {
        let pos = (offset - self.base) as usize;
        self.buf.copy_out(pos, out);
    }

    /// Records an acknowledged chunk. Returns the number of buffer bytes freed.
    pub fn on_acked(&mut self, offset: u64, len: usize, fin: bool) -> usize {
        if fin {
            self.fin = FinState::Acked;
        }
        let start = offset.max(self.base);
        let end = offset + len as u64;
        if start >= end {
            return 0;
        }
        self.acked.insert(start..end);
        let mut freed = 0;
        while let Some(first) = self.acked.first() {
            if first.start > self.base {
                break;
            }
            let n = (first.end - self.base) as usize;
            self.buf.consume(n);
            freed += n;
            self.base = first.end;
            self.acked.remove(first);
        }
        if freed > 0 {
            self.retransmit.remove_below(self.base);
        }
        freed
    }

    /// Records a lost chunk: its bytes (and FIN) will be sent again.
    pub fn on_lost(&mut self, offset: u64, len: usize, fin: bool) {
        if fin && self.fin == FinState::Sent {
            self.fin = FinState::Pending;
        }
        let start = offset.max(self.base);
        let end = offset + len as u64;
        if start < end {
            self.retransmit.insert(start..end);
        }
    }

    /// Frees the buffer storage if nothing is buffered (called when the session is idle).
    pub fn release_idle_storage(&mut self) {
        self.buf.shrink_if_empty(0);
    }

    /// Drops all buffered data (stream reset).
    pub fn abandon(&mut self) {
        // Nothing of it waits on the peer's window any more (the streams' beyond-window count
        // drops it here, not when the stream is removed).
        self.max_data = self.max_data.max(self.end());
        self.base = self.end();
        self.buf = ByteRing::new(0);
        self.acked.clear();
        self.retransmit.clear();
    }
}

/// Why received stream data was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// Data beyond the advertised window: protocol violation.
    FlowControl,
    /// Data or FIN inconsistent with an earlier FIN: protocol violation.
    FinalSize,
    /// Too many reassembly gaps: drop the packet without acknowledging it.
    TooFragmented,
}

/// Send-buffer storage a stream keeps while it drains: one pipe read, so a stream that is filled
/// and acknowledged in small steps is not reallocated on every step (storage above it follows the
/// contents down: the server charges a user for it).
pub const SEND_RETAIN: usize = 16 * 1024;

/// How many bytes a stream's send buffer takes beyond the peer's flow-control limit once the
/// session's send buffer is half full: one socket read's worth (`tunnel::pipe::PIPE_READ`),
/// ready to go the moment the limit is raised.
pub const BEYOND_WINDOW_SLACK: u64 = 64 * 1024;

/// Receive-buffer storage a stream keeps while it drains (freed when the session goes idle or
/// the stream ends): a batch of datagrams (up to 64 × ~1.4 KB) fits, so a stream whose bytes
/// go to the socket as fast as they arrive does not free and regrow its buffer per batch.
/// Receive storage is not charged to a user's buffered-bytes share (send storage is, and keeps
/// following its contents).
/// On the server, whose peers are strangers, a stream keeps only [`SEND_RETAIN`]: 256 streams
/// of one user each holding 128 KiB after a burst would be 32 MiB outside every budget.
pub const RECV_RETAIN: usize = 128 * 1024;

#[derive(Debug)]
pub struct RecvHalf {
    buf: ByteRing,
    /// Offset of the next byte the application reads (head of `buf`).
    read: u64,
    received: RangeSet,
    /// One past the highest offset received (counts against session flow control).
    pub highest: u64,
    pub fin_offset: Option<u64>,
    /// Advertised limit (MAX_STREAM_DATA we granted).
    pub max_data: u64,
    window: u64,
    /// Data arriving is discarded (local reset).
    pub discarding: bool,
}

impl RecvHalf {
    pub fn new(window: u64, range_limit: usize, retain: usize) -> Self {
        Self {
            buf: ByteRing::with_retain(window as usize, retain),
            read: 0,
            received: RangeSet::new(range_limit),
            highest: 0,
            fin_offset: None,
            max_data: window,
            window,
            discarding: false,
        }
    }

    /// Bytes of storage the receive buffer holds.
    #[cfg(test)]
    pub fn memory(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes held in the reassembly buffer (including holes).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Accepts a STREAM frame. On success returns how much `highest` grew (session flow
    /// control) and whether the stream became readable.
    pub fn on_data(&mut self, offset: u64, data: &[u8], fin: bool) -> Result<u64, RecvError> {
        let end = offset + data.len() as u64;
        if end > self.max_data {
            return Err(RecvError::FlowControl);
        }
        if let Some(f) = self.fin_offset {
            if end > f || (fin && end != f) {
                return Err(RecvError::FinalSize);
            }
        }
        if fin && end < self.highest {
            return Err(RecvError::FinalSize);
        }
        let start = offset.max(self.read);
        if start < end && !self.discarding && !self.received.insert(start..end) {
            return Err(RecvError::TooFragmented);
        }
        if fin {
            self.fin_offset = Some(end);
        }
        let grown = end.saturating_sub(self.highest);
        self.highest = self.highest.max(end);
        if start < end && !self.discarding {
            let pos = (start - self.read) as usize;
            let skip = (start - offset) as usize;
            // Cannot fail: end <= max_data <= read + window == read + buffer limit.
            self.buf.write_at(pos, &data[skip..]);
        }
        Ok(grown)
    }

    /// Frees the buffer storage if nothing is buffered (called when the session is idle).
    pub fn release_idle_storage(&mut self) {
        self.buf.shrink_if_empty(0);
    }

    /// Contiguous bytes ready for the application.
    pub fn readable(&self) -> usize {
        match self.received.first() {
            Some(r) if r.start <= self.read => (r.end - self.read) as usize,
            _ => 0,
        }
    }

    /// All data up to the FIN was read.
    pub fn is_finished(&self) -> bool {
        self.fin_offset == Some(self.read)
    }

    /// Every byte up to the FIN has arrived (the peer's final size is known and complete).
    pub fn is_complete(&self) -> bool {
        match self.fin_offset {
            Some(f) => f == self.read || self.readable() as u64 + self.read == f,
            None => false,
        }
    }

    /// Copies readable bytes into `out`; returns the count.
    #[cfg(test)]
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let n = self.readable().min(out.len());
        if n == 0 {
            return 0;
        }
        self.buf.copy_out(0, &mut out[..n]);
        self.advance(n)
    }

    /// The readable bytes in place, as at most two slices (the buffer may wrap).
    pub fn peek(&self) -> (&[u8], &[u8]) {
        self.buf.as_slices(self.readable())
    }

    /// Marks up to `n` readable bytes as read (after [`RecvHalf::peek`]); returns the count.
    pub fn advance(&mut self, n: usize) -> usize {
        let n = n.min(self.readable());
        if n == 0 {
            return 0;
        }
        self.buf.consume(n);
        self.read += n as u64;
        self.received.remove_below(self.read);
        n
    }

    /// After reads: the new limit to advertise, if the window moved enough to be worth a frame.
    pub fn window_update(&mut self) -> Option<u64> {
        if self.fin_offset.is_some() || self.discarding {
            return None;
        }
        let target = self.read + self.window;
        if target - self.max_data >= self.window / super::flow::WINDOW_UPDATE_FRACTION {
            self.max_data = target;
            Some(target)
        } else {
            None
        }
    }

    /// Discards everything buffered and everything that arrives later (reset). Returns the
    /// number of bytes that were received but never read (to release session credit).
    pub fn discard(&mut self) -> u64 {
        self.discarding = true;
        self.buf = ByteRing::new(0);
        self.received.clear();
        let released = self.highest - self.read;
        self.read = self.highest;
        released
    }

    /// While discarding, new bytes count as read immediately; returns the newly released count.
    pub fn release_discarded(&mut self) -> u64 {
        let released = self.highest - self.read;
        self.read = self.highest;
        released
    }
}

/// How far a stream open has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenState {
    /// Opened locally: waiting for OPEN to be acknowledged and for the peer's answer.
    Local { open_acked: bool, answered: bool },
    /// Opened by the peer: `announced` once the OPEN frame arrived (and StreamOpened was
    /// emitted); `answered` once the application answered; `ok_acked` once OPEN_OK was acked.
    Peer {
        announced: bool,
        answered: bool,
        ok_acked: bool,
    },
}

/// Stream control frames waiting to be (re)sent: a small set of [`PendingControl`] flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingControl(u8);

impl PendingControl {
    /// STREAM_OPEN (a local open not yet acknowledged).
    pub const OPEN: Self = Self(1);
    /// OPEN_OK (our acceptance of a peer's open).
    pub const OPEN_OK: Self = Self(1 << 1);
    /// RESET_STREAM (our reset, or the echo of the peer's).
    pub const RESET: Self = Self(1 << 2);
    /// MAX_STREAM_DATA (the receive window moved).
    pub const MAX_STREAM_DATA: Self = Self(1 << 3);

    pub fn insert(&mut self, frame: Self) {
        self.0 |= frame.0;
    }

    pub fn remove(&mut self, frame: Self) {
        self.0 &= !frame.0;
    }

    pub fn contains(self, frame: Self) -> bool {
        self.0 & frame.0 == frame.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// A reset stream sends nothing but its RESET_STREAM: drops every other pending frame.
    pub fn keep_reset_only(&mut self) {
        self.0 &= Self::RESET.0;
    }
}

/// One stream's full state.
#[derive(Debug)]
pub struct Stream {
    pub send: SendHalf,
    pub recv: RecvHalf,
    pub dest: Option<Destination>,
    pub open: OpenState,
    /// Local reset reason (RESET_STREAM sent or to be sent).
    pub reset_local: Option<ResetReason>,
    pub reset_local_acked: bool,
    /// Peer's reset reason and final size.
    pub reset_remote: Option<(ResetReason, u64)>,
    /// Control frames to (re)send; the stream is on the control queue while this is not empty.
    pub pending: PendingControl,
    /// On the transport's control queue (kept by `StreamsState::queue_control`).
    pub in_control_queue: bool,
    /// On the transport's send queue (kept by `StreamsState`'s one enqueue path).
    pub in_send_queue: bool,
    /// Bytes sent in the stream's current turn at the front of the send queue (0 between turns;
    /// see `streams::SEND_TURN`).
    pub turn_sent: u32,
    /// In the send queue's run of first turns and small writes right after its front (see
    /// `StreamsState::enqueue_send`).
    pub priority: bool,
    // Event bookkeeping.
    pub readable_notified: bool,
    pub want_writable: bool,
    pub finished_notified: bool,
    pub bytes_written: u64,
    pub bytes_read: u64,
}

impl Stream {
    pub fn new(
        open: OpenState,
        send_buffer: usize,
        send_max: u64,
        recv_window: u64,
        recv_ranges: usize,
        recv_retain: usize,
    ) -> Self {
        Self {
            send: SendHalf::new(send_buffer, send_max),
            recv: RecvHalf::new(recv_window, recv_ranges, recv_retain),
            dest: None,
            open,
            reset_local: None,
            reset_local_acked: false,
            reset_remote: None,
            pending: PendingControl::default(),
            in_control_queue: false,
            in_send_queue: false,
            turn_sent: 0,
            priority: false,
            readable_notified: false,
            want_writable: false,
            finished_notified: false,
            bytes_written: 0,
            bytes_read: 0,
        }
    }

    pub fn is_reset(&self) -> bool {
        self.reset_local.is_some() || self.reset_remote.is_some()
    }

    pub fn has_control_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Peer-opened stream whose OPEN frame arrived (so the application knows it).
    pub fn is_announced(&self) -> bool {
        match self.open {
            OpenState::Local { .. } => true,
            OpenState::Peer { announced, .. } => announced,
        }
    }

    /// The stream can be forgotten: both directions finished or reset, nothing left to
    /// (re)send, and the peer knows our final state.
    pub fn is_done(&self) -> bool {
        if self.has_control_pending() {
            return false;
        }
        if self.reset_local.is_some() {
            let peer_final_known = self.reset_remote.is_some() || self.recv.fin_offset.is_some();
            return self.reset_local_acked && peer_final_known;
        }
        if self.reset_remote.is_some() {
            // We echo a reset on receipt, so reset_local is set; unreachable in practice.
            return false;
        }
        let opened = match self.open {
            OpenState::Local { open_acked, .. } => open_acked,
            OpenState::Peer { ok_acked, .. } => ok_acked,
        };
        opened && self.send.is_complete() && self.recv.is_finished() && self.finished_notified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_half_retransmits_lost_and_frees_acked() {
        let mut s = SendHalf::new(1000, 10_000);
        assert_eq!(s.write(&[7u8; 600]), 600);
        let a = s.next_chunk(250, u64::MAX).unwrap();
        let b = s.next_chunk(250, u64::MAX).unwrap();
        let c = s.next_chunk(250, u64::MAX).unwrap();
        assert_eq!(
            (a.offset, a.len, b.offset, c.offset, c.len),
            (0, 250, 250, 500, 100)
        );
        assert_eq!(s.next_chunk(250, u64::MAX), None);
        assert_eq!(s.on_acked(250, 250, false), 0, "hole at 0 keeps buffer");
        s.on_lost(0, 250, false);
        let r = s.next_chunk(100, u64::MAX).unwrap();
        assert_eq!((r.offset, r.len, r.new_bytes), (0, 100, 0));
        let r2 = s.next_chunk(1000, u64::MAX).unwrap();
        assert_eq!((r2.offset, r2.len), (100, 150));
        assert_eq!(s.on_acked(0, 100, false), 100);
        assert_eq!(s.on_acked(100, 150, false), 400);
        assert_eq!(s.buffered(), 100);
    }

    #[test]
    fn send_half_respects_limits_and_fin() {
        let mut s = SendHalf::new(100, 50);
        assert_eq!(s.write(&[1u8; 200]), 100);
        let a = s.next_chunk(1000, 30).unwrap();
        assert_eq!(a.len, 30);
        let b = s.next_chunk(1000, 1000).unwrap();
        assert_eq!(b.len, 20, "stream max_data 50");
        s.max_data = 1000;
        s.fin = FinState::Pending;
        let c = s.next_chunk(1000, 1000).unwrap();
        assert_eq!((c.offset, c.len, c.fin), (50, 50, true));
        s.on_lost(50, 50, true);
        assert_eq!(s.fin, FinState::Pending);
        let d = s.next_chunk(1000, 0).unwrap();
        assert!(d.fin && d.new_bytes == 0);
        s.on_acked(0, 100, true);
        assert!(s.is_complete());
    }

    #[test]
    fn recv_half_reassembles_and_enforces_window() {
        let mut r = RecvHalf::new(100, 8, RECV_RETAIN);
        assert_eq!(r.on_data(10, &[2u8; 10], false), Ok(20));
        assert_eq!(r.readable(), 0);
        assert_eq!(r.on_data(0, &[1u8; 10], false), Ok(0));
        assert_eq!(r.readable(), 20);
        assert_eq!(
            r.on_data(95, &[0u8; 10], false),
            Err(RecvError::FlowControl)
        );
        let mut out = [0u8; 64];
        assert_eq!(r.read(&mut out), 20);
        assert_eq!(&out[..20], &[[1u8; 10], [2u8; 10]].concat()[..]);
        assert_eq!(r.window_update(), Some(120), "moved 20 >= 100/8");
        assert_eq!(r.on_data(20, &[3u8; 10], true), Ok(10));
        assert_eq!(r.on_data(20, &[3u8; 11], false), Err(RecvError::FinalSize));
        assert_eq!(r.read(&mut out), 10);
        assert!(r.is_finished());
    }

    #[test]
    fn pending_control_flags_are_independent() {
        let mut p = PendingControl::default();
        assert!(p.is_empty());
        p.insert(PendingControl::OPEN);
        p.insert(PendingControl::MAX_STREAM_DATA);
        assert!(p.contains(PendingControl::OPEN) && !p.contains(PendingControl::RESET));
        p.remove(PendingControl::OPEN);
        assert!(!p.contains(PendingControl::OPEN) && p.contains(PendingControl::MAX_STREAM_DATA));
        p.insert(PendingControl::RESET);
        p.keep_reset_only();
        assert_eq!(p, PendingControl::RESET);
        p.remove(PendingControl::RESET);
        assert!(p.is_empty());
    }

    #[test]
    fn recv_half_limits_fragmentation() {
        let mut r = RecvHalf::new(1000, 2, RECV_RETAIN);
        r.on_data(10, &[0], false).unwrap();
        r.on_data(20, &[0], false).unwrap();
        assert_eq!(r.on_data(30, &[0], false), Err(RecvError::TooFragmented));
        assert_eq!(r.highest, 21, "rejected frame changed nothing");
    }
}
