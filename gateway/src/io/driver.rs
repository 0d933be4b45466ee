//! The two I/O drivers a worker can run on, and what a worker needs of either: how to
//! take an accepted connection and how to spawn a task.

use crate::io::{EpollStream, Stream, UringStream};

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

/// What a worker needs from its runtime: how to take an accepted connection and how to
/// spawn a task. Both drivers accept the same way: `accept4(2)` on the listener's
/// readiness ([`crate::io::sockets::accept_one`]), many per readiness event.
#[allow(async_fn_in_trait)] // Single-threaded runtimes: nothing here is Send.
pub(crate) trait Driver: 'static {
    type Stream: Stream;
    /// The `accept4(2)` flags that give a socket this driver's streams take as they are.
    const ACCEPT_FLAGS: libc::c_int;
    /// The stream of a connection just accepted with [`Driver::ACCEPT_FLAGS`].
    fn accepted(socket: std::net::TcpStream) -> std::io::Result<Self::Stream>;
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
    /// A blocking socket, as io_uring's own accept gives, which the ring's reads and
    /// writes expect.
    const ACCEPT_FLAGS: libc::c_int = libc::SOCK_CLOEXEC;
    fn accepted(socket: std::net::TcpStream) -> std::io::Result<UringStream> {
        Ok(UringStream::new(tokio_uring::net::TcpStream::from_std(
            socket,
        )))
    }
    fn spawn(task: impl std::future::Future<Output = ()> + 'static) {
        tokio_uring::spawn(task);
    }
}

/// Readiness through tokio's epoll reactor, for hosts without io_uring.
pub struct Epoll;

impl Driver for Epoll {
    type Stream = EpollStream;
    /// Non-blocking from the start, as tokio's reactor needs: no `fcntl` afterwards.
    const ACCEPT_FLAGS: libc::c_int = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    fn accepted(socket: std::net::TcpStream) -> std::io::Result<EpollStream> {
        Ok(EpollStream::new(tokio::net::TcpStream::from_std(socket)?))
    }
    fn spawn(task: impl std::future::Future<Output = ()> + 'static) {
        tokio::task::spawn_local(task);
    }
}

pub use crate::io::uring::uring_available;
