//! The epoch and hello-tag table: finds the user of a hello in one hash lookup, and remembers the
//! hellos answered per user and epoch so that each hello is answered at most once.
//!
//! Invariant: once the epoch `E` is known, the table holds the tags of epochs `E-1 ..= E+1` of every
//! user; `E+2` is prepared in small batches ([`HelloTags::advance`]) so that the rollover to
//! `E+1` costs almost nothing. The same batch drops `E-2`, which is never matched meanwhile; so a
//! user holds at most four epochs (`E-2 ..= E+1` before its batch, `E-1 ..= E+2` after). A hello of epoch `e` can
//! pass the server's clock check only while the server is in `e-1 ..= e+1`, so the record of
//! answered hellos, kept with the epoch's tags, covers the whole time a replay could be accepted.
//!
//! The record survives a restart through [`HelloTags::export_answered`] and
//! [`HelloTags::import_answered`]: each user and epoch is written with one of its tags (not its
//! user number or key), so the record finds its user again in the next run by the same lookup
//! as a hello, and only epochs still inside the window are kept. A record says whether it is
//! complete (written at a graceful stop) or a snapshot of a running server, which may have
//! answered more hellos after it (see [`ImportedRecord::complete`]).
//!
//! Tags are not single-use: several hellos of one key (devices sharing it) may carry the same tag.
//! What makes a hello a replay is its nonce, which the key holder picks at random per hello and
//! which an attacker cannot change without failing authentication.

use super::{IdMap, UserId};
use crate::proto::crypto::Key32;
use crate::proto::handshake::{self, HELLO_SLOTS, HELLO_TAG_LEN};

/// Users whose next-epoch tags are prepared per received datagram.
const PREPARE_BATCH: usize = 2;
/// Most hello tags registered per user: four epochs (see the module invariant).
pub const MAX_TAGS_PER_USER: usize = 4 * HELLO_SLOTS as usize;
/// Most hellos of one key answered (accepted or refused) per epoch of their tags; further fresh
/// hellos of that key and epoch get silence. Memory: 8 bytes per answered hello, so at most
/// 2 KiB per key and epoch and 8 KiB per key (four epochs held); in total at most what the
/// handshake rate limiter lets through in four epochs.
pub const MAX_HANDSHAKES_PER_EPOCH: usize = 256;
/// First bytes of an exported record (format version 2: then one flags byte, see
/// [`RECORD_COMPLETE`]).
const RECORD_MAGIC: &[u8; 8] = b"OSTPHLO2";
/// Version 1 records (no flags byte) are read as incomplete.
const RECORD_MAGIC_V1: &[u8; 8] = b"OSTPHLO1";
/// Flag: the record is complete (the server stopped after writing it).
const RECORD_COMPLETE: u8 = 1;

/// What [`HelloTags::import_answered`] took from a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportedRecord {
    /// Answered hellos added.
    pub added: usize,
    /// The record was written at a graceful stop, so it holds every hello the previous run
    /// answered. An incomplete one (a crash) may miss the hellos answered after it was written.
    pub complete: bool,
}

/// Why an exported record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// It does not start with the record's magic bytes.
    NotARecord,
    /// It ends in the middle of an entry.
    Truncated,
    /// An entry holds more than [`MAX_HANDSHAKES_PER_EPOCH`] fingerprints.
    TooManyFingerprints,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotARecord => "not a record of answered hellos",
            Self::Truncated => "truncated",
            Self::TooManyFingerprints => "an entry holds too many hellos",
        })
    }
}

impl std::error::Error for RecordError {}

/// 8 bytes, so a table bucket with its tag is 16, not 24 (about 64 tags per user).
struct TagEntry {
    user: UserId,
    /// The epoch (2-minute steps since 1970: 32 bits last for 16,000 years; a clock beyond
    /// that registers epochs that never match).
    epoch: u32,
}

/// The tags of one user and epoch, and the hellos answered with them.
struct EpochTags {
    epoch: u64,
    /// Fingerprints ([`hello_fingerprint`]) of the answered hellos, sorted, at most
    /// [`MAX_HANDSHAKES_PER_EPOCH`].
    answered: Vec<u64>,
}

struct UserTags {
    tag_key: Key32,
    epochs: Vec<EpochTags>,
}

/// What a tag found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagMatch {
    /// The tag's user.
    pub user: UserId,
    /// The epoch the tag belongs to.
    pub epoch: u64,
}

/// Why a hello whose tag matched must get silence without being authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloDrop {
    /// This hello was answered already (a replay).
    Replay,
    /// Its key already had [`MAX_HANDSHAKES_PER_EPOCH`] hellos answered in the tag's epoch.
    KeyLimit,
}

/// The replay fingerprint of a hello: the first 8 bytes of its random nonce (bytes `8..16`).
/// `None` if the datagram is too short to be a hello.
pub fn hello_fingerprint(hello: &[u8]) -> Option<u64> {
    let bytes = hello.get(HELLO_TAG_LEN..HELLO_TAG_LEN + 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Hello tags of every user for the epochs around the server clock's.
#[derive(Default)]
pub struct HelloTags {
    table: IdMap<u64, TagEntry>,
    users: IdMap<u32, UserTags>,
    epoch: Option<u64>,
    /// Users whose tags for the epoch after next are not registered yet.
    prepare_queue: Vec<u32>,
    /// Hellos recorded so far (tells the driver when the record changed).
    recorded: u64,
}

impl HelloTags {
    /// Number of registered tags (memory accounting, tests).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True if no tag is registered.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The server clock's epoch, once a datagram was seen.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Registers (or replaces) a user's tag key; its tags of `E-1 ..= E+2` are registered at once.
    pub fn set_user(&mut self, id: UserId, tag_key: &Key32) {
        self.remove_user(id);
        self.users.insert(
            id.0,
            UserTags {
                tag_key: *tag_key,
                epochs: Vec::new(),
            },
        );
        if let Some(epoch) = self.epoch {
            self.register(id, epoch.saturating_sub(1), epoch + 2);
        }
    }

    /// Forgets a user: its hellos match nothing from now on.
    pub fn remove_user(&mut self, id: UserId) {
        if let Some(user) = self.users.remove(&id.0) {
            for e in &user.epochs {
                unregister(&mut self.table, id, &user.tag_key, e.epoch);
            }
        }
    }

    /// The user and epoch of `tag`, if it is registered and its epoch is still inside the window.
    pub fn lookup(&self, tag: u64) -> Option<TagMatch> {
        let entry = self.table.get(&tag)?;
        let epoch = u64::from(entry.epoch);
        if self.epoch.is_some_and(|e| epoch + 1 < e) {
            // A tag of an epoch that already left the window (not yet cleaned up).
            return None;
        }
        Some(TagMatch {
            user: entry.user,
            epoch,
        })
    }

    /// True if `tag` is registered (even if its epoch already left the window).
    pub fn contains(&self, tag: u64) -> bool {
        self.table.contains_key(&tag)
    }

    /// Whether a hello with this tag and fingerprint may be answered (checked before the hello is
    /// authenticated: a binary search over at most [`MAX_HANDSHAKES_PER_EPOCH`] entries).
    pub fn check(&self, found: TagMatch, fingerprint: u64) -> Result<(), HelloDrop> {
        let answered = self
            .epoch_tags(found)
            .map_or(&[][..], |e| e.answered.as_slice());
        if answered.binary_search(&fingerprint).is_ok() {
            Err(HelloDrop::Replay)
        } else if answered.len() >= MAX_HANDSHAKES_PER_EPOCH {
            Err(HelloDrop::KeyLimit)
        } else {
            Ok(())
        }
    }

    /// Records an authenticated hello that is about to be answered: the same hello (same
    /// fingerprint) is a replay from now on. Fails like [`HelloTags::check`].
    pub fn record(&mut self, found: TagMatch, fingerprint: u64) -> Result<(), HelloDrop> {
        let epoch = self
            .users
            .get_mut(&found.user.0)
            .and_then(|u| u.epochs.iter_mut().find(|e| e.epoch == found.epoch))
            .ok_or(HelloDrop::KeyLimit)?;
        match epoch.answered.binary_search(&fingerprint) {
            Ok(_) => Err(HelloDrop::Replay),
            Err(_) if epoch.answered.len() >= MAX_HANDSHAKES_PER_EPOCH => Err(HelloDrop::KeyLimit),
            Err(at) => {
                epoch.answered.insert(at, fingerprint);
                self.recorded += 1;
                Ok(())
            }
        }
    }

    /// How many hellos were recorded since the table was created (grows with every change of
    /// the record).
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// The record of answered hellos of the epochs still inside the window, for
    /// [`HelloTags::import_answered`] after a restart: per user and epoch, one tag of that epoch
    /// and the fingerprints (8 + 8 + 2 + 8 × n bytes), after 8 magic bytes and a flags byte
    /// saying whether it is `complete` (nothing will be answered after it: a graceful stop).
    pub fn export_answered(&self, complete: bool) -> Vec<u8> {
        let mut out = RECORD_MAGIC.to_vec();
        out.push(if complete { RECORD_COMPLETE } else { 0 });
        let Some(current) = self.epoch else {
            return out;
        };
        let live = self
            .users
            .values()
            .flat_map(|u| u.epochs.iter().map(move |e| (&u.tag_key, e)));
        for (key, e) in live.filter(|(_, e)| e.epoch + 1 >= current && !e.answered.is_empty()) {
            out.extend_from_slice(&e.epoch.to_le_bytes());
            let tag = handshake::hello_tag(key, e.epoch, 0);
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&(e.answered.len() as u16).to_le_bytes());
            for fingerprint in &e.answered {
                out.extend_from_slice(&fingerprint.to_le_bytes());
            }
        }
        out
    }

    /// Adds an exported record to the answered hellos; call once the clock is known
    /// ([`HelloTags::advance`]) and the users are registered. Entries of users no longer
    /// registered (or re-keyed) and of epochs that left the window are skipped. Returns how many
    /// hellos were added and whether the record was complete; a malformed record adds nothing.
    pub fn import_answered(&mut self, record: &[u8]) -> Result<ImportedRecord, RecordError> {
        let (complete, entries) = parse_record(record)?;
        // Register E+2 for everyone now, so its entries find their tags too.
        self.prepare_next_epoch(usize::MAX);
        let mut added = 0;
        for (epoch, tag, fingerprints) in entries {
            let Some(found) = self.lookup(tag).filter(|m| m.epoch == epoch) else {
                continue;
            };
            for fingerprint in fingerprints.chunks_exact(8) {
                let fingerprint = u64::from_le_bytes(fingerprint.try_into().unwrap_or_default());
                if self.record(found, fingerprint).is_ok() {
                    added += 1;
                }
            }
        }
        Ok(ImportedRecord { added, complete })
    }

    fn epoch_tags(&self, found: TagMatch) -> Option<&EpochTags> {
        self.users
            .get(&found.user.0)?
            .epochs
            .iter()
            .find(|e| e.epoch == found.epoch)
    }

    /// Follows the server clock and prepares the next epoch's tags of a few users. Call once per
    /// received datagram.
    pub fn advance(&mut self, unix_secs: u64) {
        self.advance_epoch(unix_secs);
        if !self.prepare_queue.is_empty() {
            self.prepare_next_epoch(PREPARE_BATCH);
        }
    }

    /// Makes the user's registered tags exactly those of epochs `lo ..= hi`.
    fn register(&mut self, id: UserId, lo: u64, hi: u64) {
        let Some(user) = self.users.get_mut(&id.0) else {
            return;
        };
        let table = &mut self.table;
        user.epochs.retain(|e| {
            let keep = (lo..=hi).contains(&e.epoch);
            if !keep {
                unregister(table, id, &user.tag_key, e.epoch);
            }
            keep
        });
        for epoch in lo..=hi {
            if user.epochs.iter().any(|e| e.epoch == epoch) {
                continue;
            }
            for slot in 0..HELLO_SLOTS {
                let tag = handshake::hello_tag(&user.tag_key, epoch, slot);
                table.entry(tag).or_insert(TagEntry {
                    user: id,
                    epoch: u32::try_from(epoch).unwrap_or(u32::MAX),
                });
            }
            user.epochs.push(EpochTags {
                epoch,
                answered: Vec::new(),
            });
        }
    }

    fn advance_epoch(&mut self, unix_secs: u64) {
        let epoch = handshake::epoch_of(unix_secs);
        let Some(current) = self.epoch else {
            self.reset_epoch(epoch);
            return;
        };
        // A step back by one epoch stays inside the registered window: keep it (and its record
        // of answered hellos). A larger step back is a clock correction: follow it, or every handshake would
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
            self.register(UserId(id), epoch.saturating_sub(1), epoch + 1);
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
            self.register(UserId(id), epoch.saturating_sub(1), epoch + 2);
        }
    }
}

/// One entry of an exported record: `(epoch, tag, fingerprint bytes)`.
type RecordEntry<'a> = (u64, u64, &'a [u8]);

/// The entries of an exported record.
/// Whether the record is complete, and its entries.
fn parse_record(record: &[u8]) -> Result<(bool, Vec<RecordEntry<'_>>), RecordError> {
    let (complete, mut rest) = if let Some(v1) = record.strip_prefix(RECORD_MAGIC_V1.as_slice()) {
        (false, v1)
    } else {
        let v2 = record
            .strip_prefix(RECORD_MAGIC.as_slice())
            .ok_or(RecordError::NotARecord)?;
        let (&flags, rest) = v2.split_first().ok_or(RecordError::Truncated)?;
        (flags & RECORD_COMPLETE != 0, rest)
    };
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(18).ok_or(RecordError::Truncated)?;
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let count = usize::from(u16::from_le_bytes([head[16], head[17]]));
        if count > MAX_HANDSHAKES_PER_EPOCH {
            return Err(RecordError::TooManyFingerprints);
        }
        let (fingerprints, tail) = tail
            .split_at_checked(8 * count)
            .ok_or(RecordError::Truncated)?;
        entries.push((word(0), word(8), fingerprints));
        rest = tail;
    }
    Ok((complete, entries))
}

/// Removes one user-epoch's tags from the table (unless another user owns a colliding tag).
/// The tags are derived again (16 per user and epoch, once per epoch), not kept: 512 bytes
/// less per user.
fn unregister(table: &mut IdMap<u64, TagEntry>, id: UserId, tag_key: &Key32, epoch: u64) {
    for slot in 0..HELLO_SLOTS {
        let tag = handshake::hello_tag(tag_key, epoch, slot);
        if table.get(&tag).is_some_and(|entry| entry.user == id) {
            table.remove(&tag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake::EPOCH_SECS;

    const E: u64 = 15_000_000;
    const UNIX: u64 = E * EPOCH_SECS;

    fn key(i: u32) -> Key32 {
        let mut k = [7u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k
    }

    fn table(users: u32) -> HelloTags {
        let mut t = HelloTags::default();
        for i in 0..users {
            t.set_user(UserId(i), &key(i));
        }
        t
    }

    fn epochs_of(t: &HelloTags, id: u32) -> Vec<u64> {
        let mut e: Vec<u64> = t.users[&id].epochs.iter().map(|e| e.epoch).collect();
        e.sort_unstable();
        e
    }

    fn found(t: &HelloTags, id: u32, epoch: u64, slot: u16) -> Option<TagMatch> {
        t.lookup(handshake::hello_tag(&key(id), epoch, slot))
    }

    /// Every user holds `E-1 ..= E+1`, and either `E-2` (batch not done yet) or `E+2` (done) or
    /// neither (just reset); the count matches the table.
    fn assert_window(t: &HelloTags, users: u32) {
        let e = t.epoch().unwrap();
        let mut total = 0;
        for id in 0..users {
            let held = epochs_of(t, id);
            assert!(
                held == [e - 1, e, e + 1]
                    || held == [e - 2, e - 1, e, e + 1]
                    || held == [e - 1, e, e + 1, e + 2],
                "user {id} holds {held:?} at {e}"
            );
            total += held.len() * HELLO_SLOTS as usize;
        }
        assert_eq!(t.len(), total);
    }

    #[test]
    fn window_is_e_minus_1_to_e_plus_1_with_e_plus_2_prepared_in_batches() {
        let users = 10;
        let mut t = table(users);
        assert!(t.is_empty(), "nothing before the clock is known");
        t.advance(UNIX);
        assert_window(&t, users);
        assert!(t.len() < users as usize * MAX_TAGS_PER_USER);
        for _ in 0..users / PREPARE_BATCH as u32 {
            t.advance(UNIX + 1);
        }
        assert_eq!(t.len(), users as usize * MAX_TAGS_PER_USER, "E+2 prepared");
        // Rollovers, with few datagrams per epoch: the window follows, never more than 4 epochs.
        for step in 1..=5 {
            t.advance(UNIX + step * EPOCH_SECS);
            assert_eq!(t.epoch(), Some(E + step));
            assert_window(&t, users);
            t.advance(UNIX + step * EPOCH_SECS + 1);
            assert_window(&t, users);
        }
        // Epochs below E-1 are never matched (even while still held), E-1 ..= E+1 always are.
        t.advance(UNIX + 6 * EPOCH_SECS);
        assert!(epochs_of(&t, 0).contains(&(E + 4)), "E-2 not dropped yet");
        let e = E + 6;
        for id in 0..users {
            assert_eq!(found(&t, id, e - 2, 0), None);
            for epoch in e - 1..=e + 1 {
                assert_eq!(
                    found(&t, id, epoch, 15),
                    Some(TagMatch {
                        user: UserId(id),
                        epoch
                    })
                );
            }
        }
    }

    #[test]
    fn a_user_added_or_rekeyed_later_gets_its_tags_at_once_and_removal_clears_them() {
        let mut t = table(1);
        t.advance(UNIX);
        t.set_user(UserId(5), &key(5));
        assert_eq!(epochs_of(&t, 5), [E - 1, E, E + 1, E + 2]);
        assert!(found(&t, 5, E, 3).is_some());
        // A new key replaces the old tags.
        t.set_user(UserId(5), &key(6));
        assert!(found(&t, 5, E, 3).is_none());
        assert_eq!(
            t.lookup(handshake::hello_tag(&key(6), E, 3))
                .map(|m| m.user),
            Some(UserId(5))
        );
        t.remove_user(UserId(5));
        assert!(t.lookup(handshake::hello_tag(&key(6), E, 3)).is_none());
        assert_window(&t, 1);
    }

    #[test]
    fn every_answered_hello_is_a_replay_while_other_hellos_with_the_same_tag_pass() {
        let mut t = table(2);
        t.advance(UNIX);
        let m = found(&t, 0, E, 4).unwrap();
        assert_eq!(t.check(m, 42), Ok(()));
        assert_eq!(t.record(m, 42), Ok(()));
        assert_eq!(t.check(m, 42), Err(HelloDrop::Replay));
        assert_eq!(t.record(m, 42), Err(HelloDrop::Replay));
        // Another hello of the same key and tag, and the same nonce under another user or epoch.
        assert_eq!(t.check(m, 43), Ok(()));
        assert_eq!(t.check(found(&t, 1, E, 4).unwrap(), 42), Ok(()));
        assert_eq!(t.check(found(&t, 0, E + 1, 4).unwrap(), 42), Ok(()));
        // Every slot of the epoch shares the record.
        assert_eq!(
            t.check(found(&t, 0, E, 9).unwrap(), 42),
            Err(HelloDrop::Replay)
        );
        // The record lives as long as the epoch's tags can be answered: through E+1...
        t.advance(UNIX + EPOCH_SECS);
        assert_eq!(t.check(m, 42), Err(HelloDrop::Replay));
        // ...a step back by one epoch keeps it...
        t.advance(UNIX + 1);
        assert_eq!(t.check(m, 42), Err(HelloDrop::Replay));
        // ...and at E+2 the tag itself is gone.
        t.advance(UNIX + 2 * EPOCH_SECS);
        assert_eq!(found(&t, 0, E, 4), None);
    }

    #[test]
    fn a_key_gets_at_most_max_handshakes_per_epoch_and_replays_stay_replays() {
        let mut t = table(1);
        t.advance(UNIX);
        let m = found(&t, 0, E, 0).unwrap();
        // Fingerprints in a scrambled order: the record stays sorted.
        let fp = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for i in 0..MAX_HANDSHAKES_PER_EPOCH as u64 {
            assert_eq!(t.record(m, fp(i)), Ok(()), "hello {i}");
        }
        assert_eq!(t.check(m, fp(1_000)), Err(HelloDrop::KeyLimit));
        assert_eq!(t.record(m, fp(1_000)), Err(HelloDrop::KeyLimit));
        for i in 0..MAX_HANDSHAKES_PER_EPOCH as u64 {
            assert_eq!(t.check(m, fp(i)), Err(HelloDrop::Replay));
        }
        // The next epoch has its own allowance.
        assert_eq!(t.check(found(&t, 0, E + 1, 0).unwrap(), fp(1_000)), Ok(()));
        let answered = &t.users[&0]
            .epochs
            .iter()
            .find(|e| e.epoch == E)
            .unwrap()
            .answered;
        assert_eq!(answered.len(), MAX_HANDSHAKES_PER_EPOCH);
        assert!(answered.capacity() <= MAX_HANDSHAKES_PER_EPOCH);
    }

    #[test]
    fn a_large_clock_step_back_moves_the_window() {
        let mut t = table(3);
        t.advance(UNIX + 10 * EPOCH_SECS);
        t.advance(UNIX);
        assert_eq!(t.epoch(), Some(E));
        assert_window(&t, 3);
        assert_eq!(found(&t, 0, E + 10, 0), None);
    }

    #[test]
    fn the_answered_record_survives_export_and_import_into_a_new_table() {
        let mut t = table(3);
        t.advance(UNIX);
        let m0 = found(&t, 0, E, 4).unwrap();
        let m2 = found(&t, 2, E + 1, 9).unwrap();
        let old = found(&t, 1, E - 1, 0).unwrap();
        for fp in [5, 42, 7] {
            t.record(m0, fp).unwrap();
        }
        t.record(m2, 99).unwrap();
        t.record(old, 1).unwrap();
        assert_eq!(t.recorded(), 5);
        // One epoch later, E-1 has left the window: it is not exported.
        t.advance(UNIX + EPOCH_SECS);
        let record = t.export_answered(true);
        assert_eq!(record.len(), 9 + 2 * 18 + 4 * 8);
        // A restarted server: users 0 and 2 known (user 1 deleted meanwhile), clock at E+1.
        let mut fresh = HelloTags::default();
        fresh.set_user(UserId(10), &key(0));
        fresh.set_user(UserId(12), &key(2));
        fresh.advance(UNIX + EPOCH_SECS);
        let imported = |added| {
            Ok(ImportedRecord {
                added,
                complete: true,
            })
        };
        assert_eq!(fresh.import_answered(&record), imported(4));
        let m0 = TagMatch {
            user: UserId(10),
            epoch: E,
        };
        for fp in [5, 42, 7] {
            assert_eq!(fresh.check(m0, fp), Err(HelloDrop::Replay));
        }
        assert_eq!(fresh.check(m0, 8), Ok(()));
        let m2 = fresh
            .lookup(handshake::hello_tag(&key(2), E + 1, 3))
            .unwrap();
        assert_eq!(fresh.check(m2, 99), Err(HelloDrop::Replay));
        // Importing twice adds nothing; a re-keyed user's entries are skipped.
        assert_eq!(fresh.import_answered(&record), imported(0));
        let mut rekeyed = HelloTags::default();
        rekeyed.set_user(UserId(10), &key(7));
        rekeyed.advance(UNIX + EPOCH_SECS);
        assert_eq!(rekeyed.import_answered(&record), imported(0));
        // Two epochs later nothing of it is in the window any more.
        let mut late = HelloTags::default();
        late.set_user(UserId(10), &key(0));
        late.advance(UNIX + 3 * EPOCH_SECS);
        assert_eq!(late.import_answered(&record), imported(0));
        assert!(late.export_answered(false).len() <= RECORD_MAGIC.len() + 1);
    }

    #[test]
    fn a_malformed_record_is_refused_whole() {
        let mut t = table(1);
        t.advance(UNIX);
        t.record(found(&t, 0, E, 0).unwrap(), 3).unwrap();
        let record = t.export_answered(false);
        let mut fresh = table(1);
        fresh.advance(UNIX);
        assert_eq!(
            fresh.import_answered(b"garbage!"),
            Err(RecordError::NotARecord)
        );
        assert_eq!(
            fresh.import_answered(&record[..record.len() - 1]),
            Err(RecordError::Truncated)
        );
        let mut huge = record[..9 + 16].to_vec();
        huge.extend_from_slice(&300u16.to_le_bytes());
        huge.extend_from_slice(&[0; 300 * 8]);
        assert_eq!(
            fresh.import_answered(&huge),
            Err(RecordError::TooManyFingerprints)
        );
        assert_eq!(
            fresh.import_answered(RECORD_MAGIC),
            Err(RecordError::Truncated),
            "no flags byte"
        );
        assert_eq!(fresh.recorded(), 0);
        let incomplete = |added| {
            Ok(ImportedRecord {
                added,
                complete: false,
            })
        };
        assert_eq!(fresh.import_answered(&record), incomplete(1));
        // A version 1 record (no flags byte) is read, as incomplete.
        let mut v1 = RECORD_MAGIC_V1.to_vec();
        v1.extend_from_slice(&record[9..]);
        assert_eq!(fresh.import_answered(&v1), incomplete(0), "already known");
        assert_eq!(fresh.import_answered(RECORD_MAGIC_V1), incomplete(0));
    }

    #[test]
    fn short_datagrams_have_no_fingerprint() {
        assert_eq!(hello_fingerprint(&[0; 15]), None);
        let mut hello = [0u8; 16];
        hello[8] = 1;
        assert_eq!(hello_fingerprint(&hello), Some(1));
    }
}
