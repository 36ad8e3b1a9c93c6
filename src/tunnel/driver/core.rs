//! The loop skeleton every mio loop shares: `Poll`, its `Events`, the `Waker` that control
//! messages and resolver answers use, the wait itself, and the loop thread's handle.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry, Waker};

use super::token::Tok;
use crate::control::{ControlMsg, ControlSender};

/// Events taken from the kernel per wait.
const EVENTS: usize = 1024;

/// Poll + waker of one loop thread. The loop keeps its [`Events`] (from [`events`]) as a local
/// so it can dispatch them while borrowing itself mutably.
pub struct LoopCore {
    pub poll: Poll,
    pub waker: Arc<Waker>,
    /// Returns from [`LoopCore::wait`] so far (a plain counter: the loop thread owns it).
    wakeups: u64,
}

/// The event buffer a loop waits with.
pub fn events() -> Events {
    Events::with_capacity(EVENTS)
}

impl LoopCore {
    /// A new poll with its waker registered as [`Tok::Waker`].
    pub fn new() -> io::Result<LoopCore> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), Tok::Waker.token())?);
        Ok(LoopCore {
            poll,
            waker,
            wakeups: 0,
        })
    }

    /// How many times [`LoopCore::wait`] returned (the loop's wake-ups; benchmarks report
    /// them per GB, `ostp_loop_wakeups_total` on the server).
    pub fn wakeups(&self) -> u64 {
        self.wakeups
    }

    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// The control channel into this loop (each send wakes it).
    pub fn control_channel(&self) -> (ControlSender, Receiver<ControlMsg>) {
        ControlSender::channel(Some(self.waker.clone()))
    }

    /// Waits for events until `deadline` (`None`: until an event). An interrupted wait returns
    /// with no events; any other poll failure is returned (the loop cannot go on).
    pub fn wait(
        &mut self,
        events: &mut Events,
        now: Instant,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        let timeout = deadline.map(|at| poll_wait(at, now));
        self.wakeups = self.wakeups.wrapping_add(1);
        match self.poll.poll(events, timeout) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                events.clear();
                Ok(())
            }
            other => other,
        }
    }
}

/// How long a loop may sleep until a timer due at `at`: zero only when it is due. epoll sleeps
/// in whole milliseconds and mio rounds up, so a timer less than a millisecond away is served up
/// to a millisecond late rather than by spinning on zero-timeout waits until it is due. The
/// protocol core never asks for less slack: the pacer wakes once per burst (at least 1 ms of
/// sending, and its burst credit absorbs a late wake-up), the delayed-ACK timeout is at least
/// 1 ms, and loss detection tolerates the timer granularity.
pub fn poll_wait(at: Instant, now: Instant) -> Duration {
    at.saturating_duration_since(now)
}

/// The thread a loop runs on.
pub struct LoopThread {
    thread: Option<JoinHandle<()>>,
}

impl LoopThread {
    /// Starts `body` on a named thread.
    pub fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<LoopThread> {
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(body)?;
        Ok(LoopThread {
            thread: Some(thread),
        })
    }

    /// Waits for the loop to end (after it was told to stop). Idempotent.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("an event loop thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_wake_the_wait() {
        let mut core = LoopCore::new().unwrap();
        let (tx, rx) = core.control_channel();
        let t0 = Instant::now();
        let waiter = std::thread::spawn(move || tx.send(ControlMsg::Shutdown));
        let mut events = events();
        core.wait(&mut events, t0, Some(t0 + Duration::from_secs(10)))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(events.iter().any(|e| e.token() == Tok::Waker.token()));
        waiter.join().unwrap();
        assert_eq!(rx.try_recv().unwrap(), ControlMsg::Shutdown);
    }

    /// A timer 300 µs away is a (rounded-up) sleep, not a zero-timeout spin until it is due.
    #[test]
    fn only_due_deadlines_are_polled_without_sleeping() {
        let now = Instant::now();
        assert_eq!(
            poll_wait(now + Duration::from_micros(300), now),
            Duration::from_micros(300)
        );
        assert_eq!(poll_wait(now, now + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(poll_wait(now, now), Duration::ZERO);
        let mut core = LoopCore::new().unwrap();
        let mut events = events();
        let t0 = Instant::now();
        core.wait(&mut events, t0, Some(t0 + Duration::from_micros(300)))
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_micros(300),
            "slept until the timer"
        );
        assert_eq!(core.wakeups(), 1);
        assert_eq!(
            poll_wait(now + Duration::from_millis(5), now),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn loop_thread_joins_once() {
        let mut t = LoopThread::spawn("ostp-test", || {}).unwrap();
        t.join();
        t.join();
    }
}
