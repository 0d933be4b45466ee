//! A worker's listening sockets: bound per worker with `SO_REUSEPORT`, reconciled with the
//! snapshot on reload, and the accept loop of each (descriptor reserve, per-IP limits,
//! `max_connections`), which hands every accepted connection to its task.

use crate::dataplane::conn;
use crate::dataplane::ctx::Worker;
use crate::io::driver::Driver;
use crate::io::{bind_reuseport, Stream};
use crate::protocol::tls::stream::MaybeTls;
use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a worker knows about the listener a connection came in on.
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub proto: &'static str,
    /// Whether connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
}

/// The listening sockets a worker has bound, reconciled with the snapshot on reload.
#[derive(Default)]
pub(crate) struct BoundListeners {
    pub(crate) generation: u64,
    /// Descriptor and the flag that stops its accept loop, per listener.
    bound: Vec<(ListenerKey, RawFd, Rc<Cell<bool>>)>,
}

/// What identifies a bound listener: address, name, whether it terminates TLS, whether it
/// expects a PROXY header (a change of any rebinds it).
type ListenerKey = (SocketAddr, String, bool, bool);

impl BoundListeners {
    pub(crate) fn reconcile<D: Driver>(
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
            let ctx = Rc::new(ListenerCtx {
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

    pub(crate) fn close_all(&mut self) {
        for (_, fd, closed) in self.bound.drain(..) {
            closed.set(true);
            // SAFETY: as in `reconcile`.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
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
    ctx: Rc<ListenerCtx>,
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
                crate::util::budget::refused(crate::util::budget::Refusal::FdReserve, &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if crate::util::budget::fd_in_reserve(stream.raw_fd()) {
            // The last descriptors stay free for the admin listener (so /healthz answers)
            // and for upstream connects of the connections already accepted.
            crate::util::budget::refused(
                crate::util::budget::Refusal::FdReserve,
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
            crate::util::budget::refused(
                crate::util::budget::Refusal::MaxConnections,
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
            if let Some((io, peer, initial)) =
                conn::preamble::preamble(&w, &ctx, stream, peer, accepted).await
            {
                if ctx.proxy_protocol {
                    match w.shared.conn_limiter.on_accept(peer.ip()) {
                        Ok(t) => _ticket = Some(t),
                        Err(r) => {
                            w.stats.borrow_mut().limit_rejection(r.limit, r.enforcer);
                            return;
                        }
                    }
                }
                conn::h1::serve(w, ctx, io, peer, accepted, initial).await;
            }
        });
    }
}
