//! Fixed-timeout deadlines without scans: every key expires the same time after it was pushed, so
//! a FIFO is already in deadline order and the next deadline is its front (O(1) per wake-up
//! instead of a pass over every connection).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Keys that each expire a fixed time after they were pushed, oldest first: the client's requests
/// waiting for a session and opens waiting for an answer, the server's outbound connects.
/// Pushes come with a non-decreasing `now`, so the front is always the next to expire.
#[derive(Debug)]
pub struct TimeoutQueue<K> {
    timeout: Duration,
    entries: VecDeque<(K, Instant)>,
}

impl<K: Copy + PartialEq> TimeoutQueue<K> {
    pub fn new(timeout: Duration) -> Self {
        TimeoutQueue {
            timeout,
            entries: VecDeque::new(),
        }
    }

    /// Adds `key` (expiring at `now + timeout`) unless it is already queued (it keeps its age).
    pub fn push(&mut self, key: K, now: Instant) {
        if !self.contains(key) {
            self.entries.push_back((key, now + self.timeout));
        }
    }

    /// Adds `key` without looking for it first (O(1)): for keys that are unique by construction
    /// (e.g. a resolver ticket naming one incarnation of an owner).
    pub fn push_new(&mut self, key: K, now: Instant) {
        self.entries.push_back((key, now + self.timeout));
    }

    pub fn contains(&self, key: K) -> bool {
        self.entries.iter().any(|(k, _)| *k == key)
    }

    /// Removes `key`; returns whether it was queued.
    pub fn remove(&mut self, key: K) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| *k != key);
        self.entries.len() != before
    }

    /// The queued keys, oldest first.
    pub fn keys(&self) -> Vec<K> {
        self.entries.iter().map(|(k, _)| *k).collect()
    }

    /// Removes and returns every key.
    pub fn take_all(&mut self) -> Vec<K> {
        self.entries.drain(..).map(|(k, _)| k).collect()
    }

    /// When the oldest key expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.front().map(|(_, at)| *at)
    }

    /// Removes and returns the oldest key if it has expired at `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<K> {
        match self.entries.front() {
            Some((_, at)) if now >= *at => self.entries.pop_front().map(|(k, _)| k),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn timeout_queue_expires_oldest_first_and_keeps_age_on_repush() {
        let t0 = Instant::now();
        let mut q = TimeoutQueue::new(Duration::from_secs(15));
        assert_eq!(q.next_deadline(), None);
        q.push(1usize, t0);
        q.push(2, t0 + secs(1.0));
        q.push(1, t0 + secs(2.0)); // already waiting: keeps its age
        assert_eq!(q.keys(), [1, 2]);
        assert_eq!(q.next_deadline(), Some(t0 + secs(15.0)));
        assert_eq!(q.pop_expired(t0 + secs(14.9)), None);
        assert_eq!(q.pop_expired(t0 + secs(15.0)), Some(1));
        assert_eq!(q.pop_expired(t0 + secs(15.0)), None);
        assert_eq!(q.next_deadline(), Some(t0 + secs(16.0)));
        assert!(q.remove(2));
        assert!(!q.remove(2));
        assert_eq!(q.next_deadline(), None);
        q.push(3, t0);
        q.push(4, t0);
        assert_eq!(q.take_all(), [3, 4]);
        assert!(!q.contains(3));
    }
}
