//! ACK generation on the receiving side: which packet numbers were received, and when an ACK is
//! owed and when it is due (ACK decimation).
//!
//! The policy (documented in `docs/protocol-transport.md` §4.1; nothing of it is on the wire):
//!
//! * **Decimation.** In steady state an ACK goes out after every [`DECIMATED_THRESHOLD`]
//!   ack-eliciting packets, or when the delayed-ACK timer (`min(RTT/4, max_ack_delay)`, armed by
//!   the first unacknowledged ack-eliciting packet) fires. Fewer ACK-only packets mean fewer
//!   seals, sends, receives and opens per byte on both ends.
//! * **Quick-ack mode** — an ACK after every [`QUICK_THRESHOLD`] ack-eliciting packets — while
//!   the peer's packet numbers are below `quick_until`. It starts at [`QUICK_START_PACKETS`]: the
//!   first packets of a session are where the peer's congestion controller is in startup and
//!   grows its window per ACK (the receiver cannot see the sender's state; Chromium's QUIC uses
//!   the same "first 100 packets" rule). Every gap or reordered packet extends it to
//!   [`QUICK_AFTER_GAP`] packet numbers beyond the largest received: the peer is then in loss
//!   recovery, and prompt ACKs let its packet-threshold loss detection fire early.
//! * **Immediately** (the next `poll_transmit` sends an ACK even alone): an ack-eliciting packet
//!   that does not directly follow the largest received (a gap, or a late/reordered packet).
//!
//! The peer's windows: any packet we send while an ACK is owed carries it, so stream and session
//! window updates (MAX_DATA, MAX_STREAM_DATA), which go out as soon as they are queued, always
//! acknowledge everything received. The secure layer's token window needs no rule of its own:
//! every packet we send announces a window end at least `INITIAL_AHEAD` (64) packet numbers
//! beyond the highest we received, and we send one at least every [`DECIMATED_THRESHOLD`]
//! ack-eliciting packets, so decimation costs the peer at most that many of the packet numbers
//! it may use beyond its `PROBE_RESERVE` (checked at compile time below).

use std::ops::Range;
use std::time::{Duration, Instant};

use super::ranges::RangeSet;
use super::recovery::{MAX_ACK_DELAY, TIMER_GRANULARITY};

/// In quick-ack mode, acknowledge after this many ack-eliciting packets.
pub const QUICK_THRESHOLD: u32 = 2;
/// After quick-ack mode, acknowledge after this many ack-eliciting packets.
pub const DECIMATED_THRESHOLD: u32 = 10;
/// The peer's packet numbers below this are acknowledged in quick-ack mode (its startup).
pub const QUICK_START_PACKETS: u64 = 100;
/// A gap or a reordered packet keeps quick-ack mode for this many packet numbers beyond the
/// largest received (twice the decimation threshold; measured: with 8, goodput at 5 % random
/// loss was 2 % below the pre-decimation value over 8 seeds of the 100 Mbit/s, 50 ms sim; with
/// 20 it is level).
pub const QUICK_AFTER_GAP: u64 = 20;

// The count threshold alone never blocks the peer on our token window: an ACK goes out at
// least every DECIMATED_THRESHOLD packets, and the window end it announces is at least
// INITIAL_AHEAD beyond the largest received, more than the threshold plus the probe reserve.
// (With more packets in flight than that, the window has grown with the dense traffic; the ACK
// timer bounds the rest.)
const _: () = assert!(
    DECIMATED_THRESHOLD as u64 + crate::proto::session::PROBE_RESERVE
        < crate::proto::packet::INITIAL_AHEAD / 2
);

/// What a received packet asks of the ACK machinery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckUrgency {
    /// Not ack-eliciting: nothing is owed for it.
    None,
    /// An ACK is owed; the delayed-ACK timer must be running.
    Delayed,
    /// An ACK is owed now.
    Immediate,
}

/// The delayed-ACK timeout for a smoothed RTT: a quarter of it, between the timer granularity
/// (so an event loop never waits microseconds for it) and `max_ack_delay` (what the peer
/// assumes in its probe timeout).
pub fn ack_delay(smoothed_rtt: Duration) -> Duration {
    (smoothed_rtt / 4).clamp(TIMER_GRANULARITY, MAX_ACK_DELAY)
}

/// Received packet numbers and the ACK owed for them.
#[derive(Debug)]
pub struct AckState {
    received: RangeSet,
    /// Largest packet number received and when.
    largest: Option<(u64, Instant)>,
    /// An ack-eliciting packet arrived since the last ACK we sent.
    needed: bool,
    /// The owed ACK must go out with the next `poll_transmit`, alone if need be.
    immediate: bool,
    eliciting_since_ack: u32,
    /// Quick-ack mode holds while the peer's packet numbers are below this.
    quick_until: u64,
}

impl AckState {
    /// `ranges`: received packet-number ranges remembered (oldest dropped first).
    pub fn new(ranges: usize) -> Self {
        Self {
            received: RangeSet::new(ranges),
            largest: None,
            needed: false,
            immediate: false,
            eliciting_since_ack: 0,
            quick_until: QUICK_START_PACKETS,
        }
    }

    /// Records packet `pn` (already authenticated and applied) and says what it asks for.
    pub fn on_received(&mut self, now: Instant, pn: u64, ack_eliciting: bool) -> AckUrgency {
        let in_order = match self.largest {
            None => pn == 0,
            Some((largest, _)) => pn == largest + 1,
        };
        if self.largest.is_none_or(|(l, _)| pn > l) {
            self.largest = Some((pn, now));
        }
        self.received.insert_evicting_lowest(pn..pn + 1);
        if !ack_eliciting {
            return AckUrgency::None;
        }
        self.needed = true;
        self.eliciting_since_ack += 1;
        if !in_order {
            let largest = self.largest.map_or(pn, |(l, _)| l);
            self.quick_until = self
                .quick_until
                .max(largest.saturating_add(1 + QUICK_AFTER_GAP));
            self.immediate = true;
        } else if self.eliciting_since_ack >= self.threshold(pn) {
            self.immediate = true;
        }
        if self.immediate {
            AckUrgency::Immediate
        } else {
            AckUrgency::Delayed
        }
    }

    /// Ack-eliciting packets per ACK at packet number `pn`.
    fn threshold(&self, pn: u64) -> u32 {
        if pn < self.quick_until {
            QUICK_THRESHOLD
        } else {
            DECIMATED_THRESHOLD
        }
    }

    /// The owed ACK (if any) must go out now: the delayed-ACK timer fired.
    pub fn request_immediate(&mut self) {
        self.immediate = self.needed;
    }

    /// An ACK is owed (it rides on any packet sent).
    pub fn is_needed(&self) -> bool {
        self.needed
    }

    /// An ACK is owed now (worth a packet of its own).
    pub fn is_due(&self) -> bool {
        self.needed && self.immediate
    }

    /// Largest packet number received and when.
    pub fn largest(&self) -> Option<(u64, Instant)> {
        self.largest
    }

    /// Received ranges, highest first (as an ACK frame lists them).
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + Clone + '_ {
        self.received.iter().rev()
    }

    /// An ACK with everything received was written.
    pub fn on_ack_sent(&mut self) {
        self.needed = false;
        self.immediate = false;
        self.eliciting_since_ack = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds ack-eliciting packets `pns` and returns after which of them an ACK was due
    /// (sending it each time).
    fn acks_after(state: &mut AckState, now: Instant, pns: impl Iterator<Item = u64>) -> Vec<u64> {
        let mut acked = Vec::new();
        for pn in pns {
            state.on_received(now, pn, true);
            if state.is_due() {
                acked.push(pn);
                state.on_ack_sent();
            }
        }
        acked
    }

    #[test]
    fn quick_at_the_start_then_decimated() {
        let now = Instant::now();
        let mut s = AckState::new(64);
        let acked = acks_after(&mut s, now, 0..QUICK_START_PACKETS);
        assert_eq!(acked.len() as u64, QUICK_START_PACKETS / 2, "every 2nd");
        let acked = acks_after(&mut s, now, QUICK_START_PACKETS..QUICK_START_PACKETS + 100);
        assert_eq!(acked.len(), 10, "every 10th after the start: {acked:?}");
        assert_eq!(acked[0], QUICK_START_PACKETS + 9);
    }

    #[test]
    fn a_gap_is_acknowledged_at_once_and_restarts_quick_acks() {
        let now = Instant::now();
        let mut s = AckState::new(64);
        acks_after(&mut s, now, 0..200);
        // 200 is lost: 201 arrives after a gap.
        assert_eq!(s.on_received(now, 201, true), AckUrgency::Immediate);
        s.on_ack_sent();
        let acked = acks_after(&mut s, now, 202..202 + QUICK_AFTER_GAP);
        assert_eq!(
            acked.len() as u64,
            QUICK_AFTER_GAP / 2,
            "quick after the gap"
        );
        // A late packet (reordering) is acknowledged at once too.
        assert_eq!(s.on_received(now, 200, true), AckUrgency::Immediate);
        s.on_ack_sent();
        let largest = 201 + QUICK_AFTER_GAP;
        // Quick mode ends QUICK_AFTER_GAP beyond the largest at the reordering.
        let acked = acks_after(&mut s, now, largest + 1..largest + 41);
        let quick = acked
            .iter()
            .filter(|&&pn| pn <= largest + QUICK_AFTER_GAP)
            .count();
        assert_eq!(quick as u64, QUICK_AFTER_GAP / 2, "{acked:?}");
        assert!(acked.len() <= quick + 4, "decimated again: {acked:?}");
    }

    #[test]
    fn non_eliciting_packets_owe_nothing_and_requests_need_an_owed_ack() {
        let now = Instant::now();
        let mut s = AckState::new(64);
        for pn in 0..5 {
            assert_eq!(s.on_received(now, pn, false), AckUrgency::None);
        }
        s.request_immediate();
        assert!(!s.is_needed() && !s.is_due(), "no ACK for ACK-only packets");
        assert_eq!(s.on_received(now, 5, true), AckUrgency::Delayed);
        assert!(s.is_needed() && !s.is_due());
        s.request_immediate();
        assert!(s.is_due());
        assert_eq!(s.largest(), Some((5, now)));
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..6]);
    }

    #[test]
    fn ack_delay_is_a_quarter_rtt_within_bounds() {
        assert_eq!(
            ack_delay(Duration::from_millis(40)),
            Duration::from_millis(10)
        );
        assert_eq!(ack_delay(Duration::from_micros(100)), TIMER_GRANULARITY);
        assert_eq!(ack_delay(Duration::from_millis(300)), MAX_ACK_DELAY);
    }
}
