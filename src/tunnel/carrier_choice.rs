//! The client's carrier policy, sans-IO: which carrier (UDP or the TCP carrier, docs/PROTOCOL.md
//! §7) new tunnel sessions use, when `auto` moves from UDP to TCP, and when it tries UDP again
//! and moves back. Takes `now` and what happened to sessions; returns switches, probe requests
//! and deadlines. The client loop ([`super::client_loop`]) does the I/O.
//!
//! The rules of `auto` (`udp` and `uot` never switch):
//! - start on UDP; a UDP hello unanswered for [`FALLBACK_AFTER`] moves to TCP;
//! - a UDP session that dies (silent, idle timeout) moves to TCP at once and probes UDP at once
//!   (a restarted server answers the probe and UDP is back within a round trip; a blocked path
//!   does not, and the reconnect is already on TCP); the [`UDP_DEATHS`]th death within
//!   [`DEATH_WINDOW`] moves to TCP without the immediate probe (UDP handshakes work there but
//!   sessions do not last);
//! - on TCP, an attempt that never reaches the server (connection refused, closed or unanswered
//!   before the reply) before any TCP session came up moves back to UDP, so a client alternates
//!   until one carrier answers;
//! - once a TCP session is up, a UDP handshake probe runs [`PROBE_FIRST`] later, then at doubling
//!   gaps up to [`PROBE_MAX`]; a probe the server answers moves back to UDP.

use std::time::{Duration, Instant};

use crate::config::CarrierMode;

/// A UDP hello unanswered this long moves `auto` to the TCP carrier.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// This many UDP sessions dying within [`DEATH_WINDOW`] move `auto` to the TCP carrier without
/// an immediate UDP probe.
pub const UDP_DEATHS: u32 = 3;
/// See [`UDP_DEATHS`].
pub const DEATH_WINDOW: Duration = Duration::from_secs(120);
/// First UDP probe after a TCP session came up.
pub const PROBE_FIRST: Duration = Duration::from_secs(30);
/// Longest gap between UDP probes (the gap doubles after each failed probe).
pub const PROBE_MAX: Duration = Duration::from_secs(600);
/// A probe's hello unanswered this long failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What carries a tunnel session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Udp,
    /// The TCP carrier.
    Tcp,
}

impl Carrier {
    /// For log lines.
    pub fn name(self) -> &'static str {
        match self {
            Carrier::Udp => "UDP",
            Carrier::Tcp => "the TCP carrier",
        }
    }
}

/// How an attempt or a session on a carrier ended, as far as the choice of carrier cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The attempt never reached the server: hello unanswered, TCP connection refused or
    /// closed before the reply.
    Unanswered,
    /// A connected session died of the path: silent, idle timeout, TCP connection broken.
    Died,
    /// Nothing about the carrier (a refusal, a close by the server, trouble on this machine).
    Other,
}

/// A change of carrier for new sessions; the loop logs `why` and moves its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub to: Carrier,
    pub why: &'static str,
}

/// What the loop should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Switch(Switch),
    /// Run a UDP handshake probe and report it with [`CarrierChoice::probe_done`].
    Probe,
}

/// The carrier policy of one client (all its session slots).
#[derive(Debug)]
pub struct CarrierChoice {
    mode: CarrierMode,
    current: Carrier,
    /// Since when a UDP hello has waited for an answer (`auto` on UDP).
    udp_waiting_since: Option<Instant>,
    /// A TCP session came up since the last switch to TCP.
    tcp_answered: bool,
    /// UDP deaths counted since `deaths_since`.
    deaths: u32,
    deaths_since: Instant,
    /// When the next UDP probe is due (`auto` on TCP, once TCP answered).
    probe_at: Option<Instant>,
    probe_gap: Duration,
    /// When new sessions last moved to UDP (a UDP period that outlived [`DEATH_WINDOW`] was
    /// healthy: the probe gap starts over after it).
    udp_since: Instant,
    probing: bool,
}

impl CarrierChoice {
    pub fn new(mode: CarrierMode, now: Instant) -> Self {
        CarrierChoice {
            mode,
            current: match mode {
                CarrierMode::Uot => Carrier::Tcp,
                CarrierMode::Udp | CarrierMode::Auto => Carrier::Udp,
            },
            udp_waiting_since: None,
            tcp_answered: false,
            deaths: 0,
            deaths_since: now,
            probe_at: None,
            probe_gap: PROBE_FIRST,
            udp_since: now,
            probing: false,
        }
    }

    /// The carrier new sessions use.
    pub fn current(&self) -> Carrier {
        self.current
    }

    fn auto(&self) -> bool {
        self.mode == CarrierMode::Auto
    }

    fn switch(&mut self, to: Carrier, why: &'static str, now: Instant) -> Switch {
        if to == Carrier::Tcp && self.current == Carrier::Udp && self.udp_was_healthy(now) {
            self.probe_gap = PROBE_FIRST;
        }
        self.current = to;
        if to == Carrier::Udp {
            self.udp_since = now;
        }
        self.udp_waiting_since = None;
        self.tcp_answered = false;
        self.probe_at = None;
        Switch { to, why }
    }

    /// Whether the UDP period that ends now lasted longer than [`DEATH_WINDOW`]: then it was
    /// healthy and the next probes start over from the first gap. A short one (UDP answers a probe, then its
    /// sessions die) keeps the gap growing, so a path that kills UDP flows is not switched back
    /// and forth at a steady rate.
    fn udp_was_healthy(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.udp_since) > DEATH_WINDOW
    }

    /// A session attempt sent its hello over `carrier`.
    pub fn attempt_started(&mut self, carrier: Carrier, now: Instant) {
        if self.auto() && carrier == Carrier::Udp && self.current == Carrier::Udp {
            self.udp_waiting_since.get_or_insert(now);
        }
    }

    /// The server answered a hello over `carrier` (accepted or refused: either way it is reachable).
    pub fn answered(&mut self, carrier: Carrier, now: Instant) {
        match carrier {
            Carrier::Udp => self.udp_waiting_since = None,
            Carrier::Tcp => {
                if self.auto() && self.current == Carrier::Tcp {
                    self.tcp_answered = true;
                    if !self.probing && self.probe_at.is_none() {
                        self.schedule_probe(now);
                    }
                }
            }
        }
    }

    /// An attempt or session over `carrier` ended with `loss`.
    pub fn lost(&mut self, carrier: Carrier, now: Instant, loss: Loss) -> Option<Switch> {
        if !self.auto() || carrier != self.current {
            return None;
        }
        match (carrier, loss) {
            (Carrier::Udp, Loss::Unanswered) => {
                Some(self.switch(Carrier::Tcp, "no answer over UDP", now))
            }
            (Carrier::Udp, Loss::Died) => {
                if now.saturating_duration_since(self.deaths_since) > DEATH_WINDOW {
                    self.deaths = 0;
                    self.deaths_since = now;
                }
                self.deaths += 1;
                if self.deaths >= UDP_DEATHS {
                    self.deaths = 0;
                    return Some(self.switch(Carrier::Tcp, "UDP sessions keep dying", now));
                }
                let switch = self.switch(Carrier::Tcp, "the UDP session went silent", now);
                self.probe_at = Some(now);
                Some(switch)
            }
            (Carrier::Udp, Loss::Other) => {
                self.udp_waiting_since = None;
                None
            }
            (Carrier::Tcp, Loss::Unanswered) if !self.tcp_answered => {
                Some(self.switch(Carrier::Udp, "the TCP carrier did not answer either", now))
            }
            (Carrier::Tcp, _) => None,
        }
    }

    /// When [`Self::poll`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.auto() {
            return None;
        }
        match self.current {
            Carrier::Udp => self.udp_waiting_since.map(|t| t + FALLBACK_AFTER),
            Carrier::Tcp => self.probe_at.filter(|_| !self.probing),
        }
    }

    /// The switch or probe due at `now`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        let due = self.next_deadline().is_some_and(|t| now >= t);
        if !due {
            return None;
        }
        match self.current {
            Carrier::Udp => Some(Action::Switch(self.switch(
                Carrier::Tcp,
                "no answer over UDP",
                now,
            ))),
            Carrier::Tcp => {
                self.probing = true;
                self.probe_at = None;
                Some(Action::Probe)
            }
        }
    }

    /// The UDP probe ended: `answered` if the server answered it.
    pub fn probe_done(&mut self, now: Instant, answered: bool) -> Option<Switch> {
        if !std::mem::replace(&mut self.probing, false) || self.current != Carrier::Tcp {
            return None;
        }
        if answered {
            return Some(self.switch(Carrier::Udp, "UDP is answered again", now));
        }
        self.schedule_probe(now);
        None
    }

    /// The next probe one gap from `now`; the gap after it is twice as long.
    fn schedule_probe(&mut self, now: Instant) {
        self.probe_at = Some(now + self.probe_gap);
        self.probe_gap = (self.probe_gap * 2).min(PROBE_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn to(c: Carrier) -> impl Fn(Switch) -> Carrier {
        move |s: Switch| {
            assert_eq!(s.to, c);
            s.to
        }
    }

    #[test]
    fn udp_and_uot_never_switch() {
        let t0 = Instant::now();
        for (mode, carrier) in [
            (CarrierMode::Udp, Carrier::Udp),
            (CarrierMode::Uot, Carrier::Tcp),
        ] {
            let mut c = CarrierChoice::new(mode, t0);
            assert_eq!(c.current(), carrier);
            c.attempt_started(carrier, t0);
            assert_eq!(c.next_deadline(), None);
            assert_eq!(c.poll(t0 + secs(60.0)), None);
            for loss in [Loss::Unanswered, Loss::Died, Loss::Died, Loss::Died] {
                assert_eq!(c.lost(carrier, t0 + secs(1.0), loss), None);
            }
            c.answered(carrier, t0);
            assert_eq!(c.poll(t0 + secs(3600.0)), None);
            assert_eq!(c.current(), carrier);
        }
    }

    #[test]
    fn auto_falls_back_to_tcp_when_the_udp_hello_goes_unanswered() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        assert_eq!(c.current(), Carrier::Udp);
        assert_eq!(c.next_deadline(), None);
        c.attempt_started(Carrier::Udp, t0);
        // A second slot's later hello does not push the deadline out.
        c.attempt_started(Carrier::Udp, t0 + secs(1.0));
        assert_eq!(c.next_deadline(), Some(t0 + FALLBACK_AFTER));
        assert_eq!(c.poll(t0 + secs(2.9)), None);
        let Some(Action::Switch(s)) = c.poll(t0 + FALLBACK_AFTER) else {
            panic!("expected a switch")
        };
        assert_eq!(s.to, Carrier::Tcp);
        assert_eq!(c.current(), Carrier::Tcp);
        // Nothing more until TCP answers (then a probe is scheduled).
        assert_eq!(c.next_deadline(), None);
        assert_eq!(c.poll(t0 + secs(100.0)), None);
    }

    #[test]
    fn an_answer_over_udp_stops_the_fallback_clock() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        c.attempt_started(Carrier::Udp, t0);
        c.answered(Carrier::Udp, t0 + secs(2.0));
        assert_eq!(c.next_deadline(), None);
        assert_eq!(c.poll(t0 + secs(10.0)), None);
        assert_eq!(c.current(), Carrier::Udp);
        // A refusal or a close by the server says nothing about the carrier.
        c.attempt_started(Carrier::Udp, t0 + secs(20.0));
        assert_eq!(c.lost(Carrier::Udp, t0 + secs(20.5), Loss::Other), None);
        assert_eq!(c.next_deadline(), None);
        // The connector's own handshake timeout (no fallback yet) also moves to TCP.
        c.attempt_started(Carrier::Udp, t0 + secs(30.0));
        let s = c.lost(Carrier::Udp, t0 + secs(31.0), Loss::Unanswered);
        assert_eq!(s.map(to(Carrier::Tcp)), Some(Carrier::Tcp));
    }

    /// A UDP session dies at `at`: expect a switch to TCP; returns whether a probe is due at once.
    fn udp_death(c: &mut CarrierChoice, at: Instant) -> bool {
        c.answered(Carrier::Udp, at - secs(10.0));
        let s = c.lost(Carrier::Udp, at, Loss::Died);
        assert_eq!(s.map(to(Carrier::Tcp)), Some(Carrier::Tcp));
        c.next_deadline() == Some(at)
    }

    #[test]
    fn a_udp_session_that_dies_moves_to_tcp_and_probes_udp_at_once() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        let died = t0 + secs(20.0);
        assert!(udp_death(&mut c, died), "probe due at once");
        assert_eq!(c.current(), Carrier::Tcp);
        // Reconnecting over TCP does not delay the probe.
        c.answered(Carrier::Tcp, died + secs(0.5));
        assert_eq!(c.next_deadline(), Some(died));
        assert_eq!(c.poll(died + secs(0.5)), Some(Action::Probe));
        // A restarted server answers the probe: back to UDP.
        let s = c.probe_done(died + secs(0.6), true);
        assert_eq!(s.map(to(Carrier::Udp)), Some(Carrier::Udp));
        // A blocked path does not: stay on TCP, probe again later.
        assert!(udp_death(&mut c, died + secs(30.0)));
        assert_eq!(c.poll(died + secs(30.0)), Some(Action::Probe));
        assert_eq!(c.probe_done(died + secs(35.0), false), None);
        assert_eq!(c.current(), Carrier::Tcp);
        // The quick probe did not count: the next comes after the first gap.
        assert_eq!(c.next_deadline(), Some(died + secs(35.0) + PROBE_FIRST));
    }

    #[test]
    fn repeated_udp_deaths_move_to_tcp_without_the_quick_probe() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        // Handshakes work (each probe is answered), sessions keep dying.
        for k in 0..UDP_DEATHS - 1 {
            let at = t0 + secs(20.0 + 20.0 * f64::from(k));
            assert!(udp_death(&mut c, at), "death {k}: quick probe");
            assert_eq!(c.poll(at), Some(Action::Probe));
            assert!(c.probe_done(at + secs(0.1), true).is_some());
        }
        let last = t0 + secs(20.0 + 20.0 * f64::from(UDP_DEATHS - 1));
        assert!(
            !udp_death(&mut c, last),
            "no quick probe after the last death"
        );
        assert_eq!(c.next_deadline(), None);
        c.answered(Carrier::Tcp, last + secs(1.0));
        assert_eq!(c.next_deadline(), Some(last + secs(1.0) + PROBE_FIRST));
    }

    #[test]
    fn deaths_spread_wider_than_the_window_keep_the_quick_probe() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        let gap = DEATH_WINDOW.as_secs_f64() / f64::from(UDP_DEATHS - 1) + 1.0;
        for k in 0..10 {
            let at = t0 + secs(20.0 + gap * f64::from(k));
            assert!(udp_death(&mut c, at), "death {k}");
            assert_eq!(c.poll(at), Some(Action::Probe));
            assert!(c.probe_done(at + secs(0.1), true).is_some());
        }
        assert_eq!(c.current(), Carrier::Udp);
    }

    #[test]
    fn when_neither_answers_the_carriers_alternate() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        let mut t = t0;
        for _ in 0..3 {
            c.attempt_started(Carrier::Udp, t);
            t += FALLBACK_AFTER;
            assert!(matches!(c.poll(t), Some(Action::Switch(_))));
            assert_eq!(c.current(), Carrier::Tcp);
            c.attempt_started(Carrier::Tcp, t);
            t += secs(0.01);
            let s = c.lost(Carrier::Tcp, t, Loss::Unanswered);
            assert_eq!(s.map(to(Carrier::Udp)), Some(Carrier::Udp));
            t += secs(1.0);
        }
        // A loss reported late for the carrier no longer current changes nothing.
        assert_eq!(c.lost(Carrier::Tcp, t, Loss::Unanswered), None);
        assert_eq!(c.current(), Carrier::Udp);
    }

    #[test]
    fn tcp_that_worked_stays_through_deaths_and_failed_reconnects() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        c.attempt_started(Carrier::Udp, t0);
        let _ = c.poll(t0 + FALLBACK_AFTER);
        c.answered(Carrier::Tcp, t0 + secs(3.1));
        for k in 0..5 {
            let at = t0 + secs(4.0 + f64::from(k));
            assert_eq!(c.lost(Carrier::Tcp, at, Loss::Died), None);
            // A server restart: reconnects fail for a while, but TCP is known to work.
            assert_eq!(c.lost(Carrier::Tcp, at, Loss::Unanswered), None);
        }
        assert_eq!(c.current(), Carrier::Tcp);
    }

    #[test]
    fn probes_back_off_and_a_probe_answered_moves_back_to_udp() {
        let t0 = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, t0);
        c.attempt_started(Carrier::Udp, t0);
        let _ = c.poll(t0 + FALLBACK_AFTER);
        let up = t0 + secs(4.0);
        c.answered(Carrier::Tcp, up);
        assert_eq!(c.next_deadline(), Some(up + PROBE_FIRST));
        // More TCP sessions answering do not push the probe out.
        c.answered(Carrier::Tcp, up + secs(10.0));
        assert_eq!(c.next_deadline(), Some(up + PROBE_FIRST));
        assert_eq!(c.poll(up + PROBE_FIRST - secs(0.1)), None);
        let mut at = up + PROBE_FIRST;
        let mut gap = PROBE_FIRST;
        let mut gaps = Vec::new();
        for _ in 0..7 {
            assert_eq!(c.poll(at), Some(Action::Probe));
            // One probe at a time.
            assert_eq!(c.next_deadline(), None);
            assert_eq!(c.poll(at + secs(1.0)), None);
            let done = at + PROBE_TIMEOUT;
            assert_eq!(c.probe_done(done, false), None);
            let next = c.next_deadline().unwrap();
            gap = next - done;
            gaps.push(gap.as_secs());
            at = next;
        }
        assert_eq!(gaps, [60, 120, 240, 480, 600, 600, 600]);
        assert_eq!(gap, PROBE_MAX);
        assert_eq!(c.poll(at), Some(Action::Probe));
        let s = c.probe_done(at + secs(0.2), true);
        assert_eq!(s.map(to(Carrier::Udp)), Some(Carrier::Udp));
        assert_eq!(c.current(), Carrier::Udp);
        assert_eq!(c.next_deadline(), None);
        // A stray second report changes nothing.
        assert_eq!(c.probe_done(at + secs(0.3), true), None);
        // A fall-back after a healthy UDP period (longer than DEATH_WINDOW) starts the probes
        // from the first gap again.
        let t1 = at + DEATH_WINDOW + secs(10.0);
        c.attempt_started(Carrier::Udp, t1);
        let _ = c.poll(t1 + FALLBACK_AFTER);
        c.answered(Carrier::Tcp, t1 + secs(4.0));
        assert_eq!(c.next_deadline(), Some(t1 + secs(4.0) + PROBE_FIRST));
    }

    #[test]
    fn a_path_that_keeps_killing_udp_sessions_is_probed_less_and_less_often() {
        // UDP answers every probe, then its session dies 10 s later: each trip back to UDP must
        // wait longer than the last (the old policy reset the gap on every move to UDP).
        let mut now = Instant::now();
        let mut c = CarrierChoice::new(CarrierMode::Auto, now);
        let mut waits = Vec::new();
        for _ in 0..9 {
            now += secs(10.0);
            let s = c.lost(Carrier::Udp, now, Loss::Died);
            assert_eq!(s.map(to(Carrier::Tcp)), Some(Carrier::Tcp));
            c.answered(Carrier::Tcp, now + secs(0.5));
            let probe = c.next_deadline().expect("a probe is scheduled");
            waits.push((probe - now).as_secs());
            assert_eq!(c.poll(probe), Some(Action::Probe));
            now = probe + secs(0.2);
            assert!(c.probe_done(now, true).is_some(), "back to UDP");
        }
        // The quick probes after single deaths stay (a restarted server comes back at once),
        // but every third death waits twice as long as the one before.
        let slow: Vec<u64> = waits.iter().copied().filter(|w| *w > 0).collect();
        assert_eq!(slow, [30, 60, 120], "{waits:?}");
    }
}
