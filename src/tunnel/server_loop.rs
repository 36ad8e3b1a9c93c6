//! The server's data plane: one mio event loop thread that owns every tunnel socket — the UDP
//! listen sockets, the outbound TCP connections, the per-session UDP relay sockets — and drives
//! the protocol core ([`ServerEndpoint`]).
//!
//! - Replies leave from the socket that received the peer's packets (the endpoint tracks it per
//!   session); a send error on one datagram is logged and never aborts other work.
//! - Outbound TCP: non-blocking connect (connect, wait writable, `take_error`, `peer_addr`) with a
//!   timeout, trying each resolved address; names go to the resolver pool, never resolved on the
//!   loop. Every destination passes the [`DestGuard`] after resolution.
//! - Accounting and limits are decided by the [`Ledger`]: payload bytes are charged to it as
//!   pipes and relays move them, it is synced with the shared
//!   [`UserTable`](crate::users::UserTable) once per second (one lock per second, never per
//!   packet), and the loop carries out its verdicts (refuse a user, close its sessions once
//!   delivered, readmit it). Pipes never move more than the user's allowance.
//! - API and SIGHUP changes arrive as [`ControlMsg`]s through a channel + `mio::Waker`.
//! - Scarce resources are shared out by [`Quotas`]: a stream, a lookup or a socket read happens
//!   only within the user's share and the global cap (fds included, a reserve kept for the API,
//!   the state file and new users); idle streams are reset, lookups time out, failed names are
//!   cached briefly.

mod carrier;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use self::carrier::{CarrierIo, Carriers};
use super::dest_guard::DestGuard;
use super::driver;
use super::driver::core::{LoopCore, LoopThread};
use super::driver::ticket::{Ticket, TicketIssuer, TicketKind};
use super::driver::timeouts::TimeoutQueue;
use super::driver::token::Tok;
use super::driver::udp::{MAX_BATCH_BYTES, RECV_BUFFER, SendOutcome, UdpSockets};
use super::hello_record::{self, HelloRecordFile};
use super::ledger::{Ledger, TableView, Verdict};
use super::pipe::{Moved, PIPE_BUF, Pipe, PipeEnd, ReadHold};
use super::quotas::{FdSplit, Limits, Quotas};
use super::read_ahead::READ_AHEAD;
use super::resolver::{Lookup, Resolved, Resolver};
use super::slab::Slab;
use super::stats::{SharedTunnelStats, TunnelStats, lock_stats};
use super::udp_relay::RelayPool;
use super::{bind_udp, unix_now};
use crate::config::{ServerConfig, ServerLimits};
use crate::control::{ControlMsg, ControlSender};
use crate::keys;
use crate::proto::id_map::{IdMap, SortedIdMap};
use crate::proto::transport::{
    AssocId, CloseReason, Destination, OpenResult, ResetReason, StreamId, TransportEvent,
};
use crate::proto::{
    EndpointConfig, EndpointEvent, RefuseReason, ServerEndpoint, SessionId, SocketIndex, UserState,
};
use crate::runtime::malloc::HeapTrim;
use crate::users::{SharedUsers, UserId, now_unix_ms};

/// Outbound connect timeout (resolution included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown waits for CLOSE packets to leave.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(300);
/// Send buffer per stream on the server (see [`LoopOptions::from_config`]).
pub const SERVER_STREAM_SEND_BUFFER: usize = 2 * 1024 * 1024;
/// Send buffer per session on the server (all streams together): twice a stream's, so that a
/// stream waiting for its flow-control window may keep a full buffer ready (bytes beyond the
/// window are allowed while the session buffer is under half full, then 64 KiB: see
/// `Streams::beyond_window_room`) and its siblings still have half. At 2 MiB a TCP-carrier
/// download's ring drained to nothing at every window update and grew again through mmapped
/// sizes: 23-30k page faults per 300 MB instead of 1.2k (+50 % server system time).
pub const SERVER_SESSION_SEND_BUFFER: usize = 4 * 1024 * 1024;
/// Lookups waiting for a resolver thread (beyond one running per thread).
const DNS_QUEUE: usize = 256;
/// Fds the loop holds whatever the traffic (epoll, waker, stdio, log) beside its listen sockets.
const FIXED_FDS: u64 = 16;
/// How often open streams are checked for idleness.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// The loop's quotas from the config and the fd limit in force: streams, relay sockets and TCP
/// carrier connections together stay below the soft `RLIMIT_NOFILE` minus the reserve.
/// Returns the quotas and the fd split (relays take 2 sockets each).
fn quotas_for(cfg: &ServerConfig, nofile: u64) -> (Quotas, FdSplit) {
    let l: &ServerLimits = &cfg.limits;
    let fixed = (cfg.listen.len() + cfg.listen_tcp.len()) as u64 + FIXED_FDS;
    let budget = Quotas::fd_budget(nofile, u64::from(l.fd_reserve), fixed);
    // Carrier sessions (at most one per session) and strangers and splices (3 per allowed
    // stranger).
    let tcp_conns = if cfg.listen_tcp.is_empty() {
        0
    } else {
        cfg.max_sessions as usize + 3 * cfg.max_unauthenticated_tcp as usize
    };
    let fds = FdSplit::new(budget, cfg.max_sessions as usize, tcp_conns);
    let max_streams = (l.max_streams as usize).min(fds.streams);
    let secs = |n: u32| Duration::from_secs(u64::from(n));
    let limits = Limits {
        max_streams,
        max_streams_per_user: l.max_streams_per_user as usize,
        max_lookups: l.dns_threads as usize + DNS_QUEUE,
        max_lookups_per_user: l.max_dns_lookups_per_user as usize,
        max_buffered: usize::try_from(l.max_buffered_bytes).unwrap_or(usize::MAX),
        max_buffered_per_user: usize::try_from(l.max_buffered_bytes_per_user).unwrap_or(usize::MAX),
        stream_idle_timeout: secs(l.stream_idle_timeout_secs),
        half_closed_timeout: secs(l.half_closed_timeout_secs),
        lookup_timeout: secs(l.dns_timeout_secs),
        negative_ttl: secs(l.dns_negative_ttl_secs),
    };
    (Quotas::new(limits), fds)
}

/// Settings of the server loop beyond `ServerConfig`.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    pub endpoint: EndpointConfig,
    /// Where the loop publishes its counters once per second (read by `GET /metrics`).
    pub stats: SharedTunnelStats,
}

impl LoopOptions {
    pub fn from_config(cfg: &ServerConfig) -> Self {
        let limits = &cfg.limits;
        let mut endpoint = EndpointConfig {
            max_sessions: cfg.max_sessions as usize,
            max_sessions_per_user: cfg.max_sessions_per_user as usize,
            handshake_rate: limits.handshake_rate,
            handshake_burst: limits.handshake_burst,
            handshake_rate_per_user: limits.handshake_rate_per_user,
            handshake_burst_per_user: limits.handshake_burst_per_user,
            recv_budget_per_user: limits.max_buffered_bytes_per_user,
            ..EndpointConfig::default()
        };
        // The server's send side holds what destinations deliver faster than the tunnel carries
        // it. 2 MiB per stream keeps a lossy 100 Mbit/s × 50 ms path full (1 MiB measured 20-30 %
        // less goodput at 1-5 % loss); capping the whole session at 2 MiB as well halves the
        // server's peak memory with 32 bulk streams (30 → 18 MB measured).
        endpoint.session.transport.send_buffer = SERVER_STREAM_SEND_BUFFER;
        endpoint.session.transport.session_send_buffer = SERVER_SESSION_SEND_BUFFER;
        LoopOptions {
            endpoint,
            stats: SharedTunnelStats::default(),
        }
    }
}

/// The running loop.
pub struct ServerLoopHandle {
    pub control: ControlSender,
    /// The UDP addresses actually bound (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    /// The TCP carrier addresses actually bound (`listen_tcp` order).
    pub tcp_addrs: Vec<SocketAddr>,
    thread: LoopThread,
}

impl ServerLoopHandle {
    /// Tells clients the server is going away, flushes counters into the table and joins.
    pub fn shutdown(mut self) {
        self.control.send(ControlMsg::Shutdown);
        self.thread.join();
    }
}

/// Why the loop could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Binds the listen sockets and starts the loop thread.
pub fn start(
    cfg: &ServerConfig,
    users: SharedUsers,
    options: LoopOptions,
) -> Result<ServerLoopHandle, StartError> {
    let core =
        LoopCore::new().map_err(|e| StartError(format!("cannot create the event loop: {e}")))?;
    let mut sockets = Vec::new();
    let mut local_addrs = Vec::new();
    for addr in &cfg.listen {
        let sock =
            bind_udp(*addr).map_err(|e| StartError(format!("cannot listen on udp {addr}: {e}")))?;
        let local = sock.local_addr().map_err(|e| StartError(e.to_string()))?;
        local_addrs.push(local);
        sockets.push(sock);
    }
    let udp = UdpSockets::register(sockets, cfg.udp_offload, core.registry())
        .map_err(|e| StartError(format!("cannot watch the listen sockets: {e}")))?;
    let resolver = Resolver::new(
        cfg.limits.dns_threads as usize,
        DNS_QUEUE,
        core.waker.clone(),
    )
    .map_err(|e| StartError(format!("cannot start DNS threads: {e}")))?;
    let nofile = crate::sys::nofile_limit().map_or(1024, |(soft, _)| soft);
    let (quotas, fds) = quotas_for(cfg, nofile);
    let max_relays = fds.relays / 2;
    log::info!(
        "tunnel: open-file limit {nofile}: up to {} outbound streams ({} per user), {max_relays} UDP relays, {} TCP connections, {} fds kept in reserve",
        quotas.limits().max_streams,
        quotas.limits().max_streams_per_user,
        fds.tcp,
        cfg.limits.fd_reserve
    );
    let lookup_timeout = quotas.limits().lookup_timeout;
    let (control, control_rx) = core.control_channel();
    let mut seed = [0u8; 32];
    keys::fill_random(&mut seed).map_err(|e| StartError(e.to_string()))?;
    let mut carrier_seed = [0u8; 32];
    keys::fill_random(&mut carrier_seed).map_err(|e| StartError(e.to_string()))?;
    let carriers = Carriers::bind(
        &cfg.listen_tcp,
        core.registry(),
        cfg.fallback.map(|f| f.target),
        cfg.max_unauthenticated_tcp as usize,
        fds.tcp,
        carrier_seed,
    )
    .map_err(|e| StartError(format!("cannot listen on tcp {}: {}", e.addr, e.error)))?;
    let tcp_addrs = carriers.local_addrs.clone();
    let published = options.stats;
    let endpoint = ServerEndpoint::new(options.endpoint, seed);
    let mut guard = DestGuard::new(cfg.allow_private_destinations);
    if cfg.api.enabled {
        // Before any session exists; the bound address follows as `ControlMsg::ApiBound`.
        guard.protect_api(cfg.api.bind);
    }
    let mut lp = ServerLoop {
        core,
        udp,
        endpoint,
        users,
        control_rx,
        resolver,
        guard,
        out: Outbounds {
            table: Slab::new(),
            by_stream: IdMap::default(),
            tickets: TicketIssuer::new(),
            connect_timeouts: TimeoutQueue::new(CONNECT_TIMEOUT),
            lookups: HashMap::new(),
            lookup_timeouts: TimeoutQueue::new(lookup_timeout),
            held: Vec::new(),
            held_pass: HeldPass::default(),
        },
        sessions: SortedIdMap::default(),
        carriers,
        relays: RelayPool::new(max_relays),
        ledger: Ledger::new(Instant::now()),
        // One buffer for GRO reads and GSO batches (never both at once).
        buf: vec![0u8; RECV_BUFFER.max(MAX_BATCH_BYTES)].into_boxed_slice(),
        shutting_down: None,
        hello_record: None,
        quotas,
        next_idle_sweep: Instant::now() + IDLE_SWEEP,
        heap_trim: HeapTrim::new(Instant::now()),
        stats: TunnelStats::default(),
        published,
    };
    lp.load_users();
    let record = hello_record::path_for(&cfg.state_file);
    let record = HelloRecordFile::open(record, &mut lp.endpoint, Instant::now(), unix_now());
    lp.hello_record = Some(record);
    let thread = LoopThread::spawn("ostp-tunnel", move || lp.run())
        .map_err(|e| StartError(format!("cannot start the tunnel thread: {e}")))?;
    Ok(ServerLoopHandle {
        control,
        local_addrs,
        tcp_addrs,
        thread,
    })
}

enum OutState {
    Resolving,
    Connecting,
    Open,
}

/// One outbound TCP connection for one tunnel stream.
struct Outbound {
    session: SessionId,
    user: UserId,
    stream: StreamId,
    /// This incarnation of the slab slot: matches its DNS answer and its connect deadline.
    ticket: Ticket,
    /// In `Outbounds::held` (its socket reads wait for the user's buffered-bytes share or the
    /// session's read-ahead).
    held: bool,
    state: OutState,
    sock: Option<TcpStream>,
    pipe: Pipe,
    candidates: Vec<SocketAddr>,
    next_candidate: usize,
    last_error: OpenResult,
    /// When a byte last moved either way (idle timeout).
    last_progress: Instant,
}

struct SessionInfo {
    user: UserId,
    /// The client's current address (the user's recent IPs count sessions per address).
    ip: IpAddr,
    outbound: Vec<usize>,
}

/// Outbound TCP connections of tunnel streams, with their indexes and deadlines.
struct Outbounds {
    table: Slab<Outbound>,
    /// (session, stream) → outbound index.
    by_stream: IdMap<(SessionId, StreamId), usize>,
    /// Identity of each outbound incarnation (and of its DNS lookup).
    tickets: TicketIssuer,
    /// Outbound connects (DNS included) in the order they began, failing at [`CONNECT_TIMEOUT`].
    connect_timeouts: TimeoutQueue<Ticket>,
    /// Lookups in the resolver pool: whose share they use and the name (negative cache).
    lookups: HashMap<Ticket, (UserId, String)>,
    /// Outbound lookups the loop gives up on after the lookup timeout.
    lookup_timeouts: TimeoutQueue<Ticket>,
    /// Outbounds whose socket reads wait for their user's buffered-bytes share or their
    /// session's read-ahead, in the order they get to read (entries of outbounds since gone are
    /// skipped by their ticket).
    held: Vec<Ticket>,
    /// The scratch of [`ServerLoop::release_held`].
    held_pass: HeldPass,
}

impl Outbounds {
    /// Sends `name` to the resolver pool within `user`'s share of it (stream and relay lookups
    /// alike). `None`: refused (share used up, name recently failed, pool full). A pending lookup
    /// keeps the share until its answer arrives, and is given up on after the lookup timeout.
    #[allow(clippy::too_many_arguments)]
    fn submit_lookup(
        &mut self,
        quotas: &mut Quotas,
        resolver: &Resolver,
        now: Instant,
        user: UserId,
        ticket: Ticket,
        name: &str,
        port: u16,
    ) -> Option<Lookup> {
        if let Err(cap) = quotas.admit_lookup(now, user, name) {
            log::debug!("user {}: lookup of {name:?} refused ({cap:?})", user.0);
            return None;
        }
        match resolver.lookup(ticket, name, port) {
            Ok(Lookup::Pending) => {
                self.lookups.insert(ticket, (user, name.to_string()));
                self.lookup_timeouts.push_new(ticket, now);
                Some(Lookup::Pending)
            }
            Ok(ready) => {
                quotas.lookup_finished(user);
                Some(ready)
            }
            Err(e) => {
                log::debug!("resolver busy: {e}");
                quotas.lookup_finished(user);
                None
            }
        }
    }
}

/// What one [`ServerLoop::release_held`] pass learned, so that many held streams of one user
/// cost one look each.
/// Kept between passes (cleared, not freed): a pass allocates nothing once warm.
#[derive(Default)]
struct HeldPass {
    /// Users whose buffered bytes were refreshed from their sessions.
    refreshed: HashSet<UserId>,
    /// Held outbounds still waiting, in their order.
    waiting: Vec<Ticket>,
}

/// The server loop's state: the sockets it owns (listen sockets, outbounds, relays), the protocol
/// endpoint, the policy types it consults (ledger, quotas, guard) and the loop plumbing.
struct ServerLoop {
    core: LoopCore,
    /// The UDP listen sockets (`SocketIndex` = position in `listen`).
    udp: UdpSockets,
    endpoint: ServerEndpoint,
    users: SharedUsers,
    control_rx: Receiver<ControlMsg>,
    resolver: Resolver,
    guard: DestGuard,
    /// Outbound TCP connections of tunnel streams and their bookkeeping.
    out: Outbounds,
    /// By session id (issued in increasing order): no hash slack per idle session.
    sessions: SortedIdMap<SessionId, SessionInfo>,
    /// The TCP carrier: listeners, accepted connections, strangers and fallback splices.
    carriers: Carriers,
    relays: RelayPool,
    /// Per-user budgets, unsynced traffic and limits.
    ledger: Ledger,
    buf: Box<[u8]>,
    shutting_down: Option<Instant>,
    /// The record of answered hellos on disk (set once the users are loaded).
    hello_record: Option<HelloRecordFile>,
    /// Per-user shares and global caps (streams, lookups, buffered bytes), idle timeouts.
    quotas: Quotas,
    next_idle_sweep: Instant,
    /// Gives free heap pages back after traffic (checked from the idle sweep).
    heap_trim: HeapTrim,
    /// Counted here without locks; copied into `published` once per second.
    stats: TunnelStats,
    published: SharedTunnelStats,
}

/// Where a non-blocking connect stands.
#[derive(Debug)]
enum ConnectState {
    InProgress,
    Connected,
    Failed(io::Error),
}

/// Asks the socket whether its non-blocking connect has completed (a pending error first; a
/// peer address means connected).
fn connect_state(sock: &TcpStream) -> ConnectState {
    match sock.take_error() {
        Ok(Some(e)) | Err(e) => return ConnectState::Failed(e),
        Ok(None) => {}
    }
    match sock.peer_addr() {
        Ok(_) => ConnectState::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectState::InProgress,
        Err(e) => ConnectState::Failed(e),
    }
}

fn open_result_for_io(e: &io::Error) -> OpenResult {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => OpenResult::Refused,
        io::ErrorKind::TimedOut => OpenResult::Timeout,
        _ => OpenResult::Unreachable,
    }
}

impl ServerLoop {
    /// The carrier connections and what servicing them needs (split borrows of the loop).
    fn carrier_io(&mut self, now: Instant) -> (&mut Carriers, CarrierIo<'_>) {
        let io = CarrierIo {
            endpoint: &mut self.endpoint,
            stats: &mut self.stats.tcp,
            registry: self.core.poll.registry(),
            now,
            unix: unix_now(),
        };
        (&mut self.carriers, io)
    }

    /// Carrier sessions' frame buffers count in their users' buffered shares while they hold
    /// storage (only while bytes are in them).
    fn charge_carrier_memory(&mut self) {
        let (quotas, sessions) = (&mut self.quotas, &self.sessions);
        self.carriers.memory_changes(|session, held| {
            if let Some(info) = sessions.get(&session) {
                quotas.carrier_session(info.user, session, held);
            }
        });
    }

    /// Frames of carrier sessions that the endpoint has ready go to their connections.
    fn flush_carriers(&mut self, now: Instant) {
        let (carriers, mut io) = self.carrier_io(now);
        carriers.flush_ready(&mut io);
    }

    /// Registers every user of the table with the endpoint and the ledger (at start).
    fn load_users(&mut self) {
        let entries: Vec<(UserId, String, TableView, Option<u32>)> = {
            let table = crate::users::persist::lock_users(&self.users);
            table
                .list()
                .into_iter()
                .map(|u| {
                    (
                        u.id,
                        u.key.clone(),
                        TableView::of(u),
                        u.settings.max_devices,
                    )
                })
                .collect()
        };
        let now = Instant::now();
        for (id, key, view, max_devices) in entries {
            self.apply_user(now, id, &key, view, max_devices);
        }
    }

    /// Re-reads one user from the table (added, limit or settings changed, counters reset, or
    /// reloaded).
    fn refresh_user(&mut self, now: Instant, id: UserId) {
        let entry = {
            let table = crate::users::persist::lock_users(&self.users);
            table
                .get(id)
                .map(|u| (u.key.clone(), TableView::of(u), u.settings.max_devices))
        };
        match entry {
            Some((key, view, max_devices)) => self.apply_user(now, id, &key, view, max_devices),
            None => self.remove_user(now, id),
        }
    }

    fn apply_user(
        &mut self,
        now: Instant,
        id: UserId,
        key: &str,
        view: TableView,
        max_devices: Option<u32>,
    ) {
        let verdict = self.ledger.apply_table(id, view, now_unix_ms());
        let state = match self.ledger.refusal(id) {
            None => UserState::Active,
            Some(reason) => UserState::Refused(reason),
        };
        if let Err(e) = self.endpoint.set_user(id, key, state) {
            log::warn!(
                "user {}: key {} not usable by the tunnel: {e:?}",
                id.0,
                keys::mask(key)
            );
            self.ledger.remove(id);
            return;
        }
        self.endpoint.set_max_devices(id, max_devices);
        if let Some(v) = verdict {
            self.carry_out(now, id, v);
        }
    }

    fn remove_user(&mut self, now: Instant, id: UserId) {
        self.endpoint.remove_user(now, id);
        self.ledger.remove(id);
    }

    /// Carries out a ledger verdict on the user's handshakes, streams and sessions.
    fn carry_out(&mut self, now: Instant, user: UserId, verdict: Verdict) {
        match verdict {
            Verdict::Readmit => {
                log::info!("user {}: may connect again", user.0);
                self.endpoint.set_user_state(user, UserState::Active);
            }
            Verdict::Refuse => {
                log::info!(
                    "user {}: traffic limit reached; closing its sessions once delivered",
                    user.0
                );
                self.endpoint
                    .set_user_state(user, UserState::Refused(RefuseReason::QuotaExceeded));
                // Make the API show the final numbers at once.
                self.sync_accounting(now);
                self.close_drained(now);
            }
            Verdict::Close(block) => {
                log::info!(
                    "user {}: {}; closing its sessions",
                    user.0,
                    block.describe()
                );
                self.endpoint
                    .refuse_user(now, user, block.refuse_reason(), block.close_reason());
            }
        }
    }

    fn run(mut self) {
        let mut events = driver::core::events();
        let mut relay_events = Vec::new();
        loop {
            let now = Instant::now();
            let deadline = self.next_deadline(now);
            if let Err(e) = self.core.wait(&mut events, now, deadline) {
                log::error!("tunnel loop: poll failed: {e}");
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                let (readable, writable) = (event.is_readable(), event.is_writable());
                let registry = self.core.poll.registry();
                match Tok::decode(event.token()) {
                    Some(Tok::Udp(i)) => self.udp.on_event(i, readable, writable, registry),
                    Some(Tok::Relay { index, v6 }) => self.relays.mark_readable(index, v6),
                    Some(Tok::Outbound(idx)) => {
                        self.on_outbound_event(now, idx, readable, writable)
                    }
                    Some(Tok::TcpListen(i)) => {
                        let (carriers, mut io) = self.carrier_io(now);
                        carriers.accept(&mut io, i);
                    }
                    Some(Tok::Carrier(idx)) => {
                        let (carriers, mut io) = self.carrier_io(now);
                        carriers.on_conn_event(&mut io, idx, readable, writable);
                    }
                    Some(Tok::Fallback(idx)) => {
                        let (carriers, mut io) = self.carrier_io(now);
                        carriers.on_fallback_event(&mut io, idx, readable, writable);
                    }
                    _ => {}
                }
            }
            {
                let (carriers, mut io) = self.carrier_io(now);
                carriers.service_busy(&mut io);
                carriers.expire(&mut io);
            }
            self.relays.take_readable(&mut relay_events);
            for (index, v6) in relay_events.drain(..) {
                self.on_relay_readable(now, index, v6);
            }
            self.drain_control(now);
            self.drain_resolver(now);
            self.receive_datagrams(now);
            self.endpoint.handle_timeout(now);
            self.process_endpoint_events(now);
            self.expire_outbound(now);
            self.expire_lookups(now);
            self.charge_carrier_memory();
            self.release_held(now);
            if now >= self.next_idle_sweep {
                self.next_idle_sweep = now + IDLE_SWEEP;
                self.reset_idle_streams(now);
                self.endpoint.compact(now);
                self.heap_trim.tick(now);
            }
            self.close_drained(now);
            self.relays.expire(now, &self.core.poll);
            if self.ledger.sync_due(now) {
                self.sync_accounting(now);
                self.publish_stats();
            }
            for (user, v) in self.ledger.expire_due(now_unix_ms()) {
                self.carry_out(now, user, v);
            }
            if let Some(record) = &mut self.hello_record {
                record.tick(now, &self.endpoint);
            }
            self.flush_transmits(now);
            self.flush_carriers(now);
            self.process_endpoint_events(now);
            self.flush_carriers(now);
            if let Some(deadline) = self.shutting_down {
                if self.endpoint.session_count() == 0 || now >= deadline {
                    break;
                }
            }
        }
        let now = Instant::now();
        self.flush_transmits(now);
        self.flush_carriers(now);
        self.sync_accounting(now);
        self.publish_stats();
        let sessions: Vec<(SessionId, UserId)> =
            self.sessions.iter().map(|(s, i)| (*s, i.user)).collect();
        if !sessions.is_empty() {
            let mut table = crate::users::persist::lock_users(&self.users);
            for (_, user) in sessions {
                table.session_closed(user);
            }
        }
        self.resolver.shutdown();
        if let Some(record) = self.hello_record.take() {
            record.finish(&self.endpoint);
        }
        let io = self.udp.counts();
        log::info!(
            "tunnel loop stopped (udp: {} datagrams sent in {} calls, {} received in {} calls)",
            io.datagrams_sent,
            io.send_calls,
            io.datagrams_received,
            io.recv_calls
        );
    }

    /// When the loop must wake up at the latest (`now`: sockets still hold datagrams).
    fn next_deadline(&mut self, now: Instant) -> Option<Instant> {
        if self.udp.any_readable() || self.relays.any_readable() || self.carriers.has_work() {
            return Some(now);
        }
        let mut at = self.ledger.next_deadline(now, now_unix_ms());
        if let Some(t) = self.endpoint.poll_timeout() {
            at = at.min(t);
        }
        if let Some(t) = self.out.connect_timeouts.next_deadline() {
            at = at.min(t);
        }
        if let Some(t) = self.out.lookup_timeouts.next_deadline() {
            at = at.min(t);
        }
        if let Some(t) = self.relays.next_expiry() {
            at = at.min(t);
        }
        if let Some(t) = self.carriers.next_deadline() {
            at = at.min(t);
        }
        if !self.out.table.is_empty() {
            at = at.min(self.next_idle_sweep);
        }
        if let Some(d) = self.shutting_down {
            at = at.min(d);
        }
        if let Some(record) = &self.hello_record {
            at = at.min(record.next_deadline());
        }
        Some(at)
    }

    /// Applies control messages.
    fn drain_control(&mut self, now: Instant) {
        while let Ok(msg) = self.control_rx.try_recv() {
            match msg {
                ControlMsg::UserAdded(id) | ControlMsg::UserChanged(id) => {
                    self.refresh_user(now, id)
                }
                ControlMsg::UserRemoved(id) => {
                    log::info!("user {}: deleted; closing its sessions", id.0);
                    self.remove_user(now, id);
                }
                ControlMsg::Kick(id, reply) => reply.send(self.kick(now, id)),
                // New connections and datagrams are judged by the new value; open ones stay.
                ControlMsg::AllowPrivateDestinations(allow) => self.guard.set_allow_private(allow),
                ControlMsg::ApiBound(addr) => self.guard.protect_api(addr),
                // Strangers decided from now on go there; running splices stay.
                ControlMsg::Fallback(target) => self.carriers.set_fallback(target),
                ControlMsg::Shutdown => self.begin_shutdown(now),
                ControlMsg::Exclude(_) => {} // a client setting
            }
        }
    }

    /// Closes every session of a user with `Normal` (the client reconnects at once; its key
    /// stays valid); returns how many there were.
    fn kick(&mut self, now: Instant, id: UserId) -> u32 {
        let n = self.endpoint.user_session_count(id);
        self.endpoint.close_user(now, id, CloseReason::Normal);
        log::info!("user {}: kicked; closing {n} sessions", id.0);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Tells every client the server is going away; the loop ends once they are closed (or
    /// after [`SHUTDOWN_DRAIN`]).
    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutting_down.is_some() {
            return;
        }
        log::info!(
            "tunnel: telling {} sessions the server is going away",
            self.sessions.len()
        );
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for sid in ids {
            self.endpoint.close_session(now, sid, CloseReason::Shutdown);
        }
        self.shutting_down = Some(now + SHUTDOWN_DRAIN);
    }

    fn receive_datagrams(&mut self, now: Instant) {
        let unix = unix_now();
        for i in 0..self.udp.len() {
            let endpoint = &mut self.endpoint;
            let local = SocketIndex(i as u32);
            let read = self.udp.receive(i, &mut self.buf, |d, from| {
                endpoint.handle_datagram(now, unix, local, from, d);
            });
            if !read {
                continue;
            }
            self.process_endpoint_events(now);
            self.flush_transmits(now);
        }
    }

    fn flush_transmits(&mut self, now: Instant) {
        let registry = self.core.poll.registry();
        self.udp.retry_blocked(registry);
        if self.udp.is_blocked() {
            return;
        }
        let max_segments = self.udp.max_segments();
        let buf = &mut self.buf[..MAX_BATCH_BYTES];
        while let Some(t) = self.endpoint.poll_transmit_batch(now, buf, max_segments) {
            let data = &buf[..t.len];
            let local = t.local.0 as usize;
            if self.udp.send(registry, local, data, t.segment, t.to) == SendOutcome::Blocked {
                return;
            }
        }
    }

    fn process_endpoint_events(&mut self, now: Instant) {
        while let Some(ev) = self.endpoint.poll_event() {
            match ev {
                EndpointEvent::SessionEstablished {
                    session,
                    user,
                    peer,
                } => {
                    log::debug!(
                        "session {} of user {} established from {peer}",
                        session.0,
                        user.0
                    );
                    self.sessions.insert(
                        session,
                        SessionInfo {
                            user,
                            ip: peer.ip(),
                            outbound: Vec::new(),
                        },
                    );
                    if self.endpoint.is_carrier_session(session) {
                        let held = self.carriers.session_memory(session);
                        self.quotas.carrier_session(user, session, held);
                    }
                    let mut table = crate::users::persist::lock_users(&self.users);
                    table.session_opened(user, unix_now());
                    table.device_opened(user, peer.ip(), unix_now());
                }
                EndpointEvent::SessionClosed {
                    session,
                    user,
                    reason,
                } => {
                    log::debug!(
                        "session {} of user {} closed: {reason:?}",
                        session.0,
                        user.0
                    );
                    if let Some(info) = self.sessions.remove(&session) {
                        for idx in info.outbound {
                            self.drop_outbound(idx);
                        }
                        self.quotas.session_closed(info.user, session);
                        let mut table = crate::users::persist::lock_users(&self.users);
                        table.session_closed(info.user);
                        table.device_closed(info.user, info.ip, unix_now());
                    }
                    self.relays.close_session(session, &self.core.poll);
                    let (carriers, mut io) = self.carrier_io(now);
                    carriers.session_closed(&mut io, session);
                }
                EndpointEvent::PeerMigrated { session, peer } => {
                    log::debug!("session {} moved to {peer}", session.0);
                    self.session_moved(session, peer.ip());
                }
                EndpointEvent::Refused { user, reason } => {
                    log::debug!("user {}: handshake refused ({reason:?})", user.0);
                    self.stats.refusal(reason);
                }
                EndpointEvent::Transport { session, event } => {
                    self.on_transport_event(now, session, event)
                }
            }
        }
    }

    /// A session's client address changed: its user's recent IPs count the new one (a move
    /// between ports of one address changes nothing).
    fn session_moved(&mut self, session: SessionId, ip: IpAddr) {
        let Some(info) = self.sessions.get_mut(&session) else {
            return;
        };
        if info.ip == ip {
            return;
        }
        let (user, old) = (info.user, std::mem::replace(&mut info.ip, ip));
        let now = unix_now();
        let mut table = crate::users::persist::lock_users(&self.users);
        table.device_closed(user, old, now);
        table.device_opened(user, ip, now);
    }

    fn on_transport_event(&mut self, now: Instant, session: SessionId, event: TransportEvent) {
        match event {
            TransportEvent::StreamOpened { id, dest } => self.open_outbound(now, session, id, dest),
            TransportEvent::StreamReadable { id }
            | TransportEvent::StreamWritable { id }
            | TransportEvent::StreamFinished { id } => {
                if let Some(&idx) = self.out.by_stream.get(&(session, id)) {
                    self.pump(now, idx);
                }
            }
            TransportEvent::StreamReset { id, .. } => {
                if let Some(&idx) = self.out.by_stream.get(&(session, id)) {
                    self.remove_outbound(idx);
                }
            }
            TransportEvent::Datagram { assoc, dest, data } => {
                self.relay_out(now, session, assoc, dest, &data)
            }
            TransportEvent::StreamOpenResult { .. } | TransportEvent::StreamsAvailable => {}
            TransportEvent::Closed { .. } => {}
        }
    }

    fn answer(&mut self, session: SessionId, stream: StreamId, result: OpenResult) {
        if let Some(s) = self.endpoint.session_mut(session) {
            if let Err(e) = s.transport_mut().answer_open(stream, result) {
                log::debug!("stream {stream:?}: cannot answer the open ({result:?}): {e:?}");
            }
        }
    }

    fn open_outbound(
        &mut self,
        now: Instant,
        session: SessionId,
        stream: StreamId,
        dest: Destination,
    ) {
        let Some(info) = self.sessions.get(&session) else {
            self.answer(session, stream, OpenResult::NotAllowed);
            return;
        };
        let user = info.user;
        if !self.ledger.admits(user) {
            self.answer(session, stream, OpenResult::NotAllowed);
            return;
        }
        if let Err(cap) = self.quotas.admit_stream(user) {
            log::debug!("user {}: stream refused ({cap:?})", user.0);
            self.answer(session, stream, OpenResult::NotAllowed);
            return;
        }
        let ticket = self
            .out
            .tickets
            .issue(TicketKind::Outbound, self.out.table.next_index());
        let out = Outbound {
            session,
            user,
            stream,
            ticket,
            held: false,
            state: OutState::Resolving,
            sock: None,
            pipe: Pipe::new(stream, &[]).with_read_ahead(READ_AHEAD),
            candidates: Vec::new(),
            next_candidate: 0,
            last_error: OpenResult::Unreachable,
            last_progress: now,
        };
        let idx = self.out.table.insert(out);
        debug_assert_eq!(idx, ticket.index);
        self.stats.streams_opened += 1;
        self.out.connect_timeouts.push_new(ticket, now);
        self.out.by_stream.insert((session, stream), idx);
        if let Some(info) = self.sessions.get_mut(&session) {
            info.outbound.push(idx);
        }
        match dest {
            Destination::Addr(a) => self.resolved(now, idx, Ok(vec![a])),
            Destination::Domain { name, port } => self.submit_lookup(now, idx, user, name, port),
        }
    }

    /// Sends outbound `idx`'s name to the resolver pool within `user`'s share of it.
    fn submit_lookup(&mut self, now: Instant, idx: usize, user: UserId, name: String, port: u16) {
        let Some(ticket) = self.out.table.get(idx).map(|o| o.ticket) else {
            return;
        };
        if let Some(ip) = super::resolver::ip_literal(&name) {
            self.resolved(now, idx, Ok(vec![SocketAddr::new(ip, port)]));
            return;
        }
        let (quotas, resolver) = (&mut self.quotas, &self.resolver);
        match self
            .out
            .submit_lookup(quotas, resolver, now, user, ticket, &name, port)
        {
            Some(Lookup::Pending) => {}
            Some(Lookup::Ready(addr)) => self.resolved(now, idx, Ok(vec![addr])),
            None => self.fail_outbound(idx, OpenResult::DnsFailure),
        }
    }

    /// Fails outbounds whose lookup is still unanswered after the lookup timeout; the name is
    /// cached as failed. Their share of the pool comes back only with the answer.
    fn expire_lookups(&mut self, now: Instant) {
        while let Some(ticket) = self.out.lookup_timeouts.pop_expired(now) {
            let Some((_, name)) = self.out.lookups.get(&ticket) else {
                continue; // answered already
            };
            self.quotas.name_failed(now, name);
            if ticket.kind == TicketKind::Relay {
                self.relays.forget_lookup(ticket);
                continue;
            }
            let idx = ticket.index;
            let resolving = self
                .out
                .table
                .get(idx)
                .is_some_and(|o| o.ticket == ticket && matches!(o.state, OutState::Resolving));
            if resolving {
                self.fail_outbound(idx, OpenResult::DnsFailure);
            }
        }
    }

    fn drain_resolver(&mut self, now: Instant) {
        while let Some(Resolved { ticket, result }) = self.resolver.try_recv() {
            if let Some((user, name)) = self.out.lookups.remove(&ticket) {
                self.quotas.lookup_finished(user);
                if result.is_err() {
                    self.quotas.name_failed(now, &name);
                }
            }
            match ticket.kind {
                TicketKind::Direct => {} // a client lookup
                TicketKind::Relay => {
                    let addrs = result.unwrap_or_default();
                    let poll = &self.core.poll;
                    self.relays
                        .resolved(ticket, &addrs, &mut self.guard, now, poll);
                }
                TicketKind::Outbound => {
                    let idx = ticket.index;
                    let mine = self.out.table.get(idx).is_some_and(|o| {
                        o.ticket == ticket && matches!(o.state, OutState::Resolving)
                    });
                    if mine {
                        self.resolved(now, idx, result.map_err(|_| ()));
                    }
                }
                TicketKind::ServerName => {}
            }
        }
    }

    fn resolved(&mut self, now: Instant, idx: usize, result: Result<Vec<SocketAddr>, ()>) {
        let Ok(addrs) = result else {
            self.fail_outbound(idx, OpenResult::DnsFailure);
            return;
        };
        match self.guard.filter(&addrs, now) {
            Ok(allowed) => {
                if let Some(o) = self.out.table.get_mut(idx) {
                    o.candidates = allowed;
                    o.next_candidate = 0;
                }
                self.connect_next(now, idx);
            }
            Err(reason) => {
                log::debug!("destination refused by the guard: {reason:?}");
                self.stats.destinations_refused += 1;
                self.fail_outbound(idx, OpenResult::NotAllowed);
            }
        }
    }

    /// Connects outbound `idx` to its next allowed address (failing the open when none is left).
    /// A connect that completes at once (loopback, and often a LAN) is taken up right away:
    /// the open is answered and the stream's early bytes go out in this loop iteration instead
    /// of after the next `epoll_wait`.
    fn connect_next(&mut self, now: Instant, idx: usize) {
        loop {
            let Some(o) = self.out.table.get_mut(idx) else {
                return;
            };
            let Some(addr) = o.candidates.get(o.next_candidate).copied() else {
                let err = o.last_error;
                self.fail_outbound(idx, err);
                return;
            };
            o.next_candidate += 1;
            match TcpStream::connect(addr) {
                Ok(mut sock) => {
                    let token = Tok::Outbound(idx).token();
                    if let Err(e) = self.core.poll.registry().register(
                        &mut sock,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register an outbound socket: {e}");
                        o.last_error = OpenResult::Unreachable;
                        continue;
                    }
                    o.sock = Some(sock);
                    o.state = OutState::Connecting;
                    // Nothing consumed a readiness edge yet: data that arrived since the
                    // registration is reported by the next poll.
                    self.finish_connect(now, idx, false);
                    return;
                }
                Err(e) => {
                    o.last_error = open_result_for_io(&e);
                }
            }
        }
    }

    fn on_outbound_event(&mut self, now: Instant, idx: usize, readable: bool, writable: bool) {
        let Some(o) = self.out.table.get_mut(idx) else {
            return;
        };
        match o.state {
            OutState::Resolving => {}
            OutState::Connecting => {
                if writable || readable {
                    self.finish_connect(now, idx, readable);
                }
            }
            OutState::Open => {
                if readable {
                    o.pipe.sock_readable = true;
                }
                if writable {
                    o.pipe.sock_writable = true;
                }
                self.pump(now, idx);
            }
        }
    }

    /// Takes up outbound `idx`'s connect if it has completed: answers the open and starts the
    /// pipe, or tries the next address after a failure. Still in progress: waits for the
    /// socket's next event. `readable`: the event that got here said the socket has data (a
    /// just-connected socket is not read before its registration reports data: that read
    /// would find nothing on the first-byte path, after reserving a whole read in the stream).
    fn finish_connect(&mut self, now: Instant, idx: usize, readable: bool) {
        let Some(o) = self.out.table.get_mut(idx) else {
            return;
        };
        if !matches!(o.state, OutState::Connecting) {
            return;
        }
        let Some(sock) = o.sock.as_mut() else { return };
        match connect_state(sock) {
            ConnectState::InProgress => {}
            ConnectState::Connected => {
                let _ = sock.set_nodelay(true);
                o.state = OutState::Open;
                o.pipe.sock_readable = readable;
                let (session, stream) = (o.session, o.stream);
                self.answer(session, stream, OpenResult::Ok);
                self.pump(now, idx);
            }
            ConnectState::Failed(e) => {
                o.last_error = open_result_for_io(&e);
                if let Some(mut s) = o.sock.take() {
                    let _ = self.core.poll.registry().deregister(&mut s);
                }
                self.connect_next(now, idx);
            }
        }
    }

    /// Moves bytes between an open outbound socket and its stream, charging the user.
    fn pump(&mut self, now: Instant, idx: usize) {
        let Some(o) = self.out.table.get_mut(idx) else {
            return;
        };
        if !matches!(o.state, OutState::Open) {
            return;
        }
        let Some(sock) = o.sock.as_mut() else { return };
        let Some(session) = self.endpoint.session_mut(o.session) else {
            self.remove_outbound(idx);
            return;
        };
        let mut allowance = self.ledger.allowance(o.user);
        let user = o.user;
        o.pipe.read_limit = self.quotas.buffer_room(user);
        let pipe_bytes = o.pipe.buffer_bytes();
        let result = o.pipe.pump(sock, session.transport_mut(), &mut allowance);
        let (moved, end) = match result {
            Ok(m) => (m, None),
            Err((end, m)) => (m, Some(end)),
        };
        if moved != Moved::default() {
            o.last_progress = now;
        }
        let grew = o.pipe.buffer_bytes() - pipe_bytes;
        if grew > 0 {
            self.quotas.pipe_grew(user, grew);
        }
        let buffered = session.transport().send_memory();
        self.quotas.set_session_buffered(user, o.session, buffered);
        if end.is_none() && o.pipe.read_hold().is_some() && !o.held {
            o.held = true;
            self.out.held.push(o.ticket);
        }
        let verdict = self.ledger.charge(now, user, moved);
        match end {
            None => {}
            Some(PipeEnd::Done) | Some(PipeEnd::StreamGone) => self.remove_outbound(idx),
            Some(PipeEnd::SocketError) => {
                if let Some(o) = self.out.table.get(idx) {
                    let (sid, stream) = (o.session, o.stream);
                    if let Some(s) = self.endpoint.session_mut(sid) {
                        let _ = s
                            .transport_mut()
                            .stream_reset(stream, ResetReason::ConnectionReset);
                    }
                }
                self.remove_outbound(idx);
            }
        }
        if let Some(v) = verdict {
            self.carry_out(now, user, v);
        }
    }

    /// Closes the sessions of limited users whose sent data is all acknowledged (or whose drain
    /// time is over).
    fn close_drained(&mut self, now: Instant) {
        let (sessions, endpoint) = (&self.sessions, &self.endpoint);
        let done = self.ledger.finish_drains(now, |user| {
            sessions
                .iter()
                .filter(|(_, info)| info.user == user)
                .all(|(sid, _)| {
                    endpoint.session(*sid).is_none_or(|s| {
                        let st = s.transport().stats();
                        st.send_buffered == 0 && st.bytes_in_flight == 0
                    })
                })
        });
        for user in done {
            self.endpoint.refuse_user(
                now,
                user,
                RefuseReason::QuotaExceeded,
                CloseReason::LimitReached,
            );
        }
    }

    fn fail_outbound(&mut self, idx: usize, result: OpenResult) {
        if let Some(o) = self.out.table.get(idx) {
            let (session, stream) = (o.session, o.stream);
            self.answer(session, stream, result);
        }
        self.remove_outbound(idx);
    }

    /// Fails outbounds still resolving or connecting [`CONNECT_TIMEOUT`] after their open
    /// (entries of outbounds since opened or gone are skipped).
    fn expire_outbound(&mut self, now: Instant) {
        while let Some(ticket) = self.out.connect_timeouts.pop_expired(now) {
            let idx = ticket.index;
            let pending = self
                .out
                .table
                .get(idx)
                .is_some_and(|o| o.ticket == ticket && !matches!(o.state, OutState::Open));
            if pending {
                self.fail_outbound(idx, OpenResult::Timeout);
            }
        }
    }

    /// Pumps again the held outbounds whose hold is lifted: their user has room again (the tunnel
    /// delivered some of what it held) or their session's unsent bytes fell below the read-ahead
    /// bound (it sent them). Those still held keep their turn ahead of those pumped now (which
    /// queue again behind them if held again), so reads rotate over a session's streams.
    fn release_held(&mut self, now: Instant) {
        if self.out.held.is_empty() {
            return;
        }
        let mut pass = std::mem::take(&mut self.out.held_pass);
        pass.refreshed.clear();
        let mut held = std::mem::take(&mut self.out.held);
        for ticket in held.drain(..) {
            let Some(o) = self.out.table.get_mut(ticket.index) else {
                continue;
            };
            if o.ticket != ticket || !o.held {
                continue; // gone (its slot reused), or no longer held
            }
            o.held = false;
            let (user, session, hold) = (o.user, o.session, o.pipe.read_hold());
            let ready = match hold {
                None => continue, // pumped since: reading until the socket ran dry
                Some(ReadHold::Share) => self.share_has_room(&mut pass, user),
                Some(ReadHold::SendAhead) => self.session_may_read(session),
            };
            if ready {
                self.pump(now, ticket.index); // holds it again if the hold returned
            } else if let Some(o) = self.out.table.get_mut(ticket.index) {
                o.held = true;
                pass.waiting.push(ticket);
            }
        }
        // Those still waiting first, then those pumped in this pass and held again.
        held.append(&mut pass.waiting);
        held.append(&mut self.out.held);
        self.out.held = held;
        self.out.held_pass = pass;
    }

    /// Whether `user`'s share has room worth a socket read (refreshed from its sessions' send
    /// buffers once per pass): pumping for a few bytes at a time would spin through every held
    /// stream on each wake-up.
    fn share_has_room(&mut self, pass: &mut HeldPass, user: UserId) -> bool {
        if pass.refreshed.insert(user) {
            let sessions: Vec<SessionId> = self.quotas.sessions_of(user).collect();
            for sid in sessions {
                if let Some(s) = self.endpoint.session(sid) {
                    let buffered = s.transport().send_memory();
                    self.quotas.set_session_buffered(user, sid, buffered);
                }
            }
        }
        self.quotas.buffer_room(user) >= PIPE_BUF
    }

    /// Whether `session`'s pipes may read again (`Transport::unsent` is a counter: asking for
    /// each held stream costs no more than remembering the answer per session). A session gone:
    /// yes, the pump drops the outbound.
    fn session_may_read(&self, session: SessionId) -> bool {
        self.endpoint
            .session(session)
            .is_none_or(|s| READ_AHEAD.allows(s.transport()))
    }

    /// Resets open streams that moved nothing for the idle timeout (the half-closed timeout once
    /// one side finished): a stalled or abandoned stream does not hold its fd and buffers forever.
    fn reset_idle_streams(&mut self, now: Instant) {
        let quotas = &self.quotas;
        let idle: Vec<usize> = self
            .out
            .table
            .iter()
            .filter(|(_, o)| {
                matches!(o.state, OutState::Open)
                    && quotas.idle_expired(now, o.last_progress, o.pipe.is_half_closed())
            })
            .map(|(idx, _)| idx)
            .collect();
        for idx in idle {
            if let Some(o) = self.out.table.get(idx) {
                log::debug!("user {}: stream {:?} idle; reset", o.user.0, o.stream);
                let (sid, stream) = (o.session, o.stream);
                if let Some(s) = self.endpoint.session_mut(sid) {
                    let _ = s.transport_mut().stream_reset(stream, ResetReason::Timeout);
                }
            }
            self.remove_outbound(idx);
        }
    }

    /// Closes the socket and forgets the outbound (the stream is left to the caller).
    fn drop_outbound(&mut self, idx: usize) {
        if let Some(mut o) = self.out.table.remove(idx) {
            self.quotas.stream_closed(o.user, o.pipe.buffer_bytes());
            if let Some(mut s) = o.sock.take() {
                let _ = self.core.poll.registry().deregister(&mut s);
                if !o.pipe.is_done() {
                    // Cut short: the destination must see a reset, not a clean end of data.
                    crate::sys::reset_on_close(&s);
                }
            }
            self.out.by_stream.remove(&(o.session, o.stream));
        }
    }

    fn remove_outbound(&mut self, idx: usize) {
        let Some(o) = self.out.table.get(idx) else {
            return;
        };
        let session = o.session;
        if let Some(info) = self.sessions.get_mut(&session) {
            info.outbound.retain(|i| *i != idx);
        }
        self.drop_outbound(idx);
    }

    // ----- UDP relay (SOCKS5 UDP ASSOCIATE) -----

    fn relay_out(
        &mut self,
        now: Instant,
        session: SessionId,
        assoc: AssocId,
        dest: Destination,
        data: &[u8],
    ) {
        let Some(info) = self.sessions.get(&session) else {
            return;
        };
        let user = info.user;
        if !self.ledger.allows(user, data.len()) {
            return;
        }
        // Relay lookups use the same per-user share of the resolver pool as stream lookups.
        let (out, quotas, resolver) = (&mut self.out, &mut self.quotas, &self.resolver);
        let mut lookup = |ticket: Ticket, name: &str, port: u16| {
            out.submit_lookup(quotas, resolver, now, user, ticket, name, port)
        };
        let (guard, poll) = (&mut self.guard, &self.core.poll);
        let sent = self
            .relays
            .send(now, session, assoc, &dest, data, guard, poll, &mut lookup);
        if sent {
            let moved = Moved {
                to_socket: data.len() as u64,
                to_stream: 0,
            };
            if let Some(v) = self.ledger.charge(now, user, moved) {
                self.carry_out(now, user, v);
            }
        }
    }

    /// Carries answers waiting on relay socket `index`/`v6` back into the sessions.
    fn on_relay_readable(&mut self, now: Instant, index: usize, v6: bool) {
        let mut inbound = Vec::new();
        self.relays
            .receive(index, v6, |session, assoc, dest, data| {
                inbound.push((session, assoc, dest, data.to_vec()));
            });
        for (session, assoc, dest, data) in inbound {
            let Some(info) = self.sessions.get(&session) else {
                continue;
            };
            let user = info.user;
            if !self.ledger.allows(user, data.len()) {
                continue;
            }
            let Some(s) = self.endpoint.session_mut(session) else {
                continue;
            };
            if s.transport_mut().send_datagram(assoc, dest, &data).is_ok() {
                let moved = Moved {
                    to_socket: 0,
                    to_stream: data.len() as u64,
                };
                if let Some(v) = self.ledger.charge(now, user, moved) {
                    self.carry_out(now, user, v);
                }
            }
        }
    }

    // ----- accounting -----

    /// Copies the counters and gauges into the shared copy `GET /metrics` reads (one brief
    /// lock, once per second with the ledger sync: a scrape is at most about 1 s behind).
    fn publish_stats(&mut self) {
        self.stats.endpoint = self.endpoint.stats();
        self.stats.sessions = self.endpoint.session_count() as u64;
        self.stats.streams_active = self.out.table.len() as u64;
        self.stats.datagram_destinations_refused = self.relays.refused();
        self.stats.loop_wakeups = self.core.wakeups();
        self.carriers.gauges(&mut self.stats.tcp);
        self.stats.published_unix = unix_now();
        *lock_stats(&self.published) = self.stats;
    }

    /// Adds the ledger's unsynced traffic to the table and carries out what changed.
    fn sync_accounting(&mut self, now: Instant) {
        let users = &self.users;
        let verdicts = self.ledger.sync(now, now_unix_ms(), || {
            crate::users::persist::lock_users(users)
        });
        for (user, v) in verdicts {
            self.carry_out(now, user, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `connect_state` until the connect is decided (bounded), like the loop's first look
    /// right after `connect` followed by socket events.
    fn decided(sock: &TcpStream) -> ConnectState {
        let t = Instant::now();
        loop {
            match connect_state(sock) {
                ConnectState::InProgress if t.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                state => return state,
            }
        }
    }

    #[test]
    fn connect_state_tells_connected_refused_and_in_progress_apart() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sock = TcpStream::connect(addr).unwrap();
        assert!(matches!(decided(&sock), ConnectState::Connected));
        // A closed port: refused (reported once, as the open's result).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let sock = TcpStream::connect(closed_addr).unwrap();
        match decided(&sock) {
            ConnectState::Failed(e) => {
                assert_eq!(open_result_for_io(&e), OpenResult::Refused, "{e}")
            }
            other => panic!("a closed port gave {other:?}"),
        }
        // A listener whose accept queue is full drops SYNs: the connect stays in progress.
        let mut held = Vec::new();
        while let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            held.push(s);
            assert!(held.len() < 10_000, "the accept queue never filled");
        }
        let sock = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(connect_state(&sock), ConnectState::InProgress));
    }

    fn server_config(extra: &str) -> ServerConfig {
        let text = format!(
            r#"{{"mode": "server", "listen": "127.0.0.1:9000", "access_keys": []{extra}}}"#
        );
        let crate::config::Config::Server(cfg) =
            crate::config::parse(std::path::Path::new("config.json"), &text).unwrap()
        else {
            panic!("expected a server config");
        };
        cfg
    }

    #[test]
    fn tcp_connections_count_in_the_fd_budget() {
        let nofile = 4000;
        let udp = server_config(r#", "max_streams": 100000"#);
        let tcp = server_config(
            r#", "max_streams": 100000, "listen_tcp": "127.0.0.1:9000", "max_sessions": 300,
            "max_unauthenticated_tcp": 100"#,
        );
        let (udp_quotas, udp_fds) = quotas_for(&udp, nofile);
        assert_eq!(udp_fds.tcp, 0, "no listen_tcp, no TCP connections");
        let (tcp_quotas, tcp_fds) = quotas_for(&tcp, nofile);
        assert_eq!(tcp_fds.tcp, 300 + 3 * 100);
        let fixed = 2 + FIXED_FDS;
        let budget = (nofile - 256 - fixed) as usize;
        assert!(
            tcp_quotas.limits().max_streams + tcp_fds.relays + tcp_fds.tcp <= budget,
            "streams, relays and TCP connections within the budget"
        );
        assert!(tcp_quotas.limits().max_streams < udp_quotas.limits().max_streams);
    }

    #[test]
    fn handshake_limits_of_the_config_reach_the_endpoint() {
        let cfg = server_config(
            r#", "handshake_rate": 50, "handshake_burst": 60,
            "handshake_rate_per_user": 5, "handshake_burst_per_user": 8"#,
        );
        let e = LoopOptions::from_config(&cfg).endpoint;
        assert_eq!(
            (
                e.handshake_rate,
                e.handshake_burst,
                e.handshake_rate_per_user,
                e.handshake_burst_per_user
            ),
            (50, 60, 5, 8)
        );
    }
}
