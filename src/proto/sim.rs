//! Deterministic simulated network for protocol tests and benchmarks.
//!
//! Owns: a seeded RNG ([`SimRng`]), a one-directional [`Link`] (bottleneck rate with a drop-tail
//! queue, propagation delay, jitter, random loss, reordering, duplication, MTU) and a two-way
//! [`SimNetwork`]. Time is virtual: callers pass `now` and advance it to
//! [`SimNetwork::next_event_time`]; nothing here reads the clock, sleeps or spawns threads, so a
//! run with the same seed and the same inputs is bit-for-bit reproducible.
//!
//! Datagram buffers are recycled through a small pool so that long benchmark runs do not
//! allocate per packet once warmed up.
#![doc(hidden)]

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Small, fast, seedable PRNG (SplitMix64). Not cryptographic — for simulation only.
#[derive(Debug, Clone)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `true` with probability `p` (`p <= 0` never, `p >= 1` always).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }

    /// Uniform integer in `[0, bound)`; `0` when `bound == 0`.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Uniform duration in `[0, max]`.
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(self.below(nanos.saturating_add(1)))
    }
}

/// Behaviour of one direction of a simulated path.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// One-way propagation delay added to every datagram.
    pub delay: Duration,
    /// Extra uniform random delay in `[0, jitter]` per datagram (causes mild reordering).
    pub jitter: Duration,
    /// Probability that a datagram is dropped (random, non-congestive loss).
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_delay` (strong reordering).
    pub reorder: f64,
    /// Extra delay applied to reordered datagrams.
    pub reorder_delay: Duration,
    /// Bottleneck rate in bits per second; `None` = infinitely fast.
    pub rate_bps: Option<u64>,
    /// Bottleneck queue size in bytes (drop-tail); only meaningful with `rate_bps`.
    pub queue_bytes: usize,
    /// Datagrams larger than this are dropped.
    pub mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            rate_bps: None,
            queue_bytes: 256 * 1024,
            mtu: 1280,
        }
    }
}

impl LinkConfig {
    /// A link with the given one-way delay and random loss probability, otherwise default.
    pub fn lossy(delay: Duration, loss: f64) -> Self {
        Self {
            delay,
            loss,
            ..Self::default()
        }
    }
}

/// Counters kept by a [`Link`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    pub sent_bytes: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    pub dropped_random: u64,
    pub dropped_queue: u64,
    pub dropped_mtu: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

#[derive(Debug)]
struct InTransit {
    deliver_at: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for InTransit {
    fn eq(&self, other: &Self) -> bool {
        self.deliver_at == other.deliver_at && self.seq == other.seq
    }
}
impl Eq for InTransit {}
impl PartialOrd for InTransit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InTransit {
    // Reversed: BinaryHeap is a max-heap, we want the earliest delivery first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deliver_at
            .cmp(&self.deliver_at)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

const POOL_LIMIT: usize = 4096;

/// One direction of a simulated path.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    rng: SimRng,
    in_transit: BinaryHeap<InTransit>,
    /// Instant at which the bottleneck finishes serialising everything queued so far.
    busy_until: Instant,
    seq: u64,
    pool: Vec<Vec<u8>>,
    stats: LinkStats,
}

impl Link {
    pub fn new(config: LinkConfig, seed: u64, start: Instant) -> Self {
        Self {
            config,
            rng: SimRng::new(seed),
            in_transit: BinaryHeap::new(),
            busy_until: start,
            seq: 0,
            pool: Vec::new(),
            stats: LinkStats::default(),
        }
    }

    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Changes the link behaviour for datagrams sent from now on.
    pub fn set_config(&mut self, config: LinkConfig) {
        self.config = config;
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Number of datagrams currently travelling on the link.
    pub fn in_transit(&self) -> usize {
        self.in_transit.len()
    }

    fn take_buffer(&mut self, data: &[u8]) -> Vec<u8> {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        buf
    }

    /// Returns a delivered buffer to the pool (optional; avoids allocations in long runs).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL_LIMIT {
            self.pool.push(buf);
        }
    }

    /// Offers a datagram to the link at time `now`. Returns `false` if it was dropped
    /// (random loss, full bottleneck queue or larger than the MTU).
    pub fn send(&mut self, now: Instant, datagram: &[u8]) -> bool {
        self.stats.sent += 1;
        self.stats.sent_bytes += datagram.len() as u64;
        if datagram.len() > self.config.mtu {
            self.stats.dropped_mtu += 1;
            return false;
        }
        if self.rng.chance(self.config.loss) {
            self.stats.dropped_random += 1;
            return false;
        }
        // Bottleneck: serialise after whatever is already queued; drop-tail when the queue is full.
        let departs = match self.config.rate_bps {
            Some(rate) if rate > 0 => {
                let start = self.busy_until.max(now);
                let backlog_ns = start.duration_since(now).as_nanos();
                let backlog_bytes = backlog_ns * u128::from(rate) / 8 / 1_000_000_000;
                if backlog_bytes + datagram.len() as u128 > self.config.queue_bytes as u128 {
                    self.stats.dropped_queue += 1;
                    return false;
                }
                let tx_ns = (datagram.len() as u128 * 8 * 1_000_000_000) / u128::from(rate);
                self.busy_until = start + Duration::from_nanos(tx_ns as u64);
                self.busy_until
            }
            _ => now,
        };
        let copies = if self.rng.chance(self.config.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut deliver_at = departs + self.config.delay;
            if !self.config.jitter.is_zero() {
                deliver_at += self.rng.duration_up_to(self.config.jitter);
            }
            if self.rng.chance(self.config.reorder) {
                self.stats.reordered += 1;
                deliver_at += self.config.reorder_delay;
            }
            let data = self.take_buffer(datagram);
            self.seq += 1;
            self.in_transit.push(InTransit {
                deliver_at,
                seq: self.seq,
                data,
            });
        }
        true
    }

    /// Earliest instant at which a datagram becomes deliverable.
    pub fn next_event_time(&self) -> Option<Instant> {
        self.in_transit.peek().map(|p| p.deliver_at)
    }

    /// Takes the next datagram whose delivery time is `<= now`.
    pub fn recv(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.in_transit.peek()?.deliver_at > now {
            return None;
        }
        let packet = self.in_transit.pop()?;
        self.stats.delivered += 1;
        self.stats.delivered_bytes += packet.data.len() as u64;
        Some(packet.data)
    }

    /// Like [`Link::recv`] but copies into `buf` and recycles the internal buffer.
    /// Datagrams longer than `buf` are truncated (as a real socket would).
    pub fn recv_into(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let data = self.recv(now)?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        self.recycle(data);
        Some(n)
    }
}

/// Which endpoint of a [`SimNetwork`] a datagram comes from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Conventionally the client.
    A,
    /// Conventionally the server.
    B,
}

/// A two-way path: `a_to_b` and `b_to_a` links with independent configs and RNG streams.
#[derive(Debug)]
pub struct SimNetwork {
    pub a_to_b: Link,
    pub b_to_a: Link,
}

impl SimNetwork {
    /// Symmetric path: both directions use `config`.
    pub fn new(config: LinkConfig, seed: u64, start: Instant) -> Self {
        Self::asymmetric(config.clone(), config, seed, start)
    }

    pub fn asymmetric(a_to_b: LinkConfig, b_to_a: LinkConfig, seed: u64, start: Instant) -> Self {
        let mut seeder = SimRng::new(seed);
        Self {
            a_to_b: Link::new(a_to_b, seeder.next_u64(), start),
            b_to_a: Link::new(b_to_a, seeder.next_u64(), start),
        }
    }

    /// Sends a datagram from `from` towards the other endpoint.
    pub fn send(&mut self, now: Instant, from: Endpoint, datagram: &[u8]) -> bool {
        match from {
            Endpoint::A => self.a_to_b.send(now, datagram),
            Endpoint::B => self.b_to_a.send(now, datagram),
        }
    }

    /// Receives the next datagram due at `now` for endpoint `to`.
    pub fn recv(&mut self, now: Instant, to: Endpoint) -> Option<Vec<u8>> {
        match to {
            Endpoint::A => self.b_to_a.recv(now),
            Endpoint::B => self.a_to_b.recv(now),
        }
    }

    /// Copying variant of [`SimNetwork::recv`] that recycles buffers.
    pub fn recv_into(&mut self, now: Instant, to: Endpoint, buf: &mut [u8]) -> Option<usize> {
        match to {
            Endpoint::A => self.b_to_a.recv_into(now, buf),
            Endpoint::B => self.a_to_b.recv_into(now, buf),
        }
    }

    /// Earliest delivery time over both directions.
    pub fn next_event_time(&self) -> Option<Instant> {
        match (self.a_to_b.next_event_time(), self.b_to_a.next_event_time()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Returns the earliest of a set of optional deadlines.
pub fn earliest(times: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    times.into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let hits = (0..10_000).filter(|_| a.chance(0.1)).count();
        assert!((800..1200).contains(&hits), "hits {hits}");
    }

    #[test]
    fn delay_and_order_without_impairments() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkConfig::default(), 1, t0);
        for i in 0..10u8 {
            assert!(link.send(t0, &[i; 100]));
        }
        assert_eq!(link.recv(t0), None);
        let due = link.next_event_time().unwrap();
        assert_eq!(due, t0 + Duration::from_millis(10));
        for i in 0..10u8 {
            assert_eq!(link.recv(due).unwrap(), vec![i; 100]);
        }
        assert_eq!(link.next_event_time(), None);
    }

    #[test]
    fn bottleneck_serialises_and_drops_tail() {
        let t0 = Instant::now();
        let config = LinkConfig {
            delay: Duration::ZERO,
            rate_bps: Some(8_000_000), // 1 byte per microsecond
            queue_bytes: 3000,
            ..LinkConfig::default()
        };
        let mut link = Link::new(config, 1, t0);
        assert!(link.send(t0, &[0; 1000]));
        assert!(link.send(t0, &[0; 1000]));
        assert!(link.send(t0, &[0; 1000]));
        assert!(!link.send(t0, &[0; 1000]), "queue full");
        assert_eq!(link.stats().dropped_queue, 1);
        assert_eq!(
            link.next_event_time(),
            Some(t0 + Duration::from_micros(1000))
        );
        let last = t0 + Duration::from_micros(3000);
        let mut n = 0;
        while link.recv(last).is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn loss_mtu_and_duplication_are_counted() {
        let t0 = Instant::now();
        let config = LinkConfig {
            loss: 0.5,
            duplicate: 0.5,
            ..LinkConfig::default()
        };
        let mut link = Link::new(config, 3, t0);
        assert!(!link.send(t0, &[0; 2000]));
        assert_eq!(link.stats().dropped_mtu, 1);
        for _ in 0..1000 {
            link.send(t0, &[1; 10]);
        }
        let s = link.stats().clone();
        assert!((400..600).contains(&s.dropped_random), "{s:?}");
        assert!(s.duplicated > 100);
        assert_eq!(
            link.in_transit() as u64,
            1000 - s.dropped_random + s.duplicated
        );
    }
}
