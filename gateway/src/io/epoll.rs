//! [`EpollStream`]: the readiness-driven stream, for hosts without io_uring.

use bytes::BytesMut;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

use super::connect::connect_nonblocking;
use super::{ParkedSocket, Stream};

/// A TCP stream driven by readiness (epoll through tokio's reactor): the driver for hosts
/// where io_uring is unavailable, typically because a container runtime's seccomp
/// profile forbids `io_uring_setup`. Same interface, same owned buffers.
pub struct EpollStream {
    inner: tokio::net::TcpStream,
    /// The last read was short and cleared the read readiness ([`EpollStream::read`]):
    /// any readiness since is a new edge, bytes or an EOF that arrived after it.
    drained: std::cell::Cell<bool>,
}

impl EpollStream {
    /// No `setsockopt` here: an accepted socket inherits `TCP_NODELAY` from its listener
    /// ([`crate::io::sockets::listening`]) and an upstream socket gets it before its
    /// connect ([`connect_nonblocking`]).
    pub fn new(inner: tokio::net::TcpStream) -> Self {
        EpollStream {
            inner,
            drained: std::cell::Cell::new(false),
        }
    }
}

impl EpollStream {
    /// Clears the read readiness tokio holds for the socket, without a syscall: `try_io`
    /// clears it when its operation says `WouldBlock` (and keeps an EOF's).
    fn forget_readable(&self) {
        let _ = self.inner.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
}

impl Stream for EpollStream {
    /// A read that returns less than it asked for emptied the socket's receive queue, so
    /// the readiness it started from is cleared then and there, as nginx clears `ready`
    /// on a short `recv`: tokio would keep it until a syscall meets `WouldBlock`, and the
    /// next read (the next response on a pooled upstream connection, the next request of
    /// a keep-alive client) would spend a `recv` finding nothing. Safe against a lost
    /// wake-up: no reactor turn runs between the `recv` and the clear (no await), and
    /// the reactor is edge-triggered, so every byte that arrives after the `recv` raises
    /// a new event; an EOF's readiness is never cleared.
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        let asked = buf.capacity() - buf.len();
        loop {
            if let Err(e) = self.inner.readable().await {
                return (Err(e), buf);
            }
            match self.inner.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) if n > 0 && n < asked => {
                    self.forget_readable();
                    self.drained.set(true);
                    return (Ok(n), buf);
                }
                other => {
                    self.drained.set(false);
                    return (other, buf);
                }
            }
        }
    }

    /// Readiness answers first: a pooled connection that raised no read event since the
    /// read that emptied it has neither bytes nor an EOF waiting, and no syscall is made
    /// (nginx keeps a read event on its cached upstream connections to the same end).
    /// Only a readiness left set is checked with a `recv(MSG_PEEK)`, which clears it when
    /// the socket is in fact empty.
    fn idle_alive(&self) -> bool {
        let fd = self.inner.as_raw_fd();
        match self.inner.try_io(tokio::io::Interest::READABLE, || {
            super::sockets::peek_one(fd)
        }) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // An EOF, or bytes no request asked for.
            Ok(_) => false,
        }
    }

    /// Readiness is this driver's native wait. After a short read ([`EpollStream::read`]
    /// cleared the readiness) any readiness is a new edge, so it ends the wait with no
    /// syscall. Otherwise (a read that filled its buffer, or none yet) the readiness may
    /// be stale: it would end the idle wait at once, and the connection would take its
    /// per-request state and buffer only to wait inside the read. A one-byte `MSG_PEEK`
    /// settles that without consuming anything: `WouldBlock` clears the readiness and the
    /// wait goes on; bytes or an EOF end it.
    async fn wait_readable(&self) -> io::Result<()> {
        loop {
            self.inner.readable().await?;
            if self.drained.get() {
                return Ok(());
            }
            let fd = self.inner.as_raw_fd();
            let peeked = self.inner.try_io(tokio::io::Interest::READABLE, || {
                super::sockets::peek_one(fd)
            });
            match peeked {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // Bytes, an EOF or an error: the read that follows tells which.
                _ => return Ok(()),
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

    fn parkable(&self) -> bool {
        true
    }

    /// `into_std` deregisters the socket from the reactor (one `epoll_ctl(DEL)`); the
    /// descriptor stays non-blocking, as [`EpollStream::unpark`] needs it.
    fn park(self) -> Result<ParkedSocket, Option<Self>> {
        match self.inner.into_std() {
            Ok(std) => Ok(ParkedSocket::Fd(std.into())),
            Err(e) => {
                tracing::debug!(error = %e, "parking an idle connection: deregistration failed, closed");
                Err(None)
            }
        }
    }

    /// Registers the socket again (one `epoll_ctl(ADD)`); `TCP_NODELAY` is still set.
    fn unpark(socket: ParkedSocket) -> io::Result<Self> {
        match socket {
            ParkedSocket::Fd(fd) | ParkedSocket::Duplicate(fd) => Ok(EpollStream::new(
                tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?,
            )),
            ParkedSocket::Uring(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}
