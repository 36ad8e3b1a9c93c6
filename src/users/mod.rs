//! The user table shared by the Management API and the tunnel event loop: who may connect
//! (access keys), their limits and traffic counters, the [`Change`]s that make up its durable
//! history, and the merge rules between `config.json` keys and users created through the API.
//! The table itself does no I/O; [`state_file`] (the snapshot) and [`journal`] (the changes
//! since) hold its durable form, and [`persist`] writes them.
//!
//! Locking rule: the table lives in a `Mutex` ([`SharedUsers`]). Hold the lock only for
//! in-memory work (look-ups, checking and applying a change, counter updates, cloning a
//! [`Snapshot`]); never across I/O or JSON serialisation.
//!
//! Limit precedence for config-declared keys: a limit set through the API wins until
//! `config.json` changes that key's `limit_bytes` (compared with the value config declared the
//! last time it was applied); then the config value wins again.

pub mod journal;
pub mod persist;
pub mod state_file;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::{AccessKeyEntry, ServerConfig};

pub use persist::{Applied, CommitError, PersistError, Persister};

/// The table as shared between API workers and the tunnel loop.
pub type SharedUsers = Arc<Mutex<UserTable>>;

/// A stable handle for a user; defined in the protocol core, which keys sessions by it.
pub use crate::proto::UserId;

/// Where a user comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Declared in `config.json` (cannot be deleted through the API).
    Config,
    /// Created through `POST /api/users`.
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
        }
    }
}

/// One user record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub key: String,
    pub name: Option<String>,
    /// Effective limit on `bytes_up + bytes_down`; `None` = unlimited.
    pub limit_bytes: Option<u64>,
    /// Payload the user sent into the tunnel.
    pub bytes_up: u64,
    /// Payload the user received through the tunnel.
    pub bytes_down: u64,
    /// Tunnel sessions established since creation or the last reset.
    pub connections: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Sessions open right now (live only, never persisted).
    pub online_sessions: u32,
    /// How often the counters were reset in this process run (live only, never persisted): the
    /// tunnel loop compares it to tell traffic it moved before a reset from traffic after it.
    pub resets: u32,
    /// Unix seconds of the last activity, if any.
    pub last_seen: Option<u64>,
    pub source: Source,
    /// For config users: the `limit_bytes` config.json declared when it was last applied
    /// (`Some(None)` = declared no limit). `None` for API users.
    pub config_limit: Option<Option<u64>>,
}

impl User {
    /// Bytes counted against the limit.
    pub fn used_bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }

    /// What the user may still transfer.
    pub fn budget(&self) -> Budget {
        match self.limit_bytes {
            None => Budget::Unlimited,
            Some(limit) => match limit.checked_sub(self.used_bytes()) {
                Some(0) | None => Budget::Exhausted,
                Some(left) => Budget::Remaining(left),
            },
        }
    }
}

/// What a user may still transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Unlimited,
    Remaining(u64),
    /// Limit reached, or the user no longer exists.
    Exhausted,
}

/// The durable part of one user, as written to the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredUser {
    pub key: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub limit_bytes: Option<u64>,
    pub source: Source,
    /// See [`User::config_limit`]; absent for API users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_limit_applied: Option<ConfigLimit>,
    #[serde(default)]
    pub bytes_up: u64,
    #[serde(default)]
    pub bytes_down: u64,
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub last_seen: Option<u64>,
}

/// The limit config.json declared for a config key when it was last applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLimit {
    pub limit_bytes: Option<u64>,
}

/// A consistent copy of the durable state, taken under the lock and written outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last journal change this snapshot includes (0 = none).
    pub journal_seq: u64,
    pub users: Vec<StoredUser>,
}

/// One durable change of the table: what the API asks for, and the counter updates the
/// flusher records. Every variant sets absolute values, so replaying it is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// A new API user.
    Create {
        key: String,
        name: Option<String>,
        limit_bytes: Option<u64>,
        created_at: u64,
    },
    /// An API user removed.
    Delete { key: String },
    /// A user's limit set (`None` = unlimited).
    Limit {
        key: String,
        limit_bytes: Option<u64>,
    },
    /// A user's counters zeroed.
    Reset { key: String },
    /// A user's counters as they are now (written by the counter flush).
    Counters {
        key: String,
        bytes_up: u64,
        bytes_down: u64,
        connections: u64,
        last_seen: Option<u64>,
    },
}

impl Change {
    /// The key the change is about.
    pub fn key(&self) -> &str {
        match self {
            Change::Create { key, .. }
            | Change::Delete { key }
            | Change::Limit { key, .. }
            | Change::Reset { key }
            | Change::Counters { key, .. } => key,
        }
    }
}

/// What a batch of checked-but-not-yet-applied changes will do to the table: per key, the
/// source it will have (`None` = deleted). Lets the next change of the batch be checked as if
/// the earlier ones were applied.
pub type Pending = HashMap<String, Option<Source>>;

/// Errors of table operations requested through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// A user with this key already exists.
    KeyExists,
    /// No user with this key.
    NotFound,
    /// The key is declared in config.json and cannot be deleted through the API.
    ConfigDeclared,
    /// The table is full (`u32` ids exhausted).
    Full,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::KeyExists => write!(f, "a user with this key already exists"),
            TableError::NotFound => write!(f, "no user with this key"),
            TableError::ConfigDeclared => write!(
                f,
                "this key is declared in config.json; remove it from config.json and reload the server (SIGHUP) to delete it"
            ),
            TableError::Full => write!(f, "no more user ids are available in this process"),
        }
    }
}

impl std::error::Error for TableError {}

/// Problems opening the user state.
#[derive(Debug)]
pub enum UsersError {
    /// The state file exists but cannot be read or parsed; the server must not start.
    StateUnreadable { path: PathBuf, problem: String },
    /// The state file is missing but its journal says there was a state with users.
    StateMissing {
        path: PathBuf,
        journal: PathBuf,
        users: u64,
        changes: usize,
    },
    /// The state path is a symbolic link and `allow_symlinked_state` is off.
    Symlink { path: PathBuf },
    /// The state could not be written.
    Persist(PersistError),
}

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsersError::StateUnreadable { path, problem } => write!(
                f,
                "state file {}: {problem}. Refusing to start so that it is not overwritten; \
                 repair the file or move it away (the server then starts with only the config.json keys and zero counters)",
                path.display()
            ),
            UsersError::StateMissing {
                path,
                journal,
                users,
                changes,
            } => write!(
                f,
                "state file {} is missing, but its journal {} continues a state with {users} users \
                 ({changes} changes since). Refusing to start with no users: if the file was renamed \
                 or is on a volume that is not mounted, restore it (or point state_file in the config \
                 at it); to really start afresh, move the journal away",
                path.display(),
                journal.display()
            ),
            UsersError::Symlink { path } => write!(
                f,
                "state file {} is a symbolic link; refusing to follow it (a planted link could make \
                 the server overwrite another file with every key). Point state_file at the real \
                 file, or set \"allow_symlinked_state\": true in the config",
                path.display()
            ),
            UsersError::Persist(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UsersError {}

/// What [`UserTable::apply_config`] changed, so the caller can tell the tunnel loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChanges {
    /// Keys new to the table.
    pub added: Vec<UserId>,
    /// Config keys that are no longer in config.json (removed from the table).
    pub removed: Vec<UserId>,
    /// Existing users whose name, limit or source changed.
    pub changed: Vec<UserId>,
}

impl ConfigChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// All users, indexed by id and by key.
#[derive(Debug, Default)]
pub struct UserTable {
    users: HashMap<UserId, User>,
    by_key: HashMap<String, UserId>,
    next_id: u32,
    /// Users whose counters moved since the last counter flush.
    dirty: HashSet<UserId>,
}

impl UserTable {
    /// An empty table.
    pub fn new() -> UserTable {
        UserTable::default()
    }

    /// Builds the table from a loaded state file, then merges the config keys.
    pub fn from_stored(
        stored: Vec<StoredUser>,
        config_keys: &[AccessKeyEntry],
        now_unix: u64,
    ) -> UserTable {
        let mut table = UserTable::from_snapshot(stored);
        table.apply_config(config_keys, now_unix);
        table
    }

    /// The table exactly as a snapshot holds it (no config merge).
    pub fn from_snapshot(stored: Vec<StoredUser>) -> UserTable {
        let mut table = UserTable::new();
        for s in stored {
            if table.by_key.contains_key(&s.key) {
                continue; // state_file::load rejects duplicates; be defensive anyway
            }
            let Some(id) = table.alloc_id() else { break };
            let user = User {
                id,
                key: s.key.clone(),
                name: s.name,
                limit_bytes: s.limit_bytes,
                bytes_up: s.bytes_up,
                bytes_down: s.bytes_down,
                connections: s.connections,
                created_at: s.created_at,
                online_sessions: 0,
                resets: 0,
                last_seen: s.last_seen,
                source: s.source,
                config_limit: match s.source {
                    Source::Config => Some(s.config_limit_applied.and_then(|c| c.limit_bytes)),
                    Source::Api => None,
                },
            };
            table.by_key.insert(s.key, id);
            table.users.insert(id, user);
        }
        table
    }

    fn alloc_id(&mut self) -> Option<UserId> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1)?;
        Some(UserId(id))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Sessions open right now, over all users.
    pub fn online_sessions(&self) -> u64 {
        self.users
            .values()
            .map(|u| u64::from(u.online_sessions))
            .sum()
    }

    pub fn user_id(&self, key: &str) -> Option<UserId> {
        self.by_key.get(key).copied()
    }

    pub fn key_of(&self, id: UserId) -> Option<&str> {
        self.users.get(&id).map(|u| u.key.as_str())
    }

    pub fn get(&self, id: UserId) -> Option<&User> {
        self.users.get(&id)
    }

    pub fn get_by_key(&self, key: &str) -> Option<&User> {
        self.user_id(key).and_then(|id| self.users.get(&id))
    }

    /// Every key with its id (for the tunnel's handshake table).
    pub fn all_keys(&self) -> Vec<(UserId, String)> {
        let mut v: Vec<(UserId, String)> =
            self.users.values().map(|u| (u.id, u.key.clone())).collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }

    /// All users in creation order (ids ascending).
    pub fn list(&self) -> Vec<&User> {
        let mut v: Vec<&User> = self.users.values().collect();
        v.sort_unstable_by_key(|u| u.id);
        v
    }

    /// Creates an API user. The key must already be validated.
    pub fn create(
        &mut self,
        key: String,
        name: Option<String>,
        limit_bytes: Option<u64>,
        now_unix: u64,
    ) -> Result<UserId, TableError> {
        if self.by_key.contains_key(&key) {
            return Err(TableError::KeyExists);
        }
        let id = self.alloc_id().ok_or(TableError::Full)?;
        self.by_key.insert(key.clone(), id);
        self.users.insert(
            id,
            User {
                id,
                key,
                name,
                limit_bytes,
                bytes_up: 0,
                bytes_down: 0,
                connections: 0,
                created_at: now_unix,
                online_sessions: 0,
                resets: 0,
                last_seen: None,
                source: Source::Api,
                config_limit: None,
            },
        );
        Ok(id)
    }

    /// Deletes an API user; config-declared keys answer [`TableError::ConfigDeclared`].
    pub fn delete(&mut self, key: &str) -> Result<UserId, TableError> {
        let id = self.user_id(key).ok_or(TableError::NotFound)?;
        if self.users.get(&id).map(|u| u.source) == Some(Source::Config) {
            return Err(TableError::ConfigDeclared);
        }
        self.remove_id(id);
        Ok(id)
    }

    fn remove_id(&mut self, id: UserId) {
        if let Some(u) = self.users.remove(&id) {
            self.by_key.remove(&u.key);
        }
        self.dirty.remove(&id);
    }

    /// Sets or removes (`None`) the limit of any user.
    pub fn set_limit(&mut self, key: &str, limit_bytes: Option<u64>) -> Result<UserId, TableError> {
        let id = self.user_id(key).ok_or(TableError::NotFound)?;
        if let Some(u) = self.users.get_mut(&id) {
            u.limit_bytes = limit_bytes;
        }
        Ok(id)
    }

    /// Zeroes `bytes_up`, `bytes_down` and `connections` (live sessions stay open).
    pub fn reset(&mut self, key: &str) -> Result<UserId, TableError> {
        let id = self.user_id(key).ok_or(TableError::NotFound)?;
        if let Some(u) = self.users.get_mut(&id) {
            u.bytes_up = 0;
            u.bytes_down = 0;
            u.connections = 0;
            u.resets = u.resets.wrapping_add(1);
        }
        Ok(id)
    }

    /// Adds payload bytes to a user's counters (unknown ids are ignored).
    pub fn add_traffic(&mut self, id: UserId, up: u64, down: u64) {
        if up == 0 && down == 0 {
            return;
        }
        if let Some(u) = self.users.get_mut(&id) {
            u.bytes_up = u.bytes_up.saturating_add(up);
            u.bytes_down = u.bytes_down.saturating_add(down);
            self.dirty.insert(id);
        }
    }

    /// A tunnel session was established for `id`.
    pub fn session_opened(&mut self, id: UserId, now_unix: u64) {
        if let Some(u) = self.users.get_mut(&id) {
            u.connections = u.connections.saturating_add(1);
            u.online_sessions = u.online_sessions.saturating_add(1);
            u.last_seen = Some(now_unix);
            self.dirty.insert(id);
        }
    }

    /// A tunnel session of `id` ended.
    pub fn session_closed(&mut self, id: UserId) {
        if let Some(u) = self.users.get_mut(&id) {
            u.online_sessions = u.online_sessions.saturating_sub(1);
        }
    }

    /// Records activity (does not by itself make the state dirty).
    pub fn touch(&mut self, id: UserId, now_unix: u64) {
        if let Some(u) = self.users.get_mut(&id) {
            u.last_seen = Some(now_unix);
        }
    }

    /// [`User::resets`] of `id`; `None` for unknown ids.
    pub fn resets(&self, id: UserId) -> Option<u32> {
        self.users.get(&id).map(|u| u.resets)
    }

    /// What `id` may still transfer; unknown ids are [`Budget::Exhausted`].
    pub fn budget(&self, id: UserId) -> Budget {
        self.users
            .get(&id)
            .map(User::budget)
            .unwrap_or(Budget::Exhausted)
    }

    /// Merges the keys declared in config.json (at start and on SIGHUP): new keys are added,
    /// config keys no longer declared are removed, names follow the config, limits follow the
    /// precedence rule in the module docs. API users, counters and live sessions of unchanged
    /// keys are kept. An API user whose key now appears in config.json becomes a config user.
    pub fn apply_config(&mut self, entries: &[AccessKeyEntry], now_unix: u64) -> ConfigChanges {
        let mut changes = ConfigChanges::default();
        let declared: HashMap<&str, &AccessKeyEntry> =
            entries.iter().map(|e| (e.key.as_str(), e)).collect();

        let mut gone: Vec<UserId> = self
            .users
            .values()
            .filter(|u| u.source == Source::Config && !declared.contains_key(u.key.as_str()))
            .map(|u| u.id)
            .collect();
        gone.sort_unstable();
        for id in gone {
            self.remove_id(id);
            changes.removed.push(id);
        }

        for entry in entries {
            match self.by_key.get(&entry.key).copied() {
                Some(id) => {
                    let Some(u) = self.users.get_mut(&id) else {
                        continue;
                    };
                    let before = (u.source, u.name.clone(), u.limit_bytes, u.config_limit);
                    let config_limit_changed = u.config_limit != Some(entry.limit_bytes);
                    if config_limit_changed {
                        u.limit_bytes = entry.limit_bytes;
                        u.config_limit = Some(entry.limit_bytes);
                    }
                    u.source = Source::Config;
                    u.name = entry.name.clone();
                    if before != (u.source, u.name.clone(), u.limit_bytes, u.config_limit) {
                        changes.changed.push(id);
                    }
                }
                None => {
                    let Some(id) = self.alloc_id() else { break };
                    self.by_key.insert(entry.key.clone(), id);
                    self.users.insert(
                        id,
                        User {
                            id,
                            key: entry.key.clone(),
                            name: entry.name.clone(),
                            limit_bytes: entry.limit_bytes,
                            bytes_up: 0,
                            bytes_down: 0,
                            connections: 0,
                            created_at: now_unix,
                            online_sessions: 0,
                            resets: 0,
                            last_seen: None,
                            source: Source::Config,
                            config_limit: Some(entry.limit_bytes),
                        },
                    );
                    changes.added.push(id);
                }
            }
        }
        changes
    }

    /// A compact copy of the durable state (clone of a Vec; serialise it outside the lock).
    pub fn snapshot(&self) -> Snapshot {
        let users = self
            .list()
            .into_iter()
            .map(|u| StoredUser {
                key: u.key.clone(),
                name: u.name.clone(),
                limit_bytes: u.limit_bytes,
                source: u.source,
                config_limit_applied: u.config_limit.map(|l| ConfigLimit { limit_bytes: l }),
                bytes_up: u.bytes_up,
                bytes_down: u.bytes_down,
                connections: u.connections,
                created_at: u.created_at,
                last_seen: u.last_seen,
            })
            .collect();
        Snapshot {
            journal_seq: 0,
            users,
        }
    }

    /// Whether any user's counters moved since the last [`UserTable::take_counters`].
    pub fn counters_moved(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The counters of every user whose counters moved, as changes to journal; the users are
    /// no longer marked (hand the ids back to [`UserTable::counters_unsaved`] if the write fails).
    pub fn take_counters(&mut self) -> (Vec<UserId>, Vec<Change>) {
        let mut ids: Vec<UserId> = self.dirty.drain().collect();
        ids.retain(|id| self.users.contains_key(id));
        ids.sort_unstable();
        let changes = ids
            .iter()
            .filter_map(|id| self.users.get(id))
            .map(|u| Change::Counters {
                key: u.key.clone(),
                bytes_up: u.bytes_up,
                bytes_down: u.bytes_down,
                connections: u.connections,
                last_seen: u.last_seen,
            })
            .collect();
        (ids, changes)
    }

    /// Marks users whose counter write failed, so the next flush writes them again.
    pub fn counters_unsaved(&mut self, ids: impl IntoIterator<Item = UserId>) {
        self.dirty.extend(ids);
    }

    /// Checks `change` against the table as it will be once the `pending` changes of the same
    /// batch are applied, and records its own effect in `pending`. Counter changes always pass.
    pub fn check(&self, change: &Change, pending: &mut Pending) -> Result<(), TableError> {
        let key = change.key();
        let source = match pending.get(key) {
            Some(s) => *s,
            None => self.get_by_key(key).map(|u| u.source),
        };
        let after = match (change, source) {
            (Change::Create { .. }, Some(_)) => return Err(TableError::KeyExists),
            (Change::Create { .. }, None) => {
                let creates = pending.values().filter(|s| s.is_some()).count() as u64;
                if u64::from(self.next_id) + creates >= u64::from(u32::MAX) {
                    return Err(TableError::Full);
                }
                Some(Source::Api)
            }
            (Change::Delete { .. }, Some(Source::Config)) => {
                return Err(TableError::ConfigDeclared);
            }
            (Change::Delete { .. }, Some(Source::Api)) => None,
            (Change::Counters { .. }, s) => return s.map(|_| ()).ok_or(TableError::NotFound),
            (_, None) => return Err(TableError::NotFound),
            (_, s) => s,
        };
        pending.insert(key.to_string(), after);
        Ok(())
    }

    /// Applies a durable change. A checked change always applies; during recovery a change
    /// that no longer fits (a create of a key the snapshot already holds, a change of a deleted
    /// key) sets what it can, so that replaying changes the snapshot already holds is harmless.
    pub fn apply(&mut self, change: &Change) -> Option<UserId> {
        match change {
            Change::Create {
                key,
                name,
                limit_bytes,
                created_at,
            } => {
                if let Some(id) = self.user_id(key) {
                    self.remove_id(id);
                }
                self.create(key.clone(), name.clone(), *limit_bytes, *created_at)
                    .ok()
            }
            Change::Delete { key } => {
                let id = self.user_id(key)?;
                self.remove_id(id);
                Some(id)
            }
            Change::Limit { key, limit_bytes } => self.set_limit(key, *limit_bytes).ok(),
            Change::Reset { key } => self.reset(key).ok(),
            Change::Counters {
                key,
                bytes_up,
                bytes_down,
                connections,
                last_seen,
            } => {
                let id = self.user_id(key)?;
                let u = self.users.get_mut(&id)?;
                u.bytes_up = *bytes_up;
                u.bytes_down = *bytes_down;
                u.connections = *connections;
                u.last_seen = *last_seen;
                Some(id)
            }
        }
    }
}

/// Current wall-clock time in unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The durable state as recovered from the snapshot and its journal.
struct Recovered {
    table: UserTable,
    /// The last journal change applied.
    last_seq: u64,
    /// Users in the snapshot, journal changes replayed, journal bytes ignored.
    snapshot_users: usize,
    replayed: usize,
    ignored_bytes: usize,
}

/// Reads the snapshot at `path` and replays its journal (no config merge, no writes). A missing
/// snapshot is a fresh start, unless the journal says a state with users existed.
fn recover(path: &std::path::Path) -> Result<Recovered, UsersError> {
    let journal_path = journal::path_for(path);
    let Some(snapshot) = state_file::load(path)? else {
        // Read the journal only to learn whether a state existed (skip every change).
        if let Some(j) = journal::read(&journal_path, u64::MAX)?
            && (j.committed > 0 || j.header.is_some_and(|h| h.users > 0))
        {
            return Err(UsersError::StateMissing {
                path: path.to_path_buf(),
                journal: journal_path,
                users: j.header.map_or(0, |h| h.users),
                changes: j.committed,
            });
        }
        log::warn!(
            "no state file at {}: starting with only the config.json keys (if the config was \
             renamed, the default state file name changed with it: set state_file to the old one)",
            path.display()
        );
        return Ok(Recovered {
            table: UserTable::new(),
            last_seq: 0,
            snapshot_users: 0,
            replayed: 0,
            ignored_bytes: 0,
        });
    };
    let snapshot_users = snapshot.users.len();
    let mut table = UserTable::from_snapshot(snapshot.users);
    let Some(j) = journal::read(&journal_path, snapshot.journal_seq)? else {
        if snapshot.journal_seq > 0 {
            log::warn!(
                "the journal {} is missing; changes acknowledged after the last compaction of {} are lost",
                journal_path.display(),
                path.display()
            );
        }
        return Ok(Recovered {
            table,
            last_seq: snapshot.journal_seq,
            snapshot_users,
            replayed: 0,
            ignored_bytes: 0,
        });
    };
    for (_, change) in &j.changes {
        table.apply(change);
    }
    Ok(Recovered {
        table,
        last_seq: j.last_seq,
        snapshot_users,
        replayed: j.changes.len(),
        ignored_bytes: j.ignored_bytes,
    })
}

/// Every stored user, as the snapshot and its journal hold them (read-only: for `--links`,
/// tests and tools; safe while a server runs).
pub fn load_stored(path: &std::path::Path) -> Result<Vec<StoredUser>, UsersError> {
    Ok(recover(path)?.table.snapshot().users)
}

/// Loads the state (snapshot + journal; a missing state is a fresh start unless the journal
/// says users existed), merges the config keys, and returns the shared table with its
/// persister. The merged state is compacted at once, so after a successful start the state
/// file exists, reflects config.json, and its journal is empty.
pub fn open(config: &ServerConfig) -> Result<(SharedUsers, Persister), UsersError> {
    let path = state_file::resolve(&config.state_file, config.allow_symlinked_state)?;
    state_file::resolve(&journal::path_for(&path), config.allow_symlinked_state)?;
    let mut r = recover(&path)?;
    let held = r.table.len();
    r.table.apply_config(&config.access_keys, now_unix());
    log::info!(
        "state file {}: holds {held} users ({} in the snapshot, {} journal changes replayed{}); {} users with config.json merged",
        path.display(),
        r.snapshot_users,
        r.replayed,
        if r.ignored_bytes > 0 {
            format!(", {} bytes of an unfinished write ignored", r.ignored_bytes)
        } else {
            String::new()
        },
        r.table.len(),
    );
    let users: SharedUsers = Arc::new(Mutex::new(r.table));
    let persister = Persister::new(path, users.clone(), r.last_seq);
    persister.compact().map_err(UsersError::Persist)?;
    Ok((users, persister))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1k1k1k1k1k1k1k1k1k1";
    const K2: &str = "k2k2k2k2k2k2k2k2k2k2";
    const K3: &str = "k3k3k3k3k3k3k3k3k3k3";

    fn entry(key: &str, name: Option<&str>, limit: Option<u64>) -> AccessKeyEntry {
        AccessKeyEntry {
            key: key.into(),
            name: name.map(Into::into),
            limit_bytes: limit,
        }
    }

    #[test]
    fn create_delete_and_ids_are_never_reused() {
        let mut t = UserTable::new();
        let a = t.create(K1.into(), None, None, 5).unwrap();
        assert_eq!(
            t.create(K1.into(), None, None, 5),
            Err(TableError::KeyExists)
        );
        assert_eq!(t.delete(K1), Ok(a));
        assert_eq!(t.delete(K1), Err(TableError::NotFound));
        let b = t.create(K1.into(), None, None, 6).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.user_id(K1), Some(b));
        assert_eq!(t.key_of(b), Some(K1));
        assert_eq!(t.key_of(a), None);
    }

    #[test]
    fn counters_sessions_reset_and_budget() {
        let mut t = UserTable::new();
        let id = t.create(K1.into(), None, Some(100), 1).unwrap();
        assert_eq!(t.budget(id), Budget::Remaining(100));
        t.session_opened(id, 42);
        t.add_traffic(id, 30, 50);
        let u = t.get(id).unwrap();
        assert_eq!((u.bytes_up, u.bytes_down, u.connections), (30, 50, 1));
        assert_eq!((u.online_sessions, u.last_seen), (1, Some(42)));
        assert_eq!(t.budget(id), Budget::Remaining(20));
        t.add_traffic(id, 20, 0);
        assert_eq!(t.budget(id), Budget::Exhausted);
        t.add_traffic(id, u64::MAX, u64::MAX);
        assert_eq!(t.budget(id), Budget::Exhausted);
        assert_eq!(t.resets(id), Some(0));
        t.reset(K1).unwrap();
        let u = t.get(id).unwrap();
        assert_eq!((u.bytes_up, u.bytes_down, u.connections), (0, 0, 0));
        assert_eq!(
            t.resets(id),
            Some(1),
            "a reset is told apart from the traffic before it"
        );
        assert_eq!(u.online_sessions, 1, "reset keeps live sessions");
        t.session_closed(id);
        t.session_closed(id);
        assert_eq!(t.get(id).unwrap().online_sessions, 0);
        t.set_limit(K1, None).unwrap();
        assert_eq!(t.budget(id), Budget::Unlimited);
        assert_eq!(t.budget(UserId(999)), Budget::Exhausted);
    }

    #[test]
    fn config_keys_cannot_be_deleted() {
        let mut t = UserTable::new();
        t.apply_config(&[entry(K1, None, None)], 0);
        assert_eq!(t.delete(K1), Err(TableError::ConfigDeclared));
        assert!(t.user_id(K1).is_some());
    }

    #[test]
    fn counter_moves_mark_users_for_the_next_flush() {
        let mut t = UserTable::new();
        let id = t.create(K1.into(), None, None, 0).unwrap();
        let other = t.create(K2.into(), None, None, 0).unwrap();
        assert!(!t.counters_moved());
        t.add_traffic(id, 1, 0);
        t.touch(other, 9);
        t.session_closed(other);
        t.add_traffic(other, 0, 0);
        let (ids, changes) = t.take_counters();
        assert_eq!(ids, vec![id], "only users whose counters moved are written");
        assert_eq!(
            changes,
            vec![Change::Counters {
                key: K1.into(),
                bytes_up: 1,
                bytes_down: 0,
                connections: 0,
                last_seen: None
            }]
        );
        assert!(!t.counters_moved());
        t.counters_unsaved(ids);
        assert!(t.counters_moved());
        t.delete(K1).unwrap();
        assert!(
            t.take_counters().1.is_empty(),
            "deleted users are not written"
        );
    }

    #[test]
    fn changes_are_checked_against_the_batch_before_them() {
        let mut t = UserTable::new();
        t.apply_config(&[entry(K1, None, None)], 0);
        let create = |k: &str| Change::Create {
            key: k.into(),
            name: None,
            limit_bytes: None,
            created_at: 0,
        };
        let mut p = Pending::new();
        assert_eq!(t.check(&create(K1), &mut p), Err(TableError::KeyExists));
        assert_eq!(
            t.check(&Change::Delete { key: K1.into() }, &mut p),
            Err(TableError::ConfigDeclared)
        );
        assert_eq!(t.check(&create(K2), &mut p), Ok(()));
        assert_eq!(t.check(&create(K2), &mut p), Err(TableError::KeyExists));
        let del = Change::Delete { key: K2.into() };
        assert_eq!(t.check(&del, &mut p), Ok(()));
        assert_eq!(t.check(&del, &mut p), Err(TableError::NotFound));
        let limit = Change::Limit {
            key: K2.into(),
            limit_bytes: Some(3),
        };
        assert_eq!(t.check(&limit, &mut p), Err(TableError::NotFound));
        assert_eq!(t.check(&create(K2), &mut p), Ok(()));
        assert_eq!(t.check(&limit, &mut p), Ok(()));
        assert_eq!(t.len(), 1, "checking changes nothing");
        for c in [create(K2), del, create(K2), limit] {
            assert!(t.apply(&c).is_some());
        }
        assert_eq!(t.get_by_key(K2).unwrap().limit_bytes, Some(3));
    }

    #[test]
    fn replaying_changes_the_snapshot_already_holds_is_harmless() {
        let mut t = UserTable::new();
        let changes = [
            Change::Create {
                key: K1.into(),
                name: Some("a".into()),
                limit_bytes: None,
                created_at: 1,
            },
            Change::Counters {
                key: K1.into(),
                bytes_up: 5,
                bytes_down: 6,
                connections: 2,
                last_seen: Some(3),
            },
            Change::Limit {
                key: K1.into(),
                limit_bytes: Some(9),
            },
            Change::Create {
                key: K2.into(),
                name: None,
                limit_bytes: None,
                created_at: 1,
            },
            Change::Delete { key: K2.into() },
        ];
        for c in &changes {
            t.apply(c);
        }
        let want = t.snapshot().users;
        for from in 0..changes.len() {
            let mut again = UserTable::from_snapshot(want.clone());
            for c in &changes[from..] {
                again.apply(c);
            }
            assert_eq!(again.snapshot().users, want, "replay from {from}");
        }
    }

    #[test]
    fn reload_keeps_api_users_counters_and_sessions_of_unchanged_keys() {
        let mut t = UserTable::new();
        t.apply_config(&[entry(K1, Some("a"), None), entry(K2, None, Some(10))], 0);
        let id1 = t.user_id(K1).unwrap();
        let id2 = t.user_id(K2).unwrap();
        let api = t.create(K3.into(), Some("api".into()), None, 0).unwrap();
        t.session_opened(id1, 1);
        t.add_traffic(id1, 5, 6);
        t.add_traffic(api, 7, 8);

        // K2 removed, K1 renamed, a new key added.
        let k4 = "k4k4k4k4k4k4k4k4k4k4";
        let ch = t.apply_config(&[entry(K1, Some("b"), None), entry(k4, None, None)], 2);
        assert_eq!(ch.removed, vec![id2]);
        assert_eq!(ch.changed, vec![id1]);
        assert_eq!(ch.added.len(), 1);
        assert_eq!(t.user_id(K2), None);
        let u1 = t.get(id1).unwrap();
        assert_eq!(u1.name.as_deref(), Some("b"));
        assert_eq!((u1.bytes_up, u1.bytes_down, u1.online_sessions), (5, 6, 1));
        let a = t.get(api).unwrap();
        assert_eq!((a.bytes_up, a.bytes_down, a.source), (7, 8, Source::Api));

        // Same config again: nothing changes.
        let ch = t.apply_config(&[entry(K1, Some("b"), None), entry(k4, None, None)], 3);
        assert!(ch.is_empty());
    }

    #[test]
    fn api_limit_wins_until_config_changes_that_keys_limit() {
        let mut t = UserTable::new();
        t.apply_config(&[entry(K1, None, Some(100))], 0);
        let id = t.user_id(K1).unwrap();
        t.set_limit(K1, Some(500)).unwrap();
        // Reload with the same config value: the API value stays.
        t.apply_config(&[entry(K1, None, Some(100))], 0);
        assert_eq!(t.get(id).unwrap().limit_bytes, Some(500));
        // It also survives a save/load round trip.
        let t2 = UserTable::from_stored(t.snapshot().users, &[entry(K1, None, Some(100))], 0);
        assert_eq!(t2.get_by_key(K1).unwrap().limit_bytes, Some(500));
        // config.json changes the key's limit: config wins.
        let ch = t.apply_config(&[entry(K1, None, Some(200))], 0);
        assert_eq!(ch.changed, vec![id]);
        assert_eq!(t.get(id).unwrap().limit_bytes, Some(200));
        // Removing limit_bytes from config.json is a change too.
        t.apply_config(&[entry(K1, None, None)], 0);
        assert_eq!(t.get(id).unwrap().limit_bytes, None);
    }

    #[test]
    fn api_user_that_appears_in_config_becomes_a_config_user() {
        let mut t = UserTable::new();
        let id = t.create(K1.into(), None, Some(7), 0).unwrap();
        t.add_traffic(id, 3, 3);
        let ch = t.apply_config(&[entry(K1, None, Some(9))], 0);
        assert_eq!(ch.changed, vec![id]);
        let u = t.get(id).unwrap();
        assert_eq!(
            (u.source, u.limit_bytes, u.bytes_up),
            (Source::Config, Some(9), 3)
        );
        assert_eq!(t.delete(K1), Err(TableError::ConfigDeclared));
    }

    #[test]
    fn snapshot_round_trips() {
        let mut t = UserTable::new();
        t.apply_config(&[entry(K1, Some("c"), Some(1))], 10);
        let id = t.create(K2.into(), None, None, 11).unwrap();
        t.session_opened(id, 12);
        t.add_traffic(id, 1, 2);
        let snap = t.snapshot();
        let t2 = UserTable::from_stored(snap.users.clone(), &[entry(K1, Some("c"), Some(1))], 99);
        assert_eq!(t2.snapshot().users, snap.users);
        assert_eq!(t2.get_by_key(K2).unwrap().online_sessions, 0);
    }
}
