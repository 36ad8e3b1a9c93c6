//! UDP socket mechanics shared by the loops: bounded receive batches that remember readiness,
//! segmentation offload (several datagrams per system call: GSO send, GRO receive, on Linux) with
//! its fallback to single datagrams, and the blocked-send slot.
//!
//! mio is edge-triggered: a socket reports READABLE once and stays silent until new data arrives
//! after it was read to `WouldBlock`. A loop that stops reading early (to bound the work per
//! wake-up) must therefore remember that the socket is still readable and come back without
//! waiting for an event. [`drain`] and [`Socket::drain`] report exactly that and every caller
//! keeps the flag.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::token::Tok;
pub use crate::config::UdpOffload;

/// Datagrams read from one socket per wake-up before other work gets a turn.
pub const RECV_BATCH: usize = 256;
/// Datagrams of a client session socket read per wake-up (one GRO read of up to 64 KiB): the
/// loop then hands the bytes on, and the ACK they owe goes out before the next read. Reading
/// [`RECV_BATCH`] first would acknowledge once per 256 datagrams whatever the decimation rule
/// says, and the more the server had in flight the larger each read and each ACK would grow
/// (ACK aggregation the server's window then has to cover, see the transport's congestion
/// controller).
pub const SESSION_RECV_BATCH: usize = 32;
/// Kernel buffer of per-flow UDP sockets (server relays, client UDP ASSOCIATE): the default
/// (~208 KiB) holds only 256 small datagrams, so a DNS/QUIC burst overflowed it. Memory is used
/// only while datagrams wait.
pub const BURST_SOCKET_BUFFER: usize = 1024 * 1024;
/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` before Linux 6.x raised it).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one batch: the largest IPv4 UDP payload (65,535 − 20 − 8), the bound of one
/// GSO send.
pub const MAX_BATCH_BYTES: usize = 65_507;
/// Receive buffer of a [`Socket`]: a GRO read returns up to 64 KiB of coalesced datagrams (a
/// shorter buffer would cut them off).
pub const RECV_BUFFER: usize = 65_535;

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

/// System calls and datagrams of one [`Socket`] (datagrams per call shows what offload gains).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    pub send_calls: u64,
    pub datagrams_sent: u64,
    pub recv_calls: u64,
    pub datagrams_received: u64,
}

impl IoCounts {
    /// Sums two sockets' counts.
    pub fn add(&mut self, other: IoCounts) {
        self.send_calls += other.send_calls;
        self.datagrams_sent += other.datagrams_sent;
        self.recv_calls += other.recv_calls;
        self.datagrams_received += other.datagrams_received;
    }
}

/// How a batch send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Every datagram was handed to the kernel, `lost` of them failed for good.
    All { lost: usize },
    /// The socket buffer was full after `bytes` (whole datagrams): the rest must wait.
    Partly { bytes: usize },
}

/// A tunnel UDP socket and what it offloads: GSO (a batch of equal datagrams in one send; probed
/// when created) and GRO (several datagrams per read). When the kernel refuses a segmented send
/// (`EIO`, `EINVAL`: the route's device cannot segment, or one destination's path MTU is below
/// the segment size) the batch goes out as single datagrams, that destination gets single
/// datagrams from then on, and GSO is turned off for the socket only after
/// [`GSO_REFUSALS_TO_DISABLE`] refusals in a row — one peer behind a small-MTU tunnel does not
/// cost every other user of a listen socket its offload. With [`UdpOffload::Off`], and on systems
/// other than Linux, one datagram per system call.
pub struct Socket {
    sock: UdpSocket,
    gso: bool,
    gro: bool,
    /// Segmented sends refused in a row (reset by one that succeeds).
    gso_refusals: u32,
    /// Destinations that refused a segmented send (at most [`REFUSING_PEERS`], oldest dropped;
    /// `None`: the connected peer).
    refusing: Vec<Option<SocketAddr>>,
    counts: IoCounts,
}

/// Refused segmented sends in a row (whatever the destination) that turn GSO off for a socket.
pub const GSO_REFUSALS_TO_DISABLE: u32 = 8;
/// Destinations remembered as refusing segmented sends, per socket.
const REFUSING_PEERS: usize = 16;

impl Socket {
    /// Wraps `sock`, probing GSO and turning GRO on unless `mode` is `Off`.
    pub fn new(sock: UdpSocket, mode: UdpOffload) -> Socket {
        // Path-MTU probes must be dropped when too large, never fragmented by our kernel.
        let ipv6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
        crate::sys::set_udp_no_fragment(&sock, ipv6);
        let (gso, gro) = match mode {
            UdpOffload::Off => (false, false),
            UdpOffload::Auto => probe(&sock),
        };
        Socket {
            sock,
            gso,
            gro,
            gso_refusals: 0,
            refusing: Vec::new(),
            counts: IoCounts::default(),
        }
    }

    /// How many datagrams one batch may hold on this socket (1: no GSO).
    pub fn max_segments(&self) -> usize {
        if self.gso { MAX_SEGMENTS } else { 1 }
    }

    /// Whether reads may return several coalesced datagrams.
    pub fn gro(&self) -> bool {
        self.gro
    }

    pub fn counts(&self) -> IoCounts {
        self.counts
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Reads up to about `limit` datagrams (a GRO read may carry the last few past it) into
    /// `buf` (at least [`RECV_BUFFER`] bytes when GRO is on), handing each to `on_datagram`.
    pub fn drain(
        &mut self,
        buf: &mut [u8],
        limit: usize,
        mut on_datagram: impl FnMut(&mut [u8], SocketAddr),
    ) -> Readiness {
        let mut got = 0;
        while got < limit {
            match self.recv(buf, &mut on_datagram) {
                Ok(n) => got += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Readiness::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    got += 1;
                    log::debug!("udp recv: {e}");
                }
            }
        }
        Readiness::StillReadable
    }

    /// One read: hands each datagram in it to `on_datagram`; returns how many there were.
    fn recv(
        &mut self,
        buf: &mut [u8],
        on_datagram: &mut impl FnMut(&mut [u8], SocketAddr),
    ) -> io::Result<usize> {
        self.counts.recv_calls += 1;
        #[cfg(target_os = "linux")]
        if self.gro {
            let r = crate::sys::recv_segments(&self.sock, buf)?;
            let (Some(from), false) = (r.from, r.truncated) else {
                return Ok(0);
            };
            let data = buf.get_mut(..r.len).unwrap_or_default();
            let segment = r.segment.unwrap_or(r.len).max(1);
            let mut n = 0;
            for datagram in data.chunks_mut(segment) {
                on_datagram(datagram, from);
                n += 1;
            }
            self.counts.datagrams_received += n as u64;
            return Ok(n);
        }
        let (n, from) = self.sock.recv_from(buf)?;
        self.counts.datagrams_received += 1;
        on_datagram(&mut buf[..n], from);
        Ok(1)
    }

    /// Sends `data` as datagrams of `segment` bytes (the last may be shorter) to `to` (`None`: the
    /// connected peer): one GSO send when the socket can, else one send per datagram.
    fn send_batch(&mut self, data: &[u8], segment: usize, to: Option<SocketAddr>) -> Sent {
        let segment = segment.clamp(1, data.len().max(1));
        if self.gso && data.len() > segment && !self.refusing.contains(&to) {
            self.counts.send_calls += 1;
            match send_gso(&self.sock, data, segment, to) {
                Ok(()) => {
                    self.gso_refusals = 0;
                    self.counts.datagrams_sent += data.len().div_ceil(segment) as u64;
                    return Sent::All { lost: 0 };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Sent::Partly { bytes: 0 };
                }
                Err(e) if gso_refused(&e) => self.gso_refused_by(to, &e),
                // Anything else (say a pending ICMP error on a connected socket) may concern
                // only the first datagram: the batch goes out one by one.
                Err(e) => log::debug!("udp segmented send to {to:?}: {e}"),
            }
        }
        self.send_singles(data, segment, to)
    }

    /// The kernel refused a segmented send to `to`: single datagrams for that destination from
    /// now on, and for the whole socket after [`GSO_REFUSALS_TO_DISABLE`] refusals in a row.
    fn gso_refused_by(&mut self, to: Option<SocketAddr>, e: &io::Error) {
        self.gso_refusals += 1;
        if self.refusing.len() == REFUSING_PEERS {
            self.refusing.remove(0);
        }
        self.refusing.push(to);
        if self.gso_refusals >= GSO_REFUSALS_TO_DISABLE {
            log::info!(
                "udp: the kernel refused {} segmented sends in a row ({e}); this socket sends single datagrams from now on",
                self.gso_refusals
            );
            self.gso = false;
        } else {
            log::debug!("udp: segmented send to {to:?} refused ({e}); single datagrams to it");
        }
    }

    fn send_singles(&mut self, data: &[u8], segment: usize, to: Option<SocketAddr>) -> Sent {
        let mut lost = 0;
        for (i, datagram) in data.chunks(segment).enumerate() {
            self.counts.send_calls += 1;
            let sent = match to {
                Some(to) => self.sock.send_to(datagram, to),
                None => self.sock.send(datagram),
            };
            match sent {
                Ok(_) => self.counts.datagrams_sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Sent::Partly { bytes: i * segment };
                }
                Err(e) => {
                    log::debug!("udp send to {to:?}: {e}");
                    lost += 1;
                }
            }
        }
        Sent::All { lost }
    }
}

/// `(gso, gro)` the kernel offers on `sock`.
#[cfg(target_os = "linux")]
fn probe(sock: &UdpSocket) -> (bool, bool) {
    (
        crate::sys::udp_gso_supported(sock),
        crate::sys::enable_udp_gro(sock),
    )
}

#[cfg(not(target_os = "linux"))]
fn probe(_sock: &UdpSocket) -> (bool, bool) {
    (false, false)
}

#[cfg(target_os = "linux")]
fn send_gso(
    sock: &UdpSocket,
    data: &[u8],
    segment: usize,
    to: Option<SocketAddr>,
) -> io::Result<()> {
    let segment =
        u16::try_from(segment).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    crate::sys::send_segments(sock, data, segment, to).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_gso(
    _sock: &UdpSocket,
    _data: &[u8],
    _segment: usize,
    _to: Option<SocketAddr>,
) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Whether a failed segmented send means "this socket cannot segment" (the device lacks checksum
/// offload: `EIO`; a segment the path cannot carry or too many segments: `EINVAL`) rather than a
/// problem of this one destination. An `InvalidInput` of our own (segment over 64 KiB) counts too.
fn gso_refused(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) {
        return true;
    }
    e.raw_os_error().is_none() && e.kind() == io::ErrorKind::InvalidInput
}

impl mio::event::Source for Socket {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.sock.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.sock.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.sock.deregister(registry)
    }
}

/// What became of a batch handed to [`UdpTx::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// The socket buffer is full: what did not leave is kept and goes out on WRITABLE; send
    /// nothing else until [`UdpTx::is_blocked`] is false (keeps datagram order).
    Blocked,
    /// Some datagram met a permanent error (unreachable address, …); it is gone.
    Failed,
}

struct Blocked {
    socket: usize,
    /// `None`: the socket is connected (`send`, not `send_to`).
    to: Option<SocketAddr>,
    segment: usize,
}

/// The datagrams that met a full socket buffer, and the WRITABLE interest that waits for room.
/// WRITABLE is asked for only while datagrams wait, so a sending loop is not woken for nothing.
#[derive(Default)]
pub struct UdpTx {
    blocked: Option<Blocked>,
    /// Reused copy of the waiting datagrams (no allocation per blocked send once warm).
    bytes: Vec<u8>,
}

impl UdpTx {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether datagrams wait for room.
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// The socket (caller's index) the waiting datagrams belong to.
    pub fn blocked_socket(&self) -> Option<usize> {
        self.blocked.as_ref().map(|b| b.socket)
    }

    /// Sends `data`, datagrams of `segment` bytes back to back (the last may be shorter), to `to`
    /// on `sock` (the caller's socket number `socket`, registered as `token`; `to: None` for a
    /// connected socket). On `WouldBlock` keeps a copy of what did not leave (the whole batch for
    /// a GSO send) and adds WRITABLE interest.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        sock: &mut Socket,
        registry: &Registry,
        token: Token,
        socket: usize,
        data: &[u8],
        segment: usize,
        to: Option<SocketAddr>,
    ) -> SendOutcome {
        debug_assert!(self.blocked.is_none(), "send while datagrams are blocked");
        match sock.send_batch(data, segment, to) {
            Sent::All { lost: 0 } => SendOutcome::Sent,
            Sent::All { .. } => SendOutcome::Failed,
            Sent::Partly { bytes } => {
                self.bytes.clear();
                self.bytes.extend_from_slice(&data[bytes..]);
                self.blocked = Some(Blocked {
                    socket,
                    to,
                    segment,
                });
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = registry.reregister(sock, token, interest) {
                    log::warn!("udp: cannot wait for room to send: {e}");
                }
                SendOutcome::Blocked
            }
        }
    }

    /// Retries the waiting datagrams on `sock` (which must be [`Self::blocked_socket`]'s socket);
    /// once all left (or failed for good) drops WRITABLE interest. Returns whether the slot is free.
    pub fn retry(&mut self, sock: &mut Socket, registry: &Registry, token: Token) -> bool {
        let Some(b) = self.blocked.as_ref() else {
            return true;
        };
        if let Sent::Partly { bytes } = sock.send_batch(&self.bytes, b.segment, b.to) {
            self.bytes.drain(..bytes);
            return false;
        }
        self.blocked = None;
        if let Err(e) = registry.reregister(sock, token, Interest::READABLE) {
            log::warn!("udp: cannot drop WRITABLE interest: {e}");
        }
        true
    }

    /// Forgets the waiting datagrams (their socket is being closed).
    pub fn clear(&mut self) {
        self.blocked = None;
    }
}

/// A loop's listen sockets (registered as [`Tok::Udp`]`(i)`), their "still readable" flags and
/// the one blocked-send slot they share (while it is full nothing else is sent, keeping order).
pub struct UdpSockets {
    sockets: Vec<Socket>,
    readable: Vec<bool>,
    tx: UdpTx,
}

impl UdpSockets {
    /// Registers `sockets` READABLE as `Tok::Udp(0..)`, with offload as `mode` says.
    pub fn register(
        sockets: Vec<UdpSocket>,
        mode: UdpOffload,
        registry: &Registry,
    ) -> io::Result<UdpSockets> {
        let mut sockets: Vec<Socket> = sockets.into_iter().map(|s| Socket::new(s, mode)).collect();
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

    /// The largest batch any socket takes in one send (a socket that takes fewer sends the
    /// batch as single datagrams).
    pub fn max_segments(&self) -> usize {
        self.sockets
            .iter()
            .map(Socket::max_segments)
            .max()
            .unwrap_or(1)
    }

    /// The sockets' system calls and datagrams, summed.
    pub fn counts(&self) -> IoCounts {
        let mut total = IoCounts::default();
        for s in &self.sockets {
            total.add(s.counts());
        }
        total
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

    /// Reads a batch from socket `i` if it is marked readable; returns whether it was. `buf`
    /// should hold [`RECV_BUFFER`] bytes.
    pub fn receive(
        &mut self,
        i: usize,
        buf: &mut [u8],
        on_datagram: impl FnMut(&mut [u8], SocketAddr),
    ) -> bool {
        let (Some(flag), Some(sock)) = (self.readable.get_mut(i), self.sockets.get_mut(i)) else {
            return false;
        };
        if !*flag {
            return false;
        }
        *flag = sock.drain(buf, RECV_BATCH, on_datagram).still_readable();
        true
    }

    /// Retries the blocked datagrams, if any.
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

    /// Whether datagrams wait for room (send nothing until they left).
    pub fn is_blocked(&self) -> bool {
        self.tx.is_blocked()
    }

    /// Sends `data` (datagrams of `segment` bytes back to back) to `to` from socket `i` (an
    /// unknown socket fails the batch).
    pub fn send(
        &mut self,
        registry: &Registry,
        i: usize,
        data: &[u8],
        segment: usize,
        to: SocketAddr,
    ) -> SendOutcome {
        let Some(sock) = self.sockets.get_mut(i) else {
            return SendOutcome::Failed;
        };
        self.tx.send(
            sock,
            registry,
            Tok::Udp(i).token(),
            i,
            data,
            segment,
            Some(to),
        )
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

    /// `count` datagrams of `segment` bytes (the last `last` bytes) back to back, each filled
    /// with its index.
    fn batch(count: usize, segment: usize, last: usize) -> Vec<u8> {
        let mut data = Vec::new();
        for i in 0..count {
            let len = if i + 1 == count { last } else { segment };
            data.extend(std::iter::repeat_n(i as u8, len));
        }
        data
    }

    /// A blocking receiver with a large kernel buffer.
    fn plain_receiver() -> std::net::UdpSocket {
        let rx = crate::sys::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        crate::sys::grow_udp_buffers(&rx, 4 << 20);
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        rx
    }

    fn receive_all(rx: &std::net::UdpSocket, count: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..count)
            .map(|_| {
                let n = rx.recv(&mut buf).expect("datagram arrives");
                buf[..n].to_vec()
            })
            .collect()
    }

    fn send(sock: &mut Socket, data: &[u8], segment: usize, to: SocketAddr) -> SendOutcome {
        let poll = Poll::new().unwrap();
        let mut tx = UdpTx::new();
        tx.send(sock, poll.registry(), Token(1), 0, data, segment, Some(to))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_gso_batch_of_k_segments_arrives_as_k_datagrams_at_a_plain_receiver() {
        let mut sock = Socket::new(bound(), UdpOffload::Auto);
        assert_eq!(
            sock.max_segments(),
            MAX_SEGMENTS,
            "this kernel offers UDP GSO"
        );
        let rx = plain_receiver();
        let data = batch(10, 1200, 500);
        let out = send(&mut sock, &data, 1200, rx.local_addr().unwrap());
        assert_eq!(out, SendOutcome::Sent);
        let c = sock.counts();
        assert_eq!((c.send_calls, c.datagrams_sent), (1, 10), "one system call");
        let got = receive_all(&rx, 10);
        let want: Vec<Vec<u8>> = data.chunks(1200).map(<[u8]>::to_vec).collect();
        assert_eq!(got, want, "ten datagrams, in order, intact");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_gro_read_of_a_burst_splits_into_the_datagrams_sent() {
        let mut poll = Poll::new().unwrap();
        let mut rx = Socket::new(bound(), UdpOffload::Auto);
        assert!(rx.gro(), "this kernel offers UDP GRO");
        poll.registry()
            .register(&mut rx, Token(1), Interest::READABLE)
            .unwrap();
        let to = rx.local_addr().unwrap();
        let mut tx = Socket::new(bound(), UdpOffload::Auto);
        let first = batch(21, 1000, 300);
        let second = batch(5, 700, 700);
        assert_eq!(send(&mut tx, &first, 1000, to), SendOutcome::Sent);
        assert_eq!(send(&mut tx, &second, 700, to), SendOutcome::Sent);
        // And two single datagrams from a plain socket.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        plain.send_to(b"one", to).unwrap();
        plain.send_to(&[9; 1400], to).unwrap();
        let mut want: Vec<Vec<u8>> = first.chunks(1000).map(<[u8]>::to_vec).collect();
        want.extend(second.chunks(700).map(<[u8]>::to_vec));
        want.push(b"one".to_vec());
        want.push(vec![9; 1400]);

        let mut events = Events::with_capacity(8);
        let mut got = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want.len() && std::time::Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            while rx
                .drain(&mut buf, RECV_BATCH, |d, _| got.push(d.to_vec()))
                .still_readable()
            {}
        }
        assert_eq!(got, want, "every datagram, in order, intact");
        let c = rx.counts();
        assert_eq!(c.datagrams_received, 28);
        assert!(
            c.recv_calls < 10,
            "the batches were read coalesced: {} reads",
            c.recv_calls
        );
    }

    /// More segments than the kernel's `UDP_MAX_SEGMENTS` (64; 128 since Linux 6.x): the
    /// segmented send fails with `EINVAL`, like a destination whose path cannot carry a segment.
    /// Nothing is lost; that destination gets single datagrams, others keep GSO, and only
    /// refusals in a row turn it off for the socket.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_batch_the_kernel_refuses_goes_out_as_single_datagrams_and_gso_stays_off() {
        let mut sock = Socket::new(bound(), UdpOffload::Auto);
        assert!(sock.max_segments() > 1);
        let rx = plain_receiver();
        let to = rx.local_addr().unwrap();
        let data = batch(200, 64, 64);
        assert_eq!(send(&mut sock, &data, 64, to), SendOutcome::Sent);
        let c = sock.counts();
        assert_eq!((c.send_calls, c.datagrams_sent), (201, 200));
        let want: Vec<Vec<u8>> = data.chunks(64).map(<[u8]>::to_vec).collect();
        assert_eq!(receive_all(&rx, 200), want, "nothing lost, in order");
        // That destination gets single datagrams straight away...
        let data = batch(3, 1000, 10);
        assert_eq!(send(&mut sock, &data, 1000, to), SendOutcome::Sent);
        assert_eq!(sock.counts().send_calls, 204);
        assert_eq!(receive_all(&rx, 3).concat(), data);
        // ...while another one still gets one segmented send.
        let rx2 = plain_receiver();
        let to2 = rx2.local_addr().unwrap();
        assert_eq!(send(&mut sock, &data, 1000, to2), SendOutcome::Sent);
        assert_eq!(sock.counts().send_calls, 205);
        assert_eq!(receive_all(&rx2, 3).concat(), data);
        assert!(
            sock.max_segments() > 1,
            "one refusing destination keeps GSO on"
        );
        // Refusals in a row from many destinations: the socket gives GSO up.
        let receivers: Vec<std::net::UdpSocket> = (0..GSO_REFUSALS_TO_DISABLE)
            .map(|_| plain_receiver())
            .collect();
        let big = batch(200, 64, 64);
        for r in &receivers {
            assert_eq!(
                send(&mut sock, &big, 64, r.local_addr().unwrap()),
                SendOutcome::Sent
            );
            assert_eq!(receive_all(r, 200).len(), 200);
        }
        assert_eq!(sock.max_segments(), 1, "GSO is off for this socket");
    }

    /// Tunnel sockets never let the kernel fragment: path-MTU probes must be lost when too big.
    #[cfg(target_os = "linux")]
    #[test]
    fn tunnel_sockets_set_dont_fragment() {
        for offload in [UdpOffload::Auto, UdpOffload::Off] {
            let sock = Socket::new(bound(), offload);
            assert!(
                crate::sys::set_udp_no_fragment(&sock.sock, false),
                "settable"
            );
            assert_eq!(
                crate::sys::udp_pmtu_discover(&sock.sock),
                Some(libc::IP_PMTUDISC_PROBE)
            );
        }
    }

    #[test]
    fn errors_that_mean_no_gso_here_are_told_from_others() {
        #[cfg(target_os = "linux")]
        for (errno, refused) in [
            (libc::EIO, true),
            (libc::EINVAL, true),
            (libc::EAGAIN, false),
            (libc::ECONNREFUSED, false),
            (libc::EHOSTUNREACH, false),
        ] {
            assert_eq!(
                gso_refused(&io::Error::from_raw_os_error(errno)),
                refused,
                "{errno}"
            );
        }
        assert!(gso_refused(&io::ErrorKind::InvalidInput.into()));
        assert!(!gso_refused(&io::ErrorKind::WouldBlock.into()));
    }

    #[test]
    fn offload_off_sends_and_reads_one_datagram_per_call() {
        let mut sock = Socket::new(bound(), UdpOffload::Off);
        assert_eq!(sock.max_segments(), 1);
        assert!(!sock.gro());
        let mut rx = Socket::new(bound(), UdpOffload::Off);
        let data = batch(5, 1000, 1000);
        assert_eq!(
            send(&mut sock, &data, 1000, rx.local_addr().unwrap()),
            SendOutcome::Sent
        );
        assert_eq!(sock.counts().send_calls, 5);
        let mut got = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 5 && std::time::Instant::now() < deadline {
            rx.drain(&mut buf, RECV_BATCH, |d, _| got.push(d.to_vec()));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.concat(), data);
        let c = rx.counts();
        assert_eq!(c.datagrams_received, 5);
        assert!(c.recv_calls >= 5, "one datagram per read");
    }
}
