//! [`UringStream`]: a TCP stream whose reads and writes are io_uring operations on the
//! worker's ring. It counts operations in flight so that dropping it mid-operation shuts
//! the socket down (see the owned-buffer contract in [`crate::io`]).

use bytes::BytesMut;
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

use super::connect::connect_nonblocking;
use super::sockets::WatchedFd;
use super::Stream;

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
    pub fn new(inner: tokio_uring::net::TcpStream) -> Self {
        let _ = inner.set_nodelay(true);
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
        let (res, slice) = self.inner.read(buf.slice(len..cap)).await;
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
        self.drained.set(false);
        let mut ready = self.reactor()?.readable().await?;
        ready.clear_ready();
        Ok(())
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        self.in_flight.set(self.in_flight.get() + 1);
        let out = self.inner.write_all(buf).await;
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

    fn shutdown_write(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Write);
    }

    fn abort(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }

    fn raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
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
