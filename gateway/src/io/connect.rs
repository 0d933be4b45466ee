//! Connecting to an upstream: one non-blocking connect under readiness with a deadline,
//! shared by both drivers so a timeout always closes the socket at once.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Non-blocking connect with a deadline, awaited through readiness (works under both the
/// uring and the epoll driver, since tokio-uring runs a tokio reactor underneath).
pub(crate) async fn connect_nonblocking(
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
