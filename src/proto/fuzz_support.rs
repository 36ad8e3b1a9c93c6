//! Shared driver for fuzzing and the bounded property test: interprets arbitrary bytes as a
//! sequence of network events (valid traffic, garbage, replays, mutations, truncations, clock jumps,
//! user changes, new connections) against one server endpoint and one client, and checks that
//! nothing panics and that every table stays within its bound.

#![doc(hidden)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::endpoint::{
    ClientConfig, ClientSession, EndpointEvent, MAX_TAGS_PER_USER, ServerConfig, ServerEndpoint,
    SessionId, SocketIndex, UserId, UserState,
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

/// Runs the timers of both sides that are due at `now` (the wake-up of an event loop).
fn run_due_timers(server: &mut ServerEndpoint, client: Option<&mut ClientSession>, now: Instant) {
    if server.poll_timeout().is_some_and(|t| t <= now) {
        server.handle_timeout(now);
    }
    if let Some(c) = client {
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
    }
}

/// The busy-loop rule of every driver: an iteration that did no work (due timers ran, nothing
/// was sent) is never followed by a zero-timeout wait.
fn assert_no_busy_loop(server: &mut ServerEndpoint, client: Option<&ClientSession>, now: Instant) {
    let next = [server.poll_timeout(), client.and_then(|c| c.poll_timeout())];
    assert!(
        next.into_iter().flatten().all(|t| t > now),
        "busy loop: nothing to send, yet a deadline is not in the future"
    );
}

/// Runs one event sequence. Panics only if an invariant is violated (a bug).
pub fn run(data: &[u8]) -> RunSummary {
    let start = Instant::now();
    let mut now = start;
    let mut unix = 1_800_000_000u64;
    let config = ServerConfig {
        max_sessions: MAX_SESSIONS,
        max_sessions_per_user: 4,
        session: SessionConfig {
            token_window: 64,
            token_behind: 16,
            ..SessionConfig::default()
        },
        ..ServerConfig::default()
    };
    let token_window = config.session.token_window;
    let mut server = ServerEndpoint::new(config, [1; 32]);
    let _ = server.set_user(UserId(1), KEY_A, UserState::Active);
    let _ = server.set_user(
        UserId(2),
        KEY_B,
        UserState::Refused(RefuseReason::QuotaExceeded),
    );
    let client_config = ClientConfig {
        hello_pad_max: 64,
        ..ClientConfig::default()
    };
    let mut seed = 0u8;
    let mut client =
        ClientSession::connect(client_config.clone(), KEY_A, now, unix, [seed; 32]).ok();
    let addrs: [SocketAddr; 3] = [
        SocketAddr::from(([10, 0, 0, 1], 1000)),
        SocketAddr::from(([10, 0, 0, 2], 2000)),
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 3000)),
    ];
    let mut client_addr = addrs[0];
    let mut captured: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut summary = RunSummary::default();
    let mut buf = vec![0u8; 2048];
    let mut input = Input { data, pos: 0 };
    let mut streams: Vec<(SessionId, StreamId)> = Vec::new();

    let capture = |captured: &mut Vec<(bool, Vec<u8>)>, to_server: bool, bytes: &[u8]| {
        if captured.len() == MAX_CAPTURED {
            captured.remove(0);
        }
        captured.push((to_server, bytes.to_vec()));
    };

    while let Some(op) = input.byte() {
        match op % 14 {
            0..=2 => {
                // Deliver everything both sides want to send (bounded), as an event loop would.
                for _ in 0..32 {
                    run_due_timers(&mut server, client.as_mut(), now);
                    let mut moved = false;
                    if let Some(c) = client.as_mut() {
                        if let Some(n) = c.poll_transmit(now, &mut buf) {
                            capture(&mut captured, true, &buf[..n]);
                            server.handle_datagram(
                                now,
                                unix,
                                SocketIndex(0),
                                client_addr,
                                &mut buf[..n],
                            );
                            summary.delivered += 1;
                            moved = true;
                        }
                    }
                    if let Some(t) = server.poll_transmit(now, &mut buf) {
                        capture(&mut captured, false, &buf[..t.len]);
                        if let Some(c) = client.as_mut() {
                            c.handle_datagram(now, &mut buf[..t.len]);
                        }
                        summary.delivered += 1;
                        moved = true;
                    }
                    if !moved {
                        assert_no_busy_loop(&mut server, client.as_ref(), now);
                        break;
                    }
                }
            }
            3 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 5;
                let mut garbage = input.bytes(len).to_vec();
                server.handle_datagram(now, unix, SocketIndex(1), addrs[2], &mut garbage);
            }
            4 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 5;
                let mut garbage = input.bytes(len).to_vec();
                if let Some(c) = client.as_mut() {
                    c.handle_datagram(now, &mut garbage);
                }
            }
            5 | 6 => {
                // Replay (5) or mutate (6) a captured datagram, towards its original receiver.
                let i = usize::from(input.byte().unwrap_or(0));
                let flip = usize::from(input.byte().unwrap_or(0));
                if let Some((to_server, bytes)) = captured.get(i % captured.len().max(1)).cloned() {
                    let mut bytes = bytes;
                    if op % 14 == 6 && !bytes.is_empty() {
                        let j = flip * 7 % bytes.len();
                        bytes[j] ^= 1 << (flip % 8);
                    }
                    if to_server {
                        let from = addrs[flip % 3];
                        server.handle_datagram(now, unix, SocketIndex(0), from, &mut bytes);
                    } else if let Some(c) = client.as_mut() {
                        c.handle_datagram(now, &mut bytes);
                    }
                }
            }
            7 => {
                let step = Duration::from_millis(u64::from(input.byte().unwrap_or(0)) * 40);
                now += step;
                unix += step.as_secs();
                server.handle_timeout(now);
                if let Some(c) = client.as_mut() {
                    c.handle_timeout(now);
                }
            }
            8 => {
                // Wall clock jumps (forwards or backwards) without monotonic time moving.
                let b = u64::from(input.byte().unwrap_or(0));
                unix = if b < 128 {
                    unix.saturating_sub(b * 10)
                } else {
                    unix + (b - 128) * 10
                };
            }
            9 => match input.byte().unwrap_or(0) % 4 {
                0 => server.close_user(now, UserId(1), CloseReason::LimitReached),
                1 => {
                    server.remove_user(now, UserId(1));
                }
                2 => {
                    let _ = server.set_user(UserId(1), KEY_A, UserState::Active);
                }
                _ => server.refuse_user(
                    now,
                    UserId(1),
                    RefuseReason::Disabled,
                    CloseReason::UserDeleted,
                ),
            },
            10 => {
                // A new client connection (possibly with the refused user's key); the old one vanishes.
                seed = seed.wrapping_add(1);
                let key = if input.byte().unwrap_or(0) % 4 == 0 {
                    KEY_B
                } else {
                    KEY_A
                };
                client =
                    ClientSession::connect(client_config.clone(), key, now, unix, [seed; 32]).ok();
            }
            11 => {
                // The client roams to another address.
                client_addr = addrs[usize::from(input.byte().unwrap_or(0)) % 3];
            }
            12 => {
                // The client opens a stream and writes input bytes (maybe finishing it).
                let len = usize::from(input.byte().unwrap_or(0)) * 64;
                let finish = input.byte().unwrap_or(0) % 2 == 0;
                if let Some(t) = client
                    .as_mut()
                    .and_then(|c| c.session_mut())
                    .map(|s| s.transport_mut())
                {
                    if let Ok(id) = t.open_stream(
                        Destination::domain("example.com", 443)
                            .unwrap_or(Destination::Addr(SocketAddr::from(([192, 0, 2, 9], 80)))),
                    ) {
                        let payload = vec![0xA5u8; len];
                        let _ = t.stream_write(id, &payload);
                        if finish {
                            let _ = t.stream_finish(id);
                        }
                    }
                }
            }
            _ => {
                // The server application reads every accepted stream and answers a little.
                let mut sink = [0u8; 4096];
                for &(session, id) in &streams {
                    if let Some(t) = server.session_mut(session).map(|s| s.transport_mut()) {
                        while let Ok(n) = t.stream_read(id, &mut sink) {
                            if n == 0 {
                                break;
                            }
                            summary.stream_bytes += n as u64;
                        }
                        let _ = t.stream_write(id, b"response");
                    }
                }
            }
        }
        while let Some(event) = server.poll_event() {
            if let EndpointEvent::Transport {
                session,
                event: TransportEvent::StreamOpened { id, .. },
            } = event
            {
                if let Some(t) = server.session_mut(session).map(|s| s.transport_mut()) {
                    let _ = t.accept_stream(id);
                }
                if streams.len() == MAX_STREAMS_TRACKED {
                    streams.remove(0);
                }
                streams.push((session, id));
            }
        }
        if let Some(c) = client.as_mut() {
            while let Some(event) = c.poll_event() {
                if matches!(event, super::endpoint::ClientEvent::Connected) {
                    summary.connected += 1;
                }
            }
        }
        // Invariants: everything stays bounded.
        let sessions = server.session_count();
        summary.max_sessions = summary.max_sessions.max(sessions);
        assert!(sessions <= MAX_SESSIONS, "session cap exceeded: {sessions}");
        assert!(
            server.token_count() <= sessions * token_window,
            "token table exceeds its bound"
        );
        assert!(
            server.hello_tag_count() <= server.user_count() * MAX_TAGS_PER_USER,
            "hello tag table exceeds its bound"
        );
        assert!(captured.len() <= MAX_CAPTURED);
    }
    summary
}
