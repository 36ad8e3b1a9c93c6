//! Packet pacing: spreads transmissions at the congestion controller's pacing rate, allowing a
//! small burst after idle periods. Integer arithmetic only (routers may lack an FPU).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Pacer {
    next_send: Instant,
    burst: Duration,
}

impl Pacer {
    pub fn new(now: Instant, burst: Duration) -> Self {
        Self {
            next_send: now,
            burst,
        }
    }

    /// Earliest instant the next packet may leave.
    pub fn next_send_time(&self) -> Instant {
        self.next_send
    }

    pub fn can_send(&self, now: Instant) -> bool {
        self.next_send <= now
    }

    /// Accounts a packet of `bytes` sent at `now` with `rate` bytes per second.
    pub fn on_sent(&mut self, now: Instant, bytes: usize, rate: u64) {
        let rate = rate.max(1);
        let interval_ns =
            (bytes as u128 * 1_000_000_000 / u128::from(rate)).min(u128::from(u32::MAX));
        let floor = now.checked_sub(self.burst).unwrap_or(now);
        let base = self.next_send.max(floor);
        self.next_send = base + Duration::from_nanos(interval_ns as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_at_rate_with_burst_after_idle() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Pacer::new(t0, Duration::from_millis(2));
        // 1 MB/s: 1000 bytes per millisecond. Idle start allows a 2 ms burst.
        let mut sent = 0;
        while p.can_send(t0) {
            p.on_sent(t0, 1000, 1_000_000);
            sent += 1;
        }
        assert_eq!(sent, 1, "no credit accumulated before t0");
        let t1 = t0 + Duration::from_millis(10);
        let mut burst = 0;
        while p.can_send(t1) {
            p.on_sent(t1, 1000, 1_000_000);
            burst += 1;
        }
        assert_eq!(burst, 3, "2 ms of burst + the packet due now");
        assert_eq!(p.next_send_time(), t1 + Duration::from_millis(1));
    }
}
