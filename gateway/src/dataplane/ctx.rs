//! A worker's own state, shared by the tasks on its thread: the cached snapshot, buffer
//! pools, idle upstream pools, request limiter, counters and access-log buffer. Lives in an
//! `Rc`, never locked.

use crate::dataplane::shared::Shared;
use crate::io::Stream;
use crate::snapshot::Snapshot;
use crate::telemetry::access_log::{LogWriter, WorkerLog};
use crate::telemetry::metrics::{Published, Stats};
use crate::upstream::pool::WorkerUpstream;
use crate::upstream::Upstream;
use crate::util::fasthash::FastMap;
use bytes::BytesMut;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use tokio::sync::Notify;

/// Size of the buffers bodies stream through: large enough that a 1 GiB body costs few
/// syscalls, small enough that thousands of streams fit in memory.
pub const BODY_BUF_SIZE: usize = 64 * 1024;
/// Buffers kept for reuse per worker; more in flight are allocated and then freed.
const POOLED_BUFS: usize = 256;
/// Initial capacity of a connection's head buffer; grows up to `max_header_bytes`. An idle
/// keep-alive connection holds it (an io_uring read needs its buffer while it waits), so it
/// is sized for a typical head, like nginx's 1k `client_header_buffer_size`.
pub const HEAD_BUF_SIZE: usize = 1024;

/// A worker's handle on the current snapshot, shared by its tasks through an `Rc` so that
/// taking it per request touches no reference count other workers also touch.
pub struct SnapshotRef(Arc<Snapshot>);

impl std::ops::Deref for SnapshotRef {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

/// One worker's state. Lives on its thread (`Rc`), never locked.
pub struct Worker<S: Stream> {
    pub id: usize,
    pub shared: Arc<Shared>,
    snapshot: RefCell<(u64, Rc<SnapshotRef>)>,
    upstreams: RefCell<FastMap<u64, WorkerUpstream<S>>>,
    pub log: RefCell<WorkerLog>,
    pub draining: Cell<bool>,
    pub(crate) drain_notify: Notify,
    /// Client connections this worker is serving.
    pub active: Cell<usize>,
    bufs: RefCell<Vec<BytesMut>>,
    outs: RefCell<Vec<Vec<u8>>>,
    /// `limits.request_rate` for the clients of this worker (its share of the rate).
    pub request_limiter: RefCell<crate::policy::limits::RequestLimiter>,
    /// This worker's counters, and the copy it publishes every tick for `/metrics`.
    pub stats: RefCell<Stats>,
    published: Published,
}

impl<S: Stream> Worker<S> {
    pub fn new(id: usize, shared: Arc<Shared>, log: Option<LogWriter>) -> Worker<S> {
        let snap = shared.snapshot();
        let published = shared.metrics.register(id);
        let request_limiter =
            crate::policy::limits::RequestLimiter::new(&snap.server.limits, snap.server.workers);
        Worker {
            id,
            snapshot: RefCell::new((snap.generation, Rc::new(SnapshotRef(snap)))),
            shared,
            upstreams: RefCell::new(FastMap::default()),
            log: RefCell::new(WorkerLog::new(log)),
            draining: Cell::new(false),
            drain_notify: Notify::new(),
            active: Cell::new(0),
            bufs: RefCell::new(Vec::new()),
            outs: RefCell::new(Vec::new()),
            request_limiter: RefCell::new(request_limiter),
            stats: RefCell::new(Stats::default()),
            published,
        }
    }

    /// Copies the counters where the scraper reads them.
    pub(crate) fn publish(&self) {
        let mut stats = self.stats.borrow_mut();
        for pool in self.upstreams.borrow().values() {
            stats.upstream(&pool.upstream.metric_name).idle = pool.idle_count() as i64;
        }
        stats.heartbeat_ms = crate::util::clock::now_ms();
        let copy = stats.clone();
        drop(stats);
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = copy;
    }

    /// The current config snapshot; refreshed from the shared one only when its generation
    /// changed, so a request costs no atomic reference-count traffic between workers.
    pub fn snapshot(&self) -> Rc<SnapshotRef> {
        let generation = self.shared.generation();
        let mut cached = self.snapshot.borrow_mut();
        if cached.0 != generation {
            let snap = self.shared.snapshot();
            *cached = (snap.generation, Rc::new(SnapshotRef(snap)));
        }
        cached.1.clone()
    }

    /// Runs `f` on this worker's state for `upstream` (created on first use). Never held
    /// across an await.
    pub fn with_upstream<R>(
        &self,
        upstream: &Arc<Upstream>,
        f: impl FnOnce(&mut WorkerUpstream<S>) -> R,
    ) -> R {
        let mut map = self.upstreams.borrow_mut();
        let entry = map
            .entry(upstream.id)
            .or_insert_with(|| WorkerUpstream::new(upstream.clone()));
        f(entry)
    }

    /// Drops pools of upstreams no longer in the snapshot, and closes dead idle connections.
    pub(crate) fn sweep_upstreams(&self) {
        let snap = self.snapshot();
        let mut map = self.upstreams.borrow_mut();
        map.retain(|id, _| snap.upstreams.iter().any(|u| u.id == *id));
        for pool in map.values_mut() {
            pool.sweep();
        }
    }

    pub fn take_buf(&self) -> BytesMut {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BODY_BUF_SIZE))
    }

    pub fn give_buf(&self, mut buf: BytesMut) {
        buf.clear();
        // After `advance` the front of the allocation is out of view; reserving on an empty,
        // unshared buffer moves the view back to the start instead of allocating.
        buf.reserve(BODY_BUF_SIZE);
        // A buffer that was split or grew oddly is not worth keeping.
        if buf.capacity() >= BODY_BUF_SIZE && buf.capacity() <= 2 * BODY_BUF_SIZE {
            let mut pool = self.bufs.borrow_mut();
            if pool.len() < POOLED_BUFS {
                pool.push(buf);
            }
        }
    }

    pub fn take_out(&self) -> Vec<u8> {
        self.outs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(4096))
    }

    pub fn give_out(&self, mut out: Vec<u8>) {
        out.clear();
        if out.capacity() <= 4 * BODY_BUF_SIZE {
            let mut pool = self.outs.borrow_mut();
            if pool.len() < POOLED_BUFS {
                pool.push(out);
            }
        }
    }

    /// Resolves when a drain starts (immediately if it already has).
    pub async fn drained(&self) {
        let notified = self.drain_notify.notified();
        if self.draining.get() {
            return;
        }
        notified.await;
    }
}
