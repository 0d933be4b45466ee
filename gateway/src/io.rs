//! The narrow socket interface the HTTP code is written against, and its io_uring driver.
//!
//! The proxy only ever needs: read into the spare capacity of an owned buffer, write a whole
//! owned buffer, shut down one direction, and abort. Keeping it to that lets a second
//! driver (epoll, for hosts whose seccomp profile forbids io_uring) slot in without touching
//! the codec or the proxy.
//!
//! Owned buffers, not borrowed slices: io_uring needs the memory to stay put until the
//! kernel completes the operation, even if the future that started it is dropped.
//! A dropped read is not cancelled by tokio-uring; it completes when bytes arrive or the
//! socket is shut down. So whoever abandons an operation mid-flight (a timeout, a drain)
//! must [`Stream::abort`] the socket, which shuts it down so the kernel finishes the
//! operation and releases the file. [`UringStream`] does that on drop when an operation
//! was left in flight.

use bytes::BytesMut;
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

/// A connected byte stream: a client or an upstream connection.
#[allow(async_fn_in_trait)] // Workers are single-threaded by design: futures are never Send.
pub trait Stream: 'static {
    /// Reads into the spare capacity of `buf` (appending after its length). `Ok(0)` is EOF.
    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut);
    /// Writes all of `buf`.
    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B);
    /// Opens a connection to an upstream within `timeout`.
    async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self>
    where
        Self: Sized;
    /// Sends FIN: no more bytes will be written.
    fn shutdown_write(&self);
    /// Shuts both directions down so that any operation still in flight completes.
    fn abort(&self);
    fn raw_fd(&self) -> RawFd;
}

/// A TCP stream driven by the worker's io_uring.
pub struct UringStream {
    inner: tokio_uring::net::TcpStream,
    /// Operations submitted and not yet completed; non-zero on drop means a future holding
    /// an operation was dropped and the socket must be shut down to complete it.
    in_flight: Cell<u32>,
}

impl UringStream {
    pub fn new(inner: tokio_uring::net::TcpStream) -> Self {
        let _ = inner.set_nodelay(true);
        UringStream {
            inner,
            in_flight: Cell::new(0),
        }
    }
}

/// Non-blocking connect with a deadline, awaited through readiness (works under both the
/// uring and the epoll driver, since tokio-uring runs a tokio reactor underneath).
pub async fn connect_nonblocking(
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            // SAFETY: the AsyncFd owns the socket, so the descriptor stays open for as long
            // as it is registered.
            let fd = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    socket,
                    tokio::io::Interest::WRITABLE,
                )
            }
            .map_err(io::Error::from)?;
            match tokio::time::timeout(timeout, fd.writable()).await {
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
                Ok(ready) => {
                    ready?.retain_ready();
                }
            }
            let socket = fd.into_inner();
            if let Some(e) = socket.take_error()? {
                return Err(e);
            }
            return Ok(socket.into());
        }
        Err(e) => return Err(e),
    }
    Ok(socket.into())
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
        (res, slice.into_inner())
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

    fn shutdown_write(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Write);
    }

    fn abort(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }

    fn raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        if self.in_flight.get() != 0 {
            self.abort();
        }
    }
}

/// Whether an idle connection is still usable: no EOF and no unexpected bytes waiting.
/// One non-blocking `recv(MSG_PEEK)`; used before reusing a pooled upstream connection,
/// because the upstream may have closed it while it sat idle.
pub fn idle_connection_alive(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv into a valid one-byte buffer on a descriptor we own.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return err.kind() == io::ErrorKind::WouldBlock;
    }
    false
}

/// A descriptor registered with the reactor without taking ownership of it.
struct WatchedFd(RawFd);

impl AsRawFd for WatchedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Resolves when the peer of `fd` has closed its end (EOF or reset), without consuming any
/// byte it sent. Pending forever if it sends data instead (a pipelined request is not a
/// hang-up) or if the descriptor cannot be watched.
///
/// This is readiness (epoll) beside the ring, not an io_uring read: a read racing the
/// upstream would consume the client's next request, and an abandoned io_uring read
/// loses its bytes. The future must be dropped before the stream is closed.
pub async fn peer_closed(fd: RawFd) {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the caller keeps the descriptor open while this future lives (it is dropped
    // before the stream it watches), and AsyncFd deregisters on drop.
    let Ok(watch) = (unsafe { AsyncFd::register_with_interest(WatchedFd(fd), tokio::io::Interest::READABLE) }) else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = watch.readable().await else {
            return std::future::pending().await;
        };
        let mut byte = 0u8;
        // SAFETY: recv into a valid one-byte buffer; MSG_PEEK leaves the data queued.
        let n = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n == 0 {
            return;
        }
        if n > 0 {
            // Data, not a hang-up: stop watching.
            return std::future::pending().await;
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            ready.clear_ready();
            continue;
        }
        return;
    }
}
