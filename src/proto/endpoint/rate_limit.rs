//! The handshake token bucket: hellos that reach authentication are limited to a rate and a burst.

use std::time::Instant;

/// Token bucket refilled at `rate` tokens per second up to `burst` tokens; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    /// Fill level in thousandths of a token.
    millis: u64,
    at: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate,
            burst,
            millis: u64::from(burst) * 1000,
            at: None,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let cap = u64::from(self.burst) * 1000;
        if let Some(at) = self.at {
            let elapsed_ms = now.saturating_duration_since(at).as_millis() as u64;
            let refill = elapsed_ms.saturating_mul(u64::from(self.rate));
            self.millis = self.millis.saturating_add(refill).min(cap);
        }
        self.at = Some(now);
        if self.millis >= 1000 {
            self.millis -= 1000;
            true
        } else {
            false
        }
    }
}
