//! ostp — a small, fast, trustworthy OSTP tunnel.
//!
//! Layout (each module's own doc says what it owns):
//! - [`proto`]   — the sans-IO protocol core: handshake, crypto, packet protection, reliability,
//!   streams, timers. Bytes and `now` in; datagrams, events and the next timeout out.
//! - [`tunnel`]  — the data plane: the mio event loops (server and client) that drive the core,
//!   SOCKS5 / HTTP proxy front end, outbound connections, DNS pool, destination guard.
//! - [`users`]   — the user table shared by the API and the tunnel, and its durable state file.
//! - [`api`]     — the Management REST API (mio front end, tiny_http worker pool, routes, auth).
//! - [`http_head`] — the HTTP head scanner and limits shared by the API and the proxy port.
//! - [`config`]  — `config.json`: parsing, defaults, validation.
//! - [`control`] — the channel + waker through which the API and signals reach the event loop.
//! - [`keys`]    — access keys and tokens: generation, validation, masking, constant-time compare.
//! - [`share_link`] — `ostp://KEY@HOST:PORT` links.
//! - [`signals`] — SIGTERM/SIGINT/SIGHUP, taken by one thread and delivered as messages.
//! - [`sys`]     — the few socket options std cannot set (`IPV6_V6ONLY`, buffer sizes, abortive
//!   close).
//! - [`logging`] — logging set-up and the run-time log level.
//! - [`cli`]     — command-line parsing.
//! - [`runtime`] — the top-level commands: server and client start-up and lifetime, one-shot
//!   commands.
//!
//! `unsafe` is denied crate-wide and allowed only in [`signals`] and [`sys`] (plain `libc` FFI).
//! The architecture (life of a byte, threads, timers, tokens) is in `docs/ARCHITECTURE.md`.
#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod http_head;
pub mod keys;
pub mod logging;
pub mod proto;
pub mod runtime;
pub mod share_link;
pub mod signals;
pub mod sys;
pub mod tunnel;
pub mod users;
