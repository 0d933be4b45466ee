//! Moving bodies: the upstream response body relayed to a [`ResponseSink`] (framing
//! checked by the one body decoder, `protocol::http1::body`), the [`RateClock`] that
//! bounds transfers to and from a client by their size, and [`splice_body`], which moves
//! a run of body bytes between two plaintext sockets with `splice(2)` under the same
//! bounds (both directions: the response here, the request body in `exchange.rs`).
//!
//! A body is spliced only where its framing says how many bytes may be moved blind
//! ([`Body::opaque_run`]: the rest of a `Content-Length` body, the rest of a chunk's data,
//! or a body read until close), only when that run is at least `server.splice_bodies_min`,
//! and never more than that run: bytes behind the body (a pipelined request, an
//! upstream's stray bytes) stay in the socket. The bytes already in user space (those that
//! came with the head) go first, through the copy path; so do chunk-size lines and
//! trailers, which the decoder checks.

use crate::dataplane::ctx::Lent;
use crate::io::pipe::Pipe;
use crate::io::splice::{splice_exact, NonBlocking, Pace, SpliceError};
use crate::io::Stream;
use crate::protocol::error::HttpError;
use crate::protocol::http1::body::Body;
use crate::protocol::http1::head::{BodyFraming, ResponseHead};
use crate::util::clock::PhaseTimer;
use bytes::BytesMut;
use std::cell::Cell;
use std::time::{Duration, Instant};
use tokio_uring::buf::BoundedBuf;

/// How the sink wants the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyForm {
    /// The bytes as the upstream framed them (HTTP/1 passes chunked framing through).
    Framed,
    /// The payload only (chunked framing decoded): HTTP/1.0 clients, HTTP/2 streams.
    Payload,
}

/// Where the response goes.
#[allow(async_fn_in_trait)]
pub trait ResponseSink {
    /// An informational (1xx, not 101) response, `raw[..resp.len]` as received.
    async fn interim(&mut self, raw: &[u8], resp: &ResponseHead) -> Result<(), HttpError>;
    /// Prepares the final head (`raw[..resp.len]` as received); `upgrade`: a validated 101.
    /// Nothing is sent yet: the first body bytes are checked before the head goes out.
    fn prepare_head(&mut self, raw: &[u8], resp: &ResponseHead, upgrade: bool) -> BodyForm;
    /// Sends the prepared head followed by `first` body bytes.
    async fn send_head(&mut self, first: &[u8]) -> Result<(), HttpError>;
    /// Sends body bytes; the buffer comes back unless the write was abandoned (a timeout).
    async fn send_body<B: BoundedBuf>(&mut self, b: B) -> (Result<(), HttpError>, Option<B>);
    /// Body bytes left at least worth splicing from the upstream socket straight into the
    /// client's (`server.splice_bodies_min`); 0: never (TLS, HTTP/2, a client that wants
    /// the payload decoded, splice turned off).
    fn splice_min(&self) -> u64 {
        0
    }
    /// Splices exactly `len` body bytes (the framing's [`Body::opaque_run`]) from
    /// `upstream` into the client, each read within `read_timeout`: the bytes delivered
    /// (fewer only when the upstream closed), or `None` when no pipe could be had (the
    /// body is copied instead).
    async fn splice_body<U: Stream>(
        &mut self,
        upstream: &U,
        len: u64,
        read_timeout: Duration,
    ) -> Option<Result<u64, HttpError>> {
        let _ = (upstream, len, read_timeout);
        None
    }
    /// Resolves when the client has gone away (pending forever if that cannot be seen):
    /// the exchange then stops waiting for the upstream. Polled only while the response
    /// head is awaited, never together with another method (an HTTP/2 stream may watch
    /// for `RST_STREAM` through `&mut self`).
    async fn gone(&mut self);
}

/// First body bytes at most sent in the same write as the response head.
const FIRST_WRITE_BODY: usize = 16 * 1024;

/// A transfer to or from a client that must keep moving: no pause longer than `pause`,
/// and after `grace`, an average of at least `min_rate` bytes per second of the time the
/// transfer waited on the client. A per-read timeout alone lets a client trickle one byte
/// per timeout and hold an upstream connection (and a thread of a thread-per-connection
/// backend) for hours; this bounds the whole transfer by its size.
///
/// Only the client's time counts: from [`RateClock::deadline`] (an operation on the client
/// begins) to [`RateClock::moved`] (it moved bytes). The time between operations is the
/// other side's (an upstream streaming events slowly, or slow to take a request body), and
/// counting it would cut a live stream and blame its client.
pub(crate) struct RateClock {
    bytes: u64,
    pause: Duration,
    grace: Duration,
    /// Bytes per second; 0: only `pause` applies.
    min_rate: u64,
    /// Time operations on the client waited, up to the last `deadline` or `moved`.
    waited: Cell<Duration>,
    /// When the operation under way began waiting (or last asked its deadline again).
    waiting_since: Cell<Option<Instant>>,
}

impl RateClock {
    pub(crate) fn new(pause: Duration, grace: Duration, min_rate: u64) -> RateClock {
        RateClock {
            bytes: 0,
            pause,
            grace,
            min_rate,
            waited: Cell::new(Duration::ZERO),
            waiting_since: Cell::new(None),
        }
    }

    /// When the operation beginning now (or under way, asking again after a spurious
    /// wake) must have completed.
    pub(crate) fn deadline(&self) -> Instant {
        let now = self.count_wait();
        self.waiting_since.set(Some(now));
        let pause = now + self.pause;
        if self.min_rate == 0 {
            return pause;
        }
        let earned = Duration::from_secs_f64(self.bytes as f64 / self.min_rate as f64);
        pause.min(now + (self.grace + earned).saturating_sub(self.waited.get()))
    }

    /// The operation moved `n` bytes: it stops counting as the client's time.
    pub(crate) fn moved(&mut self, n: usize) {
        if self.waiting_since.get().is_some() {
            self.count_wait();
            self.waiting_since.set(None);
        }
        self.bytes += n as u64;
    }

    /// Adds the time since the operation under way last counted to `waited`; returns now.
    fn count_wait(&self) -> Instant {
        let now = Instant::now();
        if let Some(since) = self.waiting_since.get() {
            self.waited
                .set(self.waited.get() + now.saturating_duration_since(since));
        }
        now
    }
}

/// A response relay that failed, and whether any of the response reached the client.
pub(crate) struct RelayFailed {
    pub error: HttpError,
    /// False only when the body bytes that came with the head were refused before the head
    /// was written: the client can still be answered 502.
    pub(crate) response_started: bool,
    /// Body bytes the client was sent before the failure (the access log's size field:
    /// what reached the client, as nginx's `$body_bytes_sent`).
    pub(crate) body_bytes: u64,
}

/// Every failure after the head went out: the client can only be told by closing.
impl From<HttpError> for RelayFailed {
    fn from(error: HttpError) -> RelayFailed {
        RelayFailed {
            error,
            response_started: true,
            body_bytes: 0,
        }
    }
}

pub(crate) struct Relayed {
    pub body_bytes: u64,
}

/// The upstream connection while its response is relayed, given back through `release`
/// the moment the body has been read to the exact end its framing declares (RFC 9112
/// §6.3) with no byte after it: before the last bytes are awaited into the client, as
/// nginx frees its upstream connection before it writes to the client. A response the
/// client takes slowly (or an HTTP/2 stream that waits for the connection task to grant
/// it window) then holds no upstream connection, so concurrent requests find it idle
/// instead of connecting afresh. Dropped (closed) in every other case.
struct UpstreamConn<S, R: FnOnce(S)> {
    conn: Option<S>,
    release: Option<R>,
}

impl<S, R: FnOnce(S)> UpstreamConn<S, R> {
    /// Gives the connection back once `body` is complete and nothing followed it.
    fn release_if_clean(&mut self, body: &Body, clean: bool) {
        if body.is_done() && clean {
            if let (Some(conn), Some(release)) = (self.conn.take(), self.release.take()) {
                release(conn);
            }
        }
    }
}

/// How each read of the response from the upstream is bounded: the route's `read_timeout`,
/// through the exchange's timer (no timer of its own per read).
#[derive(Clone, Copy)]
pub(crate) struct UpstreamReads<'t> {
    pub(crate) read_timeout: Duration,
    pub(crate) timer: &'t PhaseTimer,
}

/// Sends the prepared response head and streams the body from the upstream to the sink.
/// `ub` holds the bytes read after the head. `release` receives `conn` back when the
/// upstream ended the body exactly where its framing said (reusable as far as the body
/// goes: the caller still checks keep-alive), before the last bytes go to the sink.
pub(crate) async fn relay_body<S: Stream, D: ResponseSink>(
    conn: S,
    release: impl FnOnce(S),
    sink: &mut D,
    ub: &mut Lent<'_, BytesMut, S>,
    framing: BodyFraming,
    form: BodyForm,
    reads: UpstreamReads<'_>,
) -> Result<Relayed, RelayFailed> {
    let mut body_bytes = 0;
    match relay(
        conn,
        release,
        sink,
        ub,
        framing,
        form,
        reads,
        &mut body_bytes,
    )
    .await
    {
        Ok(()) => Ok(Relayed { body_bytes }),
        Err(failed) => Err(RelayFailed {
            body_bytes,
            ..failed
        }),
    }
}

/// [`relay_body`]'s work; `body_bytes` counts the body bytes delivered to the sink as
/// they go, so that a failure still tells how much the client got.
#[allow(clippy::too_many_arguments)]
async fn relay<S: Stream, D: ResponseSink>(
    conn: S,
    release: impl FnOnce(S),
    sink: &mut D,
    ub: &mut Lent<'_, BytesMut, S>,
    framing: BodyFraming,
    form: BodyForm,
    reads: UpstreamReads<'_>,
    body_bytes: &mut u64,
) -> Result<(), RelayFailed> {
    let mut body = Body::response(framing);
    let payload_only = form == BodyForm::Payload;
    let mut decoded = Vec::new();
    let mut upstream_clean = true;
    let mut upstream = UpstreamConn {
        conn: Some(conn),
        release: Some(release),
    };

    // First write: head plus the body bytes that came with it, when they are few. Those
    // bytes are checked before the head goes out: a malformed first chunk (RFC 9112 §7.1)
    // that came with the head is then a 502 rather than a close with nothing written. A
    // bad chunk that arrives later, after the head was sent, can only end in a close.
    let n = body
        .take(ub, |d| {
            if payload_only {
                decoded.extend_from_slice(d)
            }
        })
        .map_err(|error| RelayFailed {
            error,
            response_started: false,
            body_bytes: 0,
        })?;
    if n < ub.len() {
        upstream_clean = false;
    }
    upstream.release_if_clean(&body, upstream_clean);
    let first: &[u8] = if payload_only { &decoded } else { &ub[..n] };
    let first_len = first.len() as u64;
    if first.len() <= FIRST_WRITE_BODY {
        sink.send_head(first).await?;
    } else {
        sink.send_head(&[]).await?;
        send(sink, ub, &mut decoded, payload_only, n).await?;
    }
    *body_bytes += first_len;

    let splice_min = if payload_only { 0 } else { sink.splice_min() };
    let mut splice = splice_min > 0 && upstream.conn.as_ref().is_some_and(|c| c.spliceable());
    while !body.is_done() {
        let Some(conn) = upstream.conn.as_ref() else {
            break;
        };
        let run = body.opaque_run();
        if splice && run >= splice_min {
            match sink.splice_body(conn, run, reads.read_timeout).await {
                None => splice = false,
                Some(moved) => {
                    let moved = moved?;
                    body.skip(moved);
                    *body_bytes += moved;
                    if moved < run {
                        // The upstream closed: the end of an until-close body, a
                        // truncation otherwise (the connection is not given back).
                        body.finish()?;
                        break;
                    }
                    // Nothing was read past the body; a byte already queued behind it
                    // (or an EOF) means the upstream is out of step: not reused.
                    if body.is_done() && !crate::io::idle_connection_alive(conn.raw_fd()) {
                        upstream_clean = false;
                    }
                    upstream.release_if_clean(&body, upstream_clean);
                    continue;
                }
            }
        }
        ub.clear();
        let (res, b) = reads
            .timer
            .run_for(reads.read_timeout, conn.read(ub.take()))
            .await
            .map_err(|_| HttpError::UpstreamTimeout("read body"))?;
        ub.put(b);
        match res {
            Ok(0) => {
                // The end of an until-close body; a truncation otherwise. Either way the
                // upstream closed: the loop ends without giving the connection back.
                body.finish()?;
                break;
            }
            Err(_) => return Err(HttpError::UpstreamFailed("read body").into()),
            Ok(_) => {}
        }
        decoded.clear();
        let n = body.take(ub, |d| {
            if payload_only {
                decoded.extend_from_slice(d)
            }
        })?;
        if n < ub.len() {
            upstream_clean = false;
        }
        let this_read = if payload_only { decoded.len() } else { n } as u64;
        upstream.release_if_clean(&body, upstream_clean);
        send(sink, ub, &mut decoded, payload_only, n).await?;
        *body_bytes += this_read;
    }
    Ok(())
}

/// Sends the body bytes of this read: `decoded` when the sink wants the payload only,
/// else `ub[..n]` without a copy.
async fn send<S: Stream, D: ResponseSink>(
    sink: &mut D,
    ub: &mut Lent<'_, BytesMut, S>,
    decoded: &mut Vec<u8>,
    payload_only: bool,
    n: usize,
) -> Result<(), HttpError> {
    if payload_only {
        if !decoded.is_empty() {
            let (res, back) = sink.send_body(std::mem::take(decoded)).await;
            *decoded = back.unwrap_or_default();
            res?;
        }
    } else if n > 0 {
        let (res, back) = sink.send_body(ub.take().slice(..n)).await;
        if let Some(back) = back {
            ub.put(back.into_inner());
        }
        res?;
    }
    Ok(())
}

/// What bounds one side of a spliced body: the client's [`RateClock`], or a pause per
/// read or write (the upstream's `read_timeout`, `send_timeout`).
pub(crate) enum Bound<'c> {
    Clock(&'c mut RateClock),
    Pause(Duration),
}

impl Bound<'_> {
    fn deadline(&self) -> Instant {
        match self {
            Bound::Clock(c) => c.deadline(),
            Bound::Pause(p) => Instant::now() + *p,
        }
    }
    fn moved(&mut self, n: usize) {
        if let Bound::Clock(c) = self {
            c.moved(n);
        }
    }
}

/// The bounds of a spliced body's two sides.
struct BodyPace<'c> {
    read: Bound<'c>,
    write: Bound<'c>,
}

impl Pace for BodyPace<'_> {
    fn read_deadline(&self) -> Option<Instant> {
        Some(self.read.deadline())
    }
    fn write_deadline(&self) -> Option<Instant> {
        Some(self.write.deadline())
    }
    fn read(&mut self, n: usize) {
        self.read.moved(n);
    }
    fn written(&mut self, n: usize) {
        self.write.moved(n);
    }
}

/// Which way a spliced body goes: decides whose fault a failure is, as on the copy path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpliceWay {
    /// Client → upstream: a stall reading is the client's 408, a failed write the upstream's.
    Request,
    /// Upstream → client: a stall reading is the upstream's 504, a stalled write the client's.
    Response,
}

/// Splices `len` body bytes `from` → `to` through `pipe` (empty), each side within its
/// [`Bound`]; the errors are those the copy path gives for the same failure, booked to the
/// same side. Returns the bytes delivered: fewer than `len` only when `from` closed (the
/// caller decides what that means for the body). Both sockets are non-blocking for the
/// duration, and get their mode back after it.
pub(crate) async fn splice_body<A: Stream, B: Stream>(
    from: &A,
    to: &B,
    pipe: &mut Pipe,
    len: u64,
    read: Bound<'_>,
    write: Bound<'_>,
    way: SpliceWay,
) -> Result<u64, HttpError> {
    let (from_mode, to_mode) = (
        NonBlocking::set(from.raw_fd()),
        NonBlocking::set(to.raw_fd()),
    );
    let (Ok(_from_mode), Ok(_to_mode)) = (from_mode, to_mode) else {
        // Only a descriptor already closed fails here: the write side reports it.
        return Err(match way {
            SpliceWay::Request => HttpError::UpstreamFailed("write body"),
            SpliceWay::Response => HttpError::ClientGone("write"),
        });
    };
    let mut pace = BodyPace { read, write };
    splice_exact(from, to, pipe, len, &mut pace)
        .await
        .map_err(|e| match (way, e) {
            (SpliceWay::Request, SpliceError::ReadTimeout) => request_body_too_slow(),
            (SpliceWay::Request, SpliceError::Read(_)) => HttpError::ClientGone("closed mid-body"),
            (SpliceWay::Request, SpliceError::WriteTimeout) => {
                HttpError::UpstreamTimeout("send body")
            }
            (SpliceWay::Request, SpliceError::Write(_)) => HttpError::UpstreamFailed("write body"),
            (SpliceWay::Response, SpliceError::ReadTimeout) => {
                HttpError::UpstreamTimeout("read body")
            }
            (SpliceWay::Response, SpliceError::Read(_)) => HttpError::UpstreamFailed("read body"),
            (SpliceWay::Response, SpliceError::WriteTimeout) => response_too_slow(),
            (SpliceWay::Response, SpliceError::Write(_)) => HttpError::ClientGone("write"),
        })
}

/// A request body that fell behind its clock: 408, counted as a slow client.
pub(crate) fn request_body_too_slow() -> HttpError {
    crate::util::budget::refused(
        crate::util::budget::Refusal::SlowClient,
        &"request body too slow: 408",
    );
    HttpError::BodyTimeout
}

/// What a write to a client that stopped taking what it was sent fails with: the
/// connection is closed with RST ([`crate::io::sockets::reset_on_close`]).
pub(crate) const CLIENT_WRITE_TIMEOUT: HttpError = HttpError::ClientGone("write timeout");

/// A client that took the response too slowly: the connection closes, counted as a slow
/// client.
fn response_too_slow() -> HttpError {
    crate::util::budget::refused(
        crate::util::budget::Refusal::SlowClient,
        &"response taken too slowly: connection closed",
    );
    CLIENT_WRITE_TIMEOUT
}

/// Writes to a client within `clock`'s deadline, through the connection's `timer` (armed
/// only if the write waits); the buffer comes back unless the write was abandoned.
pub(crate) async fn write_client<S: Stream, B: BoundedBuf>(
    client: &S,
    buf: B,
    clock: &mut RateClock,
    timer: &PhaseTimer,
) -> (Result<(), HttpError>, Option<B>) {
    let len = buf.bytes_init();
    match timer
        .run_until(clock.deadline(), client.write_all(buf))
        .await
    {
        Err(_) => (Err(response_too_slow()), None),
        Ok((Err(_), b)) => (Err(HttpError::ClientGone("write")), Some(b)),
        Ok((Ok(()), b)) => {
            clock.moved(len);
            (Ok(()), Some(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RateClock;
    use std::time::{Duration, Instant};

    #[test]
    fn rate_clock_bounds_the_whole_transfer() {
        let mut clock = RateClock::new(Duration::from_secs(60), Duration::from_secs(10), 1000);
        // Nothing moved yet: the grace period is all there is.
        let now = Instant::now();
        let d = clock.deadline() - now;
        assert!(
            d >= Duration::from_secs(10) && d < Duration::from_secs(11),
            "{d:?}"
        );
        // Each 1000 bytes earn one more second, never more than the pause from now.
        clock.moved(5000);
        let now = Instant::now();
        let d = clock.deadline() - now;
        assert!(
            d >= Duration::from_secs(14) && d < Duration::from_secs(16),
            "{d:?}"
        );
        clock.moved(1_000_000);
        let d = clock.deadline() - Instant::now();
        assert!(
            d <= Duration::from_secs(61),
            "the pause still applies: {d:?}"
        );
        // A rate of 0 leaves only the pause.
        let clock = RateClock::new(Duration::from_secs(3), Duration::from_secs(10), 0);
        assert!(clock.deadline() - Instant::now() <= Duration::from_secs(4));
    }

    /// Time between operations on the client is the other side's: an upstream that streams
    /// slowly never uses up its client's allowance (attack12 F1: a live event stream was
    /// cut after `grace` and booked as a slow client). Time an operation waits counts, also
    /// across a deadline asked again before any byte moved.
    #[test]
    fn rate_clock_counts_only_the_time_operations_wait() {
        let mut clock = RateClock::new(Duration::from_secs(60), Duration::from_millis(300), 1);
        for _ in 0..3 {
            // The upstream's time: no operation under way.
            std::thread::sleep(Duration::from_millis(150));
            let d = clock.deadline() - Instant::now();
            assert!(
                d > Duration::from_millis(250),
                "the allowance was spent: {d:?}"
            );
            clock.moved(0);
        }
        let _ = clock.deadline();
        std::thread::sleep(Duration::from_millis(200));
        let _ = clock.deadline();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            clock.deadline() <= Instant::now(),
            "400 ms waited on the client, over its 300 ms allowance"
        );
    }
}
