//! Giving freed heap memory back to the kernel.
//!
//! Why this exists (the "leak on client aborts"): a client that sends a request and closes
//! at once leaves its exchange waiting for the upstream (the hang-up is only watched for
//! after `CLIENT_WATCH_AFTER`), holding its buffers. An attacker that aborts in a loop
//! costs itself nothing, so exchanges pile up by the thousand and the heap grows to
//! thousands × the buffers of an exchange. All of it is freed when they end, but glibc
//! `free` only returns memory at the top of a heap: the freed chunks below stay resident,
//! and the next burst, carved at other offsets of the same heap, touches other pages. RSS
//! then creeps towards the peak heap size and never comes down, even idle (measured: 7.5 MB
//! to 91 MB after 11,000 aborts; `malloc_trim` brings it back to ~12 MB).
//!
//! So whatever the path that freed it, memory freed after a burst is handed back: once a
//! second, [`Trimmer::tick`] asks the allocator how much it holds free, and calls
//! `malloc_trim(0)` (which `madvise`s the free pages away in every arena) when memory was
//! freed or the process grew since the last trim. Nothing is done while the heap is steady,
//! so a busy server does not pay for it.

/// Freed or grown by at least this much since the last trim: trim. Small, so what a burst
/// leaves behind stays small; a trim costs one `madvise` per free chunk, at most once a tick.
const TRIM_STEP: usize = 2 << 20;

/// Decides when to trim; driven by a once-a-second tick of the main thread.
#[derive(Debug, Default)]
pub struct Trimmer {
    /// Least free heap seen since the last trim: freed memory shows as a rise above it.
    low_free: usize,
    /// Resident size right after the last trim: a burst between two ticks shows as growth.
    rss_after_trim: usize,
}

impl Trimmer {
    pub fn new() -> Trimmer {
        Trimmer::default()
    }

    /// Trims if the heap freed (or the process grew by) at least [`TRIM_STEP`] since the
    /// last trim. Returns whether it trimmed.
    pub fn tick(&mut self) -> bool {
        let (Some(free), Some(rss)) = (heap_free(), resident()) else {
            return false;
        };
        if !self.due(free, rss) {
            return false;
        }
        trim();
        self.trimmed(heap_free().unwrap_or(free), resident().unwrap_or(rss));
        true
    }

    /// Whether to trim, given the allocator's free bytes and the resident size now.
    fn due(&mut self, free: usize, rss: usize) -> bool {
        self.low_free = self.low_free.min(free);
        let freed = free.saturating_sub(self.low_free) >= TRIM_STEP;
        let grew = rss.saturating_sub(self.rss_after_trim) >= TRIM_STEP;
        free >= TRIM_STEP && (freed || grew)
    }

    fn trimmed(&mut self, free: usize, rss: usize) {
        self.low_free = free;
        self.rss_after_trim = rss;
    }
}

/// Bytes the allocator holds free (not returned to the kernel).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_free() -> Option<usize> {
    // SAFETY: mallinfo2 only reads the allocator's own statistics.
    let info = unsafe { libc::mallinfo2() };
    Some(info.fordblks)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_free() -> Option<usize> {
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes each arena's lock itself; safe from any thread.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Resident set size in bytes, from `/proc/self/statm` (its second field, in pages).
pub fn resident() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * usize::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    #[test]
    fn trims_after_memory_is_freed_or_the_process_grew_never_while_steady() {
        let mut t = Trimmer::new();
        t.trimmed(8 * MB, 100 * MB);
        // A busy, steady heap: nothing to do, however much is in use.
        assert!(!t.due(8 * MB, 100 * MB));
        assert!(!t.due(8 * MB, 101 * MB));
        // A burst takes free memory, then frees it: the rise above the low is trimmed.
        assert!(!t.due(2 * MB, 101 * MB));
        assert!(!t.due(3 * MB, 101 * MB));
        assert!(t.due(9 * MB, 101 * MB));
        t.trimmed(9 * MB, 95 * MB);
        // A burst wholly between two ticks only shows as growth.
        assert!(t.due(9 * MB, 98 * MB));
        t.trimmed(9 * MB, 96 * MB);
        // Too little free to be worth a trim, whatever the growth.
        t.trimmed(MB, 96 * MB);
        assert!(!t.due(MB, 200 * MB));
    }

    #[test]
    fn resident_size_is_read() {
        let rss = resident().expect("/proc/self/statm");
        assert!(rss > 0);
        // Trimming is safe at any time (the effect on a real process is measured by
        // `aborted_requests_leave_no_memory_behind` in tests/tests/memory.rs).
        Trimmer::new().tick();
    }
}
