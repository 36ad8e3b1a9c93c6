//! Splicing one TCP socket to one tunnel stream: the byte pump shared by the server (outbound
//! connections) and the client (local proxy connections).
//!
//! Bytes move in place: socket reads land straight in the stream's send buffer
//! ([`Transport::stream_write_space`], at most [`PIPE_READ`] per read) and socket writes take
//! them straight from its receive buffer ([`Transport::stream_peek`]), no copy in between. The
//! pipe's own buffers hold only early bytes (read before the stream existed) and the proxy
//! reply, each allocated for what it holds. Memory per connection is bounded and nothing is
//! allocated per packet. Backpressure runs both
//! ways: when the stream's send buffer is full the socket is no longer read (the TCP window closes
//! towards the sender); when the socket cannot take more, the stream is no longer read (the
//! tunnel's flow-control window closes towards the peer). The server also stops reading sockets
//! at its user's share ([`Pipe::read_limit`]) and when the session already holds enough unsent
//! bytes ([`Pipe::with_read_ahead`]); [`Pipe::read_hold`] tells the driver to pump again later.
//!
//! mio is edge-triggered, so the pipe remembers whether each socket direction may still have
//! work (`sock_readable` / `sock_writable`) and the driver calls [`Pipe::pump`] after any event
//! that could unblock either direction.
//!
//! A client's pipe starts [`Pipe::awaiting_reply`]: until the proxy's success reply is handed to
//! [`Pipe::send_reply`], only socket → stream moves, so the reply always reaches the application
//! before any destination byte (a server-speaks-first destination's banner can arrive before the
//! open result when the packet carrying it is lost or reordered).

use std::io::{self, Read, Write};
use std::net::Shutdown;

use super::read_ahead::ReadAhead;
use crate::proto::transport::{ResetReason, StreamError, StreamId, Transport};

/// The longest proxy reply, and the least buffer room worth a socket read (the server holds a
/// user's reads below it).
pub const PIPE_BUF: usize = 16 * 1024;

/// Most bytes one socket read moves into the stream. A bulk download's origin sends 64 KiB
/// segments over loopback and fast LANs; each read of the receiving socket costs a system call
/// and often a TCP window update back to the origin (measured: the server's reads were 15 % of
/// its CPU time with 16 KiB reads). Only with room for four such reads (see [`read_size`]).
pub const PIPE_READ: usize = 64 * 1024;

/// The most one socket read may take with `read_limit` bytes of buffer room: [`PIPE_READ`] when
/// the room holds four of them, else [`PIPE_BUF`]. A read reserves its whole size in the
/// stream's send buffer first (storage rounds up to a power of two; a read that finds nothing
/// gives it back), so with a small share large reads would take it whole for every read: a
/// TCP-carrier download with the minimal 64 KiB share moves 400 KB in ~2 s with 16 KiB reads,
/// ~4 s with 64 KiB ones (debug build, tests/it/tcp_carrier.rs).
pub fn read_size(read_limit: usize) -> usize {
    if read_limit >= 4 * PIPE_READ {
        PIPE_READ
    } else {
        PIPE_BUF
    }
}

/// A buffer with a consumed prefix for bytes that cannot move in place (early bytes, the proxy
/// reply): allocated when first filled, for `capacity` bytes, and kept until the pipe is dropped
/// (pipe memory only grows, which the server's buffered-bytes accounting relies on).
struct Chunk {
    buf: Box<[u8]>,
    capacity: usize,
    start: usize,
    end: usize,
}

impl Chunk {
    fn new(capacity: usize) -> Self {
        Chunk {
            buf: Box::default(),
            capacity,
            start: 0,
            end: 0,
        }
    }

    /// Bytes allocated (0 until first use, then `capacity`).
    fn allocated(&self) -> usize {
        self.buf.len()
    }

    fn allocate(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; self.capacity].into_boxed_slice();
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn fill_from(&mut self, data: &[u8]) {
        self.allocate();
        let n = data.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&data[..n]);
        self.start = 0;
        self.end = n;
    }
}

/// Bytes moved by one [`Pipe::pump`] call, for accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Socket → stream (accepted by the stream).
    pub to_stream: u64,
    /// Stream → socket (written to the socket, and so read from the stream).
    pub to_socket: u64,
}

/// Why a pipe must end now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeEnd {
    /// Both directions finished cleanly.
    Done,
    /// The socket failed (reset, broken pipe); the stream should be reset.
    SocketError,
    /// The stream was reset by the peer or the session is gone; the socket should be closed.
    StreamGone,
}

/// What holds socket → stream back while the socket may still have data (the driver must pump
/// the pipe again when it is lifted: mio will not report the socket again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadHold {
    /// [`Pipe::read_limit`] is used up (the user's buffered-bytes share).
    Share,
    /// The session already holds enough unsent bytes ([`Pipe::with_read_ahead`]).
    SendAhead,
}

/// Why [`Pipe::send_reply`] refused a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// The pipe was not waiting for a reply (never was, or one was already sent).
    NotAwaiting,
    /// The reply does not fit the socket-side buffer.
    TooLong,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplyError::NotAwaiting => "the pipe is not waiting for a proxy reply",
            ReplyError::TooLong => "the proxy reply does not fit the pipe buffer",
        })
    }
}

impl std::error::Error for ReplyError {}

/// One socket ↔ stream splice.
pub struct Pipe {
    pub stream: StreamId,
    /// Stream → socket is held until the proxy reply is queued ([`Pipe::send_reply`]).
    awaiting_reply: bool,
    to_stream: Chunk,
    to_socket: Chunk,
    /// The socket reported EOF.
    sock_eof: bool,
    /// We finished the stream's send side.
    fin_sent: bool,
    /// The stream's receive side reached FIN and everything was read.
    stream_eof: bool,
    /// We shut the socket's write side.
    sock_shut: bool,
    /// Edge-trigger memory: the socket may have unread data.
    pub sock_readable: bool,
    /// Edge-trigger memory: the socket may accept writes.
    pub sock_writable: bool,
    /// Most bytes the next pumps may read from the socket (the server's buffered-bytes share;
    /// `usize::MAX`, no limit, unless the driver sets it); decreased by what is read.
    pub read_limit: usize,
    /// Reads only while this policy allows them for the stream's session (`None`: always).
    read_ahead: Option<ReadAhead>,
    /// Why the last pump stopped reading the socket with data possibly waiting, if it did.
    hold: Option<ReadHold>,
}

impl Pipe {
    /// A pipe for `stream`; `early` bytes (already received from the socket's side) are sent
    /// into the stream first.
    pub fn new(stream: StreamId, early: &[u8]) -> Pipe {
        // Early data (e.g. a forwarded HTTP request head) may exceed one buffer; never cut it.
        let mut to_stream = Chunk::new(early.len());
        if !early.is_empty() {
            to_stream.fill_from(early);
        }
        Pipe {
            stream,
            awaiting_reply: false,
            to_stream,
            to_socket: Chunk::new(PIPE_BUF),
            sock_eof: false,
            fin_sent: false,
            stream_eof: false,
            sock_shut: false,
            sock_readable: true,
            sock_writable: true,
            read_limit: usize::MAX,
            read_ahead: None,
            hold: None,
        }
    }

    /// A pipe that moves only socket → stream until [`Pipe::send_reply`] queues the proxy's
    /// success reply; stream data waits in the stream (its flow-control window) until then.
    pub fn awaiting_reply(stream: StreamId, early: &[u8]) -> Pipe {
        Pipe {
            awaiting_reply: true,
            ..Pipe::new(stream, early)
        }
    }

    /// This pipe reads its socket only while `policy` allows it for the stream's session.
    pub fn with_read_ahead(mut self, policy: ReadAhead) -> Pipe {
        self.read_ahead = Some(policy);
        self
    }

    /// Whether stream → socket is still held for the proxy reply.
    pub fn is_awaiting_reply(&self) -> bool {
        self.awaiting_reply
    }

    /// Queues the proxy reply as the first bytes the socket gets, and opens stream → socket.
    /// Nothing was moved from the stream before, so nothing can precede or displace the reply.
    pub fn send_reply(&mut self, reply: &[u8]) -> Result<(), ReplyError> {
        if !self.awaiting_reply {
            return Err(ReplyError::NotAwaiting);
        }
        if reply.len() > self.to_socket.capacity {
            return Err(ReplyError::TooLong);
        }
        debug_assert!(self.to_socket.is_empty());
        // Only the reply ever goes through this buffer: allocate just what it needs.
        self.to_socket = Chunk::new(reply.len());
        self.to_socket.fill_from(reply);
        self.awaiting_reply = false;
        Ok(())
    }

    /// Bytes of buffer this pipe has allocated (each direction's buffer on first use).
    pub fn buffer_bytes(&self) -> usize {
        self.to_stream.allocated() + self.to_socket.allocated()
    }

    /// Whether one side has finished (the socket sent EOF or the stream its FIN).
    pub fn is_half_closed(&self) -> bool {
        self.sock_eof || self.stream_eof
    }

    /// What socket → stream waits for after the last pump, if only a limit holds it: the socket
    /// may hold data, nothing is pending for the stream, and [`Pipe::read_limit`] is used up or
    /// the read-ahead policy ([`Pipe::with_read_ahead`]) refused the read.
    pub fn read_hold(&self) -> Option<ReadHold> {
        self.hold
            .filter(|_| self.sock_readable && !self.sock_eof && self.to_stream.is_empty())
    }

    /// Whether the stream's data was all delivered and the peer finished.
    pub fn is_done(&self) -> bool {
        self.sock_eof
            && self.fin_sent
            && self.stream_eof
            && self.sock_shut
            && self.to_socket.is_empty()
    }

    /// Moves as many bytes as possible both ways. `budget` caps the bytes moved in total (the
    /// user's remaining traffic allowance; `u64::MAX` when unlimited) and is decreased.
    pub fn pump<S: Read + Write + ShutdownWrite>(
        &mut self,
        sock: &mut S,
        transport: &mut Transport,
        budget: &mut u64,
    ) -> Result<Moved, (PipeEnd, Moved)> {
        let mut moved = Moved::default();
        self.hold = None;
        if !self.awaiting_reply {
            if let Err(end) = self.pump_to_socket(sock, transport, budget, &mut moved) {
                return Err((end, moved));
            }
        }
        if let Err(end) = self.pump_to_stream(sock, transport, budget, &mut moved) {
            return Err((end, moved));
        }
        if self.is_done() {
            return Err((PipeEnd::Done, moved));
        }
        Ok(moved)
    }

    fn pump_to_stream<S: Read>(
        &mut self,
        sock: &mut S,
        tr: &mut Transport,
        budget: &mut u64,
        moved: &mut Moved,
    ) -> Result<(), PipeEnd> {
        // After a short read, the next read gets what is left of the space the last one was
        // given: asking for a fresh PIPE_READ would grow the ring (64 KiB + a few bytes rounds
        // up to 128 KiB, past the allocator's mmap threshold) only for a read that most likely
        // finds nothing, and the `WouldBlock` would shrink it back.
        let mut left_after_short_read = usize::MAX;
        loop {
            if !self.to_stream.is_empty() {
                let n = match tr.stream_write(self.stream, self.to_stream.data()) {
                    Ok(n) => n,
                    Err(StreamError::Finished) => return Ok(()),
                    Err(_) => return Err(PipeEnd::StreamGone),
                };
                self.to_stream.consume(n);
                moved.to_stream += n as u64;
                *budget = budget.saturating_sub(n as u64);
                if !self.to_stream.is_empty() {
                    return Ok(()); // stream send buffer full: wait for StreamWritable
                }
            }
            if self.sock_eof {
                if !self.fin_sent {
                    match tr.stream_finish(self.stream) {
                        Ok(()) => self.fin_sent = true,
                        Err(_) => return Err(PipeEnd::StreamGone),
                    }
                }
                return Ok(());
            }
            if !self.sock_readable || *budget == 0 {
                return Ok(());
            }
            if self.read_limit == 0 {
                self.hold = Some(ReadHold::Share);
                return Ok(());
            }
            if self.read_ahead.is_some_and(|p| !p.allows(tr)) {
                self.hold = Some(ReadHold::SendAhead);
                return Ok(());
            }
            // The socket's bytes go straight into the stream's send buffer: no copy.
            let limit = usize::try_from(*budget)
                .unwrap_or(usize::MAX)
                .min(self.read_limit)
                .min(read_size(self.read_limit))
                .min(left_after_short_read);
            let room = match tr.stream_write_space(self.stream, limit) {
                Ok(room) => room,
                Err(StreamError::Finished) => return Ok(()),
                Err(_) => return Err(PipeEnd::StreamGone),
            };
            if room.is_empty() {
                return Ok(()); // stream send buffer full: wait for StreamWritable
            }
            let offered = room.len();
            match sock.read(room) {
                Ok(0) => {
                    self.sock_eof = true;
                    let _ = tr.stream_write_commit(self.stream, 0); // give the space back
                }
                Ok(n) => {
                    if tr.stream_write_commit(self.stream, n).is_err() {
                        return Err(PipeEnd::StreamGone);
                    }
                    self.read_limit -= n;
                    moved.to_stream += n as u64;
                    *budget = budget.saturating_sub(n as u64);
                    left_after_short_read = match offered - n.min(offered) {
                        0 => usize::MAX,
                        left => left,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock_readable = false;
                    // The space asked for stays charged to the user unless given back: an idle
                    // connection would hold a read's worth of storage for nothing.
                    let _ = tr.stream_write_commit(self.stream, 0);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(PipeEnd::SocketError),
            }
        }
    }

    fn pump_to_socket<S: Write + ShutdownWrite>(
        &mut self,
        sock: &mut S,
        tr: &mut Transport,
        budget: &mut u64,
        moved: &mut Moved,
    ) -> Result<(), PipeEnd> {
        loop {
            if !self.to_socket.is_empty() {
                if !self.sock_writable {
                    return Ok(());
                }
                match sock.write(self.to_socket.data()) {
                    Ok(0) => return Err(PipeEnd::SocketError),
                    Ok(n) => self.to_socket.consume(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.sock_writable = false;
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(PipeEnd::SocketError),
                }
                continue;
            }
            if self.stream_eof {
                if !self.sock_shut {
                    let _ = sock.shutdown_write();
                    self.sock_shut = true;
                }
                return Ok(());
            }
            if *budget == 0 {
                return Ok(());
            }
            // The socket takes the bytes straight from the stream's receive buffer: no copy.
            let data = match tr.stream_peek(self.stream) {
                Ok((first, _)) => first,
                Err(_) => return Err(PipeEnd::StreamGone),
            };
            if data.is_empty() {
                match tr.stream_consume(self.stream, 0) {
                    Ok(_) => self.stream_eof = true,
                    Err(StreamError::Blocked) => return Ok(()),
                    Err(_) => return Err(PipeEnd::StreamGone),
                }
                continue;
            }
            if !self.sock_writable {
                return Ok(());
            }
            let limit = usize::try_from(*budget).unwrap_or(usize::MAX);
            let n = match sock.write(&data[..data.len().min(limit)]) {
                Ok(0) => return Err(PipeEnd::SocketError),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock_writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(PipeEnd::SocketError),
            };
            if tr.stream_consume(self.stream, n).is_err() {
                return Err(PipeEnd::StreamGone);
            }
            moved.to_socket += n as u64;
            *budget = budget.saturating_sub(n as u64);
        }
    }

    /// Resets the stream (after a socket error); ignores a stream that is already gone.
    pub fn reset_stream(&self, tr: &mut Transport, reason: ResetReason) {
        let _ = tr.stream_reset(self.stream, reason);
    }
}

/// Half-closing a socket's write side (TCP FIN).
pub trait ShutdownWrite {
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl ShutdownWrite for mio::net::TcpStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::transport::{Destination, OpenResult, Side, TransportConfig, TransportEvent};
    use std::time::Instant;

    /// An in-memory socket: reads from `input` (WouldBlock when empty), records writes.
    #[derive(Default)]
    struct MemSock {
        input: Vec<u8>,
        output: Vec<u8>,
        shut: bool,
        /// Sizes of the reads that returned data.
        reads: Vec<usize>,
        /// Sizes of the buffers every read was given.
        offered: Vec<usize>,
    }

    impl Read for MemSock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.offered.push(buf.len());
            if self.input.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            self.reads.push(n);
            Ok(n)
        }
    }

    impl Write for MemSock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ShutdownWrite for MemSock {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }
    }

    /// Every datagram `from` wants to send now, as (packet number, payload).
    fn transmit(from: &mut Transport, now: Instant) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 2048];
        while let Some((pn, len)) = from.poll_transmit(now, &mut buf) {
            out.push((pn, buf[..len].to_vec()));
        }
        out
    }

    /// A client and a server transport with stream `id` opened by the client and accepted.
    fn opened_stream(
        now: Instant,
        client_config: TransportConfig,
    ) -> (Transport, Transport, StreamId) {
        let mut client = Transport::new(client_config, Side::Client, now);
        let mut server = Transport::new(TransportConfig::default(), Side::Server, now);
        let id = client
            .open_stream(Destination::Addr("192.0.2.1:80".parse().unwrap()))
            .unwrap();
        deliver(&mut server, now, transmit(&mut client, now));
        server.answer_open(id, OpenResult::Ok).unwrap();
        (client, server, id)
    }

    fn deliver(to: &mut Transport, now: Instant, packets: Vec<(u64, Vec<u8>)>) {
        for (pn, p) in packets {
            to.handle_payload(now, pn, &p).expect("valid payload");
        }
    }

    fn events(t: &mut Transport) -> Vec<TransportEvent> {
        std::iter::from_fn(|| t.poll_event()).collect()
    }

    /// Bug A: the destination speaks first (an SSH banner) and its data overtakes the packet
    /// carrying OPEN_OK. The proxy's success reply must still reach the socket before any
    /// destination byte, and none may be lost.
    #[test]
    fn stream_data_before_open_result_never_overtakes_the_reply() {
        let now = Instant::now();
        let mut client = Transport::new(TransportConfig::default(), Side::Client, now);
        let mut server = Transport::new(TransportConfig::default(), Side::Server, now);
        let dest = Destination::Addr("192.0.2.1:22".parse().unwrap());
        let id = client.open_stream(dest).unwrap();
        deliver(&mut server, now, transmit(&mut client, now));
        assert!(events(&mut server).contains(&TransportEvent::StreamOpened {
            id,
            dest: Destination::Addr("192.0.2.1:22".parse().unwrap()),
        }));
        // OPEN_OK in one packet, the banner in a later one; the first is delayed.
        server.answer_open(id, OpenResult::Ok).unwrap();
        let open_ok = transmit(&mut server, now);
        let banner = b"SSH-2.0-OpenSSH_9.6\r\n";
        assert_eq!(server.stream_write(id, banner).unwrap(), banner.len());
        let later = now + std::time::Duration::from_millis(50);
        let data = transmit(&mut server, later);
        assert!(!open_ok.is_empty() && !data.is_empty());

        let mut sock = MemSock {
            input: b"client hello".to_vec(),
            ..MemSock::default()
        };
        let mut pipe = Pipe::awaiting_reply(id, b"early");
        let mut budget = u64::MAX;
        // The data arrives first: the transport reports it readable while the open is unanswered.
        deliver(&mut client, now, data);
        assert!(events(&mut client).contains(&TransportEvent::StreamReadable { id }));
        // The client driver pumps on every stream event, also while the open is unanswered;
        // the pipe holds the stream data back.
        pipe.pump(&mut sock, &mut client, &mut budget).unwrap();
        assert!(sock.output.is_empty(), "destination bytes before the reply");
        // Socket → stream still flows while waiting (early data and what the app sent).
        deliver(&mut server, later, transmit(&mut client, later));
        let mut got = [0u8; 64];
        let n = server.stream_read(id, &mut got).unwrap();
        assert_eq!(&got[..n], b"earlyclient hello");

        // Now OPEN_OK arrives; the reply goes out first, then the banner.
        deliver(&mut client, now, open_ok);
        assert!(
            events(&mut client).contains(&TransportEvent::StreamOpenResult {
                id,
                result: OpenResult::Ok
            })
        );
        pipe.send_reply(b"REPLY").unwrap();
        pipe.pump(&mut sock, &mut client, &mut budget).unwrap();
        assert_eq!(sock.output, b"REPLYSSH-2.0-OpenSSH_9.6\r\n");
        // A second reply (or one on a pipe that never waited) is an error, not a silent drop.
        assert_eq!(pipe.send_reply(b"again"), Err(ReplyError::NotAwaiting));
        assert_eq!(
            Pipe::new(id, &[]).send_reply(b"x"),
            Err(ReplyError::NotAwaiting)
        );
    }

    /// A socket that takes at most `max_write` bytes per call and would block on every other
    /// call (a slow application reading through a small TCP window).
    struct SlowSock {
        inner: MemSock,
        max_write: usize,
        block_next: bool,
    }

    impl Read for SlowSock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl Write for SlowSock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.block_next = !self.block_next;
            if !self.block_next {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.max_write);
            self.inner.write(&buf[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ShutdownWrite for SlowSock {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.inner.shutdown_write()
        }
    }

    /// Stream → socket writes straight from the stream's receive buffer: a transfer larger than
    /// the buffer (so it wraps), through a socket taking odd-sized pieces and blocking often,
    /// arrives whole and in order, is counted once, and the pipe allocates no buffer for it.
    #[test]
    fn stream_to_socket_moves_in_place_through_partial_writes() {
        let mut now = Instant::now();
        let (mut client, mut server, id) = opened_stream(now, TransportConfig::default());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut sock = SlowSock {
            inner: MemSock::default(),
            max_write: 7_001,
            block_next: false,
        };
        let mut pipe = Pipe::new(id, &[]);
        pipe.sock_readable = false; // nothing comes from the socket: socket -> stream stays idle
        let (mut written, mut moved, mut budget) = (0, 0u64, u64::MAX);
        for _ in 0..2_000 {
            if written < data.len() {
                written += server.stream_write(id, &data[written..]).unwrap();
                if written == data.len() {
                    server.stream_finish(id).unwrap();
                }
            }
            now += std::time::Duration::from_millis(5);
            deliver(&mut client, now, transmit(&mut server, now));
            events(&mut client);
            sock.block_next = false; // the socket became writable again
            pipe.sock_writable = true;
            match pipe.pump(&mut sock, &mut client, &mut budget) {
                Ok(m) => moved += m.to_socket,
                Err((end, m)) => {
                    moved += m.to_socket;
                    assert_eq!(end, PipeEnd::Done);
                    break;
                }
            }
            assert_eq!(
                pipe.buffer_bytes(),
                0,
                "stream -> socket used a pipe buffer"
            );
            deliver(&mut server, now, transmit(&mut client, now));
            events(&mut server);
            if sock.inner.output.len() == data.len() && sock.inner.shut {
                break;
            }
        }
        assert_eq!(sock.inner.output.len(), data.len());
        assert!(sock.inner.output == data, "bytes reordered or corrupted");
        assert!(sock.inner.shut, "the stream's FIN did not shut the socket");
        assert_eq!(moved, data.len() as u64);
    }

    /// A read that finds nothing gives back the space it asked for: before, every idle
    /// connection kept a read's worth (64 KiB) of send-buffer storage charged to its user, so
    /// 128 idle connections of one user filled the default 8 MiB share and stalled the rest.
    #[test]
    fn a_read_that_finds_nothing_leaves_no_storage_charged() {
        let now = Instant::now();
        let (_, mut server, id) = opened_stream(now, TransportConfig::default());
        let mut sock = MemSock::default();
        let mut pipe = Pipe::new(id, &[]);
        let mut budget = u64::MAX;
        let moved = pipe.pump(&mut sock, &mut server, &mut budget);
        assert!(moved.is_ok());
        assert!(
            server.send_memory() <= 16 * 1024, // the send buffer's retained floor
            "an idle connection holds {} bytes",
            server.send_memory()
        );
    }

    /// A short read (a request head, a small answer) is followed by a read into what is left of
    /// the space it was given, not by a fresh 64 KiB: the ring grew past the allocator's mmap
    /// threshold (64 KiB + a few bytes rounds up to 128 KiB) and shrank back at the `WouldBlock`,
    /// an mmap and munmap on every small request's first-byte path.
    #[test]
    fn a_short_read_is_followed_by_a_read_into_the_space_left() {
        let now = Instant::now();
        let (_, mut server, id) = opened_stream(now, TransportConfig::default());
        let mut sock = MemSock {
            input: vec![7u8; 79],
            ..MemSock::default()
        };
        let mut pipe = Pipe::new(id, &[]);
        let mut budget = u64::MAX;
        let moved = pipe.pump(&mut sock, &mut server, &mut budget);
        assert_eq!(moved.map(|m| m.to_stream), Ok(79));
        assert_eq!(sock.offered, vec![PIPE_READ, PIPE_READ - 79]);
        // More data later: full-size reads again.
        sock.input = vec![8u8; 2 * PIPE_READ];
        pipe.sock_readable = true;
        let moved = pipe.pump(&mut sock, &mut server, &mut budget);
        assert_eq!(moved.map(|m| m.to_stream), Ok(2 * PIPE_READ as u64));
        assert!(sock.reads[1..].iter().all(|&n| n <= PIPE_READ));
    }

    /// Large reads only with room for four of them: a small share keeps 16 KiB reads.
    #[test]
    fn reads_are_large_only_with_room_for_four() {
        assert_eq!(read_size(usize::MAX), PIPE_READ);
        assert_eq!(read_size(4 * PIPE_READ), PIPE_READ);
        assert_eq!(read_size(4 * PIPE_READ - 1), PIPE_BUF);
        assert_eq!(read_size(64 * 1024), PIPE_BUF);
    }

    /// A bulk socket is read in pieces of up to [`PIPE_READ`]: 256 KiB waiting in the socket
    /// take 4 reads (16 with 16 KiB reads: 4× the system calls and window updates).
    #[test]
    fn a_bulk_socket_is_read_64_kib_at_a_time() {
        let now = Instant::now();
        let (_, mut server, id) = opened_stream(now, TransportConfig::default());
        let mut sock = MemSock {
            input: vec![7u8; 256 * 1024],
            ..MemSock::default()
        };
        let mut pipe = Pipe::new(id, &[]);
        let mut budget = u64::MAX;
        let moved = pipe.pump(&mut sock, &mut server, &mut budget);
        assert_eq!(moved.map(|m| m.to_stream), Ok(256 * 1024));
        assert_eq!(sock.reads, vec![PIPE_READ; 4]);
    }

    /// Socket → stream reads straight into the stream's send buffer: with a buffer far smaller
    /// than the transfer, the pipe stops when it is full, is woken by `StreamWritable` (the only
    /// time it is pumped again here), and every byte arrives in order with no pipe buffer.
    #[test]
    fn socket_to_stream_reads_in_place_and_waits_for_room() {
        let mut now = Instant::now();
        let config = TransportConfig {
            send_buffer: 8 * 1024,
            session_send_buffer: 8 * 1024,
            ..TransportConfig::default()
        };
        let (mut client, mut server, id) = opened_stream(now, config);
        deliver(&mut client, now, transmit(&mut server, now));
        events(&mut client);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let mut sock = MemSock {
            input: data.clone(),
            ..MemSock::default()
        };
        let mut pipe = Pipe::new(id, &[]);
        let (mut got, mut moved, mut budget) = (Vec::new(), 0u64, u64::MAX);
        let mut wake = true;
        for _ in 0..1_000 {
            if wake {
                let m = pipe.pump(&mut sock, &mut client, &mut budget).unwrap();
                moved += m.to_stream;
                assert_eq!(
                    pipe.buffer_bytes(),
                    0,
                    "socket -> stream used a pipe buffer"
                );
                assert!(client.stream_write_capacity(id) == 0 || sock.input.is_empty());
            }
            now += std::time::Duration::from_millis(5);
            deliver(&mut server, now, transmit(&mut client, now));
            events(&mut server);
            let mut buf = [0u8; 4096];
            while let Ok(n) = server.stream_read(id, &mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            deliver(&mut client, now, transmit(&mut server, now));
            wake = events(&mut client).contains(&TransportEvent::StreamWritable { id });
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got.len(), data.len(), "the pipe was never woken again");
        assert!(got == data, "bytes reordered or corrupted");
        assert_eq!(moved, data.len() as u64);
    }

    /// A pipe with a read-ahead policy stops reading when its session holds the bound of
    /// unsent bytes, says why (the driver must pump it again: the socket's readiness was
    /// consumed), and reads again once the session sent some; a used-up share is the other hold.
    #[test]
    fn a_pipe_held_by_read_ahead_reads_again_once_the_session_sent() {
        let now = Instant::now();
        let (_, mut server, id) = opened_stream(now, TransportConfig::default());
        let mut sock = MemSock {
            input: vec![1u8; 1024 * 1024],
            ..MemSock::default()
        };
        let policy = ReadAhead::new(2 * PIPE_READ as u64, 1);
        assert!(policy.bound(server.cwnd()) == 2 * PIPE_READ as u64);
        let mut pipe = Pipe::new(id, &[]).with_read_ahead(policy);
        let mut budget = u64::MAX;
        let moved = pipe.pump(&mut sock, &mut server, &mut budget).unwrap();
        assert_eq!(moved.to_stream, 2 * PIPE_READ as u64, "stops at the bound");
        assert_eq!(pipe.read_hold(), Some(ReadHold::SendAhead));
        let again = pipe.pump(&mut sock, &mut server, &mut budget).unwrap();
        assert_eq!(again.to_stream, 0, "still at the bound");
        let sent = transmit(&mut server, now);
        assert!(!sent.is_empty() && server.unsent() < 2 * PIPE_READ as u64);
        let moved = pipe.pump(&mut sock, &mut server, &mut budget).unwrap();
        assert!(moved.to_stream > 0, "reads again once the session sent");
        pipe.read_limit = 0;
        pipe.pump(&mut sock, &mut server, &mut budget).unwrap();
        assert_eq!(pipe.read_hold(), Some(ReadHold::Share));
        sock.input.clear();
        pipe.read_limit = usize::MAX;
        let mut unlimited = Pipe::new(id, &[]);
        unlimited.pump(&mut sock, &mut server, &mut budget).unwrap();
        assert_eq!(
            unlimited.read_hold(),
            None,
            "a socket read dry holds nothing"
        );
    }

    #[test]
    fn oversized_reply_is_refused_and_the_pipe_keeps_waiting() {
        let mut pipe = Pipe::awaiting_reply(StreamId(0), &[]);
        assert_eq!(
            pipe.send_reply(&vec![0u8; PIPE_BUF + 1]),
            Err(ReplyError::TooLong)
        );
        assert!(pipe.is_awaiting_reply());
        assert_eq!(pipe.send_reply(b"ok"), Ok(()));
        assert!(!pipe.is_awaiting_reply());
    }
}
