//! Split routing by name where the client sees only addresses (a child module of
//! `client_loop`): DNS answers passing through the client from a resolver it was configured with
//! (`tun.dns`, the DNS forwarder's `upstream`) teach [`LearnedAddrs`] the addresses of names
//! under `exclude.domains` — but only an answer to a query the client itself forwarded on the
//! same flow or connection, from the address it went to, with its ID and question
//! ([`PendingQueries`]). Captured TCP connections and UDP flows (TUN and router mode) to such an
//! address are then connected directly ([`super::direct`]), as are SOCKS5/HTTP requests by
//! address. DNS over TCP to those resolvers is read as it passes ([`Tapped`]).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::{Capture, ClientLoop, ClientOptions, LocalState};
use crate::proto::transport::{AssocId, Destination};
use crate::tunnel::dns_wire::{DnsAnswer, DnsQuery, TcpFramer};
use crate::tunnel::learned::{LearnedAddrs, PendingQueries, QueryFlow};
use crate::tunnel::pipe::ShutdownWrite;
use crate::tunnel::proxy_front::{FrontProtocol, ProxyRequest};

/// Longest DNS-over-TCP query remembered (queries are a few hundred bytes at most).
const MAX_TCP_QUERY: usize = 1024;

/// Whether answers from `addr` may teach: it is `tun.dns` or the forwarder's `upstream`. Any
/// other resolver is one a LAN host or a local application chose, and would let it pick
/// addresses that go around the tunnel for everyone.
fn teaches(options: &ClientOptions, addr: SocketAddr) -> bool {
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let tun_dns = options.tun.as_ref().and_then(|t| t.dns);
    let upstream = options.dns_forward.map(|d| d.upstream);
    [tun_dns, upstream]
        .into_iter()
        .flatten()
        .any(|r| SocketAddr::new(r.ip().to_canonical(), r.port()) == addr)
}

/// The DNS side of split routing for one call: queries going out are remembered, answers
/// coming back are checked against them and teach.
pub(super) struct Teacher<'a> {
    options: &'a ClientOptions,
    learned: &'a mut LearnedAddrs,
    pending: &'a mut PendingQueries,
    now: Instant,
}

impl<'a> Teacher<'a> {
    pub(super) fn new(
        options: &'a ClientOptions,
        learned: &'a mut LearnedAddrs,
        pending: &'a mut PendingQueries,
        now: Instant,
    ) -> Self {
        Teacher {
            options,
            learned,
            pending,
            now,
        }
    }

    /// `msg` leaves on `flow` for `to`: a query for an excluded name to a resolver that
    /// teaches is remembered; anything else is ignored.
    pub(super) fn query(&mut self, flow: QueryFlow, to: SocketAddr, msg: &[u8]) {
        let exclude = &self.options.exclude;
        if !exclude.has_domains() || !teaches(self.options, to) {
            return;
        }
        let Ok(query) = DnsQuery::parse(msg) else {
            return;
        };
        let mut text = [0u8; 255];
        if query
            .question
            .text(&mut text)
            .is_some_and(|name| exclude.excludes_domain(name))
        {
            self.pending
                .note(flow, to, query.id, &query.question, self.now);
        }
    }

    /// `msg` arrived on `flow` from `from`: when it answers a remembered query, its addresses
    /// are learned (CNAME chains followed); how many.
    pub(super) fn answer(&mut self, flow: QueryFlow, from: SocketAddr, msg: &[u8]) -> u32 {
        if self.pending.is_empty() || !teaches(self.options, from) {
            return 0;
        }
        let Ok(answer) = DnsAnswer::parse(msg) else {
            return 0;
        };
        let (id, question) = (answer.id(), answer.question());
        if !self.pending.answered(flow, from, id, question, self.now) {
            return 0;
        }
        let mut text = [0u8; 255];
        let Some(name) = question.text(&mut text) else {
            return 0;
        };
        if !self.options.exclude.excludes_domain(name) {
            return 0; // a reload since the query
        }
        let mut count = 0u32;
        answer.addresses(|ip, ttl| {
            if self.learned.learn(ip, ttl, name, self.now) {
                count += 1;
            }
        });
        if count > 0 {
            log::debug!("split routing: {name} resolved to {count} address(es) that go direct");
        }
        count
    }
}

/// DNS over TCP on a local connection to a resolver that teaches: the application's queries
/// and the answers it gets, framed as they pass.
#[derive(Debug)]
pub(super) struct DnsTap {
    flow: QueryFlow,
    resolver: SocketAddr,
    queries: TcpFramer,
    answers: TcpFramer,
}

/// A DNS-over-TCP connection's socket as its pipe sees it: what the application writes goes
/// through the query framer, what is written to it through the answer framer.
pub(super) struct Tapped<'a, 'b> {
    pub(super) sock: &'a mut TcpStream,
    pub(super) tap: &'a mut DnsTap,
    pub(super) teacher: Teacher<'b>,
}

impl Read for Tapped<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        let DnsTap {
            flow,
            resolver,
            queries,
            ..
        } = &mut *self.tap;
        let teacher = &mut self.teacher;
        queries.feed(buf.get(..n).unwrap_or_default(), |m| {
            teacher.query(*flow, *resolver, m)
        });
        Ok(n)
    }
}

impl Write for Tapped<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sock.write(buf)?;
        let DnsTap {
            flow,
            resolver,
            answers,
            ..
        } = &mut *self.tap;
        let teacher = &mut self.teacher;
        answers.feed(buf.get(..n).unwrap_or_default(), |m| {
            _ = teacher.answer(*flow, *resolver, m)
        });
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

impl ShutdownWrite for Tapped<'_, '_> {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.sock.shutdown_write()
    }
}

impl ClientLoop {
    /// The tunnel server's addresses are never learned.
    fn protect_server(&mut self) {
        for a in [self.server_addr, self.last_server_addr]
            .into_iter()
            .flatten()
        {
            self.learned.protect(a.ip());
        }
    }

    /// A datagram of flow `id` leaves for `to` through the tunnel: a query whose answer may
    /// teach is remembered.
    pub(super) fn dns_query_out(&mut self, now: Instant, id: AssocId, to: SocketAddr, msg: &[u8]) {
        let (learned, pending) = (&mut self.learned, &mut self.dns_queries);
        Teacher::new(&self.options, learned, pending, now).query(QueryFlow::Datagrams(id), to, msg);
    }

    /// A datagram from the tunnel for association `id`, sent by `from`: the answer to a
    /// remembered query teaches split routing.
    pub(super) fn dns_answer_in(
        &mut self,
        now: Instant,
        id: AssocId,
        from: &Destination,
        msg: &[u8],
    ) {
        let Destination::Addr(from) = from else {
            return;
        };
        if self.dns_queries.is_empty() {
            return;
        }
        self.protect_server();
        let (learned, pending) = (&mut self.learned, &mut self.dns_queries);
        Teacher::new(&self.options, learned, pending, now).answer(
            QueryFlow::Datagrams(id),
            *from,
            msg,
        );
    }

    /// The tap for local connection `idx` (`serial`) to `dest` when it is DNS over TCP to a
    /// resolver that teaches (and names are excluded).
    pub(super) fn dns_tap(
        &mut self,
        idx: usize,
        serial: u32,
        dest: SocketAddr,
    ) -> Option<Box<DnsTap>> {
        if !self.options.exclude.has_domains() || !teaches(&self.options, dest) {
            return None;
        }
        self.protect_server();
        Some(Box::new(DnsTap {
            flow: QueryFlow::Conn { index: idx, serial },
            resolver: dest,
            queries: TcpFramer::new(MAX_TCP_QUERY),
            answers: TcpFramer::default(),
        }))
    }

    /// Whether a new connection or flow to `dest` goes direct because an excluded name
    /// resolved to its address — never DNS (port 53 or `tun.dns`), which always goes through
    /// the tunnel.
    pub(super) fn learned_goes_direct(&mut self, dest: SocketAddr, now: Instant) -> bool {
        let tun_dns = self.options.tun.as_ref().and_then(|t| t.dns);
        dest.port() != 53 && tun_dns != Some(dest) && self.learned.contains(dest.ip(), now)
    }

    /// A captured connection to a learned address: connected directly, no request read, no
    /// reply written (a failure resets it, as a refused tunnel stream would).
    pub(super) fn admit_direct(
        &mut self,
        now: Instant,
        sock: TcpStream,
        peer: SocketAddr,
        dest: SocketAddr,
        capture: Capture,
    ) {
        let request = ProxyRequest::Connect {
            dest: Destination::from(dest),
            protocol: FrontProtocol::Transparent,
            early_data: Vec::new(),
        };
        log::debug!("split routing: {peer} → {dest} goes direct (a learned address)");
        let waiting = LocalState::Waiting {
            request: request.clone(),
        };
        let idx = self.insert_local(now, sock, peer, waiting, Some(capture));
        self.start_direct(now, idx, request);
    }
}
