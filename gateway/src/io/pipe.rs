//! Pipes for spliced tunnels and HTTP bodies, from a bounded per-worker pool.
//!
//! A spliced tunnel moves bytes socket → pipe → socket with `splice(2)`: the payload pages
//! never enter user space. Each direction needs its own pipe, so a tunnel holds two; a
//! spliced HTTP body ([`crate::io::splice`]) holds one for as long as it moves.
//!
//! Pipes are not free: the kernel charges their pages to the user, and once the user holds
//! more than `/proc/sys/fs/pipe-user-pages-soft` pages (16384 by default: 256 pipes of
//! [`PIPE_SIZE`] for the whole user, every process together) an unprivileged process gets new
//! pipes of two pages and `F_SETPIPE_SZ` fails with `EPERM`; root (`CAP_SYS_RESOURCE`, the
//! DaemonSet) is not limited. So the pool:
//!
//! - is per worker (a thread-local: workers are threads and never share a pipe), bounded by
//!   the worker's share of the descriptor budget for pipes (`budget::pipes_per_worker`, at
//!   most [`MAX_PIPES`]) counting idle pipes too, of which at most [`MAX_IDLE`] are kept
//!   idle for reuse. Pipes are a cache: they never take descriptors the connection cap
//!   counts on, and idle ones past a budget shrunk by a reload are closed;
//! - sizes each new pipe to [`PIPE_SIZE`] and checks what it got: a pipe smaller than
//!   [`MIN_PIPE_SIZE`] is closed at once, and the pool stops creating pipes for
//!   [`SHRUNK_BACKOFF`] (it still hands out idle ones);
//! - takes back only empty pipes: one that still holds bytes (a tunnel that failed
//!   mid-transfer) is closed, so stale bytes never reach another tunnel.
//!
//! When the pool has no pipe to give, the tunnel or body falls back to the buffered copy.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The size asked of each pipe: 64 pages. Each turn of a splice loop (a readiness wait, a
/// fill, a drain) moves at most one pipe's worth, so a 1 MiB body took 16 turns and 32
/// `splice` calls through the default 16-page pipe, 4 turns through this one: 0.31 → 0.24 ×
/// nginx's CPU per 1 MiB response pinned, 0.40 → 0.34 with two free workers (benchmarks.md,
/// "Pipes of 256 KiB"). The pages are the socket's own, lent, not copied; a pipe holds them
/// only while bytes wait for the destination, whose send buffer (megabytes, autotuned) is
/// the larger share of what a stalled reader pins. Past `pipe-user-pages-soft` an
/// unprivileged process's `F_SETPIPE_SZ` fails and the pipe keeps its 16 pages.
pub const PIPE_SIZE: usize = 256 * 1024;
/// Below this a pipe is not worth splicing through (more syscalls per byte than the copy).
pub(crate) const MIN_PIPE_SIZE: usize = 16 * 1024;
pub(crate) use crate::util::budget::MAX_PIPES;
/// Idle pipes kept per worker for the next tunnels; more are closed when returned.
pub(crate) const MAX_IDLE: usize = 256;
/// After the kernel handed out a shrunken pipe, how long the pool only reuses idle pipes.
pub(crate) const SHRUNK_BACKOFF: Duration = Duration::from_secs(1);

/// One pipe and how many bytes it holds.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
    /// Bytes spliced in and not yet spliced out.
    buffered: usize,
}

impl Pipe {
    /// A new non-blocking pipe of [`PIPE_SIZE`] (or what the kernel granted).
    pub fn create() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own. Failure (EPERM past the soft limit) leaves
        // the pipe at the size it was created with; the size is read back either way.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            );
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            size: size as usize,
            buffered: 0,
        })
    }

    /// Bytes in the pipe, waiting to be spliced out.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Moves what `socket` has, up to the pipe's size and at most `max` bytes, into the
    /// pipe. Call only when the pipe is empty, so that `WouldBlock` always means the socket
    /// has nothing. `Ok(0)` is EOF. `max` is how a spliced HTTP body never takes a byte past
    /// its framing: what follows (a pipelined request, an upstream's stray bytes) stays in
    /// the socket.
    pub(crate) fn fill_from(&mut self, socket: RawFd, max: usize) -> io::Result<usize> {
        debug_assert_eq!(
            self.buffered, 0,
            "fill_from on a pipe that still holds bytes"
        );
        debug_assert!(max > 0, "fill_from asked for nothing: 0 would read as EOF");
        let n = splice(socket, self.write.as_raw_fd(), self.size.min(max))?;
        self.buffered += n;
        Ok(n)
    }

    /// Moves bytes from the pipe into `socket`; `WouldBlock` means the socket's send buffer
    /// is full.
    pub(crate) fn drain_to(&mut self, socket: RawFd) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), socket, self.buffered)?;
        self.buffered -= n;
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice between two descriptors the caller holds open, no offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The pool's counters, for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolStats {
    /// Pipes open (in use or idle).
    pub open: usize,
    /// Pipes idle in the pool.
    pub idle: usize,
    /// Pipes the kernel handed out shrunken (past `pipe-user-pages-soft`), closed at once.
    pub(crate) shrunk: u64,
}

struct Pool {
    idle: Vec<Pipe>,
    /// Pipes open, in use or idle: never above `limit` but after the limit shrank.
    open: usize,
    /// The budget last given to [`take_pair`].
    limit: usize,
    shrunk: u64,
    no_create_until: Option<Instant>,
}

impl Pool {
    /// Applies a (possibly new) budget: idle pipes past it are closed.
    fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_PIPES);
        while self.open > self.limit && self.idle.pop().is_some() {
            self.open -= 1;
        }
    }

    fn take(&mut self) -> Option<Pipe> {
        if self.open > self.limit {
            // Pipes in use past a budget that shrank: no more until they are returned.
            return None;
        }
        if let Some(p) = self.idle.pop() {
            return Some(p);
        }
        if self.open >= self.limit {
            return None;
        }
        if let Some(t) = self.no_create_until {
            if Instant::now() < t {
                return None;
            }
            self.no_create_until = None;
        }
        match Pipe::create() {
            Ok(p) if p.size >= MIN_PIPE_SIZE => {
                self.open += 1;
                Some(p)
            }
            Ok(p) => {
                self.shrunk += 1;
                self.no_create_until = Some(Instant::now() + SHRUNK_BACKOFF);
                tracing::warn!(
                    size = p.size,
                    "pipe-user-pages-soft reached: new pipes are shrunken; tunnels fall back to copying"
                );
                None
            }
            Err(e) => {
                // EMFILE/ENFILE: out of descriptors. The copy path needs none.
                self.no_create_until = Some(Instant::now() + SHRUNK_BACKOFF);
                tracing::warn!(error = %e, "cannot create a pipe; tunnels fall back to copying");
                None
            }
        }
    }

    fn give(&mut self, pipe: Pipe) {
        if pipe.buffered == 0 && self.idle.len() < MAX_IDLE && self.open <= self.limit {
            self.idle.push(pipe);
        } else {
            self.open -= 1;
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            idle: Vec::new(),
            open: 0,
            limit: 0,
            shrunk: 0,
            no_create_until: None,
        })
    };
}

/// A pipe on loan from this thread's pool; goes back (or is closed) on drop.
#[derive(Debug)]
pub(crate) struct PooledPipe(Option<Pipe>);

impl std::ops::Deref for PooledPipe {
    type Target = Pipe;
    fn deref(&self) -> &Pipe {
        self.0.as_ref().expect("pipe present until drop")
    }
}

impl std::ops::DerefMut for PooledPipe {
    fn deref_mut(&mut self) -> &mut Pipe {
        self.0.as_mut().expect("pipe present until drop")
    }
}

impl Drop for PooledPipe {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // try_with: a pipe dropped while the thread exits just closes.
            let _ = POOL.try_with(|pool| pool.borrow_mut().give(p));
        }
    }
}

/// One pipe (a spliced HTTP body), or `None` when the pool cannot give one within `limit`
/// pipes open on this worker: the body is then copied.
pub(crate) fn take_one(limit: usize) -> Option<PooledPipe> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.set_limit(limit);
        pool.take().map(|p| PooledPipe(Some(p)))
    })
}

/// Two pipes (one per tunnel direction), or `None` when the pool cannot give both within
/// `limit` pipes open on this worker (in use or idle; see `budget::pipes_per_worker`).
pub(crate) fn take_pair(limit: usize) -> Option<(PooledPipe, PooledPipe)> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.set_limit(limit);
        let a = pool.take()?;
        match pool.take() {
            Some(b) => Some((PooledPipe(Some(a)), PooledPipe(Some(b)))),
            None => {
                pool.give(a);
                None
            }
        }
    })
}

/// This thread's pool counters.
#[cfg(test)]
pub(crate) fn stats() -> PoolStats {
    POOL.with(|pool| {
        let pool = pool.borrow();
        PoolStats {
            open: pool.open,
            idle: pool.idle.len(),
            shrunk: pool.shrunk,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn pipes_get_the_asked_size() {
        let p = Pipe::create().unwrap();
        assert!(p.size >= MIN_PIPE_SIZE, "pipe size {}", p.size);
    }

    #[test]
    fn pool_reuses_empty_pipes_and_closes_full_ones() {
        // Each test runs on its own thread, so this pool is the test's own.
        let (a, b) = take_pair(8).expect("a pair");
        assert_eq!(stats().open, 2);
        drop((a, b));
        assert_eq!(
            stats(),
            PoolStats {
                open: 2,
                idle: 2,
                shrunk: 0
            }
        );
        let (mut a, b) = take_pair(8).unwrap();
        assert_eq!(stats().open, 2, "idle pipes reused, none created");
        a.buffered = 1; // as if a tunnel failed with bytes in flight
        drop(a);
        drop(b);
        assert_eq!(
            stats(),
            PoolStats {
                open: 1,
                idle: 1,
                shrunk: 0
            }
        );
    }

    #[test]
    fn pool_stays_within_its_budget_idle_pipes_included() {
        let first = take_pair(4).expect("a pair");
        let second = take_pair(4).expect("a second pair");
        assert!(take_pair(4).is_none(), "a third pair is over the budget");
        assert_eq!(stats().open, 4);
        drop((first, second));
        assert_eq!(stats().idle, 4, "returned pipes idle within the budget");
        // A budget shrunk (a reload) closes idle pipes past it at the next take.
        let pair = take_pair(2).expect("an idle pair");
        assert_eq!((stats().open, stats().idle), (2, 0));
        drop(pair);
        assert!(
            take_pair(0).is_none(),
            "no budget, no pipes: the tunnel copies"
        );
        assert_eq!(stats().open, 0, "idle pipes closed when the budget is gone");
    }

    #[test]
    fn splices_between_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut sink, _) = l2.accept().unwrap();
        rx.set_nonblocking(true).unwrap();
        let (mut p, _) = take_pair(2).unwrap();
        assert_eq!(
            p.fill_from(rx.as_raw_fd(), usize::MAX).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        tx.write_all(b"hello").unwrap();
        let mut n = 0;
        while n == 0 {
            n = match p.fill_from(rx.as_raw_fd(), usize::MAX) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{e}"),
            };
        }
        assert_eq!(n, 5);
        assert_eq!(p.drain_to(out.as_raw_fd()).unwrap(), 5);
        assert_eq!(p.buffered(), 0);
        let mut got = [0u8; 5];
        sink.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(tx);
        let mut eof = None;
        while eof.is_none() {
            match p.fill_from(rx.as_raw_fd(), usize::MAX) {
                Ok(n) => eof = Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(eof, Some(0));
    }
}
