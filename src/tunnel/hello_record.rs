//! The server's record of answered hellos on disk (`<state file>.hellos`), so that a hello
//! captured before a restart gets silence after it: loaded at start, written when it changed
//! at most every [`WRITE_INTERVAL`] and at shutdown, atomically and owner-only, by a writer
//! thread (the loop only serialises the record, a few KiB, and never waits for the disk).
//! Records written while running are marked incomplete and only the one written at a graceful
//! stop complete; finding an incomplete one at start (a crash) makes the endpoint silence every
//! hello made before the restart, so the hellos answered after the last write are covered too
//! (except those of clients whose clock ran ahead by more than the downtime: docs/PROTOCOL.md §3.1).

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proto::ServerEndpoint;
use crate::users::state_file::write_atomic;

/// How often a changed record is written (what a crash loses of it is covered by silencing the
/// hellos made before the restart; a graceful shutdown writes the rest).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(10);
/// Largest record file read (the record itself stays far below: about 8 bytes per hello the
/// handshake rate limiter let through in the last 8 minutes).
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// The record's file beside the state file: `<state file>.hellos`.
pub fn path_for(state_file: &Path) -> PathBuf {
    let mut name = state_file.file_name().unwrap_or_default().to_os_string();
    name.push(".hellos");
    state_file.with_file_name(name)
}

/// Keeps the record's file up to date for the server loop.
pub struct HelloRecordFile {
    path: PathBuf,
    /// Records to write; the writer thread takes one at a time (a full slot skips a write, the
    /// next interval catches up).
    tx: Option<SyncSender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    /// The endpoint's record generation last handed to the writer.
    written: u64,
    next_write: Instant,
}

impl HelloRecordFile {
    /// Loads the record of the previous run into `endpoint` (its users already set), marks the
    /// file as belonging to a running server (so a crash from now on is noticed at the next
    /// start) and starts the writer thread.
    pub fn open(path: PathBuf, endpoint: &mut ServerEndpoint, now: Instant, unix: u64) -> Self {
        match read_bounded(&path) {
            Ok(Some(bytes)) => match endpoint.import_hello_record(unix, &bytes) {
                Ok(r) if r.complete => {
                    log::debug!("{}: {} answered hellos remembered", path.display(), r.added)
                }
                Ok(r) => log::warn!(
                    "{}: the previous run did not stop cleanly; {} answered hellos remembered, and hellos made \
                     before now get silence (a client whose hello was in flight retries)",
                    path.display(),
                    r.added
                ),
                Err(e) => log::warn!("{}: ignored ({e})", path.display()),
            },
            Ok(None) => {}
            Err(e) => log::warn!("{}: cannot read it ({e})", path.display()),
        }
        if let Err(e) = write_atomic(&path, &endpoint.export_hello_record(false)) {
            log::warn!("{}: cannot write it ({e})", path.display());
        }
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(1);
        let target = path.clone();
        let writer = std::thread::Builder::new()
            .name("ostp-hellos".into())
            .spawn(move || {
                for record in rx {
                    if let Err(e) = write_atomic(&target, &record) {
                        log::warn!("{}: cannot write it ({e})", target.display());
                    }
                }
            });
        let writer = match writer {
            Ok(handle) => Some(handle),
            Err(e) => {
                log::warn!("cannot start the hello-record writer ({e}); it is written at exit");
                None
            }
        };
        HelloRecordFile {
            path,
            tx: writer.as_ref().map(|_| tx),
            writer,
            written: endpoint.hello_record_generation(),
            next_write: now + WRITE_INTERVAL,
        }
    }

    /// When [`HelloRecordFile::tick`] must run next.
    pub fn next_deadline(&self) -> Instant {
        self.next_write
    }

    /// Hands a changed record to the writer once per [`WRITE_INTERVAL`].
    pub fn tick(&mut self, now: Instant, endpoint: &ServerEndpoint) {
        if now < self.next_write {
            return;
        }
        self.next_write = now + WRITE_INTERVAL;
        let generation = endpoint.hello_record_generation();
        if generation == self.written {
            return;
        }
        let Some(tx) = &self.tx else { return };
        match tx.try_send(endpoint.export_hello_record(false)) {
            Ok(()) => self.written = generation,
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
    }

    /// Writes the final record (at shutdown) and stops the writer.
    pub fn finish(mut self, endpoint: &ServerEndpoint) {
        // The writer first finishes what it has, so the final record is written last.
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if let Err(e) = write_atomic(&self.path, &endpoint.export_hello_record(true)) {
            log::warn!("{}: cannot write it ({e})", self.path.display());
        }
    }
}

/// The file's bytes (`None` if it does not exist); larger files are refused.
fn read_bounded(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too large"));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{EndpointConfig, UserId, UserState};

    #[test]
    fn the_file_sits_beside_the_state_file() {
        assert_eq!(
            path_for(Path::new("/etc/ostp/config.state.json")),
            PathBuf::from("/etc/ostp/config.state.json.hellos")
        );
    }

    #[test]
    fn a_missing_file_is_a_fresh_start_and_finish_writes_an_owner_only_record() {
        let dir = std::env::temp_dir().join(format!("ostp-hello-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json.hellos");
        let _ = std::fs::remove_file(&path);
        let mut endpoint = ServerEndpoint::new(EndpointConfig::default(), [1; 32]);
        endpoint
            .set_user(UserId(1), "record-test-key-0123456789", UserState::Active)
            .unwrap();
        let now = Instant::now();
        let file = HelloRecordFile::open(path.clone(), &mut endpoint, now, 1_800_000_000);
        assert_eq!(file.next_deadline(), now + WRITE_INTERVAL);
        // While the server runs, the file on disk says so: a crash now is noticed at the next
        // start.
        let running = std::fs::read(&path).unwrap();
        let imported = endpoint.import_hello_record(1_800_000_000, &running);
        assert!(!imported.unwrap().complete);
        file.finish(&endpoint);
        let bytes = std::fs::read(&path).unwrap();
        let imported = endpoint.import_hello_record(1_800_000_000, &bytes).unwrap();
        assert_eq!((imported.added, imported.complete), (0, true));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A garbage file is ignored (logged), not fatal.
        std::fs::write(&path, b"not a record").unwrap();
        let file = HelloRecordFile::open(path.clone(), &mut endpoint, now, 1_800_000_000);
        file.finish(&endpoint);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
