//! Direct UDP flows of the capture modes (split routing by learned address; a child module of
//! `client_loop`): a captured UDP flow (TUN or router mode) to an address an excluded name
//! resolved to is relayed through a connected UDP socket of its own — in TUN mode carrying the
//! mark that keeps it out of the device — instead of tunnel datagrams. Answers go back exactly as
//! the tunnel's would (the capture mode writes them, by the flow's association id). Bounded
//! ([`MAX_DIRECT_FLOWS`], the least recently used closed), closed after
//! [`UDP_IDLE`](crate::tunnel::udp_flows::UDP_IDLE) or when the capture mode forgets the flow;
//! the learned address is held while its flow is open.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::UdpSocket;

use super::ClientLoop;
use crate::proto::transport::AssocId;
use crate::tunnel::driver::token::Tok;
use crate::tunnel::learned::LearnedAddrs;
use crate::tunnel::slab::Slab;
use crate::tunnel::tun::front::TunFront;
use crate::tunnel::udp_flows::{REDIR_FLOW_IDS, UDP_IDLE};

/// Direct UDP sockets open at most (routers have few file descriptors).
pub(super) const MAX_DIRECT_FLOWS: usize = 256;
/// Answers read from one socket per loop turn before other sockets get their turn.
const RECV_BATCH: usize = 32;
/// How often idle flows are closed.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

struct Flow {
    sock: UdpSocket,
    id: AssocId,
    dest: SocketAddr,
    last: Instant,
    /// The socket may hold answers (mio is edge-triggered).
    readable: bool,
}

/// The direct UDP flows of the capture modes.
#[derive(Default)]
pub(super) struct DirectUdp {
    flows: Slab<Flow>,
    by_id: HashMap<AssocId, usize>,
    /// Some flow may be readable.
    any_readable: bool,
    next_expire: Option<Instant>,
}

impl DirectUdp {
    /// Closes flow `i` and releases its learned address.
    fn close(&mut self, i: usize, registry: &mio::Registry, learned: &mut LearnedAddrs) {
        if let Some(mut f) = self.flows.remove(i) {
            let _ = registry.deregister(&mut f.sock);
            self.by_id.remove(&f.id);
            learned.release(f.dest.ip(), f.last);
        }
    }

    /// The capture mode forgot flow `id` (its id may be handed out again): closed.
    pub(super) fn forget(
        &mut self,
        id: AssocId,
        registry: &mio::Registry,
        learned: &mut LearnedAddrs,
    ) {
        if let Some(&i) = self.by_id.get(&id) {
            self.close(i, registry, learned);
        }
    }

    /// A readiness event for flow `i`.
    pub(super) fn mark_readable(&mut self, i: usize) {
        if let Some(f) = self.flows.get_mut(i) {
            f.readable = true;
            self.any_readable = true;
        }
    }

    /// When the loop must come back: at once while a socket may hold answers, else the next
    /// expiry (none while there is no flow).
    pub(super) fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.any_readable {
            Some(now)
        } else {
            self.next_expire
        }
    }
}

/// A UDP socket connected to `dest`, non-blocking, with `mark` when given.
fn open_socket(dest: SocketAddr, mark: Option<u32>) -> io::Result<std::net::UdpSocket> {
    let any = match dest.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sock = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    if let Some(mark) = mark {
        crate::sys::set_mark(&sock, mark)?;
    }
    sock.connect(dest)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Reads up to [`RECV_BATCH`] answers from `sock` (connected to `dest`) into `buf`, each to
/// `each`; whether it may hold more. Only `WouldBlock` ends the batch early: on a connected
/// UDP socket an ICMP error (`ECONNREFUSED`, unreachable) is reported before the answers
/// queued behind it, so other errors are logged and reading goes on.
fn read_batch(
    sock: &UdpSocket,
    buf: &mut [u8],
    dest: SocketAddr,
    mut each: impl FnMut(&[u8]),
) -> bool {
    for _ in 0..RECV_BATCH {
        match sock.recv(buf) {
            Ok(n) => each(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => log::debug!("direct UDP from {dest}: {e}"),
        }
    }
    true
}

impl ClientLoop {
    /// A captured datagram of flow `id` to `dest`: sent directly when the flow is direct already
    /// or `dest` is a learned address (true), else left to the tunnel (false). DNS (port 53,
    /// `tun.dns`) always goes through the tunnel.
    pub(super) fn direct_flow_send(
        &mut self,
        now: Instant,
        id: AssocId,
        dest: SocketAddr,
        data: &[u8],
    ) -> bool {
        let d = &self.direct_udp;
        let existing = d.by_id.get(&id).copied();
        let i = match existing {
            Some(i) if d.flows.get(i).is_some_and(|f| f.dest == dest) => i,
            _ => {
                if let Some(i) = existing {
                    // The id names another flow now.
                    let registry = self.core.registry();
                    self.direct_udp.close(i, registry, &mut self.learned);
                }
                if !self.learned_goes_direct(dest, now) {
                    return false;
                }
                match self.open_direct_flow(id, dest, now) {
                    Some(i) => i,
                    None => return false,
                }
            }
        };
        if let Some(f) = self.direct_udp.flows.get_mut(i) {
            f.last = now;
            if let Err(e) = f.sock.send(data) {
                log::debug!("direct UDP to {dest}: {e}");
            }
        }
        true
    }

    /// Opens flow `id`'s socket to `dest` (a learned address, held from now until the flow
    /// closes), closing the least recently used flow when full; `None` when it cannot be opened
    /// (the flow goes through the tunnel then).
    fn open_direct_flow(&mut self, id: AssocId, dest: SocketAddr, now: Instant) -> Option<usize> {
        let registry = self.core.registry();
        let d = &mut self.direct_udp;
        if d.flows.len() >= MAX_DIRECT_FLOWS {
            let lru = d.flows.iter().min_by_key(|(_, f)| f.last).map(|(i, _)| i);
            if let Some(lru) = lru {
                d.close(lru, registry, &mut self.learned);
            }
        }
        let mark = self.options.tun.as_ref().map(|t| t.settings.fwmark);
        let opened = open_socket(dest, mark).and_then(|sock| {
            let mut sock = UdpSocket::from_std(sock);
            let i = d.flows.next_index();
            registry.register(&mut sock, Tok::DirectUdp(i).token(), Interest::READABLE)?;
            Ok(d.flows.insert(Flow {
                sock,
                id,
                dest,
                last: now,
                readable: true,
            }))
        });
        match opened {
            Ok(i) => {
                d.by_id.insert(id, i);
                d.any_readable = true;
                d.next_expire.get_or_insert(now + EXPIRE_EVERY);
                self.learned.hold(dest.ip(), now);
                log::debug!("direct UDP flow to {dest} (a learned address)");
                Some(i)
            }
            Err(e) => {
                log::debug!("direct UDP to {dest}: {e}; through the tunnel instead");
                None
            }
        }
    }

    /// Reads answers from the direct sockets that may hold some; each goes back through its
    /// capture mode. Closes idle flows once a second.
    pub(super) fn direct_udp_receive(&mut self, now: Instant) {
        let mut d = std::mem::take(&mut self.direct_udp);
        if d.any_readable {
            d.any_readable = false;
            let mut buf = std::mem::take(&mut self.buf);
            for (_, f) in d.flows.iter_mut() {
                if f.readable {
                    let id = f.id;
                    let mut answered = false;
                    let from = f.dest; // the socket is connected: only its peer answers
                    f.readable = read_batch(&f.sock, &mut buf, f.dest, |data| {
                        answered = true;
                        if TunFront::owns(id) {
                            self.tun_datagram_in(now, id, from, data);
                        } else if REDIR_FLOW_IDS.contains(&id) {
                            self.redir_datagram_in(now, id, from, data);
                        }
                    });
                    if answered {
                        f.last = now;
                    }
                }
                d.any_readable |= f.readable;
            }
            self.buf = buf;
        }
        if d.next_expire.is_some_and(|t| now >= t) {
            let idle: Vec<usize> = d
                .flows
                .iter()
                .filter(|(_, f)| now.saturating_duration_since(f.last) >= UDP_IDLE)
                .map(|(i, _)| i)
                .collect();
            for i in idle {
                d.close(i, self.core.registry(), &mut self.learned);
            }
            d.next_expire = (!d.flows.is_empty()).then_some(now + EXPIRE_EVERY);
        }
        self.direct_udp = d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_icmp_error_does_not_hide_the_answers_queued_behind_it() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = peer.local_addr().unwrap();
        let sock = open_socket(dest, None).unwrap();
        peer.send_to(b"answer", sock.local_addr().unwrap()).unwrap();
        drop(peer);
        // The next datagram finds the port closed: an ICMP port unreachable comes back and
        // the socket reports ECONNREFUSED before the queued answer.
        sock.send(b"query").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let sock = UdpSocket::from_std(sock);
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        let more = read_batch(&sock, &mut buf, dest, |d| got.push(d.to_vec()));
        assert_eq!(got, vec![b"answer".to_vec()]);
        assert!(!more, "drained: WouldBlock ends the batch");
    }
}
