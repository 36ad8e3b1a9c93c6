//! The small pure types behind the server's TCP carrier connections (docs/PROTOCOL.md §7.2):
//! fixed-capacity byte buffers, the deadline heap, the oldest-first bound on unauthenticated
//! connections and fallback splices, the not-OSTP reasons and what a stranger gets, and the
//! half-close-aware byte mover of a fallback splice. The loop (`server_loop/carrier.rs`) owns the
//! sockets and only moves bytes and dispatches.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use crate::proto::carrier::gate::NotOstp;

/// A byte buffer of fixed capacity with a consumed prefix: filled at the tail, drained at the
/// head, compacted only when the tail runs short (allocated once, never grows).
#[derive(Debug)]
pub struct ByteBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ByteBuf {
    pub fn new(capacity: usize) -> Self {
        ByteBuf {
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// A buffer of `capacity` bytes holding `bytes` (at most `capacity` of them).
    pub fn with_bytes(capacity: usize, bytes: &[u8]) -> Self {
        let mut b = ByteBuf::new(capacity);
        let n = bytes.len().min(capacity);
        b.buf[..n].copy_from_slice(&bytes[..n]);
        b.end = n;
        b
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// No byte more fits (even after compaction).
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Drops the first `n` bytes (at most all of them).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Free space at the tail; compacts first when the tail is short (less than half the
    /// capacity), so some space is always offered while the buffer is not full.
    pub fn spare(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        if self.start > 0 && cap - self.end < cap / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// At least `n` bytes of free space at the tail (compacting if that makes room), or `None`.
    pub fn spare_at_least(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.capacity() - self.len() < n {
            return None;
        }
        if self.capacity() - self.end < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        Some(&mut self.buf[self.end..])
    }

    /// Marks `n` bytes written into [`ByteBuf::spare`] as data.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.capacity());
    }

    /// One read from `r` into the free space. `Ok(0)` with room left is the end of the stream.
    pub fn read_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        let spare = self.spare();
        if spare.is_empty() {
            return Ok(0);
        }
        let n = r.read(spare)?;
        self.commit(n);
        Ok(n)
    }

    /// Writes as much as `w` takes; returns the bytes written. `WouldBlock` is returned only when
    /// nothing could be written; a writer that takes 0 bytes is an error (`WriteZero`).
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let mut total = 0;
        while !self.is_empty() {
            match w.write(self.data()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consume(n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => return Ok(total),
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

/// A connection's identity: its slab index and the serial of this incarnation (indices are
/// reused; serials never are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    pub index: usize,
    pub serial: u64,
}

/// Deadlines of connections in one min-heap (no scans). Entries are never removed early: the
/// owner checks on expiry whether the entry is still the connection's current deadline, so a
/// connection has at most a couple of entries in flight.
#[derive(Debug, Default)]
pub struct DeadlineHeap {
    heap: BinaryHeap<Reverse<(Instant, ConnKey)>>,
}

impl DeadlineHeap {
    pub fn push(&mut self, at: Instant, key: ConnKey) {
        self.heap.push(Reverse((at, key)));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The earliest entry due at `now`, removed.
    pub fn pop_due(&mut self, now: Instant) -> Option<ConnKey> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse((_, k))| k),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// A bounded set of connections in arrival order: at most `cap` members; the owner evicts the
/// oldest when a new one pushes it over. Members leave in any order (the owner keeps a flag per
/// connection and tells [`OldestFirst::pop_oldest`] who is still a member); stale entries are
/// skipped and compacted away, so the queue stays O(members).
#[derive(Debug)]
pub struct OldestFirst {
    order: VecDeque<ConnKey>,
    members: usize,
    cap: usize,
}

impl OldestFirst {
    pub fn new(cap: usize) -> Self {
        OldestFirst {
            order: VecDeque::new(),
            members: 0,
            cap: cap.max(1),
        }
    }

    pub fn members(&self) -> usize {
        self.members
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// `key` becomes a member (the newest).
    pub fn enter(&mut self, key: ConnKey, is_member: impl Fn(&ConnKey) -> bool) {
        self.members += 1;
        self.order.push_back(key);
        if self.order.len() > 2 * self.members + 16 {
            self.order.retain(|k| *k == key || is_member(k));
        }
    }

    /// A member left (closed, or decided).
    pub fn leave(&mut self) {
        self.members = self.members.saturating_sub(1);
    }

    /// More members than the cap allows.
    pub fn over_cap(&self) -> bool {
        self.members > self.cap
    }

    /// Removes and returns the oldest member (the caller evicts it and marks it gone).
    pub fn pop_oldest(&mut self, is_member: impl Fn(&ConnKey) -> bool) -> Option<ConnKey> {
        while let Some(k) = self.order.pop_front() {
            if is_member(&k) {
                self.members = self.members.saturating_sub(1);
                return Some(k);
            }
        }
        None
    }
}

/// Why a connection is treated as not OSTP (the `reason` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOstpReason {
    /// The gate's decisions (§7.2 steps 1–3 and the hello deadline).
    Gate(NotOstp),
    /// The whole record failed a later check (rate limits, AEAD, clock window, replay record).
    Hello,
    /// The peer closed its side before the gate could decide.
    Truncated,
    /// An accepted carrier broke its framing (§7.4 failure): always discarded, never spliced.
    Framing,
}

/// Label values of [`NotOstpReason`], in [`NotOstpReason::index`] order.
pub const NOT_OSTP_REASONS: [&str; 7] = [
    "unknown_tag",
    "replay",
    "bad_length",
    "timeout",
    "auth_failure",
    "truncated",
    "framing",
];

impl NotOstpReason {
    pub fn index(self) -> usize {
        match self {
            NotOstpReason::Gate(NotOstp::UnknownTag) => 0,
            NotOstpReason::Gate(NotOstp::Replay) => 1,
            NotOstpReason::Gate(NotOstp::BadLength) => 2,
            NotOstpReason::Gate(NotOstp::Timeout) => 3,
            NotOstpReason::Hello => 4,
            NotOstpReason::Truncated => 5,
            NotOstpReason::Framing => 6,
        }
    }
}

/// What a connection that is not OSTP gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stranger {
    /// Spliced to the fallback website, bytes read so far first.
    Fallback(SocketAddr),
    /// Read and discarded until a random deadline, then FIN.
    Discard,
}

/// The fallback (when configured) for a stranger at the door; a carrier that broke its framing
/// after the reply is always discarded (§7.4: the fallback would get bytes that were never the
/// start of a request, and the timing of the end would tell an active attacker something).
pub fn stranger_fate(reason: NotOstpReason, fallback: Option<SocketAddr>) -> Stranger {
    match (reason, fallback) {
        (NotOstpReason::Framing, _) | (_, None) => Stranger::Discard,
        (_, Some(target)) => Stranger::Fallback(target),
    }
}

/// One direction of a fallback splice: bytes read from one socket wait here for the other.
#[derive(Debug)]
pub struct Half {
    pub buf: ByteBuf,
    /// The source reached its end (or failed to read): nothing more will be read.
    pub src_done: bool,
    /// The destination's write side was shut down (after the source's end was passed on).
    pub dst_shut: bool,
}

/// What [`Half::pump`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HalfProgress {
    pub read: usize,
    pub written: usize,
    /// The source's end was just passed on: shut the destination's write side now.
    pub shut_dst: bool,
}

impl Half {
    pub fn new(capacity: usize, early: &[u8]) -> Self {
        Half {
            buf: ByteBuf::with_bytes(capacity, early),
            src_done: false,
            dst_shut: false,
        }
    }

    /// Moves bytes from `src` to `dst` until neither can make progress, at most `budget` bytes
    /// read. `src_ready` / `dst_ready` are the edge-triggered readiness flags: cleared on
    /// `WouldBlock`. `dst_open`: the destination may be written (a fallback still connecting
    /// may not). A read error ends the source like an end of stream; a write error is returned.
    pub fn pump(
        &mut self,
        src: &mut impl Read,
        src_ready: &mut bool,
        dst: &mut impl Write,
        dst_ready: &mut bool,
        dst_open: bool,
        budget: usize,
    ) -> io::Result<HalfProgress> {
        let mut p = HalfProgress::default();
        loop {
            let mut moved = false;
            if dst_open && *dst_ready && !self.buf.is_empty() {
                match self.buf.write_to(dst) {
                    Ok(n) => {
                        p.written += n;
                        moved |= n > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => *dst_ready = false,
                    Err(e) => return Err(e),
                }
            }
            if !self.src_done && *src_ready && !self.buf.is_full() && p.read < budget {
                match self.buf.read_from(src) {
                    Ok(0) => self.src_done = true,
                    Ok(n) => {
                        p.read += n;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => *src_ready = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => moved = true,
                    Err(_) => self.src_done = true,
                }
            }
            if !moved {
                break;
            }
        }
        if dst_open && self.src_done && self.buf.is_empty() && !self.dst_shut {
            self.dst_shut = true;
            p.shut_dst = true;
        }
        Ok(p)
    }

    /// Whether this direction is finished (end passed on).
    pub fn finished(&self) -> bool {
        self.dst_shut
    }

    /// More may be read right now (the budget stopped it, not the socket).
    pub fn may_read_more(&self, src_ready: bool) -> bool {
        !self.src_done && src_ready && !self.buf.is_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn byte_buf_fills_drains_and_compacts_without_growing() {
        let mut b = ByteBuf::new(8);
        b.spare()[..6].copy_from_slice(b"abcdef");
        b.commit(6);
        b.consume(4);
        assert_eq!(b.data(), b"ef");
        // The tail has 2 bytes (< half): compaction makes 6 available.
        assert_eq!(b.spare().len(), 6);
        assert_eq!(b.data(), b"ef");
        assert!(b.spare_at_least(7).is_none());
        assert_eq!(b.spare_at_least(6).map(|s| s.len()), Some(6));
        b.commit(100); // capped at the capacity
        assert!(b.is_full());
        assert_eq!(b.capacity(), 8);
        b.consume(100);
        assert!(b.is_empty());
        let w = ByteBuf::with_bytes(4, b"toolong");
        assert_eq!(w.data(), b"tool");
    }

    /// A writer taking at most `chunk` bytes per call and `room` in all, then `WouldBlock`.
    struct Sink {
        got: Vec<u8>,
        room: usize,
        chunk: usize,
    }

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.chunk).min(self.room);
            self.got.extend_from_slice(&b[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A reader handing out `data` in `chunk`s, then `WouldBlock` (or the end when `eof`).
    struct Source {
        data: Vec<u8>,
        chunk: usize,
        eof: bool,
    }

    impl Read for Source {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = out.len().min(self.chunk).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn write_to_reports_would_block_only_when_nothing_moved() {
        let mut b = ByteBuf::with_bytes(16, b"0123456789");
        let mut sink = Sink {
            got: Vec::new(),
            room: 4,
            chunk: 3,
        };
        assert_eq!(b.write_to(&mut sink).unwrap(), 4);
        assert_eq!(
            b.write_to(&mut sink).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        sink.room = 100;
        assert_eq!(b.write_to(&mut sink).unwrap(), 6);
        assert_eq!(sink.got, b"0123456789");
    }

    #[test]
    fn a_splice_half_sends_early_bytes_first_then_passes_the_end_on_once() {
        let mut half = Half::new(8, b"GET ");
        let mut src = Source {
            data: b"/ HTTP/1.0\r\n\r\n".to_vec(),
            chunk: 5,
            eof: true,
        };
        let mut dst = Sink {
            got: Vec::new(),
            room: usize::MAX,
            chunk: 4,
        };
        let (mut sr, mut dr) = (true, true);
        // Not connected yet: reads fill the buffer (bounded by its capacity), nothing is written.
        let p = half
            .pump(&mut src, &mut sr, &mut dst, &mut dr, false, 1 << 20)
            .unwrap();
        assert_eq!((p.read, p.written, p.shut_dst), (4, 0, false));
        assert!(half.buf.is_full());
        let p = half
            .pump(&mut src, &mut sr, &mut dst, &mut dr, true, 1 << 20)
            .unwrap();
        assert!(
            p.shut_dst,
            "the end is passed on once everything is written"
        );
        assert_eq!(dst.got, b"GET / HTTP/1.0\r\n\r\n");
        let p = half
            .pump(&mut src, &mut sr, &mut dst, &mut dr, true, 1 << 20)
            .unwrap();
        assert_eq!(p, HalfProgress::default(), "only once");
        assert!(half.finished());
    }

    #[test]
    fn a_splice_half_stops_at_backpressure_and_at_its_budget() {
        let mut half = Half::new(4, b"");
        let mut src = Source {
            data: vec![7u8; 100],
            chunk: 100,
            eof: false,
        };
        let mut dst = Sink {
            got: Vec::new(),
            room: 10,
            chunk: 100,
        };
        let (mut sr, mut dr) = (true, true);
        let p = half
            .pump(&mut src, &mut sr, &mut dst, &mut dr, true, 1 << 20)
            .unwrap();
        // 10 written, then the sink blocks; the buffer fills (4) and reading stops.
        assert_eq!((p.written, dr, sr), (10, false, true));
        assert_eq!(p.read, 14);
        assert!(half.buf.is_full());
        dr = true;
        dst.room = usize::MAX;
        let p = half
            .pump(&mut src, &mut sr, &mut dst, &mut dr, true, 8)
            .unwrap();
        assert!(p.read >= 8 && p.read < 8 + 4, "budget respected: {p:?}");
        assert!(half.may_read_more(sr));
    }

    #[test]
    fn oldest_first_evicts_the_oldest_live_member_and_stays_compact() {
        let key = |index, serial| ConnKey { index, serial };
        let mut live = std::collections::HashSet::new();
        let mut q = OldestFirst::new(2);
        for i in 0..3 {
            live.insert(key(i, i as u64));
            q.enter(key(i, i as u64), |k| live.contains(k));
        }
        assert!(q.over_cap());
        // Member 0 left on its own (decided): the oldest member is then 1.
        live.remove(&key(0, 0));
        q.leave();
        assert!(!q.over_cap());
        live.insert(key(0, 9)); // index 0 reused by a newer connection
        q.enter(key(0, 9), |k| live.contains(k));
        let oldest = q.pop_oldest(|k| live.contains(k)).unwrap();
        assert_eq!(oldest, key(1, 1));
        assert_eq!(q.members(), 2);
        // Many members leaving without eviction do not make the queue grow without bound.
        for s in 100..10_000u64 {
            let k = key(5, s);
            live.insert(k);
            q.enter(k, |k| live.contains(k));
            live.remove(&k);
            q.leave();
        }
        assert!(q.order.len() <= 2 * q.members() + 20, "{}", q.order.len());
    }

    #[test]
    fn deadline_heap_pops_in_time_order_only_when_due() {
        let t0 = Instant::now();
        let mut h = DeadlineHeap::default();
        let k = |index| ConnKey { index, serial: 0 };
        h.push(t0 + Duration::from_secs(30), k(1));
        h.push(t0 + Duration::from_secs(10), k(2));
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(h.pop_due(t0), None);
        assert_eq!(h.pop_due(t0 + Duration::from_secs(31)), Some(k(2)));
        assert_eq!(h.pop_due(t0 + Duration::from_secs(31)), Some(k(1)));
        assert!(h.is_empty());
    }

    #[test]
    fn strangers_get_the_fallback_unless_their_carrier_broke_its_framing() {
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for r in [
            NotOstpReason::Gate(NotOstp::UnknownTag),
            NotOstpReason::Gate(NotOstp::Replay),
            NotOstpReason::Gate(NotOstp::Timeout),
            NotOstpReason::Hello,
            NotOstpReason::Truncated,
        ] {
            assert_eq!(stranger_fate(r, Some(target)), Stranger::Fallback(target));
            assert_eq!(stranger_fate(r, None), Stranger::Discard);
        }
        assert_eq!(
            stranger_fate(NotOstpReason::Framing, Some(target)),
            Stranger::Discard
        );
        let mut seen = [false; NOT_OSTP_REASONS.len()];
        for r in [
            NotOstpReason::Gate(NotOstp::UnknownTag),
            NotOstpReason::Gate(NotOstp::Replay),
            NotOstpReason::Gate(NotOstp::BadLength),
            NotOstpReason::Gate(NotOstp::Timeout),
            NotOstpReason::Hello,
            NotOstpReason::Truncated,
            NotOstpReason::Framing,
        ] {
            seen[r.index()] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
