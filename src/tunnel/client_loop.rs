//! The client's data plane: one mio event loop thread that owns the local proxy port (SOCKS5 and
//! HTTP on one port), every local connection, the SOCKS5 UDP ASSOCIATE sockets and the tunnel
//! sessions' UDP sockets, and drives the protocol core ([`ClientSession`]).
//!
//! - Sessions: `mux.sessions` slots, each connecting on its own UDP socket; on silence, refusal
//!   or close a slot reconnects with exponential backoff and jitter (a refusal waits at least the
//!   server's `retry_after`). Streams go to the connected slot with the fewest streams.
//! - Requests that arrive while no session is up wait (bounded time) for one, and pull the next
//!   reconnect attempt forward (at most one attempt per [`DEMAND_RETRY_GAP`] per slot), so that a
//!   raised limit or a restarted server is noticed on the next request instead of after the
//!   backoff. A refusal for the key itself (limit reached, disabled, expired) fails the waiting
//!   requests at once with "not allowed" instead of letting them wait.
//! - A connected session that has had unacknowledged data out for [`DEAD_AFTER`] while hearing
//!   nothing from the server for as long is presumed dead (the server crashed or restarted and
//!   silently drops packets of sessions it does not know) and is replaced, instead of waiting
//!   for the transport's idle timeout.
//! - Every failure produces a log line a user understands.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};

use super::pipe::{Pipe, PipeEnd};
use super::proxy_front::{self, Progress, ProxyFront, ProxyRequest, Socks5Reply};
use super::resolver::{Lookup, Resolver};
use super::slab::Slab;
use super::target::TargetAddr;
use super::{bind_udp, unix_now};
use crate::config::ClientConfig as ClientFileConfig;
use crate::control::{ControlMsg, ControlSender};
use crate::keys;
use crate::proto::transport::{
    CloseReason, Destination, OpenResult, ResetReason, StreamId, TransportEvent,
};
use crate::proto::{ClientConfig as ConnectorConfig, ClientEvent, ClientSession, RefuseReason};

const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);
const SLOT_BASE: usize = 1 << 28;
const ASSOC_BASE: usize = 1 << 27;
/// How long a request waits for a tunnel session before it is refused.
const WAIT_FOR_SESSION: Duration = Duration::from_secs(15);
/// How long a stream open waits for the server's answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Wait after the server closed the session because of the key (limit reached, deleted).
const KEY_CLOSED_WAIT: Duration = Duration::from_secs(30);
/// Silence from the server, while data waits for its acknowledgement, that ends a session.
pub const DEAD_AFTER: Duration = Duration::from_secs(6);
/// How often connected sessions are checked for that.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);
/// A new local request may trigger a reconnect attempt this long after the slot's last failure.
pub const DEMAND_RETRY_GAP: Duration = Duration::from_secs(2);
/// After authenticated refusals (limit reached, key disabled) the gap doubles with each
/// consecutive refusal, from [`DEMAND_RETRY_GAP`] up to this. Every hello the server answers uses
/// one of the key's 16 single-use hello tags of the current 2-minute epoch (docs/PROTOCOL.md
/// §3.1): doubling to 16 s spends at most about 10 per epoch however often applications retry,
/// while a limit raised soon after it was hit is noticed within a few seconds.
pub const REFUSED_RETRY_GAP_MAX: Duration = Duration::from_secs(16);
/// Local connections accepted at most (each holds two 32 KiB buffers while piping).
const MAX_LOCAL: usize = 4096;
const READ_CHUNK: usize = 16 * 1024;
const MAX_UDP: usize = 65_535;
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(300);

/// Settings of a client loop.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Server `host:port`.
    pub server: String,
    pub access_key: String,
    /// Local proxy address.
    pub listen: SocketAddr,
    /// Tunnel sessions kept open.
    pub sessions: usize,
    pub connector: ConnectorConfig,
}

impl ClientOptions {
    pub fn from_config(cfg: &ClientFileConfig) -> Result<Self, String> {
        let listen: SocketAddr = cfg.socks5_bind.parse().map_err(|_| {
            format!(
                "socks5_bind {:?} is not an IP address with a port",
                cfg.socks5_bind
            )
        })?;
        Ok(ClientOptions {
            server: cfg.server.clone(),
            access_key: cfg.access_key.clone(),
            listen,
            sessions: cfg.session_count() as usize,
            connector: ConnectorConfig {
                // Say "no answer from the server" within 10 s rather than 30 s.
                handshake_timeout: Duration::from_secs(10),
                ..ConnectorConfig::default()
            },
        })
    }
}

/// The running client loop.
pub struct ClientLoopHandle {
    control: ControlSender,
    /// The proxy address actually bound.
    pub local_addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl ClientLoopHandle {
    /// Closes the sessions gracefully and joins the thread.
    pub fn shutdown(mut self) {
        self.control.send(ControlMsg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Waits for the loop to end on its own (it only does on shutdown or a fatal error).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds the proxy port and starts the loop thread.
pub fn start(options: ClientOptions) -> Result<ClientLoopHandle, String> {
    let (host, port) = crate::config::split_host_port(&options.server)
        .ok_or_else(|| format!("server {:?} is not host:port", options.server))?;
    keys::validate_key(&options.access_key).map_err(|e| e.to_string())?;
    let poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);
    let mut listener = TcpListener::bind(options.listen).map_err(|e| {
        format!(
            "cannot listen on {} for the local proxy: {e}",
            options.listen
        )
    })?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let resolver = Resolver::new(1, 16, waker.clone())
        .map_err(|e| format!("cannot start a DNS thread: {e}"))?;
    let (control, control_rx) = ControlSender::channel(Some(waker));
    let now = Instant::now();
    let slots = (0..options.sessions.max(1))
        .map(|i| Slot {
            state: SlotState::Idle,
            // Stagger the first handshakes a little (many sessions must not burst at once).
            next_attempt: now + Duration::from_millis(2 * i as u64),
            failed_at: now,
            refusals: 0,
            backoff: BACKOFF_MIN,
            sock: None,
            client: None,
            streams: 0,
            blocked: None,
            generation: 0,
            readable: false,
            last_rx: now,
            checked_rx: now,
            pto_base: 0,
            in_flight_since: None,
            announced_failure: false,
        })
        .collect();
    let mut jitter_seed = [0u8; 8];
    keys::fill_random(&mut jitter_seed).map_err(|e| e.to_string())?;
    let lp = ClientLoop {
        poll,
        listener,
        local_addr,
        control_rx,
        resolver,
        host,
        port,
        options,
        slots,
        locals: Slab::new(),
        streams: HashMap::new(),
        waiting: VecDeque::new(),
        assocs: Slab::new(),
        flows: HashMap::new(),
        buf: vec![0u8; MAX_UDP].into_boxed_slice(),
        jitter: u64::from_le_bytes(jitter_seed) | 1,
        next_liveness_check: now + LIVENESS_CHECK,
        shutting_down: None,
        connected_once: false,
    };
    let thread = std::thread::Builder::new()
        .name("ostp-client".into())
        .spawn(move || lp.run())
        .map_err(|e| format!("cannot start the client thread: {e}"))?;
    Ok(ClientLoopHandle {
        control,
        local_addr,
        thread: Some(thread),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Waiting for `next_attempt`.
    Idle,
    /// Server name being resolved.
    Resolving,
    /// Hello sent, waiting for the reply.
    Handshaking,
    Connected,
}

struct Slot {
    state: SlotState,
    next_attempt: Instant,
    /// When the slot last failed (limits demand-driven retries).
    failed_at: Instant,
    /// Consecutive attempts that ended in an authenticated refusal.
    refusals: u32,
    backoff: Duration,
    sock: Option<UdpSocket>,
    client: Option<ClientSession>,
    streams: usize,
    /// A datagram the socket would not take (sent when writable).
    blocked: Option<Vec<u8>>,
    generation: u32,
    readable: bool,
    /// The "cannot connect" message was logged for the current outage.
    announced_failure: bool,
    /// Last datagram from the server.
    last_rx: Instant,
    /// `last_rx` at the previous liveness check.
    checked_rx: Instant,
    /// The session's probe-timeout count when we last heard from the server.
    pto_base: u64,
    /// Since when the session has been waiting for an answer (sampled every LIVENESS_CHECK).
    in_flight_since: Option<Instant>,
}

enum LocalState {
    /// Reading the SOCKS5 / HTTP request.
    Request(ProxyFront),
    /// Waiting for a tunnel session.
    Waiting {
        request: ProxyRequest,
        since: Instant,
    },
    /// Stream opened, waiting for the server's answer.
    Opening {
        request: ProxyRequest,
        slot: usize,
        stream: StreamId,
        since: Instant,
    },
    /// Splicing.
    Piping { slot: usize },
    /// The TCP control connection of a UDP association.
    Udp { assoc: usize },
    /// Writing a final reply, then closing.
    Closing,
}

struct Local {
    sock: TcpStream,
    state: LocalState,
    pipe: Option<Pipe>,
    /// Bytes to write before anything else (proxy replies while not piping).
    out: Vec<u8>,
    out_pos: usize,
    readable: bool,
    writable: bool,
}

struct Assoc {
    sock: UdpSocket,
    /// The local client's UDP address (learned from its first datagram).
    client: Option<SocketAddr>,
    slot: Option<usize>,
}

struct ClientLoop {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    control_rx: Receiver<ControlMsg>,
    resolver: Resolver,
    host: String,
    port: u16,
    options: ClientOptions,
    slots: Vec<Slot>,
    locals: Slab<Local>,
    streams: HashMap<(usize, StreamId), usize>,
    waiting: VecDeque<usize>,
    assocs: Slab<Assoc>,
    /// (slot, remote) → association that last sent there, for routing answers.
    flows: HashMap<(usize, Destination), usize>,
    buf: Box<[u8]>,
    jitter: u64,
    next_liveness_check: Instant,
    shutting_down: Option<Instant>,
    connected_once: bool,
}

fn to_destination(t: &TargetAddr) -> Option<Destination> {
    match t {
        TargetAddr::Ip(a) => Some(Destination::Addr(*a)),
        TargetAddr::Domain(name, port) => Destination::domain(name, *port),
    }
}

fn to_target(d: &Destination) -> TargetAddr {
    match d {
        Destination::Addr(a) => TargetAddr::Ip(*a),
        Destination::Domain { name, port } => TargetAddr::Domain(name.clone(), *port),
    }
}

fn socks_code(result: OpenResult) -> Socks5Reply {
    match result {
        OpenResult::Ok => Socks5Reply::Succeeded,
        OpenResult::Refused => Socks5Reply::ConnectionRefused,
        OpenResult::Unreachable | OpenResult::DnsFailure => Socks5Reply::HostUnreachable,
        OpenResult::NotAllowed => Socks5Reply::NotAllowed,
        OpenResult::Timeout => Socks5Reply::TtlExpired,
    }
}

fn describe_close(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::LimitReached => {
            "the server closed the session: this key's traffic limit is reached"
        }
        CloseReason::UserDeleted => {
            "the server closed the session: this key was deleted or disabled"
        }
        CloseReason::Shutdown => "the server is shutting down or restarting",
        CloseReason::IdleTimeout => {
            "the tunnel went silent (no packets from the server for the idle timeout)"
        }
        CloseReason::ProtocolViolation => "the session broke: protocol violation",
        _ => "the session closed",
    }
}

fn describe_refusal(reason: RefuseReason) -> &'static str {
    match reason {
        RefuseReason::QuotaExceeded => "this key's traffic limit is reached",
        RefuseReason::Disabled => "this key is disabled",
        RefuseReason::SessionLimit => "this key already has the maximum number of sessions",
        RefuseReason::ServerFull => "the server is full",
        RefuseReason::Expired => "this key has expired",
        RefuseReason::Other(_) => "no reason given",
    }
}

impl ClientLoop {
    fn run(mut self) {
        log::info!(
            "ostp {} client: SOCKS5 and HTTP proxy on {}, tunnel to {} ({} session{})",
            env!("CARGO_PKG_VERSION"),
            self.local_addr,
            self.options.server,
            self.slots.len(),
            if self.slots.len() == 1 { "" } else { "s" }
        );
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = self.next_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("client loop: poll failed: {e}");
                    break;
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                let t = event.token().0;
                if event.token() == WAKER {
                } else if event.token() == LISTENER {
                    self.accept(now);
                } else if t >= SLOT_BASE {
                    let i = t - SLOT_BASE;
                    if let Some(slot) = self.slots.get_mut(i) {
                        if event.is_readable() {
                            slot.readable = true;
                        }
                        if event.is_writable() {
                            Self::retry_blocked(slot);
                        }
                    }
                } else if t >= ASSOC_BASE {
                    self.assoc_readable(now, t - ASSOC_BASE);
                } else {
                    if let Some(l) = self.locals.get_mut(t) {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            l.readable = true;
                        }
                        if event.is_writable() || event.is_write_closed() {
                            l.writable = true;
                        }
                    }
                    self.drive_local(now, t);
                }
            }
            self.drain_control(now);
            self.drain_resolver(now);
            for i in 0..self.slots.len() {
                self.receive(now, i);
            }
            self.run_timers(now);
            for i in 0..self.slots.len() {
                self.process_slot_events(now, i);
                self.flush(now, i);
            }
            if let Some(deadline) = self.shutting_down {
                let done = self
                    .slots
                    .iter()
                    .all(|s| s.client.as_ref().is_none_or(|c| c.is_finished()));
                if done || now >= deadline {
                    break;
                }
            }
        }
        self.resolver.shutdown();
        log::info!("client stopped");
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: only for backoff jitter.
        self.jitter ^= self.jitter >> 12;
        self.jitter ^= self.jitter << 25;
        self.jitter ^= self.jitter >> 27;
        self.jitter.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn next_timeout(&mut self, now: Instant) -> Option<Duration> {
        if self.slots.iter().any(|s| s.readable) {
            return Some(Duration::ZERO);
        }
        let mut at = now + Duration::from_secs(1);
        for s in &self.slots {
            match s.state {
                SlotState::Idle => at = at.min(s.next_attempt),
                SlotState::Handshaking | SlotState::Connected => {
                    if let Some(t) = s.client.as_ref().and_then(|c| c.poll_timeout()) {
                        at = at.min(t);
                    }
                }
                SlotState::Resolving => {}
            }
        }
        if let Some(d) = self.shutting_down {
            at = at.min(d);
        }
        Some(super::poll_wait(at, now))
    }

    fn drain_control(&mut self, now: Instant) {
        while let Ok(msg) = self.control_rx.try_recv() {
            if msg == ControlMsg::Shutdown && self.shutting_down.is_none() {
                for slot in &mut self.slots {
                    if let Some(c) = slot.client.as_mut() {
                        c.close(now, CloseReason::Normal);
                    }
                }
                self.shutting_down = Some(now + SHUTDOWN_DRAIN);
            }
        }
    }

    // ----- sessions -----

    fn run_timers(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.state == SlotState::Idle
                && now >= slot.next_attempt
                && self.shutting_down.is_none()
            {
                slot.state = SlotState::Resolving;
                slot.generation = slot.generation.wrapping_add(1);
                let token = ((slot.generation as u64) << 32) | i as u64;
                match self.resolver.lookup(token, &self.host, self.port) {
                    Ok(Lookup::Ready(addr)) => self.connect_slot(now, i, addr),
                    Ok(Lookup::Pending) => {}
                    Err(e) => {
                        log::warn!("cannot resolve {}: {e}", self.host);
                        self.slot_failed(now, i, None);
                    }
                }
            }
            if let Some(c) = self.slots[i].client.as_mut() {
                if c.poll_timeout().is_some_and(|t| now >= t) {
                    c.handle_timeout(now);
                }
            }
        }
        if now >= self.next_liveness_check {
            self.next_liveness_check = now + LIVENESS_CHECK;
            self.check_liveness(now);
        }
        // Requests waiting too long for a session.
        let expired: Vec<usize> = self
            .waiting
            .iter()
            .copied()
            .filter(|&l| {
                matches!(self.locals.get(l).map(|x| &x.state),
                    Some(LocalState::Waiting { since, .. }) if now.saturating_duration_since(*since) >= WAIT_FOR_SESSION)
            })
            .collect();
        for l in expired {
            self.waiting.retain(|x| *x != l);
            self.fail_request(now, l, Socks5Reply::GeneralFailure);
        }
        let stuck: Vec<usize> = self
            .locals
            .iter()
            .filter(|(_, l)| {
                matches!(&l.state, LocalState::Opening { since, .. } if now.saturating_duration_since(*since) >= OPEN_TIMEOUT)
            })
            .map(|(i, _)| i)
            .collect();
        for l in stuck {
            self.fail_request(now, l, Socks5Reply::TtlExpired);
        }
    }

    fn drain_resolver(&mut self, now: Instant) {
        while let Some(r) = self.resolver.try_recv() {
            let i = (r.token & 0xffff_ffff) as usize;
            let generation = (r.token >> 32) as u32;
            let ok = self
                .slots
                .get(i)
                .is_some_and(|s| s.generation == generation && s.state == SlotState::Resolving);
            if !ok {
                continue;
            }
            match r.result.ok().and_then(|a| a.first().copied()) {
                Some(addr) => self.connect_slot(now, i, addr),
                None => {
                    log::warn!("cannot resolve the server name {:?}; will retry", self.host);
                    self.slot_failed(now, i, None);
                }
            }
        }
    }

    fn connect_slot(&mut self, now: Instant, i: usize, server: SocketAddr) {
        let bind: SocketAddr = if server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let sock = bind_udp(bind).and_then(|s| {
            s.connect(server)?;
            Ok(s)
        });
        let mut sock = match sock {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot open a UDP socket towards {server}: {e}");
                self.slot_failed(now, i, None);
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(SLOT_BASE + i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register a UDP socket: {e}");
            self.slot_failed(now, i, None);
            return;
        }
        let mut seed = [0u8; 32];
        if keys::fill_random(&mut seed).is_err() {
            self.slot_failed(now, i, None);
            return;
        }
        match ClientSession::connect(
            self.options.connector.clone(),
            &self.options.access_key,
            now,
            unix_now(),
            seed,
        ) {
            Ok(c) => {
                let slot = &mut self.slots[i];
                if let Some(mut old) = slot.sock.take() {
                    let _ = self.poll.registry().deregister(&mut old);
                }
                slot.sock = Some(sock);
                slot.client = Some(c);
                slot.state = SlotState::Handshaking;
                slot.blocked = None;
                slot.readable = true;
                log::debug!("session {i}: handshake with {server}");
            }
            Err(e) => {
                log::error!("the access key cannot be used: {e:?}");
                self.slot_failed(now, i, None);
            }
        }
    }

    /// Replaces connected sessions that stopped answering (see [`DEAD_AFTER`]).
    fn check_liveness(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.state != SlotState::Connected {
                slot.in_flight_since = None;
                continue;
            }
            let Some(stats) = slot
                .client
                .as_mut()
                .and_then(|c| c.session_mut())
                .map(|s| s.transport().stats())
            else {
                continue;
            };
            // Heard from the server since the last check: alive; count probe timeouts from here.
            if slot.last_rx != slot.checked_rx {
                slot.checked_rx = slot.last_rx;
                slot.pto_base = stats.pto_count;
                slot.in_flight_since = None;
            }
            // Waiting for an answer: data in flight, or a probe timeout since we last heard
            // anything (a timeout moves the in-flight bytes to "lost" until they are resent, so
            // in-flight alone can read zero between retransmissions).
            let waiting = stats.bytes_in_flight > 0 || stats.pto_count > slot.pto_base;
            if !waiting {
                slot.in_flight_since = None;
                continue;
            }
            let since = *slot.in_flight_since.get_or_insert(now);
            let silent = now.saturating_duration_since(slot.last_rx);
            if now.saturating_duration_since(since) >= DEAD_AFTER && silent >= DEAD_AFTER {
                log::warn!(
                    "tunnel session {i}: no answer from the server for {} s; reconnecting (the \
                     server may have restarted)",
                    silent.as_secs()
                );
                slot.announced_failure = true;
                self.slot_failed(now, i, None);
            }
        }
    }

    /// Schedules a reconnect with exponential backoff and ±25 % jitter.
    fn slot_failed(&mut self, now: Instant, i: usize, at_least: Option<Duration>) {
        let r = self.rand();
        let slot = &mut self.slots[i];
        let base = slot.backoff.max(at_least.unwrap_or_default());
        let jitter_pct = 75 + (r % 51); // 75..=125 %
        let delay = base * jitter_pct as u32 / 100;
        slot.next_attempt = now + delay;
        slot.failed_at = now;
        slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
        slot.state = SlotState::Idle;
        slot.in_flight_since = None;
        slot.pto_base = 0;
        slot.client = None;
        slot.streams = 0;
        slot.blocked = None;
        if let Some(mut s) = slot.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        // Everything that used this slot ends.
        let affected: Vec<usize> = self
            .locals
            .iter()
            .filter(|(_, l)| match &l.state {
                LocalState::Opening { slot, .. } | LocalState::Piping { slot } => *slot == i,
                _ => false,
            })
            .map(|(idx, _)| idx)
            .collect();
        for idx in affected {
            if matches!(
                self.locals.get(idx).map(|l| &l.state),
                Some(LocalState::Opening { .. })
            ) {
                self.fail_request(now, idx, Socks5Reply::GeneralFailure);
            } else {
                self.close_local(idx);
            }
        }
        self.streams.retain(|(s, _), _| *s != i);
        for (_, a) in self.assocs.iter_mut() {
            if a.slot == Some(i) {
                a.slot = None;
            }
        }
        self.flows.retain(|(s, _), _| *s != i);
    }

    fn receive(&mut self, now: Instant, i: usize) {
        let slot = &mut self.slots[i];
        if !slot.readable {
            return;
        }
        let (Some(sock), Some(client)) = (slot.sock.as_ref(), slot.client.as_mut()) else {
            slot.readable = false;
            return;
        };
        for _ in 0..256 {
            match sock.recv(&mut self.buf) {
                Ok(n) => {
                    slot.last_rx = now;
                    client.handle_datagram(now, &mut self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    slot.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP port unreachable etc.: the server may be restarting; the handshake
                    // retries and the idle timeout decide.
                    log::debug!("session {i}: udp receive: {e}");
                }
            }
        }
    }

    fn retry_blocked(slot: &mut Slot) {
        if let (Some(bytes), Some(sock)) = (slot.blocked.as_ref(), slot.sock.as_ref()) {
            let would_block =
                matches!(sock.send(bytes), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            if !would_block {
                slot.blocked = None;
            }
        }
    }

    fn flush(&mut self, now: Instant, i: usize) {
        let slot = &mut self.slots[i];
        Self::retry_blocked(slot);
        if slot.blocked.is_some() {
            return;
        }
        let (Some(sock), Some(client)) = (slot.sock.as_ref(), slot.client.as_mut()) else {
            return;
        };
        while let Some(len) = client.poll_transmit(now, &mut self.buf) {
            match sock.send(&self.buf[..len]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    slot.blocked = Some(self.buf[..len].to_vec());
                    return;
                }
                Err(e) => log::debug!("session {i}: udp send: {e}"),
            }
        }
    }

    fn process_slot_events(&mut self, now: Instant, i: usize) {
        while let Some(ev) = self.slots[i].client.as_mut().and_then(|c| c.poll_event()) {
            match ev {
                ClientEvent::Connected => {
                    let slot = &mut self.slots[i];
                    slot.state = SlotState::Connected;
                    slot.backoff = BACKOFF_MIN;
                    slot.refusals = 0;
                    if slot.announced_failure || !self.connected_once {
                        log::info!("tunnel session {i} connected to {}", self.options.server);
                    } else {
                        log::debug!("tunnel session {i} connected");
                    }
                    slot.announced_failure = false;
                    self.connected_once = true;
                    self.serve_waiting(now);
                }
                ClientEvent::Refused {
                    reason,
                    retry_after_secs,
                } => {
                    // Repeated refusals (retries, requests) are logged once per outage.
                    let level = if self.slots[i].announced_failure {
                        log::Level::Debug
                    } else {
                        log::Level::Error
                    };
                    log::log!(
                        level,
                        "the server refused this key: {} (retrying in {retry_after_secs} s, or at the next request)",
                        describe_refusal(reason)
                    );
                    self.slots[i].announced_failure = true;
                    self.slot_failed(
                        now,
                        i,
                        Some(Duration::from_secs(u64::from(retry_after_secs).max(1))),
                    );
                    let slot = &mut self.slots[i];
                    slot.refusals = slot.refusals.saturating_add(1);
                    let about_key = matches!(
                        reason,
                        RefuseReason::QuotaExceeded
                            | RefuseReason::Disabled
                            | RefuseReason::Expired
                    );
                    if about_key && self.pick_slot().is_none() {
                        // Waiting would not help: the next request retries (see `demand_retry`).
                        for idx in std::mem::take(&mut self.waiting) {
                            self.fail_request(now, idx, Socks5Reply::NotAllowed);
                        }
                    }
                    return;
                }
                ClientEvent::HandshakeTimeout => {
                    if !self.slots[i].announced_failure {
                        log::warn!(
                            "no answer from the server {}: check the key, host and port; the server is silent to \
                             unknown keys (also check that this machine's clock is within 2 minutes of the right \
                             time). Retrying with backoff",
                            self.options.server
                        );
                        self.slots[i].announced_failure = true;
                    }
                    self.slot_failed(now, i, None);
                    return;
                }
                ClientEvent::Transport(te) => {
                    if let TransportEvent::Closed { reason, by_peer } = te {
                        if by_peer || reason != CloseReason::Normal {
                            let level = if matches!(
                                reason,
                                CloseReason::LimitReached | CloseReason::UserDeleted
                            ) {
                                log::Level::Error
                            } else {
                                log::Level::Warn
                            };
                            log::log!(
                                level,
                                "tunnel session {i}: {}; reconnecting",
                                describe_close(reason)
                            );
                        }
                        let wait =
                            matches!(reason, CloseReason::LimitReached | CloseReason::UserDeleted)
                                .then_some(KEY_CLOSED_WAIT);
                        self.slots[i].announced_failure = true;
                        self.slot_failed(now, i, wait);
                        return;
                    }
                    self.on_transport_event(now, i, te);
                }
            }
        }
        let finished = self.slots[i]
            .client
            .as_ref()
            .is_some_and(|c| c.is_finished());
        if finished && self.shutting_down.is_none() {
            self.slot_failed(now, i, None);
        }
    }

    fn on_transport_event(&mut self, now: Instant, slot: usize, ev: TransportEvent) {
        match ev {
            TransportEvent::StreamOpenResult { id, result } => {
                let Some(&l) = self.streams.get(&(slot, id)) else {
                    return;
                };
                if result == OpenResult::Ok {
                    self.open_succeeded(now, l);
                } else {
                    self.fail_request(now, l, socks_code(result));
                }
            }
            TransportEvent::StreamReadable { id }
            | TransportEvent::StreamWritable { id }
            | TransportEvent::StreamFinished { id } => {
                if let Some(&l) = self.streams.get(&(slot, id)) {
                    self.drive_local(now, l);
                }
            }
            TransportEvent::StreamReset { id, reason } => {
                let Some(&l) = self.streams.get(&(slot, id)) else {
                    return;
                };
                match (reason, self.locals.get(l).map(|x| &x.state)) {
                    (ResetReason::OpenFailed(r), Some(LocalState::Opening { .. })) => {
                        self.fail_request(now, l, socks_code(r))
                    }
                    (_, Some(LocalState::Opening { .. })) => {
                        self.fail_request(now, l, Socks5Reply::GeneralFailure)
                    }
                    _ => self.close_local(l),
                }
            }
            TransportEvent::Datagram { dest, data } => self.datagram_in(slot, dest, &data),
            TransportEvent::StreamOpened { id, .. } => {
                // The server never opens streams; refuse politely.
                if let Some(c) = self.slots[slot]
                    .client
                    .as_mut()
                    .and_then(|c| c.session_mut())
                {
                    let _ = c.transport_mut().answer_open(id, OpenResult::NotAllowed);
                }
            }
            TransportEvent::StreamsAvailable => self.serve_waiting(now),
            TransportEvent::Closed { .. } => {}
        }
    }

    // ----- local connections -----

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _peer)) => {
                    if self.locals.len() >= MAX_LOCAL {
                        log::warn!("too many local connections ({MAX_LOCAL}); refusing one");
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    let idx = self.locals.insert_with(|idx| {
                        let _ = self.poll.registry().register(
                            &mut sock,
                            Token(idx),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                        Local {
                            sock,
                            state: LocalState::Request(ProxyFront::new()),
                            pipe: None,
                            out: Vec::new(),
                            out_pos: 0,
                            readable: true,
                            writable: true,
                        }
                    });
                    self.drive_local(now, idx);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("accepting a local connection: {e}");
                    return;
                }
            }
        }
    }

    /// Advances one local connection as far as it can go.
    fn drive_local(&mut self, now: Instant, idx: usize) {
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        // Pending reply bytes first.
        if l.out_pos < l.out.len() && l.writable {
            match l.sock.write(&l.out[l.out_pos..]) {
                Ok(n) => l.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => l.writable = false,
                Err(_) => {
                    self.close_local(idx);
                    return;
                }
            }
            if l.out_pos == l.out.len() {
                l.out.clear();
                l.out_pos = 0;
            }
        }
        match &mut l.state {
            LocalState::Closing => {
                if l.out.is_empty() {
                    self.close_local(idx);
                }
            }
            LocalState::Request(_) => self.read_request(now, idx),
            LocalState::Waiting { .. } => {}
            LocalState::Opening { slot, .. } | LocalState::Piping { slot } => {
                let slot = *slot;
                self.pump_local(idx, slot);
            }
            LocalState::Udp { assoc } => {
                let assoc = *assoc;
                // The association lives as long as this connection; anything read is ignored.
                let mut scratch = [0u8; 512];
                loop {
                    match l.sock.read(&mut scratch) {
                        Ok(0) => {
                            self.close_assoc(assoc);
                            self.close_local(idx);
                            return;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            self.close_assoc(assoc);
                            self.close_local(idx);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn read_request(&mut self, now: Instant, idx: usize) {
        let mut scratch = [0u8; READ_CHUNK];
        loop {
            let Some(l) = self.locals.get_mut(idx) else {
                return;
            };
            if !l.readable {
                return;
            }
            let n = match l.sock.read(&mut scratch) {
                Ok(0) => {
                    self.close_local(idx);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_local(idx);
                    return;
                }
            };
            let LocalState::Request(front) = &mut l.state else {
                return;
            };
            match front.feed(&scratch[..n]) {
                Progress::NeedMore { reply } => {
                    self.send_local(idx, &reply);
                }
                Progress::Ready { reply, request } => {
                    self.send_local(idx, &reply);
                    self.handle_request(now, idx, request);
                    return;
                }
                Progress::Failed { reply, error } => {
                    log::debug!("local proxy request refused: {error}");
                    self.send_local(idx, &reply);
                    if let Some(l) = self.locals.get_mut(idx) {
                        l.state = LocalState::Closing;
                    }
                    self.drive_local(now, idx);
                    return;
                }
            }
        }
    }

    /// Queues reply bytes to the local client (written as the socket allows).
    fn send_local(&mut self, idx: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        l.out.extend_from_slice(bytes);
        if l.writable {
            match l.sock.write(&l.out[l.out_pos..]) {
                Ok(n) => l.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => l.writable = false,
                Err(_) => {}
            }
            if l.out_pos == l.out.len() {
                l.out.clear();
                l.out_pos = 0;
            }
        }
    }

    fn handle_request(&mut self, now: Instant, idx: usize, request: ProxyRequest) {
        if let ProxyRequest::UdpAssociate { .. } = request {
            self.start_assoc(now, idx, request);
            return;
        }
        if let Some(l) = self.locals.get_mut(idx) {
            l.state = LocalState::Waiting {
                request,
                since: now,
            };
        }
        self.try_open(now, idx);
    }

    fn pick_slot(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SlotState::Connected)
            .min_by_key(|(_, s)| s.streams)
            .map(|(i, _)| i)
    }

    /// Opens the stream of a waiting request, or queues it until a session is up.
    fn try_open(&mut self, now: Instant, idx: usize) {
        let Some(slot) = self.pick_slot() else {
            if !self.waiting.contains(&idx) {
                self.waiting.push_back(idx);
            }
            self.demand_retry(now);
            return;
        };
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let LocalState::Waiting { request, .. } = &l.state else {
            return;
        };
        let request = request.clone();
        let Some(dest) = request.dest().and_then(to_destination) else {
            self.fail_request(now, idx, Socks5Reply::AddressTypeNotSupported);
            return;
        };
        let Some(session) = self.slots[slot]
            .client
            .as_mut()
            .and_then(|c| c.session_mut())
        else {
            return;
        };
        let stream = match session.transport_mut().open_stream(dest) {
            Ok(s) => s,
            Err(crate::proto::transport::StreamError::TooManyStreams) => {
                if !self.waiting.contains(&idx) {
                    self.waiting.push_back(idx);
                }
                return;
            }
            Err(e) => {
                log::debug!("cannot open a stream: {e}");
                if !self.waiting.contains(&idx) {
                    self.waiting.push_back(idx);
                }
                return;
            }
        };
        self.waiting.retain(|x| *x != idx);
        self.slots[slot].streams += 1;
        self.streams.insert((slot, stream), idx);
        let early: Vec<u8> = match &request {
            ProxyRequest::Connect { early_data, .. } => early_data.clone(),
            ProxyRequest::HttpForward {
                head, body_prefix, ..
            } => {
                let mut v = head.clone();
                v.extend_from_slice(body_prefix);
                v
            }
            ProxyRequest::UdpAssociate { .. } => Vec::new(),
        };
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        // Until the open succeeds only socket → stream moves (the reply must come first).
        let mut pipe = Pipe::awaiting_reply(stream, &early);
        pipe.sock_readable = l.readable;
        pipe.sock_writable = l.writable;
        l.pipe = Some(pipe);
        l.state = LocalState::Opening {
            request,
            slot,
            stream,
            since: now,
        };
        self.pump_local(idx, slot);
    }

    /// A request is waiting and no session is up: bring idle slots' next attempt forward (but
    /// not closer than [`DEMAND_RETRY_GAP`] to their last failure).
    fn demand_retry(&mut self, now: Instant) {
        if self.shutting_down.is_some() {
            return;
        }
        for slot in &mut self.slots {
            if slot.state == SlotState::Idle {
                let gap = if slot.refusals == 0 {
                    DEMAND_RETRY_GAP
                } else {
                    (DEMAND_RETRY_GAP * (1 << slot.refusals.min(4)) / 2).min(REFUSED_RETRY_GAP_MAX)
                };
                let earliest = (slot.failed_at + gap).max(now);
                slot.next_attempt = slot.next_attempt.min(earliest);
            }
        }
    }

    fn serve_waiting(&mut self, now: Instant) {
        let waiting: Vec<usize> = self.waiting.iter().copied().collect();
        for idx in waiting {
            if self.pick_slot().is_none() {
                return;
            }
            self.try_open(now, idx);
        }
    }

    fn open_succeeded(&mut self, now: Instant, idx: usize) {
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let LocalState::Opening { request, slot, .. } = &l.state else {
            return;
        };
        let slot = *slot;
        let reply = request.success_reply(self.local_addr);
        let sent = l.pipe.as_mut().map(|p| p.send_reply(&reply));
        if let Some(Err(e)) = sent {
            log::warn!("local connection: {e}; closing it");
            self.fail_request(now, idx, Socks5Reply::GeneralFailure);
            return;
        }
        l.state = LocalState::Piping { slot };
        self.pump_local(idx, slot);
    }

    fn fail_request(&mut self, now: Instant, idx: usize, code: Socks5Reply) {
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let reply = match &l.state {
            LocalState::Waiting { request, .. } | LocalState::Opening { request, .. } => {
                request.failure_reply(code)
            }
            _ => Vec::new(),
        };
        if let LocalState::Opening { slot, stream, .. } = l.state {
            self.streams.remove(&(slot, stream));
            if let Some(s) = self.slots.get_mut(slot) {
                s.streams = s.streams.saturating_sub(1);
                if let Some(sess) = s.client.as_mut().and_then(|c| c.session_mut()) {
                    let _ = sess
                        .transport_mut()
                        .stream_reset(stream, ResetReason::Cancelled);
                }
            }
        }
        if let Some(l) = self.locals.get_mut(idx) {
            // The pipe took over the socket's edge-trigger flags (`pump_local`); give them back,
            // or the failure reply would wait for a writable event that never comes.
            if let Some(p) = l.pipe.take() {
                l.readable |= p.sock_readable;
                l.writable |= p.sock_writable;
            }
            l.state = LocalState::Closing;
        }
        self.waiting.retain(|x| *x != idx);
        self.send_local(idx, &reply);
        self.drive_local(now, idx);
    }

    fn pump_local(&mut self, idx: usize, slot: usize) {
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let Some(pipe) = l.pipe.as_mut() else { return };
        pipe.sock_readable |= l.readable;
        pipe.sock_writable |= l.writable;
        l.readable = false;
        l.writable = false;
        let Some(session) = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.client.as_mut())
            .and_then(|c| c.session_mut())
        else {
            self.close_local(idx);
            return;
        };
        let mut unlimited = u64::MAX;
        let result = pipe.pump(&mut l.sock, session.transport_mut(), &mut unlimited);
        match result {
            Ok(_) => {}
            Err((PipeEnd::SocketError, _)) => {
                pipe.reset_stream(session.transport_mut(), ResetReason::Cancelled);
                self.close_local(idx);
            }
            Err((PipeEnd::Done, _)) | Err((PipeEnd::StreamGone, _)) => self.close_local(idx),
        }
    }

    fn close_local(&mut self, idx: usize) {
        let Some(mut l) = self.locals.remove(idx) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut l.sock);
        // A transfer cut short (tunnel lost, stream reset, user cut off) must not look complete
        // to the application: close with a reset instead of a FIN.
        if matches!(l.state, LocalState::Piping { .. })
            && !l.pipe.as_ref().is_some_and(|p| p.is_done())
        {
            crate::sys::reset_on_close(&l.sock);
        }
        let stream = match l.state {
            LocalState::Opening { slot, stream, .. } => Some((slot, stream)),
            LocalState::Piping { slot } => l.pipe.as_ref().map(|p| (slot, p.stream)),
            _ => None,
        };
        if let Some((slot, stream)) = stream {
            if self.streams.remove(&(slot, stream)).is_some() {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.streams = s.streams.saturating_sub(1);
                    if let Some(sess) = s.client.as_mut().and_then(|c| c.session_mut()) {
                        let done = l.pipe.as_ref().is_some_and(|p| p.is_done());
                        if !done {
                            let _ = sess
                                .transport_mut()
                                .stream_reset(stream, ResetReason::Cancelled);
                        }
                    }
                }
            }
        }
        if let LocalState::Udp { assoc } = l.state {
            self.close_assoc(assoc);
        }
        self.waiting.retain(|x| *x != idx);
    }

    // ----- UDP ASSOCIATE -----

    fn start_assoc(&mut self, now: Instant, idx: usize, request: ProxyRequest) {
        let bind = SocketAddr::new(self.local_addr.ip(), 0);
        let sock = match std::net::UdpSocket::bind(bind).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => UdpSocket::from_std(s),
            Err(e) => {
                log::warn!("cannot open a UDP relay socket: {e}");
                if let Some(l) = self.locals.get_mut(idx) {
                    l.state = LocalState::Waiting {
                        request,
                        since: now,
                    };
                }
                self.fail_request(now, idx, Socks5Reply::GeneralFailure);
                return;
            }
        };
        let bound = sock.local_addr().unwrap_or(bind);
        let a = self.assocs.insert(Assoc {
            sock,
            client: None,
            slot: None,
        });
        if let Some(assoc) = self.assocs.get_mut(a) {
            let _ = self.poll.registry().register(
                &mut assoc.sock,
                Token(ASSOC_BASE + a),
                Interest::READABLE,
            );
        }
        let reply = request.success_reply(bound);
        if let Some(l) = self.locals.get_mut(idx) {
            l.state = LocalState::Udp { assoc: a };
        }
        self.send_local(idx, &reply);
    }

    fn close_assoc(&mut self, a: usize) {
        if let Some(mut assoc) = self.assocs.remove(a) {
            let _ = self.poll.registry().deregister(&mut assoc.sock);
        }
        self.flows.retain(|_, v| *v != a);
    }

    fn assoc_readable(&mut self, _now: Instant, a: usize) {
        for _ in 0..256 {
            let Some(assoc) = self.assocs.get_mut(a) else {
                return;
            };
            let (n, from) = match assoc.sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            // Only the client that owns the association may use it (first sender wins).
            if assoc.client.is_some_and(|c| c != from) {
                continue;
            }
            if !from.ip().is_loopback() && from.ip() != self.local_addr.ip() {
                continue;
            }
            assoc.client = Some(from);
            let Ok((target, payload)) = proxy_front::parse_socks5_udp(&self.buf[..n]) else {
                continue;
            };
            let Some(dest) = to_destination(&target) else {
                continue;
            };
            let slot = match assoc
                .slot
                .filter(|s| self.slots[*s].state == SlotState::Connected)
            {
                Some(s) => s,
                None => match self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.state == SlotState::Connected)
                    .min_by_key(|(_, s)| s.streams)
                    .map(|(i, _)| i)
                {
                    Some(s) => s,
                    None => continue, // no session: drop (UDP senders retry)
                },
            };
            assoc.slot = Some(slot);
            let Some(session) = self.slots[slot]
                .client
                .as_mut()
                .and_then(|c| c.session_mut())
            else {
                continue;
            };
            if session
                .transport_mut()
                .send_datagram(dest.clone(), payload)
                .is_ok()
            {
                if self.flows.len() >= 1024 && !self.flows.contains_key(&(slot, dest.clone())) {
                    self.flows.clear();
                }
                self.flows.insert((slot, dest), a);
            }
        }
    }

    fn datagram_in(&mut self, slot: usize, dest: Destination, data: &[u8]) {
        let Some(&a) = self.flows.get(&(slot, dest.clone())) else {
            return;
        };
        let Some(assoc) = self.assocs.get(a) else {
            return;
        };
        let Some(client) = assoc.client else { return };
        let target = to_target(&dest);
        let hl = proxy_front::socks5_udp_header_len(&target);
        if hl + data.len() > self.buf.len() {
            return;
        }
        let Ok(written) = proxy_front::write_socks5_udp_header(&target, &mut self.buf[..hl]) else {
            return;
        };
        self.buf[written..written + data.len()].copy_from_slice(data);
        let _ = assoc
            .sock
            .send_to(&self.buf[..written + data.len()], client);
    }
}
