//! [`Scripted`]: an in-memory [`Stream`] whose peer is a script. Reads return the script's
//! chunks one by one (a chunk larger than the reader's spare capacity is split), then EOF;
//! writes are kept (up to a cap) so a harness can check what was sent. No socket, no
//! io_uring: it runs on a tokio current-thread runtime.
//!
//! It also checks the memory budget from outside: a reader that comes back for more input
//! while holding more than `max_buffered` bytes in its buffer breaks the invariant named by
//! the harness (the gateway keeps reading into a buffer that grows without bound).

use crate::check::invariant;
use bytes::BytesMut;
use gateway::io::Stream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;

/// Most written bytes kept for inspection; the rest are counted only.
const KEEP_WRITTEN: usize = 1 << 20;

/// The shared state of a scripted stream, which the harness keeps a handle on.
#[derive(Default)]
pub struct Peer {
    pub to_read: RefCell<VecDeque<Vec<u8>>>,
    pub written: RefCell<Vec<u8>>,
    pub written_total: Cell<usize>,
    /// `shutdown_write` or `abort` was called.
    pub shut: Cell<bool>,
    /// The largest buffer length seen at a read.
    pub max_buffered: Cell<usize>,
}

pub struct Scripted {
    pub peer: Rc<Peer>,
    /// Invariant name and byte limit for the reader's buffer.
    budget: (&'static str, usize),
}

impl Scripted {
    pub fn new(chunks: impl IntoIterator<Item = Vec<u8>>, budget: (&'static str, usize)) -> Self {
        let peer = Peer::default();
        peer.to_read.borrow_mut().extend(chunks);
        Scripted {
            peer: Rc::new(peer),
            budget,
        }
    }
}

/// Makes the stream [`Stream::connect`] returns for an address.
pub type Connector = Box<dyn Fn(SocketAddr) -> io::Result<Scripted>>;

thread_local! {
    /// What [`Stream::connect`] hands out: the upstream side of the connection target.
    pub static CONNECT: RefCell<Option<Connector>> = RefCell::new(None);
}

impl Stream for Scripted {
    async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let p = &self.peer;
        read_queued(&p.to_read, buf, self.budget, &p.max_buffered)
    }

    async fn write_all<B: BoundedBuf>(&self, buf: B) -> (io::Result<()>, B) {
        // SAFETY: a BoundedBuf points at `bytes_init()` initialised bytes that stay put while
        // it is alive, and we hold it until we return it.
        let data = unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) };
        let p = &self.peer;
        if p.shut.get() {
            return (Err(io::ErrorKind::BrokenPipe.into()), buf);
        }
        p.written_total.set(p.written_total.get() + data.len());
        let mut kept = p.written.borrow_mut();
        let room = KEEP_WRITTEN.saturating_sub(kept.len());
        kept.extend_from_slice(&data[..data.len().min(room)]);
        (Ok(()), buf)
    }

    async fn connect(addr: SocketAddr, _timeout: Duration) -> io::Result<Self> {
        CONNECT.with(|c| match &*c.borrow() {
            Some(f) => f(addr),
            None => Err(io::ErrorKind::ConnectionRefused.into()),
        })
    }

    /// No socket to watch: pending forever, which [`gateway::io::peer_closed`] documents as
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
        self.peer.shut.set(true);
    }

    fn abort(&self) {
        self.peer.shut.set(true);
        self.peer.to_read.borrow_mut().clear();
    }

    fn raw_fd(&self) -> RawFd {
        -1
    }
}

/// One read from a queue of scripted reads: the next chunk (split if larger than the
/// buffer's spare capacity), or EOF when the queue is empty, so a read never waits. Checks
/// the reader's memory budget `(invariant name, limit)` first and notes the largest buffer.
pub fn read_queued(
    queue: &RefCell<VecDeque<Vec<u8>>>,
    mut buf: BytesMut,
    (name, limit): (&'static str, usize),
    max_buffered: &Cell<usize>,
) -> (io::Result<usize>, BytesMut) {
    let held = buf.len();
    max_buffered.set(max_buffered.get().max(held));
    invariant(name, held <= limit, || {
        format!("a read with {held} bytes already buffered (limit {limit})")
    });
    if buf.capacity() == buf.len() {
        buf.reserve(4096);
    }
    let mut queue = queue.borrow_mut();
    let Some(mut chunk) = queue.pop_front() else {
        return (Ok(0), buf);
    };
    let room = buf.capacity() - buf.len();
    if chunk.len() > room {
        queue.push_front(chunk.split_off(room));
    }
    buf.extend_from_slice(&chunk);
    (Ok(chunk.len()), buf)
}

/// A current-thread runtime (no io_uring), for the async targets.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("current-thread runtime")
}
