//! IP packets as read from and written to a TUN device: a checked view of an IPv4/IPv6 packet
//! carrying TCP or UDP (addresses, ports, payload) that rewrites addresses and ports with
//! incremental checksum updates (RFC 1624), and a writer for IP/UDP packets. Every length is
//! checked when the view is made, so nothing here can panic on what a device hands us.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
const TCP_HEADER: usize = 20;

/// Why a packet is not handled (dropped and counted by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unhandled {
    /// Shorter than its headers say, or a length field out of range.
    Malformed,
    /// Neither IPv4 nor IPv6.
    Version,
    /// An IPv4 fragment (TUN traffic from local sockets is not fragmented below the MTU).
    Fragment,
    /// Not TCP or UDP (ICMP, IPv6 extension headers, …): the documented drop.
    Protocol(u8),
}

/// A checked TCP or UDP packet over IPv4 or IPv6, borrowed mutably for rewriting.
#[derive(Debug)]
pub struct Packet<'a> {
    buf: &'a mut [u8],
    /// IP header length (where the TCP/UDP header starts).
    ip_len: usize,
    /// Bytes of the packet (IP total length; the buffer may be longer).
    len: usize,
    v6: bool,
    protocol: u8,
}

impl<'a> Packet<'a> {
    /// Checks `buf` (one packet from the device, maybe followed by slack) and returns the view.
    pub fn parse(buf: &'a mut [u8]) -> Result<Packet<'a>, Unhandled> {
        let first = *buf.first().ok_or(Unhandled::Malformed)?;
        let (ip_len, len, v6, protocol) = match first >> 4 {
            4 => {
                let h = buf.get(..IPV4_HEADER).ok_or(Unhandled::Malformed)?;
                let ip_len = usize::from(first & 0x0f) * 4;
                let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
                if ip_len < IPV4_HEADER || len < ip_len || len > buf.len() {
                    return Err(Unhandled::Malformed);
                }
                let frag = u16::from_be_bytes([h[6], h[7]]);
                if frag & 0x3fff != 0 {
                    return Err(Unhandled::Fragment); // more fragments, or an offset
                }
                (ip_len, len, false, h[9])
            }
            6 => {
                let h = buf.get(..IPV6_HEADER).ok_or(Unhandled::Malformed)?;
                let len = IPV6_HEADER + usize::from(u16::from_be_bytes([h[4], h[5]]));
                if len > buf.len() {
                    return Err(Unhandled::Malformed);
                }
                (IPV6_HEADER, len, true, h[6])
            }
            _ => return Err(Unhandled::Version),
        };
        let transport = len - ip_len;
        match protocol {
            TCP => {
                let offset = buf.get(ip_len + 12).ok_or(Unhandled::Malformed)? >> 4;
                let header = usize::from(offset) * 4;
                if transport < TCP_HEADER || header < TCP_HEADER || header > transport {
                    return Err(Unhandled::Malformed);
                }
            }
            UDP => {
                let l = buf
                    .get(ip_len + 4..ip_len + 6)
                    .ok_or(Unhandled::Malformed)?;
                let udp_len = usize::from(u16::from_be_bytes([l[0], l[1]]));
                if transport < UDP_HEADER || udp_len < UDP_HEADER || udp_len > transport {
                    return Err(Unhandled::Malformed);
                }
            }
            p => return Err(Unhandled::Protocol(p)),
        }
        Ok(Packet {
            buf,
            ip_len,
            len,
            v6,
            protocol,
        })
    }

    /// [`TCP`] or [`UDP`].
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Bytes of the whole packet.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true for a parsed packet (it has at least its headers).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packet's bytes (after any rewriting).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Source address and port.
    pub fn src(&self) -> SocketAddr {
        SocketAddr::new(self.ip(self.addr_at().0), self.port(0))
    }

    /// Destination address and port.
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.ip(self.addr_at().1), self.port(2))
    }

    /// TCP flags (`SYN` = 0x02, `RST` = 0x04, `FIN` = 0x01, `ACK` = 0x10); 0 for UDP.
    pub fn tcp_flags(&self) -> u8 {
        if self.protocol == TCP {
            self.buf[self.ip_len + 13]
        } else {
            0
        }
    }

    /// The UDP payload (empty for TCP).
    pub fn udp_payload(&self) -> &[u8] {
        &self.buf[self.udp_payload_range()]
    }

    /// Where the UDP payload is in the buffer (empty for TCP).
    pub fn udp_payload_range(&self) -> std::ops::Range<usize> {
        if self.protocol != UDP {
            return 0..0;
        }
        let l = &self.buf[self.ip_len + 4..self.ip_len + 6];
        let udp_len = usize::from(u16::from_be_bytes([l[0], l[1]]));
        self.ip_len + UDP_HEADER..self.ip_len + udp_len
    }

    /// Rewrites source and destination (addresses of the packet's own family only: a caller
    /// mapping between families is a bug, refused with `false` and nothing changed).
    pub fn rewrite(&mut self, src: SocketAddr, dst: SocketAddr) -> bool {
        if src.is_ipv6() != self.v6 || dst.is_ipv6() != self.v6 {
            return false;
        }
        let (s_at, d_at) = self.addr_at();
        let alen = if self.v6 { 16 } else { 4 };
        let checksum_at = self.ip_len + if self.protocol == TCP { 16 } else { 6 };
        let mut l4 = u16::from_be_bytes([self.buf[checksum_at], self.buf[checksum_at + 1]]);
        // An IPv4 UDP checksum of 0 means "none": it stays none.
        let l4_none = self.protocol == UDP && !self.v6 && l4 == 0;
        let mut ip4 = u16::from_be_bytes([self.buf[10], self.buf[11]]);
        for (at, addr) in [(s_at, src.ip()), (d_at, dst.ip())] {
            let new = ip_bytes(addr);
            let old = &self.buf[at..at + alen];
            l4 = update(l4, old, &new[..alen]);
            if !self.v6 {
                ip4 = update(ip4, old, &new[..alen]);
            }
            self.buf[at..at + alen].copy_from_slice(&new[..alen]);
        }
        for (at, port) in [(self.ip_len, src.port()), (self.ip_len + 2, dst.port())] {
            let new = port.to_be_bytes();
            l4 = update(l4, &self.buf[at..at + 2], &new);
            self.buf[at..at + 2].copy_from_slice(&new);
        }
        if !self.v6 {
            self.buf[10..12].copy_from_slice(&ip4.to_be_bytes());
        }
        if !l4_none {
            // UDP transmits a computed 0 as all ones (RFC 768).
            let l4 = if self.protocol == UDP && l4 == 0 {
                0xffff
            } else {
                l4
            };
            self.buf[checksum_at..checksum_at + 2].copy_from_slice(&l4.to_be_bytes());
        }
        true
    }

    fn addr_at(&self) -> (usize, usize) {
        if self.v6 { (8, 24) } else { (12, 16) }
    }

    fn ip(&self, at: usize) -> IpAddr {
        if self.v6 {
            let mut b = [0u8; 16];
            b.copy_from_slice(&self.buf[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(b))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ))
        }
    }

    fn port(&self, offset: usize) -> u16 {
        let at = self.ip_len + offset;
        u16::from_be_bytes([self.buf[at], self.buf[at + 1]])
    }
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b = v6.octets(),
    }
    b
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte is padded with zero).
fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum after `old` (an even number of bytes) became `new` (RFC 1624 eqn. 3:
/// `HC' = ~(~HC + ~m + m')`).
fn update(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!checksum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u32::from(!u16::from_be_bytes([o[0], o[1]]));
        acc += u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    !fold(acc)
}

/// The TCP/UDP checksum of `segment` (its checksum field zeroed) over the pseudo-header.
fn transport_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    let alen = if src.is_ipv6() { 16 } else { 4 };
    let mut acc = sum(&ip_bytes(src)[..alen], 0);
    acc = sum(&ip_bytes(dst)[..alen], acc);
    acc += u32::from(protocol) + segment.len() as u32;
    !fold(sum(segment, acc))
}

/// Writes an IP/UDP packet `src → dst` carrying `payload` into `out` (checksums computed);
/// returns its length, or `None` when `out` is too small, the payload too large for one packet
/// or the two addresses of different families.
pub fn write_udp(
    out: &mut [u8],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<usize> {
    let v6 = src.is_ipv6();
    if dst.is_ipv6() != v6 {
        return None;
    }
    let ip_len = if v6 { IPV6_HEADER } else { IPV4_HEADER };
    let udp_len = UDP_HEADER + payload.len();
    let len = ip_len + udp_len;
    if len > usize::from(u16::MAX) || out.len() < len {
        return None;
    }
    let (ip, rest) = out[..len].split_at_mut(ip_len);
    if v6 {
        ip[..4].copy_from_slice(&[0x60, 0, 0, 0]);
        ip[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        ip[6] = UDP;
        ip[7] = 64; // hop limit
        ip[8..24].copy_from_slice(&ip_bytes(src.ip()));
        ip[24..40].copy_from_slice(&ip_bytes(dst.ip()));
    } else {
        ip[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, UDP, 0, 0]);
        ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        ip[12..16].copy_from_slice(&ip_bytes(src.ip())[..4]);
        ip[16..20].copy_from_slice(&ip_bytes(dst.ip())[..4]);
        let c = !fold(sum(ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    rest[..2].copy_from_slice(&src.port().to_be_bytes());
    rest[2..4].copy_from_slice(&dst.port().to_be_bytes());
    rest[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    rest[6..8].copy_from_slice(&[0, 0]);
    rest[8..].copy_from_slice(payload);
    let c = transport_checksum(src.ip(), dst.ip(), UDP, rest);
    let c = if c == 0 { 0xffff } else { c };
    rest[6..8].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Whether every checksum of the packet verifies from scratch.
    fn checksums_verify(bytes: &[u8]) -> bool {
        let mut copy = bytes.to_vec();
        let p = Packet::parse(&mut copy).unwrap();
        let (src, dst, protocol, ip_len, v6) = (p.src(), p.dst(), p.protocol, p.ip_len, p.v6);
        if !v6 && fold(sum(&bytes[..ip_len], 0)) != 0xffff {
            return false;
        }
        let seg = &bytes[ip_len..];
        let mut acc = sum(&ip_bytes(src.ip())[..if v6 { 16 } else { 4 }], 0);
        acc = sum(&ip_bytes(dst.ip())[..if v6 { 16 } else { 4 }], acc);
        acc += u32::from(protocol) + seg.len() as u32;
        fold(sum(seg, acc)) == 0xffff
    }

    /// A TCP SYN with options, built by hand, checksums computed from scratch.
    fn tcp_syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut tcp = vec![0u8; 24];
        tcp[..2].copy_from_slice(&src.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        tcp[12] = 6 << 4; // 24-byte header
        tcp[13] = 0x02;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        let c = transport_checksum(src.ip(), dst.ip(), TCP, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut out = vec![0u8; 80];
        // Reuse the UDP writer's IP header, then swap in TCP.
        let ip_len = if src.is_ipv6() {
            IPV6_HEADER
        } else {
            IPV4_HEADER
        };
        let n = write_udp(&mut out, src, dst, &[0u8; 16]).unwrap();
        assert_eq!(n, ip_len + 24);
        out.truncate(ip_len);
        if src.is_ipv6() {
            out[6] = TCP;
        } else {
            out[9] = TCP;
            out[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&out, 0));
            out[10..12].copy_from_slice(&c.to_be_bytes());
        }
        out.extend_from_slice(&tcp);
        out
    }

    #[test]
    fn rewritten_packets_keep_valid_checksums_in_both_families_and_protocols() {
        let cases = [
            (
                "172.19.0.1:40000",
                "93.184.216.34:443",
                "172.19.0.2:10001",
                "172.19.0.1:7000",
            ),
            (
                "[fd00::1]:40000",
                "[2606:2800::1]:443",
                "[fd00::2]:10001",
                "[fd00::1]:7000",
            ),
        ];
        for (src, dst, new_src, new_dst) in cases {
            let (src, dst, new_src, new_dst) = (sa(src), sa(dst), sa(new_src), sa(new_dst));
            let mut syn = tcp_syn(src, dst);
            assert!(checksums_verify(&syn));
            let mut udp = vec![0u8; 200];
            let n = write_udp(&mut udp, src, dst, b"query").unwrap();
            udp.truncate(n);
            assert!(checksums_verify(&udp));
            for bytes in [&mut syn, &mut udp] {
                let mut p = Packet::parse(bytes).unwrap();
                assert_eq!((p.src(), p.dst()), (src, dst));
                assert!(p.rewrite(new_src, new_dst));
                assert_eq!((p.src(), p.dst()), (new_src, new_dst));
                assert!(checksums_verify(bytes), "{new_src} -> {new_dst}");
                // And back: the original bytes exactly.
                let mut p = Packet::parse(bytes).unwrap();
                assert!(p.rewrite(src, dst));
            }
            assert_eq!(syn, tcp_syn(src, dst));
            let mut back = Packet::parse(&mut syn).unwrap();
            assert_eq!(back.tcp_flags(), 0x02);
            assert!(
                !back.rewrite(sa("1.2.3.4:5"), sa("[::1]:5")),
                "family mix refused"
            );
            let mut u = Packet::parse(&mut udp).unwrap();
            assert_eq!((u.protocol(), u.udp_payload()), (UDP, &b"query"[..]));
            assert!(u.rewrite(src, dst));
        }
    }

    #[test]
    fn an_ipv4_udp_packet_without_checksum_stays_without() {
        let mut udp = vec![0u8; 64];
        let n = write_udp(&mut udp, sa("10.0.0.1:53"), sa("10.0.0.2:5353"), b"x").unwrap();
        udp.truncate(n);
        udp[26..28].copy_from_slice(&[0, 0]);
        let mut p = Packet::parse(&mut udp).unwrap();
        assert!(p.rewrite(sa("10.9.9.9:1"), sa("10.8.8.8:2")));
        assert_eq!(&udp[26..28], &[0, 0]);
        assert_eq!(
            fold(sum(&udp[..20], 0)),
            0xffff,
            "the IP header checksum still verifies"
        );
    }

    #[test]
    fn what_a_device_may_hand_us_never_panics_and_is_classified() {
        let src = sa("10.0.0.1:1000");
        let dst = sa("10.0.0.2:80");
        let syn = tcp_syn(src, dst);
        // Every truncation, and every single-byte corruption of the header bytes.
        for cut in 0..syn.len() {
            let mut b = syn[..cut].to_vec();
            assert!(Packet::parse(&mut b).is_err(), "cut at {cut}");
        }
        for at in 0..44 {
            for v in [0u8, 0x0f, 0x45, 0x60, 0xff] {
                let mut b = syn.clone();
                b[at] = v;
                if let Ok(mut p) = Packet::parse(&mut b) {
                    let _ = (p.src(), p.dst(), p.udp_payload(), p.tcp_flags());
                    p.rewrite(dst, src);
                }
            }
        }
        let mut frag = syn.clone();
        frag[6] = 0x20; // more fragments
        assert_eq!(Packet::parse(&mut frag).unwrap_err(), Unhandled::Fragment);
        let mut icmp = syn.clone();
        icmp[9] = 1;
        assert_eq!(
            Packet::parse(&mut icmp).unwrap_err(),
            Unhandled::Protocol(1)
        );
        let mut v5 = syn;
        v5[0] = 0x55;
        assert_eq!(Packet::parse(&mut v5).unwrap_err(), Unhandled::Version);
        let mut hop_by_hop = tcp_syn(sa("[fd00::1]:1"), sa("[fd00::2]:2"));
        hop_by_hop[6] = 0;
        assert_eq!(
            Packet::parse(&mut hop_by_hop).unwrap_err(),
            Unhandled::Protocol(0)
        );
        // A buffer longer than the packet: the packet is what the header says.
        let mut long = tcp_syn(src, dst);
        let n = long.len();
        long.extend_from_slice(&[0xaa; 30]);
        assert_eq!(Packet::parse(&mut long).unwrap().len(), n);
    }
}
