//! UDP socket mechanics shared by the loops: bounded receive batches that remember readiness, and
//! the blocked-send slot.
//!
//! mio is edge-triggered: a socket reports READABLE once and stays silent until new data arrives
//! after it was read to `WouldBlock`. A loop that stops reading early (to bound the work per
//! wake-up) must therefore remember that the socket is still readable and come back without
//! waiting for an event. [`drain`] reports exactly that and every caller keeps the flag.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::token::Tok;

/// Datagrams read from one socket per wake-up before other work gets a turn.
pub const RECV_BATCH: usize = 256;
/// Kernel buffer of per-flow UDP sockets (server relays, client UDP ASSOCIATE): the default
/// (~208 KiB) holds only 256 small datagrams, so a DNS/QUIC burst overflowed it. Memory is used
/// only while datagrams wait.
pub const BURST_SOCKET_BUFFER: usize = 1024 * 1024;

/// What a socket may still hold after [`drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Read to `WouldBlock`: the next datagram raises a new event.
    Drained,
    /// Stopped at the batch limit: read again before waiting for events.
    StillReadable,
}

impl Readiness {
    pub fn still_readable(self) -> bool {
        self == Readiness::StillReadable
    }
}

/// Reads up to `limit` datagrams from `sock` into `buf`, handing each to `on_datagram`.
/// Receive errors other than `WouldBlock` (ICMP errors of one peer surface here) are skipped.
pub fn drain(
    sock: &UdpSocket,
    buf: &mut [u8],
    limit: usize,
    mut on_datagram: impl FnMut(&mut [u8], SocketAddr),
) -> Readiness {
    for _ in 0..limit {
        match sock.recv_from(buf) {
            Ok((n, from)) => on_datagram(&mut buf[..n], from),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Readiness::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => log::debug!("udp recv: {e}"),
        }
    }
    Readiness::StillReadable
}

/// What became of a datagram handed to [`UdpTx::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// The socket buffer is full: the datagram is kept and goes out on WRITABLE; send nothing
    /// else until [`UdpTx::is_blocked`] is false (keeps datagram order).
    Blocked,
    /// A permanent error for this datagram (unreachable address, …); it is gone.
    Failed,
}

struct Blocked {
    socket: usize,
    /// `None`: the socket is connected (`send`, not `send_to`).
    to: Option<SocketAddr>,
    len: usize,
}

/// The one datagram that met a full socket buffer, and the WRITABLE interest that waits for room.
/// WRITABLE is asked for only while a datagram waits, so a sending loop is not woken for nothing.
#[derive(Default)]
pub struct UdpTx {
    blocked: Option<Blocked>,
    /// Reused copy of the blocked datagram (no allocation per blocked send once warm).
    bytes: Vec<u8>,
}

impl UdpTx {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a datagram waits for room.
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// The socket (caller's index) the waiting datagram belongs to.
    pub fn blocked_socket(&self) -> Option<usize> {
        self.blocked.as_ref().map(|b| b.socket)
    }

    /// Sends `data` to `to` on `sock` (the caller's socket number `socket`, registered as
    /// `token`; `to: None` for a connected socket). On `WouldBlock` keeps a copy and adds
    /// WRITABLE interest.
    pub fn send(
        &mut self,
        sock: &mut UdpSocket,
        registry: &Registry,
        token: Token,
        socket: usize,
        data: &[u8],
        to: Option<SocketAddr>,
    ) -> SendOutcome {
        debug_assert!(self.blocked.is_none(), "send while a datagram is blocked");
        match send_one(sock, data, to) {
            Ok(_) => SendOutcome::Sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.bytes.clear();
                self.bytes.extend_from_slice(data);
                self.blocked = Some(Blocked {
                    socket,
                    to,
                    len: data.len(),
                });
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = registry.reregister(sock, token, interest) {
                    log::warn!("udp: cannot wait for room to send: {e}");
                }
                SendOutcome::Blocked
            }
            Err(e) => {
                log::debug!("udp send to {to:?}: {e}");
                SendOutcome::Failed
            }
        }
    }

    /// Retries the waiting datagram on `sock` (which must be [`Self::blocked_socket`]'s socket);
    /// once it left (or failed for good) drops WRITABLE interest. Returns whether the slot is free.
    pub fn retry(&mut self, sock: &mut UdpSocket, registry: &Registry, token: Token) -> bool {
        let Some(b) = self.blocked.as_ref() else {
            return true;
        };
        match send_one(sock, &self.bytes[..b.len], b.to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => log::debug!("udp send to {:?}: {e}", b.to),
            Ok(_) => {}
        }
        self.blocked = None;
        if let Err(e) = registry.reregister(sock, token, Interest::READABLE) {
            log::warn!("udp: cannot drop WRITABLE interest: {e}");
        }
        true
    }

    /// Forgets the waiting datagram (its socket is being closed).
    pub fn clear(&mut self) {
        self.blocked = None;
    }
}

fn send_one(sock: &UdpSocket, data: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    match to {
        Some(to) => sock.send_to(data, to),
        None => sock.send(data),
    }
}

/// A loop's listen sockets (registered as [`Tok::Udp`]`(i)`), their "still readable" flags and
/// the one blocked-send slot they share (while it is full nothing else is sent, keeping order).
pub struct UdpSockets {
    sockets: Vec<UdpSocket>,
    readable: Vec<bool>,
    tx: UdpTx,
}

impl UdpSockets {
    /// Registers `sockets` READABLE as `Tok::Udp(0..)`.
    pub fn register(mut sockets: Vec<UdpSocket>, registry: &Registry) -> io::Result<UdpSockets> {
        for (i, sock) in sockets.iter_mut().enumerate() {
            registry.register(sock, Tok::Udp(i).token(), Interest::READABLE)?;
        }
        Ok(UdpSockets {
            readable: vec![false; sockets.len()],
            sockets,
            tx: UdpTx::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// A mio event for `Tok::Udp(i)`.
    pub fn on_event(&mut self, i: usize, readable: bool, writable: bool, registry: &Registry) {
        if let Some(flag) = self.readable.get_mut(i) {
            *flag |= readable;
        }
        if writable {
            self.retry_blocked(registry);
        }
    }

    /// Whether some socket must be read before the loop may wait.
    pub fn any_readable(&self) -> bool {
        self.readable.iter().any(|r| *r)
    }

    /// Reads a batch from socket `i` if it is marked readable; returns whether it was.
    pub fn receive(
        &mut self,
        i: usize,
        buf: &mut [u8],
        on_datagram: impl FnMut(&mut [u8], SocketAddr),
    ) -> bool {
        let (Some(flag), Some(sock)) = (self.readable.get_mut(i), self.sockets.get(i)) else {
            return false;
        };
        if !*flag {
            return false;
        }
        *flag = drain(sock, buf, RECV_BATCH, on_datagram).still_readable();
        true
    }

    /// Retries the blocked datagram, if any.
    pub fn retry_blocked(&mut self, registry: &Registry) {
        let Some(i) = self.tx.blocked_socket() else {
            return;
        };
        match self.sockets.get_mut(i) {
            Some(sock) => {
                self.tx.retry(sock, registry, Tok::Udp(i).token());
            }
            None => self.tx.clear(),
        }
    }

    /// Whether a datagram waits for room (send nothing until it left).
    pub fn is_blocked(&self) -> bool {
        self.tx.is_blocked()
    }

    /// Sends `data` to `to` from socket `i` (an unknown socket fails the datagram).
    pub fn send(
        &mut self,
        registry: &Registry,
        i: usize,
        data: &[u8],
        to: SocketAddr,
    ) -> SendOutcome {
        let Some(sock) = self.sockets.get_mut(i) else {
            return SendOutcome::Failed;
        };
        self.tx
            .send(sock, registry, Tok::Udp(i).token(), i, data, Some(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Duration;

    fn bound() -> UdpSocket {
        crate::tunnel::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    #[test]
    fn three_hundred_datagrams_before_one_event_are_all_delivered() {
        let mut poll = Poll::new().unwrap();
        let mut rx = bound();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        poll.registry()
            .register(&mut rx, Token(1), Interest::READABLE)
            .unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..300u32 {
            tx.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let mut events = Events::with_capacity(8);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == Token(1)));
        // One readiness edge; the loop keeps reading while drain says so, never waiting.
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let mut rounds = 0;
        loop {
            rounds += 1;
            let r = drain(&rx, &mut buf, RECV_BATCH, |d, _| {
                got.push(u32::from_be_bytes(d[..4].try_into().unwrap()))
            });
            if !r.still_readable() {
                break;
            }
        }
        assert_eq!(rounds, 2, "256 then 44 (+ WouldBlock)");
        assert_eq!(got, (0..300).collect::<Vec<_>>());
        // And the edge-triggered socket really is silent now: no second event was needed.
        poll.poll(&mut events, Some(Duration::from_millis(50)))
            .unwrap();
        assert!(events.is_empty());
    }
}
