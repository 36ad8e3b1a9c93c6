//! The small pure types behind the server's TCP carrier connections (docs/PROTOCOL.md §7.2):
//! the deadline heap, the oldest-first bound on unauthenticated
//! connections and fallback splices, their slice of the fd budget, the not-OSTP reasons, the quiet time after which a partial
//! hello is given up, and what a stranger gets (the splice's
//! byte mover is [`super::splice`]). The loop (`server_loop/carrier.rs`) owns the
//! sockets and only moves bytes and dispatches.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::proto::carrier::gate::NotOstp;
use crate::proto::rng::Drbg;

/// A connection whose first bytes are fewer than the gate needs and then stop for a time drawn
/// uniformly from this range (milliseconds) is not OSTP (§7.2): a prober that sends `\r\n` or a
/// short partial request reaches the fallback about as fast as a website would see it, not at
/// the hello deadline. A real client writes its whole hello at once; its tail is late only
/// after a lost segment, which TCP resends well within the range.
pub const QUIET_MS: std::ops::RangeInclusive<u64> = 1_000..=2_000;

/// When an undecided connection whose last bytes arrived at `last_bytes` is given up (see
/// [`QUIET_MS`]).
pub fn quiet_deadline(last_bytes: Instant, rng: &mut Drbg) -> Instant {
    let (lo, hi) = (*QUIET_MS.start(), *QUIET_MS.end());
    let span = u32::try_from(hi - lo).unwrap_or(u32::MAX);
    last_bytes + Duration::from_millis(lo + u64::from(rng.up_to(span)))
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

/// The TCP connections' slice of the process's fd budget: accepted connections and fallback
/// sockets hold at most `cap` fds together, so they never take the fds of outbound streams.
#[derive(Debug)]
pub struct FdSlice {
    cap: usize,
    used: usize,
}

impl FdSlice {
    pub fn new(cap: usize) -> Self {
        FdSlice { cap, used: 0 }
    }

    /// Whether one more fd fits.
    pub fn has_room(&self) -> bool {
        self.used < self.cap
    }

    /// Takes one fd if it fits.
    pub fn take(&mut self) -> bool {
        let room = self.has_room();
        if room {
            self.used += 1;
        }
        room
    }

    /// `n` fds were closed.
    pub fn give(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
    }

    pub fn used(&self) -> usize {
        self.used
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_deadlines_are_random_within_the_range() {
        let t0 = Instant::now();
        let mut rng = Drbg::new([7; 32]);
        let waits: Vec<u64> = (0..200)
            .map(|_| (quiet_deadline(t0, &mut rng) - t0).as_millis() as u64)
            .collect();
        assert!(waits.iter().all(|w| QUIET_MS.contains(w)), "{waits:?}");
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(max - min > 500, "not spread: {min}..{max}");
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
    fn the_fd_slice_never_hands_out_more_than_its_cap() {
        let mut fds = FdSlice::new(2);
        assert!(fds.take() && fds.take());
        assert!(!fds.has_room() && !fds.take());
        assert_eq!(fds.used(), 2);
        fds.give(1);
        assert!(fds.take());
        fds.give(5);
        assert_eq!(fds.used(), 0, "never below zero");
        assert!(!FdSlice::new(0).take());
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
