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

pub mod driver;
pub mod memory;
pub mod pipe;

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
    /// Runs a non-blocking syscall on the socket when it is ready for `interest`, again
    /// after each `WouldBlock`. Readiness comes from the reactor (epoll), never from an
    /// io_uring operation, so nothing is consumed or left in flight: this is how the proxy
    /// watches for a hang-up and how tunnels drive `splice(2)`.
    async fn ready_io<R>(
        &self,
        interest: tokio::io::Interest,
        f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R>;
    /// Whether the bytes on [`Stream::raw_fd`] are the payload itself, so a tunnel may move
    /// them with `splice(2)`: true for plain sockets, false for TLS (they carry ciphertext).
    fn spliceable(&self) -> bool {
        true
    }
    /// Sends FIN: no more bytes will be written.
    fn shutdown_write(&self);
    /// Shuts both directions down so that any operation still in flight completes.
    fn abort(&self);
    fn raw_fd(&self) -> RawFd;
}

/// A TCP stream driven by the worker's io_uring.
pub struct UringStream {
    /// Registered with the reactor on first use of `ready_io`. Declared before `inner` so
    /// it is deregistered before the descriptor closes.
    reactor: std::cell::OnceCell<tokio::io::unix::AsyncFd<WatchedFd>>,
    inner: tokio_uring::net::TcpStream,
    /// Operations submitted and not yet completed; non-zero on drop means a future holding
    /// an operation was dropped and the socket must be shut down to complete it.
    in_flight: Cell<u32>,
}

impl UringStream {
    pub fn new(inner: tokio_uring::net::TcpStream) -> Self {
        let _ = inner.set_nodelay(true);
        UringStream {
            reactor: std::cell::OnceCell::new(),
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
    if crate::util::budget::fd_in_reserve(socket.as_raw_fd()) {
        // The last descriptors are the admin listener's reserve: answer as the kernel
        // would have, so the caller books it as a local shortage, not a server failure.
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
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

    async fn ready_io<R>(
        &self,
        interest: tokio::io::Interest,
        mut f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        if self.reactor.get().is_none() {
            let fd = self.inner.as_raw_fd();
            // SAFETY: the registration lives in this struct and is dropped before `inner`,
            // so the descriptor stays open for as long as it is registered.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    WatchedFd(fd),
                    tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
                )
            }
            .map_err(io::Error::from)?;
            let _ = self.reactor.set(registered);
        }
        let reactor = self.reactor.get().expect("registered above");
        reactor.async_io(interest, |w| f(w.0)).await
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

/// A TCP stream driven by readiness (epoll through tokio's reactor): the driver for hosts
/// where io_uring is unavailable, typically because a container runtime's seccomp
/// profile forbids `io_uring_setup`. Same interface, same owned buffers.
pub struct EpollStream {
    inner: tokio::net::TcpStream,
}

impl EpollStream {
    pub fn new(inner: tokio::net::TcpStream) -> Self {
        let _ = inner.set_nodelay(true);
        EpollStream { inner }
    }
}

impl Stream for EpollStream {
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        loop {
            if let Err(e) = self.inner.readable().await {
                return (Err(e), buf);
            }
            match self.inner.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return (other, buf),
            }
        }
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        // SAFETY: BoundedBuf guarantees `stable_ptr()` is valid for `bytes_init()` bytes
        // for as long as the buffer is not mutated, and we hold it until we return it.
        let bytes = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
        let mut written = 0;
        while written < bytes.len() {
            if let Err(e) = self.inner.writable().await {
                return (Err(e), buf);
            }
            match self.inner.try_write(&bytes[written..]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let std = connect_nonblocking(addr, timeout).await?;
        Ok(Self::new(tokio::net::TcpStream::from_std(std)?))
    }

    async fn ready_io<R>(
        &self,
        interest: tokio::io::Interest,
        mut f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        let fd = self.inner.as_raw_fd();
        self.inner.async_io(interest, || f(fd)).await
    }

    fn shutdown_write(&self) {
        // SAFETY: shutdown on a descriptor this stream owns.
        unsafe { libc::shutdown(self.inner.as_raw_fd(), libc::SHUT_WR) };
    }

    fn abort(&self) {
        // SAFETY: shutdown on a descriptor this stream owns.
        unsafe { libc::shutdown(self.inner.as_raw_fd(), libc::SHUT_RDWR) };
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
pub struct WatchedFd(RawFd);

impl AsRawFd for WatchedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Resolves when the peer has closed its end (EOF or reset), without consuming any byte
/// it sent. Pending forever if it sends data instead (a pipelined request is not a
/// hang-up) or if the socket cannot be watched.
///
/// Readiness beside the ring, not an io_uring read: a read racing the upstream would
/// consume the client's next request, and an abandoned io_uring read loses its bytes.
pub async fn peer_closed<S: Stream>(stream: &S) {
    let peeked = stream
        .ready_io(tokio::io::Interest::READABLE, |fd| {
            let mut byte = 0u8;
            // SAFETY: recv into a valid one-byte buffer; MSG_PEEK leaves the data queued.
            let n = unsafe {
                libc::recv(
                    fd,
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        })
        .await;
    match peeked {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Binds one listener socket for this worker: `SO_REUSEPORT` so every worker has its own
/// accept queue and the kernel spreads connections among them.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
