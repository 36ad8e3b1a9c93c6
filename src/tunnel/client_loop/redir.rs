//! The client loop's router mode (`redir.enabled`; a child module of `client_loop`, like TUN
//! mode's): the LAN's TCP, sent to `redir.bind` by an nftables `redirect`, is accepted and its
//! original destination read from conntrack (`SO_ORIGINAL_DST`), so each connection becomes a
//! local connection with a known destination. The LAN's UDP, handed by TPROXY to a transparent
//! socket on the same port, is read with its original destination; each flow
//! `(source, destination)` becomes tunnel datagrams with an association id of its own
//! ([`UdpFlows`]), and answers leave from a transparent socket bound to the flow's destination
//! ([`Repliers`]: one per destination, bounded, closed when idle). The rules are
//! [`super::super::router_rules`]'s.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::{TcpListener, UdpSocket};

use super::{Capture, ClientLoop};
use crate::proto::transport::AssocId;
use crate::sys::{self, TransparentRole};
use crate::tunnel::driver::token::Tok;
use crate::tunnel::udp_flows::{MAX_UDP_FLOWS, REDIR_FLOW_IDS, UDP_IDLE, UdpFlows};

/// Datagrams read from one TPROXY socket per loop turn before other sockets get their turn.
const UDP_BATCH: usize = 64;
/// How often flows and idle reply sockets are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Reply sockets kept open at most (one per destination answering; routers have few fds).
const MAX_REPLIERS: usize = 256;

/// Router mode settings of a client loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirOptions {
    /// `redir.bind`: the port the rules send the LAN's TCP and UDP to.
    pub bind: SocketAddr,
}

/// The addresses router mode listens on: an unspecified address means both families on its
/// port (the other family's failure is only logged), any other address itself.
fn bind_addrs(bind: SocketAddr) -> Vec<SocketAddr> {
    if bind.ip().is_unspecified() {
        let first = bind;
        let other = match bind.ip() {
            IpAddr::V4(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        vec![first, SocketAddr::new(other, bind.port())]
    } else {
        vec![bind]
    }
}

/// Transparent reply sockets, one per original destination that answers: a socket bound to the
/// destination's address and port (foreign to this host) sends its answers to the LAN host that
/// asked, so they arrive from where the host sent. Bounded (the least recently used is closed)
/// and closed after [`UDP_IDLE`] without an answer.
struct Repliers<S> {
    map: HashMap<SocketAddr, (S, Instant)>,
    cap: usize,
}

impl<S> Repliers<S> {
    fn new(cap: usize) -> Self {
        Repliers {
            map: HashMap::new(),
            cap,
        }
    }

    /// The socket for `dest`, opened with `open` when there is none.
    fn get_or_open(
        &mut self,
        dest: SocketAddr,
        now: Instant,
        open: impl FnOnce(SocketAddr) -> io::Result<S>,
    ) -> io::Result<&S> {
        if !self.map.contains_key(&dest) {
            let sock = open(dest)?;
            if self.map.len() >= self.cap {
                if let Some((&lru, _)) = self.map.iter().min_by_key(|(_, (_, last))| *last) {
                    self.map.remove(&lru);
                }
            }
            self.map.insert(dest, (sock, now));
        }
        let (sock, last) = self
            .map
            .get_mut(&dest)
            .ok_or_else(|| io::Error::other("reply socket vanished"))?;
        *last = now;
        Ok(sock)
    }

    /// Closes the sockets without an answer for [`UDP_IDLE`].
    fn expire(&mut self, now: Instant) {
        self.map
            .retain(|_, (_, last)| now.saturating_duration_since(*last) < UDP_IDLE);
    }
}

/// One TPROXY socket.
struct Receiver {
    sock: UdpSocket,
    /// The socket may hold datagrams (mio is edge-triggered).
    readable: bool,
}

/// Router mode's state in the client loop.
pub(super) struct RedirState {
    listeners: Vec<TcpListener>,
    receivers: Vec<Receiver>,
    flows: UdpFlows,
    /// Each UDP flow stays on one session (the server's relay for it lives there).
    flow_slots: HashMap<AssocId, usize>,
    repliers: Repliers<StdUdpSocket>,
    forgotten: Vec<AssocId>,
    next_expire: Instant,
}

impl RedirState {
    /// Binds the TCP listeners and the transparent UDP sockets (CAP_NET_ADMIN) and registers
    /// them.
    pub(super) fn open(
        options: &RedirOptions,
        registry: &mio::Registry,
        now: Instant,
    ) -> Result<RedirState, String> {
        let mut listeners = Vec::new();
        let mut receivers = Vec::new();
        for (n, addr) in bind_addrs(options.bind).into_iter().enumerate() {
            let opened = sys::listen_tcp(addr).and_then(|tcp| {
                let udp = sys::transparent_udp(addr, TransparentRole::Receiver)?;
                Ok((tcp, udp))
            });
            let (tcp, udp) = match opened {
                Ok(x) => x,
                // The family the address did not name is optional (hosts without IPv6).
                Err(e) if n > 0 => {
                    log::warn!("router mode: not listening on {addr}: {e}");
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(format!(
                        "router mode on {addr}: {e}: the transparent UDP socket (IP_TRANSPARENT) \
                         needs CAP_NET_ADMIN; run as root or grant the capability"
                    ));
                }
                Err(e) => return Err(format!("router mode: cannot listen on {addr}: {e}")),
            };
            let mut tcp = TcpListener::from_std(tcp);
            let mut udp = UdpSocket::from_std(udp);
            let i = listeners.len();
            registry
                .register(&mut tcp, Tok::RedirListener(i).token(), Interest::READABLE)
                .map_err(|e| e.to_string())?;
            registry
                .register(&mut udp, Tok::RedirUdp(i).token(), Interest::READABLE)
                .map_err(|e| e.to_string())?;
            log::info!("router mode: redirected TCP and TPROXY UDP on {addr}");
            listeners.push(tcp);
            receivers.push(Receiver {
                sock: udp,
                readable: true,
            });
        }
        Ok(RedirState {
            listeners,
            receivers,
            flows: UdpFlows::new(REDIR_FLOW_IDS, MAX_UDP_FLOWS),
            flow_slots: HashMap::new(),
            repliers: Repliers::new(MAX_REPLIERS),
            forgotten: Vec::new(),
            next_expire: now + EXPIRE_EVERY,
        })
    }
}

impl ClientLoop {
    /// Accepts redirected connections on listener `i`: each becomes a local connection waiting
    /// for a stream to its original destination.
    pub(super) fn redir_accept(&mut self, now: Instant, i: usize) {
        loop {
            let Some(listener) = self.redir.as_ref().and_then(|r| r.listeners.get(i)) else {
                return;
            };
            let Some((sock, peer)) = super::accept_next(listener, "router mode listener") else {
                return;
            };
            let local = sock.local_addr().ok();
            let v6 = local.is_some_and(|a| matches!(a.ip().to_canonical(), IpAddr::V6(_)));
            match sys::original_dst(&sock, v6) {
                // Connected to the port itself, not redirected: nowhere to go.
                Ok(dest) if Some(dest) == local => {
                    log::debug!("router mode: {peer} connected to the port directly; closed");
                    sys::reset_on_close(&sock);
                }
                Ok(dest) => self.admit_captured(now, sock, peer, dest, Capture::Redir),
                Err(e) => {
                    log::debug!("router mode: no original destination for {peer}: {e}");
                    sys::reset_on_close(&sock);
                }
            }
        }
    }

    /// Reads up to [`UDP_BATCH`] datagrams from each TPROXY socket that may hold some; each
    /// goes into the tunnel on its flow.
    pub(super) fn redir_receive(&mut self, now: Instant) {
        self.direct_udp_receive(now);
        let Some(mut redir) = self.redir.take() else {
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        for r in 0..redir.receivers.len() {
            for _ in 0..UDP_BATCH {
                let rx = &mut redir.receivers[r];
                if !rx.readable {
                    break;
                }
                let d = match sys::recv_original_dst(&rx.sock, &mut buf) {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::debug!("router mode UDP: {e}");
                        }
                        rx.readable = false;
                        break;
                    }
                };
                if d.truncated || is_multicast_or_broadcast(d.to.ip()) {
                    continue;
                }
                let (id, _) = redir.flows.outbound(d.from, d.to, now);
                let data = buf.get(..d.len).unwrap_or_default();
                self.dns_query_out(now, id, d.to, data);
                if !self.direct_flow_send(now, id, d.to, data) {
                    self.send_flow_datagram(&mut redir.flow_slots, id, d.to, data);
                }
            }
        }
        self.buf = buf;
        self.redir = Some(redir);
    }

    /// An answer from the tunnel for a router-mode flow: sent to the LAN host from the flow's
    /// original destination.
    /// An answer from `from` for flow `id` goes to the LAN host from a transparent socket bound
    /// to `from` itself: the destination's answers come from the destination, anyone else's
    /// (the server's relay takes datagrams from any host) from their true source, never as the
    /// destination (endpoint-independent, like a full-cone NAT).
    pub(super) fn redir_datagram_in(
        &mut self,
        now: Instant,
        id: AssocId,
        from: SocketAddr,
        data: &[u8],
    ) {
        let Some(redir) = self.redir.as_mut() else {
            return;
        };
        let Some(flow) = redir.flows.get(id) else {
            return;
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        if from.is_ipv4() != flow.app.is_ipv4() || is_multicast_or_broadcast(from.ip()) {
            return;
        }
        let _ = redir.flows.inbound(id, now);
        let open = |dest| sys::transparent_udp(dest, TransparentRole::Replier);
        match redir.repliers.get_or_open(from, now, open) {
            Ok(sock) => {
                if let Err(e) = sock.send_to(data, flow.app) {
                    log::debug!("router mode: answer to {}: {e}", flow.app);
                }
            }
            Err(e) => log::debug!("router mode: no reply socket on {from}: {e}"),
        }
    }

    /// Flow and reply-socket expiry, once a second.
    pub(super) fn redir_timers(&mut self, now: Instant) {
        let Some(redir) = self.redir.as_mut() else {
            return;
        };
        if now < redir.next_expire {
            return;
        }
        redir.next_expire = now + EXPIRE_EVERY;
        let mut forgotten = std::mem::take(&mut redir.forgotten);
        redir.flows.expire(now, &mut forgotten);
        for id in forgotten.drain(..) {
            redir.flow_slots.remove(&id);
            let registry = self.core.registry();
            self.direct_udp.forget(id, registry, &mut self.learned);
        }
        redir.forgotten = forgotten;
        redir.repliers.expire(now);
    }

    /// Marks TPROXY socket `i` readable (a mio event).
    pub(super) fn redir_readable(&mut self, i: usize) {
        if let Some(rx) = self.redir.as_mut().and_then(|r| r.receivers.get_mut(i)) {
            rx.readable = true;
        }
    }

    /// When router mode needs the loop again (expiry, a readable socket).
    pub(super) fn redir_deadline(&self, now: Instant) -> Option<Instant> {
        let redir = self.redir.as_ref()?;
        Some(if redir.receivers.iter().any(|r| r.readable) {
            now
        } else {
            redir.next_expire
        })
    }
}

fn is_multicast_or_broadcast(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_bind_listens_in_both_families_a_specific_one_alone() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            bind_addrs(sa("0.0.0.0:1090")),
            vec![sa("0.0.0.0:1090"), sa("[::]:1090")]
        );
        assert_eq!(
            bind_addrs(sa("[::]:1091")),
            vec![sa("[::]:1091"), sa("0.0.0.0:1091")]
        );
        assert_eq!(
            bind_addrs(sa("192.168.1.1:1090")),
            vec![sa("192.168.1.1:1090")]
        );
    }

    #[test]
    fn reply_sockets_are_shared_per_destination_bounded_and_closed_when_idle() {
        let t0 = Instant::now();
        let mut r: Repliers<u32> = Repliers::new(2);
        let mut opened = 0;
        let mut open = |_: SocketAddr| {
            opened += 1;
            Ok(opened)
        };
        let (a, b, c) = (
            "8.8.8.8:53".parse().unwrap(),
            "1.1.1.1:53".parse().unwrap(),
            "9.9.9.9:53".parse().unwrap(),
        );
        assert_eq!(*r.get_or_open(a, t0, &mut open).unwrap(), 1);
        assert_eq!(*r.get_or_open(a, t0, &mut open).unwrap(), 1, "reused");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(*r.get_or_open(b, t1, &mut open).unwrap(), 2);
        // Full: the least recently used (a) is closed for c.
        assert_eq!(*r.get_or_open(c, t1, &mut open).unwrap(), 3);
        assert!(!r.map.contains_key(&a) && r.map.len() == 2);
        // A failed open leaves the cache as it was.
        let err = r.get_or_open(a, t1, |_| Err(io::Error::other("no")));
        assert!(err.is_err() && r.map.len() == 2);
        r.expire(t1 + UDP_IDLE);
        assert!(r.map.is_empty());
    }
}
