//! Tunnels: after an upgrade (WebSocket 101) the client and upstream connections are joined
//! and bytes flow both ways until both sides finish, either fails, or the tunnel sits idle
//! for the route's `read_timeout`.
//!
//! Two paths behind one entry point, [`run`]:
//!
//! - **splice** (both sockets plaintext, a pair of pipes from the worker's [`pipe`] pool):
//!   each direction moves bytes socket → pipe → socket with `splice(2)`, driven by readiness
//!   ([`Stream::ready_io`]: tokio's reactor, which the io_uring runtime serves; the stream
//!   owns the registration and drops it before its socket closes). The payload never enters
//!   user space. No io_uring operation touches the sockets while they are spliced: they
//!   arrive from the handshake with nothing in flight (every read in the HTTP/1 session
//!   and the exchange has completed before the 101 is relayed; the hang-up watch is
//!   readiness too), and from here on only readiness and plain syscalls are used, so a
//!   dropped tunnel future loses no bytes and leaves nothing in the ring. `docs/design/tunnels.md` has the measurements behind the
//!   choice of readiness over io_uring's own splice opcode.
//! - **copy** (a TLS side, whose socket carries ciphertext; no pipes to be had; or
//!   `GATEWAY_TUNNEL_SPLICE=off`): two buffered copy loops on the stream's own driver.
//!
//! Either way: bytes that arrived with the handshake are delivered first; EOF from one side
//! shuts down writing on the other (half-close); an error on either side, or the idle
//! watchdog, ends both directions. The idle timer is a watchdog beside the two directions,
//! not a timeout around their reads: on the copy path a read abandoned by a timeout would
//! still complete later and its bytes would be lost.

use crate::dataplane::ctx::Worker;
use crate::io::pipe::{self, PooledPipe};
use crate::io::splice::{self, NonBlocking, Pace, SpliceError};
use crate::io::Stream;
use bytes::BytesMut;
use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::Interest;

/// [`TunnelBytes::path`] of a spliced tunnel.
pub(crate) const PATH_SPLICE: &str = "splice";
/// [`TunnelBytes::path`] of a tunnel relayed through user-space buffers.
pub(crate) const PATH_COPY: &str = "copy";
/// [`TunnelBytes::path`] of a WebSocket over HTTP/2 (`h2::websocket`): an h2 stream's DATA
/// frames on one side.
pub(crate) const PATH_H2: &str = "h2";

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
    /// A drain's `graceful_timeout` ran out with the tunnel open.
    Drain,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::ClientClosed => "client_closed",
            CloseReason::UpstreamClosed => "upstream_closed",
            CloseReason::Error => "error",
            CloseReason::Drain => "drain",
        }
    }
}

/// What a finished tunnel did.
#[derive(Debug, Clone, Copy)]
pub struct TunnelBytes {
    /// Bytes delivered to the client (including those that came with the 101).
    pub(crate) to_client: u64,
    /// Bytes delivered to the upstream (including those that came behind the request head).
    pub(crate) to_upstream: u64,
    /// [`PATH_SPLICE`] or [`PATH_COPY`].
    pub path: &'static str,
    pub reason: CloseReason,
}

/// What both directions and the watchdog share (also `h2::websocket`'s).
pub(crate) struct Progress {
    pub(crate) last_activity: Cell<Instant>,
    to_client: Cell<u64>,
    to_upstream: Cell<u64>,
    reason: Cell<Option<CloseReason>>,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            last_activity: Cell::new(Instant::now()),
            to_client: Cell::new(0),
            to_upstream: Cell::new(0),
            reason: Cell::new(None),
        }
    }
    pub(crate) fn touch(&self) {
        self.last_activity.set(Instant::now());
    }
    /// Records why the tunnel is ending, unless something came first.
    pub(crate) fn ended(&self, reason: CloseReason) {
        if self.reason.get().is_none() {
            self.reason.set(Some(reason));
        }
    }
}

/// Which way a direction goes, for counting and close reasons.
#[derive(Clone, Copy)]
pub(crate) enum Dir {
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
    pub(crate) fn add(self, p: &Progress, n: usize) {
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
    // What ends a tunnel from outside: nothing moved for `idle`, or a drain ran out of time.
    let stop = async {
        tokio::select! {
            () = watchdog(&progress.last_activity, idle) => CloseReason::Idle,
            () = w.graceful_timeout_passed() => CloseReason::Drain,
        }
    };
    let pipes = if splice::enabled() && spliceable(client) && spliceable(upstream) {
        pipe::take_pair(w.snapshot().server.pipes_per_worker)
    } else {
        None
    };
    // Splice needs both sockets non-blocking; that only fails on a descriptor already
    // closed, and then the copy path below says so.
    let pipes = pipes.filter(|_| {
        let ready =
            set_nonblocking(client.raw_fd()).and_then(|()| set_nonblocking(upstream.raw_fd()));
        if let Err(e) = &ready {
            tracing::debug!(error = %e, "tunnel: cannot make the sockets non-blocking; copying");
        }
        ready.is_ok()
    });
    let path = match pipes {
        Some(pipes) => {
            run_splice(
                client,
                upstream,
                pipes,
                from_client,
                &from_upstream,
                &progress,
                stop,
            )
            .await;
            w.give_buf(from_upstream);
            PATH_SPLICE
        }
        None => {
            run_copy(
                client,
                upstream,
                from_client,
                from_upstream,
                w,
                &progress,
                stop,
            )
            .await;
            PATH_COPY
        }
    };
    progress.finish(path, started)
}

impl Progress {
    /// What the tunnel did, logged at debug.
    pub(crate) fn finish(&self, path: &'static str, started: Instant) -> TunnelBytes {
        let out = TunnelBytes {
            to_client: self.to_client.get(),
            to_upstream: self.to_upstream.get(),
            path,
            reason: self.reason.get().unwrap_or(CloseReason::Error),
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
}

/// Runs a tunnel (`tunnel` is [`run`] or `h2::websocket::run`) counted in the tunnel
/// metrics: active while it runs, then its path and bytes. Its upstream socket counts in
/// `gateway_upstream_connections_active{upstream}` (of `upstream`, the metric name) while
/// it runs, as an exchange's does.
pub(crate) async fn counted<S: Stream>(
    w: &Worker<S>,
    upstream: &Arc<str>,
    tunnel: impl std::future::Future<Output = TunnelBytes>,
) -> TunnelBytes {
    {
        let mut stats = w.stats.borrow_mut();
        stats.tunnels_active += 1;
        stats.upstream(upstream).active += 1;
    }
    // Counted down even when the tunnel's task is dropped (a connection cut).
    struct Active<'w, S: Stream>(&'w Worker<S>, &'w Arc<str>);
    impl<S: Stream> Drop for Active<'_, S> {
        fn drop(&mut self) {
            let mut stats = self.0.stats.borrow_mut();
            stats.tunnels_active -= 1;
            stats.upstream(self.1).active -= 1;
        }
    }
    let active = Active(w, upstream);
    let bytes = tunnel.await;
    drop(active);
    let mut stats = w.stats.borrow_mut();
    stats.tunnel_path(bytes.path);
    stats.tunnel_bytes[0] += bytes.to_upstream;
    stats.tunnel_bytes[1] += bytes.to_client;
    bytes
}

/// Waits until nothing moved for `idle`.
pub(crate) async fn watchdog(last_activity: &Cell<Instant>, idle: Duration) {
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

/// Whether the bytes on this stream's socket are the payload itself. An allowlist of the
/// plaintext stream types: anything else (TLS, whose socket carries ciphertext, or a type
/// this function does not know) takes the copy path.
fn spliceable<S: Stream>(s: &S) -> bool {
    s.spliceable()
}

/// Puts a socket in non-blocking mode for good ([`NonBlocking`]): nothing uses the sockets
/// through io_uring after the tunnel, the HTTP/1 session closes both when [`run`] returns.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    NonBlocking::set(fd).map(NonBlocking::keep)
}

async fn run_splice<S: Stream>(
    client: &S,
    upstream: &S,
    (mut up_pipe, mut down_pipe): (PooledPipe, PooledPipe),
    from_client: &[u8],
    from_upstream: &[u8],
    progress: &Progress,
    stop: impl std::future::Future<Output = CloseReason>,
) {
    let both = async {
        tokio::try_join!(
            splice_dir(
                client,
                upstream,
                &mut up_pipe,
                from_client,
                Dir::ToUpstream,
                progress
            ),
            splice_dir(
                upstream,
                client,
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
        reason = stop => progress.ended(reason),
    }
    // Both directions are over (or abandoned): make sure neither peer waits on us.
    client.abort();
    upstream.abort();
}

/// One direction: `pending` first, then splice `from` → pipe → `to` until EOF, which is
/// passed on as a half-close. Readiness comes from [`Stream::ready_io`] (the reactor,
/// never an io_uring operation).
async fn splice_dir<S: Stream>(
    from: &S,
    to: &S,
    pipe: &mut PooledPipe,
    pending: &[u8],
    dir: Dir,
    progress: &Progress,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < pending.len() {
        let n = to
            .ready_io(Interest::WRITABLE, |fd| send(fd, &pending[sent..]))
            .await?;
        sent += n;
        dir.add(progress, n);
        progress.touch();
    }
    // Until EOF; the idle watchdog beside the two directions bounds the pauses.
    let mut pace = TunnelPace { dir, progress };
    match splice::splice_exact(from, to, pipe, u64::MAX, &mut pace).await {
        Ok(_) => {
            progress.ended(dir.eof());
            to.shutdown_write();
            Ok(())
        }
        Err(SpliceError::Read(e) | SpliceError::Write(e)) => Err(e),
        Err(SpliceError::ReadTimeout | SpliceError::WriteTimeout) => {
            Err(io::ErrorKind::TimedOut.into())
        }
    }
}

/// A tunnel direction's [`Pace`]: no deadlines (the watchdog has them), progress counted.
struct TunnelPace<'p> {
    dir: Dir,
    progress: &'p Progress,
}

impl Pace for TunnelPace<'_> {
    fn read_deadline(&self) -> Option<Instant> {
        None
    }
    fn write_deadline(&self) -> Option<Instant> {
        None
    }
    fn read(&mut self, _: usize) {
        self.progress.touch();
    }
    fn written(&mut self, n: usize) {
        self.dir.add(self.progress, n);
        self.progress.touch();
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
    stop: impl std::future::Future<Output = CloseReason>,
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
        reason = stop => {
            // Shutting both sockets down completes the reads still in flight (their
            // futures are dropped here; tokio-uring does not cancel them).
            progress.ended(reason);
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
