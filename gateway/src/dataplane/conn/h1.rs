//! One HTTP/1 client connection, request after request: read a head, choose the route,
//! answer directly or hand the request to the exchange ([`super::exchange`], which picks
//! the upstream, forwards, relays and retries), log, and loop while the connection stays
//! keep-alive. Data flows one way: client → upstream → client.
//!
//! What stays here is what is HTTP/1 about the client side: heads and pipelining,
//! `100 Continue`, informational responses to 1.1 clients only, de-chunking for 1.0
//! clients, keep-alive, lingering close, the access log, and the WebSocket tunnel a `101`
//! turns the connection into. `H1Client` is the client connection as the exchange's
//! request source and response sink.
//!
//! Buffers: the connection's head buffer holds the head and whatever body bytes came with
//! it (and any pipelined request behind it); bodies stream through pooled 64 KiB buffers,
//! one read then one write at a time, so memory per connection is bounded whatever the
//! body size. Between plaintext sockets, long runs of a body are spliced instead
//! (`relay::splice_body`, through one pipe per request from the worker's pool).
//! Timeouts cover whole phases (head, each upstream read and write).

use crate::dataplane::conn::exchange::{
    self, BodyForm, Exchange, Failure, RequestSource, ResponseSink,
};
use crate::dataplane::conn::relay::{
    request_body_too_slow, splice_body, write_client, Bound, RateClock, SpliceWay,
    CLIENT_WRITE_TIMEOUT,
};
use crate::dataplane::conn::ListenerCtx;
use crate::dataplane::ctx::{Lent, Worker, HEAD_BUF_SIZE};
use crate::io::pipe::{self, PooledPipe};
use crate::io::Stream;
use crate::policy::route::{Action, Route};
use crate::protocol::error::{HttpError, Side};
use crate::protocol::http1::body::Body;
use crate::protocol::http1::head::{parse_request, BodyFraming, RequestHead, ResponseHead};
use crate::protocol::http1::rewrite::{self, ClientFraming, Forwarding};
use crate::protocol::http1::{error_body, write_simple_response};
use crate::snapshot::{ListenerSettings, Snapshot};
use crate::telemetry::access_log::Entry;
use crate::upstream::Upstream;
use crate::util::clock::PhaseTimer;
use bytes::{Buf, BytesMut};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use tokio_uring::buf::BoundedBuf;

/// The `route` label of requests that matched no route (or never got that far).
pub(crate) static NO_ROUTE: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| "none".into());

struct Client<S> {
    io: S,
    peer: SocketAddr,
    buf: BytesMut,
    head: RequestHead,
    resp: ResponseHead,
}

/// What happened to one request, for the log and for the connection loop.
struct Outcome<'s> {
    status: u16,
    body_bytes: u64,
    /// The route taken, for metrics (`None`: no route matched).
    route: Option<&'s Arc<str>>,
    upstream: Option<(&'s Upstream, usize)>,
    keep_alive: bool,
    /// Bytes of the head buffer that belonged to this request.
    consumed: usize,
    /// Bytes read past the end of this request's body (a pipelined request).
    leftover: Option<BytesMut>,
}

impl Outcome<'_> {
    /// An error answered by the gateway itself; `body_bytes` is what [`send_error`] wrote
    /// (0 when nothing was sent: a 499, or a client that stopped reading), as nginx logs.
    fn error(status: u16, keep_alive: bool, body_bytes: u64) -> Self {
        Outcome {
            status,
            body_bytes,
            route: None,
            upstream: None,
            keep_alive,
            consumed: 0,
            leftover: None,
        }
    }
}

/// A keep-alive connection that [`serve`] found idle for `keepalive_park_after` and took
/// out of its task: what the worker's parking lot (`dataplane::parking`) keeps of it
/// until its client sends again, closes, or its keep-alive deadline passes.
pub struct Idle {
    pub(crate) socket: crate::io::ParkedSocket,
    pub(crate) peer: SocketAddr,
    pub(crate) listener: Rc<ListenerCtx>,
    /// The keep-alive deadline (`keepalive_timeout` after the last response).
    pub(crate) deadline: Instant,
    /// The snapshot generation whose `deny` list this connection was last checked against.
    pub(crate) limits_seen: u64,
    /// The socket is still in the lot's epoll set (disabled since it fired, being
    /// one-shot) from an earlier park: parking again re-arms it instead of adding it.
    pub(crate) in_lot: bool,
    /// When it parked, and the [`park_delay`] doubling it parked under: a wake soon after
    /// the park doubles the delay for the next one ([`next_park_backoff`]).
    pub(crate) parked_at: Instant,
    pub(crate) park_backoff: u8,
}

/// The most doublings of `keepalive_park_after`: 100 ms becomes 25.6 s, past any usual
/// `keepalive_timeout`, so such a connection no longer parks at all.
const MAX_PARK_BACKOFF: u8 = 8;

/// How long a kept-alive connection waits in its task before it parks: the configured
/// `keepalive_park_after`, doubled `backoff` times.
pub(crate) fn park_delay(park_after: Duration, backoff: u8) -> Duration {
    park_after.saturating_mul(1 << backoff.min(MAX_PARK_BACKOFF))
}

/// The doubling for a connection's next park, after one that lasted `parked_for`. A park
/// and its wake cost four to six syscalls, which a client pacing its requests just past
/// the delay would otherwise make every request pay (33 to 48 % more CPU per request in
/// the attack that found it). Each quick wake doubles the delay, so such a client parks
/// at most [`MAX_PARK_BACKOFF`] times in a row; a park that lasted, the case parking is
/// for, starts again from the configured delay.
pub(crate) fn next_park_backoff(park_after: Duration, backoff: u8, parked_for: Duration) -> u8 {
    // Parked for less than 8 of its delays: the connection was not idle in the sense
    // parking is for (its task would have cost less than the park and the wake).
    if parked_for < park_delay(park_after, backoff).saturating_mul(8) {
        backoff.saturating_add(1).min(MAX_PARK_BACKOFF)
    } else {
        0
    }
}

/// How [`serve`] continues a connection the parking lot woke: its client is readable
/// (or closed), so the idle wait is skipped and the head read starts at once.
pub struct Resumed {
    pub(crate) limits_seen: u64,
    /// The socket is still in the lot's epoll set (see [`Idle::in_lot`]).
    pub(crate) in_lot: bool,
    /// The doubling of the delay before its next park ([`next_park_backoff`]).
    pub(crate) park_backoff: u8,
}

/// Serves one client connection whose preamble (PROXY header, TLS handshake) the worker
/// has already handled: `peer` is the client address it established, `initial` any bytes
/// read past the preamble. `resumed`: the connection was parked and its client is
/// readable now.
///
/// Returns the connection when it went idle long enough to park (plaintext only, see
/// [`Stream::park`]): the caller hands it to the parking lot, which ends this task.
///
/// Memory: this future lives as long as the connection is busy, and an async fn's future
/// is as large as its largest await point. So the only await here besides the idle wait
/// is a boxed [`request`]: everything a request needs (the parsed heads, the head read,
/// the exchange, error answers, the lingering close) exists only while a request runs,
/// and an idle keep-alive connection holds the socket, its address and a small readiness
/// wait (`RUST_LOG=gateway=trace` logs the task's size, "connection task") until it parks.
pub async fn serve<S: Stream>(
    w: Rc<Worker<S>>,
    listener: Rc<ListenerCtx>,
    mut io: S,
    peer: SocketAddr,
    accepted: Instant,
    initial: BytesMut,
    resumed: Option<Resumed>,
) -> Option<Idle> {
    // Empty until the client is readable: an idle connection parks no buffer.
    let mut buf = initial;
    let mut first = resumed.is_none();
    let mut limits_seen = match &resumed {
        Some(r) => r.limits_seen,
        None => w.snapshot().generation,
    };
    let mut in_lot = resumed.as_ref().is_some_and(|r| r.in_lot);
    let park_backoff = resumed.as_ref().map_or(0, |r| r.park_backoff);
    let mut skip_wait = resumed.is_some();
    // The connection's two timers, re-armed phase after phase instead of a timer per
    // operation (`PhaseTimer`).
    let timers = Timers::default();
    loop {
        if buf.is_empty() && !std::mem::take(&mut skip_wait) {
            // Idle (a fresh connection, or keep-alive between requests): wait until the
            // client is readable, holding no buffer; the head buffer is taken once bytes
            // are there. A new connection must send within `header_timeout` of the
            // accept, a kept-alive one within `keepalive_timeout`. An empty buffer still
            // has the capacity the last head grew it to: given back to the worker's
            // cache here, for the next request of any connection (`reuse`).
            super::reuse::give_back_head_buf(std::mem::take(&mut buf));
            let (deadline, park_at) = {
                let server = &w.snapshot().server;
                if first {
                    (accepted + server.header_timeout, None)
                } else {
                    let now = Instant::now();
                    let deadline = now + server.keepalive_timeout;
                    // A kept-alive connection quiet for `keepalive_park_after` leaves its
                    // task for the parking lot. Never a fresh one (bounded by
                    // `header_timeout`), never one that cannot park (TLS).
                    let park_at = now + park_delay(server.keepalive_park_after, park_backoff);
                    let parks = !server.keepalive_park_after.is_zero()
                        && park_at < deadline
                        && io.parkable();
                    (deadline, parks.then_some(park_at))
                }
            };
            match idle_wait(&w, &io, park_at.unwrap_or(deadline), &timers.op).await {
                IdleWait::Readable => {}
                IdleWait::Closed => return None,
                IdleWait::TimedOut if park_at.is_none() => return None,
                IdleWait::TimedOut => match io.park() {
                    Ok(socket) => {
                        return Some(Idle {
                            socket,
                            peer,
                            listener,
                            deadline,
                            limits_seen,
                            in_lot,
                            // The wait ended at `park_at`: no clock read for it.
                            parked_at: park_at.unwrap_or(deadline),
                            park_backoff,
                        });
                    }
                    Err(None) => return None,
                    // Could not park after all: the rest of the wait in the task.
                    Err(Some(kept)) => {
                        io = kept;
                        in_lot = false;
                        if idle_wait(&w, &io, deadline, &timers.op).await != IdleWait::Readable {
                            return None;
                        }
                    }
                },
            }
        }
        // Built in its heap block: `Box::pin(request(..))` builds the future on the stack,
        // then copies all of it (as large as its largest await point, kilobytes) into the
        // heap, once per request; written through the block's own memory only the
        // arguments are. The block comes from the worker's cache (`reuse`): no allocation
        // per request, and still none held while the connection is idle.
        let phase = super::reuse::PooledFuture::new(|| {
            request(
                &w,
                &listener,
                io,
                peer,
                buf,
                first,
                accepted,
                &mut limits_seen,
                &timers,
            )
        });
        match phase.await {
            Some((back, rest)) => (io, buf) = (back, rest),
            None => return None,
        }
        first = false;
    }
}

/// How an idle wait ended.
#[derive(PartialEq, Eq)]
enum IdleWait {
    /// The client is readable: bytes, an EOF or an error, which the read tells apart.
    Readable,
    /// The wait's deadline passed.
    TimedOut,
    /// A drain closes idle connections, or the socket failed.
    Closed,
}

/// A connection's timers ([`PhaseTimer`]).
#[derive(Default)]
struct Timers {
    /// Every phase in turn: the idle wait, the head, the upstream's writes and reads, the
    /// writes of the response.
    op: PhaseTimer,
    /// Overlaps the wait for the response head: when to start watching for a hang-up.
    watch: PhaseTimer,
}

/// Waits until the client is readable, holding no buffer, until `until`.
async fn idle_wait<S: Stream>(
    w: &Worker<S>,
    io: &S,
    until: Instant,
    timer: &PhaseTimer,
) -> IdleWait {
    let wait = timer.run_until(until, io.wait_readable());
    tokio::select! {
        r = wait => match r {
            Ok(Ok(())) => IdleWait::Readable,
            // A read error is the client gone.
            Ok(Err(_)) => IdleWait::Closed,
            // Nothing received: close quietly, like nginx does (or park).
            Err(_) => IdleWait::TimedOut,
        },
        _ = w.drain_closes_idle() => IdleWait::Closed,
    }
}

/// The per-request part of [`serve`], allocated only while a request runs: takes the
/// connection's socket and head buffer, and gives them back when the connection stays
/// open for another request (`None`: it ends).
#[allow(clippy::too_many_arguments)]
async fn request<S: Stream>(
    w: &Rc<Worker<S>>,
    listener: &ListenerCtx,
    io: S,
    peer: SocketAddr,
    buf: BytesMut,
    first: bool,
    accepted: Instant,
    limits_seen: &mut u64,
    timers: &Timers,
) -> Option<(S, BytesMut)> {
    let (head, resp) = heads::take();
    let mut c = Client {
        io,
        peer,
        buf,
        head,
        resp,
    };
    let again = one_request(&mut c, w, listener, first, accepted, limits_seen, timers).await;
    let Client {
        io,
        buf,
        head,
        resp,
        ..
    } = c;
    heads::give_back(head, resp);
    again.then_some((io, buf))
}

/// Parsed heads kept for reuse by the worker thread's connections: a head's vectors
/// (fields, normalised target) keep their capacity from one request to the next without
/// every idle connection holding a set. Each worker is one thread, so a thread-local pool
/// is the worker's pool.
mod heads {
    use crate::protocol::http1::head::{RequestHead, ResponseHead};
    use std::cell::RefCell;

    /// Sets kept at most per worker: as many as requests run at once, typically; beyond
    /// that, sets are freed.
    const KEPT: usize = 256;

    thread_local! {
        static POOL: RefCell<Vec<(RequestHead, ResponseHead)>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> (RequestHead, ResponseHead) {
        POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
    }

    /// Back to the pool. The next `parse_request`/`parse_response` overwrites every field,
    /// as it does between two requests of one connection.
    pub(super) fn give_back(head: RequestHead, resp: ResponseHead) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEPT {
                p.push((head, resp));
            }
        });
    }
}

/// One request of a connection whose client is readable (or has bytes buffered): reads its
/// head, answers it, logs it. Returns whether the connection stays open for another.
async fn one_request<S: Stream>(
    c: &mut Client<S>,
    w: &Rc<Worker<S>>,
    listener: &ListenerCtx,
    first: bool,
    accepted: Instant,
    limits_seen: &mut u64,
    timers: &Timers,
) -> bool {
    let snap = w.snapshot();
    let started = match read_head(c, w, &snap, first, accepted, &timers.op).await {
        Ok(Some(t)) => t,
        Ok(None) => return false,
        Err(HttpError::ClientGone(_)) => return false,
        Err(e) => {
            let status = e.status();
            if matches!(e, HttpError::HeadTooLarge | HttpError::UriTooLong) {
                crate::util::budget::over_budget(
                    crate::util::budget::Buffer::RequestHead,
                    Some(c.peer),
                );
            }
            let body_bytes = send_error(&c.io, w, status, true, None).await;
            linger(&c.io, w).await;
            if snap.access_enabled {
                let entry = Entry {
                    client_ip: c.peer.ip(),
                    method: b"-",
                    target: b"-",
                    version: 1,
                    status,
                    body_bytes,
                    referer: None,
                    user_agent: None,
                    duration_us: 0,
                    upstream: None,
                };
                w.log.borrow_mut().record(snap.access_format, &entry);
            }
            w.stats
                .borrow_mut()
                .request(&listener.name, &NO_ROUTE, status, 0.0);
            return false;
        }
    };
    // The snapshot current when the head arrived, not when the connection started
    // waiting: a keep-alive connection idle across a reload serves the new config.
    let snap = w.snapshot();
    if snap.generation != *limits_seen {
        *limits_seen = snap.generation;
        // A `deny` added by a reload reaches connections accepted before it, as nginx
        // checks `deny` per request: an address blocked in an incident loses its busy
        // keep-alive connections too. Checked once per reload, not per request.
        if w.shared.conn_limiter.denies(c.peer.ip()) {
            tracing::info!(client = %c.peer.ip(), "connection closed: its address is now denied");
            return false;
        }
    }
    let client_ip = client_ip(&c.buf, &c.head, c.peer.ip(), &listener.settings);
    let outcome = handle(c, w, &snap, listener, client_ip, timers).await;
    let elapsed = started.elapsed();
    w.stats.borrow_mut().request(
        &listener.name,
        outcome.route.unwrap_or(&NO_ROUTE),
        outcome.status,
        elapsed.as_secs_f64(),
    );
    if snap.access_enabled {
        let buf = &c.buf[..];
        let header = |name: &str| {
            c.head
                .headers
                .iter()
                .find(|h| h.is(buf, name))
                .map(|h| h.value(buf))
        };
        let upstream_label = outcome
            .upstream
            .as_ref()
            .map(|(u, i)| u.servers[*i].label.as_str());
        let entry = Entry {
            client_ip,
            method: c.head.method(buf),
            target: c.head.target(buf),
            version: c.head.version,
            status: outcome.status,
            body_bytes: outcome.body_bytes,
            referer: header("referer"),
            user_agent: header("user-agent"),
            duration_us: elapsed.as_micros() as u64,
            upstream: upstream_label,
        };
        w.log.borrow_mut().record(snap.access_format, &entry);
    }
    // A response that went out without `Connection: close` promised the client this
    // connection: after a binary upgrade's handover it is kept until the next request
    // (answered with `Connection: close`) or its keep-alive timeout, never cut while
    // the client may be sending (see `read_head`).
    if !outcome.keep_alive || (w.draining.get() && !w.handed_over()) {
        if outcome.status >= 400 && outcome.status != 499 {
            // The request may not have been read to its end (a 413 before the body):
            // let the client read the answer instead of an RST.
            linger(&c.io, w).await;
        }
        return false;
    }
    c.buf.advance(outcome.consumed);
    if let Some(extra) = outcome.leftover {
        // A piece split off a pool buffer (whose rest went back): freed here.
        c.buf.extend_from_slice(&extra);
    }
    // An empty head buffer, however large a head grew it, is given back while the
    // connection waits idle for its next request (`serve`).
    true
}

/// The client address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most untrusted address of `X-Forwarded-For` (nginx `real_ip_recursive on`).
fn client_ip(buf: &[u8], head: &RequestHead, peer: IpAddr, listener: &ListenerSettings) -> IpAddr {
    let values = head
        .known
        .x_forwarded_for
        .iter()
        .map(|&i| head.headers[i].value(buf));
    client_ip_from(values, peer, listener)
}

/// [`client_ip`] over the `X-Forwarded-For` field values in order of arrival, whatever the
/// protocol carried them (HTTP/2 streams too).
pub(crate) fn client_ip_from<'b>(
    values: impl DoubleEndedIterator<Item = &'b [u8]>,
    peer: IpAddr,
    listener: &ListenerSettings,
) -> IpAddr {
    if !listener.trusts(peer) {
        return peer;
    }
    let mut candidate = peer;
    for value in values.rev() {
        for part in value.rsplit(|&b| b == b',') {
            let Some(ip) = std::str::from_utf8(crate::protocol::http1::head::trim(part))
                .ok()
                .and_then(|s| s.parse::<IpAddr>().ok())
            else {
                return candidate;
            };
            candidate = ip;
            if !listener.trusts(ip) {
                return ip;
            }
        }
    }
    candidate
}

/// Reads until a complete request head is in `c.buf`, once the client is readable (`serve`
/// waited for that). `Ok(None)`: the connection ended cleanly between requests (EOF,
/// keep-alive timeout, drain). Returns when the request began.
async fn read_head<S: Stream>(
    c: &mut Client<S>,
    w: &Worker<S>,
    snap: &Snapshot,
    first: bool,
    accepted: Instant,
    timer: &PhaseTimer,
) -> Result<Option<Instant>, HttpError> {
    let max = snap.server.max_header_bytes;
    let mut started = (!c.buf.is_empty()).then(Instant::now);
    let idle_deadline = if first {
        accepted + snap.server.header_timeout
    } else {
        Instant::now() + snap.server.keepalive_timeout
    };
    loop {
        if !c.buf.is_empty() && parse_request(&c.buf, &mut c.head, max)? {
            return Ok(Some(started.unwrap_or_else(Instant::now)));
        }
        let deadline = match started {
            Some(t) => t + snap.server.header_timeout,
            None => idle_deadline,
        };
        if c.buf.capacity() == 0 {
            // A connection's first head, or its next after an idle wait gave the buffer
            // back: a buffer from the worker's cache, not an allocation per request.
            c.buf = super::reuse::take_head_buf();
        }
        if c.buf.capacity() - c.buf.len() < 1024 {
            c.buf
                .reserve(c.buf.len().max(HEAD_BUF_SIZE).min(max + 1024));
        }
        let buf = std::mem::take(&mut c.buf);
        let read = timer.run_until(deadline, c.io.read(buf));
        let result = if started.is_none() {
            tokio::select! {
                r = read => r,
                _ = w.drain_closes_idle() => return Ok(None),
            }
        } else {
            read.await
        };
        match result {
            // Nothing received at all: close quietly, like nginx does for idle clients.
            Err(_) if started.is_none() => return Ok(None),
            Err(_) => return Err(HttpError::HeadTimeout),
            Ok((Ok(0), buf)) => {
                c.buf = buf;
                return if c.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(HttpError::ClientGone("closed mid-head"))
                };
            }
            Ok((Ok(_), buf)) => {
                c.buf = buf;
                started.get_or_insert_with(Instant::now);
            }
            Ok((Err(_), _)) => return Err(HttpError::ClientGone("read error")),
        }
    }
}

/// nginx `lingering_time`: the longest a closing connection keeps discarding input.
const LINGERING_TIME: Duration = Duration::from_secs(30);
/// nginx `lingering_timeout`: the longest wait for more input while lingering.
const LINGERING_TIMEOUT: Duration = Duration::from_secs(5);
/// Input discarded at most while lingering.
const LINGERING_BYTES: usize = 8 << 20;

/// Lingering close, as nginx does after an error response: send FIN, then read and discard
/// what the client still sends, for a bounded time and byte count, before closing. Closing
/// a socket with unread input makes the kernel send an RST, and a client that is still
/// sending (a body the gateway refused) would often lose the response with it.
async fn linger<S: Stream>(io: &S, w: &Worker<S>) {
    io.shutdown_write();
    let until = Instant::now() + LINGERING_TIME;
    let mut discarded = 0;
    let mut b = w.lend_buf();
    while discarded < LINGERING_BYTES {
        b.clear();
        let deadline = until.min(Instant::now() + LINGERING_TIMEOUT);
        let read = tokio::select! {
            r = crate::util::clock::timeout_at(deadline, io.read(b.take())) => r,
            // A drain does not wait for lingering connections.
            _ = w.drained() => {
                io.abort();
                return;
            }
        };
        match read {
            Ok((Ok(n), back)) if n > 0 => {
                discarded += n;
                b.put(back);
            }
            Ok((_, back)) => {
                b.put(back);
                break;
            }
            Err(_) => {
                // The abandoned read holds the buffer; shut the socket so it completes.
                io.abort();
                return;
            }
        }
    }
}

/// Sends a proxy-generated error response.
async fn send_error<S: Stream>(
    io: &S,
    w: &Worker<S>,
    status: u16,
    close: bool,
    extra: Option<(&str, &str)>,
) -> u64 {
    let mut out = w.lend_out();
    let extra_headers: Vec<(&str, &str)> = extra.into_iter().collect();
    let body = error_body(status);
    write_simple_response(&mut out, status, "text/plain", body, close, &extra_headers);
    match timeout(Duration::from_secs(5), io.write_all(out.take())).await {
        Ok((res, back)) => {
            out.put(back);
            if res.is_ok() {
                body.len() as u64
            } else {
                0
            }
        }
        Err(_) => 0,
    }
}

async fn handle<'s, S: Stream>(
    c: &mut Client<S>,
    w: &Rc<Worker<S>>,
    snap: &'s Snapshot,
    listener: &ListenerCtx,
    client_ip: IpAddr,
    timers: &Timers,
) -> Outcome<'s> {
    let buf = &c.buf[..];
    let head = &c.head;
    let has_body = !matches!(head.framing, BodyFraming::None | BodyFraming::Length(0));
    // limits.request_rate (nginx limit_req): over it, 429 with Retry-After. The verdict is
    // taken before awaiting so the limiter's borrow ends here.
    if let Err(retry_after) = w.request_rate(snap, client_ip) {
        let retry_after = retry_after.to_string();
        let sent = send_error(&c.io, w, 429, has_body, Some(("Retry-After", &retry_after))).await;
        return Outcome {
            consumed: head.len,
            ..Outcome::error(429, !has_body, sent)
        };
    }
    let Some(route) = snap.router.find(head.host(buf), head.path()) else {
        let sent = send_error(&c.io, w, 404, has_body, None).await;
        return Outcome {
            consumed: head.len,
            ..Outcome::error(404, !has_body, sent)
        };
    };
    if let BodyFraming::Length(n) = head.framing {
        if n > route.max_body_size {
            let sent = send_error(&c.io, w, 413, true, None).await;
            return Outcome {
                route: Some(&route.label),
                ..Outcome::error(413, false, sent)
            };
        }
    }
    if head.method(buf) == b"TRACE" && !route.allow_trace {
        let sent = send_error(&c.io, w, 405, has_body, None).await;
        return Outcome {
            route: Some(&route.label),
            consumed: head.len,
            ..Outcome::error(405, !has_body, sent)
        };
    }
    if route.websocket {
        use crate::protocol::http1::head::WebSocketHandshake;
        let (status, extra) = match head.websocket_handshake(buf) {
            WebSocketHandshake::NotAsked | WebSocketHandshake::Valid => (0, None),
            WebSocketHandshake::Invalid => (400, None),
            WebSocketHandshake::UnsupportedVersion => (426, Some(("Sec-WebSocket-Version", "13"))),
        };
        if status != 0 {
            let sent = send_error(&c.io, w, status, true, extra).await;
            return Outcome {
                route: Some(&route.label),
                ..Outcome::error(status, false, sent)
            };
        }
    }
    match &route.action {
        Action::Respond(respond) => {
            let mut out = w.lend_out();
            let close = has_body || !head.wants_keep_alive() || w.draining.get();
            let body = if head.is_head(buf) {
                &b""[..]
            } else {
                respond.body.as_bytes()
            };
            write_simple_response(
                &mut out,
                respond.status,
                &respond.content_type,
                respond.body.as_bytes(),
                close,
                &[],
            );
            if head.is_head(buf) {
                let head_len = out.len() - respond.body.len();
                out.truncate(head_len);
            }
            // Bounded like every write to a client: one that does not read is dropped.
            let res = match timeout(route.send_timeout, c.io.write_all(out.take())).await {
                Ok((res, back)) => {
                    out.put(back);
                    res.is_ok()
                }
                Err(_) => {
                    c.io.abort();
                    false
                }
            };
            Outcome {
                status: respond.status,
                body_bytes: body.len() as u64,
                route: Some(&route.label),
                upstream: None,
                keep_alive: res && !close,
                consumed: head.len,
                leftover: None,
            }
        }
        Action::Proxy(index) => {
            let upstream = &snap.upstreams[*index];
            let to = Target {
                route,
                upstream,
                client_ip,
            };
            match proxy(c, w, snap, to, listener, timers).await {
                Ok(outcome) => outcome,
                Err(failure) => {
                    let status = failure.error.status();
                    if failure.error.side() != Side::Client
                        && !matches!(failure.error, HttpError::Shutdown)
                    {
                        w.stats
                            .borrow_mut()
                            .upstream_error(&upstream.metric_name, failure.error.kind());
                    }
                    if !failure.error.is_refused_request() {
                        tracing::debug!(upstream = %upstream.name, error = %failure.error, "request failed");
                    }
                    if failure.error == CLIENT_WRITE_TIMEOUT {
                        crate::io::sockets::reset_on_close(c.io.raw_fd());
                    }
                    // A 499 (client gone) or a response already started sends no error
                    // body; a response cut short logs the body bytes that did go out.
                    let sent = if failure.response_started {
                        failure.body_bytes
                    } else if !matches!(failure.error, HttpError::ClientGone(_)) {
                        send_error(&c.io, w, status, true, None).await
                    } else {
                        0
                    };
                    Outcome {
                        route: Some(&route.label),
                        upstream: failure.server.map(|s| (&**upstream, s)),
                        ..Outcome::error(status, false, sent)
                    }
                }
            }
        }
    }
}

/// Where a request is proxied to.
struct Target<'s> {
    route: &'s Route,
    upstream: &'s Arc<Upstream>,
    client_ip: IpAddr,
}

/// Forwards one request to the upstream through the exchange, and runs the WebSocket
/// tunnel when the upstream accepted an upgrade.
async fn proxy<'s, S: Stream>(
    c: &mut Client<S>,
    w: &Rc<Worker<S>>,
    snap: &Snapshot,
    to: Target<'s>,
    listener: &ListenerCtx,
    timers: &Timers,
) -> Result<Outcome<'s>, Failure> {
    let Target {
        route,
        upstream,
        client_ip,
    } = to;
    let settings = &snap.server;
    let Client {
        io: client,
        peer,
        buf,
        head,
        resp,
    } = c;
    let buf = &buf[..];
    let upgrade = route.websocket
        && head.websocket_handshake(buf) == crate::protocol::http1::head::WebSocketHandshake::Valid;

    // The body bytes that arrived with the head go upstream with it.
    let mut body = Body::request(head.framing, route.max_body_size);
    let after_head = &buf[head.len..];
    let prefix = body
        .take(after_head, |_| {})
        .map_err(|e| Failure::before_response(e, None))?;
    let fwd = Forwarding {
        client_ip,
        peer_ip: peer.ip(),
        proto: listener.proto,
        upgrade,
        default_host: &listener.name,
        trusted_peer: listener.settings.trusts(peer.ip()),
        keep_forwarding: &settings.forward_client_headers,
        underscores: settings.underscores_in_headers,
    };
    let mut body_clock = RateClock::new(
        settings.client_body_timeout,
        settings.client_body_timeout,
        settings.client_min_rate,
    );
    body_clock.moved(prefix);
    let mut downstream = H1Client {
        io: &*client,
        w,
        buf,
        head,
        fwd,
        prefix,
        body,
        body_clock,
        send_timeout: route.send_timeout,
        min_rate: settings.client_min_rate,
        sent_continue: false,
        leftover: None,
        out: w.lend_out(),
        write_clock: None,
        close: false,
        splice_min: if crate::io::splice::enabled() && client.spliceable() {
            settings.splice_bodies_min
        } else {
            0
        },
        splice_response: false,
        pipe_limit: settings.pipes_per_worker,
        pipe: None,
        no_pipe: false,
        spliced: [false; 2],
        timer: &timers.op,
        watch: &timers.watch,
    };
    let x = Exchange {
        w,
        route,
        upstream,
        client_ip,
        request_buffering: settings.request_buffering,
        ws_accept: upgrade.then(|| crate::protocol::http1::head::websocket_accept(buf, head)),
        server: std::cell::Cell::new(None),
        timer: &timers.op,
    };
    // A drain that runs out of `graceful_timeout` ends the exchange here, where the
    // request is still known, so that it is answered (503, when no byte of the response
    // went out) and logged like any other, not dropped with the worker.
    let done = tokio::select! {
        biased;
        done = exchange::run(&x, &mut downstream, resp) => done?,
        _ = w.graceful_timeout_passed() => {
            return Err(Failure {
                error: HttpError::Shutdown,
                response_started: downstream.write_clock.is_some(),
                server: x.server.get(),
                body_bytes: 0,
            })
        }
    };
    let consumed = head.len + prefix;
    let close = downstream.close;
    let leftover = downstream.leftover.take();
    drop(downstream);
    let Some(tunnel) = done.upgraded else {
        return Ok(Outcome {
            status: done.status,
            body_bytes: done.body_bytes,
            route: Some(&route.label),
            upstream: Some((&**upstream, done.server)),
            keep_alive: !close,
            consumed,
            leftover,
        });
    };
    // WebSocket: from here the two connections are one tunnel.
    use crate::dataplane::conn::tunnel as relay_tunnel;
    let bytes = relay_tunnel::run(
        &*client,
        &tunnel.conn,
        &after_head[prefix..],
        tunnel.from_upstream,
        w,
        route.read_timeout,
    );
    let bytes = relay_tunnel::counted(w, &upstream.metric_name, bytes).await;
    Ok(Outcome {
        status: done.status,
        body_bytes: bytes.to_client,
        route: Some(&route.label),
        upstream: Some((&**upstream, done.server)),
        keep_alive: false,
        consumed,
        leftover,
    })
}

/// How long a response may be awaited before the client connection is watched for a
/// hang-up: fast responses never pay for registering the socket with the reactor.
const CLIENT_WATCH_AFTER: Duration = Duration::from_millis(500);

/// The HTTP/1 client connection as the exchange sees it: the source of the request body
/// and the sink of the response.
struct H1Client<'c, S: Stream> {
    io: &'c S,
    w: &'c Worker<S>,
    buf: &'c [u8],
    head: &'c RequestHead,
    fwd: Forwarding<'c>,
    /// Body bytes that came in the head buffer.
    prefix: usize,
    body: Body,
    /// Bounds the whole request body by its size (`client_body_timeout`, `client_min_rate`).
    body_clock: RateClock,
    send_timeout: Duration,
    min_rate: u64,
    sent_continue: bool,
    /// Bytes read past the end of the body: the next pipelined request.
    leftover: Option<BytesMut>,
    /// The response head being sent.
    out: Lent<'c, Vec<u8>, S>,
    /// Bounds the whole response by its size; starts with the response head, so the time
    /// the upstream took is not charged to the client.
    write_clock: Option<RateClock>,
    /// The connection closes after this response.
    close: bool,
    /// `server.splice_bodies_min` for a plaintext client with splice on; 0: never splice.
    splice_min: u64,
    /// The response goes as the upstream framed it, so its body may be spliced.
    splice_response: bool,
    /// The worker's pipe budget (`budget::pipes_per_worker`).
    pipe_limit: usize,
    /// The pipe this request's spliced bodies go through, taken on first use.
    pipe: Option<PooledPipe>,
    /// The pool had no pipe: copy for the rest of this request.
    no_pipe: bool,
    /// A body was spliced: [request, response] (counted once each).
    spliced: [bool; 2],
    /// The connection's phase timer: bounds the response writes.
    timer: &'c PhaseTimer,
    /// When to start watching for a hang-up while the response head is awaited.
    watch: &'c PhaseTimer,
}

impl<S: Stream> H1Client<'_, S> {
    /// Makes sure a pipe is at hand for a spliced body, from the worker's pool on first use
    /// (one that holds stale bytes after a failure is never used again); false: copy.
    fn take_pipe(&mut self, way: SpliceWay) -> bool {
        if self.pipe.as_ref().is_some_and(|p| p.buffered() > 0) {
            self.pipe = None;
        }
        if self.pipe.is_none() && !self.no_pipe {
            self.pipe = pipe::take_one(self.pipe_limit);
            self.no_pipe = self.pipe.is_none();
        }
        if self.pipe.is_none() {
            return false;
        }
        let i = match way {
            SpliceWay::Request => 0,
            SpliceWay::Response => 1,
        };
        if !self.spliced[i] {
            self.spliced[i] = true;
            self.w.stats.borrow_mut().body_splices[i] += 1;
        }
        true
    }
}

impl<S: Stream> RequestSource<S> for H1Client<'_, S> {
    fn write_request_start(&self, out: &mut Vec<u8>) {
        rewrite::write_upstream_request(out, self.buf, self.head, &self.fwd);
        out.extend_from_slice(&self.buf[self.head.len..][..self.prefix]);
    }

    fn held(&self) -> usize {
        self.prefix
    }

    fn idempotent(&self) -> bool {
        self.head.is_idempotent(self.buf)
    }

    fn is_head(&self) -> bool {
        self.head.is_head(self.buf)
    }

    fn body_done(&self) -> bool {
        self.body.is_done()
    }

    async fn go_ahead(&mut self) -> Result<(), HttpError> {
        if !self.head.known.expect_continue || self.sent_continue {
            return Ok(());
        }
        self.sent_continue = true;
        send_continue(self.io, self.send_timeout).await
    }

    /// A missed deadline is a 408 (the exchange closes the upstream connection).
    async fn read_body(&mut self, b: &mut Lent<'_, BytesMut, S>) -> Result<usize, HttpError> {
        b.ensure();
        b.clear();
        let (res, got) = match crate::util::clock::timeout_at(
            self.body_clock.deadline(),
            self.io.read(b.take()),
        )
        .await
        {
            Ok(r) => r,
            // The abandoned read owns the buffer; the connection closes after the 408.
            Err(_) => return Err(request_body_too_slow()),
        };
        b.put(got);
        match res {
            Ok(0) | Err(_) => return Err(HttpError::ClientGone("closed mid-body")),
            Ok(n) => self.body_clock.moved(n),
        }
        let n = self.body.take(b, |_| {})?;
        if n < b.len() {
            self.leftover = Some(b.split_off(n));
        }
        Ok(n)
    }

    /// The client's body clock bounds the reads, `send_timeout` each write upstream.
    async fn splice_body(
        &mut self,
        upstream: &S,
        send_timeout: Duration,
    ) -> Option<Result<(), HttpError>> {
        let run = self.body.opaque_run();
        if self.splice_min == 0
            || run < self.splice_min
            || !upstream.spliceable()
            || !self.take_pipe(SpliceWay::Request)
        {
            return None;
        }
        let pipe = self.pipe.as_deref_mut()?;
        let moved = splice_body(
            self.io,
            upstream,
            pipe,
            run,
            Bound::Clock(&mut self.body_clock),
            Bound::Pause(send_timeout),
            SpliceWay::Request,
        )
        .await;
        Some(match moved {
            Ok(n) if n < run => Err(HttpError::ClientGone("closed mid-body")),
            Ok(n) => {
                self.body.skip(n);
                Ok(())
            }
            Err(e) => Err(e),
        })
    }
}

impl<S: Stream> ResponseSink for H1Client<'_, S> {
    /// Relayed, except a 100 the proxy already sent and any to an HTTP/1.0 client
    /// (RFC 9110 §15.2).
    async fn interim(&mut self, raw: &[u8], resp: &ResponseHead) -> Result<(), HttpError> {
        if self.head.version != 1 || (resp.status == 100 && self.sent_continue) {
            return Ok(());
        }
        let mut out = self.w.lend_out();
        rewrite::write_informational(&mut out, raw, resp);
        match timeout(self.send_timeout, self.io.write_all(out.take())).await {
            Ok((r, o)) => {
                out.put(o);
                r.map_err(|_| HttpError::ClientGone("write"))
            }
            Err(_) => Err(CLIENT_WRITE_TIMEOUT),
        }
    }

    fn prepare_head(&mut self, raw: &[u8], resp: &ResponseHead, upgrade: bool) -> BodyForm {
        let version = self.head.version;
        let close = !self.head.wants_keep_alive()
            || self.w.draining.get()
            || resp.framing == BodyFraming::UntilClose;
        self.out.clear();
        let framing = rewrite::write_client_response(
            &mut self.out,
            raw,
            resp,
            version,
            close || version == 0 && resp.framing == BodyFraming::Chunked,
            upgrade,
        );
        self.close = close || framing == ClientFraming::Dechunk;
        self.splice_response = framing == ClientFraming::Same;
        // A client that takes the response too slowly is cut off (and the upstream
        // connection with it, never pooled): a per-write timeout alone lets a reader of a
        // large response hold both connections for as long as it trickles.
        self.write_clock = Some(RateClock::new(
            self.send_timeout,
            self.send_timeout,
            self.min_rate,
        ));
        match framing {
            ClientFraming::Dechunk => BodyForm::Payload,
            ClientFraming::Same => BodyForm::Framed,
        }
    }

    async fn send_head(&mut self, first: &[u8]) -> Result<(), HttpError> {
        self.out.extend_from_slice(first);
        let out = self.out.take();
        let (res, back) = self.send_body(out).await;
        if let Some(back) = back {
            self.out.put(back);
        }
        res
    }

    async fn send_body<B: BoundedBuf>(&mut self, b: B) -> (Result<(), HttpError>, Option<B>) {
        let (send_timeout, min_rate) = (self.send_timeout, self.min_rate);
        let clock = self
            .write_clock
            .get_or_insert_with(|| RateClock::new(send_timeout, send_timeout, min_rate));
        write_client(self.io, b, clock, self.timer).await
    }

    fn splice_min(&self) -> u64 {
        if self.splice_response {
            self.splice_min
        } else {
            0
        }
    }

    /// The upstream's `read_timeout` bounds each read, the response's write clock the
    /// client's pace, as on the copy path.
    async fn splice_body<U: Stream>(
        &mut self,
        upstream: &U,
        len: u64,
        read_timeout: Duration,
    ) -> Option<Result<u64, HttpError>> {
        if !self.take_pipe(SpliceWay::Response) {
            return None;
        }
        let (send_timeout, min_rate) = (self.send_timeout, self.min_rate);
        let clock = self
            .write_clock
            .get_or_insert_with(|| RateClock::new(send_timeout, send_timeout, min_rate));
        let pipe = self.pipe.as_deref_mut()?;
        Some(
            splice_body(
                upstream,
                self.io,
                pipe,
                len,
                Bound::Pause(read_timeout),
                Bound::Clock(clock),
                SpliceWay::Response,
            )
            .await,
        )
    }

    async fn gone(&mut self) {
        self.watch.sleep_for(CLIENT_WATCH_AFTER).await;
        crate::io::peer_closed(self.io).await;
    }
}

/// Tells a client that sent `Expect: 100-continue` to go ahead with its body, within
/// `send_timeout` like every other write to it: a client that does not read must not hold
/// the request (and, once connected, an upstream connection) forever.
async fn send_continue<S: Stream>(client: &S, send_timeout: Duration) -> Result<(), HttpError> {
    let write = client.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
    match timeout(send_timeout, write).await {
        Ok((Ok(()), _)) => Ok(()),
        Ok((Err(_), _)) => Err(HttpError::ClientGone("write")),
        Err(_) => {
            crate::util::budget::refused(
                crate::util::budget::Refusal::SlowClient,
                &"100 Continue not taken: connection closed",
            );
            // The abandoned write is completed by shutting the socket down.
            client.abort();
            Err(CLIENT_WRITE_TIMEOUT)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::conn::exchange::tests::{addr, script, upstreams, worker, OK};
    use crate::io::memory::{MemoryStream, Step};

    #[test]
    fn quick_wakes_double_the_park_delay_and_a_long_park_resets_it() {
        let base = Duration::from_millis(100);
        let ms = Duration::from_millis;
        // Woken 50 ms into each park: the delay doubles, up to the cap, and stays there.
        let mut backoff = 0;
        for expected in 1..=MAX_PARK_BACKOFF {
            backoff = next_park_backoff(base, backoff, ms(50));
            assert_eq!(backoff, expected);
            assert_eq!(park_delay(base, backoff), base * (1 << expected));
        }
        assert_eq!(next_park_backoff(base, backoff, ms(50)), MAX_PARK_BACKOFF);
        // Quick is within 8 of the delays it parked under.
        assert_eq!(next_park_backoff(base, 0, ms(799)), 1);
        assert_eq!(next_park_backoff(base, 0, ms(800)), 0);
        assert_eq!(next_park_backoff(base, 4, ms(12_000)), 5, "8 × 1.6 s");
        assert_eq!(next_park_backoff(base, 4, ms(12_800)), 0);
        // A park that lasted: back to the configured delay.
        assert_eq!(
            next_park_backoff(base, MAX_PARK_BACKOFF, Duration::from_secs(3600)),
            0
        );
        assert_eq!(park_delay(base, 0), base);
    }

    #[test]
    fn keep_alive_session_reuses_the_upstream_and_gives_every_buffer_back() {
        let w = Rc::new(worker(1));
        let ups = upstreams();
        script(
            &ups,
            addr(0),
            vec![Step::Data(OK.to_vec()), Step::Data(OK.to_vec())],
        );
        let listener = ListenerCtx::new(w.shared.snapshot().listeners[0].clone());
        // Two pipelined requests (the second with a body), then the client closes.
        let requests = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc";
        let (client, peer) = MemoryStream::scripted([Step::Data(requests.to_vec()), Step::Eof]);
        let session = serve(
            w.clone(),
            listener,
            client,
            "198.51.100.7:40000".parse().unwrap(),
            Instant::now(),
            BytesMut::new(),
            None,
        );
        crate::io::memory::block_on(async {
            timeout(Duration::from_secs(10), session)
                .await
                .expect("the session ends when the client closes");
        });
        let answered = peer.written();
        let oks = answered
            .windows(15)
            .filter(|w| w == b"HTTP/1.1 200 OK")
            .count();
        assert_eq!(oks, 2, "{}", String::from_utf8_lossy(&answered));
        let opened = &ups.borrow().opened;
        assert_eq!(
            opened.len(),
            1,
            "the second request reused the pooled connection"
        );
        let sent = opened[0].1.written();
        assert!(
            sent.ends_with(b"\r\n\r\nabc"),
            "{}",
            String::from_utf8_lossy(&sent)
        );
        assert_eq!(w.bufs_lent(), 0, "every buffer back in its pool");
    }

    #[test]
    fn continue_write_is_bounded_by_send_timeout() {
        crate::io::memory::block_on(async {
            let (io, peer) = MemoryStream::pair();
            send_continue(&io, Duration::from_millis(50))
                .await
                .expect("a reading client is told to go ahead");
            assert_eq!(peer.written(), b"HTTP/1.1 100 Continue\r\n\r\n");
            // A client that does not read: the write is abandoned at send_timeout.
            peer.stall_writes.set(true);
            let started = Instant::now();
            let r = send_continue(&io, Duration::from_millis(50)).await;
            assert_eq!(r, Err(HttpError::ClientGone("write timeout")));
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(
                peer.aborted.get(),
                "the socket is shut so the write completes"
            );
        });
    }
}
