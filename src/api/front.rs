//! The API's network front end (the "screen" in front of tiny_http): one mio thread owns the
//! public listening socket and every client connection (bounded count, per-request deadlines,
//! bounded buffers), reads and validates complete requests without blocking, and hands them to
//! a fixed pool of relay threads; each relay passes the request to the tiny_http server
//! ([`super::backend`]) and sends the response bytes back through a channel + `mio::Waker`.
//!
//! Why tiny_http is not exposed directly (measured against tiny_http 0.12.0):
//! - it starts a thread for every accepted connection (its task pool grows without limit)
//!   and sets no read timeouts, so idle or byte-at-a-time clients each pin a thread forever;
//!   setting `SO_RCVTIMEO` on the listener does not help: Linux applies it to `accept()` too,
//!   and tiny_http's accept loop exits on the first `EAGAIN` (the API would stop after one
//!   idle timeout);
//! - a request with a huge `Content-Length` aborts the whole process: its body reader
//!   allocates the unread remainder (`vec![0; remaining]`) when dropped.
//!
//! Here idle and slow connections cost only a buffer in the mio loop, bodies over 64 KiB are
//! refused before tiny_http sees them, and the thread count is fixed.
//!
//! Connections are persistent (HTTP/1.1 keep-alive): HTTP/1.1 stays open unless the request says
//! `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`; every response says
//! `Connection: keep-alive` or `close`, and the front end does what it says. Requests are served
//! one at a time per connection, in order; bytes that arrive behind a request (pipelining) are
//! kept and parsed as the next request. A malformed request gets a 4xx with `Connection: close`,
//! then the connection closes. A keep-alive connection waiting for its next request is *idle*: it
//! closes after [`Limits::idle_timeout`].
//!
//! Nobody can lock the API without credentials: a request head must be complete within
//! [`Limits::head_timeout`]; a non-loopback address holds at most
//! [`Limits::max_connections_per_address`] connections; and when all
//! [`Limits::max_connections`] are in use, a new client displaces a connection of the address
//! holding the most ([`super::admission`]): idle ones first, then those that sent nothing, then
//! partial heads, then bodies in flight; a connection whose request is being answered never.
//! Each complete head passes the [`Gate`] (open-API browser checks, token, failed-authentication
//! limit) before the body is read or `100 Continue` is sent.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Waker};

use super::admission::{Admission, Candidate, ConnCounts, Peer, Stage};
use super::errors::ApiError;
use super::guard::Gate;
use super::http::{self, MAX_BODY_BYTES, Request};
use crate::http_head::{HeadScanner, MAX_HEAD_BYTES};
use crate::tunnel::driver::{
    self,
    core::{LoopCore, LoopThread},
    token::Tok,
};
use crate::tunnel::slab::Slab;

/// Limits of the front end.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections held at once. At the cap, a connection of the address holding the
    /// most is closed to admit a new one (see the module doc); if none may be closed (all are
    /// being answered), the new one is answered 503 and closed.
    pub max_connections: usize,
    /// Connections one non-loopback address (an IPv6 /64) may hold; a new one beyond displaces
    /// that address's own least advanced connection, or is answered 503. Loopback is exempt
    /// (local panels, a reverse proxy on the same host).
    pub max_connections_per_address: usize,
    /// Relay threads (each has at most one request in tiny_http at a time) and, separately,
    /// tiny_http worker threads running handlers.
    pub workers: usize,
    /// Time allowed to receive one complete request head, counted from the accept or, on a
    /// keep-alive connection, from the request's first byte.
    pub head_timeout: Duration,
    /// Time allowed to receive one complete request (head and body), counted the same way.
    pub request_timeout: Duration,
    /// How long a keep-alive connection may wait for the first byte of its next request.
    pub idle_timeout: Duration,
    /// Time allowed without write progress while sending a response.
    pub write_timeout: Duration,
    /// Failed authentications (401) one address (an IPv6 /64) may have in a burst; then its
    /// requests needing the token get 429 with `Retry-After` until it has allowance again.
    pub auth_failure_burst: u32,
    /// One more failed authentication is allowed per this interval.
    pub auth_failure_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_address: 32,
            workers: 4,
            head_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(15),
            auth_failure_burst: 10,
            auth_failure_interval: Duration::from_secs(1),
        }
    }
}

/// After an answer that closes the connection, unread input is discarded for this long
/// (so the client receives the answer instead of a reset), at most `DRAIN_MAX_BYTES`.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_MAX_BYTES: usize = 1024 * 1024;
/// Largest input buffered per connection (head + body + a little pipelined data).
const MAX_INBUF: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES + 4096;
/// An idle connection keeps at most this much input buffer capacity.
const IDLE_INBUF_CAPACITY: usize = 4096;
/// Longest wait between two deadline sweeps.
const SWEEP_MAX: Duration = Duration::from_secs(1);

/// A request for a worker.
pub struct Job {
    slot: usize,
    serial: u64,
    pub request: Request,
}

struct Done {
    slot: usize,
    serial: u64,
    bytes: Vec<u8>,
}

enum State {
    /// A keep-alive connection between requests (nothing but blank lines received).
    Idle,
    /// Receiving a request; `head` once the head is parsed.
    Reading { head: Option<(http::Head, usize)> },
    /// A worker has the request; `keep_alive` is what the request asked for.
    Waiting { keep_alive: bool },
    Writing {
        out: Vec<u8>,
        pos: usize,
        keep_alive: bool,
    },
    /// Answer sent, write side shut; discarding input until EOF or the deadline.
    Draining { discarded: usize },
}

struct Conn {
    stream: TcpStream,
    peer: Peer,
    /// Tells this connection's answers from those of an earlier one in the same slot.
    serial: u64,
    inbuf: Vec<u8>,
    /// How far `inbuf` was searched for the end of the current request's head.
    scanner: HeadScanner,
    /// Interim bytes (`100 Continue`) to send while still reading.
    interim: Vec<u8>,
    state: State,
    /// When the current idle wait or request began.
    since: Instant,
    deadline: Instant,
}

/// Handle to the running front end.
pub struct Front {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    threads: Vec<LoopThread>,
    pub local_addr: SocketAddr,
}

impl Front {
    /// Stops the loop and the workers and waits for them.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        for mut t in self.threads.drain(..) {
            t.join();
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the front end on `listener`; `gate` checks each request head; `handler` turns a
/// validated request into a complete response framed by `Content-Length`, without a
/// `Connection` header (the front end adds it). It runs on the relay threads.
pub fn start<H>(
    listener: std::net::TcpListener,
    limits: Limits,
    gate: Gate,
    handler: H,
) -> io::Result<Front>
where
    H: Fn(&Request) -> Vec<u8> + Send + Sync + 'static,
{
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let mut listener = TcpListener::from_std(listener);
    let core = LoopCore::new()?;
    core.registry()
        .register(&mut listener, Tok::Listener.token(), Interest::READABLE)?;
    let waker = core.waker.clone();
    let stop = Arc::new(AtomicBool::new(false));

    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let handler = Arc::new(handler);
    let mut threads = Vec::new();
    for i in 0..limits.workers.max(1) {
        let job_rx = job_rx.clone();
        let done_tx = done_tx.clone();
        let waker = waker.clone();
        let handler = handler.clone();
        threads.push(LoopThread::spawn(
            &format!("ostp-api-relay-{i}"),
            move || worker(&job_rx, &done_tx, &waker, &*handler),
        )?);
    }
    drop(done_tx);

    let mut front_loop = Loop {
        core,
        listener,
        conns: Slab::new(),
        counts: ConnCounts::new(),
        next_serial: 1,
        limits,
        gate,
        job_tx,
        done_rx,
        stop: stop.clone(),
    };
    threads.insert(0, LoopThread::spawn("ostp-api", move || front_loop.run())?);
    Ok(Front {
        stop,
        waker,
        threads,
        local_addr,
    })
}

fn worker(
    jobs: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
    waker: &Waker,
    handler: &(dyn Fn(&Request) -> Vec<u8> + Send + Sync),
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(PoisonError::into_inner);
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // the loop has stopped
            }
        };
        let bytes = handler(&job.request);
        if done
            .send(Done {
                slot: job.slot,
                serial: job.serial,
                bytes,
            })
            .is_err()
        {
            return;
        }
        let _ = waker.wake();
    }
}

struct Loop {
    core: LoopCore,
    listener: TcpListener,
    /// Client connections; the index is the connection's mio token.
    conns: Slab<Conn>,
    /// Open connections per client address.
    counts: ConnCounts,
    next_serial: u64,
    limits: Limits,
    gate: Gate,
    job_tx: Sender<Job>,
    done_rx: Receiver<Done>,
    stop: Arc<AtomicBool>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = driver::core::events();
        let mut next_sweep = Instant::now() + Duration::from_millis(250);
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self
                .core
                .wait(&mut events, Instant::now(), Some(next_sweep))
            {
                log::error!("api: poll failed: {e}");
                return;
            }
            for event in events.iter() {
                match Tok::decode(event.token()) {
                    Some(Tok::Listener) => self.accept_all(),
                    Some(Tok::Waker) => self.collect_done(),
                    Some(Tok::Conn(slot)) => self.drive(slot),
                    _ => {}
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = self.sweep(now);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.add(stream, Peer::of(peer.ip())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: drop this round, try again on the next event.
                    log::warn!("api: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add(&mut self, mut stream: TcpStream, peer: Peer) {
        let candidates = self.conns.iter().filter_map(|(slot, c)| {
            c.stage().map(|stage| Candidate {
                slot,
                peer: c.peer.key,
                stage,
                since: c.since,
            })
        });
        let admission = self.counts.admit(
            peer,
            self.limits.max_connections,
            self.limits.max_connections_per_address,
            candidates,
        );
        match admission {
            Admission::Admit => {}
            Admission::Evict(slot) => self.close(slot),
            Admission::Refuse(why) => {
                self.gate.count_unparsed(503);
                let _ = stream.write(&http::closing_error(&ApiError::new(503, why)));
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        let slot = self.conns.next_index();
        if let Err(e) = self.core.registry().register(
            &mut stream,
            Tok::Conn(slot).token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("api: cannot register a connection: {e}");
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let now = Instant::now();
        let mut conn = Conn {
            stream,
            peer,
            serial,
            inbuf: Vec::new(),
            scanner: HeadScanner::new(),
            interim: Vec::new(),
            state: State::Idle,
            since: now,
            deadline: now,
        };
        conn.start_request(&self.limits, now);
        let slot = self.conns.insert(conn);
        self.counts.opened(peer.key);
        self.drive(slot);
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.remove(slot) {
            self.counts.closed(c.peer.key);
            let _ = self.core.registry().deregister(&mut c.stream);
        }
    }

    fn collect_done(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            let Some(conn) = self.conns.get_mut(done.slot) else {
                continue;
            };
            let State::Waiting { keep_alive } = conn.state else {
                continue;
            };
            if conn.serial != done.serial {
                continue;
            }
            let (out, keep_alive) = http::with_connection(done.bytes, keep_alive);
            conn.state = State::Writing {
                out,
                pos: 0,
                keep_alive,
            };
            conn.deadline = Instant::now() + self.limits.write_timeout;
            self.drive(done.slot);
        }
    }

    /// Closes connections past their deadline; returns when to sweep next.
    fn sweep(&mut self, now: Instant) -> Instant {
        let mut next = now + SWEEP_MAX;
        let mut expired = Vec::new();
        for (slot, conn) in self.conns.iter_mut() {
            if matches!(conn.state, State::Waiting { .. }) {
                continue;
            }
            if conn.deadline > now {
                next = next.min(conn.deadline);
                continue;
            }
            if matches!(conn.state, State::Reading { .. }) && !conn.inbuf.is_empty() {
                let err = ApiError::new(408, "the request was not received in time");
                self.gate.count_unparsed(408);
                let _ = conn.stream.write(&http::closing_error(&err));
            }
            expired.push(slot);
        }
        for slot in expired {
            self.close(slot);
        }
        next.max(now + Duration::from_millis(20))
    }

    /// Makes all the progress possible on one connection.
    fn drive(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn.step(&self.limits, &mut self.gate) {
            Step::Blocked => {}
            Step::Close => self.close(slot),
            Step::Dispatch(request) => {
                let job = Job {
                    slot,
                    serial: conn.serial,
                    request,
                };
                if self.job_tx.send(job).is_err() {
                    self.close(slot);
                }
            }
        }
    }
}

/// What [`Conn::step`] leaves the loop to do.
enum Step {
    Blocked,
    Close,
    Dispatch(Request),
}

/// Result of one unit of progress: `None` = keep going.
type Progress = Option<Step>;

/// What a read from the socket gave.
enum ReadOutcome {
    Data,
    Retry,
    Stop(Step),
}

impl Conn {
    /// Makes all the progress possible until the connection blocks, closes, or has a request.
    fn step(&mut self, limits: &Limits, gate: &mut Gate) -> Step {
        let mut scratch = [0u8; 8192];
        loop {
            let progress = match self.state {
                State::Idle => self.step_idle(limits, &mut scratch),
                State::Reading { .. } => self.step_reading(limits, gate, &mut scratch),
                State::Waiting { .. } => Some(Step::Blocked),
                State::Writing { .. } => self.step_writing(limits),
                State::Draining { .. } => self.step_draining(&mut scratch),
            };
            if let Some(step) = progress {
                return step;
            }
        }
    }

    /// Waits for the next request's first byte; blank lines between requests are skipped.
    fn step_idle(&mut self, limits: &Limits, scratch: &mut [u8]) -> Progress {
        match self.read_some(scratch) {
            ReadOutcome::Data => {}
            ReadOutcome::Retry => return None,
            ReadOutcome::Stop(step) => return Some(step),
        }
        self.skip_blank_lines();
        if !self.inbuf.is_empty() {
            self.start_request(limits, Instant::now());
        }
        None
    }

    /// How far the connection is, if it may be closed to make room for a new one.
    fn stage(&self) -> Option<Stage> {
        match &self.state {
            State::Idle | State::Draining { .. } => Some(Stage::Idle),
            State::Reading { head: Some(_) } => Some(Stage::Body),
            State::Reading { head: None } if self.inbuf.is_empty() => Some(Stage::Nothing),
            State::Reading { head: None } => Some(Stage::PartialHead),
            State::Waiting { .. } | State::Writing { .. } => None,
        }
    }

    /// Parses the head, then collects the body; reads when more input is needed.
    fn step_reading(&mut self, limits: &Limits, gate: &mut Gate, scratch: &mut [u8]) -> Progress {
        if let Some(step) = self.flush_interim() {
            return Some(step);
        }
        let State::Reading { head } = &mut self.state else {
            return None;
        };
        match head {
            None => {
                self.skip_blank_lines();
                match http::parse_head_scanned(&mut self.scanner, &self.inbuf) {
                    Ok(Some((h, len))) => {
                        // Nothing about the body (not even `100 Continue`) before the gate.
                        if let Err(e) = gate.check(self.peer.key, &h, Instant::now()) {
                            self.answer_error(&e, limits);
                            return None;
                        }
                        if h.expect_continue
                            && h.content_length > 0
                            && self.inbuf.len() < len + h.content_length
                        {
                            self.interim
                                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        self.state = State::Reading {
                            head: Some((h, len)),
                        };
                        self.deadline = self.since + limits.request_timeout;
                        return None;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        gate.count_unparsed(e.status);
                        self.answer_error(&e, limits);
                        return None;
                    }
                }
            }
            Some((h, len)) => {
                let total = *len + h.content_length;
                if self.inbuf.len() >= total {
                    return Some(self.take_request(total));
                }
            }
        }
        // Need more input. The limits above make a full buffer impossible before the request
        // is complete or refused; should it happen anyway, the deadline closes the connection.
        match self.read_some(scratch) {
            ReadOutcome::Data | ReadOutcome::Retry => None,
            ReadOutcome::Stop(step) => Some(step),
        }
    }

    /// Hands the complete request (the first `total` bytes of `inbuf`) to a worker.
    fn take_request(&mut self, total: usize) -> Step {
        let State::Reading {
            head: Some((head, len)),
        } = std::mem::replace(&mut self.state, State::Waiting { keep_alive: false })
        else {
            return Step::Close;
        };
        let body = self.inbuf[len..total].to_vec();
        self.inbuf.drain(..total);
        self.scanner.reset();
        self.interim.clear();
        self.state = State::Waiting {
            keep_alive: head.keep_alive,
        };
        Step::Dispatch(Request { head, body })
    }

    fn step_writing(&mut self, limits: &Limits) -> Progress {
        let State::Writing {
            out,
            pos,
            keep_alive,
        } = &mut self.state
        else {
            return None;
        };
        if *pos >= out.len() {
            if *keep_alive {
                self.next_request(limits);
            } else {
                let _ = self.stream.shutdown(Shutdown::Write);
                self.state = State::Draining { discarded: 0 };
                self.deadline = Instant::now() + DRAIN_TIME;
            }
            return None;
        }
        match self.stream.write(&out[*pos..]) {
            Ok(0) => Some(Step::Close),
            Ok(n) => {
                *pos += n;
                self.deadline = Instant::now() + limits.write_timeout;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Step::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(_) => Some(Step::Close),
        }
    }

    fn step_draining(&mut self, scratch: &mut [u8]) -> Progress {
        let State::Draining { discarded } = &mut self.state else {
            return None;
        };
        match self.stream.read(scratch) {
            Ok(0) => Some(Step::Close),
            Ok(n) => {
                *discarded += n;
                (*discarded > DRAIN_MAX_BYTES).then_some(Step::Close)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Step::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(_) => Some(Step::Close),
        }
    }

    /// After a keep-alive answer: parse bytes already received behind the last request as the
    /// next one, or wait idle for it.
    fn next_request(&mut self, limits: &Limits) {
        self.skip_blank_lines();
        if self.inbuf.is_empty() {
            if self.inbuf.capacity() > IDLE_INBUF_CAPACITY {
                self.inbuf = Vec::new();
            }
            let now = Instant::now();
            self.state = State::Idle;
            self.since = now;
            self.deadline = now + limits.idle_timeout;
        } else {
            self.start_request(limits, Instant::now());
        }
    }

    /// A request begins: its head must be complete by [`Limits::head_timeout`].
    fn start_request(&mut self, limits: &Limits, now: Instant) {
        self.state = State::Reading { head: None };
        self.since = now;
        self.deadline = now + limits.head_timeout.min(limits.request_timeout);
    }

    /// Drops CR/LF before a request line (tolerated between requests, RFC 9112 §2.2).
    fn skip_blank_lines(&mut self) {
        let blank = self
            .inbuf
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        if blank > 0 {
            self.inbuf.drain(..blank);
            self.scanner.reset();
        }
    }

    /// Appends what the socket has (bounded by [`MAX_INBUF`]).
    fn read_some(&mut self, scratch: &mut [u8]) -> ReadOutcome {
        if self.inbuf.len() >= MAX_INBUF {
            return ReadOutcome::Stop(Step::Blocked);
        }
        let room = (MAX_INBUF - self.inbuf.len()).min(scratch.len());
        match self.stream.read(&mut scratch[..room]) {
            Ok(0) => ReadOutcome::Stop(Step::Close),
            Ok(n) => {
                self.inbuf.extend_from_slice(&scratch[..n]);
                ReadOutcome::Data
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::Stop(Step::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadOutcome::Retry,
            Err(_) => ReadOutcome::Stop(Step::Close),
        }
    }

    /// Sends what it can of a pending `100 Continue`.
    fn flush_interim(&mut self) -> Progress {
        if self.interim.is_empty() {
            return None;
        }
        match self.stream.write(&self.interim) {
            Ok(n) => {
                self.interim.drain(..n);
                None
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(_) => Some(Step::Close),
        }
    }

    /// Sets the connection up to send `err` and close afterwards.
    fn answer_error(&mut self, err: &ApiError, limits: &Limits) {
        self.interim.clear();
        self.state = State::Writing {
            out: http::closing_error(err),
            pos: 0,
            keep_alive: false,
        };
        self.deadline = Instant::now() + limits.write_timeout;
    }
}
