//! The byte stream `h2` runs on: tokio's `AsyncRead + AsyncWrite`, over a readiness socket
//! (`tokio::net::TcpStream`) on the worker's own thread. tokio-uring runs a tokio reactor
//! underneath, so readiness I/O works beside the io_uring operations (as `io::EpollStream`
//! and `io::connect_nonblocking` already do).
//!
//! - h2c (plaintext, prior knowledge): the `TcpStream` itself, from [`readiness_socket`].
//! - TLS: [`TlsIo`] continues the rustls session that our own handshake
//!   (`protocol::tls::accept`, over a [`Stream`]) established: [`TlsIo::from_tls`] takes the
//!   `ServerConnection` and the ciphertext read past the handshake out of the `TlsStream`,
//!   and moves the socket to readiness I/O.
//!
//! Memory a client can make `TlsIo` hold is bounded by rustls' own buffers: it reads
//! ciphertext straight into rustls (`read_tls`) only when no plaintext is waiting (rustls
//! caps received plaintext at 16 KiB and its deframer at one record), and encrypts into
//! rustls' send buffer capped by [`SEND_BUFFER_LIMIT`]; when the socket does not take it,
//! `poll_write` returns `Pending` (backpressure, so `h2`'s own send buffer stays bounded
//! too). There is no buffer of this type's own beyond the handshake's read-ahead.

use crate::io::Stream;
use crate::protocol::tls::TlsStream;
use bytes::{Buf, BytesMut};
use rustls::{ConnectionCommon, ServerConnection, SideData};
use std::io::{self, Read, Write};
use std::ops::DerefMut;
use std::os::fd::FromRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Encrypted bytes rustls may hold before `poll_write` waits for the socket: a few
/// records, enough for one `h2` write of a full DATA frame (16 KiB) plus framing.
pub(crate) const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// A TLS session over a readiness socket, as tokio `AsyncRead + AsyncWrite`. `C` is the
/// rustls connection: `ServerConnection` in the gateway, `ClientConnection` in tests.
pub struct TlsIo<C> {
    sock: TcpStream,
    conn: C,
    /// Ciphertext the handshake read past its last record (often the client's HTTP/2
    /// preface): fed to rustls before anything is read from the socket.
    read_ahead: BytesMut,
    /// close_notify was queued.
    closing: bool,
}

impl TlsIo<ServerConnection> {
    /// Continues the session of a finished handshake over a readiness socket.
    pub fn from_tls<S: Stream>(tls: TlsStream<S>) -> io::Result<Self> {
        let (inner, conn, read_ahead) = tls.into_parts();
        Ok(TlsIo::new(readiness_socket(inner)?, conn, read_ahead))
    }

    /// The ALPN protocol the handshake chose (`b"h2"` for HTTP/2).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }
}

/// Moves a connected [`Stream`] to readiness I/O: a duplicate of its descriptor
/// (close-on-exec), registered with the thread's tokio reactor. The `Stream` is dropped;
/// it must have no operation in flight (it would shut the socket down). Costs one
/// `fcntl` per connection; an `into_std` on `UringStream` would save it.
pub fn readiness_socket<S: Stream>(stream: S) -> io::Result<TcpStream> {
    // SAFETY: fcntl on a descriptor `stream` owns; the duplicate is owned by the returned
    // socket alone.
    let fd = unsafe { libc::fcntl(stream.raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor of a connected TCP socket, owned by nobody else.
    let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    drop(stream);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

impl<C, D> TlsIo<C>
where
    C: DerefMut<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    /// `conn` has finished (or will do, for a client) its handshake; `read_ahead` is
    /// ciphertext already read from `sock` and not yet given to rustls.
    pub fn new(sock: TcpStream, mut conn: C, read_ahead: BytesMut) -> Self {
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        TlsIo {
            sock,
            conn,
            read_ahead,
            closing: false,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.sock
    }

    /// Writes what rustls has queued until it has nothing left or the socket is full.
    fn poll_write_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            let mut sock = SyncIo {
                sock: &mut self.sock,
                cx,
            };
            match self.conn.write_tls(&mut sock) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Gives rustls more ciphertext (the read-ahead first, then the socket) and decrypts it.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.read_ahead.is_empty() {
            let mut sock = SyncIo {
                sock: &mut self.sock,
                cx,
            };
            // `Ok(0)` is EOF; rustls records it, and its reader then says how it ended.
            match self.conn.read_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        } else {
            let n = self.conn.read_tls(&mut &self.read_ahead[..])?;
            self.read_ahead.advance(n);
        }
        if let Err(e) = self.conn.process_new_packets() {
            // Send the alert rustls queued to say why, if the socket takes it now.
            let _ = self.poll_write_tls(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<C, D> AsyncRead for TlsIo<C>
where
    C: DerefMut<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Plaintext first: ciphertext is read only when rustls holds none, which is
            // what keeps its plaintext buffer bounded.
            match this.conn.reader().read(buf.initialize_unfilled()) {
                // 0 with room in `buf`: close_notify, a clean end of the stream.
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // UnexpectedEof: the socket closed without close_notify (a truncation).
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.conn.wants_write() {
                // A KeyUpdate answer or an alert; a full socket is retried by writes.
                if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            ready!(this.poll_read_tls(cx))?;
        }
    }
}

impl<C, D> AsyncWrite for TlsIo<C>
where
    C: DerefMut<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            // rustls takes no more than its buffer limit allows.
            let n = this.conn.writer().write(data)?;
            if n > 0 || data.is_empty() {
                // Start sending now; what the socket does not take goes on flush.
                if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(n));
            }
            ready!(this.poll_write_tls(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.writer().flush()?;
        ready!(this.poll_write_tls(cx))?;
        Pin::new(&mut this.sock).poll_flush(cx)
    }

    /// Sends close_notify (once), then FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            this.conn.send_close_notify();
        }
        ready!(this.poll_write_tls(cx))?;
        Pin::new(&mut this.sock).poll_shutdown(cx)
    }
}

/// The socket as the blocking `Read`/`Write` rustls' `read_tls`/`write_tls` take:
/// `WouldBlock` where the socket is not ready, with the task's waker registered.
struct SyncIo<'a, 'b> {
    sock: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SyncIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.sock).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for SyncIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.sock).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// rustls hands over its queued records as one vector: one `writev` for them all.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.sock).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
