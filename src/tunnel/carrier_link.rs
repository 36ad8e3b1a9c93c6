//! One client tunnel session's TCP carrier connection (docs/PROTOCOL.md §7): the non-blocking
//! socket, its connect, and two bounded buffers between it and the session's carrier interface.
//! Bytes read go to [`CarrierPeer::input`] (which takes whole records and frames and says how
//! much it consumed); [`CarrierPeer::output`] is asked for the next record or frame only while
//! the write buffer has room for the largest one, so a full TCP send buffer stops the session.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::proto::ClientSession;
use crate::proto::carrier::{FrameError, MAX_FRAME_LEN};

/// Read buffer: room for a few frames per read (must hold at least one whole frame).
pub const READ_BUF: usize = 4 * MAX_FRAME_LEN;
/// Write buffer: frames waiting for the socket (at most this many bytes per session).
pub const WRITE_BUF: usize = 4 * MAX_FRAME_LEN;
/// Bytes read per [`CarrierLink::receive`] at most before other work gets a turn: one read
/// buffer, so what a turn hands the streams fits their receive rings' retained 128 KiB
/// (`RECV_RETAIN`) and the pipes drain it before the next read. With 256 KiB per turn the rings
/// grew past it, into `mmap` territory, and shrank again at every drain: an `mmap`, a `munmap`
/// and 32-64 page faults per ~127 KB carried (client sys time 610 -> 190 ms per 500 MB).
const READ_BUDGET: usize = READ_BUF;

/// The session side of a carrier connection ([`ClientSession`]'s carrier interface).
pub trait CarrierPeer {
    /// Bytes read, in order; returns how many leading bytes were consumed.
    fn input(&mut self, now: Instant, bytes: &mut [u8]) -> Result<usize, FrameError>;
    /// The next record or frame to write into `buf` (at least [`MAX_FRAME_LEN`] bytes).
    fn output(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize>;
}

impl CarrierPeer for ClientSession {
    fn input(&mut self, now: Instant, bytes: &mut [u8]) -> Result<usize, FrameError> {
        self.handle_carrier_input(now, bytes)
    }
    fn output(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.poll_transmit_frame(now, buf)
    }
}

/// Why a carrier connection ended.
#[derive(Debug)]
pub enum LinkEnd {
    /// The connection could not be made.
    ConnectFailed(io::Error),
    /// The server closed it (FIN).
    Closed,
    /// A read or write failed (reset, timeout).
    Broken(io::Error),
    /// The bytes were not valid records or frames (PROTOCOL.md §7.4 failure).
    Framing,
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::ConnectFailed(e) => write!(f, "cannot connect: {e}"),
            LinkEnd::Closed => write!(f, "the server closed the connection"),
            LinkEnd::Broken(e) => write!(f, "the connection broke: {e}"),
            LinkEnd::Framing => write!(f, "the server's bytes did not authenticate"),
        }
    }
}

/// A TCP carrier connection and its buffers.
pub struct CarrierLink {
    sock: TcpStream,
    peer: SocketAddr,
    connected: bool,
    readable: bool,
    writable: bool,
    rx: Box<[u8]>,
    rx_len: usize,
    tx: Box<[u8]>,
    tx_pos: usize,
    tx_len: usize,
    end: Option<LinkEnd>,
}

impl CarrierLink {
    /// Starts a non-blocking connect to `peer` and registers it for reading and writing; with
    /// `mark` the socket carries that firewall mark (TUN mode: never routed into the device).
    pub fn connect(
        peer: SocketAddr,
        mark: Option<u32>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Self> {
        let mut sock = TcpStream::from_std(crate::sys::tcp_connect(peer, mark)?);
        registry.register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(CarrierLink {
            sock,
            peer,
            connected: false,
            readable: false,
            writable: false,
            rx: vec![0; READ_BUF].into_boxed_slice(),
            rx_len: 0,
            tx: vec![0; WRITE_BUF].into_boxed_slice(),
            tx_pos: 0,
            tx_len: 0,
            end: None,
        })
    }

    /// The server's carrier address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Records a readiness event (mio is edge-triggered: the flags stay until a read or write
    /// would block).
    pub fn on_event(&mut self, event: &mio::event::Event) {
        self.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
    }

    /// Whether bytes may be waiting to be read (the loop must not sleep then).
    pub fn wants_read(&self) -> bool {
        self.readable && self.connected && self.end.is_none()
    }

    /// Whether the loop must take another turn before it sleeps: bytes may be waiting, or the
    /// connection ended and the session must be told.
    pub fn needs_turn(&self) -> bool {
        self.wants_read() || self.end.is_some()
    }

    /// Why the connection ended, once it has.
    pub fn end(&self) -> Option<&LinkEnd> {
        self.end.as_ref()
    }

    /// Deregisters the socket (closing is dropping).
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.sock);
    }

    /// Reads what the socket holds (up to a budget) and feeds it to `peer`; returns the bytes
    /// read. A connection that ended, or bytes `peer` refuses, set [`Self::end`].
    pub fn receive(&mut self, now: Instant, peer: &mut impl CarrierPeer) -> usize {
        let mut total = 0;
        while self.wants_read() && total < READ_BUDGET {
            match self.sock.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => self.end = Some(LinkEnd::Closed),
                Ok(n) => {
                    total += n;
                    self.rx_len += n;
                    self.feed(now, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.end = Some(LinkEnd::Broken(e)),
            }
        }
        total
    }

    fn feed(&mut self, now: Instant, peer: &mut impl CarrierPeer) {
        match peer.input(now, &mut self.rx[..self.rx_len]) {
            Ok(used) => {
                let used = used.min(self.rx_len);
                self.rx.copy_within(used..self.rx_len, 0);
                self.rx_len -= used;
                // A full buffer holds a whole frame: the peer must have taken something.
                if self.rx_len == self.rx.len() {
                    self.end = Some(LinkEnd::Framing);
                }
            }
            Err(_) => self.end = Some(LinkEnd::Framing),
        }
    }

    /// Moves the peer's records and frames into the write buffer while it has room, and the
    /// buffer into the socket while it takes them. Nothing is written before the connect
    /// completed (the hello waits in the buffer).
    pub fn flush(&mut self, now: Instant, peer: &mut impl CarrierPeer) {
        if self.end.is_some() {
            return;
        }
        if !self.connected && !self.finish_connect() {
            self.fill(now, peer);
            return;
        }
        loop {
            self.fill(now, peer);
            if self.tx_pos == self.tx_len || !self.writable {
                return;
            }
            self.write_out();
            if self.end.is_some() || self.tx_pos < self.tx_len {
                return; // blocked (WRITABLE comes back) or broken
            }
        }
    }

    /// Whether the non-blocking connect has completed (sets [`Self::end`] if it failed).
    fn finish_connect(&mut self) -> bool {
        if !self.writable {
            return false;
        }
        match self.sock.take_error() {
            Ok(Some(e)) | Err(e) => {
                self.end = Some(LinkEnd::ConnectFailed(e));
                return false;
            }
            Ok(None) => {}
        }
        match self.sock.peer_addr() {
            Ok(_) => {
                self.connected = true;
                let _ = self.sock.set_nodelay(true);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                self.writable = false; // still connecting: wait for the next WRITABLE
                false
            }
            Err(e) => {
                self.end = Some(LinkEnd::ConnectFailed(e));
                false
            }
        }
    }

    /// Asks `peer` for records and frames while the buffer has room for the largest one.
    fn fill(&mut self, now: Instant, peer: &mut impl CarrierPeer) {
        if self.tx_pos > 0 && self.tx.len() - self.tx_len < MAX_FRAME_LEN {
            self.tx.copy_within(self.tx_pos..self.tx_len, 0);
            self.tx_len -= self.tx_pos;
            self.tx_pos = 0;
        }
        while self.tx.len() - self.tx_len >= MAX_FRAME_LEN {
            match peer.output(now, &mut self.tx[self.tx_len..]) {
                Some(n) => self.tx_len += n.min(self.tx.len() - self.tx_len),
                None => return,
            }
        }
    }

    fn write_out(&mut self) {
        while self.tx_pos < self.tx_len {
            match self.sock.write(&self.tx[self.tx_pos..self.tx_len]) {
                Ok(0) => {
                    self.end = Some(LinkEnd::Broken(io::ErrorKind::WriteZero.into()));
                    return;
                }
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.end = Some(LinkEnd::Broken(e));
                    return;
                }
            }
        }
        self.tx_pos = 0;
        self.tx_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A peer speaking a toy framing: one length byte, then that many bytes. Records what it
    /// got and hands out queued frames.
    #[derive(Default)]
    struct Toy {
        got: Vec<Vec<u8>>,
        queue: Vec<Vec<u8>>,
        polls: usize,
    }

    impl CarrierPeer for Toy {
        fn input(&mut self, _now: Instant, mut bytes: &mut [u8]) -> Result<usize, FrameError> {
            let mut used = 0;
            while let Some(&len) = bytes.first() {
                if len == 0 {
                    return Err(FrameError::Length);
                }
                let Some(frame) = bytes.get(1..1 + usize::from(len)) else {
                    break;
                };
                self.got.push(frame.to_vec());
                used += 1 + usize::from(len);
                bytes = &mut bytes[1 + usize::from(len)..];
            }
            Ok(used)
        }
        fn output(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
            self.polls += 1;
            assert!(buf.len() >= MAX_FRAME_LEN, "asked with too little room");
            let f = self.queue.pop()?;
            buf[..f.len()].copy_from_slice(&f);
            Some(f.len())
        }
    }

    struct Rig {
        poll: mio::Poll,
        events: mio::Events,
        link: CarrierLink,
        server: std::net::TcpStream,
    }

    fn rig() -> Rig {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let poll = mio::Poll::new().unwrap();
        let link = CarrierLink::connect(
            listener.local_addr().unwrap(),
            None,
            poll.registry(),
            Token(1),
        )
        .unwrap();
        let (server, _) = listener.accept().unwrap();
        Rig {
            poll,
            events: mio::Events::with_capacity(8),
            link,
            server,
        }
    }

    impl Rig {
        fn turn(&mut self, peer: &mut Toy) {
            self.poll
                .poll(&mut self.events, Some(Duration::from_millis(50)))
                .unwrap();
            for e in self.events.iter() {
                self.link.on_event(e);
            }
            let now = Instant::now();
            self.link.flush(now, peer);
            self.link.receive(now, peer);
        }
    }

    #[test]
    fn frames_cross_both_ways_split_anyhow() {
        let mut r = rig();
        let mut toy = Toy {
            queue: vec![b"\x03abc".to_vec(), b"\x02hi".to_vec()],
            ..Toy::default()
        };
        // The first output (the hello) is taken before the connect completed.
        r.turn(&mut toy);
        r.turn(&mut toy);
        let mut got = [0u8; 7];
        r.server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x02hi\x03abc");
        // Frames split across reads and two in one read.
        r.server.write_all(b"\x04wx").unwrap();
        r.turn(&mut toy);
        r.server.write_all(b"yz\x01!").unwrap();
        for _ in 0..5 {
            r.turn(&mut toy);
        }
        assert_eq!(toy.got, [b"wxyz".to_vec(), b"!".to_vec()]);
        assert!(r.link.end().is_none());
    }

    #[test]
    fn a_full_socket_stops_asking_the_peer_and_writable_resumes() {
        let mut r = rig();
        let frame = vec![0x5a; 255];
        // ~5 MB: more than the kernel buffers hold.
        let mut toy = Toy {
            queue: vec![frame; 20_000],
            ..Toy::default()
        };
        for _ in 0..10 {
            r.turn(&mut toy);
        }
        let left = toy.queue.len();
        assert!(left > 0, "everything fitted: the test needs a bigger queue");
        // Blocked: further turns do not pull more frames than the buffer has room for.
        let polls = toy.polls;
        for _ in 0..3 {
            r.turn(&mut toy);
        }
        assert_eq!(toy.queue.len(), left);
        assert!(toy.polls - polls <= 3, "polled while full");
        assert!(r.link.tx_len - r.link.tx_pos <= WRITE_BUF);
        // The server reads: WRITABLE comes back and the rest flows.
        let mut sink = vec![0u8; 1 << 20];
        let want = 20_000 * 255;
        let mut read = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        r.server.set_nonblocking(true).unwrap();
        while read < want && Instant::now() < deadline {
            match r.server.read(&mut sink) {
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => r.turn(&mut toy),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(read, want);
        assert!(toy.queue.is_empty());
    }

    #[test]
    fn eof_and_bad_bytes_end_the_link() {
        let mut r = rig();
        let mut toy = Toy::default();
        r.turn(&mut toy);
        r.server.write_all(b"\x02ok\x00garbage").unwrap();
        for _ in 0..3 {
            r.turn(&mut toy);
        }
        assert_eq!(toy.got, [b"ok".to_vec()]);
        assert!(matches!(r.link.end(), Some(LinkEnd::Framing)));

        let mut r = rig();
        r.turn(&mut toy);
        drop(r.server);
        let mut ended = false;
        for _ in 0..10 {
            r.poll
                .poll(&mut r.events, Some(Duration::from_millis(50)))
                .unwrap();
            for e in r.events.iter() {
                r.link.on_event(e);
            }
            r.link.flush(Instant::now(), &mut toy);
            r.link.receive(Instant::now(), &mut toy);
            ended |= matches!(r.link.end(), Some(LinkEnd::Closed));
        }
        assert!(ended);
    }

    #[test]
    fn a_refused_connect_ends_the_link() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(8);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut link = CarrierLink::connect(addr, None, poll.registry(), Token(1)).unwrap();
        let mut toy = Toy {
            queue: vec![b"\x01h".to_vec()],
            ..Toy::default()
        };
        for _ in 0..10 {
            poll.poll(&mut events, Some(Duration::from_millis(50)))
                .unwrap();
            for e in events.iter() {
                link.on_event(e);
            }
            link.flush(Instant::now(), &mut toy);
            if link.end().is_some() {
                break;
            }
        }
        assert!(
            matches!(link.end(), Some(LinkEnd::ConnectFailed(_))),
            "{:?}",
            link.end()
        );
    }
}
