//! Shared driver for fuzzing and the bounded property test: interprets arbitrary bytes as a
//! sequence of network events (valid traffic, garbage, replays, mutations, truncations, clock jumps,
//! user changes, new connections) against one server endpoint and one client, and checks that
//! nothing panics and that every table stays within its bound.

#![doc(hidden)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::endpoint::{
    ClientEvent, ClientSession, ConnectorConfig, EndpointConfig, EndpointEvent, MAX_TAGS_PER_USER,
    ServerEndpoint, SessionId, SocketIndex, UserId, UserState,
};
use super::handshake::RefuseReason;
use super::session::SessionConfig;
use super::transport::{CloseReason, Destination, StreamId, TransportEvent};

const KEY_A: &str = "fuzz-user-a-key-0123456789";
const KEY_B: &str = "fuzz-user-b-key-0123456789";
const MAX_CAPTURED: usize = 64;
const MAX_SESSIONS: usize = 8;
const MAX_STREAMS_TRACKED: usize = 32;

/// What a run observed (for tests to assert that the interesting paths were reached).
#[derive(Debug, Default, Clone, Copy)]
pub struct RunSummary {
    /// Client handshakes that completed.
    pub connected: u32,
    /// Datagrams delivered in total.
    pub delivered: u64,
    /// Most sessions alive at once on the server.
    pub max_sessions: usize,
    /// Stream bytes the server application read.
    pub stream_bytes: u64,
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let end = (self.pos + n).min(self.data.len());
        let out = &self.data[self.pos..end];
        self.pos = end;
        out
    }
}

/// Client addresses the fuzzer roams between (two IPv4, one IPv6).
const ADDRS: [SocketAddr; 3] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 1000),
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 2000),
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        3000,
    ),
];

/// One server endpoint, one client and what the run remembers, driven one operation at a time.
struct Driver {
    now: Instant,
    unix: u64,
    server: ServerEndpoint,
    client: Option<ClientSession>,
    client_config: ConnectorConfig,
    client_addr: SocketAddr,
    seed: u8,
    token_window: usize,
    /// Recent datagrams and whether they went to the server (for replays and mutations).
    captured: Vec<(bool, Vec<u8>)>,
    /// Accepted server streams the server application reads.
    streams: Vec<(SessionId, StreamId)>,
    summary: RunSummary,
    buf: Vec<u8>,
}

/// Runs one event sequence. Panics only if an invariant is violated (a bug).
pub fn run(data: &[u8]) -> RunSummary {
    let mut driver = Driver::new();
    let mut input = Input { data, pos: 0 };
    while let Some(op) = input.byte() {
        driver.step(op, &mut input);
        driver.drain_events();
        driver.check_bounds();
    }
    driver.summary
}

impl Driver {
    fn new() -> Self {
        let now = Instant::now();
        let unix = 1_800_000_000u64;
        let config = EndpointConfig {
            max_sessions: MAX_SESSIONS,
            max_sessions_per_user: 4,
            session: SessionConfig {
                token_window: 64,
                token_behind: 16,
                ..SessionConfig::default()
            },
            ..EndpointConfig::default()
        };
        let token_window = config.session.token_window;
        let mut server = ServerEndpoint::new(config, [1; 32]);
        let _ = server.set_user(UserId(1), KEY_A, UserState::Active);
        let _ = server.set_user(
            UserId(2),
            KEY_B,
            UserState::Refused(RefuseReason::QuotaExceeded),
        );
        let client_config = ConnectorConfig {
            hello_pad_max: 64,
            ..ConnectorConfig::default()
        };
        let client = ClientSession::connect(client_config.clone(), KEY_A, now, unix, [0; 32]).ok();
        Driver {
            now,
            unix,
            server,
            client,
            client_config,
            client_addr: ADDRS[0],
            seed: 0,
            token_window,
            captured: Vec::new(),
            streams: Vec::new(),
            summary: RunSummary::default(),
            buf: vec![0u8; 2048],
        }
    }

    /// Applies one operation (`op % 14` selects it; its parameters come from `input`).
    fn step(&mut self, op: u8, input: &mut Input<'_>) {
        match op % 14 {
            0..=2 => self.deliver(),
            3 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 5;
                let mut garbage = input.bytes(len).to_vec();
                let (now, unix) = (self.now, self.unix);
                self.server
                    .handle_datagram(now, unix, SocketIndex(1), ADDRS[2], &mut garbage);
            }
            4 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 5;
                let mut garbage = input.bytes(len).to_vec();
                if let Some(c) = self.client.as_mut() {
                    c.handle_datagram(self.now, &mut garbage);
                }
            }
            5 | 6 => self.replay(op % 14 == 6, input),
            7 => {
                let step = Duration::from_millis(u64::from(input.byte().unwrap_or(0)) * 40);
                self.now += step;
                self.unix += step.as_secs();
                self.server.handle_timeout(self.now);
                if let Some(c) = self.client.as_mut() {
                    c.handle_timeout(self.now);
                }
            }
            8 => {
                // Wall clock jumps (forwards or backwards) without monotonic time moving.
                let b = u64::from(input.byte().unwrap_or(0));
                self.unix = if b < 128 {
                    self.unix.saturating_sub(b * 10)
                } else {
                    self.unix + (b - 128) * 10
                };
            }
            9 => self.change_user(input.byte().unwrap_or(0)),
            10 => {
                // A new client connection (possibly with the refused user's key); the old one vanishes.
                self.seed = self.seed.wrapping_add(1);
                let key = if input.byte().unwrap_or(0) % 4 == 0 {
                    KEY_B
                } else {
                    KEY_A
                };
                let config = self.client_config.clone();
                self.client =
                    ClientSession::connect(config, key, self.now, self.unix, [self.seed; 32]).ok();
            }
            11 => {
                // The client roams to another address.
                self.client_addr = ADDRS[usize::from(input.byte().unwrap_or(0)) % 3];
            }
            12 => self.client_writes(input),
            _ => self.server_reads(),
        }
    }

    fn capture(&mut self, to_server: bool, len: usize) {
        if self.captured.len() == MAX_CAPTURED {
            self.captured.remove(0);
        }
        self.captured.push((to_server, self.buf[..len].to_vec()));
    }

    /// Delivers everything both sides want to send (bounded), as an event loop would: due
    /// timers, then transmits; an iteration that sends nothing ends the delivery.
    fn deliver(&mut self) {
        let (now, unix) = (self.now, self.unix);
        for _ in 0..32 {
            self.run_due_timers();
            let mut moved = false;
            if let Some(n) = self
                .client
                .as_mut()
                .and_then(|c| c.poll_transmit(now, &mut self.buf))
            {
                self.capture(true, n);
                let addr = self.client_addr;
                self.server
                    .handle_datagram(now, unix, SocketIndex(0), addr, &mut self.buf[..n]);
                self.summary.delivered += 1;
                moved = true;
            }
            if let Some(t) = self.server.poll_transmit(now, &mut self.buf) {
                self.capture(false, t.len);
                if let Some(c) = self.client.as_mut() {
                    c.handle_datagram(now, &mut self.buf[..t.len]);
                }
                self.summary.delivered += 1;
                moved = true;
            }
            if !moved {
                self.assert_no_busy_loop();
                break;
            }
        }
    }

    /// Runs the timers of both sides that are due now (the wake-up of an event loop).
    fn run_due_timers(&mut self) {
        let now = self.now;
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        if let Some(c) = self.client.as_mut() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
    }

    /// The busy-loop rule of every driver: an iteration that did no work (due timers ran,
    /// nothing was sent) is never followed by a zero-timeout wait.
    fn assert_no_busy_loop(&mut self) {
        let next = [
            self.server.poll_timeout(),
            self.client.as_ref().and_then(|c| c.poll_timeout()),
        ];
        assert!(
            next.into_iter().flatten().all(|t| t > self.now),
            "busy loop: nothing to send, yet a deadline is not in the future"
        );
    }

    /// Replays (or, with `mutate`, bit-flips) a captured datagram towards its original receiver.
    fn replay(&mut self, mutate: bool, input: &mut Input<'_>) {
        let i = usize::from(input.byte().unwrap_or(0));
        let flip = usize::from(input.byte().unwrap_or(0));
        let Some((to_server, mut bytes)) =
            self.captured.get(i % self.captured.len().max(1)).cloned()
        else {
            return;
        };
        if mutate && !bytes.is_empty() {
            let j = flip * 7 % bytes.len();
            bytes[j] ^= 1 << (flip % 8);
        }
        if to_server {
            let from = ADDRS[flip % 3];
            self.server
                .handle_datagram(self.now, self.unix, SocketIndex(0), from, &mut bytes);
        } else if let Some(c) = self.client.as_mut() {
            c.handle_datagram(self.now, &mut bytes);
        }
    }

    fn change_user(&mut self, choice: u8) {
        let now = self.now;
        match choice % 4 {
            0 => self
                .server
                .close_user(now, UserId(1), CloseReason::LimitReached),
            1 => {
                self.server.remove_user(now, UserId(1));
            }
            2 => {
                let _ = self.server.set_user(UserId(1), KEY_A, UserState::Active);
            }
            _ => self.server.refuse_user(
                now,
                UserId(1),
                RefuseReason::Disabled,
                CloseReason::UserDeleted,
            ),
        }
    }

    /// The client opens a stream and writes input bytes (maybe finishing it).
    fn client_writes(&mut self, input: &mut Input<'_>) {
        let len = usize::from(input.byte().unwrap_or(0)) * 64;
        let finish = input.byte().unwrap_or(0) % 2 == 0;
        let Some(t) = self
            .client
            .as_mut()
            .and_then(|c| c.session_mut())
            .map(|s| s.transport_mut())
        else {
            return;
        };
        let dest = Destination::domain("example.com", 443)
            .unwrap_or(Destination::Addr(SocketAddr::from(([192, 0, 2, 9], 80))));
        if let Ok(id) = t.open_stream(dest) {
            let payload = vec![0xA5u8; len];
            let _ = t.stream_write(id, &payload);
            if finish {
                let _ = t.stream_finish(id);
            }
        }
    }

    /// The server application reads every accepted stream and answers a little.
    fn server_reads(&mut self) {
        let mut sink = [0u8; 4096];
        for &(session, id) in &self.streams {
            if let Some(t) = self.server.session_mut(session).map(|s| s.transport_mut()) {
                while let Ok(n) = t.stream_read(id, &mut sink) {
                    if n == 0 {
                        break;
                    }
                    self.summary.stream_bytes += n as u64;
                }
                let _ = t.stream_write(id, b"response");
            }
        }
    }

    /// The server accepts every stream opened to it; the client's handshakes are counted.
    fn drain_events(&mut self) {
        while let Some(event) = self.server.poll_event() {
            if let EndpointEvent::Transport {
                session,
                event: TransportEvent::StreamOpened { id, .. },
            } = event
            {
                if let Some(t) = self.server.session_mut(session).map(|s| s.transport_mut()) {
                    let _ = t.accept_stream(id);
                }
                if self.streams.len() == MAX_STREAMS_TRACKED {
                    self.streams.remove(0);
                }
                self.streams.push((session, id));
            }
        }
        if let Some(c) = self.client.as_mut() {
            while let Some(event) = c.poll_event() {
                if matches!(event, ClientEvent::Connected) {
                    self.summary.connected += 1;
                }
            }
        }
    }

    /// Invariants: everything stays bounded.
    fn check_bounds(&mut self) {
        let server = &self.server;
        let sessions = server.session_count();
        self.summary.max_sessions = self.summary.max_sessions.max(sessions);
        assert!(sessions <= MAX_SESSIONS, "session cap exceeded: {sessions}");
        assert!(
            server.token_count() <= sessions * self.token_window,
            "token table exceeds its bound"
        );
        assert!(
            server.hello_tag_count() <= server.user_count() * MAX_TAGS_PER_USER,
            "hello tag table exceeds its bound"
        );
        assert!(self.captured.len() <= MAX_CAPTURED);
    }
}
