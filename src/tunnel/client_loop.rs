//! The client's data plane: one mio event loop thread that owns the local proxy port (SOCKS5 and
//! HTTP on one port), every local connection, the SOCKS5 UDP ASSOCIATE sockets and the tunnel
//! sessions' UDP sockets, and drives the protocol core ([`ClientSession`]).
//!
//! - Sessions: `mux.sessions` slots, each connecting on its own UDP socket; on silence, refusal
//!   or close a slot reconnects with exponential backoff and jitter (a refusal waits at least the
//!   server's `retry_after`). Streams go to the connected slot with the fewest streams.
//! - Requests that arrive while no session is up wait (bounded time) for one, and pull the next
//!   reconnect attempt forward (at most one attempt per
//!   [`DEMAND_RETRY_GAP`](super::supervisor::DEMAND_RETRY_GAP) per slot), so that a raised limit
//!   or a restarted server is noticed on the next request instead of after the backoff. A refusal
//!   for the key itself (limit reached, disabled, expired) fails the waiting requests at once
//!   with "not allowed" instead of letting them wait.
//! - A connected session that has had unacknowledged data out for
//!   [`DEAD_AFTER`](super::supervisor::DEAD_AFTER) while hearing nothing from the server for as
//!   long is presumed dead (the server crashed or restarted and silently drops packets of
//!   sessions it does not know) and is replaced, instead of waiting for the transport's idle
//!   timeout.
//! - A stream's proxy reply (SOCKS5 / HTTP CONNECT success) is always the first byte the
//!   application gets: until the server answers the open, only application → stream moves.
//!   The success reply waits for that answer unless the destination opened recently
//!   ([`EarlyReply`]); an early-answered open that fails resets the connection.
//! - Every failure produces a log line a user understands.
//! - Carriers (`transport.mode`): a slot's session runs over its own UDP socket or over one TCP
//!   connection (the TCP carrier, [`CarrierLink`]); everything above the session is the same.
//!   In `auto` the carrier of new sessions is [`CarrierChoice`]'s: on a move to TCP, UDP
//!   handshakes in progress restart over TCP; on the move back (a UDP probe was answered), TCP
//!   sessions retire, make-before-break: a TCP session with streams hands its place to a spare
//!   slot that connects over UDP beside it, takes no new streams once another session is up
//!   and is closed when its last stream ends (however long that stream lives); one without
//!   streams is replaced at once. If the server refuses the second session (session or device
//!   limit of the key), the move is break-before-make instead, with no failure counted.
//! - Capture modes hand over connections and UDP flows that were not addressed to a proxy: TUN
//!   mode (`client_loop/tun_mode.rs`) and router mode (`client_loop/redir.rs`, nftables `redirect` + TPROXY);
//!   both become local connections without a request (`admit_captured`) and flow datagrams
//!   (`send_flow_datagram`).
//!
//! The timing decisions (backoff, refusal retries, liveness, demand retries, request and open
//! timeouts) are [`super::supervisor`]'s, the choice of carrier [`super::carrier_choice`]'s;
//! this loop moves bytes and acts on them.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::{TcpListener, TcpStream, UdpSocket};

use super::carrier_choice::{self, Action, Carrier, CarrierChoice, Loss, Switch};
use super::carrier_link::CarrierLink;
use super::driver::core::{self, LoopCore, LoopThread};
use super::driver::ticket::{Ticket, TicketIssuer, TicketKind};
use super::driver::timeouts::TimeoutQueue;
use super::driver::token::Tok;
use super::driver::udp::{
    self, IoCounts, MAX_BATCH_BYTES, RECV_BATCH, SESSION_RECV_BATCH, SendOutcome, UdpOffload, UdpTx,
};
use super::early_reply::EarlyReply;
use super::pipe::{Pipe, PipeEnd, ReadHold};
use super::proxy_front::{self, FrontProtocol, Progress, ProxyFront, ProxyRequest, Socks5Reply};
use super::read_ahead::READ_AHEAD;
use super::resolver::{self, Lookup, Resolver};
use super::slab::Slab;
use super::supervisor::{
    Failure, LinkSample, NO_ANSWER_TIMEOUT, OPEN_TIMEOUT, Retry, SlotState, SlotSupervisor,
    WAIT_FOR_SESSION, XorShift64,
};
use super::{bind_udp, unix_now};

mod direct;
mod direct_udp;
mod dns_forward;
mod learn;
mod redir;
mod tun_mode;
use super::exclude::Exclude;
use super::learned::{LearnedAddrs, QueryFlow};
use super::tun::front::TunFront;
use super::udp_flows::REDIR_FLOW_IDS;
use crate::config::{self, ClientConfig, ProxyAuth, TransportConfig};
use crate::control::{ControlMsg, ControlSender};
use crate::keys;
use crate::proto::id_map::IdMap;
use crate::proto::transport::{
    AssocId, CloseReason, Destination, OpenResult, ResetReason, StreamId, TransportEvent,
};
use crate::proto::{ClientEvent, ClientSession, ConnectorConfig, RefuseReason, Session};
use crate::runtime::malloc::HeapTrim;
use direct::Direct;
use direct_udp::DirectUdp;
use dns_forward::DnsForward;
pub use dns_forward::DnsForwardOptions;
pub use redir::RedirOptions;
use redir::RedirState;
pub use tun_mode::TunOptions;
use tun_mode::TunState;

/// Local connections accepted at most (each holds two 32 KiB buffers while piping).
const MAX_LOCAL: usize = 4096;
/// Local connections from one non-loopback address at most (loopback shares only `MAX_LOCAL`).
const MAX_LOCAL_PER_ADDR: u32 = 256;
/// A local connection must have sent a complete SOCKS5 / HTTP request this soon after accept.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel holds a proxy connection that has sent nothing for about this long before the loop
/// accepts it anyway (`TCP_DEFER_ACCEPT`; [`REQUEST_TIMEOUT`] runs from the accept).
const DEFER_ACCEPT_SECS: u32 = 1;
/// SOCKS5 associations take ids `1 .. 2^29`; the capture modes' and the DNS forwarder's ranges
/// above it are in [`super::udp_flows`] (all below 2^30: a varint of at most 4 bytes).
const ASSOC_ID_SPACE: AssocId = 1 << 29;
const READ_CHUNK: usize = 16 * 1024;
const _: () = assert!(
    READ_CHUNK <= MAX_UDP,
    "requests are read into the datagram buffer"
);
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
    /// Credentials the proxy port asks for (`None`: none).
    pub auth: Option<Arc<ProxyAuth>>,
    /// Local address of the tunnel's UDP sockets (`None`: any).
    pub udp_bind_ip: Option<std::net::IpAddr>,
    /// GSO/GRO on the session sockets.
    pub udp_offload: UdpOffload,
    /// A piping connection (or a UDP association) that moved no byte either way this long is
    /// closed (between this and this + [`ClientOptions::idle_check`] after its last byte).
    pub local_idle: Duration,
    /// TUN mode (`tun.enable`).
    pub tun: Option<TunOptions>,
    /// The DNS forwarder (`dns_forward`).
    pub dns_forward: Option<DnsForwardOptions>,
    /// Destinations connected directly (`exclude`; TUN mode: routes that bypass the device).
    pub exclude: Arc<Exclude>,
    /// Carrier mode and the TCP carrier's port.
    pub transport: TransportConfig,
    /// Router mode (`redir.enabled`).
    pub redir: Option<RedirOptions>,
}

impl ClientOptions {
    pub fn from_config(cfg: &ClientConfig) -> Result<Self, String> {
        let listen: SocketAddr = cfg.socks5_bind.parse().map_err(|_| {
            format!(
                "socks5_bind {:?} is not an IP address with a port",
                cfg.socks5_bind
            )
        })?;
        if !is_loopback(listen) && cfg.socks5_auth.is_none() && !cfg.allow_open_proxy {
            return Err(format!(
                "refusing to start: socks5_bind {listen} is not a loopback address, so anyone who can \
                 reach it could use this proxy and your tunnel. Set \"socks5_auth\": {{\"username\": \
                 \"...\", \"password\": \"...\"}} in the client config (SOCKS5 username/password and \
                 HTTP Basic), or \"allow_open_proxy\": true to run an open proxy on purpose"
            ));
        }
        let exclude = cfg.exclude.matcher().map_err(|e| format!("exclude: {e}"))?;
        Ok(ClientOptions {
            server: cfg.server.clone(),
            access_key: cfg.access_key.clone(),
            listen,
            sessions: cfg.session_count() as usize,
            connector: ConnectorConfig {
                // Say "no answer from the server" within 10 s rather than 30 s.
                handshake_timeout: NO_ANSWER_TIMEOUT,
                ..ConnectorConfig::default()
            },
            auth: cfg.socks5_auth.clone().map(Arc::new),
            udp_bind_ip: cfg.udp_bind_ip,
            udp_offload: cfg.udp_offload,
            local_idle: Duration::from_secs(u64::from(
                cfg.local_idle_timeout_secs
                    .unwrap_or(config::DEFAULT_LOCAL_IDLE_TIMEOUT_SECS),
            )),
            tun: cfg.tun.enable.then(|| tun_options(&cfg.tun, &exclude)),
            exclude: Arc::new(exclude),
            dns_forward: cfg.dns_forward.map(|d| DnsForwardOptions {
                bind: d.bind,
                upstream: d.upstream,
            }),
            transport: cfg.transport,
            redir: cfg
                .redir
                .as_ref()
                .filter(|r| r.enabled)
                .and_then(|r| r.bind_addr())
                .map(|bind| RedirOptions { bind }),
        })
    }

    /// How often an active connection's idleness is looked at again: a fifth of
    /// [`ClientOptions::local_idle`], between 1 s and 60 s.
    pub fn idle_check(&self) -> Duration {
        (self.local_idle / 5).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Whether anyone who can reach the proxy port may use it (non-loopback, no credentials).
    pub fn is_open_proxy(&self) -> bool {
        !is_loopback(self.listen) && self.auth.is_none()
    }
}

/// The next connection waiting on `listener`, or `None` once none is (a failure other than
/// "would block" is logged with `what`).
fn accept_next(listener: &TcpListener, what: &str) -> Option<(TcpStream, SocketAddr)> {
    loop {
        match listener.accept() {
            Ok(x) => return Some(x),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    log::warn!("{what}: {e}");
                }
                return None;
            }
        }
    }
}

/// TUN mode settings from the config's `tun` block (defaults where a field is absent).
fn tun_options(t: &config::TunConfig, exclude: &Exclude) -> TunOptions {
    let defaults = super::tun::device::TunSettings::default();
    let bypass = exclude.ranges().iter().map(|r| r.network()).collect();
    TunOptions {
        settings: super::tun::device::TunSettings {
            name: t.name.clone().unwrap_or(defaults.name.clone()),
            mtu: t.mtu.unwrap_or(defaults.mtu),
            ipv6: if t.ipv6 == Some(false) {
                None
            } else {
                defaults.ipv6
            },
            auto_route: t.auto_route.unwrap_or(true),
            bypass,
            ..defaults
        },
        dns: t.dns_addr(),
        kill_switch: t.kill_switch.unwrap_or(false),
    }
}

fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The running client loop.
pub struct ClientLoopHandle {
    control: ControlSender,
    /// The proxy address actually bound.
    pub local_addr: SocketAddr,
    thread: LoopThread,
}

impl ClientLoopHandle {
    /// New `exclude` lists (SIGHUP).
    pub fn reload_exclude(&self, exclude: Exclude) {
        self.control.send(ControlMsg::Exclude(Arc::new(exclude)));
    }

    /// Closes the sessions gracefully and joins the thread.
    pub fn shutdown(mut self) {
        self.control.send(ControlMsg::Shutdown);
        self.thread.join();
    }

    /// Waits for the loop to end on its own (it only does on shutdown or a fatal error).
    pub fn join(mut self) {
        self.thread.join();
    }
}

/// The proxy port's listener. Proxy clients speak first (SOCKS5 greeting, HTTP request line),
/// so the kernel hands a connection over only once its first bytes are there
/// ([`crate::sys::defer_accept`]): the loop wakes once per connection, with the greeting ready,
/// instead of once for the accept and again for the greeting (one wake-up less before the first
/// byte).
fn bind_proxy(addr: SocketAddr) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on {addr} for the local proxy: {e}"))?;
    crate::sys::defer_accept(&listener, DEFER_ACCEPT_SECS);
    Ok(listener)
}

/// Binds the proxy port and starts the loop thread.
pub fn start(options: ClientOptions) -> Result<ClientLoopHandle, String> {
    let (host, port) = crate::config::split_host_port(&options.server)
        .ok_or_else(|| format!("server {:?} is not host:port", options.server))?;
    keys::validate_key(&options.access_key).map_err(|e| e.to_string())?;
    let core = LoopCore::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
    let mut listener = bind_proxy(options.listen)?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    core.registry()
        .register(&mut listener, Tok::Listener.token(), Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let resolver = Resolver::new(1, 16, core.waker.clone())
        .map_err(|e| format!("cannot start a DNS thread: {e}"))?;
    let (control, control_rx) = core.control_channel();
    let now = Instant::now();
    let count = options.sessions.max(1);
    // `auto` gets one spare slot per session slot: a retiring TCP session moves aside into it.
    let spares = if options.transport.mode == crate::config::CarrierMode::Auto {
        count
    } else {
        0
    };
    let slots = (0..count + spares)
        .map(|i| Slot {
            spare: i >= count,
            state: SlotState::Idle,
            sock: None,
            tcp: None,
            carrier: Carrier::Udp,
            retiring: false,
            client: None,
            streams: IdMap::default(),
            tx: UdpTx::new(),
            ticket: None,
            readable: false,
            last_rx: now,
            refusal_logged: None,
        })
        .collect();
    let mut jitter_seed = [0u8; 8];
    keys::fill_random(&mut jitter_seed).map_err(|e| e.to_string())?;
    let jitter = XorShift64::new(u64::from_le_bytes(jitter_seed));
    let idle_check = options.idle_check();
    // TUN mode: the server's name is resolved before any route goes in (later lookups may have
    // to go through the tunnel itself), then the device is created.
    let mut last_server_addr = None;
    let tun = match &options.tun {
        Some(t) => {
            last_server_addr = resolver::resolve_blocking(&host, port)
                .ok()
                .and_then(|a| a.first().copied());
            Some(TunState::open(t, core.registry(), now)?)
        }
        None => None,
    };
    let dns = match &options.dns_forward {
        Some(d) => Some(DnsForward::open(d, core.registry(), now)?),
        None => None,
    };
    let options_transport = options.transport;
    let redir = match &options.redir {
        Some(r) => Some(RedirState::open(r, core.registry(), now)?),
        None => None,
    };
    let lp = ClientLoop {
        core,
        heap_trim: HeapTrim::new(Instant::now()),
        tickets: TicketIssuer::new(),
        listener,
        local_addr,
        control_rx,
        resolver,
        host,
        port,
        options,
        slots,
        supervisor: SlotSupervisor::new(count + spares, now, jitter),
        carrier: CarrierChoice::new(options_transport.mode, now),
        probe: None,
        server_addr: None,
        announced: None,
        locals: Slab::new(),
        held: Vec::new(),
        held_scratch: Vec::new(),
        waiting: TimeoutQueue::new(WAIT_FOR_SESSION),
        opening: TimeoutQueue::new(OPEN_TIMEOUT),
        early_reply: EarlyReply::default(),
        request_deadlines: TimeoutQueue::new(REQUEST_TIMEOUT),
        idle_checks: TimeoutQueue::new(idle_check),
        per_addr: HashMap::new(),
        next_serial: 0,
        assocs: Slab::new(),
        assoc_ready: Vec::new(),
        assoc_scratch: Vec::new(),
        assoc_ids: HashMap::new(),
        next_assoc: 0,
        buf: vec![0u8; MAX_UDP].into_boxed_slice(),
        shutting_down: None,
        closed_io: IoCounts::default(),
        tun,
        last_server_addr,
        dns,
        redir,
        learned: LearnedAddrs::default(),
        dns_queries: Default::default(),
        direct_udp: DirectUdp::default(),
    };
    let thread = LoopThread::spawn("ostp-client", move || lp.run())
        .map_err(|e| format!("cannot start the client thread: {e}"))?;
    Ok(ClientLoopHandle {
        control,
        local_addr,
        thread,
    })
}

/// One tunnel-session slot: its socket and session (its timing is [`SlotSupervisor`]'s).
struct Slot {
    state: SlotState,
    /// The session's UDP socket (UDP carrier).
    sock: Option<udp::Socket>,
    /// The session's TCP connection (TCP carrier; then `sock`, `tx` and `readable` are unused).
    tcp: Option<CarrierLink>,
    /// What carries the slot's attempt or session.
    carrier: Carrier,
    /// A TCP session kept for its streams after `auto` moved back to UDP: it gets new streams
    /// only while no other session is up and is replaced once its streams are gone.
    retiring: bool,
    /// Not one of the `mux.sessions` slots the supervisor keeps up: an idle spare never
    /// attempts a session; a retiring session hands its slot's place to a spare and becomes
    /// the spare itself (`auto` only: one spare per slot).
    spare: bool,
    client: Option<ClientSession>,
    /// The session's streams → the local connection of each; its length is the slot's load.
    streams: IdMap<StreamId, usize>,
    /// A datagram the socket would not take; WRITABLE interest is registered only meanwhile.
    tx: UdpTx,
    /// The server-name lookup this slot waits for (`Resolving` only).
    ticket: Option<Ticket>,
    /// The socket may hold datagrams (mio is edge-triggered: kept while a batch stops early).
    readable: bool,
    /// Last datagram from the server.
    last_rx: Instant,
    /// The refusal reason last logged at error level since the slot was connected (a new
    /// reason is reported even within an outage already reported).
    refusal_logged: Option<RefuseReason>,
}

impl Slot {
    /// The slot's session once the handshake is done.
    fn session_mut(&mut self) -> Option<&mut Session> {
        self.client.as_mut().and_then(|c| c.session_mut())
    }

    fn session(&self) -> Option<&Session> {
        self.client.as_ref().and_then(|c| c.session())
    }
}

enum LocalState {
    /// Reading the SOCKS5 / HTTP request.
    Request(ProxyFront),
    /// Waiting for a tunnel session (in `ClientLoop::waiting`).
    Waiting { request: ProxyRequest },
    /// Stream opened, waiting for the server's answer (in `ClientLoop::opening`); the pipe
    /// moves only socket → stream meanwhile, unless the success reply went early.
    Opening {
        request: ProxyRequest,
        slot: usize,
        stream: StreamId,
        /// The success reply went before the server's answer ([`EarlyReply`]): a failure can
        /// only reset the connection.
        replied: bool,
    },
    /// Splicing.
    Piping { slot: usize },
    /// The TCP control connection of a UDP association.
    Udp { assoc: usize },
    /// Writing a final reply, then closing.
    Closing,
    /// An excluded destination connected directly, without the tunnel (split routing).
    Direct(Box<Direct>),
}

struct Local {
    sock: TcpStream,
    /// Tells this connection from a later one in the same slab slot (deadline queue keys).
    serial: u32,
    /// The application's address (per-address caps, the UDP association's allowed sender).
    peer: SocketAddr,
    /// Last byte moved either way while piping.
    last_active: Instant,
    state: LocalState,
    pipe: Option<Pipe>,
    /// Bytes to write before anything else (proxy replies while not piping).
    out: Vec<u8>,
    out_pos: usize,
    readable: bool,
    writable: bool,
    /// In `ClientLoop::held`: its pipe stopped reading the application because the session
    /// holds enough unsent bytes (`tunnel::read_ahead`), with the socket still readable.
    held: bool,
    /// Captured on its way elsewhere (TUN or router mode), not a proxy client.
    captured: Option<Capture>,
    /// DNS over TCP to `tun.dns` or the forwarder's upstream: queries and answers read for
    /// split routing.
    dns_tap: Option<Box<learn::DnsTap>>,
}

/// Which capture mode accepted a local connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// TUN mode's listener (its NAT entry is released at close).
    Tun,
    /// Router mode's listener (an nftables `redirect`).
    Redir,
}

/// One SOCKS5 UDP association: its socket and [`AssocRoute`].
struct Assoc {
    sock: UdpSocket,
    route: AssocRoute,
    /// The socket may hold datagrams (kept while a receive batch stops at its limit).
    readable: bool,
}

/// Who may use an association and where its datagrams go. Datagrams are accepted only from the
/// IP address of the TCP connection that asked for it (and the port of its DST hint when it gave
/// one); the first such sender owns it. Answers come back tagged with `id` and go to that owner
/// only.
struct AssocRoute {
    id: AssocId,
    /// The TCP peer's IP: the only address allowed to send.
    owner_ip: IpAddr,
    /// DST.PORT of the request when non-zero: the only port allowed to send from.
    hint_port: Option<u16>,
    /// The local client's UDP address (its first accepted datagram).
    client: Option<SocketAddr>,
    slot: Option<usize>,
    /// Last datagram either way.
    last_active: Instant,
}

/// A UDP handshake that only checks whether the server answers over UDP again (`auto` while on
/// TCP); its token is `Tok::Slot(slots.len())`, one past the last slot.
struct Probe {
    sock: udp::Socket,
    client: ClientSession,
    tx: UdpTx,
    readable: bool,
}

/// The client loop's state. More than 15 fields because it owns four kinds of sockets (the
/// listener, local connections, session slots, UDP associations) plus the policy that times
/// them (supervisor, request queues); each field is one of those and documented where not obvious.
struct ClientLoop {
    core: LoopCore,
    /// Gives free heap pages back after a burst of traffic (as the server loop does).
    heap_trim: HeapTrim,
    tickets: TicketIssuer,
    listener: TcpListener,
    local_addr: SocketAddr,
    control_rx: Receiver<ControlMsg>,
    resolver: Resolver,
    host: String,
    port: u16,
    options: ClientOptions,
    slots: Vec<Slot>,
    supervisor: SlotSupervisor<XorShift64>,
    /// Which carrier new sessions use (`transport.mode`).
    carrier: CarrierChoice,
    /// The UDP probe in progress, if any.
    probe: Option<Probe>,
    /// The server's address as last resolved (the probe's destination).
    server_addr: Option<SocketAddr>,
    /// The carrier of the last session announced at info level (a change is announced again).
    announced: Option<Carrier>,
    locals: Slab<Local>,
    /// Piping (or early-answered, still opening) connections whose reads wait for their session
    /// to send (`Local::held`), by `(index, serial)`, in the order they were held; pumped again
    /// by [`ClientLoop::release_held`].
    held: Vec<(usize, u32)>,
    /// Spare storage for `held`, swapped in by each pass, so that a pass allocates nothing in
    /// steady state.
    held_scratch: Vec<(usize, u32)>,
    /// Requests waiting for a session, oldest first.
    waiting: TimeoutQueue<usize>,
    /// Requests whose stream waits for the server's answer, oldest first.
    opening: TimeoutQueue<usize>,
    /// Destinations whose CONNECT is answered before the server's open result.
    early_reply: EarlyReply,
    /// Every accepted connection by `(index, serial)`: still in `Request` at expiry → closed.
    request_deadlines: TimeoutQueue<(usize, u32)>,
    /// Piping connections and UDP associations by `(index, serial)`, looked at every
    /// [`ClientOptions::idle_check`]: idle for [`ClientOptions::local_idle`] → closed, else
    /// queued again.
    idle_checks: TimeoutQueue<(usize, u32)>,
    /// Open local connections per non-loopback peer address.
    per_addr: HashMap<IpAddr, u32>,
    next_serial: u32,
    assocs: Slab<Assoc>,
    /// Associations marked readable (each once while its flag is set; stale entries of closed
    /// ones are skipped): the loop visits these, never every association.
    assoc_ready: Vec<usize>,
    /// The previous `assoc_ready`, reused so marking allocates nothing in steady state.
    assoc_scratch: Vec<usize>,
    /// Association id (carried by every DATAGRAM frame both ways) → association.
    assoc_ids: HashMap<AssocId, usize>,
    next_assoc: AssocId,
    buf: Box<[u8]>,
    shutting_down: Option<Instant>,
    /// System calls and datagrams of session sockets already closed.
    closed_io: IoCounts,
    /// TUN mode's device, listeners and flows (`tun.enable`).
    tun: Option<TunState>,
    /// The server's address as last resolved (used when a later lookup fails).
    last_server_addr: Option<SocketAddr>,
    /// The DNS forwarder (`dns_forward`).
    dns: Option<DnsForward>,
    /// Router mode's listeners, TPROXY sockets and flows (`redir.enabled`).
    redir: Option<RedirState>,
    /// Addresses excluded names resolved to (split routing where only addresses are seen).
    learned: LearnedAddrs,
    /// DNS queries whose answers may teach `learned`.
    dns_queries: super::learned::PendingQueries,
    /// Captured UDP flows to learned addresses, relayed directly.
    direct_udp: DirectUdp,
}

/// Whether a request's success reply may go before the server's open result ([`EarlyReply`]):
/// proxy CONNECTs only (HTTP forwarding and captured connections have no reply to wait for).
fn has_early_reply(request: &ProxyRequest) -> bool {
    matches!(
        request.protocol(),
        FrontProtocol::Socks5 | FrontProtocol::HttpConnect
    )
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
            "the server closed the session: this key's traffic limit is reached or it expired"
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
        RefuseReason::Disabled => "access key disabled",
        RefuseReason::SessionLimit => "this key already has the maximum number of sessions",
        RefuseReason::ServerFull => "the server is full",
        RefuseReason::Expired => "access key expired",
        RefuseReason::DeviceLimit => "device limit reached: another device is using this key",
        RefuseReason::Other(_) => "no reason given",
    }
}

/// The connected slot with the fewest streams, retiring ones only when no other is up: where
/// new streams and new UDP associations go.
fn pick_slot(slots: &[Slot]) -> Option<usize> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state == SlotState::Connected)
        .min_by_key(|(_, s)| (s.retiring, s.streams.len()))
        .map(|(i, _)| i)
}

/// One association's datagrams on their way from the local application into a tunnel session.
struct AssocUplink<'a> {
    slots: &'a mut [Slot],
    route: &'a mut AssocRoute,
    now: Instant,
    /// DNS queries to a resolver that teaches split routing are remembered.
    dns: learn::Teacher<'a>,
}

impl AssocUplink<'_> {
    fn forward(&mut self, datagram: &[u8], from: SocketAddr) {
        let a = &mut *self.route;
        // Only the TCP peer's address (and the hinted port) may use the association; the first
        // such sender owns it.
        let allowed = from.ip().to_canonical() == a.owner_ip.to_canonical()
            && a.hint_port.is_none_or(|p| p == from.port())
            && a.client.is_none_or(|c| c == from);
        if !allowed {
            return;
        }
        a.client = Some(from);
        a.last_active = self.now;
        let Ok((dest, payload)) = proxy_front::parse_socks5_udp(datagram) else {
            return;
        };
        let connected = |s: &Slot| s.state == SlotState::Connected;
        let slot = match a.slot.filter(|s| connected(&self.slots[*s])) {
            Some(s) => s,
            // A new association goes where a new stream would (not to a retiring session
            // while another is up).
            None => match pick_slot(self.slots) {
                Some(s) => s,
                None => return, // no session: drop (UDP senders retry)
            },
        };
        a.slot = Some(slot);
        if let Destination::Addr(to) = &dest {
            self.dns.query(QueryFlow::Datagrams(a.id), *to, payload);
        }
        if let Some(session) = self.slots[slot].session_mut() {
            // Dropped when the queue is full: UDP senders retry.
            let _ = session.transport_mut().send_datagram(a.id, dest, payload);
        }
    }
}

impl ClientLoop {
    fn run(mut self) {
        log::info!(
            "ostp {} client: SOCKS5 and HTTP proxy on {}, tunnel to {} ({} session{}, transport {})",
            env!("CARGO_PKG_VERSION"),
            self.local_addr,
            self.options.server,
            self.options.sessions.max(1),
            if self.options.sessions <= 1 { "" } else { "s" },
            self.options.transport.mode.as_str()
        );
        let mut events = core::events();
        loop {
            let now = Instant::now();
            let deadline = self.next_deadline(now);
            if let Err(e) = self.core.wait(&mut events, now, deadline) {
                log::error!("client loop: poll failed: {e}");
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                self.dispatch(now, event);
            }
            self.drain_control(now);
            self.drain_resolver(now);
            for i in 0..self.slots.len() {
                self.receive(now, i);
            }
            self.receive_probe(now);
            self.receive_assocs(now);
            self.tun_receive(now);
            self.dns_receive(now);
            self.redir_receive(now);
            self.run_timers(now);
            self.release_held(now);
            for i in 0..self.slots.len() {
                self.process_slot_events(now, i);
                self.flush(now, i);
            }
            self.drive_probe(now);
            self.retire_idle(now);
            self.heap_trim.tick(now);
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
        log::debug!("client loop: {} wake-ups", self.core.wakeups());
        let mut io = self.closed_io;
        for sock in self.slots.iter().filter_map(|s| s.sock.as_ref()) {
            io.add(sock.counts());
        }
        log::info!(
            "client udp: {} datagrams sent in {} calls, {} received in {} calls",
            io.datagrams_sent,
            io.send_calls,
            io.datagrams_received,
            io.recv_calls
        );
        log::info!("client stopped");
    }

    /// Records one readiness event (the work happens after all events are recorded).
    fn dispatch(&mut self, now: Instant, event: &mio::event::Event) {
        match Tok::decode(event.token()) {
            Some(Tok::Listener) => self.accept(now),
            Some(Tok::Tun) => {
                if let Some(t) = self.tun.as_mut() {
                    t.readable = true;
                }
            }
            Some(Tok::TunListener(i)) => self.tun_accept(now, i),
            Some(Tok::DnsUdp) => {
                if let Some(d) = self.dns.as_mut() {
                    d.readable = true;
                }
            }
            Some(Tok::DnsTcp) => self.dns_accept(now),
            Some(Tok::Direct(t)) => {
                if let Some(LocalState::Direct(d)) = self.locals.get_mut(t).map(|l| &mut l.state) {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        d.readable = true;
                    }
                    if event.is_writable() || event.is_write_closed() || event.is_error() {
                        d.writable = true;
                    }
                }
                self.drive_local(now, t);
            }
            Some(Tok::Slot(i)) if i == self.slots.len() => {
                if let Some(p) = self.probe.as_mut() {
                    p.readable |= event.is_readable();
                }
            }
            Some(Tok::RedirListener(i)) => self.redir_accept(now, i),
            Some(Tok::RedirUdp(i)) => self.redir_readable(i),
            Some(Tok::DirectUdp(i)) => self.direct_udp.mark_readable(i),
            Some(Tok::Slot(i)) => {
                if let Some(slot) = self.slots.get_mut(i) {
                    if let Some(link) = slot.tcp.as_mut() {
                        link.on_event(event);
                        return;
                    }
                    slot.readable |= event.is_readable();
                    if event.is_writable() {
                        Self::retry_blocked(self.core.registry(), i, slot);
                    }
                }
            }
            Some(Tok::Assoc(a)) => {
                if let Some(assoc) = self.assocs.get_mut(a) {
                    if event.is_readable() && !assoc.readable {
                        assoc.readable = true;
                        self.assoc_ready.push(a);
                    }
                }
            }
            Some(Tok::Conn(t)) => {
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
            _ => {}
        }
    }

    /// How long to sleep: until the earliest deadline the loop acts on (slot attempts and
    /// liveness samples, session timers, request and open timeouts, shutdown), or not at all
    /// while a slot socket may still hold datagrams.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let slot_readable =
            |s: &Slot| s.readable || s.tcp.as_ref().is_some_and(CarrierLink::needs_turn);
        if !self.assoc_ready.is_empty()
            || self.slots.iter().any(slot_readable)
            || self.probe.as_ref().is_some_and(|p| p.readable)
        {
            return Some(now);
        }
        let deadlines = self.slots.iter().enumerate().flat_map(|(i, s)| {
            // No new attempts while shutting down or on a spare (`run_timers` starts none).
            let attempts = s.state != SlotState::Idle || (self.shutting_down.is_none() && !s.spare);
            [
                attempts
                    .then(|| self.supervisor.next_deadline(i, s.state))
                    .flatten(),
                s.client.as_ref().and_then(|c| c.poll_timeout()),
            ]
        });
        deadlines
            .chain([
                self.waiting.next_deadline(),
                self.opening.next_deadline(),
                self.request_deadlines.next_deadline(),
                self.idle_checks.next_deadline(),
                self.shutting_down,
                self.tun_deadline(now),
                self.dns_deadline(now),
                self.carrier.next_deadline(),
                self.probe.as_ref().and_then(|p| p.client.poll_timeout()),
                self.redir_deadline(now),
                self.direct_udp.deadline(now),
                self.heap_trim.deadline(),
            ])
            .flatten()
            .min()
    }

    fn drain_control(&mut self, now: Instant) {
        while let Ok(msg) = self.control_rx.try_recv() {
            if let ControlMsg::Exclude(exclude) = &msg {
                self.set_exclude(exclude.clone());
            }
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
                && !slot.spare
                && self.supervisor.attempt_due(i, now)
                && self.shutting_down.is_none()
            {
                slot.state = SlotState::Resolving;
                let ticket = self.tickets.issue(TicketKind::ServerName, i);
                slot.ticket = Some(ticket);
                match self.resolver.lookup(ticket, &self.host, self.port) {
                    Ok(Lookup::Ready(addr)) => self.connect_slot(now, i, addr),
                    Ok(Lookup::Pending) => {}
                    Err(e) => {
                        log::warn!("cannot resolve {}: {e}", self.host);
                        self.slot_failed(now, i, Failure::Local);
                    }
                }
            }
            if let Some(c) = self.slots[i].client.as_mut() {
                if c.poll_timeout().is_some_and(|t| now >= t) {
                    c.handle_timeout(now);
                }
            }
        }
        if self.supervisor.liveness_due(now) {
            self.check_liveness(now);
        }
        if self.shutting_down.is_none() {
            match self.carrier.poll(now) {
                Some(Action::Switch(switch)) => self.carrier_switched(now, switch),
                Some(Action::Probe) => self.start_probe(now),
                None => {}
            }
        }
        if let Some(p) = self.probe.as_mut() {
            if p.client.poll_timeout().is_some_and(|t| now >= t) {
                p.client.handle_timeout(now);
            }
        }
        // Requests waiting too long for a session, opens waiting too long for the answer.
        while let Some(l) = self.waiting.pop_expired(now) {
            self.fail_request(now, l, Socks5Reply::GeneralFailure);
        }
        while let Some(l) = self.opening.pop_expired(now) {
            self.fail_request(now, l, Socks5Reply::TtlExpired);
        }
        self.expire_locals(now);
        self.tun_timers(now);
        self.redir_timers(now);
    }

    /// Closes connections that did not finish their request in time and idle ones.
    fn expire_locals(&mut self, now: Instant) {
        while let Some((idx, serial)) = self.request_deadlines.pop_expired(now) {
            let stalled = self.locals.get(idx).is_some_and(|l| {
                l.serial == serial
                    && matches!(l.state, LocalState::Request(_) | LocalState::Closing)
            });
            if stalled {
                log::debug!("local connection: no complete request within {REQUEST_TIMEOUT:?}");
                self.close_local(idx);
            }
        }
        while let Some((idx, serial)) = self.idle_checks.pop_expired(now) {
            let Some(l) = self.locals.get(idx).filter(|l| l.serial == serial) else {
                continue;
            };
            let last_active = match l.state {
                LocalState::Piping { .. } | LocalState::Direct(_) => l.last_active,
                LocalState::Udp { assoc } => self
                    .assocs
                    .get(assoc)
                    .map_or(l.last_active, |a| a.route.last_active),
                _ => continue,
            };
            let idle = self.options.local_idle;
            if now.saturating_duration_since(last_active) >= idle {
                log::debug!("local connection: idle for {idle:?}; closing it");
                self.close_local(idx);
            } else {
                self.idle_checks.push_new((idx, serial), now);
            }
        }
    }

    fn drain_resolver(&mut self, now: Instant) {
        while let Some(r) = self.resolver.try_recv() {
            if r.ticket.kind == TicketKind::Direct {
                let addr = r.result.ok().and_then(|a| a.first().copied());
                self.direct_resolved(now, r.ticket, addr);
                continue;
            }
            let i = r.ticket.index;
            let ok = self
                .slots
                .get(i)
                .is_some_and(|s| s.ticket == Some(r.ticket) && s.state == SlotState::Resolving);
            if !ok {
                continue;
            }
            match r.result.ok().and_then(|a| a.first().copied()) {
                Some(addr) => {
                    self.last_server_addr = Some(addr);
                    self.connect_slot(now, i, addr)
                }
                // A resolver that fails after it once answered (a DNS outage, or TUN mode with
                // the kill switch, where DNS goes through the tunnel that is down): use the
                // address it gave last.
                None => match self.last_server_addr {
                    Some(addr) => {
                        log::warn!(
                            "cannot resolve the server name {:?}; using its last address {addr}",
                            self.host
                        );
                        self.connect_slot(now, i, addr)
                    }
                    None => {
                        log::warn!("cannot resolve the server name {:?}; will retry", self.host);
                        self.slot_failed(now, i, Failure::Local);
                    }
                },
            }
        }
    }

    /// Starts slot `i`'s session with the server at `server` over the current carrier.
    fn connect_slot(&mut self, now: Instant, i: usize, server: SocketAddr) {
        self.server_addr = Some(server);
        let carrier = self.carrier.current();
        self.slots[i].carrier = carrier;
        match carrier {
            Carrier::Udp => self.connect_udp(now, i, server),
            Carrier::Tcp => self.connect_tcp(now, i, server),
        }
        if self.slots[i].state == SlotState::Handshaking {
            self.carrier.attempt_started(carrier, now);
        }
    }

    /// A connected UDP socket towards `server` (bound to `udp_bind_ip` if set), READABLE.
    fn open_udp(&self, server: SocketAddr, token: mio::Token) -> Result<udp::Socket, String> {
        let bind: SocketAddr = match self.options.udp_bind_ip {
            Some(ip) => SocketAddr::new(ip, 0),
            None if server.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => SocketAddr::from(([0u16; 8], 0)),
        };
        let mark = self.options.tun.as_ref().map(|t| t.settings.fwmark);
        let sock = bind_udp(bind).and_then(|s| {
            // TUN mode: the tunnel's own packets carry the mark that keeps them out of the
            // device (set before `connect`, which picks the route).
            if let Some(mark) = mark {
                crate::sys::set_mark(&s, mark)?;
            }
            s.connect(server)?;
            Ok(s)
        });
        let mut sock = match sock {
            Ok(s) => udp::Socket::new(s, self.options.udp_offload),
            Err(e) => return Err(format!("cannot open a UDP socket towards {server}: {e}")),
        };
        // WRITABLE only while a datagram is blocked (`flush`).
        self.core
            .registry()
            .register(&mut sock, token, Interest::READABLE)
            .map_err(|e| format!("cannot register a UDP socket: {e}"))?;
        Ok(sock)
    }

    /// A new connector for `carrier` (`None`: logged, the slot or probe fails).
    fn new_client(
        &self,
        now: Instant,
        carrier: Carrier,
        config: ConnectorConfig,
    ) -> Option<ClientSession> {
        let mut seed = [0u8; 32];
        keys::fill_random(&mut seed).ok()?;
        let key = &self.options.access_key;
        let client = match carrier {
            Carrier::Udp => ClientSession::connect(config, key, now, unix_now(), seed),
            Carrier::Tcp => ClientSession::connect_carrier(config, key, now, unix_now(), seed),
        };
        client
            .map_err(|e| log::error!("the access key cannot be used: {e:?}"))
            .ok()
    }

    fn connect_udp(&mut self, now: Instant, i: usize, server: SocketAddr) {
        let mut sock = match self.open_udp(server, Tok::Slot(i).token()) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("{e}");
                self.slot_failed(now, i, Failure::Local);
                return;
            }
        };
        let Some(c) = self.new_client(now, Carrier::Udp, self.options.connector.clone()) else {
            let _ = self.core.registry().deregister(&mut sock);
            self.slot_failed(now, i, Failure::Local);
            return;
        };
        let slot = &mut self.slots[i];
        if let Some(mut old) = slot.sock.take() {
            let _ = self.core.registry().deregister(&mut old);
            self.closed_io.add(old.counts());
        }
        slot.sock = Some(sock);
        slot.client = Some(c);
        slot.state = SlotState::Handshaking;
        slot.tx.clear();
        slot.readable = true;
        log::debug!("session {i}: handshake with {server}");
    }

    /// Connects slot `i` to the TCP carrier: the host of `server`, port `transport.tcp_port` or
    /// the same port.
    fn connect_tcp(&mut self, now: Instant, i: usize, server: SocketAddr) {
        let port = self.options.transport.tcp_port.unwrap_or(server.port());
        let addr = SocketAddr::new(server.ip(), port);
        let token = Tok::Slot(i).token();
        let mark = self.options.tun.as_ref().map(|t| t.settings.fwmark);
        let mut link = match CarrierLink::connect(addr, mark, self.core.registry(), token) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("tunnel session {i}: cannot connect to the TCP carrier at {addr}: {e}");
                self.slot_failed(now, i, Failure::Carrier);
                return;
            }
        };
        let Some(c) = self.new_client(now, Carrier::Tcp, self.options.connector.clone()) else {
            link.deregister(self.core.registry());
            self.slot_failed(now, i, Failure::Local);
            return;
        };
        let slot = &mut self.slots[i];
        slot.tcp = Some(link);
        slot.client = Some(c);
        slot.state = SlotState::Handshaking;
        slot.readable = false;
        log::debug!("session {i}: handshake with {addr} over TCP");
    }

    /// Replaces connected sessions that stopped answering (see
    /// [`DEAD_AFTER`](super::supervisor::DEAD_AFTER)).
    fn check_liveness(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.state != SlotState::Connected {
                continue;
            }
            let last_rx = slot.last_rx;
            let Some(stats) = slot.session_mut().map(|s| s.transport().stats()) else {
                continue;
            };
            let link = LinkSample {
                last_rx,
                bytes_in_flight: stats.bytes_in_flight,
                pto_count: stats.pto_count,
            };
            if let Some(silent) = self.supervisor.check_liveness(i, now, link) {
                log::warn!(
                    "tunnel session {i}: no answer from the server for {} s; reconnecting (the \
                     server may have restarted)",
                    silent.as_secs()
                );
                self.slot_failed(now, i, Failure::Silent);
            }
        }
    }

    /// Ends slot `i`'s session and everything that used it; the supervisor schedules the next
    /// attempt.
    fn slot_failed(&mut self, now: Instant, i: usize, failure: Failure) -> Retry {
        let retry = self.supervisor.failed(i, now, failure);
        let slot = &self.slots[i];
        let loss = match failure {
            Failure::NoAnswer => Loss::Unanswered,
            Failure::Carrier if slot.state != SlotState::Connected => Loss::Unanswered,
            Failure::Carrier | Failure::Silent | Failure::Closed(CloseReason::IdleTimeout) => {
                Loss::Died
            }
            _ => Loss::Other,
        };
        let carrier = slot.carrier;
        self.teardown(now, i);
        if let Some(switch) = self.carrier.lost(carrier, now, loss) {
            self.carrier_switched(now, switch);
        }
        retry
    }

    /// Slot `i` starts over at once without counting a failure (a change of carrier).
    fn restart_slot(&mut self, now: Instant, i: usize) {
        if let Some(c) = self.slots[i].client.as_mut() {
            c.close(now, CloseReason::Normal);
        }
        self.flush(now, i); // the CLOSE, as far as the socket takes it
        self.teardown(now, i);
        self.supervisor.restart(i, now);
    }

    /// Closes slot `i`'s session, socket and everything that used them; the slot is `Idle`.
    fn teardown(&mut self, now: Instant, i: usize) {
        let slot = &mut self.slots[i];
        slot.state = SlotState::Idle;
        slot.client = None;
        slot.retiring = false;
        slot.tx.clear();
        if let Some(mut s) = slot.sock.take() {
            let _ = self.core.registry().deregister(&mut s);
            self.closed_io.add(s.counts());
        }
        if let Some(mut link) = slot.tcp.take() {
            link.deregister(self.core.registry());
        }
        for (_, idx) in std::mem::take(&mut slot.streams) {
            if matches!(
                self.locals.get(idx).map(|l| &l.state),
                Some(LocalState::Opening { .. })
            ) {
                self.fail_request(now, idx, Socks5Reply::GeneralFailure);
            } else {
                self.close_local(idx);
            }
        }
        for (_, a) in self.assocs.iter_mut() {
            if a.route.slot == Some(i) {
                a.route.slot = None;
            }
        }
    }

    /// New sessions use `switch.to` from now on: handshakes in progress over the other carrier
    /// start over; connected TCP sessions retire when the move is back to UDP (connected UDP
    /// sessions stay: they work), each with streams beside its replacement ([`Self::retire`]).
    fn carrier_switched(&mut self, now: Instant, switch: Switch) {
        log::info!(
            "tunnel carrier: {}; new sessions use {}",
            switch.why,
            switch.to.name()
        );
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.carrier == switch.to {
                continue;
            }
            match slot.state {
                SlotState::Handshaking => self.restart_slot(now, i),
                SlotState::Connected if switch.to == Carrier::Udp && !slot.retiring => {
                    self.retire(now, i)
                }
                _ => {}
            }
        }
        self.retire_idle(now);
    }

    /// Connected slot `i` retires (make-before-break): with streams, and a spare idle, the
    /// spare takes `i`'s place among the supervised slots and connects at once over the
    /// current carrier while `i`, now the spare, keeps its session for its streams
    /// ([`Self::pick_slot`] prefers the new session once it is up). Without streams (or
    /// without a free spare) the session stays in place until [`Self::retire_idle`] replaces it.
    fn retire(&mut self, now: Instant, i: usize) {
        self.slots[i].retiring = true;
        if self.slots[i].spare || self.slots[i].streams.is_empty() {
            return;
        }
        let free = |s: &Slot| s.spare && s.state == SlotState::Idle;
        let Some(j) = self.slots.iter().position(free) else {
            return;
        };
        log::debug!(
            "tunnel session {i}: retiring with {} streams; session {j} connects beside it",
            self.slots[i].streams.len()
        );
        self.slots[i].spare = true;
        self.slots[j].spare = false;
        self.supervisor.restart(j, now);
    }

    /// Slot `i`, connecting beside a retiring session ([`Self::retire`]), was refused for the
    /// key's session or device limit: the server allows no second session now. The move
    /// falls back to break-before-make: `i` becomes the idle spare again and the retiring
    /// session takes its place back, replaced once its streams end ([`Self::retire_idle`]). No
    /// failure is counted and no waiting request fails. `false`: not that case.
    fn break_before_make(&mut self, now: Instant, i: usize, reason: RefuseReason) -> bool {
        if !matches!(
            reason,
            RefuseReason::SessionLimit | RefuseReason::DeviceLimit
        ) || self.slots[i].spare
        {
            return false;
        }
        let aside = |s: &Slot| s.spare && s.retiring && s.state == SlotState::Connected;
        let Some(k) = self.slots.iter().position(aside) else {
            return false;
        };
        log::info!(
            "tunnel session {i}: the server allows no second session now ({}); session {k} \
             stays on the TCP carrier until its streams end",
            describe_refusal(reason)
        );
        self.teardown(now, i);
        self.slots[i].spare = true;
        self.slots[k].spare = false;
        self.retire_idle(now);
        self.serve_waiting(now);
        true
    }

    /// Ends retiring sessions whose streams are all gone: a spare's is closed (its
    /// replacement is already there), a supervised slot's is replaced over the current carrier.
    fn retire_idle(&mut self, now: Instant) {
        if self.shutting_down.is_some() {
            return;
        }
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.retiring && slot.state == SlotState::Connected && slot.streams.is_empty() {
                log::debug!("tunnel session {i}: retired from the TCP carrier");
                self.restart_slot(now, i);
            }
        }
    }

    /// Reads a batch from slot `i`'s socket if it may hold datagrams (ICMP errors while the
    /// server restarts are skipped: the handshake retries and the idle timeout decide).
    fn receive(&mut self, now: Instant, i: usize) {
        let Slot {
            sock,
            tcp,
            client,
            readable,
            last_rx,
            ..
        } = &mut self.slots[i];
        if let (Some(link), Some(client)) = (tcp.as_mut(), client.as_mut()) {
            if link.receive(now, client) > 0 {
                *last_rx = now;
            }
            return;
        }
        if !*readable {
            return;
        }
        let (Some(sock), Some(client)) = (sock.as_mut(), client.as_mut()) else {
            *readable = false;
            return;
        };
        let readiness = sock.drain(&mut self.buf, SESSION_RECV_BATCH, |datagram, _| {
            *last_rx = now;
            client.handle_datagram(now, datagram);
        });
        *readable = readiness.still_readable();
    }

    /// Sends the blocked datagram if the socket takes it now (then WRITABLE interest is dropped).
    fn retry_blocked(registry: &mio::Registry, i: usize, slot: &mut Slot) {
        if let Some(sock) = slot.sock.as_mut() {
            slot.tx.retry(sock, registry, Tok::Slot(i).token());
        }
    }

    fn flush(&mut self, now: Instant, i: usize) {
        let registry = self.core.poll.registry();
        let slot = &mut self.slots[i];
        if let (Some(link), Some(client)) = (slot.tcp.as_mut(), slot.client.as_mut()) {
            link.flush(now, client);
            return;
        }
        Self::retry_blocked(registry, i, slot);
        if slot.tx.is_blocked() {
            return;
        }
        let (Some(sock), Some(client)) = (slot.sock.as_mut(), slot.client.as_mut()) else {
            return;
        };
        let token = Tok::Slot(i).token();
        let max_segments = sock.max_segments();
        let buf = &mut self.buf[..MAX_BATCH_BYTES];
        while let Some(batch) = client.poll_transmit_batch(now, buf, max_segments) {
            let data = &buf[..batch.len];
            let sent = slot
                .tx
                .send(sock, registry, token, i, data, batch.segment, None);
            if sent == SendOutcome::Blocked {
                return;
            }
        }
    }

    fn process_slot_events(&mut self, now: Instant, i: usize) {
        while let Some(ev) = self.slots[i].client.as_mut().and_then(|c| c.poll_event()) {
            match ev {
                ClientEvent::Connected => self.slot_connected(now, i),
                ClientEvent::Refused {
                    reason,
                    retry_after_secs,
                } => return self.slot_refused(now, i, reason, retry_after_secs),
                ClientEvent::HandshakeTimeout => {
                    if self.slot_failed(now, i, Failure::NoAnswer).first_report {
                        log::warn!(
                            "no answer from the server {}: check the key, host and port; the server is silent to \
                             unknown keys (also check that this machine's clock is within 2 minutes of the right \
                             time). Retrying with backoff",
                            self.options.server
                        );
                    }
                    return;
                }
                ClientEvent::Transport(TransportEvent::Closed { reason, by_peer }) => {
                    return self.session_closed(now, i, reason, by_peer);
                }
                ClientEvent::Transport(te) => self.on_transport_event(now, i, te),
            }
        }
        let ended = self.slots[i].tcp.as_ref().and_then(|l| {
            l.end()
                .map(|e| format!("tunnel session {i}: TCP carrier {}: {e}", l.peer()))
        });
        if let Some(what) = ended {
            // Reported once per outage; the carrier choice may move to UDP meanwhile.
            if self.slot_failed(now, i, Failure::Carrier).first_report {
                log::warn!("{what}; reconnecting");
            } else {
                log::debug!("{what}; reconnecting");
            }
            return;
        }
        let finished = self.slots[i]
            .client
            .as_ref()
            .is_some_and(|c| c.is_finished());
        if finished && self.shutting_down.is_none() {
            self.slot_failed(now, i, Failure::Ended);
        }
    }

    fn slot_connected(&mut self, now: Instant, i: usize) {
        let slot = &mut self.slots[i];
        slot.state = SlotState::Connected;
        slot.refusal_logged = None;
        let carrier = slot.carrier;
        let over = match (&slot.tcp, carrier) {
            (Some(link), Carrier::Tcp) => format!(" over the TCP carrier ({})", link.peer()),
            _ => String::new(),
        };
        self.carrier.answered(carrier, now);
        let changed = self.announced.replace(carrier) != Some(carrier);
        if self.supervisor.connected(i) || changed {
            log::info!(
                "tunnel session {i} connected to {}{over}",
                self.options.server
            );
        } else {
            log::debug!("tunnel session {i} connected{over}");
        }
        self.serve_waiting(now);
    }

    fn slot_refused(
        &mut self,
        now: Instant,
        i: usize,
        reason: RefuseReason,
        retry_after_secs: u16,
    ) {
        let failure = Failure::Refused {
            reason,
            retry_after_secs,
        };
        // An authenticated answer: the carrier works.
        self.carrier.answered(self.slots[i].carrier, now);
        if self.break_before_make(now, i, reason) {
            return;
        }
        let retry = self.slot_failed(now, i, failure);
        // Repeated refusals (retries, requests) are logged once per outage and reason.
        let new_reason = self.slots[i].refusal_logged.replace(reason) != Some(reason);
        let level = if retry.first_report || new_reason {
            log::Level::Error
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "the server refused this key: {} (retrying in {retry_after_secs} s, or at the next request)",
            describe_refusal(reason)
        );
        if retry.refused_for_key && self.pick_slot().is_none() {
            // Waiting would not help: the next request retries (see `demand_retry`).
            for idx in self.waiting.take_all() {
                self.fail_request(now, idx, Socks5Reply::NotAllowed);
            }
        }
    }

    fn session_closed(&mut self, now: Instant, i: usize, reason: CloseReason, by_peer: bool) {
        if by_peer || reason != CloseReason::Normal {
            let level = if matches!(reason, CloseReason::LimitReached | CloseReason::UserDeleted) {
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
        self.slot_failed(now, i, Failure::Closed(reason));
    }

    fn on_transport_event(&mut self, now: Instant, slot: usize, ev: TransportEvent) {
        match ev {
            TransportEvent::StreamOpenResult { id, result } => {
                let Some(&l) = self.slots[slot].streams.get(&id) else {
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
                if let Some(&l) = self.slots[slot].streams.get(&id) {
                    self.drive_local(now, l);
                }
            }
            TransportEvent::StreamReset { id, reason } => {
                let Some(&l) = self.slots[slot].streams.get(&id) else {
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
            TransportEvent::Datagram { assoc, dest, data } => {
                self.datagram_in(now, slot, assoc, dest, &data)
            }
            TransportEvent::StreamOpened { id, .. } => {
                // The server never opens streams; refuse politely.
                if let Some(c) = self.slots[slot].session_mut() {
                    let _ = c.transport_mut().answer_open(id, OpenResult::NotAllowed);
                }
            }
            TransportEvent::StreamsAvailable => self.serve_waiting(now),
            TransportEvent::Closed { .. } => {}
        }
    }

    // ----- UDP probe (`auto` on TCP) -----

    /// Starts a UDP handshake with the server, only to learn whether UDP is answered again.
    fn start_probe(&mut self, now: Instant) {
        let token = Tok::Slot(self.slots.len()).token();
        let opened = self
            .server_addr
            .ok_or_else(|| "the server's address is not known yet".to_string())
            .and_then(|server| self.open_udp(server, token));
        let config = ConnectorConfig {
            handshake_timeout: carrier_choice::PROBE_TIMEOUT,
            ..self.options.connector.clone()
        };
        let probe = opened.and_then(|sock| {
            let client = self
                .new_client(now, Carrier::Udp, config)
                .ok_or_else(|| "no connector".to_string())?;
            Ok(Probe {
                sock,
                client,
                tx: UdpTx::new(),
                readable: true,
            })
        });
        match probe {
            Ok(p) => {
                log::debug!("tunnel carrier: probing UDP");
                self.probe = Some(p);
            }
            Err(e) => {
                log::debug!("tunnel carrier: cannot probe UDP: {e}");
                self.carrier.probe_done(now, false);
            }
        }
    }

    fn receive_probe(&mut self, now: Instant) {
        let Some(p) = self.probe.as_mut().filter(|p| p.readable) else {
            return;
        };
        let client = &mut p.client;
        let readiness = p.sock.drain(&mut self.buf, RECV_BATCH, |datagram, _| {
            client.handle_datagram(now, datagram)
        });
        p.readable = readiness.still_readable();
    }

    /// Sends the probe's hellos and acts on its outcome: answered (accepted or refused) or not.
    fn drive_probe(&mut self, now: Instant) {
        let Some(p) = self.probe.as_mut() else {
            return;
        };
        let mut answered = None;
        while let Some(ev) = p.client.poll_event() {
            match ev {
                ClientEvent::Connected | ClientEvent::Refused { .. } => answered = Some(true),
                ClientEvent::HandshakeTimeout => answered = Some(false),
                ClientEvent::Transport(_) => {}
            }
        }
        if answered == Some(true) {
            p.client.close(now, CloseReason::Normal);
        }
        let registry = self.core.poll.registry();
        let token = Tok::Slot(self.slots.len()).token();
        let buf = &mut self.buf[..MAX_BATCH_BYTES];
        while let Some(batch) = p.client.poll_transmit_batch(now, buf, 1) {
            let data = &buf[..batch.len];
            let sent =
                p.tx.send(&mut p.sock, registry, token, 0, data, batch.len, None);
            if sent == SendOutcome::Blocked {
                p.tx.clear(); // a lost hello is retried, a lost CLOSE ends by idle timeout
                break;
            }
        }
        let Some(answered) = answered.or(p.client.is_finished().then_some(false)) else {
            return;
        };
        if let Some(mut p) = self.probe.take() {
            let _ = self.core.registry().deregister(&mut p.sock);
            self.closed_io.add(p.sock.counts());
        }
        log::debug!("tunnel carrier: UDP probe answered: {answered}");
        if let Some(switch) = self.carrier.probe_done(now, answered) {
            self.carrier_switched(now, switch);
        }
    }

    // ----- local connections -----

    fn accept(&mut self, now: Instant) {
        while let Some((sock, peer)) = accept_next(&self.listener, "accepting a local connection") {
            if self.locals.len() >= MAX_LOCAL {
                log::warn!("too many local connections ({MAX_LOCAL}); refusing one");
                continue;
            }
            if !self.admit_peer(peer.ip()) {
                log::warn!(
                    "too many local connections from {} ({MAX_LOCAL_PER_ADDR}); refusing one",
                    peer.ip()
                );
                continue;
            }
            let front = ProxyFront::with_auth(self.options.auth.clone());
            let idx = self.insert_local(now, sock, peer, LocalState::Request(front), None);
            if let Some(serial) = self.locals.get(idx).map(|l| l.serial) {
                self.request_deadlines.push_new((idx, serial), now);
            }
            self.drive_local(now, idx);
        }
    }

    /// A new local connection in `state` (registered for both directions, no delay); its index.
    fn insert_local(
        &mut self,
        now: Instant,
        mut sock: TcpStream,
        peer: SocketAddr,
        state: LocalState,
        captured: Option<Capture>,
    ) -> usize {
        let _ = sock.set_nodelay(true);
        self.next_serial = self.next_serial.wrapping_add(1);
        let serial = self.next_serial;
        self.locals.insert_with(|idx| {
            let _ = self.core.registry().register(
                &mut sock,
                Tok::Conn(idx).token(),
                Interest::READABLE | Interest::WRITABLE,
            );
            Local {
                sock,
                serial,
                peer,
                last_active: now,
                state,
                pipe: None,
                out: Vec::new(),
                out_pos: 0,
                readable: true,
                writable: true,
                held: false,
                captured,
                dns_tap: None,
            }
        })
    }

    /// Counts a new connection from `ip` unless that address is at [`MAX_LOCAL_PER_ADDR`]
    /// (loopback is not counted).
    fn admit_peer(&mut self, ip: IpAddr) -> bool {
        if ip.to_canonical().is_loopback() {
            return true;
        }
        let n = self.per_addr.entry(ip).or_insert(0);
        if *n >= MAX_LOCAL_PER_ADDR {
            return false;
        }
        *n += 1;
        true
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
            LocalState::Direct(_) => self.drive_direct(now, idx),
            LocalState::Opening { slot, .. } | LocalState::Piping { slot } => {
                let slot = *slot;
                self.pump_local(now, idx, slot);
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
        loop {
            // The loop's datagram buffer is free between its uses: no 16 KiB stack buffer to
            // zero on every request read.
            let ClientLoop { locals, buf, .. } = self;
            let scratch = &mut buf[..READ_CHUNK];
            let Some(l) = locals.get_mut(idx) else {
                return;
            };
            if !l.readable {
                return;
            }
            let n = match l.sock.read(scratch) {
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
        if self.is_excluded(&request, now) {
            self.start_direct(now, idx, request);
            return;
        }
        if let Some(l) = self.locals.get_mut(idx) {
            l.state = LocalState::Waiting { request };
        }
        self.try_open(now, idx);
    }

    /// The slot for a new stream or association ([`pick_slot`]).
    fn pick_slot(&self) -> Option<usize> {
        pick_slot(&self.slots)
    }

    /// Opens the stream of a waiting request, or queues it until a session is up.
    fn try_open(&mut self, now: Instant, idx: usize) {
        let Some(slot) = self.pick_slot() else {
            self.waiting.push(idx, now);
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
        let Some(dest) = request.dest().cloned() else {
            self.fail_request(now, idx, Socks5Reply::AddressTypeNotSupported);
            return;
        };
        let Some(session) = self.slots[slot].session_mut() else {
            return;
        };
        let stream = match session.transport_mut().open_stream(dest.clone()) {
            Ok(s) => s,
            Err(e) => {
                if e != crate::proto::transport::StreamError::TooManyStreams {
                    log::debug!("cannot open a stream: {e}");
                }
                self.waiting.push(idx, now);
                return;
            }
        };
        self.waiting.remove(idx);
        self.opening.push(idx, now);
        self.slots[slot].streams.insert(stream, idx);
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
        // Until the open succeeds only socket → stream moves (the reply must come first); a
        // destination that opened recently gets its reply at once instead.
        let mut pipe = Pipe::awaiting_reply(stream, &early).with_read_ahead(READ_AHEAD);
        pipe.sock_readable = l.readable;
        pipe.sock_writable = l.writable;
        let replied = has_early_reply(&request)
            && self.early_reply.allows(l.peer.ip(), &dest, now)
            && pipe
                .send_reply(&request.success_reply(self.local_addr))
                .is_ok();
        l.pipe = Some(pipe);
        l.state = LocalState::Opening {
            request,
            slot,
            stream,
            replied,
        };
        self.pump_local(now, idx, slot);
    }

    /// A request is waiting and no session is up: bring idle slots' next attempt forward (but
    /// not closer than [`DEMAND_RETRY_GAP`](super::supervisor::DEMAND_RETRY_GAP) to their last
    /// failure).
    fn demand_retry(&mut self, now: Instant) {
        if self.shutting_down.is_some() {
            return;
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.state == SlotState::Idle && !slot.spare {
                self.supervisor.demand_retry(i, now);
            }
        }
    }

    fn serve_waiting(&mut self, now: Instant) {
        for idx in self.waiting.keys() {
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
        let LocalState::Opening {
            request,
            slot,
            replied,
            ..
        } = &l.state
        else {
            return;
        };
        let slot = *slot;
        if let Some(dest) = request.dest().filter(|_| has_early_reply(request)) {
            self.early_reply.opened(l.peer.ip(), dest, now);
        }
        if !*replied {
            let reply = request.success_reply(self.local_addr);
            let sent = l.pipe.as_mut().map(|p| p.send_reply(&reply));
            if let Some(Err(e)) = sent {
                log::warn!("local connection: {e}; closing it");
                self.fail_request(now, idx, Socks5Reply::GeneralFailure);
                return;
            }
        }
        l.state = LocalState::Piping { slot };
        l.last_active = now;
        self.idle_checks.push_new((idx, l.serial), now);
        self.opening.remove(idx);
        self.pump_local(now, idx, slot);
    }

    fn fail_request(&mut self, now: Instant, idx: usize, code: Socks5Reply) {
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        // An early-answered open that fails has no reply left to carry the code: the
        // connection is reset, and the destination waits for the server's answer next time.
        let mut reset = false;
        let reply = match &mut l.state {
            LocalState::Opening {
                request, replied, ..
            } => {
                if let Some(dest) = request.dest() {
                    self.early_reply.failed(l.peer.ip(), dest);
                }
                reset = *replied;
                if reset {
                    Vec::new()
                } else {
                    request.failure_reply(code)
                }
            }
            LocalState::Waiting { request, .. } => request.failure_reply(code),
            LocalState::Direct(d) => {
                d.close(self.core.registry(), &mut self.learned);
                self.opening.remove(idx);
                d.request.failure_reply(code)
            }
            _ => Vec::new(),
        };
        if let LocalState::Opening { slot, stream, .. } = l.state {
            self.opening.remove(idx);
            if let Some(s) = self.slots.get_mut(slot) {
                s.streams.remove(&stream);
                if let Some(sess) = s.session_mut() {
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
            if reset {
                crate::sys::reset_on_close(&l.sock);
            }
        }
        self.waiting.remove(idx);
        self.send_local(idx, &reply);
        self.drive_local(now, idx);
    }

    fn pump_local(&mut self, now: Instant, idx: usize, slot: usize) {
        let Some(l) = self.locals.get_mut(idx) else {
            return;
        };
        let Some(pipe) = l.pipe.as_mut() else { return };
        pipe.sock_readable |= l.readable;
        pipe.sock_writable |= l.writable;
        l.readable = false;
        l.writable = false;
        let Some(session) = self.slots.get_mut(slot).and_then(Slot::session_mut) else {
            self.close_local(idx);
            return;
        };
        let mut unlimited = u64::MAX;
        let result = match l.dns_tap.as_deref_mut() {
            Some(tap) => {
                let (learned, pending) = (&mut self.learned, &mut self.dns_queries);
                let mut tapped = learn::Tapped {
                    sock: &mut l.sock,
                    tap,
                    teacher: learn::Teacher::new(&self.options, learned, pending, now),
                };
                pipe.pump(&mut tapped, session.transport_mut(), &mut unlimited)
            }
            None => pipe.pump(&mut l.sock, session.transport_mut(), &mut unlimited),
        };
        let moved = match &result {
            Ok(m) | Err((_, m)) => m.to_socket + m.to_stream,
        };
        if moved > 0 {
            l.last_active = now;
        }
        if result.is_ok() && pipe.read_hold() == Some(ReadHold::SendAhead) && !l.held {
            l.held = true;
            self.held.push((idx, l.serial));
        }
        match result {
            Ok(_) => {}
            Err((PipeEnd::SocketError, _)) => {
                pipe.reset_stream(session.transport_mut(), ResetReason::Cancelled);
                self.close_local(idx);
            }
            Err((PipeEnd::Done, _)) | Err((PipeEnd::StreamGone, _)) => self.close_local(idx),
        }
    }

    /// Pumps again the held connections whose session may read again: it sent enough of what it
    /// held (`READ_AHEAD`). A session gone: pumped too, which closes the connection. A
    /// connection leaves the list when it is pumped, closed, or no longer opening or piping.
    /// Those still waiting keep their turn ahead of those pumped now (queued again behind them
    /// if held again), so reads rotate over a session's uploads. Runs before the sessions'
    /// flush, as the server's does: bytes read here leave in the same iteration.
    fn release_held(&mut self, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        // This pass's list; `self.held` collects the connections pumped here and held again (in
        // the scratch's storage), and the ones still waiting are compacted to the list's front.
        let mut held = std::mem::replace(&mut self.held, std::mem::take(&mut self.held_scratch));
        let mut kept = 0;
        for i in 0..held.len() {
            let (idx, serial) = held[i];
            let Some(l) = self.locals.get_mut(idx) else {
                continue;
            };
            if l.serial != serial || !l.held {
                continue; // gone (its slot reused), or no longer held
            }
            l.held = false;
            // An early-answered upload is held while its stream is still opening, too.
            let (LocalState::Opening { slot, .. } | LocalState::Piping { slot }) = l.state else {
                continue;
            };
            if l.pipe.as_ref().and_then(Pipe::read_hold) != Some(ReadHold::SendAhead) {
                continue; // pumped since: reading until the socket ran dry
            }
            let ready = self
                .slots
                .get(slot)
                .and_then(Slot::session)
                .is_none_or(|s| READ_AHEAD.allows(s.transport()));
            if ready {
                self.pump_local(now, idx, slot); // holds it again if the hold returned
            } else {
                l.held = true;
                held[kept] = (idx, serial);
                kept += 1;
            }
        }
        // Those still waiting first, then those pumped in this pass and held again.
        held.truncate(kept);
        held.append(&mut self.held);
        self.held_scratch = std::mem::replace(&mut self.held, held);
    }

    fn close_local(&mut self, idx: usize) {
        let Some(mut l) = self.locals.remove(idx) else {
            return;
        };
        let _ = self.core.registry().deregister(&mut l.sock);
        if let LocalState::Direct(d) = &mut l.state {
            d.close(self.core.registry(), &mut self.learned);
            self.opening.remove(idx);
        }
        let ip = l.peer.ip();
        // Captured connections are not counted per address (`admit_captured`).
        if let (None, Some(n)) = (l.captured, self.per_addr.get_mut(&ip)) {
            *n -= 1;
            if *n == 0 {
                self.per_addr.remove(&ip);
            }
        }
        // A transfer cut short (tunnel lost, stream reset, user cut off) must not look complete
        // to the application: close with a reset instead of a FIN.
        let cut = matches!(l.state, LocalState::Piping { .. })
            && !l.pipe.as_ref().is_some_and(|p| p.is_done());
        // A captured connection whose open failed has no proxy reply to carry the failure: it
        // is reset, as a refused connection would be, never ended with a clean FIN.
        let refused_capture = matches!(l.state, LocalState::Closing) && l.captured.is_some();
        if cut || refused_capture {
            crate::sys::reset_on_close(&l.sock);
        }
        let stream = match l.state {
            LocalState::Opening { slot, stream, .. } => Some((slot, stream)),
            LocalState::Piping { slot } => l.pipe.as_ref().map(|p| (slot, p.stream)),
            _ => None,
        };
        if let Some((slot, stream)) = stream {
            if let Some(s) = self.slots.get_mut(slot) {
                if s.streams.remove(&stream).is_some() {
                    if let Some(sess) = s.session_mut() {
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
        if l.captured == Some(Capture::Tun) {
            self.tun_closed(Instant::now(), l.peer);
        }
        self.waiting.remove(idx);
        self.opening.remove(idx);
    }

    // ----- captured connections and flows (TUN and router mode) -----

    /// A connection captured on its way to `dest` becomes a local connection waiting for a
    /// stream there (no proxy request, no reply; only the global cap [`MAX_LOCAL`] applies: one
    /// LAN host may have many). Refused with a reset beyond the cap.
    fn admit_captured(
        &mut self,
        now: Instant,
        sock: TcpStream,
        peer: SocketAddr,
        dest: SocketAddr,
        capture: Capture,
    ) {
        if self.locals.len() >= MAX_LOCAL {
            log::warn!("too many local connections ({MAX_LOCAL}); refusing one");
            if capture == Capture::Tun {
                self.tun_closed(now, peer);
            }
            crate::sys::reset_on_close(&sock);
            return;
        }
        if self.learned_goes_direct(dest, now) {
            self.admit_direct(now, sock, peer, dest, capture);
            return;
        }
        self.open_transparent(now, sock, peer, dest, Some(capture));
    }

    /// A local connection whose destination is known without a proxy request (a captured one,
    /// or the DNS forwarder's TCP side): waiting for a stream to `dest`, no reply written.
    fn open_transparent(
        &mut self,
        now: Instant,
        sock: TcpStream,
        peer: SocketAddr,
        dest: SocketAddr,
        captured: Option<Capture>,
    ) {
        let request = ProxyRequest::Connect {
            dest: Destination::from(dest),
            protocol: proxy_front::FrontProtocol::Transparent,
            early_data: Vec::new(),
        };
        let idx = self.insert_local(now, sock, peer, LocalState::Waiting { request }, captured);
        // DNS over TCP to `tun.dns` or the forwarder's upstream: its answers teach split routing.
        let serial = self.locals.get(idx).map_or(0, |l| l.serial);
        let tap = self.dns_tap(idx, serial, dest);
        if let Some(l) = self.locals.get_mut(idx) {
            l.dns_tap = tap;
        }
        self.try_open(now, idx);
    }

    /// One captured UDP datagram into the tunnel, on its flow's session (`flow_slots`: the
    /// session each flow uses; the server's relay for it lives there). Dropped without a session
    /// or when the session's datagram queue is full: UDP senders retry.
    fn send_flow_datagram(
        &mut self,
        flow_slots: &mut HashMap<AssocId, usize>,
        id: AssocId,
        dest: SocketAddr,
        data: &[u8],
    ) {
        let connected = |s: &Slot| s.state == SlotState::Connected;
        let slot = match flow_slots.get(&id) {
            Some(&s) if self.slots.get(s).is_some_and(connected) => s,
            _ => match self.pick_slot() {
                Some(s) => s,
                None => return,
            },
        };
        flow_slots.insert(id, slot);
        if let Some(session) = self.slots[slot].session_mut() {
            let _ = session
                .transport_mut()
                .send_datagram(id, Destination::from(dest), data);
        }
    }

    // ----- UDP ASSOCIATE -----

    /// Opens a UDP association for local connection `idx`: a socket on the address the
    /// application reached the proxy on (so LAN clients get a reachable address), a fresh id.
    fn start_assoc(&mut self, now: Instant, idx: usize, request: ProxyRequest) {
        let Some(l) = self.locals.get(idx) else {
            return;
        };
        let local_ip = l.sock.local_addr().map_or(self.local_addr.ip(), |a| a.ip());
        let (owner_ip, serial) = (l.peer.ip(), l.serial);
        let hint_port = match &request {
            ProxyRequest::UdpAssociate { client_hint } => Some(client_hint.port()),
            _ => None,
        }
        .filter(|p| *p != 0);
        let bind = SocketAddr::new(local_ip, 0);
        let sock = match std::net::UdpSocket::bind(bind).and_then(|s| {
            s.set_nonblocking(true)?;
            crate::sys::grow_udp_buffers(&s, udp::BURST_SOCKET_BUFFER);
            Ok(s)
        }) {
            Ok(s) => UdpSocket::from_std(s),
            Err(e) => {
                log::warn!("cannot open a UDP relay socket: {e}");
                if let Some(l) = self.locals.get_mut(idx) {
                    l.state = LocalState::Waiting { request };
                }
                self.fail_request(now, idx, Socks5Reply::GeneralFailure);
                return;
            }
        };
        let bound = sock.local_addr().unwrap_or(bind);
        let id = self.new_assoc_id();
        let a = self.assocs.insert_with(|a| {
            let mut sock = sock;
            let _ =
                self.core
                    .registry()
                    .register(&mut sock, Tok::Assoc(a).token(), Interest::READABLE);
            Assoc {
                sock,
                route: AssocRoute {
                    id,
                    owner_ip,
                    hint_port,
                    client: None,
                    slot: None,
                    last_active: now,
                },
                readable: false,
            }
        });
        self.assoc_ids.insert(id, a);
        let reply = request.success_reply(bound);
        if let Some(l) = self.locals.get_mut(idx) {
            l.state = LocalState::Udp { assoc: a };
        }
        self.idle_checks.push_new((idx, serial), now);
        self.send_local(idx, &reply);
    }

    /// An association id not in use, in `1..ASSOC_ID_SPACE`.
    fn new_assoc_id(&mut self) -> AssocId {
        loop {
            self.next_assoc = self.next_assoc % (ASSOC_ID_SPACE - 1) + 1;
            if !self.assoc_ids.contains_key(&self.next_assoc) {
                return self.next_assoc;
            }
        }
    }

    fn close_assoc(&mut self, a: usize) {
        if let Some(mut assoc) = self.assocs.remove(a) {
            let _ = self.core.registry().deregister(&mut assoc.sock);
            self.assoc_ids.remove(&assoc.route.id);
        }
    }

    /// Reads a batch from every UDP association socket that may hold datagrams.
    fn receive_assocs(&mut self, now: Instant) {
        if self.assoc_ready.is_empty() {
            return;
        }
        let mut ready = std::mem::take(&mut self.assoc_scratch);
        std::mem::swap(&mut ready, &mut self.assoc_ready);
        for &a in &ready {
            self.assoc_readable(now, a);
        }
        ready.clear();
        self.assoc_scratch = ready;
    }

    /// Forwards up to one batch of the local application's datagrams into the tunnel; the
    /// association stays marked readable while the batch limit stopped it.
    fn assoc_readable(&mut self, now: Instant, a: usize) {
        let Some(Assoc {
            sock,
            route,
            readable,
        }) = self.assocs.get_mut(a)
        else {
            return;
        };
        if !*readable {
            return; // a stale entry: drained already, or the slot now holds another association
        }
        let (learned, pending) = (&mut self.learned, &mut self.dns_queries);
        let mut uplink = AssocUplink {
            slots: &mut self.slots,
            route,
            now,
            dns: learn::Teacher::new(&self.options, learned, pending, now),
        };
        let readiness = udp::drain(sock, &mut self.buf, RECV_BATCH, |datagram, from| {
            uplink.forward(datagram, from)
        });
        *readable = readiness.still_readable();
        if *readable {
            self.assoc_ready.push(a);
        }
    }

    /// An answer for association `id` (arriving on `slot`, the session it sends on) goes to
    /// that association's owner only.
    fn datagram_in(
        &mut self,
        now: Instant,
        slot: usize,
        id: AssocId,
        dest: Destination,
        data: &[u8],
    ) {
        self.dns_answer_in(now, id, &dest, data);
        let from = match &dest {
            Destination::Addr(a) => Some(*a),
            Destination::Domain { .. } => None,
        };
        if TunFront::owns(id) {
            if let Some(from) = from {
                self.tun_datagram_in(now, id, from, data);
            }
            return;
        }
        if DnsForward::owns(id) {
            if let Some(from) = from {
                self.dns_datagram_in(now, id, from, data);
            }
            return;
        }
        if REDIR_FLOW_IDS.contains(&id) {
            if let Some(from) = from {
                self.redir_datagram_in(now, id, from, data);
            }
            return;
        }
        let Some(assoc) = self
            .assoc_ids
            .get(&id)
            .and_then(|&a| self.assocs.get_mut(a))
        else {
            return;
        };
        if assoc.route.slot != Some(slot) {
            return;
        }
        let Some(client) = assoc.route.client else {
            return;
        };
        assoc.route.last_active = now;
        let hl = proxy_front::socks5_udp_header_len(&dest);
        if hl + data.len() > self.buf.len() {
            return;
        }
        let Ok(written) = proxy_front::write_socks5_udp_header(&dest, &mut self.buf[..hl]) else {
            return;
        };
        self.buf[written..written + data.len()].copy_from_slice(data);
        let _ = assoc
            .sock
            .send_to(&self.buf[..written + data.len()], client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts from `listener` until `deadline`; `None` if nothing was there.
    fn accept_within(listener: &TcpListener, deadline: Duration) -> Option<TcpStream> {
        let start = Instant::now();
        loop {
            match listener.accept() {
                Ok((sock, _)) => return Some(sock),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if start.elapsed() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_proxy_connection_is_handed_over_with_its_first_bytes() {
        let listener = bind_proxy(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut app = std::net::TcpStream::connect(addr).unwrap();
        // Connected for the application, but nothing to wake the loop for yet.
        assert!(
            accept_within(&listener, Duration::from_millis(200)).is_none(),
            "a connection that has sent nothing was handed over"
        );
        app.write_all(&[5, 1, 0]).unwrap();
        let mut sock = accept_within(&listener, Duration::from_secs(5))
            .expect("the connection was not handed over with its greeting");
        let mut greeting = [0u8; 3];
        let n = sock.read(&mut greeting).unwrap();
        assert_eq!(
            &greeting[..n],
            &[5, 1, 0],
            "the greeting is there at the accept"
        );
    }

    fn slot(retiring: bool, streams: usize) -> Slot {
        let mut s = Slot {
            spare: false,
            state: SlotState::Connected,
            sock: None,
            tcp: None,
            carrier: if retiring { Carrier::Tcp } else { Carrier::Udp },
            retiring,
            client: None,
            streams: IdMap::default(),
            tx: UdpTx::new(),
            ticket: None,
            readable: false,
            last_rx: Instant::now(),
            refusal_logged: None,
        };
        for n in 0..streams {
            s.streams.insert(StreamId(n as u64 * 4), n);
        }
        s
    }

    #[test]
    fn a_new_association_avoids_the_retiring_session_like_a_new_stream() {
        // The retiring TCP session has no stream left in its count, the new UDP session 3.
        let mut slots = vec![slot(true, 0), slot(false, 3)];
        assert_eq!(pick_slot(&slots), Some(1));
        let owner = SocketAddr::from(([127, 0, 0, 1], 5000));
        let mut route = AssocRoute {
            id: 1,
            owner_ip: owner.ip(),
            hint_port: None,
            client: None,
            slot: None,
            last_active: Instant::now(),
        };
        let text = r#"{"mode": "client", "server": "127.0.0.1:50000", "access_key": "c8a6fde902b4e23910cde882b7cf1612"}"#;
        let crate::config::Config::Client(cfg) =
            crate::config::parse(std::path::Path::new("c.json"), text).unwrap()
        else {
            panic!("not a client config")
        };
        let options = ClientOptions::from_config(&cfg).unwrap();
        let (mut learned, mut pending) = (
            LearnedAddrs::default(),
            crate::tunnel::learned::PendingQueries::default(),
        );
        let mut datagram = vec![0, 0, 0, 1, 10, 0, 0, 1, 0, 53];
        datagram.extend_from_slice(b"query");
        AssocUplink {
            slots: &mut slots,
            route: &mut route,
            now: Instant::now(),
            dns: learn::Teacher::new(&options, &mut learned, &mut pending, Instant::now()),
        }
        .forward(&datagram, owner);
        assert_eq!(
            route.slot,
            Some(1),
            "the association went to the retiring session"
        );
        // With no other session up, the retiring one still serves.
        slots[1].state = SlotState::Idle;
        route.slot = None;
        AssocUplink {
            slots: &mut slots,
            route: &mut route,
            now: Instant::now(),
            dns: learn::Teacher::new(&options, &mut learned, &mut pending, Instant::now()),
        }
        .forward(&datagram, owner);
        assert_eq!(route.slot, Some(0));
    }
}
