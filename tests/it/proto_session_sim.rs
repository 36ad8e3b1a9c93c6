//! Full sessions (handshake + packet protection + transport) over the deterministic simulated
//! network: virtual clock, seeded loss / reordering / duplication / delay.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ostp::proto::endpoint::{
    ClientEvent, ClientSession, ConnectorConfig, EndpointConfig, EndpointEvent, ServerEndpoint,
    SessionId, SocketIndex, UserId, UserState,
};
use ostp::proto::handshake::RefuseReason;
use ostp::proto::session::SessionConfig;
use ostp::proto::sim::{Link, LinkConfig};
use ostp::proto::transport::{CloseReason, Destination, StreamId, TransportEvent};

const KEY: &str = "sim-test-access-key-0123456789";
const UNIX0: u64 = 1_800_000_000;

fn transfer_size() -> usize {
    if cfg!(debug_assertions) {
        2 << 20
    } else {
        16 << 20
    }
}

/// FNV-1a over a byte stream, streaming.
#[derive(Clone, Copy)]
struct Checksum(u64, u64);
impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325, 0)
    }
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += data.len() as u64;
    }
}

/// Deterministic test payload byte at offset `i`.
fn payload_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i as u8)
}

struct World {
    start: Instant,
    now: Instant,
    server: ServerEndpoint,
    client: ClientSession,
    c2s: Link,
    s2c: Link,
    client_addr: SocketAddr,
    client_socket: SocketIndex,
    captured_c2s: Vec<Vec<u8>>,
    captured_s2c: Vec<Vec<u8>>,
    capture: bool,
    /// Restore both links to this configuration at this time (end of a blackout).
    restore: Option<(Instant, LinkConfig)>,
    server_events: Vec<EndpointEvent>,
    client_events: Vec<ClientEvent>,
    sent_to: Vec<SocketAddr>,
    buf: Vec<u8>,
    /// Datagrams moved and events seen so far: an iteration that changes nothing here did no
    /// work (see the busy-loop rule in [`World::run_until`]).
    work: u64,
    /// (time, length) of every datagram put on the client→server / server→client link.
    wire_c2s: Vec<(Instant, usize)>,
    wire_s2c: Vec<(Instant, usize)>,
    /// (time, length) of every datagram the server received from the client→server link.
    arrived_c2s: Vec<(Instant, usize)>,
}

impl World {
    fn new(link: LinkConfig, key: &str, client_clock_skew: i64, seed: u64) -> Self {
        Self::with_session_config(link, key, client_clock_skew, seed, SessionConfig::default())
    }

    fn with_session_config(
        link: LinkConfig,
        key: &str,
        client_clock_skew: i64,
        seed: u64,
        session: SessionConfig,
    ) -> Self {
        let start = Instant::now();
        let server_config = EndpointConfig {
            session: session.clone(),
            ..EndpointConfig::default()
        };
        let mut server = ServerEndpoint::new(server_config, [seed as u8; 32]);
        server.set_user(UserId(1), KEY, UserState::Active).unwrap();
        server
            .set_user(
                UserId(2),
                &KEY.replace("sim", "ref"),
                UserState::Refused(RefuseReason::Disabled),
            )
            .unwrap();
        let client_unix = UNIX0.saturating_add_signed(client_clock_skew);
        let client = ClientSession::connect(
            ConnectorConfig {
                session,
                ..ConnectorConfig::default()
            },
            key,
            start,
            client_unix,
            [seed as u8 ^ 0x55; 32],
        )
        .unwrap();
        World {
            start,
            now: start,
            server,
            client,
            c2s: Link::new(link.clone(), seed, start),
            s2c: Link::new(link, seed ^ 0xABCD, start),
            client_addr: "192.0.2.10:40000".parse().unwrap(),
            client_socket: SocketIndex(0),
            captured_c2s: Vec::new(),
            captured_s2c: Vec::new(),
            capture: false,
            restore: None,
            server_events: Vec::new(),
            client_events: Vec::new(),
            sent_to: Vec::new(),
            buf: vec![0u8; 2048],
            work: 0,
            wire_c2s: Vec::new(),
            wire_s2c: Vec::new(),
            arrived_c2s: Vec::new(),
        }
    }

    fn unix(&self) -> u64 {
        UNIX0 + (self.now - self.start).as_secs()
    }

    /// Moves every ready datagram and runs due timers, until nothing is left to send at `now`.
    fn pump(&mut self) {
        self.pump_once();
        self.pump_once();
    }

    fn pump_once(&mut self) {
        let now = self.now;
        if let Some((at, config)) = self.restore.clone() {
            if now >= at {
                self.c2s.set_config(config.clone());
                self.s2c.set_config(config);
                self.restore = None;
            }
        }
        let unix = self.unix();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        while let Some(n) = self.client.poll_transmit(now, &mut self.buf) {
            self.work += 1;
            if self.capture {
                self.captured_c2s.push(self.buf[..n].to_vec());
            }
            self.wire_c2s.push((now, n));
            self.c2s.send(now, &self.buf[..n]);
        }
        while let Some(t) = self.server.poll_transmit(now, &mut self.buf) {
            self.work += 1;
            if self.capture {
                self.captured_s2c.push(self.buf[..t.len].to_vec());
            }
            self.sent_to.push(t.to);
            self.wire_s2c.push((now, t.len));
            self.s2c.send(now, &self.buf[..t.len]);
        }
        while let Some(mut d) = self.c2s.recv(now) {
            self.work += 1;
            self.arrived_c2s.push((now, d.len()));
            self.server
                .handle_datagram(now, unix, self.client_socket, self.client_addr, &mut d);
        }
        while let Some(mut d) = self.s2c.recv(now) {
            self.work += 1;
            self.client.handle_datagram(now, &mut d);
        }
        while let Some(e) = self.server.poll_event() {
            self.work += 1;
            self.server_events.push(e);
        }
        while let Some(e) = self.client.poll_event() {
            self.work += 1;
            self.client_events.push(e);
        }
    }

    /// Advances virtual time to the next event (or `limit`).
    fn advance(&mut self, limit: Instant) {
        let next = [
            self.c2s.next_event_time(),
            self.s2c.next_event_time(),
            self.client.poll_timeout(),
            self.server.poll_timeout(),
        ]
        .into_iter()
        .chain(std::iter::once(self.restore.as_ref().map(|(at, _)| *at)))
        .flatten()
        .min()
        .unwrap_or(limit)
        .min(limit);
        self.now = self.now.max(next);
    }

    fn run_until(&mut self, deadline: Duration, mut done: impl FnMut(&mut World) -> bool) -> bool {
        let limit = self.start + deadline;
        loop {
            let work_before = self.work;
            self.pump();
            if done(self) {
                return true;
            }
            if self.now >= limit {
                return false;
            }
            let before = self.now;
            self.advance(limit);
            // The busy-loop rule of every driver: an iteration that did no work (no datagram
            // moved, no event) is never followed by a zero-timeout wait. A deadline left in the
            // past would make a real event loop spin at 100 % CPU.
            assert!(
                self.now > before || self.work != work_before,
                "busy loop: nothing happened at {:?}, yet the next deadline is not in the future \
                 (client {:?}, server {:?})",
                self.now - self.start,
                self.client
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(self.start)),
                self.server
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(self.start)),
            );
        }
    }

    fn connect(&mut self) -> SessionId {
        assert!(
            self.run_until(Duration::from_secs(10), |w| w.client.is_connected()),
            "handshake failed"
        );
        self.run_until(Duration::from_secs(11), |w| !w.server_events.is_empty());
        self.server_events
            .iter()
            .find_map(|e| match e {
                EndpointEvent::SessionEstablished { session, .. } => Some(*session),
                _ => None,
            })
            .expect("server saw the session")
    }
}

/// Uploads `total` bytes client→server and downloads `total / 4` server→client on one stream,
/// verifying checksums on both ends. `midway` runs once when half of the upload was received.
fn transfer(w: &mut World, total: usize, mut midway: impl FnMut(&mut World)) {
    let session = w.connect();
    let client_stream = w
        .client
        .session_mut()
        .unwrap()
        .transport_mut()
        .open_stream(Destination::domain("example.com", 443).unwrap())
        .unwrap();
    let download = total / 4;
    let mut up_sent = 0u64;
    let mut up_sum_sent = Checksum::new();
    let mut up_sum_recv = Checksum::new();
    let mut down_sent = 0u64;
    let mut down_sum_sent = Checksum::new();
    let mut down_sum_recv = Checksum::new();
    let mut server_stream: Option<StreamId> = None;
    let mut chunk = vec![0u8; 16 * 1024];
    let mut midway_done = false;
    let mut seen_events = 0usize;
    let ok = w.run_until(Duration::from_secs(600), |w| {
        // Server: accept the stream.
        for e in &w.server_events[seen_events..] {
            if let EndpointEvent::Transport {
                event: TransportEvent::StreamOpened { id, .. },
                ..
            } = e
            {
                server_stream = Some(*id);
            }
        }
        if seen_events == 0 || seen_events < w.server_events.len() {
            if let Some(id) = server_stream {
                let t = w.server.session_mut(session).unwrap().transport_mut();
                let _ = t.accept_stream(id);
            }
        }
        seen_events = w.server_events.len();
        // Client writes upload.
        let ct = w.client.session_mut().unwrap().transport_mut();
        while up_sent < total as u64 {
            let n = chunk.len().min(total - up_sent as usize);
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = payload_byte(up_sent + i as u64);
            }
            let wrote = ct.stream_write(client_stream, &chunk[..n]).unwrap_or(0);
            if wrote == 0 {
                break;
            }
            up_sum_sent.update(&chunk[..wrote]);
            up_sent += wrote as u64;
        }
        if up_sent == total as u64 {
            let _ = ct.stream_finish(client_stream);
        }
        // Client reads download.
        while let Ok(n) = ct.stream_read(client_stream, &mut chunk) {
            if n == 0 {
                break;
            }
            down_sum_recv.update(&chunk[..n]);
        }
        // Server reads upload and writes download.
        if let Some(id) = server_stream {
            let st = w.server.session_mut(session).unwrap().transport_mut();
            while let Ok(n) = st.stream_read(id, &mut chunk) {
                if n == 0 {
                    break;
                }
                up_sum_recv.update(&chunk[..n]);
            }
            while down_sent < download as u64 {
                let n = chunk.len().min(download - down_sent as usize);
                for (i, b) in chunk[..n].iter_mut().enumerate() {
                    *b = payload_byte(down_sent + i as u64) ^ 0x5A;
                }
                let wrote = st.stream_write(id, &chunk[..n]).unwrap_or(0);
                if wrote == 0 {
                    break;
                }
                down_sum_sent.update(&chunk[..wrote]);
                down_sent += wrote as u64;
            }
            if down_sent == download as u64 {
                let _ = st.stream_finish(id);
            }
        }
        if !midway_done && up_sum_recv.1 >= total as u64 / 2 {
            midway_done = true;
            midway(w);
        }
        up_sum_recv.1 == total as u64 && down_sum_recv.1 == download as u64
    });
    assert!(
        ok,
        "transfer did not finish: up {} / {total}, down {} / {download}",
        up_sum_recv.1, down_sum_recv.1
    );
    assert_eq!(up_sum_recv.0, up_sum_sent.0, "upload checksum");
    assert_eq!(down_sum_recv.0, down_sum_sent.0, "download checksum");
    assert!(midway_done);
}

fn impaired_link() -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(2),
        loss: 0.01,
        duplicate: 0.01,
        reorder: 0.02,
        reorder_delay: Duration::from_millis(5),
        rate_bps: Some(100_000_000),
        queue_bytes: 512 * 1024,
        mtu: 1500,
    }
}

#[test]
fn large_checksummed_transfer_through_crypto_and_transport() {
    let mut w = World::new(impaired_link(), KEY, 0, 1);
    transfer(&mut w, transfer_size(), |_| {});
    let session = w.server.session(SessionId(1)).unwrap();
    let secure = session.secure_stats();
    assert!(secure.packets_received > 100);
    assert_eq!(secure.auth_failures, 0);
    // Duplicated datagrams were dropped by the token table / replay window, not delivered twice.
    assert!(w.c2s.stats().duplicated > 0);
    assert!(w.server.stats().dropped_unknown + w.server.stats().data_dropped > 0);
    // Accounting hooks: per-stream and per-session payload bytes are visible to the driver.
    let stats = session.transport().stats();
    assert_eq!(stats.stream_bytes_received, transfer_size() as u64);
}

#[test]
fn roaming_mid_transfer_and_old_address_cannot_hijack() {
    let mut w = World::new(impaired_link(), KEY, 0, 2);
    let old: SocketAddr = w.client_addr;
    let new: SocketAddr = "198.51.100.77:51000".parse().unwrap();
    let mut migrated_at = 0usize;
    transfer(&mut w, transfer_size() / 2, |w| {
        w.capture = true;
        w.client_addr = new;
        w.client_socket = SocketIndex(1);
        migrated_at = w.sent_to.len();
    });
    // The server noticed the move after an authenticated packet, and now sends to the new address
    // from the socket the client's packets arrive on.
    assert!(
        w.server_events
            .iter()
            .any(|e| matches!(e, EndpointEvent::PeerMigrated { peer, .. } if *peer == new))
    );
    let (_, local, peer) = w.server.session_peer(SessionId(1)).unwrap();
    assert_eq!((local, peer), (SocketIndex(1), new));
    // A few packets in flight may still go to the old address right after the move; afterwards none.
    let late_old = w.sent_to[migrated_at..]
        .iter()
        .skip(64)
        .filter(|a| **a == old)
        .count();
    assert_eq!(late_old, 0, "server kept sending to the old address");
    // An attacker at the old address replays captured client packets (including ones the link lost,
    // which were never delivered) and sends garbage: no hijack. Let the transfer's tail settle first.
    w.capture = false;
    let settle = w.now - w.start + Duration::from_secs(20);
    w.run_until(settle, |_| false);
    let before = w.server.stats();
    let captured = w.captured_c2s.clone();
    for mut d in captured {
        w.server
            .handle_datagram(w.now, w.unix(), SocketIndex(0), old, &mut d);
    }
    let mut garbage = vec![0xA5u8; 200];
    w.server
        .handle_datagram(w.now, w.unix(), SocketIndex(0), old, &mut garbage);
    let (_, local, peer) = w.server.session_peer(SessionId(1)).unwrap();
    assert_eq!(
        (local, peer),
        (SocketIndex(1), new),
        "old address hijacked the session"
    );
    let after = w.server.stats();
    assert!(
        after.dropped_unknown + after.data_dropped > before.dropped_unknown + before.data_dropped
    );
}

#[test]
fn every_captured_packet_replayed_is_rejected_without_effect() {
    let mut w = World::new(
        LinkConfig {
            loss: 0.0,
            ..impaired_link()
        },
        KEY,
        0,
        3,
    );
    w.capture = true;
    transfer(&mut w, 512 * 1024, |_| {});
    // Let acknowledgements settle, then take the snapshot with nothing pending at `now`.
    let settle = w.now - w.start + Duration::from_secs(2);
    w.run_until(settle, |_| false);
    w.pump();
    let session = SessionId(1);
    let server_before = w.server.stats();
    let secure_before = w.server.session(session).unwrap().secure_stats();
    let transport_before = w.server.session(session).unwrap().transport().stats();
    let client_before = w.client.stats();
    let client_secure_before = w.client.session().unwrap().secure_stats();
    let events_before = (w.server_events.len(), w.client_events.len());
    let (c2s, s2c) = (w.captured_c2s.clone(), w.captured_s2c.clone());
    assert!(c2s.len() > 100 && s2c.len() > 100);
    for mut d in c2s.iter().cloned() {
        w.server
            .handle_datagram(w.now, w.unix(), SocketIndex(0), w.client_addr, &mut d);
    }
    for mut d in s2c.iter().cloned() {
        w.client.handle_datagram(w.now, &mut d);
    }
    // Nothing to send, nothing happened.
    assert!(
        w.server.poll_transmit(w.now, &mut w.buf).is_none(),
        "a replay triggered a server datagram"
    );
    assert!(w.server.poll_event().is_none());
    assert!(w.client.poll_event().is_none());
    assert_eq!(
        (w.server_events.len(), w.client_events.len()),
        events_before
    );
    let server_after = w.server.stats();
    let rejected = (server_after.dropped_unknown - server_before.dropped_unknown)
        + (server_after.hello_replays - server_before.hello_replays)
        + (server_after.data_dropped - server_before.data_dropped);
    assert_eq!(
        rejected,
        c2s.len() as u64,
        "every replayed client datagram is counted as dropped"
    );
    // Replays whose token still matched are counted as replays (never as forgeries).
    let data = server_after.data_dropped - server_before.data_dropped;
    assert_eq!(
        server_after.data_replays - server_before.data_replays,
        data,
        "{server_after:?}"
    );
    assert_eq!(
        server_after.data_auth_failed,
        server_before.data_auth_failed
    );
    assert_eq!(
        w.client.stats().dropped - client_before.dropped,
        s2c.len() as u64
    );
    let secure_after = w.server.session(session).unwrap().secure_stats();
    assert_eq!(
        secure_after.packets_received,
        secure_before.packets_received
    );
    assert_eq!(
        w.server
            .session(session)
            .unwrap()
            .transport()
            .stats()
            .packets_received,
        transport_before.packets_received
    );
    assert_eq!(
        w.client.session().unwrap().secure_stats().packets_received,
        client_secure_before.packets_received
    );
}

fn server_datagrams_after_handshake_attempts(
    key: &str,
    skew: i64,
    setup: impl FnOnce(&mut World),
) -> (World, bool) {
    let mut w = World::new(impaired_link(), key, skew, 4);
    setup(&mut w);
    let connected = w.run_until(Duration::from_secs(40), |w| {
        w.client.is_finished() || w.client.is_connected()
    });
    assert!(connected);
    let ok = w.client.is_connected();
    (w, ok)
}

#[test]
fn wrong_key_stale_clock_and_deleted_user_get_silence() {
    // Wrong key.
    let (w, ok) =
        server_datagrams_after_handshake_attempts("not-the-right-key-0123456789", 0, |_| {});
    assert!(!ok);
    assert_eq!(
        w.s2c.stats().sent,
        0,
        "wrong key must get no datagram at all"
    );
    assert!(
        w.client_events
            .iter()
            .any(|e| matches!(e, ClientEvent::HandshakeTimeout))
    );
    assert!(w.c2s.stats().sent >= 5, "the client retried");
    // Clock 5 minutes behind: its tags are not even in the server's table.
    let (w, ok) = server_datagrams_after_handshake_attempts(KEY, -300, |_| {});
    assert!(!ok);
    assert_eq!(w.s2c.stats().sent, 0);
    assert!(w.server.stats().dropped_unknown > 0);
    // Clock 125 s ahead: tag known (next epoch), timestamp outside the window.
    let (w, ok) = server_datagrams_after_handshake_attempts(KEY, 125, |_| {});
    assert!(!ok);
    assert_eq!(w.s2c.stats().sent, 0);
    assert!(w.server.stats().hello_stale > 0);
    // Deleted user.
    let (w, ok) = server_datagrams_after_handshake_attempts(KEY, 0, |w| {
        w.server.remove_user(w.now, UserId(1));
    });
    assert!(!ok);
    assert_eq!(w.s2c.stats().sent, 0);
}

#[test]
fn replayed_hello_in_the_network_gets_silence() {
    let mut w = World::new(impaired_link(), KEY, 0, 5);
    w.capture = true;
    w.connect();
    let hello = w.captured_c2s[0].clone();
    let replies_before = w.server.stats().replies_sent;
    let sessions = w.server.session_count();
    // The hello replayed from elsewhere, once per second for a minute, while the session runs.
    for i in 0..60u64 {
        let mut d = hello.clone();
        let from: SocketAddr = format!("203.0.113.{}:{}", i + 1, 1000 + i).parse().unwrap();
        let (now, unix) = (w.now, w.unix());
        w.server
            .handle_datagram(now, unix, SocketIndex(0), from, &mut d);
        let until = w.now - w.start + Duration::from_secs(1);
        w.run_until(until, |_| false);
    }
    assert_eq!(w.server.stats().replies_sent, replies_before);
    assert_eq!(w.server.stats().hello_replays, 60);
    assert!(
        !w.sent_to
            .iter()
            .any(|a| a.ip().to_string().starts_with("203.0.113."))
    );
    assert_eq!(w.server.session_count(), sessions);
}

#[test]
fn refused_user_gets_authenticated_refusal_over_the_network() {
    let mut w = World::new(impaired_link(), &KEY.replace("sim", "ref"), 0, 6);
    assert!(w.run_until(Duration::from_secs(40), |w| w.client.is_finished()));
    assert!(w.client_events.iter().any(|e| matches!(
        e,
        ClientEvent::Refused {
            reason: RefuseReason::Disabled,
            ..
        }
    )));
    assert_eq!(w.server.session_count(), 0);
}

#[test]
fn driver_close_and_user_removal_reach_the_client_with_a_reason() {
    let mut w = World::new(impaired_link(), KEY, 0, 7);
    let session = w.connect();
    let now = w.now;
    w.server
        .close_session(now, session, CloseReason::LimitReached);
    assert!(w.run_until(Duration::from_secs(60), |w| w.client.is_finished()));
    assert!(w.client_events.iter().any(|e| matches!(
        e,
        ClientEvent::Transport(TransportEvent::Closed {
            reason: CloseReason::LimitReached,
            by_peer: true
        })
    )));
    assert!(w.run_until(Duration::from_secs(120), |w| w.server.session_count() == 0));
    assert!(w.server_events.iter().any(|e| matches!(
        e,
        EndpointEvent::SessionClosed {
            reason: CloseReason::LimitReached,
            user: UserId(1),
            ..
        }
    )));

    let mut w = World::new(impaired_link(), KEY, 0, 8);
    w.connect();
    let now = w.now;
    w.server.remove_user(now, UserId(1));
    assert!(w.run_until(Duration::from_secs(60), |w| w.client.is_finished()));
    assert!(w.client_events.iter().any(|e| matches!(
        e,
        ClientEvent::Transport(TransportEvent::Closed {
            reason: CloseReason::UserDeleted,
            by_peer: true
        })
    )));
}

#[test]
fn idle_session_survives_on_keepalives_and_dies_on_silence() {
    let mut w = World::new(impaired_link(), KEY, 0, 9);
    w.connect();
    // Five idle minutes: keepalives keep it alive (and confirm the session on the server).
    w.run_until(Duration::from_secs(300), |_| false);
    assert!(w.client.is_connected());
    assert_eq!(w.server.session_count(), 1);
    // The path dies: both ends time out.
    w.c2s.set_config(LinkConfig {
        loss: 1.0,
        ..impaired_link()
    });
    w.s2c.set_config(LinkConfig {
        loss: 1.0,
        ..impaired_link()
    });
    assert!(
        w.run_until(Duration::from_secs(600), |w| w.client.is_finished()
            && w.server.session_count() == 0)
    );
}

#[test]
fn short_upstream_outage_with_default_windows_is_survived() {
    // 300 ms of total client→server loss in the middle of a full-speed upload: everything in
    // flight is lost at once (far more than the 64-packet initial look-ahead).
    let mut w = World::new(
        LinkConfig {
            loss: 0.0,
            ..impaired_link()
        },
        KEY,
        0,
        10,
    );
    transfer(&mut w, transfer_size() / 2, |w| {
        w.c2s.set_config(LinkConfig {
            loss: 1.0,
            ..impaired_link()
        });
        let back = LinkConfig {
            loss: 0.0,
            ..impaired_link()
        };
        w.restore = Some((w.now + Duration::from_millis(300), back));
    });
    assert!(w.restore.is_none(), "the outage happened");
    assert!(w.c2s.stats().dropped_random > 64);
    assert_eq!(w.server.session_count(), 1);
}

#[test]
fn upstream_blackout_far_beyond_the_token_window_recovers() {
    // The client→server direction drops everything for 5 s of a 100 Mbit/s upload. With a small
    // receive window (look-ahead 96) the data in flight exceeds what the server can identify:
    // without a limit the session would die. The client stops at the server's announced window
    // end, probes from its reserve, and resumes.
    let session = SessionConfig {
        token_window: 128,
        token_behind: 32,
        ..SessionConfig::default()
    };
    let link = LinkConfig {
        loss: 0.0,
        ..impaired_link()
    };
    let mut w = World::with_session_config(link, KEY, 0, 11, session);
    transfer(&mut w, transfer_size() / 2, |w| {
        w.c2s.set_config(LinkConfig {
            loss: 1.0,
            ..impaired_link()
        });
        w.restore = Some((
            w.now + Duration::from_secs(5),
            LinkConfig {
                loss: 0.0,
                ..impaired_link()
            },
        ));
    });
    assert!(w.restore.is_none());
    assert!(
        w.client.session().unwrap().secure_stats().blocked > 0,
        "the client hit the window"
    );
    assert_eq!(w.server.session_count(), 1);
}

#[test]
fn bidirectional_blackout_recovers() {
    // Both directions drop everything for 20 s mid-transfer: both sides block and probe; the
    // session survives (idle timeout is 60 s) and the transfer completes intact.
    let mut w = World::new(impaired_link(), KEY, 0, 12);
    transfer(&mut w, transfer_size() / 2, |w| {
        let dead = LinkConfig {
            loss: 1.0,
            ..impaired_link()
        };
        w.c2s.set_config(dead.clone());
        w.s2c.set_config(dead);
        w.restore = Some((w.now + Duration::from_secs(20), impaired_link()));
    });
    assert!(w.restore.is_none());
    let session = w.server.session(SessionId(1)).unwrap();
    assert!(
        session.secure_stats().blocked > 0
            || w.client.session().unwrap().secure_stats().blocked > 0
    );
}

/// One connection of a household sharing a key: a connector on its own UDP port and its links.
struct Household {
    addr: SocketAddr,
    client: ClientSession,
    up: Link,
    down: Link,
    hellos: Vec<Vec<u8>>,
}

/// Runs every connection and the server until all are connected or `limit`; returns the time.
/// Time jumps to the next event; an iteration at an unchanged time is allowed only a few times in
/// a row (a timer that stays due after it ran would spin a real event loop).
fn run_household(
    server: &mut ServerEndpoint,
    conns: &mut [Household],
    start: Instant,
    limit: Instant,
) -> Instant {
    let mut now = start;
    let mut buf = vec![0u8; 2048];
    let mut idle_rounds = 0;
    while now < limit && !conns.iter().all(|c| c.client.is_connected()) {
        let unix = UNIX0 + (now - start).as_secs();
        for c in conns.iter_mut() {
            if c.client.poll_timeout().is_some_and(|t| t <= now) {
                c.client.handle_timeout(now);
            }
            while let Some(n) = c.client.poll_transmit(now, &mut buf) {
                if !c.client.is_connected() {
                    c.hellos.push(buf[..n].to_vec());
                }
                c.up.send(now, &buf[..n]);
            }
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        for c in conns.iter_mut() {
            while let Some(mut d) = c.up.recv(now) {
                server.handle_datagram(now, unix, SocketIndex(0), c.addr, &mut d);
            }
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            if let Some(c) = conns.iter_mut().find(|c| c.addr == t.to) {
                c.down.send(now, &buf[..t.len]);
            }
        }
        for c in conns.iter_mut() {
            while let Some(mut d) = c.down.recv(now) {
                c.client.handle_datagram(now, &mut d);
            }
        }
        while server.poll_event().is_some() {}
        let next = conns
            .iter()
            .flat_map(|c| [c.up.next_event_time(), c.down.next_event_time()])
            .chain(conns.iter().map(|c| c.client.poll_timeout()))
            .chain(std::iter::once(server.poll_timeout()))
            .flatten()
            .min()
            .unwrap_or(limit)
            .min(limit);
        if next > now {
            now = next;
            idle_rounds = 0;
        } else {
            idle_rounds += 1;
            assert!(idle_rounds < 10, "busy loop at {:?}", now - start);
        }
    }
    now
}

#[test]
fn forty_sessions_of_one_key_connect_in_one_epoch_over_the_network_and_replays_get_silence() {
    // 5 devices × 8 sessions of one key, all starting within 80 ms (a server restart), over
    // links with loss, duplication and reordering.
    let start = Instant::now();
    let mut server = ServerEndpoint::new(
        EndpointConfig {
            max_sessions_per_user: 64,
            ..EndpointConfig::default()
        },
        [21; 32],
    );
    server.set_user(UserId(1), KEY, UserState::Active).unwrap();
    let mut conns: Vec<Household> = (0..40u64)
        .map(|i| {
            let (dev, session) = (i / 8, i % 8);
            let at = start + Duration::from_millis(2 * i);
            Household {
                addr: format!("192.0.2.{}:{}", 10 + dev, 40_000 + session)
                    .parse()
                    .unwrap(),
                client: ClientSession::connect(
                    ConnectorConfig::default(),
                    KEY,
                    at,
                    UNIX0,
                    [i as u8 ^ 0x33; 32],
                )
                .unwrap(),
                up: Link::new(impaired_link(), 100 + i, start),
                down: Link::new(impaired_link(), 200 + i, start),
                hellos: Vec::new(),
            }
        })
        .collect();
    let done = run_household(
        &mut server,
        &mut conns,
        start,
        start + Duration::from_secs(20),
    );
    let connected = conns.iter().filter(|c| c.client.is_connected()).count();
    assert_eq!(connected, 40, "all sessions of the key connect");
    assert!(done < start + Duration::from_secs(20));
    // A hello whose reply was lost leaves an unconfirmed session behind (the client retried).
    let sessions = server.session_count();
    assert!(sessions >= 40);
    assert_eq!(server.stats().hello_key_limited, 0);
    // Every hello that was sent, replayed byte for byte from a prober and from its own port:
    // no reply, no new session.
    let replies = server.stats().replies_sent;
    let prober: SocketAddr = "203.0.113.77:5555".parse().unwrap();
    let unix = UNIX0 + (done - start).as_secs() + 30;
    let mut buf = vec![0u8; 2048];
    let mut replayed = 0;
    for c in &conns {
        for hello in &c.hellos {
            for from in [prober, c.addr] {
                let mut d = hello.clone();
                server.handle_datagram(done, unix, SocketIndex(0), from, &mut d);
                replayed += 1;
            }
        }
    }
    while let Some(t) = server.poll_transmit(done, &mut buf) {
        assert_ne!(t.to, prober, "a replay was answered");
    }
    assert!(replayed >= 80);
    assert_eq!(server.stats().replies_sent, replies);
    assert_eq!(server.session_count(), sessions);
}

// ------------------------------------------------------------------ path-MTU discovery

/// 40 ms RTT, 100 Mbit/s, datagrams above `mtu` bytes (UDP payload) dropped.
fn mtu_link(mtu: usize, loss: f64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(1),
        loss,
        rate_bps: Some(100_000_000),
        queue_bytes: 512 * 1024,
        mtu,
        ..LinkConfig::default()
    }
}

const RTT: Duration = Duration::from_millis(40);

/// When the second datagram with a length in `sizes` went on the wire, after `from` (the first
/// may be the probe that confirmed the size; the second carries data at that size).
fn second_within(
    wire: &[(Instant, usize)],
    from: Instant,
    sizes: std::ops::RangeInclusive<usize>,
) -> Option<Duration> {
    wire.iter()
        .filter(|(at, len)| sizes.contains(len) && *at >= from)
        .nth(1)
        .map(|(at, _)| *at - from)
}

/// Average datagram size of the bulk part (datagrams above 1,000 bytes) of `wire`.
fn bulk_bytes_per_datagram(wire: &[(Instant, usize)]) -> usize {
    let bulk: Vec<usize> = wire.iter().map(|w| w.1).filter(|&l| l > 1000).collect();
    bulk.iter().sum::<usize>() / bulk.len().max(1)
}

/// A 1,500-byte path (1,472 bytes of UDP payload): both directions reach 1,472-byte datagrams
/// within a few round trips of the first data, the bulk runs at that size, and nothing larger
/// ever goes out (before path-MTU discovery every datagram was at most 1,350 bytes).
#[test]
fn pmtu_reaches_1472_on_a_1500_byte_path_within_a_few_round_trips() {
    let mut w = World::new(mtu_link(1472, 0.0), KEY, 0, 21);
    transfer(&mut w, transfer_size(), |_| {});
    // The first large datagram (above the handshake sizes) marks the start of the transfer.
    let data_start = w.wire_c2s.iter().find(|x| x.1 > 1000).unwrap().0;
    let up = second_within(&w.wire_c2s, data_start, 1472..=1472).expect("client at 1,472");
    let down = second_within(&w.wire_s2c, data_start, 1472..=1472).expect("server at 1,472");
    assert!(up <= RTT * 3, "client probed after {up:?}");
    assert!(down <= RTT * 4, "server probed after {down:?}");
    // Full-size data after the probe was confirmed: count datagrams of exactly 1,472 bytes.
    let full = |wire: &[(Instant, usize)]| wire.iter().filter(|x| x.1 == 1472).count();
    assert!(
        full(&w.wire_c2s) > 1000,
        "{} full datagrams",
        full(&w.wire_c2s)
    );
    let largest = w.wire_c2s.iter().chain(&w.wire_s2c).map(|x| x.1).max();
    assert_eq!(
        largest,
        Some(1472),
        "never larger than a 1,500-byte IPv4 packet"
    );
    assert_eq!(w.c2s.stats().dropped_mtu + w.s2c.stats().dropped_mtu, 0);
    let avg = bulk_bytes_per_datagram(&w.wire_c2s);
    assert!(avg > 1440, "bulk bytes per datagram {avg}");
    let client = w.client.session().unwrap();
    assert_eq!(client.current_max_datagram(), 1472);
    let server = w.server.session(SessionId(1)).unwrap();
    assert_eq!(server.current_max_datagram(), 1472);
    println!("1500 path: up {up:?} down {down:?}, bulk {avg} bytes per datagram");
}

/// A path that drops datagrams above 1,400 bytes: the search ends at most 8 bytes below 1,400,
/// and every datagram the link dropped for its size was a probe (no data packet ever was).
#[test]
fn pmtu_converges_below_a_1400_byte_path_without_losing_data() {
    let mut w = World::new(mtu_link(1400, 0.0), KEY, 0, 22);
    transfer(&mut w, transfer_size() * 4, |_| {});
    for (side, session) in [
        ("client", w.client.session().unwrap()),
        ("server", w.server.session(SessionId(1)).unwrap()),
    ] {
        let size = session.current_max_datagram();
        let pmtu = session.transport().pmtu_stats();
        assert!((1392..=1400).contains(&size), "{side} at {size}: {pmtu:?}");
        assert_eq!(pmtu.black_holes, 0, "{side}");
        assert!(
            pmtu.probes_lost >= 3,
            "{side} learned 1,472 fails: {pmtu:?}"
        );
    }
    let client_probes = w
        .client
        .session()
        .unwrap()
        .transport()
        .pmtu_stats()
        .probes_sent;
    let server_probes = w
        .server
        .session(SessionId(1))
        .unwrap()
        .transport()
        .pmtu_stats()
        .probes_sent;
    assert!(w.c2s.stats().dropped_mtu <= u64::from(client_probes));
    assert!(w.s2c.stats().dropped_mtu <= u64::from(server_probes));
    let data_start = w.wire_c2s.iter().find(|x| x.1 > 1000).unwrap().0;
    let settled = second_within(&w.wire_c2s, data_start, 1392..=1400).unwrap();
    assert!(settled < RTT * 30, "search took {settled:?}");
    println!(
        "1400 path: client settled at {} after {settled:?}",
        w.client.session().unwrap().current_max_datagram()
    );
}

/// The path MTU drops to 1,300 mid-transfer (a route change): full-size packets vanish. The
/// session falls back (1,472 → base 1,350, still too large → floor 1,200) and searches again
/// below 1,300; the upload stalls for at most 15 RTTs (two probe timeouts, the second backed
/// off), then completes intact.
#[test]
fn pmtu_black_hole_mid_transfer_falls_back_and_the_transfer_continues() {
    let mut w = World::new(mtu_link(1472, 0.0), KEY, 0, 23);
    let mut changed_at = None;
    transfer(&mut w, transfer_size() * 4, |w| {
        changed_at = Some(w.now);
        for link in [&mut w.c2s, &mut w.s2c] {
            let config = LinkConfig {
                mtu: 1300,
                ..link.config().clone()
            };
            link.set_config(config);
        }
    });
    let changed_at = changed_at.unwrap();
    let client = w.client.session().unwrap();
    let size = client.current_max_datagram();
    let pmtu = client.transport().pmtu_stats();
    // Through the floor (1,200) and searching again: it ends somewhere that gets through.
    assert!((1200..=1300).contains(&size), "client at {size}: {pmtu:?}");
    assert!(pmtu.black_holes >= 1, "{pmtu:?}");
    // The longest gap between data datagrams arriving at the server after the change.
    let arrivals: Vec<Instant> = w
        .arrived_c2s
        .iter()
        .filter(|(at, len)| *at >= changed_at && *len > 1000)
        .map(|x| x.0)
        .collect();
    let stall = arrivals
        .windows(2)
        .map(|p| p[1] - p[0])
        .chain(arrivals.first().map(|&a| a - changed_at))
        .max()
        .unwrap();
    assert!(stall < RTT * 15, "upload stalled for {stall:?}");
    println!("black hole: stalled {stall:?}, client now at {size}, {pmtu:?}");
}

/// 5 % random loss on a 1,500-byte path: lost probes and lost full-size packets do not shrink
/// the size; every run ends at 1,472.
#[test]
fn pmtu_random_loss_does_not_shrink_the_size() {
    for seed in [31, 32, 33] {
        let mut w = World::new(mtu_link(1472, 0.05), KEY, 0, seed);
        transfer(&mut w, transfer_size() / 2, |_| {});
        for (side, session) in [
            ("client", w.client.session().unwrap()),
            ("server", w.server.session(SessionId(1)).unwrap()),
        ] {
            let pmtu = session.transport().pmtu_stats();
            assert_eq!(
                session.current_max_datagram(),
                1472,
                "seed {seed} {side}: {pmtu:?}"
            );
        }
        let avg = bulk_bytes_per_datagram(&w.wire_c2s);
        assert!(avg > 1440, "seed {seed}: bulk bytes per datagram {avg}");
    }
}

/// Towards an IPv6 peer the bound is 1,452 (40 bytes of IPv6 header), even on a path that
/// would carry more.
#[test]
fn pmtu_ipv6_peer_is_capped_at_1452() {
    let mut w = World::new(mtu_link(1500, 0.0), KEY, 0, 24);
    w.client_addr = "[2001:db8::10]:40000".parse().unwrap();
    transfer(&mut w, transfer_size() / 2, |_| {});
    let largest = w.wire_c2s.iter().chain(&w.wire_s2c).map(|x| x.1).max();
    assert_eq!(largest, Some(1452));
    assert_eq!(w.client.session().unwrap().current_max_datagram(), 1452);
    assert_eq!(
        w.server
            .session(SessionId(1))
            .unwrap()
            .current_max_datagram(),
        1452
    );
}
