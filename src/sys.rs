//! The few socket options the standard library cannot set: `IPV6_V6ONLY` before `bind` (so
//! `0.0.0.0:P` and `[::]:P` can both be listened on), larger UDP socket buffers, an abortive
//! close (`SO_LINGER` 0: the peer sees a reset, not an orderly end of data), UDP segmentation
//! offload on Linux (`UDP_SEGMENT` sends, `UDP_GRO` receives, with their control messages), the
//! process's open-file limit (`RLIMIT_NOFILE`), raised to its hard limit at server start — and
//! for TUN mode the device ioctl (`TUNSETIFF`), `SO_MARK` and the rtnetlink socket; for router
//! mode the original destination of a redirected connection (`SO_ORIGINAL_DST`), transparent
//! sockets (`IP_TRANSPARENT`) and `recvmsg` with a datagram's original destination.
//!
//! `unsafe` is allowed here only: these are plain `libc` FFI calls on a descriptor this module
//! creates and immediately wraps in an `OwnedFd` (so it is closed on every error path), or that
//! the caller keeps open for the call, with properly sized, zero-initialised `sockaddr_*` /
//! `msghdr` / `c_int` arguments and control-message buffers aligned for `cmsghdr`.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_int_opt(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; the option value is a c_int of the stated size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

/// A new socket (close-on-exec, plus `flags` such as `SOCK_NONBLOCK`), owned from the start.
fn new_socket(
    family: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor or -1; we take ownership right away.
    let raw = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
    check(raw)?;
    // SAFETY: `raw` is a freshly created, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds an IPv6 UDP socket with `IPV6_V6ONLY` set.
fn bind_udp_v6only(addr: SocketAddrV6) -> io::Result<UdpSocket> {
    let fd = new_socket(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
    set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    // SAFETY: an all-zero sockaddr_in6 is a valid value; we fill in every meaningful field.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = addr.port().to_be();
    sa.sin6_flowinfo = addr.flowinfo();
    sa.sin6_addr.s6_addr = addr.ip().octets();
    sa.sin6_scope_id = addr.scope_id();
    // SAFETY: `sa` is a valid sockaddr_in6 and the length matches its type.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    Ok(UdpSocket::from(fd))
}

/// Starts a non-blocking TCP connection to `addr` (the connect completes later: wait for the
/// socket to become writable); with `mark`, the socket carries that firewall mark from before
/// `connect` (TUN mode: it must not be routed into the device).
pub fn tcp_connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<std::net::TcpStream> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = new_socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)?;
    if let Some(mark) = mark {
        set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    }
    let (sa, len) = raw_addr(addr);
    // SAFETY: `sa` holds a valid address of `len` bytes for the socket's family.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(std::net::TcpStream::from(fd))
}

/// Binds a UDP socket; IPv6 sockets are v6-only.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    match addr {
        SocketAddr::V4(_) => UdpSocket::bind(addr),
        SocketAddr::V6(v6) => bind_udp_v6only(v6),
    }
}

/// Sets "don't fragment" on a tunnel UDP socket and tells the kernel not to apply its cached path
/// MTU (`IP_PMTUDISC_PROBE` / `IPV6_PMTUDISC_PROBE`): a datagram too large for the path is dropped
/// by the network (or refused with `EMSGSIZE` above the device's MTU) instead of being fragmented
/// by the sender's kernel, so path-MTU probing (`proto/transport/pmtu.rs`) sees the truth — on a
/// PPPoE link (MTU 1492) a 1,472-byte probe must be lost, not fragmented and confirmed. Linux
/// only; elsewhere a no-op. Returns whether the option is set.
pub fn set_udp_no_fragment(sock: &impl AsRawFd, ipv6: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        let (level, name, value) = if ipv6 {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            )
        } else {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            )
        };
        set_int_opt(sock, level, name, value).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (sock, ipv6);
        false
    }
}

/// Makes the kernel hand a connection on `listener` to `accept` only once its first data has
/// arrived (`TCP_DEFER_ACCEPT`, Linux; elsewhere a no-op), or after about `secs` seconds without
/// any. For listeners whose clients always speak first (the SOCKS5 / HTTP proxy port): the loop
/// wakes once per connection, with the request already there, instead of once for the accept and
/// again for the first bytes. Returns whether the option is set.
pub fn defer_accept(listener: &impl AsRawFd, secs: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let secs = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        set_int_opt(listener, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (listener, secs);
        false
    }
}

/// The socket's `IP_MTU_DISCOVER` mode (tests).
#[cfg(target_os = "linux")]
pub fn udp_pmtu_discover(sock: &impl AsRawFd) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is open; `value` and `len` are valid for writes of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Asks for `bytes` of kernel receive and send buffer on a UDP socket (the kernel may cap it at
/// `net.core.rmem_max` / `wmem_max`). Failures are ignored: defaults still work, only slower.
pub fn grow_udp_buffers(sock: &UdpSocket, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for name in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: `sock` is an open socket for the duration of the call; the value is a c_int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Makes the next `close` of `sock` send a TCP reset instead of a FIN, so the application on the
/// other side sees a broken transfer instead of a complete one (used when a tunnel stream is
/// cut: user deleted, limit reached, session lost). Failures are ignored (a FIN is sent then).
pub fn reset_on_close(sock: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `sock` is an open socket for the duration of the call; the value is a `linger`
    // of the stated size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Whether the kernel segments UDP sends on `sock` (`UDP_SEGMENT`, Linux 4.18+). The probe sets
/// a socket-wide segment size and clears it again, so that only sends carrying the control
/// message are segmented.
#[cfg(target_os = "linux")]
pub fn udp_gso_supported(sock: &impl AsRawFd) -> bool {
    set_int_opt(sock, libc::SOL_UDP, libc::UDP_SEGMENT, 1200).is_ok()
        && set_int_opt(sock, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
}

/// Asks the kernel to coalesce received datagrams of one flow into one read (`UDP_GRO`, Linux
/// 5.0+); the segment size then arrives as a control message. Returns whether it is on.
#[cfg(target_os = "linux")]
pub fn enable_udp_gro(sock: &impl AsRawFd) -> bool {
    set_int_opt(sock, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// Control-message space for one `u16` (`UDP_SEGMENT`) or `c_int` (`UDP_GRO`) message.
#[cfg(target_os = "linux")]
// SAFETY: CMSG_SPACE only does arithmetic on its argument.
const CMSG_INT_SPACE: usize =
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as _) as usize };

/// A control-message buffer aligned for `cmsghdr` (8 bytes covers every target's alignment).
#[cfg(target_os = "linux")]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

#[cfg(target_os = "linux")]
const _: () = assert!(CMSG_INT_SPACE <= 32 && std::mem::align_of::<libc::cmsghdr>() <= 8);

/// `addr` as a raw socket address and its length.
#[cfg(target_os = "linux")]
fn raw_addr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for every sockaddr type; the
            // reference is the only one to `storage` while it lives.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address the kernel wrote into `storage` (`None` for a family other than IPv4/IPv6).
#[cfg(target_os = "linux")]
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is aligned for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `data` as one `sendmsg` that the kernel cuts into datagrams of `segment` bytes (the last
/// may be shorter), to `to` (`None`: the connected peer). The kernel takes all of it or nothing.
#[cfg(target_os = "linux")]
pub fn send_segments(
    sock: &impl AsRawFd,
    data: &[u8],
    segment: u16,
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut name = to.map(raw_addr);
    let mut control = CmsgBuf([0; 32]);
    // SAFETY: an all-zero msghdr is a valid value (musl has padding fields, so build it so).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some((storage, len)) = name.as_mut() {
        msg.msg_name = (storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = *len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only does arithmetic on its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as _) } as _;
    // SAFETY: msg_control points to `msg_controllen` (≤ 32) writable bytes aligned for cmsghdr,
    // enough for one header and a u16, so the first header is in bounds; it is checked for null.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as _) as _;
        libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
    }
    // SAFETY: every pointer in `msg` (name, iovec → data, control) points to a live local or to
    // `data` for the duration of the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One datagram read by [`recv_segments`]: `len` bytes, coalesced from datagrams of `segment`
/// bytes when the kernel reported a GRO segment size (the last may be shorter).
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    pub segment: Option<usize>,
    /// The buffer was too small: the tail was cut off.
    pub truncated: bool,
}

/// Reads once from `sock` into `buf` with `recvmsg`, collecting the `UDP_GRO` segment size.
#[cfg(target_os = "linux")]
pub fn recv_segments(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = CmsgBuf([0; 32]);
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_INT_SPACE as _;
    // SAFETY: every pointer in `msg` points to a live, writable local (or `buf`) of the stated
    // length for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut segment = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with well-formed control
    // messages; CMSG_FIRSTHDR / CMSG_NXTHDR stay within them and return null at the end, and a
    // UDP_GRO message carries a c_int (read unaligned).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned();
                segment = usize::try_from(size).ok().filter(|s| *s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        from: socket_addr(&storage),
        segment,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// Highest soft fd limit asked for (Linux's default `fs.nr_open`).
const NOFILE_CEILING: libc::rlim_t = 1 << 20;

/// The soft and hard `RLIMIT_NOFILE` (how many fds the process may open).
#[allow(clippy::useless_conversion)] // `rlim_t` is not `u64` on every target
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero rlimit is a valid value; getrlimit fills it in.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok((u64::from(lim.rlim_cur), u64::from(lim.rlim_max)))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the soft default, often 1,024, is far
/// below what a server with many streams needs; the hard limit needs no privilege). Returns the
/// soft limit now in force.
#[allow(clippy::useless_conversion)] // `rlim_t` is not `u64` on every target
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: an all-zero rlimit is a valid value; getrlimit fills it in.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    // An unlimited hard limit cannot be the soft one (the kernel caps fds at `nr_open`).
    let target = lim.rlim_max.min(NOFILE_CEILING);
    if lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit read only by the call.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) })?;
        lim.rlim_cur = target;
    }
    Ok(u64::from(lim.rlim_cur))
}

// --- TUN mode (Linux): the device, the firewall mark, the rtnetlink socket ---

/// Attaches `dev` (an open `/dev/net/tun`) to the TUN interface `name` (`IFF_TUN | IFF_NO_PI`:
/// bare IP packets), creating it if needed; returns the name the kernel gave it.
#[cfg(target_os = "linux")]
pub fn tun_attach(dev: &impl AsRawFd, name: &str) -> io::Result<String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name (1-15 characters, no '/' or spaces)"),
        ));
    }
    // SAFETY: an all-zero ifreq is a valid value; we fill in the name and the flags.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `dev` is an open /dev/net/tun; TUNSETIFF reads and writes one ifreq, which `req`
    // is, valid for the call.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), libc::TUNSETIFF as _, &mut req) })?;
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The index of interface `name` (0 when there is none).
#[cfg(target_os = "linux")]
pub fn interface_index(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Sets `SO_MARK` (the firewall mark policy routing looks at; needs CAP_NET_ADMIN).
#[cfg(target_os = "linux")]
pub fn set_mark(sock: &impl AsRawFd, mark: u32) -> io::Result<()> {
    set_int_opt(sock, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// A `NETLINK_ROUTE` socket (blocking, close-on-exec), bound with a kernel-chosen port id, with
/// a receive timeout of `timeout` (a missing acknowledgement is an error, not a hang).
#[cfg(target_os = "linux")]
pub fn netlink_route_socket(timeout: std::time::Duration) -> io::Result<OwnedFd> {
    let fd = new_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    // SAFETY: an all-zero sockaddr_nl is valid (port id 0: the kernel assigns one).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `sa` is a valid sockaddr_nl and the length matches its type.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    // The field types are inferred: `libc::time_t` and `suseconds_t` are deprecated aliases on
    // musl (they become 64-bit there), and the timeouts used here are seconds.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as _,
        tv_usec: timeout.subsec_micros() as _,
    };
    // SAFETY: the option value is a timeval of the stated size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Sends one netlink message to the kernel.
#[cfg(target_os = "linux")]
pub fn netlink_send(fd: &impl AsRawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_nl addresses the kernel (port id 0).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msg` is valid for reads of its length; `sa` is a valid sockaddr_nl.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives what the kernel sent (one or more netlink messages) into `buf`.
#[cfg(target_os = "linux")]
pub fn netlink_recv(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

// --- Router mode (Linux): original destinations and transparent sockets ---

/// The destination a TCP connection redirected by nftables (`redirect`) was addressed to before
/// the rewrite: `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) from conntrack.
/// Fails (`ENOENT`) for a connection conntrack does not know.
#[cfg(target_os = "linux")]
pub fn original_dst(sock: &impl AsRawFd, ipv6: bool) -> io::Result<SocketAddr> {
    let (level, name) = if ipv6 {
        (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    };
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `sock` is open; `storage` and `len` are valid for writes of the stated size, and
    // the kernel writes at most `len` bytes (a sockaddr_in or sockaddr_in6).
    check(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    socket_addr(&storage).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination of an unknown address family",
        )
    })
}

/// What a transparent UDP socket is for ([`transparent_udp`]).
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransparentRole {
    /// The socket TPROXY hands captured datagrams to: each arrives with its original
    /// destination (`IP_RECVORIGDSTADDR`, read with [`recv_original_dst`]).
    Receiver,
    /// A socket that answers from a captured flow's original destination (bound to that foreign
    /// address, `SO_REUSEADDR` so answers to several applications can share it).
    Replier,
}

/// A non-blocking, close-on-exec UDP socket with `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (it may
/// bind to addresses that are not the host's and receives what TPROXY hands it; needs
/// CAP_NET_ADMIN), bound to `addr`; IPv6 sockets are v6-only.
#[cfg(target_os = "linux")]
pub fn transparent_udp(addr: SocketAddr, role: TransparentRole) -> io::Result<UdpSocket> {
    let v6 = addr.is_ipv6();
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let fd = new_socket(family, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0)?;
    if v6 {
        set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        set_int_opt(&fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
    } else {
        set_int_opt(&fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
    }
    match role {
        TransparentRole::Receiver if v6 => {
            set_int_opt(&fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?
        }
        TransparentRole::Receiver => set_int_opt(&fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)?,
        TransparentRole::Replier => set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?,
    }
    let (storage, len) = raw_addr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for `addr`'s family.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    Ok(UdpSocket::from(fd))
}

/// A TCP listener on `addr` (IPv6: v6-only, so `0.0.0.0:P` and `[::]:P` can both listen),
/// `SO_REUSEADDR`, non-blocking, close-on-exec.
#[cfg(target_os = "linux")]
pub fn listen_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let fd = new_socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)?;
    if addr.is_ipv6() {
        set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let (storage, len) = raw_addr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for `addr`'s family.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    // SAFETY: `fd` is a bound stream socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(std::net::TcpListener::from(fd))
}

/// One datagram read by [`recv_original_dst`]: `len` bytes from `from`, addressed to `to`
/// before TPROXY diverted it.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diverted {
    pub len: usize,
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// The buffer was too small: the tail was cut off.
    pub truncated: bool,
}

/// A control-message buffer for one `sockaddr_in6`, aligned for `cmsghdr`.
#[cfg(target_os = "linux")]
#[repr(C, align(8))]
struct AddrCmsgBuf([u8; 64]);

#[cfg(target_os = "linux")]
// SAFETY: CMSG_SPACE only does arithmetic on its argument.
const _: () = assert!(
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::sockaddr_in6>() as _) } as usize <= 64
);

/// Reads one datagram from a [`TransparentRole::Receiver`] socket with its source and original
/// destination (`IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR`). `Ok(None)`: a datagram without them
/// (not diverted by TPROXY), consumed.
#[cfg(target_os = "linux")]
pub fn recv_original_dst(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Option<Diverted>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = AddrCmsgBuf([0; 64]);
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in `msg` points to a live, writable local (or `buf`) of the stated
    // length for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut to = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with well-formed control
    // messages; CMSG_FIRSTHDR / CMSG_NXTHDR stay within them and return null at the end. An
    // ORIGDSTADDR message carries a sockaddr_in / sockaddr_in6 (its length is checked), copied
    // unaligned into a zeroed sockaddr_storage before it is read.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            let size = match (level, kind) {
                (libc::SOL_IP, libc::IP_ORIGDSTADDR) => std::mem::size_of::<libc::sockaddr_in>(),
                (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    std::mem::size_of::<libc::sockaddr_in6>()
                }
                _ => 0,
            };
            let have = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            if size > 0 && have >= size {
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
                    size,
                );
                to = socket_addr(&storage);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(match (socket_addr(&from), to) {
        (Some(from), Some(to)) => Some(Diverted {
            len: n as usize,
            from,
            to,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = nofile_limit().unwrap();
        let soft = raise_nofile_limit().unwrap();
        assert_eq!(soft, hard.min(1 << 20));
        assert_eq!(nofile_limit().unwrap(), (soft, hard));
    }

    #[test]
    fn v4_and_v6_wildcards_on_the_same_port() {
        let v4 = bind_udp("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        match bind_udp(SocketAddr::from(([0u16; 8], port))) {
            Ok(v6) => assert_eq!(v6.local_addr().unwrap().port(), port),
            // Hosts without IPv6 cannot create the socket at all.
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ),
                "{e}"
            ),
        }
        grow_udp_buffers(&v4, 1 << 20);
    }

    #[test]
    fn tcp_listeners_share_a_port_across_families_and_direct_connections_have_no_other_destination()
    {
        let v4 = listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = listen_tcp(SocketAddr::from(([0u16; 8], port))) {
            assert_eq!(v6.local_addr().unwrap().port(), port);
        }
        v4.set_nonblocking(false).unwrap();
        let client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let (server, _) = v4.accept().unwrap();
        // Not redirected: conntrack knows no other destination (or none at all).
        match original_dst(&server, false) {
            Ok(dest) => assert_eq!(dest, server.local_addr().unwrap()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
        drop(client);
    }

    #[test]
    fn a_transparent_receiver_reports_each_datagrams_destination_and_a_replier_binds_anywhere() {
        let rx = match transparent_udp("127.0.0.1:0".parse().unwrap(), TransparentRole::Receiver) {
            Ok(s) => s,
            // Without CAP_NET_ADMIN the kernel refuses IP_TRANSPARENT (the client says so).
            Err(e) => return assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        };
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"hello", to).unwrap();
        let mut buf = [0u8; 64];
        let mut got = None;
        for _ in 0..200 {
            match recv_original_dst(&rx, &mut buf) {
                Ok(d) => {
                    got = d;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let d = got.expect("a datagram with its destination");
        assert_eq!((d.from, d.to, d.len), (tx.local_addr().unwrap(), to, 5));
        assert_eq!(&buf[..5], b"hello");
        // A replier may bind to an address this host does not have, twice (answers to two
        // applications from one destination).
        let foreign: SocketAddr = "203.0.113.9:53".parse().unwrap();
        let a = transparent_udp(foreign, TransparentRole::Replier).unwrap();
        let b = transparent_udp(foreign, TransparentRole::Replier).unwrap();
        assert_eq!(a.local_addr().unwrap(), foreign);
        assert_eq!(b.local_addr().unwrap(), foreign);
    }

    #[test]
    fn reset_on_close_makes_the_peer_see_a_reset() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        reset_on_close(&server);
        drop(server);
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
