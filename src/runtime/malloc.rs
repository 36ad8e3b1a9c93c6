//! Process-wide allocator settings (glibc only): a fixed mmap threshold, so buffers of
//! [`MMAP_THRESHOLD`] and more always come from `mmap` and go back to the system when freed, and
//! one malloc arena for all threads ([`ARENA_MAX`]).
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
//! `unsafe` is allowed here only: `mallopt` and (in tests) `mallinfo2` are plain libc calls
//! with integer arguments and results.
#![allow(unsafe_code)]

/// Allocations at least this large are mmapped (glibc's initial value, made fixed).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Most malloc arenas: every thread allocates from the main one.
pub const ARENA_MAX: usize = 1;

/// Applies the settings; call once at start, before other threads are started. Returns whether
/// the allocator took them (always false on other C libraries).
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` takes two integers and changes allocator parameters under the
        // allocator's own lock; any value is accepted or refused with 0.
        let set = |param, value: usize| unsafe { libc::mallopt(param, value as libc::c_int) == 1 };
        set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) & set(libc::M_ARENA_MAX, ARENA_MAX)
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
