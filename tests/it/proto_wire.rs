//! Wire-image tests: handshake and data packets look uniformly random, carry no repeated 8-byte
//! strings, and vary in size.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ostp::proto::endpoint::{
    ClientSession, ConnectorConfig, EndpointConfig, ServerEndpoint, SocketIndex, UserId, UserState,
};
use ostp::proto::handshake::RefuseReason;
use ostp::proto::packet::{Direction, PaddingPolicy, Sealer, TOKEN_LEN};
use ostp::proto::rng::Drbg;

const KEY: &str = "wire-test-access-key-0123456789";

/// Per-position byte histograms over many packets.
struct PositionStats {
    counts: Vec<[u32; 256]>,
    samples: Vec<u32>,
}

impl PositionStats {
    fn new(positions: usize) -> Self {
        PositionStats {
            counts: vec![[0; 256]; positions],
            samples: vec![0; positions],
        }
    }

    fn add(&mut self, packet: &[u8]) {
        for (i, b) in packet.iter().take(self.counts.len()).enumerate() {
            self.counts[i][*b as usize] += 1;
            self.samples[i] += 1;
        }
    }

    /// Chi-square statistic (255 degrees of freedom) of every position with enough samples.
    fn check_uniform(&self, what: &str) {
        // 255 dof: mean 255, sd ≈ 22.6. 400 is ≈ 6.4 sd: a fair source fails it with p < 1e-8
        // per position, while any fixed or biased byte scores in the thousands.
        const THRESHOLD: f64 = 400.0;
        let mut checked = 0;
        for (pos, (counts, n)) in self.counts.iter().zip(&self.samples).enumerate() {
            if *n < 256 * 20 {
                continue;
            }
            let expected = f64::from(*n) / 256.0;
            let chi2: f64 = counts
                .iter()
                .map(|&c| (f64::from(c) - expected).powi(2) / expected)
                .sum();
            assert!(
                chi2 < THRESHOLD,
                "{what}: byte position {pos} is biased (chi2 = {chi2:.1}, n = {n})"
            );
            checked += 1;
        }
        assert!(checked > 0, "{what}: no position had enough samples");
    }
}

fn record_chunks(seen: &mut HashSet<[u8; 8]>, packet: &[u8], what: &str) {
    // The first 32 bytes (tags, tokens, nonces, first ciphertext) and the AEAD tag.
    let mut offsets: Vec<usize> = (0..4)
        .map(|i| i * 8)
        .filter(|o| o + 8 <= packet.len())
        .collect();
    offsets.push(packet.len() - 16);
    offsets.push(packet.len() - 8);
    for o in offsets {
        let mut chunk = [0u8; 8];
        chunk.copy_from_slice(&packet[o..o + 8]);
        assert!(
            seen.insert(chunk),
            "{what}: 8-byte string at offset {o} repeated"
        );
    }
}

#[test]
fn handshakes_look_random_and_vary_in_size() {
    let handshakes = 10_000;
    let mut hellos = PositionStats::new(92);
    let mut replies = PositionStats::new(53);
    let mut seen = HashSet::new();
    let mut hello_sizes = HashSet::new();
    let mut reply_sizes = HashSet::new();
    let start = Instant::now();
    let base_unix = 1_800_000_000u64;
    let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let mut config = EndpointConfig::default();
    config.session.token_window = 16;
    config.session.token_behind = 4;
    config.max_sessions = 100_000;
    config.max_sessions_per_user = 100_000;
    config.handshake_rate = 1_000_000;
    config.handshake_rate_per_user = 1_000_000;
    let mut server = None;
    let mut buf = vec![0u8; 2048];
    let mut seed = Drbg::new([42; 32]);
    for i in 0..handshakes {
        if i % 500 == 0 {
            let mut s = ServerEndpoint::new(config.clone(), seed.bytes32());
            s.set_user(UserId(1), KEY, UserState::Active).unwrap();
            s.set_user(
                UserId(2),
                &KEY.replace('w', "W"),
                UserState::Refused(RefuseReason::Disabled),
            )
            .unwrap();
            server = Some(s);
        }
        let server = server.as_mut().unwrap();
        // A fresh epoch per handshake so the client's random slot can never collide.
        let unix = base_unix + i as u64 * 120;
        let now = start + Duration::from_millis(i as u64);
        let key = if i % 10 == 9 {
            KEY.replace('w', "W")
        } else {
            KEY.to_string()
        };
        let mut client =
            ClientSession::connect(ConnectorConfig::default(), &key, now, unix, seed.bytes32())
                .unwrap();
        let n = client.poll_transmit(now, &mut buf).unwrap();
        hellos.add(&buf[..n]);
        hello_sizes.insert(n);
        record_chunks(&mut seen, &buf[..n], "hello");
        server.handle_datagram(now, unix, SocketIndex(0), from, &mut buf[..n]);
        let t = server
            .poll_transmit(now, &mut buf)
            .expect("a valid hello gets a reply");
        assert!(
            t.len <= n,
            "reply ({}) larger than hello ({n}): amplification",
            t.len
        );
        replies.add(&buf[..t.len]);
        reply_sizes.insert(t.len);
        record_chunks(&mut seen, &buf[..t.len], "reply");
        client.handle_datagram(now, &mut buf[..t.len]);
        if i % 10 == 9 {
            assert!(client.is_finished(), "refused user must get a refusal");
        } else {
            assert!(client.is_connected());
        }
    }
    hellos.check_uniform("hello");
    replies.check_uniform("reply");
    assert!(
        hello_sizes.len() > 100,
        "hello sizes must vary: {}",
        hello_sizes.len()
    );
    assert!(
        reply_sizes.len() > 100,
        "reply sizes must vary: {}",
        reply_sizes.len()
    );
}

#[test]
fn data_packets_look_random_and_vary_in_size() {
    let packets = 100_000u64;
    let mut stats = PositionStats::new(64);
    let mut seen = HashSet::new();
    let mut sizes = HashSet::new();
    let mut rng = Drbg::new([7; 32]);
    let padding = PaddingPolicy::default();
    let mut buf = vec![0u8; 1500];
    for dir in [Direction::ClientToServer, Direction::ServerToClient] {
        let mut sealer = Sealer::new(&rng.bytes32(), dir);
        for pn in 0..packets / 2 {
            // Highly structured plaintext: a fixed frame-like header and zeros.
            let len = [1usize, 12, 40, 300, 1326][(pn % 5) as usize];
            let payload = &mut buf[TOKEN_LEN..TOKEN_LEN + 1326];
            payload.fill(0);
            payload[..4].copy_from_slice(&[0x01, 0x02, 0x03, 0x04]);
            let padded = padding.padded_len(len, 1326, &mut rng);
            let n = sealer.seal(pn, &mut buf, padded).unwrap();
            stats.add(&buf[..n]);
            sizes.insert(n);
            record_chunks(&mut seen, &buf[..n], "data");
        }
    }
    stats.check_uniform("data");
    assert!(
        sizes.len() > 100,
        "data packet sizes must vary: {}",
        sizes.len()
    );
}
