//! The control channel from the API and signal handling to the tunnel event loop: an
//! `mpsc` channel plus a `mio::Waker` so the loop wakes up at once. Sending when no loop is
//! attached (API-only runs, tests) is a no-op. A message that needs an answer (a kick) carries
//! a one-shot [`Reply`] channel; the asker waits for it with a timeout ([`ControlSender::ask`]).

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use crate::users::UserId;

/// A change the event loop must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// A user was created (add its key to the handshake table).
    UserAdded(UserId),
    /// A user was deleted (drop its key and close its sessions).
    UserRemoved(UserId),
    /// A user's limit, name, source or settings (enabled, expiry) changed or its counters were
    /// reset through the API or periodically (re-read it from the
    /// table; a reset is told apart by [`User::resets`](crate::users::User::resets)).
    UserChanged(UserId),
    /// Close every live session of this user now (the client reconnects at once: the close
    /// reason is `Normal`, not a key problem); the loop answers how many it closed.
    Kick(UserId, Reply<u32>),
    /// `allow_private_destinations` changed (SIGHUP): judge new destinations by this value.
    AllowPrivateDestinations(bool),
    /// The management API listens on this address: the destination guard refuses it always.
    ApiBound(std::net::SocketAddr),
    /// `fallback.target` changed (SIGHUP): where TCP connections found not to be OSTP from now
    /// on are spliced (`None`: discarded); splices already running stay.
    Fallback(Option<std::net::SocketAddr>),
    /// Stop the loop.
    Shutdown,
}

/// The answer channel of one request to the loop: used once (a one-shot). Two replies always
/// compare equal, so messages compare by their request alone.
#[derive(Debug, Clone)]
pub struct Reply<T>(Sender<T>);

impl<T> Reply<T> {
    /// Answers the request; an asker that stopped waiting is not an error.
    pub fn send(self, value: T) {
        let _ = self.0.send(value);
    }
}

impl<T> PartialEq for Reply<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Reply<T> {}

/// Why a request to the loop got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskError {
    /// No event loop is attached (API-only runs), or it has stopped.
    NoLoop,
    /// The loop did not answer within the timeout.
    Timeout,
}

/// The sending half; cheap to clone.
#[derive(Clone, Default)]
pub struct ControlSender {
    tx: Option<Sender<ControlMsg>>,
    waker: Option<Arc<mio::Waker>>,
}

impl ControlSender {
    /// A sender whose messages go nowhere (no event loop exists).
    pub fn disconnected() -> ControlSender {
        ControlSender::default()
    }

    /// A connected pair; `waker` (registered with the loop's `Poll`) is woken after each send.
    pub fn channel(waker: Option<Arc<mio::Waker>>) -> (ControlSender, Receiver<ControlMsg>) {
        let (tx, rx) = mpsc::channel();
        (
            ControlSender {
                tx: Some(tx),
                waker,
            },
            rx,
        )
    }

    /// Sends the request `make(reply)` and waits up to `timeout` for the loop's answer.
    pub fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> ControlMsg,
        timeout: Duration,
    ) -> Result<T, AskError> {
        let Some(tx) = &self.tx else {
            return Err(AskError::NoLoop);
        };
        let (reply_tx, reply_rx) = mpsc::channel();
        if tx.send(make(Reply(reply_tx))).is_err() {
            return Err(AskError::NoLoop);
        }
        if let Some(w) = &self.waker {
            if let Err(e) = w.wake() {
                log::warn!("cannot wake the tunnel event loop: {e}");
            }
        }
        reply_rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => AskError::Timeout,
            // The loop dropped the message unanswered: it is stopping.
            RecvTimeoutError::Disconnected => AskError::NoLoop,
        })
    }

    /// Sends `msg` and wakes the loop. Never fails: a missing or stopped loop is not an error
    /// for the sender (the shared user table is the source of truth).
    pub fn send(&self, msg: ControlMsg) {
        let Some(tx) = &self.tx else { return };
        if tx.send(msg).is_err() {
            return;
        }
        if let Some(w) = &self.waker {
            if let Err(e) = w.wake() {
                log::warn!("cannot wake the tunnel event loop: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnected_sender_is_a_no_op_and_channel_delivers_in_order() {
        ControlSender::disconnected().send(ControlMsg::Shutdown);
        let (tx, rx) = ControlSender::channel(None);
        tx.clone().send(ControlMsg::UserAdded(UserId(1)));
        tx.send(ControlMsg::UserRemoved(UserId(1)));
        assert_eq!(rx.recv().unwrap(), ControlMsg::UserAdded(UserId(1)));
        assert_eq!(rx.recv().unwrap(), ControlMsg::UserRemoved(UserId(1)));
        drop(rx);
        tx.send(ControlMsg::Shutdown); // receiver gone: still no panic
    }

    #[test]
    fn ask_gets_the_answer_or_times_out_or_sees_no_loop() {
        let t = Duration::from_millis(50);
        let none = ControlSender::disconnected().ask(|r| ControlMsg::Kick(UserId(1), r), t);
        assert_eq!(none, Err(AskError::NoLoop));
        let (tx, rx) = ControlSender::channel(None);
        let answerer = std::thread::spawn(move || match rx.recv().unwrap() {
            ControlMsg::Kick(UserId(3), reply) => {
                reply.send(2);
                rx // keep the receiver: the next ask must time out, not see "no loop"
            }
            other => panic!("{other:?}"),
        });
        let long = Duration::from_secs(5);
        assert_eq!(tx.ask(|r| ControlMsg::Kick(UserId(3), r), long), Ok(2));
        let rx = answerer.join().unwrap();
        assert_eq!(
            tx.ask(|r| ControlMsg::Kick(UserId(3), r), t),
            Err(AskError::Timeout)
        );
        drop(rx);
        assert_eq!(
            tx.ask(|r| ControlMsg::Kick(UserId(3), r), t),
            Err(AskError::NoLoop)
        );
    }

    #[test]
    fn send_wakes_the_poll() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).unwrap());
        let (tx, rx) = ControlSender::channel(Some(waker));
        tx.send(ControlMsg::AllowPrivateDestinations(true));
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == mio::Token(7)));
        assert_eq!(
            rx.try_recv().unwrap(),
            ControlMsg::AllowPrivateDestinations(true)
        );
    }
}
