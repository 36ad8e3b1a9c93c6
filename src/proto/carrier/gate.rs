//! The server's first look at a TCP connection (docs/PROTOCOL.md §7.2): decides from the first
//! bytes, as early as they allow, whether they are the start of a fresh hello record of a known
//! user, and otherwise what a stranger gets (the fallback website, or reading and discarding until
//! a random deadline). Sans-IO: bytes and `now` in, a step out; the user lookup is the caller's.

use std::time::{Duration, Instant};

use super::records::{HELLO_HEAD, MAX_HELLO_RECORD, hello_record_len};
use crate::proto::crypto::Key32;
use crate::proto::endpoint::UserId;
use crate::proto::handshake::HELLO_TAG_LEN;
use crate::proto::rng::Drbg;

/// The whole hello record must arrive within this time of the connection being accepted.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// A connection that is not OSTP and has no fallback is read and discarded until a deadline drawn
/// uniformly from this range after it was accepted, then closed with FIN.
pub const DISCARD_SECS: std::ops::RangeInclusive<u64> = 20..=60;

/// What the gate needs to know about hello tags (the server endpoint's tag table).
pub trait HelloDirectory {
    /// The user whose live hello tag `tag` is, and that user's hello key.
    fn user_of_tag(&self, tag: u64) -> Option<(UserId, Key32)>;
    /// Whether a hello with this tag and fingerprint (its nonce's first 8 bytes) was answered.
    fn already_answered(&self, tag: u64, fingerprint: u64) -> bool;
}

/// Why the bytes are not the start of a fresh hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOstp {
    /// The first 8 bytes are no live hello tag (a prober, a web browser, garbage).
    UnknownTag,
    /// A hello answered before (a replay, on either carrier).
    Replay,
    /// The masked length is out of range.
    BadLength,
    /// The record did not arrive within [`HELLO_DEADLINE`].
    Timeout,
}

/// What to do with the connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateStep {
    /// Read more (at most [`MAX_HELLO_RECORD`] bytes in all).
    NeedMore,
    /// A whole hello record of `user` is the first `len` bytes: authenticate it (rate limits,
    /// AEAD, clock, record, as a datagram hello); if that fails too, it is [`NotOstp`] after all.
    Hello { user: UserId, len: usize },
    /// Not OSTP: hand the connection to the fallback, or discard.
    NotOstp(NotOstp),
}

/// Where a connection's first bytes have got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    /// The tag is `user`'s.
    Tag {
        user: UserId,
        hello_key: Key32,
    },
    /// The head is read: the record is `len` bytes.
    Head {
        user: UserId,
        len: usize,
    },
    Decided,
}

/// The decision for one accepted connection.
#[derive(Debug)]
pub struct HelloGate {
    accepted_at: Instant,
    seen: Seen,
}

impl HelloGate {
    /// A connection accepted at `now`.
    pub fn new(now: Instant) -> Self {
        HelloGate {
            accepted_at: now,
            seen: Seen::Nothing,
        }
    }

    /// When the hello must be complete ([`GateStep::NotOstp`] with `Timeout` from then on).
    pub fn deadline(&self) -> Instant {
        self.accepted_at + HELLO_DEADLINE
    }

    /// Looks at everything received so far (`bytes`, the caller appends and never drops until
    /// decided). Decisions: at 8 bytes the tag, at 16 the fingerprint, at [`HELLO_HEAD`] the
    /// length, then the whole record. Once a step other than `NeedMore` is returned, later calls
    /// repeat `NotOstp` (the gate is done).
    pub fn step(&mut self, now: Instant, bytes: &[u8], dir: &impl HelloDirectory) -> GateStep {
        let step = self.look(now, bytes, dir);
        if step != GateStep::NeedMore {
            self.seen = Seen::Decided;
        }
        step
    }

    fn look(&mut self, now: Instant, bytes: &[u8], dir: &impl HelloDirectory) -> GateStep {
        if now >= self.deadline() {
            return GateStep::NotOstp(NotOstp::Timeout);
        }
        if self.seen == Seen::Nothing {
            let Some(tag) = read_u64(bytes, 0) else {
                return GateStep::NeedMore;
            };
            let Some((user, hello_key)) = dir.user_of_tag(tag) else {
                return GateStep::NotOstp(NotOstp::UnknownTag);
            };
            self.seen = Seen::Tag { user, hello_key };
        }
        if let Seen::Tag { user, hello_key } = self.seen {
            let (Some(tag), Some(fingerprint)) =
                (read_u64(bytes, 0), read_u64(bytes, HELLO_TAG_LEN))
            else {
                return GateStep::NeedMore;
            };
            if dir.already_answered(tag, fingerprint) {
                return GateStep::NotOstp(NotOstp::Replay);
            }
            let Some(head) = bytes
                .get(..HELLO_HEAD)
                .and_then(|h| <[u8; HELLO_HEAD]>::try_from(h).ok())
            else {
                return GateStep::NeedMore;
            };
            let Some(len) = hello_record_len(&hello_key, &head) else {
                return GateStep::NotOstp(NotOstp::BadLength);
            };
            self.seen = Seen::Head { user, len };
        }
        match self.seen {
            Seen::Head { user, len } if bytes.len() >= len => GateStep::Hello { user, len },
            Seen::Decided => GateStep::NotOstp(NotOstp::BadLength),
            _ => GateStep::NeedMore,
        }
    }
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// When a discarded connection accepted at `accepted_at` is closed: uniformly in
/// [`DISCARD_SECS`] after it, at millisecond resolution (no fixed timing for a prober to see).
pub fn discard_deadline(accepted_at: Instant, rng: &mut Drbg) -> Instant {
    let (lo, hi) = (DISCARD_SECS.start() * 1000, DISCARD_SECS.end() * 1000);
    let span = u32::try_from(hi - lo).unwrap_or(u32::MAX);
    accepted_at + Duration::from_millis(lo + u64::from(rng.up_to(span)))
}

/// Bytes a connection may need buffered before the gate decides.
pub const GATE_BUFFER: usize = MAX_HELLO_RECORD;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::carrier::records;
    use crate::proto::handshake::Hello;
    use crate::proto::psk::UserKeys;

    struct Directory {
        keys: UserKeys,
        tag: u64,
        answered: Vec<u64>,
    }

    impl HelloDirectory for Directory {
        fn user_of_tag(&self, tag: u64) -> Option<(UserId, Key32)> {
            (tag == self.tag).then_some((UserId(7), self.keys.hello_key))
        }
        fn already_answered(&self, tag: u64, fingerprint: u64) -> bool {
            tag == self.tag && self.answered.contains(&fingerprint)
        }
    }

    fn setup(seed: u8) -> (Directory, Vec<u8>) {
        let keys = UserKeys::from_access_key("gate-test-key-0123456789").unwrap();
        let hello = Hello {
            unix_secs: 1_800_000_000,
            client_random: [seed; 32],
            max_datagram: 16_384,
        };
        let mut rng = Drbg::new([seed; 32]);
        let mut out = [0u8; MAX_HELLO_RECORD];
        let (n, _) = records::write_hello(
            &keys.hello_key,
            &keys.tag_key,
            3,
            1,
            &hello,
            300,
            &mut rng,
            &mut out,
        )
        .unwrap();
        let tag = read_u64(&out, 0).unwrap();
        let dir = Directory {
            keys,
            tag,
            answered: Vec::new(),
        };
        (dir, out[..n].to_vec())
    }

    /// Feeds `bytes` one at a time; returns the first decision and how many bytes it took.
    fn feed(
        gate: &mut HelloGate,
        now: Instant,
        bytes: &[u8],
        dir: &Directory,
    ) -> (GateStep, usize) {
        for n in 0..=bytes.len() {
            let step = gate.step(now, &bytes[..n], dir);
            if step != GateStep::NeedMore {
                return (step, n);
            }
        }
        (GateStep::NeedMore, bytes.len())
    }

    #[test]
    fn a_fresh_hello_is_recognised_when_its_last_byte_arrives() {
        let (dir, record) = setup(1);
        let now = Instant::now();
        let mut gate = HelloGate::new(now);
        let (step, at) = feed(&mut gate, now, &record, &dir);
        assert_eq!(
            step,
            GateStep::Hello {
                user: UserId(7),
                len: record.len()
            }
        );
        assert_eq!(at, record.len());
        assert_eq!(
            gate.step(now, &record, &dir),
            GateStep::NotOstp(NotOstp::BadLength),
            "decided once"
        );
    }

    #[test]
    fn strangers_are_told_apart_as_early_as_the_bytes_allow() {
        let (mut dir, record) = setup(2);
        let now = Instant::now();
        // An HTTP request: decided at its 8th byte, before a website would have answered.
        let (step, at) = feed(
            &mut HelloGate::new(now),
            now,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &dir,
        );
        assert_eq!((step, at), (GateStep::NotOstp(NotOstp::UnknownTag), 8));
        // A replayed hello: at its 16th byte.
        dir.answered.push(read_u64(&record, 8).unwrap());
        let (step, at) = feed(&mut HelloGate::new(now), now, &record, &dir);
        assert_eq!((step, at), (GateStep::NotOstp(NotOstp::Replay), 16));
        dir.answered.clear();
        // A live tag followed by garbage: its length is out of range almost surely, decided at 34.
        let mut forged = record[..8].to_vec();
        forged.extend_from_slice(&[0xEE; 100]);
        let (step, at) = feed(&mut HelloGate::new(now), now, &forged, &dir);
        if step == GateStep::NotOstp(NotOstp::BadLength) {
            assert_eq!(at, HELLO_HEAD);
        } else {
            assert_eq!(
                step,
                GateStep::NeedMore,
                "an in-range length waits for its bytes"
            );
        }
    }

    #[test]
    fn a_hello_that_dribbles_in_past_the_deadline_is_not_ostp() {
        let (dir, record) = setup(3);
        let t0 = Instant::now();
        let mut gate = HelloGate::new(t0);
        assert_eq!(gate.step(t0, &record[..20], &dir), GateStep::NeedMore);
        let late = gate.deadline();
        assert_eq!(
            gate.step(late, &record, &dir),
            GateStep::NotOstp(NotOstp::Timeout)
        );
    }

    #[test]
    fn discard_deadlines_are_spread_over_the_range() {
        let t0 = Instant::now();
        let mut rng = Drbg::new([5; 32]);
        let secs: Vec<f64> = (0..500)
            .map(|_| (discard_deadline(t0, &mut rng) - t0).as_secs_f64())
            .collect();
        assert!(secs.iter().all(|s| (20.0..=60.0).contains(s)));
        let (min, max) = secs
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), s| (a.min(*s), b.max(*s)));
        assert!(min < 22.0 && max > 58.0, "{min}..{max}");
    }

    #[test]
    fn garbage_never_panics_and_never_looks_like_a_hello() {
        let (dir, _) = setup(4);
        let mut rng = Drbg::new([6; 32]);
        let now = Instant::now();
        for _ in 0..500 {
            let mut bytes = vec![0u8; rng.up_to(GATE_BUFFER as u32) as usize];
            rng.fill(&mut bytes);
            let (step, _) = feed(&mut HelloGate::new(now), now, &bytes, &dir);
            assert!(!matches!(step, GateStep::Hello { .. }));
        }
    }
}
