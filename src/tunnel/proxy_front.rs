//! Sans-IO front end of the client's local proxy port: SOCKS5 (RFC 1928) and HTTP proxy
//! (`CONNECT` and absolute-URI `http://` requests) on the same port, told apart by the first
//! byte (`0x05` = SOCKS5, an ASCII letter = HTTP). Without credentials SOCKS5 takes "no
//! authentication" and HTTP needs no header; with credentials ([`ProxyFront::with_auth`]) SOCKS5
//! requires username/password (RFC 1929) and HTTP a matching `Proxy-Authorization: Basic`
//! (else 407), both compared in constant time.
//!
//! Feed bytes read from the local client into [`ProxyFront::feed`]; every call returns a
//! [`Progress`] carrying the bytes to write back to the client now (e.g. the SOCKS5 method
//! selection), and eventually either a [`ProxyRequest`] or a [`FrontError`] whose reply must be
//! written before closing. Bytes that arrive after the request (pipelined early data) are handed
//! over inside the request. After the outbound connection succeeds or fails, build the final answer
//! with [`ProxyRequest::success_reply`] / [`ProxyRequest::failure_reply`].
//!
//! HTTP heads must be UTF-8 (obs-text header bytes are refused with 400), obsolete header line
//! folding is refused, bare-LF line endings are accepted. SOCKS5 RSV bytes are not checked.
//!
//! Memory is bounded: the front buffers at most [`MAX_HEAD_BYTES`] bytes of an unfinished request
//! plus whatever a single `feed` call hands in. Nothing here panics on any input. The HTTP head's
//! end is found by the shared incremental [`HeadScanner`] (also used by the API).
//!
//! Also here: the SOCKS5 UDP request header codec ([`parse_socks5_udp`],
//! [`write_socks5_udp_header`]) used on the UDP ASSOCIATE relay socket.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use super::target::{self, TargetParseError};
use crate::config::ProxyAuth;
use crate::http_head::{HeadScanner, MAX_HEAD_BYTES, MAX_HEADERS, Scan, is_tchar};
use crate::keys::ct_eq;
use crate::proto::transport::Destination;

const SOCKS_VERSION: u8 = 0x05;
const METHOD_NO_AUTH: u8 = 0x00;
const METHOD_USER_PASS: u8 = 0x02;
/// Version byte of the RFC 1929 username/password sub-negotiation.
const USER_PASS_VERSION: u8 = 0x01;
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const CMD_CONNECT: u8 = 0x01;
const CMD_UDP_ASSOCIATE: u8 = 0x03;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// Which proxy protocol the local client speaks (decides the shape of replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontProtocol {
    /// SOCKS5 (`CONNECT` or `UDP ASSOCIATE`).
    Socks5,
    /// HTTP `CONNECT host:port`.
    HttpConnect,
    /// HTTP request with an absolute `http://` URI, forwarded with a rewritten head.
    HttpForward,
    /// A connection captured on its way elsewhere (TUN mode): the destination is known, no
    /// request was read and no reply is written (a failure just closes it).
    Transparent,
}

/// A complete request from the local client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRequest {
    /// Open a TCP stream to `dest` and splice it to the client.
    Connect {
        /// Requested destination.
        dest: Destination,
        /// `Socks5` or `HttpConnect`.
        protocol: FrontProtocol,
        /// Bytes the client sent after the request; forward them first.
        early_data: Vec<u8>,
    },
    /// SOCKS5 UDP ASSOCIATE. Reply with [`ProxyRequest::success_reply`] carrying the UDP relay
    /// address; keep the TCP connection open as the association's lifetime. Bytes sent on the
    /// control connection after the request have no meaning and are discarded.
    UdpAssociate {
        /// DST.ADDR/DST.PORT of the request: where the client says it will send from
        /// (often `0.0.0.0:0`, meaning "unknown").
        client_hint: Destination,
    },
    /// Plain-HTTP proxy request: connect to `dest`, send `head`, then `body_prefix`, then splice.
    HttpForward {
        /// Origin server (`http://host[:port]`, port 80 by default).
        dest: Destination,
        /// Rewritten request head (origin-form target, proxy/hop-by-hop headers removed,
        /// `Host` from the URI, `Connection: close`), ending with an empty line.
        head: Vec<u8>,
        /// Bytes received after the head (start of the body, or pipelined data).
        body_prefix: Vec<u8>,
    },
}

/// SOCKS5 reply codes (RFC 1928 §6); also used to pick the HTTP status for HTTP clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Socks5Reply {
    /// 0x00 succeeded.
    Succeeded = 0x00,
    /// 0x01 general SOCKS server failure.
    GeneralFailure = 0x01,
    /// 0x02 connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// 0x03 network unreachable.
    NetworkUnreachable = 0x03,
    /// 0x04 host unreachable.
    HostUnreachable = 0x04,
    /// 0x05 connection refused.
    ConnectionRefused = 0x05,
    /// 0x06 TTL expired (used for timeouts).
    TtlExpired = 0x06,
    /// 0x07 command not supported.
    CommandNotSupported = 0x07,
    /// 0x08 address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl Socks5Reply {
    /// The HTTP status an HTTP proxy client gets for this outcome.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Succeeded => 200,
            Self::NotAllowed => 403,
            Self::TtlExpired => 504,
            Self::CommandNotSupported | Self::AddressTypeNotSupported => 400,
            Self::GeneralFailure
            | Self::NetworkUnreachable
            | Self::HostUnreachable
            | Self::ConnectionRefused => 502,
        }
    }
}

/// Why the front end gave up on a client. Write the accompanying reply bytes, then close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontError {
    /// First byte is neither 0x05 nor an ASCII letter (SOCKS4, TLS, garbage…). No reply.
    UnknownProtocol,
    /// A SOCKS5 message had a version other than 5.
    Socks5BadVersion,
    /// The client did not offer the method required (no authentication, or username/password
    /// when credentials are configured).
    Socks5NoAcceptableMethod,
    /// Wrong or missing credentials (SOCKS5 username/password, HTTP `Proxy-Authorization`).
    AuthFailed,
    /// BIND or an unknown command.
    Socks5CommandNotSupported,
    /// ATYP not in {1, 3, 4}.
    Socks5AddressTypeNotSupported,
    /// Empty or invalid domain name.
    Socks5BadAddress,
    /// The request head exceeded [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    HttpHeadTooLarge,
    /// Malformed request line, header or authority.
    HttpMalformed,
    /// Absolute URI with a scheme other than `http` (e.g. `https://`, `ftp://`), or origin-form.
    HttpUnsupportedTarget,
    /// `feed` was called after the front already finished or failed.
    Finished,
}

impl fmt::Display for FrontError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::UnknownProtocol => "unknown proxy protocol",
            Self::Socks5BadVersion => "SOCKS5: bad version",
            Self::Socks5NoAcceptableMethod => "SOCKS5: no acceptable auth method",
            Self::AuthFailed => "wrong or missing proxy credentials",
            Self::Socks5CommandNotSupported => "SOCKS5: command not supported",
            Self::Socks5AddressTypeNotSupported => "SOCKS5: address type not supported",
            Self::Socks5BadAddress => "SOCKS5: invalid destination address",
            Self::HttpHeadTooLarge => "HTTP: request head too large",
            Self::HttpMalformed => "HTTP: malformed request",
            Self::HttpUnsupportedTarget => "HTTP: unsupported request target",
            Self::Finished => "proxy front already finished",
        };
        f.write_str(text)
    }
}

impl std::error::Error for FrontError {}

/// Result of one [`ProxyFront::feed`] call. In every variant, write `reply` to the client first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The request is not complete yet; read more.
    NeedMore {
        /// Bytes to write to the client now (possibly empty).
        reply: Vec<u8>,
    },
    /// The request is complete.
    Ready {
        /// Bytes to write to the client now (possibly empty).
        reply: Vec<u8>,
        /// What the client asked for.
        request: ProxyRequest,
    },
    /// The client is refused: write `reply` (possibly empty), then close.
    Failed {
        /// Bytes to write before closing.
        reply: Vec<u8>,
        /// Why.
        error: FrontError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Detect,
    Socks5Greeting,
    /// RFC 1929 username/password sub-negotiation.
    Socks5Auth,
    Socks5Request,
    Http,
    Done,
}

/// The per-connection parser. Create one per accepted local connection.
#[derive(Debug)]
pub struct ProxyFront {
    state: State,
    buf: Vec<u8>,
    /// Finds the HTTP head's end without rescanning on every feed.
    http_head: HeadScanner,
    /// Credentials every request must carry (`None`: no authentication).
    auth: Option<Arc<ProxyAuth>>,
}

impl Default for ProxyFront {
    fn default() -> Self {
        Self::new()
    }
}

enum Step {
    /// Parsed something and consumed `n` bytes; continue in the new state.
    Advance(usize),
    NeedMore,
    Ready(ProxyRequest, usize),
    Failed(FrontError),
}

impl ProxyFront {
    /// A fresh front waiting for the first byte, asking for no credentials.
    pub fn new() -> Self {
        Self::with_auth(None)
    }

    /// A fresh front that requires `auth` (when `Some`) before any request.
    pub fn with_auth(auth: Option<Arc<ProxyAuth>>) -> Self {
        Self {
            state: State::Detect,
            buf: Vec::new(),
            http_head: HeadScanner::new(),
            auth,
        }
    }

    /// The protocol family detected from the first byte: `Socks5`, or `HttpForward` standing for
    /// "HTTP, request line not parsed yet" (CONNECT is only known once the request is complete).
    /// `None` before the first byte and after the front finished.
    pub fn protocol(&self) -> Option<FrontProtocol> {
        match self.state {
            State::Detect => None,
            State::Socks5Greeting | State::Socks5Auth | State::Socks5Request => {
                Some(FrontProtocol::Socks5)
            }
            State::Http => Some(FrontProtocol::HttpForward),
            State::Done => None,
        }
    }

    /// Feeds bytes read from the local client.
    pub fn feed(&mut self, data: &[u8]) -> Progress {
        if self.state == State::Done {
            return Progress::Failed {
                reply: Vec::new(),
                error: FrontError::Finished,
            };
        }
        self.buf.extend_from_slice(data);
        let mut reply = Vec::new();
        loop {
            let step = match self.state {
                State::Detect => self.detect(),
                State::Socks5Greeting => self.socks5_greeting(&mut reply),
                State::Socks5Auth => self.socks5_auth(&mut reply),
                State::Socks5Request => self.socks5_request(&mut reply),
                State::Http => self.http(&mut reply),
                State::Done => Step::Failed(FrontError::Finished),
            };
            match step {
                Step::Advance(n) => {
                    self.buf.drain(..n);
                }
                Step::NeedMore => {
                    // Only an HTTP head can outgrow the limit: SOCKS5 messages are at most
                    // 262 bytes and are parsed as soon as they are complete.
                    if self.buf.len() > MAX_HEAD_BYTES {
                        if self.state == State::Http {
                            reply.extend_from_slice(&http_error_reply(431));
                        }
                        self.finish();
                        return Progress::Failed {
                            reply,
                            error: FrontError::HttpHeadTooLarge,
                        };
                    }
                    return Progress::NeedMore { reply };
                }
                Step::Ready(request, consumed) => {
                    let request = self.attach_early_data(request, consumed);
                    self.finish();
                    return Progress::Ready { reply, request };
                }
                Step::Failed(error) => {
                    self.finish();
                    return Progress::Failed { reply, error };
                }
            }
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.buf = Vec::new();
    }

    fn attach_early_data(&mut self, request: ProxyRequest, consumed: usize) -> ProxyRequest {
        let rest = if consumed <= self.buf.len() {
            self.buf.split_off(consumed)
        } else {
            Vec::new()
        };
        match request {
            ProxyRequest::Connect { dest, protocol, .. } => ProxyRequest::Connect {
                dest,
                protocol,
                early_data: rest,
            },
            ProxyRequest::HttpForward { dest, head, .. } => ProxyRequest::HttpForward {
                dest,
                head,
                body_prefix: rest,
            },
            udp @ ProxyRequest::UdpAssociate { .. } => udp,
        }
    }

    fn detect(&mut self) -> Step {
        match self.buf.first() {
            None => Step::NeedMore,
            Some(&SOCKS_VERSION) => {
                self.state = State::Socks5Greeting;
                Step::Advance(0)
            }
            Some(b) if b.is_ascii_alphabetic() => {
                self.state = State::Http;
                Step::Advance(0)
            }
            Some(_) => Step::Failed(FrontError::UnknownProtocol),
        }
    }

    fn socks5_greeting(&mut self, reply: &mut Vec<u8>) -> Step {
        let buf = &self.buf;
        let (Some(&version), Some(&count)) = (buf.first(), buf.get(1)) else {
            return Step::NeedMore;
        };
        if version != SOCKS_VERSION {
            return Step::Failed(FrontError::Socks5BadVersion);
        }
        let end = 2 + usize::from(count);
        let Some(methods) = buf.get(2..end) else {
            return Step::NeedMore;
        };
        let (method, next) = match self.auth {
            None => (METHOD_NO_AUTH, State::Socks5Request),
            Some(_) => (METHOD_USER_PASS, State::Socks5Auth),
        };
        if methods.contains(&method) {
            reply.extend_from_slice(&[SOCKS_VERSION, method]);
            self.state = next;
            Step::Advance(end)
        } else {
            reply.extend_from_slice(&[SOCKS_VERSION, METHOD_NONE_ACCEPTABLE]);
            Step::Failed(FrontError::Socks5NoAcceptableMethod)
        }
    }

    /// `VER(1) ULEN UNAME PLEN PASSWD` (RFC 1929); answered `01 00` or `01 01` (then closed).
    fn socks5_auth(&mut self, reply: &mut Vec<u8>) -> Step {
        let buf = &self.buf;
        let (Some(&version), Some(&ulen)) = (buf.first(), buf.get(1)) else {
            return Step::NeedMore;
        };
        let user_end = 2 + usize::from(ulen);
        let Some(&plen) = buf.get(user_end) else {
            return Step::NeedMore;
        };
        let end = user_end + 1 + usize::from(plen);
        let Some(password) = buf.get(user_end + 1..end) else {
            return Step::NeedMore;
        };
        let username = &buf[2..user_end];
        let ok = version == USER_PASS_VERSION
            && self
                .auth
                .as_deref()
                .is_some_and(|a| credentials_match(a, username, password));
        if ok {
            reply.extend_from_slice(&[USER_PASS_VERSION, 0x00]);
            self.state = State::Socks5Request;
            Step::Advance(end)
        } else {
            reply.extend_from_slice(&[USER_PASS_VERSION, 0x01]);
            Step::Failed(FrontError::AuthFailed)
        }
    }

    fn socks5_request(&mut self, reply: &mut Vec<u8>) -> Step {
        let buf = &self.buf;
        let Some(header) = buf.get(..4) else {
            return Step::NeedMore;
        };
        let (version, command, atyp) = (header[0], header[1], header[3]);
        if version != SOCKS_VERSION {
            encode_socks5_reply(Socks5Reply::GeneralFailure, unspecified_v4(), reply);
            return Step::Failed(FrontError::Socks5BadVersion);
        }
        let (dest, consumed) = match parse_socks5_address(atyp, &buf[4..]) {
            AddrParse::Incomplete => return Step::NeedMore,
            AddrParse::UnsupportedType => {
                encode_socks5_reply(
                    Socks5Reply::AddressTypeNotSupported,
                    unspecified_v4(),
                    reply,
                );
                return Step::Failed(FrontError::Socks5AddressTypeNotSupported);
            }
            AddrParse::BadAddress => {
                encode_socks5_reply(Socks5Reply::GeneralFailure, unspecified_v4(), reply);
                return Step::Failed(FrontError::Socks5BadAddress);
            }
            AddrParse::Ok(dest, len) => (dest, 4 + len),
        };
        match command {
            CMD_CONNECT => Step::Ready(
                ProxyRequest::Connect {
                    dest,
                    protocol: FrontProtocol::Socks5,
                    early_data: Vec::new(),
                },
                consumed,
            ),
            CMD_UDP_ASSOCIATE => {
                Step::Ready(ProxyRequest::UdpAssociate { client_hint: dest }, consumed)
            }
            // BIND (0x02) and unknown commands.
            _ => {
                encode_socks5_reply(Socks5Reply::CommandNotSupported, unspecified_v4(), reply);
                Step::Failed(FrontError::Socks5CommandNotSupported)
            }
        }
    }

    fn http(&mut self, reply: &mut Vec<u8>) -> Step {
        let end = match self.http_head.scan(&self.buf, MAX_HEAD_BYTES) {
            Scan::Complete(end) => end,
            Scan::Incomplete => return Step::NeedMore,
            Scan::TooLarge => {
                reply.extend_from_slice(&http_error_reply(431));
                return Step::Failed(FrontError::HttpHeadTooLarge);
            }
        };
        let (head_len, total_len) = (end.head_len, end.total_len);
        let head = &self.buf[..head_len];
        match parse_http_head(head, self.auth.as_deref()) {
            Ok(request) => Step::Ready(request, total_len),
            Err(error) => {
                let status = match error {
                    FrontError::HttpHeadTooLarge => 431,
                    FrontError::AuthFailed => 407,
                    _ => 400,
                };
                reply.extend_from_slice(&http_error_reply(status));
                Step::Failed(error)
            }
        }
    }
}

impl ProxyRequest {
    /// The protocol this request came in on.
    pub fn protocol(&self) -> FrontProtocol {
        match self {
            Self::Connect { protocol, .. } => *protocol,
            Self::UdpAssociate { .. } => FrontProtocol::Socks5,
            Self::HttpForward { .. } => FrontProtocol::HttpForward,
        }
    }

    /// The destination to connect to (`None` for UDP ASSOCIATE).
    pub fn dest(&self) -> Option<&Destination> {
        match self {
            Self::Connect { dest, .. } | Self::HttpForward { dest, .. } => Some(dest),
            Self::UdpAssociate { .. } => None,
        }
    }

    /// Bytes to send to the client once the outbound side is ready. `bound` is the SOCKS5
    /// BND.ADDR/BND.PORT (for UDP ASSOCIATE: the UDP relay address the client must send to).
    /// HTTP CONNECT gets `200 Connection established`; HTTP forwarding needs no reply (empty).
    pub fn success_reply(&self, bound: SocketAddr) -> Vec<u8> {
        match self.protocol() {
            FrontProtocol::Socks5 => socks5_reply(Socks5Reply::Succeeded, bound),
            FrontProtocol::HttpConnect => HTTP_CONNECT_ESTABLISHED.to_vec(),
            FrontProtocol::HttpForward | FrontProtocol::Transparent => Vec::new(),
        }
    }

    /// Bytes to send to the client when the outbound side failed; close afterwards.
    /// SOCKS5 clients get the reply code with `0.0.0.0:0`; HTTP clients get
    /// [`Socks5Reply::http_status`] with a short body.
    pub fn failure_reply(&self, code: Socks5Reply) -> Vec<u8> {
        match self.protocol() {
            FrontProtocol::Socks5 => socks5_reply(code, unspecified_v4()),
            FrontProtocol::Transparent => Vec::new(),
            FrontProtocol::HttpConnect | FrontProtocol::HttpForward => {
                let status = match code.http_status() {
                    200 => 502,
                    other => other,
                };
                http_error_reply(status)
            }
        }
    }
}

/// The HTTP CONNECT success reply.
pub const HTTP_CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// A SOCKS5 reply (`VER REP RSV ATYP BND.ADDR BND.PORT`) as a new vector.
pub fn socks5_reply(code: Socks5Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    encode_socks5_reply(code, bound, &mut out);
    out
}

/// Appends a SOCKS5 reply to `out`.
pub fn encode_socks5_reply(code: Socks5Reply, bound: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[SOCKS_VERSION, code as u8, 0x00]);
    match bound {
        SocketAddr::V4(a) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
}

/// A complete HTTP error response with a short plain-text body and `Connection: close`.
/// Known statuses: 400, 403, 405, 407 (with `Proxy-Authenticate: Basic`), 431, 502, 504; anything
/// else is sent as-is with reason "Error".
pub fn http_error_reply(status: u16) -> Vec<u8> {
    let (reason, body) = match status {
        400 => ("Bad Request", "bad proxy request\n"),
        403 => ("Forbidden", "destination not allowed\n"),
        405 => ("Method Not Allowed", "method not allowed\n"),
        407 => (
            "Proxy Authentication Required",
            "proxy credentials required\n",
        ),
        431 => (
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
        502 => ("Bad Gateway", "could not connect to destination\n"),
        504 => ("Gateway Timeout", "destination timed out\n"),
        _ => ("Error", "proxy error\n"),
    };
    let challenge = if status == 407 {
        "Proxy-Authenticate: Basic realm=\"ostp\"\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\n{challenge}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn unspecified_v4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

enum AddrParse {
    Incomplete,
    UnsupportedType,
    BadAddress,
    /// Address and the number of bytes it used (ADDR + PORT).
    Ok(Destination, usize),
}

/// Parses `ADDR PORT` for the given ATYP from the start of `bytes`.
fn parse_socks5_address(atyp: u8, bytes: &[u8]) -> AddrParse {
    let port_at = |at: usize| -> Option<u16> {
        let p = bytes.get(at..at + 2)?;
        Some(u16::from_be_bytes([p[0], p[1]]))
    };
    match atyp {
        ATYP_IPV4 => {
            let (Some(ip), Some(port)) = (bytes.get(..4), port_at(4)) else {
                return AddrParse::Incomplete;
            };
            let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
            AddrParse::Ok(Destination::Addr(SocketAddr::new(IpAddr::V4(ip), port)), 6)
        }
        ATYP_IPV6 => {
            let (Some(ip), Some(port)) = (bytes.get(..16), port_at(16)) else {
                return AddrParse::Incomplete;
            };
            let mut octets = [0u8; 16];
            octets.copy_from_slice(ip);
            let ip = Ipv6Addr::from(octets);
            AddrParse::Ok(Destination::Addr(SocketAddr::new(IpAddr::V6(ip), port)), 18)
        }
        ATYP_DOMAIN => {
            let Some(&len) = bytes.first() else {
                return AddrParse::Incomplete;
            };
            let len = usize::from(len);
            let (Some(name), Some(port)) = (bytes.get(1..1 + len), port_at(1 + len)) else {
                return AddrParse::Incomplete;
            };
            match target::from_domain_bytes(name, port) {
                Ok(dest) => AddrParse::Ok(dest, 1 + len + 2),
                Err(_) => AddrParse::BadAddress,
            }
        }
        _ => AddrParse::UnsupportedType,
    }
}

/// Why a SOCKS5 UDP datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpHeaderError {
    /// Shorter than its header.
    Truncated,
    /// FRAG != 0: fragmentation is not supported; drop the datagram.
    Fragmented,
    /// Unknown ATYP.
    UnsupportedAddressType,
    /// Invalid domain name.
    BadAddress,
    /// The output buffer is too small, or the domain does not fit in one length byte.
    NoRoom,
}

impl fmt::Display for UdpHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::Truncated => "SOCKS5 UDP: truncated header",
            Self::Fragmented => "SOCKS5 UDP: fragmented datagram",
            Self::UnsupportedAddressType => "SOCKS5 UDP: unsupported address type",
            Self::BadAddress => "SOCKS5 UDP: invalid address",
            Self::NoRoom => "SOCKS5 UDP: header does not fit",
        };
        f.write_str(text)
    }
}

impl std::error::Error for UdpHeaderError {}

/// Parses a SOCKS5 UDP request datagram (`RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`) and returns
/// the destination and the payload. RSV is ignored; FRAG != 0 is refused.
pub fn parse_socks5_udp(datagram: &[u8]) -> Result<(Destination, &[u8]), UdpHeaderError> {
    let Some(header) = datagram.get(..4) else {
        return Err(UdpHeaderError::Truncated);
    };
    if header[2] != 0 {
        return Err(UdpHeaderError::Fragmented);
    }
    match parse_socks5_address(header[3], &datagram[4..]) {
        AddrParse::Ok(dest, len) => {
            let payload = datagram.get(4 + len..).unwrap_or_default();
            Ok((dest, payload))
        }
        AddrParse::Incomplete => Err(UdpHeaderError::Truncated),
        AddrParse::UnsupportedType => Err(UdpHeaderError::UnsupportedAddressType),
        AddrParse::BadAddress => Err(UdpHeaderError::BadAddress),
    }
}

/// Length of the SOCKS5 UDP header for `dest` (10 for IPv4, 22 for IPv6, 7 + name for domains).
pub fn socks5_udp_header_len(dest: &Destination) -> usize {
    match dest {
        Destination::Addr(SocketAddr::V4(_)) => 10,
        Destination::Addr(SocketAddr::V6(_)) => 22,
        Destination::Domain { name, .. } => 7 + name.len(),
    }
}

/// Writes a SOCKS5 UDP header for `dest` (FRAG 0) at the start of `out`, returns its length.
/// No allocation: callers write the payload right after it.
pub fn write_socks5_udp_header(
    dest: &Destination,
    out: &mut [u8],
) -> Result<usize, UdpHeaderError> {
    let len = socks5_udp_header_len(dest);
    let Some(out) = out.get_mut(..len) else {
        return Err(UdpHeaderError::NoRoom);
    };
    out[..3].copy_from_slice(&[0, 0, 0]);
    match dest {
        Destination::Addr(SocketAddr::V4(a)) => {
            out[3] = ATYP_IPV4;
            out[4..8].copy_from_slice(&a.ip().octets());
        }
        Destination::Addr(SocketAddr::V6(a)) => {
            out[3] = ATYP_IPV6;
            out[4..20].copy_from_slice(&a.ip().octets());
        }
        Destination::Domain { name, .. } => {
            let name_len = u8::try_from(name.len()).map_err(|_| UdpHeaderError::NoRoom)?;
            out[3] = ATYP_DOMAIN;
            out[4] = name_len;
            out[5..5 + name.len()].copy_from_slice(name.as_bytes());
        }
    }
    out[len - 2..].copy_from_slice(&dest.port().to_be_bytes());
    Ok(len)
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Headers always removed when forwarding (besides those named by `Connection`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "host",
];

/// Both fields compared in constant time (both always compared, so timing does not tell which
/// one was wrong).
fn credentials_match(auth: &ProxyAuth, username: &[u8], password: &[u8]) -> bool {
    let user_ok = ct_eq(auth.username.as_bytes(), username);
    let pass_ok = ct_eq(auth.password.as_bytes(), password);
    user_ok & pass_ok
}

/// Whether a `Proxy-Authorization` value is `Basic base64(username:password)` for `auth`.
fn basic_auth_matches(value: &str, auth: &ProxyAuth) -> bool {
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Some(decoded) = base64_decode(token.trim()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    credentials_match(auth, &decoded[..colon], &decoded[colon + 1..])
}

/// Standard base64 (RFC 4648 §4, padding optional); `None` on any other byte or a bad length.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text
        .strip_suffix("==")
        .or(text.strip_suffix('='))
        .unwrap_or(text);
    if text.len() % 4 == 1 || text.len() > 1024 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn parse_http_head(head: &[u8], auth: Option<&ProxyAuth>) -> Result<ProxyRequest, FrontError> {
    let text = std::str::from_utf8(head).map_err(|_| FrontError::HttpMalformed)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(FrontError::HttpMalformed)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(FrontError::HttpMalformed);
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(FrontError::HttpMalformed);
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(FrontError::HttpMalformed);
    }
    let headers = parse_headers(lines)?;
    if let Some(auth) = auth {
        let authorized = headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("proxy-authorization") && basic_auth_matches(value, auth)
        });
        if !authorized {
            return Err(FrontError::AuthFailed);
        }
    }

    if method == "CONNECT" {
        let dest = target::parse_authority(target, Some(443)).map_err(http_target_error)?;
        return Ok(ProxyRequest::Connect {
            dest,
            protocol: FrontProtocol::HttpConnect,
            early_data: Vec::new(),
        });
    }

    let (authority, path) = split_http_uri(target)?;
    let dest = target::parse_authority(authority, Some(80)).map_err(http_target_error)?;

    // Header names listed in Connection / Proxy-Connection are hop-by-hop too.
    let mut named: Vec<String> = Vec::new();
    for (name, value) in &headers {
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("proxy-connection")
        {
            named.extend(
                value
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.push(b' ');
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(b"\r\nHost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || named.contains(&lower) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(ProxyRequest::HttpForward {
        dest,
        head: out,
        body_prefix: Vec::new(),
    })
}

fn http_target_error(_: TargetParseError) -> FrontError {
    FrontError::HttpMalformed
}

/// Parses header lines up to the blank line into (name, trimmed value) pairs.
fn parse_headers<'a>(
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(&'a str, &'a str)>, FrontError> {
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            // Obsolete line folding: refused (RFC 9112 §5.2 allows rejecting it).
            return Err(FrontError::HttpMalformed);
        }
        let (name, value) = line.split_once(':').ok_or(FrontError::HttpMalformed)?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(FrontError::HttpMalformed);
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b == b'\r' || b == 0) {
            return Err(FrontError::HttpMalformed);
        }
        if headers.len() == MAX_HEADERS {
            return Err(FrontError::HttpHeadTooLarge);
        }
        headers.push((name, value));
    }
    Ok(headers)
}

/// Splits `http://[userinfo@]authority[/path][?query][#fragment]` into the authority (userinfo
/// dropped) and the origin-form target (`/` when the path is empty; fragment dropped).
fn split_http_uri(target: &str) -> Result<(&str, String), FrontError> {
    let Some((scheme, rest)) = target.split_once("://") else {
        // Origin-form ("/index.html") or asterisk-form: we are a proxy, not an origin server.
        return Err(FrontError::HttpUnsupportedTarget);
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(FrontError::HttpUnsupportedTarget);
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.is_empty() {
        return Err(FrontError::HttpMalformed);
    }
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    let origin_form = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if origin_form.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(FrontError::HttpMalformed);
    }
    Ok((authority, origin_form))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Destination {
        Destination::Addr(text.parse().unwrap())
    }

    fn domain_dest(name: &str, port: u16) -> Destination {
        Destination::domain(name, port).unwrap()
    }

    fn ready(progress: Progress) -> (Vec<u8>, ProxyRequest) {
        match progress {
            Progress::Ready { reply, request } => (reply, request),
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn failed(progress: Progress) -> (Vec<u8>, FrontError) {
        match progress {
            Progress::Failed { reply, error } => (reply, error),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn connect_request(atyp_and_addr: &[u8]) -> Vec<u8> {
        let mut v = vec![5, 1, 0];
        v.extend_from_slice(atyp_and_addr);
        v
    }

    // --- SOCKS5 ---------------------------------------------------------------------------

    #[test]
    fn socks5_connect_ipv4_in_one_feed_with_early_data() {
        let mut front = ProxyFront::new();
        let mut input = vec![5, 2, 0x02, 0x00];
        input.extend(connect_request(&[1, 93, 184, 216, 34, 0, 80]));
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (reply, request) = ready(front.feed(&input));
        assert_eq!(reply, vec![5, 0]);
        assert_eq!(
            request,
            ProxyRequest::Connect {
                dest: ip("93.184.216.34:80"),
                protocol: FrontProtocol::Socks5,
                early_data: b"GET / HTTP/1.1\r\n".to_vec(),
            }
        );
        assert_eq!(
            request.success_reply("10.0.0.1:5000".parse().unwrap()),
            vec![5, 0, 0, 1, 10, 0, 0, 1, 0x13, 0x88]
        );
        assert_eq!(
            request.failure_reply(Socks5Reply::ConnectionRefused),
            vec![5, 5, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(failed(front.feed(b"x")).1, FrontError::Finished);
    }

    #[test]
    fn socks5_byte_by_byte_ipv6_and_domain() {
        let mut v6 = vec![5, 1, 0];
        v6.extend(connect_request(
            &[
                &[4u8][..],
                &"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets(),
                &[1, 187],
            ]
            .concat(),
        ));
        let mut domain = vec![5, 1, 0];
        domain.extend(connect_request(
            &[&[3u8, 11][..], b"example.com", &[0, 80]].concat(),
        ));
        for (input, want) in [
            (v6, ip("[2001:db8::7]:443")),
            (domain, domain_dest("example.com", 80)),
        ] {
            let mut front = ProxyFront::new();
            let mut replies = Vec::new();
            let mut result = None;
            for (i, byte) in input.iter().enumerate() {
                match front.feed(&[*byte]) {
                    Progress::NeedMore { reply } => replies.extend(reply),
                    Progress::Ready { reply, request } => {
                        assert_eq!(i, input.len() - 1, "ready only after the last byte");
                        replies.extend(reply);
                        result = Some(request);
                    }
                    Progress::Failed { error, .. } => panic!("failed: {error}"),
                }
            }
            assert_eq!(replies, vec![5, 0]);
            let request = result.expect("request");
            assert_eq!(request.dest(), Some(&want));
            let ProxyRequest::Connect { early_data, .. } = request else {
                panic!("not connect")
            };
            assert!(early_data.is_empty());
        }
    }

    #[test]
    fn socks5_udp_associate() {
        let mut front = ProxyFront::new();
        let mut input = vec![5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
        input.extend_from_slice(b"ignored");
        let (reply, request) = ready(front.feed(&input));
        assert_eq!(reply, vec![5, 0]);
        assert_eq!(
            request,
            ProxyRequest::UdpAssociate {
                client_hint: ip("0.0.0.0:0")
            }
        );
        assert_eq!(
            request.success_reply("[::1]:9".parse().unwrap()),
            [&[5u8, 0, 0, 4][..], &Ipv6Addr::LOCALHOST.octets(), &[0, 9]].concat()
        );
    }

    #[test]
    fn socks5_no_acceptable_method() {
        let (reply, error) = failed(ProxyFront::new().feed(&[5, 1, 0x02]));
        assert_eq!(reply, vec![5, 0xFF]);
        assert_eq!(error, FrontError::Socks5NoAcceptableMethod);
        let (reply, error) = failed(ProxyFront::new().feed(&[5, 0]));
        assert_eq!(reply, vec![5, 0xFF]);
        assert_eq!(error, FrontError::Socks5NoAcceptableMethod);
    }

    fn authed() -> ProxyFront {
        ProxyFront::with_auth(Some(Arc::new(ProxyAuth {
            username: "user".into(),
            password: "pa:ss".into(),
        })))
    }

    fn user_pass(user: &[u8], pass: &[u8]) -> Vec<u8> {
        let mut v = vec![1, user.len() as u8];
        v.extend_from_slice(user);
        v.push(pass.len() as u8);
        v.extend_from_slice(pass);
        v
    }

    #[test]
    fn socks5_username_password_auth() {
        // Right credentials, byte by byte, then the request.
        let mut input = vec![5, 2, 0, 2];
        input.extend(user_pass(b"user", b"pa:ss"));
        input.extend(connect_request(&[1, 10, 0, 0, 1, 0, 80]));
        let mut front = authed();
        let mut replies = Vec::new();
        let mut request = None;
        for (i, b) in input.iter().enumerate() {
            match front.feed(&[*b]) {
                Progress::NeedMore { reply } => replies.extend(reply),
                Progress::Ready { reply, request: r } => {
                    assert_eq!(i, input.len() - 1);
                    replies.extend(reply);
                    request = Some(r);
                }
                Progress::Failed { error, .. } => panic!("failed: {error}"),
            }
        }
        assert_eq!(replies, vec![5, 2, 1, 0]);
        assert_eq!(request.unwrap().dest(), Some(&ip("10.0.0.1:80")));
        // Wrong password, wrong user, wrong sub-negotiation version: 01 01 and no request.
        for bad in [
            user_pass(b"user", b"pa:sS"),
            user_pass(b"usex", b"pa:ss"),
            user_pass(b"user", b""),
            [&[2u8][..], &user_pass(b"user", b"pa:ss")[1..]].concat(),
        ] {
            let mut input = vec![5, 1, 2];
            input.extend(bad);
            input.extend(connect_request(&[1, 10, 0, 0, 1, 0, 80]));
            let (reply, error) = failed(authed().feed(&input));
            assert_eq!(reply, vec![5, 2, 1, 1]);
            assert_eq!(error, FrontError::AuthFailed);
        }
        // A client offering only "no authentication" is refused outright.
        let (reply, error) = failed(authed().feed(&[5, 1, 0]));
        assert_eq!(reply, vec![5, 0xFF]);
        assert_eq!(error, FrontError::Socks5NoAcceptableMethod);
        // Without configured credentials, username/password alone is not acceptable either.
        let (_, error) = failed(ProxyFront::new().feed(&[5, 1, 2]));
        assert_eq!(error, FrontError::Socks5NoAcceptableMethod);
    }

    #[test]
    fn http_proxy_basic_auth() {
        // "user:pa:ss" in base64 (the password may contain ':').
        let token = "dXNlcjpwYTpzcw==";
        assert_eq!(base64_decode(token).unwrap(), b"user:pa:ss");
        assert_eq!(base64_decode("dXNlcjpwYTpzcw").unwrap(), b"user:pa:ss");
        assert_eq!(base64_decode("dXNl*"), None);
        for head in [
            format!("CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n"),
            format!("GET http://h/ HTTP/1.1\r\nproxy-authorization: basic  {token}\r\n\r\n"),
        ] {
            let (_, request) = ready(authed().feed(head.as_bytes()));
            if let ProxyRequest::HttpForward { head, .. } = &request {
                let text = String::from_utf8_lossy(head).to_ascii_lowercase();
                assert!(
                    !text.contains("proxy-authorization"),
                    "credentials forwarded"
                );
            }
        }
        let wrong = "dXNlcjpwYTpzUw=="; // user:pa:sS
        for head in [
            "CONNECT h:443 HTTP/1.1\r\n\r\n".to_string(),
            format!("CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: Basic {wrong}\r\n\r\n"),
            format!("CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\n"),
            format!("CONNECT h:443 HTTP/1.1\r\nAuthorization: Basic {token}\r\n\r\n"),
        ] {
            let (reply, error) = failed(authed().feed(head.as_bytes()));
            assert_eq!(error, FrontError::AuthFailed, "{head}");
            let reply = String::from_utf8(reply).unwrap();
            assert!(reply.starts_with("HTTP/1.1 407 "), "{reply}");
            assert!(reply.contains("Proxy-Authenticate: Basic realm=\"ostp\"\r\n"));
        }
    }

    #[test]
    fn socks5_bind_and_unknown_command_not_supported() {
        for command in [0x02, 0x09] {
            let mut input = vec![5, 1, 0];
            input.extend_from_slice(&[5, command, 0, 1, 1, 2, 3, 4, 0, 80]);
            let (reply, error) = failed(ProxyFront::new().feed(&input));
            assert_eq!(reply, vec![5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(error, FrontError::Socks5CommandNotSupported);
        }
    }

    #[test]
    fn socks5_bad_version_and_address_type() {
        // Bad version in the request (greeting accepted first).
        let (reply, error) =
            failed(ProxyFront::new().feed(&[5, 1, 0, 4, 1, 0, 1, 1, 2, 3, 4, 0, 80]));
        assert_eq!(reply, vec![5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(error, FrontError::Socks5BadVersion);
        // Unknown ATYP: rejected as soon as the 4-byte header is in.
        let (reply, error) = failed(ProxyFront::new().feed(&[5, 1, 0, 5, 1, 0, 9]));
        assert_eq!(reply, vec![5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(error, FrontError::Socks5AddressTypeNotSupported);
        // Empty and invalid domain names.
        for name in [&b""[..], b"bad name", b"\xff\xfe"] {
            let mut input = vec![5, 1, 0, 5, 1, 0, 3, name.len() as u8];
            input.extend_from_slice(name);
            input.extend_from_slice(&[0, 80]);
            let (reply, error) = failed(ProxyFront::new().feed(&input));
            assert_eq!(reply, vec![5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(error, FrontError::Socks5BadAddress);
        }
    }

    #[test]
    fn unknown_first_byte_fails_without_reply() {
        for first in [4u8, 0x16, 0, b'1', 0xff] {
            let (reply, error) = failed(ProxyFront::new().feed(&[first, 1, 0]));
            assert!(reply.is_empty());
            assert_eq!(error, FrontError::UnknownProtocol);
        }
        assert_eq!(
            ProxyFront::new().feed(&[]),
            Progress::NeedMore { reply: vec![] }
        );
    }

    #[test]
    fn socks5_reply_builders_cover_every_code() {
        let codes = [
            (Socks5Reply::Succeeded, 0, 200),
            (Socks5Reply::GeneralFailure, 1, 502),
            (Socks5Reply::NotAllowed, 2, 403),
            (Socks5Reply::NetworkUnreachable, 3, 502),
            (Socks5Reply::HostUnreachable, 4, 502),
            (Socks5Reply::ConnectionRefused, 5, 502),
            (Socks5Reply::TtlExpired, 6, 504),
            (Socks5Reply::CommandNotSupported, 7, 400),
            (Socks5Reply::AddressTypeNotSupported, 8, 400),
        ];
        for (code, byte, status) in codes {
            let reply = socks5_reply(code, "1.2.3.4:258".parse().unwrap());
            assert_eq!(reply, vec![5, byte, 0, 1, 1, 2, 3, 4, 1, 2]);
            assert_eq!(code.http_status(), status);
        }
    }

    #[test]
    fn socks5_udp_header_round_trip_and_errors() {
        let mut buf = [0u8; 300];
        for dest in [
            ip("1.2.3.4:53"),
            ip("[2001:db8::1]:443"),
            domain_dest("dns.example", 853),
        ] {
            let n = write_socks5_udp_header(&dest, &mut buf).unwrap();
            assert_eq!(n, socks5_udp_header_len(&dest));
            buf[n..n + 3].copy_from_slice(b"abc");
            let (parsed, payload) = parse_socks5_udp(&buf[..n + 3]).unwrap();
            assert_eq!(parsed, dest);
            assert_eq!(payload, b"abc");
            assert_eq!(
                write_socks5_udp_header(&dest, &mut buf[..n - 1]),
                Err(UdpHeaderError::NoRoom)
            );
        }
        let (_, payload) = parse_socks5_udp(&[0, 0, 0, 1, 1, 1, 1, 1, 0, 53]).unwrap();
        assert!(payload.is_empty());
        assert_eq!(
            parse_socks5_udp(&[0, 0, 1, 1, 1, 1, 1, 1, 0, 53, 9]),
            Err(UdpHeaderError::Fragmented)
        );
        assert_eq!(
            parse_socks5_udp(&[0, 0, 0, 1, 1]),
            Err(UdpHeaderError::Truncated)
        );
        assert_eq!(parse_socks5_udp(&[0, 0, 0]), Err(UdpHeaderError::Truncated));
        assert_eq!(
            parse_socks5_udp(&[0, 0, 0, 7, 1, 1]),
            Err(UdpHeaderError::UnsupportedAddressType)
        );
        assert_eq!(
            parse_socks5_udp(&[0, 0, 0, 3, 1, b' ', 0, 1]),
            Err(UdpHeaderError::BadAddress)
        );
        let too_long = Destination::Domain {
            name: "a".repeat(256),
            port: 1,
        };
        assert_eq!(
            write_socks5_udp_header(&too_long, &mut [0u8; 400]),
            Err(UdpHeaderError::NoRoom)
        );
    }

    /// One length limit for a domain everywhere: SOCKS5 CONNECT, SOCKS5 UDP, HTTP CONNECT, HTTP
    /// forward and `Destination::domain` all take 253 bytes and all refuse 254.
    #[test]
    fn domain_length_limit_is_the_same_in_every_parser() {
        for (len, accepted) in [(Destination::MAX_DOMAIN_LEN, true), (254, false)] {
            let name = "a".repeat(len);
            let want = Destination::domain(&name, 80);
            assert_eq!(want.is_some(), accepted, "Destination::domain, {len} bytes");

            let mut socks = vec![5, 1, 0];
            socks.extend(connect_request(
                &[&[3u8, len as u8][..], name.as_bytes(), &[0, 80]].concat(),
            ));
            match ProxyFront::new().feed(&socks) {
                Progress::Ready { request, .. } => assert_eq!(request.dest(), want.as_ref()),
                Progress::Failed { error, .. } => {
                    assert!(!accepted, "SOCKS5 refused {len} bytes");
                    assert_eq!(error, FrontError::Socks5BadAddress);
                }
                other => panic!("SOCKS5, {len} bytes: {other:?}"),
            }

            let udp = [&[0u8, 0, 0, 3, len as u8][..], name.as_bytes(), &[0, 80]].concat();
            match parse_socks5_udp(&udp) {
                Ok((dest, _)) => assert_eq!(Some(dest), want),
                Err(e) => {
                    assert!(!accepted, "SOCKS5 UDP refused {len} bytes");
                    assert_eq!(e, UdpHeaderError::BadAddress);
                }
            }

            for head in [
                format!("CONNECT {name}:80 HTTP/1.1\r\n\r\n"),
                format!("GET http://{name}/ HTTP/1.1\r\n\r\n"),
            ] {
                match ProxyFront::new().feed(head.as_bytes()) {
                    Progress::Ready { request, .. } => {
                        assert_eq!(request.dest(), want.as_ref(), "{head}")
                    }
                    Progress::Failed { error, .. } => {
                        assert!(!accepted, "HTTP refused {len} bytes");
                        assert_eq!(error, FrontError::HttpMalformed);
                    }
                    other => panic!("HTTP, {len} bytes: {other:?}"),
                }
            }
        }
    }

    // --- HTTP -----------------------------------------------------------------------------

    #[test]
    fn http_connect_with_early_data_and_replies() {
        let mut front = ProxyFront::new();
        assert!(matches!(
            front.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: exa"),
            Progress::NeedMore { .. }
        ));
        let (reply, request) = ready(front.feed(b"mple.com:443\r\n\r\n\x16\x03\x01"));
        assert!(reply.is_empty());
        assert_eq!(
            request,
            ProxyRequest::Connect {
                dest: domain_dest("example.com", 443),
                protocol: FrontProtocol::HttpConnect,
                early_data: vec![0x16, 3, 1],
            }
        );
        assert_eq!(
            request.success_reply("0.0.0.0:0".parse().unwrap()),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        for (code, status) in [
            (Socks5Reply::ConnectionRefused, "502"),
            (Socks5Reply::NotAllowed, "403"),
            (Socks5Reply::TtlExpired, "504"),
            (Socks5Reply::Succeeded, "502"),
        ] {
            let reply = String::from_utf8(request.failure_reply(code)).unwrap();
            assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
            let (head, body) = reply.split_once("\r\n\r\n").unwrap();
            assert!(head.contains(&format!("Content-Length: {}", body.len())));
            assert!(head.contains("Connection: close"));
        }
    }

    #[test]
    fn http_connect_ipv6_literal_and_default_port() {
        let (_, request) =
            ready(ProxyFront::new().feed(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n"));
        assert_eq!(request.dest(), Some(&ip("[2001:db8::1]:8443")));
        let (_, request) = ready(ProxyFront::new().feed(b"CONNECT example.org HTTP/1.0\n\n"));
        assert_eq!(request.dest(), Some(&domain_dest("example.org", 443)));
    }

    #[test]
    fn http_forward_rewrites_head() {
        let input = b"POST http://user:pw@Example.com:8080/a/b?x=1#frag HTTP/1.1\r\n\
Host: wrong.example\r\n\
Proxy-Connection: keep-alive\r\n\
Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
Connection: keep-alive, X-Secret\r\n\
X-Secret: 1\r\n\
Keep-Alive: timeout=5\r\n\
Content-Length: 5\r\n\
User-Agent: t\r\n\
\r\n\
hello";
        let (reply, request) = ready(ProxyFront::new().feed(input));
        assert!(reply.is_empty());
        let ProxyRequest::HttpForward {
            dest,
            head,
            body_prefix,
        } = request
        else {
            panic!("not forward")
        };
        assert_eq!(dest, domain_dest("Example.com", 8080));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /a/b?x=1 HTTP/1.1\r\nHost: Example.com:8080\r\nContent-Length: 5\r\nUser-Agent: t\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(body_prefix, b"hello");
    }

    #[test]
    fn http_forward_defaults_and_ipv6() {
        let (_, request) = ready(ProxyFront::new().feed(b"GET http://[::1] HTTP/1.0\r\n\r\n"));
        let ProxyRequest::HttpForward { dest, head, .. } = request else {
            panic!()
        };
        assert_eq!(dest, ip("[::1]:80"));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET / HTTP/1.0\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
        );
        let (_, request) =
            ready(ProxyFront::new().feed(b"GET HTTP://h.example?q HTTP/1.1\r\n\r\n"));
        let ProxyRequest::HttpForward { dest, head, .. } = request else {
            panic!()
        };
        assert_eq!(dest, domain_dest("h.example", 80));
        assert!(head.starts_with(b"GET /?q HTTP/1.1\r\nHost: h.example\r\n"));
    }

    #[test]
    fn http_bad_requests_get_400() {
        let cases: &[(&[u8], FrontError)] = &[
            (
                b"GET https://example.com/ HTTP/1.1\r\n\r\n",
                FrontError::HttpUnsupportedTarget,
            ),
            (
                b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
                FrontError::HttpUnsupportedTarget,
            ),
            (
                b"GET /index.html HTTP/1.1\r\n\r\n",
                FrontError::HttpUnsupportedTarget,
            ),
            (b"GET http:///x HTTP/1.1\r\n\r\n", FrontError::HttpMalformed),
            (
                b"GET http://a b/ HTTP/1.1\r\n\r\n",
                FrontError::HttpMalformed,
            ),
            (b"GET http://a/ HTTP/2.0\r\n\r\n", FrontError::HttpMalformed),
            (b"GET http://a/\r\n\r\n", FrontError::HttpMalformed),
            (b"G(T http://a/ HTTP/1.1\r\n\r\n", FrontError::HttpMalformed),
            (
                b"GET http://a/ HTTP/1.1\r\nNoColon\r\n\r\n",
                FrontError::HttpMalformed,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
                FrontError::HttpMalformed,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nBad Name: b\r\n\r\n",
                FrontError::HttpMalformed,
            ),
            (
                b"GET http://a:99999/ HTTP/1.1\r\n\r\n",
                FrontError::HttpMalformed,
            ),
            (b"CONNECT a:b HTTP/1.1\r\n\r\n", FrontError::HttpMalformed),
            (
                b"CONNECT [::1:80 HTTP/1.1\r\n\r\n",
                FrontError::HttpMalformed,
            ),
            (
                b"GET http://\xff/ HTTP/1.1\r\n\r\n",
                FrontError::HttpMalformed,
            ),
        ];
        for (input, want) in cases {
            let (reply, error) = failed(ProxyFront::new().feed(input));
            assert_eq!(error, *want, "{}", String::from_utf8_lossy(input));
            assert!(
                reply.starts_with(b"HTTP/1.1 400 "),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn http_head_limit_gives_431() {
        // Never-ending head, fed in chunks.
        let mut front = ProxyFront::new();
        front.feed(b"GET http://a/ HTTP/1.1\r\n");
        let chunk = format!("X-Pad: {}\r\n", "p".repeat(1000));
        let mut outcome = None;
        for _ in 0..20 {
            match front.feed(chunk.as_bytes()) {
                Progress::NeedMore { .. } => {}
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        let (reply, error) = failed(outcome.expect("must fail before 20 KiB"));
        assert_eq!(error, FrontError::HttpHeadTooLarge);
        assert!(reply.starts_with(b"HTTP/1.1 431 "));
        // Complete but oversized head in one feed.
        let mut big = b"GET http://a/ HTTP/1.1\r\n".to_vec();
        big.extend(format!("X: {}\r\n\r\n", "q".repeat(MAX_HEAD_BYTES)).as_bytes());
        let (reply, error) = failed(ProxyFront::new().feed(&big));
        assert_eq!(error, FrontError::HttpHeadTooLarge);
        assert!(reply.starts_with(b"HTTP/1.1 431 "));
        // Too many header fields.
        let mut many = b"GET http://a/ HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        let (reply, error) = failed(ProxyFront::new().feed(&many));
        assert_eq!(error, FrontError::HttpHeadTooLarge);
        assert!(reply.starts_with(b"HTTP/1.1 431 "));
    }

    #[test]
    fn head_just_under_limit_is_accepted() {
        let mut head = b"GET http://a/ HTTP/1.1\r\n".to_vec();
        let pad = MAX_HEAD_BYTES - head.len() - "X: \r\n\r\n".len();
        head.extend(format!("X: {}\r\n\r\n", "q".repeat(pad)).as_bytes());
        assert_eq!(head.len(), MAX_HEAD_BYTES);
        let (_, request) = ready(ProxyFront::new().feed(&head));
        assert_eq!(request.protocol(), FrontProtocol::HttpForward);
    }

    /// xorshift64* — deterministic input generator for the fuzz-ish tests.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_inputs_never_panic_and_stay_bounded() {
        let seeds: &[&[u8]] = &[
            &[5, 1, 0, 5, 1, 0, 3, 11],
            &[5, 2, 0, 1, 5, 3, 0, 4],
            b"CONNECT a.b:1 HTTP/1.1\r\n\r\n",
            b"GET http://x.y:8/p HTTP/1.1\r\nConnection: a, b\r\nA: b\r\n\r\n",
        ];
        let mut rng = Gen(0x9E37_79B9_7F4A_7C15);
        let cases = if cfg!(debug_assertions) {
            3_000
        } else {
            30_000
        };
        for _ in 0..cases {
            let base = seeds[rng.below(seeds.len() as u64) as usize];
            let mut input = base.to_vec();
            // Mutate: flip, insert, truncate, or append random bytes.
            for _ in 0..rng.below(6) {
                match rng.below(4) {
                    0 if !input.is_empty() => {
                        let i = rng.below(input.len() as u64) as usize;
                        input[i] = rng.next() as u8;
                    }
                    1 => {
                        let i = rng.below(input.len() as u64 + 1) as usize;
                        input.insert(i, rng.next() as u8);
                    }
                    2 => input.truncate(rng.below(input.len() as u64 + 1) as usize),
                    _ => input.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
                }
            }
            let mut front = ProxyFront::new();
            let mut pos = 0;
            while pos < input.len() {
                let n = 1 + rng.below(16) as usize;
                let end = (pos + n).min(input.len());
                let progress = front.feed(&input[pos..end]);
                assert!(front.buf.len() <= MAX_HEAD_BYTES + 16);
                pos = end;
                if !matches!(progress, Progress::NeedMore { .. }) {
                    break;
                }
            }
        }
        // Pure random garbage too, in one big feed.
        for _ in 0..200 {
            let input: Vec<u8> = (0..rng.below(40_000)).map(|_| rng.next() as u8).collect();
            let _ = ProxyFront::new().feed(&input);
            let _ = parse_socks5_udp(&input);
        }
    }
}
