//! The server loop's counters as `GET /metrics` sees them: [`TunnelStats`] is counted on the
//! loop thread without locks and copied into a [`SharedTunnelStats`] once per second (with the
//! ledger sync), so a scrape is at most about one second behind and never contends with packets.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::carrier_conns::NOT_OSTP_REASONS;
use crate::proto::{EndpointStats, RefuseReason};

/// Label values of the refusal reasons, in [`refusal_index`] order.
pub const REFUSAL_REASONS: [&str; 7] = [
    "session_limit",
    "disabled",
    "server_full",
    "quota_exceeded",
    "expired",
    "device_limit",
    "other",
];

/// Where a refusal reason is counted in [`TunnelStats::refused`].
pub fn refusal_index(reason: RefuseReason) -> usize {
    match reason {
        RefuseReason::SessionLimit => 0,
        RefuseReason::Disabled => 1,
        RefuseReason::ServerFull => 2,
        RefuseReason::QuotaExceeded => 3,
        RefuseReason::Expired => 4,
        RefuseReason::DeviceLimit => 5,
        RefuseReason::Other(_) => 6,
    }
}

/// The tunnel loop's counters and gauges (plain integers: the loop owns them; 64-bit values
/// are copied under a mutex, never shared as atomics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// The protocol endpoint's counters (datagrams, drops by reason, sessions created).
    pub endpoint: EndpointStats,
    /// Authenticated handshake refusals, by [`refusal_index`].
    pub refused: [u64; REFUSAL_REASONS.len()],
    /// Live sessions (gauge).
    pub sessions: u64,
    /// Outbound streams started (admitted by the ledger and the quotas).
    pub streams_opened: u64,
    /// Outbound streams open now, connecting or resolving included (gauge).
    pub streams_active: u64,
    /// Stream destinations the destination guard refused.
    pub destinations_refused: u64,
    /// UDP relay datagram destinations the destination guard refused.
    pub datagram_destinations_refused: u64,
    /// Times the tunnel loop woke up (returns from its wait).
    pub loop_wakeups: u64,
    /// TCP carrier: the counters of the `listen_tcp` connections.
    pub tcp: TcpStats,
    /// Unix seconds of the copy (0 = never published).
    pub published_unix: u64,
}

/// The TCP carrier's counters and gauges (docs/PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections accepted on the `listen_tcp` addresses.
    pub accepted: u64,
    /// Hellos over TCP answered with an accept (carrier sessions) / with a refusal.
    pub sessions: u64,
    pub refused: u64,
    /// Connections found not to be OSTP, by [`NotOstpReason::index`](super::carrier_conns::NotOstpReason::index).
    pub not_ostp: [u64; NOT_OSTP_REASONS.len()],
    /// Not-OSTP connections handed to the fallback, and fallback connects that failed (those
    /// connections are discarded instead).
    pub fallback_splices: u64,
    pub fallback_failed: u64,
    /// Not-OSTP connections read and discarded until their random deadline.
    pub discards: u64,
    /// Connections closed early because `max_unauthenticated_tcp` was reached (undecided or
    /// discarding ones, and fallback splices).
    pub evicted: u64,
    /// Connections now undecided or discarding / carrying a session / spliced (gauges).
    pub unauthenticated: u64,
    pub carriers: u64,
    pub splices: u64,
}

impl TunnelStats {
    /// Counts one authenticated refusal.
    pub fn refusal(&mut self, reason: RefuseReason) {
        self.refused[refusal_index(reason)] += 1;
    }
}

/// The last published copy, read by the API.
pub type SharedTunnelStats = Arc<Mutex<TunnelStats>>;

/// Locks the published copy (briefly: one copy in, one copy out), tolerating poisoning.
pub fn lock_stats(stats: &SharedTunnelStats) -> MutexGuard<'_, TunnelStats> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label() {
        let mut s = TunnelStats::default();
        for (code, label) in (1u8..=6).zip(REFUSAL_REASONS) {
            let reason = RefuseReason::from_code(code);
            s.refusal(reason);
            assert_eq!(REFUSAL_REASONS[refusal_index(reason)], label);
        }
        s.refusal(RefuseReason::Other(200));
        assert_eq!(s.refused, [1; 7]);
    }
}
