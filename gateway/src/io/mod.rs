//! The narrow socket interface the HTTP code is written against, and its drivers.
//!
//! The proxy only ever needs: read into the spare capacity of an owned buffer, write a whole
//! owned buffer, shut down one direction, and abort. Keeping it to that lets a second
//! driver (epoll, for hosts whose seccomp profile forbids io_uring) slot in without touching
//! the codec or the proxy.
//!
//! # The owned-buffer contract
//!
//! Owned buffers, not borrowed slices: io_uring needs the memory to stay put until the
//! kernel completes the operation, even if the future that started it is dropped.
//! A dropped read is not cancelled by tokio-uring; it completes when bytes arrive or the
//! socket is shut down. So whoever abandons an operation mid-flight (a timeout, a drain)
//! must [`Stream::abort`] the socket, which shuts it down so the kernel finishes the
//! operation and releases the file. [`UringStream`] does that on drop when an operation
//! was left in flight.
//!
//! # Layout
//!
//! - [`uring`]: [`UringStream`], the io_uring driver's stream.
//! - [`epoll`]: [`EpollStream`], the readiness driver's stream.
//! - [`connect`]: [`connect_nonblocking`], the connect both drivers share.
//! - [`sockets`]: listener sockets and readiness probes on a raw descriptor
//!   ([`bind_reuseport`], [`idle_connection_alive`], [`peer_closed`]).
//! - [`driver`]: picks the driver at start; [`pipe`]: `splice(2)` pipes for tunnels and
//!   bodies; [`splice`]: the one socket → pipe → socket loop both use.

use bytes::BytesMut;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

pub mod connect;
pub mod driver;
pub mod epoll;
#[cfg(test)]
pub(crate) mod memory;
pub mod pipe;
pub mod sockets;
pub mod splice;
pub mod uring;

pub use epoll::EpollStream;
pub use sockets::peer_closed;
pub(crate) use sockets::{bind_reuseport, idle_connection_alive};
pub use uring::UringStream;

/// A connected byte stream: a client or an upstream connection.
#[allow(async_fn_in_trait)] // Workers are single-threaded by design: futures are never Send.
pub trait Stream: 'static {
    /// Reads into the spare capacity of `buf` (appending after its length). `Ok(0)` is EOF.
    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut);
    /// Resolves once a [`Stream::read`] would find bytes (or EOF, or an error) without
    /// holding a buffer meanwhile: how an idle keep-alive connection waits for its next
    /// request, so that thousands of idle connections park no buffer in an in-flight read.
    /// Consumes nothing. May resolve early (the read that follows then simply waits, with
    /// its buffer, as it would have anyway); never resolves late while bytes are queued.
    /// The default resolves at once: right for streams whose reads are scripted.
    async fn wait_readable(&self) -> io::Result<()> {
        Ok(())
    }
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
    /// Whether this connection, idle in a pool, can still carry a request: no EOF and no
    /// stray bytes waiting (an upstream out of step). The default asks the socket, one
    /// `recv(MSG_PEEK)`; a driver that knows the socket's readiness answers without a
    /// syscall while nothing arrived since its last read drained the socket.
    fn idle_alive(&self) -> bool {
        idle_connection_alive(self.raw_fd())
    }
    /// Called as a connection goes idle into a pool, its response read to the end: lets a
    /// driver start watching it for the event [`Stream::idle_alive`] answers from.
    fn park_idle(&self) {}
    /// Sends FIN: no more bytes will be written.
    fn shutdown_write(&self);
    /// Shuts both directions down so that any operation still in flight completes.
    fn abort(&self);
    fn raw_fd(&self) -> RawFd;
    /// Whether [`Stream::park`] can take this stream's socket out (plaintext TCP on either
    /// driver; never TLS, whose session state is not a socket, nor scripted streams).
    fn parkable(&self) -> bool {
        false
    }
    /// Takes the socket out of the stream so that an idle connection can wait with no
    /// task and no reactor registration (`dataplane::parking`). Only between requests:
    /// nothing may be in flight. `Err(Some(self))`: this stream cannot park (see
    /// [`Stream::parkable`]), it is given back unchanged; `Err(None)`: the socket was lost
    /// on the way (its reactor registration could not be undone) and is closed.
    fn park(self) -> Result<ParkedSocket, Option<Self>>
    where
        Self: Sized,
    {
        Err(Some(self))
    }
    /// The stream again, around a socket [`Stream::park`] took out.
    fn unpark(socket: ParkedSocket) -> io::Result<Self>
    where
        Self: Sized,
    {
        drop(socket);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Lets the rest of the worker run before a busy readiness task (an HTTP/2
    /// connection) goes on: on epoll the scheduler's own turn is enough.
    async fn yield_to_driver()
    where
        Self: Sized,
    {
        tokio::task::yield_now().await
    }
}

/// A client socket while its connection waits in the worker's parking lot: only the
/// descriptor, with no buffer, no task and no reactor registration.
pub enum ParkedSocket {
    /// The descriptor itself: what the epoll driver's stream gives up.
    Fd(OwnedFd),
    /// A duplicate of the io_uring driver's descriptor, whose original was closed:
    /// tokio-uring's stream cannot give its descriptor up without closing it, and keeping
    /// the stream would keep its small allocation, made at the accept, among the freed
    /// tasks of the connections accepted around it: the heap pages stay resident (0.97
    /// KiB per parked connection at 10,000, against 0.32 KiB with the bare descriptor).
    /// Its number changes at every park, so the lot forgets it when it wakes it.
    Duplicate(OwnedFd),
    /// tokio-uring's stream itself, when no descriptor was free for the duplicate.
    Uring(tokio_uring::net::TcpStream),
}

impl ParkedSocket {
    pub fn raw_fd(&self) -> RawFd {
        match self {
            ParkedSocket::Fd(fd) | ParkedSocket::Duplicate(fd) => fd.as_raw_fd(),
            ParkedSocket::Uring(stream) => stream.as_raw_fd(),
        }
    }
}
