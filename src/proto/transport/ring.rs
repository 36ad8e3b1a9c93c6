//! A growable byte ring with a hard capacity limit, used for stream send and receive buffers.
//!
//! Positions are relative to the head (the oldest byte still held). Storage grows by doubling up
//! to the limit (amortised, never per packet). A send buffer consumes with
//! [`ByteRing::consume_and_fit`], which also halves storage once the contents fall to a quarter of
//! it (down to [`KEEP_WHILE_BUSY`]), so what it holds in memory stays within a small factor of what
//! it holds in data: a stream that once took a burst does not keep the burst's storage while it
//! trickles (the server charges a user for this storage). A receive buffer, emptied by every read,
//! keeps its storage while busy (no reallocation per read). Everything is released by
//! [`ByteRing::shrink_if_empty`] when the session goes idle.

#[derive(Debug, Clone)]
pub struct ByteRing {
    buf: Vec<u8>,
    head: usize,
    /// Bytes from head that are logically part of the ring (may include unwritten holes).
    len: usize,
    limit: usize,
}

const MIN_ALLOC: usize = 4096;
/// [`ByteRing::consume_and_fit`] never shrinks below this (one pipe read): a ring that a stream
/// fills and empties in small steps is not reallocated on every step.
pub const KEEP_WHILE_BUSY: usize = 16 * 1024;

impl ByteRing {
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            head: 0,
            len: 0,
            limit,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes of storage allocated (what the ring costs in memory, holes included).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Makes room for `need` bytes from the head. Returns `false` if `need` exceeds the limit.
    pub fn reserve(&mut self, need: usize) -> bool {
        if need <= self.buf.len() {
            return true;
        }
        if need > self.limit {
            return false;
        }
        let new_cap = need
            .next_power_of_two()
            .max(MIN_ALLOC)
            .min(self.limit.max(need));
        self.reallocate(new_cap);
        true
    }

    /// Moves the contents into fresh storage of `cap` bytes (at least the length), head at 0.
    fn reallocate(&mut self, cap: usize) {
        let mut new_buf = vec![0u8; cap];
        self.copy_out(0, &mut new_buf[..self.len]);
        self.buf = new_buf;
        self.head = 0;
    }

    /// Appends as much of `data` as the limit allows; returns the count appended.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.limit - self.len);
        if n == 0 || !self.reserve(self.len + n) {
            return 0;
        }
        let pos = self.len;
        self.write_at(pos, &data[..n]);
        n
    }

    /// Writes `data` at `pos` (relative to head), growing the logical length if needed.
    /// Returns `false` if that would exceed the limit.
    pub fn write_at(&mut self, pos: usize, data: &[u8]) -> bool {
        let end = pos + data.len();
        if !self.reserve(end) {
            return false;
        }
        let cap = self.buf.len();
        if cap == 0 {
            return data.is_empty();
        }
        let start = (self.head + pos) % cap;
        let first = data.len().min(cap - start);
        self.buf[start..start + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len = self.len.max(end);
        true
    }

    /// Copies `out.len()` bytes starting at `pos` (relative to head). The range must be within
    /// the logical length.
    pub fn copy_out(&self, pos: usize, out: &mut [u8]) {
        debug_assert!(pos + out.len() <= self.len);
        let cap = self.buf.len();
        if cap == 0 || out.is_empty() {
            return;
        }
        let start = (self.head + pos) % cap;
        let first = out.len().min(cap - start);
        let n = out.len();
        out[..first].copy_from_slice(&self.buf[start..start + first]);
        out[first..].copy_from_slice(&self.buf[..n - first]);
    }

    /// Drops `n` bytes from the head.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        if self.buf.is_empty() {
            return;
        }
        self.head = (self.head + n) % self.buf.len();
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        }
    }

    /// [`ByteRing::consume`], then halves storage (or more) once the contents fill at most a
    /// quarter of it, never below [`KEEP_WHILE_BUSY`]: memory stays within 4× the contents (or
    /// that floor), and a shrink copies at most a quarter of what the ring had to take in to grow
    /// to that size, so the copying stays amortised.
    pub fn consume_and_fit(&mut self, n: usize) {
        self.consume(n);
        let cap = self.buf.len();
        if cap <= KEEP_WHILE_BUSY || self.len > cap / 4 {
            return;
        }
        self.reallocate((self.len * 2).next_power_of_two().max(KEEP_WHILE_BUSY));
    }

    /// Frees storage if the ring is empty and holds more than `keep` bytes of capacity.
    pub fn shrink_if_empty(&mut self, keep: usize) {
        if self.len == 0 && self.buf.len() > keep {
            self.buf = Vec::new();
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_grows() {
        let mut r = ByteRing::new(10_000);
        let data: Vec<u8> = (0..=255).cycle().take(6000).map(|b| b as u8).collect();
        assert_eq!(r.push(&data[..3000]), 3000);
        r.consume(2500);
        assert_eq!(r.push(&data[3000..6000]), 3000); // wraps inside 4096, then grows
        let mut out = vec![0u8; 3500];
        r.copy_out(0, &mut out);
        assert_eq!(out, &data[2500..6000]);
        assert_eq!(r.push(&vec![1; 20_000]), 10_000 - 3500);
        assert_eq!(r.len(), 10_000);
        assert_eq!(r.push(&[1]), 0);
    }

    #[test]
    fn storage_follows_the_contents_down() {
        let mut r = ByteRing::new(1 << 20);
        let data: Vec<u8> = (0..=255).cycle().take(600_000).map(|b| b as u8).collect();
        assert_eq!(r.push(&data), 600_000);
        assert_eq!(r.capacity(), 1 << 20);
        // A burst taken and then acknowledged down to a trickle: storage shrinks with it, and
        // the bytes still held survive every move.
        r.consume_and_fit(590_000);
        assert!(r.capacity() <= 4 * 10_000 + MIN_ALLOC, "{}", r.capacity());
        let mut out = vec![0u8; 10_000];
        r.copy_out(0, &mut out);
        assert_eq!(out, &data[590_000..]);
        // Wrapped contents move intact too.
        let cap = r.capacity();
        assert_eq!(r.push(&data[..cap - 10_000]), cap - 10_000);
        r.consume_and_fit(cap - 3000);
        let mut tail = vec![0u8; 3000];
        r.copy_out(0, &mut tail);
        assert_eq!(tail, &data[cap - 13_000..cap - 10_000]);
        assert_eq!(r.capacity(), KEEP_WHILE_BUSY, "never below the busy floor");
        // At the floor a ring that fills and empties in small steps is never reallocated.
        for _ in 0..100 {
            r.push(&data[..5000]);
            r.consume_and_fit(r.len());
            assert_eq!(r.capacity(), KEEP_WHILE_BUSY);
        }
        // Plain `consume` (receive buffers, emptied by every read) keeps storage while busy.
        let mut recv = ByteRing::new(1 << 20);
        recv.push(&data[..300_000]);
        recv.consume(300_000);
        assert_eq!(recv.capacity(), 1 << 19);
        recv.shrink_if_empty(0);
        assert_eq!(recv.capacity(), 0, "released when the session goes idle");
    }

    #[test]
    fn write_at_with_holes() {
        let mut r = ByteRing::new(100);
        assert!(r.write_at(50, b"world"));
        assert_eq!(r.len(), 55);
        assert!(r.write_at(0, b"hello"));
        let mut out = [0u8; 5];
        r.copy_out(50, &mut out);
        assert_eq!(&out, b"world");
        assert!(!r.write_at(98, b"abc"));
        r.consume(55);
        assert!(r.is_empty());
        r.shrink_if_empty(0);
        assert_eq!(r.buf.len(), 0);
    }
}
