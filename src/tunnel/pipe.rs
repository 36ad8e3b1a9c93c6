//! Splicing one TCP socket to one tunnel stream: the byte pump shared by the server (outbound
//! connections) and the client (local proxy connections).
//!
//! Each direction has one fixed buffer of [`PIPE_BUF`] bytes, allocated once per connection, so
//! memory per connection is bounded and nothing is allocated per packet. Backpressure runs both
//! ways: when the stream's send buffer is full the socket is no longer read (the TCP window closes
//! towards the sender); when the socket cannot take more, the stream is no longer read (the
//! tunnel's flow-control window closes towards the peer).
//!
//! mio is edge-triggered, so the pipe remembers whether each socket direction may still have
//! work (`sock_readable` / `sock_writable`) and the driver calls [`Pipe::pump`] after any event
//! that could unblock either direction.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use crate::proto::transport::{ResetReason, StreamError, StreamId, Transport};

/// Bytes buffered per direction per connection.
pub const PIPE_BUF: usize = 16 * 1024;

/// A fixed buffer with a consumed prefix.
struct Chunk {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn new(capacity: usize) -> Self {
        Chunk {
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
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

    /// Empty buffer space of at most `limit` bytes (only when fully drained).
    fn space(&mut self, limit: usize) -> &mut [u8] {
        debug_assert!(self.is_empty());
        let n = limit.min(self.buf.len());
        &mut self.buf[..n]
    }

    fn filled(&mut self, n: usize) {
        self.start = 0;
        self.end = n;
    }

    fn fill_from(&mut self, data: &[u8]) {
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
    /// Stream → socket (read from the stream).
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

/// One socket ↔ stream splice.
pub struct Pipe {
    pub stream: StreamId,
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
}

impl Pipe {
    /// A pipe for `stream`; `early` bytes (already received from the socket's side) are sent
    /// into the stream first.
    pub fn new(stream: StreamId, early: &[u8]) -> Pipe {
        // Early data (e.g. a forwarded HTTP request head) may exceed one buffer; never cut it.
        let mut to_stream = Chunk::new(PIPE_BUF.max(early.len()));
        if !early.is_empty() {
            to_stream.fill_from(early);
        }
        Pipe {
            stream,
            to_stream,
            to_socket: Chunk::new(PIPE_BUF),
            sock_eof: false,
            fin_sent: false,
            stream_eof: false,
            sock_shut: false,
            sock_readable: true,
            sock_writable: true,
        }
    }

    /// Queues bytes for the socket ahead of stream data (e.g. a proxy reply). Only valid before
    /// any stream data was moved to the socket.
    pub fn queue_to_socket(&mut self, data: &[u8]) {
        if self.to_socket.is_empty() {
            self.to_socket.fill_from(data);
        }
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
        if let Err(end) = self.pump_to_socket(sock, transport, budget, &mut moved) {
            return Err((end, moved));
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
            let limit = usize::try_from(*budget).unwrap_or(usize::MAX);
            match sock.read(self.to_stream.space(limit)) {
                Ok(0) => self.sock_eof = true,
                Ok(n) => self.to_stream.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock_readable = false;
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
            let limit = usize::try_from(*budget).unwrap_or(usize::MAX);
            match tr.stream_read(self.stream, self.to_socket.space(limit)) {
                Ok(0) => self.stream_eof = true,
                Ok(n) => {
                    self.to_socket.filled(n);
                    moved.to_socket += n as u64;
                    *budget = budget.saturating_sub(n as u64);
                }
                Err(StreamError::Blocked) => return Ok(()),
                Err(_) => return Err(PipeEnd::StreamGone),
            }
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
