//! [`TlsStream`]: a server-side TLS connection over any [`Stream`], itself a [`Stream`], so
//! the proxy and tunnels run over it unchanged; and [`accept`], the handshake in front of it.
//!
//! rustls' buffered API does the protocol work synchronously in memory; this type only moves
//! ciphertext between rustls and the socket through owned buffers:
//!
//! - **in**: the socket is read into `incoming` (an owned `BytesMut`, so the kernel can fill
//!   it while the future is parked), fed to rustls with `read_tls`, decrypted by
//!   `process_new_packets`, and the plaintext copied into the caller's buffer;
//! - **out**: plaintext goes into rustls with `writer().write`, rustls encrypts it, and the
//!   records are taken out into `outgoing` (an owned `Vec`) and written by the inner stream.
//!
//! Methods take `&self`, and a tunnel reads and writes one stream from two futures at once.
//! That works because the rustls state sits in a `RefCell` borrowed only between awaits, the
//! two directions have separate ciphertext buffers, and inner writes are serialised by an
//! async lock (records must reach the socket in the order rustls made them). A read that
//! makes rustls want to send something (an alert, a KeyUpdate answer) writes it itself when
//! no write is running, else leaves it to the running write, which flushes until rustls has
//! nothing left. Two writes at once are serialised by the lock; two reads at once are not
//! supported (they would race for `incoming`; nothing in the proxy does that).

use super::{TlsAcceptor, TlsError};
use crate::io::Stream;
use bytes::{Buf, BytesMut};
use rustls::server::ServerConnection;
use rustls::{HandshakeKind, ProtocolVersion};
use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};
use tokio_uring::buf::BoundedBuf;

/// How much ciphertext one socket read asks for: two full TLS records (16 KiB of plaintext
/// plus at most 256 bytes of overhead each, RFC 8446 §5.2), so bulk transfers cost about one
/// read per 32 KiB, like the plaintext path's large reads.
const READ_CHUNK: usize = 32 * 1024 + 512;

/// Encrypted bytes rustls may hold before `write_all` must flush: one body buffer
/// (`worker::BODY_BUF_SIZE`) plus record overhead, so relaying a 64 KiB buffer costs one
/// socket write.
const WRITE_BUFFER_LIMIT: usize = 64 * 1024 + 4 * 1024;

/// The outgoing buffer is kept between writes up to this size; a larger one (after a big
/// write) is freed so idle keep-alive connections do not hold it.
const OUTGOING_KEEP: usize = 80 * 1024;

/// What a finished handshake was, for metrics and logs.
#[derive(Debug, Clone)]
pub struct HandshakeInfo {
    /// An abbreviated handshake on a resumed session (ticket or session ID).
    pub resumed: bool,
    /// `"TLSv1.3"` or `"TLSv1.2"`, as nginx's `$ssl_protocol` names them.
    pub version: &'static str,
    /// From the call to [`accept`] to its return, including the wait for the ClientHello.
    pub duration: Duration,
    /// The server name the client asked for (SNI), lower-case.
    pub sni: Option<Box<str>>,
}

impl HandshakeInfo {
    /// The `result` label of `gateway_tls_handshakes_total`: `"full"` or `"resumed"`.
    pub fn metric_label(&self) -> &'static str {
        if self.resumed {
            "resumed"
        } else {
            "full"
        }
    }
}

/// A TLS connection a client opened to one of our listeners.
pub struct TlsStream<S: Stream> {
    inner: S,
    conn: RefCell<ServerConnection>,
    /// Ciphertext read from the socket and not yet taken by rustls. Empty (taken) while an
    /// inner read owns it.
    incoming: Cell<BytesMut>,
    /// Records on their way to the socket; taken while an inner write owns it.
    outgoing: Cell<Vec<u8>>,
    /// Held by whoever is writing to the socket.
    write_lock: tokio::sync::Mutex<()>,
    /// The socket said EOF.
    eof: Cell<bool>,
    /// close_notify went out, or the socket was aborted: nothing more to send on drop.
    closed: Cell<bool>,
    info: HandshakeInfo,
}

/// Performs the server side of a TLS handshake on `inner` within `timeout` (the listener's
/// `header_timeout`). On failure the socket has been shut down; the caller just drops the
/// connection (and counts [`TlsError::metric_label`]).
pub async fn accept<S: Stream>(
    acceptor: &TlsAcceptor,
    inner: S,
    timeout: Duration,
) -> Result<TlsStream<S>, TlsError> {
    accept_with_prefix(acceptor, inner, BytesMut::new(), timeout).await
}

/// [`accept`] on a socket from which `read_ahead` was already read: the bytes that came
/// behind a PROXY protocol header (which precedes the ClientHello in plaintext) in the same
/// read. They are the start of the TLS stream.
pub async fn accept_with_prefix<S: Stream>(
    acceptor: &TlsAcceptor,
    inner: S,
    read_ahead: BytesMut,
    timeout: Duration,
) -> Result<TlsStream<S>, TlsError> {
    let started = Instant::now();
    // Started for a resumption (the hot reconnect path); a ClientHello that offers no
    // ticket switches it to the full handshake's configuration (`await_client_hello`).
    let conn =
        ServerConnection::new(acceptor.server_config(true).clone()).map_err(TlsError::Protocol)?;
    let mut stream = TlsStream {
        inner,
        conn: RefCell::new(conn),
        incoming: Cell::new(read_ahead),
        outgoing: Cell::new(Vec::new()),
        write_lock: tokio::sync::Mutex::new(()),
        eof: Cell::new(false),
        closed: Cell::new(false),
        info: HandshakeInfo {
            resumed: false,
            version: "",
            duration: Duration::ZERO,
            sni: None,
        },
    };
    stream
        .conn
        .get_mut()
        .set_buffer_limit(Some(WRITE_BUFFER_LIMIT));
    // The whole handshake under one deadline. A timeout drops the handshake future with a
    // socket read in flight; `abort` shuts the socket so that read completes (crate::io).
    let handshake = async {
        stream.await_client_hello(acceptor).await?;
        stream.drive_handshake().await
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            stream.abort();
            return Err(e);
        }
        Err(_) => {
            stream.abort();
            return Err(TlsError::Timeout);
        }
    }
    let conn = stream.conn.get_mut();
    stream.info = HandshakeInfo {
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        version: match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            _ => "TLSv1.2",
        },
        duration: started.elapsed(),
        sni: conn.server_name().map(Into::into),
    };
    Ok(stream)
}

/// Whether the first TLS record in `bytes` is a ClientHello with a `pre_shared_key`
/// extension (RFC 8446 §4.2.11: a ticket offered for resumption); `None` while that record
/// is incomplete. Only a hint for how many tickets to send: rustls parses and checks the
/// hello itself, so anything unexpected here (not a handshake record, a hello split over
/// records, a malformed one) answers `false`, the full handshake's configuration.
fn hello_offers_ticket(bytes: &[u8]) -> Option<bool> {
    /// TLSPlaintext.type handshake, RFC 8446 §5.1.
    const HANDSHAKE_RECORD: u8 = 22;
    /// The largest plaintext record, RFC 8446 §5.1.
    const MAX_RECORD: usize = 1 << 14;

    let header = bytes.get(..5)?;
    let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if header[0] != HANDSHAKE_RECORD || record_len > MAX_RECORD {
        return Some(false);
    }
    let record = bytes.get(5..5 + record_len)?;
    Some(parse_hello_for_ticket(record).unwrap_or(false))
}

/// [`hello_offers_ticket`]'s walk over a complete record (RFC 8446 §4.1.2 layout); `None`
/// where it does not parse.
fn parse_hello_for_ticket(record: &[u8]) -> Option<bool> {
    /// HandshakeType client_hello, RFC 8446 §4.
    const CLIENT_HELLO: u8 = 1;
    /// ExtensionType pre_shared_key, RFC 8446 §4.2.
    const PRE_SHARED_KEY: usize = 41;

    /// Takes `n` bytes off the front of `rest`.
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        *rest = tail;
        Some(head)
    }
    fn u16_at(rest: &mut &[u8]) -> Option<usize> {
        take(rest, 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    let mut rest = record;
    let header = take(&mut rest, 4)?;
    if header[0] != CLIENT_HELLO {
        return Some(false);
    }
    take(&mut rest, 2 + 32)?; // legacy_version, random
    let session_id_len = usize::from(take(&mut rest, 1)?[0]);
    take(&mut rest, session_id_len)?;
    let suites_len = u16_at(&mut rest)?;
    take(&mut rest, suites_len)?;
    let compression_len = usize::from(take(&mut rest, 1)?[0]);
    take(&mut rest, compression_len)?;
    let extensions_len = u16_at(&mut rest)?;
    let mut extensions = take(&mut rest, extensions_len)?;
    while !extensions.is_empty() {
        let kind = u16_at(&mut extensions)?;
        let len = u16_at(&mut extensions)?;
        take(&mut extensions, len)?;
        if kind == PRE_SHARED_KEY {
            return Some(true);
        }
    }
    Some(false)
}

/// What one synchronous pass over rustls found for a reader.
enum ReadStep {
    /// This many plaintext bytes were appended to the caller's buffer.
    Data(usize),
    /// The peer closed (close_notify, or EOF on the socket).
    Eof,
    /// More ciphertext is needed from the socket.
    NeedInput,
    Failed(rustls::Error),
}

impl<S: Stream> TlsStream<S> {
    /// How the handshake went.
    pub fn handshake(&self) -> &HandshakeInfo {
        &self.info
    }

    /// The server name the client asked for (SNI), lower-case.
    pub fn sni(&self) -> Option<&str> {
        self.info.sni.as_deref()
    }

    /// The socket under the TLS layer.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Reads until `incoming` holds the first record, and starts the handshake over with
    /// the full handshake's configuration unless that record is a ClientHello offering a
    /// ticket ([`hello_offers_ticket`]). The only difference is how many TLS 1.3 tickets go
    /// out at the end ([`super::TICKETS_WHEN_RESUMING`]); rustls has taken no input yet.
    async fn await_client_hello(&self, acceptor: &TlsAcceptor) -> Result<(), TlsError> {
        let offers_ticket = loop {
            if let Some(offers) = self.peek_incoming(|b| hello_offers_ticket(b)) {
                break offers;
            }
            if self.fill_incoming().await.map_err(TlsError::Io)? == 0 {
                return Err(TlsError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection",
                )));
            }
        };
        if !offers_ticket {
            let mut conn = ServerConnection::new(acceptor.server_config(false).clone())
                .map_err(TlsError::Protocol)?;
            conn.set_buffer_limit(Some(WRITE_BUFFER_LIMIT));
            *self.conn.borrow_mut() = conn;
        }
        Ok(())
    }

    /// Drives the handshake until it is complete and every flight rustls made is on the
    /// socket, TLS 1.3 session tickets included, unless the client's first request came in
    /// with its Finished: then the tickets go out in front of the response, in the same
    /// socket write (RFC 8446 §4.6.1 lets them come any time after the handshake).
    ///
    /// Sending nothing after a Finished the request did not follow would hold clients that
    /// leave Nagle on (Python's `http.client`, many others): their request waits for the
    /// ACK of their Finished, and a server that sends nothing leaves that ACK to the
    /// delayed-ACK timer, 40 ms on Linux, on every new connection. nginx sends its tickets
    /// at once.
    async fn drive_handshake(&self) -> Result<(), TlsError> {
        loop {
            let processed = {
                let mut conn = self.conn.borrow_mut();
                self.process(&mut conn)
                    .map(|state| (conn.is_handshaking(), state.plaintext_bytes_to_read() > 0))
            };
            if let Ok((false, request_in)) = processed {
                let more_input = self.peek_incoming(|b| !b.is_empty());
                if (request_in || more_input)
                    && self.conn.borrow().protocol_version() == Some(ProtocolVersion::TLSv1_3)
                {
                    return Ok(());
                }
            }
            let processed = processed.map(|(handshaking, _)| handshaking);
            // Send what rustls queued: the next flight, or the alert explaining a failure.
            let flushed = {
                let _guard = self.write_lock.lock().await;
                self.flush_locked().await
            };
            match processed {
                Err(e) => return Err(TlsError::Protocol(e)),
                Ok(false) => return flushed.map_err(TlsError::Io),
                Ok(true) => flushed.map_err(TlsError::Io)?,
            }
            if self.fill_incoming().await.map_err(TlsError::Io)? == 0 {
                return Err(TlsError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection",
                )));
            }
        }
    }

    /// Feeds buffered ciphertext to rustls and decrypts it. Stops feeding once plaintext is
    /// waiting, so rustls' plaintext buffer stays bounded by one `read_tls` worth of records;
    /// the rest of the ciphertext waits in `incoming` for the next read.
    fn process(&self, conn: &mut ServerConnection) -> Result<rustls::IoState, rustls::Error> {
        let mut incoming = self.incoming.take();
        let result = loop {
            let state = match conn.process_new_packets() {
                Ok(state) => state,
                Err(e) => break Err(e),
            };
            if incoming.is_empty() || state.plaintext_bytes_to_read() > 0 {
                break Ok(state);
            }
            // Never hand rustls an empty slice here: `read_tls` returning 0 means EOF to it.
            match conn.read_tls(&mut &incoming[..]) {
                Ok(0) => break Ok(state),
                Ok(n) => incoming.advance(n),
                // rustls refuses input it cannot buffer ("message buffer full": a handshake
                // message declaring more than it accepts). That input will never be taken,
                // so the connection is over: reading on would only pile ciphertext up.
                Err(e) => {
                    crate::util::budget::over_budget(crate::util::budget::Buffer::TlsInput, None);
                    break Err(rustls::Error::General(format!("TLS input refused: {e}")));
                }
            }
        };
        self.incoming.set(incoming);
        result
    }

    /// `f` of the ciphertext read and not yet given to rustls (`incoming` is a `Cell`,
    /// taken out for the look and put back).
    fn peek_incoming<R>(&self, f: impl FnOnce(&BytesMut) -> R) -> R {
        let incoming = self.incoming.take();
        let out = f(&incoming);
        self.incoming.set(incoming);
        out
    }

    /// Reads more ciphertext from the socket into `incoming`; returns the count (0: EOF,
    /// which is also passed on to rustls).
    async fn fill_incoming(&self) -> io::Result<usize> {
        let mut incoming = self.incoming.take();
        if incoming.is_empty() {
            incoming.clear();
        }
        if incoming.len() >= crate::util::budget::TLS_INPUT_MAX {
            // rustls takes whole records as they come; this much untaken ciphertext means
            // it stopped taking any. Close rather than grow (the memory budget).
            self.incoming.set(incoming);
            crate::util::budget::over_budget(crate::util::budget::Buffer::TlsInput, None);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS input over its budget",
            ));
        }
        if incoming.capacity() - incoming.len() < READ_CHUNK / 2 {
            // Reclaims the space consumed at the front when it can, instead of growing.
            incoming.reserve(READ_CHUNK);
        }
        let (res, incoming) = self.inner.read(incoming).await;
        self.incoming.set(incoming);
        let n = res?;
        if n == 0 {
            self.eof.set(true);
            let _ = self.conn.borrow_mut().read_tls(&mut io::empty());
        }
        Ok(n)
    }

    /// Writes every record rustls has queued. The caller holds `write_lock`.
    async fn flush_locked(&self) -> io::Result<()> {
        loop {
            let mut out = self.outgoing.take();
            {
                let mut conn = self.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                self.outgoing.set(out);
                return Ok(());
            }
            let (res, mut out) = self.inner.write_all(out).await;
            out.clear();
            if out.capacity() <= OUTGOING_KEEP {
                self.outgoing.set(out);
            }
            res?;
        }
    }

    /// Sends what a read made rustls queue, unless a write is running (it will send it).
    async fn flush_from_reader(&self) {
        if let Ok(_guard) = self.write_lock.try_lock() {
            // A failure here shows up again on the next read or write.
            let _ = self.flush_locked().await;
        }
    }

    /// One synchronous pass for a reader: decrypt, and copy plaintext into `buf`'s spare
    /// capacity.
    fn read_step(&self, buf: &mut BytesMut) -> (ReadStep, bool) {
        let mut conn = self.conn.borrow_mut();
        let step = match self.process(&mut conn) {
            Err(e) => ReadStep::Failed(e),
            Ok(state) if state.plaintext_bytes_to_read() > 0 => {
                let want = state
                    .plaintext_bytes_to_read()
                    .min(buf.capacity() - buf.len());
                let start = buf.len();
                // rustls' reader wants initialised memory; zeroing `want` bytes is cheap next
                // to decrypting them.
                buf.resize(start + want, 0);
                let got = conn.reader().read(&mut buf[start..]).unwrap_or(0);
                buf.truncate(start + got);
                ReadStep::Data(got)
            }
            // Peer EOF without close_notify counts as EOF too, as in nginx: HTTP framing (and
            // the WebSocket close handshake) already tell a truncated message from a finished
            // one, and many clients close without close_notify.
            Ok(state) if state.peer_has_closed() || self.eof.get() => ReadStep::Eof,
            Ok(_) => ReadStep::NeedInput,
        };
        (step, conn.wants_write())
    }
}

impl<S: Stream> Stream for TlsStream<S> {
    /// Ciphertext on the socket: never spliced.
    fn spliceable(&self) -> bool {
        false
    }

    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        loop {
            let (step, wants_write) = self.read_step(&mut buf);
            if wants_write {
                self.flush_from_reader().await;
            }
            match step {
                ReadStep::Data(n) => return (Ok(n), buf),
                ReadStep::Eof => return (Ok(0), buf),
                ReadStep::Failed(e) => {
                    return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf)
                }
                ReadStep::NeedInput => {}
            }
            if let Err(e) = self.fill_incoming().await {
                return (Err(e), buf);
            }
        }
    }

    /// Idle between requests: plaintext rustls already decrypted, or ciphertext not yet
    /// handed to it, is readable now. Otherwise the ciphertext buffer (up to
    /// [`READ_CHUNK`]) is given back to the allocator before waiting on the socket, so an
    /// idle TLS connection keeps only rustls' own state; the next read takes a new one.
    /// (rustls shrinks its record buffer to 4 KiB by itself once it holds no record.)
    async fn wait_readable(&self) -> io::Result<()> {
        let incoming = self.incoming.take();
        if !incoming.is_empty() || !self.conn.borrow().wants_read() {
            self.incoming.set(incoming);
            return Ok(());
        }
        drop(incoming);
        self.inner.wait_readable().await
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        // SAFETY: a `BoundedBuf` points at `bytes_init()` initialised bytes that stay put
        // while the buffer is alive (the contract io_uring relies on), and `buf` is held
        // unmoved-in-memory and unmodified until this function returns it.
        let data = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
        let _guard = self.write_lock.lock().await;
        let mut sent = 0;
        while sent < data.len() {
            // rustls takes as much as its buffer limit allows and encrypts it.
            let taken = self.conn.borrow_mut().writer().write(&data[sent..]);
            match taken {
                Ok(n) => sent += n,
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.flush_locked().await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Not supported: TLS here is only terminated, upstream connections are plaintext. Use
    /// [`MaybeTls`] where one stream type must serve both sides.
    async fn connect(_addr: SocketAddr, _timeout: Duration) -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TLS to upstreams is not supported",
        ))
    }

    /// Sends close_notify, then FIN. The alert is a few dozen bytes written with a
    /// non-blocking `send` (this method is synchronous): after a completed `write_all` the
    /// socket buffer has room for it, and if it does not, the FIN alone still ends the stream.
    /// Readiness of the socket, whose bytes are ciphertext: good for hang-up detection
    /// ([`crate::io::peer_closed`]), never for splicing.
    async fn ready_io<R>(
        &self,
        interest: tokio::io::Interest,
        f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        self.inner.ready_io(interest, f).await
    }

    fn shutdown_write(&self) {
        self.send_close_notify();
        self.inner.shutdown_write();
    }

    fn abort(&self) {
        self.closed.set(true);
        self.inner.abort();
    }

    /// The socket's descriptor: for readiness (hang-up detection) only. Bytes on it are
    /// ciphertext, so it must never be spliced.
    fn raw_fd(&self) -> RawFd {
        self.inner.raw_fd()
    }
}

impl<S: Stream> TlsStream<S> {
    /// Queues close_notify and pushes it out with one non-blocking `send`, once, and only
    /// when no write is running (its records must not be interleaved with ours).
    fn send_close_notify(&self) {
        if self.closed.replace(true) {
            return;
        }
        let Ok(_guard) = self.write_lock.try_lock() else {
            return;
        };
        let mut out = Vec::new();
        {
            let mut conn = self.conn.borrow_mut();
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        if !out.is_empty() {
            // SAFETY: send from a live buffer on a descriptor the inner stream owns.
            unsafe {
                libc::send(
                    self.inner.raw_fd(),
                    out.as_ptr().cast(),
                    out.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
}

impl<S: Stream> Drop for TlsStream<S> {
    /// A connection the proxy closes (keep-alive over, `Connection: close`, drain) ends with
    /// close_notify, as nginx's `SSL_shutdown` does: without it OpenSSL 3 clients report
    /// "unexpected EOF" for a response delimited by the close.
    fn drop(&mut self) {
        self.send_close_notify();
    }
}

/// The hand-over of a finished session to a readiness-driven adapter (HTTP/2 runs `h2`
/// over `protocol::h2::io::TlsIo`). Kept apart: the rest of this type never gives its parts up.
impl<S: Stream> TlsStream<S> {
    /// The socket, the rustls session, and the ciphertext read from the socket and not yet
    /// given to rustls (it must be, before anything read next). Nothing is sent: the
    /// session goes on elsewhere, so no close_notify. Call with no operation in flight
    /// (after [`accept`] returned, nothing is).
    /// The handshake chose HTTP/2 (ALPN `h2`).
    pub(crate) fn alpn_is_h2(&self) -> bool {
        self.conn.borrow().alpn_protocol() == Some(b"h2")
    }

    pub fn into_parts(self) -> (S, ServerConnection, BytesMut) {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so each field is moved out or
        // dropped in place exactly once.
        unsafe {
            let inner = std::ptr::read(&this.inner);
            let conn = std::ptr::read(&this.conn).into_inner();
            let incoming = std::ptr::read(&this.incoming).into_inner();
            std::ptr::drop_in_place(&mut this.outgoing);
            std::ptr::drop_in_place(&mut this.write_lock);
            std::ptr::drop_in_place(&mut this.info);
            (inner, conn, incoming)
        }
    }
}

/// A client connection that is either plaintext or TLS: one stream type for listeners of
/// both kinds, so code generic over one `S: Stream` serves both. Upstream connections made
/// with [`Stream::connect`] are always `Plain`.
pub(crate) enum MaybeTls<S: Stream> {
    Plain(S),
    /// Boxed: rustls' connection state is over a kilobyte, and plaintext connections (all
    /// upstream ones among them) should not pay for it.
    Tls(Box<TlsStream<S>>),
}

impl<S: Stream> MaybeTls<S> {
    /// Whether bytes on [`Stream::raw_fd`] are the payload itself, so the socket can be
    /// spliced. False for TLS, where they are ciphertext.
    pub(crate) fn is_plain(&self) -> bool {
        matches!(self, MaybeTls::Plain(_))
    }
}

impl<S: Stream> Stream for MaybeTls<S> {
    fn spliceable(&self) -> bool {
        self.is_plain()
    }

    /// Plaintext only: a TLS session's state is not a socket.
    fn parkable(&self) -> bool {
        matches!(self, MaybeTls::Plain(s) if s.parkable())
    }

    fn park(self) -> Result<crate::io::ParkedSocket, Option<Self>> {
        match self {
            MaybeTls::Plain(s) => s.park().map_err(|kept| kept.map(MaybeTls::Plain)),
            tls => Err(Some(tls)),
        }
    }

    fn unpark(socket: crate::io::ParkedSocket) -> io::Result<Self> {
        S::unpark(socket).map(MaybeTls::Plain)
    }

    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        match self {
            MaybeTls::Plain(s) => s.read(buf).await,
            MaybeTls::Tls(s) => s.read(buf).await,
        }
    }

    async fn wait_readable(&self) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.wait_readable().await,
            MaybeTls::Tls(s) => s.wait_readable().await,
        }
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        match self {
            MaybeTls::Plain(s) => s.write_all(buf).await,
            MaybeTls::Tls(s) => s.write_all(buf).await,
        }
    }

    async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        S::connect(addr, timeout).await.map(MaybeTls::Plain)
    }

    async fn ready_io<R>(
        &self,
        interest: tokio::io::Interest,
        f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            MaybeTls::Plain(s) => s.ready_io(interest, f).await,
            MaybeTls::Tls(s) => s.ready_io(interest, f).await,
        }
    }

    fn shutdown_write(&self) {
        match self {
            MaybeTls::Plain(s) => s.shutdown_write(),
            MaybeTls::Tls(s) => s.shutdown_write(),
        }
    }

    fn abort(&self) {
        match self {
            MaybeTls::Plain(s) => s.abort(),
            MaybeTls::Tls(s) => s.abort(),
        }
    }

    /// A plain connection (every upstream connection) answers from its driver; TLS asks
    /// the socket.
    fn idle_alive(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.idle_alive(),
            MaybeTls::Tls(_) => crate::io::idle_connection_alive(self.raw_fd()),
        }
    }

    fn park_idle(&self) {
        if let MaybeTls::Plain(s) = self {
            s.park_idle();
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            MaybeTls::Plain(s) => s.raw_fd(),
            MaybeTls::Tls(s) => s.raw_fd(),
        }
    }

    async fn yield_to_driver() {
        S::yield_to_driver().await
    }
}

#[cfg(test)]
mod tests {
    use super::hello_offers_ticket;

    /// A TLS record holding a ClientHello (RFC 8446 §4.1.2) with `extensions` (type, body).
    fn client_hello_record(extensions: &[(u16, &[u8])]) -> Vec<u8> {
        let mut exts = Vec::new();
        for (kind, body) in extensions {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&(body.len() as u16).to_be_bytes());
            exts.extend_from_slice(body);
        }
        let mut hello = vec![3, 3];
        hello.extend_from_slice(&[7; 32]); // random
        hello.push(32);
        hello.extend_from_slice(&[9; 32]); // legacy_session_id
        hello.extend_from_slice(&[0, 2, 0x13, 0x01]); // cipher_suites
        hello.extend_from_slice(&[1, 0]); // legacy_compression_methods
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(&exts);
        let mut message = vec![1];
        message.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&hello);
        let mut record = vec![22, 3, 1];
        record.extend_from_slice(&(message.len() as u16).to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    #[test]
    fn a_hello_offering_a_ticket_is_recognised() {
        // server_name, supported_versions, then pre_shared_key last (RFC 8446 §4.2.11).
        let record = client_hello_record(&[(0, b"\0\0"), (43, b"\x02\x03\x04"), (41, &[5; 40])]);
        assert_eq!(hello_offers_ticket(&record), Some(true));
        // Bytes after the record (the rest of the flight) change nothing.
        let mut more = record.clone();
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(hello_offers_ticket(&more), Some(true));
    }

    #[test]
    fn a_hello_without_a_ticket_is_a_full_handshake() {
        let record = client_hello_record(&[(0, b"\0\0"), (43, b"\x02\x03\x04")]);
        assert_eq!(hello_offers_ticket(&record), Some(false));
        assert_eq!(hello_offers_ticket(&client_hello_record(&[])), Some(false));
    }

    #[test]
    fn an_incomplete_record_waits_for_more() {
        let record = client_hello_record(&[(41, &[5; 40])]);
        for cut in [0, 1, 4, 5, 50, record.len() - 1] {
            assert_eq!(hello_offers_ticket(&record[..cut]), None, "cut at {cut}");
        }
    }

    /// Whatever is not a well-formed hello in one record is left to rustls to refuse, with
    /// the full handshake's configuration: never a wait for bytes that may not come.
    #[test]
    fn anything_else_is_decided_at_once() {
        // Not a handshake record (an HTTP request on the TLS port), an oversized record.
        assert_eq!(hello_offers_ticket(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(hello_offers_ticket(&[22, 3, 1, 0x48, 0x01]), Some(false));
        // A handshake message that is not a ClientHello.
        let mut record = client_hello_record(&[(41, &[5; 40])]);
        record[5] = 2;
        assert_eq!(hello_offers_ticket(&record), Some(false));
        // An extension whose length runs past the record: malformed.
        let mut record = client_hello_record(&[(0, b"\0\0"), (41, &[5; 40])]);
        let n = record.len();
        record[n - 41] = 0xff;
        assert_eq!(hello_offers_ticket(&record), Some(false));
        // A hello longer than its record (split over two records): the part in the first
        // record does not reach the extensions.
        let mut record = client_hello_record(&[(41, &[5; 40])]);
        record.truncate(60);
        record[3..5].copy_from_slice(&55u16.to_be_bytes());
        assert_eq!(hello_offers_ticket(&record), Some(false));
    }
}
