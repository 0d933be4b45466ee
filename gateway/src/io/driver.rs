//! The two I/O drivers a worker can run on, and what a worker needs of either: how to
//! accept and how to spawn a task.

use crate::io::{EpollStream, Stream, UringStream};
use std::net::SocketAddr;

/// Which I/O driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    Uring,
    Epoll,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// What a worker needs from its runtime: how to accept and how to spawn a task.
#[allow(async_fn_in_trait)] // Single-threaded runtimes: nothing here is Send.
pub(crate) trait Driver: 'static {
    type Stream: Stream;
    type Listener: 'static;
    fn listener(std: std::net::TcpListener) -> std::io::Result<Self::Listener>;
    async fn accept(listener: &Self::Listener) -> std::io::Result<(Self::Stream, SocketAddr)>;
    fn spawn(task: impl std::future::Future<Output = ()> + 'static);
}

/// io_uring through tokio-uring for connections; accepts through readiness.
///
/// The accept is a nonblocking `accept4` when the reactor (the epoll instance tokio-uring
/// runs beside its ring) says the listener is readable, as on the epoll driver, and not an
/// io_uring accept: an io_uring accept stays pending in the kernel until a connection
/// comes, so a process that stops accepting (drain, handover, an upgrade given up) would
/// either take one more connection it no longer serves (a reset, a per-IP refusal counted
/// against the wrong process) or need `shutdown()` to cancel it, which shuts the socket
/// down for every process holding it. With readiness, stopping is not calling accept.
pub struct Uring;

impl Driver for Uring {
    type Stream = UringStream;
    type Listener = tokio::io::unix::AsyncFd<std::net::TcpListener>;
    fn listener(std: std::net::TcpListener) -> std::io::Result<Self::Listener> {
        std.set_nonblocking(true)?;
        // SAFETY: the registration owns the listener, so its descriptor stays open for
        // as long as it is registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(std, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into())
    }
    async fn accept(listener: &Self::Listener) -> std::io::Result<(UringStream, SocketAddr)> {
        // std's accept is `accept4(SOCK_CLOEXEC)`: a blocking socket, as io_uring's accept
        // gave, which the ring's reads and writes expect.
        let (stream, peer) = listener
            .async_io(tokio::io::Interest::READABLE, |l| l.accept())
            .await?;
        Ok((
            UringStream::new(tokio_uring::net::TcpStream::from_std(stream)),
            peer,
        ))
    }
    fn spawn(task: impl std::future::Future<Output = ()> + 'static) {
        tokio_uring::spawn(task);
    }
}

/// Readiness through tokio's epoll reactor, for hosts without io_uring.
pub struct Epoll;

impl Driver for Epoll {
    type Stream = EpollStream;
    type Listener = tokio::net::TcpListener;
    fn listener(std: std::net::TcpListener) -> std::io::Result<Self::Listener> {
        tokio::net::TcpListener::from_std(std)
    }
    async fn accept(listener: &Self::Listener) -> std::io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = listener.accept().await?;
        Ok((EpollStream::new(stream), peer))
    }
    fn spawn(task: impl std::future::Future<Output = ()> + 'static) {
        tokio::task::spawn_local(task);
    }
}

pub use crate::io::uring::uring_available;
