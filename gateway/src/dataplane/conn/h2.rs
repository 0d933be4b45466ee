//! One HTTP/2 client connection (RFC 9113): the `h2` crate's server, run on readiness I/O
//! on the worker's own thread (`docs/design/http2.md`), each stream a task on the worker
//! that is one exchange ([`super::exchange`]) to the HTTP/1.1 upstream pools.
//!
//! - [`choose`]: after the preamble, ALPN `h2` (TLS) or the client preface (h2c with prior
//!   knowledge, RFC 9113 §3.3) makes the connection HTTP/2; anything else stays HTTP/1.
//! - [`serve`]: the connection. It accepts streams, and ends itself with GOAWAY (then lets
//!   the open streams finish, at most `graceful_timeout`) on drain, on a reload that changes
//!   or removes its listener, after `max_requests_per_connection` streams and after
//!   `idle_timeout` without a stream. From that GOAWAY on no stream is forwarded: each
//!   one accepted is refused (RST_STREAM REFUSED_STREAM), and the connection closes once
//!   the open streams ended, without waiting for the PING ACK of `h2`'s graceful shutdown.
//!   A SETTINGS/PING flood (counted by `protocol::h2::guard`) ends it with GOAWAY
//!   ENHANCE_YOUR_CALM.
//! - Each stream: the translation (`protocol::h2::translate`: malformed requests are reset
//!   with PROTOCOL_ERROR and never reach an upstream, refusals get the status HTTP/1 gives),
//!   `request_rate`, the router, then the exchange with [`H2Stream`] as request source
//!   (DATA frames, flow-control capacity released only once the bytes went upstream) and
//!   response sink (HEADERS, then DATA under the client's flow control). The access log
//!   says `HTTP/2.0`. Informational responses are relayed (bounded), except `100`.
//! - WebSocket over HTTP/2 (RFC 8441, `[http2] websocket`): the session advertises
//!   SETTINGS_ENABLE_CONNECT_PROTOCOL; an extended CONNECT with `:protocol = websocket`
//!   on a WebSocket route goes upstream as the HTTP/1.1 handshake, the validated 101
//!   becomes `200`, and the stream runs as a tunnel ([`websocket`]).
//!
//! A client's RST_STREAM ends the stream's exchange at its next await (the response-head
//! wait watches for it through [`ResponseSink::gone`], body reads and writes fail on it);
//! the exchange's guards return its buffers and never pool an upstream connection with a
//! request in flight. When the connection ends, the stream tasks still running see it
//! fail their I/O and finish (logged with what they sent); any left after `CLOSE_WAIT`
//! are aborted (a `JoinSet`).

mod websocket;

use crate::dataplane::conn::exchange::{
    self, BodyForm, Exchange, Failure, RequestSource, ResponseSink,
};
use crate::dataplane::conn::h1::{client_ip_from, NO_ROUTE};
use crate::dataplane::conn::relay::RateClock;
use crate::dataplane::conn::ListenerCtx;
use crate::dataplane::ctx::{Lent, Worker, HEAD_BUF_SIZE};
use crate::io::Stream;
use crate::policy::route::{Action, Route};
use crate::protocol::error::{HttpError, Side};
use crate::protocol::h2::guard::{FrameGuard, PREFACE};
use crate::protocol::h2::io::{readiness_socket, TlsIo};
use crate::protocol::h2::translate::{translate_request, translate_response, TranslateError};
use crate::protocol::h2::{BodyLength, H2Request};
use crate::protocol::http1::error_body;
use crate::protocol::http1::head::{BodyFraming, ResponseHead};
use crate::protocol::http1::rewrite::Forwarding;
use crate::protocol::tls::stream::MaybeTls;
use crate::telemetry::access_log::Entry;
use crate::util::clock::{timeout_at, PhaseTimer};
use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use std::cell::RefCell;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_uring::buf::BoundedBuf;

/// Response bytes `h2` may buffer per stream (its default is 400 KiB): with 100 streams,
/// 1.6 MiB per connection at most. 16 KiB is one full DATA frame (the default
/// SETTINGS_MAX_FRAME_SIZE), so a reader with an open window still gets full frames.
const SEND_BUFFER: usize = 16 * 1024;
/// Request body a stream may have in flight before the exchange reads it (the stream's
/// receive window), and for the whole connection.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Streams reset by the client before the session accepted them, at most (rapid reset,
/// CVE-2023-44487); more is GOAWAY. h2's default.
const PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server had to reset because of the client's frames (MadeYouReset,
/// CVE-2025-8671); more is GOAWAY. h2's default.
const LOCAL_ERROR_RESETS: usize = 1024;
/// Informational responses relayed per stream at most, and their head bytes in total:
/// HEADERS frames bypass flow control, so this is what a stream may queue before its
/// final response whatever the upstream sends.
const INTERIM_RELAYED: usize = 4;
const INTERIM_BYTES: usize = SEND_BUFFER;
/// How often the connection looks for a reload that changed its listener or denied its
/// client.
const LISTENER_CHECK: Duration = Duration::from_secs(1);
/// How long a connection being ended may take to flush its last frames (GOAWAY).
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How often a connection past its GOAWAY, with no stream task left, looks whether h2 has
/// flushed the last frames, to close it.
const FLUSH_POLL: Duration = Duration::from_millis(50);

/// The byte stream `h2` runs on: TLS ([`TlsIo`]) or the plain socket (h2c).
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Duplex for T {}

pub(crate) type H2Io = FrameGuard<Pin<Box<dyn Duplex>>>;

/// What a connection speaks, once its preamble is done.
pub(crate) enum Protocol<S: Stream> {
    Http1(MaybeTls<S>, BytesMut),
    Http2(Pin<Box<dyn Duplex>>, BytesMut),
    Closed,
}

/// HTTP/2 when the listener offers it and the client chose it: ALPN `h2` on TLS, the
/// preface with prior knowledge on an h2c listener (read within `header_timeout` of the
/// accept); HTTP/1 otherwise, with the bytes already read.
pub(crate) async fn choose<S: Stream>(
    w: &Worker<MaybeTls<S>>,
    ctx: &ListenerCtx,
    io: MaybeTls<S>,
    mut initial: BytesMut,
    accepted: Instant,
) -> Protocol<S> {
    match io {
        MaybeTls::Tls(tls) if tls.alpn_is_h2() => match TlsIo::from_tls(*tls) {
            Ok(io) => Protocol::Http2(Box::pin(io), initial),
            Err(e) => {
                tracing::debug!(error = %e, "h2: cannot move the connection to readiness I/O");
                Protocol::Closed
            }
        },
        MaybeTls::Plain(plain) if ctx.settings.h2c => {
            let deadline = accepted + w.snapshot().server.header_timeout;
            // Prior knowledge: the preface is the first thing the client sends (RFC 9113
            // §3.4). Read until it is there or the bytes differ from it.
            while initial.len() < PREFACE.len() && PREFACE.starts_with(&initial) {
                if initial.capacity() - initial.len() < PREFACE.len() {
                    initial.reserve(HEAD_BUF_SIZE);
                }
                match timeout_at(deadline, plain.read(std::mem::take(&mut initial))).await {
                    Ok((Ok(n), b)) if n > 0 => initial = b,
                    _ => return Protocol::Closed,
                }
            }
            if !initial.starts_with(PREFACE) {
                return Protocol::Http1(MaybeTls::Plain(plain), initial);
            }
            match readiness_socket(plain) {
                Ok(sock) => Protocol::Http2(Box::pin(sock), initial),
                Err(e) => {
                    tracing::debug!(error = %e, "h2c: cannot move the connection to readiness I/O");
                    Protocol::Closed
                }
            }
        }
        io => Protocol::Http1(io, initial),
    }
}

/// Counts an HTTP/2 connection in `gateway_http2_connections_active` while it lives.
struct ActiveConnection<'w, S: Stream> {
    w: &'w Worker<S>,
    listener: Arc<str>,
}

impl<S: Stream> Drop for ActiveConnection<'_, S> {
    fn drop(&mut self) {
        self.w.stats.borrow_mut().listener(&self.listener).h2_active -= 1;
    }
}

/// Serves one HTTP/2 connection; see the module documentation.
pub(crate) async fn serve<S: Stream>(
    w: Rc<Worker<MaybeTls<S>>>,
    ctx: Rc<ListenerCtx>,
    io: Pin<Box<dyn Duplex>>,
    read_ahead: BytesMut,
    peer: SocketAddr,
    accepted: Instant,
) {
    let snap = w.snapshot();
    let limits = snap.http2.clone();
    let (io, flood, round) = FrameGuard::new(io, read_ahead, limits.max_control_frames_per_second);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
        .max_send_buffer_size(SEND_BUFFER)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    if limits.websocket {
        // SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3): clients may open WebSockets as
        // extended CONNECT streams. Without it h2 resets a stream carrying `:protocol`.
        builder.enable_connect_protocol();
    }
    let deadline = accepted + snap.server.header_timeout;
    let mut conn = match timeout_at(deadline, builder.handshake::<H2Io, Bytes>(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "h2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "h2 handshake timed out");
            return;
        }
    };
    drop(snap);
    w.stats.borrow_mut().listener(&ctx.name).h2_active += 1;
    let _active = ActiveConnection {
        w: &*w,
        listener: ctx.name.clone(),
    };

    let mut tasks = tokio::task::JoinSet::new();
    let mut streams: u64 = 0;
    let mut idle_since = Instant::now();
    // Set once a GOAWAY went out: open streams finish until then.
    let mut closing: Option<Instant> = None;
    let mut generation_seen = w.snapshot().generation;
    let mut tick = tokio::time::interval(LISTENER_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let goaway = |conn: &mut h2::server::Connection<H2Io, Bytes>,
                  closing: &mut Option<Instant>,
                  reason: &'static str| {
        if closing.is_none() {
            conn.graceful_shutdown();
            *closing = Some(Instant::now() + w.snapshot().server.graceful_timeout);
            w.stats.borrow_mut().h2_goaway(&ctx.name, reason);
        }
    };
    loop {
        let finished = closing.is_some() && tasks.is_empty();
        if finished && !conn.has_streams() {
            // GOAWAY went out, every stream ended and its frames were flushed (h2 counts
            // a stream until then): end the connection now rather than wait for the PING
            // ACK of h2's graceful shutdown, which a client may never send. The final
            // GOAWAY carries the last stream id processed; nothing open is cut.
            conn.abrupt_shutdown(Reason::NO_ERROR);
            let _ = tokio::time::timeout(CLOSE_WAIT, poll_fn(|cx| conn.poll_closed(cx))).await;
            break;
        }
        let idle_at =
            (tasks.is_empty() && closing.is_none()).then(|| idle_since + limits.idle_timeout);
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((_, mut respond))) if closing.is_some() => {
                    // After a GOAWAY no stream is forwarded, whatever the client does.
                    // h2's graceful shutdown sends GOAWAY(2^31-1) and the final GOAWAY only
                    // once the client ACKs its PING: a client that never does could open
                    // streams until `graceful_timeout`, each one upstream work past
                    // `max_requests_per_connection` or a drain. REFUSED_STREAM (RFC 9113
                    // §8.7) tells an honest client the request was not processed and may be
                    // retried on another connection.
                    respond.send_reset(Reason::REFUSED_STREAM);
                    w.stats.borrow_mut().listener(&ctx.name).h2_resets[1] += 1;
                }
                Some(Ok((request, respond))) => {
                    // Counted at accept, so streams of one burst past the limit are refused.
                    streams += 1;
                    w.stats.borrow_mut().listener(&ctx.name).h2_streams += 1;
                    tasks.spawn_local(stream(w.clone(), ctx.clone(), peer, request, respond));
                    if streams >= limits.max_requests_per_connection {
                        goaway(&mut conn, &mut closing, "max_requests");
                    }
                }
                Some(Err(e)) => {
                    if e.is_go_away() && e.is_library() {
                        // h2 ended the connection for a protocol error, a CONTINUATION
                        // flood or too many resets, with a GOAWAY of its own.
                        w.stats.borrow_mut().h2_goaway(&ctx.name, "error");
                    }
                    tracing::debug!(%peer, error = %e, "h2 connection ended");
                    break;
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                if tasks.is_empty() {
                    idle_since = Instant::now();
                }
            }
            () = round.raised() => {
                // The client kept h2 busy for a round of frames: the worker's other
                // connections (on io_uring: everything submitted since the thread last
                // parked) get their turn before the next (`protocol::h2::guard`).
                S::yield_to_driver().await;
                round.resume();
            }
            () = flood.raised() => {
                tracing::info!(%peer, "HTTP/2 frame flood: connection closed with ENHANCE_YOUR_CALM");
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                w.stats.borrow_mut().h2_goaway(&ctx.name, "flood");
                // Reads have stopped; h2 sends the GOAWAY and ends. Bounded anyway.
                let _ = tokio::time::timeout(CLOSE_WAIT, poll_fn(|cx| conn.poll_closed(cx))).await;
                break;
            }
            // Until the last stream's frames are flushed (no event of ours says when).
            () = tokio::time::sleep(FLUSH_POLL), if finished => {}
            () = w.drained(), if closing.is_none() => goaway(&mut conn, &mut closing, "drain"),
            // graceful_timeout spent: the streams still open are cut (and logged, 499) now,
            // not at the next tick, so a drain's last lines are written before it exits.
            () = sleep_until(closing), if closing.is_some_and(|at| Instant::now() < at) => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
            }
            () = sleep_until(idle_at), if idle_at.is_some() => goaway(&mut conn, &mut closing, "idle"),
            _ = tick.tick() => {
                let generation = w.snapshot().generation;
                if generation != generation_seen {
                    generation_seen = generation;
                    // A `deny` added by a reload ends this client's connections at once,
                    // open streams with them, as HTTP/1 keep-alive connections are closed.
                    if w.shared.conn_limiter.denies(peer.ip()) {
                        tracing::info!(client = %peer.ip(), "HTTP/2 connection closed: its address is now denied");
                        conn.abrupt_shutdown(Reason::NO_ERROR);
                        w.stats.borrow_mut().h2_goaway(&ctx.name, "denied");
                        let _ = tokio::time::timeout(CLOSE_WAIT, poll_fn(|cx| conn.poll_closed(cx))).await;
                        break;
                    }
                    if closing.is_none() && listener_changed(&w, &ctx) {
                        goaway(&mut conn, &mut closing, "reload");
                    }
                }
                if closing.is_some_and(|at| Instant::now() >= at) {
                    // graceful_timeout spent: the streams still open are cut.
                    conn.abrupt_shutdown(Reason::NO_ERROR);
                }
            }
        }
    }
    // Streams still running (the client went away, or the drain's `graceful_timeout` cut
    // the connection) end on their own once they see the connection gone: dropping it
    // fails every stream's pending and next I/O (h2 ends them on drop). So each logs what
    // it really sent (a tunnel its 200 and bytes, a response cut short its status and the
    // bytes that left) and counts its tunnel, instead of being aborted mid-way as 499 0.
    // Bounded: what is still running after `CLOSE_WAIT` is aborted by the JoinSet.
    drop(conn);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    drop(tasks);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A reload removed the connection's listener or changed it (`ListenerSettings::same_as`).
fn listener_changed<S: Stream>(w: &Worker<S>, ctx: &ListenerCtx) -> bool {
    let snap = w.snapshot();
    !snap
        .listeners
        .iter()
        .any(|l| Arc::ptr_eq(l, &ctx.settings) || l.same_as(&ctx.settings))
}

/// What one stream came to, for the log and the metrics.
struct Outcome<'s> {
    status: u16,
    body_bytes: u64,
    route: Option<&'s Arc<str>>,
    upstream: Option<&'s str>,
}

/// One stream, from its request to the end of its response.
async fn stream<S: Stream>(
    w: Rc<Worker<MaybeTls<S>>>,
    ctx: Rc<ListenerCtx>,
    peer: SocketAddr,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let snap = w.snapshot();
    let (parts, body) = request.into_parts();
    let settings = &ctx.settings;
    let client_ip = client_ip_from(
        parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes()),
        peer.ip(),
        settings,
    );
    let fwd = Forwarding {
        client_ip,
        peer_ip: peer.ip(),
        proto: ctx.proto,
        upgrade: false,
        default_host: &ctx.name,
        trusted_peer: settings.trusts(peer.ip()),
        keep_forwarding: &snap.server.forward_client_headers,
        underscores: snap.server.underscores_in_headers,
    };
    // Logged and counted when dropped: at the end below, and also when the stream's task
    // is aborted because the client closed its connection (or the drain's
    // `graceful_timeout` cut it): 499 then, booked to the route it reached.
    let mut end = StreamEnd {
        w: &w,
        listener: &ctx.name,
        snap: &snap,
        parts: &parts,
        client_ip,
        started,
        outcome: Outcome {
            status: 499,
            body_bytes: 0,
            route: None,
            upstream: None,
        },
    };
    let mut req = H2Request::default();
    let mut head = w.lend_out();
    let translated = translate_request(
        &parts,
        body.is_end_stream(),
        &fwd,
        snap.server.max_header_bytes,
        &mut req,
        &mut head,
    );
    end.outcome = match translated {
        Err(e) => refuse(&w, &ctx, &mut respond, &e),
        Ok(()) => match route(&w, &snap, &mut respond, &req, client_ip) {
            Routed::Answered(outcome) => outcome,
            Routed::Proxy(route, upstream) => {
                end.outcome.route = Some(&route.label);
                match UpstreamSocket::take(&w, peer.ip()) {
                    Ok(_socket) => {
                        let asked = Asked {
                            req: &req,
                            head: &head[..],
                            body,
                            client_ip,
                        };
                        proxy(&w, &ctx.name, &snap, route, upstream, respond, asked).await
                    }
                    Err(()) => Outcome {
                        route: Some(&route.label),
                        ..simple(
                            &mut respond,
                            503,
                            None,
                            "text/plain",
                            error_body(503),
                            false,
                        )
                    },
                }
            }
        },
    };
}

/// The upstream socket a proxied stream holds (a tunnel's for its whole life), budgeted
/// like a connection (nginx counts upstream connections in `worker_connections`): in the
/// process's connection count checked against `max_connections`, whose descriptor
/// arithmetic allows two per connection, and against the client's `max_conns_per_ip`.
/// Without it one h2 connection holds up to `max_concurrent_streams` upstream sockets and
/// a few hundred take every descriptor (attack report F2). Over either: 503 for this
/// stream, booked to the client (`gateway_local_refusals_total{reason="max_connections"}`
/// or `gateway_limit_rejections_total{limit="max_conns_per_ip"}`).
struct UpstreamSocket<'w, S: Stream> {
    w: &'w Worker<MaybeTls<S>>,
    _ticket: crate::policy::limits::ConnTicket,
}

impl<'w, S: Stream> UpstreamSocket<'w, S> {
    fn take(w: &'w Worker<MaybeTls<S>>, peer: IpAddr) -> Result<Self, ()> {
        let ticket = match w.shared.conn_limiter.on_upstream_socket(peer) {
            Ok(t) => t,
            Err(r) => {
                w.stats.borrow_mut().limit_rejection(r.limit, r.enforcer);
                tracing::debug!(client = %peer, "h2 stream refused: max_conns_per_ip reached");
                return Err(());
            }
        };
        let max = w.snapshot().server.max_connections;
        if w.shared.connections.fetch_add(1, Ordering::Relaxed) >= max {
            w.shared.connections.fetch_sub(1, Ordering::Relaxed);
            crate::util::budget::refused(
                crate::util::budget::Refusal::MaxConnections,
                &format_args!("max_connections ({max}) reached: h2 stream from {peer} refused"),
            );
            return Err(());
        }
        Ok(UpstreamSocket { w, _ticket: ticket })
    }
}

impl<S: Stream> Drop for UpstreamSocket<'_, S> {
    fn drop(&mut self) {
        self.w.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream's access-log line and `gateway_http_requests_total`, written once when it is
/// dropped, however the stream ended.
struct StreamEnd<'s, S: Stream> {
    w: &'s Worker<MaybeTls<S>>,
    listener: &'s Arc<str>,
    snap: &'s crate::snapshot::Snapshot,
    parts: &'s http::request::Parts,
    client_ip: IpAddr,
    started: Instant,
    outcome: Outcome<'s>,
}

impl<S: Stream> Drop for StreamEnd<'_, S> {
    fn drop(&mut self) {
        let (w, outcome, parts) = (self.w, &self.outcome, self.parts);
        let elapsed = self.started.elapsed();
        w.stats.borrow_mut().request(
            self.listener,
            outcome.route.unwrap_or(&NO_ROUTE),
            outcome.status,
            elapsed.as_secs_f64(),
        );
        if self.snap.access_enabled {
            let field = |name: &str| parts.headers.get(name).map(|v| v.as_bytes());
            let target = parts
                .uri
                .path_and_query()
                .map_or(&b"-"[..], |p| p.as_str().as_bytes());
            let entry = Entry {
                client_ip: self.client_ip,
                method: parts.method.as_str().as_bytes(),
                target,
                version: 2,
                status: outcome.status,
                body_bytes: outcome.body_bytes,
                referer: field("referer"),
                user_agent: field("user-agent"),
                duration_us: elapsed.as_micros() as u64,
                upstream: outcome.upstream,
            };
            w.log.borrow_mut().record(self.snap.access_format, &entry);
        }
    }
}

/// A request the translation refused: malformed ones are reset (RFC 9113 §8.1.1), the
/// rest answered with the status HTTP/1 gives.
fn refuse<'s, S: Stream>(
    w: &Worker<MaybeTls<S>>,
    ctx: &ListenerCtx,
    respond: &mut SendResponse<Bytes>,
    e: &TranslateError,
) -> Outcome<'s> {
    tracing::debug!(error = %e.error, "h2 request refused");
    let status = e.status();
    match e.reset_reason() {
        Some(reason) => {
            respond.send_reset(reason);
            w.stats.borrow_mut().listener(&ctx.name).h2_resets[1] += 1;
            Outcome {
                status,
                body_bytes: 0,
                route: None,
                upstream: None,
            }
        }
        None => simple(
            respond,
            status,
            None,
            "text/plain",
            error_body(status),
            false,
        ),
    }
}

/// Sends a whole small response (an error, a `respond` route).
fn simple<'s>(
    respond: &mut SendResponse<Bytes>,
    status: u16,
    extra: Option<(&'static str, String)>,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> Outcome<'s> {
    let mut response = http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len());
    if let Some((name, value)) = extra {
        response = response.header(name, value);
    }
    let sent_body = if head_only { &b""[..] } else { body };
    if let Ok(response) = response.body(()) {
        if let Ok(mut send) = respond.send_response(response, sent_body.is_empty()) {
            if !sent_body.is_empty() {
                // Small and bounded by the config (or a fixed error text): h2 queues it
                // beyond the window and sends it as the client opens it.
                let _ = send.send_data(Bytes::copy_from_slice(sent_body), true);
            }
        }
    }
    Outcome {
        status,
        body_bytes: sent_body.len() as u64,
        route: None,
        upstream: None,
    }
}

/// A translated request: what routing and the exchange need of it.
struct Asked<'a> {
    req: &'a H2Request,
    /// The HTTP/1.1 head for the upstream.
    head: &'a [u8],
    body: RecvStream,
    client_ip: IpAddr,
}

/// Where routing sent a stream.
enum Routed<'s> {
    /// Answered here (a refusal, a `respond` route).
    Answered(Outcome<'s>),
    /// To the exchange.
    Proxy(&'s Route, &'s Arc<crate::upstream::Upstream>),
}

/// Everything after the translation: `request_rate`, the route, the answers given here.
fn route<'s, S: Stream>(
    w: &Worker<MaybeTls<S>>,
    snap: &'s crate::snapshot::Snapshot,
    respond: &mut SendResponse<Bytes>,
    req: &H2Request,
    client_ip: IpAddr,
) -> Routed<'s> {
    let is_head = req.method() == http::Method::HEAD;
    // limits.request_rate, per stream as per HTTP/1 request.
    if let Err(retry_after) = w.request_rate(snap, client_ip) {
        let extra = Some(("retry-after", retry_after.to_string()));
        let o = simple(respond, 429, extra, "text/plain", error_body(429), is_head);
        return Routed::Answered(o);
    }
    let host = (!req.host().is_empty()).then(|| req.host());
    let Some(route) = snap.router.find(host, req.path()) else {
        let o = simple(respond, 404, None, "text/plain", error_body(404), is_head);
        return Routed::Answered(o);
    };
    let answer = |respond: &mut SendResponse<Bytes>, status: u16| {
        Routed::Answered(Outcome {
            route: Some(&route.label),
            ..simple(
                respond,
                status,
                None,
                "text/plain",
                error_body(status),
                is_head,
            )
        })
    };
    if let BodyFraming::Length(n) = req.framing() {
        if n > route.max_body_size {
            return answer(respond, 413);
        }
    }
    if req.method() == http::Method::TRACE && !route.allow_trace {
        return answer(respond, 405);
    }
    if req.is_websocket() {
        // RFC 8441 on a route that takes no WebSocket (or answers itself): 405, nothing
        // upstream. HTTP/1 would strip the upgrade and forward a plain GET, but a 2xx to an
        // extended CONNECT means the tunnel is open (RFC 8441 §5), so none may be relayed.
        // `[http2] websocket` is read from the current snapshot, per stream: a reload that
        // turns it off applies to connections opened before it (whose SETTINGS still
        // advertise extended CONNECT) at once, as the route-level flag does.
        if !snap.http2.websocket || !route.websocket || !matches!(route.action, Action::Proxy(_)) {
            return answer(respond, 405);
        }
        if !req.websocket_version_ok() {
            // RFC 6455 §4.4, as HTTP/1 answers on a WebSocket route.
            let extra = Some(("sec-websocket-version", "13".to_string()));
            let body = error_body(426);
            return Routed::Answered(Outcome {
                route: Some(&route.label),
                ..simple(respond, 426, extra, "text/plain", body, false)
            });
        }
    }
    match &route.action {
        Action::Respond(r) => Routed::Answered(Outcome {
            route: Some(&route.label),
            ..simple(
                respond,
                r.status,
                None,
                &r.content_type,
                r.body.as_bytes(),
                is_head,
            )
        }),
        Action::Proxy(index) => Routed::Proxy(route, &snap.upstreams[*index]),
    }
}

/// The stream's exchange with the upstream.
async fn proxy<'s, S: Stream>(
    w: &Rc<Worker<MaybeTls<S>>>,
    listener: &Arc<str>,
    snap: &'s crate::snapshot::Snapshot,
    route: &'s Route,
    upstream: &'s Arc<crate::upstream::Upstream>,
    respond: SendResponse<Bytes>,
    asked: Asked<'_>,
) -> Outcome<'s> {
    let Asked {
        req,
        head,
        body,
        client_ip,
    } = asked;
    let settings = &snap.server;
    let framing = req.framing();
    let mut s = H2Stream {
        head,
        idempotent: req.is_idempotent(),
        websocket: req.is_websocket(),
        is_head: req.method() == http::Method::HEAD,
        done: matches!(framing, BodyFraming::None),
        chunked: framing == BodyFraming::Chunked,
        body,
        length: req.body_length(),
        max_body: route.max_body_size,
        unreleased: 0,
        body_clock: RateClock::new(
            settings.client_body_timeout,
            settings.client_body_timeout,
            settings.client_min_rate,
        ),
        malformed: false,
        reply: Rc::new(RefCell::new(Reply::Head(respond))),
        response: None,
        body_left: None,
        ended: false,
        write_clock: None,
        send_timeout: route.send_timeout,
        min_rate: settings.client_min_rate,
        reset_by_client: false,
        interim_sent: 0,
        interim_bytes: 0,
    };
    // The exchange's upstream writes and reads, one after another (the stream's client
    // writes keep their own clocks).
    let timer = PhaseTimer::default();
    let x = Exchange {
        w: &**w,
        route,
        upstream,
        client_ip,
        request_buffering: settings.request_buffering,
        ws_accept: req.is_websocket().then(|| req.websocket_accept()),
        server: std::cell::Cell::new(None),
        timer: &timer,
    };
    let mut resp = ResponseHead::default();
    // A client's RST_STREAM drops the exchange wherever it waits (connecting, on the
    // upstream's head or body, on the client's window): its guards give the buffers back
    // and the upstream connection, with a request in flight, is closed, never pooled.
    let watch = s.reply.clone();
    let result = tokio::select! {
        r = exchange::run(&x, &mut s, &mut resp) => r,
        reset = poll_fn(|cx| watch.borrow_mut().poll_reset(cx)) => {
            s.reset_by_client = reset.is_ok();
            // Logged with the server the request reached, if it got that far.
            Err(Failure::before_response(HttpError::ClientGone("stream reset"), x.server.get()))
        }
    };
    let label = |server: Option<usize>| server.map(|i| upstream.servers[i].label.as_str());
    let (outcome, sent_reset) = match result {
        Ok(exchange::Exchanged {
            server,
            upgraded: Some(tunnel),
            ..
        }) => {
            // WebSocket: the 200 went out; the stream and the upstream are one tunnel now.
            use crate::dataplane::conn::tunnel::counted;
            let run = websocket::run(w, tunnel, &mut s.body, &s.reply, route.read_timeout);
            let bytes = counted(w, &upstream.metric_name, run).await;
            let outcome = Outcome {
                // What the client got: RFC 8441's 200 (the upstream's 101 is not logged).
                status: 200,
                body_bytes: bytes.to_client,
                route: Some(&route.label),
                upstream: label(Some(server)),
            };
            (outcome, false)
        }
        Ok(done) => {
            if let Reply::Body(send) = &mut *s.reply.borrow_mut() {
                if !s.ended {
                    // A body of unknown length ended: an empty DATA frame with END_STREAM.
                    let _ = send.send_data(Bytes::new(), true);
                }
            }
            let outcome = Outcome {
                status: done.status,
                body_bytes: done.body_bytes,
                route: Some(&route.label),
                upstream: label(Some(done.server)),
            };
            (outcome, false)
        }
        Err(Failure {
            error,
            server,
            body_bytes,
            ..
        }) => {
            let status = error.status();
            if error.side() != Side::Client {
                w.stats
                    .borrow_mut()
                    .upstream_error(&upstream.metric_name, error.kind());
            }
            if !error.is_refused_request() {
                tracing::debug!(upstream = %upstream.name, %error, "h2 request failed");
            }
            let head_sent = matches!(*s.reply.borrow(), Reply::Body(_));
            let sent_reset = if s.malformed {
                // RFC 9113 §8.1.1: a content-length the DATA frames do not match.
                s.reset(Reason::PROTOCOL_ERROR)
            } else if matches!(error, HttpError::ClientGone(_)) {
                s.reset(Reason::CANCEL)
            } else if head_sent {
                // Part of the response went out: only a reset can tell the client.
                s.reset(Reason::INTERNAL_ERROR)
            } else {
                // No head went out: the client gets the status HTTP/1 would send.
                if let Reply::Head(respond) = &mut *s.reply.borrow_mut() {
                    let body = error_body(status);
                    simple(respond, status, None, "text/plain", body, s.is_head);
                }
                false
            };
            let outcome = Outcome {
                status,
                // What went out before the failure (0 when no head did).
                body_bytes,
                route: Some(&route.label),
                upstream: label(server),
            };
            (outcome, sent_reset)
        }
    };
    if s.reset_by_client || sent_reset {
        let mut stats = w.stats.borrow_mut();
        let l = stats.listener(listener);
        l.h2_resets[0] += s.reset_by_client as u64;
        l.h2_resets[1] += sent_reset as u64;
    }
    outcome
}

/// A stream's sending half: before the response head, then after it.
pub(crate) enum Reply {
    Head(SendResponse<Bytes>),
    Body(SendStream<Bytes>),
}

impl Reply {
    /// Ready when the client reset the stream (`Ok`) or the connection failed (`Err`).
    fn poll_reset(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<Reason, h2::Error>> {
        match self {
            Reply::Head(r) => r.poll_reset(cx),
            Reply::Body(s) => s.poll_reset(cx),
        }
    }

    /// Asks for room for `want` bytes in the client's window (and h2's send buffer) and
    /// polls for what there is: `None` when no response head went out or the stream closed.
    pub(crate) fn poll_send_capacity(
        &mut self,
        want: usize,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<usize, h2::Error>>> {
        match self {
            Reply::Body(send) => {
                send.reserve_capacity(want);
                send.poll_capacity(cx)
            }
            Reply::Head(_) => Poll::Ready(None),
        }
    }

    /// Queues a DATA frame (within the capacity granted); false when the stream is gone.
    pub(crate) fn send(&mut self, data: Bytes, end: bool) -> bool {
        match self {
            Reply::Body(send) => send.send_data(data, end).is_ok(),
            Reply::Head(_) => false,
        }
    }
}

/// An h2 stream as the exchange sees it: the source of the request body (its DATA frames)
/// and the sink of the response.
struct H2Stream<'a> {
    /// The request head for the upstream (`translate_request`).
    head: &'a [u8],
    idempotent: bool,
    /// An extended CONNECT (RFC 8441): no 2xx but the validated 101 may answer it.
    websocket: bool,
    is_head: bool,
    /// END_STREAM was received (and checked against the declared length).
    done: bool,
    /// No `content-length`: the body goes upstream chunked (RFC 9112 §7.1).
    chunked: bool,
    body: RecvStream,
    length: BodyLength,
    max_body: u64,
    /// Bytes read and not yet given back to the client's window: released when the next
    /// read is asked for, i.e. once the exchange wrote them upstream. A slow upstream so
    /// slows this stream's window, and nothing else.
    unreleased: usize,
    body_clock: RateClock,
    /// The DATA frames did not match `content-length`: reset with PROTOCOL_ERROR.
    malformed: bool,
    /// Where the response goes: shared with the reset watcher, borrowed only inside a
    /// poll or a synchronous call, so the two never hold it at once.
    reply: Rc<RefCell<Reply>>,
    response: Option<Result<http::Response<()>, TranslateError>>,
    /// Response body bytes still to come when the upstream declared its length (0: no
    /// body): the last DATA frame then carries END_STREAM itself, one frame less per
    /// response than an empty closing frame.
    body_left: Option<u64>,
    /// END_STREAM went out (on the head or on the last DATA frame).
    ended: bool,
    /// Bounds the whole response by its size, as for HTTP/1 clients; starts with the
    /// response head, so the time the upstream took is not charged to the client.
    write_clock: Option<RateClock>,
    send_timeout: Duration,
    min_rate: u64,
    reset_by_client: bool,
    /// Informational responses seen and their head bytes (bounded relay).
    interim_sent: usize,
    interim_bytes: usize,
}

impl H2Stream<'_> {
    /// Ends the stream with RST_STREAM `reason`, unless the client already reset it.
    /// Returns whether one was sent.
    fn reset(&mut self, reason: Reason) -> bool {
        if self.reset_by_client {
            return false;
        }
        match &mut *self.reply.borrow_mut() {
            Reply::Head(r) => r.send_reset(reason),
            Reply::Body(s) => s.send_reset(reason),
        }
        true
    }

    fn release(&mut self) {
        if self.unreleased > 0 {
            let _ = self.body.flow_control().release_capacity(self.unreleased);
            self.unreleased = 0;
        }
    }

    fn stream_error(&mut self, e: &h2::Error) -> HttpError {
        if e.is_reset() && e.is_remote() {
            self.reset_by_client = true;
            HttpError::ClientGone("stream reset")
        } else {
            HttpError::ClientGone("connection ended")
        }
    }

    fn malformed(&mut self, e: TranslateError) -> HttpError {
        self.malformed = e.malformed;
        e.error
    }

    /// The request body ended: the length is checked, chunked framing closed.
    fn end_body(&mut self, b: &mut BytesMut) -> Result<(), HttpError> {
        self.length.on_end().map_err(|e| self.malformed(e))?;
        if self.chunked {
            b.extend_from_slice(b"0\r\n\r\n");
        }
        self.done = true;
        Ok(())
    }

    /// Sends response payload under the stream's flow control: waits for the client's
    /// window (within the write clock), never buffering more than `SEND_BUFFER`.
    async fn send_payload(&mut self, mut data: &[u8]) -> Result<(), HttpError> {
        // Only what the window lets out is copied (below), so a stream whose client keeps
        // its window closed holds no second copy of the upstream chunk.
        let reply = self.reply.clone();
        while !data.is_empty() {
            let want = data.len();
            let capacity = poll_fn(|cx| reply.borrow_mut().poll_send_capacity(want, cx));
            let (pause, min_rate) = (self.send_timeout, self.min_rate);
            let clock = self
                .write_clock
                .get_or_insert_with(|| RateClock::new(pause, pause, min_rate));
            let capacity = timeout_at(clock.deadline(), capacity).await;
            let n = match capacity {
                Err(_) => {
                    crate::util::budget::refused(
                        crate::util::budget::Refusal::SlowClient,
                        &"h2 response taken too slowly: stream reset",
                    );
                    return Err(super::relay::CLIENT_WRITE_TIMEOUT);
                }
                Ok(None) => return Err(HttpError::ClientGone("stream closed")),
                Ok(Some(Err(e))) => return Err(self.stream_error(&e)),
                Ok(Some(Ok(0))) => continue,
                Ok(Some(Ok(n))) => n.min(data.len()),
            };
            let (now, rest) = data.split_at(n);
            data = rest;
            // The body decoder yields no byte past the declared length, so reaching it is
            // the end of the body.
            let end = self.body_left == Some(n as u64);
            if let Some(left) = &mut self.body_left {
                *left = left.saturating_sub(n as u64);
            }
            let sent = match &mut *reply.borrow_mut() {
                Reply::Body(send) => send.send_data(Bytes::copy_from_slice(now), end),
                Reply::Head(_) => return Err(HttpError::ClientGone("stream closed")),
            };
            self.ended |= end;
            if let Err(e) = sent {
                return Err(self.stream_error(&e));
            }
            if let Some(clock) = self.write_clock.as_mut() {
                clock.moved(n);
            }
        }
        Ok(())
    }
}

impl<S: Stream> RequestSource<S> for H2Stream<'_> {
    fn write_request_start(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.head);
    }

    fn held(&self) -> usize {
        0
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    fn is_head(&self) -> bool {
        self.is_head
    }

    fn body_done(&self) -> bool {
        self.done
    }

    /// HTTP/2 flow control already holds the body until it is read: no `100 Continue`.
    async fn go_ahead(&mut self) -> Result<(), HttpError> {
        Ok(())
    }

    /// The next DATA frame's payload, chunk-framed when the upstream gets it chunked.
    async fn read_body(&mut self, b: &mut Lent<'_, BytesMut, S>) -> Result<usize, HttpError> {
        self.release();
        b.ensure();
        b.clear();
        loop {
            let data = match timeout_at(self.body_clock.deadline(), self.body.data()).await {
                Ok(data) => data,
                Err(_) => {
                    crate::util::budget::refused(
                        crate::util::budget::Refusal::SlowClient,
                        &"h2 request body too slow: 408",
                    );
                    return Err(HttpError::BodyTimeout);
                }
            };
            let data = match data {
                None => {
                    self.end_body(b)?;
                    return Ok(b.len());
                }
                Some(Err(e)) => return Err(self.stream_error(&e)),
                Some(Ok(data)) => data,
            };
            if data.is_empty() && !self.body.is_end_stream() {
                continue;
            }
            let n = data.len();
            self.unreleased += n;
            self.length.on_data(n).map_err(|e| self.malformed(e))?;
            if self.length.seen() > self.max_body {
                return Err(HttpError::BodyTooLarge);
            }
            self.body_clock.moved(n);
            if self.chunked && n > 0 {
                use std::fmt::Write;
                let _ = write!(&mut **b, "{n:x}\r\n");
                b.extend_from_slice(&data);
                b.extend_from_slice(b"\r\n");
            } else {
                b.extend_from_slice(&data);
            }
            if self.body.is_end_stream() {
                self.end_body(b)?;
            }
            return Ok(b.len());
        }
    }
}

impl ResponseSink for H2Stream<'_> {
    /// Informational responses (RFC 9113 §8.1: HEADERS before the final ones): `103 Early
    /// Hints` and other 1xx are relayed, at most [`INTERIM_RELAYED`] per stream and
    /// [`INTERIM_BYTES`] of head, since HEADERS frames are not flow-controlled and a
    /// hostile upstream could otherwise queue 32 × 64 KiB per stream in front of a client
    /// that does not read; past that they are dropped. `100 Continue` is hop-by-hop: the
    /// translation drops `expect` and the upstream's 100 answers the gateway's own write.
    async fn interim(&mut self, raw: &[u8], resp: &ResponseHead) -> Result<(), HttpError> {
        if resp.status == 100 {
            return Ok(());
        }
        self.interim_bytes += resp.len;
        self.interim_sent += 1;
        if self.interim_sent > INTERIM_RELAYED || self.interim_bytes > INTERIM_BYTES {
            return Ok(());
        }
        // An interim head h2 cannot carry is dropped: the final response still follows.
        if let Ok(response) = translate_response(raw, resp, false, false) {
            if let Reply::Head(respond) = &mut *self.reply.borrow_mut() {
                let _ = respond.send_informational(response);
            }
        }
        Ok(())
    }

    fn prepare_head(&mut self, raw: &[u8], resp: &ResponseHead, upgrade: bool) -> BodyForm {
        self.response = Some(translate_response(raw, resp, self.websocket, upgrade));
        self.write_clock = Some(RateClock::new(
            self.send_timeout,
            self.send_timeout,
            self.min_rate,
        ));
        // A WebSocket's 200 opens the tunnel: the stream stays open whatever the framing.
        self.body_left = match resp.framing {
            _ if upgrade => None,
            BodyFraming::None => Some(0),
            BodyFraming::Length(n) => Some(n),
            BodyFraming::Chunked | BodyFraming::UntilClose => None,
        };
        BodyForm::Payload
    }

    async fn send_head(&mut self, first: &[u8]) -> Result<(), HttpError> {
        let response = match self.response.take() {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Err(e.error),
            None => return Err(HttpError::BadUpstream("no response head")),
        };
        let end = self.body_left == Some(0);
        self.ended = end;
        let sent = match &mut *self.reply.borrow_mut() {
            Reply::Head(respond) => respond.send_response(response, end),
            Reply::Body(_) => return Err(HttpError::BadUpstream("second response head")),
        };
        match sent {
            Ok(send) => *self.reply.borrow_mut() = Reply::Body(send),
            Err(e) => return Err(self.stream_error(&e)),
        }
        if !first.is_empty() {
            self.send_payload(first).await?;
        }
        Ok(())
    }

    async fn send_body<B: BoundedBuf>(&mut self, b: B) -> (Result<(), HttpError>, Option<B>) {
        // SAFETY: `stable_ptr` points at `bytes_init` initialised bytes of a buffer `b` owns
        // and keeps alive for this call.
        let data = unsafe { std::slice::from_raw_parts(b.stable_ptr(), b.bytes_init()) };
        let res = self.send_payload(data).await;
        (res, Some(b))
    }

    /// Never: the session watches for RST_STREAM around the whole exchange.
    async fn gone(&mut self) {
        std::future::pending().await
    }
}
