//! Sliding replay window over 64-bit packet numbers (RFC 6479 style bitmap, no allocation).
//!
//! `check` before decrypting, `mark` after the packet authenticated. Packet numbers more than
//! [`REPLAY_WINDOW`] below the highest marked one are rejected as too old.

/// Width of the window in packet numbers.
pub const REPLAY_WINDOW: u64 = 256;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Replay window state.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// Highest marked packet number + 1 (0 = nothing marked yet).
    top: u64,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest packet number marked so far.
    pub fn highest(&self) -> Option<u64> {
        self.top.checked_sub(1)
    }

    fn bit(pn: u64) -> (usize, u64) {
        let i = pn % REPLAY_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// True if `pn` is new and not too old (does not modify the window).
    pub fn check(&self, pn: u64) -> bool {
        if pn >= self.top {
            return pn != u64::MAX;
        }
        if self.top - pn > REPLAY_WINDOW {
            return false;
        }
        let (w, m) = Self::bit(pn);
        self.bits[w] & m == 0
    }

    /// Records `pn` as received. Call only after `check(pn)` and authentication succeeded.
    pub fn mark(&mut self, pn: u64) {
        if pn >= self.top {
            // Clear the bits of packet numbers skipped over (they become "not received").
            let advance = pn + 1 - self.top;
            if advance >= REPLAY_WINDOW {
                self.bits = [0; WORDS];
            } else {
                for skipped in self.top..=pn {
                    let (w, m) = Self::bit(skipped);
                    self.bits[w] &= !m;
                }
            }
            self.top = pn + 1;
        }
        let (w, m) = Self::bit(pn);
        self.bits[w] |= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_duplicates_and_too_old_accepts_reordered() {
        let mut w = ReplayWindow::new();
        assert!(w.check(0));
        w.mark(0);
        assert!(!w.check(0));
        w.mark(10);
        assert!(w.check(5));
        w.mark(5);
        assert!(!w.check(5));
        assert!(!w.check(10));
        w.mark(10 + REPLAY_WINDOW);
        assert!(!w.check(9), "too old");
        assert_eq!(w.highest(), Some(10 + REPLAY_WINDOW));
        assert!(w.check(11));
        assert!(!w.check(10), "10 fell out of the window");
    }

    #[test]
    fn big_jump_clears_stale_bits() {
        let mut w = ReplayWindow::new();
        for pn in 0..300 {
            w.mark(pn);
        }
        w.mark(5000);
        for pn in 4800..5000 {
            assert!(w.check(pn), "{pn}");
        }
        assert!(!w.check(5000));
    }
}
