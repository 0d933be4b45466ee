//! The exchange: one request forwarded to an upstream and its response relayed back,
//! whatever protocol the client speaks.
//!
//! Given a routed request (its [`RequestSource`]: head and body) and a [`ResponseSink`]
//! (where the response head and body go), [`run`] picks a server, reuses a pooled
//! connection or connects, forwards the request (HTTP/1.1 upstream), reads the response
//! head, relays informational responses, the final head and the body to the sink, and
//! retries as [`crate::policy::retry`] decides. It returns what happened ([`Exchanged`])
//! or why it failed ([`Failure`], with whose fault it is in its [`HttpError`]).
//!
//! The HTTP/1 session (`h1.rs`) is the first caller: its client connection is both source
//! and sink. An HTTP/2 stream implements the two traits over its `RecvStream` and
//! `SendResponse`. The client side owns everything about the client protocol: reading heads,
//! `100 Continue`, keep-alive, how a response head is written, timeouts of client writes.
//! The exchange owns everything about the upstream: the pick, the pool, the retry, upstream
//! timeouts, and which failures count against a server.
//!
//! A `101 Switching Protocols` (a WebSocket handshake the caller validated and announced
//! with [`Exchange::ws_accept`]) is returned as [`Exchanged::upgraded`]: the caller
//! tunnels, outside this loop.
//!
//! Buffers are borrowed from the worker's pools through [`Lent`] guards, so they go back on
//! every exit by construction.

use crate::dataplane::conn::relay::{relay_body, RelayFailed, UpstreamReads};
pub(crate) use crate::dataplane::conn::relay::{BodyForm, ResponseSink};
use crate::dataplane::ctx::{Lent, Worker};
use crate::io::Stream;
use crate::policy::retry::{Attempt, Decision, RetryPolicy};
use crate::policy::route::Route;
use crate::protocol::error::{HttpError, Side};
use crate::protocol::http1::head::{parse_response, BodyFraming, ResponseHead};
use crate::upstream::Upstream;
use crate::util::budget::{upstream_warning, UpstreamWarning};
use crate::util::clock::{self, PhaseTimer};
use bytes::{Buf, BytesMut};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::timeout;
use tokio_uring::buf::BoundedBuf;

/// Largest upstream response head accepted.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most informational responses before the final one; more is an upstream that never
/// answers, not a slow one.
const MAX_INTERIM: usize = 32;

/// Where the request comes from: its head (as sent upstream) and its body.
#[allow(async_fn_in_trait)] // Workers are single-threaded by design: futures are never Send.
pub trait RequestSource<S: Stream> {
    /// Writes the request as it goes upstream (an HTTP/1.1 head, then the body bytes the
    /// source already holds, [`RequestSource::held`] of them) into `out`.
    fn write_request_start(&self, out: &mut Vec<u8>);
    /// Body bytes [`RequestSource::write_request_start`] includes.
    fn held(&self) -> usize;
    /// The method is idempotent (RFC 9110 §9.2.2): with its body held whole, the request
    /// may be sent again.
    fn idempotent(&self) -> bool;
    /// A `HEAD` request: the response has no body whatever its framing says.
    fn is_head(&self) -> bool;
    /// The body has been read to its end.
    fn body_done(&self) -> bool;
    /// Asks the client for its body if it waits to be asked (`Expect: 100-continue`);
    /// nothing otherwise, or when already asked.
    async fn go_ahead(&mut self) -> Result<(), HttpError>;
    /// Reads the next piece of the body into `buf` (cleared first; it may hold no buffer
    /// yet, so [`Lent::ensure`] it first): returns how many of its first bytes are body.
    /// Errors are the client's ([`Side::Client`]).
    async fn read_body(&mut self, buf: &mut Lent<'_, BytesMut, S>) -> Result<usize, HttpError>;
    /// Splices the next run of body bytes straight from the client socket into `upstream`
    /// (each write within `send_timeout`), when the source can (a plaintext HTTP/1 client)
    /// and the run is long enough (`server.splice_bodies_min`): `Some` once it moved them,
    /// `None` when the next piece must be read with [`RequestSource::read_body`] instead.
    async fn splice_body(
        &mut self,
        upstream: &S,
        send_timeout: std::time::Duration,
    ) -> Option<Result<(), HttpError>> {
        let _ = (upstream, send_timeout);
        None
    }
}

/// One exchange's fixed inputs.
pub struct Exchange<'a, S: Stream> {
    pub w: &'a Worker<S>,
    pub route: &'a Route,
    pub upstream: &'a Arc<Upstream>,
    /// The client address (balancing by client IP).
    pub client_ip: IpAddr,
    /// `server.request_buffering`: body bytes read before an upstream is chosen.
    pub request_buffering: usize,
    /// The `Sec-WebSocket-Accept` a 101 must carry; `None`: a 101 is refused.
    pub(crate) ws_accept: Option<[u8; 28]>,
    /// The server the request went to last, set once connected: a caller that drops the
    /// exchange (an HTTP/2 stream reset by its client) still logs where it went.
    pub(crate) server: std::cell::Cell<Option<usize>>,
    /// Bounds each upstream write and read (`send_timeout`, `read_timeout`): re-armed per
    /// operation, and shared with the sink's own writes, which never overlap them.
    pub(crate) timer: &'a PhaseTimer,
}

/// A response relayed (or a tunnel to run).
pub struct Exchanged<S> {
    pub status: u16,
    /// Body bytes sent to the sink.
    pub body_bytes: u64,
    /// The server that answered (an index into the upstream's servers).
    pub server: usize,
    /// A validated `101`: the head went to the client; the caller runs the tunnel.
    pub upgraded: Option<Upgraded<S>>,
}

/// The upstream side of a WebSocket tunnel.
pub struct Upgraded<S> {
    pub conn: S,
    /// Bytes the upstream sent after its 101 head: a pool buffer, the caller's to give back.
    pub from_upstream: BytesMut,
}

/// An exchange that failed.
#[derive(Debug)]
pub struct Failure {
    pub error: HttpError,
    /// Part of the response was sent: the client can only be told by closing.
    pub(crate) response_started: bool,
    /// The server involved, if one was.
    pub server: Option<usize>,
    /// Response body bytes the client was sent before the failure (0 unless
    /// `response_started`): logged as what the client got.
    pub(crate) body_bytes: u64,
}

impl Failure {
    pub(crate) fn before_response(error: HttpError, server: Option<usize>) -> Failure {
        Failure {
            error,
            response_started: false,
            server,
            body_bytes: 0,
        }
    }
}

/// Forwards one request and relays its response; see the module documentation.
pub async fn run<S: Stream, D: RequestSource<S> + ResponseSink>(
    x: &Exchange<'_, S>,
    d: &mut D,
    resp: &mut ResponseHead,
) -> Result<Exchanged<S>, Failure> {
    let (w, route, upstream) = (x.w, x.route, x.upstream);
    let mut out = w.lend_out();
    // Taken on the first body read only: a request without a body (most) holds no body
    // buffer while its response is awaited, which is as long as the upstream takes.
    let mut body_buf = w.lend_later();

    // Read the body, or its first `request_buffering` bytes, before any upstream is chosen
    // (as nginx does): a client that trickles a small body then holds nothing upstream.
    let mut buffered = Vec::new();
    if !d.body_done() && x.request_buffering > d.held() {
        d.go_ahead()
            .await
            .map_err(|e| Failure::before_response(e, None))?;
        let limit = x.request_buffering - d.held();
        while !d.body_done() && buffered.len() < limit {
            let n = d
                .read_body(&mut body_buf)
                .await
                .map_err(|e| Failure::before_response(e, None))?;
            buffered.extend_from_slice(&body_buf[..n]);
        }
    }
    let replayable = d.idempotent() && d.body_done();
    let is_head = d.is_head();

    // Connect, send the request, and read the response head, retrying as
    // `policy::retry` says.
    let upstream_started = Instant::now();
    let mut retry = RetryPolicy::new(upstream.servers.len(), replayable);
    let mut last_error = HttpError::NoHealthyUpstream;
    // The server `last_error` came from: logged with the failure, as nginx's
    // `$upstream_addr` names the server a failed connect went to.
    let mut last_server = None;
    let mut ub = w.lend_buf();
    let (conn, server, active) = loop {
        let now = clock::now_ms();
        let picked = w.with_upstream(upstream, |p| {
            let server = p.picker.pick(upstream, x.client_ip, now, retry.tried())?;
            let idle = if retry.fresh_only() {
                None
            } else {
                p.take_idle(server)
            };
            Some((server, idle))
        });
        let Some((server, idle)) = picked else {
            return Err(Failure::before_response(last_error, last_server));
        };
        let addr = upstream.servers[server].addr;
        let (server, conn, reused) = match idle {
            Some(conn) => (server, conn, true),
            None => match connect_or_wait(
                w,
                upstream,
                server,
                route.connect_timeout,
                !retry.fresh_only(),
                d,
            )
            .await
            {
                Ok(connected) => connected,
                Err(WaitEnd::ClientGone) => {
                    return Err(Failure::before_response(
                        HttpError::ClientGone("closed while waiting for a descriptor"),
                        None,
                    ));
                }
                Err(WaitEnd::Io(e)) if crate::util::budget::is_local_resource_error(&e) => {
                    // Our shortage, not the server's, and descriptors did not free up
                    // within connect_timeout (or memory ran short): this request fails
                    // (500, as nginx when its socket() fails), no server is marked down,
                    // and the next request is served normally once resources free up.
                    crate::util::budget::refused(crate::util::budget::Refusal::UpstreamLocal, &e);
                    return Err(Failure::before_response(
                        HttpError::LocalResource("connect"),
                        None,
                    ));
                }
                Err(WaitEnd::Io(e)) => {
                    if let Some(events) = upstream_warning(UpstreamWarning::ConnectFailed) {
                        tracing::warn!(upstream = %upstream.name, server = %addr, error = %e, events, "connect failed");
                    }
                    mark_failure(upstream, server);
                    let error = if e.kind() == std::io::ErrorKind::TimedOut {
                        HttpError::UpstreamTimeout("connect")
                    } else {
                        HttpError::UpstreamFailed("connect")
                    };
                    if retry.connect_failed(server, &error) == Decision::GiveUp {
                        return Err(Failure::before_response(error, Some(server)));
                    }
                    last_error = error;
                    last_server = Some(server);
                    continue;
                }
            },
        };
        x.server.set(Some(server));
        let active = ActiveGuard::new(w, upstream, server);
        // A buffer left with an abandoned operation is replaced for the next attempt.
        out.ensure();
        ub.ensure();
        out.clear();
        ub.clear();
        d.write_request_start(&mut out);
        out.extend_from_slice(&buffered);

        // Send the head (and the body bytes held).
        let write_failed = match x
            .timer
            .run_for(route.send_timeout, conn.write_all(out.take()))
            .await
        {
            Ok((Ok(()), o)) => {
                out.put(o);
                None
            }
            Ok((Err(_), o)) => {
                out.put(o);
                Some(HttpError::UpstreamFailed("write"))
            }
            Err(_) => Some(HttpError::UpstreamTimeout("send")),
        };
        if let Some(error) = write_failed {
            drop(active);
            let attempt = Attempt {
                reused,
                response_started: false,
            };
            if retry.attempt_failed(attempt, &error) == Decision::Replay {
                continue;
            }
            mark_failure(upstream, server);
            return Err(Failure::before_response(error, Some(server)));
        }

        // The rest of the request body, streamed.
        if !d.body_done() {
            let streamed = async {
                d.go_ahead().await?;
                stream_body(d, &conn, &mut body_buf, route).await
            };
            if let Err(error) = streamed.await {
                book_failure(upstream, server, &error);
                return Err(Failure::before_response(error, Some(server)));
            }
        }

        // The response head (informational responses are relayed as they come).
        match response_head(x, d, &conn, &mut ub, resp, is_head).await {
            // Still counted in flight while the body is relayed.
            Ok(()) => break (conn, server, active),
            Err((error, response_started)) => {
                drop(active);
                let attempt = Attempt {
                    reused,
                    response_started,
                };
                if retry.attempt_failed(attempt, &error) == Decision::Replay {
                    continue;
                }
                book_failure(upstream, server, &error);
                return Err(Failure::before_response(error, Some(server)));
            }
        }
    };
    upstream.servers[server].state.record_success();
    w.stats
        .borrow_mut()
        .upstream_at(active.stats_slot)
        .duration
        .observe(upstream_started.elapsed().as_secs_f64());

    let upgrade = x.ws_accept.is_some() && resp.status == 101;
    let form = d.prepare_head(&ub, resp, upgrade);
    let status = resp.status;
    let framing = resp.framing;
    let resp_keep_alive = resp.keep_alive();
    ub.advance(resp.len);
    let started = |error| Failure {
        error,
        response_started: true,
        server: Some(server),
        body_bytes: 0,
    };

    if upgrade {
        // WebSocket: from here the two connections are one tunnel, run by the caller.
        d.send_head(&[]).await.map_err(started)?;
        return Ok(Exchanged {
            status,
            body_bytes: 0,
            server,
            upgraded: Some(Upgraded {
                conn,
                from_upstream: ub.into_inner(),
            }),
        });
    }

    // Pooled only when both messages ended where their framing said: the request body was
    // sent whole (the relay reads no more of it, so this cannot change below), the response
    // is keep-alive and delimited by length or chunks, and the relay saw its exact end with
    // nothing after it. It goes back as soon as the upstream is done with it, before the
    // client has taken the last bytes (see `relay_body`).
    let reusable = resp_keep_alive && d.body_done() && framing != BodyFraming::UntilClose;
    let release = |conn: S| {
        if reusable {
            w.with_upstream(upstream, |p| p.put_idle(server, conn));
        }
    };
    let reads = UpstreamReads {
        read_timeout: route.read_timeout,
        timer: x.timer,
    };
    let relay = relay_body(conn, release, d, &mut ub, framing, form, reads).await;
    drop(active);
    match relay {
        Ok(sent) => Ok(Exchanged {
            status,
            body_bytes: sent.body_bytes,
            server,
            upgraded: None,
        }),
        Err(RelayFailed {
            error,
            response_started,
            body_bytes,
        }) => {
            if error.side() == Side::Upstream {
                book_failure(upstream, server, &error);
                if let Some(events) = upstream_warning(UpstreamWarning::ResponseCutShort) {
                    tracing::warn!(upstream = %upstream.name, server = %upstream.servers[server].label, error = %error, response_started, events, "response cut short");
                }
            }
            Err(Failure {
                error,
                response_started,
                server: Some(server),
                body_bytes,
            })
        }
    }
}

/// Streams the rest of the request body from the source to the upstream: spliced where
/// the source can, else one read and one write at a time through `buf`.
async fn stream_body<S: Stream, D: RequestSource<S>>(
    d: &mut D,
    conn: &S,
    buf: &mut Lent<'_, BytesMut, S>,
    route: &Route,
) -> Result<(), HttpError> {
    while !d.body_done() {
        if let Some(spliced) = d.splice_body(conn, route.send_timeout).await {
            spliced?;
            continue;
        }
        let n = d.read_body(buf).await?;
        if n == 0 {
            continue;
        }
        let b = buf.take();
        match timeout(route.send_timeout, conn.write_all(b.slice(..n))).await {
            Err(_) => return Err(HttpError::UpstreamTimeout("send body")),
            Ok((res, slice)) => {
                buf.put(slice.into_inner());
                if res.is_err() {
                    return Err(HttpError::UpstreamFailed("write body"));
                }
            }
        }
    }
    Ok(())
}

/// Reads the final response head into `ub`, relaying informational responses to the sink.
/// On error also says whether any response byte had arrived (then no replay).
async fn response_head<S: Stream, D: ResponseSink>(
    x: &Exchange<'_, S>,
    d: &mut D,
    conn: &S,
    ub: &mut Lent<'_, BytesMut, S>,
    resp: &mut ResponseHead,
    is_head: bool,
) -> Result<(), (HttpError, bool)> {
    let mut got_bytes = false;
    for _ in 0..=MAX_INTERIM {
        // A client that hangs up while the upstream thinks frees the upstream connection
        // at once (nginx: 499), instead of holding it for the whole read_timeout.
        let part = tokio::select! {
            r = head_part(x, conn, ub, resp, is_head, &mut got_bytes) => r,
            _ = d.gone() => Err(HttpError::ClientGone("closed while waiting for the upstream")),
        };
        match part {
            Ok(HeadPart::Final) => return Ok(()),
            Ok(HeadPart::Interim) => {
                d.interim(ub, resp).await.map_err(|e| (e, true))?;
                ub.advance(resp.len);
            }
            // A hang-up counts as a response begun: nothing is replayed for a gone client.
            Err(e @ HttpError::ClientGone(_)) => return Err((e, true)),
            Err(e) => return Err((e, got_bytes)),
        }
    }
    Err((
        HttpError::ResponseRefused("endless informational responses"),
        true,
    ))
}

enum HeadPart {
    Interim,
    Final,
}

/// Reads until `ub` starts with a complete response head.
async fn head_part<S: Stream>(
    x: &Exchange<'_, S>,
    conn: &S,
    ub: &mut Lent<'_, BytesMut, S>,
    resp: &mut ResponseHead,
    is_head: bool,
    got_bytes: &mut bool,
) -> Result<HeadPart, HttpError> {
    loop {
        if !ub.is_empty() {
            match parse_response(ub, resp, MAX_RESPONSE_HEAD, is_head) {
                Ok(true) if resp.status == 101 => {
                    // A tunnel only for the WebSocket handshake the proxy forwarded,
                    // accepted with the right key (RFC 6455 §4.1): never a raw tunnel.
                    return match &x.ws_accept {
                        None => Err(HttpError::ResponseRefused("101 without an upgrade request")),
                        Some(a) if !resp.accepts_websocket(ub, a) => Err(
                            HttpError::ResponseRefused("101 without a valid WebSocket accept"),
                        ),
                        Some(_) => Ok(HeadPart::Final),
                    };
                }
                Ok(true) if (100..200).contains(&resp.status) => return Ok(HeadPart::Interim),
                Ok(true) => return Ok(HeadPart::Final),
                Ok(false) => {}
                Err(e) => {
                    if matches!(e, HttpError::ResponseRefused(_)) {
                        crate::util::budget::over_budget(
                            crate::util::budget::Buffer::ResponseHead,
                            None,
                        );
                    }
                    return Err(e);
                }
            }
        }
        if ub.capacity() - ub.len() < 1024 {
            ub.reserve(16 * 1024);
        }
        let (res, b) = x
            .timer
            .run_for(x.route.read_timeout, conn.read(ub.take()))
            .await
            .map_err(|_| HttpError::UpstreamTimeout("read"))?;
        ub.put(b);
        match res {
            Ok(0) => return Err(HttpError::UpstreamFailed("closed before responding")),
            Err(_) => return Err(HttpError::UpstreamFailed("read")),
            Ok(_) => *got_bytes = true,
        }
    }
}

/// Counts `error` against `server` only when it is the server's fault
/// ([`HttpError::side`]): a client that stalls, or a response the gateway refuses for its
/// own limits, must never take servers down.
fn book_failure(upstream: &Upstream, server: usize, error: &HttpError) {
    if error.side() == Side::Upstream {
        mark_failure(upstream, server);
    }
}

fn mark_failure(upstream: &Upstream, server: usize) {
    // nginx ignores max_fails for an upstream of one server: marking it down would only
    // turn every request for fail_timeout into a 503 with nothing to fail over to.
    if upstream.servers.len() == 1 {
        return;
    }
    let s = &upstream.servers[server];
    if s.state
        .record_failure(upstream.max_fails, upstream.fail_timeout)
    {
        tracing::warn!(upstream = %upstream.name, server = %s.label, "server marked down for {:?} after {} failure(s)", upstream.fail_timeout, upstream.max_fails);
    }
}

/// Why [`connect_or_wait`] gave up.
enum WaitEnd {
    /// The connect failed (for a descriptor shortage: still short at `connect_timeout`).
    Io(std::io::Error),
    /// The client hung up while the request waited for a descriptor.
    ClientGone,
}

/// Shortest and longest pause between connects retried for a descriptor. Frees by this
/// worker wake the waiter at once; the pause covers frees by other workers and by client
/// connections closing, which raise no signal here.
const DESCRIPTOR_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(2);
const DESCRIPTOR_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(50);

/// Connects to `server`; when the process has no descriptor free (EMFILE, ENFILE, the admin
/// reserve) waits for one instead of failing at once, since under a burst descriptors free
/// up milliseconds later as other requests finish. While it waits, an idle connection to
/// any up server of the upstream that this worker pools is taken (when `idle_ok`), else the
/// connect is retried on each wake of this worker
/// ([`crate::util::budget::descriptor_freed`]) or after
/// a backoff of 2 ms doubling to 50 ms, until `connect_timeout` from the first attempt;
/// then the shortage is returned as before. The client hanging up ends the wait.
///
/// A waiting request holds only its client connection and this future's state (no buffer
/// beyond those the exchange already holds, no upstream socket), so the waiters are
/// bounded by `max_connections` (one per HTTP/1 connection, `max_concurrent_streams` per
/// HTTP/2 connection). A wait is never booked to a server (no passive-health failure).
///
/// Returns the server connected to (an idle connection may be another server's) and
/// whether the connection was reused.
async fn connect_or_wait<S: Stream, D: ResponseSink>(
    w: &Worker<S>,
    upstream: &Arc<Upstream>,
    server: usize,
    connect_timeout: std::time::Duration,
    idle_ok: bool,
    d: &mut D,
) -> Result<(usize, S, bool), WaitEnd> {
    use crate::util::budget;
    let addr = upstream.servers[server].addr;
    let started = Instant::now();
    let mut error = match S::connect(addr, connect_timeout).await {
        Ok(conn) => return Ok((server, conn, false)),
        Err(e) if budget::is_descriptor_shortage(&e) => e,
        Err(e) => return Err(WaitEnd::Io(e)),
    };
    budget::descriptor_wait();
    let waiting = budget::DescriptorWait::new();
    let mut backoff = DESCRIPTOR_BACKOFF_MIN;
    loop {
        // Registered before the idle check, so a connection pooled between the check and
        // the wait still wakes this request.
        let notified = waiting.signal().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if idle_ok {
            if let Some((server, conn)) = w.with_upstream(upstream, |p| p.take_idle_any(server)) {
                return Ok((server, conn, true));
            }
        }
        let left = connect_timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(WaitEnd::Io(error));
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(backoff.min(left)) => {
                backoff = (backoff * 2).min(DESCRIPTOR_BACKOFF_MAX);
            }
            _ = d.gone() => return Err(WaitEnd::ClientGone),
        }
        let left = connect_timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(WaitEnd::Io(error));
        }
        error = match S::connect(addr, left).await {
            Ok(conn) => return Ok((server, conn, false)),
            Err(e) if budget::is_descriptor_shortage(&e) => e,
            Err(e) => return Err(WaitEnd::Io(e)),
        };
    }
}

/// Counts a request in flight to a server (least_conn, and the upstream connections
/// gauge) for as long as it lives.
struct ActiveGuard<'a, S: Stream> {
    w: &'a Worker<S>,
    upstream: &'a Arc<Upstream>,
    server: usize,
    /// The upstream's slot in the worker's counters.
    stats_slot: usize,
}

impl<'a, S: Stream> ActiveGuard<'a, S> {
    fn new(w: &'a Worker<S>, upstream: &'a Arc<Upstream>, server: usize) -> Self {
        let stats_slot = w.with_upstream(upstream, |p| {
            p.picker.active[server] += 1;
            *p.stats_slot
                .get_or_insert_with(|| w.stats.borrow_mut().upstream_slot(&upstream.metric_name))
        });
        w.stats.borrow_mut().upstream_at(stats_slot).active += 1;
        ActiveGuard {
            w,
            upstream,
            server,
            stats_slot,
        }
    }
}

impl<S: Stream> Drop for ActiveGuard<'_, S> {
    fn drop(&mut self) {
        let server = self.server;
        self.w.with_upstream(self.upstream, |p| {
            if let Some(a) = p.picker.active.get_mut(server) {
                *a = a.saturating_sub(1);
            }
        });
        self.w
            .stats
            .borrow_mut()
            .upstream_at(self.stats_slot)
            .active -= 1;
        // The request is done with its upstream connection (pooled or closed): a request
        // of this worker waiting for a descriptor may find one now.
        crate::util::budget::descriptor_freed();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The exchange over in-memory streams: the real worker, snapshot, pool, balancer and
    //! retry policy; the client is a minimal source and sink over a [`MemoryStream`], the
    //! upstreams are scripted [`MemoryStream`]s handed out by address.

    use super::*;
    use crate::config::{Config, LoadedConfig};
    use crate::dataplane::shared::Shared;
    use crate::io::memory::{block_on, set_connector, MemoryPeer, MemoryStream, Step};
    use crate::policy::limits::{ConnLimiter, Enforcement};
    use crate::protocol::http1::body::Body;
    use crate::snapshot::Snapshot;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::rc::Rc;

    pub(crate) const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    fn config(servers: usize) -> String {
        let servers: Vec<String> = (0..servers)
            .map(|i| format!("\"192.0.2.{}:{}\"", i / 200 + 1, 1000 + i))
            .collect();
        format!(
            r#"
[server]
workers = 1
request_buffering = "0"

[log]
access = "off"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "http"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
servers = [{}]
max_fails = 1

[[route]]
path_prefix = "/"
upstream = "app"
"#,
            servers.join(", ")
        )
    }

    pub(crate) fn worker(servers: usize) -> Worker<MemoryStream> {
        let path = Path::new("/test/gateway.toml");
        let source = config(servers);
        let config = Config::parse(path, &source).expect("config parses");
        let limiter = ConnLimiter::new(&config.limits, Enforcement::default(), None);
        let loaded = LoadedConfig {
            path: path.to_path_buf(),
            config,
            source,
        };
        let snap = Snapshot::build(loaded, 1, None).expect("snapshot");
        Worker::new(0, Shared::new(snap, limiter), None)
    }

    /// Upstream connections by address: each connect takes the next script queued for its
    /// address (refused when none is); every stream handed out is recorded.
    #[derive(Default)]
    pub(crate) struct Upstreams {
        scripts: HashMap<SocketAddr, Vec<Vec<Step>>>,
        pub(crate) opened: Vec<(SocketAddr, Rc<MemoryPeer>)>,
    }

    pub(crate) fn upstreams() -> Rc<RefCell<Upstreams>> {
        let ups = Rc::new(RefCell::new(Upstreams::default()));
        let handle = ups.clone();
        set_connector(Box::new(move |addr| {
            let mut u = handle.borrow_mut();
            let script = u.scripts.get_mut(&addr).filter(|q| !q.is_empty());
            let Some(script) = script.map(|q| q.remove(0)) else {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            };
            let (s, peer) = MemoryStream::scripted(script);
            u.opened.push((addr, peer));
            Ok(s)
        }));
        ups
    }

    pub(crate) fn script(ups: &Rc<RefCell<Upstreams>>, addr: SocketAddr, steps: Vec<Step>) {
        ups.borrow_mut()
            .scripts
            .entry(addr)
            .or_default()
            .push(steps);
    }

    /// A minimal client: a fixed request head, its body read from `io`, the response
    /// written back to `io` as the upstream framed it.
    struct TestClient {
        io: MemoryStream,
        peer: Rc<MemoryPeer>,
        head: Vec<u8>,
        idempotent: bool,
        body: Body,
    }

    impl TestClient {
        fn get() -> TestClient {
            TestClient::new(
                b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                true,
                BodyFraming::None,
                [],
            )
        }

        fn new(
            head: &[u8],
            idempotent: bool,
            framing: BodyFraming,
            body: impl IntoIterator<Item = Step>,
        ) -> TestClient {
            let (io, peer) = MemoryStream::scripted(body);
            TestClient {
                io,
                peer,
                head: head.to_vec(),
                idempotent,
                body: Body::request(framing, u64::MAX),
            }
        }
    }

    impl RequestSource<MemoryStream> for TestClient {
        fn write_request_start(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.head);
        }
        fn held(&self) -> usize {
            0
        }
        fn idempotent(&self) -> bool {
            self.idempotent
        }
        fn is_head(&self) -> bool {
            false
        }
        fn body_done(&self) -> bool {
            self.body.is_done()
        }
        async fn go_ahead(&mut self) -> Result<(), HttpError> {
            Ok(())
        }
        async fn read_body(
            &mut self,
            b: &mut Lent<'_, BytesMut, MemoryStream>,
        ) -> Result<usize, HttpError> {
            b.ensure();
            b.clear();
            let (res, got) = self.io.read(b.take()).await;
            b.put(got);
            match res {
                Ok(0) | Err(_) => Err(HttpError::ClientGone("closed mid-body")),
                Ok(_) => self.body.take(b, |_| {}),
            }
        }
    }

    impl ResponseSink for TestClient {
        async fn interim(&mut self, raw: &[u8], resp: &ResponseHead) -> Result<(), HttpError> {
            self.io.write_all(raw[..resp.len].to_vec()).await.0.unwrap();
            Ok(())
        }
        fn prepare_head(&mut self, raw: &[u8], resp: &ResponseHead, _upgrade: bool) -> BodyForm {
            self.head = raw[..resp.len].to_vec();
            BodyForm::Framed
        }
        async fn send_head(&mut self, first: &[u8]) -> Result<(), HttpError> {
            let mut out = std::mem::take(&mut self.head);
            out.extend_from_slice(first);
            let (r, _) = self.io.write_all(out).await;
            r.map_err(|_| HttpError::ClientGone("write"))
        }
        async fn send_body<B: BoundedBuf>(&mut self, b: B) -> (Result<(), HttpError>, Option<B>) {
            let (r, b) = self.io.write_all(b).await;
            (r.map_err(|_| HttpError::ClientGone("write")), Some(b))
        }
        async fn gone(&mut self) {
            std::future::pending().await
        }
    }

    /// Runs one exchange on `w` for `client`.
    async fn exchange(
        w: &Worker<MemoryStream>,
        client: &mut TestClient,
    ) -> Result<Exchanged<MemoryStream>, Failure> {
        let snap = w.snapshot();
        let route = snap.router.find(Some(b"t"), b"/").expect("route");
        let upstream = &snap.upstreams[0];
        let x = Exchange {
            w,
            route,
            upstream,
            client_ip: "198.51.100.7".parse().unwrap(),
            request_buffering: snap.server.request_buffering,
            ws_accept: None,
            server: std::cell::Cell::new(None),
            timer: &PhaseTimer::default(),
        };
        let mut resp = ResponseHead::default();
        run(&x, client, &mut resp).await
    }

    /// Runs one exchange that must fail (`why` it must).
    async fn failure(w: &Worker<MemoryStream>, client: &mut TestClient, why: &str) -> Failure {
        match exchange(w, client).await {
            Err(f) => f,
            Ok(done) => panic!("{why}: got {}", done.status),
        }
    }

    pub(crate) fn addr(i: usize) -> SocketAddr {
        format!("192.0.2.{}:{}", i / 200 + 1, 1000 + i)
            .parse()
            .unwrap()
    }

    fn is_up(w: &Worker<MemoryStream>, server: usize) -> bool {
        w.snapshot().upstreams[0].servers[server]
            .state
            .is_up(clock::now_ms())
    }

    #[test]
    fn success_relays_the_response_and_pools_the_connection() {
        let w = worker(1);
        let ups = upstreams();
        script(&ups, addr(0), vec![Step::Data(OK.to_vec())]);
        block_on(async {
            let mut client = TestClient::get();
            let done = exchange(&w, &mut client).await.expect("exchanged");
            assert_eq!((done.status, done.body_bytes, done.server), (200, 5, 0));
            assert_eq!(client.peer.written(), OK);
            let sent = ups.borrow().opened[0].1.written();
            assert!(sent.starts_with(b"GET / HTTP/1.1\r\n"));
            let idle = w.with_upstream(&w.snapshot().upstreams[0], |p| p.idle_count());
            assert_eq!(
                idle, 1,
                "a clean keep-alive response leaves the connection pooled"
            );
        });
        assert_eq!(w.bufs_lent(), 0, "every buffer back in its pool");
    }

    #[test]
    fn connect_failure_moves_to_the_next_server() {
        let w = worker(2);
        let ups = upstreams();
        // Server 0 refuses (no script); server 1 answers.
        script(&ups, addr(1), vec![Step::Data(OK.to_vec())]);
        block_on(async {
            let done = exchange(&w, &mut TestClient::get())
                .await
                .expect("exchanged");
            assert_eq!((done.status, done.server), (200, 1));
        });
        assert!(!is_up(&w, 0), "the refusing server is marked down");
        assert!(is_up(&w, 1));
        assert_eq!(w.bufs_lent(), 0);
    }

    #[test]
    fn retries_are_bounded_past_64_servers() {
        let w = worker(100);
        let ups = upstreams();
        block_on(async {
            let failed = failure(&w, &mut TestClient::get(), "every server refuses").await;
            assert_eq!(failed.error, HttpError::UpstreamFailed("connect"));
        });
        // No server was connected (all refused); each was marked down at most once and
        // only MAX_SERVERS were tried.
        let down = (0..100).filter(|&i| !is_up(&w, i)).count();
        assert_eq!(down, crate::policy::retry::MAX_SERVERS);
        assert!(ups.borrow().opened.is_empty());
        assert_eq!(w.bufs_lent(), 0);
    }

    /// Pools one connection to server 0 whose next read shows `after` (the upstream closed
    /// it just as it is reused).
    async fn pool_one(w: &Worker<MemoryStream>, ups: &Rc<RefCell<Upstreams>>, after: Step) {
        script(ups, addr(0), vec![Step::Data(OK.to_vec()), after]);
        let done = exchange(w, &mut TestClient::get()).await.expect("first");
        assert_eq!(done.server, 0);
    }

    #[test]
    fn reused_connection_dying_before_the_response_is_replayed_on_a_fresh_one() {
        let w = worker(1);
        let ups = upstreams();
        block_on(async {
            pool_one(&w, &ups, Step::Eof).await;
            script(&ups, addr(0), vec![Step::Data(OK.to_vec())]);
            let mut client = TestClient::get();
            let done = exchange(&w, &mut client).await.expect("replayed");
            assert_eq!(done.status, 200);
            assert_eq!(client.peer.written(), OK);
            let opened = &ups.borrow().opened;
            assert_eq!(opened.len(), 2, "one fresh connection for the replay");
            // The reused connection got the request once, the fresh one got it again.
            let first = opened[0].1.written();
            assert_eq!(first.matches_count(b"GET / HTTP/1.1"), 2);
            assert_eq!(opened[1].1.written().matches_count(b"GET / HTTP/1.1"), 1);
        });
        assert!(is_up(&w, 0));
        assert_eq!(w.bufs_lent(), 0);
    }

    #[test]
    fn post_with_a_streamed_body_is_not_replayed() {
        let w = worker(1);
        let ups = upstreams();
        block_on(async {
            pool_one(&w, &ups, Step::Reset).await;
            // A fresh connection would answer: it must not be asked.
            script(&ups, addr(0), vec![Step::Data(OK.to_vec())]);
            let mut client = TestClient::new(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n",
                false,
                BodyFraming::Length(4),
                [Step::Data(b"data".to_vec())],
            );
            let failed = failure(&w, &mut client, "a POST must not be replayed").await;
            assert_eq!(failed.error, HttpError::UpstreamFailed("read"));
            assert_eq!(failed.error.side(), Side::Upstream);
            assert!(!failed.response_started);
            assert_eq!(failed.server, Some(0));
            assert_eq!(ups.borrow().opened.len(), 1, "no fresh connection");
            let sent = ups.borrow().opened[0].1.written();
            assert!(sent.ends_with(b"\r\n\r\ndata"), "the body was streamed");
        });
        assert_eq!(w.bufs_lent(), 0);
    }

    #[test]
    fn upstream_closing_mid_body_is_the_upstreams_fault() {
        let w = worker(2);
        let ups = upstreams();
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec();
        script(&ups, addr(0), vec![Step::Data(short), Step::Eof]);
        block_on(async {
            let failed = failure(&w, &mut TestClient::get(), "truncated").await;
            assert_eq!(failed.error, HttpError::UpstreamFailed("closed mid-body"));
            assert_eq!(failed.error.side(), Side::Upstream);
            assert!(failed.response_started, "the head went out: close, no 502");
        });
        assert!(!is_up(&w, 0), "counted against the server");
        let idle = w.with_upstream(&w.snapshot().upstreams[0], |p| p.idle_count());
        assert_eq!(idle, 0, "a cut-short connection is never pooled");
        assert_eq!(w.bufs_lent(), 0);
    }

    #[test]
    fn client_gone_is_the_clients_fault_and_marks_no_server_down() {
        let w = worker(2);
        let ups = upstreams();
        script(&ups, addr(0), vec![Step::Never]);
        script(&ups, addr(1), vec![Step::Never]);
        block_on(async {
            let mut client = TestClient::new(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n",
                false,
                BodyFraming::Length(100),
                [Step::Data(b"only ten b".to_vec()), Step::Eof],
            );
            let failed = failure(&w, &mut client, "the client left").await;
            assert_eq!(failed.error, HttpError::ClientGone("closed mid-body"));
            assert_eq!(failed.error.side(), Side::Client);
        });
        assert!(is_up(&w, 0) && is_up(&w, 1), "no server marked down");
        assert_eq!(w.bufs_lent(), 0);
    }

    trait Count {
        fn matches_count(&self, needle: &[u8]) -> usize;
    }

    impl Count for Vec<u8> {
        fn matches_count(&self, needle: &[u8]) -> usize {
            self.windows(needle.len()).filter(|w| *w == needle).count()
        }
    }
}
