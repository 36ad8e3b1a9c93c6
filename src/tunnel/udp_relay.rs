//! Server side of SOCKS5 UDP ASSOCIATE: per-session UDP sockets that send the client's tunnel
//! datagrams to their destinations and carry the answers back.
//!
//! Each SOCKS5 association of a session (the DATAGRAM frame's association id) gets its own relay
//! (created on its first datagram, closed with the session or after [`RELAY_IDLE`]; at most
//! [`MAX_RELAYS_PER_SESSION`] per session), with one socket per address family: answers come back
//! tagged with the association whose socket received them, so two applications asking the same
//! resolver never see each other's answers. Names are resolved through the
//! resolver pool (a small per-relay cache; a few datagrams wait for a lookup, more are dropped —
//! UDP senders retry). Answers from an address that the client named by domain are labelled with
//! that domain again so the client can match them. Every destination passes the guard.
//! At most `max_relays` relays exist at once (their sockets count against the server's fd
//! budget); a session's first datagram beyond that is dropped.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Poll};

use super::dest_guard::{DestGuard, Verdict};
use super::driver::ticket::{Ticket, TicketIssuer, TicketKind};
use super::driver::token::Tok;
use super::driver::udp::{self, RECV_BATCH, Readiness};
use super::resolver::Lookup;
use super::slab::Slab;
use crate::proto::SessionId;
use crate::proto::id_map::IdMap;
use crate::proto::transport::{AssocId, Destination};

/// A relay closes after this long without traffic.
pub const RELAY_IDLE: Duration = Duration::from_secs(120);
/// Relays (associations) one session may have at once; datagrams of further ones are dropped.
pub const MAX_RELAYS_PER_SESSION: usize = 32;
const DNS_CACHE: usize = 32;
const DNS_TTL: Duration = Duration::from_secs(60);
const NAME_LABELS: usize = 64;
const PENDING_DATAGRAMS: usize = 8;
const MAX_DATAGRAM: usize = 65_535;

struct Pending {
    /// The lookup this datagram waits for; only its own answer can release it.
    ticket: Ticket,
    name: String,
    port: u16,
    data: Vec<u8>,
}

struct Relay {
    session: SessionId,
    assoc: AssocId,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    /// Resolved address → the domain destination the client used.
    labels: Vec<(SocketAddr, Destination)>,
    dns: Vec<(String, u16, SocketAddr, Instant)>,
    pending: Vec<Pending>,
    last_active: Instant,
}

/// All relays of the server loop.
pub struct RelayPool {
    relays: Slab<Relay>,
    tickets: TicketIssuer,
    /// Relay sockets with datagrams to read: marked by their READABLE event, kept while a
    /// receive stops at the batch limit (mio reports no new edge for datagrams already queued).
    readable: Vec<(usize, bool)>,
    /// Each session's relays by association id (at most [`MAX_RELAYS_PER_SESSION`]).
    by_session: IdMap<SessionId, Vec<(AssocId, usize)>>,
    scratch: Box<[u8]>,
    max_relays: usize,
    /// Datagram destinations the guard refused since start.
    refused: u64,
    /// No relay can be idle for [`RELAY_IDLE`] before this (a lower bound: activity only moves
    /// the real deadlines later). `expire` scans the relays only once it has passed, never on
    /// every loop iteration; `None` while there are no relays.
    next_expiry: Option<Instant>,
}

impl RelayPool {
    /// Relay sockets are registered as [`Tok::Relay`]; at most `max_relays` relays at once.
    pub fn new(max_relays: usize) -> Self {
        RelayPool {
            max_relays,
            relays: Slab::new(),
            tickets: TicketIssuer::new(),
            readable: Vec::new(),
            refused: 0,
            by_session: IdMap::default(),
            next_expiry: None,
            scratch: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
        }
    }

    /// The relay of `(session, assoc)`, created if the session has room for one more and the
    /// server's relay cap (the fd budget) allows it.
    fn relay_for(&mut self, now: Instant, session: SessionId, assoc: AssocId) -> Option<usize> {
        let relays = self.by_session.entry(session).or_default();
        if let Some(&(_, i)) = relays.iter().find(|(a, _)| *a == assoc) {
            return Some(i);
        }
        if relays.len() >= MAX_RELAYS_PER_SESSION {
            log::debug!("udp relay: session {session:?} has {MAX_RELAYS_PER_SESSION} associations");
            return None;
        }
        if self.relays.len() >= self.max_relays {
            return None;
        }
        let i = self.relays.insert(Relay {
            session,
            assoc,
            v4: None,
            v6: None,
            labels: Vec::new(),
            dns: Vec::new(),
            pending: Vec::new(),
            last_active: now,
        });
        relays.push((assoc, i));
        let due = now + RELAY_IDLE;
        self.next_expiry = Some(self.next_expiry.map_or(due, |t| t.min(due)));
        Some(i)
    }

    /// Sends one datagram of `session`'s association `assoc` to `dest`. Returns whether it left
    /// (for accounting).
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        now: Instant,
        session: SessionId,
        assoc: AssocId,
        dest: &Destination,
        data: &[u8],
        guard: &mut DestGuard,
        poll: &Poll,
        lookup: &mut dyn FnMut(Ticket, &str, u16) -> Option<Lookup>,
    ) -> bool {
        let Some(idx) = self.relay_for(now, session, assoc) else {
            return false;
        };
        let Some(relay) = self.relays.get_mut(idx) else {
            return false;
        };
        relay.last_active = now;
        let addr = match dest {
            Destination::Addr(a) => *a,
            Destination::Domain { name, port } => {
                relay
                    .dns
                    .retain(|(_, _, _, at)| now.saturating_duration_since(*at) < DNS_TTL);
                if let Some((_, _, a, _)) =
                    relay.dns.iter().find(|(n, p, _, _)| n == name && p == port)
                {
                    *a
                } else {
                    if relay.pending.len() >= PENDING_DATAGRAMS {
                        return false;
                    }
                    let ticket = self.tickets.issue(TicketKind::Relay, idx);
                    match lookup(ticket, name, *port) {
                        Some(Lookup::Ready(a)) => a,
                        Some(Lookup::Pending) => {
                            relay.pending.push(Pending {
                                ticket,
                                name: name.clone(),
                                port: *port,
                                data: data.to_vec(),
                            });
                            return false;
                        }
                        None => return false,
                    }
                }
            }
        };
        if let Destination::Domain { .. } = dest {
            if !relay.labels.iter().any(|(a, _)| *a == addr) {
                if relay.labels.len() >= NAME_LABELS {
                    relay.labels.remove(0);
                }
                relay.labels.push((addr, dest.clone()));
            }
        }
        Self::send_to(idx, relay, addr, data, guard, now, poll, &mut self.refused)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_to(
        idx: usize,
        relay: &mut Relay,
        addr: SocketAddr,
        data: &[u8],
        guard: &mut DestGuard,
        now: Instant,
        poll: &Poll,
        refused: &mut u64,
    ) -> bool {
        if let Verdict::Deny(reason) = guard.check(addr, now) {
            log::debug!("udp relay: destination refused by the guard: {reason:?}");
            *refused += 1;
            return false;
        }
        let v6 = addr.is_ipv6();
        let slot = if v6 { &mut relay.v6 } else { &mut relay.v4 };
        if slot.is_none() {
            let bind: SocketAddr = if !v6 {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from(([0u16; 8], 0))
            };
            let Ok(std_sock) = crate::sys::bind_udp(bind) else {
                return false;
            };
            if std_sock.set_nonblocking(true).is_err() {
                return false;
            }
            crate::sys::grow_udp_buffers(&std_sock, udp::BURST_SOCKET_BUFFER);
            let mut sock = UdpSocket::from_std(std_sock);
            if poll
                .registry()
                .register(
                    &mut sock,
                    Tok::Relay { index: idx, v6 }.token(),
                    Interest::READABLE,
                )
                .is_err()
            {
                return false;
            }
            *slot = Some(sock);
        }
        let Some(sock) = slot.as_ref() else {
            return false;
        };
        match sock.send_to(data, addr) {
            Ok(_) => true,
            Err(e) => {
                log::debug!("udp relay: send to {addr}: {e}");
                false
            }
        }
    }

    /// The loop gave up on a lookup (timeout): the datagram waiting for it is dropped.
    pub fn forget_lookup(&mut self, ticket: Ticket) {
        if let Some(relay) = self.relays.get_mut(ticket.index) {
            relay.pending.retain(|p| p.ticket != ticket);
        }
    }

    /// A lookup for a waiting datagram finished. An answer for a relay that has since closed
    /// (its slot possibly reused by another session) matches no pending ticket and is dropped.
    pub fn resolved(
        &mut self,
        ticket: Ticket,
        addrs: &[SocketAddr],
        guard: &mut DestGuard,
        now: Instant,
        poll: &Poll,
    ) {
        let idx = ticket.index;
        let Some(relay) = self.relays.get_mut(idx) else {
            return;
        };
        let Some(pos) = relay.pending.iter().position(|p| p.ticket == ticket) else {
            return;
        };
        let p = relay.pending.swap_remove(pos);
        let Some(addr) = addrs
            .iter()
            .find(|a| matches!(guard.check(**a, now), Verdict::Allow))
            .copied()
        else {
            if !addrs.is_empty() {
                self.refused += 1; // every address the name resolved to was refused
            }
            return;
        };
        if relay.dns.len() >= DNS_CACHE {
            relay.dns.remove(0);
        }
        relay.dns.push((p.name.clone(), p.port, addr, now));
        if !relay.labels.iter().any(|(a, _)| *a == addr) {
            if relay.labels.len() >= NAME_LABELS {
                relay.labels.remove(0);
            }
            if let Some(d) = Destination::domain(&p.name, p.port) {
                relay.labels.push((addr, d));
            }
        }
        Self::send_to(
            idx,
            relay,
            addr,
            &p.data,
            guard,
            now,
            poll,
            &mut self.refused,
        );
    }

    /// A READABLE event for the relay socket `index`/`v6`.
    pub fn mark_readable(&mut self, index: usize, v6: bool) {
        if !self.readable.contains(&(index, v6)) {
            self.readable.push((index, v6));
        }
    }

    /// Whether some relay socket must be read before the loop may wait.
    pub fn any_readable(&self) -> bool {
        !self.readable.is_empty()
    }

    /// Moves the marked relay sockets into `out` (each to be passed to [`Self::receive`]).
    pub fn take_readable(&mut self, out: &mut Vec<(usize, bool)>) {
        out.append(&mut self.readable);
    }

    /// Reads up to [`RECV_BATCH`] datagrams waiting on the relay socket `index`/`v6`, handing
    /// each to `on_datagram(session, association, source, payload)`. [`Readiness::StillReadable`] means the
    /// batch limit stopped it: the socket stays marked (see [`Self::any_readable`]) so the loop
    /// reads it again before waiting for events.
    pub fn receive(
        &mut self,
        index: usize,
        v6: bool,
        mut on_datagram: impl FnMut(SessionId, AssocId, Destination, &[u8]),
    ) -> Readiness {
        let Some(relay) = self.relays.get_mut(index) else {
            return Readiness::Drained;
        };
        let sock = if v6 {
            relay.v6.as_ref()
        } else {
            relay.v4.as_ref()
        };
        let Some(sock) = sock else {
            return Readiness::Drained;
        };
        let (session, assoc, labels) = (relay.session, relay.assoc, &relay.labels);
        let readiness = udp::drain(sock, &mut self.scratch, RECV_BATCH, |data, from| {
            let from = canonical(from);
            match labels.iter().find(|(a, _)| *a == from) {
                Some((_, d)) => on_datagram(session, assoc, d.clone(), data),
                None => on_datagram(session, assoc, Destination::Addr(from), data),
            }
        });
        if readiness.still_readable() {
            self.mark_readable(index, v6);
        }
        readiness
    }

    /// Closes every relay of a session.
    pub fn close_session(&mut self, session: SessionId, poll: &Poll) {
        for (_, idx) in self.by_session.remove(&session).unwrap_or_default() {
            self.close_relay(idx, poll);
        }
    }

    fn close_relay(&mut self, idx: usize, poll: &Poll) {
        if let Some(mut r) = self.relays.remove(idx) {
            for s in [r.v4.as_mut(), r.v6.as_mut()].into_iter().flatten() {
                let _ = poll.registry().deregister(s);
            }
            if let Some(list) = self.by_session.get_mut(&r.session) {
                list.retain(|(_, i)| *i != idx);
                if list.is_empty() {
                    self.by_session.remove(&r.session);
                }
            }
        }
    }

    /// Closes relays idle for [`RELAY_IDLE`]. Cheap until [`RelayPool::next_expiry`]: only
    /// then are the relays scanned (and the next bound taken from the survivors).
    pub fn expire(&mut self, now: Instant, poll: &Poll) {
        if self.next_expiry.is_none_or(|t| now < t) {
            return;
        }
        let mut idle = Vec::new();
        let mut next: Option<Instant> = None;
        for (i, r) in self.relays.iter() {
            let due = r.last_active + RELAY_IDLE;
            if now >= due {
                idle.push(i);
            } else {
                next = Some(next.map_or(due, |t| t.min(due)));
            }
        }
        self.next_expiry = next;
        for idx in idle {
            self.close_relay(idx, poll);
        }
    }

    /// When [`RelayPool::expire`] has work at the earliest (`None`: no relays).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.next_expiry
    }

    /// Number of live relays.
    /// Datagram destinations the guard refused since start (for the metrics).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn len(&self) -> usize {
        self.relays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::resolver::{Resolved, Resolver};
    use mio::{Events, Waker};
    use std::sync::Arc;

    const MAX_RELAYS: usize = 2;

    struct Rig {
        poll: Poll,
        resolver: Resolver,
        guard: DestGuard,
        pool: RelayPool,
    }

    impl Rig {
        fn new() -> Rig {
            let poll = Poll::new().unwrap();
            let waker = Arc::new(Waker::new(poll.registry(), Tok::Waker.token()).unwrap());
            Rig {
                resolver: Resolver::new(1, 8, waker).unwrap(),
                poll,
                guard: DestGuard::new(true),
                pool: RelayPool::new(MAX_RELAYS),
            }
        }

        fn send(&mut self, session: u64, dest: &Destination, data: &[u8]) -> bool {
            self.send_on(session, 1, dest, data)
        }

        fn send_on(
            &mut self,
            session: u64,
            assoc: AssocId,
            dest: &Destination,
            data: &[u8],
        ) -> bool {
            let now = Instant::now();
            let (guard, poll, resolver) = (&mut self.guard, &self.poll, &self.resolver);
            let mut lookup = |t: Ticket, name: &str, port: u16| resolver.lookup(t, name, port).ok();
            self.pool.send(
                now,
                SessionId(session),
                assoc,
                dest,
                data,
                guard,
                poll,
                &mut lookup,
            )
        }

        fn next_answer(&mut self) -> Resolved {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut events = Events::with_capacity(4);
            loop {
                if let Some(r) = self.resolver.try_recv() {
                    return r;
                }
                assert!(Instant::now() < deadline, "no resolver answer");
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(50)))
                    .unwrap();
            }
        }

        fn deliver(&mut self, r: &Resolved) {
            let addrs = r.result.clone().unwrap_or_default();
            let (guard, poll) = (&mut self.guard, &self.poll);
            self.pool
                .resolved(r.ticket, &addrs, guard, Instant::now(), poll);
        }
    }

    fn sink() -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    }

    fn localhost(port: u16) -> Destination {
        Destination::domain("localhost", port).unwrap()
    }

    #[test]
    fn a_stale_lookup_answer_never_reaches_the_next_relay_in_the_same_slot() {
        let mut rig = Rig::new();
        let (stale_sink, real_sink) = (sink(), sink());
        let stale_port = stale_sink.local_addr().unwrap().port();
        let real_port = real_sink.local_addr().unwrap().port();
        // Session 1 asks for a name; its relay closes before the answer is used.
        assert!(!rig.send(1, &localhost(stale_port), b"from session 1"));
        let stale = rig.next_answer();
        rig.pool.close_session(SessionId(1), &rig.poll);
        // Session 2 gets the same relay slot and waits for a lookup of its own.
        assert!(!rig.send(2, &localhost(real_port), b"from session 2"));
        assert_eq!(
            rig.pool.by_session.get(&SessionId(2)),
            Some(&vec![(1, stale.ticket.index)])
        );
        let fresh = rig.next_answer();
        // The stale answer arrives first: it must not release session 2's datagram.
        rig.deliver(&stale);
        let mut buf = [0u8; 64];
        assert!(
            stale_sink.recv_from(&mut buf).is_err(),
            "session 2's datagram went to session 1's destination"
        );
        let relay = rig.pool.relays.get(stale.ticket.index).unwrap();
        assert!(
            relay.dns.is_empty(),
            "the stale name->address pair was cached"
        );
        assert_eq!(relay.pending.len(), 1);
        // Its own answer does.
        rig.deliver(&fresh);
        let (n, _) = real_sink.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"from session 2");
    }

    #[test]
    fn a_burst_beyond_one_batch_is_reported_still_readable_until_drained() {
        let mut rig = Rig::new();
        let peer = sink();
        let peer_addr = peer.local_addr().unwrap();
        assert!(rig.send(7, &Destination::Addr(peer_addr), b"hello"));
        let idx = rig.pool.by_session[&SessionId(7)][0].1;
        let relay_addr = rig.pool.relays.get(idx).unwrap().v4.as_ref().unwrap();
        let relay_addr = relay_addr.local_addr().unwrap();
        for i in 0..300u32 {
            peer.send_to(&i.to_be_bytes(), relay_addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        let mut rounds = 0;
        loop {
            rounds += 1;
            let r = rig.pool.receive(idx, false, |s, a, from, d| {
                assert_eq!(
                    (s, a, from),
                    (SessionId(7), 1, Destination::Addr(peer_addr))
                );
                got.push(u32::from_be_bytes(d.try_into().unwrap()));
            });
            if !r.still_readable() {
                break;
            }
        }
        assert_eq!(rounds, 2);
        assert_eq!(got, (0..300).collect::<Vec<_>>());
    }

    /// Thousands of relays: each closes at its own idle deadline (not before, not never), the
    /// pool's next expiry follows the oldest survivor, and activity postpones a relay's end.
    #[test]
    fn idle_relays_expire_at_their_deadlines_at_scale() {
        let poll = Poll::new().unwrap();
        let mut pool = RelayPool::new(10_000);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..3_000u64 {
            assert!(
                pool.relay_for(t0 + ms(i), SessionId(i / 4), (i % 4) as AssocId)
                    .is_some()
            );
        }
        assert_eq!(pool.next_expiry(), Some(t0 + RELAY_IDLE));
        // Relay 0 was active late: it outlives its creation deadline.
        let first = pool.by_session[&SessionId(0)][0].1;
        pool.relays.get_mut(first).unwrap().last_active = t0 + ms(5_000);
        pool.expire(t0 + RELAY_IDLE - ms(1), &poll);
        assert_eq!(pool.len(), 3_000, "nothing is idle yet");
        pool.expire(t0 + RELAY_IDLE + ms(1_499), &poll);
        assert_eq!(pool.len(), 3_000 - 1_499, "relays 1..=1499 are idle");
        assert!(pool.relays.get(first).is_some(), "the active relay stays");
        assert_eq!(pool.next_expiry(), Some(t0 + ms(1_500) + RELAY_IDLE));
        pool.expire(t0 + ms(5_000) + RELAY_IDLE, &poll);
        assert_eq!(pool.len(), 0);
        assert_eq!(pool.next_expiry(), None);
        assert!(pool.by_session.is_empty());
    }

    #[test]
    fn relays_beyond_the_cap_are_not_created_until_one_closes() {
        let mut rig = Rig::new();
        let peer = sink();
        let to = Destination::Addr(peer.local_addr().unwrap());
        assert!(rig.send(1, &to, b"a"));
        assert!(rig.send(2, &to, b"b"));
        assert!(!rig.send(3, &to, b"c"), "a third relay would pass the cap");
        assert_eq!(rig.pool.len(), MAX_RELAYS);
        assert!(rig.send(1, &to, b"d"), "existing relays keep working");
        rig.pool.close_session(SessionId(2), &rig.poll);
        assert!(rig.send(3, &to, b"e"));
    }

    #[test]
    fn each_association_has_its_own_socket_and_answers_stay_in_it() {
        let mut rig = Rig::new();
        rig.pool = RelayPool::new(4 * MAX_RELAYS_PER_SESSION); // the per-session cap binds here
        let echo = sink();
        let echo_addr = Destination::Addr(echo.local_addr().unwrap());
        assert!(rig.send_on(3, 1, &echo_addr, b"from 1"));
        assert!(rig.send_on(3, 2, &echo_addr, b"from 2"));
        let relays = rig.pool.by_session[&SessionId(3)].clone();
        assert_eq!(relays.len(), 2);
        // The destination sees two different source ports and answers each.
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            let mut answer = b"re:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            echo.send_to(&answer, from).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        for (assoc, idx) in relays {
            let mut got = Vec::new();
            rig.pool.receive(idx, false, |s, a, _, d| {
                assert_eq!((s, a), (SessionId(3), assoc));
                got.push(d.to_vec());
            });
            assert_eq!(got, vec![format!("re:from {assoc}").into_bytes()]);
        }
        // Associations per session are capped; closing the session closes them all.
        for a in 3..=MAX_RELAYS_PER_SESSION as AssocId {
            assert!(rig.send_on(3, a, &echo_addr, b"x"));
        }
        assert!(!rig.send_on(3, 999, &echo_addr, b"x"));
        rig.pool.close_session(SessionId(3), &rig.poll);
        assert!(rig.pool.is_empty());
        assert!(rig.pool.by_session.is_empty());
    }

    #[test]
    fn guard_refusals_are_counted() {
        let mut rig = Rig::new();
        rig.guard = DestGuard::new(false); // loopback refused
        let to = Destination::Addr(sink().local_addr().unwrap());
        assert!(!rig.send(1, &to, b"x"));
        assert!(!rig.send(1, &to, b"y"));
        assert_eq!(rig.pool.refused(), 2);
    }
}
