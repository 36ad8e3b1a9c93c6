//! Transport behaviour in a deterministic simulated network: checksummed bulk transfers under
//! loss / reordering / duplication / delay, many concurrent streams, bounded memory with a
//! stalled reader, stream isolation, open results, resets, datagrams, close, idle timeout, and
//! a bounded property test feeding arbitrary payloads and API calls.

use std::time::{Duration, Instant};

use crate::support::transport::{BulkApp, Pair, run_bulk};
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
        BIG / 2,
        BIG / 2,
        Duration::from_secs(900),
    );
}

/// ACK decimation in a bulk download: the receiver sends at most one ACK-only packet per six
/// data packets on a clean path (it sent one per two before decimation), and the transfer,
/// loss detection and BBR are unharmed on lossy and messy paths. Prints the ratio per path.
#[test]
fn bulk_download_acks_are_decimated() {
    let size = if cfg!(debug_assertions) {
        4_000_000
    } else {
        50_000_000
    };
    let bench_link = |loss| LinkConfig {
        delay: Duration::from_millis(25),
        loss,
        rate_bps: Some(100_000_000),
        queue_bytes: 625_000,
        mtu: 1280,
        ..LinkConfig::default()
    };
    let cases = [
        (
            "clean 20 ms RTT",
            link(Duration::from_millis(10), 0.0),
            Some(6),
        ),
        ("100 Mbit/s 50 ms RTT", bench_link(0.0), None),
        ("100 Mbit/s 50 ms RTT 1 % loss", bench_link(0.01), None),
        (
            "messy 40 ms RTT 2 % loss",
            messy_link(Duration::from_millis(20), 0.02),
            None,
        ),
    ];
    for (i, (name, link, max_ratio)) in cases.into_iter().enumerate() {
        let r = run_bulk(
            link,
            30 + i as u64,
            1,
            0,
            size,
            cfg(),
            Duration::from_secs(600),
        );
        assert!(r.completed && r.verified_bytes == size, "{name}: {r:?}");
        assert_eq!(r.violations, 0);
        let data = r.server.packets_sent - r.server.ack_only_sent;
        let acks = r.client.ack_only_sent;
        eprintln!(
            "{name}: {acks} ACK-only packets for {data} data packets (1 per {:.1}), \
             {:.1} Mbit/s, lost {}",
            data as f64 / acks.max(1) as f64,
            size as f64 * 8.0 / r.virtual_time.as_secs_f64() / 1e6,
            r.server.packets_lost,
        );
        if let Some(max) = max_ratio {
            assert_eq!(
                r.server.packets_lost, 0,
                "{name}: the clean path lost packets"
            );
            assert!(
                acks * max <= data,
                "{name}: {acks} ACK-only packets for {data} data packets (more than 1 per {max})"
            );
        }
    }
}

/// A path whose bandwidth-delay product is about one packet (100 Mbit/s, 100 µs RTT, like a LAN
/// or loopback): the receiver's decimated ACKs (one per ten packets) must not leave the sender
/// waiting for the delayed-ACK timer every window. Before the congestion window made room for
/// them (`CWND_EXTRA_PACKETS`), BBR settled at a 4-packet window and 34 Mbit/s here.
#[test]
fn tiny_bdp_path_is_not_stalled_by_decimated_acks() {
    let size = 8_000_000;
    let link = LinkConfig {
        delay: Duration::from_micros(50),
        rate_bps: Some(100_000_000),
        queue_bytes: 256 * 1024,
        mtu: 1280,
        ..LinkConfig::default()
    };
    let r = run_bulk(link, 5, 1, 0, size, cfg(), Duration::from_secs(60));
    assert!(r.completed, "{r:?}");
    let mbps = size as f64 * 8.0 / r.virtual_time.as_secs_f64() / 1e6;
    assert!(
        mbps > 90.0,
        "{mbps:.1} Mbit/s over a 100 Mbit/s path: {:?}",
        r.server
    );
}

fn messy_link(one_way: Duration, loss: f64) -> LinkConfig {
    LinkConfig {
        delay: one_way,
        jitter: one_way / 10,
        loss,
        duplicate: 0.02,
        reorder: 0.05,
        reorder_delay: one_way / 2 + Duration::from_millis(1),
        rate_bps: Some(200_000_000),
        queue_bytes: 2 * 1024 * 1024,
        mtu: 1280,
    }
}

#[test]
fn reordering_duplication_jitter_across_rtts() {
    // 1 ms and 300 ms RTT, with 2 % loss, duplication, reordering and jitter.
    let size = if cfg!(debug_assertions) {
        300_000
    } else {
        5_000_000
    };
    for (i, one_way) in [Duration::from_micros(500), Duration::from_millis(150)]
        .into_iter()
        .enumerate()
    {
        assert_bulk(
            messy_link(one_way, 0.02),
            10 + i as u64,
            2,
            size,
            size,
            Duration::from_secs(600),
        );
    }
}

#[test]
fn hundred_concurrent_streams() {
    // More streams than the initial stream credit (16): opens must wait for SETTINGS /
    // MAX_STREAMS, then all 100 run concurrently in both directions.
    let per = if cfg!(debug_assertions) {
        20_000
    } else {
        400_000
    };
    assert_bulk(
        messy_link(Duration::from_millis(20), 0.01),
        20,
        100,
        per,
        per,
        Duration::from_secs(600),
    );
}

#[test]
fn stalled_reader_keeps_memory_bounded() {
    let config = cfg();
    let mut pair = Pair::new(
        config.clone(),
        config.clone(),
        link(Duration::from_millis(10), 0.01),
        30,
    );
    // 8 streams x 4 MB upload, the server application never reads.
    let mut app = BulkApp::new(8, 4_000_000, 0);
    app.server_reads = false;
    let mut max_outstanding = 0;
    let mut max_recv_buffered = 0;
    let mut max_send_buffered = 0;
    let finished = pair.run(Duration::from_secs(20), |c, s, _| {
        app.step(c, s);
        max_outstanding = max_outstanding.max(s.recv_outstanding());
        max_recv_buffered = max_recv_buffered.max(s.stats().recv_buffered);
        max_send_buffered = max_send_buffered.max(c.stats().send_buffered);
        false
    });
    assert!(!finished);
    assert_eq!(pair.violations, 0);
    assert!(
        max_outstanding <= config.session_window,
        "{max_outstanding} > {}",
        config.session_window
    );
    assert!(max_recv_buffered <= config.session_window);
    assert!(max_send_buffered <= config.session_send_buffer as u64);
    // The window really filled (the bound is reached, not just avoided).
    assert!(max_outstanding >= config.session_window * 3 / 4);
    // Once the application reads again, everything arrives intact.
    app.server_reads = true;
    let done = pair.run(Duration::from_secs(200), |c, s, _| {
        app.step(c, s);
        app.done()
    });
    assert!(done, "verified {}", app.verified_bytes());
    assert_eq!(app.verified_bytes(), 8 * 4_000_000);
}

#[test]
fn stalled_stream_does_not_block_others() {
    let config = cfg();
    let mut pair = Pair::new(
        config.clone(),
        config,
        link(Duration::from_millis(10), 0.01),
        31,
    );
    let mut app = BulkApp::new(4, 6_000_000, 0);
    // Client stream ids are 0, 2, 4, 6; the server never reads stream 0.
    let stalled = ostp::proto::transport::StreamId(0);
    app.server_stalled.push(stalled);
    let done = pair.run(Duration::from_secs(300), |c, s, _| {
        app.step(c, s);
        app.server_streams.len() == 4
            && app
                .server_streams
                .iter()
                .all(|(id, (up, _))| *id == stalled || up.fin_received)
    });
    assert!(done, "other streams did not complete");
    assert_eq!(pair.violations, 0);
    let (up, _) = &app.server_streams[&stalled];
    assert_eq!(up.received, 0);
}

/// Runs the pair until `cond` holds, collecting events of both sides.
fn run_collect(
    pair: &mut Pair,
    limit: Duration,
    client_events: &mut Vec<TransportEvent>,
    server_events: &mut Vec<TransportEvent>,
    mut cond: impl FnMut(&mut Transport, &mut Transport, &[TransportEvent], &[TransportEvent]) -> bool,
) -> bool {
    pair.run(limit, |c, s, _| {
        while let Some(e) = c.poll_event() {
            client_events.push(e);
        }
        while let Some(e) = s.poll_event() {
            server_events.push(e);
        }
        cond(c, s, client_events, server_events)
    })
}

fn quiet_pair(seed: u64) -> Pair {
    Pair::new(cfg(), cfg(), link(Duration::from_millis(20), 0.0), seed)
}

#[test]
fn open_refused_reports_result_and_frees_stream() {
    let mut pair = quiet_pair(40);
    let dest = Destination::domain("blocked.example", 25).unwrap();
    let id = pair.client.open_stream(dest.clone()).unwrap();
    assert_eq!(pair.client.stream_write(id, b"early data"), Ok(10));
    let (mut ce, mut se) = (Vec::new(), Vec::new());
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(5),
        &mut ce,
        &mut se,
        |_, s, _, se| {
            if se
                .iter()
                .any(|e| matches!(e, TransportEvent::StreamOpened { .. }))
            {
                s.answer_open(id, OpenResult::NotAllowed).unwrap();
                return true;
            }
            false
        }
    ));
    assert_eq!(se[0], TransportEvent::StreamOpened { id, dest });
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(5),
        &mut ce,
        &mut se,
        |c, s, _, _| { c.stats().streams_open == 0 && s.stats().streams_open == 0 }
    ));
    assert!(ce.contains(&TransportEvent::StreamOpenResult {
        id,
        result: OpenResult::NotAllowed
    }));
    assert!(
        !ce.iter()
            .any(|e| matches!(e, TransportEvent::StreamReset { .. }))
    );
    assert_eq!(pair.client.stream_write(id, b"x"), Err(StreamError::Closed));
}

#[test]
fn reset_mid_transfer_and_stream_credit_is_returned() {
    let mut pair = quiet_pair(41);
    let dest = Destination::Addr("10.0.0.1:80".parse().unwrap());
    // Open and reset 3x the stream limit: only possible if closed streams return credit.
    let total = 3 * cfg().max_streams as usize;
    let mut opened = 0;
    let mut resets_seen = 0;
    let (mut ce, mut se) = (Vec::new(), Vec::new());
    let ok = run_collect(
        &mut pair,
        Duration::from_secs(120),
        &mut ce,
        &mut se,
        |c, s, _, se| {
            while opened < total {
                match c.open_stream(dest.clone()) {
                    Ok(id) => {
                        opened += 1;
                        c.stream_write(id, &[7u8; 5000]).unwrap();
                        c.stream_reset(id, ResetReason::Cancelled).unwrap();
                    }
                    Err(StreamError::TooManyStreams) => break,
                    Err(e) => panic!("{e:?}"),
                }
            }
            for e in se.iter().skip(resets_seen) {
                resets_seen += 1;
                if let TransportEvent::StreamOpened { id, .. } = e {
                    // The reset may or may not have arrived yet.
                    let _ = s.accept_stream(*id);
                }
            }
            opened == total && c.stats().streams_open == 0 && s.stats().streams_open == 0
        },
    );
    assert!(ok, "opened {opened}, client {:?}", pair.client.stats());
    let reset_events = se
        .iter()
        .filter(|e| {
            matches!(
                e,
                TransportEvent::StreamReset {
                    reason: ResetReason::Cancelled,
                    ..
                }
            )
        })
        .count();
    let opened_events = se
        .iter()
        .filter(|e| matches!(e, TransportEvent::StreamOpened { .. }))
        .count();
    assert_eq!(
        reset_events, opened_events,
        "every announced stream saw its reset"
    );
    // Session flow-control credit of the discarded bytes was released: a new transfer works.
    let id = pair.client.open_stream(dest).unwrap();
    let data = vec![1u8; 300_000];
    let mut written = 0;
    let mut received = 0;
    let ok = run_collect(
        &mut pair,
        Duration::from_secs(60),
        &mut ce,
        &mut se,
        |c, s, _, se| {
            if written < data.len() {
                written += c.stream_write(id, &data[written..]).unwrap();
            }
            if se.iter().any(|e| {
                *e == TransportEvent::StreamOpened {
                    id,
                    dest: Destination::Addr("10.0.0.1:80".parse().unwrap()),
                }
            }) {
                let _ = s.accept_stream(id);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.stream_read(id, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    received += n;
                }
            }
            received == data.len()
        },
    );
    assert!(ok, "received {received}");
}

#[test]
fn datagrams_are_delivered_and_bounded() {
    let mut pair = quiet_pair(42);
    let dest = Destination::Addr("8.8.8.8:53".parse().unwrap());
    let max = pair.client.max_datagram_size(7, &dest);
    assert_eq!(
        pair.client
            .send_datagram(7, dest.clone(), &vec![0; max + 1]),
        Err(ostp::proto::transport::DatagramError::TooLarge)
    );
    let limit = cfg().max_datagram_queue;
    for i in 0..limit {
        pair.client
            .send_datagram(7, dest.clone(), &[i as u8; 100])
            .unwrap();
    }
    assert_eq!(
        pair.client.send_datagram(7, dest.clone(), b"overflow"),
        Err(ostp::proto::transport::DatagramError::QueueFull)
    );
    let (mut ce, mut se) = (Vec::new(), Vec::new());
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(5),
        &mut ce,
        &mut se,
        |_, _, _, se| { se.len() >= limit }
    ));
    for (i, e) in se.iter().take(limit).enumerate() {
        assert_eq!(
            *e,
            TransportEvent::Datagram {
                assoc: 7,
                dest: dest.clone(),
                data: vec![i as u8; 100]
            }
        );
    }
    // The max-size datagram fits in one packet.
    pair.client
        .send_datagram(7, dest.clone(), &vec![5; max])
        .unwrap();
    se.clear();
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(5),
        &mut ce,
        &mut se,
        |_, _, _, se| { !se.is_empty() }
    ));
    assert!(matches!(&se[0], TransportEvent::Datagram { data, .. } if data.len() == max));
}

#[test]
fn graceful_close_with_reason() {
    let mut pair = quiet_pair(43);
    let (mut ce, mut se) = (Vec::new(), Vec::new());
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(1),
        &mut ce,
        &mut se,
        |_, _, _, _| true
    ));
    let now = pair.now;
    pair.client
        .close_with_text(now, CloseReason::LimitReached, "traffic quota reached");
    assert!(pair.client.is_closing() && !pair.client.is_closed());
    assert_eq!(
        pair.client
            .open_stream(Destination::domain("a.b", 1).unwrap()),
        Err(StreamError::SessionClosed)
    );
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(10),
        &mut ce,
        &mut se,
        |c, s, _, _| { c.is_closed() && s.is_closed() }
    ));
    assert_eq!(
        se,
        vec![TransportEvent::Closed {
            reason: CloseReason::LimitReached,
            by_peer: true
        }]
    );
    assert_eq!(
        ce,
        vec![TransportEvent::Closed {
            reason: CloseReason::LimitReached,
            by_peer: false
        }]
    );
    assert_eq!(pair.client.poll_timeout(), None);
    assert_eq!(pair.server.poll_timeout(), None);
}

#[test]
fn keepalive_holds_idle_session_and_idle_timeout_closes_dead_one() {
    let config = TransportConfig {
        idle_timeout: Duration::from_secs(30),
        keepalive_interval: Duration::from_secs(10),
        ..cfg()
    };
    let mut pair = Pair::new(
        config.clone(),
        config,
        link(Duration::from_millis(20), 0.0),
        44,
    );
    let (mut ce, mut se) = (Vec::new(), Vec::new());
    // Five minutes of application silence: keepalives keep both ends open.
    let start = pair.now;
    run_collect(
        &mut pair,
        Duration::from_secs(400),
        &mut ce,
        &mut se,
        |_, _, _, _| false,
    );
    let _ = start;
    assert!(ce.is_empty() && se.is_empty(), "{ce:?} {se:?}");
    assert!(!pair.client.is_closing() && !pair.server.is_closing());
    assert!(pair.client.stats().packets_sent >= 400 / 10);
    // Cut the path: both ends time out.
    pair.net.a_to_b.set_config(LinkConfig {
        loss: 1.0,
        ..link(Duration::from_millis(20), 0.0)
    });
    pair.net.b_to_a.set_config(LinkConfig {
        loss: 1.0,
        ..link(Duration::from_millis(20), 0.0)
    });
    let cut = pair.now;
    assert!(run_collect(
        &mut pair,
        Duration::from_secs(1000),
        &mut ce,
        &mut se,
        |c, s, _, _| { c.is_closed() && s.is_closed() }
    ));
    let idle = TransportEvent::Closed {
        reason: CloseReason::IdleTimeout,
        by_peer: false,
    };
    assert_eq!(ce, vec![idle.clone()]);
    assert_eq!(se, vec![idle]);
    let took = pair.now - cut;
    assert!(took <= Duration::from_secs(31), "{took:?}");
}

#[test]
fn padding_is_accepted_and_violations_close() {
    let now = Instant::now();
    let mut t = Transport::new(cfg(), Side::Server, now);
    // Padding only, and frames followed by padding.
    assert_eq!(t.handle_payload(now, 0, &[0u8; 100]), Ok(()));
    let mut buf = [0u8; 200];
    let mut w = Writer::new(&mut buf);
    frame::encode_frame(&mut w, &Frame::Ping).unwrap();
    frame::encode_frame(&mut w, &Frame::Padding).unwrap();
    assert_eq!(t.handle_payload(now, 1, &buf), Ok(()));
    // A STREAM frame beyond the stream window is a flow-control violation.
    let mut buf = [0u8; 64];
    let mut w = Writer::new(&mut buf);
    frame::encode_frame(
        &mut w,
        &Frame::Stream {
            id: 0,
            offset: cfg().stream_window,
            data: b"x",
            fin: false,
        },
    )
    .unwrap();
    let n = w.len();
    assert_eq!(
        t.handle_payload(now, 2, &buf[..n]),
        Err(ostp::proto::transport::TransportError::FlowControl)
    );
    assert!(t.is_closing());
    // The next packet carries CLOSE(ProtocolViolation).
    let mut out = [0u8; 1200];
    let (_, len) = t.poll_transmit(now, &mut out).unwrap();
    let mut r = frame::Reader::new(&out[..len]);
    assert!(matches!(
        frame::parse_frame(&mut r),
        Ok(Frame::Close {
            reason: CloseReason::ProtocolViolation,
            ..
        })
    ));
    // Unknown frame type and a client-only stream id used by the wrong side also fail.
    let mut t = Transport::new(cfg(), Side::Server, now);
    assert!(t.handle_payload(now, 0, &[0x3f]).is_err());
    let mut t = Transport::new(cfg(), Side::Client, now);
    assert!(
        t.handle_payload(now, 0, &[frame::FRAME_OPEN_OK, 1])
            .is_err()
    );
}

/// Random well-formed frame for the property test.
fn random_frame<'a>(rng: &mut SimRng, data: &'a [u8], peer_bit: u64) -> Frame<'a> {
    // Mostly plausible values (small peer-initiated ids, offsets inside the window) so that
    // sessions live long enough to reach deep states; sometimes anything.
    let id = if rng.chance(0.9) {
        (rng.below(24) << 1) | peer_bit
    } else {
        rng.below(300)
    };
    let offset = if rng.chance(0.9) {
        rng.below(60_000)
    } else {
        rng.below(1 << 22)
    };
    let len = (rng.below(data.len() as u64 + 1)) as usize;
    match rng.below(12) {
        0 => Frame::Ping,
        2 => Frame::StreamOpen {
            id,
            dest: Destination::domain("fuzz.example", 1).unwrap(),
        },
        3 => Frame::OpenOk { id: id ^ 1 },
        4 => Frame::ResetStream {
            id,
            reason: ResetReason::from_code(rng.below(256) as u8),
            final_size: offset,
        },
        5 => Frame::MaxData(rng.below(1 << 40)),
        6 => Frame::MaxStreamData {
            id,
            max: rng.below(1 << 40),
        },
        7 => Frame::MaxStreams(rng.below(1 << 20)),
        8 => Frame::Datagram {
            assoc: rng.below(3) as u32,
            dest: Destination::Addr("1.1.1.1:53".parse().unwrap()),
            data: &data[..len.min(500)],
        },
        9 => Frame::Settings {
            stream_window: rng.below(1 << 40),
            session_window: rng.below(1 << 40),
            max_streams: rng.below(1 << 20),
        },
        10 if rng.chance(0.05) => Frame::Close {
            reason: CloseReason::from_code(rng.below(256) as u8),
            text: b"bye",
        },
        _ => Frame::Stream {
            id,
            offset,
            data: &data[..len.min(1000)],
            fin: rng.chance(0.1),
        },
    }
}

#[test]
fn property_arbitrary_payloads_and_api_calls() {
    let iterations = if cfg!(debug_assertions) { 40 } else { 300 };
    let config = TransportConfig {
        stream_window: 64 * 1024,
        session_window: 256 * 1024,
        max_streams: 32,
        send_buffer: 64 * 1024,
        session_send_buffer: 256 * 1024,
        ..cfg()
    };
    let data = vec![0xabu8; 1000];
    let (mut restarts, mut steps) = (0u64, 0u64);
    for seed in 0..iterations {
        let mut rng = SimRng::new(seed);
        let start = Instant::now();
        let mut now = start;
        let side = if rng.chance(0.5) {
            Side::Client
        } else {
            Side::Server
        };
        let mut t = Transport::new(config.clone(), side, now);
        let peer_bit = u64::from(side == Side::Client);
        let mut pn = 0u64;
        let mut out = [0u8; 1500];
        let mut ids = Vec::new();
        for _ in 0..400 {
            now += Duration::from_micros(rng.below(50_000));
            match rng.below(10) {
                0 if rng.chance(0.3) => {
                    // Arbitrary bytes.
                    let mut payload = [0u8; 256];
                    let n = rng.below(256) as usize;
                    rng.fill(&mut payload[..n]);
                    let _ = t.handle_payload(now, pn, &payload[..n]);
                    pn += 1 + rng.below(3);
                }
                1..=4 => {
                    // A sequence of well-formed frames with random fields.
                    let mut payload = [0u8; 1200];
                    let mut w = Writer::new(&mut payload);
                    for _ in 0..1 + rng.below(6) {
                        if rng.chance(0.2) {
                            // ACK with up to 4 random ranges, sometimes for unsent packets.
                            let sent = t.stats().packets_sent;
                            let mut hi = if rng.chance(0.05) {
                                rng.below(sent + 3)
                            } else {
                                rng.below(sent.max(1))
                            };
                            let mut ranges = Vec::new();
                            for _ in 0..1 + rng.below(4) {
                                let lo = hi.saturating_sub(rng.below(8));
                                ranges.push((lo, hi));
                                if lo < 3 {
                                    break;
                                }
                                hi = lo - 2 - rng.below(lo - 2);
                            }
                            let delay = rng.below(100_000);
                            let _ = frame::encode_ack(&mut w, delay, ranges.into_iter(), 8);
                            continue;
                        }
                        let f = random_frame(&mut rng, &data, peer_bit);
                        if frame::encode_frame(&mut w, &f).is_none() {
                            break;
                        }
                    }
                    let n = w.len();
                    let _ = t.handle_payload(now, pn, &payload[..n]);
                    pn += 1;
                }
                5 => {
                    if let Ok(id) = t.open_stream(Destination::domain("x.y", 80).unwrap()) {
                        ids.push(id);
                    }
                }
                6 => {
                    if let Some(&id) = ids.get(rng.below(ids.len() as u64 + 1) as usize) {
                        let _ = t.stream_write(id, &data[..rng.below(1000) as usize]);
                        if rng.chance(0.1) {
                            let _ = t.stream_finish(id);
                        }
                        if rng.chance(0.05) {
                            let _ = t.stream_reset(id, ResetReason::Cancelled);
                        }
                    }
                }
                7 => {
                    let id = ostp::proto::transport::StreamId(rng.below(100));
                    let mut buf = [0u8; 2000];
                    let _ = t.stream_read(id, &mut buf);
                    let _ = t.answer_open(id, OpenResult::from_code(rng.below(6) as u8));
                }
                8 => {
                    let _ = t.send_datagram(
                        rng.below(3) as u32,
                        Destination::Addr("9.9.9.9:53".parse().unwrap()),
                        &data[..rng.below(300) as usize],
                    );
                    if rng.chance(0.01) {
                        t.close(now, CloseReason::Shutdown);
                    }
                }
                _ => {
                    if t.poll_timeout().is_some_and(|d| d <= now) {
                        t.handle_timeout(now);
                    }
                }
            }
            while let Some((_, len)) = t.poll_transmit(now, &mut out) {
                assert!(len <= config.max_payload);
            }
            let mut events = 0;
            while t.poll_event().is_some() {
                events += 1;
            }
            assert!(events <= 10_000);
            let stats = t.stats();
            assert!(stats.recv_buffered <= config.session_window, "{stats:?}");
            assert!(t.recv_outstanding() <= config.session_window);
            assert!(stats.send_buffered <= config.session_send_buffer as u64);
            assert!(
                stats.streams_open <= 2 * config.max_streams + 16,
                "{stats:?}"
            );
            if t.poll_timeout().is_some_and(|d| d < now) {
                t.handle_timeout(now);
            }
            if t.is_closing() {
                // Most random inputs are violations: start over to keep exercising an open
                // session.
                restarts += 1;
                t = Transport::new(config.clone(), side, now);
                ids.clear();
                pn = 0;
            }
            steps += 1;
        }
    }
    eprintln!("property test: {steps} steps, {restarts} sessions closed by violations");
    // Both paths were exercised: sessions survived many steps and were also closed.
    assert!(
        restarts > 0 && steps > restarts * 4,
        "{restarts} restarts in {steps} steps"
    );
}
