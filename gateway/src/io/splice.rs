//! Zero-copy moves between two plaintext sockets: socket → pipe → socket with `splice(2)`,
//! driven by readiness ([`Stream::ready_io`]: tokio's reactor, under either driver), so the
//! payload never enters user space. One loop, [`splice_exact`], serves WebSocket tunnels
//! (`dataplane/conn/tunnel.rs`, until EOF) and HTTP bodies (`dataplane/conn/relay.rs` and
//! `exchange.rs`, exactly the bytes the framing declares).
//!
//! Rules for callers:
//! - No io_uring operation may be in flight on either socket: a read racing the splice
//!   would take bytes out of order. Every read and write of the HTTP code has completed
//!   before a body is spliced, and the hang-up watch is readiness too.
//! - Both sockets must be non-blocking for the duration ([`NonBlocking`]): `splice(2)`
//!   blocks on a blocking socket (`SPLICE_F_NONBLOCK` only covers the pipe). The io_uring
//!   driver's sockets are blocking (an io_uring read of an `O_NONBLOCK` socket returns
//!   `EAGAIN` instead of waiting), so the guard puts the mode back when the body is done.
//! - The future holds no kernel operation: dropping it (a timeout, a client gone) loses
//!   nothing but what sits in the pipe, and the pool closes a pipe that is not empty.

use super::pipe::Pipe;
use super::Stream;
use std::io;
use std::os::fd::RawFd;
use std::time::Instant;
use tokio::io::Interest;

/// Bytes moved between two turns given to the rest of the worker.
const YIELD_EVERY: usize = 1024 * 1024;

/// What bounds each step of a splice, and what hears of its progress.
pub(crate) trait Pace {
    /// When the next read from the source must have found bytes; `None`: no limit.
    fn read_deadline(&self) -> Option<Instant>;
    /// When the next write to the destination must have gone out; `None`: no limit.
    fn write_deadline(&self) -> Option<Instant>;
    /// `n` bytes were taken from the source.
    fn read(&mut self, n: usize);
    /// `n` bytes were delivered to the destination.
    fn written(&mut self, n: usize);
}

/// Why a splice stopped short: which side failed, so the caller books it to the right one.
#[derive(Debug)]
pub(crate) enum SpliceError {
    /// The source sent nothing before [`Pace::read_deadline`].
    ReadTimeout,
    /// The destination took nothing before [`Pace::write_deadline`].
    WriteTimeout,
    /// Reading the source failed (a reset).
    Read(io::Error),
    /// Writing the destination failed (a reset, a broken pipe).
    Write(io::Error),
}

/// Moves `len` bytes (`u64::MAX`: until EOF) from `from` to `to` through `pipe`, which
/// must be empty. Never reads more than `len` from `from`: bytes past them stay in its
/// socket. Returns how many were delivered; fewer than `len` only when `from` sent EOF.
pub(crate) async fn splice_exact<A: Stream, B: Stream>(
    from: &A,
    to: &B,
    pipe: &mut Pipe,
    len: u64,
    pace: &mut impl Pace,
) -> Result<u64, SpliceError> {
    let mut moved = 0u64;
    let mut since_yield = 0usize;
    while moved < len {
        if since_yield >= YIELD_EVERY {
            // Sockets that stay ready never make `ready_io` wait: without this one long
            // body would hold the worker for as long as tokio's budget lets it (megabytes)
            // while the other connections' reads wait, as they never do on the copy path,
            // where every read and write goes through the driver.
            since_yield = 0;
            A::yield_to_driver().await;
        }
        let want = (len - moved).min(usize::MAX as u64) as usize;
        let read = from.ready_io(Interest::READABLE, |fd| pipe.fill_from(fd, want));
        let n = within(pace.read_deadline(), read)
            .await
            .ok_or(SpliceError::ReadTimeout)?
            .map_err(SpliceError::Read)?;
        if n == 0 {
            break;
        }
        pace.read(n);
        since_yield += n;
        while pipe.buffered() > 0 {
            let write = to.ready_io(Interest::WRITABLE, |fd| pipe.drain_to(fd));
            let n = within(pace.write_deadline(), write)
                .await
                .ok_or(SpliceError::WriteTimeout)?
                .map_err(SpliceError::Write)?;
            moved += n as u64;
            pace.written(n);
        }
    }
    Ok(moved)
}

/// `f`, abandoned at `deadline` (`None` when it passed).
async fn within<F: std::future::Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        None => Some(f.await),
        Some(d) => crate::util::clock::timeout_at(d, f).await.ok(),
    }
}

/// A socket in non-blocking mode for as long as this lives; the mode it had comes back on
/// drop (the io_uring driver's sockets are blocking: see the module documentation).
pub(crate) struct NonBlocking {
    fd: RawFd,
    /// The flags to put back; `None` when the socket was non-blocking already (epoll).
    restore: Option<libc::c_int>,
}

impl NonBlocking {
    /// Makes `fd` non-blocking; the caller keeps it open for the guard's life.
    pub(crate) fn set(fd: RawFd) -> io::Result<NonBlocking> {
        // SAFETY: fcntl flag calls on a descriptor the caller keeps open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK != 0 {
            return Ok(NonBlocking { fd, restore: None });
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NonBlocking {
            fd,
            restore: Some(flags),
        })
    }

    /// Leaves the socket non-blocking for good (a tunnel: the socket closes after it).
    pub(crate) fn keep(mut self) {
        self.restore = None;
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        if let Some(flags) = self.restore {
            // SAFETY: the descriptor is open for the guard's life (see `set`). A failure
            // leaves it non-blocking: its next io_uring read fails and the connection
            // closes, which loses no byte.
            unsafe { libc::fcntl(self.fd, libc::F_SETFL, flags) };
        }
    }
}

/// Whether tunnels and HTTP bodies may splice: yes unless `GATEWAY_TUNNEL_SPLICE=off` (or
/// `0`) was in the environment at start. An escape hatch (a kernel whose splice
/// misbehaves) and the switch the benchmarks use to measure the copy path; read once.
pub(crate) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var("GATEWAY_TUNNEL_SPLICE").as_deref(),
            Ok("off") | Ok("0")
        )
    })
}
