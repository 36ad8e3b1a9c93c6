//! The [`Persister`]: durable, group-committed writes of the user table, and the periodic
//! flusher thread for traffic counters.
//!
//! Every writer first notes the table generation it needs on disk, then takes the persist
//! mutex. If the last written generation already covers it (someone else wrote a newer
//! snapshot meanwhile) it returns at once; otherwise it snapshots the table (briefly taking the
//! table lock), serialises and writes outside the table lock, and records the generation. An
//! older snapshot can therefore never overwrite a newer one, and N concurrent API writes cost
//! far fewer than N fsyncs.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{SharedUsers, UserTable, state_file};

/// Writing the state file failed.
#[derive(Debug)]
pub struct PersistError {
    pub path: PathBuf,
    pub error: io::Error,
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot write the state file {}: {}",
            self.path.display(),
            self.error
        )
    }
}

impl std::error::Error for PersistError {}

struct Flusher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

struct Inner {
    path: PathBuf,
    users: SharedUsers,
    /// The generation known to be on disk; held while writing.
    written: Mutex<u64>,
    flusher: Mutex<Option<Flusher>>,
}

/// Writes the user table to the state file; cheap to clone.
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
    /// A persister for `path`; nothing is written until asked.
    pub fn new(path: PathBuf, users: SharedUsers) -> Persister {
        Persister {
            inner: Arc::new(Inner {
                path,
                users,
                written: Mutex::new(0),
                flusher: Mutex::new(None),
            }),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// Makes the current table contents durable; returns when a snapshot at least as new as
    /// the table at the time of the call is on disk.
    pub fn persist(&self) -> Result<(), PersistError> {
        let target = lock(&self.inner.users).generation();
        self.persist_up_to(target, true)
    }

    /// Makes generation `target` (or newer) durable. Used by the API after a change.
    pub fn persist_generation(&self, target: u64) -> Result<(), PersistError> {
        self.persist_up_to(target, false)
    }

    fn persist_up_to(&self, target: u64, force_first: bool) -> Result<(), PersistError> {
        let mut written = lock(&self.inner.written);
        if *written >= target && !(force_first && *written == 0) {
            return Ok(());
        }
        let snapshot = lock(&self.inner.users).snapshot();
        let bytes = state_file::encode(&snapshot).map_err(|e| PersistError {
            path: self.inner.path.clone(),
            error: io::Error::other(e),
        })?;
        state_file::write_atomic(&self.inner.path, &bytes).map_err(|error| PersistError {
            path: self.inner.path.clone(),
            error,
        })?;
        *written = (*written).max(snapshot.generation);
        Ok(())
    }

    /// True if the table has changes not yet on disk.
    pub fn is_dirty(&self) -> bool {
        let generation = lock(&self.inner.users).generation();
        generation > *lock(&self.inner.written)
    }

    /// Writes now if anything changed since the last write (graceful shutdown, SIGHUP).
    pub fn flush_now(&self) -> Result<(), PersistError> {
        if self.is_dirty() {
            self.persist()
        } else {
            Ok(())
        }
    }

    /// Starts the flusher thread: every `interval` it writes the table if it is dirty.
    /// A second call replaces nothing and returns false.
    pub fn start_flusher(&self, interval: Duration) -> bool {
        let mut slot = lock(&self.inner.flusher);
        if slot.is_some() {
            return false;
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = stop.clone();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ostp-flusher".into())
            .spawn(move || {
                let (flag, cv) = &*stop2;
                let mut stopped = lock(flag);
                loop {
                    let (guard, _) = cv
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    if let Err(e) = me.flush_now() {
                        log::error!("{e}");
                    }
                    stopped = lock(flag);
                }
            });
        match spawned {
            Ok(thread) => {
                *slot = Some(Flusher { stop, thread });
                true
            }
            Err(e) => {
                log::error!("cannot start the state flusher thread: {e}");
                false
            }
        }
    }

    /// Stops the flusher thread (if running) and flushes once more.
    pub fn stop_flusher(&self) -> Result<(), PersistError> {
        let flusher = lock(&self.inner.flusher).take();
        if let Some(f) = flusher {
            *lock(&f.stop.0) = true;
            f.stop.1.notify_all();
            let _ = f.thread.join();
        }
        self.flush_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use std::sync::Mutex as StdMutex;

    fn temp_state() -> PathBuf {
        let mut b = [0u8; 8];
        keys::fill_random(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("ostp-persist-test-{}", keys::to_hex(&b)));
        std::fs::create_dir_all(&d).unwrap();
        d.join("state.json")
    }

    #[test]
    fn concurrent_writers_never_lose_a_change() {
        let path = temp_state();
        let users: SharedUsers = Arc::new(StdMutex::new(UserTable::new()));
        let p = Persister::new(path.clone(), users.clone());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let users = users.clone();
                let p = p.clone();
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let g = {
                            let mut tb = lock_users(&users);
                            tb.create(format!("user-{t}-{i:04}-xxxxxxxx"), None, None, 0)
                                .unwrap();
                            tb.generation()
                        };
                        p.persist_generation(g).unwrap();
                        // What this thread was acknowledged is on disk now.
                        let on_disk = state_file::read(&path).unwrap();
                        assert!(
                            on_disk
                                .iter()
                                .any(|u| u.key == format!("user-{t}-{i:04}-xxxxxxxx"))
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(state_file::load(&path).unwrap().len(), 200);
        assert!(!p.is_dirty());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn flusher_writes_dirty_counters_and_stop_flushes() {
        let path = temp_state();
        let users: SharedUsers = Arc::new(StdMutex::new(UserTable::new()));
        let p = Persister::new(path.clone(), users.clone());
        let id = lock_users(&users)
            .create("aaaaaaaaaaaaaaaa".into(), None, None, 0)
            .unwrap();
        p.persist().unwrap();
        assert!(p.start_flusher(Duration::from_millis(20)));
        assert!(!p.start_flusher(Duration::from_millis(20)));
        lock_users(&users).add_traffic(id, 10, 20);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let on_disk = state_file::load(&path).unwrap();
            if on_disk[0].bytes_up == 10 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "flusher never wrote");
            std::thread::sleep(Duration::from_millis(10));
        }
        lock_users(&users).add_traffic(id, 1, 0);
        p.stop_flusher().unwrap();
        assert_eq!(state_file::load(&path).unwrap()[0].bytes_up, 11);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
