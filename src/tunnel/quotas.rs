//! Per-user shares and global caps of the server's scarce resources — outbound streams (one fd
//! each), pending DNS lookups, buffered bytes — plus stream idle timeouts and the DNS negative
//! cache: pure policy that takes `now`, asked by the server loop before any expensive work.
//!
//! Every resource has a per-user share below its global cap, so one user filling its own share
//! leaves room for everyone else, and a share is given back the moment the resource is (a
//! lookup's share only when its answer really arrives: `getaddrinfo` cannot be cancelled, so a
//! resolver thread stays busy until then even if the loop gave up on the ticket earlier).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::proto::SessionId;
use crate::proto::id_map::IdMap;
use crate::users::UserId;

/// The limits, from `config.json` (see the README's "Limits" section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Outbound TCP streams of all users together (also capped by the fd budget).
    pub max_streams: usize,
    /// Outbound TCP streams of one user (every session; resolving, connecting, half-closed
    /// included).
    pub max_streams_per_user: usize,
    /// Lookups queued or running in the resolver pool, all users (its threads + queue).
    pub max_lookups: usize,
    /// Lookups queued or running for one user.
    pub max_lookups_per_user: usize,
    /// Bytes the server holds for all users: memory of transport send buffers (allocated, not
    /// just filled) + pipe buffers + TCP carrier sessions' frame buffers.
    pub max_buffered: usize,
    /// Bytes the server holds for one user.
    pub max_buffered_per_user: usize,
    /// An open stream that moved no byte either way for this long is reset.
    pub stream_idle_timeout: Duration,
    /// A half-closed stream (one side finished) that moved no byte for this long is reset.
    pub half_closed_timeout: Duration,
    /// The loop gives up on a lookup after this long (the stream fails with a DNS error).
    pub lookup_timeout: Duration,
    /// A name that failed or timed out fails at once for this long.
    pub negative_ttl: Duration,
}

/// Which cap refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UserStreams,
    Streams,
    UserLookups,
    Lookups,
    /// The name failed recently (negative cache).
    RecentlyFailed,
}

#[derive(Debug, Default)]
struct Share {
    streams: usize,
    lookups: usize,
    /// Pipe buffers allocated for the user's streams.
    pipe_bytes: usize,
    /// The user's sessions and the memory each one holds.
    sessions: Vec<SessionMemory>,
}

/// What one session holds: its transport send buffers (they grow and shrink) and the frame
/// buffers of its TCP carrier connection (only while bytes are in them; 0 over UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SessionMemory {
    id: SessionId,
    send: usize,
    carrier: usize,
}

impl SessionMemory {
    fn total(&self) -> usize {
        self.send + self.carrier
    }
}

impl Share {
    fn buffered(&self) -> usize {
        self.pipe_bytes
            + self
                .sessions
                .iter()
                .map(SessionMemory::total)
                .sum::<usize>()
    }

    /// The entry of `session`, created empty if missing.
    fn session(&mut self, id: SessionId) -> &mut SessionMemory {
        match self.sessions.iter().position(|s| s.id == id) {
            Some(pos) => &mut self.sessions[pos],
            None => {
                self.sessions.push(SessionMemory {
                    id,
                    send: 0,
                    carrier: 0,
                });
                let last = self.sessions.len() - 1;
                &mut self.sessions[last]
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.streams == 0 && self.lookups == 0 && self.pipe_bytes == 0 && self.sessions.is_empty()
    }
}

/// How the process's fd budget ([`Quotas::fd_budget`]) is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdSplit {
    /// UDP relay sockets (2 per session at most).
    pub relays: usize,
    /// TCP carrier connections: accepted connections (sessions, strangers) and fallback sockets.
    pub tcp: usize,
    /// What is left for outbound streams.
    pub streams: usize,
}

impl FdSplit {
    /// Relays get up to 2 × `max_sessions`, TCP connections up to `tcp_conns` (0 without
    /// `listen_tcp`), each at most a quarter of `budget`; streams the rest.
    pub fn new(budget: usize, max_sessions: usize, tcp_conns: usize) -> FdSplit {
        let relays = max_sessions.saturating_mul(2).min(budget / 4);
        let tcp = tcp_conns.min(budget / 4);
        FdSplit {
            relays,
            tcp,
            streams: budget - relays - tcp,
        }
    }
}

/// Most names remembered as failed; the oldest is forgotten first.
const NEGATIVE_CACHE: usize = 1024;

/// The per-user shares and global totals.
#[derive(Debug)]
pub struct Quotas {
    limits: Limits,
    users: IdMap<UserId, Share>,
    streams: usize,
    lookups: usize,
    buffered: usize,
    /// Names that failed, with when they may be tried again (oldest first).
    failed_names: VecDeque<(String, Instant)>,
}

impl Quotas {
    pub fn new(limits: Limits) -> Quotas {
        Quotas {
            limits,
            users: IdMap::default(),
            streams: 0,
            lookups: 0,
            buffered: 0,
            failed_names: VecDeque::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Streams the fds allow: the soft `RLIMIT_NOFILE` minus the reserve (API, state file, new
    /// users), minus the fds the loop holds anyway (`fixed`: listen sockets, epoll, waker, one
    /// relay socket pair per session allowed).
    pub fn fd_budget(nofile: u64, reserve: u64, fixed: u64) -> usize {
        usize::try_from(nofile.saturating_sub(reserve).saturating_sub(fixed)).unwrap_or(usize::MAX)
    }

    fn share(&mut self, user: UserId) -> &mut Share {
        self.users.entry(user).or_default()
    }

    fn forget_if_idle(&mut self, user: UserId) {
        if self.users.get(&user).is_some_and(Share::is_empty) {
            self.users.remove(&user);
        }
    }

    /// Counts a new outbound stream of `user`, or says which cap refuses it.
    pub fn admit_stream(&mut self, user: UserId) -> Result<(), Refusal> {
        if self.streams >= self.limits.max_streams {
            return Err(Refusal::Streams);
        }
        let per_user = self.limits.max_streams_per_user;
        let share = self.share(user);
        if share.streams >= per_user {
            return Err(Refusal::UserStreams);
        }
        share.streams += 1;
        self.streams += 1;
        Ok(())
    }

    /// A stream admitted by [`Self::admit_stream`] is gone; `pipe_bytes` were its pipe buffers.
    pub fn stream_closed(&mut self, user: UserId, pipe_bytes: usize) {
        if let Some(share) = self.users.get_mut(&user) {
            share.streams = share.streams.saturating_sub(1);
            share.pipe_bytes = share.pipe_bytes.saturating_sub(pipe_bytes);
        }
        self.streams = self.streams.saturating_sub(1);
        self.buffered = self.buffered.saturating_sub(pipe_bytes);
        self.forget_if_idle(user);
    }

    /// Counts a lookup of `name` for `user` (queued or running), or refuses it: the name failed
    /// recently, or the user's share or the pool is full.
    pub fn admit_lookup(&mut self, now: Instant, user: UserId, name: &str) -> Result<(), Refusal> {
        self.failed_names.retain(|(_, until)| *until > now);
        if self.failed_names.iter().any(|(n, _)| n == name) {
            return Err(Refusal::RecentlyFailed);
        }
        if self.lookups >= self.limits.max_lookups {
            return Err(Refusal::Lookups);
        }
        let per_user = self.limits.max_lookups_per_user;
        let share = self.share(user);
        if share.lookups >= per_user {
            return Err(Refusal::UserLookups);
        }
        share.lookups += 1;
        self.lookups += 1;
        Ok(())
    }

    /// The answer of a lookup admitted by [`Self::admit_lookup`] arrived (its thread is free).
    pub fn lookup_finished(&mut self, user: UserId) {
        if let Some(share) = self.users.get_mut(&user) {
            share.lookups = share.lookups.saturating_sub(1);
        }
        self.lookups = self.lookups.saturating_sub(1);
        self.forget_if_idle(user);
    }

    /// `name` failed or did not answer in time: lookups of it fail at once for the negative TTL.
    pub fn name_failed(&mut self, now: Instant, name: &str) {
        if self.failed_names.iter().any(|(n, _)| n == name) {
            return;
        }
        if self.failed_names.len() >= NEGATIVE_CACHE {
            self.failed_names.pop_front();
        }
        self.failed_names
            .push_back((name.to_owned(), now + self.limits.negative_ttl));
    }

    /// The user's pipe buffers grew by `bytes` (a pipe allocated a direction's buffer).
    pub fn pipe_grew(&mut self, user: UserId, bytes: usize) {
        self.share(user).pipe_bytes += bytes;
        self.buffered += bytes;
    }

    /// What session `session` of `user` now holds in its transport send buffers.
    pub fn set_session_buffered(&mut self, user: UserId, session: SessionId, bytes: usize) {
        let old = std::mem::replace(&mut self.share(user).session(session).send, bytes);
        self.buffered = (self.buffered + bytes).saturating_sub(old);
    }

    /// Session `session` of `user` runs over a TCP carrier connection whose frame buffers now
    /// hold `bytes` of storage (only while bytes are in them: 0 for an idle session; charged
    /// like send buffers, freed with the session). The charge is at most half the user's share:
    /// a busy carrier holds its buffers for as long as it is busy, and a share near its minimum
    /// (64 KiB) must still leave room to move bytes.
    pub fn carrier_session(&mut self, user: UserId, session: SessionId, bytes: usize) {
        let bytes = bytes.min(self.limits.max_buffered_per_user / 2);
        let old = std::mem::replace(&mut self.share(user).session(session).carrier, bytes);
        self.buffered = (self.buffered + bytes).saturating_sub(old);
    }

    /// The session is gone: its buffers are freed.
    pub fn session_closed(&mut self, user: UserId, session: SessionId) {
        let Some(share) = self.users.get_mut(&user) else {
            return;
        };
        if let Some(pos) = share.sessions.iter().position(|s| s.id == session) {
            let gone = share.sessions.swap_remove(pos);
            self.buffered = self.buffered.saturating_sub(gone.total());
        }
        self.forget_if_idle(user);
    }

    /// The sessions of `user` (to refresh their buffered bytes).
    pub fn sessions_of(&self, user: UserId) -> impl Iterator<Item = SessionId> + '_ {
        self.users
            .get(&user)
            .into_iter()
            .flat_map(|s| s.sessions.iter().map(|m| m.id))
    }

    /// Bytes `user` may still add to what the server holds for it (its share and the global
    /// cap): how much the loop may read from its destinations' sockets now.
    pub fn buffer_room(&self, user: UserId) -> usize {
        let mine = self.users.get(&user).map_or(0, Share::buffered);
        let user_room = self.limits.max_buffered_per_user.saturating_sub(mine);
        user_room.min(self.limits.max_buffered.saturating_sub(self.buffered))
    }

    /// Whether an open stream whose last byte moved at `last_progress` must be reset now.
    pub fn idle_expired(&self, now: Instant, last_progress: Instant, half_closed: bool) -> bool {
        let timeout = if half_closed {
            self.limits.half_closed_timeout
        } else {
            self.limits.stream_idle_timeout
        };
        now.saturating_duration_since(last_progress) >= timeout
    }

    /// Totals (streams, lookups, buffered bytes), for logs and tests.
    pub fn totals(&self) -> (usize, usize, usize) {
        (self.streams, self.lookups, self.buffered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: UserId = UserId(1);
    const B: UserId = UserId(2);

    fn limits() -> Limits {
        Limits {
            max_streams: 5,
            max_streams_per_user: 3,
            max_lookups: 4,
            max_lookups_per_user: 2,
            max_buffered: 1000,
            max_buffered_per_user: 600,
            stream_idle_timeout: Duration::from_secs(300),
            half_closed_timeout: Duration::from_secs(60),
            lookup_timeout: Duration::from_secs(5),
            negative_ttl: Duration::from_secs(10),
        }
    }

    #[test]
    fn one_user_cannot_take_every_stream_and_closing_gives_the_share_back() {
        let mut q = Quotas::new(limits());
        for _ in 0..3 {
            q.admit_stream(A).unwrap();
        }
        assert_eq!(q.admit_stream(A), Err(Refusal::UserStreams));
        q.admit_stream(B).unwrap();
        q.admit_stream(B).unwrap();
        assert_eq!(q.admit_stream(B), Err(Refusal::Streams), "global cap");
        q.stream_closed(A, 0);
        q.admit_stream(B).unwrap();
        assert_eq!(q.admit_stream(A), Err(Refusal::Streams));
        for _ in 0..3 {
            q.stream_closed(B, 0);
        }
        q.admit_stream(A).unwrap();
        assert_eq!(q.totals().0, 3);
    }

    #[test]
    fn lookups_have_a_per_user_share_released_only_by_the_answer() {
        let now = Instant::now();
        let mut q = Quotas::new(limits());
        q.admit_lookup(now, A, "a1").unwrap();
        q.admit_lookup(now, A, "a2").unwrap();
        assert_eq!(q.admit_lookup(now, A, "a3"), Err(Refusal::UserLookups));
        q.admit_lookup(now, B, "b1").unwrap();
        q.admit_lookup(now, B, "b2").unwrap();
        assert_eq!(q.admit_lookup(now, UserId(3), "c"), Err(Refusal::Lookups));
        q.lookup_finished(A);
        q.admit_lookup(now, UserId(3), "c").unwrap();
        assert_eq!(q.totals().1, 4);
    }

    #[test]
    fn a_failed_name_fails_at_once_until_its_ttl_is_over() {
        let now = Instant::now();
        let mut q = Quotas::new(limits());
        q.name_failed(now, "dead.example");
        q.name_failed(now, "dead.example");
        assert_eq!(q.failed_names.len(), 1);
        assert_eq!(
            q.admit_lookup(now + Duration::from_secs(9), B, "dead.example"),
            Err(Refusal::RecentlyFailed)
        );
        q.admit_lookup(now, B, "alive.example").unwrap();
        q.admit_lookup(now + Duration::from_secs(10), B, "dead.example")
            .unwrap();
        assert!(q.failed_names.is_empty());
    }

    #[test]
    fn the_negative_cache_is_bounded() {
        let now = Instant::now();
        let mut q = Quotas::new(limits());
        for i in 0..NEGATIVE_CACHE + 10 {
            q.name_failed(now, &format!("n{i}.example"));
        }
        assert_eq!(q.failed_names.len(), NEGATIVE_CACHE);
        assert!(
            q.admit_lookup(now, A, "n0.example").is_ok(),
            "oldest forgotten"
        );
    }

    #[test]
    fn buffer_room_counts_sessions_and_pipes_per_user_and_globally() {
        let mut q = Quotas::new(limits());
        let (s1, s2, s3) = (SessionId(1), SessionId(2), SessionId(3));
        assert_eq!(q.buffer_room(A), 600);
        q.set_session_buffered(A, s1, 300);
        q.set_session_buffered(A, s2, 200);
        q.pipe_grew(A, 50);
        assert_eq!(q.buffer_room(A), 50);
        q.set_session_buffered(A, s1, 500);
        assert_eq!(q.buffer_room(A), 0, "saturates, never wraps");
        assert_eq!(q.buffer_room(B), 1000 - 750, "what is left globally");
        q.set_session_buffered(B, s3, 250);
        assert_eq!(q.buffer_room(B), 0);
        // A's session closes: both get room back at once.
        q.session_closed(A, s1);
        assert_eq!(q.buffer_room(A), 350);
        assert_eq!(q.buffer_room(B), 350);
        q.stream_closed(A, 50);
        q.session_closed(A, s2);
        assert_eq!(q.buffer_room(A), 600);
        assert_eq!(q.totals().2, 250);
        assert_eq!(q.sessions_of(B).collect::<Vec<_>>(), vec![s3]);
        assert!(!q.users.contains_key(&A), "an idle user is forgotten");
    }

    #[test]
    fn carrier_frame_buffers_count_like_send_buffers_until_the_session_closes() {
        let mut q = Quotas::new(limits());
        let (s1, s2) = (SessionId(1), SessionId(2));
        q.carrier_session(A, s1, 250);
        assert_eq!(q.buffer_room(A), 350);
        // Send-buffer updates do not forget the carrier's buffers, nor the other way round.
        q.set_session_buffered(A, s1, 100);
        assert_eq!(q.buffer_room(A), 250);
        q.carrier_session(A, s1, 250);
        assert_eq!(q.buffer_room(A), 250, "charged once, not per call");
        q.set_session_buffered(A, s2, 50);
        assert_eq!(q.buffer_room(B), 1000 - 400, "global cap");
        q.session_closed(A, s1);
        assert_eq!(q.buffer_room(A), 550);
        q.session_closed(A, s2);
        assert_eq!(q.totals().2, 0);
        assert!(!q.users.contains_key(&A));
        // Never more than half the share: a small share still leaves room to move bytes.
        q.carrier_session(B, s1, 10_000);
        assert_eq!(q.buffer_room(B), 300);
    }

    #[test]
    fn idle_carrier_sessions_give_their_charge_back_and_leave_room_for_everyone() {
        let mut limits = limits();
        limits.max_buffered = 2_000;
        let mut q = Quotas::new(limits);
        // A's 1,000 carrier sessions were each busy once (a frame buffer held), then went idle:
        // the loop charges what their buffers hold now, 0.
        for i in 0..1_000 {
            q.carrier_session(A, SessionId(i), 250);
            q.carrier_session(A, SessionId(i), 0);
        }
        assert_eq!(q.totals().2, 0);
        assert_eq!(q.buffer_room(B), 600, "another user keeps its whole share");
        assert_eq!(q.buffer_room(A), 600, "and so does A");
        // Busy again: charged while busy, at most half the share each.
        q.carrier_session(A, SessionId(7), 10_000);
        assert_eq!(q.buffer_room(A), 300);
        assert_eq!(q.buffer_room(B), 600);
    }

    #[test]
    fn tcp_connections_take_their_share_of_the_fd_budget() {
        // Without listen_tcp: relays and streams only.
        let udp = FdSplit::new(1000, 100, 0);
        assert_eq!((udp.relays, udp.tcp, udp.streams), (200, 0, 800));
        // With it: sessions + 3 × strangers come off the streams.
        let tcp = FdSplit::new(1000, 100, 100 + 3 * 30);
        assert_eq!((tcp.relays, tcp.tcp, tcp.streams), (200, 190, 610));
        // A small budget: each at most a quarter, streams keep at least half.
        let small = FdSplit::new(700, 1024, 1024 + 768);
        assert_eq!((small.relays, small.tcp, small.streams), (175, 175, 350));
        assert_eq!(FdSplit::new(0, 10, 10).streams, 0);
    }

    #[test]
    fn idle_and_half_closed_timeouts() {
        let q = Quotas::new(limits());
        let t = Instant::now();
        assert!(!q.idle_expired(t + Duration::from_secs(299), t, false));
        assert!(q.idle_expired(t + Duration::from_secs(300), t, false));
        assert!(!q.idle_expired(t + Duration::from_secs(59), t, true));
        assert!(q.idle_expired(t + Duration::from_secs(60), t, true));
        assert!(
            !q.idle_expired(t, t + Duration::from_secs(1), true),
            "clock order"
        );
    }

    #[test]
    fn fd_budget_keeps_the_reserve() {
        assert_eq!(Quotas::fd_budget(1024, 256, 100), 668);
        assert_eq!(Quotas::fd_budget(100, 256, 10), 0);
    }
}
