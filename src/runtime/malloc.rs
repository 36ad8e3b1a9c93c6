//! Process-wide allocator settings (glibc only): a fixed mmap threshold, so buffers of
//! [`MMAP_THRESHOLD`] and more always come from `mmap` and go back to the system when freed.
//!
//! glibc raises its threshold (128 KiB at start) to the size of every mmapped block freed, up to
//! 32 MiB: after the first large buffer is freed (a grown token table, a bulk stream's rings or
//! sent-packet log), later large buffers come from the heap, and a heap full of holes stays
//! resident after the traffic is gone (a server with 1,000 idle sessions held 13-14 MB after a
//! bulk transfer, about 10 after setting this). Setting the threshold once turns the dynamic
//! adjustment off. musl (OpenWrt) has no such adjustment: nothing to do there.
//!
//! `unsafe` is allowed here only: `mallopt` and (in tests) `mallinfo2` are plain libc calls
//! with integer arguments and results.
#![allow(unsafe_code)]

/// Allocations at least this large are mmapped (glibc's initial value, made fixed).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Applies the settings; call once at start, before other threads allocate. Returns whether
/// the allocator took them (always false on other C libraries).
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` takes two integers and changes allocator parameters under the
        // allocator's own lock; any value is accepted or refused with 0.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1 }
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
    const NAME: &str = "runtime::malloc::tests::a_freed_large_buffer_does_not_raise_the_threshold";

    /// Number of mmapped blocks the allocator holds.
    fn mmapped_blocks() -> usize {
        // SAFETY: `mallinfo2` takes no arguments and returns a plain struct of counters.
        unsafe { libc::mallinfo2() }.hblks
    }

    /// Runs in a child process with one test thread, so no other test allocates meanwhile.
    fn probe() {
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
            probe();
            return;
        }
        let exe = std::env::current_exe().expect("test binary path");
        let out = Command::new(exe)
            .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("run the probe");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }
}
