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

/// Freed or grown by at least this much since the last trim: trim.
const TRIM_STEP: usize = 4 << 20;

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
        self.low_free = self.low_free.min(free);
        let freed = free.saturating_sub(self.low_free) >= TRIM_STEP;
        let grew = rss.saturating_sub(self.rss_after_trim) >= TRIM_STEP;
        if free < TRIM_STEP || !(freed || grew) {
            return false;
        }
        trim();
        self.low_free = heap_free().unwrap_or(free);
        self.rss_after_trim = resident().unwrap_or(rss);
        true
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

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_memory_goes_back_to_the_kernel() {
        let mut trimmer = Trimmer::new();
        trimmer.tick();
        let before = resident().unwrap();
        // Many small-enough blocks (below the mmap threshold, so they live in the heap),
        // each touched, with a long-lived block after each so the heap cannot shrink from
        // the top; then the touched ones are freed.
        let mut touched = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..1000 {
            touched.push(vec![1u8; 64 * 1024]);
            kept.push(vec![2u8; 64]);
        }
        drop(touched);
        let held = resident().unwrap();
        assert!(
            held > before + (32 << 20),
            "the blocks were resident: {before} -> {held}"
        );
        assert!(trimmer.tick(), "64 MB freed: trimmed");
        let after = resident().unwrap();
        assert!(after < held - (32 << 20), "returned: {held} -> {after}");
        drop(kept);
    }
}
