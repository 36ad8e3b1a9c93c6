//! The server loop's TCP carrier connections (docs/PROTOCOL.md §7): the `listen_tcp` listeners,
//! each accepted connection's first-bytes gate, carrier sessions' frames both ways through
//! bounded buffers (the socket's send buffer is the transport's backpressure), and strangers —
//! spliced to the fallback website, or read and discarded until a random deadline, then FIN.
//! Nothing is ever written to a connection before its hello was authenticated. Policy and
//! buffers are the pure types of [`crate::tunnel::carrier_conns`]; this file moves bytes.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use crate::proto::carrier::MAX_FRAME_LEN;
use crate::proto::carrier::gate::{GATE_BUFFER, GateStep, HelloGate, NotOstp, discard_deadline};
use crate::proto::carrier::records::MAX_REPLY_RECORD;
use crate::proto::endpoint::CarrierHello;
use crate::proto::id_map::IdMap;
use crate::proto::rng::Drbg;
use crate::proto::transport::CloseReason;
use crate::proto::{ServerEndpoint, SessionId};
use crate::tunnel::carrier_conns::{
    ConnKey, DeadlineHeap, FdSlice, NotOstpReason, OldestFirst, Stranger, quiet_deadline,
    stranger_fate,
};
use crate::tunnel::driver::token::Tok;
use crate::tunnel::slab::Slab;
use crate::tunnel::splice::{BufPool, ByteBuf, Half};
use crate::tunnel::stats::TcpStats;

/// The two groups of connections bounded by `max_unauthenticated_tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bounded {
    /// Undecided or discarding connections.
    Strangers,
    /// Fallback splices.
    Splices,
}

/// Whether a connection is (still) a member of a bounded group.
type Member = fn(&Slab<Conn>, &ConnKey) -> bool;

/// Connections accepted per listener per loop iteration (the rest wait for the next one).
const ACCEPT_BATCH: usize = 64;
/// Bytes one connection may read (or a carrier session write) per service before others get a
/// turn; a connection that had more is serviced again on the next iteration.
const IO_BUDGET: usize = 256 * 1024;
/// A carrier connection's write buffer: a few full frames (more waits in the session).
const CARRIER_WRITE_BUF: usize = 4 * MAX_FRAME_LEN;
/// Spare frame buffers of each size kept for reuse (a carrier session holds its buffers only
/// while bytes are in them): what idle sessions leave behind is at most this many of each.
const SPARE_BUFFERS: usize = 8;
/// Each direction of a fallback splice.
const SPLICE_BUF: usize = 16 * 1024;
/// A fallback splice that moves nothing either way for this long is closed.
const SPLICE_IDLE: Duration = Duration::from_secs(120);
/// How long the fallback may take to accept the connection.
const FALLBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refusal or a closed session's last frames may take to leave before the
/// connection is dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// After our FIN, incoming bytes are read (and dropped) until the peer's FIN or this long, so
/// the close does not turn into a reset because of unread data.
const LINGER: Duration = Duration::from_secs(5);

/// What a connection is doing.
enum Phase {
    /// Undecided: the first bytes are read into a buffer of [`GATE_BUFFER`] bytes; once some
    /// arrived, the connection is given up when no more come until `quiet_until`
    /// ([`quiet_deadline`]).
    Gate {
        gate: HelloGate,
        buf: ByteBuf,
        quiet_until: Option<Instant>,
    },
    /// Carrying `session`: frames in (`input`, one whole frame at most) and out (`output`).
    /// Both hold storage only while bytes are in them (an idle session holds none); `charged`
    /// is what the loop was last told they hold ([`Carriers::memory_changes`]).
    Carrier {
        session: SessionId,
        input: ByteBuf,
        output: ByteBuf,
        charged: usize,
        /// The session may have more frames (it left the endpoint's ready queue before `None`).
        more: bool,
        /// The peer sent its FIN (the session is being closed).
        read_closed: bool,
    },
    /// Writing what is left (a refusal, a closed session's last frames), then FIN.
    Flush { output: ByteBuf, until: Instant },
    /// Not OSTP, no fallback: read and dropped until `until`, then FIN.
    Discard { until: Instant },
    /// Not OSTP: spliced to the fallback.
    Splice(Box<Splice>),
    /// Our FIN is sent: read and dropped until the peer's FIN or `until`, then closed.
    Finish { until: Instant },
}

/// A stranger's connection spliced to the fallback website.
struct Splice {
    target: TcpStream,
    connected: bool,
    target_readable: bool,
    target_writable: bool,
    /// Client → fallback (the bytes read before the decision first).
    up: Half,
    /// Fallback → client.
    down: Half,
    started: Instant,
    last_activity: Instant,
}

impl Phase {
    /// When the phase ends at the latest.
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Gate {
                gate, quiet_until, ..
            } => Some(quiet_until.map_or(gate.deadline(), |q| q.min(gate.deadline()))),
            Phase::Carrier { .. } => None,
            Phase::Flush { until, .. } | Phase::Discard { until } | Phase::Finish { until } => {
                Some(*until)
            }
            Phase::Splice(s) if s.connected => Some(s.last_activity + SPLICE_IDLE),
            Phase::Splice(s) => Some(s.started + FALLBACK_CONNECT_TIMEOUT),
        }
    }
}

/// One accepted TCP connection.
struct Conn {
    key: ConnKey,
    sock: TcpStream,
    peer: SocketAddr,
    accepted_at: Instant,
    /// Edge-triggered readiness not yet used up.
    readable: bool,
    writable: bool,
    /// Counted in `Carriers::strangers` (undecided, discarding, or finishing after a discard).
    stranger: bool,
    /// Counted in `Carriers::splices`.
    spliced: bool,
    /// In `Carriers::busy`.
    queued: bool,
    phase: Phase,
}

/// What a service of one connection needs from the rest of the loop.
pub(super) struct CarrierIo<'a> {
    pub endpoint: &'a mut ServerEndpoint,
    pub stats: &'a mut TcpStats,
    pub registry: &'a Registry,
    pub now: Instant,
    /// Wall-clock unix seconds (the hello tags' epochs, the clock window).
    pub unix: u64,
}

/// The TCP listeners and every accepted connection.
pub(super) struct Carriers {
    listeners: Vec<TcpListener>,
    /// A listener that hit [`ACCEPT_BATCH`] (more may wait).
    listener_busy: Vec<bool>,
    /// The addresses actually bound (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    conns: Slab<Conn>,
    by_session: IdMap<SessionId, usize>,
    /// Undecided and discarding connections, at most `max_unauthenticated_tcp`.
    strangers: OldestFirst,
    /// Fallback splices, at most `max_unauthenticated_tcp`.
    splices: OldestFirst,
    deadlines: DeadlineHeap,
    /// The fds of accepted connections and fallback sockets, within their slice of the budget.
    fds: FdSlice,
    /// Accepting stopped for want of an fd (connections wait in the backlog): resumed as soon
    /// as one is closed.
    accept_paused: bool,
    /// Connections to service again without a new event (budget used up).
    busy: Vec<ConnKey>,
    busy_spare: Vec<ConnKey>,
    fallback: Option<SocketAddr>,
    rng: Drbg,
    serials: u64,
    /// Spare storage for carrier sessions' input ([`MAX_FRAME_LEN`]) and output
    /// ([`CARRIER_WRITE_BUF`]) buffers.
    in_pool: BufPool,
    out_pool: BufPool,
    /// Carrier sessions whose buffers' storage changed since the loop last asked.
    memory_changed: Vec<SessionId>,
}

/// A listener could not be set up.
#[derive(Debug)]
pub(super) struct BindError {
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl Carriers {
    /// Binds the `listen_tcp` addresses and registers them; accepted connections and fallback
    /// sockets hold at most `max_fds` fds.
    pub fn bind(
        addrs: &[SocketAddr],
        registry: &Registry,
        fallback: Option<SocketAddr>,
        max_unauthenticated: usize,
        max_fds: usize,
        seed: [u8; 32],
    ) -> Result<Carriers, BindError> {
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            let bound = crate::sys::listen_tcp(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                let mut l = TcpListener::from_std(l);
                registry.register(&mut l, Tok::TcpListen(i).token(), Interest::READABLE)?;
                Ok(l)
            });
            let l = bound.map_err(|error| BindError { addr, error })?;
            local_addrs.push(l.local_addr().unwrap_or(addr));
            listeners.push(l);
        }
        Ok(Carriers {
            listener_busy: vec![false; listeners.len()],
            listeners,
            local_addrs,
            conns: Slab::new(),
            by_session: IdMap::default(),
            strangers: OldestFirst::new(max_unauthenticated),
            splices: OldestFirst::new(max_unauthenticated),
            deadlines: DeadlineHeap::default(),
            fds: FdSlice::new(max_fds),
            accept_paused: false,
            busy: Vec::new(),
            busy_spare: Vec::new(),
            fallback,
            rng: Drbg::new(seed),
            serials: 0,
            in_pool: BufPool::new(MAX_FRAME_LEN, SPARE_BUFFERS),
            out_pool: BufPool::new(CARRIER_WRITE_BUF, SPARE_BUFFERS),
            memory_changed: Vec::new(),
        })
    }

    /// Where strangers go from now on (SIGHUP).
    pub fn set_fallback(&mut self, fallback: Option<SocketAddr>) {
        self.fallback = fallback;
    }

    /// Work that cannot wait for an event (a listener or connection stopped at its budget, or
    /// a change of what carrier sessions hold not yet charged: streams held for room may go on).
    pub fn has_work(&self) -> bool {
        !self.busy.is_empty()
            || self.listener_busy.iter().any(|b| *b)
            || !self.memory_changed.is_empty()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.next_deadline()
    }

    /// Bytes the frame buffers of carrier session `session` hold now (0 while idle).
    pub fn session_memory(&self, session: SessionId) -> usize {
        let conn = self
            .by_session
            .get(&session)
            .and_then(|&i| self.conns.get(i));
        match conn.map(|c| &c.phase) {
            Some(Phase::Carrier { input, output, .. }) => input.allocated() + output.allocated(),
            _ => 0,
        }
    }

    /// Calls `charge` with each carrier session whose [`Self::session_memory`] changed since
    /// the last call and what it holds now (the loop charges it to the user's buffered share).
    pub fn memory_changes(&mut self, mut charge: impl FnMut(SessionId, usize)) {
        let mut changed = std::mem::take(&mut self.memory_changed);
        for session in changed.drain(..) {
            charge(session, self.session_memory(session));
        }
        self.memory_changed = changed;
    }

    /// Gives back the storage of a carrier session's empty buffers and notes a change of what
    /// it holds.
    fn settle(&mut self, idx: usize) {
        let Some(Conn {
            phase:
                Phase::Carrier {
                    session,
                    input,
                    output,
                    charged,
                    ..
                },
            ..
        }) = self.conns.get_mut(idx)
        else {
            return;
        };
        input.release(&mut self.in_pool);
        output.release(&mut self.out_pool);
        let held = input.allocated() + output.allocated();
        if held != *charged {
            *charged = held;
            self.memory_changed.push(*session);
        }
    }

    /// Gauges for `/metrics`.
    pub fn gauges(&self, stats: &mut TcpStats) {
        stats.unauthenticated = self.strangers.members() as u64;
        stats.carriers = self.by_session.len() as u64;
        stats.splices = self.splices.members() as u64;
    }

    fn live(&self, key: ConnKey) -> bool {
        self.conns.get(key.index).is_some_and(|c| c.key == key)
    }

    fn is_stranger(conns: &Slab<Conn>, key: &ConnKey) -> bool {
        conns
            .get(key.index)
            .is_some_and(|c| c.key == *key && c.stranger)
    }

    fn is_spliced(conns: &Slab<Conn>, key: &ConnKey) -> bool {
        conns
            .get(key.index)
            .is_some_and(|c| c.key == *key && c.spliced)
    }

    // ----- events -----

    /// Listener `i` is readable (or was left with connections waiting).
    pub fn accept(&mut self, io: &mut CarrierIo, i: usize) {
        let mut busy = true;
        for _ in 0..ACCEPT_BATCH {
            if !self.fds.has_room() && self.strangers.members() == 0 {
                // Every fd of the slice carries a session or a splice: the connection waits in
                // the backlog until one closes (`fd_closed`).
                self.accept_paused = true;
                busy = false;
                break;
            }
            let Some(listener) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => {
                    if !self.fds.has_room() {
                        // At the slice's cap the oldest stranger makes room (a FIN).
                        self.evict_oldest(io, Bounded::Strangers);
                    }
                    self.accepted(io, sock, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    busy = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of fds or memory: the connection waits in the backlog; the next
                    // arrival (or a closed connection's fd) lets it in.
                    log::debug!("tcp accept on {:?}: {e}", self.local_addrs.get(i));
                    busy = false;
                    break;
                }
            }
        }
        if let Some(b) = self.listener_busy.get_mut(i) {
            *b = busy;
        }
    }

    /// `n` fds were closed: a paused accept resumes.
    fn fd_closed(&mut self, n: usize) {
        self.fds.give(n);
        if std::mem::take(&mut self.accept_paused) {
            self.listener_busy.fill(true);
        }
    }

    fn accepted(&mut self, io: &mut CarrierIo, mut sock: TcpStream, peer: SocketAddr) {
        io.stats.accepted += 1;
        let _ = sock.set_nodelay(true);
        let index = self.conns.next_index();
        let token = Tok::Carrier(index).token();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if !self.fds.take() {
            // `accept` made room first; never hold more fds than the slice (closed unanswered).
            debug_assert!(self.fds.has_room(), "an accepted connection without an fd");
            return;
        }
        if let Err(e) = io.registry.register(&mut sock, token, interest) {
            log::warn!("cannot register a tcp connection: {e}");
            self.fds.give(1);
            return;
        }
        self.serials += 1;
        let key = ConnKey {
            index,
            serial: self.serials,
        };
        let gate = HelloGate::new(io.now);
        self.deadlines.push(gate.deadline(), key);
        let conn = Conn {
            key,
            sock,
            peer,
            accepted_at: io.now,
            readable: false,
            writable: false,
            stranger: false,
            spliced: false,
            queued: false,
            phase: Phase::Gate {
                gate,
                buf: ByteBuf::new(GATE_BUFFER),
                quiet_until: None,
            },
        };
        let idx = self.conns.insert(conn);
        debug_assert_eq!(idx, index);
        self.enter_strangers(io, key);
    }

    /// `key` is undecided or discarding: counted against the bound; the oldest over it closed.
    fn enter_strangers(&mut self, io: &mut CarrierIo, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key.index) else {
            return;
        };
        if c.stranger {
            return;
        }
        c.stranger = true;
        self.enter_bounded(io, key, Bounded::Strangers);
    }

    /// Counts `key` in one of the two bounded groups and closes the oldest members over the
    /// bound.
    fn enter_bounded(&mut self, io: &mut CarrierIo, key: ConnKey, group: Bounded) {
        let (set, conns, member) = self.bounded(group);
        set.enter(key, |k| member(conns, k));
        while self.bounded(group).0.over_cap() && self.evict_oldest(io, group) {}
    }

    /// A bounded group, the connections and its membership test.
    fn bounded(&mut self, group: Bounded) -> (&mut OldestFirst, &Slab<Conn>, Member) {
        match group {
            Bounded::Strangers => (&mut self.strangers, &self.conns, Self::is_stranger),
            Bounded::Splices => (&mut self.splices, &self.conns, Self::is_spliced),
        }
    }

    /// Closes the oldest member of `group` (strangers gracefully, with FIN; splices at once);
    /// `false` if it has none.
    fn evict_oldest(&mut self, io: &mut CarrierIo, group: Bounded) -> bool {
        let (set, conns, member) = self.bounded(group);
        let Some(oldest) = set.pop_oldest(|k| member(conns, k)) else {
            return false;
        };
        if let Some(c) = self.conns.get_mut(oldest.index) {
            match group {
                Bounded::Strangers => c.stranger = false,
                Bounded::Splices => c.spliced = false,
            }
        }
        io.stats.evicted += 1;
        self.close(io, oldest.index, group == Bounded::Strangers);
        true
    }

    fn leave_strangers(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            if std::mem::take(&mut c.stranger) {
                self.strangers.leave();
            }
        }
    }

    /// A readiness event on an accepted connection.
    pub fn on_conn_event(
        &mut self,
        io: &mut CarrierIo,
        idx: usize,
        readable: bool,
        writable: bool,
    ) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        c.readable |= readable;
        c.writable |= writable;
        self.service(io, idx);
    }

    /// A readiness event on a fallback socket.
    pub fn on_fallback_event(
        &mut self,
        io: &mut CarrierIo,
        idx: usize,
        readable: bool,
        writable: bool,
    ) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if let Phase::Splice(s) = &mut c.phase {
            s.target_readable |= readable;
            s.target_writable |= writable;
            self.service(io, idx);
        }
    }

    /// Services the listeners and connections left with work by their budget.
    pub fn service_busy(&mut self, io: &mut CarrierIo) {
        for i in 0..self.listeners.len() {
            if self.listener_busy.get(i).copied().unwrap_or(false) {
                self.accept(io, i);
            }
        }
        // Swapped with a kept list: no allocation per wake-up.
        let mut list = std::mem::take(&mut self.busy_spare);
        std::mem::swap(&mut list, &mut self.busy);
        for key in list.drain(..) {
            if let Some(c) = self.conns.get_mut(key.index).filter(|c| c.key == key) {
                c.queued = false;
                self.service(io, key.index);
            }
        }
        self.busy_spare = list;
    }

    fn mark_busy(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            if !c.queued {
                c.queued = true;
                self.busy.push(c.key);
            }
        }
    }

    /// Does whatever the connection's phase and readiness allow.
    fn service(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get(idx) else {
            return;
        };
        match c.phase {
            Phase::Gate { .. } => self.service_gate(io, idx),
            Phase::Carrier { .. } => {
                self.carrier_input(io, idx);
                self.carrier_output(io, idx);
                self.settle(idx);
            }
            Phase::Flush { .. } => self.flush(io, idx),
            Phase::Discard { .. } | Phase::Finish { .. } => self.drain(io, idx),
            Phase::Splice(_) => self.splice(io, idx),
        }
    }

    // ----- the gate -----

    fn service_gate(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let Phase::Gate {
            gate,
            buf,
            quiet_until,
        } = &mut c.phase
        else {
            return;
        };
        let before = buf.data().len();
        let mut eof = false;
        while c.readable && !buf.is_full() {
            match buf.read_from(&mut c.sock) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(io, idx, false);
                    return;
                }
            }
        }
        match gate.step(io.now, buf.data(), &io.endpoint.carrier_directory(io.unix)) {
            GateStep::NeedMore if eof => self.not_ostp(io, idx, NotOstpReason::Truncated),
            // Cannot happen (the gate decides within its buffer); never wait forever on it.
            GateStep::NeedMore if buf.is_full() => {
                self.not_ostp(io, idx, NotOstpReason::Gate(NotOstp::BadLength))
            }
            GateStep::NeedMore if buf.data().len() > before => {
                let at = quiet_deadline(io.now, &mut self.rng);
                *quiet_until = Some(at);
                self.deadlines.push(at, c.key);
            }
            GateStep::NeedMore if quiet_until.is_some_and(|q| io.now >= q) => {
                self.not_ostp(io, idx, NotOstpReason::Gate(NotOstp::Timeout))
            }
            GateStep::NeedMore => {}
            GateStep::Hello { user, len } => self.hello(io, idx, user, len),
            GateStep::NotOstp(r) => self.not_ostp(io, idx, NotOstpReason::Gate(r)),
        }
    }

    /// A whole hello record of `user` is the first `len` bytes: authenticate and answer it.
    fn hello(&mut self, io: &mut CarrierIo, idx: usize, user: crate::proto::UserId, len: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let Phase::Gate { buf, .. } = &mut c.phase else {
            return;
        };
        let mut output = ByteBuf::lazy(CARRIER_WRITE_BUF);
        output.ensure(&mut self.out_pool);
        // The endpoint opens the record in place; a hello that fails after that (clock window,
        // record) goes to the fallback, which must get the bytes the client sent: open a copy.
        let mut record = [0u8; GATE_BUFFER];
        let (Some(sent), Some(reply)) = (
            buf.data().get(..len),
            output.spare_at_least(MAX_REPLY_RECORD),
        ) else {
            self.not_ostp(io, idx, NotOstpReason::Hello);
            return;
        };
        let Some(record) = record.get_mut(..len) else {
            self.not_ostp(io, idx, NotOstpReason::Hello);
            return;
        };
        record.copy_from_slice(sent);
        match io
            .endpoint
            .handle_carrier_hello(io.now, io.unix, c.peer, user, record, reply)
        {
            CarrierHello::Accepted { session, reply_len } => {
                output.commit(reply_len);
                let early = buf.data().get(len..).unwrap_or_default();
                let mut input = ByteBuf::lazy(MAX_FRAME_LEN);
                if !early.is_empty() {
                    input.ensure(&mut self.in_pool);
                    let n = early.len().min(MAX_FRAME_LEN);
                    input.spare()[..n].copy_from_slice(&early[..n]);
                    input.commit(n);
                }
                c.phase = Phase::Carrier {
                    session,
                    input,
                    output,
                    charged: 0,
                    more: true,
                    read_closed: false,
                };
                io.stats.sessions += 1;
                self.by_session.insert(session, idx);
                self.leave_strangers(idx);
                self.feed(io, idx);
                self.carrier_output(io, idx);
                self.carrier_input(io, idx);
                self.settle(idx);
            }
            CarrierHello::Refused { reply_len } => {
                output.commit(reply_len);
                io.stats.refused += 1;
                let until = io.now + FLUSH_TIMEOUT;
                c.phase = Phase::Flush { output, until };
                self.deadlines.push(until, c.key);
                self.leave_strangers(idx);
                self.flush(io, idx);
            }
            CarrierHello::NotOstp => self.not_ostp(io, idx, NotOstpReason::Hello),
        }
    }

    // ----- strangers -----

    /// The connection is not OSTP: fallback or discard. Nothing is ever written to it by us.
    fn not_ostp(&mut self, io: &mut CarrierIo, idx: usize, reason: NotOstpReason) {
        io.stats.not_ostp[reason.index()] += 1;
        match stranger_fate(reason, self.fallback) {
            Stranger::Fallback(target) => self.start_splice(io, idx, target),
            Stranger::Discard => self.start_discard(io, idx, reason),
        }
    }

    fn start_discard(&mut self, io: &mut CarrierIo, idx: usize, reason: NotOstpReason) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        // A framing failure starts its own random wait; strangers at the door count from the
        // accept (§7.2).
        let from = if reason == NotOstpReason::Framing {
            io.now
        } else {
            c.accepted_at
        };
        let until = discard_deadline(from, &mut self.rng);
        let phase = std::mem::replace(&mut c.phase, Phase::Discard { until });
        if let Phase::Splice(mut s) = phase {
            let _ = io.registry.deregister(&mut s.target);
            drop(s);
            self.fd_closed(1);
        }
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        io.stats.discards += 1;
        let key = c.key;
        self.deadlines.push(until, key);
        if std::mem::take(&mut c.spliced) {
            self.splices.leave();
        }
        self.enter_strangers(io, key);
        if self.live(key) {
            self.drain(io, idx);
        }
    }

    fn start_splice(&mut self, io: &mut CarrierIo, idx: usize, target: SocketAddr) {
        if !self.fds.has_room() {
            // At the slice's cap the oldest other stranger makes room (a FIN), as at accept:
            // a stranger gets the fallback whenever one can (a prober sees the website).
            self.leave_strangers(idx);
            self.evict_oldest(io, Bounded::Strangers);
        }
        if !self.fds.take() {
            // No fd for the fallback socket: discarded instead (as a failed fallback).
            io.stats.fallback_failed += 1;
            self.start_discard(io, idx, NotOstpReason::Hello);
            return;
        }
        let Some(c) = self.conns.get_mut(idx) else {
            self.fds.give(1);
            return;
        };
        let early = match &c.phase {
            Phase::Gate { buf, .. } => buf.data(),
            _ => &[],
        };
        let registered = TcpStream::connect(target).and_then(|mut t| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            io.registry
                .register(&mut t, Tok::Fallback(idx).token(), interest)?;
            Ok(t)
        });
        let target_sock = match registered {
            Ok(t) => t,
            Err(e) => {
                log::debug!("fallback {target}: {e}");
                self.fds.give(1);
                io.stats.fallback_failed += 1;
                self.start_discard(io, idx, NotOstpReason::Hello);
                return;
            }
        };
        let splice = Splice {
            target: target_sock,
            connected: false,
            target_readable: false,
            target_writable: false,
            up: Half::new(SPLICE_BUF, early),
            down: Half::new(SPLICE_BUF, &[]),
            started: io.now,
            last_activity: io.now,
        };
        c.phase = Phase::Splice(Box::new(splice));
        c.spliced = true;
        let key = c.key;
        io.stats.fallback_splices += 1;
        self.deadlines.push(io.now + FALLBACK_CONNECT_TIMEOUT, key);
        self.leave_strangers(idx);
        self.enter_bounded(io, key, Bounded::Splices);
        if self.live(key) {
            self.splice(io, idx);
        }
    }

    /// Moves bytes both ways between a stranger and the fallback, passing each end on.
    fn splice(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let Conn {
            sock,
            readable,
            writable,
            phase,
            ..
        } = c;
        let Phase::Splice(s) = phase else {
            return;
        };
        if !s.connected && (s.target_writable || s.target_readable) {
            match connect_result(&s.target) {
                Some(Ok(())) => {
                    s.connected = true;
                    s.last_activity = io.now;
                }
                Some(Err(e)) => {
                    log::debug!("fallback connect: {e}");
                    io.stats.fallback_failed += 1;
                    self.start_discard(io, idx, NotOstpReason::Hello);
                    return;
                }
                None => s.target_writable = false,
            }
        }
        let connected = s.connected;
        let mut target = &s.target;
        let mut client = &*sock;
        let up = s.up.pump(
            &mut client,
            readable,
            &mut target,
            &mut s.target_writable,
            connected,
            IO_BUDGET,
        );
        let down = if connected {
            s.down.pump(
                &mut target,
                &mut s.target_readable,
                &mut client,
                writable,
                true,
                IO_BUDGET,
            )
        } else {
            Ok(Default::default())
        };
        let (up, down) = match (up, down) {
            (Ok(u), Ok(d)) => (u, d),
            _ => {
                self.close(io, idx, false);
                return;
            }
        };
        if up.shut_dst {
            let _ = s.target.shutdown(Shutdown::Write);
        }
        if down.shut_dst {
            let _ = sock.shutdown(Shutdown::Write);
        }
        if up.read + up.written + down.read + down.written > 0 {
            s.last_activity = io.now;
        }
        if s.up.finished() && s.down.finished() {
            self.close(io, idx, false);
            return;
        }
        let more =
            connected && (s.up.may_read_more(*readable) || s.down.may_read_more(s.target_readable));
        if more {
            self.mark_busy(idx);
        }
    }

    /// Reads and drops what a discarded or finishing connection sends; a finishing one closes
    /// at the peer's FIN.
    fn drain(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        match drain_reads(&mut c.sock, &mut c.readable, IO_BUDGET) {
            Drained::Open => {}
            Drained::Budget => self.mark_busy(idx),
            Drained::Eof if matches!(c.phase, Phase::Finish { .. }) => self.close(io, idx, false),
            // A discarded stranger's FIN changes nothing: it is closed at its deadline.
            Drained::Eof => {}
            Drained::Error => self.close(io, idx, false),
        }
    }

    // ----- carrier sessions -----

    /// Reads frames into the session, a budget's worth at most.
    fn carrier_input(&mut self, io: &mut CarrierIo, idx: usize) {
        let mut budget = IO_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(idx) else {
                return;
            };
            let Phase::Carrier {
                session,
                input,
                read_closed,
                ..
            } = &mut c.phase
            else {
                return;
            };
            let session = *session;
            if !c.readable || *read_closed {
                return;
            }
            if budget == 0 {
                self.mark_busy(idx);
                return;
            }
            if input.is_full() {
                // The endpoint takes every whole frame and no frame is larger than the buffer.
                self.framing_failed(io, idx, session);
                return;
            }
            input.ensure(&mut self.in_pool);
            match input.read_from(&mut c.sock) {
                Ok(0) => {
                    // §7.5: the connection's end ends the session (`SessionClosed` follows).
                    *read_closed = true;
                    io.endpoint
                        .carrier_connection_lost(session, CloseReason::Normal);
                    return;
                }
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(io, idx, false);
                    return;
                }
            }
            if !self.feed(io, idx) {
                return;
            }
        }
    }

    /// Hands the whole frames read so far to the session. `false`: the connection left the
    /// carrier phase (framing failure).
    fn feed(&mut self, io: &mut CarrierIo, idx: usize) -> bool {
        let Some(c) = self.conns.get_mut(idx) else {
            return false;
        };
        let Phase::Carrier { session, input, .. } = &mut c.phase else {
            return false;
        };
        let session = *session;
        if input.is_empty() {
            return true;
        }
        match io
            .endpoint
            .handle_carrier_input(io.now, session, input.data_mut())
        {
            Ok(n) => {
                input.consume(n);
                true
            }
            Err(e) => {
                log::debug!("carrier session {}: framing failure: {e:?}", session.0);
                self.framing_failed(io, idx, session);
                false
            }
        }
    }

    /// §7.4 failure: the session is over (at once, no CLOSE) and the connection is read and
    /// discarded until a random deadline: no byte more is written to it.
    fn framing_failed(&mut self, io: &mut CarrierIo, idx: usize, session: SessionId) {
        self.by_session.remove(&session);
        io.endpoint
            .carrier_connection_lost(session, CloseReason::ProtocolViolation);
        self.not_ostp(io, idx, NotOstpReason::Framing);
    }

    /// Frames from the session into the write buffer and on to the socket, while both have
    /// room (backpressure: a full socket stops the polling; writable resumes it).
    fn carrier_output(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let Phase::Carrier {
            session,
            output,
            more,
            ..
        } = &mut c.phase
        else {
            return;
        };
        let mut budget = IO_BUDGET;
        if *more {
            output.ensure(&mut self.out_pool);
        }
        loop {
            while *more {
                let Some(spare) = output.spare_at_least(MAX_FRAME_LEN) else {
                    break;
                };
                match io.endpoint.poll_transmit_frame(io.now, *session, spare) {
                    Some(n) if n > 0 => output.commit(n),
                    _ => *more = false,
                }
            }
            if output.is_empty() || !c.writable {
                return;
            }
            match output.write_to(&mut c.sock) {
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.writable = false;
                    return;
                }
                Err(_) => {
                    self.close(io, idx, false);
                    return;
                }
            }
            if !*more && output.is_empty() {
                return;
            }
            if budget == 0 {
                self.mark_busy(idx);
                return;
            }
        }
    }

    /// The endpoint has frames for some carrier sessions.
    pub fn flush_ready(&mut self, io: &mut CarrierIo) {
        while let Some(session) = io.endpoint.poll_carrier_ready() {
            let Some(&idx) = self.by_session.get(&session) else {
                continue;
            };
            if let Some(Conn {
                phase: Phase::Carrier { more, .. },
                ..
            }) = self.conns.get_mut(idx)
            {
                *more = true;
            }
            self.carrier_output(io, idx);
            self.settle(idx);
        }
    }

    /// A session ended: if it was a carrier, its last frames leave, then FIN.
    pub fn session_closed(&mut self, io: &mut CarrierIo, session: SessionId) {
        let Some(idx) = self.by_session.remove(&session) else {
            return;
        };
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let until = io.now + FLUSH_TIMEOUT;
        let phase = std::mem::replace(&mut c.phase, Phase::Finish { until });
        let Phase::Carrier { mut output, .. } = phase else {
            c.phase = phase;
            return;
        };
        while let Some(spare) = output.spare_at_least(MAX_FRAME_LEN) {
            match io.endpoint.poll_transmit_frame(io.now, session, spare) {
                Some(n) if n > 0 => output.commit(n),
                _ => break,
            }
        }
        c.phase = Phase::Flush { output, until };
        self.deadlines.push(until, c.key);
        self.flush(io, idx);
    }

    /// Writes what is left, then FIN.
    fn flush(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let Phase::Flush { output, .. } = &mut c.phase else {
            return;
        };
        if c.writable && !output.is_empty() {
            match output.write_to(&mut c.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(_) => {
                    self.close(io, idx, false);
                    return;
                }
            }
        }
        if output.is_empty() {
            self.finish(io, idx);
        } else {
            self.drain_only(io, idx);
        }
    }

    /// Reads and drops incoming bytes without changing the phase.
    fn drain_only(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        match drain_reads(&mut c.sock, &mut c.readable, IO_BUDGET) {
            Drained::Open | Drained::Eof => {}
            Drained::Budget => self.mark_busy(idx),
            Drained::Error => self.close(io, idx, false),
        }
    }

    /// FIN now; closed at the peer's FIN or after [`LINGER`].
    fn finish(&mut self, io: &mut CarrierIo, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let _ = c.sock.shutdown(Shutdown::Write);
        let until = io.now + LINGER;
        c.phase = Phase::Finish { until };
        self.deadlines.push(until, c.key);
        self.drain(io, idx);
    }

    // ----- deadlines and closing -----

    /// Carries out the deadlines that are due: the hello deadline, discard deadlines, flush and
    /// linger limits, fallback connect and idle timeouts.
    pub fn expire(&mut self, io: &mut CarrierIo) {
        while let Some(key) = self.deadlines.pop_due(io.now) {
            let Some(c) = self.conns.get(key.index).filter(|c| c.key == key) else {
                continue;
            };
            match c.phase.deadline() {
                Some(at) if at <= io.now => {}
                // An idle splice moved since: its entry follows its activity.
                Some(at) if matches!(c.phase, Phase::Splice(_)) => {
                    self.deadlines.push(at, key);
                    continue;
                }
                _ => continue,
            }
            match &c.phase {
                Phase::Gate { .. } => self.service_gate(io, key.index),
                Phase::Discard { .. } => self.finish(io, key.index),
                Phase::Splice(s) if !s.connected => {
                    io.stats.fallback_failed += 1;
                    self.start_discard(io, key.index, NotOstpReason::Hello);
                }
                _ => self.close(io, key.index, false),
            }
        }
    }

    /// Forgets a connection. `graceful`: drop what it sent and FIN (an evicted stranger); else
    /// just close.
    fn close(&mut self, io: &mut CarrierIo, idx: usize, graceful: bool) {
        let Some(mut c) = self.conns.remove(idx) else {
            return;
        };
        if c.stranger {
            self.strangers.leave();
        }
        if c.spliced {
            self.splices.leave();
        }
        let _ = io.registry.deregister(&mut c.sock);
        match &mut c.phase {
            Phase::Carrier { session, .. } => {
                self.by_session.remove(session);
                io.endpoint
                    .carrier_connection_lost(*session, CloseReason::Normal);
            }
            Phase::Splice(s) => {
                let _ = io.registry.deregister(&mut s.target);
            }
            _ => {}
        }
        if graceful {
            let mut readable = true;
            let _ = drain_reads(&mut c.sock, &mut readable, IO_BUDGET);
            let _ = c.sock.shutdown(Shutdown::Write);
        }
        let fds = 1 + usize::from(matches!(c.phase, Phase::Splice(_)));
        drop(c);
        self.fd_closed(fds);
    }
}

/// Whether a non-blocking connect finished: `None` while it is still under way.
fn connect_result(sock: &TcpStream) -> Option<io::Result<()>> {
    match sock.take_error() {
        Ok(Some(e)) | Err(e) => return Some(Err(e)),
        Ok(None) => {}
    }
    match sock.peer_addr() {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
        Err(e) => Some(Err(e)),
    }
}

enum Drained {
    /// Read until the socket had nothing more.
    Open,
    /// The budget ran out first.
    Budget,
    Eof,
    Error,
}

/// Reads and drops up to `budget` bytes.
fn drain_reads(sock: &mut TcpStream, readable: &mut bool, budget: usize) -> Drained {
    let mut scratch = [0u8; 4096];
    let mut total = 0;
    while *readable {
        if total >= budget {
            return Drained::Budget;
        }
        match sock.read(&mut scratch) {
            Ok(0) => return Drained::Eof,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => *readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Drained::Error,
        }
    }
    Drained::Open
}
