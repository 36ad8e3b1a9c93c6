//! The [`Persister`]: makes changes of the user table durable before they are applied, with
//! O(change) writes: an append-only [journal] of changes, periodic compaction into the
//! snapshot ([`state_file`]), and a flusher thread that journals the counters of the users
//! whose counters moved.
//!
//! **A change is applied only after it is durable.** [`Persister::commit`] queues the change;
//! whoever holds the journal lock takes the whole queue as one batch (group commit): checks
//! every change under the table lock (against the table and the batch before it), appends
//! the accepted ones and fsyncs outside the table lock, and only then applies them under the
//! table lock. A failed write applies nothing and leaves the journal as it was (truncated back,
//! or rewritten by a compaction before the next append), so a retry does the right thing.
//! Changes run in journal order, which is the order they are applied in: linearizable.
//!
//! Lock order: compaction → journal → table; the table lock is never held across file I/O.
//! A compaction takes the snapshot under the journal lock (so it holds exactly the changes up
//! to the journal's last one), writes it outside every lock while batches keep being appended
//! (and copied aside), then replaces the journal with a header plus those copied batches.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::journal::{self, Header};
use super::{
    AccessKeyEntry, Change, ConfigChanges, Pending, SharedUsers, TableError, User, UserId,
    UserTable, state_file,
};

/// Below this journal size no compaction is started (above it, once the journal is larger
/// than the snapshot): the journal stays bounded by about max(this, snapshot size).
pub const MIN_COMPACTION_BYTES: u64 = 1 << 20;

/// Writing the state file or its journal failed.
#[derive(Debug)]
pub struct PersistError {
    pub path: PathBuf,
    pub error: io::Error,
}

impl PersistError {
    /// The disk (or the user's quota) is full: `ENOSPC` / `EDQUOT`.
    pub fn is_storage_full(&self) -> bool {
        matches!(
            self.error.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        )
    }

    fn duplicate(&self) -> PersistError {
        let error = match self.error.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.error.kind(), self.error.to_string()),
        };
        PersistError {
            path: self.path.clone(),
            error,
        }
    }
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot write {}: {}", self.path.display(), self.error)
    }
}

impl std::error::Error for PersistError {}

/// Why a change was not made.
#[derive(Debug)]
pub enum CommitError {
    /// The change does not fit the table (nothing was written).
    Table(TableError),
    /// It could not be made durable (nothing was applied).
    Persist(PersistError),
}

impl fmt::Display for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitError::Table(e) => write!(f, "{e}"),
            CommitError::Persist(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CommitError {}

/// A durable, applied change.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The user it concerned.
    pub id: UserId,
    /// The user right after the change (`None` after a delete).
    pub user: Option<User>,
}

/// Byte counts of the durable state (for measurements and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Current journal length.
    pub journal_len: u64,
    /// Bytes appended to the journal since start.
    pub journal_appended: u64,
    /// Size of the last snapshot written.
    pub snapshot_len: u64,
    /// Compactions since start (the one at start included).
    pub compactions: u64,
    /// The last journal change.
    pub last_seq: u64,
    /// Counter flushes that succeeded (nothing to write counts) / failed, since start.
    pub flushes: u64,
    pub flush_failures: u64,
    /// Unix seconds of the last successful counter flush (0 = none yet).
    pub last_flush_unix: u64,
}

struct JournalState {
    /// `None` until the first compaction, and after a failure that may have left the file
    /// with bytes of an unacknowledged batch: a compaction must rewrite it before appending.
    file: Option<File>,
    last_seq: u64,
    /// Batches appended while a compaction writes the snapshot (they go into its journal).
    collecting: Option<Vec<u8>>,
    /// A compaction is wanted regardless of size (after a config reload).
    compact_wanted: bool,
    stats: StoreStats,
}

type Slot = Arc<Mutex<Option<Result<Applied, CommitError>>>>;

#[derive(Default)]
struct FlusherCtl {
    stop: bool,
    kick: bool,
}

struct Flusher {
    ctl: Arc<(Mutex<FlusherCtl>, Condvar)>,
    thread: JoinHandle<()>,
}

struct Inner {
    path: PathBuf,
    journal_path: PathBuf,
    users: SharedUsers,
    queue: Mutex<Vec<(Change, Slot)>>,
    journal: Mutex<JournalState>,
    compacting: Mutex<()>,
    compaction_threshold: Mutex<Option<u64>>,
    flusher: Mutex<Option<Flusher>>,
    reset_listener: Mutex<Option<ResetListener>>,
}

type ResetListener = Box<dyn Fn(UserId) + Send + Sync>;

/// Makes user-table changes durable; cheap to clone.
#[derive(Clone)]
pub struct Persister {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these values half-updated in a harmful way.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Locks the shared user table, tolerating poisoning (the table stays consistent per call).
pub fn lock_users(users: &SharedUsers) -> MutexGuard<'_, UserTable> {
    lock(users)
}

impl Persister {
    /// A persister for the state at `path` whose journal ends at `last_seq`; nothing is
    /// written (and no change can be committed) until the first [`Persister::compact`].
    pub fn new(path: PathBuf, users: SharedUsers, last_seq: u64) -> Persister {
        Persister {
            inner: Arc::new(Inner {
                journal_path: journal::path_for(&path),
                path,
                users,
                queue: Mutex::new(Vec::new()),
                journal: Mutex::new(JournalState {
                    file: None,
                    last_seq,
                    collecting: None,
                    compact_wanted: false,
                    stats: StoreStats {
                        last_seq,
                        ..StoreStats::default()
                    },
                }),
                compacting: Mutex::new(()),
                compaction_threshold: Mutex::new(None),
                flusher: Mutex::new(None),
                reset_listener: Mutex::new(None),
            }),
        }
    }

    /// The state file.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// Byte counts of what was written so far.
    pub fn stats(&self) -> StoreStats {
        lock(&self.inner.journal).stats
    }

    /// Compacts whenever the journal is longer than `bytes`, whatever the snapshot size
    /// (`None`: the default rule, longer than both [`MIN_COMPACTION_BYTES`] and the snapshot).
    /// For tests and measurements.
    pub fn set_compaction_threshold(&self, bytes: Option<u64>) {
        *lock(&self.inner.compaction_threshold) = bytes;
    }

    /// Makes `change` durable, then applies it; returns the user it concerned. On any error
    /// the table is unchanged.
    pub fn commit(&self, change: Change) -> Result<Applied, CommitError> {
        self.commit_each(vec![change])
            .pop()
            .unwrap_or_else(|| Err(self.not_processed()))
    }

    /// Commits several independent changes with one write (normally one batch, one fsync);
    /// each is checked and answered on its own, in order.
    pub fn commit_each(&self, changes: Vec<Change>) -> Vec<Result<Applied, CommitError>> {
        if lock(&self.inner.journal).file.is_none() {
            // The journal may hold bytes of a failed batch: rewrite it first.
            if let Err(e) = self.compact() {
                return changes
                    .iter()
                    .map(|_| Err(CommitError::Persist(e.duplicate())))
                    .collect();
            }
        }
        let slots: Vec<Slot> = changes.iter().map(|_| Arc::new(Mutex::new(None))).collect();
        lock(&self.inner.queue).extend(changes.into_iter().zip(slots.iter().cloned()));
        let mut j = lock(&self.inner.journal);
        // A holder before us may have taken our changes in its batch (and compacts after it).
        let ran = slots.iter().any(|s| lock(s).is_none());
        if ran {
            let batch = std::mem::take(&mut *lock(&self.inner.queue));
            self.run_batch(&mut j, batch);
        }
        let compact = ran && self.compaction_due(&j);
        drop(j);
        if compact {
            self.kick_or_compact();
        }
        slots
            .iter()
            .map(|s| lock(s).take().unwrap_or_else(|| Err(self.not_processed())))
            .collect()
    }

    fn not_processed(&self) -> CommitError {
        CommitError::Persist(PersistError {
            path: self.inner.journal_path.clone(),
            error: io::Error::other("the change was not processed"),
        })
    }

    /// Makes the periodic resets due at `now_unix` (one batch), then tells the reset listener
    /// (see [`Persister::on_reset`]) about each user reset. Returns those users.
    pub fn run_due_resets(&self, now_unix: u64) -> Vec<UserId> {
        let due = lock(&self.inner.users).due_resets(now_unix);
        if due.is_empty() {
            return Vec::new();
        }
        let mut done = Vec::new();
        for result in self.commit_each(due) {
            match result {
                Ok(applied) => done.push(applied.id),
                // Deleted meanwhile: nothing to reset.
                Err(CommitError::Table(_)) => {}
                Err(CommitError::Persist(e)) => {
                    log::error!("periodic counter reset: {e}; retrying at the next flush");
                }
            }
        }
        if !done.is_empty() {
            log::info!("periodic counter reset of {} users", done.len());
            if let Some(listener) = lock(&self.inner.reset_listener).as_ref() {
                done.iter().for_each(|id| listener(*id));
            }
        }
        done
    }

    /// Who hears of each periodic reset once it is durable and applied (the server tells its
    /// tunnel loop, as the API does after `POST /api/users/{key}/reset`).
    pub fn on_reset(&self, listener: impl Fn(UserId) + Send + Sync + 'static) {
        *lock(&self.inner.reset_listener) = Some(Box::new(listener));
    }

    /// Checks, appends and applies one batch (journal lock held by the caller).
    fn run_batch(&self, j: &mut JournalState, batch: Vec<(Change, Slot)>) {
        let mut accepted = Vec::with_capacity(batch.len());
        {
            let table = lock(&self.inner.users);
            let mut pending = Pending::new();
            for (change, slot) in batch {
                match table.check(&change, &mut pending) {
                    Ok(()) => accepted.push((change, slot)),
                    Err(e) => *lock(&slot) = Some(Err(CommitError::Table(e))),
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        if let Err(e) = self.append(j, accepted.iter().map(|(c, _)| c)) {
            for (_, slot) in accepted {
                *lock(&slot) = Some(Err(CommitError::Persist(e.duplicate())));
            }
            return;
        }
        let mut table = lock(&self.inner.users);
        for (change, slot) in accepted {
            let done = match table.apply(&change) {
                Some(id) => Ok(Applied {
                    id,
                    user: table.get(id).cloned(),
                }),
                None => Err(CommitError::Table(TableError::NotFound)),
            };
            *lock(&slot) = Some(done);
        }
    }

    /// Appends one batch and fsyncs it (journal lock held). On failure the journal is cut back
    /// to where it was; if even that fails, it is marked for rewriting.
    fn append<'a>(
        &self,
        j: &mut JournalState,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<(), PersistError> {
        let fail = |error: io::Error| PersistError {
            path: self.inner.journal_path.clone(),
            error,
        };
        let Some(file) = j.file.as_mut() else {
            return Err(fail(io::Error::other(
                "the journal must be rewritten after an earlier failed write",
            )));
        };
        let (bytes, last) = journal::encode_batch(j.last_seq + 1, changes)
            .map_err(|e| fail(io::Error::other(e)))?;
        let before = j.stats.journal_len;
        if let Err(e) = file.write_all(&bytes).and_then(|()| file.sync_data()) {
            if file
                .set_len(before)
                .and_then(|()| file.sync_data())
                .is_err()
            {
                j.file = None;
            }
            return Err(fail(e));
        }
        let n = bytes.len() as u64;
        j.last_seq = last;
        j.stats.last_seq = last;
        j.stats.journal_len += n;
        j.stats.journal_appended += n;
        if let Some(c) = &mut j.collecting {
            c.extend_from_slice(&bytes);
        }
        Ok(())
    }

    fn compaction_due(&self, j: &JournalState) -> bool {
        let threshold = lock(&self.inner.compaction_threshold)
            .unwrap_or_else(|| MIN_COMPACTION_BYTES.max(j.stats.snapshot_len));
        j.compact_wanted || j.stats.journal_len > threshold
    }

    /// Wakes the flusher to compact, or compacts on this thread if there is no flusher.
    fn kick_or_compact(&self) {
        if let Some(f) = lock(&self.inner.flusher).as_ref() {
            lock(&f.ctl.0).kick = true;
            f.ctl.1.notify_all();
            return;
        }
        if let Err(e) = self.compact() {
            log::error!("compaction: {e}");
        }
    }

    /// Writes the whole table as the new snapshot and starts an empty journal after it
    /// (batches appended meanwhile are carried over). Also repairs a journal marked for
    /// rewriting.
    pub fn compact(&self) -> Result<(), PersistError> {
        let _one = lock(&self.inner.compacting);
        let mut snapshot = {
            let mut j = lock(&self.inner.journal);
            let mut snapshot = lock(&self.inner.users).snapshot();
            snapshot.journal_seq = j.last_seq;
            j.collecting = Some(Vec::new());
            snapshot
        };
        let written = state_file::encode(&snapshot)
            .map_err(io::Error::other)
            .and_then(|bytes| {
                state_file::write_atomic(&self.inner.path, &bytes).map(|()| bytes.len())
            });
        let snapshot_len = match written {
            Ok(n) => n as u64,
            Err(error) => {
                lock(&self.inner.journal).collecting = None;
                return Err(PersistError {
                    path: self.inner.path.clone(),
                    error,
                });
            }
        };
        let header = Header {
            snapshot_seq: snapshot.journal_seq,
            users: std::mem::take(&mut snapshot.users).len() as u64,
        };
        let mut j = lock(&self.inner.journal);
        let mut contents = journal::encode_header(header);
        contents.extend(j.collecting.take().unwrap_or_default());
        let path = &self.inner.journal_path;
        // Whatever happens, the old handle may point at a replaced file: reopen or rewrite.
        j.file = None;
        let file = state_file::write_atomic(path, &contents)
            .and_then(|()| state_file::open_append(path))
            .map_err(|error| PersistError {
                path: path.clone(),
                error,
            })?;
        j.file = Some(file);
        j.compact_wanted = false;
        j.stats.journal_len = contents.len() as u64;
        j.stats.snapshot_len = snapshot_len;
        j.stats.compactions += 1;
        Ok(())
    }

    /// Journals the counters of every user whose counters moved since the last flush.
    pub fn flush_counters(&self) -> Result<(), PersistError> {
        let mut j = lock(&self.inner.journal);
        let (ids, changes) = lock(&self.inner.users).take_counters();
        let written = if changes.is_empty() {
            Ok(())
        } else {
            self.append(&mut j, &changes)
        };
        if written.is_err() {
            lock(&self.inner.users).counters_unsaved(ids);
            j.stats.flush_failures += 1;
        } else {
            j.stats.flushes += 1;
            j.stats.last_flush_unix = super::now_unix();
        }
        written
    }

    /// Writes the counters that moved now (graceful shutdown, tests).
    pub fn flush_now(&self) -> Result<(), PersistError> {
        self.flush_counters()
    }

    /// Merges the config keys (SIGHUP) with no batch in flight, then compacts: config.json is
    /// the durable record of these changes, the snapshot makes the merge itself durable.
    pub fn apply_config(&self, entries: &[AccessKeyEntry], now_unix: u64) -> ConfigChanges {
        let changes = {
            let mut j = lock(&self.inner.journal);
            let changes = lock(&self.inner.users).apply_config(entries, now_unix);
            j.compact_wanted |= !changes.is_empty();
            changes
        };
        if !changes.is_empty()
            && let Err(e) = self.compact()
        {
            log::error!("after the reload: {e}; retrying at the next flush");
        }
        changes
    }

    /// Starts the flusher thread: every `interval` (or when a compaction is due) it journals
    /// the counters that moved and compacts if the journal grew past its bound. A second call
    /// replaces nothing and returns false.
    pub fn start_flusher(&self, interval: Duration) -> bool {
        let mut slot = lock(&self.inner.flusher);
        if slot.is_some() {
            return false;
        }
        let ctl = Arc::new((Mutex::new(FlusherCtl::default()), Condvar::new()));
        let ctl2 = ctl.clone();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ostp-flusher".into())
            .spawn(move || me.flusher_loop(&ctl2, interval));
        match spawned {
            Ok(thread) => {
                *slot = Some(Flusher { ctl, thread });
                true
            }
            Err(e) => {
                log::error!("cannot start the state flusher thread: {e}");
                false
            }
        }
    }

    fn flusher_loop(&self, ctl: &(Mutex<FlusherCtl>, Condvar), interval: Duration) {
        let (state, cv) = ctl;
        let mut guard = lock(state);
        loop {
            if !guard.kick && !guard.stop {
                // Wake at the next periodic reset if it comes before the next flush.
                let wait = lock(&self.inner.users)
                    .next_reset_at()
                    .map_or(interval, |at| {
                        let left = Duration::from_secs(at.saturating_sub(super::now_unix()));
                        interval.min(left.max(Duration::from_millis(100)))
                    });
                guard = cv
                    .wait_timeout(guard, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if guard.stop {
                return;
            }
            guard.kick = false;
            drop(guard);
            self.run_due_resets(super::now_unix());
            if let Err(e) = self.flush_counters() {
                log::error!("counter flush: {e}");
            }
            let due = self.compaction_due(&lock(&self.inner.journal));
            if due && let Err(e) = self.compact() {
                log::error!("compaction: {e}");
            }
            guard = lock(state);
        }
    }

    /// Stops the flusher thread (if running), flushes the counters and compacts once more.
    pub fn stop_flusher(&self) -> Result<(), PersistError> {
        let flusher = lock(&self.inner.flusher).take();
        if let Some(f) = flusher {
            lock(&f.ctl.0).stop = true;
            f.ctl.1.notify_all();
            let _ = f.thread.join();
        }
        self.flush_counters()?;
        self.compact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use crate::users::{Source, load_stored};
    use std::sync::Mutex as StdMutex;

    fn temp_state() -> PathBuf {
        let mut b = [0u8; 8];
        keys::fill_random(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("ostp-persist-test-{}", keys::to_hex(&b)));
        std::fs::create_dir_all(&d).unwrap();
        d.join("state.json")
    }

    fn started(path: &std::path::Path) -> (SharedUsers, Persister) {
        let users: SharedUsers = Arc::new(StdMutex::new(UserTable::new()));
        let p = Persister::new(path.to_path_buf(), users.clone(), 0);
        p.compact().unwrap();
        (users, p)
    }

    fn create(key: &str) -> Change {
        Change::Create {
            key: key.into(),
            name: None,
            limit_bytes: None,
            created_at: 0,
            settings: Default::default(),
        }
    }

    #[test]
    fn concurrent_writers_never_lose_a_change() {
        let path = temp_state();
        let (_users, p) = started(&path);
        p.set_compaction_threshold(Some(4096)); // compactions run during the storm
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let p = p.clone();
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let key = format!("user-{t}-{i:04}-xxxxxxxx");
                        p.commit(create(&key)).unwrap();
                        assert!(matches!(
                            p.commit(create(&key)),
                            Err(CommitError::Table(TableError::KeyExists))
                        ));
                        // What this thread was acknowledged is on disk now.
                        let on_disk = load_stored(&path).unwrap();
                        assert!(on_disk.iter().any(|u| u.key == key));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(load_stored(&path).unwrap().len(), 200);
        assert!(p.stats().compactions > 1);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn flusher_journals_only_moved_counters_and_stop_compacts() {
        let path = temp_state();
        let (users, p) = started(&path);
        let id = p.commit(create("aaaaaaaaaaaaaaaa")).unwrap().id;
        p.commit(create("bbbbbbbbbbbbbbbb")).unwrap();
        let before = p.stats().journal_appended;
        assert!(p.start_flusher(Duration::from_millis(20)));
        assert!(!p.start_flusher(Duration::from_millis(20)));
        lock_users(&users).add_traffic(id, 10, 20);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while load_stored(&path).unwrap()[0].bytes_up != 10 {
            assert!(std::time::Instant::now() < deadline, "flusher never wrote");
            std::thread::sleep(Duration::from_millis(10));
        }
        let one = p.stats().journal_appended - before;
        assert!(one < 200, "one user's counters took {one} bytes");
        lock_users(&users).add_traffic(id, 1, 0);
        p.stop_flusher().unwrap();
        let snap = state_file::read(&path).unwrap().unwrap();
        assert_eq!(snap.users[0].bytes_up, 11, "the snapshot alone holds it");
        assert_eq!(snap.journal_seq, p.stats().last_seq);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn flushes_and_their_failures_are_counted() {
        let path = temp_state();
        let (users, p) = started(&path);
        let id = p.commit(create("aaaaaaaaaaaaaaaa")).unwrap().id;
        assert_eq!((p.stats().flushes, p.stats().last_flush_unix), (0, 0));
        p.flush_now().unwrap();
        let ok = p.stats();
        assert_eq!(ok.flushes, 1, "nothing to write is a successful flush");
        assert!(ok.last_flush_unix >= 1_700_000_000);
        lock_users(&users).add_traffic(id, 1, 1);
        lock(&p.inner.journal).file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open("/dev/full")
                .unwrap(),
        );
        assert!(p.flush_now().is_err());
        let failed = p.stats();
        assert_eq!((failed.flushes, failed.flush_failures), (1, 1));
        assert_eq!(failed.last_flush_unix, ok.last_flush_unix);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_failed_append_applies_nothing_and_the_journal_is_repaired() {
        let path = temp_state();
        let (users, p) = started(&path);
        p.commit(create("aaaaaaaaaaaaaaaa")).unwrap();
        // Every write now fails with ENOSPC, and the file cannot be cut back either.
        lock(&p.inner.journal).file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open("/dev/full")
                .unwrap(),
        );
        match p.commit(Change::Delete {
            key: "aaaaaaaaaaaaaaaa".into(),
        }) {
            Err(CommitError::Persist(e)) => assert!(e.is_storage_full(), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(lock_users(&users).user_id("aaaaaaaaaaaaaaaa").is_some());
        // The retry rewrites the journal first, then succeeds.
        p.commit(Change::Delete {
            key: "aaaaaaaaaaaaaaaa".into(),
        })
        .unwrap();
        p.commit(create("cccccccccccccccc")).unwrap();
        let keys: Vec<String> = load_stored(&path)
            .unwrap()
            .into_iter()
            .map(|u| u.key)
            .collect();
        assert_eq!(keys, vec!["cccccccccccccccc".to_string()]);
        let u = lock_users(&users);
        assert_eq!(
            u.get_by_key("cccccccccccccccc").unwrap().source,
            Source::Api
        );
        drop(u);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn periodic_resets_are_durable_before_they_are_announced() {
        let path = temp_state();
        let (users, p) = started(&path);
        let noon = 1_706_702_400; // 2024-01-31 12:00 UTC
        let midnight = noon + 43_200;
        let mut create = create("aaaaaaaaaaaaaaaa");
        if let Change::Create {
            created_at,
            settings,
            ..
        } = &mut create
        {
            *created_at = noon;
            settings.reset_strategy = super::super::ResetStrategy::Day;
        }
        let id = p.commit(create).unwrap().id;
        lock_users(&users).add_traffic(id, 10, 20);
        p.flush_now().unwrap();
        let heard = Arc::new(StdMutex::new(Vec::new()));
        let h = heard.clone();
        let path2 = path.clone();
        p.on_reset(move |id| {
            // Announced only once the reset is on disk.
            assert_eq!(load_stored(&path2).unwrap()[0].bytes_down, 0);
            h.lock().unwrap().push(id);
        });
        assert_eq!(p.run_due_resets(midnight - 1), []);
        assert_eq!(load_stored(&path).unwrap()[0].bytes_down, 20);
        assert_eq!(p.run_due_resets(midnight), [id]);
        assert_eq!(*heard.lock().unwrap(), [id]);
        let stored = &load_stored(&path).unwrap()[0];
        assert_eq!((stored.bytes_up, stored.bytes_down), (0, 0));
        assert_eq!(stored.last_reset_at, Some(midnight));
        assert_eq!(p.run_due_resets(midnight + 60), [], "once per period");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_reset_missed_while_the_server_was_down_is_made_at_start() {
        let path = temp_state();
        let noon = 1_706_702_400;
        let config_text = format!(
            r#"{{"mode":"server","state_file":{:?},"access_keys":[]}}"#,
            path.display().to_string()
        );
        let crate::config::Config::Server(cfg) =
            crate::config::parse(&path.with_file_name("config.json"), &config_text).unwrap()
        else {
            panic!("not a server config");
        };
        {
            let (users, p) = super::super::open_at(&cfg, noon).unwrap();
            let mut create = create("aaaaaaaaaaaaaaaa");
            if let Change::Create {
                created_at,
                settings,
                ..
            } = &mut create
            {
                *created_at = noon;
                settings.reset_strategy = super::super::ResetStrategy::Day;
            }
            let id = p.commit(create).unwrap().id;
            lock_users(&users).add_traffic(id, 10, 20);
            p.flush_now().unwrap();
        } // "down" from here, past midnight
        let (_, _) = super::super::open_at(&cfg, noon + 43_199).unwrap();
        assert_eq!(load_stored(&path).unwrap()[0].bytes_down, 20, "not due yet");
        let later = noon + 3 * 86_400;
        let (users, _p) = super::super::open_at(&cfg, later).unwrap();
        let u = lock_users(&users)
            .get_by_key("aaaaaaaaaaaaaaaa")
            .cloned()
            .unwrap();
        assert_eq!(
            (u.bytes_up, u.bytes_down, u.last_reset_at),
            (0, 0, Some(later))
        );
        let stored = &load_stored(&path).unwrap()[0];
        assert_eq!(
            (stored.bytes_down, stored.last_reset_at),
            (0, Some(later)),
            "durable"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
