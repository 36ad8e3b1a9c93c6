//! The few rtnetlink requests TUN mode needs — bring a link up with an MTU, add an address, add
//! or delete a route in a table, add or delete a policy-routing rule — built as bytes, and the
//! kernel's acknowledgement parsed. Pure (the socket is `crate::sys`'s); the constants are the
//! kernel's ABI (`linux/netlink.h`, `rtnetlink.h`, `if_addr.h`, `fib_rules.h`).

use std::net::IpAddr;

const NLMSG_HEADER: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

const IFF_UP: u32 = 0x1;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// No duplicate address detection: the address is usable at once (a point-to-point device has
/// no neighbours to ask).
const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_IP_PROTO: u16 = 22;
const FRA_DPORT_RANGE: u16 = 24;

const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 0x2;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// A route that ends the lookup in its table, so the next rule decides (a bypass).
const RTN_THROW: u8 = 9;

/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = 254;

/// `AF_INET` / `AF_INET6`.
fn family(v6: bool) -> u8 {
    if v6 { 10 } else { 2 }
}

/// One request being built: header, fixed part, attributes (4-byte aligned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    bytes: Vec<u8>,
}

impl Request {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Request {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `attr`/`new`
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        bytes.extend_from_slice(fixed);
        let mut r = Request { bytes };
        r.set_len();
        r
    }

    fn set_len(&mut self) {
        let len = self.bytes.len() as u32;
        self.bytes[..4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(mut self, kind: u16, value: &[u8]) -> Request {
        let len = 4 + value.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
        self.set_len();
        self
    }

    fn attr_u32(self, kind: u16, value: u32) -> Request {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// The request's bytes (one netlink message).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Its sequence number (the acknowledgement carries it).
    pub fn seq(&self) -> u32 {
        u32::from_ne_bytes([self.bytes[8], self.bytes[9], self.bytes[10], self.bytes[11]])
    }
}

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `ip link set dev <index> mtu <mtu> up`.
pub fn link_up(seq: u32, index: u32, mtu: u32) -> Request {
    // ifinfomsg: family, pad, type, index, flags, change.
    let mut fixed = [0u8; 16];
    fixed[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    fixed[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
    fixed[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
    Request::new(RTM_NEWLINK, 0, seq, &fixed).attr_u32(IFLA_MTU, mtu)
}

/// `ip addr add <ip>/<prefix> dev <index>`.
pub fn add_address(seq: u32, index: u32, ip: IpAddr, prefix: u8) -> Request {
    // ifaddrmsg: family, prefixlen, flags, scope, index.
    let mut fixed = [0u8; 8];
    fixed[0] = family(ip.is_ipv6());
    fixed[1] = prefix;
    fixed[2] = IFA_F_NODAD;
    fixed[4..8].copy_from_slice(&index.to_ne_bytes());
    let octets = ip_octets(ip);
    Request::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, &fixed)
        .attr(IFA_LOCAL, &octets)
        .attr(IFA_ADDRESS, &octets)
}

/// A route to `dst/dst_len` in `table`: through interface `oif`, or (`oif` 0) a `throw` route
/// that sends the lookup on to the next rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub dst_len: u8,
    pub oif: u32,
    pub table: u32,
}

/// `ip route add|del <dst>/<len> dev <oif> table <table>`.
pub fn route(seq: u32, add: bool, r: &Route) -> Request {
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut fixed = [0u8; 12];
    fixed[0] = family(r.dst.is_ipv6());
    fixed[1] = r.dst_len;
    fixed[4] = if r.table < 256 { r.table as u8 } else { 0 };
    fixed[5] = RTPROT_STATIC;
    fixed[6] = RT_SCOPE_UNIVERSE;
    fixed[7] = if r.oif == 0 { RTN_THROW } else { RTN_UNICAST };
    // A route left by a killed run (a `throw` route outlives its process) is replaced, not an
    // error.
    let (kind, flags) = if add {
        (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE)
    } else {
        (RTM_DELROUTE, 0)
    };
    let mut req = Request::new(kind, flags, seq, &fixed).attr_u32(RTA_TABLE, r.table);
    if r.dst_len > 0 {
        req = req.attr(RTA_DST, &ip_octets(r.dst));
    }
    if r.oif != 0 {
        req = req.attr_u32(RTA_OIF, r.oif);
    }
    req
}

/// A policy-routing rule: at `priority`, look up `table` — for packets *without* `not_fwmark`
/// when set (wg-quick's `not fwmark M table T`), and ignoring routes with a prefix of at most
/// `suppress_prefixlen` when set (`table main suppress_prefixlength 0`: the main table's
/// specific routes still win, its default route does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub table: u32,
    pub not_fwmark: Option<u32>,
    pub suppress_prefixlen: Option<u32>,
    /// Only packets of this IP protocol to this destination port (`ipproto P dport N`).
    pub proto_dport: Option<(u8, u16)>,
    /// Only packets carrying this mark (`fwmark M`).
    pub fwmark: Option<u32>,
}

/// `ip rule add|del ...` for `rule`.
pub fn rule(seq: u32, add: bool, r: &Rule) -> Request {
    // fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let mut fixed = [0u8; 12];
    fixed[0] = family(r.v6);
    fixed[4] = if r.table < 256 { r.table as u8 } else { 0 };
    fixed[7] = FR_ACT_TO_TBL;
    if r.not_fwmark.is_some() {
        fixed[8..12].copy_from_slice(&FIB_RULE_INVERT.to_ne_bytes());
    }
    let (kind, flags) = if add {
        (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL)
    } else {
        (RTM_DELRULE, 0)
    };
    let mut req = Request::new(kind, flags, seq, &fixed)
        .attr_u32(FRA_PRIORITY, r.priority)
        .attr_u32(FRA_TABLE, r.table);
    if let Some(mark) = r.not_fwmark.or(r.fwmark) {
        req = req
            .attr_u32(FRA_FWMARK, mark)
            .attr_u32(FRA_FWMASK, u32::MAX);
    }
    if let Some(len) = r.suppress_prefixlen {
        req = req.attr_u32(FRA_SUPPRESS_PREFIXLEN, len);
    }
    if let Some((proto, port)) = r.proto_dport {
        let mut range = [0u8; 4];
        range[..2].copy_from_slice(&port.to_ne_bytes());
        range[2..].copy_from_slice(&port.to_ne_bytes());
        req = req
            .attr(FRA_IP_PROTO, &[proto])
            .attr(FRA_DPORT_RANGE, &range);
    }
    req
}

/// What the kernel answered to request `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Done.
    Ok,
    /// Refused with this errno (positive: `EEXIST`, `ENOENT`, `EPERM`, …).
    Errno(i32),
    /// No acknowledgement of `seq` in these bytes.
    Missing,
}

/// Finds the acknowledgement of `seq` in what a netlink socket returned (one or more messages).
pub fn parse_ack(mut buf: &[u8], seq: u32) -> Ack {
    while buf.len() >= NLMSG_HEADER {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let got = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len < NLMSG_HEADER || len > buf.len() {
            return Ack::Missing;
        }
        if kind == NLMSG_ERROR && got == seq && len >= NLMSG_HEADER + 4 {
            let b = &buf[NLMSG_HEADER..NLMSG_HEADER + 4];
            let err = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            return if err == 0 {
                Ack::Ok
            } else {
                Ack::Errno(err.saturating_neg())
            };
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    Ack::Missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// (type, payload) of each attribute after the fixed part.
    fn attrs(b: &[u8], fixed: usize) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = NLMSG_HEADER + fixed;
        while at < b.len() {
            let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
            let kind = u16::from_ne_bytes([b[at + 2], b[at + 3]]);
            out.push((kind, b[at + 4..at + len].to_vec()));
            at += len.next_multiple_of(4);
        }
        out
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let up = link_up(7, 12, 1400);
        let b = up.bytes();
        assert_eq!(u32_at(b, 0) as usize, b.len());
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_NEWLINK);
        assert_eq!(up.seq(), 7);
        assert_eq!((u32_at(b, 20), u32_at(b, 24)), (12, IFF_UP));
        assert_eq!(
            attrs(b, 16),
            vec![(IFLA_MTU, 1400u32.to_ne_bytes().to_vec())]
        );

        let addr = add_address(8, 12, "fd00::1".parse().unwrap(), 126);
        let b = addr.bytes();
        assert_eq!((b[16], b[17]), (10, 126));
        let a = attrs(b, 8);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].1.len(), 16);

        let r = Route {
            dst: "0.0.0.0".parse().unwrap(),
            dst_len: 0,
            oif: 12,
            table: 5210,
        };
        let b = route(9, true, &r).bytes().to_vec();
        assert_eq!(b.len() % 4, 0);
        assert_eq!(b[16 + 4], 0, "tables above 255 go in RTA_TABLE only");
        let a = attrs(&b, 12);
        assert!(a.contains(&(RTA_TABLE, 5210u32.to_ne_bytes().to_vec())));
        assert!(
            !a.iter().any(|(k, _)| *k == RTA_DST),
            "a default route has no RTA_DST"
        );
        let del = route(10, false, &r);
        assert_eq!(
            u16::from_ne_bytes([del.bytes()[4], del.bytes()[5]]),
            RTM_DELROUTE
        );

        let not_mark = rule(
            11,
            true,
            &Rule {
                v6: false,
                priority: 5210,
                table: 5210,
                not_fwmark: Some(0x6f73),
                suppress_prefixlen: None,
                proto_dport: None,
                fwmark: None,
            },
        );
        let b = not_mark.bytes();
        assert_eq!(u32_at(b, 24), FIB_RULE_INVERT);
        let a = attrs(b, 12);
        assert!(a.contains(&(FRA_FWMARK, 0x6f73u32.to_ne_bytes().to_vec())));
        let suppress = rule(
            12,
            true,
            &Rule {
                v6: true,
                priority: 5209,
                table: MAIN_TABLE,
                not_fwmark: None,
                suppress_prefixlen: Some(0),
                proto_dport: None,
                fwmark: None,
            },
        );
        let b = suppress.bytes();
        assert_eq!((b[16], b[20], u32_at(b, 24)), (10, 254, 0));
        assert!(attrs(b, 12).contains(&(FRA_SUPPRESS_PREFIXLEN, vec![0, 0, 0, 0])));
    }

    #[test]
    fn acknowledgements_are_matched_by_sequence_number() {
        let ack = |seq: u32, err: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&err.to_ne_bytes());
            m.extend_from_slice(&[0u8; 16]); // the start of the request echoed
            m
        };
        let mut two = ack(3, 0);
        two.extend(ack(4, -17));
        assert_eq!(parse_ack(&two, 3), Ack::Ok);
        assert_eq!(parse_ack(&two, 4), Ack::Errno(17));
        assert_eq!(parse_ack(&two, 5), Ack::Missing);
        // Truncated or garbage input: no panic, no acknowledgement.
        for cut in 0..two.len() {
            let _ = parse_ack(&two[..cut], 4);
        }
        let mut bad = ack(3, 0);
        bad[..4].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(parse_ack(&bad, 3), Ack::Missing);
    }
}
