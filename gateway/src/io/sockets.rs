//! Socket helpers that work on a raw descriptor beside the ring: the per-worker
//! `SO_REUSEPORT` listener and the `accept4(2)` both drivers take connections with, and
//! `MSG_PEEK` probes for a peer that hung up.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use super::Stream;

/// Whether an idle connection is still usable: no EOF and no unexpected bytes waiting.
/// One non-blocking `recv(MSG_PEEK)`; used before reusing a pooled upstream connection,
/// because the upstream may have closed it while it sat idle.
pub(crate) fn idle_connection_alive(fd: RawFd) -> bool {
    matches!(peek_one(fd), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// One non-blocking `recv(MSG_PEEK)` of a byte: `Ok(0)` is EOF, and the byte stays queued.
pub(crate) fn peek_one(fd: RawFd) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: recv into a valid one-byte buffer on a descriptor we own; MSG_PEEK leaves
    // the data queued.
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
        Ok(n as usize)
    }
}

/// Makes the socket's close send RST and drop what is still queued to send
/// (`SO_LINGER` 0), for a client cut off because it stopped reading: a plain close would
/// leave up to a send buffer (megabytes, autotuned) in the kernel for as long as the
/// client keeps its window shut, an orphan per connection an attacker can repeat (nginx's
/// `reset_timedout_connection`). Best effort: a failure leaves the plain close.
pub(crate) fn reset_on_close(fd: RawFd) {
    // SAFETY: the caller holds the descriptor open for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// A descriptor registered with the reactor without taking ownership of it.
pub(crate) struct WatchedFd(pub(crate) RawFd);

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
        .ready_io(tokio::io::Interest::READABLE, peek_one)
        .await;
    match peeked {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Binds one listener socket for this worker: `SO_REUSEPORT` so every worker has its own
/// accept queue and the kernel spreads connections among them.
pub(crate) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A listening socket registered with the worker's reactor: the accept loop waits for its
/// readiness, then takes connections with [`accept_one`] until `WouldBlock`.
pub(crate) type Listening = tokio::io::unix::AsyncFd<std::net::TcpListener>;

/// Readies a listening socket (bound here, or inherited from the process a binary upgrade
/// took over from) for the accept loop: non-blocking, `TCP_NODELAY`, registered with the
/// reactor. `TCP_NODELAY` is set on the listener because Linux copies a listener's TCP
/// options into every connection accepted from it (the child socket is cloned from the
/// listener, `sk_clone_lock`), so an accepted connection needs no `setsockopt` of its own:
/// one syscall per connection saved. Set here, not at bind, so that an inherited socket
/// gets it too.
pub(crate) fn listening(listener: std::net::TcpListener) -> io::Result<Listening> {
    listener.set_nonblocking(true)?;
    socket2::SockRef::from(&listener).set_nodelay(true)?;
    // SAFETY: the registration owns the listener, so its descriptor stays open for as
    // long as it is registered.
    unsafe { Listening::register_with_interest(listener, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// One `accept4(2)` on `listener` with `flags` (`SOCK_CLOEXEC`, and `SOCK_NONBLOCK` for a
/// driver whose streams need it): the connection and its peer's address, in the one
/// syscall. `WouldBlock` when the accept queue is empty.
pub(crate) fn accept_one(
    listener: &std::net::TcpListener,
    flags: libc::c_int,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use std::os::fd::FromRawFd;
    let fd = listener.as_raw_fd();
    // SAFETY: `try_init` hands a zeroed `sockaddr_storage` and its length, which accept4
    // fills in and never past the length it is given.
    let (raw, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            match libc::accept4(fd, storage.cast(), len, flags) {
                -1 => Err(io::Error::last_os_error()),
                raw => Ok(raw),
            }
        })
    }?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(raw) };
    let peer = addr.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP connection")
    })?;
    Ok((stream, peer))
}

/// Whether an `accept4(2)` error concerns only the connection it was taking, which the
/// peer gave up on or the network lost between its handshake and the accept: the next
/// connection in the queue can be taken at once. Linux passes these network errors of the
/// new socket up through accept, and accept(2) says to retry them like `EAGAIN`.
pub(crate) fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EPERM
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodelay(fd: RawFd) -> bool {
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int of the length given, on a descriptor we hold.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut on as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        on != 0
    }

    /// What lets an accepted connection skip its own `setsockopt`: the kernel copies
    /// `TCP_NODELAY` from the listener, and `accept_one` gives the peer's address and the
    /// flags asked for.
    #[test]
    fn accepted_connections_inherit_nodelay_and_the_accept_flags() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = listening(bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap())
                .expect("a listening socket");
            let addr = listener.get_ref().local_addr().unwrap();
            let empty = accept_one(listener.get_ref(), libc::SOCK_CLOEXEC);
            assert_eq!(
                empty.map(|_| ()).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            let client = std::net::TcpStream::connect(addr).unwrap();
            let mut ready = listener.readable().await.unwrap();
            let (socket, peer) = ready
                .try_io(|l| accept_one(l.get_ref(), libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK))
                .expect("the listener was readable")
                .expect("a connection");
            assert_eq!(peer, client.local_addr().unwrap());
            assert!(nodelay(socket.as_raw_fd()), "TCP_NODELAY from the listener");
            // SAFETY: fcntl F_GETFL/F_GETFD on a descriptor we hold.
            let (status, fd_flags) = unsafe {
                (
                    libc::fcntl(socket.as_raw_fd(), libc::F_GETFL),
                    libc::fcntl(socket.as_raw_fd(), libc::F_GETFD),
                )
            };
            assert_ne!(status & libc::O_NONBLOCK, 0, "SOCK_NONBLOCK");
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "SOCK_CLOEXEC");
        });
    }
}
