//! [`OsRandomPool`]: the randomness rustls asks its provider for (server randoms, session
//! IDs, TLS 1.3 ticket nonces and `ticket_age_add`), taken from the kernel's CSPRNG in one
//! `getrandom(2)` per [`POOL_BYTES`] instead of one per value.
//!
//! Why: ring's `SystemRandom` makes a `getrandom` system call for every value, and rustls
//! asks for five on a resumed TLS 1.3 handshake with two tickets (server random, then a
//! nonce and an age mask per ticket), the largest share of the syscalls a reconnect costs
//! (`docs/benchmarks.md`, "TLS, second pass"). OpenSSL draws the same values from a
//! user-space DRBG that the kernel seeds.
//!
//! What stays as strong as before: every byte handed out is a byte `getrandom` returned,
//! used once (it is zeroed as it is taken) and never derived or stretched here. What
//! changes: up to [`POOL_BYTES`] of them wait in memory before use, in a page of the thread
//! that asked. A `fork` must not hand the same bytes to two processes: the page is marked
//! `MADV_WIPEONFORK` (Linux 4.14), so a child sees an empty pool (its count is in the page
//! too) and refills it from the kernel; where that advice is refused there is no pool and
//! every value is a system call, as before. Key generation and signatures inside ring
//! (X25519, ECDSA) and the ticket encryption's own nonce keep ring's `SystemRandom`.

use rustls::crypto::{GetRandomFailed, SecureRandom};
use std::cell::Cell;
use std::ptr::NonNull;

/// One page: the count of unused bytes, then the bytes.
const PAGE: usize = 4096;
/// Random bytes one refill fetches: a page less the count. Enough for about twenty
/// handshakes.
pub(crate) const POOL_BYTES: usize = PAGE - std::mem::size_of::<usize>();
/// Requests larger than this go straight to the kernel (none of rustls' are: 32 bytes at
/// most), so one large request cannot empty the pool for the small ones.
const DIRECT_OVER: usize = 256;

/// The provider's [`SecureRandom`]: a per-thread pool of kernel randomness. See the module
/// documentation.
#[derive(Debug)]
pub(crate) struct OsRandomPool;

/// The one instance the providers point at (`CryptoProvider::secure_random` is `'static`).
pub(crate) static OS_RANDOM_POOL: OsRandomPool = OsRandomPool;

impl SecureRandom for OsRandomPool {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        if buf.len() > DIRECT_OVER {
            return getrandom(buf);
        }
        // Not reachable while this thread's locals are being torn down: straight to the
        // kernel then.
        POOL.try_with(|pool| pool.fill(buf))
            .unwrap_or_else(|_| getrandom(buf))
    }
}

thread_local! {
    static POOL: Pool = const { Pool { page: Cell::new(None), refused: Cell::new(false) } };
}

/// The layout of the pool's page. Both fields read zero after a fork (`MADV_WIPEONFORK`):
/// an empty pool.
#[repr(C)]
struct Page {
    /// Unused bytes, at the start of `bytes`.
    available: usize,
    bytes: [u8; POOL_BYTES],
}

const _: () = assert!(std::mem::size_of::<Page>() == PAGE);

/// One thread's pool: its page, mapped on first use.
struct Pool {
    page: Cell<Option<NonNull<Page>>>,
    /// The page could not be mapped or marked wipe-on-fork: no pool on this thread.
    refused: Cell<bool>,
}

impl Pool {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        let Some(mut page) = self.page() else {
            return getrandom(buf);
        };
        // SAFETY: the page is this thread's alone (thread-local, never shared) and mapped
        // until the thread exits; no other reference to it is alive here.
        let page = unsafe { page.as_mut() };
        if page.available < buf.len() {
            getrandom(&mut page.bytes)?;
            page.available = POOL_BYTES;
        }
        // Hand out the last unused bytes and wipe them: each byte leaves once.
        let rest = page.available - buf.len();
        let taken = &mut page.bytes[rest..page.available];
        buf.copy_from_slice(taken);
        taken.fill(0);
        page.available = rest;
        Ok(())
    }

    fn page(&self) -> Option<NonNull<Page>> {
        if let Some(page) = self.page.get() {
            return Some(page);
        }
        if self.refused.get() {
            return None;
        }
        let page = map_wipe_on_fork_page();
        self.refused.set(page.is_none());
        self.page.set(page);
        page
    }
}

impl Drop for Pool {
    /// The thread is ending: its unused random bytes leave memory with it.
    fn drop(&mut self) {
        if let Some(page) = self.page.take() {
            // SAFETY: mapped by `map_wipe_on_fork_page` with this size, unmapped only here.
            unsafe {
                std::ptr::write_bytes(page.as_ptr(), 0, 1);
                libc::munmap(page.as_ptr().cast(), PAGE);
            }
        }
    }
}

/// A private zeroed page the kernel wipes in a forked child, or `None` if either step is
/// refused (then nothing stays mapped).
fn map_wipe_on_fork_page() -> Option<NonNull<Page>> {
    // SAFETY: an anonymous private mapping, checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `ptr` is the page just mapped.
    if unsafe { libc::madvise(ptr, PAGE, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: as above; nothing else refers to it.
        unsafe { libc::munmap(ptr, PAGE) };
        return None;
    }
    NonNull::new(ptr.cast())
}

/// Fills `buf` from the kernel's CSPRNG, in as many calls as it takes (a call may return
/// fewer bytes than asked, or be interrupted by a signal).
fn getrandom(buf: &mut [u8]) -> Result<(), GetRandomFailed> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(GetRandomFailed);
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values drawn in a row differ, whatever their size, across a refill too.
    #[test]
    fn values_differ_across_refills() {
        let mut seen = std::collections::HashSet::new();
        for len in [4usize, 32, 32, 12, 1000, 32] {
            for _ in 0..(POOL_BYTES / len.min(DIRECT_OVER) + 3) {
                let mut v = vec![0u8; len];
                OS_RANDOM_POOL.fill(&mut v).unwrap();
                assert!(seen.insert(v), "a {len}-byte value repeated");
            }
        }
    }

    /// Taken bytes are wiped from the pool: what is left unused is the only random data in
    /// the page.
    #[test]
    fn taken_bytes_are_wiped() {
        let mut v = [0u8; 32];
        OS_RANDOM_POOL.fill(&mut v).unwrap();
        POOL.with(|pool| {
            let page = pool.page.get().expect("this thread's pool is mapped");
            // SAFETY: this thread's page, no other reference alive.
            let page = unsafe { page.as_ref() };
            assert!(page.bytes[page.available..].iter().all(|&b| b == 0));
        });
    }

    /// A forked child must not reuse the parent's pooled bytes: its next value differs
    /// from the parent's next value (the page reads empty in the child and is refilled).
    #[test]
    fn a_forked_child_does_not_reuse_the_pool() {
        let mut warm = [0u8; 32];
        OS_RANDOM_POOL.fill(&mut warm).unwrap();
        let mut fds = [0; 2];
        // SAFETY: a pipe for the child's answer.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only draws randomness (this thread's page, a syscall), writes
        // to the pipe and exits without running destructors or other threads' code.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut child = [0u8; 32];
            let ok = OS_RANDOM_POOL.fill(&mut child).is_ok();
            // SAFETY: writing a stack buffer to our pipe, then leaving at once.
            unsafe {
                if ok {
                    libc::write(fds[1], child.as_ptr().cast(), child.len());
                }
                libc::_exit(0);
            }
        }
        let mut parent = [0u8; 32];
        OS_RANDOM_POOL.fill(&mut parent).unwrap();
        let mut child = [0u8; 32];
        // SAFETY: reading into a stack buffer from our pipe; then reaping the child.
        let n = unsafe {
            libc::close(fds[1]);
            let n = libc::read(fds[0], child.as_mut_ptr().cast(), child.len());
            libc::close(fds[0]);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            n
        };
        assert_eq!(n, 32, "the child drew no randomness");
        assert_ne!(child, parent, "the child reused the parent's pooled bytes");
        assert_ne!(child, [0u8; 32]);
    }
}
