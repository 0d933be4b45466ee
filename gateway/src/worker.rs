//! Worker threads: each runs its own io_uring runtime with its own `SO_REUSEPORT` listener
//! sockets, idle upstream pools, buffer pools and access-log buffer. Nothing on the request
//! path is shared with another worker except the config snapshot (read-only) and a few
//! atomics (connection count, server health).

use crate::access_log::{LogWriter, WorkerLog};
use crate::fasthash::FastMap;
use crate::io::{Stream, UringStream};
use crate::metrics::{Published, Stats};
use crate::proxy;
use crate::state::{Shared, Snapshot};
use crate::tls::stream::MaybeTls;
use crate::upstream::pool::WorkerUpstream;
use crate::upstream::Upstream;
use bytes::BytesMut;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

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
    drain_notify: Notify,
    /// Client connections this worker is serving.
    pub active: Cell<usize>,
    bufs: RefCell<Vec<BytesMut>>,
    outs: RefCell<Vec<Vec<u8>>>,
    /// `limits.request_rate` for the clients of this worker (its share of the rate).
    pub request_limiter: RefCell<crate::limits::RequestLimiter>,
    /// This worker's counters, and the copy it publishes every tick for `/metrics`.
    pub stats: RefCell<Stats>,
    published: Published,
}

impl<S: Stream> Worker<S> {
    pub fn new(id: usize, shared: Arc<Shared>, log: Option<LogWriter>) -> Worker<S> {
        let snap = shared.snapshot();
        let published = shared.metrics.register(id);
        let request_limiter = crate::limits::RequestLimiter::new(
            &snap.config.limits,
            snap.config.effective_workers(),
        );
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
    fn publish(&self) {
        let mut stats = self.stats.borrow_mut();
        for pool in self.upstreams.borrow().values() {
            stats.upstream(&pool.upstream.metric_name).idle = pool.idle_count() as i64;
        }
        stats.heartbeat_ms = crate::clock::now_ms();
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
    fn sweep_upstreams(&self) {
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

/// What the main thread holds for each worker.
pub struct WorkerHandle {
    pub thread: std::thread::JoinHandle<()>,
}

/// Which I/O driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    Uring,
    Epoll,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// What a worker needs from its runtime: how to accept and how to spawn a task.
#[allow(async_fn_in_trait)] // Single-threaded runtimes: nothing here is Send.
pub trait Driver: 'static {
    type Stream: Stream;
    type Listener: 'static;
    fn listener(std: std::net::TcpListener) -> std::io::Result<Self::Listener>;
    async fn accept(listener: &Self::Listener) -> std::io::Result<(Self::Stream, SocketAddr)>;
    fn spawn(task: impl std::future::Future<Output = ()> + 'static);
}

/// io_uring through tokio-uring.
pub struct Uring;

impl Driver for Uring {
    type Stream = UringStream;
    type Listener = tokio_uring::net::TcpListener;
    fn listener(std: std::net::TcpListener) -> std::io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(std))
    }
    async fn accept(listener: &Self::Listener) -> std::io::Result<(UringStream, SocketAddr)> {
        let (stream, peer) = listener.accept().await?;
        Ok((UringStream::new(stream), peer))
    }
    fn spawn(task: impl std::future::Future<Output = ()> + 'static) {
        tokio_uring::spawn(task);
    }
}

/// Readiness through tokio's epoll reactor, for hosts without io_uring.
pub struct Epoll;

impl Driver for Epoll {
    type Stream = crate::io::EpollStream;
    type Listener = tokio::net::TcpListener;
    fn listener(std: std::net::TcpListener) -> std::io::Result<Self::Listener> {
        tokio::net::TcpListener::from_std(std)
    }
    async fn accept(listener: &Self::Listener) -> std::io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = listener.accept().await?;
        Ok((crate::io::EpollStream::new(stream), peer))
    }
    fn spawn(task: impl std::future::Future<Output = ()> + 'static) {
        tokio::task::spawn_local(task);
    }
}

/// Whether io_uring can be used here (a seccomp profile may forbid `io_uring_setup`,
/// or `kernel.io_uring_disabled` may be set).
pub fn uring_available() -> Result<(), std::io::Error> {
    tokio_uring::uring_builder().build(8).map(|_| ())
}

/// Starts `count` workers, each binding every listener of the current snapshot. Returns once
/// all are bound, or the first bind error.
pub fn start(
    driver: DriverKind,
    count: usize,
    shared: Arc<Shared>,
    log: Option<LogWriter>,
    drain: watch::Receiver<bool>,
    done: mpsc::Sender<usize>,
) -> anyhow::Result<Vec<WorkerHandle>> {
    let (bound_tx, bound_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    for id in 0..count {
        let shared = shared.clone();
        let log = log.clone();
        let drain = drain.clone();
        let done = done.clone();
        let bound = bound_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                match driver {
                    DriverKind::Uring => {
                        tokio_uring::builder()
                            .entries(4096)
                            .start(run_worker::<Uring>(id, shared, log, drain, bound));
                    }
                    DriverKind::Epoll => {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build();
                        match runtime {
                            Ok(rt) => {
                                let local = tokio::task::LocalSet::new();
                                local.block_on(
                                    &rt,
                                    run_worker::<Epoll>(id, shared, log, drain, bound),
                                );
                            }
                            Err(e) => {
                                let _ = bound
                                    .send(Err(format!("worker {id}: cannot start a runtime: {e}")));
                            }
                        }
                    }
                }
                let _ = done.send(id);
            })?;
        handles.push(WorkerHandle { thread });
    }
    drop(bound_tx);
    for _ in 0..count {
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!(e),
            Err(_) => anyhow::bail!("a worker exited before binding its listeners"),
        }
    }
    shared.listening.store(true, Ordering::Release);
    Ok(handles)
}

/// Binds one listener socket for this worker: `SO_REUSEPORT` so every worker has its own
/// accept queue and the kernel spreads connections among them.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
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

async fn run_worker<D: Driver>(
    id: usize,
    shared: Arc<Shared>,
    log: Option<LogWriter>,
    mut drain: watch::Receiver<bool>,
    bound: mpsc::Sender<Result<(), String>>,
) {
    let worker: Rc<Worker<MaybeTls<D::Stream>>> = Rc::new(Worker::new(id, shared.clone(), log));
    let mut listeners = BoundListeners::default();
    if let Err(e) = listeners.reconcile::<D>(&worker) {
        let _ = bound.send(Err(e));
        return;
    }
    worker.publish();
    let _ = bound.send(Ok(()));

    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks: u64 = 0;
    let mut busy_mark = (Instant::now(), crate::metrics::thread_cpu_time());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks += 1;
                worker.log.borrow_mut().flush();
                if worker.snapshot().generation != listeners.generation {
                    // A reload: bind listeners it added, close those it removed. Their
                    // connections carry on; the reload already checked the binds.
                    if let Err(e) = listeners.reconcile::<D>(&worker) {
                        tracing::error!(worker = id, error = %e, "applying listener changes");
                    }
                }
                if ticks.is_multiple_of(5) {
                    worker.sweep_upstreams();
                    // Busy ratio: this thread's CPU time over wall time. A worker waiting
                    // on its ring sleeps in io_uring_enter and accrues none.
                    let now = (Instant::now(), crate::metrics::thread_cpu_time());
                    let wall = now.0.duration_since(busy_mark.0).as_secs_f64();
                    let cpu = now.1.saturating_sub(busy_mark.1).as_secs_f64();
                    worker.stats.borrow_mut().busy_ratio = if wall > 0.0 { (cpu / wall).min(1.0) } else { 0.0 };
                    busy_mark = now;
                }
                worker.publish();
            }
            changed = drain.changed() => {
                if changed.is_err() || *drain.borrow() {
                    break;
                }
            }
        }
    }

    // Drain: stop accepting (shutting a listening socket down fails its pending accept),
    // wake idle keep-alive connections so they close, let in-flight requests finish.
    worker.draining.set(true);
    worker.drain_notify.notify_waiters();
    listeners.close_all();
    let deadline = Instant::now() + worker.snapshot().server.graceful_timeout;
    let mut last_publish = Instant::now();
    while worker.active.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        worker.log.borrow_mut().flush();
        // Keep the heartbeat (and the metrics) going: a drain is not a hang.
        if last_publish.elapsed() >= Duration::from_millis(200) {
            worker.publish();
            last_publish = Instant::now();
        }
    }
    if worker.active.get() > 0 {
        tracing::warn!(
            worker = id,
            connections = worker.active.get(),
            "graceful timeout: closing connections still open"
        );
    }
    worker.log.borrow_mut().flush();
    worker.stats.borrow_mut().finished = true;
    worker.publish();
}

/// The listening sockets a worker has bound, reconciled with the snapshot on reload.
#[derive(Default)]
struct BoundListeners {
    generation: u64,
    /// Descriptor and the flag that stops its accept loop, per listener.
    bound: Vec<(ListenerKey, RawFd, Rc<Cell<bool>>)>,
}

/// What identifies a bound listener: address, name, whether it terminates TLS, whether it
/// expects a PROXY header (a change of any rebinds it).
type ListenerKey = (SocketAddr, String, bool, bool);

impl BoundListeners {
    fn reconcile<D: Driver>(
        &mut self,
        worker: &Rc<Worker<MaybeTls<D::Stream>>>,
    ) -> Result<(), String> {
        let snap = worker.snapshot();
        let wanted: Vec<ListenerKey> = snap
            .config
            .listeners
            .iter()
            .map(|l| {
                let l = l.get_ref();
                (
                    l.listen.parse().expect("validated listen address"),
                    l.name.clone(),
                    l.tls.is_some(),
                    l.proxy_protocol,
                )
            })
            .collect();
        for key in &wanted {
            if self.bound.iter().any(|(k, _, _)| k == key) {
                continue;
            }
            let (addr, name, tls, proxy_protocol) = key.clone();
            let std_listener = bind_reuseport(addr)
                .map_err(|e| format!("listener {name:?}: cannot bind {addr}: {e}"))?;
            let fd = std_listener.as_raw_fd();
            let listener =
                D::listener(std_listener).map_err(|e| format!("listener {name:?}: {e}"))?;
            let ctx = Rc::new(proxy::ListenerCtx {
                name: name.as_str().into(),
                proto: if tls { "https" } else { "http" },
                proxy_protocol,
            });
            let closed = Rc::new(Cell::new(false));
            D::spawn(accept_loop::<D>(
                worker.clone(),
                listener,
                ctx,
                closed.clone(),
            ));
            if self.generation != 0 {
                tracing::info!(worker = worker.id, listener = %name, %addr, "listener bound");
            }
            self.bound.push((key.clone(), fd, closed));
        }
        // Close removed listeners only after the new ones are bound, so a listener that
        // changed in place (name, TLS, PROXY) never leaves its address unserved.
        self.bound.retain(|(key, fd, closed)| {
            if wanted.contains(key) {
                return true;
            }
            closed.set(true);
            // SAFETY: shutdown on a listening descriptor this worker owns; it makes the
            // pending accept fail so the accept loop sees `closed` and ends.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            tracing::info!(worker = worker.id, listener = %key.1, addr = %key.0, "listener closed");
            false
        });
        self.generation = snap.generation;
        Ok(())
    }

    fn close_all(&mut self) {
        for (_, fd, closed) in self.bound.drain(..) {
            closed.set(true);
            // SAFETY: as in `reconcile`.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// What comes before HTTP on a connection: the PROXY header when the listener expects one
/// (always in plaintext, ahead of any TLS), then the TLS handshake on TLS listeners, both
/// within `header_timeout` of the accept. `None` closes the connection.
async fn preamble<S: Stream>(
    w: &Worker<MaybeTls<S>>,
    ctx: &proxy::ListenerCtx,
    stream: S,
    peer: SocketAddr,
    accepted: Instant,
) -> Option<(MaybeTls<S>, SocketAddr, BytesMut)> {
    let snap = w.snapshot();
    let settings = snap.listener(&ctx.name);
    let proxy_protocol = settings.is_some_and(|s| s.proxy_protocol);
    // Only a listed balancer may name the client: anyone else could name any address and
    // walk past `deny`, the per-IP caps and rates, or spend someone else's allowance.
    let untrusted = settings.is_some_and(|s| {
        s.proxy_protocol
            && !s.proxy_protocol_from.is_empty()
            && !s.proxy_protocol_from.iter().any(|n| n.contains(&peer.ip()))
    });
    if untrusted {
        crate::budget::refused(crate::budget::Refusal::ProxyUntrusted, &peer);
        return None;
    }
    let acceptor = settings.and_then(|s| s.tls.clone());
    let deadline = accepted + snap.server.header_timeout;
    drop(snap);
    let mut initial = BytesMut::new();
    let mut peer = peer;
    if proxy_protocol {
        peer = proxy::read_proxy_header(&stream, &mut initial, peer, deadline).await?;
    }
    let Some(acceptor) = acceptor else {
        return Some((MaybeTls::Plain(stream), peer, initial));
    };
    let budget = deadline.saturating_duration_since(Instant::now());
    match crate::tls::accept_with_prefix(&acceptor, stream, initial, budget).await {
        Ok(tls) => {
            let hs = tls.handshake();
            w.stats.borrow_mut().tls_handshake(
                &ctx.name,
                hs.metric_label(),
                Some(hs.duration.as_secs_f64()),
            );
            Some((MaybeTls::Tls(Box::new(tls)), peer, BytesMut::new()))
        }
        Err(e) => {
            w.stats
                .borrow_mut()
                .tls_handshake(&ctx.name, e.metric_label(), None);
            tracing::debug!(%peer, listener = %ctx.name, error = %e, "TLS handshake failed");
            None
        }
    }
}

/// Counts a connection for as long as its task lives.
struct ConnectionGuard<S: Stream> {
    worker: Rc<Worker<S>>,
    listener: Arc<str>,
}

impl<S: Stream> Drop for ConnectionGuard<S> {
    fn drop(&mut self) {
        self.worker
            .stats
            .borrow_mut()
            .listener(&self.listener)
            .active -= 1;
        self.worker.active.set(self.worker.active.get() - 1);
        self.worker
            .shared
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop<D: Driver>(
    worker: Rc<Worker<MaybeTls<D::Stream>>>,
    listener: D::Listener,
    ctx: Rc<proxy::ListenerCtx>,
    closed: Rc<Cell<bool>>,
) {
    loop {
        let accepted = D::accept(&listener).await;
        if worker.draining.get() || closed.get() {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the connection
                // stays in the backlog until descriptors free up. Logged at a bounded rate.
                crate::budget::refused(crate::budget::Refusal::FdReserve, &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if crate::budget::fd_in_reserve(stream.raw_fd()) {
            // The last descriptors stay free for the admin listener (so /healthz answers)
            // and for upstream connects of the connections already accepted.
            crate::budget::refused(
                crate::budget::Refusal::FdReserve,
                &"descriptor reserve reached: connection closed",
            );
            drop(stream);
            continue;
        }
        // Per-IP limits at accept. Behind a PROXY-protocol balancer the peer is the
        // balancer, so those listeners check the client address after the header instead.
        let ticket = if ctx.proxy_protocol {
            None
        } else {
            match worker.shared.conn_limiter.on_accept(peer.ip()) {
                Ok(t) => Some(t),
                Err(r) => {
                    worker
                        .stats
                        .borrow_mut()
                        .limit_rejection(r.limit, r.enforcer);
                    drop(stream);
                    continue;
                }
            }
        };
        let max = worker.snapshot().server.max_connections;
        if worker.shared.connections.fetch_add(1, Ordering::Relaxed) >= max {
            worker.shared.connections.fetch_sub(1, Ordering::Relaxed);
            crate::budget::refused(
                crate::budget::Refusal::MaxConnections,
                &format_args!(
                    "max_connections ({max}) reached on {}: connection closed",
                    ctx.name
                ),
            );
            drop(stream);
            continue;
        }
        worker.active.set(worker.active.get() + 1);
        {
            let mut stats = worker.stats.borrow_mut();
            let l = stats.listener(&ctx.name);
            l.total += 1;
            l.active += 1;
        }
        let guard = ConnectionGuard {
            worker: worker.clone(),
            listener: ctx.name.clone(),
        };
        let ctx = ctx.clone();
        let w = worker.clone();
        D::spawn(async move {
            let _guard = guard;
            let mut _ticket = ticket;
            let accepted = Instant::now();
            if let Some((io, peer, initial)) = preamble(&w, &ctx, stream, peer, accepted).await {
                if ctx.proxy_protocol {
                    match w.shared.conn_limiter.on_accept(peer.ip()) {
                        Ok(t) => _ticket = Some(t),
                        Err(r) => {
                            w.stats.borrow_mut().limit_rejection(r.limit, r.enforcer);
                            return;
                        }
                    }
                }
                proxy::serve(w, ctx, io, peer, accepted, initial).await;
            }
        });
    }
}
