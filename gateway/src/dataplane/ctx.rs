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
pub(crate) const BODY_BUF_SIZE: usize = 64 * 1024;
/// Buffers kept for reuse per worker; more in flight are allocated and then freed.
const POOLED_BUFS: usize = 256;
/// Initial capacity of a connection's head buffer; grows up to `max_header_bytes`. An idle
/// keep-alive connection holds it (an io_uring read needs its buffer while it waits), so it
/// is sized for a typical head, like nginx's 1k `client_header_buffer_size`.
pub(crate) const HEAD_BUF_SIZE: usize = 1024;

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
    /// Raised when a drain starts.
    pub draining: Latch,
    /// Raised when a drain's `graceful_timeout` ran out: what still runs is cut now.
    cutting: Latch,
    /// Client connections this worker is serving.
    pub active: Cell<usize>,
    bufs: RefCell<Vec<BytesMut>>,
    outs: RefCell<Vec<Vec<u8>>>,
    /// Buffers handed out by `take_buf`/`take_out` and not yet given back (tests count them:
    /// a buffer lost on some exit shows here).
    lent: Cell<isize>,
    /// `limits.request_rate` for the clients of this worker (its share of the rate).
    pub(crate) request_limiter: RefCell<crate::policy::limits::RequestLimiter>,
    /// This worker's counters, and the copy it publishes every tick for `/metrics`.
    pub(crate) stats: RefCell<Stats>,
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
            draining: Latch::default(),
            cutting: Latch::default(),
            active: Cell::new(0),
            bufs: RefCell::new(Vec::new()),
            outs: RefCell::new(Vec::new()),
            lent: Cell::new(0),
            request_limiter: RefCell::new(request_limiter),
            stats: RefCell::new(Stats::default()),
            published,
        }
    }

    /// Copies the counters where the scraper reads them.
    pub(crate) fn publish(&self) {
        let mut stats = self.stats.borrow_mut();
        // Summed per name: for up to a second after an upstream is rebuilt (a reload, new
        // addresses) a request still running on the old one may hold an entry too.
        for pool in self.upstreams.borrow().values() {
            stats.upstream(&pool.upstream.metric_name).idle = 0;
        }
        for pool in self.upstreams.borrow().values() {
            stats.upstream(&pool.upstream.metric_name).idle += pool.idle_count() as i64;
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
    pub(crate) fn with_upstream<R>(
        &self,
        upstream: &Arc<Upstream>,
        f: impl FnOnce(&mut WorkerUpstream<S>) -> R,
    ) -> R {
        let mut map = self.upstreams.borrow_mut();
        adopt(&mut map, upstream);
        f(map.get_mut(&upstream.id).expect("adopted"))
    }

    /// Drops pools of upstreams no longer in the snapshot, and closes dead idle connections.
    pub(crate) fn sweep_upstreams(&self) {
        let snap = self.snapshot();
        let mut map = self.upstreams.borrow_mut();
        for upstream in &snap.upstreams {
            adopt(&mut map, upstream);
        }
        map.retain(|id, _| snap.upstreams.iter().any(|u| u.id == *id));
        for pool in map.values_mut() {
            pool.sweep();
        }
    }

    /// While descriptors are short (an accept refused for the reserve, a connect waiting
    /// for a descriptor), closes the idle upstream connections kept beyond `keepalive`:
    /// they are the descriptors the gateway can give back at once.
    pub(crate) fn drop_lingering_if_short(&self) {
        if crate::util::budget::under_descriptor_pressure() {
            for pool in self.upstreams.borrow_mut().values_mut() {
                pool.drop_lingering();
            }
        }
    }

    /// Buffers taken and not given back.
    #[cfg(test)]
    pub(crate) fn bufs_lent(&self) -> isize {
        self.lent.get()
    }

    /// A body buffer that goes back to the pool when the guard drops.
    pub(crate) fn lend_buf(&self) -> Lent<'_, BytesMut, S> {
        Lent::new(self, self.take_buf())
    }

    /// A guard with no buffer yet: [`Lent::ensure`] takes one from the pool when it is first
    /// needed. For buffers most exchanges never use (a request body): an exchange left
    /// waiting on its upstream then holds no 64 KiB it does not need.
    pub(crate) fn lend_later<T: Recycle>(&self) -> Lent<'_, T, S> {
        Lent {
            w: self,
            item: None,
        }
    }

    /// An output buffer that goes back to the pool when the guard drops.
    pub(crate) fn lend_out(&self) -> Lent<'_, Vec<u8>, S> {
        Lent::new(self, self.take_out())
    }

    pub(crate) fn take_buf(&self) -> BytesMut {
        self.lent.set(self.lent.get() + 1);
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BODY_BUF_SIZE))
    }

    pub(crate) fn give_buf(&self, mut buf: BytesMut) {
        self.lent.set(self.lent.get() - 1);
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

    pub(crate) fn take_out(&self) -> Vec<u8> {
        self.lent.set(self.lent.get() + 1);
        self.outs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(4096))
    }

    pub(crate) fn give_out(&self, mut out: Vec<u8>) {
        self.lent.set(self.lent.get() - 1);
        out.clear();
        if out.capacity() <= 4 * BODY_BUF_SIZE {
            let mut pool = self.outs.borrow_mut();
            if pool.len() < POOLED_BUFS {
                pool.push(out);
            }
        }
    }

    /// `limits.request_rate` (nginx `limit_req`) for one request (an HTTP/2 stream counts
    /// as one): `Err(retry_after)` seconds when over it, counted in the metrics. The
    /// limiter's borrow ends before the caller awaits anything.
    pub(crate) fn request_rate(
        &self,
        snap: &crate::snapshot::Snapshot,
        client_ip: std::net::IpAddr,
    ) -> Result<(), u64> {
        let mut limiter = self.request_limiter.borrow_mut();
        let verdict = limiter.check_with(
            snap.generation,
            &snap.server.limits,
            client_ip,
            std::time::Instant::now(),
        );
        let (verdict, limit) = match verdict {
            Err(retry_after) => (Err(retry_after), crate::policy::limits::LIMIT_REQUEST_RATE),
            // [limits.global]: counted for the fleet only once the local limit admits it.
            Ok(()) => match (&snap.server.limits.global, limiter.limited_key(client_ip)) {
                (Some(_), Some(key)) => (
                    self.shared.global_limit.admit_request(self.id, key),
                    crate::policy::global_limit::LIMIT_GLOBAL_REQUEST_RATE,
                ),
                _ => (Ok(()), ""),
            },
        };
        if verdict.is_err() {
            self.stats
                .borrow_mut()
                .limit_rejection(limit, crate::policy::limits::ENFORCER_USERSPACE);
        }
        verdict
    }

    /// The per-IP limits at accept for `ip`: the local ones (`ConnLimiter`: deny, conn_rate,
    /// max_conns_per_ip) and, with `[limits.global] conn_rate`, the fleet's. `None`: close
    /// the connection (counted in the metrics).
    pub(crate) fn admit_connection(
        &self,
        ip: std::net::IpAddr,
    ) -> Option<crate::policy::limits::ConnTicket> {
        let ticket = match self.shared.conn_limiter.on_accept(ip) {
            Ok(ticket) => ticket,
            Err(r) => {
                self.stats.borrow_mut().limit_rejection(r.limit, r.enforcer);
                return None;
            }
        };
        let snap = self.snapshot();
        let global_conn_rate = snap.server.limits.global.as_ref();
        if global_conn_rate.is_some_and(|g| g.conn_rate.is_some()) {
            let key = self.request_limiter.borrow().limited_key(ip);
            if key.is_some_and(|key| !self.shared.global_limit.admit_conn(self.id, key)) {
                self.stats.borrow_mut().limit_rejection(
                    crate::policy::global_limit::LIMIT_GLOBAL_CONN_RATE,
                    crate::policy::limits::ENFORCER_USERSPACE,
                );
                return None;
            }
        }
        Some(ticket)
    }

    /// Resolves when a drain starts (immediately if it already has).
    pub(crate) async fn drained(&self) {
        self.draining.raised().await
    }

    /// Resolves when a drain's `graceful_timeout` has run out (immediately if it has):
    /// connections still open are cut then, and what runs on them (a tunnel) ends through
    /// its own path, so it is logged and counted before the process exits.
    pub(crate) async fn graceful_timeout_passed(&self) {
        self.cutting.raised().await
    }

    pub(crate) fn cutting(&self) -> bool {
        self.cutting.get()
    }

    /// Raises [`Self::graceful_timeout_passed`].
    pub(crate) fn cut_open_connections(&self) {
        self.cutting.raise();
    }

    /// Whether a new process took this one's sockets over (binary upgrade): the node then
    /// stays in service while this process drains.
    pub(crate) fn handed_over(&self) -> bool {
        self.shared
            .handed_over
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when a drain should close a connection waiting for its next request: at
    /// once, unless a new process took the sockets over, and then never. A request may be
    /// on its way on that connection (or on one an accept took during the drain), so it is
    /// answered, with `Connection: close`; an idle one ends at its usual timeout.
    pub(crate) async fn drain_closes_idle(&self) {
        self.drained().await;
        if self.handed_over() {
            std::future::pending::<()>().await;
        }
    }
}

/// A one-way flag of the worker's thread that tasks can wait for: once raised, it stays
/// raised, and waiting returns at once.
#[derive(Default)]
pub struct Latch {
    raised: Cell<bool>,
    notify: Notify,
}

impl Latch {
    pub fn get(&self) -> bool {
        self.raised.get()
    }

    pub(crate) fn raise(&self) {
        self.raised.set(true);
        self.notify.notify_waiters();
    }

    /// Resolves once raised (immediately if it is).
    pub(crate) async fn raised(&self) {
        // Registered before the check, so a raise between the two is not missed.
        let notified = self.notify.notified();
        if self.raised.get() {
            return;
        }
        notified.await;
    }
}

/// A pooled buffer that goes back to its worker's pool when dropped, on every exit.
///
/// I/O takes buffers by value (io_uring owns the memory while the kernel works), so the
/// buffer is [`Lent::take`]n for an operation and [`Lent::put`] back after it. If the
/// operation is abandoned (a timeout drops its future), the buffer stays with it and the
/// guard, now empty, returns nothing: that memory is freed when the kernel completes.
pub struct Lent<'w, T: Recycle, S: Stream> {
    w: &'w Worker<S>,
    item: Option<T>,
}

/// A buffer type the worker pools.
pub trait Recycle: Sized {
    fn take_from<S: Stream>(w: &Worker<S>) -> Self;
    fn recycle<S: Stream>(self, w: &Worker<S>);
}

impl Recycle for BytesMut {
    fn take_from<S: Stream>(w: &Worker<S>) -> Self {
        w.take_buf()
    }
    fn recycle<S: Stream>(self, w: &Worker<S>) {
        w.give_buf(self)
    }
}

impl Recycle for Vec<u8> {
    fn take_from<S: Stream>(w: &Worker<S>) -> Self {
        w.take_out()
    }
    fn recycle<S: Stream>(self, w: &Worker<S>) {
        w.give_out(self)
    }
}

impl<'w, T: Recycle, S: Stream> Lent<'w, T, S> {
    fn new(w: &'w Worker<S>, item: T) -> Self {
        Lent {
            w,
            item: Some(item),
        }
    }

    /// Takes the buffer out for an operation; [`Lent::put`] it back after.
    pub fn take(&mut self) -> T {
        self.item.take().expect("buffer taken twice")
    }

    /// Gives the buffer back to the guard (returning the one it held, if any, to the pool).
    pub fn put(&mut self, item: T) {
        if let Some(old) = self.item.replace(item) {
            old.recycle(self.w);
        }
    }

    /// The buffer, now the caller's to give back (`give_buf`/`give_out`) by hand.
    pub fn into_inner(mut self) -> T {
        self.take()
    }

    /// Holds a buffer again after an abandoned operation kept the last one (which stays
    /// counted as lent: it is the kernel's until the operation completes).
    pub(crate) fn ensure(&mut self) {
        if self.item.is_none() {
            self.item = Some(T::take_from(self.w));
        }
    }
}

impl<T: Recycle, S: Stream> std::ops::Deref for Lent<'_, T, S> {
    type Target = T;
    fn deref(&self) -> &T {
        self.item.as_ref().expect("buffer is out on an operation")
    }
}

impl<T: Recycle, S: Stream> std::ops::DerefMut for Lent<'_, T, S> {
    fn deref_mut(&mut self) -> &mut T {
        self.item.as_mut().expect("buffer is out on an operation")
    }
}

impl<T: Recycle, S: Stream> Drop for Lent<'_, T, S> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            item.recycle(self.w);
        }
    }
}

/// Makes sure `map` has this worker's state for `upstream`. When the upstream was rebuilt
/// (a reload, or its names resolved to new addresses), the state of the one it replaced
/// (same name, older id) carries its idle connections over to the servers that stay. Only
/// forward: a request still running on the older one gets a fresh entry, swept once the
/// snapshot no longer has it.
fn adopt<S: Stream>(map: &mut FastMap<u64, WorkerUpstream<S>>, upstream: &Arc<Upstream>) {
    if map.contains_key(&upstream.id) {
        return;
    }
    let older = map
        .iter()
        .filter(|(id, p)| **id < upstream.id && p.upstream.name == upstream.name)
        .map(|(id, _)| *id)
        .max();
    let pool = match older.and_then(|id| map.remove(&id)) {
        Some(old) => WorkerUpstream::replacing(upstream.clone(), old),
        None => WorkerUpstream::new(upstream.clone()),
    };
    map.insert(upstream.id, pool);
}
