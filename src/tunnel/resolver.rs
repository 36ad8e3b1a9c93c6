//! A small DNS resolver pool for the event loop: a few threads calling the system resolver
//! (`std::net::ToSocketAddrs`, i.e. `getaddrinfo`), fed through a bounded queue, reporting back
//! through a bounded channel plus a `mio::Waker` so the loop wakes up to collect results.
//!
//! - [`Resolver::lookup`] never blocks: IP literals are answered immediately (fast path, no thread
//!   involved); a full queue is an immediate [`SubmitError::QueueFull`].
//! - Each request carries the caller's [`Ticket`], returned unchanged with its [`Resolved`] result.
//! - There is no per-request timeout here: `getaddrinfo` cannot be cancelled. The caller keeps its
//!   own deadline per ticket and ignores late results (a ticket names one incarnation of its owner).
//! - Memory is bounded: at most `queue_capacity` queued requests, one in flight per thread, and
//!   `queue_capacity + threads` undelivered results (workers wait when the loop does not drain).
//! - Threads start on demand: one at start, another whenever a request is submitted while every
//!   thread has one (up to `threads`), so an idle process does not keep 16 threads (their stacks,
//!   kernel stacks) for a pool it is not using. Started threads stay until shutdown.
//! - [`Resolver::shutdown`] (also run on drop) closes the queue and joins the threads; a thread
//!   stuck in `getaddrinfo` delays it by at most the system resolver's own timeout.
//! - Fairness (per-user shares of the pool, lookup timeouts, negative caching) is decided by the
//!   server's `Quotas`; the pool only runs what it is given.
//! - Test builds only (`test-util` feature): names ending in the suffix given by the
//!   `OSTP_TEST_DNS_BLACKHOLE` environment variable never answer — the worker holds them as a
//!   `getaddrinfo` stuck on a dead name server would (up to [`BLACKHOLE_HOLD`], or until shut
//!   down), so tests can starve the pool deterministically without a real broken DNS server.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mio::Waker;

use super::driver::ticket::Ticket;
use crate::proto::transport::Destination;

/// How long a test-only black-holed name keeps its worker busy.
#[cfg(feature = "test-util")]
pub const BLACKHOLE_HOLD: std::time::Duration = std::time::Duration::from_secs(120);

/// Most addresses kept from one lookup.
pub const MAX_ADDRESSES: usize = 16;

/// Why a lookup produced no addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The name does not exist or has no addresses.
    NotFound,
    /// The resolver failed (temporary failure, no network, invalid name…); the text says why.
    Failed(String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("name not found"),
            Self::Failed(why) => write!(f, "resolution failed: {why}"),
        }
    }
}

impl std::error::Error for ResolveError {}

/// Why a lookup could not be submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The request queue is full; refuse the client (or retry later).
    QueueFull,
    /// The pool has been shut down.
    ShutDown,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::QueueFull => "resolver queue full",
            Self::ShutDown => "resolver shut down",
        })
    }
}

impl std::error::Error for SubmitError {}

/// The outcome of a pooled lookup, tagged with the caller's ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The ticket given to [`Resolver::lookup`].
    pub ticket: Ticket,
    /// Addresses in system-resolver order (at most [`MAX_ADDRESSES`]), or why there are none.
    pub result: Result<Vec<SocketAddr>, ResolveError>,
}

/// What [`Resolver::lookup`] did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The host was an IP literal: here is the address, nothing was queued.
    Ready(SocketAddr),
    /// Queued; a [`Resolved`] with the same ticket will arrive via [`Resolver::try_recv`].
    Pending,
}

struct Job {
    ticket: Ticket,
    host: String,
    port: u16,
}

/// The blocking lookup a worker runs ([`resolve_blocking`]; tests pass slow stand-ins).
type LookupFn = fn(&str, u16) -> Result<Vec<SocketAddr>, ResolveError>;

/// What every worker shares, and what starting another one needs.
struct Shared {
    jobs: Mutex<Receiver<Job>>,
    results: SyncSender<Resolved>,
    waker: Arc<Waker>,
    stop: AtomicBool,
    /// Requests submitted and not yet answered (queued or being looked up).
    outstanding: AtomicUsize,
    lookup: LookupFn,
}

/// The resolver pool. Owned by the event loop thread.
pub struct Resolver {
    jobs: Option<SyncSender<Job>>,
    results: Receiver<Resolved>,
    /// Started workers (grows on demand up to `max_threads`).
    threads: RefCell<Vec<JoinHandle<()>>>,
    max_threads: usize,
    shared: Arc<Shared>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("threads", &self.thread_count())
            .field("max_threads", &self.max_threads)
            .field("open", &self.jobs.is_some())
            .finish()
    }
}

impl Resolver {
    /// A pool of at most `threads` workers (clamped to 1..=16; one starts now, the others when
    /// requests wait) with a queue of `queue_capacity` requests (at least 1). `waker` is woken
    /// after every result is posted.
    pub fn new(threads: usize, queue_capacity: usize, waker: Arc<Waker>) -> io::Result<Self> {
        Self::with_lookup(threads, queue_capacity, waker, resolve_blocking)
    }

    fn with_lookup(
        threads: usize,
        queue_capacity: usize,
        waker: Arc<Waker>,
        lookup: LookupFn,
    ) -> io::Result<Self> {
        let max_threads = threads.clamp(1, 16);
        let queue_capacity = queue_capacity.max(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(queue_capacity);
        let (result_tx, results) = mpsc::sync_channel::<Resolved>(queue_capacity + max_threads);
        let shared = Arc::new(Shared {
            jobs: Mutex::new(job_rx),
            results: result_tx,
            waker,
            stop: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            lookup,
        });
        let resolver = Self {
            jobs: Some(job_tx),
            results,
            threads: RefCell::new(Vec::with_capacity(max_threads)),
            max_threads,
            shared,
        };
        resolver.start_worker()?;
        Ok(resolver)
    }

    /// Workers started so far.
    pub fn thread_count(&self) -> usize {
        self.threads.borrow().len()
    }

    fn start_worker(&self) -> io::Result<()> {
        let mut threads = self.threads.borrow_mut();
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name(format!("ostp-dns-{}", threads.len()))
            .stack_size(128 * 1024)
            .spawn(move || worker(&shared))?;
        threads.push(handle);
        Ok(())
    }

    /// Resolves `host:port`. IP literals (bare or bracketed IPv6) are answered at once; names are
    /// queued for the pool. Never blocks.
    pub fn lookup(&self, ticket: Ticket, host: &str, port: u16) -> Result<Lookup, SubmitError> {
        if let Some(ip) = ip_literal(host) {
            return Ok(Lookup::Ready(SocketAddr::new(ip, port)));
        }
        let jobs = self.jobs.as_ref().ok_or(SubmitError::ShutDown)?;
        let job = Job {
            ticket,
            host: host.to_owned(),
            port,
        };
        // Counted before the send, so the worker's decrement never comes first.
        let outstanding = self.shared.outstanding.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = jobs.try_send(job);
        if sent.is_err() {
            self.shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {
                let started = self.thread_count();
                if outstanding > started && started < self.max_threads {
                    if let Err(e) = self.start_worker() {
                        log::warn!("resolver: cannot start another thread ({started} run): {e}");
                    }
                }
                Ok(Lookup::Pending)
            }
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::ShutDown),
        }
    }

    /// [`Self::lookup`] for a [`Destination`] (addresses are answered at once).
    pub fn lookup_target(
        &self,
        ticket: Ticket,
        target: &Destination,
    ) -> Result<Lookup, SubmitError> {
        match target {
            Destination::Addr(addr) => Ok(Lookup::Ready(*addr)),
            Destination::Domain { name, port } => self.lookup(ticket, name, *port),
        }
    }

    /// Takes one finished lookup, if any. Call until `None` after the waker fires.
    pub fn try_recv(&self) -> Option<Resolved> {
        self.results.try_recv().ok()
    }

    /// Stops accepting requests, lets the workers finish their current lookup (queued ones are
    /// skipped), and joins them. Undelivered results are discarded.
    pub fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        // Unblock workers waiting for room in the result channel.
        while self.results.try_recv().is_ok() {}
        for handle in self.threads.get_mut().drain(..) {
            // Keep draining so no worker waits forever on a full result channel.
            while !handle.is_finished() {
                while self.results.try_recv().is_ok() {}
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = handle.join();
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The address in `host` if it is an IP literal (bare or bracketed IPv6).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    inner.parse().ok()
}

fn worker(shared: &Shared) {
    let Shared {
        jobs,
        results,
        waker,
        stop,
        outstanding,
        lookup,
    } = shared;
    loop {
        let job = {
            let Ok(guard) = jobs.lock() else { return };
            match guard.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if stop.load(Ordering::Relaxed) {
            return; // Shutting down: skip the queued remainder.
        }
        #[cfg(feature = "test-util")]
        if blackhole(&job.host, stop) {
            return;
        }
        let result = lookup(&job.host, job.port);
        // Before the send: a caller that sees this result also sees this thread free.
        outstanding.fetch_sub(1, Ordering::Relaxed);
        if results
            .send(Resolved {
                ticket: job.ticket,
                result,
            })
            .is_err()
        {
            return;
        }
        if let Err(e) = waker.wake() {
            log::warn!("resolver: waking the event loop failed: {e}");
        }
    }
}

/// Test builds: holds the worker for a black-holed name (see the module doc); `true` when the
/// pool shut down meanwhile.
#[cfg(feature = "test-util")]
fn blackhole(host: &str, stop: &AtomicBool) -> bool {
    let Ok(suffix) = std::env::var("OSTP_TEST_DNS_BLACKHOLE") else {
        return false;
    };
    if suffix.is_empty() || !host.ends_with(&suffix) {
        return false;
    }
    let until = std::time::Instant::now() + BLACKHOLE_HOLD;
    while std::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// One blocking lookup through the system resolver: at most [`MAX_ADDRESSES`] addresses, in
/// its order, without repeats. The name is looked up in [`lookup_form`].
pub fn resolve_blocking(host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
    resolve_up_to(host, port, MAX_ADDRESSES)
}

/// [`resolve_blocking`] without the cap: every address of `host`, for callers that must know
/// them all (router rules leave each of the server's addresses out of the capture).
pub fn resolve_all(host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
    resolve_up_to(host, port, usize::MAX)
}

/// How a host is handed to the system resolver: in lower case, because names are
/// case-insensitive (RFC 4343) and DNS servers compare them so, but musl (OpenWrt's libc) reads
/// `/etc/hosts` case-sensitively (`LocalHost` or `Router.LAN` would not be found there). An
/// IPv6 literal is passed as it is: its zone (`fe80::1%Eth0`) names an interface, and those
/// names are case-sensitive.
pub fn lookup_form(host: &str) -> Cow<'_, str> {
    if host.contains(':') || !host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Borrowed(host)
    } else {
        Cow::Owned(host.to_ascii_lowercase())
    }
}

fn resolve_up_to(host: &str, port: u16, cap: usize) -> Result<Vec<SocketAddr>, ResolveError> {
    if host.is_empty() || host.len() > Destination::MAX_DOMAIN_LEN || host.contains('\0') {
        return Err(ResolveError::NotFound);
    }
    match (&*lookup_form(host), port).to_socket_addrs() {
        Ok(addrs) => {
            let mut out: Vec<SocketAddr> = Vec::new();
            for addr in addrs {
                if !out.contains(&addr) {
                    out.push(addr);
                }
                if out.len() == cap {
                    break;
                }
            }
            if out.is_empty() {
                Err(ResolveError::NotFound)
            } else {
                Ok(out)
            }
        }
        Err(e) => Err(classify_error(&e)),
    }
}

/// std only exposes `gai_strerror` text; map the "no such name" family to `NotFound`.
fn classify_error(e: &io::Error) -> ResolveError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let not_found = [
        "not known",             // glibc EAI_NONAME "Name or service not known"
        "no address associated", // glibc EAI_NODATA
        "does not resolve",      // musl EAI_NONAME "Name does not resolve"
        "nodename nor servname", // BSD / macOS
        "no such host",
    ];
    if not_found.iter().any(|needle| lower.contains(needle)) {
        ResolveError::NotFound
    } else {
        ResolveError::Failed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::driver::ticket::TicketKind;
    use mio::{Events, Poll, Token};
    use std::time::{Duration, Instant};

    const WAKE: Token = Token(7);

    fn t(serial: u64) -> Ticket {
        Ticket {
            kind: TicketKind::Outbound,
            index: 0,
            serial,
        }
    }

    #[test]
    fn names_are_looked_up_in_lower_case_and_ipv6_zones_as_written() {
        assert_eq!(lookup_form("Router.LAN"), "router.lan");
        assert!(matches!(lookup_form("example.com"), Cow::Borrowed(_)));
        assert_eq!(lookup_form("fe80::1%Eth0"), "fe80::1%Eth0");
        assert_eq!(lookup_form("2001:DB8::1"), "2001:DB8::1");
    }

    #[test]
    fn names_in_any_case_resolve_like_their_lower_case_form() {
        // /etc/hosts names "localhost" on every system the tests run on; musl matches its
        // entries case-sensitively, so this failed in a musl build before the lookup lowered it.
        for name in ["localhost", "LocalHost", "LOCALHOST"] {
            let addrs = resolve_blocking(name, 80).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(
                addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
                "{name}: {addrs:?}"
            );
        }
    }

    fn pool(threads: usize, capacity: usize) -> (Poll, Resolver) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
        (poll, Resolver::new(threads, capacity, waker).unwrap())
    }

    /// Polls until `count` results arrived (each preceded by a waker event), or panics after 20 s.
    fn collect(poll: &mut Poll, resolver: &Resolver, count: usize) -> Vec<Resolved> {
        let mut events = Events::with_capacity(8);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < count {
            assert!(Instant::now() < deadline, "timed out waiting for results");
            poll.poll(&mut events, Some(Duration::from_millis(200)))
                .unwrap();
            if events.iter().any(|e| e.token() == WAKE) {
                while let Some(r) = resolver.try_recv() {
                    out.push(r);
                }
            }
        }
        out
    }

    #[test]
    fn ip_literals_take_the_fast_path() {
        let (_poll, resolver) = pool(1, 1);
        assert_eq!(
            resolver.lookup(t(1), "127.0.0.1", 80),
            Ok(Lookup::Ready("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            resolver.lookup(t(2), "[::1]", 443),
            Ok(Lookup::Ready("[::1]:443".parse().unwrap()))
        );
        assert_eq!(
            resolver.lookup(t(3), "2001:db8::1", 1),
            Ok(Lookup::Ready("[2001:db8::1]:1".parse().unwrap()))
        );
        let target = Destination::domain("10.1.2.3", 5).unwrap();
        assert_eq!(
            resolver.lookup_target(t(4), &target),
            Ok(Lookup::Ready("10.1.2.3:5".parse().unwrap())),
            "a domain-typed IP literal still skips the pool"
        );
        assert_eq!(
            resolver.lookup_target(t(5), &Destination::Addr("[::2]:7".parse().unwrap())),
            Ok(Lookup::Ready("[::2]:7".parse().unwrap()))
        );
        assert_eq!(resolver.try_recv(), None);
    }

    #[test]
    fn localhost_resolves_and_waker_fires() {
        let (mut poll, resolver) = pool(2, 4);
        // The ticket comes back whole: serials past the old 32-bit generation packing included.
        let ticket = Ticket {
            kind: TicketKind::Relay,
            index: 3,
            serial: u64::from(u32::MAX) + 1,
        };
        assert_eq!(
            resolver.lookup(ticket, "localhost", 8080),
            Ok(Lookup::Pending)
        );
        let results = collect(&mut poll, &resolver, 1);
        assert_eq!(results[0].ticket, ticket);
        let addrs = results[0].result.clone().expect("localhost resolves");
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080),
            "{addrs:?}"
        );
    }

    #[test]
    fn garbage_names_error() {
        let (mut poll, resolver) = pool(2, 4);
        // `.invalid` is reserved (RFC 2606) and never resolves.
        resolver.lookup(t(1), "no-such-host.invalid", 80).unwrap();
        resolver.lookup(t(2), "bad..name", 80).unwrap();
        let mut results = collect(&mut poll, &resolver, 2);
        results.sort_by_key(|r| r.ticket.serial);
        assert_eq!(results[0].ticket, t(1));
        assert_eq!(results[1].ticket, t(2));
        for r in &results {
            assert!(r.result.is_err(), "{r:?}");
        }
        assert_eq!(resolve_blocking("", 80), Err(ResolveError::NotFound));
        assert_eq!(resolve_blocking("a\0b", 80), Err(ResolveError::NotFound));
        assert_eq!(
            resolve_blocking(&"a".repeat(Destination::MAX_DOMAIN_LEN + 1), 80),
            Err(ResolveError::NotFound)
        );
    }

    /// A lookup that takes 300 ms (a slow name server).
    fn slow_lookup(_host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        std::thread::sleep(Duration::from_millis(300));
        Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
    }

    #[test]
    fn threads_start_only_when_requests_wait() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
        let resolver = Resolver::with_lookup(3, 8, waker, slow_lookup).unwrap();
        assert_eq!(resolver.thread_count(), 1, "an idle pool keeps one thread");
        let started = Instant::now();
        for serial in 0..5 {
            assert_eq!(
                resolver.lookup(t(serial), "slow.example", 1),
                Ok(Lookup::Pending)
            );
        }
        assert_eq!(
            resolver.thread_count(),
            3,
            "grown to its cap while requests wait"
        );
        assert_eq!(collect(&mut poll, &resolver, 5).len(), 5);
        // Three threads: 300 + 300 ms; one would take 1.5 s.
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "{:?}",
            started.elapsed()
        );
        // Requests one at a time each find the thread free: it stays alone.
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
        let resolver = Resolver::with_lookup(3, 8, waker, slow_lookup).unwrap();
        for serial in 0..3 {
            resolver.lookup(t(serial), "slow.example", 1).unwrap();
            collect(&mut poll, &resolver, 1);
        }
        assert_eq!(
            resolver.thread_count(),
            1,
            "sequential requests, one thread"
        );
    }

    #[test]
    fn full_queue_is_refused_immediately_and_shutdown_joins() {
        let (mut poll, mut resolver) = pool(1, 2);
        let started = Instant::now();
        let mut accepted = 0;
        let mut refused = 0;
        for token in 0..50 {
            match resolver.lookup(t(token), "localhost", 1) {
                Ok(Lookup::Pending) => accepted += 1,
                Err(SubmitError::QueueFull) => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "lookup must not block"
        );
        assert!(
            refused > 0,
            "a 2-slot queue cannot take 50 requests at once"
        );
        assert!(accepted >= 2);
        let results = collect(&mut poll, &resolver, accepted);
        assert_eq!(results.len(), accepted);
        resolver.shutdown();
        assert_eq!(resolver.thread_count(), 0);
        assert_eq!(
            resolver.lookup(t(9), "localhost", 1),
            Err(SubmitError::ShutDown)
        );
        // Literals still work after shutdown (no thread needed).
        assert!(matches!(
            resolver.lookup(t(9), "1.2.3.4", 1),
            Ok(Lookup::Ready(_))
        ));
    }

    #[test]
    fn error_text_classification() {
        let nf =
            io::Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(classify_error(&nf), ResolveError::NotFound);
        let musl = io::Error::other("failed to lookup address information: Name does not resolve");
        assert_eq!(classify_error(&musl), ResolveError::NotFound);
        let temp = io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        );
        assert!(matches!(classify_error(&temp), ResolveError::Failed(_)));
    }
}
