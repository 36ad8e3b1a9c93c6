//! What TUN mode does with each packet the device hands over (pure: bytes and `now` in, a verdict
//! out). TCP is reflected back into the device, address-rewritten, so the kernel terminates it
//! at the client's local listener ([`super::nat`]); the listener's answers are rewritten back.
//! UDP becomes tunnel datagrams, one association id per flow `(application, destination)`, and
//! answers are written back as IP/UDP packets from the original destination. DNS to any address
//! (UDP and TCP port 53) goes to `tun.dns`. Everything else is dropped and counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::time::Instant;

use super::nat::{NatRefusal, TcpNat};
use super::wire::{self, Packet, Unhandled};
use crate::proto::transport::AssocId;
use crate::tunnel::udp_flows::{MAX_UDP_FLOWS, TUN_FLOW_IDS, UdpFlows};

/// TUN flows use association ids from here up (the SOCKS5 associations use those below).
pub const FIRST_FLOW_ID: AssocId = TUN_FLOW_IDS.start;
/// NAT ports handed out to captured TCP connections.
const NAT_PORTS: std::ops::Range<u16> = 10_000..60_000;

/// What to do with a packet read from the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunVerdict {
    /// Write the packet (rewritten in place, same length) back into the device.
    Reflect,
    /// A datagram for the tunnel: association `id`, destination `dest`, payload at `payload`
    /// of the packet buffer. `opened`: the first of a new flow.
    Datagram {
        id: AssocId,
        dest: SocketAddr,
        payload: Range<usize>,
        opened: bool,
    },
    /// Not handled.
    Drop(TunDrop),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunDrop {
    /// Malformed, a fragment, or not IPv4/IPv6.
    Malformed,
    /// ICMP and any protocol but TCP and UDP (documented).
    Protocol,
    /// A TCP segment of no known flow (not a SYN), or no NAT port free.
    TcpFlow,
    /// Multicast or broadcast UDP.
    Multicast,
    /// A family the device has no address of (IPv6 with IPv6 off).
    Family,
}

/// The addresses of TUN mode: the device's own (the listener's) and the virtual peer the
/// reflected connections come from, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunAddrs {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// The local listener's port (on the device's addresses).
    pub listener_port: u16,
}

impl TunAddrs {
    fn device(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6.map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(self.v4))
        }
    }

    /// The virtual peer: the address after the device's (inside its /30 or /126).
    fn peer(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6
                .map(|a| IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))))
        } else {
            Some(IpAddr::V4(Ipv4Addr::from(
                u32::from(self.v4).wrapping_add(1),
            )))
        }
    }
}

/// Packet counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunStats {
    pub reflected: u64,
    pub datagrams: u64,
    pub dropped: u64,
}

/// TUN mode's packet handling.
#[derive(Debug)]
pub struct TunFront {
    addrs: TunAddrs,
    dns: Option<SocketAddr>,
    nat: TcpNat,
    flows: UdpFlows,
    stats: TunStats,
}

impl TunFront {
    /// `dns`: where DNS (port 53, UDP and TCP, any address) goes instead (`tun.dns`).
    pub fn new(addrs: TunAddrs, dns: Option<SocketAddr>) -> Self {
        TunFront {
            addrs,
            dns,
            nat: TcpNat::new(NAT_PORTS.start, NAT_PORTS.end - NAT_PORTS.start),
            flows: UdpFlows::new(TUN_FLOW_IDS, MAX_UDP_FLOWS),
            stats: TunStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> TunStats {
        self.stats
    }

    /// Decides what happens to `packet` (one packet read from the device; rewritten in place
    /// when reflected).
    pub fn handle(&mut self, packet: &mut [u8], now: Instant) -> TunVerdict {
        let verdict = self.decide(packet, now);
        match verdict {
            TunVerdict::Reflect => self.stats.reflected += 1,
            TunVerdict::Datagram { .. } => self.stats.datagrams += 1,
            TunVerdict::Drop(_) => self.stats.dropped += 1,
        }
        verdict
    }

    fn decide(&mut self, packet: &mut [u8], now: Instant) -> TunVerdict {
        let mut p = match Packet::parse(packet) {
            Ok(p) => p,
            Err(Unhandled::Protocol(_)) => return TunVerdict::Drop(TunDrop::Protocol),
            Err(_) => return TunVerdict::Drop(TunDrop::Malformed),
        };
        let (src, dst) = (p.src(), p.dst());
        let v6 = src.is_ipv6();
        let (Some(device), Some(peer)) = (self.addrs.device(v6), self.addrs.peer(v6)) else {
            return TunVerdict::Drop(TunDrop::Family);
        };
        if p.protocol() == wire::UDP {
            return self.udp(&p, src, dst, now);
        }
        let listener = SocketAddr::new(device, self.addrs.listener_port);
        if src == listener {
            // The listener answering a reflected connection: back to `dest → app`.
            return match self.nat.inbound(dst.port(), now) {
                Some((app, dest)) if dst.ip() == peer && p.rewrite(dest, app) => {
                    TunVerdict::Reflect
                }
                _ => TunVerdict::Drop(TunDrop::TcpFlow),
            };
        }
        let syn = p.tcp_flags() & 0x12 == 0x02; // SYN without ACK: a new connection
        match self.nat.outbound(src, dst, syn, now) {
            Ok(port) if p.rewrite(SocketAddr::new(peer, port), listener) => TunVerdict::Reflect,
            Ok(_) | Err(NatRefusal::UnknownFlow) | Err(NatRefusal::Full) => {
                TunVerdict::Drop(TunDrop::TcpFlow)
            }
        }
    }

    fn udp(&mut self, p: &Packet, app: SocketAddr, dest: SocketAddr, now: Instant) -> TunVerdict {
        if is_multicast_or_broadcast(dest.ip()) {
            return TunVerdict::Drop(TunDrop::Multicast);
        }
        let payload = p.udp_payload_range();
        let (id, opened) = self.flows.outbound(app, dest, now);
        TunVerdict::Datagram {
            id,
            dest: self.redirect_dns(dest),
            payload,
            opened,
        }
    }

    fn redirect_dns(&self, dest: SocketAddr) -> SocketAddr {
        match self.dns {
            Some(dns) if dest.port() == 53 => dns,
            _ => dest,
        }
    }

    /// Whether `id` is a TUN flow's.
    pub fn owns(id: AssocId) -> bool {
        TUN_FLOW_IDS.contains(&id)
    }

    /// An answer from `from` (the sender the server's relay saw) for flow `id`, written into
    /// `out` as an IP/UDP packet to the application; its length, or `None` (flow gone, refused,
    /// or it does not fit). From the address the flow's datagrams went to, it comes from the
    /// flow's original destination (the DNS server the application asked, when `tun.dns`
    /// answered). From anyone else — the relay's socket takes datagrams from any host — it keeps
    /// its true source (endpoint-independent, as a full-cone NAT: the application's socket
    /// sees who sent it and filters as it would without the tunnel), never the destination's
    /// address, so an off-path sender cannot speak as the destination. Other senders to a flow
    /// `tun.dns` answers are dropped (nothing but the resolver answers DNS).
    pub fn reply(
        &mut self,
        id: AssocId,
        from: SocketAddr,
        data: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Option<usize> {
        let f = self.flows.get(id)?;
        let sent_to = self.redirect_dns(f.dest);
        let src = if same_endpoint(from, sent_to) {
            f.dest
        } else if sent_to != f.dest {
            return None;
        } else {
            from
        };
        if src.is_ipv4() != f.app.is_ipv4() {
            return None; // a datagram of the other family cannot reach this application
        }
        self.flows.inbound(id, now)?;
        wire::write_udp(out, src, f.app, data)
    }

    /// The destination the application of flow `id` addressed (before `tun.dns` replaced a
    /// DNS server's), while the flow is known.
    pub fn flow_dest(&self, id: AssocId) -> Option<SocketAddr> {
        self.flows.get(id).map(|f| f.dest)
    }

    /// The listener accepted a connection from `peer` (a virtual peer and NAT port): the
    /// destination to open a stream to (`tun.dns` for port 53), or `None` when it is not ours.
    pub fn accepted(&mut self, peer: SocketAddr) -> Option<SocketAddr> {
        let v6 = peer.is_ipv6();
        if self.addrs.peer(v6) != Some(peer.ip()) {
            return None;
        }
        self.nat.accepted(peer.port()).map(|d| self.redirect_dns(d))
    }

    /// The accepted connection from `peer` is closed (ignored unless `peer` is the virtual
    /// peer).
    pub fn closed(&mut self, peer: SocketAddr, now: Instant) {
        if self.addrs.peer(peer.is_ipv6()) == Some(peer.ip()) {
            self.nat.closed(peer.port(), now);
        }
    }

    /// Forgets idle flows (call about once a second); returns the UDP flows forgotten.
    pub fn expire(&mut self, now: Instant, forgotten: &mut Vec<AssocId>) {
        self.nat.expire(now);
        self.flows.expire(now, forgotten);
    }
}

fn is_multicast_or_broadcast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast(),
    }
}

/// The same address and port, IPv4-mapped IPv6 and IPv4 alike (the server's relay may report
/// either form).
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::udp_flows::UDP_IDLE;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const LISTENER: u16 = 7777;

    fn front() -> TunFront {
        TunFront::new(
            TunAddrs {
                v4: Ipv4Addr::new(172, 19, 0, 1),
                v6: Some("fdfe:dcba:9876::1".parse().unwrap()),
                listener_port: LISTENER,
            },
            Some(sa("1.1.1.1:53")),
        )
    }

    /// A minimal TCP segment with `flags` (checksums valid).
    fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
        // Build a UDP packet of the right size, then turn it into TCP by hand.
        let ip_len = if src.is_ipv6() { 40 } else { 20 };
        let mut b = vec![0u8; ip_len + 20];
        wire::write_udp(&mut b, src, dst, &[0u8; 12]).unwrap();
        if src.is_ipv6() {
            b[6] = wire::TCP;
        } else {
            b[9] = wire::TCP;
        }
        b[ip_len + 12] = 5 << 4;
        b[ip_len + 13] = flags;
        b
    }

    fn addrs(b: &mut [u8]) -> (SocketAddr, SocketAddr) {
        let p = Packet::parse(b).unwrap();
        (p.src(), p.dst())
    }

    #[test]
    fn a_tcp_connection_is_reflected_to_the_listener_and_its_answers_back() {
        for (app, dest, device, peer) in [
            (
                "172.19.0.1:40000",
                "93.184.216.34:443",
                "172.19.0.1",
                "172.19.0.2",
            ),
            (
                "[fdfe:dcba:9876::1]:40000",
                "[2606:2800::1]:443",
                "fdfe:dcba:9876::1",
                "fdfe:dcba:9876::2",
            ),
        ] {
            let (app, dest) = (sa(app), sa(dest));
            let device: IpAddr = device.parse().unwrap();
            let peer: IpAddr = peer.parse().unwrap();
            let mut f = front();
            let mut stale = tcp(app, dest, 0x10);
            assert_eq!(
                f.handle(&mut stale, Instant::now()),
                TunVerdict::Drop(TunDrop::TcpFlow)
            );
            let mut syn = tcp(app, dest, 0x02);
            assert_eq!(f.handle(&mut syn, Instant::now()), TunVerdict::Reflect);
            let (s, d) = addrs(&mut syn);
            assert_eq!((s.ip(), d), (peer, SocketAddr::new(device, LISTENER)));
            // The listener accepts a connection from the virtual peer: its destination.
            assert_eq!(f.accepted(s), Some(dest));
            // The listener's SYN-ACK goes back as if from the destination.
            let mut syn_ack = tcp(SocketAddr::new(device, LISTENER), s, 0x12);
            assert_eq!(f.handle(&mut syn_ack, Instant::now()), TunVerdict::Reflect);
            assert_eq!(addrs(&mut syn_ack), (dest, app));
            // Later segments of the app take the same NAT port.
            let mut ack = tcp(app, dest, 0x10);
            assert_eq!(f.handle(&mut ack, Instant::now()), TunVerdict::Reflect);
            assert_eq!(addrs(&mut ack).0, s);
            // A listener segment to a port nobody holds is dropped.
            let mut lost = tcp(
                SocketAddr::new(device, LISTENER),
                SocketAddr::new(peer, 9),
                0x10,
            );
            assert_eq!(
                f.handle(&mut lost, Instant::now()),
                TunVerdict::Drop(TunDrop::TcpFlow)
            );
        }
    }

    #[test]
    fn dns_to_any_address_goes_to_the_configured_resolver_and_answers_come_from_the_asked_one() {
        let mut f = front();
        let (app, asked) = (sa("172.19.0.1:5353"), sa("8.8.8.8:53"));
        let mut q = vec![0u8; 100];
        let n = wire::write_udp(&mut q, app, asked, b"query").unwrap();
        let v = f.handle(&mut q[..n], Instant::now());
        let TunVerdict::Datagram {
            id,
            dest,
            payload,
            opened,
        } = v
        else {
            panic!("{v:?}")
        };
        assert!(opened && TunFront::owns(id));
        assert_eq!(dest, sa("1.1.1.1:53"));
        assert_eq!(&q[payload], b"query");
        let mut out = [0u8; 100];
        let n = f
            .reply(id, sa("1.1.1.1:53"), b"answer", &mut out, Instant::now())
            .unwrap();
        let p = Packet::parse(&mut out[..n]).unwrap();
        assert_eq!(
            (p.src(), p.dst(), p.udp_payload()),
            (asked, app, &b"answer"[..])
        );
        // Nobody but the resolver answers a flow `tun.dns` serves (not even the address asked).
        for forger in ["6.6.6.6:53", "8.8.8.8:53", "1.1.1.1:54"] {
            assert_eq!(
                f.reply(id, sa(forger), b"forged", &mut out, Instant::now()),
                None,
                "{forger}"
            );
        }
        // TCP to port 53 is reflected, and its stream goes to the resolver too.
        let mut syn = tcp(app, sa("9.9.9.9:53"), 0x02);
        assert_eq!(f.handle(&mut syn, Instant::now()), TunVerdict::Reflect);
        let (peer, _) = addrs(&mut syn);
        assert_eq!(f.accepted(peer), Some(sa("1.1.1.1:53")));
    }

    #[test]
    fn udp_flows_keep_their_id_until_idle_and_others_are_dropped() {
        let t0 = Instant::now();
        let mut f = front();
        let send = |f: &mut TunFront, app: &str, dest: &str, at: Instant| {
            let mut b = vec![0u8; 64];
            let n = wire::write_udp(&mut b, sa(app), sa(dest), b"x").unwrap();
            f.handle(&mut b[..n], at)
        };
        let TunVerdict::Datagram { id, .. } = send(&mut f, "172.19.0.1:1000", "5.5.5.5:443", t0)
        else {
            panic!()
        };
        let again = send(&mut f, "172.19.0.1:1000", "5.5.5.5:443", t0);
        assert!(matches!(again, TunVerdict::Datagram { id: i, opened: false, .. } if i == id));
        assert_eq!(
            send(&mut f, "172.19.0.1:1000", "224.0.0.251:5353", t0),
            TunVerdict::Drop(TunDrop::Multicast)
        );
        // Answers from the destination come from it; anyone else's keep their own source (an
        // off-path sender cannot speak as the destination).
        let mut out = [0u8; 64];
        let n = f.reply(id, sa("5.5.5.5:443"), b"ok", &mut out, t0).unwrap();
        let p = Packet::parse(&mut out[..n]).unwrap();
        assert_eq!(
            (p.src(), p.dst()),
            (sa("5.5.5.5:443"), sa("172.19.0.1:1000"))
        );
        let n = f.reply(id, sa("6.6.6.6:443"), b"hi", &mut out, t0).unwrap();
        let p = Packet::parse(&mut out[..n]).unwrap();
        assert_eq!(
            (p.src(), p.dst()),
            (sa("6.6.6.6:443"), sa("172.19.0.1:1000"))
        );
        assert_eq!(
            f.reply(id, sa("[2001:db8::1]:443"), b"v6", &mut out, t0),
            None
        );
        let mut forgotten = Vec::new();
        f.expire(t0 + UDP_IDLE, &mut forgotten);
        assert_eq!(forgotten, vec![id]);
        assert_eq!(f.reply(id, sa("5.5.5.5:443"), b"late", &mut out, t0), None);
        let mut icmp = tcp(sa("172.19.0.1:1"), sa("5.5.5.5:2"), 0x02);
        icmp[9] = 1;
        assert_eq!(f.handle(&mut icmp, t0), TunVerdict::Drop(TunDrop::Protocol));
        assert_eq!(
            f.handle(&mut [0x45, 0], t0),
            TunVerdict::Drop(TunDrop::Malformed)
        );
        let mut v4only = TunFront::new(
            TunAddrs {
                v4: Ipv4Addr::new(172, 19, 0, 1),
                v6: None,
                listener_port: LISTENER,
            },
            None,
        );
        let mut six = tcp(sa("[fd00::1]:1"), sa("[2001:db8::1]:2"), 0x02);
        assert_eq!(
            v4only.handle(&mut six, t0),
            TunVerdict::Drop(TunDrop::Family)
        );
        assert_eq!(f.stats().dropped, 3);
    }
}
