//! Core-only goodput: a full session (handshake, packet protection, transport, streams) over a
//! perfect simulated link on one core, versus raw ChaCha20-Poly1305 seal+open of the same bytes in
//! packets of the same size, measured in the same run. Target: ratio ≥ 0.80.
//!
//! Run: `cargo bench --bench proto_core`

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ostp::proto::crypto::{PacketAead, TAG_LEN};
use ostp::proto::endpoint::{
    ClientSession, ConnectorConfig, EndpointConfig, EndpointEvent, ServerEndpoint, SocketIndex,
    UserId, UserState,
};
use ostp::proto::packet::{DATA_OVERHEAD, PaddingPolicy};
use ostp::proto::sim::{Link, LinkConfig};
use ostp::proto::transport::{Destination, TransportEvent};

const KEY: &str = "bench-core-access-key-0123456789";
const TOTAL: usize = 128 << 20;
/// Alternating rounds; the best of each is reported (the machine may be shared).
const ROUNDS: usize = 3;
const MAX_DATAGRAM: usize = 1350;

fn session_goodput(padding: PaddingPolicy) -> (f64, u64) {
    let start = Instant::now();
    let mut now = start;
    let mut server_config = EndpointConfig::default();
    server_config.session.padding = padding;
    server_config.session.max_datagram = MAX_DATAGRAM;
    let mut client_config = ConnectorConfig::default();
    client_config.session.padding = padding;
    client_config.session.max_datagram = MAX_DATAGRAM;
    let mut server = ServerEndpoint::new(server_config, [1; 32]);
    server.set_user(UserId(1), KEY, UserState::Active).unwrap();
    let mut client =
        ClientSession::connect(client_config, KEY, now, 1_800_000_000, [2; 32]).unwrap();
    let link = LinkConfig {
        delay: Duration::from_millis(5),
        mtu: 1500,
        ..LinkConfig::default()
    };
    let mut c2s = Link::new(link.clone(), 1, start);
    let mut s2c = Link::new(link, 2, start);
    let addr: SocketAddr = "192.0.2.1:1000".parse().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut chunk = vec![0x5Au8; 64 * 1024];
    let mut stream = None;
    let mut server_stream = None;
    let mut session = None;
    let (mut sent, mut received) = (0usize, 0usize);
    let mut packets = 0u64;
    let wall = Instant::now();
    while received < TOTAL {
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        if client.is_connected() && stream.is_none() {
            let t = client.session_mut().unwrap().transport_mut();
            stream = Some(
                t.open_stream(Destination::domain("example.com", 80).unwrap())
                    .unwrap(),
            );
        }
        if let Some(id) = stream {
            let t = client.session_mut().unwrap().transport_mut();
            while sent < TOTAL {
                let n = chunk.len().min(TOTAL - sent);
                let w = t.stream_write(id, &chunk[..n]).unwrap_or(0);
                if w == 0 {
                    break;
                }
                sent += w;
            }
        }
        while let Some(mut d) = c2s.recv(now) {
            server.handle_datagram(now, 1_800_000_000, SocketIndex(0), addr, &mut d);
            c2s.recycle(d);
        }
        while let Some(mut d) = s2c.recv(now) {
            client.handle_datagram(now, &mut d);
            s2c.recycle(d);
        }
        while let Some(e) = server.poll_event() {
            match e {
                EndpointEvent::SessionEstablished { session: s, .. } => session = Some(s),
                EndpointEvent::Transport {
                    event: TransportEvent::StreamOpened { id, .. },
                    ..
                } => server_stream = Some(id),
                EndpointEvent::SessionClosed { reason, .. } => panic!(
                    "session closed: {reason:?} {:?} c2s={:?} sent={sent} recv={received}",
                    server.stats(),
                    c2s.stats()
                ),
                _ => {}
            }
        }
        while let Some(e) = client.poll_event() {
            if let ostp::proto::endpoint::ClientEvent::Transport(TransportEvent::Closed {
                reason,
                by_peer,
            }) = e
            {
                panic!("client closed: {reason:?} by_peer={by_peer}");
            }
        }
        if let (Some(s), Some(id)) = (session, server_stream) {
            let t = server.session_mut(s).unwrap().transport_mut();
            let _ = t.accept_stream(id);
            while let Ok(n) = t.stream_read(id, &mut chunk) {
                if n == 0 {
                    break;
                }
                received += n;
            }
        }
        while let Some(n) = client.poll_transmit(now, &mut buf) {
            c2s.send(now, &buf[..n]);
            packets += 1;
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            s2c.send(now, &buf[..t.len]);
        }
        let next = [
            c2s.next_event_time(),
            s2c.next_event_time(),
            client.poll_timeout(),
            server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        now = match next {
            Some(t) if t > now => t,
            _ => now + Duration::from_micros(10),
        };
    }
    let secs = wall.elapsed().as_secs_f64();
    (TOTAL as f64 / secs / 1e6, packets)
}

/// Raw AEAD: seal + open of `TOTAL` bytes in packets carrying the same payload per packet.
fn raw_crypto_goodput() -> f64 {
    let payload = MAX_DATAGRAM - DATA_OVERHEAD;
    let seal = PacketAead::new(&[7; 32]);
    let open = PacketAead::new(&[7; 32]);
    let mut packet = vec![0x5Au8; payload];
    let packets = TOTAL.div_ceil(payload) as u64;
    let wall = Instant::now();
    for pn in 0..packets {
        let tag: [u8; TAG_LEN] = seal.seal(pn, &[1u8; 8], &mut packet);
        open.open(pn, &[1u8; 8], &mut packet, &tag).unwrap();
        black_box(&packet);
    }
    let secs = wall.elapsed().as_secs_f64();
    TOTAL as f64 / secs / 1e6
}

fn main() {
    let mut raw = 0f64;
    let mut off = (0f64, 0u64);
    let mut padded = (0f64, 0u64);
    for _ in 0..ROUNDS {
        raw = raw.max(raw_crypto_goodput());
        let r = session_goodput(PaddingPolicy::OFF);
        off = (off.0.max(r.0), r.1);
        let r = session_goodput(PaddingPolicy::default());
        padded = (padded.0.max(r.0), r.1);
    }
    println!(
        "raw ChaCha20-Poly1305 seal+open, {} B packets: {raw:>8.1} MB/s (baseline, best of {ROUNDS})",
        MAX_DATAGRAM - DATA_OVERHEAD
    );
    for (name, (goodput, packets)) in [("padding off", off), ("default padding", padded)] {
        println!(
            "full core (client+server, {name}): {goodput:>8.1} MB/s  ratio {:.2}  ({packets} client packets, {} MiB)",
            goodput / raw,
            TOTAL >> 20
        );
    }
    println!("target: ratio >= 0.80");
}
