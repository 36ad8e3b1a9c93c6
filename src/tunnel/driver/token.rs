//! Every mio token of every loop, in one place.
//!
//! A token is `kind << KIND_SHIFT | index`. 27 index bits fit a 32-bit `usize` (routers) and are
//! far above every table's cap (local connections 4,096; sessions × streams < 2^18), so an index
//! can never spill into the kind. Decoding is total: an unknown kind is `None`, never a
//! misrouted event.

use mio::Token;

const KIND_SHIFT: u32 = 27;
/// Largest index a token can carry.
pub const MAX_INDEX: usize = (1 << KIND_SHIFT) - 1;

/// What a mio event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tok {
    /// The loop's waker (control messages, resolver answers).
    Waker,
    /// A TCP listener (client proxy port, API port).
    Listener,
    /// Server: UDP listen socket `i` (config `listen` order).
    Udp(usize),
    /// Server: outbound TCP connection of a tunnel stream.
    Outbound(usize),
    /// Server: a session's UDP relay socket; `v6` picks the address family.
    Relay { index: usize, v6: bool },
    /// Client: a tunnel session slot's UDP socket.
    Slot(usize),
    /// Client: a local proxy connection. API front end: a client connection.
    Conn(usize),
    /// Client: the UDP socket of a SOCKS5 UDP ASSOCIATE.
    Assoc(usize),
    /// Client: the TUN device (TUN mode).
    Tun,
    /// Client: TUN mode's listener `i` for reflected TCP connections (0: IPv4, 1: IPv6).
    TunListener(usize),
    /// Client: the DNS forwarder's UDP socket.
    DnsUdp,
    /// Client: the DNS forwarder's TCP listener.
    DnsTcp,
    /// Client: the destination socket of direct connection `i` (split routing; `i` is the local
    /// connection's index).
    Direct(usize),
    /// Server: TCP carrier listener `i` (config `listen_tcp` order).
    TcpListen(usize),
    /// Server: an accepted TCP carrier connection (slab index).
    Carrier(usize),
    /// Server: the fallback-website socket spliced to carrier connection `i`.
    Fallback(usize),
    /// Client: router mode's TCP listener `i` for redirected connections (0: first family).
    RedirListener(usize),
    /// Client: router mode's UDP socket `i` that TPROXY hands the LAN's datagrams to.
    RedirUdp(usize),
    /// Client: the UDP socket of direct capture flow `i` (split routing by learned address).
    DirectUdp(usize),
}

impl Tok {
    fn parts(self) -> (usize, usize) {
        match self {
            Tok::Waker => (1, 0),
            Tok::Listener => (2, 0),
            Tok::Udp(i) => (3, i),
            Tok::Outbound(i) => (4, i),
            Tok::Relay { index, v6 } => (5, index * 2 + usize::from(v6)),
            Tok::Slot(i) => (6, i),
            Tok::Conn(i) => (7, i),
            Tok::Assoc(i) => (8, i),
            Tok::Tun => (12, 0),
            Tok::TunListener(i) => (13, i),
            Tok::DnsUdp => (14, 0),
            Tok::DnsTcp => (15, 0),
            Tok::Direct(i) => (16, i),
            Tok::TcpListen(i) => (9, i),
            Tok::Carrier(i) => (10, i),
            Tok::Fallback(i) => (11, i),
            Tok::RedirListener(i) => (17, i),
            Tok::RedirUdp(i) => (18, i),
            Tok::DirectUdp(i) => (19, i),
        }
    }

    /// The mio token. Indexes are bounded by the tables' caps (see the module doc); an index
    /// above [`MAX_INDEX`] is a bug in the caller and trips a debug assertion.
    pub fn token(self) -> Token {
        let (kind, index) = self.parts();
        debug_assert!(index <= MAX_INDEX, "{self:?}: index beyond the token space");
        Token((kind << KIND_SHIFT) | (index & MAX_INDEX))
    }

    /// Which thing a mio token names; `None` for a token no loop hands out.
    pub fn decode(token: Token) -> Option<Tok> {
        let index = token.0 & MAX_INDEX;
        Some(match token.0 >> KIND_SHIFT {
            1 if index == 0 => Tok::Waker,
            2 if index == 0 => Tok::Listener,
            3 => Tok::Udp(index),
            4 => Tok::Outbound(index),
            5 => Tok::Relay {
                index: index / 2,
                v6: index % 2 == 1,
            },
            6 => Tok::Slot(index),
            7 => Tok::Conn(index),
            8 => Tok::Assoc(index),
            12 if index == 0 => Tok::Tun,
            13 => Tok::TunListener(index),
            14 if index == 0 => Tok::DnsUdp,
            15 if index == 0 => Tok::DnsTcp,
            16 => Tok::Direct(index),
            9 => Tok::TcpListen(index),
            10 => Tok::Carrier(index),
            11 => Tok::Fallback(index),
            17 => Tok::RedirListener(index),
            18 => Tok::RedirUdp(index),
            19 => Tok::DirectUdp(index),
            _ => return None,
        })
    }
}

impl From<Tok> for Token {
    fn from(t: Tok) -> Token {
        t.token()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_at_the_edges() {
        let relay_max = MAX_INDEX / 2;
        let all = [
            Tok::Waker,
            Tok::Listener,
            Tok::Udp(0),
            Tok::Udp(MAX_INDEX),
            Tok::Outbound(0),
            Tok::Outbound(MAX_INDEX),
            Tok::Relay {
                index: 0,
                v6: false,
            },
            Tok::Relay { index: 0, v6: true },
            Tok::Relay {
                index: relay_max,
                v6: true,
            },
            Tok::Slot(MAX_INDEX),
            Tok::Conn(0),
            Tok::Conn(MAX_INDEX),
            Tok::Assoc(7),
            Tok::Tun,
            Tok::TunListener(1),
            Tok::DnsUdp,
            Tok::DnsTcp,
            Tok::Direct(3),
            Tok::TcpListen(0),
            Tok::Carrier(MAX_INDEX),
            Tok::Fallback(MAX_INDEX),
            Tok::RedirListener(1),
            Tok::RedirUdp(MAX_INDEX),
            Tok::DirectUdp(MAX_INDEX),
        ];
        for t in all {
            assert_eq!(Tok::decode(t.token()), Some(t), "{t:?}");
        }
    }

    #[test]
    fn tokens_fit_a_32_bit_usize_and_unknown_tokens_decode_to_none() {
        for t in [Tok::Assoc(MAX_INDEX), Tok::Conn(MAX_INDEX)] {
            assert!(t.token().0 <= u32::MAX as usize);
        }
        assert_eq!(Tok::decode(Token(0)), None);
        assert_eq!(Tok::decode(Token(usize::MAX)), None);
        assert_eq!(Tok::decode(Token((1 << KIND_SHIFT) | 5)), None); // a waker with an index
    }

    #[test]
    fn distinct_things_get_distinct_tokens() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..64 {
            for t in [
                Tok::Udp(i),
                Tok::Outbound(i),
                Tok::Relay {
                    index: i,
                    v6: false,
                },
                Tok::Relay { index: i, v6: true },
                Tok::Slot(i),
                Tok::Conn(i),
                Tok::Assoc(i),
                Tok::TcpListen(i),
                Tok::Carrier(i),
                Tok::Fallback(i),
            ] {
                assert!(seen.insert(t.token()), "{t:?} collides");
            }
        }
        assert!(seen.insert(Tok::Waker.token()));
        assert!(seen.insert(Tok::Listener.token()));
    }
}
