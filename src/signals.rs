//! SIGTERM / SIGINT / SIGHUP, delivered as ordinary messages on a channel.
//!
//! The signals are blocked in every thread (the mask is set before any other thread starts and
//! is inherited), and one dedicated thread takes them with `sigwait(3)`. No signal handler ever
//! runs, so nothing async-signal-unsafe can happen.
//!
//! One of the two modules allowed `unsafe` (the other is `sys`): the standard library has no API
//! for signal masks, and the design card names `libc` for exactly this. Each `unsafe` block is a
//! plain FFI call on a properly initialised `sigset_t` owned by the caller.
#![allow(unsafe_code)]

use std::fmt;
use std::sync::mpsc;

/// What a signal asks the process to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT: shut down gracefully.
    Terminate(&'static str),
    /// SIGHUP: reload the configuration.
    Reload,
}

/// Installing the signal mask failed.
#[derive(Debug)]
pub struct SignalError(pub String);

impl fmt::Display for SignalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot set up signal handling: {}", self.0)
    }
}

impl std::error::Error for SignalError {}

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write into the zeroed set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGTERM/SIGINT/SIGHUP in the calling thread (and so in every thread it spawns later)
/// and starts the thread that turns them into [`SignalEvent`]s.
///
/// Call it first thing in `main`, before any other thread exists.
pub fn install() -> Result<mpsc::Receiver<SignalEvent>, SignalError> {
    let set = handled_set();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SignalError(
            std::io::Error::from_raw_os_error(rc).to_string(),
        ));
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = handled_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` and `sig` are valid for the duration of the call.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc != 0 {
                    continue;
                }
                let event = match sig {
                    libc::SIGHUP => SignalEvent::Reload,
                    libc::SIGINT => SignalEvent::Terminate("SIGINT"),
                    _ => SignalEvent::Terminate("SIGTERM"),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| SignalError(e.to_string()))?;
    Ok(rx)
}
