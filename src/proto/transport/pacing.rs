//! Packet pacing: spreads transmissions at the congestion controller's pacing rate in bursts,
//! so that an event loop wakes once per burst, never microseconds after the last send.
//! Integer arithmetic only (routers may lack an FPU).
//!
//! A token bucket kept as a time: the credit at `now` is `now - next_send`, capped at the burst
//! capacity (quinn's rule: at least `min_burst` of sending at the pacing rate, and at least
//! [`MIN_BURST_PACKETS`] full packets). A packet may leave while the credit is not negative.
//! Once the credit is spent, the next wake-up is when half the capacity has refilled (at least
//! `min_burst / 2` later): a loop that wakes up to a millisecond late still loses no credit, and
//! each wake-up sends a burst instead of a single packet.

use std::time::{Duration, Instant};

/// The burst capacity holds at least this many full packets (quinn's minimum).
pub const MIN_BURST_PACKETS: u64 = 10;
/// The burst capacity never exceeds this (at very low rates: bounds the wake-up interval).
pub const MAX_BURST: Duration = Duration::from_millis(25);

#[derive(Debug, Clone)]
pub struct Pacer {
    /// The instant at which the credit is zero.
    next_send: Instant,
    /// Shortest burst capacity, in sending time.
    min_burst: Duration,
    /// Full packet size in bytes.
    mss: u64,
    /// Current burst capacity, in sending time at the current rate.
    capacity: Duration,
}

impl Pacer {
    /// A pacer with a full bucket at `now` (a session's first packets go out at once).
    pub fn new(now: Instant, min_burst: Duration, mss: usize, rate: u64) -> Self {
        let mut pacer = Self {
            next_send: now,
            min_burst,
            mss: mss as u64,
            capacity: min_burst,
        };
        pacer.capacity = pacer.capacity_at(rate);
        pacer.next_send = now.checked_sub(pacer.capacity).unwrap_or(now);
        pacer
    }

    fn capacity_at(&self, rate: u64) -> Duration {
        let packets = nanos_for(self.mss * MIN_BURST_PACKETS, rate);
        self.min_burst
            .max(packets)
            .min(MAX_BURST.max(self.min_burst))
    }

    /// Whether a packet may leave at `now`.
    pub fn can_send(&self, now: Instant) -> bool {
        self.next_send <= now
    }

    /// When to come back after [`Pacer::can_send`] said no: half the capacity refilled.
    pub fn wake_time(&self) -> Instant {
        self.next_send + self.capacity / 2
    }

    /// Accounts a packet of `bytes` sent at `now` with `rate` bytes per second.
    pub fn on_sent(&mut self, now: Instant, bytes: usize, rate: u64) {
        self.capacity = self.capacity_at(rate);
        let floor = now.checked_sub(self.capacity).unwrap_or(now);
        let base = self.next_send.max(floor);
        self.next_send = base + nanos_for(bytes as u64, rate);
    }
}

/// Time to send `bytes` at `rate` bytes per second (saturating at about 4 s).
fn nanos_for(bytes: u64, rate: u64) -> Duration {
    let ns = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(ns.min(u128::from(u32::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends full packets while the pacer allows at `now`; returns how many.
    fn burst(p: &mut Pacer, now: Instant, rate: u64) -> u32 {
        let mut sent = 0;
        while p.can_send(now) {
            p.on_sent(now, 1000, rate);
            sent += 1;
        }
        sent
    }

    #[test]
    fn starts_full_and_refills_at_the_rate() {
        let t0 = Instant::now() + Duration::from_secs(1);
        // 1 MB/s: 1000 bytes per millisecond; capacity max(2 ms, 10 packets) = 10 ms.
        let rate = 1_000_000;
        let mut p = Pacer::new(t0, Duration::from_millis(2), 1000, rate);
        assert_eq!(
            burst(&mut p, t0, rate),
            11,
            "a full bucket: 10 ms + the packet due now"
        );
        // The wake-up is half a capacity away, and then half a capacity of packets go.
        let wake = p.wake_time();
        assert_eq!(wake, t0 + Duration::from_millis(6));
        assert_eq!(burst(&mut p, wake, rate), 6);
        // Long idle: the credit is capped at the capacity.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(burst(&mut p, later, rate), 11);
    }

    /// At a high rate the capacity is `min_burst`; the loop wakes every `min_burst / 2` and
    /// sends that many packets, so the average rate is kept without per-packet wake-ups.
    #[test]
    fn high_rates_wake_once_per_half_burst_at_the_full_rate() {
        let t0 = Instant::now() + Duration::from_secs(1);
        // 100 MB/s: 10 µs per 1000-byte packet; capacity 2 ms = 200 packets.
        let rate = 100_000_000;
        let mut p = Pacer::new(t0, Duration::from_millis(2), 1000, rate);
        let mut now = t0;
        let mut sent = burst(&mut p, now, rate);
        assert_eq!(sent, 201);
        for _ in 0..1000 {
            let wake = p.wake_time();
            assert!(
                wake >= now + Duration::from_millis(1),
                "wake-up at least 1 ms away"
            );
            // Waking up to a millisecond late loses nothing.
            now = wake + Duration::from_micros(700);
            sent += burst(&mut p, now, rate);
        }
        let elapsed = now - t0;
        let expected = 201 + elapsed.as_micros() as u32 / 10;
        assert!(
            sent.abs_diff(expected) <= 1,
            "sent {sent}, expected {expected}"
        );
    }

    #[test]
    fn capacity_is_bounded_at_very_low_rates() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let p = Pacer::new(t0, Duration::from_millis(2), 1200, 1);
        assert_eq!(p.wake_time(), t0 - MAX_BURST + MAX_BURST / 2);
    }
}
