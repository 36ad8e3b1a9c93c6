//! Path-MTU discovery (RFC 8899 DPLPMTUD style), sans-IO: which packet size is safe now, when to
//! send a padded probe of which size, and when large packets are black-holed.
//!
//! Sizes are transport payload bytes (the session adds a fixed overhead). Three sizes bound the
//! search: `floor` (last resort, below the safe start), `base` (the safe start every session
//! begins with) and `max` (the largest the configuration, the peer and the address family
//! allow). The search probes `max` first (most paths carry it, so one round trip usually ends
//! the search), then bisects between the largest confirmed and the smallest failed size until
//! they are [`GRANULARITY`] apart. A size fails after [`MAX_PROBES`] lost probes in a row; a
//! probe only counts as lost when a packet sent after it was acknowledged at least a loss delay
//! after it was sent (the path worked, the probe did not), so a blackout costs nothing.
//!
//! Black holes (a route change lowers the MTU) show as large packets (above the fallback size)
//! lost while no newer large packet is acknowledged: the size falls back — to `base`, or from
//! `base` to `floor` — after a probe timeout that lost [`BLACK_HOLE_LOSSES`] of them (a bulk
//! flight), two probe timeouts in a row that lost any, or [`BLACK_HOLE_BURSTS`] separate
//! bursts of them (small packets getting through and acknowledged). Then the search restarts
//! at once: a false alarm (a blackout, a tail drop) costs about one round trip at the smaller
//! size. At `floor` there is nothing left to fall back to: if even that is black-holed, the
//! session ends by its idle timeout like on any dead path.

use std::time::{Duration, Instant};

/// Lost probes of one size in a row before the size counts as too large.
pub const MAX_PROBES: u8 = 3;
/// The search ends when the largest confirmed and the smallest failed size are this close.
pub const GRANULARITY: u16 = 8;
/// Large packets lost in one probe timeout (no newer large one acknowledged) that make the
/// size fall back.
pub const BLACK_HOLE_LOSSES: u16 = 4;
/// Separate bursts of large losses (no newer large packet acknowledged) that make it fall back.
pub const BLACK_HOLE_BURSTS: u16 = 3;
/// After a search completes, the next search (trying larger sizes again) starts this much later.
pub const RAISE_INTERVAL: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Probing for a larger size.
    Search,
    /// Done until `next_probe` (the raise timer).
    Complete,
}

/// The probe in flight.
#[derive(Debug, Clone, Copy)]
struct Probe {
    pn: u64,
    size: u16,
    sent: Instant,
}

/// Counters for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PmtuStats {
    /// Probes sent.
    pub probes_sent: u32,
    /// Probes counted as lost.
    pub probes_lost: u32,
    /// Falls back after black-holed large packets.
    pub black_holes: u32,
}

/// The path-MTU state of one session.
#[derive(Debug, Clone)]
pub struct Pmtud {
    floor: u16,
    base: u16,
    max: u16,
    /// The size packets use now (confirmed by a probe, or a fallback size).
    current: u16,
    /// Smallest size known to fail in this search (`max + 1` while none did).
    failed: u16,
    phase: Phase,
    /// The search sends its next probe at or after this instant.
    next_probe: Instant,
    probe: Option<Probe>,
    /// Lost probes of `probe`'s size in a row.
    probe_losses: u8,
    /// Losses of large packets with a packet number at or above this count towards a black hole.
    count_from: u64,
    /// Bursts (runs of consecutive packet numbers) of large losses counted.
    bursts: u16,
    /// The last large loss counted.
    last_lost: Option<u64>,
    /// Large losses in the current loss pass.
    pass_losses: u16,
    /// Probe timeouts in a row that lost large packets.
    suspicious_ptos: u16,
    stats: PmtuStats,
}

fn size16(size: usize) -> u16 {
    size.min(usize::from(u16::MAX - 1)) as u16
}

impl Pmtud {
    /// Starts at `base`; searches up to `max` (no search when `max <= base`); falls back at most
    /// to `floor`. The sizes are ordered (`floor <= base <= max`) by clamping.
    pub fn new(floor: usize, base: usize, max: usize, now: Instant) -> Self {
        let base = size16(base);
        let max = size16(max).max(base);
        // Without a search there is no discovery at all: no fall back either.
        let floor = if max > base {
            size16(floor).min(base)
        } else {
            base
        };
        Pmtud {
            floor,
            base,
            max,
            current: base,
            failed: max + 1,
            phase: if max > base {
                Phase::Search
            } else {
                Phase::Complete
            },
            next_probe: now,
            probe: None,
            probe_losses: 0,
            count_from: 0,
            bursts: 0,
            last_lost: None,
            pass_losses: 0,
            suspicious_ptos: 0,
            stats: PmtuStats::default(),
        }
    }

    /// Largest payload a packet may have now.
    pub fn current(&self) -> usize {
        usize::from(self.current)
    }

    pub fn stats(&self) -> PmtuStats {
        self.stats
    }

    /// The size of the probe to send now, if one is due (at most one probe is in flight).
    pub fn probe_due(&mut self, now: Instant) -> Option<usize> {
        if self.probe.is_some() || now < self.next_probe {
            return None;
        }
        if self.phase == Phase::Complete {
            if self.max <= self.current {
                self.next_probe = now + RAISE_INTERVAL;
                return None;
            }
            // The raise timer expired: look for a larger size again.
            self.phase = Phase::Search;
            self.failed = self.max + 1;
        }
        Some(usize::from(self.target()))
    }

    /// Next size to try: `max` first, then halfway between confirmed and failed.
    fn target(&self) -> u16 {
        if self.failed > self.max {
            self.max
        } else {
            self.current + (self.failed - self.current) / 2
        }
    }

    /// A probe of `size` went out as packet `pn`.
    pub fn on_probe_sent(&mut self, pn: u64, size: usize, now: Instant) {
        self.probe = Some(Probe {
            pn,
            size: size16(size),
            sent: now,
        });
        self.stats.probes_sent += 1;
    }

    /// An ACK frame acknowledged packets `lo..=hi` (called per range, before [`Self::on_acked`]).
    pub fn on_ack_range(&mut self, lo: u64, hi: u64, now: Instant) {
        let Some(probe) = self.probe else {
            return;
        };
        if (lo..=hi).contains(&probe.pn) {
            self.probe = None;
            self.probe_losses = 0;
            if probe.size > self.current && probe.size < self.failed {
                self.current = probe.size;
            }
            self.settle(now);
        }
    }

    /// Packet `pn` (not a probe) of `size` payload bytes was newly acknowledged: a large one
    /// proves large packets get through.
    pub fn on_acked(&mut self, pn: u64, size: usize) {
        if size > usize::from(self.fallback()) && pn >= self.count_from {
            self.count_from = pn + 1;
            self.clear_suspicion();
        }
    }

    fn clear_suspicion(&mut self) {
        self.bursts = 0;
        self.suspicious_ptos = 0;
        self.last_lost = None;
    }

    /// After an ACK frame whose largest acknowledged packet is `largest`: an outstanding probe
    /// below it and older than `loss_delay` (the transport's RACK time threshold) is lost.
    pub fn on_ack_frame(&mut self, largest: u64, now: Instant, loss_delay: Duration) {
        let Some(probe) = self.probe else {
            return;
        };
        if largest > probe.pn && now >= probe.sent + loss_delay {
            self.probe = None;
            self.stats.probes_lost += 1;
            self.probe_losses += 1;
            if self.probe_losses >= MAX_PROBES {
                self.probe_losses = 0;
                self.failed = self.failed.min(probe.size);
                self.settle(now);
            }
        }
    }

    /// Ends the search when nothing is left to try.
    fn settle(&mut self, now: Instant) {
        if self.current >= self.max || self.failed.saturating_sub(self.current) <= GRANULARITY {
            self.phase = Phase::Complete;
            self.next_probe = now + RAISE_INTERVAL;
        } else {
            self.next_probe = now;
        }
    }

    /// The size a black hole makes us fall back to.
    fn fallback(&self) -> u16 {
        if self.current > self.base {
            self.base
        } else {
            self.floor
        }
    }

    /// Packet `pn` of `size` payload bytes (not a probe) was declared lost. Call
    /// [`Self::on_losses`] when the loss pass is done.
    pub fn on_lost(&mut self, pn: u64, size: usize) {
        if size <= usize::from(self.fallback()) || pn < self.count_from {
            return;
        }
        if self.last_lost.is_none_or(|last| pn != last + 1) {
            self.bursts = self.bursts.saturating_add(1);
        }
        self.last_lost = Some(pn);
        self.pass_losses = self.pass_losses.saturating_add(1);
    }

    /// A loss pass (`pto`: a probe timeout that declared the whole flight lost) ended; `next_pn`
    /// is the packet number the transport sends next. Returns `true` when the size fell back:
    /// after [`BLACK_HOLE_BURSTS`] separate bursts of large losses, or a probe timeout that lost
    /// [`BLACK_HOLE_LOSSES`] large packets, or two probe timeouts in a row that lost large
    /// packets, all without a newer large packet acknowledged.
    pub fn on_losses(&mut self, next_pn: u64, pto: bool, now: Instant) -> bool {
        let losses = std::mem::take(&mut self.pass_losses);
        if pto && losses > 0 {
            self.suspicious_ptos = self.suspicious_ptos.saturating_add(1);
        }
        let black_hole = self.bursts >= BLACK_HOLE_BURSTS
            || (pto && losses >= BLACK_HOLE_LOSSES)
            || self.suspicious_ptos >= 2;
        if !black_hole || self.current <= self.floor {
            return false;
        }
        self.current = self.fallback();
        self.stats.black_holes += 1;
        // Packets already sent at the old size say nothing about the new one.
        self.count_from = next_pn;
        self.clear_suspicion();
        self.probe = None;
        self.probe_losses = 0;
        self.failed = self.max + 1;
        self.phase = Phase::Search;
        self.next_probe = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(40);
    const LOSS_DELAY: Duration = Duration::from_millis(45);

    /// Drives the search over a path that carries payloads up to `path`: each round a probe
    /// goes out, then a data packet; the ACK for the data packet (and the probe, if it fit)
    /// comes back two RTTs later. Returns the final size and the rounds it took.
    fn search(p: &mut Pmtud, path: usize, t0: Instant) -> (usize, u32) {
        let mut now = t0;
        let mut pn = 0;
        for round in 0..200 {
            let Some(size) = p.probe_due(now) else {
                return (p.current(), round);
            };
            p.on_probe_sent(pn, size, now);
            now += RTT * 2;
            if size <= path {
                p.on_ack_range(pn, pn + 1, now);
            } else {
                p.on_ack_range(pn + 1, pn + 1, now);
            }
            p.on_acked(pn + 1, 100);
            p.on_ack_frame(pn + 1, now, LOSS_DELAY);
            pn += 2;
        }
        panic!("search did not end");
    }

    /// A flight of `count` large packets from `first` lost at a probe timeout.
    fn pto_flight(p: &mut Pmtud, first: u64, count: u64, size: usize, now: Instant) -> bool {
        for pn in first..first + count {
            p.on_lost(pn, size);
        }
        p.on_losses(first + count, true, now)
    }

    #[test]
    fn probes_max_first_and_ends_in_one_round_trip() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        assert_eq!(p.current(), 1322);
        assert_eq!(search(&mut p, 1444, t0), (1444, 1));
        assert_eq!(p.stats().probes_sent, 1);
    }

    #[test]
    fn bisects_below_a_smaller_path_and_never_exceeds_it() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        let (size, rounds) = search(&mut p, 1372, t0);
        assert!(
            size <= 1372 && size + usize::from(GRANULARITY) > 1372,
            "{size}"
        );
        assert!(rounds < 30, "{rounds} rounds");
    }

    #[test]
    fn no_search_without_room_above_base() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1322, t0);
        assert_eq!(p.probe_due(t0), None);
        assert_eq!(p.current(), 1322);
        // Nothing falls back either.
        assert!(!pto_flight(&mut p, 0, 100, 1322, t0));
    }

    /// A probe whose ACK is merely late (no newer packet acknowledged a loss delay after it)
    /// is not lost; two lost probes in a row do not fail a size, the third does; lost probes
    /// never shrink the size.
    #[test]
    fn probe_loss_needs_evidence_and_three_in_a_row() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        assert_eq!(p.probe_due(t0), Some(1444));
        p.on_probe_sent(0, 1444, t0);
        // A blackout: nothing newer acknowledged; the probe stays outstanding.
        assert_eq!(p.probe_due(t0 + RTT * 10), None);
        // A newer packet acknowledged too soon after the probe: reordering, not loss.
        p.on_ack_frame(1, t0 + Duration::from_millis(10), LOSS_DELAY);
        assert_eq!(p.stats().probes_lost, 0);
        let mut now = t0 + RTT * 11;
        let mut probe_pn = 0;
        for lost in 1..=3 {
            p.on_ack_frame(probe_pn + 1, now, LOSS_DELAY);
            assert_eq!(p.stats().probes_lost, lost);
            now += RTT;
            let next = p.probe_due(now);
            if lost < 3 {
                assert_eq!(next, Some(1444), "retry of the same size");
                probe_pn += 2;
                p.on_probe_sent(probe_pn, 1444, now);
                now += RTT * 2;
            } else {
                assert_eq!(
                    next,
                    Some(1322 + (1444 - 1322) / 2),
                    "bisect after 3 losses"
                );
            }
        }
        assert_eq!(p.current(), 1322);
    }

    #[test]
    fn black_hole_falls_back_to_base_then_floor_and_searches_again() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        search(&mut p, 1444, t0);
        assert_eq!(p.current(), 1444);
        let now = t0 + Duration::from_secs(1);
        p.on_acked(100, 1444);
        // Older losses and small losses never count.
        for pn in 90..100 {
            p.on_lost(pn, 1444);
        }
        for pn in 101..110 {
            p.on_lost(pn, 1300);
        }
        assert!(!p.on_losses(200, true, now));
        // A probe timeout loses a flight of large packets (packet 200 is sent next).
        for pn in 110..114 {
            p.on_lost(pn, 1444);
        }
        assert!(p.on_losses(200, true, now));
        assert_eq!(p.current(), 1322);
        assert_eq!(p.stats().black_holes, 1);
        // The rest of that flight (sent before the fall back) does not count again.
        assert!(!pto_flight(&mut p, 114, 86, 1444, now));
        // The search restarts at once.
        assert_eq!(p.probe_due(now), Some(1444));
        p.on_probe_sent(300, 1444, now);
        // Base-size packets black-holed too: fall back to the floor.
        assert!(pto_flight(&mut p, 301, 10, 1322, now));
        assert_eq!(p.current(), 1172);
        // At the floor nothing falls further.
        assert!(!pto_flight(&mut p, 400, 20, 1172, now));
        assert_eq!(p.current(), 1172);
        let (size, _) = search(&mut p, 1250, now);
        assert!(
            size <= 1250 && size + usize::from(GRANULARITY) > 1250,
            "{size}"
        );
    }

    /// Low-rate traffic: one large packet per probe timeout, twice in a row.
    #[test]
    fn two_probe_timeouts_in_a_row_are_a_black_hole() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        search(&mut p, 1444, t0);
        assert!(!pto_flight(&mut p, 10, 1, 1444, t0));
        assert!(pto_flight(&mut p, 11, 1, 1444, t0));
        assert_eq!(p.current(), 1322);
    }

    /// Small packets acknowledged, large ones lost (RACK): three separate bursts.
    #[test]
    fn three_bursts_of_large_losses_are_a_black_hole() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        search(&mut p, 1444, t0);
        for (i, first) in [10u64, 20, 30].into_iter().enumerate() {
            for pn in first..first + 3 {
                p.on_lost(pn, 1444);
            }
            p.on_acked(first + 5, 200);
            assert_eq!(p.on_losses(100, false, t0), i == 2);
        }
    }

    /// Congestion and random loss: a newer large packet gets through between the bursts.
    #[test]
    fn a_large_ack_between_losses_resets_the_count() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        search(&mut p, 1444, t0);
        for round in 0..10u64 {
            let first = 10 + round * 10;
            for pn in first..first + 3 {
                p.on_lost(pn, 1444);
            }
            assert!(!p.on_losses(first + 10, false, t0));
            p.on_acked(first + 5, 1444);
            assert!(!pto_flight(&mut p, first + 6, 2, 1444, t0));
            p.on_acked(first + 9, 1444);
        }
        assert_eq!(p.current(), 1444);
    }

    #[test]
    fn search_repeats_after_the_raise_interval() {
        let t0 = Instant::now();
        let mut p = Pmtud::new(1172, 1322, 1444, t0);
        let (size, _) = search(&mut p, 1400, t0);
        assert!(size <= 1400);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(p.probe_due(later), None);
        let raise = later + RAISE_INTERVAL;
        assert_eq!(p.probe_due(raise), Some(1444));
    }
}
