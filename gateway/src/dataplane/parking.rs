//! The parking lot: where a worker keeps its long-idle plaintext HTTP/1 keep-alive
//! connections, with no task (issue 13).
//!
//! An idle connection in its task costs the task's future (the `serve` state machine,
//! about 1.5 KiB), the socket's reactor registration and the stream: 2.2 KiB resident at
//! 10,000 connections, against nginx's 0.6 KiB. A connection quiet for
//! `server.keepalive_park_after` (default 100 ms) leaves its task instead:
//! [`crate::dataplane::conn::h1::serve`] returns it as an [`Idle`] (socket, peer,
//! listener, keep-alive deadline), its reactor registration is dropped, and it waits here
//! as one slot of a per-worker slab, watched by ONE epoll instance of the worker's own
//! (`epoll_create1`, registered once with the worker's reactor), to which its socket is
//! added with `EPOLLIN | EPOLLRDHUP | EPOLLONESHOT` and its slot as the event's data.
//!
//! - Wake: when the lot's epoll is readable, the watch task collects the ready sockets
//!   (`epoll_wait` with a zero timeout, [`WAKE_BATCH`] at a time) and spawns `serve` again
//!   for each, which goes straight to the head read (a closed client reads EOF there and is
//!   closed quietly). One-shot: a woken socket stays in the lot's set, disabled, so
//!   parking it again re-arms it (`EPOLL_CTL_MOD`); closing it removes it. Except on
//!   io_uring, whose parked socket is a duplicate with a new number at every park
//!   ([`crate::io::ParkedSocket::Duplicate`]): it leaves the set when it wakes.
//! - Expiry: the keep-alive deadline still holds, with no timer per connection: the watch
//!   task sweeps the slab at the earliest deadline, at most every [`SWEEP_EVERY`] and at
//!   least every [`SWEEP_AT_MOST`].
//! - Drain: a drain closes parked connections as it closes idle ones
//!   ([`Worker::drain_closes_idle`]: not after a binary upgrade's handover, when they live
//!   to their deadline), and nothing parks once it started.
//! - Accounting: a parked connection keeps its [`Held`] (its [`ConnectionGuard`] and
//!   per-IP ticket), so it still counts towards `max_connections`, the per-IP limits and
//!   `gateway_connections_active`; the lot is therefore bounded by `max_connections`.
//!
//! Why a grace before parking: a park and its wake cost about four syscalls (reactor
//! deregistration, lot arm, the batched `epoll_wait`, reactor registration again; six on
//! io_uring, with the duplicate's `fcntl` + `close` and its removal at wake), so a
//! connection between two requests of a burst must not park; 100 ms is far longer than
//! the gaps inside a burst, and a connection idle longer pays those syscalls at most ten
//! times a second. Hot keep-alive connections never reach it: their request path is
//! unchanged.
//!
//! Not parked: TLS connections (the session state is not a socket; idle TLS already costs
//! less than nginx's, see docs/benchmarks.md), HTTP/2 connections, and fresh connections
//! that have not sent their first request (bounded by `header_timeout`).
//!
//! The lot is per worker thread, kept in a thread-local: each worker is one thread, and
//! the lot is reached from connection tasks, which know their worker but not its driver.

use crate::dataplane::conn::h1::{self, Idle, Resumed};
use crate::dataplane::conn::ListenerCtx;
use crate::dataplane::ctx::Worker;
use crate::io::Stream;
use crate::policy::limits::ConnTicket;
use bytes::BytesMut;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;

/// Ready sockets taken from the lot's epoll per `epoll_wait`.
const WAKE_BATCH: usize = 256;
/// Sweeps for expired connections are at least this far apart: a full pass over the slab
/// is cheap (tens of microseconds at 10,000 parked), but a pass per deadline when many
/// expire one after the other would not be. A parked connection expires up to this late.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// And at most this far apart, whatever the earliest deadline (a reload may shorten
/// `keepalive_timeout` for connections parked later).
const SWEEP_AT_MOST: Duration = Duration::from_secs(1);

/// Counts a connection for as long as it lives: in its task, and while it is parked.
pub(crate) struct ConnectionGuard<S: Stream> {
    pub(crate) worker: Rc<Worker<S>>,
    pub(crate) listener: Arc<str>,
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

/// What a connection holds for its whole life, in its task or in the lot: its place in
/// the connection count, and its per-IP ticket (`max_conns_per_ip`).
pub(crate) struct Held<S: Stream> {
    /// Never read: it counts by living, and uncounts when dropped.
    #[allow(dead_code)]
    pub(crate) guard: ConnectionGuard<S>,
    pub(crate) ticket: Option<ConnTicket>,
}

/// Serves an HTTP/1 connection and parks it each time it goes idle long enough: how the
/// accept path and every wake run a connection.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_http1<S: Stream>(
    w: Rc<Worker<S>>,
    listener: Rc<ListenerCtx>,
    io: S,
    peer: SocketAddr,
    accepted: Instant,
    initial: BytesMut,
    resumed: Option<Resumed>,
    held: Held<S>,
) {
    if let Some(idle) = h1::serve(w.clone(), listener, io, peer, accepted, initial, resumed).await {
        park(&w, idle, held);
    }
}

/// One parked connection.
struct Parked<S: Stream> {
    idle: Idle,
    held: Held<S>,
}

/// A slot of the lot's slab.
enum Slot<S: Stream> {
    /// `tag` tells this connection from an earlier one in the same slot: an event whose
    /// data names the slot with another tag is stale.
    Taken {
        tag: u32,
        parked: Parked<S>,
    },
    Free {
        next: Option<u32>,
    },
}

/// A worker's parking lot.
struct Lot<S: Stream> {
    epoll: AsyncFd<OwnedFd>,
    slots: RefCell<Vec<Slot<S>>>,
    free: Cell<Option<u32>>,
    next_tag: Cell<u32>,
    /// The watch task runs (it ends once the lot is empty).
    watching: Cell<bool>,
}

thread_local! {
    /// This worker thread's lot, made on its first park. `dyn Any`: a thread-local
    /// cannot be generic over the stream type, and a worker runs one.
    static LOT: RefCell<Option<Rc<dyn Any>>> = const { RefCell::new(None) };
    /// Connections parked on this thread, for `gateway_connections_parked`.
    static PARKED: Cell<usize> = const { Cell::new(0) };
    /// Parks on this thread since it started, for `gateway_connections_parks_total`.
    static PARKS: Cell<u64> = const { Cell::new(0) };
}

/// Connections parked on this worker thread.
pub(crate) fn parked() -> usize {
    PARKED.get()
}

/// Parks on this worker thread since it started: how often idle connections left their
/// task, which a client pacing its requests around the park delay would drive up.
pub(crate) fn parks() -> u64 {
    PARKS.get()
}

/// This thread's lot, made on first use (inside the worker's runtime: its epoll is
/// registered with the worker's reactor).
fn lot<S: Stream>() -> io::Result<Rc<Lot<S>>> {
    LOT.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some(any) = cell.as_ref() {
            if let Ok(lot) = any.clone().downcast::<Lot<S>>() {
                return Ok(lot);
            }
        }
        let lot = Rc::new(Lot::<S>::new()?);
        *cell = Some(lot.clone());
        Ok(lot)
    })
}

/// Closes every connection parked on this thread and forgets the lot: at the end of a
/// worker, so that nothing parked outlives the worker's runtime.
pub(crate) fn close_all<S: Stream>() {
    let lot = LOT.with(|cell| cell.borrow_mut().take());
    // The watch task may hold the lot too: its connections are closed here, not when the
    // runtime drops that task.
    if let Some(lot) = lot.and_then(|any| any.downcast::<Lot<S>>().ok()) {
        lot.close_every_one();
    }
    PARKED.set(0);
}

/// Parks an idle connection. When that cannot be done (a drain started, the lot's epoll
/// cannot be made or armed) the connection is closed, as an idle one at its timeout is:
/// a client must expect an idle keep-alive connection to close (RFC 9112 §9.6).
pub(crate) fn park<S: Stream>(w: &Rc<Worker<S>>, idle: Idle, held: Held<S>) {
    if w.draining.get() && !w.handed_over() {
        return;
    }
    let lot = match lot::<S>() {
        Ok(lot) => lot,
        Err(e) => {
            crate::util::budget::refused(
                crate::util::budget::Refusal::FdReserve,
                &format_args!("cannot make the parking lot's epoll: {e}: idle connection closed"),
            );
            return;
        }
    };
    let fd = idle.socket.raw_fd();
    let in_lot = idle.in_lot;
    let (slot, tag) = lot.insert(Parked { idle, held });
    if let Err(e) = lot.arm(fd, slot, tag, in_lot) {
        tracing::debug!(error = %e, "parking an idle connection: epoll_ctl failed, closed");
        drop(lot.take(slot, tag));
        return;
    }
    if !lot.watching.replace(true) {
        tokio::task::spawn_local(watch(w.clone(), lot));
    }
}

/// Wakes, expires and (at a drain) closes the parked connections; ends once none is left.
async fn watch<S: Stream>(w: Rc<Worker<S>>, lot: Rc<Lot<S>>) {
    let mut events: Vec<libc::epoll_event> = Vec::with_capacity(WAKE_BATCH);
    let mut sweep_at = Instant::now() + SWEEP_EVERY;
    while PARKED.get() > 0 {
        tokio::select! {
            biased;
            _ = w.drain_closes_idle() => lot.close_every_one(),
            ready = lot.epoll.readable() => match ready {
                Ok(mut ready) => {
                    if lot.collect(&mut events) {
                        ready.clear_ready();
                    }
                    for e in events.drain(..) {
                        // Copied out: the kernel's struct is packed.
                        let (key, flags) = (e.u64, e.events);
                        lot.wake(&w, key, flags);
                    }
                }
                Err(e) => {
                    tracing::error!(worker = w.id, error = %e, "parking lot: its epoll failed: parked connections closed");
                    lot.close_every_one();
                }
            },
            _ = tokio::time::sleep_until(sweep_at.into()) => {
                let now = Instant::now();
                let earliest = lot.sweep(now);
                sweep_at = earliest.clamp(now + SWEEP_EVERY, now + SWEEP_AT_MOST);
            }
        }
    }
    lot.watching.set(false);
}

impl<S: Stream> Lot<S> {
    fn new() -> io::Result<Lot<S>> {
        // SAFETY: a plain syscall; the descriptor it returns is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the registration owns the descriptor, so it stays open for as long as
        // it is registered.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Lot {
            epoll,
            slots: RefCell::new(Vec::new()),
            free: Cell::new(None),
            next_tag: Cell::new(0),
            watching: Cell::new(false),
        })
    }

    fn insert(&self, parked: Parked<S>) -> (u32, u32) {
        let tag = self.next_tag.get();
        self.next_tag.set(tag.wrapping_add(1));
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.get() {
            Some(slot) => {
                let Slot::Free { next } = slots[slot as usize] else {
                    unreachable!("the free list names a taken slot")
                };
                self.free.set(next);
                slots[slot as usize] = Slot::Taken { tag, parked };
                slot
            }
            None => {
                slots.push(Slot::Taken { tag, parked });
                (slots.len() - 1) as u32
            }
        };
        PARKED.set(PARKED.get() + 1);
        PARKS.set(PARKS.get() + 1);
        (slot, tag)
    }

    /// Takes the connection out of `slot` if it is still the one `tag` names.
    fn take(&self, slot: u32, tag: u32) -> Option<Parked<S>> {
        let mut slots = self.slots.borrow_mut();
        let entry = slots.get_mut(slot as usize)?;
        if !matches!(entry, Slot::Taken { tag: t, .. } if *t == tag) {
            return None;
        }
        let taken = std::mem::replace(
            entry,
            Slot::Free {
                next: self.free.get(),
            },
        );
        self.free.set(Some(slot));
        PARKED.set(PARKED.get() - 1);
        match taken {
            Slot::Taken { parked, .. } => Some(parked),
            Slot::Free { .. } => None,
        }
    }

    /// Watches `fd` for the next request (or the client's close), once.
    fn arm(&self, fd: RawFd, slot: u32, tag: u32, in_lot: bool) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: (u64::from(tag) << 32) | u64::from(slot),
        };
        let ctl = |op, event: &mut libc::epoll_event| {
            // SAFETY: both descriptors are open (the socket is owned by the slot just
            // filled) and `event` is a valid epoll_event.
            let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, event) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // A socket parked before is still in the set (disabled, one-shot): re-armed.
        // Either guess is corrected by the other operation.
        let (first, second) = if in_lot {
            (libc::EPOLL_CTL_MOD, libc::EPOLL_CTL_ADD)
        } else {
            (libc::EPOLL_CTL_ADD, libc::EPOLL_CTL_MOD)
        };
        match ctl(first, &mut event) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EEXIST)) => {
                ctl(second, &mut event)
            }
            other => other,
        }
    }

    /// Takes the ready events, up to [`WAKE_BATCH`]. Returns whether the lot's epoll was
    /// emptied, so its readiness may be cleared: a later event raises a new edge.
    fn collect(&self, events: &mut Vec<libc::epoll_event>) -> bool {
        loop {
            // SAFETY: the vector has room for WAKE_BATCH events; zero timeout.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    WAKE_BATCH as i32,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(error = %e, "parking lot: epoll_wait failed");
                return true;
            }
            // SAFETY: the kernel filled the first `n` entries.
            unsafe { events.set_len(n as usize) };
            return (n as usize) < WAKE_BATCH;
        }
    }

    /// The connection an event names goes back to a task of its own, which reads its next
    /// request or its EOF. A socket reporting only an error or a hang-up is closed here.
    fn wake(&self, w: &Rc<Worker<S>>, key: u64, flags: u32) {
        let (slot, tag) = (key as u32, (key >> 32) as u32);
        let Some(parked) = self.take(slot, tag) else {
            return;
        };
        let readable = flags & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0;
        if !readable {
            return;
        }
        // A duplicate's number changes at its next park: its entry in the set (disabled,
        // one-shot) would stay behind until the socket closes, one more per park.
        let in_lot = match &parked.idle.socket {
            crate::io::ParkedSocket::Duplicate(fd) => {
                // SAFETY: both descriptors are open; DEL takes no event.
                unsafe {
                    libc::epoll_ctl(
                        self.epoll.as_raw_fd(),
                        libc::EPOLL_CTL_DEL,
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                    )
                };
                false
            }
            _ => true,
        };
        tokio::task::spawn_local(resume(w.clone(), parked, in_lot));
    }

    /// Closes the connections whose keep-alive deadline passed; returns the earliest
    /// deadline of those left.
    fn sweep(&self, now: Instant) -> Instant {
        let mut expired = Vec::new();
        let mut earliest = now + SWEEP_AT_MOST;
        for (slot, entry) in self.slots.borrow().iter().enumerate() {
            if let Slot::Taken { tag, parked } = entry {
                if parked.idle.deadline <= now {
                    expired.push((slot as u32, *tag));
                } else {
                    earliest = earliest.min(parked.idle.deadline);
                }
            }
        }
        for (slot, tag) in expired {
            drop(self.take(slot, tag));
        }
        earliest
    }

    /// Closes every parked connection (a drain, or the lot's epoll failed).
    fn close_every_one(&self) {
        let slots = std::mem::take(&mut *self.slots.borrow_mut());
        self.free.set(None);
        PARKED.set(0);
        drop(slots);
    }
}

/// A woken connection, back in a task of its own.
async fn resume<S: Stream>(w: Rc<Worker<S>>, parked: Parked<S>, in_lot: bool) {
    let Parked { idle, held } = parked;
    let io = match S::unpark(idle.socket) {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(error = %e, "waking a parked connection failed: closed");
            return;
        }
    };
    let now = Instant::now();
    let park_after = w.snapshot().server.keepalive_park_after;
    let resumed = Resumed {
        limits_seen: idle.limits_seen,
        in_lot,
        park_backoff: h1::next_park_backoff(
            park_after,
            idle.park_backoff,
            now.saturating_duration_since(idle.parked_at),
        ),
    };
    serve_http1(
        w,
        idle.listener,
        io,
        idle.peer,
        now,
        BytesMut::new(),
        Some(resumed),
        held,
    )
    .await
}
