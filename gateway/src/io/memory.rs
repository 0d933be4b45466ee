//! [`MemoryStream`]: a [`Stream`] whose peer is a script, for unit tests of the connection
//! code (the exchange, the pool) without a network, a listener or root. It runs on a tokio
//! current-thread runtime; no io_uring.
//!
//! The peer ([`MemoryPeer`]) queues what reads return ([`Step`]: bytes, EOF, an error, or
//! "never": a read that waits forever, as a silent peer does), keeps every byte written, and
//! can make writes fail or stall. [`Stream::connect`] hands out the streams a test
//! registers with [`set_connector`] for this thread.
//!
//! Liveness: the upstream pool checks an idle connection with `recv(MSG_PEEK)` on its
//! descriptor ([`crate::io::idle_connection_alive`]). So that check runs unchanged, each
//! stream owns one end of a `socketpair(2)` (a local pair, no network) whose other end the
//! peer holds: [`MemoryPeer::hang_up`] closes it, which that check sees as EOF.

use crate::io::Stream;
use bytes::BytesMut;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

/// What the next read returns.
#[derive(Debug, Clone)]
pub enum Step {
    /// These bytes (split over several reads if larger than the reader's spare capacity).
    Data(Vec<u8>),
    /// `Ok(0)`.
    Eof,
    /// An error (a reset).
    Reset,
    /// A read that never completes.
    Never,
}

/// The scripted far end of a [`MemoryStream`]; tests keep an `Rc` to inspect it.
#[derive(Debug, Default)]
pub struct MemoryPeer {
    steps: RefCell<VecDeque<Step>>,
    written: RefCell<Vec<u8>>,
    /// Writes fail with a reset from now on.
    pub(crate) fail_writes: Cell<bool>,
    /// Writes never complete from now on.
    pub(crate) stall_writes: Cell<bool>,
    /// `shutdown_write` was called.
    pub(crate) shut_write: Cell<bool>,
    /// `abort` was called.
    pub(crate) aborted: Cell<bool>,
    /// The far end of the liveness pair; `None` once hung up.
    far: RefCell<Option<UnixStream>>,
}

impl MemoryPeer {
    /// Every byte written to the stream so far.
    pub fn written(&self) -> Vec<u8> {
        self.written.borrow().clone()
    }

    /// Closes the far end: the stream's descriptor reads EOF, so an idle-liveness check
    /// fails (the upstream closed an idle keep-alive connection).
    pub(crate) fn hang_up(&self) {
        self.far.borrow_mut().take();
    }
}

/// An in-memory connection; see the module documentation.
#[derive(Debug)]
pub struct MemoryStream {
    peer: Rc<MemoryPeer>,
    near: UnixStream,
}

impl MemoryStream {
    /// A stream and the handle on its peer.
    pub fn pair() -> (MemoryStream, Rc<MemoryPeer>) {
        let (near, far) = UnixStream::pair().expect("socketpair");
        near.set_nonblocking(true).expect("non-blocking");
        let peer = Rc::new(MemoryPeer {
            far: RefCell::new(Some(far)),
            ..MemoryPeer::default()
        });
        (
            MemoryStream {
                peer: peer.clone(),
                near,
            },
            peer,
        )
    }

    /// A stream whose reads return `steps`.
    pub fn scripted(steps: impl IntoIterator<Item = Step>) -> (MemoryStream, Rc<MemoryPeer>) {
        let (s, p) = MemoryStream::pair();
        p.steps.borrow_mut().extend(steps);
        (s, p)
    }

    pub fn peer(&self) -> &Rc<MemoryPeer> {
        &self.peer
    }
}

/// Makes the stream [`Stream::connect`] returns for an address.
pub type Connector = Box<dyn FnMut(SocketAddr) -> io::Result<MemoryStream>>;

thread_local! {
    static CONNECT: RefCell<Option<Connector>> = RefCell::new(None);
}

/// Sets how [`MemoryStream::connect`] answers on this thread (refused when unset).
pub(crate) fn set_connector(f: Connector) {
    CONNECT.with(|c| *c.borrow_mut() = Some(f));
}

impl Stream for MemoryStream {
    async fn read(&self, mut buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        let step = self.peer.steps.borrow_mut().pop_front();
        match step {
            None | Some(Step::Eof) => (Ok(0), buf),
            Some(Step::Reset) => (Err(io::ErrorKind::ConnectionReset.into()), buf),
            Some(Step::Never) => std::future::pending().await,
            Some(Step::Data(mut chunk)) => {
                let room = buf.capacity() - buf.len();
                if chunk.len() > room {
                    let rest = chunk.split_off(room);
                    self.peer.steps.borrow_mut().push_front(Step::Data(rest));
                }
                buf.extend_from_slice(&chunk);
                (Ok(chunk.len()), buf)
            }
        }
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        if self.peer.stall_writes.get() {
            return std::future::pending().await;
        }
        if self.peer.fail_writes.get() || self.peer.aborted.get() || self.peer.shut_write.get() {
            return (Err(io::ErrorKind::BrokenPipe.into()), buf);
        }
        // SAFETY: a BoundedBuf points at `bytes_init()` initialised bytes that stay put
        // while it is alive, and we hold it until we return it.
        let data = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
        self.peer.written.borrow_mut().extend_from_slice(data);
        (Ok(()), buf)
    }

    async fn connect(addr: SocketAddr, _timeout: Duration) -> io::Result<Self> {
        CONNECT.with(|c| match &mut *c.borrow_mut() {
            Some(f) => f(addr),
            None => Err(io::ErrorKind::ConnectionRefused.into()),
        })
    }

    /// Nothing to watch: pending forever, which [`crate::io::peer_closed`] documents as
    /// "cannot be watched".
    async fn ready_io<R>(
        &self,
        _interest: tokio::io::Interest,
        _f: impl FnMut(RawFd) -> io::Result<R>,
    ) -> io::Result<R> {
        std::future::pending().await
    }

    fn spliceable(&self) -> bool {
        false
    }

    fn shutdown_write(&self) {
        self.peer.shut_write.set(true);
    }

    fn abort(&self) {
        self.peer.aborted.set(true);
        self.peer.steps.borrow_mut().clear();
    }

    fn raw_fd(&self) -> RawFd {
        self.near.as_raw_fd()
    }
}

/// Runs `f` to completion on a current-thread runtime with timers (no io_uring), as tests
/// over memory streams need.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("current-thread runtime")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_follow_the_script_and_writes_are_kept() {
        block_on(async {
            let (s, peer) = MemoryStream::scripted([Step::Data(vec![b'x'; 5000]), Step::Reset]);
            let (r, b) = s.read(BytesMut::with_capacity(4096)).await;
            assert_eq!(r.unwrap(), 4096, "split at the spare capacity");
            let (r, b) = s.read(b).await;
            assert_eq!(r.unwrap(), 904);
            assert_eq!(b.len(), 5000);
            let (r, _) = s.read(BytesMut::new()).await;
            assert!(r.is_err());
            let (r, _) = s.read(BytesMut::new()).await;
            assert_eq!(r.unwrap(), 0, "EOF after the script");
            let (r, _) = s.write_all(b"hello".to_vec()).await;
            r.unwrap();
            assert_eq!(peer.written(), b"hello");
            peer.fail_writes.set(true);
            assert!(s.write_all(b"x".to_vec()).await.0.is_err());
        });
    }

    #[test]
    fn hang_up_is_seen_by_the_idle_check() {
        let (s, peer) = MemoryStream::pair();
        assert!(crate::io::idle_connection_alive(s.raw_fd()));
        peer.hang_up();
        assert!(!crate::io::idle_connection_alive(s.raw_fd()));
    }
}
