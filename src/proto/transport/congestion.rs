//! Congestion control: delivery-rate estimation and a BBR(v1)-style model-based controller.
//!
//! The controller estimates the bottleneck bandwidth (windowed max of delivery-rate samples over
//! 10 round trips) and the minimum RTT (windowed min over 10 s), and derives a pacing rate
//! (`gain × bandwidth`) and a congestion window (`gain × bandwidth × min_rtt`). Random packet
//! loss does not reduce either estimate directly, so throughput does not collapse on lossy
//! paths the way loss-based controllers (NewReno, CUBIC) do. All arithmetic is integer.

use std::time::{Duration, Instant};

/// Gains are fixed-point with this denominator.
const GAIN_UNIT: u64 = 1000;
/// 2/ln(2): startup doubles the sending rate every round trip.
const HIGH_GAIN: u64 = 2885;
const DRAIN_GAIN: u64 = GAIN_UNIT * GAIN_UNIT / HIGH_GAIN;
const PROBE_BW_CWND_GAIN: u64 = 2000;
const PROBE_BW_GAINS: [u64; 8] = [1250, 750, 1000, 1000, 1000, 1000, 1000, 1000];
/// Bandwidth filter window, in round trips.
const BW_WINDOW_ROUNDS: u64 = 10;
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
/// Minimum congestion window, in packets.
const MIN_CWND_PACKETS: u64 = 4;
/// Packets added to the window target on top of `gain × BDP`: 3 for delayed ACKs (as BBR does)
/// plus the peer's ACK decimation (it holds up to `DECIMATED_THRESHOLD` delivered packets
/// unacknowledged, and they count as in flight). Without it a path with a BDP of a few packets
/// (loopback, a LAN) would wait for the peer's delayed-ACK timer every window.
/// Once the pipe is full, measured ACK aggregation ([`AckAggregation`]) takes the decimation
/// term's place when it is larger (never both: the decimated ACKs are aggregation too).
const CWND_EXTRA_PACKETS: u64 = DELAYED_ACK_PACKETS + super::ack::DECIMATED_THRESHOLD as u64;
/// Packets of the window target's extra for delayed ACKs.
const DELAYED_ACK_PACKETS: u64 = 3;
/// ACK aggregation (see [`AckAggregation`]): the largest excess of each window of this many
/// rounds is remembered (two windows, so the estimate covers the last 5–10 rounds).
const EXTRA_ACKED_WINDOW_ROUNDS: u64 = 5;
/// The aggregation allowance never exceeds this much sending time at the bandwidth estimate
/// (Linux BBR's bound)...
const EXTRA_ACKED_MAX_TIME: Duration = Duration::from_millis(100);
/// ...nor this many full packets: one GSO batch of the peer's receiver (a GRO read holds up
/// to 64 KiB). A receiver that acknowledges once per wake-up reads more per wake-up the more
/// is in flight, so an unbounded allowance would feed on itself and fill its socket buffer.
const EXTRA_ACKED_MAX_PACKETS: u64 = 64;
/// An aggregation epoch that acknowledged this many bytes starts over (it is stale).
const ACK_EPOCH_RESET_BYTES: u64 = 1 << 20;
/// Absolute RTT inflation tolerated in startup on top of 50 % (jitter on short paths).
const QUEUE_RTT_MARGIN: Duration = Duration::from_millis(4);
/// Startup ends after this many rounds without 25 % bandwidth growth.
const FULL_BW_ROUNDS: u32 = 3;

/// Delivery state captured when a packet is sent (draft-cheng-iccrg-delivery-rate-estimation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliverySnapshot {
    pub delivered: u64,
    pub delivered_time: Instant,
    pub first_sent_time: Instant,
    pub app_limited: bool,
    pub sent_time: Instant,
}

impl DeliverySnapshot {
    pub fn new(now: Instant) -> Self {
        Self {
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
            app_limited: false,
            sent_time: now,
        }
    }
}

/// One delivery-rate sample computed from an ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSample {
    /// Bytes per second.
    pub delivery_rate: u64,
    pub is_app_limited: bool,
    /// `delivered` of the most recently sent packet acknowledged (for round counting).
    pub prior_delivered: u64,
}

/// Connection-wide delivery-rate estimator.
#[derive(Debug, Clone)]
pub struct DeliveryRate {
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    /// Non-zero while the sender is application-limited: the `delivered` value that ends it.
    app_limited_until: u64,
    // Sample under construction for the current ACK.
    sample: Option<DeliverySnapshot>,
}

impl DeliveryRate {
    pub fn new(now: Instant) -> Self {
        Self {
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
            app_limited_until: 0,
            sample: None,
        }
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Snapshot for a packet being sent at `now` with `bytes_in_flight` before it.
    pub fn on_sent(&mut self, now: Instant, bytes_in_flight: u64) -> DeliverySnapshot {
        if bytes_in_flight == 0 {
            self.first_sent_time = now;
            self.delivered_time = now;
        }
        DeliverySnapshot {
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent_time: self.first_sent_time,
            app_limited: self.app_limited_until != 0,
            sent_time: now,
        }
    }

    /// The sender has nothing to send although the window would allow it.
    pub fn on_app_limited(&mut self, bytes_in_flight: u64) {
        self.app_limited_until = (self.delivered + bytes_in_flight).max(1);
    }

    pub fn on_acked(&mut self, now: Instant, snap: &DeliverySnapshot, bytes: u64) {
        self.delivered += bytes;
        self.delivered_time = now;
        let newer = match &self.sample {
            None => true,
            Some(s) => snap.delivered > s.delivered || snap.sent_time > s.sent_time,
        };
        if newer {
            self.sample = Some(*snap);
            self.first_sent_time = snap.sent_time;
        }
    }

    /// Finishes the sample for one ACK frame.
    pub fn take_sample(&mut self, min_rtt: Option<Duration>) -> Option<RateSample> {
        let snap = self.sample.take()?;
        if self.app_limited_until != 0 && self.delivered > self.app_limited_until {
            self.app_limited_until = 0;
        }
        let send_elapsed = snap
            .sent_time
            .saturating_duration_since(snap.first_sent_time);
        let ack_elapsed = self
            .delivered_time
            .saturating_duration_since(snap.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        if interval.is_zero() || min_rtt.is_some_and(|m| interval < m) {
            return None;
        }
        let bytes = self.delivered - snap.delivered;
        let rate = u128::from(bytes) * 1_000_000_000 / interval.as_nanos().max(1);
        Some(RateSample {
            delivery_rate: rate.min(u128::from(u64::MAX)) as u64,
            is_app_limited: snap.app_limited,
            prior_delivered: snap.delivered,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BbrState {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// What the controller needs to know about one processed ACK frame.
#[derive(Debug, Clone, Copy)]
pub struct AckEvent {
    pub now: Instant,
    pub bytes_acked: u64,
    pub bytes_in_flight: u64,
    pub rtt_sample: Option<Duration>,
    /// The delay the peer reported holding the ACK back (at most `max_ack_delay`).
    pub ack_delay: Duration,
    pub rate: Option<RateSample>,
    pub delivered: u64,
}

/// ACK aggregation: how much more data one burst of ACKs acknowledged than the bandwidth
/// estimate explains (Linux BBR's `extra_acked`). A receiver that reads datagrams in batches
/// (GRO, a receive batch per wake-up) and acknowledges once per batch, or an ACK path that
/// bunches ACKs, makes the sender wait for ACKs with nothing in flight unless the window has
/// room for that much on top of the BDP; on a short path (loopback, a LAN, where the BDP is a
/// few packets) the transfer would otherwise alternate between the two ends instead of keeping
/// both busy. The allowance is the largest excess seen over the last 5–10 rounds, never more
/// than the window itself (it can at most double the window per ACK), than
/// [`EXTRA_ACKED_MAX_TIME`] of sending or than [`EXTRA_ACKED_MAX_PACKETS`].
#[derive(Debug, Clone)]
struct AckAggregation {
    /// Start of the current epoch (ACKs arriving faster than the bandwidth estimate).
    epoch_start: Instant,
    /// Bytes acknowledged since `epoch_start` (below [`ACK_EPOCH_RESET_BYTES`]; 0: no epoch).
    epoch_acked: u32,
    /// The round in which the epoch started (low 32 bits of the round count).
    epoch_round: u32,
    /// Largest excess of the current and the previous window.
    max: [u32; 2],
    /// Which of `max` is the current window.
    second: bool,
    /// Rounds since the current window started.
    window_rounds: u8,
}

impl AckAggregation {
    fn new(now: Instant) -> Self {
        Self {
            epoch_start: now,
            epoch_acked: 0,
            epoch_round: 0,
            max: [0; 2],
            second: false,
            window_rounds: 0,
        }
    }

    fn on_ack(&mut self, now: Instant, acked: u64, bw: u64, cwnd: u64, round: (u64, bool)) {
        let (round, round_start) = (round.0 as u32, round.1);
        if round_start {
            self.window_rounds += 1;
            if u64::from(self.window_rounds) >= EXTRA_ACKED_WINDOW_ROUNDS {
                self.window_rounds = 0;
                self.second = !self.second;
                self.max[usize::from(self.second)] = 0;
            }
        }
        let elapsed = now.saturating_duration_since(self.epoch_start).as_nanos();
        let mut expected =
            (u128::from(bw) * elapsed / 1_000_000_000).min(u128::from(u64::MAX)) as u64;
        // ACKs at or below the estimated rate start a new epoch here, and so does a stale one
        // (a full round old, or past a megabyte: quiche's and Linux's rules), so the excess of
        // a burst of ACKs long gone does not stay in the estimate.
        let acked_before = u64::from(self.epoch_acked);
        if acked_before <= expected
            || round.wrapping_sub(self.epoch_round) > 1
            || acked_before + acked >= ACK_EPOCH_RESET_BYTES
        {
            self.epoch_start = now;
            self.epoch_round = round;
            self.epoch_acked = 0;
            expected = 0;
        }
        let epoch_acked = (u64::from(self.epoch_acked) + acked).min(ACK_EPOCH_RESET_BYTES);
        self.epoch_acked = epoch_acked as u32;
        let extra = epoch_acked.saturating_sub(expected).min(cwnd) as u32;
        let slot = &mut self.max[usize::from(self.second)];
        *slot = (*slot).max(extra);
    }

    /// The window allowance for ACK aggregation at bandwidth `bw` with packets of `mss`.
    fn allowance(&self, bw: u64, mss: u64) -> u64 {
        let by_time = u128::from(bw) * EXTRA_ACKED_MAX_TIME.as_nanos() / 1_000_000_000;
        u64::from(self.max[0].max(self.max[1]))
            .min(by_time.min(u128::from(u64::MAX)) as u64)
            .min(EXTRA_ACKED_MAX_PACKETS * mss)
    }
}

/// BBR-style congestion controller.
#[derive(Debug, Clone)]
pub struct Bbr {
    mss: u64,
    state: BbrState,
    bw_slots: [(u64, u64); BW_WINDOW_ROUNDS as usize],
    btl_bw: u64,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,
    round_count: u64,
    next_round_delivered: u64,
    full_bw: u64,
    full_bw_count: u32,
    /// Largest RTT sample in the current round (startup exit on queue build-up).
    round_max_rtt: Duration,
    filled_pipe: bool,
    cycle_index: usize,
    cycle_stamp: Instant,
    probe_rtt_done: Option<Instant>,
    probe_rtt_round_done: bool,
    prior_cwnd: u64,
    pacing_gain: u64,
    cwnd_gain: u64,
    cwnd: u64,
    pacing_rate: u64,
    initial_cwnd: u64,
    aggregation: AckAggregation,
}

impl Bbr {
    /// The window a fresh controller starts with.
    pub fn initial_cwnd(mss: usize, initial_cwnd_packets: u64) -> u64 {
        initial_cwnd_packets.max(MIN_CWND_PACKETS) * mss as u64
    }

    pub fn new(now: Instant, mss: usize, initial_cwnd_packets: u64, initial_rtt: Duration) -> Self {
        let initial_cwnd = Self::initial_cwnd(mss, initial_cwnd_packets);
        let mss = mss as u64;
        let rtt_ns = initial_rtt.as_nanos().max(1);
        let pacing_rate = (u128::from(initial_cwnd) * 1_000_000_000 * u128::from(HIGH_GAIN)
            / u128::from(GAIN_UNIT)
            / rtt_ns) as u64;
        Self {
            mss,
            state: BbrState::Startup,
            bw_slots: [(0, 0); BW_WINDOW_ROUNDS as usize],
            btl_bw: 0,
            min_rtt: None,
            min_rtt_stamp: now,
            round_count: 0,
            next_round_delivered: 0,
            full_bw: 0,
            full_bw_count: 0,
            round_max_rtt: Duration::ZERO,
            filled_pipe: false,
            cycle_index: 0,
            cycle_stamp: now,
            probe_rtt_done: None,
            probe_rtt_round_done: false,
            prior_cwnd: initial_cwnd,
            pacing_gain: HIGH_GAIN,
            cwnd_gain: HIGH_GAIN,
            cwnd: initial_cwnd,
            pacing_rate: pacing_rate.max(1),
            initial_cwnd,
            aggregation: AckAggregation::new(now),
        }
    }

    pub fn cwnd(&self) -> u64 {
        self.cwnd
    }

    /// Bytes per second.
    pub fn pacing_rate(&self) -> u64 {
        self.pacing_rate
    }

    /// Bottleneck bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> u64 {
        self.btl_bw
    }

    pub fn state(&self) -> BbrState {
        self.state
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    fn bdp(&self, gain: u64) -> Option<u64> {
        let rtt = self.min_rtt?;
        if self.btl_bw == 0 {
            return None;
        }
        let bdp = u128::from(self.btl_bw) * rtt.as_nanos() / 1_000_000_000;
        Some((bdp * u128::from(gain) / u128::from(GAIN_UNIT)).min(u128::from(u64::MAX / 2)) as u64)
    }

    fn min_cwnd(&self) -> u64 {
        MIN_CWND_PACKETS * self.mss
    }

    pub fn on_ack(&mut self, ev: &AckEvent) {
        let round_start = match ev.rate {
            Some(r) if r.prior_delivered >= self.next_round_delivered => {
                self.next_round_delivered = ev.delivered;
                self.round_count += 1;
                true
            }
            _ => false,
        };
        if let Some(r) = ev.rate {
            if !r.is_app_limited || r.delivery_rate >= self.btl_bw {
                self.update_bw(r.delivery_rate);
            }
        }
        self.aggregation.on_ack(
            ev.now,
            ev.bytes_acked,
            self.btl_bw,
            self.cwnd,
            (self.round_count, round_start),
        );
        self.update_cycle_phase(ev);
        if round_start {
            self.check_full_pipe(ev.rate.is_some_and(|r| r.is_app_limited));
            self.check_queue_growth();
            self.round_max_rtt = Duration::ZERO;
        }
        if let Some(rtt) = ev.rtt_sample {
            // The peer's deliberate ACK delay (decimation) is not queueing.
            self.round_max_rtt = self.round_max_rtt.max(rtt.saturating_sub(ev.ack_delay));
        }
        self.check_drain(ev);
        self.update_min_rtt(ev, round_start);
        self.set_pacing_rate();
        self.set_cwnd(ev);
    }

    fn update_bw(&mut self, rate: u64) {
        let slot = &mut self.bw_slots[(self.round_count % BW_WINDOW_ROUNDS) as usize];
        if slot.0 != self.round_count {
            *slot = (self.round_count, rate);
        } else {
            slot.1 = slot.1.max(rate);
        }
        let round = self.round_count;
        self.btl_bw = self
            .bw_slots
            .iter()
            .filter(|(r, _)| round - r < BW_WINDOW_ROUNDS)
            .map(|&(_, bw)| bw)
            .max()
            .unwrap_or(rate);
    }

    fn update_cycle_phase(&mut self, ev: &AckEvent) {
        if self.state != BbrState::ProbeBw {
            return;
        }
        let Some(min_rtt) = self.min_rtt else { return };
        let elapsed = ev.now.saturating_duration_since(self.cycle_stamp) > min_rtt;
        let gain = self.pacing_gain;
        let advance = if gain > GAIN_UNIT {
            elapsed && self.bdp(gain).is_none_or(|t| ev.bytes_in_flight >= t)
        } else if gain < GAIN_UNIT {
            elapsed || self.bdp(GAIN_UNIT).is_some_and(|t| ev.bytes_in_flight <= t)
        } else {
            elapsed
        };
        if advance {
            self.cycle_index = (self.cycle_index + 1) % PROBE_BW_GAINS.len();
            self.cycle_stamp = ev.now;
            self.pacing_gain = PROBE_BW_GAINS[self.cycle_index];
        }
    }

    fn check_full_pipe(&mut self, app_limited: bool) {
        if self.filled_pipe || app_limited {
            return;
        }
        if self.btl_bw >= self.full_bw * 5 / 4 {
            self.full_bw = self.btl_bw;
            self.full_bw_count = 0;
            return;
        }
        self.full_bw_count += 1;
        if self.full_bw_count >= FULL_BW_ROUNDS {
            self.filled_pipe = true;
        }
    }

    /// Startup also ends when a whole round saw the RTT inflated well above the minimum: the
    /// bottleneck queue is filling. This catches the case where the bandwidth plateau check
    /// never runs because the sender is application- or flow-control-limited, and it is not
    /// triggered by random loss (which does not inflate the RTT).
    fn check_queue_growth(&mut self) {
        if self.filled_pipe || self.btl_bw == 0 {
            return;
        }
        let Some(min_rtt) = self.min_rtt else { return };
        if self.round_max_rtt > min_rtt * 3 / 2 + QUEUE_RTT_MARGIN {
            self.filled_pipe = true;
        }
    }

    fn check_drain(&mut self, ev: &AckEvent) {
        if self.state == BbrState::Startup && self.filled_pipe {
            self.state = BbrState::Drain;
            self.pacing_gain = DRAIN_GAIN;
            self.cwnd_gain = HIGH_GAIN;
        }
        if self.state == BbrState::Drain
            && self.bdp(GAIN_UNIT).is_none_or(|b| ev.bytes_in_flight <= b)
        {
            self.enter_probe_bw(ev.now);
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.state = BbrState::ProbeBw;
        self.cwnd_gain = PROBE_BW_CWND_GAIN;
        // Deterministic start phase (not the probing one), as the core has no RNG here.
        self.cycle_index = 2;
        self.pacing_gain = PROBE_BW_GAINS[self.cycle_index];
        self.cycle_stamp = now;
    }

    fn update_min_rtt(&mut self, ev: &AckEvent, round_start: bool) {
        let expired = ev.now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW;
        if let Some(rtt) = ev.rtt_sample {
            if self.min_rtt.is_none_or(|m| rtt <= m) || expired {
                self.min_rtt = Some(rtt);
                self.min_rtt_stamp = ev.now;
            }
        }
        if expired && self.state != BbrState::ProbeRtt && self.min_rtt.is_some() {
            self.state = BbrState::ProbeRtt;
            self.pacing_gain = GAIN_UNIT;
            self.cwnd_gain = GAIN_UNIT;
            self.prior_cwnd = self.cwnd;
            self.probe_rtt_done = None;
        }
        if self.state == BbrState::ProbeRtt {
            match self.probe_rtt_done {
                None if ev.bytes_in_flight <= self.min_cwnd() => {
                    self.probe_rtt_done = Some(ev.now + PROBE_RTT_DURATION);
                    self.probe_rtt_round_done = false;
                    self.next_round_delivered = ev.delivered;
                }
                Some(done) => {
                    if round_start {
                        self.probe_rtt_round_done = true;
                    }
                    if self.probe_rtt_round_done && ev.now >= done {
                        self.min_rtt_stamp = ev.now;
                        self.cwnd = self.cwnd.max(self.prior_cwnd);
                        if self.filled_pipe {
                            self.enter_probe_bw(ev.now);
                        } else {
                            self.state = BbrState::Startup;
                            self.pacing_gain = HIGH_GAIN;
                            self.cwnd_gain = HIGH_GAIN;
                        }
                    }
                }
                None => {}
            }
        }
    }

    fn set_pacing_rate(&mut self) {
        if self.btl_bw == 0 {
            return;
        }
        let rate =
            (u128::from(self.btl_bw) * u128::from(self.pacing_gain) / u128::from(GAIN_UNIT)) as u64;
        if self.filled_pipe || rate > self.pacing_rate {
            self.pacing_rate = rate.max(1);
        }
    }

    fn set_cwnd(&mut self, ev: &AckEvent) {
        if let Some(bdp) = self.bdp(self.cwnd_gain) {
            let mut extra = CWND_EXTRA_PACKETS * self.mss;
            if self.filled_pipe {
                let aggregation = self.aggregation.allowance(self.btl_bw, self.mss);
                extra = extra.max(DELAYED_ACK_PACKETS * self.mss + aggregation);
            }
            let target = bdp + extra;
            if self.filled_pipe {
                self.cwnd = (self.cwnd + ev.bytes_acked).min(target);
            } else if self.cwnd < target || ev.delivered < self.initial_cwnd {
                self.cwnd += ev.bytes_acked;
            }
        } else {
            self.cwnd += ev.bytes_acked;
        }
        self.cwnd = self.cwnd.max(self.min_cwnd());
        if self.state == BbrState::ProbeRtt {
            self.cwnd = self.cwnd.min(self.min_cwnd());
        }
    }

    /// Probe timeout: the path may have changed; keep the model but restart from a small
    /// window so the burst after an outage stays bounded.
    pub fn on_pto(&mut self) {
        self.prior_cwnd = self.prior_cwnd.max(self.cwnd);
        self.cwnd = self.min_cwnd();
    }

    /// After a PTO, the first ACK restores the window saved before it.
    pub fn on_recovered(&mut self) {
        self.cwnd = self.cwnd.max(self.prior_cwnd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_rate_from_acks() {
        let t0 = Instant::now();
        let mut d = DeliveryRate::new(t0);
        let snaps: Vec<_> = (0..10)
            .map(|i| d.on_sent(t0 + Duration::from_millis(i), i * 1000))
            .collect();
        // All ten acked 50 ms after the first was sent: 10 kB over max(9 ms, 50 ms) = 200 kB/s.
        let t_ack = t0 + Duration::from_millis(50);
        for s in &snaps {
            d.on_acked(t_ack, s, 1000);
        }
        let s = d.take_sample(None).unwrap();
        assert_eq!(s.delivery_rate, 200_000);
        assert!(!s.is_app_limited);
    }

    #[test]
    fn startup_grows_then_settles_at_bdp() {
        let t0 = Instant::now();
        let mss = 1200u64;
        let mut bbr = Bbr::new(t0, mss as usize, 10, Duration::from_millis(100));
        let rtt = Duration::from_millis(50);
        let bw = 1_250_000u64; // 10 Mbit/s
        let mut delivered = 0;
        let mut now = t0;
        for round in 0..40 {
            now += rtt;
            delivered += bw / 20;
            bbr.on_ack(&AckEvent {
                now,
                bytes_acked: bw / 20,
                bytes_in_flight: bw / 20,
                rtt_sample: Some(rtt),
                ack_delay: Duration::ZERO,
                rate: Some(RateSample {
                    delivery_rate: bw,
                    is_app_limited: false,
                    prior_delivered: delivered - bw / 20,
                }),
                delivered,
            });
            if round > 10 {
                assert_ne!(bbr.state(), BbrState::Startup);
            }
        }
        assert_eq!(bbr.bandwidth(), bw);
        let bdp = bw / 20;
        // One ACK per round acknowledges a whole BDP: that much aggregation is allowed for.
        let extra = (CWND_EXTRA_PACKETS * mss)
            .max(DELAYED_ACK_PACKETS * mss + bdp.min(EXTRA_ACKED_MAX_PACKETS * mss));
        assert!(
            bbr.cwnd() <= 2 * bdp + extra && bbr.cwnd() >= bdp,
            "{}",
            bbr.cwnd()
        );
        assert!(bbr.pacing_rate() >= bw * 3 / 4 && bbr.pacing_rate() <= bw * 5 / 4);
    }

    /// A delayed ACK (the receiver decimates its ACKs) inflates the raw RTT sample by the
    /// reported ACK delay; that is not a queue, so startup goes on while the bandwidth grows.
    #[test]
    fn reported_ack_delay_does_not_end_startup() {
        let t0 = Instant::now();
        let mss = 1200u64;
        let mut bbr = Bbr::new(t0, mss as usize, 10, Duration::from_millis(100));
        let rtt = Duration::from_millis(40);
        let ack_delay = Duration::from_millis(25);
        let (mut now, mut delivered, mut bw) = (t0, 0, 100_000u64);
        for round in 0..6 {
            now += rtt + ack_delay;
            let acked = bw * 40 / 1000;
            delivered += acked;
            // Every round: one sample at the minimum, one held back by the peer's ACK delay.
            for (sample, delay) in [(rtt, Duration::ZERO), (rtt + ack_delay, ack_delay)] {
                bbr.on_ack(&AckEvent {
                    now,
                    bytes_acked: acked / 2,
                    bytes_in_flight: acked,
                    rtt_sample: Some(sample),
                    ack_delay: delay,
                    rate: Some(RateSample {
                        delivery_rate: bw,
                        is_app_limited: false,
                        prior_delivered: delivered - acked,
                    }),
                    delivered,
                });
            }
            assert_eq!(bbr.state(), BbrState::Startup, "round {round}");
            bw *= 2;
        }
    }

    /// Feeds `count` ACKs of `acked` bytes each, `gap` apart, delivered at `bw` (each ACK starts
    /// a round, as when every ACK covers everything sent before the previous one).
    fn feed(bbr: &mut Bbr, now: &mut Instant, delivered: &mut u64, ack: (u64, Duration, u64)) {
        let (acked, gap, bw) = ack;
        *now += gap;
        *delivered += acked;
        bbr.on_ack(&AckEvent {
            now: *now,
            bytes_acked: acked,
            bytes_in_flight: 0,
            rtt_sample: Some(Duration::from_micros(100)),
            ack_delay: Duration::ZERO,
            rate: Some(RateSample {
                delivery_rate: bw,
                is_app_limited: false,
                prior_delivered: *delivered - acked,
            }),
            delivered: *delivered,
        });
    }

    /// A receiver that acknowledges once per batch of 80 packets (GRO reads, one ACK per
    /// wake-up) on a path whose BDP is 17 packets: without room for the batch on top of the BDP
    /// the sender waits for every ACK with nothing in flight, and the two ends take turns
    /// instead of working at the same time. The room follows the batches (bounded by
    /// EXTRA_ACKED_MAX_PACKETS) and goes away within 10 rounds once ACKs come smoothly.
    #[test]
    fn aggregated_acks_get_room_in_the_window_while_they_last() {
        let t0 = Instant::now();
        let mss = 1200u64;
        let mut bbr = Bbr::new(t0, mss as usize, 10, Duration::from_millis(1));
        let bw = 200_000_000u64; // 200 MB/s, min RTT 100 µs: BDP 20,000 bytes
        let bdp = 20_000;
        let base = 2 * bdp + CWND_EXTRA_PACKETS * mss;
        let batch = 80 * mss;
        let (mut now, mut delivered) = (t0, 0);
        // One ACK per batch, at the rate the bandwidth explains (480 µs apart).
        let batched = (batch, Duration::from_micros(480), bw);
        for _ in 0..40 {
            feed(&mut bbr, &mut now, &mut delivered, batched);
        }
        assert_eq!(bbr.state(), BbrState::ProbeBw);
        assert_eq!(
            bbr.cwnd(),
            2 * bdp + (DELAYED_ACK_PACKETS + EXTRA_ACKED_MAX_PACKETS) * mss,
            "2 BDP + delayed ACKs + one batch (capped)"
        );
        // Smooth ACKs of 2 packets at half the rate: the batch's epoch drains (the ACKs fall
        // behind what the estimate expects) and 10 rounds later the extra is the usual one.
        let smooth = (2 * mss, Duration::from_micros(24), bw / 2);
        for _ in 0..100 {
            feed(&mut bbr, &mut now, &mut delivered, smooth);
        }
        assert!(bbr.cwnd() <= base, "{}", bbr.cwnd());
    }
}
