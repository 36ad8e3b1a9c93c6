//! Server endpoint and client connector: the public face of the protocol core for the data plane.
//!
//! The server endpoint owns the user registry (per-user keys and precomputed hello tags for the
//! current and neighbouring epochs, which double as the bounded hello replay cache), the session
//! table keyed by rotating per-packet tokens (one hash lookup per datagram), roaming, session caps
//! and handshake rate limiting. The client connector runs the handshake (with retries) and then
//! one [`Session`]. Neither reads a clock, a socket or a global RNG.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::crypto::Key32;
use super::handshake::{
    self, CLOCK_WINDOW_SECS, HELLO_TAG_LEN, Hello, MAX_HELLO, MAX_REPLY, MIN_HELLO, RefuseReason,
    Reply, SentHello,
};
use super::packet::{TOKEN_LEN, TokenSink};
use super::psk::{AccessKeyError, UserKeys};
use super::rng::Drbg;
use super::session::{MAX_DATAGRAM, MIN_DATAGRAM, PacketError, Session, SessionConfig};
use super::transport::{CloseReason, Side, TransportEvent};

/// Hello slots per user and epoch: a user can start this many handshakes per epoch (120 s).
pub const HELLO_SLOTS: u16 = 16;
/// Users whose next-epoch tags are prepared per received datagram.
const PREPARE_BATCH: usize = 2;
/// Most hello tags registered per user: epochs `E-1 ..= E+2` (the last one prepared early).
pub const MAX_TAGS_PER_USER: usize = 4 * HELLO_SLOTS as usize;

/// Hasher for keys that are already uniformly random (PRF tokens) or small counters:
/// one multiply-xorshift, no per-process key needed because attackers cannot choose the keys.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn write_u32(&mut self, v: u32) {
        self.0 ^= u64::from(v);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Operator-assigned user number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u32);

/// Index of the local UDP socket a datagram arrived on / must leave from (driver-defined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketIndex(pub u32);

/// Server-side session handle (never reused within an endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Whether a known user may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserState {
    /// Handshakes are accepted.
    Active,
    /// Handshakes get an authenticated refusal with this reason.
    Refused(RefuseReason),
}

/// A datagram the driver must send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Socket to send from (the one the peer's last authenticated packet arrived on).
    pub local: SocketIndex,
    /// Destination.
    pub to: SocketAddr,
    /// Bytes written at the start of the caller's buffer.
    pub len: usize,
}

/// Server endpoint events.
#[derive(Debug)]
pub enum EndpointEvent {
    /// A handshake completed; the session exists now.
    SessionEstablished {
        /// The session.
        session: SessionId,
        /// Its user.
        user: UserId,
        /// Client address.
        peer: SocketAddr,
    },
    /// A session ended (closed by either side, idle timeout, user removal, eviction).
    SessionClosed {
        /// The session (already gone).
        session: SessionId,
        /// Its user.
        user: UserId,
        /// Why.
        reason: CloseReason,
    },
    /// The client's address changed (after an authenticated packet from the new address).
    PeerMigrated {
        /// The session.
        session: SessionId,
        /// New address.
        peer: SocketAddr,
    },
    /// A known user got an authenticated refusal.
    Refused {
        /// Who.
        user: UserId,
        /// Why.
        reason: RefuseReason,
    },
    /// A transport event of a session (streams, datagrams).
    Transport {
        /// The session.
        session: SessionId,
        /// The event.
        event: TransportEvent,
    },
}

/// Server endpoint settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Packet protection and transport settings.
    pub session: SessionConfig,
    /// Global cap on sessions.
    pub max_sessions: usize,
    /// Cap on sessions per user (refusal `SessionLimit` beyond it).
    pub max_sessions_per_user: usize,
    /// Handshakes per second accepted (token bucket refill rate).
    pub handshake_rate: u32,
    /// Token bucket depth (burst of handshakes).
    pub handshake_burst: u32,
    /// Up to this many random padding bytes in replies.
    pub reply_pad_max: u16,
    /// `retry_after` sent with refusals, seconds.
    pub refuse_retry_secs: u16,
    /// Queued handshake replies beyond this are dropped.
    pub max_queued_replies: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            session: SessionConfig::default(),
            max_sessions: 1024,
            max_sessions_per_user: 32,
            handshake_rate: 200,
            handshake_burst: 400,
            reply_pad_max: 256,
            refuse_retry_secs: 60,
            max_queued_replies: 256,
        }
    }
}

/// Server counters (all drops are silent on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams handed to `handle_datagram`.
    pub datagrams_in: u64,
    /// Datagrams matching neither a session token nor a hello tag (garbage, unknown keys, replays of data).
    pub dropped_unknown: u64,
    /// Hellos whose tag was already used (replayed hellos).
    pub hello_replays: u64,
    /// Hellos whose tag matched but which failed authentication or parsing.
    pub hello_bad: u64,
    /// Authenticated hellos outside the clock window.
    pub hello_stale: u64,
    /// Hellos dropped by the handshake rate limiter.
    pub hello_rate_limited: u64,
    /// Sessions created.
    pub sessions_created: u64,
    /// Refusals sent.
    pub refusals_sent: u64,
    /// Data packets dropped by a session (replay, auth failure, bad length).
    pub data_dropped: u64,
    /// Replies dropped because the reply queue was full.
    pub replies_dropped: u64,
    /// Handshake replies (accepts and refusals) queued for sending.
    pub replies_sent: u64,
}

struct TagEntry {
    user: UserId,
    epoch: u64,
    used: bool,
}

struct User {
    keys: UserKeys,
    state: UserState,
    /// Tags currently registered, per epoch.
    tags: Vec<(u64, [u64; HELLO_SLOTS as usize])>,
    sessions: Vec<SessionId>,
}

struct ServerSession {
    session: Session,
    user: UserId,
    local: SocketIndex,
    peer: SocketAddr,
    /// An authenticated packet arrived from the client (the reply was not lost).
    confirmed: bool,
    queued: bool,
    /// In `ServerEndpoint::dirty` (the driver touched it through `session_mut`).
    dirty: bool,
    scheduled: Option<Instant>,
    close_reason: Option<CloseReason>,
}

/// Registers session tokens in the global table.
struct GlobalSink<'a> {
    table: &'a mut IdMap<u64, (SessionId, u64)>,
    session: SessionId,
}

impl TokenSink for GlobalSink<'_> {
    fn insert_token(&mut self, token: u64, pn: u64) {
        self.table.entry(token).or_insert((self.session, pn));
    }
    fn remove_token(&mut self, token: u64, pn: u64) {
        if self.table.get(&token) == Some(&(self.session, pn)) {
            self.table.remove(&token);
        }
    }
}

struct QueuedReply {
    local: SocketIndex,
    to: SocketAddr,
    len: usize,
    bytes: [u8; MAX_REPLY],
}

/// The server side of the protocol for all sockets and sessions.
pub struct ServerEndpoint {
    config: ServerConfig,
    rng: Drbg,
    users: IdMap<u32, User>,
    tags: IdMap<u64, TagEntry>,
    epoch: Option<u64>,
    /// Users whose tags for the epoch after next are not registered yet.
    prepare_queue: Vec<u32>,
    sessions: IdMap<u64, ServerSession>,
    tokens: IdMap<u64, (SessionId, u64)>,
    next_session: u64,
    ready: VecDeque<SessionId>,
    dirty: Vec<SessionId>,
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    replies: VecDeque<Box<QueuedReply>>,
    events: VecDeque<EndpointEvent>,
    bucket_millis: u64,
    bucket_at: Option<Instant>,
    stats: EndpointStats,
    /// Reused by `handle_timeout` (no allocation per call).
    due_scratch: Vec<SessionId>,
}

impl std::fmt::Debug for ServerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerEndpoint")
            .field("users", &self.users.len())
            .field("sessions", &self.sessions.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl ServerEndpoint {
    /// Creates an endpoint. `rng_seed` must come from the OS RNG (fixed only in tests).
    pub fn new(config: ServerConfig, rng_seed: [u8; 32]) -> Self {
        let bucket_millis = u64::from(config.handshake_burst) * 1000;
        ServerEndpoint {
            config,
            rng: Drbg::new(rng_seed),
            users: IdMap::default(),
            tags: IdMap::default(),
            epoch: None,
            prepare_queue: Vec::new(),
            sessions: IdMap::default(),
            tokens: IdMap::default(),
            next_session: 1,
            ready: VecDeque::new(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            replies: VecDeque::new(),
            events: VecDeque::new(),
            bucket_millis,
            bucket_at: None,
            stats: EndpointStats::default(),
            due_scratch: Vec::new(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of registered session tokens (memory accounting, tests).
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Number of registered hello tags (memory accounting, tests).
    pub fn hello_tag_count(&self) -> usize {
        self.tags.len()
    }

    // ----- users -----

    /// Adds or replaces a user. A changed key takes effect for new handshakes; existing sessions stay.
    pub fn set_user(
        &mut self,
        id: UserId,
        access_key: &str,
        state: UserState,
    ) -> Result<(), AccessKeyError> {
        let keys = UserKeys::from_access_key(access_key)?;
        if let Some(user) = self.users.get_mut(&id.0) {
            user.state = state;
            if user.keys.psk == keys.psk {
                return Ok(());
            }
        }
        self.unregister_tags(id);
        let sessions = self
            .users
            .remove(&id.0)
            .map(|u| u.sessions)
            .unwrap_or_default();
        self.users.insert(
            id.0,
            User {
                keys,
                state,
                tags: Vec::new(),
                sessions,
            },
        );
        if let Some(epoch) = self.epoch {
            self.register_tags(id, epoch.saturating_sub(1), epoch + 2);
        }
        Ok(())
    }

    /// Changes whether a user may connect (existing sessions stay; see [`ServerEndpoint::close_user`]).
    pub fn set_user_state(&mut self, id: UserId, state: UserState) -> bool {
        match self.users.get_mut(&id.0) {
            Some(user) => {
                user.state = state;
                true
            }
            None => false,
        }
    }

    /// Refuses new handshakes of a user with `reason` and closes its sessions.
    pub fn refuse_user(
        &mut self,
        now: Instant,
        id: UserId,
        reason: RefuseReason,
        close: CloseReason,
    ) {
        if self.set_user_state(id, UserState::Refused(reason)) {
            self.close_user(now, id, close);
        }
    }

    /// Removes a user: its hellos get silence from now on, its sessions close with `UserDeleted`.
    pub fn remove_user(&mut self, now: Instant, id: UserId) -> bool {
        if !self.users.contains_key(&id.0) {
            return false;
        }
        self.close_user(now, id, CloseReason::UserDeleted);
        self.unregister_tags(id);
        self.users.remove(&id.0);
        true
    }

    /// Gracefully closes every session of a user with `reason`.
    pub fn close_user(&mut self, now: Instant, id: UserId, reason: CloseReason) {
        let sessions = self
            .users
            .get(&id.0)
            .map(|u| u.sessions.clone())
            .unwrap_or_default();
        for sid in sessions {
            self.close_session(now, sid, reason);
        }
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    fn unregister_tags(&mut self, id: UserId) {
        if let Some(user) = self.users.get_mut(&id.0) {
            for (_, tags) in user.tags.drain(..) {
                for tag in tags {
                    if self.tags.get(&tag).is_some_and(|e| e.user == id) {
                        self.tags.remove(&tag);
                    }
                }
            }
        }
    }

    /// Makes the user's registered tags exactly those of epochs `lo ..= hi`.
    fn register_tags(&mut self, id: UserId, lo: u64, hi: u64) {
        let Some(user) = self.users.get_mut(&id.0) else {
            return;
        };
        let tags_table = &mut self.tags;
        user.tags.retain(|(e, tags)| {
            let keep = (lo..=hi).contains(e);
            if !keep {
                for tag in tags {
                    if tags_table.get(tag).is_some_and(|entry| entry.user == id) {
                        tags_table.remove(tag);
                    }
                }
            }
            keep
        });
        for e in lo..=hi {
            if user.tags.iter().any(|(have, _)| *have == e) {
                continue;
            }
            let mut tags = [0u64; HELLO_SLOTS as usize];
            for (slot, tag) in tags.iter_mut().enumerate() {
                *tag = handshake::hello_tag(&user.keys.tag_key, e, slot as u16);
                tags_table.entry(*tag).or_insert(TagEntry {
                    user: id,
                    epoch: e,
                    used: false,
                });
            }
            user.tags.push((e, tags));
        }
    }

    /// Follows the server clock's epoch. The table always holds epochs `E-1 ..= E+1` of every
    /// user; `E+2` is prepared in small batches while datagrams are processed
    /// ([`ServerEndpoint::prepare_next_epoch`]), so a normal rollover costs almost nothing.
    fn advance_epoch(&mut self, unix_secs: u64) {
        let epoch = handshake::epoch_of(unix_secs);
        let Some(current) = self.epoch else {
            self.reset_epoch(epoch);
            return;
        };
        // A step back by one epoch stays inside the registered window: keep it (and its used
        // marks). A larger step back is a clock correction: follow it, or every handshake would
        // fail until the clock caught up again.
        if epoch == current || epoch + 1 == current {
            return;
        }
        if epoch == current + 1 {
            // Finish what the batches did not do yet, then start preparing the next epoch.
            self.prepare_next_epoch(usize::MAX);
            self.epoch = Some(epoch);
            self.prepare_queue = self.users.keys().copied().collect();
            return;
        }
        self.reset_epoch(epoch);
    }

    /// Registers `epoch-1 ..= epoch+1` for every user at once (start, clock jumps).
    fn reset_epoch(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
        let ids: Vec<u32> = self.users.keys().copied().collect();
        for &id in &ids {
            self.register_tags(UserId(id), epoch.saturating_sub(1), epoch + 1);
        }
        self.prepare_queue = ids;
    }

    /// Registers epoch `E+2` (and drops `E-2`) for up to `budget` users.
    fn prepare_next_epoch(&mut self, budget: usize) {
        let Some(epoch) = self.epoch else { return };
        for _ in 0..budget {
            let Some(id) = self.prepare_queue.pop() else {
                break;
            };
            self.register_tags(UserId(id), epoch.saturating_sub(1), epoch + 2);
        }
    }

    // ----- sessions -----

    /// A session, for stream operations and accounting. Marks it for transmission.
    pub fn session_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        let entry = self.sessions.get_mut(&id.0)?;
        if !entry.queued {
            entry.queued = true;
            self.ready.push_back(id);
        }
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(id);
        }
        Some(&mut entry.session)
    }

    /// A session, read-only.
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id.0).map(|s| &s.session)
    }

    /// User and current peer address of a session.
    pub fn session_peer(&self, id: SessionId) -> Option<(UserId, SocketIndex, SocketAddr)> {
        self.sessions.get(&id.0).map(|s| (s.user, s.local, s.peer))
    }

    /// Starts a graceful close of one session with `reason` (the peer is told).
    pub fn close_session(&mut self, now: Instant, id: SessionId, reason: CloseReason) {
        if let Some(entry) = self.sessions.get_mut(&id.0) {
            entry.close_reason.get_or_insert(reason);
            entry.session.close(now, reason);
        }
        self.touch(id);
        if let Some(entry) = self.sessions.get_mut(&id.0) {
            if !entry.dirty {
                entry.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn touch(&mut self, id: SessionId) {
        if let Some(entry) = self.sessions.get_mut(&id.0) {
            if !entry.queued {
                entry.queued = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Drains transport events, reschedules the timer, and removes the session if closed.
    fn after_activity(&mut self, id: SessionId) {
        let Some(entry) = self.sessions.get_mut(&id.0) else {
            return;
        };
        while let Some(event) = entry.session.poll_event() {
            if let TransportEvent::Closed { reason, .. } = &event {
                entry.close_reason.get_or_insert(*reason);
            }
            self.events
                .push_back(EndpointEvent::Transport { session: id, event });
        }
        if entry.session.is_closed() {
            self.remove_session(id);
            return;
        }
        let next = entry.session.poll_timeout();
        if next != entry.scheduled {
            entry.scheduled = next;
            if let Some(at) = next {
                self.timers.push(Reverse((at, id)));
            }
        }
        if self.timers.len() > 4 * self.sessions.len() + 64 {
            self.rebuild_timers();
        }
    }

    fn rebuild_timers(&mut self) {
        self.timers.clear();
        for (id, entry) in &self.sessions {
            if let Some(at) = entry.scheduled {
                self.timers.push(Reverse((at, SessionId(*id))));
            }
        }
    }

    fn remove_session(&mut self, id: SessionId) {
        let Some(mut entry) = self.sessions.remove(&id.0) else {
            return;
        };
        entry.session.release_tokens(&mut GlobalSink {
            table: &mut self.tokens,
            session: id,
        });
        if let Some(user) = self.users.get_mut(&entry.user.0) {
            user.sessions.retain(|s| *s != id);
        }
        let reason = entry.close_reason.unwrap_or(CloseReason::Normal);
        self.events.push_back(EndpointEvent::SessionClosed {
            session: id,
            user: entry.user,
            reason,
        });
    }

    fn process_dirty(&mut self) {
        while let Some(id) = self.dirty.pop() {
            if let Some(entry) = self.sessions.get_mut(&id.0) {
                entry.dirty = false;
            }
            self.after_activity(id);
        }
    }

    // ----- datagrams -----

    /// Handles one received datagram (decrypted in place). Anything that is not an authentic
    /// packet of a live session or a fresh valid hello of a known user is dropped silently.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        unix_secs: u64,
        local: SocketIndex,
        from: SocketAddr,
        data: &mut [u8],
    ) {
        self.stats.datagrams_in += 1;
        self.advance_epoch(unix_secs);
        if !self.prepare_queue.is_empty() {
            self.prepare_next_epoch(PREPARE_BATCH);
        }
        let Some(head) = data.get(..TOKEN_LEN) else {
            self.stats.dropped_unknown += 1;
            return;
        };
        let mut token_bytes = [0u8; TOKEN_LEN];
        token_bytes.copy_from_slice(head);
        let token = u64::from_le_bytes(token_bytes);
        if let Some(&(sid, pn)) = self.tokens.get(&token) {
            self.handle_data(now, sid, pn, local, from, data);
        } else if self.tags.contains_key(&token) {
            self.handle_hello(now, unix_secs, token, local, from, data);
        } else {
            self.stats.dropped_unknown += 1;
        }
    }

    fn handle_data(
        &mut self,
        now: Instant,
        sid: SessionId,
        pn: u64,
        local: SocketIndex,
        from: SocketAddr,
        data: &mut [u8],
    ) {
        let Some(entry) = self.sessions.get_mut(&sid.0) else {
            self.stats.dropped_unknown += 1;
            return;
        };
        let mut sink = GlobalSink {
            table: &mut self.tokens,
            session: sid,
        };
        match entry.session.handle_packet(now, pn, data, &mut sink) {
            Ok(newest) => {
                entry.confirmed = true;
                // Roaming: only an authenticated packet that is the newest so far moves the peer.
                if newest && (entry.peer != from || entry.local != local) {
                    entry.peer = from;
                    entry.local = local;
                    self.events.push_back(EndpointEvent::PeerMigrated {
                        session: sid,
                        peer: from,
                    });
                }
            }
            // Authentic, but the transport rejected it: it is closing the session (CLOSE goes out).
            Err(PacketError::Transport) => entry.confirmed = true,
            Err(_) => {
                self.stats.data_dropped += 1;
                return;
            }
        }
        self.touch(sid);
        self.after_activity(sid);
    }

    fn take_handshake_token(&mut self, now: Instant) -> bool {
        let cap = u64::from(self.config.handshake_burst) * 1000;
        if let Some(at) = self.bucket_at {
            let elapsed_ms = now.saturating_duration_since(at).as_millis() as u64;
            let refill = elapsed_ms.saturating_mul(u64::from(self.config.handshake_rate));
            self.bucket_millis = self.bucket_millis.saturating_add(refill).min(cap);
        }
        self.bucket_at = Some(now);
        if self.bucket_millis >= 1000 {
            self.bucket_millis -= 1000;
            true
        } else {
            false
        }
    }

    fn handle_hello(
        &mut self,
        now: Instant,
        unix_secs: u64,
        tag: u64,
        local: SocketIndex,
        from: SocketAddr,
        data: &mut [u8],
    ) {
        let Some(entry) = self.tags.get(&tag) else {
            return;
        };
        if entry.used {
            self.stats.hello_replays += 1;
            return;
        }
        let (user_id, tag_epoch) = (entry.user, entry.epoch);
        if self.epoch.is_some_and(|e| tag_epoch + 1 < e) {
            // A tag of an epoch that already left the window (not yet cleaned up).
            self.stats.dropped_unknown += 1;
            return;
        }
        if data.len() < MIN_HELLO || data.len() > MAX_HELLO {
            self.stats.hello_bad += 1;
            return;
        }
        if !self.take_handshake_token(now) {
            self.stats.hello_rate_limited += 1;
            return;
        }
        if self.replies.len() >= self.config.max_queued_replies {
            // The driver is not draining replies: drop before doing any work (the client retries).
            self.stats.replies_dropped += 1;
            return;
        }
        let hello_len = data.len();
        let Some(user) = self.users.get(&user_id.0) else {
            return;
        };
        let Ok((hello, header)) = handshake::open_hello(&user.keys.hello_key, data) else {
            self.stats.hello_bad += 1;
            return;
        };
        if usize::from(hello.max_datagram) < MIN_DATAGRAM {
            self.stats.hello_bad += 1;
            return;
        }
        if hello.unix_secs.abs_diff(unix_secs) > CLOCK_WINDOW_SECS
            || handshake::epoch_of(hello.unix_secs) != tag_epoch
        {
            self.stats.hello_stale += 1;
            return;
        }
        if let Some(entry) = self.tags.get_mut(&tag) {
            entry.used = true;
        }
        let psk = user.keys.psk;
        let mut refusal = match user.state {
            UserState::Refused(reason) => Some(reason),
            UserState::Active => None,
        };
        if refusal.is_none() {
            refusal = self.make_room(now, user_id);
        }
        let reply = match refusal {
            Some(reason) => {
                self.stats.refusals_sent += 1;
                self.events.push_back(EndpointEvent::Refused {
                    user: user_id,
                    reason,
                });
                Reply::Refuse {
                    server_unix_secs: unix_secs,
                    reason,
                    retry_after_secs: self.config.refuse_retry_secs,
                }
            }
            None => {
                let server_random = self.rng.bytes32();
                let max_datagram = self
                    .config
                    .session
                    .max_datagram
                    .min(usize::from(hello.max_datagram));
                self.create_session(
                    now,
                    user_id,
                    &psk,
                    &hello,
                    &server_random,
                    max_datagram,
                    local,
                    from,
                );
                Reply::Accept {
                    server_unix_secs: unix_secs,
                    server_random,
                    max_datagram: max_datagram as u16,
                }
            }
        };
        let mut queued = Box::new(QueuedReply {
            local,
            to: from,
            len: 0,
            bytes: [0; MAX_REPLY],
        });
        // Anti-amplification: a reply is never longer than the hello it answers.
        let unpadded = match reply {
            Reply::Accept { .. } => handshake::ACCEPT_LEN,
            Reply::Refuse { .. } => handshake::REFUSE_LEN,
        };
        let room = hello_len
            .saturating_sub(unpadded)
            .min(usize::from(u16::MAX)) as u16;
        let pad = self.config.reply_pad_max.min(room);
        if let Some(len) = handshake::write_reply(
            &psk,
            &header,
            &hello,
            &reply,
            pad,
            &mut self.rng,
            &mut queued.bytes,
        ) {
            queued.len = len;
            self.stats.replies_sent += 1;
            self.replies.push_back(queued);
        }
    }

    /// Applies the caps before a new session of `user`; returns a refusal if there is no room.
    /// Unconfirmed sessions (reply possibly lost) of the same user are evicted first.
    fn make_room(&mut self, now: Instant, user: UserId) -> Option<RefuseReason> {
        let per_user = self.config.max_sessions_per_user;
        let sessions = self
            .users
            .get(&user.0)
            .map(|u| u.sessions.clone())
            .unwrap_or_default();
        if sessions.len() >= per_user || self.sessions.len() >= self.config.max_sessions {
            let unconfirmed = sessions
                .iter()
                .find(|s| self.sessions.get(&s.0).is_some_and(|e| !e.confirmed));
            if let Some(&victim) = unconfirmed {
                let _ = now;
                if let Some(entry) = self.sessions.get_mut(&victim.0) {
                    entry.close_reason = Some(CloseReason::LimitReached);
                }
                self.remove_session(victim);
            }
        }
        let count = self.users.get(&user.0).map_or(0, |u| u.sessions.len());
        if count >= per_user {
            return Some(RefuseReason::SessionLimit);
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Some(RefuseReason::ServerFull);
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn create_session(
        &mut self,
        now: Instant,
        user: UserId,
        psk: &Key32,
        hello: &Hello,
        server_random: &[u8; 32],
        max_datagram: usize,
        local: SocketIndex,
        peer: SocketAddr,
    ) {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let secret = handshake::session_secret(psk, &hello.client_random, server_random);
        let seed = self.rng.bytes32();
        let mut sink = GlobalSink {
            table: &mut self.tokens,
            session: id,
        };
        let session = Session::new(
            &secret,
            Side::Server,
            &self.config.session,
            max_datagram,
            now,
            seed,
            &mut sink,
        );
        self.sessions.insert(
            id.0,
            ServerSession {
                session,
                user,
                local,
                peer,
                confirmed: false,
                queued: false,
                dirty: false,
                scheduled: None,
                close_reason: None,
            },
        );
        if let Some(u) = self.users.get_mut(&user.0) {
            u.sessions.push(id);
        }
        self.stats.sessions_created += 1;
        self.events.push_back(EndpointEvent::SessionEstablished {
            session: id,
            user,
            peer,
        });
        self.touch(id);
        self.after_activity(id);
    }

    /// Next datagram to send: handshake replies first, then sessions round-robin.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.process_dirty();
        if let Some(reply) = self.replies.front() {
            if buf.len() >= reply.len {
                let reply = self.replies.pop_front()?;
                buf[..reply.len].copy_from_slice(&reply.bytes[..reply.len]);
                return Some(Transmit {
                    local: reply.local,
                    to: reply.to,
                    len: reply.len,
                });
            }
            return None;
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(entry) = self.sessions.get_mut(&id.0) else {
                continue;
            };
            if let Some(len) = entry.session.poll_transmit(now, buf) {
                let transmit = Transmit {
                    local: entry.local,
                    to: entry.peer,
                    len,
                };
                self.ready.push_back(id);
                self.after_activity(id);
                return Some(transmit);
            }
            entry.queued = false;
            self.after_activity(id);
        }
        None
    }

    /// Earliest instant at which [`ServerEndpoint::handle_timeout`] must run.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.process_dirty();
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if self
                .sessions
                .get(&id.0)
                .is_some_and(|e| e.scheduled == Some(at))
            {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs every session timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.process_dirty();
        // Collect the due sessions first: a session whose next deadline is still `<= now` after
        // its timer ran (e.g. an ACK that only `poll_transmit` sends) must not be run again in
        // this call, or this loop would never end.
        let mut due = std::mem::take(&mut self.due_scratch);
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.sessions.get_mut(&id.0) else {
                continue;
            };
            if entry.scheduled != Some(at) {
                continue;
            }
            entry.scheduled = None;
            due.push(id);
        }
        for &id in &due {
            let Some(entry) = self.sessions.get_mut(&id.0) else {
                continue;
            };
            entry.session.handle_timeout(now);
            self.touch(id);
            self.after_activity(id);
        }
        due.clear();
        self.due_scratch = due;
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.process_dirty();
        self.events.pop_front()
    }
}

// ===================================================================================== client

/// Client connector settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Packet protection and transport settings.
    pub session: SessionConfig,
    /// Up to this many random padding bytes in hellos.
    pub hello_pad_max: u16,
    /// First hello retransmission delay (doubles up to `max_retry`).
    pub initial_retry: Duration,
    /// Longest delay between hellos.
    pub max_retry: Duration,
    /// Give up the handshake after this long.
    pub handshake_timeout: Duration,
    /// Added to the driver's unix time (e.g. an offset learned from an earlier session).
    pub clock_offset_secs: i64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            session: SessionConfig::default(),
            hello_pad_max: 320,
            initial_retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(8),
            handshake_timeout: Duration::from_secs(30),
            clock_offset_secs: 0,
        }
    }
}

/// Client events.
#[derive(Debug)]
pub enum ClientEvent {
    /// Handshake done; streams can be opened.
    Connected,
    /// The server refused this user (authenticated). The connector is finished.
    Refused {
        /// Why.
        reason: RefuseReason,
        /// Suggested back-off.
        retry_after_secs: u16,
    },
    /// No valid reply within the handshake timeout (wrong key, deleted user, clock off by more than
    /// the window, server unreachable — the server deliberately does not say which).
    HandshakeTimeout,
    /// A transport event (streams, datagrams, `Closed`).
    Transport(TransportEvent),
}

/// Client counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Hellos sent.
    pub hellos_sent: u64,
    /// Datagrams dropped (not a reply to a pending hello, unknown token, failed authentication).
    pub dropped: u64,
}

enum ClientState {
    Handshaking,
    Established,
    Finished,
}

/// Client token table (one session).
#[derive(Default)]
struct LocalSink(IdMap<u64, u64>);

impl TokenSink for LocalSink {
    fn insert_token(&mut self, token: u64, pn: u64) {
        self.0.entry(token).or_insert(pn);
    }
    fn remove_token(&mut self, token: u64, pn: u64) {
        if self.0.get(&token) == Some(&pn) {
            self.0.remove(&token);
        }
    }
}

/// Hellos remembered for matching replies.
const PENDING_HELLOS: usize = 4;

/// The client side: handshake with retries, then one protected session.
pub struct ClientSession {
    config: ClientConfig,
    keys: UserKeys,
    rng: Drbg,
    state: ClientState,
    start: Instant,
    start_unix: u64,
    pending: VecDeque<(SentHello, Key32)>,
    outgoing_hello: Option<(usize, [u8; MAX_HELLO])>,
    next_retry: Instant,
    retry_delay: Duration,
    slot: u16,
    session: Option<Session>,
    tokens: LocalSink,
    events: VecDeque<ClientEvent>,
    clock_offset: Option<i64>,
    stats: ClientStats,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("stats", &self.stats)
            .finish()
    }
}

impl ClientSession {
    /// Starts connecting: the first hello is ready in [`ClientSession::poll_transmit`].
    pub fn connect(
        config: ClientConfig,
        access_key: &str,
        now: Instant,
        unix_secs: u64,
        rng_seed: [u8; 32],
    ) -> Result<Self, AccessKeyError> {
        let keys = UserKeys::from_access_key(access_key)?;
        let mut rng = Drbg::new(rng_seed);
        let slot = rng.up_to(u32::from(HELLO_SLOTS - 1)) as u16;
        let start_unix = unix_secs.saturating_add_signed(config.clock_offset_secs);
        let retry_delay = config.initial_retry;
        let mut client = ClientSession {
            config,
            keys,
            rng,
            state: ClientState::Handshaking,
            start: now,
            start_unix,
            pending: VecDeque::new(),
            outgoing_hello: None,
            next_retry: now,
            retry_delay,
            slot,
            session: None,
            tokens: LocalSink::default(),
            events: VecDeque::new(),
            clock_offset: None,
            stats: ClientStats::default(),
        };
        client.send_hello(now);
        Ok(client)
    }

    fn unix_at(&self, now: Instant) -> u64 {
        self.start_unix + now.saturating_duration_since(self.start).as_secs()
    }

    fn send_hello(&mut self, now: Instant) {
        let unix_secs = self.unix_at(now);
        let epoch = handshake::epoch_of(unix_secs);
        let hello = Hello {
            unix_secs,
            client_random: self.rng.bytes32(),
            max_datagram: self
                .config
                .session
                .max_datagram
                .clamp(MIN_DATAGRAM, MAX_DATAGRAM) as u16,
        };
        let slot = self.slot % HELLO_SLOTS;
        self.slot = self.slot.wrapping_add(1);
        let mut bytes = [0u8; MAX_HELLO];
        let pad = self.config.hello_pad_max;
        let written = handshake::write_hello(
            &self.keys.hello_key,
            &self.keys.tag_key,
            epoch,
            slot,
            &hello,
            pad,
            &mut self.rng,
            &mut bytes,
        );
        if let Some((len, sent)) = written {
            let reply_key = handshake::reply_key(&self.keys.psk, &hello.client_random);
            if self.pending.len() == PENDING_HELLOS {
                self.pending.pop_front();
            }
            self.pending.push_back((sent, reply_key));
            self.outgoing_hello = Some((len, bytes));
            self.stats.hellos_sent += 1;
        }
        self.next_retry = now + self.retry_delay;
        self.retry_delay = (self.retry_delay * 2).min(self.config.max_retry);
    }

    /// Handles a datagram from the server (decrypted in place).
    pub fn handle_datagram(&mut self, now: Instant, data: &mut [u8]) {
        match self.state {
            ClientState::Handshaking => self.handle_reply(now, data),
            ClientState::Established => {
                let token = data
                    .get(..TOKEN_LEN)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes);
                let (Some(token), Some(session)) = (token, self.session.as_mut()) else {
                    self.stats.dropped += 1;
                    return;
                };
                let Some(&pn) = self.tokens.0.get(&token) else {
                    self.stats.dropped += 1;
                    return;
                };
                if session
                    .handle_packet(now, pn, data, &mut self.tokens)
                    .is_err()
                {
                    self.stats.dropped += 1;
                }
                self.drain_session();
            }
            ClientState::Finished => self.stats.dropped += 1,
        }
    }

    fn handle_reply(&mut self, now: Instant, data: &[u8]) {
        let found = self.pending.iter().find_map(|(sent, key)| {
            handshake::open_reply(key, sent, data)
                .ok()
                .map(|r| (r, sent.hello))
        });
        let Some((reply, hello)) = found else {
            self.stats.dropped += 1;
            return;
        };
        let local_unix = self.unix_at(now);
        match reply {
            Reply::Accept {
                server_unix_secs,
                server_random,
                max_datagram,
            } => {
                self.clock_offset = Some(
                    server_unix_secs as i64 - local_unix as i64 + self.config.clock_offset_secs,
                );
                let secret =
                    handshake::session_secret(&self.keys.psk, &hello.client_random, &server_random);
                let max = self
                    .config
                    .session
                    .max_datagram
                    .min(usize::from(max_datagram));
                let seed = self.rng.bytes32();
                let session = Session::new(
                    &secret,
                    Side::Client,
                    &self.config.session,
                    max,
                    now,
                    seed,
                    &mut self.tokens,
                );
                self.session = Some(session);
                self.pending.clear();
                self.outgoing_hello = None;
                self.state = ClientState::Established;
                self.events.push_back(ClientEvent::Connected);
            }
            Reply::Refuse {
                server_unix_secs,
                reason,
                retry_after_secs,
            } => {
                self.clock_offset = Some(
                    server_unix_secs as i64 - local_unix as i64 + self.config.clock_offset_secs,
                );
                self.pending.clear();
                self.outgoing_hello = None;
                self.state = ClientState::Finished;
                self.events.push_back(ClientEvent::Refused {
                    reason,
                    retry_after_secs,
                });
            }
        }
    }

    fn drain_session(&mut self) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        while let Some(event) = session.poll_event() {
            self.events.push_back(ClientEvent::Transport(event));
        }
        if session.is_closed() {
            session.release_tokens(&mut self.tokens);
            self.state = ClientState::Finished;
        }
    }

    /// Next datagram to send to the server.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if let Some((len, bytes)) = self.outgoing_hello.take() {
            if buf.len() < len {
                return None;
            }
            buf[..len].copy_from_slice(&bytes[..len]);
            return Some(len);
        }
        if !matches!(self.state, ClientState::Established) {
            return None;
        }
        let len = self.session.as_mut()?.poll_transmit(now, buf);
        self.drain_session();
        len
    }

    /// Earliest instant at which [`ClientSession::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            ClientState::Handshaking => Some(
                self.next_retry
                    .min(self.start + self.config.handshake_timeout),
            ),
            ClientState::Established => self.session.as_ref()?.poll_timeout(),
            ClientState::Finished => None,
        }
    }

    /// Retransmits the hello (a new one: fresh randomness, next slot) or runs session timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            ClientState::Handshaking => {
                if now >= self.start + self.config.handshake_timeout {
                    self.state = ClientState::Finished;
                    self.pending.clear();
                    self.outgoing_hello = None;
                    self.events.push_back(ClientEvent::HandshakeTimeout);
                } else if now >= self.next_retry {
                    self.send_hello(now);
                }
            }
            ClientState::Established => {
                if let Some(session) = self.session.as_mut() {
                    session.handle_timeout(now);
                }
                self.drain_session();
            }
            ClientState::Finished => {}
        }
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The session once connected (stream operations go through `transport_mut()`).
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.session.as_mut()
    }

    /// The session once connected.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Gracefully closes the session with `reason`.
    pub fn close(&mut self, now: Instant, reason: CloseReason) {
        match self.session.as_mut() {
            Some(session) => session.close(now, reason),
            None => {
                self.state = ClientState::Finished;
                self.outgoing_hello = None;
            }
        }
        self.drain_session();
    }

    /// True once connected.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, ClientState::Established)
    }

    /// True when nothing more will happen (refused, timed out, or closed).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, ClientState::Finished)
    }

    /// `server clock − client clock` in seconds, learned from the last authenticated reply.
    /// Feed it back as `ClientConfig::clock_offset_secs` on the next connect.
    pub fn server_clock_offset(&self) -> Option<i64> {
        self.clock_offset
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }
}

/// True if `data` could be a hello by length alone (used by fuzzing and tests).
pub fn plausible_hello_len(len: usize) -> bool {
    (MIN_HELLO..=MAX_HELLO).contains(&len) && len > HELLO_TAG_LEN
}
