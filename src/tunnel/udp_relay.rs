//! Server side of SOCKS5 UDP ASSOCIATE: per-session UDP sockets that send the client's tunnel
//! datagrams to their destinations and carry the answers back.
//!
//! Each session gets at most one relay (created on its first datagram, closed with the session or
//! after [`RELAY_IDLE`]), with one socket per address family. Names are resolved through the
//! resolver pool (a small per-relay cache; a few datagrams wait for a lookup, more are dropped —
//! UDP senders retry). Answers from an address that the client named by domain are labelled with
//! that domain again so the client can match them. Every destination passes the guard.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Poll, Token};

use super::dest_guard::{DestGuard, Verdict};
use super::resolver::{Lookup, Resolver};
use super::slab::Slab;
use crate::proto::SessionId;
use crate::proto::transport::Destination;

/// A relay closes after this long without traffic.
pub const RELAY_IDLE: Duration = Duration::from_secs(120);
const DNS_CACHE: usize = 32;
const DNS_TTL: Duration = Duration::from_secs(60);
const NAME_LABELS: usize = 64;
const PENDING_DATAGRAMS: usize = 8;
const MAX_DATAGRAM: usize = 65_535;

/// Identifies the relay of a session in resolver tokens.
#[derive(Debug, Clone, Copy)]
pub struct RelayToken(pub u64);

struct Pending {
    seq: u16,
    name: String,
    port: u16,
    data: Vec<u8>,
}

struct Relay {
    session: SessionId,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    /// Resolved address → the domain destination the client used.
    labels: Vec<(SocketAddr, Destination)>,
    dns: Vec<(String, u16, SocketAddr, Instant)>,
    pending: Vec<Pending>,
    next_seq: u16,
    last_active: Instant,
}

/// All relays of the server loop.
pub struct RelayPool {
    base: usize,
    relays: Slab<Relay>,
    by_session: HashMap<SessionId, usize>,
    scratch: Box<[u8]>,
}

impl RelayPool {
    /// Relay sockets use mio tokens from `base` upwards.
    pub fn new(base: usize) -> Self {
        RelayPool {
            base,
            relays: Slab::new(),
            by_session: HashMap::new(),
            scratch: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
        }
    }

    fn relay_for(&mut self, now: Instant, session: SessionId) -> usize {
        if let Some(&i) = self.by_session.get(&session) {
            return i;
        }
        let i = self.relays.insert(Relay {
            session,
            v4: None,
            v6: None,
            labels: Vec::new(),
            dns: Vec::new(),
            pending: Vec::new(),
            next_seq: 0,
            last_active: now,
        });
        self.by_session.insert(session, i);
        i
    }

    /// Sends one datagram of `session` to `dest`. Returns whether it left (for accounting).
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        now: Instant,
        _token: RelayToken,
        session: SessionId,
        dest: &Destination,
        data: &[u8],
        guard: &mut DestGuard,
        poll: &Poll,
        resolver: &Resolver,
        token_bit: u64,
    ) -> bool {
        let idx = self.relay_for(now, session);
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
                    let seq = relay.next_seq;
                    relay.next_seq = relay.next_seq.wrapping_add(1);
                    let token = token_bit | ((idx as u64) << 16) | u64::from(seq);
                    match resolver.lookup(token, name, *port) {
                        Ok(Lookup::Ready(a)) => a,
                        Ok(Lookup::Pending) => {
                            relay.pending.push(Pending {
                                seq,
                                name: name.clone(),
                                port: *port,
                                data: data.to_vec(),
                            });
                            return false;
                        }
                        Err(_) => return false,
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
        Self::send_to(self.base, idx, relay, addr, data, guard, now, poll)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_to(
        base: usize,
        idx: usize,
        relay: &mut Relay,
        addr: SocketAddr,
        data: &[u8],
        guard: &mut DestGuard,
        now: Instant,
        poll: &Poll,
    ) -> bool {
        if let Verdict::Deny(reason) = guard.check(addr, now) {
            log::debug!("udp relay: destination refused by the guard: {reason:?}");
            return false;
        }
        let (slot, family) = if addr.is_ipv4() {
            (&mut relay.v4, 0)
        } else {
            (&mut relay.v6, 1)
        };
        if slot.is_none() {
            let bind: SocketAddr = if family == 0 {
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
            let mut sock = UdpSocket::from_std(std_sock);
            if poll
                .registry()
                .register(
                    &mut sock,
                    Token(base + idx * 2 + family),
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

    /// A lookup for a waiting datagram finished.
    pub fn resolved(
        &mut self,
        token: u64,
        addrs: &[SocketAddr],
        guard: &mut DestGuard,
        now: Instant,
        poll: &Poll,
    ) {
        let idx = (token >> 16) as usize & 0xffff_ffff;
        let seq = (token & 0xffff) as u16;
        let base = self.base;
        let Some(relay) = self.relays.get_mut(idx) else {
            return;
        };
        let Some(pos) = relay.pending.iter().position(|p| p.seq == seq) else {
            return;
        };
        let p = relay.pending.swap_remove(pos);
        let Some(addr) = addrs
            .iter()
            .find(|a| matches!(guard.check(**a, now), Verdict::Allow))
            .copied()
        else {
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
        Self::send_to(base, idx, relay, addr, &p.data, guard, now, poll);
    }

    /// Reads every datagram waiting on a relay socket: `(session, source, payload)`.
    pub fn receive(&mut self, token: Token, out: &mut Vec<(SessionId, Destination, Vec<u8>)>) {
        let Some(rel) = token.0.checked_sub(self.base) else {
            return;
        };
        let (idx, family) = (rel / 2, rel % 2);
        let Some(relay) = self.relays.get_mut(idx) else {
            return;
        };
        let sock = if family == 0 {
            relay.v4.as_ref()
        } else {
            relay.v6.as_ref()
        };
        let Some(sock) = sock else { return };
        loop {
            match sock.recv_from(&mut self.scratch) {
                Ok((n, from)) => {
                    let from = canonical(from);
                    let dest = relay
                        .labels
                        .iter()
                        .find(|(a, _)| *a == from)
                        .map(|(_, d)| d.clone())
                        .unwrap_or(Destination::Addr(from));
                    out.push((relay.session, dest, self.scratch[..n].to_vec()));
                    if out.len() >= 256 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Closes the relay of a session.
    pub fn close_session(&mut self, session: SessionId, poll: &Poll) {
        if let Some(idx) = self.by_session.remove(&session) {
            if let Some(mut r) = self.relays.remove(idx) {
                for s in [r.v4.as_mut(), r.v6.as_mut()].into_iter().flatten() {
                    let _ = poll.registry().deregister(s);
                }
            }
        }
    }

    /// Closes relays idle for [`RELAY_IDLE`].
    pub fn expire(&mut self, now: Instant, poll: &Poll) {
        let idle: Vec<SessionId> = self
            .relays
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last_active) >= RELAY_IDLE)
            .map(|(_, r)| r.session)
            .collect();
        for s in idle {
            self.close_session(s, poll);
        }
    }

    /// Number of live relays.
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
