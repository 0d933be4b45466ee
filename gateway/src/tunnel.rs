//! Tunnels: after an upgrade (WebSocket 101) the client and upstream connections are joined
//! and bytes flow both ways until both sides finish, either fails, or the tunnel sits idle
//! for the route's `read_timeout`.
//!
//! Two paths behind one entry point, [`run`]:
//!
//! - **splice** (plaintext sockets, a pair of pipes from the worker's [`pipe`] pool): each
//!   direction moves bytes socket → pipe → socket with `splice(2)`, driven by readiness
//!   (tokio `AsyncFd` on the two sockets, which the io_uring runtime's reactor serves). The
//!   payload never enters user space. No io_uring operation touches the sockets while they
//!   are spliced: they arrive from the handshake with nothing in flight (every read in
//!   `proxy` has completed before the 101 is relayed), and from here on only readiness and
//!   plain syscalls are used, so a dropped tunnel future loses no bytes and leaves nothing
//!   in the ring. `docs/design/tunnels.md` has the measurements behind the choice of
//!   readiness over io_uring's own splice opcode.
//! - **copy** (no pipes to be had): two buffered copy loops on the io_uring driver.
//!
//! Either way: bytes that arrived with the handshake are delivered first; EOF from one side
//! shuts down writing on the other (half-close); an error on either side, or the idle
//! watchdog, ends both directions. The idle timer is a watchdog beside the two directions,
//! not a timeout around their reads: on the copy path a read abandoned by a timeout would
//! still complete later and its bytes would be lost.

use crate::io::Stream;
use crate::pipe::{self, PooledPipe};
use crate::worker::Worker;
use bytes::BytesMut;
use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// [`TunnelBytes::path`] of a spliced tunnel.
pub const PATH_SPLICE: &str = "splice";
/// [`TunnelBytes::path`] of a tunnel relayed through user-space buffers.
pub const PATH_COPY: &str = "copy";

/// Why a tunnel ended: the first thing that happened of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No byte moved either way for the route's `read_timeout`.
    Idle,
    /// The client closed its side first (EOF).
    ClientClosed,
    /// The upstream closed its side first (EOF).
    UpstreamClosed,
    /// A read or write failed (reset, broken pipe).
    Error,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::ClientClosed => "client_closed",
            CloseReason::UpstreamClosed => "upstream_closed",
            CloseReason::Error => "error",
        }
    }
}

/// What a finished tunnel did.
#[derive(Debug, Clone, Copy)]
pub struct TunnelBytes {
    /// Bytes delivered to the client (including those that came with the 101).
    pub to_client: u64,
    /// Bytes delivered to the upstream (including those that came behind the request head).
    pub to_upstream: u64,
    /// [`PATH_SPLICE`] or [`PATH_COPY`].
    pub path: &'static str,
    pub reason: CloseReason,
}

/// What both directions and the watchdog share.
struct Progress {
    last_activity: Cell<Instant>,
    to_client: Cell<u64>,
    to_upstream: Cell<u64>,
    reason: Cell<Option<CloseReason>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            last_activity: Cell::new(Instant::now()),
            to_client: Cell::new(0),
            to_upstream: Cell::new(0),
            reason: Cell::new(None),
        }
    }
    fn touch(&self) {
        self.last_activity.set(Instant::now());
    }
    /// Records why the tunnel is ending, unless something came first.
    fn ended(&self, reason: CloseReason) {
        if self.reason.get().is_none() {
            self.reason.set(Some(reason));
        }
    }
}

/// Which way a direction goes, for counting and close reasons.
#[derive(Clone, Copy)]
enum Dir {
    ToUpstream,
    ToClient,
}

impl Dir {
    fn counter(self, p: &Progress) -> &Cell<u64> {
        match self {
            Dir::ToUpstream => &p.to_upstream,
            Dir::ToClient => &p.to_client,
        }
    }
    /// The reason when the reading side of this direction sends EOF.
    fn eof(self) -> CloseReason {
        match self {
            Dir::ToUpstream => CloseReason::ClientClosed,
            Dir::ToClient => CloseReason::UpstreamClosed,
        }
    }
    fn add(self, p: &Progress, n: usize) {
        let c = self.counter(p);
        c.set(c.get() + n as u64);
    }
}

/// Runs the tunnel to its end. `from_upstream` holds bytes the upstream sent right behind
/// its 101 head, `from_client` bytes the client sent right behind its request head.
/// Both sockets must have no io_uring operation in flight.
pub async fn run<S: Stream>(
    client: &S,
    upstream: &S,
    from_client: &[u8],
    from_upstream: BytesMut,
    w: &Worker<S>,
    idle: Duration,
) -> TunnelBytes {
    let started = Instant::now();
    let progress = Progress::new();
    let path = match pipe::take_pair() {
        Some(pipes) => match Spliced::register(client.raw_fd(), upstream.raw_fd()) {
            Ok(fds) => {
                run_splice(&fds, pipes, from_client, &from_upstream, &progress, idle).await;
                w.give_buf(from_upstream);
                PATH_SPLICE
            }
            Err(e) => {
                tracing::debug!(error = %e, "tunnel: cannot register sockets for splicing; copying");
                drop(pipes);
                run_copy(
                    client,
                    upstream,
                    from_client,
                    from_upstream,
                    w,
                    &progress,
                    idle,
                )
                .await;
                PATH_COPY
            }
        },
        None => {
            run_copy(
                client,
                upstream,
                from_client,
                from_upstream,
                w,
                &progress,
                idle,
            )
            .await;
            PATH_COPY
        }
    };
    let out = TunnelBytes {
        to_client: progress.to_client.get(),
        to_upstream: progress.to_upstream.get(),
        path,
        reason: progress.reason.get().unwrap_or(CloseReason::Error),
    };
    tracing::debug!(
        reason = out.reason.as_str(),
        path,
        to_client = out.to_client,
        to_upstream = out.to_upstream,
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
    out
}

/// Waits until nothing moved for `idle`.
async fn watchdog(last_activity: &Cell<Instant>, idle: Duration) {
    loop {
        let deadline = last_activity.get() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

// ---------------------------------------------------------------------------------------
// The splice path.

/// A socket descriptor borrowed for readiness; the stream that owns it outlives it.
struct SockFd(RawFd);

impl AsRawFd for SockFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Both sockets, non-blocking and registered with the reactor for the tunnel's lifetime;
/// dropping this deregisters them (before `proxy` closes the sockets).
struct Spliced {
    client: AsyncFd<SockFd>,
    upstream: AsyncFd<SockFd>,
}

impl Spliced {
    fn register(client: RawFd, upstream: RawFd) -> io::Result<Spliced> {
        // splice(2) reading a TCP socket blocks unless the socket itself is non-blocking
        // (SPLICE_F_NONBLOCK only covers the pipe). Nothing after the tunnel uses the
        // sockets through io_uring: `proxy` closes both when `run` returns.
        set_nonblocking(client)?;
        set_nonblocking(upstream)?;
        let register = |fd| {
            // SAFETY: `fd` belongs to a stream that `run` borrows, so it stays open and
            // refers to the same socket for as long as this `AsyncFd` (owned by `run`'s
            // future) exists.
            unsafe {
                AsyncFd::register_with_interest(SockFd(fd), Interest::READABLE | Interest::WRITABLE)
            }
            .map_err(io::Error::from)
        };
        Ok(Spliced {
            client: register(client)?,
            upstream: register(upstream)?,
        })
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl flag calls on a descriptor the caller keeps open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn shutdown(fd: &AsyncFd<SockFd>, how: libc::c_int) {
    // SAFETY: shutdown on an open socket; errors (already shut, reset) do not matter here.
    unsafe { libc::shutdown(fd.as_raw_fd(), how) };
}

async fn run_splice(
    fds: &Spliced,
    (mut up_pipe, mut down_pipe): (PooledPipe, PooledPipe),
    from_client: &[u8],
    from_upstream: &[u8],
    progress: &Progress,
    idle: Duration,
) {
    let both = async {
        tokio::try_join!(
            splice_dir(
                &fds.client,
                &fds.upstream,
                &mut up_pipe,
                from_client,
                Dir::ToUpstream,
                progress
            ),
            splice_dir(
                &fds.upstream,
                &fds.client,
                &mut down_pipe,
                from_upstream,
                Dir::ToClient,
                progress
            ),
        )
    };
    tokio::select! {
        r = both => {
            // On error try_join! has dropped the other direction (cancel-safe: readiness
            // futures hold no kernel operation). A pipe left holding bytes is closed by the
            // pool instead of reused.
            if r.is_err() {
                progress.ended(CloseReason::Error);
            }
        }
        _ = watchdog(&progress.last_activity, idle) => progress.ended(CloseReason::Idle),
    }
    // Both directions are over (or abandoned): make sure neither peer waits on us.
    shutdown(&fds.client, libc::SHUT_RDWR);
    shutdown(&fds.upstream, libc::SHUT_RDWR);
}

/// One direction: `pending` first, then splice `from` → pipe → `to` until EOF, which is
/// passed on as a half-close.
async fn splice_dir(
    from: &AsyncFd<SockFd>,
    to: &AsyncFd<SockFd>,
    pipe: &mut PooledPipe,
    pending: &[u8],
    dir: Dir,
    progress: &Progress,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < pending.len() {
        let n = to
            .async_io(Interest::WRITABLE, |fd| send(fd.0, &pending[sent..]))
            .await?;
        sent += n;
        dir.add(progress, n);
        progress.touch();
    }
    loop {
        let n = from
            .async_io(Interest::READABLE, |fd| pipe.fill_from(fd.0))
            .await?;
        if n == 0 {
            progress.ended(dir.eof());
            shutdown(to, libc::SHUT_WR);
            return Ok(());
        }
        progress.touch();
        while pipe.buffered() > 0 {
            let n = to
                .async_io(Interest::WRITABLE, |fd| pipe.drain_to(fd.0))
                .await?;
            dir.add(progress, n);
        }
        progress.touch();
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: send from a valid slice on an open socket.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

// ---------------------------------------------------------------------------------------
// The copy path.

async fn run_copy<S: Stream>(
    client: &S,
    upstream: &S,
    from_client: &[u8],
    from_upstream: BytesMut,
    w: &Worker<S>,
    progress: &Progress,
    idle: Duration,
) {
    let mut first_up = w.take_buf();
    first_up.extend_from_slice(from_client);
    let pumps = async {
        tokio::join!(
            pump(upstream, client, from_upstream, Dir::ToClient, progress),
            pump(client, upstream, first_up, Dir::ToUpstream, progress),
        )
    };
    tokio::select! {
        (a, b) = pumps => {
            for buf in [a, b].into_iter().flatten() {
                w.give_buf(buf);
            }
        }
        _ = watchdog(&progress.last_activity, idle) => {
            // Shutting both sockets down completes the reads still in flight (their
            // futures are dropped here; tokio-uring does not cancel them).
            progress.ended(CloseReason::Idle);
            client.abort();
            upstream.abort();
        }
    }
}

/// Copies `from` → `to` until EOF (then half-closes `to`) or failure (then aborts both,
/// which also ends the opposite direction). Returns the buffer when it ended cleanly.
async fn pump<S: Stream>(
    from: &S,
    to: &S,
    mut buf: BytesMut,
    dir: Dir,
    progress: &Progress,
) -> Option<BytesMut> {
    loop {
        if !buf.is_empty() {
            let n = buf.len();
            let (res, b) = to.write_all(buf).await;
            buf = b;
            if res.is_err() {
                progress.ended(CloseReason::Error);
                from.abort();
                to.abort();
                return None;
            }
            dir.add(progress, n);
            progress.touch();
            buf.clear();
        }
        if buf.capacity() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) => {
                progress.ended(dir.eof());
                to.shutdown_write();
                return Some(buf);
            }
            Ok(_) => progress.touch(),
            Err(_) => {
                progress.ended(CloseReason::Error);
                from.abort();
                to.abort();
                return None;
            }
        }
    }
}
