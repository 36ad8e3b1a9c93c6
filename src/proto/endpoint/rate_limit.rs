//! The handshake token buckets: hellos that reach authentication are limited to a rate and a
//! burst, per user (tag owner) and for the whole server.

use std::time::Instant;

/// Units of fill level per token: the level counts token-nanoseconds, so a refill of
/// `elapsed_ns × rate` units is exact for any arrival spacing (nothing is rounded away).
const UNITS_PER_TOKEN: u64 = 1_000_000_000;

/// Token bucket refilled at `rate` tokens per second up to `burst` tokens; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    level: BucketLevel,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate,
            burst,
            level: BucketLevel::full(burst),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.level.take(now, self.rate, self.burst)
    }
}

/// The fill level of a token bucket whose rate and depth are kept elsewhere: one per user, all
/// sharing the endpoint's per-user settings (24 bytes each).
#[derive(Debug, Clone)]
pub struct BucketLevel {
    /// Fill level in [`UNITS_PER_TOKEN`]ths of a token.
    level: u64,
    at: Option<Instant>,
}

impl BucketLevel {
    /// A full bucket of depth `burst`.
    pub fn full(burst: u32) -> Self {
        BucketLevel {
            level: u64::from(burst).saturating_mul(UNITS_PER_TOKEN),
            at: None,
        }
    }

    /// Refills at `rate` tokens per second up to `burst`, then takes one token if there is one.
    pub fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        let cap = u64::from(burst).saturating_mul(UNITS_PER_TOKEN);
        if let Some(at) = self.at {
            let elapsed_ns =
                u64::try_from(now.saturating_duration_since(at).as_nanos()).unwrap_or(u64::MAX);
            let refill = elapsed_ns.saturating_mul(u64::from(rate));
            self.level = self.level.saturating_add(refill).min(cap);
        }
        // Never move the reference point backwards (a clock that steps back refills nothing).
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
        if self.level >= UNITS_PER_TOKEN {
            self.level -= UNITS_PER_TOKEN;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Takes `count` tokens `gap` apart; returns how many were granted.
    fn granted(bucket: &mut TokenBucket, start: Instant, count: u32, gap: Duration) -> u32 {
        (0..count).filter(|&i| bucket.take(start + gap * i)).count() as u32
    }

    #[test]
    fn starts_full_then_refuses() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(200, 400);
        assert_eq!(granted(&mut bucket, now, 1000, Duration::ZERO), 400);
    }

    #[test]
    fn sub_millisecond_arrivals_still_refill() {
        // 10,000 hellos 0.5 ms apart (5 s): the burst of 400, then 200/s for 5 s.
        let now = Instant::now();
        let mut bucket = TokenBucket::new(200, 400);
        let got = granted(&mut bucket, now, 10_000, Duration::from_micros(500));
        assert!((1398..=1401).contains(&got), "granted {got}");
    }

    #[test]
    fn fractions_of_a_millisecond_are_kept() {
        // 100 tokens/s asked every 1.5 ms for 1.5 s: the burst of 2, then 150 (not 100, which
        // rounding each gap down to 1 ms gives).
        let now = Instant::now();
        let mut bucket = TokenBucket::new(100, 2);
        let got = granted(&mut bucket, now, 1001, Duration::from_micros(1500));
        assert!((151..=152).contains(&got), "granted {got}");
    }

    #[test]
    fn refill_stops_at_the_burst_and_huge_gaps_do_not_overflow() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(u32::MAX, u32::MAX);
        assert!(bucket.take(now));
        let later = now + Duration::from_secs(10 * 365 * 86_400);
        let mut bucket = TokenBucket::new(200, 5);
        assert!(bucket.take(now));
        assert_eq!(granted(&mut bucket, later, 10, Duration::ZERO), 5);
        // A clock that goes backwards refills nothing and does not panic.
        assert!(!bucket.take(now));
    }

    #[test]
    fn a_bucket_level_refills_by_the_rate_it_is_given() {
        let now = Instant::now();
        let mut level = BucketLevel::full(2);
        assert!(level.take(now, 10, 2));
        assert!(level.take(now, 10, 2));
        assert!(!level.take(now, 10, 2));
        // 10/s: one token after 100 ms, not before.
        assert!(!level.take(now + Duration::from_millis(99), 10, 2));
        assert!(level.take(now + Duration::from_millis(100), 10, 2));
    }
}
