//! The transport's named timers: one deadline per [`Timer`] in a [`TimerTable`], armed and
//! stopped explicitly, so that a timer that fired is never reported again until it is re-armed.
//!
//! [`Transport::handle_timeout`](super::Transport::handle_timeout) stops each expired timer
//! before acting on it (as quinn-proto's `Connection::handle_timeout` does), and
//! [`Transport::poll_timeout`](super::Transport::poll_timeout) reports the table's earliest
//! deadline. A deadline that is merely *derived* from state (`last_sent + keepalive`, an ACK
//! deadline kept until the ACK is written) would stay in the past while the layer above refuses
//! to send, and the event loop would spin at zero timeout.
//!
//! Pacing is not in the table: it is a wake-up to call `poll_transmit`, not an action, and it is
//! computed from the pacer only while data waits and only while it lies in the future.

use std::time::Instant;

/// A deadline the transport waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// The closing drain period ends: the session is closed.
    Close,
    /// Nothing was received for `idle_timeout`: the session is closed.
    Idle,
    /// The delayed-ACK deadline: the next `poll_transmit` must acknowledge.
    AckDelay,
    /// RACK time threshold: the oldest outstanding packet becomes lost.
    LossDetection,
    /// Probe timeout: nothing was acknowledged for a PTO; everything in flight is lost.
    Pto,
    /// Nothing was sent for `keepalive_interval`: send a PING.
    KeepAlive,
}

impl Timer {
    /// Every timer, in the order `handle_timeout` runs them.
    pub(super) const VALUES: [Timer; 6] = [
        Timer::Close,
        Timer::Idle,
        Timer::AckDelay,
        Timer::LossDetection,
        Timer::Pto,
        Timer::KeepAlive,
    ];
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Default)]
pub(super) struct TimerTable {
    deadlines: [Option<Instant>; Timer::VALUES.len()],
}

impl TimerTable {
    /// Arms `timer` at `at` (replacing an earlier deadline).
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer as usize] = Some(at);
    }

    /// Arms `timer` at `at`, or stops it for `None`.
    pub(super) fn set_or_stop(&mut self, timer: Timer, at: Option<Instant>) {
        self.deadlines[timer as usize] = at;
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    pub(super) fn stop_all(&mut self) {
        self.deadlines = Default::default();
    }

    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer as usize]
    }

    pub(super) fn is_armed(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    /// Armed and due at `now`.
    pub(super) fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }

    /// If `timer` is due at `now`, stops it and returns `true` (the caller then acts on it).
    pub(super) fn take_expired(&mut self, timer: Timer, now: Instant) -> bool {
        let expired = self.is_expired(timer, now);
        if expired {
            self.stop(timer);
        }
        expired
    }

    /// The earliest armed deadline.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn values_index_every_slot_once() {
        for (i, t) in Timer::VALUES.iter().enumerate() {
            assert_eq!(*t as usize, i);
        }
    }

    #[test]
    fn expired_timers_stop_and_the_earliest_is_reported() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::KeepAlive, t0 + Duration::from_secs(15));
        table.set(Timer::AckDelay, t0 + Duration::from_millis(25));
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_millis(25)));
        let now = t0 + Duration::from_millis(30);
        assert!(!table.take_expired(Timer::KeepAlive, now));
        assert!(table.take_expired(Timer::AckDelay, now));
        assert!(!table.take_expired(Timer::AckDelay, now), "fires once");
        assert!(!table.is_armed(Timer::AckDelay));
        assert_eq!(
            table.next_timeout(),
            Some(t0 + Duration::from_secs(15)),
            "a fired timer is never reported again"
        );
        table.set_or_stop(Timer::Pto, None);
        table.stop_all();
        assert_eq!(table.next_timeout(), None);
    }
}
