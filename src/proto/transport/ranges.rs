//! A bounded set of disjoint half-open `u64` ranges (received packet numbers, received or acked
//! stream offsets, offsets to retransmit). Appending at the top is O(1); other inserts are
//! O(number of ranges), which is bounded by the caller-chosen limit.

use std::collections::VecDeque;
use std::ops::Range;

#[derive(Debug, Clone)]
pub struct RangeSet {
    /// Sorted, disjoint, non-adjacent.
    ranges: VecDeque<Range<u64>>,
    limit: usize,
}

impl RangeSet {
    /// A set that holds at most `limit` separate ranges.
    pub fn new(limit: usize) -> Self {
        Self {
            ranges: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn first(&self) -> Option<Range<u64>> {
        self.ranges.front().cloned()
    }

    /// The first range that ends above `v` (it may contain `v`).
    pub fn range_from(&self, v: u64) -> Option<Range<u64>> {
        let i = self.ranges.partition_point(|r| r.end <= v);
        self.ranges.get(i).cloned()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Range<u64>> + Clone + '_ {
        self.ranges.iter().cloned()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    #[cfg(test)]
    pub fn contains(&self, v: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= v);
        self.ranges.get(i).is_some_and(|r| r.start <= v)
    }

    /// Inserts `r`. Returns `false` (and leaves the set unchanged) if that would need more
    /// than `limit` ranges.
    pub fn insert(&mut self, r: Range<u64>) -> bool {
        self.insert_inner(r, false)
    }

    /// Inserts `r`, dropping the lowest ranges if the limit is exceeded.
    pub fn insert_evicting_lowest(&mut self, r: Range<u64>) {
        self.insert_inner(r, true);
    }

    fn insert_inner(&mut self, r: Range<u64>, evict: bool) -> bool {
        if r.start >= r.end {
            return true;
        }
        // Fast path: extends or follows the last range.
        if let Some(last) = self.ranges.back_mut() {
            if r.start >= last.start && r.start <= last.end {
                last.end = last.end.max(r.end);
                return true;
            }
        }
        // First range whose end reaches r.start (could merge), last whose start <= r.end.
        let lo = self.ranges.partition_point(|x| x.end < r.start);
        let hi = self.ranges.partition_point(|x| x.start <= r.end);
        if lo == hi {
            // No overlap: a new separate range at `lo`.
            if self.ranges.capacity() == 0 {
                // Room for one range at first, not four: most sets (an idle session's received
                // packet numbers) never hold more (issue 9).
                self.ranges.reserve_exact(1);
            }
            if self.ranges.len() >= self.limit {
                if !evict {
                    return false;
                }
                if lo == 0 {
                    return true; // lower than everything we keep: drop it
                }
                self.ranges.pop_front();
                self.ranges.insert(lo - 1, r);
                return true;
            }
            self.ranges.insert(lo, r);
            return true;
        }
        let start = r.start.min(self.ranges[lo].start);
        let end = r.end.max(self.ranges[hi - 1].end);
        self.ranges[lo] = start..end;
        self.ranges.drain(lo + 1..hi);
        true
    }

    /// Removes `r` from the set. May split a range; if the split would exceed the limit the
    /// upper part is kept and the lower part dropped (callers use this only where that is safe).
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let lo = self.ranges.partition_point(|x| x.end <= r.start);
        let mut i = lo;
        while i < self.ranges.len() && self.ranges[i].start < r.end {
            let cur = self.ranges[i].clone();
            if cur.start < r.start && cur.end > r.end {
                self.ranges[i] = r.end..cur.end;
                if self.ranges.len() < self.limit {
                    self.ranges.insert(i, cur.start..r.start);
                }
                return;
            } else if cur.start < r.start {
                self.ranges[i].end = r.start;
                i += 1;
            } else if cur.end > r.end {
                self.ranges[i].start = r.end;
                return;
            } else {
                self.ranges.remove(i);
            }
        }
    }

    /// Removes everything below `v`.
    pub fn remove_below(&mut self, v: u64) {
        while let Some(first) = self.ranges.front_mut() {
            if first.end <= v {
                self.ranges.pop_front();
            } else {
                first.start = first.start.max(v);
                break;
            }
        }
    }

    #[cfg(test)]
    /// Removes and returns up to `max_len` values from the start of the lowest range.
    pub fn pop_front_chunk(&mut self, max_len: u64) -> Option<Range<u64>> {
        let first = self.ranges.front_mut()?;
        let end = first.end.min(first.start.saturating_add(max_len));
        let chunk = first.start..end;
        first.start = end;
        if first.start >= first.end {
            self.ranges.pop_front();
        }
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &RangeSet) -> Vec<Range<u64>> {
        s.iter().collect()
    }

    #[test]
    fn a_set_of_one_range_keeps_room_for_one() {
        let mut set = RangeSet::new(8);
        set.insert(0..5);
        set.insert(5..9);
        assert_eq!(set.ranges.capacity(), 1);
        set.insert(20..30);
        assert_eq!(set.ranges.len(), 2);
        assert!(set.ranges.capacity() >= 2);
    }

    #[test]
    fn insert_merges() {
        let mut s = RangeSet::new(10);
        assert!(s.insert(10..20));
        assert!(s.insert(30..40));
        assert!(s.insert(0..5));
        assert_eq!(set(&s), vec![0..5, 10..20, 30..40]);
        assert!(s.insert(20..30));
        assert_eq!(set(&s), vec![0..5, 10..40]);
        assert!(s.insert(3..12));
        assert_eq!(set(&s), vec![0..40]);
        assert!(s.insert(40..41));
        assert_eq!(set(&s), vec![0..41]);
        assert!(s.contains(0) && s.contains(40) && !s.contains(41));
    }

    #[test]
    fn limit_is_enforced() {
        let mut s = RangeSet::new(2);
        assert!(s.insert(0..1));
        assert!(s.insert(5..6));
        assert!(!s.insert(10..11));
        assert!(s.insert(1..5), "merging is always allowed");
        assert_eq!(set(&s), vec![0..6]);
        let mut e = RangeSet::new(2);
        for i in 0..10 {
            e.insert_evicting_lowest(i * 3..i * 3 + 1);
        }
        assert_eq!(set(&e), vec![24..25, 27..28]);
    }

    #[test]
    fn remove_and_pop() {
        let mut s = RangeSet::new(10);
        s.insert(0..100);
        s.remove(10..20);
        assert_eq!(set(&s), vec![0..10, 20..100]);
        s.remove(5..25);
        assert_eq!(set(&s), vec![0..5, 25..100]);
        s.remove_below(30);
        assert_eq!(set(&s), vec![30..100]);
        assert_eq!(s.pop_front_chunk(50), Some(30..80));
        assert_eq!(s.pop_front_chunk(50), Some(80..100));
        assert_eq!(s.pop_front_chunk(50), None);
    }
}
