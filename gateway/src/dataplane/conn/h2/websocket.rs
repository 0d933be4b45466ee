//! WebSocket over HTTP/2 (RFC 8441): once the upstream accepted the HTTP/1.1 handshake an
//! extended CONNECT was translated into (its 101 went to the client as `200`), the h2
//! stream and the upstream connection are one tunnel. The stream's DATA frames go to the
//! upstream socket and the upstream's bytes come back as DATA frames, both under HTTP/2
//! flow control, until both sides finished, either failed, or nothing moved for the
//! route's `read_timeout` (the watchdog of [`super::tunnel`], as HTTP/1 tunnels).
//!
//! - Client → upstream: a DATA frame is written upstream before its flow-control capacity
//!   is released, so the client can have at most the stream's receive window in flight.
//!   END_STREAM is a half-close upstream (`shutdown(SHUT_WR)`, the FIN).
//! - Upstream → client: one read of at most a pooled buffer, then sent as the client's
//!   window opens (h2 buffers at most the stream's send buffer); the next read waits until
//!   it all went out, so a client that never reads holds one buffer and the upstream is
//!   held back by TCP. The upstream's FIN is END_STREAM.
//! - Either side failing (a client's RST_STREAM, an upstream reset) ends both: the upstream
//!   connection is shut down at once (RST_STREAM ↔ close) and the stream reset with CANCEL.
//!
//! The connection's drain or GOAWAY leaves the tunnel running: its task ends with the
//! stream, or when `graceful_timeout` cuts the connection.

use super::Reply;
use crate::dataplane::conn::exchange::Upgraded;
use crate::dataplane::conn::tunnel::{watchdog, CloseReason, Dir, Progress, TunnelBytes, PATH_H2};
use crate::dataplane::ctx::Worker;
use crate::io::Stream;
use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream};
use std::cell::RefCell;
use std::future::poll_fn;
use std::time::{Duration, Instant};

/// Reads from the upstream take at least this much room (as the HTTP/1 copy path).
const MIN_READ_ROOM: usize = 16 * 1024;
const READ_RESERVE: usize = 64 * 1024;

/// Why one direction stopped before its clean end: the whole tunnel ends.
struct Broken;

/// Runs the tunnel to its end; see the module documentation.
pub(crate) async fn run<S: Stream>(
    w: &Worker<S>,
    upstream: Upgraded<S>,
    body: &mut RecvStream,
    reply: &RefCell<Reply>,
    idle: Duration,
) -> TunnelBytes {
    let started = Instant::now();
    let progress = Progress::new();
    let Upgraded {
        conn,
        from_upstream,
    } = upstream;
    let down = to_client(&conn, reply, from_upstream, &progress);
    let up = to_upstream(&conn, body, &progress);
    tokio::pin!(down, up);
    let (mut down_done, mut up_done) = (false, false);
    let clean = loop {
        tokio::select! {
            r = &mut down, if !down_done => match r {
                Ok(buf) => {
                    w.give_buf(buf);
                    down_done = true;
                }
                Err(Broken) => break false,
            },
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(Broken) => break false,
            },
            () = watchdog(&progress.last_activity, idle) => {
                progress.ended(CloseReason::Idle);
                break false;
            }
        }
        if down_done && up_done {
            break true;
        }
    };
    if !clean {
        // The other direction is abandoned: shutting the upstream down completes its
        // read still in flight, and the reset tells the client (unless it reset first).
        conn.abort();
        if let Reply::Body(send) = &mut *reply.borrow_mut() {
            send.send_reset(Reason::CANCEL);
        }
    }
    progress.finish(PATH_H2, started)
}

/// Upstream → client, from the bytes that came behind the 101 to the upstream's FIN.
/// Returns the buffer (the caller gives it back to the pool) when it ended cleanly.
async fn to_client<S: Stream>(
    conn: &S,
    reply: &RefCell<Reply>,
    mut buf: BytesMut,
    progress: &Progress,
) -> Result<BytesMut, Broken> {
    loop {
        let mut at = 0;
        while at < buf.len() {
            let want = buf.len() - at;
            let capacity = poll_fn(|cx| reply.borrow_mut().poll_send_capacity(want, cx)).await;
            let n = match capacity {
                Some(Ok(n)) => n.min(want),
                _ => {
                    progress.ended(CloseReason::ClientClosed);
                    return Err(Broken);
                }
            };
            if n == 0 {
                continue;
            }
            // Only what the window lets out is copied, into the frame h2 keeps.
            let chunk = Bytes::copy_from_slice(&buf[at..at + n]);
            if !reply.borrow_mut().send(chunk, false) {
                progress.ended(CloseReason::ClientClosed);
                return Err(Broken);
            }
            at += n;
            Dir::ToClient.add(progress, n);
            progress.touch();
        }
        buf.clear();
        if buf.capacity() < MIN_READ_ROOM {
            buf.reserve(READ_RESERVE);
        }
        let (res, b) = conn.read(buf).await;
        buf = b;
        match res {
            Ok(0) => {
                progress.ended(CloseReason::UpstreamClosed);
                // The FIN is END_STREAM: an empty DATA frame carrying it.
                if !reply.borrow_mut().send(Bytes::new(), true) {
                    return Err(Broken);
                }
                return Ok(buf);
            }
            Ok(_) => progress.touch(),
            Err(_) => {
                progress.ended(CloseReason::Error);
                return Err(Broken);
            }
        }
    }
}

/// Client → upstream, DATA frame by DATA frame, to the client's END_STREAM.
async fn to_upstream<S: Stream>(
    conn: &S,
    body: &mut RecvStream,
    progress: &Progress,
) -> Result<(), Broken> {
    loop {
        let data = match body.data().await {
            None => {
                progress.ended(CloseReason::ClientClosed);
                conn.shutdown_write();
                return Ok(());
            }
            Some(Err(_)) => {
                // RST_STREAM from the client, or the connection went away.
                progress.ended(CloseReason::ClientClosed);
                return Err(Broken);
            }
            Some(Ok(data)) => data,
        };
        let n = data.len();
        if n == 0 {
            continue;
        }
        let (res, _) = conn.write_all(data).await;
        if res.is_err() {
            progress.ended(CloseReason::Error);
            return Err(Broken);
        }
        // Written upstream: the client may send that much more (RFC 9113 §6.9).
        let _ = body.flow_control().release_capacity(n);
        Dir::ToUpstream.add(progress, n);
        progress.touch();
    }
}
