//! Tests of carrier sessions end to end (docs/PROTOCOL.md §7): a `ClientSession` and a
//! `ServerEndpoint` joined by a simulated reliable byte pipe that delivers in arbitrary chunks,
//! with the server's first-bytes gate in front, as the TCP loops will drive them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    CARRIER_SOCKET, CarrierHello, ClientEvent, ClientSession, ConnectorConfig, EndpointConfig,
    EndpointEvent, ServerEndpoint, SessionId, SocketIndex, UserId, UserState,
};
use crate::proto::carrier::gate::{GateStep, HelloGate, NotOstp};
use crate::proto::carrier::records::MAX_REPLY_RECORD;
use crate::proto::carrier::{FrameError, MAX_FRAME_LEN};
use crate::proto::handshake::RefuseReason;
use crate::proto::transport::{CloseReason, Destination, StreamId, TransportEvent};

const KEY: &str = "device-test-key-ABCDEFGHIJ";
const UNIX: u64 = 1_800_000_000;
const USER: UserId = UserId(1);
/// The bounded write buffer of each side of a connection (backpressure beyond it).
const WRITE_BUF: usize = 256 * 1024;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn dest() -> Destination {
    Destination::domain("example.com", 443).unwrap()
}

fn server(max_devices: Option<u32>) -> ServerEndpoint {
    let mut s = ServerEndpoint::new(EndpointConfig::default(), [7; 32]);
    s.set_user(USER, KEY, UserState::Active).unwrap();
    assert!(s.set_max_devices(USER, max_devices));
    s
}

fn client(now: Instant, seed: u8) -> ClientSession {
    ClientSession::connect_carrier(ConnectorConfig::default(), KEY, now, UNIX, [seed; 32]).unwrap()
}

/// Where the server's side of a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerSide {
    Gate,
    Session(SessionId),
    Refused,
    NotOstp(Option<NotOstp>),
    Failed(FrameError),
}

/// One simulated TCP connection: bytes in flight each way and each side's read buffer.
struct Conn {
    gate: HelloGate,
    side: ServerSide,
    peer: SocketAddr,
    c2s: VecDeque<u8>,
    server_in: Vec<u8>,
    s2c: VecDeque<u8>,
    client_in: Vec<u8>,
    client_err: Option<FrameError>,
    /// The client's first write (the hello record).
    hello: Vec<u8>,
    /// Largest read; each read takes 1 ..= this many bytes.
    max_read: usize,
    rng: u64,
    /// The server named this connection's session ready and it has not returned `None` yet.
    owed: bool,
}

impl Conn {
    fn new(now: Instant, peer: &str, max_read: usize) -> Self {
        Conn {
            gate: HelloGate::new(now),
            side: ServerSide::Gate,
            peer: addr(peer),
            c2s: VecDeque::new(),
            server_in: Vec::new(),
            s2c: VecDeque::new(),
            client_in: Vec::new(),
            client_err: None,
            hello: Vec::new(),
            max_read,
            rng: 0x9E37_79B9_7F4A_7C15 ^ max_read as u64,
            owed: false,
        }
    }

    fn session(&self) -> Option<SessionId> {
        match self.side {
            ServerSide::Session(id) => Some(id),
            _ => None,
        }
    }

    fn read_len(&mut self, available: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (1 + (self.rng % self.max_read as u64) as usize).min(available)
    }

    /// The server reads what arrived (one read's worth) and acts on it.
    fn server_read(&mut self, s: &mut ServerEndpoint, now: Instant) {
        match self.side {
            ServerSide::Gate => {
                let step = self
                    .gate
                    .step(now, &self.server_in, &s.carrier_directory(UNIX));
                match step {
                    GateStep::NeedMore => {}
                    GateStep::NotOstp(why) => self.side = ServerSide::NotOstp(Some(why)),
                    GateStep::Hello { user, len } => {
                        let mut reply = [0u8; MAX_REPLY_RECORD];
                        let record = &mut self.server_in[..len];
                        match s.handle_carrier_hello(now, UNIX, self.peer, user, record, &mut reply)
                        {
                            CarrierHello::Accepted { session, reply_len } => {
                                self.s2c.extend(&reply[..reply_len]);
                                self.server_in.drain(..len);
                                self.side = ServerSide::Session(session);
                                self.server_read(s, now);
                            }
                            CarrierHello::Refused { reply_len } => {
                                self.s2c.extend(&reply[..reply_len]);
                                self.side = ServerSide::Refused;
                            }
                            CarrierHello::NotOstp => self.side = ServerSide::NotOstp(None),
                        }
                    }
                }
            }
            ServerSide::Session(id) => match s.handle_carrier_input(now, id, &mut self.server_in) {
                Ok(n) => {
                    self.server_in.drain(..n);
                }
                Err(e) => self.side = ServerSide::Failed(e),
            },
            _ => self.server_in.clear(),
        }
    }

    /// Moves bytes both ways until nothing moves; returns whether anything did.
    fn pump(&mut self, s: &mut ServerEndpoint, c: &mut ClientSession, now: Instant) -> bool {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut any = false;
        for _ in 0..100_000 {
            let mut moved = false;
            while self.c2s.len() < WRITE_BUF {
                let Some(n) = c.poll_transmit_frame(now, &mut buf) else {
                    break;
                };
                if self.hello.is_empty() {
                    self.hello = buf[..n].to_vec();
                }
                self.c2s.extend(&buf[..n]);
            }
            while !self.c2s.is_empty() {
                let k = self.read_len(self.c2s.len());
                self.server_in.extend(self.c2s.drain(..k));
                self.server_read(s, now);
                moved = true;
            }
            while let Some(id) = s.poll_carrier_ready() {
                assert!(s.is_carrier_session(id), "only carrier sessions are named");
                if Some(id) == self.session() {
                    self.owed = true;
                }
            }
            if let (true, Some(id)) = (self.owed, self.session()) {
                while self.s2c.len() < WRITE_BUF {
                    let Some(n) = s.poll_transmit_frame(now, id, &mut buf) else {
                        self.owed = false;
                        break;
                    };
                    self.s2c.extend(&buf[..n]);
                }
            }
            while !self.s2c.is_empty() && self.client_err.is_none() {
                let k = self.read_len(self.s2c.len());
                self.client_in.extend(self.s2c.drain(..k));
                match c.handle_carrier_input(now, &mut self.client_in) {
                    Ok(n) => {
                        self.client_in.drain(..n);
                    }
                    Err(e) => self.client_err = Some(e),
                }
                moved = true;
            }
            if !moved {
                return any;
            }
            any = true;
        }
        panic!("the pipe never settled");
    }
}

fn client_events(c: &mut ClientSession) -> Vec<ClientEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn server_events(s: &mut ServerEndpoint) -> Vec<EndpointEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// A connected client on a fresh connection from `peer`.
fn connected(
    s: &mut ServerEndpoint,
    now: Instant,
    peer: &str,
    seed: u8,
    max_read: usize,
) -> (ClientSession, Conn, SessionId) {
    let mut c = client(now, seed);
    let mut conn = Conn::new(now, peer, max_read);
    conn.pump(s, &mut c, now);
    assert!(
        client_events(&mut c)
            .iter()
            .any(|e| matches!(e, ClientEvent::Connected)),
        "connected"
    );
    let id = conn.session().expect("accepted");
    (c, conn, id)
}

/// Byte `off` of stream number `k`'s test data.
fn pattern(k: usize, off: usize) -> u8 {
    ((off * 31 + k * 7) % 251) as u8
}

/// Client streams whose bytes the server echoes; checks every byte that comes back.
struct EchoTest {
    per_stream: usize,
    streams: usize,
    /// Client: stream → (its number, bytes written, bytes read back).
    open: HashMap<StreamId, (usize, usize, usize)>,
    opened: usize,
    /// Server: bytes read and not yet written back, per stream.
    backlog: HashMap<StreamId, VecDeque<u8>>,
}

impl EchoTest {
    fn new(streams: usize, per_stream: usize) -> Self {
        EchoTest {
            per_stream,
            streams,
            open: HashMap::new(),
            opened: 0,
            backlog: HashMap::new(),
        }
    }

    fn done(&self) -> bool {
        self.opened == self.streams && self.open.values().all(|v| v.2 == self.per_stream)
    }

    fn client_step(&mut self, c: &mut ClientSession) {
        let t = c.session_mut().unwrap().transport_mut();
        while self.opened < self.streams {
            match t.open_stream(dest()) {
                Ok(id) => {
                    self.open.insert(id, (self.opened, 0, 0));
                    self.opened += 1;
                }
                Err(_) => break,
            }
        }
        for (&id, (k, written, read)) in &mut self.open {
            while *written < self.per_stream {
                let end = (*written + 16 * 1024).min(self.per_stream);
                let chunk: Vec<u8> = (*written..end).map(|o| pattern(*k, o)).collect();
                let n = t.stream_write(id, &chunk).unwrap();
                if n == 0 {
                    break;
                }
                *written += n;
            }
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = t.stream_read(id, &mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(*k, *read + i), "stream {k} byte {}", *read + i);
                }
                *read += n;
            }
        }
    }

    fn server_step(&mut self, s: &mut ServerEndpoint, id: SessionId) {
        for event in server_events(s) {
            if let EndpointEvent::Transport {
                event: TransportEvent::StreamOpened { id: stream, .. },
                ..
            } = event
            {
                let t = s.session_mut(id).unwrap().transport_mut();
                t.accept_stream(stream).unwrap();
                self.backlog.insert(stream, VecDeque::new());
            }
        }
        let t = s.session_mut(id).unwrap().transport_mut();
        let mut buf = [0u8; 16 * 1024];
        for (&stream, backlog) in &mut self.backlog {
            loop {
                let n = t.stream_read(stream, &mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                backlog.extend(&buf[..n]);
            }
            while !backlog.is_empty() {
                let (front, _) = backlog.as_slices();
                let n = t.stream_write(stream, front).unwrap();
                if n == 0 {
                    break;
                }
                backlog.drain(..n);
            }
        }
    }

    fn run(
        &mut self,
        s: &mut ServerEndpoint,
        c: &mut ClientSession,
        conn: &mut Conn,
        now: Instant,
    ) {
        for _ in 0..100_000 {
            self.client_step(c);
            conn.pump(s, c, now);
            self.server_step(s, conn.session().unwrap());
            conn.pump(s, c, now);
            if self.done() {
                return;
            }
        }
        panic!("echo did not finish");
    }
}

/// The reliable-carrier transport on both ends: nothing retransmitted, lost, probed or ACKed.
fn assert_reliable(s: &ServerEndpoint, id: SessionId, c: &ClientSession) {
    for stats in [
        s.session(id).unwrap().transport().stats(),
        c.session().unwrap().transport().stats(),
    ] {
        assert_eq!(stats.stream_bytes_retransmitted, 0, "{stats:?}");
        assert_eq!(stats.packets_lost, 0, "{stats:?}");
        assert_eq!(stats.pto_count, 0, "{stats:?}");
        assert_eq!(stats.ack_frames_sent, 0, "{stats:?}");
        assert_eq!(stats.ack_only_sent, 0, "{stats:?}");
        assert_eq!(stats.bytes_in_flight, 0, "{stats:?}");
    }
}

#[test]
fn handshake_and_streams_work_with_one_byte_reads() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.7:40000", 1, 1);
    let events = server_events(&mut s);
    assert!(events.iter().any(|e| matches!(
        e,
        EndpointEvent::SessionEstablished { session, user: USER, peer }
            if *session == id && *peer == conn.peer
    )));
    // A carrier session: its own socket marker, no tokens, never in the UDP path.
    assert_eq!(s.session_peer(id), Some((USER, CARRIER_SOCKET, conn.peer)));
    assert!(s.session(id).unwrap().is_carrier());
    assert_eq!(s.token_count(), 0);
    assert_eq!(s.user_session_count(USER), 1);
    let mut echo = EchoTest::new(2, 20_000);
    echo.run(&mut s, &mut c, &mut conn, now);
    let mut buf = vec![0u8; 65_536];
    assert!(s.poll_transmit_batch(now, &mut buf, 8).is_none());
    // Written is delivered: nothing stays in the send buffers.
    assert_eq!(c.session().unwrap().transport().send_buffered(), 0);
    assert_eq!(s.session(id).unwrap().transport().send_buffered(), 0);
    assert_reliable(&s, id, &c);
}

#[test]
fn megabytes_both_ways_arrive_intact_over_arbitrary_chunks() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.7:40000", 2, 40_000);
    // 3 MB up, echoed back down: with a 256 KiB write buffer each way (backpressure).
    let mut echo = EchoTest::new(6, 512 * 1024);
    echo.run(&mut s, &mut c, &mut conn, now);
    assert_reliable(&s, id, &c);
    let frames = s.session(id).unwrap().secure_stats();
    // Frames are large: far fewer than datagrams would need.
    assert!(frames.packets_sent < 3 * 1024 * 1024 / 4096, "{frames:?}");
}

#[test]
fn a_hundred_streams_share_one_connection() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.7:40000", 3, 3_000);
    let mut echo = EchoTest::new(100, 4_000);
    echo.run(&mut s, &mut c, &mut conn, now);
    assert_reliable(&s, id, &c);
}

#[test]
fn datagrams_cross_both_ways() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.7:40000", 4, 7);
    server_events(&mut s);
    let t = c.session_mut().unwrap().transport_mut();
    t.send_datagram(3, dest(), b"ping over tcp").unwrap();
    conn.pump(&mut s, &mut c, now);
    let got: Vec<_> = server_events(&mut s)
        .into_iter()
        .filter_map(|e| match e {
            EndpointEvent::Transport {
                event: TransportEvent::Datagram { assoc, data, .. },
                ..
            } => Some((assoc, data)),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![(3, b"ping over tcp".to_vec())]);
    let t = s.session_mut(id).unwrap().transport_mut();
    t.send_datagram(3, dest(), b"pong").unwrap();
    conn.pump(&mut s, &mut c, now);
    assert!(client_events(&mut c).iter().any(|e| matches!(
        e,
        ClientEvent::Transport(TransportEvent::Datagram { assoc: 3, data, .. }) if data == b"pong"
    )));
}

#[test]
fn a_disabled_user_is_refused_with_a_reply_record() {
    let now = Instant::now();
    let mut s = server(None);
    s.set_user_state(USER, UserState::Refused(RefuseReason::Disabled));
    let mut c = client(now, 5);
    let mut conn = Conn::new(now, "198.51.100.7:40000", 3);
    conn.pump(&mut s, &mut c, now);
    assert_eq!(conn.side, ServerSide::Refused);
    assert!(client_events(&mut c).iter().any(|e| matches!(
        e,
        ClientEvent::Refused {
            reason: RefuseReason::Disabled,
            ..
        }
    )));
    assert!(c.is_finished());
    assert_eq!(s.session_count(), 0);
    assert_eq!(s.stats().refusals_sent, 1);
}

#[test]
fn the_device_limit_counts_carrier_and_udp_sessions_alike() {
    let now = Instant::now();
    let mut s = server(Some(1));
    let (_a, _conn_a, _) = connected(&mut s, now, "198.51.100.1:1000", 6, 100);
    // Another connection from the same address is the same device.
    let (_a2, _conn_a2, _) = connected(&mut s, now, "198.51.100.1:1001", 7, 100);
    // A second address over TCP is refused...
    let mut b = client(now, 8);
    let mut conn_b = Conn::new(now, "198.51.100.2:1000", 100);
    conn_b.pump(&mut s, &mut b, now);
    assert_eq!(conn_b.side, ServerSide::Refused);
    assert!(client_events(&mut b).iter().any(|e| matches!(
        e,
        ClientEvent::Refused {
            reason: RefuseReason::DeviceLimit,
            ..
        }
    )));
    // ...and so is one over UDP: carrier sessions are counted as devices.
    let mut u =
        ClientSession::connect(ConnectorConfig::default(), KEY, now, UNIX, [9; 32]).unwrap();
    let mut buf = vec![0u8; 2048];
    let from = addr("198.51.100.3:1000");
    let n = u.poll_transmit(now, &mut buf).unwrap();
    s.handle_datagram(now, UNIX, SocketIndex(0), from, &mut buf[..n]);
    let t = s.poll_transmit(now, &mut buf).unwrap();
    u.handle_datagram(now, &mut buf[..t.len]);
    assert!(client_events(&mut u).iter().any(|e| matches!(
        e,
        ClientEvent::Refused {
            reason: RefuseReason::DeviceLimit,
            ..
        }
    )));
    assert_eq!(s.user_session_count(USER), 2);
}

#[test]
fn a_replayed_hello_record_gets_nothing() {
    let now = Instant::now();
    let mut s = server(None);
    let (_c, conn, _) = connected(&mut s, now, "198.51.100.1:1000", 10, 5);
    let replies = s.stats().replies_sent;
    // Replayed on a new connection: the gate stops it at the fingerprint.
    let mut gate = HelloGate::new(now);
    assert_eq!(
        gate.step(now, &conn.hello, &s.carrier_directory(UNIX)),
        GateStep::NotOstp(NotOstp::Replay)
    );
    // Even handed straight to the endpoint (past the gate), it is not answered.
    let mut record = conn.hello.clone();
    let mut reply = [0u8; MAX_REPLY_RECORD];
    let peer = addr("203.0.113.9:5555");
    assert_eq!(
        s.handle_carrier_hello(now, UNIX, peer, USER, &mut record, &mut reply),
        CarrierHello::NotOstp
    );
    assert_eq!(s.stats().replies_sent, replies);
    assert_eq!(s.session_count(), 1);
}

#[test]
fn a_hello_answered_over_udp_is_not_answered_over_tcp() {
    let now = Instant::now();
    let mut s = server(None);
    let mut u =
        ClientSession::connect(ConnectorConfig::default(), KEY, now, UNIX, [11; 32]).unwrap();
    let mut buf = vec![0u8; 2048];
    let n = u.poll_transmit(now, &mut buf).unwrap();
    let hello = buf[..n].to_vec();
    s.handle_datagram(
        now,
        UNIX,
        SocketIndex(0),
        addr("198.51.100.1:1000"),
        &mut buf[..n],
    );
    assert!(
        s.poll_transmit(now, &mut buf).is_some(),
        "answered over UDP"
    );
    // The captured datagram's tag and nonce sent as the first bytes of a TCP connection.
    let mut gate = HelloGate::new(now);
    assert_eq!(
        gate.step(now, &hello, &s.carrier_directory(UNIX)),
        GateStep::NotOstp(NotOstp::Replay)
    );
}

#[test]
fn a_hello_answered_over_tcp_is_not_answered_over_udp() {
    let now = Instant::now();
    let mut s = server(None);
    let (_c, conn, _) = connected(&mut s, now, "198.51.100.1:1000", 12, 50);
    let before = s.stats();
    let mut datagram = conn.hello.clone();
    s.handle_datagram(
        now,
        UNIX,
        SocketIndex(0),
        addr("198.51.100.1:1000"),
        &mut datagram,
    );
    let mut buf = vec![0u8; 2048];
    assert!(s.poll_transmit(now, &mut buf).is_none());
    assert_eq!(s.stats().hello_replays, before.hello_replays + 1);
    assert_eq!(s.stats().replies_sent, before.replies_sent);
}

/// Corrupts the next frame the client writes at `at` and delivers it: the server must fail the
/// connection and close the session.
fn corrupt_upstream(at: usize, expect: FrameError) {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.1:1000", 13, 1_000);
    server_events(&mut s);
    let t = c.session_mut().unwrap().transport_mut();
    let stream = t.open_stream(dest()).unwrap();
    t.stream_write(stream, &[1; 3_000]).unwrap();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let n = c.poll_transmit_frame(now, &mut buf).unwrap();
    buf[at] ^= 0x40;
    conn.c2s.extend(&buf[..n]);
    conn.pump(&mut s, &mut c, now);
    assert_eq!(conn.side, ServerSide::Failed(expect));
    assert!(s.session(id).is_none());
    assert!(server_events(&mut s).iter().any(|e| matches!(
        e,
        EndpointEvent::SessionClosed {
            session,
            reason: CloseReason::ProtocolViolation,
            ..
        } if *session == id
    )));
    assert_eq!(s.user_session_count(USER), 0);
    // Anything more on that connection fails too.
    assert!(s.handle_carrier_input(now, id, &mut [0u8; 40]).is_err());
}

#[test]
fn a_flipped_length_byte_fails_the_connection() {
    // +16,384 on the sealed length: beyond the limit, refused as soon as the two bytes are in.
    corrupt_upstream(1, FrameError::Length);
}

#[test]
fn a_flipped_ciphertext_byte_fails_the_connection() {
    corrupt_upstream(100, FrameError::Auth);
}

#[test]
fn a_flipped_byte_downstream_fails_the_client() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.1:1000", 14, 1_000);
    let t = s.session_mut(id).unwrap().transport_mut();
    t.send_datagram(0, dest(), b"x").unwrap();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let n = s.poll_transmit_frame(now, id, &mut buf).unwrap();
    buf[n - 1] ^= 1;
    conn.s2c.extend(&buf[..n]);
    conn.pump(&mut s, &mut c, now);
    assert_eq!(conn.client_err, Some(FrameError::Auth));
    assert!(c.is_finished());
    assert!(client_events(&mut c).iter().any(|e| matches!(
        e,
        ClientEvent::Transport(TransportEvent::Closed {
            reason: CloseReason::ProtocolViolation,
            ..
        })
    )));
}

#[test]
fn a_silent_connection_ends_in_the_idle_timeout() {
    let t0 = Instant::now();
    let mut s = server(None);
    let (_c, _conn, id) = connected(&mut s, t0, "198.51.100.1:1000", 15, 1_000);
    server_events(&mut s);
    // The client never speaks again; the server keeps its keepalives to itself.
    let mut now = t0;
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    while s.session(id).is_some() {
        now = s.poll_timeout().expect("a timer is armed");
        s.handle_timeout(now);
        while s.poll_transmit_frame(now, id, &mut buf).is_some() {}
        assert!(now < t0 + Duration::from_secs(120), "idle timeout fired");
    }
    assert!(now >= t0 + EndpointConfig::default().session.transport.idle_timeout);
    assert!(server_events(&mut s).iter().any(|e| matches!(
        e,
        EndpointEvent::SessionClosed {
            reason: CloseReason::IdleTimeout,
            ..
        }
    )));
}

#[test]
fn a_server_close_flushes_close_before_session_closed() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.1:1000", 16, 1_000);
    conn.pump(&mut s, &mut c, now);
    server_events(&mut s);
    s.close_user(now, USER, CloseReason::Shutdown);
    assert!(
        !server_events(&mut s)
            .iter()
            .any(|e| matches!(e, EndpointEvent::SessionClosed { .. })),
        "not closed before its CLOSE frame was taken"
    );
    assert_eq!(s.poll_carrier_ready(), Some(id));
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let n = s
        .poll_transmit_frame(now, id, &mut buf)
        .expect("the CLOSE frame");
    assert!(s.poll_transmit_frame(now, id, &mut buf).is_none());
    assert!(server_events(&mut s).iter().any(|e| matches!(
        e,
        EndpointEvent::SessionClosed {
            session,
            reason: CloseReason::Shutdown,
            ..
        } if *session == id
    )));
    assert!(s.session(id).is_none());
    conn.s2c.extend(&buf[..n]);
    conn.pump(&mut s, &mut c, now);
    assert!(client_events(&mut c).iter().any(|e| matches!(
        e,
        ClientEvent::Transport(TransportEvent::Closed {
            reason: CloseReason::Shutdown,
            by_peer: true,
        })
    )));
    assert!(c.is_finished());
}

#[test]
fn a_client_close_reaches_the_server() {
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.1:1000", 17, 1_000);
    server_events(&mut s);
    c.close(now, CloseReason::Normal);
    conn.pump(&mut s, &mut c, now);
    assert!(c.is_finished());
    assert!(s.session(id).is_none());
    assert!(server_events(&mut s).iter().any(|e| matches!(
        e,
        EndpointEvent::SessionClosed {
            reason: CloseReason::Normal,
            ..
        }
    )));
}

#[test]
fn an_unanswered_carrier_hello_is_sent_once_then_times_out() {
    let now = Instant::now();
    let mut c = client(now, 18);
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    assert!(c.poll_transmit_frame(now, &mut buf).is_some());
    let mut t = now;
    while !c.is_finished() {
        t = c.poll_timeout().expect("handshake timeout armed");
        c.handle_timeout(t);
        assert!(
            c.poll_transmit_frame(t, &mut buf).is_none(),
            "no second hello"
        );
    }
    assert_eq!(t, now + ConnectorConfig::default().handshake_timeout);
    assert!(matches!(
        client_events(&mut c).as_slice(),
        [ClientEvent::HandshakeTimeout]
    ));
    assert_eq!(c.stats().hellos_sent, 1);
}

#[test]
fn the_connection_loss_ends_the_session_for_the_user_accounting() {
    let now = Instant::now();
    let mut s = server(Some(1));
    let (_c, _conn, id) = connected(&mut s, now, "198.51.100.1:1000", 19, 1_000);
    server_events(&mut s);
    s.carrier_connection_lost(id, CloseReason::Normal);
    assert_eq!(s.user_session_count(USER), 0);
    assert!(
        server_events(&mut s)
            .iter()
            .any(|e| matches!(e, EndpointEvent::SessionClosed { session, .. } if *session == id))
    );
    // The device is free again: a new address gets in.
    let (_d, _conn, _) = connected(&mut s, now, "198.51.100.2:1000", 20, 1_000);
}

#[test]
fn only_carrier_sessions_are_named_ready_and_each_once() {
    let now = Instant::now();
    let mut s = server(None);
    let (_c, _conn, id) = connected(&mut s, now, "198.51.100.1:1000", 21, 1_000);
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    while s.poll_transmit_frame(now, id, &mut buf).is_some() {}
    while s.poll_carrier_ready().is_some() {}
    let t = s.session_mut(id).unwrap().transport_mut();
    t.send_datagram(0, dest(), b"a").unwrap();
    s.session_mut(id).unwrap();
    let named: HashSet<_> = std::iter::from_fn(|| s.poll_carrier_ready()).collect();
    assert_eq!(named, HashSet::from([id]));
    assert!(s.poll_carrier_ready().is_none(), "named once");
}

#[test]
fn a_stream_larger_than_every_window_gets_its_credit_without_acks() {
    // 6 MiB on one stream: more than the 2 MiB stream window and the 4 MiB session window, so
    // MAX_STREAM_DATA and MAX_DATA must be sent (there are no ACKs to carry anything).
    let now = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, now, "198.51.100.7:40000", 20, 64 * 1024);
    let mut echo = EchoTest::new(1, 6 * 1024 * 1024);
    echo.run(&mut s, &mut c, &mut conn, now);
    assert_reliable(&s, id, &c);
}

#[test]
fn a_quiet_live_connection_is_kept_open_by_keepalives() {
    let t0 = Instant::now();
    let mut s = server(None);
    let (mut c, mut conn, id) = connected(&mut s, t0, "198.51.100.7:40000", 21, 1_000);
    let idle = EndpointConfig::default().session.transport.idle_timeout;
    let mut now = t0;
    while now < t0 + idle * 3 {
        now = [s.poll_timeout(), c.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .expect("keepalive and idle timers are armed");
        s.handle_timeout(now);
        c.handle_timeout(now);
        conn.pump(&mut s, &mut c, now);
        assert!(s.session(id).is_some(), "closed at {:?}", now - t0);
        assert!(c.is_connected(), "client closed at {:?}", now - t0);
    }
    assert_reliable(&s, id, &c);
}

#[test]
fn a_connector_finished_before_its_hello_left_never_sends_it() {
    // Closed while the TCP connection was still being set up.
    let now = Instant::now();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let mut c = client(now, 22);
    c.close(now, CloseReason::Normal);
    assert!(c.poll_transmit_frame(now, &mut buf).is_none());
    // Or timed out before the connection was writable.
    let mut c = client(now, 23);
    let t = c.poll_timeout().expect("handshake timeout armed");
    c.handle_timeout(t);
    assert!(c.is_finished());
    assert!(c.poll_transmit_frame(t, &mut buf).is_none());
}
