//! The little state every thread shares: the current snapshot (swapped whole by a reload),
//! the drain flag, the connection count, the workers' published counters and the per-IP
//! connection limiter, and the fleet-wide limit's state.

use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// State shared by every thread.
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    generation: AtomicU64,
    /// The generation just installed, for workers to apply listener changes at once
    /// rather than at their next tick.
    installed: tokio::sync::watch::Sender<u64>,
    /// Set once a drain starts: listeners close, keep-alive ends, `/ready` says 503.
    pub draining: AtomicBool,
    /// Client connections open across all workers, for `max_connections`.
    pub connections: AtomicUsize,
    /// Whether every listener of every worker is bound (readiness).
    pub listening: AtomicBool,
    /// Every worker's published counters.
    pub metrics: crate::telemetry::metrics::Registry,
    /// Per-IP connection limits (deny, rate when XDP is not enforcing it, concurrent cap),
    /// checked once per accepted connection; it also marks capped IPs for XDP.
    pub conn_limiter: crate::policy::limits::ConnLimiter,
    /// Every listening socket the workers hold, with the address it is bound to, for a
    /// binary upgrade to hand over (`control/upgrade.rs`). A worker removes an entry
    /// before it closes the socket, so a descriptor read here under the lock is open.
    pub listener_fds: std::sync::Mutex<Vec<(std::net::SocketAddr, std::os::fd::RawFd)>>,
    /// False while a new process taking over waits for the old one to stop: its workers
    /// hold the inherited sockets but accept nothing, so a handover that fails before the
    /// old process drains leaves no connection in a process that is about to exit.
    accepting: tokio::sync::watch::Sender<bool>,
    /// Set when this process drains because a new one took its sockets over.
    pub handed_over: AtomicBool,
    /// Listening sockets found dead (accept failed with EINVAL/EBADF/ENOTSOCK) and not yet
    /// re-bound: `/ready` says 503 while any is.
    pub dead_listeners: AtomicUsize,
    /// `[limits.global]`: the workers' batches of hits and the fleet's over-limit set.
    pub global_limit: crate::policy::global_limit::GlobalLimit,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        conn_limiter: crate::policy::limits::ConnLimiter,
    ) -> Arc<Shared> {
        let workers = snapshot.server.workers;
        Arc::new(Shared {
            generation: AtomicU64::new(snapshot.generation),
            installed: tokio::sync::watch::Sender::new(snapshot.generation),
            snapshot: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            metrics: crate::telemetry::metrics::Registry::default(),
            global_limit: crate::policy::global_limit::GlobalLimit::new(workers),
            conn_limiter,
            listener_fds: std::sync::Mutex::new(Vec::new()),
            accepting: tokio::sync::watch::Sender::new(true),
            handed_over: AtomicBool::new(false),
            dead_listeners: AtomicUsize::new(0),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The generation of the current snapshot: workers compare it with the one they cache,
    /// a plain load instead of touching the snapshot's reference count per request.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn install(&self, snapshot: Snapshot) {
        let generation = snapshot.generation;
        self.snapshot.store(Arc::new(snapshot));
        self.generation.store(generation, Ordering::Release);
        self.installed.send_replace(generation);
    }

    /// Changes whenever a reload installs a snapshot.
    pub fn installed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }

    /// Holds (false) or releases (true) the accept loops; see `accepting`.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.send_replace(on);
    }

    /// Whether accepting is allowed (`/ready` is 503 until it is).
    pub fn is_accepting(&self) -> bool {
        *self.accepting.borrow()
    }

    /// Resolves once accepting is allowed.
    pub(crate) async fn accepting(&self) {
        let mut rx = self.accepting.subscribe();
        let _ = rx.wait_for(|on| *on).await;
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
