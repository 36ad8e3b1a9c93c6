//! A growable byte ring with a hard capacity limit, used for stream send and receive buffers.
//!
//! Positions are relative to the head (the oldest byte still held). Storage grows by doubling up
//! to the limit and shrinks when the contents fall to a quarter of it (both amortised, never per
//! packet), so what a ring holds in memory stays within a small factor of what it holds in data:
//! a stream that once took a burst does not keep the burst's storage while it trickles. The last
//! few KiB are released by [`ByteRing::shrink_if_empty`] when the session goes idle.
//!
//! A ring that fills and empties over and over (a receive buffer taking a batch of datagrams and
//! handing it to a socket right away) would free its storage at every empty and grow it again by
//! doubling at the next batch: allocation, zeroing and copying on every batch. Such a ring keeps
//! a *retained* floor of storage ([`ByteRing::with_retain`]) while it drains; only storage above
//! the floor follows the contents down, and an idle session still frees it all.

#[derive(Debug, Clone)]
pub struct ByteRing {
    buf: Vec<u8>,
    head: usize,
    /// Bytes from head that are logically part of the ring (may include unwritten holes).
    len: usize,
    limit: usize,
    /// Storage kept while draining (0: storage follows the contents all the way down).
    retain: usize,
}

const MIN_ALLOC: usize = 4096;

impl ByteRing {
    pub fn new(limit: usize) -> Self {
        Self::with_retain(limit, 0)
    }

    /// A ring that, once it has grown, keeps up to `retain` bytes of storage while it drains
    /// (released by [`ByteRing::shrink_if_empty`]).
    pub fn with_retain(limit: usize, retain: usize) -> Self {
        Self {
            buf: Vec::new(),
            head: 0,
            len: 0,
            limit,
            retain: retain.min(limit),
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
    /// (Resizing in place, which zeroes less, left the heap fragmented: 100 downloads peaked
    /// 2-4 MiB higher on the server.)
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

    /// Free space right after the contents for up to `max` more bytes, to be filled in place
    /// and handed to [`ByteRing::commit`]: contiguous, so it may be shorter than `max` where the
    /// storage wraps (the next call continues at the start). Grows storage as [`ByteRing::push`]
    /// would, but never past what `max` alone would round up to while the storage that takes
    /// leaves at least a quarter of `max` (a 64 KiB read into a ring holding a few KiB would
    /// take 128 KiB: past glibc's mmap threshold, an mmap, page faults and a munmap per read
    /// for each of 100 downloads); empty when the ring is at its limit.
    pub fn spare(&mut self, max: usize) -> &mut [u8] {
        let max = max.min(self.limit - self.len);
        let fits = (self.buf.len().max(max.next_power_of_two())).saturating_sub(self.len);
        let max = if fits < max && fits >= max / 4 {
            fits
        } else {
            max
        };
        if max == 0 || !self.reserve(self.len + max) {
            return &mut [];
        }
        let cap = self.buf.len();
        let end = self.head + self.len;
        let (start, room) = if end < cap {
            (end, cap - end)
        } else {
            (end - cap, self.head - (end - cap))
        };
        let n = max.min(room);
        &mut self.buf[start..start + n]
    }

    /// Appends the first `n` bytes of the last [`ByteRing::spare`] slice to the contents.
    /// Returns how many bytes were committed: never more than the storage holds, whatever `n`.
    /// Committing nothing gives back what the `spare` call grew beyond the contents' needs (a
    /// socket read that found nothing must not leave its reservation charged to a user).
    pub fn commit(&mut self, n: usize) -> usize {
        let n = n.min(self.buf.len() - self.len);
        self.len += n;
        if n == 0 {
            self.shrink_to_fit_contents();
        }
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

    /// The first `n` bytes from the head as at most two slices (the second is empty unless the
    /// range wraps), read in place without copying. `n` must be within the logical length.
    pub fn as_slices(&self, n: usize) -> (&[u8], &[u8]) {
        debug_assert!(n <= self.len);
        let cap = self.buf.len();
        if cap == 0 || n == 0 {
            return (&[], &[]);
        }
        let first = n.min(cap - self.head);
        (
            &self.buf[self.head..self.head + first],
            &self.buf[..n - first],
        )
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
        self.shrink_to_fit_contents();
    }

    /// Halves storage (or more) once the contents fill at most a quarter of it: memory stays
    /// within 4× the contents (plus [`MIN_ALLOC`]), and a shrink copies at most a quarter of what
    /// the ring had to take in to grow to that size, so the copying stays amortised.
    /// A retaining ring never shrinks below its floor here.
    fn shrink_to_fit_contents(&mut self) {
        let cap = self.buf.len();
        let floor = self.retain.max(MIN_ALLOC);
        if cap <= floor || self.len > cap / 4 {
            return;
        }
        if self.len == 0 && self.retain == 0 {
            self.buf = Vec::new();
            self.head = 0;
            return;
        }
        let target = (self.len * 2).next_power_of_two().max(floor);
        if target < cap {
            self.reallocate(target);
        }
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
        r.consume(590_000);
        assert!(r.capacity() <= 4 * 10_000 + MIN_ALLOC, "{}", r.capacity());
        let mut out = vec![0u8; 10_000];
        r.copy_out(0, &mut out);
        assert_eq!(out, &data[590_000..]);
        // Wrapped contents move intact too.
        let cap = r.capacity();
        assert_eq!(r.push(&data[..cap - 10_000]), cap - 10_000);
        r.consume(cap - 3000);
        let mut tail = vec![0u8; 3000];
        r.copy_out(0, &mut tail);
        assert_eq!(tail, &data[cap - 13_000..cap - 10_000]);
        assert!(r.capacity() <= 4 * 3000 + MIN_ALLOC);
        r.consume(3000);
        assert_eq!(r.capacity(), 0, "an emptied ring holds nothing");
        // Small rings are left alone: no reallocation churn for a stream's last few KiB.
        r.push(&data[..1000]);
        r.consume(900);
        assert_eq!(r.capacity(), MIN_ALLOC);
    }

    #[test]
    fn a_retaining_ring_keeps_its_floor_through_fill_and_drain_cycles() {
        let retain = 128 * 1024;
        let mut r = ByteRing::with_retain(1 << 21, retain);
        let batch: Vec<u8> = (0..=255).cycle().take(90_000).map(|b| b as u8).collect();
        assert_eq!(r.push(&batch), batch.len());
        let cap = r.capacity();
        assert_eq!(cap, retain);
        let mut out = vec![0u8; 16 * 1024];
        for round in 0..5 {
            // Drained in socket-sized pieces down to empty: the storage stays (no regrowth by
            // doubling at the next batch), and the bytes come out in order.
            let mut taken = 0;
            while !r.is_empty() {
                let n = out.len().min(r.len());
                r.copy_out(0, &mut out[..n]);
                assert_eq!(&out[..n], &batch[taken..taken + n], "round {round}");
                r.consume(n);
                taken += n;
                assert_eq!(r.capacity(), cap, "round {round}");
            }
            assert_eq!(r.push(&batch), batch.len());
            assert_eq!(r.capacity(), cap, "round {round}");
        }
        // A burst beyond the floor shrinks back to the floor, not below, and keeps its bytes.
        r.consume(r.len());
        let big: Vec<u8> = (0..=255).cycle().take(600_000).map(|b| b as u8).collect();
        assert_eq!(r.push(&big), big.len());
        assert_eq!(r.capacity(), 1 << 20);
        r.consume(590_000);
        assert_eq!(r.capacity(), retain);
        let mut tail = vec![0u8; 10_000];
        r.copy_out(0, &mut tail);
        assert_eq!(tail, &big[590_000..]);
        // An idle session still frees it all.
        r.consume(10_000);
        assert_eq!(r.capacity(), retain);
        r.shrink_if_empty(0);
        assert_eq!(r.capacity(), 0);
    }

    #[test]
    fn slices_read_wrapped_contents_in_place() {
        let mut r = ByteRing::new(MIN_ALLOC);
        let data: Vec<u8> = (0..=255).cycle().take(6000).map(|b| b as u8).collect();
        assert_eq!(r.push(&data[..4000]), 4000);
        r.consume(3000);
        assert_eq!(r.push(&data[4000..]), 2000);
        // Head at 3000 of 4096: 1096 bytes before the wrap, 1904 after it.
        let (a, b) = r.as_slices(r.len());
        assert_eq!((a.len(), b.len()), (1096, 1904));
        assert_eq!([a, b].concat(), &data[3000..]);
        let (a, b) = r.as_slices(10);
        assert_eq!((a, b.len()), (&data[3000..3010], 0));
        assert_eq!(ByteRing::new(10).as_slices(0), (&[][..], &[][..]));
    }

    #[test]
    fn spare_space_is_filled_in_place_around_the_wrap() {
        let mut r = ByteRing::new(MIN_ALLOC);
        let data: Vec<u8> = (0..=255).cycle().take(8000).map(|b| b as u8).collect();
        assert_eq!(r.push(&data[..3000]), 3000);
        r.consume(2000); // head 2000, contents 1000, storage 4096
        let mut fed = 3000;
        // Up to the end of the storage, then from its start up to the head.
        for expect in [1096, 2000, 0] {
            let free = MIN_ALLOC - r.len();
            let room = r.spare(10_000);
            assert_eq!(room.len(), expect.min(free));
            let n = room.len();
            room.copy_from_slice(&data[fed..fed + n]);
            r.commit(n);
            fed += n;
        }
        assert_eq!(r.len(), MIN_ALLOC);
        let mut out = vec![0u8; MIN_ALLOC];
        r.copy_out(0, &mut out);
        assert_eq!(out, &data[2000..2000 + MIN_ALLOC]);
        // An empty ring grows for what is asked.
        let mut g = ByteRing::new(1 << 20);
        assert_eq!(g.spare(10_000).len(), 10_000);
        g.commit(10);
        assert_eq!((g.len(), g.capacity()), (10, 16_384));
        // A caller claiming more than the storage holds gets only what fits.
        assert_eq!(g.commit(1 << 20), 16_384 - 10);
        assert_eq!(g.len(), 16_384);
    }

    /// Space asked for next to a few KiB of contents stays within the storage the request alone
    /// would take (64 KiB, not 128 KiB), and storage that already has room enough is used
    /// without growing; a request that would get less than a quarter of itself grows the ring.
    #[test]
    fn spare_space_does_not_round_storage_past_the_request() {
        let mut r = ByteRing::with_retain(1 << 21, 16 * 1024);
        let data: Vec<u8> = (0..=255).cycle().take(70_000).map(|b| b as u8).collect();
        assert_eq!(r.push(&data[..5000]), 5000);
        let room = r.spare(64 * 1024);
        assert_eq!(room.len(), 64 * 1024 - 5000);
        room.copy_from_slice(&data[5000..64 * 1024]);
        r.commit(64 * 1024 - 5000);
        assert_eq!(r.capacity(), 64 * 1024);
        r.consume(60 * 1024);
        assert!(r.capacity() < 64 * 1024, "drained: {}", r.capacity());
        let held = r.len();
        let mut out = vec![0u8; held];
        r.copy_out(0, &mut out);
        assert_eq!(out, &data[60 * 1024..64 * 1024]);
        // Nearly full large storage: a small rest is not worth a read, so the ring grows.
        let mut g = ByteRing::new(1 << 21);
        assert_eq!(g.push(&vec![1u8; (1 << 20) - 10_000]), (1 << 20) - 10_000);
        assert_eq!(g.spare(64 * 1024).len(), 64 * 1024);
        assert_eq!(g.capacity(), 1 << 21);
        // With room for a quarter of the request or more, no growth.
        let mut h = ByteRing::new(1 << 21);
        assert_eq!(h.push(&vec![1u8; (1 << 20) - 20_000]), (1 << 20) - 20_000);
        assert_eq!(h.spare(64 * 1024).len(), 20_000);
        assert_eq!(h.capacity(), 1 << 20);
    }

    /// Growing and shrinking in place keep the bytes wherever the head was.
    #[test]
    fn contents_survive_resizing_from_any_head() {
        let data: Vec<u8> = (0..=255).cycle().take(300_000).map(|b| b as u8).collect();
        for head in [0, 1, 4095, 20_000] {
            let mut r = ByteRing::new(1 << 20);
            assert_eq!(r.push(&data[..head + 30_000]), head + 30_000);
            r.consume(head); // may shrink
            assert_eq!(r.push(&data[head + 30_000..head + 200_000]), 170_000); // grows
            r.consume(190_000); // shrinks
            let mut out = vec![0u8; r.len()];
            r.copy_out(0, &mut out);
            assert_eq!(out, &data[head + 190_000..head + 200_000], "head {head}");
            assert!(r.capacity() <= 4 * r.len() + MIN_ALLOC);
        }
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
