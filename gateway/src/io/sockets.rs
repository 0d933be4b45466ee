//! Socket helpers that work on a raw descriptor beside the ring: the per-worker
//! `SO_REUSEPORT` listener, and `MSG_PEEK` probes for a peer that hung up.

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
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
