//! Session-level flow control: the credit the peer granted us for new stream bytes (all
//! streams together) and the window we grant the peer, advanced as the application reads.

/// A window update is sent once the limit can move by at least 1/this of the window.
pub const WINDOW_UPDATE_FRACTION: u64 = 8;

/// Our sending side: new (never sent) stream bytes may not exceed the peer's MAX_DATA.
#[derive(Debug, Clone)]
pub struct SendCredit {
    max: u64,
    used: u64,
}

impl SendCredit {
    pub fn new(initial_max: u64) -> Self {
        Self {
            max: initial_max,
            used: 0,
        }
    }

    pub fn available(&self) -> u64 {
        self.max.saturating_sub(self.used)
    }

    pub fn consume(&mut self, n: u64) {
        self.used += n;
    }

    /// Applies a MAX_DATA frame; returns `true` if the limit grew.
    pub fn raise(&mut self, max: u64) -> bool {
        if max > self.max {
            self.max = max;
            true
        } else {
            false
        }
    }
}

/// Our receiving side: the sum over streams of the highest offset received (plus final sizes
/// of reset streams) may not exceed what we advertised.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    window: u64,
    advertised: u64,
    received: u64,
    consumed: u64,
}

/// The peer sent more than the session window allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowControlViolation;

impl RecvWindow {
    pub fn new(window: u64) -> Self {
        Self {
            window,
            advertised: window,
            received: 0,
            consumed: 0,
        }
    }

    pub fn advertised(&self) -> u64 {
        self.advertised
    }

    /// Bytes received and not yet consumed (read or discarded) — the memory the peer controls.
    pub fn outstanding(&self) -> u64 {
        self.received - self.consumed
    }

    /// Whether `n` more bytes would stay within the advertised window.
    pub fn can_receive(&self, n: u64) -> bool {
        self.received + n <= self.advertised
    }

    pub fn on_received(&mut self, n: u64) -> Result<(), FlowControlViolation> {
        let total = self.received + n;
        if total > self.advertised {
            return Err(FlowControlViolation);
        }
        self.received = total;
        Ok(())
    }

    /// Credit granted and not yet consumed: the most the peer can make us hold from now on.
    pub fn committed(&self) -> u64 {
        self.advertised - self.consumed
    }

    /// Changes how far ahead of what was consumed future grants reach. Lowering it revokes
    /// nothing the peer was told; while the peer was told nothing (`announced` false) the
    /// advertised limit follows it.
    pub fn set_window(&mut self, window: u64, announced: bool) {
        self.window = window;
        if !announced {
            self.advertised = self.consumed + window;
        }
    }

    /// While the peer was told nothing, lowers the first credit it will be told to `credit`
    /// (later grants reach the window again as the application reads).
    pub fn limit_unannounced(&mut self, credit: u64, announced: bool) {
        if !announced {
            self.advertised = self.advertised.min(self.consumed + credit);
        }
    }

    /// Records consumed bytes. Returns the new limit if it moved enough to advertise.
    pub fn on_consumed(&mut self, n: u64) -> Option<u64> {
        self.consumed = (self.consumed + n).min(self.received);
        let target = self.consumed + self.window;
        if target > self.advertised
            && target - self.advertised >= self.window / WINDOW_UPDATE_FRACTION
        {
            self.advertised = target;
            Some(target)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_credit() {
        let mut c = SendCredit::new(100);
        c.consume(60);
        assert_eq!(c.available(), 40);
        assert!(!c.raise(50));
        assert!(c.raise(200));
        assert_eq!(c.available(), 140);
    }

    #[test]
    fn a_lowered_window_revokes_nothing_announced_and_grants_less_from_then_on() {
        let mut w = RecvWindow::new(1000);
        w.set_window(400, false);
        assert_eq!(
            (w.advertised(), w.committed()),
            (400, 400),
            "not announced yet"
        );
        w.set_window(1000, true);
        w.on_received(400).unwrap();
        assert_eq!(w.on_consumed(400), Some(1400));
        w.set_window(200, true);
        assert_eq!(w.advertised(), 1400, "announced credit stays");
        w.on_received(1000).unwrap();
        assert_eq!(
            w.on_consumed(700),
            None,
            "1100 read + 200 < 1400: nothing to grant"
        );
        assert_eq!(w.committed(), 300);
        assert_eq!(
            w.on_consumed(200),
            Some(1500),
            "200 ahead of what was read, not 1000"
        );
        assert_eq!(w.committed(), 200);
        // A first credit below the window grows back to the window as data is read.
        let mut w = RecvWindow::new(1000);
        w.limit_unannounced(300, false);
        assert_eq!(w.committed(), 300);
        w.limit_unannounced(100, true);
        assert_eq!(w.committed(), 300, "announced: unchanged");
        w.on_received(300).unwrap();
        assert_eq!(w.on_consumed(300), Some(1300));
    }

    #[test]
    fn recv_window_enforced_and_advanced() {
        let mut w = RecvWindow::new(100);
        w.on_received(100).unwrap();
        assert_eq!(w.on_received(1), Err(FlowControlViolation));
        assert_eq!(w.on_consumed(10), None, "moved 10 < 100/8");
        assert_eq!(w.on_consumed(5), Some(115));
        w.on_received(15).unwrap();
        assert_eq!(w.outstanding(), 100);
    }
}
