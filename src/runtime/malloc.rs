//! Process-wide allocator settings (glibc only): a fixed mmap threshold, so buffers of
//! [`MMAP_THRESHOLD`] and more always come from `mmap` and go back to the system when freed,
//! one malloc arena for all threads ([`ARENA_MAX`]), free bytes kept at the heap's top up to
//! [`HEAP_TOP_KEEP`] rather than trimmed on every `free`, and the tunnel loops' occasional trim
//! of free heap pages ([`HeapTrim`]).
//!
//! glibc raises its threshold (128 KiB at start) to the size of every mmapped block freed, up to
//! 32 MiB: after the first large buffer is freed (a grown token table, a bulk stream's rings or
//! sent-packet log), later large buffers come from the heap, and a heap full of holes stays
//! resident after the traffic is gone (a server with 1,000 idle sessions held 13-14 MB after a
//! bulk transfer, about 10 after setting this). Setting the threshold once turns the dynamic
//! adjustment off. musl (OpenWrt) has no such adjustment: nothing to do there.
//!
//! glibc also gives threads their own arenas (up to 8 per core): each is a 64 MiB reservation
//! with its own partly used pages and free lists. ostp allocates on one thread (the tunnel loop);
//! the API, DNS and helper threads allocate little and rarely, so they share the main arena
//! (an idle server with the API on held 16 arenas, glibc's cap on a 2-core machine, with 124 KB
//! of pages besides the main one; measured with `/proc/PID/smaps`).
//!
//! `unsafe` is allowed here only: `mallopt`, `mallinfo2` and `malloc_trim` are plain libc calls
//! with integer arguments and results.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

/// Allocations at least this large are mmapped (glibc's initial value, made fixed).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Most malloc arenas: every thread allocates from the main one.
pub const ARENA_MAX: usize = 1;

/// Free bytes the heap's top may keep before a `free` gives them back (glibc's
/// `M_TRIM_THRESHOLD`, 128 KiB by default and fixed there once the mmap threshold is set). With
/// 128 KiB, 100 downloads' stream buffers freed and allocated again across the top of the heap
/// made the server trim and fault the same pages in over and over: 7-119k page faults per 500 MB
/// against 3.5-18k with 1 MiB, and 173-209 vs 211-222 MB/s (three interleaved pairs of 100 × 5 MB
/// downloads, 2026-12-02). Idle memory does not keep it: [`HeapTrim`] gives it back.
pub const HEAP_TOP_KEEP: usize = 1024 * 1024;

/// A trim is considered at most this often.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// Free heap bytes worth a trim (below it, the pages are kept for the next allocations). A
/// server that took 1,000 sessions after a bulk transfer kept 0.2-0.3 MB free (holes and the
/// heap's top), under the 512 KiB this was; a trim at most every [`TRIM_INTERVAL`] costs a
/// busy loop a few dozen page faults when it grows back.
pub const TRIM_THRESHOLD: usize = 128 * 1024;

/// When the tunnel loop gives free heap pages back to the system: after a burst of traffic the
/// heap keeps the holes its buffers left, resident (a server that had carried 100 concurrent
/// downloads and then held 1,000 idle sessions kept a megabyte or more of them). Checked from
/// the server loop's once-a-second sweep, and from every client loop iteration with
/// [`HeapTrim::deadline`] among the client's timers; the decision is pure, the system calls are
/// in [`trim`].
#[derive(Debug)]
pub struct HeapTrim {
    next_check: Instant,
    /// The loop ran since the last check: the heap may have changed.
    armed: bool,
}

impl HeapTrim {
    pub fn new(now: Instant) -> Self {
        HeapTrim {
            next_check: now + TRIM_INTERVAL,
            armed: false,
        }
    }

    /// Whether to look at the heap now (at most once per [`TRIM_INTERVAL`]). A call that is not
    /// due arms [`HeapTrim::deadline`].
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next_check {
            self.armed = true;
            return false;
        }
        self.next_check = now + TRIM_INTERVAL;
        self.armed = false;
        true
    }

    /// When a loop that calls [`HeapTrim::tick`] on each iteration should wake for the next
    /// check: after activity, once, at most [`TRIM_INTERVAL`] later; none while the loop only
    /// slept since the last check (an idle loop is not woken for nothing).
    pub fn deadline(&self) -> Option<Instant> {
        self.armed.then_some(self.next_check)
    }

    /// Whether `free` bytes in the heap are worth giving back.
    pub fn worth(free: usize) -> bool {
        free >= TRIM_THRESHOLD
    }

    /// [`HeapTrim::due`], then a trim if the heap holds enough free bytes. Returns whether
    /// pages were given back.
    pub fn tick(&mut self, now: Instant) -> bool {
        self.due(now) && free_heap_bytes().is_some_and(Self::worth) && trim()
    }
}

/// Bytes in the heap's free chunks (glibc's `mallinfo2().fordblks`); `None` on other C
/// libraries.
pub fn free_heap_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallinfo2` takes no arguments and returns a plain struct of counters.
        Some(unsafe { libc::mallinfo2() }.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives the heap's free pages back to the system (glibc's `malloc_trim(0)`: the top of the
/// heap and whole free pages inside it). Returns whether any memory was released.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes an integer (bytes to leave at the top) and works under
        // the allocator's own lock.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Applies the settings; call once at start, before other threads are started. Returns whether
/// the allocator took them (always false on other C libraries).
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` takes two integers and changes allocator parameters under the
        // allocator's own lock; any value is accepted or refused with 0.
        let set = |param, value: usize| unsafe { libc::mallopt(param, value as libc::c_int) == 1 };
        set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            & set(libc::M_ARENA_MAX, ARENA_MAX)
            & set(libc::M_TRIM_THRESHOLD, HEAP_TOP_KEEP)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;
    use std::process::Command;

    const CHILD: &str = "OSTP_MALLOC_PROBE";

    /// Number of mmapped blocks the allocator holds.
    fn mmapped_blocks() -> usize {
        // SAFETY: `mallinfo2` takes no arguments and returns a plain struct of counters.
        unsafe { libc::mallinfo2() }.hblks
    }

    /// Runs `name` alone in a child process (with one test thread, so no other test allocates
    /// meanwhile) with [`CHILD`] set, and returns its output after checking that it passed.
    fn run_in_child(name: &str) -> String {
        let exe = std::env::current_exe().expect("test binary path");
        let out = Command::new(exe)
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("run the probe");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        text
    }

    /// Runs in a child process.
    fn threshold_probe() {
        assert!(tune());
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        let before = mmapped_blocks();
        let buffer = std::hint::black_box(vec![1u8; 1 << 20]);
        assert_eq!(
            mmapped_blocks(),
            before + 1,
            "a 1 MiB buffer came from the heap after an 8 MiB one was freed"
        );
        drop(buffer);
        assert_eq!(mmapped_blocks(), before, "and it went back to the system");
    }

    #[test]
    fn a_freed_large_buffer_does_not_raise_the_threshold() {
        if std::env::var_os(CHILD).is_some() {
            threshold_probe();
            return;
        }
        run_in_child("runtime::malloc::tests::a_freed_large_buffer_does_not_raise_the_threshold");
    }

    /// Runs in a child process: threads that allocate at the same time, then glibc's per-arena
    /// report (`malloc_stats` writes one "Arena N:" block per arena to stderr).
    fn arena_probe() {
        assert!(tune());
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let held: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1000]).collect();
                    barrier.wait();
                    drop(std::hint::black_box(held));
                })
            })
            .collect();
        for t in threads {
            t.join().expect("allocating thread");
        }
        // SAFETY: `malloc_stats` takes no arguments; it only prints counters.
        unsafe { libc::malloc_stats() };
    }

    /// Resident memory of this process, in bytes (`/proc/self/statm`).
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Runs in a child process: 16 MiB of heap buffers freed (all but the last, which keeps
    /// the heap's top in use, as a live session's buffers do) stay resident until a trim.
    /// Runs in a child process: small blocks freed at the top of the heap stay there (no trim
    /// on `free`) up to [`HEAP_TOP_KEEP`], and [`trim`] gives them back.
    fn top_keep_probe() {
        assert!(tune());
        // A thread started after `tune` allocates from the main arena (the harness's own test
        // thread has an arena of its own), whose top `keepcost` reports.
        let top = || {
            // SAFETY: `mallinfo2` takes no arguments and returns a plain struct of counters.
            unsafe { libc::mallinfo2() }.keepcost
        };
        std::thread::spawn(move || {
            let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(96);
            blocks.extend((0..96).map(|i| vec![i as u8; 8 * 1024]));
            drop(std::hint::black_box(blocks));
            let kept = top();
            assert!(kept >= 700 * 1024, "the heap's top kept {kept} bytes");
            assert!(trim());
            let kept = top();
            assert!(kept < 256 * 1024, "after a trim the top kept {kept} bytes");
        })
        .join()
        .expect("probe thread");
    }

    #[test]
    fn freed_bytes_at_the_top_of_the_heap_stay_until_a_trim() {
        if std::env::var_os(CHILD).is_some() {
            top_keep_probe();
            return;
        }
        run_in_child(
            "runtime::malloc::tests::freed_bytes_at_the_top_of_the_heap_stay_until_a_trim",
        );
    }

    fn trim_probe() {
        assert!(tune());
        let mut blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 64 * 1024]).collect();
        let last = blocks.pop();
        drop(std::hint::black_box(blocks));
        let before = rss();
        assert!(HeapTrim::worth(free_heap_bytes().unwrap()));
        assert!(trim());
        let after = rss();
        println!("rss before {before} after {after}");
        assert!(before - after >= 8 << 20, "{before} -> {after}");
        drop(std::hint::black_box(last));
    }

    #[test]
    fn a_trim_gives_freed_heap_pages_back() {
        if std::env::var_os(CHILD).is_some() {
            trim_probe();
            return;
        }
        run_in_child("runtime::malloc::tests::a_trim_gives_freed_heap_pages_back");
    }

    #[test]
    fn trims_are_considered_once_per_interval_and_only_when_worth_it() {
        let t0 = Instant::now();
        let mut t = HeapTrim::new(t0);
        assert!(!t.due(t0));
        assert!(!t.due(t0 + TRIM_INTERVAL - Duration::from_millis(1)));
        assert!(t.due(t0 + TRIM_INTERVAL));
        assert!(!t.due(t0 + TRIM_INTERVAL + Duration::from_secs(1)));
        assert!(t.due(t0 + 2 * TRIM_INTERVAL));
        assert!(!HeapTrim::worth(TRIM_THRESHOLD - 1));
        assert!(HeapTrim::worth(TRIM_THRESHOLD));
    }

    /// The client loop sleeps until its next timer: activity schedules one check at most an
    /// interval later, and a loop that only woke for that check is not woken again.
    #[test]
    fn activity_arms_one_check_and_an_idle_loop_sleeps() {
        let t0 = Instant::now();
        let mut t = HeapTrim::new(t0);
        assert_eq!(t.deadline(), None, "nothing happened yet");
        assert!(!t.due(t0 + Duration::from_secs(1)));
        assert_eq!(
            t.deadline(),
            Some(t0 + TRIM_INTERVAL),
            "activity arms the check"
        );
        assert!(t.due(t0 + TRIM_INTERVAL));
        assert_eq!(t.deadline(), None, "after the check an idle loop sleeps");
        // Activity long after: checked at once, then armed again by the next iteration.
        let later = t0 + 10 * TRIM_INTERVAL;
        assert!(t.due(later));
        assert_eq!(t.deadline(), None);
        assert!(!t.due(later + Duration::from_millis(5)));
        assert_eq!(t.deadline(), Some(later + TRIM_INTERVAL));
    }

    #[test]
    fn threads_share_one_arena() {
        if std::env::var_os(CHILD).is_some() {
            arena_probe();
            return;
        }
        let text = run_in_child("runtime::malloc::tests::threads_share_one_arena");
        let arenas = text.lines().filter(|l| l.starts_with("Arena ")).count();
        // The harness's test thread allocated (and got an arena of its own) before `tune`;
        // the four threads started after it add none (without the setting: four more).
        assert!(arenas <= ARENA_MAX + 1, "{arenas} arenas: {text}");
    }
}
