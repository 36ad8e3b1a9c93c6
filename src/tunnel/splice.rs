//! A bounded socket-to-socket byte mover with half-close: fixed-capacity buffers and one
//! direction of a splice. Used by the server's fallback splices (TCP carrier strangers handed to
//! a website) and by the client's direct connections (split routing). Pure over `Read`/`Write`.

use std::io::{self, Read, Write};

/// A byte buffer of fixed capacity with a consumed prefix: filled at the tail, drained at the
/// head, compacted only when the tail runs short (never grows). Its storage is allocated at
/// once ([`ByteBuf::new`]) or on first use ([`ByteBuf::lazy`]); an empty buffer can give its
/// storage back ([`ByteBuf::release`]), so an idle owner holds no bytes.
#[derive(Debug)]
pub struct ByteBuf {
    /// Empty while unallocated, else exactly `cap` bytes.
    buf: Box<[u8]>,
    cap: usize,
    start: usize,
    end: usize,
}

/// Storage of one size kept for reuse by [`ByteBuf::ensure`] / [`ByteBuf::release`]: at most
/// `keep` spare buffers, so buffers that come and go with each burst cost no allocation, and
/// what idle owners leave behind is bounded by `keep` × `size`, not by the number of owners.
#[derive(Debug)]
pub struct BufPool {
    size: usize,
    keep: usize,
    free: Vec<Box<[u8]>>,
}

impl BufPool {
    pub fn new(size: usize, keep: usize) -> Self {
        BufPool {
            size,
            keep,
            free: Vec::new(),
        }
    }

    fn take(&mut self) -> Box<[u8]> {
        self.free
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    fn give(&mut self, buf: Box<[u8]>) {
        if buf.len() == self.size && self.free.len() < self.keep {
            self.free.push(buf);
        }
    }

    /// Bytes held in spare buffers.
    pub fn spare_bytes(&self) -> usize {
        self.free.len() * self.size
    }
}

impl ByteBuf {
    pub fn new(capacity: usize) -> Self {
        let mut b = ByteBuf::lazy(capacity);
        b.allocate();
        b
    }

    /// A buffer of `capacity` bytes whose storage is allocated only when bytes go in.
    pub fn lazy(capacity: usize) -> Self {
        ByteBuf {
            buf: Box::default(),
            cap: capacity,
            start: 0,
            end: 0,
        }
    }

    fn allocate(&mut self) {
        if self.buf.len() != self.cap {
            self.buf = vec![0u8; self.cap].into_boxed_slice();
        }
    }

    /// Allocates the storage (from `pool` when it has the size) if it is not yet.
    pub fn ensure(&mut self, pool: &mut BufPool) {
        if self.buf.len() != self.cap && pool.size == self.cap {
            self.buf = pool.take();
        }
        self.allocate();
    }

    /// Gives the storage back to `pool` if no byte is in it; `true` if it did.
    pub fn release(&mut self, pool: &mut BufPool) -> bool {
        if !self.is_empty() || self.buf.is_empty() {
            return false;
        }
        pool.give(std::mem::take(&mut self.buf));
        true
    }

    /// Bytes of storage allocated now (0 or the capacity).
    pub fn allocated(&self) -> usize {
        self.buf.len()
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
        self.cap
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
        self.allocate();
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
        self.allocate();
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

    #[test]
    fn a_lazy_byte_buf_holds_storage_only_while_bytes_are_in_it() {
        let mut pool = BufPool::new(8, 1);
        let mut b = ByteBuf::lazy(8);
        assert_eq!((b.allocated(), b.capacity()), (0, 8));
        assert!(!b.is_full() && b.data().is_empty());
        assert!(!b.release(&mut pool), "nothing to give back");
        b.ensure(&mut pool);
        assert_eq!(b.allocated(), 8);
        b.spare()[..3].copy_from_slice(b"abc");
        b.commit(3);
        assert!(!b.release(&mut pool), "bytes are in it");
        b.consume(3);
        assert!(b.release(&mut pool));
        assert_eq!((b.allocated(), pool.spare_bytes()), (0, 8));
        // Used again without `ensure`: allocates by itself, never reads into nothing.
        let mut src: &[u8] = b"xyz";
        assert_eq!(b.read_from(&mut src).unwrap(), 3);
        assert_eq!(b.data(), b"xyz");
        // The pool keeps at most `keep` buffers and hands them out again.
        let mut c = ByteBuf::lazy(8);
        c.ensure(&mut pool);
        assert_eq!(pool.spare_bytes(), 0);
        b.consume(3);
        assert!(b.release(&mut pool) && c.release(&mut pool));
        assert_eq!(pool.spare_bytes(), 8, "bounded by keep");
        assert!(ByteBuf::lazy(8).spare_at_least(9).is_none());
    }

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
}
