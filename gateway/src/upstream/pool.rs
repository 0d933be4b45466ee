//! A worker's idle keep-alive connections to one upstream (nginx `keepalive N`: at most N
//! idle connections per worker for the whole upstream), and its balancing state.

use super::balance::Picker;
use super::Upstream;
use crate::io::{idle_connection_alive, Stream};
use crate::util::clock;
use std::sync::Arc;

struct Idle<S> {
    conn: S,
    since_ms: u64,
}

/// One worker's view of one upstream.
pub struct WorkerUpstream<S: Stream> {
    pub upstream: Arc<Upstream>,
    pub picker: Picker,
    /// Idle connections per server, most recently used last (reused first: it is the one
    /// least likely to have been closed by the upstream's own idle timeout).
    idle: Vec<Vec<Idle<S>>>,
    idle_count: usize,
}

impl<S: Stream> WorkerUpstream<S> {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        let n = upstream.servers.len();
        WorkerUpstream {
            upstream,
            picker: Picker::new(n),
            idle: (0..n).map(|_| Vec::new()).collect(),
            idle_count: 0,
        }
    }

    /// An idle connection to `server` that is still open, if any. Connections the upstream
    /// closed while they sat idle (EOF or stray bytes waiting) are dropped here.
    pub fn take_idle(&mut self, server: usize) -> Option<S> {
        let now = clock::now_ms();
        let max_idle = self.upstream.idle_timeout.as_millis() as u64;
        while let Some(idle) = self.idle[server].pop() {
            self.idle_count -= 1;
            if now.saturating_sub(idle.since_ms) < max_idle
                && idle_connection_alive(idle.conn.raw_fd())
            {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Keeps a connection for reuse when there is room; otherwise it is closed.
    pub fn put_idle(&mut self, server: usize, conn: S) {
        if self.idle_count >= self.upstream.keepalive || server >= self.idle.len() {
            return;
        }
        self.idle_count += 1;
        self.idle[server].push(Idle {
            conn,
            since_ms: clock::now_ms(),
        });
    }

    /// Closes idle connections that expired or that the upstream closed, so they do not
    /// linger in CLOSE_WAIT until the next request happens to look at them.
    pub fn sweep(&mut self) {
        let now = clock::now_ms();
        let max_idle = self.upstream.idle_timeout.as_millis() as u64;
        for list in &mut self.idle {
            let before = list.len();
            list.retain(|i| {
                now.saturating_sub(i.since_ms) < max_idle && idle_connection_alive(i.conn.raw_fd())
            });
            self.idle_count -= before - list.len();
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle_count
    }

    /// Hands idle connections over to the same upstream in a new snapshot (a reload that
    /// left it unchanged keeps the very same `Upstream`, so this is only for that case).
    pub fn is_for(&self, upstream: &Arc<Upstream>) -> bool {
        Arc::ptr_eq(&self.upstream, upstream)
    }
}
