//! The control channel from the API and signal handling to the tunnel event loop: an
//! `mpsc` channel plus a `mio::Waker` so the loop wakes up at once. Sending when no loop is
//! attached (API-only runs, tests) is a no-op.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

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
    /// `allow_private_destinations` changed (SIGHUP): judge new destinations by this value.
    AllowPrivateDestinations(bool),
    /// The management API listens on this address: the destination guard refuses it always.
    ApiBound(std::net::SocketAddr),
    /// Stop the loop.
    Shutdown,
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
