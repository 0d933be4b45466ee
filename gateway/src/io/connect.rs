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
    // Non-blocking from `socket(2)` (SOCK_NONBLOCK): no `fcntl` pair after it.
    let kind = Type::STREAM.nonblocking();
    let socket = Socket::new(Domain::for_address(addr), kind, Some(Protocol::TCP))?;
    if crate::util::budget::fd_in_reserve(socket.as_raw_fd()) {
        // The last descriptors are the admin listener's reserve: answer as the kernel
        // would have, so the caller books it as a local shortage, not a server failure.
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    socket.set_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            if connect_settled(&socket) {
                // Loopback and other near upstreams have finished the handshake by the
                // time connect() returns: one poll() instead of the reactor's register and
                // deregister (two epoll_ctl) around a wait that would not wait.
                if let Some(e) = socket.take_error()? {
                    return Err(e);
                }
                return Ok(socket.into());
            }
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

/// Whether a non-blocking connect has already completed (connected or failed): a poll()
/// that does not wait. False while the handshake is still under way.
fn connect_settled(socket: &socket2::Socket) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a descriptor `socket` keeps open; a zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
}

#[cfg(test)]
mod tests {
    use super::connect_nonblocking;
    use std::time::Duration;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_connect_that_settles_at_once_is_connected_or_refused_never_half_done() {
        // Loopback finishes the handshake inside connect(): the poll() fast path must hand
        // back a connected socket, and a refusal (RST at once) as the error it is.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conn = block_on(connect_nonblocking(addr, Duration::from_secs(5))).expect("connect");
        assert_eq!(conn.peer_addr().expect("connected"), addr);
        let (accepted, _) = listener.accept().expect("accepted");
        assert_eq!(
            accepted.peer_addr().expect("peer"),
            conn.local_addr().expect("local")
        );

        drop(listener);
        let refused = block_on(connect_nonblocking(addr, Duration::from_secs(5)))
            .expect_err("nothing listens");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
