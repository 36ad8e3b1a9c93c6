//! The durable state file: API-created users and the counters of every user, as JSON.
//!
//! Writes are atomic and durable: the new content goes to `<state>.tmp` in the same
//! directory, is fsynced, renamed over the old file, and the directory is fsynced. A crash at
//! any moment leaves either the old or the new complete file. A leftover temp file is removed
//! on load. A state file that exists but cannot be read or parsed is an error (never a silent
//! fresh start that would overwrite it).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Snapshot, StoredUser, UsersError};
use crate::keys;

/// Version of the file layout.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u32,
    /// Table generation when written (informational).
    #[serde(default)]
    generation: u64,
    users: Vec<StoredUser>,
}

const FORMAT_NAME: &str = "ostp-state";

/// The temp file used while writing `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads the state file. Missing file = fresh start (empty list).
pub fn load(path: &Path) -> Result<Vec<StoredUser>, UsersError> {
    let tmp = temp_path(path);
    if tmp.exists() {
        // An interrupted write: the real file is still the last complete state.
        log::warn!(
            "removing leftover temporary state file {} (an earlier write was interrupted)",
            tmp.display()
        );
        let _ = fs::remove_file(&tmp);
    }
    read(path)
}

/// Reads and validates the state file without touching a temp file (safe while a writer runs).
pub fn read(path: &Path) -> Result<Vec<StoredUser>, UsersError> {
    let unreadable = |problem: String| UsersError::StateUnreadable {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
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
    Ok(file.users)
}

/// Serialises a snapshot (call outside the table lock).
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Out<'a> {
        format: &'a str,
        version: u32,
        generation: u64,
        users: &'a [StoredUser],
    }
    let mut out = serde_json::to_vec_pretty(&Out {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        generation: snapshot.generation,
        users: &snapshot.users,
    })?;
    out.push(b'\n');
    Ok(out)
}

/// Atomically and durably replaces `path` with `contents` (temp file, fsync, rename, dir fsync).
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        restrict_permissions(&f);
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(unix)]
fn restrict_permissions(f: &File) {
    use std::os::unix::fs::PermissionsExt;
    // The file holds access keys: owner only.
    let _ = f.set_permissions(fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_f: &File) {}

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
        }
    }

    #[test]
    fn missing_file_is_a_fresh_start_and_round_trip_works() {
        let d = dir();
        let p = d.join("state.json");
        assert!(load(&p).unwrap().is_empty());
        let snap = Snapshot {
            generation: 7,
            users: vec![user("aaaaaaaaaaaaaaaa"), user("bbbbbbbbbbbbbbbb")],
        };
        write_atomic(&p, &encode(&snap).unwrap()).unwrap();
        assert_eq!(load(&p).unwrap(), snap.users);
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
            generation: 1,
            users: vec![user("aaaaaaaaaaaaaaaa")],
        };
        write_atomic(&p, &encode(&snap).unwrap()).unwrap();
        fs::write(temp_path(&p), b"{half a fi").unwrap();
        assert_eq!(load(&p).unwrap(), snap.users);
        assert!(!temp_path(&p).exists());
        fs::remove_dir_all(d).unwrap();
    }
}
