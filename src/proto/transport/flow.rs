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

    /// Records consumed bytes. Returns the new limit if it moved enough to advertise.
    pub fn on_consumed(&mut self, n: u64) -> Option<u64> {
        self.consumed = (self.consumed + n).min(self.received);
        let target = self.consumed + self.window;
        if target - self.advertised >= self.window / WINDOW_UPDATE_FRACTION {
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
