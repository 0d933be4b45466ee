//! One client connection, request after request: read a head, choose the route, forward
//! to an upstream (or answer directly), relay the response, log, and loop while the
//! connection stays keep-alive. Data flows one way: client → upstream → client.
//!
//! Buffers: the connection's head buffer holds the head and whatever body bytes came with
//! it (and any pipelined request behind it); bodies stream through pooled 64 KiB buffers,
//! one read then one write at a time, so memory per connection is bounded whatever the
//! body size. Timeouts cover whole phases (head, each upstream read and write).

use crate::dataplane::ctx::{Worker, HEAD_BUF_SIZE};
use crate::dataplane::listener::ListenerCtx;
use crate::io::Stream;
use crate::policy::retry::{Attempt, Decision, RetryPolicy};
use crate::policy::route::{Action, Route};
use crate::protocol::http1::body::Body;
use crate::protocol::http1::head::{
    parse_request, parse_response, BodyFraming, RequestHead, ResponseHead,
};
use crate::protocol::http1::rewrite::{self, ClientFraming, Forwarding};
use crate::protocol::http1::{error_body, write_simple_response, HttpError, Side};
use crate::snapshot::{ListenerSettings, Snapshot};
use crate::telemetry::access_log::Entry;
use crate::upstream::Upstream;
use crate::util::clock;
use bytes::{Buf, BytesMut};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use tokio_uring::buf::BoundedBuf;

/// The `route` label of requests that matched no route (or never got that far).
static NO_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "none".into());

/// Most informational responses before the final one; more is an upstream that never
/// answers, not a slow one.
const MAX_INTERIM: usize = 32;
/// A transfer to or from a client that must keep moving: no pause longer than `pause`,
/// and after `grace`, an average of at least `min_rate` bytes per second since it began.
/// A per-read timeout alone lets a client trickle one byte per timeout and hold an upstream
/// connection (and a thread of a thread-per-connection backend) for hours; this bounds the
/// whole transfer by its size.
struct RateClock {
    started: Instant,
    bytes: u64,
    pause: Duration,
    grace: Duration,
    /// Bytes per second; 0: only `pause` applies.
    min_rate: u64,
}

impl RateClock {
    fn new(pause: Duration, grace: Duration, min_rate: u64) -> RateClock {
        RateClock {
            started: Instant::now(),
            bytes: 0,
            pause,
            grace,
            min_rate,
        }
    }

    /// When the next read or write must have completed.
    fn deadline(&self) -> Instant {
        let pause = Instant::now() + self.pause;
        if self.min_rate == 0 {
            return pause;
        }
        let earned = Duration::from_secs_f64(self.bytes as f64 / self.min_rate as f64);
        pause.min(self.started + self.grace + earned)
    }

    fn moved(&mut self, n: usize) {
        self.bytes += n as u64;
    }
}
/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

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
    fn error(status: u16, keep_alive: bool) -> Self {
        Outcome {
            status,
            body_bytes: error_body(status).len() as u64,
            route: None,
            upstream: None,
            keep_alive,
            consumed: 0,
            leftover: None,
        }
    }
}

/// Serves one client connection whose preamble (PROXY header, TLS handshake) the worker
/// has already handled: `peer` is the client address it established, `initial` any bytes
/// read past the preamble.
pub async fn serve<S: Stream>(
    w: Rc<Worker<S>>,
    listener: Rc<ListenerCtx>,
    io: S,
    peer: SocketAddr,
    accepted: Instant,
    initial: BytesMut,
) {
    let mut c = Client {
        io,
        peer,
        buf: if initial.is_empty() {
            BytesMut::with_capacity(HEAD_BUF_SIZE)
        } else {
            initial
        },
        head: RequestHead::default(),
        resp: ResponseHead::default(),
    };
    let mut first = true;
    let mut limits_seen = w.snapshot().generation;
    loop {
        let snap = w.snapshot();
        let started = match read_head(&mut c, &w, &snap, first, accepted).await {
            Ok(Some(t)) => t,
            Ok(None) => break,
            Err(HttpError::ClientGone(_)) => break,
            Err(e) => {
                let status = e.status();
                if matches!(e, HttpError::HeadTooLarge | HttpError::UriTooLong) {
                    crate::util::budget::over_budget(
                        crate::util::budget::Buffer::RequestHead,
                        Some(peer),
                    );
                }
                send_error(&c.io, &w, status, true, None).await;
                linger(&c.io, &w).await;
                if snap.access_enabled {
                    let entry = Entry {
                        client_ip: peer.ip(),
                        method: b"-",
                        target: b"-",
                        version: 1,
                        status,
                        body_bytes: error_body(status).len() as u64,
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
                break;
            }
        };
        first = false;
        // The snapshot current when the head arrived, not when the connection started
        // waiting: a keep-alive connection idle across a reload serves the new config.
        let snap = w.snapshot();
        if snap.generation != limits_seen {
            limits_seen = snap.generation;
            // A `deny` added by a reload reaches connections accepted before it, as nginx
            // checks `deny` per request: an address blocked in an incident loses its busy
            // keep-alive connections too. Checked once per reload, not per request.
            if w.shared.conn_limiter.denies(peer.ip()) {
                tracing::info!(client = %peer.ip(), "connection closed: its address is now denied");
                break;
            }
        }
        let client_ip = match snap.listener(&listener.name) {
            Some(settings) => client_ip(&c.buf, &c.head, peer.ip(), settings),
            None => peer.ip(),
        };
        let outcome = handle(&mut c, &w, &snap, &listener, client_ip).await;
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
        if !outcome.keep_alive || w.draining.get() {
            if outcome.status >= 400 && outcome.status != 499 {
                // The request may not have been read to its end (a 413 before the body):
                // let the client read the answer instead of an RST.
                linger(&c.io, &w).await;
            }
            break;
        }
        c.buf.advance(outcome.consumed);
        if let Some(extra) = outcome.leftover {
            c.buf.extend_from_slice(&extra);
            w.give_buf(extra);
        }
        if c.buf.is_empty() && c.buf.capacity() > HEAD_BUF_SIZE * 4 {
            // A large head grew the buffer; do not keep that memory on an idle connection.
            c.buf = BytesMut::with_capacity(HEAD_BUF_SIZE);
        }
    }
}

/// The client address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most untrusted address of `X-Forwarded-For` (nginx `real_ip_recursive on`).
fn client_ip(buf: &[u8], head: &RequestHead, peer: IpAddr, listener: &ListenerSettings) -> IpAddr {
    if head.known.x_forwarded_for.is_empty() || !listener.trusts(peer) {
        return peer;
    }
    let mut candidate = peer;
    for &i in head.known.x_forwarded_for.iter().rev() {
        let value = head.headers[i].value(buf);
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

/// Reads until a complete request head is in `c.buf`. `Ok(None)`: the connection ended
/// cleanly between requests (EOF, keep-alive timeout, drain). Returns when the request began.
async fn read_head<S: Stream>(
    c: &mut Client<S>,
    w: &Worker<S>,
    snap: &Snapshot,
    first: bool,
    accepted: Instant,
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
        if c.buf.capacity() - c.buf.len() < 1024 {
            c.buf
                .reserve(c.buf.len().max(HEAD_BUF_SIZE).min(max + 1024));
        }
        let buf = std::mem::take(&mut c.buf);
        let read = timeout_at(deadline, c.io.read(buf));
        let result = if started.is_none() {
            tokio::select! {
                r = read => r,
                _ = w.drained() => return Ok(None),
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
    let mut b = w.take_buf();
    while discarded < LINGERING_BYTES {
        b.clear();
        let deadline = until.min(Instant::now() + LINGERING_TIMEOUT);
        let read = tokio::select! {
            r = timeout_at(deadline, io.read(b)) => r,
            // A drain does not wait for lingering connections.
            _ = w.drained() => {
                io.abort();
                return;
            }
        };
        match read {
            Ok((Ok(n), back)) if n > 0 => {
                discarded += n;
                b = back;
            }
            Ok((_, back)) => {
                b = back;
                break;
            }
            Err(_) => {
                // The abandoned read holds the buffer; shut the socket so it completes.
                io.abort();
                return;
            }
        }
    }
    w.give_buf(b);
}

pub(crate) async fn timeout_at<F: std::future::Future>(
    deadline: Instant,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout_at(deadline.into(), f).await
}

/// Sends a proxy-generated error response.
async fn send_error<S: Stream>(
    io: &S,
    w: &Worker<S>,
    status: u16,
    close: bool,
    extra: Option<(&str, &str)>,
) {
    let mut out = w.take_out();
    let extra_headers: Vec<(&str, &str)> = extra.into_iter().collect();
    write_simple_response(
        &mut out,
        status,
        "text/plain",
        error_body(status),
        close,
        &extra_headers,
    );
    let (_, out) = timeout(Duration::from_secs(5), io.write_all(out))
        .await
        .unwrap_or((Ok(()), Vec::new()));
    w.give_out(out);
}

async fn handle<'s, S: Stream>(
    c: &mut Client<S>,
    w: &Rc<Worker<S>>,
    snap: &'s Snapshot,
    listener: &ListenerCtx,
    client_ip: IpAddr,
) -> Outcome<'s> {
    let buf = &c.buf[..];
    let head = &c.head;
    let has_body = !matches!(head.framing, BodyFraming::None | BodyFraming::Length(0));
    // limits.request_rate (nginx limit_req): over it, 429 with Retry-After. The verdict is
    // taken before awaiting so the limiter's borrow ends here.
    let verdict = w.request_limiter.borrow_mut().check_with(
        snap.generation,
        &snap.server.limits,
        client_ip,
        Instant::now(),
    );
    if let Err(retry_after) = verdict {
        w.stats.borrow_mut().limit_rejection(
            crate::policy::limits::LIMIT_REQUEST_RATE,
            crate::policy::limits::ENFORCER_USERSPACE,
        );
        let retry_after = retry_after.to_string();
        send_error(&c.io, w, 429, has_body, Some(("Retry-After", &retry_after))).await;
        return Outcome {
            consumed: head.len,
            ..Outcome::error(429, !has_body)
        };
    }
    let Some(route) = snap.router.find(head.host(buf), head.path()) else {
        send_error(&c.io, w, 404, has_body, None).await;
        return Outcome {
            consumed: head.len,
            ..Outcome::error(404, !has_body)
        };
    };
    if let BodyFraming::Length(n) = head.framing {
        if n > route.max_body_size {
            send_error(&c.io, w, 413, true, None).await;
            return Outcome {
                route: Some(&route.label),
                ..Outcome::error(413, false)
            };
        }
    }
    if head.method(buf) == b"TRACE" && !route.allow_trace {
        send_error(&c.io, w, 405, has_body, None).await;
        return Outcome {
            route: Some(&route.label),
            consumed: head.len,
            ..Outcome::error(405, !has_body)
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
            send_error(&c.io, w, status, true, extra).await;
            return Outcome {
                route: Some(&route.label),
                ..Outcome::error(status, false)
            };
        }
    }
    match &route.action {
        Action::Respond(respond) => {
            let mut out = w.take_out();
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
                out.truncate(out.len() - respond.body.len());
            }
            let (res, out) = c.io.write_all(out).await;
            w.give_out(out);
            Outcome {
                status: respond.status,
                body_bytes: body.len() as u64,
                route: Some(&route.label),
                upstream: None,
                keep_alive: res.is_ok() && !close,
                consumed: head.len,
                leftover: None,
            }
        }
        Action::Proxy(index) => {
            let upstream = &snap.upstreams[*index];
            match proxy(c, w, snap, route, upstream, listener, client_ip).await {
                Ok(outcome) => outcome,
                Err(failure) => {
                    let status = failure.error.status();
                    if failure.error.side() != Side::Client {
                        w.stats
                            .borrow_mut()
                            .upstream_error(&upstream.metric_name, failure.error.kind());
                    }
                    if !failure.error.is_refused_request() {
                        tracing::debug!(upstream = %upstream.name, error = %failure.error, "request failed");
                    }
                    if !failure.response_started
                        && !matches!(failure.error, HttpError::ClientGone(_))
                    {
                        send_error(&c.io, w, status, true, None).await;
                    }
                    Outcome {
                        route: Some(&route.label),
                        upstream: failure.server.map(|s| (&**upstream, s)),
                        ..Outcome::error(status, false)
                    }
                }
            }
        }
    }
}

struct Failure {
    error: HttpError,
    /// Part of the response was sent: the client can only be told by closing.
    response_started: bool,
    server: Option<usize>,
}

impl Failure {
    fn before_response(error: HttpError, server: Option<usize>) -> Failure {
        Failure {
            error,
            response_started: false,
            server,
        }
    }
}

/// Forwards one request to the upstream and relays its response.
async fn proxy<'s, S: Stream>(
    c: &mut Client<S>,
    w: &Rc<Worker<S>>,
    snap: &Snapshot,
    route: &'s Route,
    upstream: &'s Arc<Upstream>,
    listener: &ListenerCtx,
    client_ip: IpAddr,
) -> Result<Outcome<'s>, Failure> {
    let server_settings = &snap.server;
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

    // The request head, rewritten, followed by the body bytes that arrived with it.
    let mut body = Body::request(head.framing, route.max_body_size);
    let after_head = &buf[head.len..];
    let prefix = body
        .take(after_head, |_| {})
        .map_err(|e| Failure::before_response(e, None))?;
    let mut out = w.take_out();
    let fwd = Forwarding {
        client_ip,
        peer_ip: peer.ip(),
        proto: listener.proto,
        upgrade,
        default_host: &listener.name,
        trusted_peer: snap
            .listener(&listener.name)
            .is_some_and(|l| l.trusts(peer.ip())),
        keep_forwarding: &snap.server.forward_client_headers,
        underscores: snap.server.underscores_in_headers,
    };
    let consumed = head.len + prefix;
    let ws_accept = upgrade.then(|| crate::protocol::http1::head::websocket_accept(buf, head));
    let is_head = head.is_head(buf);
    let mut sent_continue = false;
    let mut leftover: Option<BytesMut> = None;
    let mut body_clock = RateClock::new(
        server_settings.client_body_timeout,
        server_settings.client_body_timeout,
        server_settings.client_min_rate,
    );
    body_clock.moved(prefix);

    // Read the body, or its first `request_buffering` bytes, before any upstream is chosen
    // (as nginx does): a client that trickles a small body then holds nothing upstream.
    let mut buffered = Vec::new();
    if !body.is_done() && server_settings.request_buffering > prefix {
        if head.known.expect_continue {
            sent_continue = true;
            if let Err(e) = send_continue(client, route.send_timeout).await {
                w.give_out(out);
                return Err(Failure::before_response(e, None));
            }
        }
        let limit = server_settings.request_buffering - prefix;
        match buffer_request_body(client, w, &mut body, &mut body_clock, &mut buffered, limit).await
        {
            Ok(extra) => leftover = extra,
            Err(e) => {
                w.give_out(out);
                return Err(Failure::before_response(e, None));
            }
        }
    }
    let write_request = |out: &mut Vec<u8>| {
        rewrite::write_upstream_request(out, buf, head, &fwd);
        out.extend_from_slice(&after_head[..prefix]);
        out.extend_from_slice(&buffered);
    };
    write_request(&mut out);
    let replayable = head.is_idempotent(buf) && body.is_done();

    // Connect, send the head, and read the response head, retrying as
    // `policy::retry` says.
    let upstream_started = Instant::now();
    let mut retry = RetryPolicy::new(upstream.servers.len(), replayable);
    let mut last_error = HttpError::NoHealthyUpstream;
    let mut ub = w.take_buf();
    let (conn, server, ub_after_head) = loop {
        let now = clock::now_ms();
        let picked = w.with_upstream(upstream, |p| {
            let server = p.picker.pick(upstream, client_ip, now, retry.tried())?;
            let idle = if retry.fresh_only() {
                None
            } else {
                p.take_idle(server)
            };
            Some((server, idle))
        });
        let Some((server, idle)) = picked else {
            w.give_out(out);
            w.give_buf(ub);
            return Err(Failure::before_response(last_error, None));
        };
        let addr = upstream.servers[server].addr;
        let reused = idle.is_some();
        let conn = match idle {
            Some(conn) => conn,
            None => match S::connect(addr, route.connect_timeout).await {
                Ok(conn) => conn,
                Err(e) if crate::util::budget::is_local_resource_error(&e) => {
                    // Our shortage, not the server's: this request fails (500, as nginx
                    // when its socket() fails), no server is marked down, and the next
                    // request is served normally as soon as resources free up.
                    crate::util::budget::refused(crate::util::budget::Refusal::UpstreamLocal, &e);
                    w.give_out(out);
                    w.give_buf(ub);
                    return Err(Failure::before_response(
                        HttpError::LocalResource("connect"),
                        None,
                    ));
                }
                Err(e) => {
                    let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
                    tracing::warn!(upstream = %upstream.name, server = %addr, error = %e, "connect failed");
                    mark_failure(upstream, server);
                    let error = if timed_out {
                        HttpError::UpstreamTimeout("connect")
                    } else {
                        HttpError::UpstreamFailed("connect")
                    };
                    if retry.connect_failed(server, &error) == Decision::GiveUp {
                        w.give_out(out);
                        w.give_buf(ub);
                        return Err(Failure::before_response(error, None));
                    }
                    last_error = error;
                    continue;
                }
            },
        };
        let active = ActiveGuard::new(w, upstream, server);

        // Send the head (and body prefix).
        let sent = timeout(route.send_timeout, conn.write_all(out)).await;
        let write_failed = match sent {
            Ok((Ok(()), o)) => {
                out = o;
                None
            }
            Ok((Err(_), o)) => {
                out = o;
                Some(HttpError::UpstreamFailed("write"))
            }
            Err(_) => {
                out = w.take_out();
                Some(HttpError::UpstreamTimeout("send"))
            }
        };
        if let Some(error) = write_failed {
            drop(active);
            let attempt = Attempt {
                reused,
                response_started: false,
            };
            if retry.attempt_failed(attempt, &error) == Decision::Replay {
                if out.is_empty() {
                    // The timed-out write took the buffer with it; rebuild the request.
                    write_request(&mut out);
                }
                continue;
            }
            mark_failure(upstream, server);
            w.give_out(out);
            w.give_buf(ub);
            return Err(Failure::before_response(error, Some(server)));
        }

        // The rest of the request body, streamed.
        if !body.is_done() {
            if head.known.expect_continue && !sent_continue {
                sent_continue = true;
                if let Err(e) = send_continue(client, route.send_timeout).await {
                    w.give_out(out);
                    w.give_buf(ub);
                    return Err(Failure::before_response(e, Some(server)));
                }
            }
            match stream_request_body(client, &conn, w, &mut body, &mut body_clock, route).await {
                Ok(extra) => leftover = extra,
                Err(error) => {
                    book_failure(upstream, server, &error);
                    w.give_out(out);
                    w.give_buf(ub);
                    return Err(Failure::before_response(error, Some(server)));
                }
            }
        }

        // The response head (informational responses are relayed as they come).
        let head_read = read_response_head(
            client,
            &conn,
            w,
            resp,
            ub,
            route,
            is_head,
            sent_continue,
            ws_accept.as_ref(),
            head.version == 1,
        );
        // A client that hangs up while the upstream thinks frees the upstream connection
        // at once (nginx: 499), instead of holding it for the whole read_timeout.
        let head_result = tokio::select! {
            r = head_read => r,
            _ = client_hang_up(client) => Err((
                HttpError::ClientGone("closed while waiting for the upstream"),
                BytesMut::new(),
                true,
            )),
        };
        match head_result {
            Ok(b) => {
                drop(active);
                break (conn, server, b);
            }
            Err((error, b, got_bytes)) => {
                ub = b;
                drop(active);
                let attempt = Attempt {
                    reused,
                    response_started: got_bytes,
                };
                if retry.attempt_failed(attempt, &error) == Decision::Replay {
                    out.clear();
                    write_request(&mut out);
                    continue;
                }
                book_failure(upstream, server, &error);
                w.give_out(out);
                w.give_buf(ub);
                return Err(Failure::before_response(error, Some(server)));
            }
        }
    };
    upstream.servers[server].state.record_success();
    w.stats
        .borrow_mut()
        .upstream(&upstream.metric_name)
        .duration
        .observe(upstream_started.elapsed().as_secs_f64());
    let mut ub = ub_after_head;
    let active = ActiveGuard::new(w, upstream, server);

    // The response head for the client, with the first body bytes behind it.
    out.clear();
    let close =
        !head.wants_keep_alive() || w.draining.get() || resp.framing == BodyFraming::UntilClose;
    let client_framing = rewrite::write_client_response(
        &mut out,
        &ub,
        resp,
        head.version,
        close || head.version == 0 && resp.framing == BodyFraming::Chunked,
        upgrade && resp.status == 101,
    );
    let close = close || client_framing == ClientFraming::Dechunk;
    let status = resp.status;
    let resp_framing = resp.framing;
    let resp_keep_alive = resp.keep_alive();
    ub.advance(resp.len);

    if upgrade && status == 101 {
        // WebSocket: from here the two connections are one tunnel.
        let (r, o) = client.write_all(out).await;
        w.give_out(o);
        if r.is_err() {
            w.give_buf(ub);
            return Err(Failure {
                error: HttpError::ClientGone("write"),
                response_started: true,
                server: Some(server),
            });
        }
        drop(active);
        {
            let mut stats = w.stats.borrow_mut();
            stats.tunnels_active += 1;
        }
        let bytes = crate::dataplane::conn::tunnel::run(
            client,
            &conn,
            &after_head[prefix..],
            ub,
            w,
            route.read_timeout,
        )
        .await;
        {
            let mut stats = w.stats.borrow_mut();
            stats.tunnels_active -= 1;
            stats.tunnel_path(bytes.path);
            stats.tunnel_bytes[0] += bytes.to_upstream;
            stats.tunnel_bytes[1] += bytes.to_client;
        }
        return Ok(Outcome {
            status,
            body_bytes: bytes.to_client,
            route: Some(&route.label),
            upstream: Some((&**upstream, server)),
            keep_alive: false,
            consumed,
            leftover,
        });
    }

    let relay = relay_response_body(
        client,
        &conn,
        w,
        out,
        ub,
        resp_framing,
        client_framing,
        route,
        server_settings.client_min_rate,
    )
    .await;
    drop(active);
    match relay {
        Ok(sent) => {
            if resp_keep_alive
                && sent.upstream_clean
                && body.is_done()
                && resp_framing != BodyFraming::UntilClose
            {
                w.with_upstream(upstream, |p| p.put_idle(server, conn));
            }
            Ok(Outcome {
                status,
                body_bytes: sent.body_bytes,
                route: Some(&route.label),
                upstream: Some((&**upstream, server)),
                keep_alive: !close && sent.client_ok,
                consumed,
                leftover,
            })
        }
        Err(RelayFailed {
            error,
            response_started,
        }) => {
            if error.side() == Side::Upstream {
                book_failure(upstream, server, &error);
                tracing::warn!(upstream = %upstream.name, server = %upstream.servers[server].label, error = %error, response_started, "response cut short");
            }
            Err(Failure {
                error,
                response_started,
                server: Some(server),
            })
        }
    }
}

/// How long a response may be awaited before the client connection is watched for a
/// hang-up: fast responses never pay for registering the socket with the reactor.
const CLIENT_WATCH_AFTER: Duration = Duration::from_millis(500);

async fn client_hang_up<S: Stream>(client: &S) {
    tokio::time::sleep(CLIENT_WATCH_AFTER).await;
    crate::io::peer_closed(client).await;
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

/// Counts a request in flight to a server (least_conn, and the upstream connections
/// gauge) for as long as it lives.
struct ActiveGuard<'a, S: Stream> {
    w: &'a Worker<S>,
    upstream: &'a Arc<Upstream>,
    server: usize,
}

impl<'a, S: Stream> ActiveGuard<'a, S> {
    fn new(w: &'a Worker<S>, upstream: &'a Arc<Upstream>, server: usize) -> Self {
        w.with_upstream(upstream, |p| p.picker.active[server] += 1);
        w.stats.borrow_mut().upstream(&upstream.metric_name).active += 1;
        ActiveGuard {
            w,
            upstream,
            server,
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
            .upstream(&self.upstream.metric_name)
            .active -= 1;
    }
}

/// Streams the rest of a request body from the client to the upstream. Returns bytes read
/// past the body's end (a pipelined request), if any.
async fn stream_request_body<S: Stream>(
    client: &S,
    upstream: &S,
    w: &Worker<S>,
    body: &mut Body,
    clock: &mut RateClock,
    route: &Route,
) -> Result<Option<BytesMut>, HttpError> {
    while !body.is_done() {
        let (mut b, n) = read_body_part(client, w, body, clock).await?;
        let extra = if n < b.len() {
            Some(b.split_off(n))
        } else {
            None
        };
        if n > 0 {
            let (res, slice) =
                match timeout(route.send_timeout, upstream.write_all(b.slice(..n))).await {
                    Ok(r) => r,
                    Err(_) => return Err(HttpError::UpstreamTimeout("send body")),
                };
            b = slice.into_inner();
            if res.is_err() {
                return Err(HttpError::UpstreamFailed("write body"));
            }
        }
        w.give_buf(b);
        if let Some(extra) = extra {
            return Ok(Some(extra));
        }
    }
    Ok(None)
}

/// Reads the next piece of a request body from the client within `clock`'s deadline:
/// the buffer and how many of its bytes belong to the body (the rest is a pipelined
/// request). A missed deadline is a 408 (the caller closes the upstream connection).
async fn read_body_part<S: Stream>(
    client: &S,
    w: &Worker<S>,
    body: &mut Body,
    clock: &mut RateClock,
) -> Result<(BytesMut, usize), HttpError> {
    let b = w.take_buf();
    let (res, b) = match timeout_at(clock.deadline(), client.read(b)).await {
        Ok(r) => r,
        Err(_) => {
            crate::util::budget::refused(
                crate::util::budget::Refusal::SlowClient,
                &"request body too slow: 408",
            );
            // The abandoned read owns the buffer; the connection closes after the 408.
            return Err(HttpError::BodyTimeout);
        }
    };
    match res {
        Ok(0) | Err(_) => {
            w.give_buf(b);
            return Err(HttpError::ClientGone("closed mid-body"));
        }
        Ok(n) => clock.moved(n),
    }
    match body.take(&b, |_| {}) {
        Ok(n) => Ok((b, n)),
        Err(e) => {
            w.give_buf(b);
            Err(e)
        }
    }
}

/// Reads the request body into `into` until it is complete or `limit` bytes are held,
/// before any upstream is involved. Returns bytes read past the body's end.
async fn buffer_request_body<S: Stream>(
    client: &S,
    w: &Worker<S>,
    body: &mut Body,
    clock: &mut RateClock,
    into: &mut Vec<u8>,
    limit: usize,
) -> Result<Option<BytesMut>, HttpError> {
    while !body.is_done() && into.len() < limit {
        let (mut b, n) = read_body_part(client, w, body, clock).await?;
        into.extend_from_slice(&b[..n]);
        if n < b.len() {
            let extra = b.split_off(n);
            w.give_buf(b);
            return Ok(Some(extra));
        }
        w.give_buf(b);
    }
    Ok(None)
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
            Err(HttpError::ClientGone("write timeout"))
        }
    }
}

/// Reads the upstream's response head into `ub`, relaying informational responses.
/// On error also says whether any response byte had arrived (then no retry).
#[allow(clippy::too_many_arguments)]
async fn read_response_head<S: Stream>(
    client: &S,
    conn: &S,
    w: &Worker<S>,
    resp: &mut ResponseHead,
    mut ub: BytesMut,
    route: &Route,
    is_head: bool,
    sent_continue: bool,
    ws_accept: Option<&[u8; 28]>,
    relay_interim: bool,
) -> Result<BytesMut, (HttpError, BytesMut, bool)> {
    let mut got_bytes = false;
    let mut interim = 0;
    loop {
        if !ub.is_empty() {
            match parse_response(&ub, resp, MAX_RESPONSE_HEAD, is_head) {
                Ok(true) => {
                    if resp.status == 101 {
                        // A tunnel only for the WebSocket handshake the proxy forwarded,
                        // accepted with the right key (RFC 6455 §4.1): never a raw tunnel.
                        let why = match ws_accept {
                            None => "101 without an upgrade request",
                            Some(a) if !resp.accepts_websocket(&ub, a) => {
                                "101 without a valid WebSocket accept"
                            }
                            Some(_) => return Ok(ub),
                        };
                        return Err((HttpError::ResponseRefused(why), ub, true));
                    }
                    if (100..200).contains(&resp.status) {
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err((
                                HttpError::ResponseRefused("endless informational responses"),
                                ub,
                                true,
                            ));
                        }
                        // Relay informational responses, except a 100 the proxy already sent
                        // and any to an HTTP/1.0 client (RFC 9110 §15.2).
                        if relay_interim && !(resp.status == 100 && sent_continue) {
                            let mut out = w.take_out();
                            rewrite::write_informational(&mut out, &ub, resp);
                            let (r, o) = client.write_all(out).await;
                            w.give_out(o);
                            if r.is_err() {
                                return Err((HttpError::ClientGone("write"), ub, true));
                            }
                        }
                        ub.advance(resp.len);
                        continue;
                    }
                    return Ok(ub);
                }
                Ok(false) => {}
                Err(e) => {
                    if matches!(e, HttpError::ResponseRefused(_)) {
                        crate::util::budget::over_budget(
                            crate::util::budget::Buffer::ResponseHead,
                            None,
                        );
                    }
                    return Err((e, ub, true));
                }
            }
        }
        if ub.capacity() - ub.len() < 1024 {
            ub.reserve(16 * 1024);
        }
        match timeout(route.read_timeout, conn.read(ub)).await {
            Err(_) => return Err((HttpError::UpstreamTimeout("read"), w.take_buf(), got_bytes)),
            Ok((Ok(0), b)) => {
                return Err((
                    HttpError::UpstreamFailed("closed before responding"),
                    b,
                    got_bytes,
                ))
            }
            Ok((Err(_), b)) => return Err((HttpError::UpstreamFailed("read"), b, got_bytes)),
            Ok((Ok(_), b)) => {
                got_bytes = true;
                ub = b;
            }
        }
    }
}

/// A response relay that failed, and whether any of the response reached the client.
struct RelayFailed {
    error: HttpError,
    /// False only when the body bytes that came with the head were refused before the head
    /// was written: the client can still be answered 502.
    response_started: bool,
}

/// Every failure after the head went out: the client can only be told by closing.
impl From<HttpError> for RelayFailed {
    fn from(error: HttpError) -> RelayFailed {
        RelayFailed {
            error,
            response_started: true,
        }
    }
}

struct Relayed {
    body_bytes: u64,
    /// The upstream ended the body exactly where its framing said: reusable.
    upstream_clean: bool,
    client_ok: bool,
}

/// Sends the response head (in `out`) and streams the body from the upstream to the
/// client. `ub` holds the bytes read after the head.
#[allow(clippy::too_many_arguments)]
async fn relay_response_body<S: Stream>(
    client: &S,
    conn: &S,
    w: &Worker<S>,
    mut out: Vec<u8>,
    mut ub: BytesMut,
    framing: BodyFraming,
    client_framing: ClientFraming,
    route: &Route,
    min_rate: u64,
) -> Result<Relayed, RelayFailed> {
    // A client that takes the response too slowly is cut off (and the upstream connection
    // with it, never pooled): a per-write timeout alone lets a reader of a large response
    // hold both connections for as long as it trickles.
    let clock = &mut RateClock::new(route.send_timeout, route.send_timeout, min_rate);
    let mut body = Body::response(framing);
    let dechunk = client_framing == ClientFraming::Dechunk;
    let mut body_bytes: u64 = 0;
    let mut upstream_clean = true;

    // First write: head plus the body bytes that came with it, when they are few. Those
    // bytes are checked before the head goes out: a malformed first chunk (RFC 9112 §7.1)
    // that came with the head is then a 502 rather than a close with nothing written. A
    // bad chunk that arrives later, after the head was sent, can only end in a close.
    let mut decoded = Vec::new();
    let n = match body.take(&ub, |d| {
        if dechunk {
            decoded.extend_from_slice(d)
        }
    }) {
        Ok(n) => n,
        Err(error) => {
            w.give_out(out);
            w.give_buf(ub);
            return Err(RelayFailed {
                error,
                response_started: false,
            });
        }
    };
    if n < ub.len() {
        upstream_clean = false;
    }
    let first_body: &[u8] = if client_framing == ClientFraming::Dechunk {
        &decoded
    } else {
        &ub[..n]
    };
    body_bytes += first_body.len() as u64;
    let small = first_body.len() <= 16 * 1024;
    if small {
        out.extend_from_slice(first_body);
    }
    w.give_out(write_client(client, out, clock).await?);
    if !small {
        if client_framing == ClientFraming::Dechunk {
            decoded = write_client(client, std::mem::take(&mut decoded), clock).await?;
        } else {
            ub = write_client(client, ub.slice(..n), clock)
                .await?
                .into_inner();
        }
    }

    while !body.is_done() {
        ub.clear();
        let read = match timeout(route.read_timeout, conn.read(ub)).await {
            Ok(r) => r,
            Err(_) => return Err(HttpError::UpstreamTimeout("read body").into()),
        };
        let (res, b) = read;
        ub = b;
        match res {
            Ok(0) if framing == BodyFraming::UntilClose => {
                upstream_clean = false;
                break;
            }
            Ok(0) => {
                w.give_buf(ub);
                return Err(HttpError::UpstreamFailed("closed mid-body").into());
            }
            Err(_) => {
                w.give_buf(ub);
                return Err(HttpError::UpstreamFailed("read body").into());
            }
            Ok(_) => {}
        }
        decoded.clear();
        let n = body.take(&ub, |d| {
            if dechunk {
                decoded.extend_from_slice(d)
            }
        })?;
        if n < ub.len() {
            upstream_clean = false;
        }
        if client_framing == ClientFraming::Dechunk {
            body_bytes += decoded.len() as u64;
            if !decoded.is_empty() {
                decoded = write_client(client, std::mem::take(&mut decoded), clock).await?;
            }
        } else if n > 0 {
            body_bytes += n as u64;
            ub = write_client(client, ub.slice(..n), clock)
                .await?
                .into_inner();
        }
    }
    w.give_buf(ub);
    Ok(Relayed {
        body_bytes,
        upstream_clean,
        client_ok: true,
    })
}

/// Writes to the client within `clock`'s deadline; the buffer comes back on success.
async fn write_client<S: Stream, B: BoundedBuf>(
    client: &S,
    buf: B,
    clock: &mut RateClock,
) -> Result<B, HttpError> {
    let len = buf.bytes_init();
    match timeout_at(clock.deadline(), client.write_all(buf)).await {
        Err(_) => {
            crate::util::budget::refused(
                crate::util::budget::Refusal::SlowClient,
                &"response taken too slowly: connection closed",
            );
            Err(HttpError::ClientGone("write timeout"))
        }
        Ok((Err(_), _)) => Err(HttpError::ClientGone("write")),
        Ok((Ok(()), b)) => {
            clock.moved(len);
            Ok(b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RateClock;
    use std::time::Duration;

    #[test]
    fn rate_clock_bounds_the_whole_transfer() {
        let mut clock = RateClock::new(Duration::from_secs(60), Duration::from_secs(10), 1000);
        // Nothing moved yet: the grace period is all there is.
        let d = clock.deadline() - clock.started;
        assert!(
            d >= Duration::from_secs(10) && d < Duration::from_secs(11),
            "{d:?}"
        );
        // Each 1000 bytes earn one more second, never more than the pause from now.
        clock.moved(5000);
        let d = clock.deadline() - clock.started;
        assert!(
            d >= Duration::from_secs(15) && d < Duration::from_secs(16),
            "{d:?}"
        );
        clock.moved(1_000_000);
        let d = clock.deadline() - clock.started;
        assert!(
            d <= Duration::from_secs(61),
            "the pause still applies: {d:?}"
        );
        // A rate of 0 leaves only the pause.
        let clock = RateClock::new(Duration::from_secs(3), Duration::from_secs(10), 0);
        assert!(clock.deadline() - clock.started <= Duration::from_secs(4));
    }
}
