//! The driver toolkit shared by the three mio loops (server tunnel loop, client loop, API front
//! end): the mechanics of moving bytes, never the decisions.
//!
//! - [`token`]  — every mio token of every loop, encoded and decoded in one place ([`token::Tok`]).
//! - [`ticket`] — typed resolver tickets: a DNS answer can only ever reach the owner that asked.
//! - [`udp`]    — UDP receive batches that remember "still readable" (mio is edge-triggered) and
//!   the blocked-send slot that holds WRITABLE interest only while a datagram waits.
//! - [`timeouts`] — fixed-timeout deadline queues (no per-wake-up scans over connections).
//! - [`core`]   — the loop skeleton: `Poll` + `Events` + `Waker`, a wait that never busy-spins on
//!   sub-millisecond deadlines unnoticed, and the loop thread handle.

pub mod core;
pub mod ticket;
pub mod timeouts;
pub mod token;
pub mod udp;
