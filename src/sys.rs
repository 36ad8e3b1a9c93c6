//! The few socket options the standard library cannot set: `IPV6_V6ONLY` before `bind` (so
//! `0.0.0.0:P` and `[::]:P` can both be listened on), larger UDP socket buffers, and an abortive
//! close (`SO_LINGER` 0: the peer sees a reset, not an orderly end of data) — and the process's
//! open-file limit (`RLIMIT_NOFILE`), raised to its hard limit at server start.
//!
//! `unsafe` is allowed here only: these are plain `libc` FFI calls on a descriptor this module
//! creates and immediately wraps in an `OwnedFd` (so it is closed on every error path), with
//! properly sized, zero-initialised `sockaddr_in6` / `c_int` arguments.
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
    fd: &OwnedFd,
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

/// Binds an IPv6 UDP socket with `IPV6_V6ONLY` set.
fn bind_udp_v6only(addr: SocketAddrV6) -> io::Result<UdpSocket> {
    // SAFETY: socket(2) returns a new descriptor or -1; we take ownership right away.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(raw)?;
    // SAFETY: `raw` is a freshly created, valid descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
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

/// Binds a UDP socket; IPv6 sockets are v6-only.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    match addr {
        SocketAddr::V4(_) => UdpSocket::bind(addr),
        SocketAddr::V6(v6) => bind_udp_v6only(v6),
    }
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
