//! The data plane: everything between local sockets and the protocol core.
//!
//! Files and what they own:
//! - [`target`]      — [`target::TargetAddr`], the destination a client asked for (IP or domain + port),
//!   with parse/display helpers shared by the proxy front end, the resolver and the guard.
//! - [`proxy_front`] — sans-IO parser for the client's local proxy port (SOCKS5 and HTTP proxy on one
//!   port), reply builders, and the SOCKS5 UDP request header codec.
//! - [`dest_guard`]  — the server's destination guard: refuses loopback/private/link-local/… and the
//!   server's own addresses (checked after DNS resolution).
//! - [`resolver`]    — a small DNS thread pool that reports results to the event loop via a `mio::Waker`.
//!
//! The mio event loops (server and client) that drive the protocol core live next to these files.

pub mod dest_guard;
pub mod proxy_front;
pub mod resolver;
pub mod target;
