//! [`UringStream`]: a TCP stream whose reads and writes are io_uring operations on the
//! worker's ring. It counts operations in flight so that dropping it mid-operation shuts
//! the socket down (see the owned-buffer contract in [`crate::io`]).
//!
//! It also submits the ring's queue early in a busy turn ([`early_submit`]): tokio-uring
//! 0.5 hands its queued operations to the kernel only when the thread parks, which a
//! loaded worker rarely does.

use bytes::BytesMut;
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

use super::connect::connect_nonblocking;
use super::sockets::WatchedFd;
use super::{ParkedSocket, Stream};

pub use early_submit::{release_ring, runtime_claiming_ring, uring_available, EARLY_SUBMIT_BATCH};

/// A TCP stream driven by the worker's io_uring.
pub struct UringStream {
    /// Registered with the reactor on first use of `ready_io`. Declared before `inner` so
    /// it is deregistered before the descriptor closes.
    reactor: std::cell::OnceCell<tokio::io::unix::AsyncFd<WatchedFd>>,
    inner: tokio_uring::net::TcpStream,
    /// Operations submitted and not yet completed; non-zero on drop means a future holding
    /// an operation was dropped and the socket must be shut down to complete it.
    in_flight: Cell<u32>,
    /// The last read returned less than it asked for, so the socket's receive queue was
    /// empty then: any byte after it raises a new edge-triggered readiness event, which is
    /// what lets [`Stream::wait_readable`] clear readiness and sleep on the reactor.
    drained: Cell<bool>,
}

impl UringStream {
    /// No `setsockopt` here: an accepted socket inherits `TCP_NODELAY` from its listener
    /// ([`crate::io::sockets::listening`]) and an upstream socket gets it before its
    /// connect ([`connect_nonblocking`]).
    pub fn new(inner: tokio_uring::net::TcpStream) -> Self {
        UringStream {
            reactor: std::cell::OnceCell::new(),
            inner,
            in_flight: Cell::new(0),
            drained: Cell::new(false),
        }
    }

    /// The socket's registration with the worker's reactor (epoll beside the ring), made
    /// on first use.
    fn reactor(&self) -> io::Result<&tokio::io::unix::AsyncFd<WatchedFd>> {
        if let Some(r) = self.reactor.get() {
            return Ok(r);
        }
        let fd = self.inner.as_raw_fd();
        // SAFETY: the registration lives in this struct and is dropped before `inner`,
        // so the descriptor stays open for as long as it is registered.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                WatchedFd(fd),
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )
        }?;
        Ok(self.reactor.get_or_init(|| registered))
    }
}

impl Stream for UringStream {
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let len = buf.len();
        if buf.capacity() == len {
            buf.reserve(4096);
        }
        let cap = buf.capacity();
        self.in_flight.set(self.in_flight.get() + 1);
        let (res, slice) = early_submit::queued(self.inner.read(buf.slice(len..cap))).await;
        self.in_flight.set(self.in_flight.get() - 1);
        self.drained
            .set(matches!(res, Ok(n) if n > 0 && n < cap - len));
        (res, slice.into_inner())
    }

    /// Readiness from the reactor, not an io_uring poll (tokio-uring 0.5 has no poll
    /// operation): one `epoll_ctl` per connection on its first idle wait, nothing per
    /// request. The reactor is edge-triggered, so readiness is cleared here, before the
    /// read that follows, and only when the last read drained the socket: then every byte
    /// that arrives later raises a new event. Otherwise bytes may still be queued with no
    /// edge to come, so this returns at once and the read takes them.
    async fn wait_readable(&self) -> io::Result<()> {
        if !self.drained.get() {
            return Ok(());
        }
        let mut ready = self.reactor()?.readable().await?;
        ready.clear_ready();
        // Only now: a wait given up before readiness (the idle wait's grace before the
        // connection parks) must leave the next wait waiting, not returning at once.
        self.drained.set(false);
        Ok(())
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        self.in_flight.set(self.in_flight.get() + 1);
        let out = early_submit::queued(self.inner.write_all(buf)).await;
        self.in_flight.set(self.in_flight.get() - 1);
        out
    }

    /// The connect runs on a plain non-blocking socket under readiness so that a timeout
    /// closes the socket at once; an io_uring connect that is abandoned would keep its
    /// descriptor until the kernel gives up on the SYN.
    async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let std = connect_nonblocking(addr, timeout).await?;
        Ok(Self::new(tokio_uring::net::TcpStream::from_std(std)))
    }

    async fn ready_io<R>(
        &self,
        interest: tokio::io::Interest,
        mut f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        self.reactor()?.async_io(interest, |w| f(w.0)).await
    }

    /// A pooled upstream connection is watched by the reactor beside the ring (one
    /// `epoll_ctl` per connection, on its first parking), so that taking it again needs
    /// no `recv(MSG_PEEK)` (nginx keeps a read event on its cached connections to the same
    /// end). Parked after a read that drained the socket (see `drained`), its read
    /// readiness is cleared here: the response's own bytes raised it, and any byte or EOF
    /// that arrives later raises a new edge. The clear can also drop an edge the reactor
    /// took between the kernel completing that read and this call (microseconds), the
    /// same window the `recv(MSG_PEEK)` left between itself and the next request: an EOF
    /// then fails the attempt, replayed on a fresh connection when the request is
    /// replayable (`policy::retry`). A read that filled its buffer leaves the readiness
    /// set, and `idle_alive` asks the socket.
    fn park_idle(&self) {
        if !self.drained.get() {
            return;
        }
        let Ok(reactor) = self.reactor() else {
            return;
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(Ok(mut ready)) = reactor.poll_read_ready(&mut cx) {
            ready.clear_ready();
        }
    }

    /// No read event since [`Stream::park_idle`]: alive, without a syscall. A readiness
    /// left set (or a connection never parked) is checked with a `recv(MSG_PEEK)`, which
    /// clears it when the socket is in fact empty.
    fn idle_alive(&self) -> bool {
        let Some(reactor) = self.reactor.get() else {
            return super::idle_connection_alive(self.raw_fd());
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match reactor.poll_read_ready(&mut cx) {
            std::task::Poll::Pending => true,
            std::task::Poll::Ready(Err(_)) => false,
            std::task::Poll::Ready(Ok(mut ready)) => {
                if super::idle_connection_alive(self.raw_fd()) {
                    ready.clear_ready();
                    true
                } else {
                    false
                }
            }
        }
    }

    fn shutdown_write(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Write);
    }

    fn abort(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }

    fn raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    fn parkable(&self) -> bool {
        true
    }

    /// Drops the reactor registration (one `epoll_ctl(DEL)`) and keeps a duplicate of
    /// the descriptor, closing tokio-uring's stream (`fcntl` + `close`, see
    /// [`ParkedSocket::Duplicate`]); with no descriptor free for the duplicate, keeps the
    /// stream itself.
    fn park(self) -> Result<ParkedSocket, Option<Self>> {
        if self.in_flight.get() != 0 {
            return Err(Some(self));
        }
        let mut this = std::mem::ManuallyDrop::new(self);
        drop(this.reactor.take());
        // SAFETY: `inner` is read out exactly once and `this` is never used or dropped
        // again; its other fields own nothing (two `Cell`s and an emptied `OnceCell`).
        let inner = unsafe { std::ptr::read(&this.inner) };
        // SAFETY: a plain fcntl on a descriptor `inner` holds open.
        let dup = unsafe { libc::fcntl(inner.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Ok(ParkedSocket::Uring(inner));
        }
        // No operation is in flight, so dropping the stream closes the original now.
        drop(inner);
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(ParkedSocket::Duplicate(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(dup)
        }))
    }

    /// Not [`UringStream::new`]: `TCP_NODELAY` is still set on the socket, so no syscall.
    /// `drained` starts false, so the first wait does not wait: the lot wakes a socket
    /// only once it is readable (or closed).
    fn unpark(socket: ParkedSocket) -> io::Result<Self> {
        let inner = match socket {
            ParkedSocket::Uring(inner) => inner,
            ParkedSocket::Fd(fd) | ParkedSocket::Duplicate(fd) => {
                tokio_uring::net::TcpStream::from_std(std::net::TcpStream::from(fd))
            }
        };
        Ok(UringStream {
            reactor: std::cell::OnceCell::new(),
            inner,
            in_flight: Cell::new(0),
            drained: Cell::new(false),
        })
    }

    /// A NOP on the ring: it completes once the ring's queue was submitted, which
    /// tokio-uring does when the thread parks (`on_thread_park`), so everything the
    /// worker's io_uring side queued before it (accepts, reads, writes) went to the kernel
    /// first. A `yield_now` would not do: while a task is ready the thread never parks.
    async fn yield_to_driver() {
        let _ = tokio_uring::no_op().await;
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        if self.in_flight.get() != 0 {
            self.abort();
        }
    }
}

/// Early submission of the worker's io_uring queue.
///
/// tokio-uring 0.5 pushes each operation's SQE onto the ring's submission queue and calls
/// `io_uring_enter` only from the runtime's `on_thread_park` hook (or when the queue is
/// full). A worker under load always has a ready task, so it does not park: every stream
/// of every connection queues its upstream write, and none of them reaches the kernel
/// until the whole run queue is done. The upstream then sees the requests in one burst and
/// answers in one burst; the clients fall into lock-step with it, and the pool, which keeps
/// at most `keepalive` idle connections, closes the burst's surplus only for the next burst
/// to open them again (measured on `h2_many_streams`: about 0.9 upstream connects per
/// request on io_uring against about 0.5 on the epoll driver).
///
/// The fix keeps batching but bounds it: after every `[server] io_uring_submit_batch`
/// operations a worker queues (default [`EARLY_SUBMIT_BATCH`]), it submits the queue itself with a plain `io_uring_enter(fd, n, 0, 0)`.
/// That is safe beside tokio-uring:
/// - io-uring 0.6 publishes the SQ tail to the shared ring on every push (its
///   `SubmissionQueue` stores the tail on drop), so the kernel sees every queued entry;
///   tokio-uring's own later `submit` computes its count from the shared head and tail
///   and submits whatever remains (possibly nothing).
/// - The ring is used by its worker's thread only (a thread-local holds its descriptor),
///   and never while tokio-uring holds it borrowed (we are in a task, not in the driver).
/// - No SQPOLL (the builder does not ask for it), so the syscall is what submits.
/// - `to_submit` larger than what is queued is clamped by the kernel. An error (EBUSY when
///   the completion queue overflowed, EINTR) is left to tokio-uring's own submit at the
///   next park, which handles both; nothing is lost, the entries stay queued.
///
/// tokio-uring does not expose the ring's descriptor, so each worker finds its own:
/// the io_uring descriptors of the process (`anon_inode:[io_uring]` in `/proc/self/fd`)
/// are listed before and after the runtime is made, under one process-wide lock that every
/// ring this process creates is made under; the one new descriptor is this worker's ring.
/// When that cannot be told (not exactly one new descriptor), the worker runs without
/// early submission, as before, and says so in the log.
mod early_submit {
    use std::cell::Cell;
    use std::collections::HashSet;
    use std::future::Future;
    use std::io;
    use std::os::fd::RawFd;
    use std::pin::pin;
    use std::sync::Mutex;

    /// Default operations a worker queues between two submissions of its own. Large enough
    /// that the syscall stays a small share of the work (one per 32 reads and writes),
    /// small enough that a burst of streams reaches the upstream as it is produced.
    pub const EARLY_SUBMIT_BATCH: u32 = 32;

    /// Held while a ring is created, so that each worker can tell its ring's descriptor.
    static RING_CREATION: Mutex<()> = Mutex::new(());

    /// Ring size of the runtime's submission queue; also what one early submit asks for.
    const SUBMIT_AT_MOST: u32 = 4096;

    thread_local! {
        /// This thread's ring, when it runs a worker's tokio-uring runtime; -1 otherwise.
        static RING_FD: Cell<RawFd> = const { Cell::new(-1) };
        /// Operations queued since this thread last submitted.
        static QUEUED: Cell<u32> = const { Cell::new(0) };
        /// Operations between two early submits; 0: none (tokio-uring's park only).
        static BATCH: Cell<u32> = const { Cell::new(EARLY_SUBMIT_BATCH) };
    }

    /// The io_uring descriptors open in this process.
    fn ring_fds() -> io::Result<HashSet<RawFd>> {
        let mut fds = HashSet::new();
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let entry = entry?;
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A descriptor closed since the listing has no link any more: not a ring.
            if let Ok(target) = std::fs::read_link(entry.path()) {
                if target.as_os_str() == "anon_inode:[io_uring]" {
                    fds.insert(fd);
                }
            }
        }
        Ok(fds)
    }

    /// Makes the worker's tokio-uring runtime (submission queue of 4096 entries) and
    /// claims its ring's descriptor for early submission on this thread, every `batch`
    /// queued operations (0: never, only at parks).
    ///
    /// The ring is set up with `IORING_SETUP_COOP_TASKRUN`. Without it, each completion
    /// of a socket operation that another CPU made ready (the peer's packet arriving)
    /// interrupts the worker with an inter-processor interrupt to run io_uring's task
    /// work at once; with it, the work waits for the worker's next entry into the kernel,
    /// which a busy worker makes within microseconds (its submissions, accepts and reactor
    /// polls) and an idle one is woken for as before. On this 2-vCPU VM the interrupts
    /// cost 3-4 us per new connection (`irqentry_exit_to_user_mode` in `perf record`),
    /// and the flag took 10-16 % off the CPU per request (docs/benchmarks.md, "Session 8").
    pub fn runtime_claiming_ring(batch: u32) -> io::Result<tokio_uring::Runtime> {
        BATCH.set(batch.min(SUBMIT_AT_MOST));
        let _creating = RING_CREATION.lock().unwrap_or_else(|e| e.into_inner());
        let before = ring_fds();
        let runtime = match tokio_uring::Runtime::new(
            tokio_uring::builder()
                .entries(SUBMIT_AT_MOST)
                .uring_builder(tokio_uring::uring_builder().setup_coop_taskrun()),
        ) {
            // Kernels before 5.19 refuse the flag: the ring without it works the same.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tokio_uring::Runtime::new(tokio_uring::builder().entries(SUBMIT_AT_MOST))?
            }
            made => made?,
        };
        let claimed = match (before, ring_fds()) {
            (Ok(before), Ok(after)) => {
                let new: Vec<RawFd> = after.difference(&before).copied().collect();
                match new[..] {
                    [fd] => Some(fd),
                    _ => None,
                }
            }
            _ => None,
        };
        match claimed {
            Some(fd) => RING_FD.set(fd),
            None => tracing::warn!(
                "cannot tell this worker's io_uring descriptor: operations are submitted \
                 only when the worker is idle"
            ),
        }
        QUEUED.set(0);
        Ok(runtime)
    }

    /// Whether this thread claimed its ring for early submission.
    #[cfg(test)]
    pub(super) fn claimed() -> bool {
        RING_FD.get() >= 0
    }

    /// Forgets this thread's ring: called once its runtime is gone, so that a descriptor
    /// number reused later is never entered.
    pub fn release_ring() {
        RING_FD.set(-1);
    }

    /// Whether io_uring can be used here (a seccomp profile may forbid `io_uring_setup`,
    /// or `kernel.io_uring_disabled` may be set). The probe ring is made under the same
    /// lock as the workers', so that it is never taken for one of theirs.
    pub fn uring_available() -> Result<(), io::Error> {
        let _creating = RING_CREATION.lock().unwrap_or_else(|e| e.into_inner());
        tokio_uring::uring_builder().build(8).map(|_| ())
    }

    /// Counts one queued operation and submits the queue every [`EARLY_SUBMIT_BATCH`].
    /// The count also includes operations tokio-uring submitted itself at a park since
    /// the last early submit, so a submit can find fewer queued: at most one syscall per
    /// batch either way.
    fn note_queued() {
        let fd = RING_FD.get();
        let batch = BATCH.get();
        if fd < 0 || batch == 0 {
            return;
        }
        let queued = QUEUED.get() + 1;
        if queued < batch {
            QUEUED.set(queued);
            return;
        }
        QUEUED.set(0);
        // SAFETY: `fd` is this thread's own ring, alive as long as its runtime (see
        // `release_ring`); flags 0 and no argument: submit only, never wait.
        unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                SUBMIT_AT_MOST,
                0u32,
                0u32,
                std::ptr::null::<libc::c_void>(),
                0usize,
            );
        }
    }

    /// Runs a tokio-uring operation, counting it as queued once its first poll pushed its
    /// SQE (an operation that completes on its first poll was never waiting in the queue).
    pub(super) async fn queued<F: Future>(op: F) -> F::Output {
        let mut op = pin!(op);
        let mut first = true;
        std::future::poll_fn(|cx| {
            let poll = op.as_mut().poll(cx);
            if first {
                first = false;
                if poll.is_pending() {
                    note_queued();
                }
            }
            poll
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::rc::Rc;
    use std::time::Instant;

    /// A worker that never parks (here a task that only yields, as a loaded worker always
    /// has a task ready) still gets its queued operations to the kernel and their
    /// completions back. Without early submission tokio-uring submits only at a park, so
    /// these reads would never complete.
    #[test]
    fn queued_operations_complete_while_the_worker_never_parks() {
        let rt = runtime_claiming_ring(EARLY_SUBMIT_BATCH).expect("an io_uring ring");
        assert!(early_submit::claimed(), "the worker claimed its ring");
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("address");
            let reads = EARLY_SUBMIT_BATCH as usize;
            let mut clients = Vec::new();
            let done = Rc::new(Cell::new(0usize));
            for _ in 0..reads {
                let mut client = std::net::TcpStream::connect(addr).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                client.write_all(b"x").expect("write");
                clients.push(client);
                let stream = UringStream::new(tokio_uring::net::TcpStream::from_std(server));
                let done = done.clone();
                tokio_uring::spawn(async move {
                    let (read, _) = stream.read(BytesMut::with_capacity(16)).await;
                    assert_eq!(read.expect("read"), 1);
                    done.set(done.get() + 1);
                });
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while done.get() < reads {
                assert!(
                    Instant::now() < deadline,
                    "{} of {reads} queued reads completed while the worker stayed busy",
                    done.get()
                );
                // Defers to a non-blocking poll of the reactor: never a park.
                tokio::task::yield_now().await;
            }
        });
        drop(rt);
        release_ring();
    }
}
