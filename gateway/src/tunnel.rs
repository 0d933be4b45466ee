//! Tunnels: after an upgrade (WebSocket 101) the client and upstream connections are joined
//! and bytes flow both ways until both sides finish, either fails, or the tunnel sits idle
//! for the route's `read_timeout`.
//!
//! Half-close is propagated: EOF from one side shuts down writing on the other. The idle
//! timer is a watchdog beside the two copy loops, not a timeout around their reads: a
//! read abandoned by a timeout would still complete later and its bytes would be lost.

use crate::io::Stream;
use crate::worker::Worker;
use bytes::BytesMut;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Byte counts of a finished tunnel.
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelBytes {
    pub to_client: u64,
    pub to_upstream: u64,
}

/// Runs the tunnel to its end. `from_upstream` holds bytes the upstream sent right behind
/// its 101 head, `from_client` bytes the client sent right behind its request head.
pub async fn run<S: Stream>(
    client: &S,
    upstream: &S,
    from_client: &[u8],
    from_upstream: BytesMut,
    w: &Worker<S>,
    idle: Duration,
) -> TunnelBytes {
    let last_activity = Cell::new(Instant::now());
    let to_client = Cell::new(0u64);
    let to_upstream = Cell::new(0u64);
    let mut first_up = w.take_buf();
    first_up.extend_from_slice(from_client);
    let pumps = async {
        tokio::join!(
            pump(upstream, client, from_upstream, &last_activity, &to_client),
            pump(client, upstream, first_up, &last_activity, &to_upstream),
        )
    };
    tokio::select! {
        (a, b) = pumps => {
            for buf in [a, b].into_iter().flatten() {
                w.give_buf(buf);
            }
        }
        _ = watchdog(&last_activity, idle) => {
            tracing::debug!(?idle, "tunnel closed: idle timeout");
            client.abort();
            upstream.abort();
        }
    }
    TunnelBytes {
        to_client: to_client.get(),
        to_upstream: to_upstream.get(),
    }
}

async fn watchdog(last_activity: &Cell<Instant>, idle: Duration) {
    loop {
        let deadline = last_activity.get() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Copies `from` → `to` until EOF (then half-closes `to`) or failure (then aborts both,
/// which also ends the opposite direction). Returns the buffer when it ended cleanly.
async fn pump<S: Stream>(
    from: &S,
    to: &S,
    mut buf: BytesMut,
    last_activity: &Cell<Instant>,
    counter: &Cell<u64>,
) -> Option<BytesMut> {
    loop {
        if !buf.is_empty() {
            let n = buf.len() as u64;
            let (res, b) = to.write_all(buf).await;
            buf = b;
            if res.is_err() {
                from.abort();
                to.abort();
                return None;
            }
            counter.set(counter.get() + n);
            last_activity.set(Instant::now());
            buf.clear();
        }
        if buf.capacity() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) => {
                to.shutdown_write();
                return Some(buf);
            }
            Ok(_) => last_activity.set(Instant::now()),
            Err(_) => {
                from.abort();
                to.abort();
                return None;
            }
        }
    }
}
