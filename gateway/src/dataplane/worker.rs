//! Worker threads: each runs its own runtime (io_uring, or epoll where io_uring is not
//! allowed) with its own `SO_REUSEPORT` listener sockets, idle upstream pools, buffer pools
//! and access-log buffer. Nothing on the request path is shared with another worker except
//! the config snapshot (read-only) and a few atomics (connection count, server health).

use crate::dataplane::ctx::Worker;
use crate::dataplane::listener::BoundListeners;
use crate::dataplane::shared::Shared;
use crate::io::driver::{Driver, DriverKind, Epoll, Uring};
use crate::protocol::tls::stream::MaybeTls;
use crate::telemetry::access_log::LogWriter;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the main thread holds for each worker.
pub struct WorkerHandle {
    pub thread: std::thread::JoinHandle<()>,
}

/// Listening sockets a binary upgrade handed over, with the address each is bound to.
pub type Inherited = Vec<(SocketAddr, OwnedFd)>;

/// Starts `count` workers, each binding every listener of the current snapshot (or taking
/// its share of `inherited`: socket `k` goes to worker `k % count`, so every inherited
/// socket is accepted on). Returns once all are bound, or the first bind error.
pub fn start(
    driver: DriverKind,
    count: usize,
    shared: Arc<Shared>,
    log: Option<LogWriter>,
    drain: watch::Receiver<bool>,
    done: mpsc::Sender<usize>,
    inherited: Inherited,
) -> anyhow::Result<Vec<WorkerHandle>> {
    let (bound_tx, bound_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    let mut shares: Vec<Inherited> = (0..count).map(|_| Vec::new()).collect();
    for (k, socket) in inherited.into_iter().enumerate() {
        shares[k % count.max(1)].push(socket);
    }
    for (id, share) in shares.into_iter().enumerate() {
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
                        // Not `Builder::start`, which panics when the ring cannot be made
                        // (RLIMIT_MEMLOCK, ENOMEM): the start-up must fail with the reason,
                        // not wait for a worker that died.
                        let batch = shared.snapshot().config.server.io_uring_submit_batch;
                        match crate::io::uring::runtime_claiming_ring(batch) {
                            Ok(rt) => {
                                rt.block_on(run_worker::<Uring>(
                                    id, shared, log, drain, bound, share,
                                ));
                                drop(rt);
                                crate::io::uring::release_ring();
                            }
                            Err(e) => {
                                let _ = bound.send(Err(format!(
                                    "worker {id}: cannot create its io_uring ring: {e} \
                                     (raise RLIMIT_MEMLOCK, or set [server] io = \"epoll\")"
                                )));
                            }
                        }
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
                                    run_worker::<Epoll>(id, shared, log, drain, bound, share),
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

async fn run_worker<D: Driver>(
    id: usize,
    shared: Arc<Shared>,
    log: Option<LogWriter>,
    mut drain: watch::Receiver<bool>,
    bound: mpsc::Sender<Result<(), String>>,
    inherited: Inherited,
) {
    let worker: Rc<Worker<MaybeTls<D::Stream>>> = Rc::new(Worker::new(id, shared.clone(), log));
    let mut listeners = BoundListeners::inheriting(inherited);
    if let Err(e) = listeners.reconcile::<D>(&worker) {
        let _ = bound.send(Err(e));
        return;
    }
    worker.publish();
    let _ = bound.send(Ok(()));

    let mut installed = shared.installed();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks: u64 = 0;
    let mut busy_mark = (Instant::now(), crate::telemetry::metrics::thread_cpu_time());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks += 1;
                worker.log.borrow_mut().flush();
                worker.drop_lingering_if_short();
                // Also here, should a notification ever be missed.
                reconcile_if_reloaded::<D>(&worker, &mut listeners);
                if ticks.is_multiple_of(5) {
                    worker.sweep_upstreams();
                    // Busy ratio: this thread's CPU time over wall time. A worker waiting
                    // on its ring sleeps in io_uring_enter and accrues none.
                    let now = (Instant::now(), crate::telemetry::metrics::thread_cpu_time());
                    let wall = now.0.duration_since(busy_mark.0).as_secs_f64();
                    let cpu = now.1.saturating_sub(busy_mark.1).as_secs_f64();
                    worker.stats.borrow_mut().busy_ratio = if wall > 0.0 { (cpu / wall).min(1.0) } else { 0.0 };
                    busy_mark = now;
                }
                {
                    let mut stats = worker.stats.borrow_mut();
                    stats.parked_connections = crate::dataplane::parking::parked() as u64;
                    stats.parks = crate::dataplane::parking::parks();
                }
                worker.publish();
            }
            Ok(()) = installed.changed() => {
                // A reload installed its snapshot: apply its listener changes now, so a
                // connection accepted after the reload gets the new listener settings.
                reconcile_if_reloaded::<D>(&worker, &mut listeners);
            }
            changed = drain.changed() => {
                if changed.is_err() || *drain.borrow() {
                    break;
                }
            }
        }
    }

    // Drain: stop accepting (never by shutting a listening socket down: a new process may
    // hold it too), wake idle keep-alive connections so they close, let in-flight
    // requests finish.
    worker.draining.raise();
    listeners.close_all(&worker);
    let deadline = Instant::now() + worker.snapshot().server.graceful_timeout;
    let mut last_publish = Instant::now();
    // Connections cut at the deadline end in its wake (an HTTP/2 connection resets its open
    // streams and each stream task writes its log line as it is dropped): a moment more
    // for those lines to reach the log before the final flush.
    let cut_deadline = deadline + CUT_GRACE;
    while worker.active.get() > 0 && Instant::now() < cut_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if Instant::now() >= deadline && !worker.cutting() {
            // HTTP/1 tunnels end here (HTTP/2 connections watch the deadline themselves).
            worker.cut_open_connections();
        }
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
    // Parked connections still open (kept after a handover, cut at the deadline): closed
    // while the runtime their lot is registered with still runs.
    crate::dataplane::parking::close_all::<MaybeTls<D::Stream>>();
    worker.log.borrow_mut().flush();
    worker.stats.borrow_mut().finished = true;
    worker.publish();
}

/// How long past `graceful_timeout` a drain waits for the connections it cut to end.
const CUT_GRACE: Duration = Duration::from_millis(300);

/// After a reload: binds the listeners it added, refreshes the settings of those it kept,
/// closes those it removed. Their connections carry on; the reload already checked binds.
fn reconcile_if_reloaded<D: Driver>(
    worker: &Rc<Worker<MaybeTls<D::Stream>>>,
    listeners: &mut BoundListeners,
) {
    if worker.snapshot().generation != listeners.generation {
        if let Err(e) = listeners.reconcile::<D>(worker) {
            tracing::error!(worker = worker.id, error = %e, "applying listener changes");
        }
    }
}
