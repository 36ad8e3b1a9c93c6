//! The epoch and hello-tag table: finds the user of a hello in one hash lookup and remembers which
//! tags were used.
//!
//! Invariant: once the epoch `E` is known, the table holds the tags of epochs `E-1 ..= E+1` of every
//! user; `E+2` is prepared in small batches ([`HelloTags::advance`]) so that the rollover to
//! `E+1` costs almost nothing, and at most `E-1 ..= E+2` are ever held.

use super::{IdMap, UserId};
use crate::proto::crypto::Key32;
use crate::proto::handshake::{self, HELLO_SLOTS};

/// Users whose next-epoch tags are prepared per received datagram.
const PREPARE_BATCH: usize = 2;
/// Most hello tags registered per user: epochs `E-1 ..= E+2` (the last one prepared early).
pub const MAX_TAGS_PER_USER: usize = 4 * HELLO_SLOTS as usize;

struct TagEntry {
    user: UserId,
    epoch: u64,
    used: bool,
}

/// The tags of one user and epoch.
struct EpochTags {
    epoch: u64,
    tags: [u64; HELLO_SLOTS as usize],
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
    /// A hello with this tag was accepted already.
    pub used: bool,
}

/// Hello tags of every user for the epochs around the server clock's.
#[derive(Default)]
pub struct HelloTags {
    table: IdMap<u64, TagEntry>,
    users: IdMap<u32, UserTags>,
    epoch: Option<u64>,
    /// Users whose tags for the epoch after next are not registered yet.
    prepare_queue: Vec<u32>,
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
                unregister(&mut self.table, id, e);
            }
        }
    }

    /// The user and epoch of `tag`, if it is registered and its epoch is still inside the window.
    pub fn lookup(&self, tag: u64) -> Option<TagMatch> {
        let entry = self.table.get(&tag)?;
        if self.epoch.is_some_and(|e| entry.epoch + 1 < e) {
            // A tag of an epoch that already left the window (not yet cleaned up).
            return None;
        }
        Some(TagMatch {
            user: entry.user,
            epoch: entry.epoch,
            used: entry.used,
        })
    }

    /// True if `tag` is registered (even if its epoch already left the window).
    pub fn contains(&self, tag: u64) -> bool {
        self.table.contains_key(&tag)
    }

    /// Marks `tag` used: further hellos carrying it are replays.
    pub fn mark_used(&mut self, tag: u64) {
        if let Some(entry) = self.table.get_mut(&tag) {
            entry.used = true;
        }
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
                unregister(table, id, e);
            }
            keep
        });
        for epoch in lo..=hi {
            if user.epochs.iter().any(|e| e.epoch == epoch) {
                continue;
            }
            let mut tags = [0u64; HELLO_SLOTS as usize];
            for (slot, tag) in tags.iter_mut().enumerate() {
                *tag = handshake::hello_tag(&user.tag_key, epoch, slot as u16);
                table.entry(*tag).or_insert(TagEntry {
                    user: id,
                    epoch,
                    used: false,
                });
            }
            user.epochs.push(EpochTags { epoch, tags });
        }
    }

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

/// Removes one user-epoch's tags from the table (unless another user owns a colliding tag).
fn unregister(table: &mut IdMap<u64, TagEntry>, id: UserId, epoch: &EpochTags) {
    for tag in &epoch.tags {
        if table.get(tag).is_some_and(|entry| entry.user == id) {
            table.remove(tag);
        }
    }
}
