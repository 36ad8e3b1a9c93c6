//! Transport benchmark on the deterministic simulated network.
//!
//! 1. Goodput over a 100 Mbit/s bottleneck with 50 ms RTT at 0 %, 1 % and 5 % random loss,
//!    measured in *virtual* time, reported in Mbit/s and as a ratio of the link rate.
//! 2. Core-only goodput over a perfect link in *wall-clock* MB/s (transport only, no crypto,
//!    single thread driving both ends), reported against a memcpy baseline measured in the
//!    same run (copying the same bytes through packet-sized buffers).
//!
//! Run: `cargo bench --bench transport_sim` (env `TRANSPORT_BENCH_MB` changes the sizes).

#[path = "../tests/it/support/transport.rs"]
mod harness;

use std::hint::black_box;
use std::time::{Duration, Instant};

use harness::{run_bulk, run_bulk_with};
use ostp::proto::sim::LinkConfig;
use ostp::proto::transport::TransportConfig;

const LINK_BPS: u64 = 100_000_000;

fn size_mb(default: u64) -> u64 {
    std::env::var("TRANSPORT_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bottleneck(loss: f64) -> LinkConfig {
    // 50 ms RTT; drop-tail queue of one BDP (625 kB).
    LinkConfig {
        delay: Duration::from_millis(25),
        loss,
        rate_bps: Some(LINK_BPS),
        queue_bytes: 625_000,
        mtu: 1280,
        ..LinkConfig::default()
    }
}

fn main() {
    let mut config = TransportConfig::default();
    if let Some(w) = std::env::var("TRANSPORT_BENCH_WINDOW_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        config.stream_window = w << 20;
        config.session_window = (2 * w) << 20;
        config.send_buffer = (w << 20) as usize;
    }
    let mb = size_mb(50);
    println!(
        "transport_sim: 100 Mbit/s bottleneck, 50 ms RTT, {mb} MB download, config {:?}",
        config.stream_window
    );
    let mut base = None;
    for (i, loss) in [0.0, 0.01, 0.05].into_iter().enumerate() {
        let wall = Instant::now();
        let r = run_bulk(
            bottleneck(loss),
            100 + i as u64,
            1,
            0,
            mb * 1_000_000,
            config.clone(),
            Duration::from_secs(3600),
        );
        assert!(r.completed, "transfer did not complete: {r:?}");
        let mbps = r.verified_bytes as f64 * 8.0 / r.virtual_time.as_secs_f64() / 1e6;
        let base_mbps = *base.get_or_insert(mbps);
        println!(
            "  loss {:>4.1}%: goodput {:6.1} Mbit/s = {:.3} x link, {:.3} x lossless run \
             (virtual {:.2?}, wall {:.2?}, lost {} pkts, retransmitted {} B, pto {}, \
             final bw est {:.1} Mbit/s, cwnd {} B, min rtt {:?})",
            loss * 100.0,
            mbps,
            mbps * 1e6 / LINK_BPS as f64,
            mbps / base_mbps,
            r.virtual_time,
            wall.elapsed(),
            r.server.packets_lost,
            r.server.stream_bytes_retransmitted,
            r.server.pto_count,
            r.server.bandwidth_estimate as f64 * 8.0 / 1e6,
            r.server.cwnd,
            r.server.min_rtt,
        );
    }

    // Core-only wall-clock throughput: perfect link (no rate limit, 1 ms one-way delay).
    let core_mb = size_mb(200);
    let perfect = LinkConfig {
        delay: Duration::from_millis(1),
        rate_bps: None,
        mtu: 1280,
        ..LinkConfig::default()
    };
    let mut core = [0.0f64; 2];
    for (i, verify) in [false, true].into_iter().enumerate() {
        let wall = Instant::now();
        let r = run_bulk_with(
            perfect.clone(),
            7,
            1,
            0,
            core_mb * 1_000_000,
            config.clone(),
            Duration::from_secs(3600),
            verify,
        );
        let secs = wall.elapsed().as_secs_f64();
        assert!(r.completed);
        core[i] = r.verified_bytes as f64 / secs / 1e6;
    }

    // Baseline: move the same bytes through 1200-byte buffers with two memcpys per packet
    // (sender buffer -> packet -> receiver buffer), plus generating and checking the pattern
    // like the harness does.
    let wall = Instant::now();
    let mut src = vec![0u8; 64 * 1024];
    let mut check = vec![0u8; 64 * 1024];
    let mut pkt = [0u8; 1200];
    let mut dst = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    let total = core_mb * 1_000_000;
    while off < total {
        let n = (total - off).min(src.len() as u64) as usize;
        harness::fill_pattern(1, off, &mut src[..n]);
        for (i, chunk) in src[..n].chunks(1200).enumerate() {
            pkt[..chunk.len()].copy_from_slice(chunk);
            dst[i * 1200..i * 1200 + chunk.len()].copy_from_slice(&pkt[..chunk.len()]);
        }
        harness::fill_pattern(1, off, &mut check[..n]);
        assert!(black_box(&dst[..n]) == &check[..n]);
        off += n as u64;
    }
    let base = total as f64 / wall.elapsed().as_secs_f64() / 1e6;
    println!(
        "  core-only, perfect link, one thread driving both transports (sender + receiver), \
         no crypto: {:.0} MB/s of stream data; with pattern generation + verification \
         {:.0} MB/s",
        core[0], core[1]
    );
    println!(
        "  baseline (same run): memcpy through 1200-byte packets + pattern gen/verify \
         {base:.0} MB/s; verified-run ratio {:.3}",
        core[1] / base
    );
}
