//! The client's session-slot policy, sans-IO: when each tunnel-session slot (re)connects, how it
//! backs off, when a silent session is replaced, when a waiting request may pull an attempt
//! forward, and how long requests wait for a session or an open. Takes `now`, returns decisions
//! and deadlines; the client loop ([`super::client_loop`]) does the I/O.
//!
//! The rules (README, "How the client behaves when things go wrong"):
//! - reconnects back off exponentially with ±25 % jitter, [`BACKOFF_MIN`] … [`BACKOFF_MAX`];
//! - no answer to the hello within [`NO_ANSWER_TIMEOUT`] is reported once per outage;
//! - while refused for the key, on-demand retries come 2 s, 4 s, 8 s, then 16 s apart;
//! - a connected session that hears nothing for [`DEAD_AFTER`] while waiting for an answer is
//!   replaced;
//! - a waiting request pulls the next attempt forward, at most once per [`DEMAND_RETRY_GAP`]
//!   after the slot's last failure; it fails after [`WAIT_FOR_SESSION`].

use std::time::{Duration, Instant};

use crate::proto::RefuseReason;
use crate::proto::transport::CloseReason;

/// First reconnect delay; doubles with each consecutive failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Reconnect delay at most (before jitter).
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Wait after the server closed the session because of the key (limit reached, deleted).
pub const KEY_CLOSED_WAIT: Duration = Duration::from_secs(30);
/// No answer to the handshake within this is reported as "no answer from the server".
pub const NO_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence from the server, while data waits for its acknowledgement, that ends a session.
pub const DEAD_AFTER: Duration = Duration::from_secs(6);
/// How often connected sessions are sampled for that.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(500);
/// A new local request may trigger a reconnect attempt this long after the slot's last failure.
pub const DEMAND_RETRY_GAP: Duration = Duration::from_secs(2);
/// After authenticated refusals (limit reached, key disabled) the gap doubles with each
/// consecutive refusal, from [`DEMAND_RETRY_GAP`] up to this. Every hello the server answers counts
/// against the key's [`MAX_HANDSHAKES_PER_EPOCH`](crate::proto::endpoint::MAX_HANDSHAKES_PER_EPOCH)
/// of the current 2-minute epoch (docs/PROTOCOL.md §3.1): doubling to 16 s spends at most about 10
/// per epoch and slot however often applications retry, leaving the rest to the key's other
/// devices, while a limit raised soon after it was hit is noticed within a few seconds.
pub const REFUSED_RETRY_GAP_MAX: Duration = Duration::from_secs(16);
/// How long a request waits for a tunnel session before it is refused.
pub const WAIT_FOR_SESSION: Duration = Duration::from_secs(15);
/// How long a stream open waits for the server's answer.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Where backoff jitter comes from (injected, so tests choose it).
pub trait Jitter {
    fn next_u64(&mut self) -> u64;
}

/// xorshift64*: a tiny PRNG, only for backoff jitter; seed it with real randomness.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        XorShift64(seed | 1)
    }
}

impl Jitter for XorShift64 {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Where a slot is in its life; the loop moves it, the supervisor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Waiting for the next attempt ([`SlotSupervisor::attempt_due`]).
    Idle,
    /// Server name being resolved.
    Resolving,
    /// Hello sent, waiting for the reply.
    Handshaking,
    Connected,
}

/// Why a slot's attempt or session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Trouble on this machine (name resolution, socket): retried, not an outage.
    Local,
    /// No answer to the hello within [`NO_ANSWER_TIMEOUT`].
    NoAnswer,
    /// A connected session heard nothing for [`DEAD_AFTER`] while waiting for an answer.
    Silent,
    /// The TCP carrier connection could not be made, or ended (closed, broken, bad bytes).
    Carrier,
    /// The session closed for this reason.
    Closed(CloseReason),
    /// The session finished without anything to report (e.g. our own close).
    Ended,
    /// The server refused the key (authenticated).
    Refused {
        reason: RefuseReason,
        retry_after_secs: u16,
    },
}

/// What the loop should do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// When the slot's next attempt is due.
    pub at: Instant,
    /// The first failure of this outage: tell the user (later ones are quieter).
    pub first_report: bool,
    /// Refused because of the key itself (limit, disabled, expired): waiting requests should
    /// fail at once unless another session is up (a new request retries on demand).
    pub refused_for_key: bool,
}

/// What the server's link looked like at a liveness sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSample {
    /// Last datagram from the server.
    pub last_rx: Instant,
    /// Bytes sent and not yet acknowledged.
    pub bytes_in_flight: u64,
    /// The session's probe-timeout count.
    pub pto_count: u64,
}

/// Timing state of one slot.
#[derive(Debug, Clone)]
struct SlotTimers {
    next_attempt: Instant,
    /// When the slot last failed (limits demand-driven retries).
    failed_at: Instant,
    /// Consecutive attempts that ended in an authenticated refusal.
    refusals: u32,
    backoff: Duration,
    /// The current outage was reported to the user.
    reported: bool,
    /// `last_rx` at the previous liveness sample.
    checked_rx: Instant,
    /// The probe-timeout count when we last heard from the server.
    pto_base: u64,
    /// Since when the session has been waiting for an answer (sampled every LIVENESS_CHECK).
    waiting_since: Option<Instant>,
}

/// The policy of all session slots of one client.
#[derive(Debug)]
pub struct SlotSupervisor<J> {
    slots: Vec<SlotTimers>,
    jitter: J,
    next_liveness_check: Instant,
    connected_once: bool,
}

impl<J: Jitter> SlotSupervisor<J> {
    /// `slots` idle slots whose first attempts are staggered 2 ms apart (many sessions must not
    /// burst at once).
    pub fn new(slots: usize, now: Instant, jitter: J) -> Self {
        let slots = (0..slots)
            .map(|i| SlotTimers {
                next_attempt: now + Duration::from_millis(2 * i as u64),
                failed_at: now,
                refusals: 0,
                backoff: BACKOFF_MIN,
                reported: false,
                checked_rx: now,
                pto_base: 0,
                waiting_since: None,
            })
            .collect();
        SlotSupervisor {
            slots,
            jitter,
            next_liveness_check: now + LIVENESS_CHECK,
            connected_once: false,
        }
    }

    /// Whether idle slot `i` should start its next attempt now.
    pub fn attempt_due(&self, i: usize, now: Instant) -> bool {
        now >= self.slots[i].next_attempt
    }

    /// When slot `i` (in `state`) next needs [`Self::attempt_due`] or [`Self::liveness_due`].
    /// A connected session is sampled on a timer only while it waits for an answer; otherwise
    /// at the loop's next wake-up (an idle tunnel does not wake the loop twice a second; a
    /// session that sends starts the transport's probe timer, which wakes it).
    pub fn next_deadline(&self, i: usize, state: SlotState) -> Option<Instant> {
        let t = &self.slots[i];
        match state {
            SlotState::Idle => Some(t.next_attempt),
            SlotState::Connected => t.waiting_since.map(|_| self.next_liveness_check),
            SlotState::Resolving | SlotState::Handshaking => None,
        }
    }

    /// Slot `i` connected. Returns whether to announce it (first connection, or the end of a
    /// reported outage).
    pub fn connected(&mut self, i: usize) -> bool {
        let first = !self.connected_once;
        self.connected_once = true;
        let t = &mut self.slots[i];
        t.backoff = BACKOFF_MIN;
        t.refusals = 0;
        std::mem::replace(&mut t.reported, false) || first
    }

    /// Slot `i` failed: schedules its next attempt with exponential backoff and ±25 % jitter
    /// (at least the server's `retry_after` after a refusal, [`KEY_CLOSED_WAIT`] after a close
    /// because of the key).
    pub fn failed(&mut self, i: usize, now: Instant, failure: Failure) -> Retry {
        let r = self.jitter.next_u64();
        let t = &mut self.slots[i];
        let at_least = match failure {
            Failure::Refused {
                retry_after_secs, ..
            } => Duration::from_secs(u64::from(retry_after_secs).max(1)),
            Failure::Closed(CloseReason::LimitReached | CloseReason::UserDeleted) => {
                KEY_CLOSED_WAIT
            }
            _ => Duration::ZERO,
        };
        let jitter_pct = 75 + (r % 51) as u32; // 75..=125 %
        let at = now + t.backoff.max(at_least) * jitter_pct / 100;
        t.next_attempt = at;
        t.failed_at = now;
        t.backoff = (t.backoff * 2).min(BACKOFF_MAX);
        t.pto_base = 0;
        t.waiting_since = None;
        let first_report = !t.reported;
        if !matches!(failure, Failure::Local | Failure::Ended) {
            t.reported = true;
        }
        let refused_for_key = match failure {
            Failure::Refused { reason, .. } => {
                t.refusals = t.refusals.saturating_add(1);
                // Refusals about the key fail waiting requests at once (retrying soon won't help).
                matches!(
                    reason,
                    RefuseReason::QuotaExceeded
                        | RefuseReason::Disabled
                        | RefuseReason::Expired
                        | RefuseReason::DeviceLimit
                )
            }
            _ => false,
        };
        Retry {
            at,
            first_report,
            refused_for_key,
        }
    }

    /// Idle slot `i` starts its next attempt now, without counting a failure (its session was
    /// ended on purpose to move it to another carrier).
    pub fn restart(&mut self, i: usize, now: Instant) {
        let t = &mut self.slots[i];
        t.next_attempt = now;
        t.waiting_since = None;
        t.pto_base = 0;
    }

    /// A request waits and no session is up: pull idle slot `i`'s next attempt forward, but not
    /// closer than [`DEMAND_RETRY_GAP`] (doubling per consecutive refusal up to
    /// [`REFUSED_RETRY_GAP_MAX`]) to its last failure.
    pub fn demand_retry(&mut self, i: usize, now: Instant) {
        let t = &mut self.slots[i];
        let gap = match t.refusals {
            0 => DEMAND_RETRY_GAP,
            n => (DEMAND_RETRY_GAP * (1 << n.min(4)) / 2).min(REFUSED_RETRY_GAP_MAX),
        };
        let earliest = (t.failed_at + gap).max(now);
        t.next_attempt = t.next_attempt.min(earliest);
    }

    /// Whether connected slots should be sampled now ([`Self::check_liveness`]); schedules the
    /// next sample.
    pub fn liveness_due(&mut self, now: Instant) -> bool {
        if now < self.next_liveness_check {
            return false;
        }
        self.next_liveness_check = now + LIVENESS_CHECK;
        true
    }

    /// Samples connected slot `i`. Returns how long the server has been silent when the session
    /// must be replaced: it waited for an answer for [`DEAD_AFTER`] (data in flight, or a probe
    /// timeout since the server was last heard) and heard nothing for as long.
    pub fn check_liveness(&mut self, i: usize, now: Instant, link: LinkSample) -> Option<Duration> {
        let t = &mut self.slots[i];
        // Heard from the server since the last sample: alive; count probe timeouts from here.
        if link.last_rx != t.checked_rx {
            t.checked_rx = link.last_rx;
            t.pto_base = link.pto_count;
            t.waiting_since = None;
        }
        // A probe timeout moves the in-flight bytes to "lost" until they are resent, so
        // in-flight alone can read zero between retransmissions.
        let waiting = link.bytes_in_flight > 0 || link.pto_count > t.pto_base;
        if !waiting {
            t.waiting_since = None;
            return None;
        }
        let since = *t.waiting_since.get_or_insert(now);
        let silent = now.saturating_duration_since(link.last_rx);
        (now.saturating_duration_since(since) >= DEAD_AFTER && silent >= DEAD_AFTER)
            .then_some(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A jitter source that always returns the same value: 25 gives exactly 100 %, 0 gives
    /// 75 %, 50 gives 125 %.
    struct Fixed(u64);

    impl Jitter for Fixed {
        fn next_u64(&mut self) -> u64 {
            self.0
        }
    }

    fn sup(slots: usize, now: Instant) -> SlotSupervisor<Fixed> {
        SlotSupervisor::new(slots, now, Fixed(25))
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn first_attempts_are_staggered_and_due_at_once() {
        let t0 = Instant::now();
        let s = sup(3, t0);
        assert!(s.attempt_due(0, t0));
        assert!(!s.attempt_due(2, t0));
        assert_eq!(s.next_deadline(2, SlotState::Idle), Some(t0 + secs(0.004)));
        assert_eq!(s.next_deadline(2, SlotState::Handshaking), None);
        assert_eq!(s.next_deadline(2, SlotState::Resolving), None);
    }

    #[test]
    fn backoff_doubles_from_half_a_second_up_to_thirty() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        let delays: Vec<f64> = (0..9)
            .map(|_| (s.failed(0, t0, Failure::NoAnswer).at - t0).as_secs_f64())
            .collect();
        assert_eq!(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        // A connection resets it.
        s.connected(0);
        assert_eq!(s.failed(0, t0, Failure::Silent).at, t0 + secs(0.5));
    }

    #[test]
    fn a_restart_is_due_at_once_and_keeps_the_backoff() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        s.failed(0, t0, Failure::Carrier);
        s.failed(0, t0, Failure::Carrier);
        assert!(!s.attempt_due(0, t0 + secs(0.9)));
        // Moving the slot to another carrier: no waiting, and not counted as a failure.
        s.restart(0, t0 + secs(1.0));
        assert!(s.attempt_due(0, t0 + secs(1.0)));
        assert_eq!(s.failed(0, t0, Failure::Carrier).at, t0 + secs(2.0));
    }

    #[test]
    fn jitter_spreads_the_delay_by_a_quarter_each_way() {
        let t0 = Instant::now();
        let at = |r| {
            SlotSupervisor::new(1, t0, Fixed(r))
                .failed(0, t0, Failure::Local)
                .at
        };
        assert_eq!(at(0), t0 + secs(0.375));
        assert_eq!(at(50), t0 + secs(0.625));
        assert_eq!(at(51), t0 + secs(0.375)); // wraps: 75..=125 % only
        // The injected source is what varies it: a real PRNG gives different delays.
        let mut s = SlotSupervisor::new(1, t0, XorShift64::new(7));
        let spread: std::collections::HashSet<Instant> = (0..20)
            .map(|_| {
                s.connected(0);
                s.failed(0, t0, Failure::Local).at
            })
            .collect();
        assert!(spread.len() > 5);
        assert!(
            spread
                .iter()
                .all(|at| (secs(0.375)..=secs(0.625)).contains(&(*at - t0)))
        );
    }

    #[test]
    fn refusal_waits_at_least_retry_after_and_key_close_thirty_seconds() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        let refused = Failure::Refused {
            reason: RefuseReason::ServerFull,
            retry_after_secs: 5,
        };
        let r = s.failed(0, t0, refused);
        assert_eq!(r.at, t0 + secs(5.0));
        assert!(!r.refused_for_key, "a full server is not about the key");
        let zero = Failure::Refused {
            reason: RefuseReason::QuotaExceeded,
            retry_after_secs: 0,
        };
        let r = s.failed(0, t0, zero);
        assert_eq!(
            r.at,
            t0 + secs(1.0),
            "retry_after 0 still waits backoff/1 s"
        );
        assert!(r.refused_for_key);
        let r = s.failed(0, t0, Failure::Closed(CloseReason::LimitReached));
        assert_eq!(r.at, t0 + KEY_CLOSED_WAIT);
        assert!(!r.refused_for_key);
        for reason in [
            RefuseReason::Disabled,
            RefuseReason::Expired,
            RefuseReason::DeviceLimit,
        ] {
            let f = Failure::Refused {
                reason,
                retry_after_secs: 1,
            };
            assert!(s.failed(0, t0, f).refused_for_key);
        }
        for reason in [RefuseReason::SessionLimit, RefuseReason::Other(9)] {
            let f = Failure::Refused {
                reason,
                retry_after_secs: 1,
            };
            assert!(!s.failed(0, t0, f).refused_for_key);
        }
    }

    /// README: "While refused, on-demand retries come 2 s, 4 s, 8 s, then 16 s apart."
    #[test]
    fn on_demand_retries_while_refused_come_2_4_8_16_16_seconds_apart() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        let refused = Failure::Refused {
            reason: RefuseReason::QuotaExceeded,
            retry_after_secs: 60,
        };
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            s.failed(0, now, refused);
            // Applications keep retrying: a request every 100 ms.
            let failed = now;
            loop {
                now += secs(0.1);
                s.demand_retry(0, now);
                if s.attempt_due(0, now) {
                    break;
                }
            }
            gaps.push((now - failed).as_secs_f64().round());
        }
        assert_eq!(gaps, [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]);
        // A connection ends the refusal streak: the next gap is 2 s again.
        s.connected(0);
        s.failed(0, now, refused);
        s.demand_retry(0, now + secs(0.1));
        assert_eq!(s.next_deadline(0, SlotState::Idle), Some(now + secs(2.0)));
    }

    /// README: a waiting request "pulls the next attempt forward (at most once per 2 s)".
    #[test]
    fn demand_retry_pulls_forward_at_most_once_per_two_seconds() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        for _ in 0..8 {
            s.failed(0, t0, Failure::NoAnswer); // backoff grows to 30 s
        }
        assert!(s.next_deadline(0, SlotState::Idle).unwrap() - t0 >= secs(30.0));
        s.demand_retry(0, t0 + secs(0.5));
        assert_eq!(s.next_deadline(0, SlotState::Idle), Some(t0 + secs(2.0)));
        assert!(!s.attempt_due(0, t0 + secs(1.9)));
        assert!(s.attempt_due(0, t0 + secs(2.0)));
        // Long after the failure, a request retries at once.
        let mut s = sup(1, t0);
        for _ in 0..5 {
            s.failed(0, t0, Failure::NoAnswer); // the fifth schedules +8 s
        }
        let later = t0 + secs(5.0);
        assert!(!s.attempt_due(0, later));
        s.demand_retry(0, later);
        assert!(s.attempt_due(0, later));
        // Demand never pushes an earlier attempt back.
        let mut s = sup(1, t0);
        s.failed(0, t0, Failure::Local); // due at +0.5 s
        s.demand_retry(0, t0 + secs(0.1));
        assert_eq!(s.next_deadline(0, SlotState::Idle), Some(t0 + secs(0.5)));
    }

    fn link(last_rx: Instant, in_flight: u64, pto: u64) -> LinkSample {
        LinkSample {
            last_rx,
            bytes_in_flight: in_flight,
            pto_count: pto,
        }
    }

    /// README: "A connected session that hears nothing from the server for 6 s while it waits
    /// for an answer is replaced."
    #[test]
    fn silent_session_waiting_for_an_answer_is_replaced_after_six_seconds() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        s.connected(0);
        let heard = t0 + secs(1.0);
        let mut replaced_at = None;
        let mut now = heard;
        while now < t0 + secs(20.0) {
            if s.liveness_due(now) {
                if let Some(silent) = s.check_liveness(0, now, link(heard, 1200, 0)) {
                    assert!(silent >= DEAD_AFTER);
                    replaced_at = Some(now);
                    break;
                }
            }
            now += secs(0.1);
        }
        let waited = replaced_at.expect("replaced") - heard;
        assert!(
            waited >= DEAD_AFTER && waited <= DEAD_AFTER + LIVENESS_CHECK,
            "{waited:?}"
        );
    }

    #[test]
    fn idle_or_answered_sessions_are_never_replaced() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        // Nothing in flight: silence is fine (an idle tunnel).
        for k in 0..100 {
            let now = t0 + secs(0.5 * k as f64);
            assert_eq!(s.check_liveness(0, now, link(t0, 0, 0)), None);
        }
        // Waiting, but the server answers every second.
        for k in 0..100 {
            let now = t0 + secs(0.5 * k as f64);
            let heard = t0 + secs((0.5 * k as f64).floor());
            assert_eq!(s.check_liveness(0, now, link(heard, 5000, 0)), None);
        }
    }

    #[test]
    fn probe_timeouts_count_as_waiting_even_with_nothing_in_flight() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        let heard = t0 + secs(0.1);
        assert_eq!(s.check_liveness(0, heard, link(heard, 0, 3)), None); // base = 3
        // In flight reads 0 between retransmissions, but a new probe timeout fired.
        let probe = heard + secs(1.0);
        assert_eq!(s.check_liveness(0, probe, link(heard, 0, 4)), None);
        assert_eq!(
            s.check_liveness(0, probe + secs(5.9), link(heard, 0, 5)),
            None
        );
        assert_eq!(
            s.check_liveness(0, probe + secs(6.0), link(heard, 0, 5)),
            Some(secs(7.0))
        );
        // Old probe timeouts (before the server was last heard) do not count.
        let heard = t0 + secs(8.0);
        assert_eq!(s.check_liveness(0, heard, link(heard, 0, 5)), None);
        assert_eq!(
            s.check_liveness(0, heard + secs(10.0), link(heard, 0, 5)),
            None
        );
    }

    #[test]
    fn liveness_is_sampled_every_half_second_while_waiting_for_an_answer() {
        let t0 = Instant::now();
        let mut s = sup(1, t0);
        // Idle tunnel: no liveness timer (samples ride on other wake-ups).
        assert_eq!(s.next_deadline(0, SlotState::Connected), None);
        assert!(!s.liveness_due(t0 + secs(0.4)));
        assert!(s.liveness_due(t0 + secs(0.6)));
        assert_eq!(s.check_liveness(0, t0 + secs(0.6), link(t0, 0, 0)), None);
        assert_eq!(s.next_deadline(0, SlotState::Connected), None);
        // Data in flight, nothing heard: sampled every 500 ms from here.
        assert!(s.liveness_due(t0 + secs(1.3)));
        assert_eq!(s.check_liveness(0, t0 + secs(1.3), link(t0, 900, 0)), None);
        assert_eq!(
            s.next_deadline(0, SlotState::Connected),
            Some(t0 + secs(1.8))
        );
        assert!(!s.liveness_due(t0 + secs(1.7)));
        // The answer came: the timer stops again.
        let heard = t0 + secs(1.8);
        assert!(s.liveness_due(heard));
        assert_eq!(s.check_liveness(0, heard, link(heard, 0, 0)), None);
        assert_eq!(s.next_deadline(0, SlotState::Connected), None);
    }

    /// The no-answer message ("no answer from the server …") is printed once per outage.
    #[test]
    fn failures_are_reported_once_per_outage() {
        let t0 = Instant::now();
        let mut s = sup(2, t0);
        assert!(s.connected(0), "the first connection is announced");
        assert!(!s.connected(1), "later ones are not");
        assert!(s.failed(0, t0, Failure::Local).first_report);
        assert!(s.failed(0, t0, Failure::NoAnswer).first_report);
        assert!(!s.failed(0, t0, Failure::NoAnswer).first_report);
        assert!(!s.failed(0, t0, Failure::Silent).first_report);
        assert!(s.connected(0), "the end of a reported outage is announced");
        assert!(!s.connected(0));
        assert!(s.failed(0, t0, Failure::Ended).first_report);
        assert!(
            s.failed(0, t0, Failure::Ended).first_report,
            "not an outage"
        );
    }

    /// README: "No answer to the handshake within 10 s: 'no answer from the server …'".
    #[test]
    fn no_answer_is_reported_ten_seconds_after_the_hello() {
        use crate::proto::{ClientEvent, ClientSession, ConnectorConfig};
        let t0 = Instant::now();
        let cfg = ConnectorConfig {
            handshake_timeout: NO_ANSWER_TIMEOUT,
            ..ConnectorConfig::default()
        };
        let key = crate::keys::generate_key().unwrap();
        let mut hello = ClientSession::connect(cfg, &key, t0, 1_700_000_000, [7; 32]).unwrap();
        let mut buf = vec![0u8; 2048];
        let mut s = sup(1, t0);
        let mut now = t0;
        let mut reported = None;
        while now <= t0 + secs(12.0) {
            while hello.poll_transmit(now, &mut buf).is_some() {}
            if hello.poll_timeout().is_some_and(|t| now >= t) {
                hello.handle_timeout(now);
            }
            if let Some(ClientEvent::HandshakeTimeout) = hello.poll_event() {
                assert!(s.failed(0, now, Failure::NoAnswer).first_report);
                reported = Some(now);
                break;
            }
            now += secs(0.01);
        }
        let at = reported.expect("HandshakeTimeout") - t0;
        assert!((secs(10.0)..secs(10.02)).contains(&at), "{at:?}");
    }
}
