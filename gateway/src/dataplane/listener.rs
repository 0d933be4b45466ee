//! A worker's listening sockets: bound per worker with `SO_REUSEPORT` (or inherited from
//! the process a binary upgrade took over from), reconciled with the snapshot on reload,
//! and the accept loop of each (descriptor reserve, per-IP limits, `max_connections`),
//! which hands every accepted connection to its task.

use crate::dataplane::conn::{self, ListenerCtx};
use crate::dataplane::ctx::Worker;
use crate::io::driver::Driver;
use crate::io::{bind_reuseport, Stream};
use crate::protocol::tls::stream::MaybeTls;
use crate::snapshot::ListenerIdentity;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The settings a bound listener hands each connection it accepts; reconcile swaps them
/// when a reload changes a setting that does not change the listener's identity.
type Current = Rc<RefCell<Rc<ListenerCtx>>>;

/// One listening socket of this worker.
struct Bound {
    identity: ListenerIdentity,
    fd: RawFd,
    current: Current,
    /// Set to stop the accept loop.
    closed: Rc<Cell<bool>>,
}

/// The listening sockets a worker has bound, reconciled with the snapshot on reload.
#[derive(Default)]
pub(crate) struct BoundListeners {
    pub(crate) generation: u64,
    bound: Vec<Bound>,
    /// Sockets inherited from the previous process (binary upgrade), by bound address:
    /// the first reconcile accepts on those of its addresses instead of binding new ones.
    inherited: Vec<(SocketAddr, OwnedFd)>,
}

impl BoundListeners {
    /// A worker's listeners that start on the sockets a binary upgrade handed it.
    pub(crate) fn inheriting(inherited: Vec<(SocketAddr, OwnedFd)>) -> BoundListeners {
        BoundListeners {
            inherited,
            ..BoundListeners::default()
        }
    }

    /// Makes the bound sockets match the snapshot's listeners: binds the new ones (or
    /// takes the inherited sockets of their address), gives those whose identity did not
    /// change the new settings (for connections accepted from now on), then closes the
    /// ones gone.
    pub(crate) fn reconcile<D: Driver>(
        &mut self,
        worker: &Rc<Worker<MaybeTls<D::Stream>>>,
    ) -> Result<(), String> {
        let snap = worker.snapshot();
        for settings in &snap.listeners {
            let identity = settings.identity();
            let mut kept = false;
            for b in self.bound.iter().filter(|b| b.identity == identity) {
                *b.current.borrow_mut() = ListenerCtx::new(settings.clone());
                kept = true;
            }
            if kept {
                continue;
            }
            let (addr, name) = (settings.listen, &settings.name);
            // Every inherited socket of this address is accepted on: closing one would
            // drop the connections queued on it (see docs/operations.md, tcp_migrate_req).
            let mut sockets: Vec<std::net::TcpListener> = Vec::new();
            let mut i = 0;
            while i < self.inherited.len() {
                if self.inherited[i].0 == addr {
                    sockets.push(self.inherited.swap_remove(i).1.into());
                } else {
                    i += 1;
                }
            }
            if sockets.is_empty() {
                sockets.push(
                    bind_reuseport(addr)
                        .map_err(|e| format!("listener {name:?}: cannot bind {addr}: {e}"))?,
                );
            }
            for std_listener in sockets {
                let fd = std_listener.as_raw_fd();
                let listener =
                    D::listener(std_listener).map_err(|e| format!("listener {name:?}: {e}"))?;
                let current = Rc::new(RefCell::new(ListenerCtx::new(settings.clone())));
                let closed = Rc::new(Cell::new(false));
                D::spawn(accept_loop::<D>(
                    worker.clone(),
                    listener,
                    current.clone(),
                    closed.clone(),
                ));
                if self.generation != 0 {
                    tracing::info!(worker = worker.id, listener = %name, %addr, "listener bound");
                }
                lock_fds(worker).push((addr, fd));
                self.bound.push(Bound {
                    identity: identity.clone(),
                    fd,
                    current,
                    closed,
                });
            }
        }
        // An inherited socket no listener of this config uses: this process never accepts
        // on it. Closing this copy leaves it open in the old process until that one exits.
        for (addr, _) in self.inherited.drain(..) {
            tracing::info!(worker = worker.id, %addr, "inherited listener not in this config: closed");
        }
        // Close removed listeners only after the new ones are bound, so a listener that
        // changed in place (name, TLS, PROXY) never leaves its address unserved.
        self.bound.retain(|b| {
            if snap.listeners.iter().any(|l| l.identity() == b.identity) {
                return true;
            }
            stop(worker, b, true);
            tracing::info!(worker = worker.id, listener = %b.identity.1, addr = %b.identity.0, "listener closed");
            false
        });
        self.generation = snap.generation;
        Ok(())
    }

    /// Stops accepting on every socket. With `shutdown`, the sockets are shut down too,
    /// which fails the accepts in flight at once; without it (after a binary upgrade handed
    /// the sockets over, so shutting one down would shut it for the new process too), an
    /// accept in flight stays until a connection or the end of the worker, and a
    /// connection it takes is still served (see `accept_loop`).
    pub(crate) fn close_all<S: Stream>(&mut self, worker: &Worker<S>, shutdown: bool) {
        for b in self.bound.drain(..) {
            stop(worker, &b, shutdown);
        }
    }
}

fn lock_fds<S: Stream>(worker: &Worker<S>) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, RawFd)>> {
    worker
        .shared
        .listener_fds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Stops one accept loop; the entry leaves the shared list first, so a handover never
/// reads a descriptor this worker is about to close.
fn stop<S: Stream>(worker: &Worker<S>, b: &Bound, shutdown: bool) {
    lock_fds(worker).retain(|(_, fd)| *fd != b.fd);
    b.closed.set(true);
    if shutdown {
        // SAFETY: shutdown on a listening descriptor this worker owns; it makes the
        // pending accept fail so the accept loop sees `closed` and ends.
        unsafe { libc::shutdown(b.fd, libc::SHUT_RDWR) };
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
    current: Current,
    closed: Rc<Cell<bool>>,
) {
    // A process taking over from another accepts only once the old one drains.
    worker.shared.accepting().await;
    loop {
        let accepted = D::accept(&listener).await;
        let stopping = worker.draining.get() || closed.get();
        match accepted {
            // A connection the kernel handed over is served even when accepting has
            // stopped: after a handover, an io_uring accept still in flight can complete
            // during the drain, and dropping its connection would reset it.
            Ok((stream, peer)) => admit::<D>(&worker, &current, stream, peer),
            Err(_) if stopping => {}
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the connection
                // stays in the backlog until descriptors free up. Logged at a bounded rate.
                crate::util::budget::refused(crate::util::budget::Refusal::FdReserve, &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if stopping {
            break;
        }
    }
}

/// Accept-time checks for one accepted connection, then its task.
fn admit<D: Driver>(
    worker: &Rc<Worker<MaybeTls<D::Stream>>>,
    current: &Current,
    stream: D::Stream,
    peer: SocketAddr,
) {
    // Taken once: this connection keeps these settings whatever a reload does later.
    let ctx = current.borrow().clone();
    if crate::util::budget::fd_in_reserve(stream.raw_fd()) {
        // The last descriptors stay free for the admin listener (so /healthz answers)
        // and for upstream connects of the connections already accepted.
        crate::util::budget::refused(
            crate::util::budget::Refusal::FdReserve,
            &"descriptor reserve reached: connection closed",
        );
        drop(stream);
        return;
    }
    // Per-IP limits at accept. Behind a PROXY-protocol balancer the peer is the
    // balancer, so those listeners check the client address after the header instead.
    let ticket = if ctx.settings.proxy_protocol {
        None
    } else {
        match worker.admit_connection(peer.ip()) {
            Some(t) => Some(t),
            None => {
                drop(stream);
                return;
            }
        }
    };
    let max = worker.snapshot().server.max_connections;
    if worker.shared.connections.fetch_add(1, Ordering::Relaxed) >= max {
        worker.shared.connections.fetch_sub(1, Ordering::Relaxed);
        crate::util::budget::refused(
            crate::util::budget::Refusal::MaxConnections,
            &format_args!(
                "max_connections ({max}) reached on {}: connection closed",
                ctx.name
            ),
        );
        drop(stream);
        return;
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
    let w = worker.clone();
    // The task's future is allocated once for the connection's whole life at the size
    // of its largest state, so every idle keep-alive connection pays for the largest
    // one. The branches a connection leaves behind or few connections take (the
    // PROXY/TLS preamble, HTTP/2) are boxed: allocated while they run, not for ever.
    let task = async move {
        let _guard = guard;
        let mut _ticket = ticket;
        let accepted = Instant::now();
        if let Some((io, peer, initial)) =
            Box::pin(conn::preamble::preamble(&w, &ctx, stream, peer, accepted)).await
        {
            if ctx.settings.proxy_protocol {
                match w.admit_connection(peer.ip()) {
                    Some(t) => _ticket = Some(t),
                    None => return,
                }
            }
            use conn::h2::Protocol;
            match conn::h2::choose(&w, &ctx, io, initial, accepted).await {
                Protocol::Http1(io, initial) => {
                    conn::h1::serve(w, ctx, io, peer, accepted, initial).await
                }
                Protocol::Http2(io, read_ahead) => {
                    Box::pin(conn::h2::serve(w, ctx, io, read_ahead, peer, accepted)).await
                }
                Protocol::Closed => {}
            }
        }
    };
    tracing::trace!(
        bytes = std::mem::size_of_val(&task),
        "connection task (memory per connection)"
    );
    D::spawn(task);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LoadedConfig};
    use crate::dataplane::shared::Shared;
    use crate::io::driver::Epoll;
    use crate::snapshot::Snapshot;
    use std::path::Path;

    fn snapshot(generation: u64, listeners: &str) -> Snapshot {
        let source = format!(
            "{listeners}\n[[route]]\npath_prefix = \"/\"\nrespond = {{ status = 200, body = \"ok\" }}\n"
        );
        let path = Path::new("/test/gateway.toml");
        let config = Config::parse(path, &source).expect("test config");
        let loaded = LoadedConfig {
            path: path.to_path_buf(),
            config,
            source,
        };
        Snapshot::build(loaded, generation, None).expect("snapshot")
    }

    fn listener(name: &str, addr: SocketAddr, extra: &str) -> String {
        format!("[[listener]]\nname = \"{name}\"\nlisten = \"{addr}\"\n{extra}\n")
    }

    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    }

    /// The settings the bound listener on `addr` hands to the next connection it accepts.
    fn current(
        bound: &BoundListeners,
        addr: SocketAddr,
    ) -> Vec<Arc<crate::snapshot::ListenerSettings>> {
        bound
            .bound
            .iter()
            .filter(|b| b.identity.0 == addr)
            .map(|b| b.current.borrow().settings.clone())
            .collect()
    }

    #[test]
    fn reconcile_refreshes_in_place_rebinds_on_identity_change_and_closes_the_rest() {
        let (a, b) = (free_addr(), free_addr());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let shared = Shared::new(
                snapshot(1, &listener("web", a, "")),
                crate::policy::limits::ConnLimiter::new(
                    &Default::default(),
                    Default::default(),
                    None,
                ),
            );
            let worker = Rc::new(Worker::new(0, shared.clone(), None));
            let mut bound = BoundListeners::default();
            bound.reconcile::<Epoll>(&worker).unwrap();
            let first_fd = bound.bound[0].fd;
            assert!(current(&bound, a)[0].trusted_proxies.is_empty());

            // Only trusted_proxies: the same socket, the new settings for new connections.
            let trusting = listener("web", a, "trusted_proxies = [\"10.0.0.0/8\"]");
            shared.install(snapshot(2, &trusting));
            bound.reconcile::<Epoll>(&worker).unwrap();
            assert_eq!(bound.bound.len(), 1);
            assert_eq!(bound.bound[0].fd, first_fd);
            let now = current(&bound, a);
            assert_eq!(now[0].trusted_proxies.len(), 1);
            assert!(Arc::ptr_eq(&now[0], &worker.shared.snapshot().listeners[0]));

            // A rename is an identity change: a new socket, the old one closed; a listener
            // added on another address is bound.
            let closed = bound.bound[0].closed.clone();
            shared.install(snapshot(
                3,
                &(listener("edge", a, "") + &listener("inner", b, "")),
            ));
            bound.reconcile::<Epoll>(&worker).unwrap();
            assert!(closed.get(), "the old socket's accept loop is stopped");
            let names: Vec<_> = bound.bound.iter().map(|b| b.identity.1.clone()).collect();
            assert_eq!(names, ["edge", "inner"]);
            assert_ne!(bound.bound[0].fd, first_fd);
            assert_eq!(current(&bound, b)[0].name, "inner");
            assert_eq!(bound.generation, 3);
            bound.close_all(&worker, true);
        });
    }
}
