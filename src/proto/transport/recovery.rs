//! Loss recovery bookkeeping: the log of sent packets (a ring indexed by packet number), what
//! each carried (for retransmission on loss), RTT estimation and the probe timeout.
//!
//! Packet numbers never repeat, so every ACK gives an unambiguous RTT sample (Karn's problem
//! does not arise). Loss is declared RACK-style: a packet is lost when a packet sent at least
//! `packet_threshold` later was acknowledged (initially [`INITIAL_PACKET_THRESHOLD`], raised
//! when a packet declared lost is acknowledged after all, i.e. on observed reordering), or when
//! it is older than 9/8 of the RTT and a later packet was acknowledged. When nothing is acknowledged for a probe timeout (PTO),
//! everything in flight is declared lost and the PTO backs off exponentially.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::congestion::DeliverySnapshot;
use super::ranges::RangeSet;

/// Initial reordering threshold in packets.
pub const INITIAL_PACKET_THRESHOLD: u64 = 3;
/// Largest reordering threshold (beyond it the time threshold decides).
pub const MAX_PACKET_THRESHOLD: u64 = 256;
/// Upper bound on the ACK delay a peer may claim (and our own delayed-ACK timer).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(25);
/// Lower bound for the time threshold of loss detection.
pub const TIMER_GRANULARITY: Duration = Duration::from_millis(1);
/// Longest probe timeout after backoff.
pub const MAX_PTO: Duration = Duration::from_secs(60);

/// A retransmittable frame carried by a packet (what to do if the packet is lost or acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentFrame {
    Stream {
        id: u64,
        offset: u64,
        len: u16,
        fin: bool,
    },
    Open(u64),
    OpenOk(u64),
    Reset(u64),
    MaxStreamData(u64),
    MaxData,
    MaxStreams,
    Settings,
}

/// Retransmittable frames recorded per packet; a packet holds at most this many.
pub const MAX_FRAMES_PER_PACKET: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketState {
    Outstanding,
    Acked,
    Lost,
}

#[derive(Debug, Clone)]
pub struct SentPacket {
    pub time_sent: Instant,
    pub size: u32,
    pub ack_eliciting: bool,
    pub state: PacketState,
    pub delivery: DeliverySnapshot,
    frames: [SentFrame; MAX_FRAMES_PER_PACKET],
    frame_count: u8,
}

impl SentPacket {
    pub fn new(time_sent: Instant, delivery: DeliverySnapshot) -> Self {
        Self {
            time_sent,
            size: 0,
            ack_eliciting: false,
            state: PacketState::Outstanding,
            delivery,
            frames: [SentFrame::MaxData; MAX_FRAMES_PER_PACKET],
            frame_count: 0,
        }
    }

    pub fn frames(&self) -> &[SentFrame] {
        &self.frames[..usize::from(self.frame_count)]
    }

    pub fn has_frame_room(&self) -> bool {
        usize::from(self.frame_count) < MAX_FRAMES_PER_PACKET
    }

    /// Records a frame; the caller checked [`SentPacket::has_frame_room`].
    pub fn push_frame(&mut self, frame: SentFrame) {
        if let Some(slot) = self.frames.get_mut(usize::from(self.frame_count)) {
            *slot = frame;
            self.frame_count += 1;
        }
    }

    /// Counts against the congestion window and is tracked for loss.
    pub fn in_flight(&self) -> bool {
        self.ack_eliciting && self.state == PacketState::Outstanding
    }
}

/// Sent packets from the oldest not-yet-resolved one up to the newest, indexed by packet number.
#[derive(Debug)]
pub struct SentLog {
    base_pn: u64,
    packets: VecDeque<SentPacket>,
    /// Packet numbers at or above `base_pn` already acked or declared lost, so that ACK
    /// processing only visits packets it has not seen (ACK ranges repeat old ranges).
    resolved: RangeSet,
    /// Every packet below this number is acked or lost (loss detection starts here).
    scan_cursor: u64,
    /// When the newest packet of the last drain (the log ran empty) was sent.
    last_drain: Option<Instant>,
}

/// The log gives its buffer back when it drains and had not drained for this long: an idle
/// session (a keep-alive every few seconds) holds none, a bulk transfer (never drains) and an
/// interactive one (drains every round trip) reallocate at most once per this period.
pub const RELEASE_AFTER: Duration = Duration::from_secs(1);

impl SentLog {
    pub fn new() -> Self {
        Self {
            base_pn: 0,
            packets: VecDeque::new(),
            resolved: RangeSet::new(usize::MAX),
            scan_cursor: 0,
            last_drain: None,
        }
    }

    /// Bytes of heap the log holds (memory accounting, tests).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.packets.capacity() * std::mem::size_of::<SentPacket>()
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    #[cfg(test)]
    pub fn base_pn(&self) -> u64 {
        self.base_pn
    }

    /// Appends the packet with number `pn` (must be `base_pn + len`). A packet that elicits no
    /// ACK sent while nothing is outstanding is resolved at once (not stored).
    pub fn push(&mut self, pn: u64, packet: SentPacket) {
        if self.packets.is_empty() {
            self.base_pn = pn;
            if !packet.ack_eliciting {
                self.base_pn = pn + 1;
                self.resolved.remove_below(self.base_pn);
                self.scan_cursor = self.scan_cursor.max(self.base_pn);
                return;
            }
        }
        debug_assert_eq!(pn, self.base_pn + self.packets.len() as u64);
        self.packets.push_back(packet);
    }

    pub fn get_mut(&mut self, pn: u64) -> Option<&mut SentPacket> {
        let idx = pn.checked_sub(self.base_pn)?;
        self.packets.get_mut(usize::try_from(idx).ok()?)
    }

    /// Drops resolved packets from the front: acked ones, non-ack-eliciting ones, and lost
    /// ones sent before `lost_cutoff` (lost packets are remembered a little longer so that a
    /// late ACK for them reveals reordering).
    pub fn pop_resolved(&mut self, lost_cutoff: Option<Instant>) {
        let mut newest_popped = None;
        while let Some(p) = self.packets.front() {
            let pop = match p.state {
                PacketState::Acked => true,
                _ if !p.ack_eliciting => true,
                PacketState::Lost => lost_cutoff.is_some_and(|c| p.time_sent <= c),
                PacketState::Outstanding => false,
            };
            if !pop {
                break;
            }
            newest_popped = Some(p.time_sent);
            self.packets.pop_front();
            self.base_pn += 1;
        }
        if let (Some(sent), true) = (newest_popped, self.packets.is_empty()) {
            if self
                .last_drain
                .is_none_or(|last| sent.saturating_duration_since(last) >= RELEASE_AFTER)
            {
                self.packets = VecDeque::new();
                // Everything below `base_pn` is forgotten below anyway.
                self.resolved = RangeSet::new(usize::MAX);
            }
            self.last_drain = Some(sent);
        }
        self.resolved.remove_below(self.base_pn);
        self.scan_cursor = self.scan_cursor.max(self.base_pn);
    }

    /// Packets from the loss-scan cursor on (all earlier ones are acked or lost).
    pub fn iter_from_cursor(&mut self) -> impl Iterator<Item = (u64, &mut SentPacket)> {
        let start = self.scan_cursor.max(self.base_pn);
        let skip = ((start - self.base_pn) as usize).min(self.packets.len());
        self.packets
            .range_mut(skip..)
            .enumerate()
            .map(move |(i, p)| (start + i as u64, p))
    }

    /// Moves the loss-scan cursor forward to `pn`.
    pub fn advance_cursor(&mut self, pn: u64) {
        self.scan_cursor = self.scan_cursor.max(pn);
    }

    /// Records that `pns` were acked or declared lost.
    pub fn mark_resolved(&mut self, pns: std::ops::Range<u64>) {
        self.resolved.insert(pns);
    }

    /// Splits `lo..=hi` into the sub-ranges not yet resolved, calling `f` for each inclusive
    /// `(start, end)`; `f` is called in increasing order.
    pub fn unresolved_in(&self, lo: u64, hi: u64, mut f: impl FnMut(u64, u64)) {
        let mut p = lo.max(self.base_pn);
        let top = self.base_pn + self.packets.len() as u64;
        let hi = hi.min(top.saturating_sub(1));
        if self.packets.is_empty() {
            return;
        }
        while p <= hi {
            match self.resolved.range_from(p) {
                Some(r) if r.start <= p => p = r.end,
                Some(r) => {
                    let end = (r.start - 1).min(hi);
                    f(p, end);
                    p = end + 1;
                }
                None => {
                    f(p, hi);
                    return;
                }
            }
        }
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut SentPacket)> {
        let base = self.base_pn;
        self.packets
            .iter_mut()
            .enumerate()
            .map(move |(i, p)| (base + i as u64, p))
    }
}

impl Default for SentLog {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 9002 RTT estimator.
#[derive(Debug, Clone)]
pub struct RttEstimator {
    pub latest: Duration,
    pub smoothed: Duration,
    pub var: Duration,
    pub min: Duration,
    has_sample: bool,
}

impl RttEstimator {
    pub fn new(initial: Duration) -> Self {
        Self {
            latest: initial,
            smoothed: initial,
            var: initial / 2,
            min: initial,
            has_sample: false,
        }
    }

    pub fn update(&mut self, sample: Duration, ack_delay: Duration) {
        self.latest = sample;
        if !self.has_sample {
            self.has_sample = true;
            self.min = sample;
            self.smoothed = sample;
            self.var = sample / 2;
            return;
        }
        self.min = self.min.min(sample);
        let ack_delay = ack_delay.min(MAX_ACK_DELAY);
        let adjusted = if sample >= self.min + ack_delay {
            sample - ack_delay
        } else {
            sample
        };
        let diff = self.smoothed.abs_diff(adjusted);
        self.var = (self.var * 3 + diff) / 4;
        self.smoothed = (self.smoothed * 7 + adjusted) / 8;
    }

    /// Base probe timeout (before backoff).
    pub fn pto_base(&self) -> Duration {
        self.smoothed + (self.var * 4).max(TIMER_GRANULARITY) + MAX_ACK_DELAY
    }

    /// Time after which an unacknowledged packet older than a later acked one is lost.
    pub fn loss_delay(&self) -> Duration {
        (self.latest.max(self.smoothed) * 9 / 8).max(TIMER_GRANULARITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_estimator_follows_rfc9002() {
        let mut r = RttEstimator::new(Duration::from_millis(100));
        r.update(Duration::from_millis(50), Duration::ZERO);
        assert_eq!(r.smoothed, Duration::from_millis(50));
        assert_eq!(r.var, Duration::from_millis(25));
        r.update(Duration::from_millis(90), Duration::from_millis(10));
        // adjusted 80: var = (75 + 30)/4 = 26.25, srtt = (350 + 80)/8 = 53.75
        assert_eq!(r.smoothed, Duration::from_micros(53_750));
        assert_eq!(r.var, Duration::from_micros(26_250));
        assert_eq!(r.min, Duration::from_millis(50));
    }

    fn eliciting(t: Instant) -> SentPacket {
        let mut p = SentPacket::new(t, DeliverySnapshot::new(t));
        p.ack_eliciting = true;
        p
    }

    #[test]
    fn an_idle_log_gives_its_buffer_back_and_a_busy_one_keeps_it() {
        let t = Instant::now();
        let mut log = SentLog::new();
        // The first drain releases (nothing drained before).
        log.push(0, eliciting(t));
        assert!(log.heap_bytes() > 0);
        log.get_mut(0).unwrap().state = PacketState::Acked;
        log.pop_resolved(None);
        assert_eq!(log.heap_bytes(), 0);
        // Interactive: drains 50 ms apart keep the buffer (no allocation per round trip).
        let mut at = t;
        for pn in 1..10 {
            at += Duration::from_millis(50);
            log.push(pn, eliciting(at));
            log.get_mut(pn).unwrap().state = PacketState::Acked;
            log.pop_resolved(None);
            if pn > 1 {
                assert!(log.heap_bytes() > 0, "released at pn {pn}");
            }
        }
        // A keep-alive after a quiet period: released once acknowledged.
        at += Duration::from_secs(15);
        log.push(10, eliciting(at));
        log.get_mut(10).unwrap().state = PacketState::Acked;
        log.pop_resolved(None);
        assert_eq!(log.heap_bytes(), 0);
        // An ACK-only packet while nothing is outstanding is not stored at all.
        log.push(11, SentPacket::new(at, DeliverySnapshot::new(at)));
        assert_eq!((log.len(), log.heap_bytes()), (0, 0));
        log.push(12, eliciting(at));
        assert!(log.get_mut(12).is_some() && log.get_mut(11).is_none());
    }

    #[test]
    fn sent_log_indexes_by_pn_and_pops_resolved() {
        let t = Instant::now();
        let snap = DeliverySnapshot::new(t);
        let mut log = SentLog::new();
        for pn in 5..10 {
            let mut p = SentPacket::new(t, snap);
            p.ack_eliciting = true;
            log.push(pn, p);
        }
        assert!(log.get_mut(4).is_none() && log.get_mut(10).is_none());
        log.get_mut(6).unwrap().state = PacketState::Acked;
        log.pop_resolved(None);
        assert_eq!(log.base_pn(), 5);
        log.get_mut(5).unwrap().state = PacketState::Lost;
        log.pop_resolved(None);
        assert_eq!(
            log.base_pn(),
            5,
            "lost packets are remembered until the cutoff"
        );
        log.pop_resolved(Some(t));
        assert_eq!(log.base_pn(), 7);
        assert_eq!(log.len(), 3);
    }
}
