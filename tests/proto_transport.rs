//! Transport behaviour in a deterministic simulated network: checksummed bulk transfers under
//! loss / reordering / duplication / delay, many concurrent streams, bounded memory with a
//! stalled reader, stream isolation, open results, resets, datagrams, close, idle timeout, and
//! a bounded property test feeding arbitrary payloads and API calls.

#[path = "common/transport_harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{BulkApp, Pair, run_bulk};
use ostp::proto::sim::{LinkConfig, SimRng};
use ostp::proto::transport::frame::{self, Frame, Writer};
use ostp::proto::transport::{
    CloseReason, Destination, OpenResult, ResetReason, Side, StreamError, Transport,
    TransportConfig, TransportEvent,
};

/// Bytes per large transfer: 100 MB in release (as the issue asks), 2 MB in debug builds.
const BIG: u64 = if cfg!(debug_assertions) {
    2_000_000
} else {
    100_000_000
};
/// The 20 % loss case is scaled down (see the report): 10 MB in release.
const BIG_20: u64 = if cfg!(debug_assertions) {
    1_000_000
} else {
    10_000_000
};

fn cfg() -> TransportConfig {
    // max_payload for an MTU of 1280 after IP/UDP and packet protection overhead.
    TransportConfig {
        max_payload: 1200,
        ..TransportConfig::default()
    }
}

fn link(one_way: Duration, loss: f64) -> LinkConfig {
    LinkConfig {
        delay: one_way,
        loss,
        rate_bps: Some(1_000_000_000),
        queue_bytes: 4 * 1024 * 1024,
        mtu: 1280,
        ..LinkConfig::default()
    }
}

fn assert_bulk(link: LinkConfig, seed: u64, streams: usize, up: u64, down: u64, limit: Duration) {
    let r = run_bulk(link, seed, streams, up, down, cfg(), limit);
    assert!(
        r.completed,
        "transfer incomplete after {:?}: verified {} of {} bytes; client {:?}; server {:?}",
        r.virtual_time,
        r.verified_bytes,
        (up + down) * streams as u64,
        r.client,
        r.server
    );
    assert_eq!(r.verified_bytes, (up + down) * streams as u64);
    assert_eq!(r.violations, 0);
    eprintln!(
        "{} bytes in {:?} virtual ({:.1} Mbit/s), lost {}/{} packets, pto {}",
        r.verified_bytes,
        r.virtual_time,
        r.verified_bytes as f64 * 8.0 / r.virtual_time.as_secs_f64() / 1e6,
        r.client.packets_lost + r.server.packets_lost,
        r.client.packets_sent + r.server.packets_sent,
        r.client.pto_count + r.server.pto_count,
    );
}

#[test]
fn bulk_download_no_loss() {
    assert_bulk(
        link(Duration::from_millis(10), 0.0),
        1,
        1,
        0,
        BIG,
        Duration::from_secs(600),
    );
}

#[test]
fn bulk_download_1_percent_loss() {
    assert_bulk(
        link(Duration::from_millis(25), 0.01),
        2,
        1,
        0,
        BIG,
        Duration::from_secs(600),
    );
}

#[test]
fn bulk_download_5_percent_loss() {
    assert_bulk(
        link(Duration::from_millis(25), 0.05),
        3,
        1,
        0,
        BIG,
        Duration::from_secs(900),
    );
}

#[test]
fn bulk_both_ways_20_percent_loss() {
    assert_bulk(
        link(Duration::from_millis(5), 0.20),
        4,
        1,
        BIG_20 / 2,
        BIG_20 / 2,
        Duration::from_secs(900),
    );
}
