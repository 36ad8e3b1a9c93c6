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

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::errors::ApiError;
use super::http::{self, MAX_BODY_BYTES, MAX_HEAD_BYTES, Request};

/// Limits of the front end.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections held at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Relay threads (each has at most one request in tiny_http at a time) and, separately,
    /// tiny_http worker threads running handlers.
    pub workers: usize,
    /// Time allowed to receive one complete request (also the keep-alive idle time).
    pub request_timeout: Duration,
    /// Time allowed without write progress while sending a response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            workers: 4,
            request_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(15),
        }
    }
}

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// After an error answer that closes the connection, unread input is discarded for this long
/// (so the client receives the answer instead of a reset), at most `DRAIN_MAX_BYTES`.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_MAX_BYTES: usize = 1024 * 1024;
/// Largest input buffered per connection (head + body + a little pipelined data).
const MAX_INBUF: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES + 4096;

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
    /// Receiving a request; `head` once the head is parsed.
    Reading { head: Option<(http::Head, usize)> },
    /// A worker has the request.
    Waiting,
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
    serial: u64,
    inbuf: Vec<u8>,
    /// Interim bytes (`100 Continue`) to send while still reading.
    interim: Vec<u8>,
    state: State,
    deadline: Instant,
}

/// Handle to the running front end.
pub struct Front {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
    pub local_addr: SocketAddr,
}

impl Front {
    /// Stops the loop and the workers and waits for them.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the front end on `listener`; `handler` turns a validated request into the complete
/// response bytes (the connection is closed after them). It runs on the relay threads.
pub fn start<H>(listener: std::net::TcpListener, limits: Limits, handler: H) -> io::Result<Front>
where
    H: Fn(&Request) -> Vec<u8> + Send + Sync + 'static,
{
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
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
        threads.push(
            std::thread::Builder::new()
                .name(format!("ostp-api-relay-{i}"))
                .spawn(move || worker(&job_rx, &done_tx, &waker, &*handler))?,
        );
    }
    drop(done_tx);

    let mut front_loop = Loop {
        poll,
        listener,
        conns: Vec::new(),
        free: Vec::new(),
        live: 0,
        next_serial: 1,
        limits,
        job_tx,
        done_rx,
        stop: stop.clone(),
    };
    threads.insert(
        0,
        std::thread::Builder::new()
            .name("ostp-api".into())
            .spawn(move || front_loop.run())?,
    );
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
    poll: Poll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    next_serial: u64,
    limits: Limits,
    job_tx: Sender<Job>,
    done_rx: Receiver<Done>,
    stop: Arc<AtomicBool>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut next_sweep = Instant::now() + Duration::from_millis(250);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = next_sweep.saturating_duration_since(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("api: poll failed: {e}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => self.collect_done(),
                    Token(slot) => self.drive(slot),
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
                Ok((stream, _peer)) => self.add(stream),
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

    fn add(&mut self, mut stream: TcpStream) {
        if self.live >= self.limits.max_connections {
            let r = ApiError::new(503, "too many connections; try again later").to_response();
            let _ = stream.write(&r.to_bytes(false));
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        let _ = stream.set_nodelay(true);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("api: cannot register a connection: {e}");
            self.free.push(slot);
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Some(entry) = self.conns.get_mut(slot) {
            *entry = Some(Conn {
                stream,
                serial,
                inbuf: Vec::new(),
                interim: Vec::new(),
                state: State::Reading { head: None },
                deadline: Instant::now() + self.limits.request_timeout,
            });
            self.live += 1;
        }
        self.drive(slot);
    }

    fn close(&mut self, slot: usize) {
        if let Some(entry) = self.conns.get_mut(slot) {
            if let Some(mut c) = entry.take() {
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.live -= 1;
                self.free.push(slot);
            }
        }
    }

    fn collect_done(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            let Some(Some(conn)) = self.conns.get_mut(done.slot) else {
                continue;
            };
            if conn.serial != done.serial || !matches!(conn.state, State::Waiting) {
                continue;
            }
            conn.state = State::Writing {
                out: done.bytes,
                pos: 0,
                keep_alive: false,
            };
            conn.deadline = Instant::now() + self.limits.write_timeout;
            self.drive(done.slot);
        }
    }

    /// Closes connections past their deadline; returns when to sweep next.
    fn sweep(&mut self, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(1);
        for slot in 0..self.conns.len() {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            if matches!(conn.state, State::Waiting) {
                continue;
            }
            if conn.deadline <= now {
                if matches!(conn.state, State::Reading { .. }) && !conn.inbuf.is_empty() {
                    let r = ApiError::new(408, "the request was not received in time");
                    let _ = conn.stream.write(&r.to_response().to_bytes(false));
                }
                self.close(slot);
            } else {
                next = next.min(conn.deadline);
            }
        }
        next.max(now + Duration::from_millis(20))
    }

    /// Makes all the progress possible on one connection.
    fn drive(&mut self, slot: usize) {
        let limits = self.limits.clone();
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        let outcome = step(conn, &limits);
        match outcome {
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

enum Step {
    Blocked,
    Close,
    Dispatch(Request),
}

/// Sets `conn` up to send `err` and close afterwards.
fn answer_error(conn: &mut Conn, err: &ApiError, limits: &Limits) {
    conn.interim.clear();
    conn.state = State::Writing {
        out: err.to_response().to_bytes(false),
        pos: 0,
        keep_alive: false,
    };
    conn.deadline = Instant::now() + limits.write_timeout;
}

fn step(conn: &mut Conn, limits: &Limits) -> Step {
    let mut scratch = [0u8; 8192];
    loop {
        match &mut conn.state {
            State::Reading { head } => {
                if !conn.interim.is_empty() {
                    match conn.stream.write(&conn.interim) {
                        Ok(n) => {
                            conn.interim.drain(..n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => return Step::Close,
                    }
                }
                if head.is_none() {
                    // Tolerate empty lines before a request line.
                    let blank = conn
                        .inbuf
                        .iter()
                        .take_while(|b| **b == b'\r' || **b == b'\n')
                        .count();
                    if blank > 0 {
                        conn.inbuf.drain(..blank);
                    }
                    match http::parse_head(&conn.inbuf) {
                        Ok(Some((h, len))) => {
                            if h.expect_continue
                                && conn.inbuf.len() < len + h.content_length
                                && h.content_length > 0
                            {
                                conn.interim
                                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                            }
                            *head = Some((h, len));
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            answer_error(conn, &e, limits);
                            continue;
                        }
                    }
                } else if let Some((h, len)) = head.as_ref() {
                    let total = len + h.content_length;
                    if conn.inbuf.len() >= total {
                        let (h, len) = match head.take() {
                            Some(x) => x,
                            None => return Step::Close,
                        };
                        let body = conn.inbuf[len..total].to_vec();
                        conn.inbuf.drain(..total);
                        conn.state = State::Waiting;
                        conn.interim.clear();
                        return Step::Dispatch(Request { head: h, body });
                    }
                }
                // Need more input.
                if conn.inbuf.len() >= MAX_INBUF {
                    return Step::Blocked; // cannot happen with the limits above; wait for the deadline
                }
                let room = (MAX_INBUF - conn.inbuf.len()).min(scratch.len());
                match conn.stream.read(&mut scratch[..room]) {
                    Ok(0) => return Step::Close,
                    Ok(n) => conn.inbuf.extend_from_slice(&scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Blocked,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
            }
            State::Waiting => return Step::Blocked,
            State::Writing {
                out,
                pos,
                keep_alive,
            } => {
                if *pos >= out.len() {
                    if *keep_alive {
                        conn.state = State::Reading { head: None };
                        conn.deadline = Instant::now() + limits.request_timeout;
                    } else {
                        let _ = conn.stream.shutdown(Shutdown::Write);
                        conn.state = State::Draining { discarded: 0 };
                        conn.deadline = Instant::now() + DRAIN_TIME;
                    }
                    continue;
                }
                match conn.stream.write(&out[*pos..]) {
                    Ok(0) => return Step::Close,
                    Ok(n) => {
                        *pos += n;
                        conn.deadline = Instant::now() + limits.write_timeout;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Blocked,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
            }
            State::Draining { discarded } => match conn.stream.read(&mut scratch) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    *discarded += n;
                    if *discarded > DRAIN_MAX_BYTES {
                        return Step::Close;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            },
        }
    }
}
