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

pub mod devices;
pub mod journal;
pub mod persist;
pub mod schedule;
pub mod state_file;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::{AccessKeyEntry, ServerConfig};

pub use persist::{Applied, CommitError, PersistError, Persister};
pub use schedule::ResetStrategy;

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
    /// Access and reset settings (set through the API, kept across reloads).
    pub settings: Settings,
    /// Unix seconds of the last counter reset (through the API or periodic), if any.
    pub last_reset_at: Option<u64>,
    /// Periodic resets fall on the boundaries after this instant (unix seconds): the creation,
    /// the last reset, or the last change of the reset strategy.
    pub reset_anchor: u64,
    /// Client addresses seen recently (live only, never persisted; kept by the tunnel loop).
    pub recent_ips: devices::RecentIps,
}

/// Longest accepted note (characters).
pub const MAX_NOTE_CHARS: usize = 256;

/// A user's access and reset settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Unix seconds from which handshakes are refused as expired (`None` = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<u64>,
    /// `false`: handshakes are refused as disabled; key, counters and settings stay.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "ResetStrategy::is_none")]
    pub reset_strategy: ResetStrategy,
    /// Free text for the operator (at most [`MAX_NOTE_CHARS`] characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Most distinct client IP addresses with live sessions at once (`None`: no limit); a
    /// handshake from one more address is refused as "device limit".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u32>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            expire_at: None,
            enabled: true,
            reset_strategy: ResetStrategy::None,
            note: None,
            max_devices: None,
        }
    }
}

impl Settings {
    fn is_default(&self) -> bool {
        *self == Settings::default()
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Deserialises a present field (even `null`) as `Some`, so that an absent field (`None`, by
/// `#[serde(default)]`) and an explicit `null` (`Some(None)`) are told apart.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A partial update of a user (`PATCH /api/users/{key}`): only the fields present change;
/// `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub name: Option<Option<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub note: Option<Option<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub limit_bytes: Option<Option<u64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub expire_at: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_strategy: Option<ResetStrategy>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub max_devices: Option<Option<u32>>,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        *self == Patch::default()
    }
}

impl User {
    /// A user with zero counters and default settings.
    fn new(id: UserId, key: String, source: Source, created_at: u64) -> User {
        User {
            id,
            key,
            name: None,
            limit_bytes: None,
            bytes_up: 0,
            bytes_down: 0,
            connections: 0,
            created_at,
            online_sessions: 0,
            resets: 0,
            last_seen: None,
            source,
            config_limit: None,
            settings: Settings::default(),
            last_reset_at: None,
            reset_anchor: created_at,
            recent_ips: devices::RecentIps::default(),
        }
    }

    /// Whether the user is past its `expire_at` at `now_unix`.
    pub fn expired(&self, now_unix: u64) -> bool {
        self.settings.expire_at.is_some_and(|e| e <= now_unix)
    }

    /// When the next periodic reset is due (unix seconds), if the user has a strategy.
    pub fn next_reset_at(&self) -> Option<u64> {
        self.settings
            .reset_strategy
            .next_boundary(self.reset_anchor, self.created_at)
    }

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<u64>,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "ResetStrategy::is_none")]
    pub reset_strategy: ResetStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reset_at: Option<u64>,
    /// See [`User::reset_anchor`]; absent = `created_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_anchor: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u32>,
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
        #[serde(default, skip_serializing_if = "Settings::is_default")]
        settings: Settings,
    },
    /// An API user removed.
    Delete { key: String },
    /// A user's limit set (`None` = unlimited).
    Limit {
        key: String,
        limit_bytes: Option<u64>,
    },
    /// A user's counters zeroed (`at`: when, unix seconds; absent in older journals).
    Reset {
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<u64>,
    },
    /// Some of a user's fields set (`PATCH`); `at` (unix seconds) starts the new reset period
    /// when the reset strategy changes.
    Update { key: String, patch: Patch, at: u64 },
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
            | Change::Reset { key, .. }
            | Change::Update { key, .. }
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
    /// The name of a config.json key is set by config.json.
    ConfigName,
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
            TableError::ConfigName => write!(
                f,
                "this key is declared in config.json, which sets its name; change the name there and reload the server (SIGHUP)"
            ),
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
    /// Payload bytes (up, down) counted since this table was made (server start).
    traffic_since_start: (u64, u64),
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
                name: s.name,
                limit_bytes: s.limit_bytes,
                bytes_up: s.bytes_up,
                bytes_down: s.bytes_down,
                connections: s.connections,
                last_seen: s.last_seen,
                config_limit: match s.source {
                    Source::Config => Some(s.config_limit_applied.and_then(|c| c.limit_bytes)),
                    Source::Api => None,
                },
                settings: Settings {
                    expire_at: s.expire_at,
                    enabled: s.enabled,
                    reset_strategy: s.reset_strategy,
                    note: s.note,
                    max_devices: s.max_devices,
                },
                last_reset_at: s.last_reset_at,
                reset_anchor: s.reset_anchor.unwrap_or(s.created_at),
                ..User::new(id, s.key.clone(), s.source, s.created_at)
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

    /// Users with at least one open session.
    pub fn online_users(&self) -> usize {
        self.users
            .values()
            .filter(|u| u.online_sessions > 0)
            .count()
    }

    /// Payload bytes (up, down) of all users since the server started (resets and deletes
    /// do not lower it).
    pub fn traffic_since_start(&self) -> (u64, u64) {
        self.traffic_since_start
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

    /// Creates an API user with default settings. The key must already be validated.
    pub fn create(
        &mut self,
        key: String,
        name: Option<String>,
        limit_bytes: Option<u64>,
        now_unix: u64,
    ) -> Result<UserId, TableError> {
        self.create_with(key, name, limit_bytes, Settings::default(), now_unix)
    }

    /// Creates an API user. The key must already be validated.
    pub fn create_with(
        &mut self,
        key: String,
        name: Option<String>,
        limit_bytes: Option<u64>,
        settings: Settings,
        now_unix: u64,
    ) -> Result<UserId, TableError> {
        if self.by_key.contains_key(&key) {
            return Err(TableError::KeyExists);
        }
        let id = self.alloc_id().ok_or(TableError::Full)?;
        self.by_key.insert(key.clone(), id);
        let user = User {
            name,
            limit_bytes,
            settings,
            ..User::new(id, key, Source::Api, now_unix)
        };
        self.users.insert(id, user);
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

    /// Zeroes `bytes_up`, `bytes_down` and `connections` (live sessions stay open); `at` (unix
    /// seconds) becomes `last_reset_at` and starts the next reset period.
    pub fn reset(&mut self, key: &str, at: Option<u64>) -> Result<UserId, TableError> {
        let id = self.user_id(key).ok_or(TableError::NotFound)?;
        if let Some(u) = self.users.get_mut(&id) {
            u.bytes_up = 0;
            u.bytes_down = 0;
            u.connections = 0;
            u.resets = u.resets.wrapping_add(1);
            if let Some(at) = at {
                u.last_reset_at = Some(at);
                u.reset_anchor = at;
            }
        }
        Ok(id)
    }

    /// Sets the fields `patch` names; a changed reset strategy counts its periods from `at`.
    pub fn update(&mut self, key: &str, patch: &Patch, at: u64) -> Result<UserId, TableError> {
        let id = self.user_id(key).ok_or(TableError::NotFound)?;
        let Some(u) = self.users.get_mut(&id) else {
            return Err(TableError::NotFound);
        };
        if let Some(name) = &patch.name {
            u.name = name.clone();
        }
        if let Some(note) = &patch.note {
            u.settings.note = note.clone();
        }
        if let Some(limit) = patch.limit_bytes {
            u.limit_bytes = limit;
        }
        if let Some(expire_at) = patch.expire_at {
            u.settings.expire_at = expire_at;
        }
        if let Some(enabled) = patch.enabled {
            u.settings.enabled = enabled;
        }
        if let Some(max_devices) = patch.max_devices {
            u.settings.max_devices = max_devices;
        }
        if let Some(strategy) = patch.reset_strategy
            && strategy != u.settings.reset_strategy
        {
            u.settings.reset_strategy = strategy;
            u.reset_anchor = at;
        }
        Ok(id)
    }

    /// The periodic resets due at `now_unix`: a [`Change::Reset`] for every user whose next
    /// reset boundary has passed (one reset, however many boundaries were missed).
    pub fn due_resets(&self, now_unix: u64) -> Vec<Change> {
        self.list()
            .into_iter()
            .filter(|u| u.next_reset_at().is_some_and(|b| b <= now_unix))
            .map(|u| Change::Reset {
                key: u.key.clone(),
                at: Some(now_unix),
            })
            .collect()
    }

    /// The earliest periodic reset of any user (unix seconds).
    pub fn next_reset_at(&self) -> Option<u64> {
        self.users.values().filter_map(User::next_reset_at).min()
    }

    /// Applies the periodic resets due at `now_unix` directly (at start, before the table is
    /// shared; the caller makes the result durable). Returns how many users were reset.
    pub fn catch_up_resets(&mut self, now_unix: u64) -> usize {
        let due = self.due_resets(now_unix);
        for change in &due {
            self.apply(change);
        }
        due.len()
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
            let (t_up, t_down) = &mut self.traffic_since_start;
            *t_up = t_up.saturating_add(up);
            *t_down = t_down.saturating_add(down);
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

    /// A session of `id` became live from `ip` (established, or moved there).
    pub fn device_opened(&mut self, id: UserId, ip: std::net::IpAddr, now_unix: u64) {
        if let Some(u) = self.users.get_mut(&id) {
            u.recent_ips.opened(ip, now_unix);
        }
    }

    /// A session of `id` from `ip` ended (or moved away).
    pub fn device_closed(&mut self, id: UserId, ip: std::net::IpAddr, now_unix: u64) {
        if let Some(u) = self.users.get_mut(&id) {
            u.recent_ips.closed(ip, now_unix);
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
                    let user = User {
                        name: entry.name.clone(),
                        limit_bytes: entry.limit_bytes,
                        config_limit: Some(entry.limit_bytes),
                        ..User::new(id, entry.key.clone(), Source::Config, now_unix)
                    };
                    self.users.insert(id, user);
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
                expire_at: u.settings.expire_at,
                enabled: u.settings.enabled,
                reset_strategy: u.settings.reset_strategy,
                last_reset_at: u.last_reset_at,
                reset_anchor: (u.reset_anchor != u.created_at).then_some(u.reset_anchor),
                note: u.settings.note.clone(),
                max_devices: u.settings.max_devices,
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
            (Change::Update { patch, .. }, Some(Source::Config)) if patch.name.is_some() => {
                return Err(TableError::ConfigName);
            }
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
                settings,
            } => {
                if let Some(id) = self.user_id(key) {
                    self.remove_id(id);
                }
                let (name, settings) = (name.clone(), settings.clone());
                self.create_with(key.clone(), name, *limit_bytes, settings, *created_at)
                    .ok()
            }
            Change::Delete { key } => {
                let id = self.user_id(key)?;
                self.remove_id(id);
                Some(id)
            }
            Change::Limit { key, limit_bytes } => self.set_limit(key, *limit_bytes).ok(),
            Change::Reset { key, at } => self.reset(key, *at).ok(),
            Change::Update { key, patch, at } => self.update(key, patch, *at).ok(),
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

/// Current wall-clock time in unix milliseconds (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

/// Names of other state files (`*.state.json`, the default naming) in the directory of `path`,
/// at most a few, sorted: the likely old state of a renamed config.
fn other_state_files(path: &std::path::Path) -> Vec<String> {
    const SHOWN: usize = 5;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let own = path.file_name();
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| Some(e.file_name().as_os_str()) != own)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".state.json"))
        .collect();
    names.sort();
    names.truncate(SHOWN);
    names
}

/// Reads the snapshot at `path` and replays its journal (no config merge, no writes). A missing
/// snapshot is a fresh start, unless the journal says a state with users existed.
/// Reads snapshot + journal. `owner`: the caller is the server starting up (the only writer), so
/// temp files an interrupted write left are removed; a reader (`--links` while the server runs)
/// must never touch them: one may be a compaction in progress.
fn recover(path: &std::path::Path, owner: bool) -> Result<Recovered, UsersError> {
    let journal_path = journal::path_for(path);
    let snapshot = if owner {
        state_file::load(path)?
    } else {
        state_file::read(path)?
    };
    let Some(snapshot) = snapshot else {
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
        let others = other_state_files(path);
        log::warn!(
            "no state file at {}: starting with only the config.json keys (if the config was \
             renamed, the default state file name changed with it: set state_file to the old \
             one){}",
            path.display(),
            if others.is_empty() {
                String::new()
            } else {
                format!("; other state files beside it: {}", others.join(", "))
            }
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

/// How often [`load_stored`] reads again when snapshot and journal disagree (a compaction
/// between its two reads), 10 ms apart.
const READER_RETRIES: u32 = 20;

/// Every stored user, as the snapshot and its journal hold them (read-only: for `--links`,
/// tests and tools; safe while a server runs).
pub fn load_stored(path: &std::path::Path) -> Result<Vec<StoredUser>, UsersError> {
    // A compaction may replace the snapshot and restart the journal between the two reads; the
    // pair is then inconsistent for a moment: read again (a real inconsistency persists).
    let mut attempt = 0;
    loop {
        match recover(path, false) {
            Ok(r) => return Ok(r.table.snapshot().users),
            Err(e) if attempt >= READER_RETRIES => return Err(e),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Loads the state (snapshot + journal; a missing state is a fresh start unless the journal
/// says users existed), merges the config keys, and returns the shared table with its
/// persister. The merged state is compacted at once, so after a successful start the state
/// file exists, reflects config.json, and its journal is empty.
pub fn open(config: &ServerConfig) -> Result<(SharedUsers, Persister), UsersError> {
    open_at(config, now_unix())
}

/// [`open`] at the wall-clock time `now_unix`. Periodic resets that fell due while the server
/// was down are made here (once per user), before the table is shared; the compaction at the
/// end makes them durable.
pub fn open_at(
    config: &ServerConfig,
    now_unix: u64,
) -> Result<(SharedUsers, Persister), UsersError> {
    let path = state_file::resolve(&config.state_file, config.allow_symlinked_state)?;
    state_file::resolve(&journal::path_for(&path), config.allow_symlinked_state)?;
    let mut r = recover(&path, true)?;
    let held = r.table.len();
    r.table.apply_config(&config.access_keys, now_unix);
    let caught_up = r.table.catch_up_resets(now_unix);
    if caught_up > 0 {
        log::info!(
            "periodic counter resets that fell due while the server was down: {caught_up} users reset"
        );
    }
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

    /// A renamed config looks for `<new name>.state.json`; the warning names the old state
    /// files beside it so the operator can point `state_file` at the right one.
    #[test]
    fn a_missing_state_file_names_the_other_state_files_beside_it() {
        let dir = std::env::temp_dir().join(format!("ostp-other-states-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "router.state.json",
            "old.state.json",
            "old.state.json.journal",
            "x.json",
        ] {
            std::fs::write(dir.join(name), b"{}").unwrap();
        }
        let missing = dir.join("renamed.state.json");
        assert_eq!(
            other_state_files(&missing),
            vec![
                "old.state.json".to_string(),
                "router.state.json".to_string()
            ]
        );
        assert_eq!(
            other_state_files(&dir.join("router.state.json")),
            vec!["old.state.json".to_string()]
        );
        let _ = std::fs::remove_dir_all(&dir);
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
        t.reset(K1, None).unwrap();
        let u = t.get(id).unwrap();
        assert_eq!((u.bytes_up, u.bytes_down, u.connections), (0, 0, 0));
        assert_eq!(
            t.resets(id),
            Some(1),
            "a reset is told apart from the traffic before it"
        );
        assert_eq!(u.online_sessions, 1, "reset keeps live sessions");
        assert_eq!(t.online_users(), 1);
        assert_eq!(
            t.traffic_since_start(),
            (u64::MAX, u64::MAX),
            "totals since start survive resets and saturate"
        );
        t.session_closed(id);
        t.session_closed(id);
        assert_eq!(t.get(id).unwrap().online_sessions, 0);
        assert_eq!(t.online_users(), 0);
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
            settings: Default::default(),
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
                settings: Default::default(),
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
                settings: Default::default(),
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

    /// 2024-01-31 12:00:00 UTC.
    const NOON: u64 = 1_706_702_400;
    const DAY: u64 = 86_400;
    const MIDNIGHT: u64 = NOON + DAY / 2;

    fn daily(t: &mut UserTable, key: &str, created_at: u64) -> UserId {
        let settings = Settings {
            reset_strategy: ResetStrategy::Day,
            ..Settings::default()
        };
        t.create_with(key.into(), None, None, settings, created_at)
            .unwrap()
    }

    #[test]
    fn a_day_reset_falls_due_at_the_boundary_and_once_after_a_gap() {
        let mut t = UserTable::new();
        let id = daily(&mut t, K1, NOON);
        let other = t.create(K2.into(), None, None, NOON).unwrap();
        t.add_traffic(id, 5, 6);
        t.add_traffic(other, 1, 1);
        assert_eq!(t.next_reset_at(), Some(MIDNIGHT));
        assert_eq!(t.due_resets(MIDNIGHT - 1), []);
        let due = t.due_resets(MIDNIGHT);
        assert_eq!(
            due,
            [Change::Reset {
                key: K1.into(),
                at: Some(MIDNIGHT)
            }]
        );
        t.apply(&due[0]);
        let u = t.get(id).unwrap();
        assert_eq!((u.bytes_up, u.bytes_down, u.connections), (0, 0, 0));
        assert_eq!(u.last_reset_at, Some(MIDNIGHT));
        assert_eq!(t.resets(id), Some(1), "the tunnel loop tells it apart");
        assert_eq!(t.get(other).unwrap().bytes_up, 1, "no strategy, no reset");
        assert_eq!(t.due_resets(MIDNIGHT + DAY - 1), [], "once per period");
        // Five boundaries missed (server down): one reset, and the next period starts then.
        let late = MIDNIGHT + 5 * DAY + 300;
        t.add_traffic(id, 7, 7);
        assert_eq!(t.catch_up_resets(late), 1);
        assert_eq!(t.get(id).unwrap().bytes_up, 0);
        assert_eq!(t.get(id).unwrap().last_reset_at, Some(late));
        assert_eq!(t.next_reset_at(), Some(MIDNIGHT + 6 * DAY));
        // A manual reset mid-period leaves the next boundary where it was.
        t.reset(K1, Some(late + 60)).unwrap();
        assert_eq!(t.next_reset_at(), Some(MIDNIGHT + 6 * DAY));
    }

    #[test]
    fn choosing_a_strategy_starts_its_period_then_and_patches_set_only_what_they_name() {
        let mut t = UserTable::new();
        let id = t.create(K1.into(), Some("a".into()), Some(9), 0).unwrap();
        t.add_traffic(id, 3, 3);
        let patch = Patch {
            reset_strategy: Some(ResetStrategy::Day),
            note: Some(Some("tg:42".into())),
            expire_at: Some(Some(NOON)),
            enabled: Some(false),
            ..Patch::default()
        };
        t.update(K1, &patch, NOON).unwrap();
        assert_eq!(t.due_resets(NOON + 1), [], "no reset for the years before");
        assert_eq!(t.next_reset_at(), Some(MIDNIGHT));
        let u = t.get(id).unwrap();
        assert_eq!((u.name.as_deref(), u.limit_bytes), (Some("a"), Some(9)));
        assert_eq!(u.settings.note.as_deref(), Some("tg:42"));
        assert!(!u.settings.enabled && u.expired(NOON) && !u.expired(NOON - 1));
        // Setting the same strategy again does not move its period.
        t.update(K1, &patch, NOON + 100).unwrap();
        assert_eq!(t.next_reset_at(), Some(MIDNIGHT));
        // Explicit nulls clear; the journal form keeps null apart from absent.
        let clear = Patch {
            name: Some(None),
            expire_at: Some(None),
            limit_bytes: Some(None),
            ..Patch::default()
        };
        let change = Change::Update {
            key: K1.into(),
            patch: clear,
            at: 1,
        };
        let json = serde_json::to_string(&change).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"op":"update","key":"{K1}","patch":{{"name":null,"limit_bytes":null,"expire_at":null}},"at":1}}"#
            )
        );
        assert_eq!(serde_json::from_str::<Change>(&json).unwrap(), change);
        t.apply(&change);
        let u = t.get(id).unwrap();
        assert_eq!(
            (u.name.clone(), u.limit_bytes, u.settings.expire_at),
            (None, None, None)
        );
        assert_eq!(u.settings.note.as_deref(), Some("tg:42"), "absent: kept");
        // The settings survive a snapshot round trip.
        let again = UserTable::from_snapshot(t.snapshot().users);
        let v = again.get_by_key(K1).unwrap();
        assert_eq!((&v.settings, v.reset_anchor), (&u.settings, u.reset_anchor));
    }

    #[test]
    fn a_config_keys_name_cannot_be_patched_but_its_settings_can() {
        let mut t = UserTable::new();
        t.apply_config(&[entry(K1, Some("cfg"), None)], 0);
        let update = |patch: Patch| Change::Update {
            key: K1.into(),
            patch,
            at: 0,
        };
        let name = update(Patch {
            name: Some(Some("x".into())),
            ..Patch::default()
        });
        let off = update(Patch {
            enabled: Some(false),
            ..Patch::default()
        });
        let mut p = Pending::new();
        assert_eq!(t.check(&name, &mut p), Err(TableError::ConfigName));
        assert_eq!(t.check(&off, &mut p), Ok(()));
        t.apply(&off);
        // A reload keeps what the API set.
        t.apply_config(&[entry(K1, Some("cfg"), Some(5))], 0);
        assert!(!t.get_by_key(K1).unwrap().settings.enabled);
    }

    #[test]
    fn max_devices_is_set_cleared_and_kept_through_journal_and_snapshot() {
        let mut t = UserTable::new();
        t.create(K1.into(), None, None, 0).unwrap();
        let set = Change::Update {
            key: K1.into(),
            patch: Patch {
                max_devices: Some(Some(2)),
                ..Patch::default()
            },
            at: 1,
        };
        // The journal form of the change reads back the same.
        let json = serde_json::to_string(&set).unwrap();
        assert!(json.contains(r#""max_devices":2"#), "{json}");
        let set: Change = serde_json::from_str(&json).unwrap();
        t.apply(&set);
        assert_eq!(t.get_by_key(K1).unwrap().settings.max_devices, Some(2));
        let t2 = UserTable::from_snapshot(t.snapshot().users);
        assert_eq!(t2.get_by_key(K1).unwrap().settings.max_devices, Some(2));
        // An explicit null clears it (absent leaves it alone).
        let clear: Change = serde_json::from_str(&format!(
            r#"{{"op":"update","key":"{K1}","patch":{{"max_devices":null}},"at":2}}"#
        ))
        .unwrap();
        t.apply(&Change::Update {
            key: K1.into(),
            patch: Patch::default(),
            at: 2,
        });
        assert_eq!(t.get_by_key(K1).unwrap().settings.max_devices, Some(2));
        t.apply(&clear);
        assert_eq!(t.get_by_key(K1).unwrap().settings.max_devices, None);
    }
}
