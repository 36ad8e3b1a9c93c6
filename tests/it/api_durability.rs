//! `kill -9` in the middle of an API write storm, 50 rounds: the server always restarts from a
//! valid state file plus journal that hold every acknowledged change (a request in flight at
//! the kill may or may not be applied — nothing else is allowed). The kills land mid-append
//! (acknowledged changes must come back from the journal) and, in the in-process variant
//! whose compaction threshold is tiny, mid-compaction.
//!
//! Two variants: the API in a child process (this test binary re-executed, so it runs before
//! the `ostp` binary is wired), and the real `ostp` binary (`CARGO_BIN_EXE_ostp --config X`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::api::*;
use serde_json::json;

const ROUNDS: usize = 50;
const WRITERS: usize = 4;

/// Per key: `None` = absent, `Some(limit)` = exists with that limit.
type KeyState = Option<Option<u64>>;

#[derive(Default)]
struct Writer {
    /// Last acknowledged state of every key this writer touched.
    acked: BTreeMap<String, KeyState>,
    /// The request in flight when the server died: (key, state if it was applied).
    in_flight: Option<(String, KeyState)>,
    next: u64,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Writes until the server dies (or `stop`); records what was acknowledged.
fn storm(addr: SocketAddr, w: &Mutex<Writer>, id: usize, round: usize, stop: &AtomicBool) {
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ ((id * 1000 + round) as u64 + 1);
    let mut c = Client::new(addr, TOKEN);
    while !stop.load(Ordering::SeqCst) {
        let (method, path, body, key, new_state) = {
            let mut w = w.lock().unwrap();
            let existing: Vec<String> = w
                .acked
                .iter()
                .filter(|(_, s)| s.is_some())
                .map(|(k, _)| k.clone())
                .collect();
            let op = xorshift(&mut rng) % 4;
            if existing.is_empty() || op < 2 {
                w.next += 1;
                let key = format!("w{id}-r{round}-n{:06}-dur", w.next);
                let limit = xorshift(&mut rng) % 1_000_000;
                (
                    "POST",
                    "/api/users".to_string(),
                    Some(json!({"key": key, "limit_bytes": limit}).to_string()),
                    key,
                    Some(Some(limit)),
                )
            } else {
                let key = existing[(xorshift(&mut rng) % existing.len() as u64) as usize].clone();
                if op == 2 {
                    let limit = xorshift(&mut rng) % 1_000_000;
                    (
                        "PUT",
                        format!("/api/users/{key}/limit"),
                        Some(json!({ "limit_bytes": limit }).to_string()),
                        key,
                        Some(Some(limit)),
                    )
                } else {
                    ("DELETE", format!("/api/users/{key}"), None, key, None)
                }
            }
        };
        w.lock().unwrap().in_flight = Some((key.clone(), new_state));
        let Some(r) = c.try_send(method, &path, body.as_deref()) else {
            return; // the server is gone; the in-flight request stays undecided
        };
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        let mut w = w.lock().unwrap();
        w.acked.insert(key, new_state);
        w.in_flight = None;
    }
}

/// What the files held at a kill: the snapshot's journal position and the journal changes after it.
fn on_disk_position(state_file: &Path) -> (u64, usize) {
    let seq = ostp::users::state_file::read(state_file)
        .unwrap()
        .map_or(0, |s| s.journal_seq);
    let journal = ostp::users::journal::path_for(state_file);
    let replay = ostp::users::journal::read(&journal, seq)
        .unwrap()
        .map_or(0, |j| j.changes.len());
    (seq, replay)
}

/// Checks the state file against the writers' records and adopts what is on disk.
fn verify(state_file: &Path, writers: &[Arc<Mutex<Writer>>], round: usize) {
    let on_disk: BTreeMap<String, Option<u64>> = ostp::users::load_stored(state_file)
        .unwrap_or_else(|e| panic!("round {round}: state file does not load: {e}"))
        .into_iter()
        .map(|u| (u.key, u.limit_bytes))
        .collect();
    assert!(on_disk.contains_key(CONFIG_KEY));
    for w in writers {
        let mut w = w.lock().unwrap();
        let in_flight = w.in_flight.take();
        for (key, acked) in w.acked.iter_mut() {
            let actual: KeyState = on_disk.get(key).copied();
            let allowed_in_flight = in_flight
                .as_ref()
                .is_some_and(|(k, s)| k == key && *s == actual);
            assert!(
                actual == *acked || allowed_in_flight,
                "round {round}: {key} is {actual:?} on disk, acknowledged {acked:?}, in flight {in_flight:?}"
            );
            *acked = actual;
        }
        if let Some((key, s)) = in_flight.filter(|(k, _)| !w.acked.contains_key(k)) {
            // A create of a new key was in flight: it may have landed.
            let actual = on_disk.get(&key).copied();
            assert!(actual.is_none() || actual == s, "round {round}: {key}");
            w.acked.insert(key, actual);
        }
    }
}

fn wait_for_api(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server exited during start-up: {status}");
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            let mut c = Client::new(addr, TOKEN);
            if c.try_send("GET", "/api/server/status", None)
                .is_some_and(|r| r.status == 200)
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the API did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Rounds whose kill left changes in the journal, and rounds with a compaction mid-storm.
#[derive(Debug, Default)]
struct Coverage {
    journal_replays: usize,
    compactions: usize,
}

fn run_rounds(dir: &Path, mut spawn: impl FnMut(usize) -> (Child, SocketAddr)) -> Coverage {
    let writers: Vec<Arc<Mutex<Writer>>> = (0..WRITERS)
        .map(|_| Arc::new(Mutex::new(Writer::default())))
        .collect();
    let mut acked_total = 0;
    let mut coverage = Coverage::default();
    let state_file = dir.join("state.json");
    for round in 0..ROUNDS {
        let (mut child, addr) = spawn(round);
        wait_for_api(addr, &mut child);
        // The start-up compaction is done once the API answers.
        let (seq_at_start, _) = on_disk_position(&state_file);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let w = w.clone();
                let stop = stop.clone();
                std::thread::spawn(move || storm(addr, &w, i, round, &stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30 + (round as u64 * 37) % 120));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        let (seq, replay) = on_disk_position(&state_file);
        coverage.journal_replays += usize::from(replay > 0);
        coverage.compactions += usize::from(seq > seq_at_start);
        verify(&state_file, &writers, round);
        acked_total = writers.iter().map(|w| w.lock().unwrap().acked.len()).sum();
    }
    assert!(
        acked_total > ROUNDS,
        "the storm acknowledged too few writes ({acked_total})"
    );
    assert!(
        coverage.journal_replays > ROUNDS / 2,
        "acknowledged changes should mostly come back from the journal: {coverage:?}"
    );
    coverage
}

/// Helper process for `kill_9_during_a_write_storm_in_process_api`: when started as the child
/// (with `OSTP_API_CHILD_DIR` set) it serves the API from that directory until killed; in a
/// normal test run it returns at once.
#[test]
fn child_api_server() {
    let Ok(dir) = std::env::var("OSTP_API_CHILD_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let srv = TestServer::start_in(dir, TOKEN, Default::default());
    // Compact every few kilobytes, on the flusher thread, so kills also land mid-compaction.
    srv.persister.set_compaction_threshold(Some(2048));
    srv.persister.start_flusher(Duration::from_millis(50));
    std::fs::write(dir.join("port.tmp"), srv.addr.port().to_string()).unwrap();
    std::fs::rename(dir.join("port.tmp"), dir.join("port")).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[test]
fn kill_9_during_a_write_storm_in_process_api() {
    let dir = temp_dir("api-kill9");
    write_config(&dir, TOKEN, 0, json!([CONFIG_KEY]));
    let exe = std::env::current_exe().unwrap();
    let coverage = run_rounds(&dir, |round| {
        let _ = std::fs::remove_file(dir.join("port"));
        let log = std::fs::File::create(dir.join(format!("child-{round}.log"))).unwrap();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "api_durability::child_api_server",
                "--test-threads=1",
            ])
            .env("OSTP_API_CHILD_DIR", &dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Ok(p) = std::fs::read_to_string(dir.join("port")) {
                break p.parse().unwrap();
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("child-{round}.log")));
                panic!("round {round}: the child exited ({status}): {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: child did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        (child, SocketAddr::from(([127, 0, 0, 1], port)))
    });
    eprintln!("kill -9 coverage: {coverage:?}");
    assert!(
        coverage.compactions > ROUNDS / 4,
        "compactions should run during the storms: {coverage:?}"
    );
}

#[test]
fn kill_9_during_a_write_storm_real_binary() {
    use crate::support::tunnel::free_port;
    let dir = temp_dir("api-kill9-bin");
    // Ports no other test is given: the binary restarts on them 50 times.
    let api_port = free_port();
    let cfg = write_config(&dir, TOKEN, api_port, json!([CONFIG_KEY]));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["listen"] = json!(format!("127.0.0.1:{}", free_port()));
    std::fs::write(&cfg, v.to_string()).unwrap();
    run_rounds(&dir, |round| {
        let log = std::fs::File::create(dir.join(format!("bin-{round}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ostp"))
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        (child, SocketAddr::from(([127, 0, 0, 1], api_port)))
    });
}
