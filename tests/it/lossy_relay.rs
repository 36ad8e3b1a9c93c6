//! Tests for the `lossy_relay` example: its `LinkModel` unit tests (compiled in from the example
//! source), CLI parsing, and end-to-end runs of the relay over loopback UDP that check the
//! configured loss rate, delay and bottleneck rate within tolerance.

#[allow(dead_code)]
use crate::support::lossy_relay;

use lossy_relay::{Options, Relay, parse_options};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn args(text: &str) -> impl Iterator<Item = String> {
    text.split_whitespace()
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
}

/// An echo server on loopback; returns its address.
fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Starts a relay in a background thread; returns its listen address.
fn start_relay(options: &Options) -> SocketAddr {
    let relay = Relay::bind(options).unwrap();
    let addr = relay.local_addr().unwrap();
    std::thread::spawn(move || relay.run(None));
    addr
}

/// Receives on `socket` in a background thread until it is quiet for `quiet`; returns the
/// payloads with their arrival times (reading concurrently keeps the socket buffer from overflowing).
fn receiver(
    socket: &UdpSocket,
    quiet: Duration,
) -> std::thread::JoinHandle<Vec<(Instant, Vec<u8>)>> {
    let socket = socket.try_clone().unwrap();
    socket.set_read_timeout(Some(quiet)).unwrap();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        // Wait for the first packet at most 5 s, then stop after `quiet` of silence.
        let first_deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => out.push((Instant::now(), buf[..n].to_vec())),
                Err(_) if out.is_empty() && Instant::now() < first_deadline => {}
                Err(_) => return out,
            }
        }
    })
}

fn options(upstream: SocketAddr, extra: &str) -> Options {
    parse_options(args(&format!(
        "--listen 127.0.0.1:0 --upstream {upstream} {extra}"
    )))
    .unwrap()
}

#[test]
fn cli_parses_per_direction_settings() {
    let o = parse_options(args(
        "--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --rate-mbit 100 --delay-ms 25 --jitter-ms 2 \
         --loss 0.01 --down-loss 0.05 --reorder 0.1 --dup 0.02 --queue-ms 30 --up-rate-mbit 10 --seed 9 --stats 1",
    ))
    .unwrap();
    assert_eq!(o.up.rate_bps, 10_000_000);
    assert_eq!(o.down.rate_bps, 100_000_000);
    assert_eq!(o.up.loss, 0.01);
    assert_eq!(o.down.loss, 0.05);
    assert_eq!(o.up.delay_ns, 25_000_000);
    assert_eq!(o.down.jitter_ns, 2_000_000);
    assert_eq!(o.down.reorder, 0.1);
    assert_eq!(o.up.dup, 0.02);
    assert_eq!(o.up.queue_ms, 30);
    assert_eq!(o.seed, 9);
    assert_eq!(o.stats_every, Some(Duration::from_secs(1)));
    for bad in [
        "--listen 127.0.0.1:1",
        "--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --loss 1.5",
        "--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --loss -1",
        "--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --bogus 1",
        "--listen nowhere --upstream 127.0.0.1:2",
        "--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --delay-ms",
    ] {
        assert!(parse_options(args(bad)).is_err(), "{bad}");
    }
}

#[test]
fn loss_and_delay_are_as_configured() {
    let upstream = echo_server();
    // 10 % loss client → upstream only, 20 ms each way.
    let relay = start_relay(&options(
        upstream,
        "--delay-ms 20 --up-loss 0.1 --down-loss 0 --seed 3",
    ));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(relay).unwrap();
    // A quiet gap long enough for a sender descheduled on a loaded machine (see below).
    let echoes = receiver(&client, Duration::from_millis(1500));
    let sent = 1000u32;
    let mut send_times = Vec::with_capacity(sent as usize);
    for seq in 0..sent {
        send_times.push(Instant::now());
        client.send(&seq.to_be_bytes()).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut rtts = Vec::new();
    for (at, data) in echoes.join().unwrap() {
        assert_eq!(data.len(), 4);
        let seq = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        rtts.push(at - send_times[seq]);
    }
    let loss = 1.0 - rtts.len() as f64 / f64::from(sent);
    assert!((0.06..0.14).contains(&loss), "loss {loss}");
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    assert!(
        median >= Duration::from_millis(40) && median < Duration::from_millis(75),
        "median RTT {median:?}"
    );
    assert!(
        rtts[0] >= Duration::from_millis(40),
        "min RTT {:?}",
        rtts[0]
    );
}

#[test]
fn bottleneck_rate_is_enforced() {
    let upstream = echo_server();
    // 20 Mbit/s towards the upstream with a deep queue; the return path is unlimited.
    let relay = start_relay(&options(
        upstream,
        "--up-rate-mbit 20 --up-queue-ms 2000 --down-rate-mbit 0",
    ));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(relay).unwrap();
    // A generous quiet gap: a sender descheduled for a few hundred ms on a loaded machine must
    // not end the measurement early (it flaked with 300 ms while builds ran).
    let echoes = receiver(&client, Duration::from_millis(1500));
    // About a second at the bottleneck: a stall of a few tens of ms stays within the band.
    let packets = 2000usize;
    let payload = [0x5au8; 1250];
    // About twice the bottleneck's rate (the queue builds), not a burst the relay's socket
    // buffer would have to absorb while its thread is descheduled.
    for _ in 0..packets {
        client.send(&payload).unwrap();
        std::thread::sleep(Duration::from_micros(250));
    }
    let echoes = echoes.join().unwrap();
    assert!(echoes.iter().all(|(_, data)| data[..] == payload[..]));
    let received = echoes.len();
    let (first, last) = (echoes[0].0, echoes[received - 1].0);
    assert_eq!(received, packets, "deep queue: nothing dropped");
    let span = last - first;
    // (packets - 1) serialisations between the first and last arrival.
    let mbit = ((packets - 1) * payload.len() * 8) as f64 / span.as_secs_f64() / 1e6;
    assert!((16.0..24.0).contains(&mbit), "measured {mbit:.1} Mbit/s");
}
