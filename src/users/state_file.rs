//! The durable state file (the snapshot): API-created users and the counters of every user,
//! as JSON, up to journal change `journal_seq`; later changes are in the [journal](super::journal).
//! Also the file primitives both use: owner-only (0600) files opened with `O_NOFOLLOW`, temp
//! files created with `O_EXCL`.
//!
//! Writes are atomic and durable: the new content goes to `<file>.tmp` in the same
//! directory (created exclusively, never through a symlink), is fsynced, renamed over the old
//! file, and the directory is fsynced. A crash at any moment leaves either the old or the new
//! complete file. A leftover temp file is removed on load. A state file that exists but cannot
//! be read or parsed is an error (never a silent fresh start that would overwrite it).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Snapshot, StoredUser, UsersError, journal};
use crate::keys;

/// Version of the file layout.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u32,
    /// The last journal change this snapshot includes.
    #[serde(default)]
    journal_seq: u64,
    /// Written by earlier versions (informational, ignored).
    #[serde(default, skip_serializing, rename = "generation")]
    _generation: u64,
    users: Vec<StoredUser>,
}

/// A loaded snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub journal_seq: u64,
    pub users: Vec<StoredUser>,
}

const FORMAT_NAME: &str = "ostp-state";

/// The temp file used while writing `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// `path` itself, or with `allow_symlink` the file a symbolic link at `path` points to; a
/// symbolic link without `allow_symlink` is refused.
pub fn resolve(path: &Path, allow_symlink: bool) -> Result<PathBuf, UsersError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            if !allow_symlink {
                return Err(UsersError::Symlink {
                    path: path.to_path_buf(),
                });
            }
            fs::canonicalize(path).map_err(|e| UsersError::StateUnreadable {
                path: path.to_path_buf(),
                problem: format!("is a symbolic link that cannot be followed ({e})"),
            })
        }
        _ => Ok(path.to_path_buf()),
    }
}

/// Reads the state file (`None` if it does not exist), after removing temp files that an
/// interrupted write left (of the state file and of its journal).
pub fn load(path: &Path) -> Result<Option<Stored>, UsersError> {
    for tmp in [temp_path(path), temp_path(&journal::path_for(path))] {
        if fs::symlink_metadata(&tmp).is_ok() {
            // An interrupted write: the real file is still the last complete state.
            log::warn!(
                "removing leftover temporary file {} (an earlier write was interrupted)",
                tmp.display()
            );
            let _ = fs::remove_file(&tmp);
        }
    }
    read(path)
}

/// Reads and validates the state file without touching a temp file (safe while a writer runs).
pub fn read(path: &Path) -> Result<Option<Stored>, UsersError> {
    let unreadable = |problem: String| UsersError::StateUnreadable {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(format!("cannot be read: {e}"))),
    };
    let file: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| unreadable(format!("is not a valid ostp state file: {e}")))?;
    if file.format != FORMAT_NAME {
        return Err(unreadable(format!(
            "has format {:?}, expected {FORMAT_NAME:?}",
            file.format
        )));
    }
    if file.version != FORMAT_VERSION {
        return Err(unreadable(format!(
            "has version {}, this build reads version {FORMAT_VERSION}",
            file.version
        )));
    }
    let mut seen = HashSet::new();
    for (i, u) in file.users.iter().enumerate() {
        keys::validate_key(&u.key).map_err(|e| unreadable(format!("users[{i}]: {e}")))?;
        if !seen.insert(u.key.as_str()) {
            return Err(unreadable(format!(
                "users[{i}]: the key {} is listed twice",
                keys::mask(&u.key)
            )));
        }
    }
    Ok(Some(Stored {
        journal_seq: file.journal_seq,
        users: file.users,
    }))
}

/// Serialises a snapshot (call outside the table lock).
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Out<'a> {
        format: &'a str,
        version: u32,
        journal_seq: u64,
        users: &'a [StoredUser],
    }
    let mut out = serde_json::to_vec_pretty(&Out {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        journal_seq: snapshot.journal_seq,
        users: &snapshot.users,
    })?;
    out.push(b'\n');
    Ok(out)
}

/// Atomically and durably replaces `path` with `contents` (temp file created exclusively and
/// without following links, fsync, rename, dir fsync). The result is owner-only (0600).
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    // A leftover (or planted) temp file is unlinked, never written through.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = create_private(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Fsyncs the directory holding `path` (makes a rename in it durable).
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Creates a new owner-only file; fails if anything (a file, a symlink) is already at `path`.
pub fn create_private(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    private_nofollow(&mut o);
    o.open(path)
}

/// Opens an existing file for appending, refusing a symbolic link.
pub fn open_append(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.append(true);
    private_nofollow(&mut o);
    o.open(path)
}

#[cfg(unix)]
fn private_nofollow(o: &mut OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    // The files hold access keys: owner only.
    o.mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
}

#[cfg(not(unix))]
fn private_nofollow(_o: &mut OpenOptions) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::Source;

    fn dir() -> PathBuf {
        let mut b = [0u8; 8];
        keys::fill_random(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("ostp-state-test-{}", keys::to_hex(&b)));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn user(key: &str) -> StoredUser {
        StoredUser {
            key: key.into(),
            name: Some("n".into()),
            limit_bytes: Some(5),
            source: Source::Api,
            config_limit_applied: None,
            bytes_up: 1,
            bytes_down: 2,
            connections: 3,
            created_at: 4,
            last_seen: None,
            expire_at: Some(9),
            enabled: false,
            reset_strategy: crate::users::ResetStrategy::Week,
            last_reset_at: Some(6),
            reset_anchor: Some(6),
            note: Some("order 17".into()),
            max_devices: Some(3),
        }
    }

    #[test]
    fn missing_file_is_a_fresh_start_and_round_trip_works() {
        let d = dir();
        let p = d.join("state.json");
        assert!(load(&p).unwrap().is_none());
        let snap = Snapshot {
            journal_seq: 7,
            users: vec![user("aaaaaaaaaaaaaaaa"), user("bbbbbbbbbbbbbbbb")],
        };
        write_atomic(&p, &encode(&snap).unwrap()).unwrap();
        let got = load(&p).unwrap().unwrap();
        assert_eq!((got.journal_seq, got.users), (7, snap.users));
        assert!(!temp_path(&p).exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn corrupt_or_foreign_files_refuse_to_load() {
        let d = dir();
        let p = d.join("state.json");
        for bad in [
            &b"{\"format\":\"ostp-state\",\"version\":1,\"users\":["[..],
            b"",
            b"\xff\xfe",
            b"{\"format\":\"other\",\"version\":1,\"users\":[]}",
            b"{\"format\":\"ostp-state\",\"version\":99,\"users\":[]}",
            b"{\"format\":\"ostp-state\",\"version\":1,\"users\":[{\"key\":\"short\",\"source\":\"api\"}]}",
            b"{\"format\":\"ostp-state\",\"version\":1,\"users\":[{\"key\":\"aaaaaaaaaaaaaaaa\",\"source\":\"api\"},{\"key\":\"aaaaaaaaaaaaaaaa\",\"source\":\"api\"}]}",
        ] {
            fs::write(&p, bad).unwrap();
            let e = load(&p).unwrap_err();
            assert!(matches!(e, UsersError::StateUnreadable { .. }), "{e}");
            assert!(e.to_string().contains("Refusing to start"));
        }
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn leftover_temp_file_is_removed_and_ignored() {
        let d = dir();
        let p = d.join("state.json");
        let snap = Snapshot {
            journal_seq: 1,
            users: vec![user("aaaaaaaaaaaaaaaa")],
        };
        write_atomic(&p, &encode(&snap).unwrap()).unwrap();
        fs::write(temp_path(&p), b"{half a fi").unwrap();
        assert_eq!(load(&p).unwrap().unwrap().users, snap.users);
        assert!(!temp_path(&p).exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn writes_are_owner_only_and_never_follow_a_planted_temp_link() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir();
        let p = d.join("state.json");
        let victim = d.join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, temp_path(&p)).unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&p).unwrap(), b"new");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A symlink at the state path is refused unless allowed, then resolved.
        let link = d.join("link.json");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            resolve(&link, false),
            Err(UsersError::Symlink { .. })
        ));
        assert_eq!(resolve(&link, true).unwrap(), fs::canonicalize(&p).unwrap());
        assert_eq!(resolve(&p, false).unwrap(), p);
        // Appending never goes through a link either.
        assert!(open_append(&link).is_err());
        fs::remove_dir_all(d).unwrap();
    }
}
