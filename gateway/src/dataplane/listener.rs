//! A worker's listening sockets: bound per worker with `SO_REUSEPORT` (or inherited from
//! the process a binary upgrade took over from), reconciled with the snapshot on reload,
//! and the accept loop of each (descriptor reserve, per-IP limits, `max_connections`),
//! which hands every accepted connection to its task.

use crate::dataplane::conn::{self, ListenerCtx};
use crate::dataplane::ctx::Worker;
use crate::dataplane::parking::{self, ConnectionGuard, Held};
use crate::io::driver::Driver;
use crate::io::sockets::{accept_error_is_transient, accept_one, listening, Listening};
use crate::io::{bind_reuseport, Stream};
use crate::protocol::tls::stream::MaybeTls;
use crate::snapshot::ListenerIdentity;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The settings a bound listener hands each connection it accepts; reconcile swaps them
/// when a reload changes a setting that does not change the listener's identity.
type Current = Rc<RefCell<Rc<ListenerCtx>>>;

/// One listening socket of this worker.
struct Bound {
    identity: ListenerIdentity,
    /// The socket's descriptor; the accept loop changes it when it re-binds a dead one.
    fd: Rc<Cell<RawFd>>,
    current: Current,
    /// Stops the accept loop.
    stop: Rc<StopAccepting>,
}

/// Tells an accept loop to stop. The loop never has an accept pending in the kernel (both
/// drivers accept on readiness), so stopping it is waking it: no `shutdown()` of a socket
/// that another process (the one a binary upgrade handed it to, or took it from) may hold.
#[derive(Default)]
struct StopAccepting {
    stopped: Cell<bool>,
    wake: tokio::sync::Notify,
}

impl StopAccepting {
    fn stop(&self) {
        self.stopped.set(true);
        // A stored permit if the loop is not waiting yet (it is then waiting to start).
        self.wake.notify_one();
    }
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
                let fd = Rc::new(Cell::new(std_listener.as_raw_fd()));
                let listener =
                    listening(std_listener).map_err(|e| format!("listener {name:?}: {e}"))?;
                let current = Rc::new(RefCell::new(ListenerCtx::new(settings.clone())));
                let stop = Rc::new(StopAccepting::default());
                D::spawn(accept_loop::<D>(
                    worker.clone(),
                    listener,
                    addr,
                    fd.clone(),
                    current.clone(),
                    stop.clone(),
                ));
                if self.generation != 0 {
                    tracing::info!(worker = worker.id, listener = %name, %addr, "listener bound");
                }
                lock_fds(worker).push((addr, fd.get()));
                self.bound.push(Bound {
                    identity: identity.clone(),
                    fd,
                    current,
                    stop,
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
            stop(worker, b);
            tracing::info!(worker = worker.id, listener = %b.identity.1, addr = %b.identity.0, "listener closed");
            false
        });
        self.generation = snap.generation;
        Ok(())
    }

    /// Stops accepting on every socket and closes this worker's copy of each. No socket
    /// is shut down: after a handover (or an upgrade given up after the new process
    /// started) another process holds the same sockets, and the connections queued on
    /// them are its to accept.
    pub(crate) fn close_all<S: Stream>(&mut self, worker: &Worker<S>) {
        for b in self.bound.drain(..) {
            stop(worker, &b);
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
/// reads a descriptor this worker is about to close (the loop closes it as it ends).
fn stop<S: Stream>(worker: &Worker<S>, b: &Bound) {
    let fd = b.fd.get();
    lock_fds(worker).retain(|(_, f)| *f != fd);
    b.stop.stop();
}

/// Whether an accept error means the listening socket itself is dead (shut down by a
/// process that holds it too, or not a listening socket any more): retrying cannot help.
fn listener_dead(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EBADF | libc::ENOTSOCK)
    )
}

/// Connections an accept loop takes in a row on one readiness event before it lets the
/// tasks of those connections (and every other task of the worker) run: a burst is
/// accepted without a trip through the runtime per connection, and a flood cannot hold
/// the worker in its accept loop.
const ACCEPT_BATCH: usize = 64;

/// How one readiness event of a listener ended.
enum Accepted {
    /// The accept queue is empty: wait for the next readiness event.
    Drained,
    /// [`ACCEPT_BATCH`] connections taken and more may be queued: yield, then go on.
    Batch,
}

async fn accept_loop<D: Driver>(
    worker: Rc<Worker<MaybeTls<D::Stream>>>,
    mut listener: Listening,
    addr: SocketAddr,
    fd: Rc<Cell<RawFd>>,
    current: Current,
    stop: Rc<StopAccepting>,
) {
    // A process taking over from another accepts only once the old one drains.
    tokio::select! {
        biased;
        _ = stop.wake.notified() => return,
        _ = worker.shared.accepting() => {}
    }
    while !stop.stopped.get() {
        // Readiness, then `accept4` in this task: dropping the wait leaves nothing pending
        // in the kernel, so a connection is never taken by a loop that has stopped.
        let ready = tokio::select! {
            biased;
            _ = stop.wake.notified() => break,
            ready = listener.readable() => ready,
        };
        let taken = ready.and_then(|mut ready| accept_ready::<D>(&worker, &current, &mut ready));
        match taken {
            Ok(Accepted::Drained) => {}
            Ok(Accepted::Batch) => tokio::task::yield_now().await,
            Err(e) if listener_dead(&e) => {
                match replace_dead_listener::<D>(&worker, addr, &fd, &stop, &e).await {
                    Some(fresh) => listener = fresh,
                    None => break,
                }
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS/ENOMEM: back off instead of spinning; the
                // connection stays in the backlog until descriptors free up. Logged at a
                // bounded rate.
                crate::util::budget::refused(crate::util::budget::Refusal::FdReserve, &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Takes the connections queued on a readable listener, up to [`ACCEPT_BATCH`], and
/// admits each: one `accept4` per connection and one more that finds the queue empty and
/// clears the readiness. An error is returned only when it concerns the listener (dead,
/// out of descriptors or memory), not one connection.
fn accept_ready<D: Driver>(
    worker: &Rc<Worker<MaybeTls<D::Stream>>>,
    current: &Current,
    ready: &mut tokio::io::unix::AsyncFdReadyGuard<'_, std::net::TcpListener>,
) -> std::io::Result<Accepted> {
    let mut taken = 0;
    while taken < ACCEPT_BATCH {
        let accepted = match ready.try_io(|l| accept_one(l.get_ref(), D::ACCEPT_FLAGS)) {
            // WouldBlock: the readiness is cleared, the next event wakes the loop.
            Err(_would_block) => return Ok(Accepted::Drained),
            Ok(accepted) => accepted,
        };
        taken += 1;
        match accepted.and_then(|(socket, peer)| Ok((D::accepted(socket)?, peer))) {
            Ok((stream, peer)) => admit::<D>(worker, current, stream, peer),
            Err(e) if accept_error_is_transient(&e) => {
                tracing::debug!(worker = worker.id, error = %e, "connection lost before its accept");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Accepted::Batch)
}

/// A listening socket died under this worker (`accept` fails with EINVAL, EBADF or
/// ENOTSOCK: typically another process holding the same socket shut it down). Logged once
/// at error; `/ready` says 503 until a new socket is bound on the address (SO_REUSEPORT,
/// retried every second). Nothing is re-bound when this process is stopping or has
/// handed its sockets over: then the address is the new process's to serve.
async fn replace_dead_listener<D: Driver>(
    worker: &Worker<MaybeTls<D::Stream>>,
    addr: SocketAddr,
    fd: &Cell<RawFd>,
    stop: &StopAccepting,
    error: &std::io::Error,
) -> Option<Listening> {
    let shared = &worker.shared;
    let handing_over = || shared.handed_over.load(Ordering::SeqCst) || shared.is_draining();
    if handing_over() {
        tracing::info!(worker = worker.id, %addr, %error, "listening socket closed while draining: accept loop ended");
        return None;
    }
    tracing::error!(worker = worker.id, %addr, %error, "listening socket is dead: re-binding it");
    shared.dead_listeners.fetch_add(1, Ordering::SeqCst);
    let mut logged_failure = false;
    let fresh = loop {
        if stop.stopped.get() || handing_over() {
            break None;
        }
        let bound = bind_reuseport(addr).and_then(|l| {
            let raw = l.as_raw_fd();
            listening(l).map(|l| (l, raw))
        });
        match bound {
            Ok((listener, raw)) => {
                let old = fd.replace(raw);
                for entry in lock_fds(worker).iter_mut().filter(|(_, f)| *f == old) {
                    entry.1 = raw;
                }
                tracing::warn!(worker = worker.id, %addr, "listening socket re-bound");
                break Some(listener);
            }
            Err(e) if !logged_failure => {
                logged_failure = true;
                tracing::error!(worker = worker.id, %addr, error = %e, "cannot re-bind the dead listening socket: retrying every second");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.wake.notified() => break None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    shared.dead_listeners.fetch_sub(1, Ordering::SeqCst);
    fresh
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
        let mut held = Held { guard, ticket };
        let accepted = Instant::now();
        let settings = &ctx.settings;
        // A plain listener without PROXY protocol has nothing before HTTP: no preamble
        // future to allocate (one allocation and one copy of it fewer per connection).
        let (io, peer, initial) = if settings.proxy_protocol || settings.tls.is_some() {
            match Box::pin(conn::preamble::preamble(&w, &ctx, stream, peer, accepted)).await {
                Some(ready) => ready,
                None => return,
            }
        } else {
            (MaybeTls::Plain(stream), peer, bytes::BytesMut::new())
        };
        if settings.proxy_protocol {
            match w.admit_connection(peer.ip()) {
                Some(t) => held.ticket = Some(t),
                None => return,
            }
        }
        use conn::h2::Protocol;
        // Only TLS (ALPN) and `h2c` (the preface) can lead to HTTP/2; any other
        // connection is HTTP/1.1 without asking. Boxed: with `h2c` it reads the client
        // preface, and that read's state would otherwise size the task of every
        // connection, idle ones included.
        let protocol = if settings.h2c || matches!(io, MaybeTls::Tls(_)) {
            Box::pin(conn::h2::choose(&w, &ctx, io, initial, accepted)).await
        } else {
            Protocol::Http1(io, initial)
        };
        match protocol {
            // A long-idle connection leaves this task for the worker's parking lot
            // (`dataplane::parking`), taking `held` with it.
            Protocol::Http1(io, initial) => {
                parking::serve_http1(w, ctx, io, peer, accepted, initial, None, held).await
            }
            Protocol::Http2(io, read_ahead) => {
                Box::pin(conn::h2::serve(w, ctx, io, read_ahead, peer, accepted)).await
            }
            Protocol::Closed => {}
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
    use std::sync::Arc;

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

    type TestWorker = Rc<Worker<MaybeTls<<Epoll as Driver>::Stream>>>;

    /// A worker of its own `Shared`, serving `snapshot`.
    fn worker_on(snapshot: Snapshot) -> (Arc<Shared>, TestWorker) {
        let limiter =
            crate::policy::limits::ConnLimiter::new(&Default::default(), Default::default(), None);
        let shared = Shared::new(snapshot, limiter);
        let worker = Rc::new(Worker::new(0, shared.clone(), None));
        (shared, worker)
    }

    #[test]
    fn reconcile_refreshes_in_place_rebinds_on_identity_change_and_closes_the_rest() {
        let (a, b) = (free_addr(), free_addr());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let (shared, worker) = worker_on(snapshot(1, &listener("web", a, "")));
            let mut bound = BoundListeners::default();
            bound.reconcile::<Epoll>(&worker).unwrap();
            let first_fd = bound.bound[0].fd.get();
            assert!(current(&bound, a)[0].trusted_proxies.is_empty());

            // Only trusted_proxies: the same socket, the new settings for new connections.
            let trusting = listener("web", a, "trusted_proxies = [\"10.0.0.0/8\"]");
            shared.install(snapshot(2, &trusting));
            bound.reconcile::<Epoll>(&worker).unwrap();
            assert_eq!(bound.bound.len(), 1);
            assert_eq!(bound.bound[0].fd.get(), first_fd);
            let now = current(&bound, a);
            assert_eq!(now[0].trusted_proxies.len(), 1);
            assert!(Arc::ptr_eq(&now[0], &worker.shared.snapshot().listeners[0]));

            // A rename is an identity change: a new socket, the old one closed; a listener
            // added on another address is bound.
            let stop = bound.bound[0].stop.clone();
            shared.install(snapshot(
                3,
                &(listener("edge", a, "") + &listener("inner", b, "")),
            ));
            bound.reconcile::<Epoll>(&worker).unwrap();
            assert!(
                stop.stopped.get(),
                "the old socket's accept loop is stopped"
            );
            let names: Vec<_> = bound.bound.iter().map(|b| b.identity.1.clone()).collect();
            assert_eq!(names, ["edge", "inner"]);
            assert_ne!(bound.bound[0].fd.get(), first_fd);
            assert_eq!(current(&bound, b)[0].name, "inner");
            assert_eq!(bound.generation, 3);
            bound.close_all(&worker);
        });
    }

    #[test]
    fn a_dead_listening_socket_is_rebound() {
        let addr = free_addr();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let (shared, worker) = worker_on(snapshot(1, &listener("web", addr, "")));
            let mut bound = BoundListeners::default();
            bound.reconcile::<Epoll>(&worker).unwrap();
            let dead = bound.bound[0].fd.get();
            // What another process holding the socket can do to it: its accepts then fail
            // with EINVAL.
            // SAFETY: shutdown on a descriptor the worker holds open.
            assert_eq!(unsafe { libc::shutdown(dead, libc::SHUT_RDWR) }, 0);
            let deadline = Instant::now() + Duration::from_secs(5);
            while bound.bound[0].fd.get() == dead
                || shared.dead_listeners.load(Ordering::SeqCst) > 0
            {
                assert!(
                    Instant::now() < deadline,
                    "the dead listener was not re-bound"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let fresh = bound.bound[0].fd.get();
            assert_eq!(*lock_fds(&worker), [(addr, fresh)]);
            // The new socket listens on the address.
            std::net::TcpStream::connect(addr).expect("the re-bound listener accepts");
            bound.close_all(&worker);
            assert!(lock_fds(&worker).is_empty());
        });
    }
}
