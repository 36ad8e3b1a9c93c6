//! The OSTP protocol core: a pure, sans-IO state machine (no sockets, clock reads or global RNG).
pub mod sim;
