//! A worker's idle keep-alive connections to one upstream (nginx `keepalive N`: N idle
//! connections kept per worker for the whole upstream), and its balancing state.
//!
//! Where this differs from nginx: a connection given back while `keepalive` are already
//! idle is not closed at once but kept for `keepalive_linger` (1 s by default), and the
//! once-a-second sweep closes the oldest of those beyond `keepalive`. Many HTTP/2 streams
//! finishing together give back hundreds of connections, and the client's next round of
//! streams, a round trip later, would otherwise open as many anew: with nginx's rule,
//! `h2load -c4 -m100` opened 0.8 upstream connections per request, a connect and a close
//! on both sides for most requests. The surplus is bounded by the requests in flight a
//! moment before, which `max_connections` bounds.

use super::balance::Picker;
use super::Upstream;
use crate::io::Stream;
use crate::util::clock;
use std::sync::Arc;

struct Idle<S> {
    conn: S,
    since_ms: u64,
}

/// One worker's view of one upstream.
pub(crate) struct WorkerUpstream<S: Stream> {
    pub upstream: Arc<Upstream>,
    pub(crate) picker: Picker,
    /// Idle connections per server, most recently used last (reused first: it is the one
    /// least likely to have been closed by the upstream's own idle timeout).
    idle: Vec<Vec<Idle<S>>>,
    idle_count: usize,
    /// Where the worker counts this upstream's metrics (its slot in the worker's
    /// `telemetry::metrics::Stats`), resolved by name on first use: requests then reach
    /// their counters without hashing the upstream's name.
    pub(crate) stats_slot: Option<usize>,
}

impl<S: Stream> WorkerUpstream<S> {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        let n = upstream.servers.len();
        WorkerUpstream {
            upstream,
            picker: Picker::new(n),
            idle: (0..n).map(|_| Vec::new()).collect(),
            idle_count: 0,
            stats_slot: None,
        }
    }

    /// This worker's state for `upstream`, which replaces `old` (the same upstream before a
    /// reload or its names' new addresses rebuilt it): the idle connections to servers
    /// that stay (same address) carry over; those to servers gone close with `old`.
    pub(crate) fn replacing(upstream: Arc<Upstream>, mut old: WorkerUpstream<S>) -> Self {
        let lingering_before = old.lingering();
        let mut new = Self::new(upstream);
        for (i, server) in new.upstream.servers.iter().enumerate() {
            if let Some(j) = old
                .upstream
                .servers
                .iter()
                .position(|s| s.addr == server.addr)
            {
                let idle = std::mem::take(&mut old.idle[j]);
                old.idle_count -= idle.len();
                new.idle_count += idle.len();
                new.idle[i] = idle;
            }
        }
        // `old`'s drop counts out what it still holds.
        crate::util::budget::lingering_changed(
            (old.lingering() + new.lingering()) as i64 - lingering_before as i64,
        );
        // In-flight counts stay with `old`'s entry: the requests that hold them finish
        // on the upstream they started with.
        new
    }

    /// Idle connections held beyond `keepalive` (lingering), counted process-wide.
    fn lingering(&self) -> usize {
        self.idle_count.saturating_sub(self.upstream.keepalive)
    }

    /// Runs `f`, which changes the idle connections, and counts the change in lingering
    /// ones process-wide (`budget::may_linger` caps them).
    fn counting_lingering<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.lingering();
        let out = f(self);
        let after = self.lingering();
        if after != before {
            crate::util::budget::lingering_changed(after as i64 - before as i64);
        }
        out
    }

    /// An idle connection to `server` that is still open, if any. Connections the upstream
    /// closed while they sat idle (EOF or stray bytes waiting) are dropped here.
    pub(crate) fn take_idle(&mut self, server: usize) -> Option<S> {
        self.counting_lingering(|pool| {
            let now = clock::now_ms();
            let max_idle = pool.upstream.idle_timeout.as_millis() as u64;
            while let Some(idle) = pool.idle[server].pop() {
                pool.idle_count -= 1;
                if now.saturating_sub(idle.since_ms) < max_idle && idle.conn.idle_alive() {
                    return Some(idle.conn);
                }
            }
            None
        })
    }

    /// An idle connection to `preferred`, else to any other server of this upstream that is
    /// up, with the server it goes to. For a request that found no descriptor to connect
    /// with: any open connection of the upstream serves it, and takes no new descriptor.
    pub(crate) fn take_idle_any(&mut self, preferred: usize) -> Option<(usize, S)> {
        if let Some(conn) = self.take_idle(preferred) {
            return Some((preferred, conn));
        }
        if self.idle_count == 0 {
            return None;
        }
        let now = clock::now_ms();
        for server in 0..self.idle.len() {
            if server == preferred || !self.upstream.servers[server].state.is_up(now) {
                continue;
            }
            if let Some(conn) = self.take_idle(server) {
                return Some((server, conn));
            }
        }
        None
    }

    /// Keeps a connection for reuse: within `keepalive`, or beyond it for
    /// `keepalive_linger` (the sweep closes it then) while descriptors allow
    /// (`budget::may_linger`); with `keepalive = 0` or no linger, a connection beyond
    /// `keepalive` is closed at once. Either way a request of this worker waiting for a
    /// descriptor may now find one (or this very connection): it is woken.
    pub(crate) fn put_idle(&mut self, server: usize, conn: S) {
        crate::util::budget::descriptor_freed();
        let up = &self.upstream;
        let full = self.idle_count >= up.keepalive
            && (up.keepalive == 0
                || up.keepalive_linger.is_zero()
                || !crate::util::budget::may_linger());
        if full || server >= self.idle.len() {
            return;
        }
        // Only a connection kept is watched: one dropped here needs no registration.
        conn.park_idle();
        self.counting_lingering(|pool| {
            pool.idle_count += 1;
            pool.idle[server].push(Idle {
                conn,
                since_ms: clock::now_ms(),
            });
        });
    }

    /// Closes idle connections that expired or that the upstream closed, so they do not
    /// linger in CLOSE_WAIT until the next request happens to look at them; then those
    /// beyond `keepalive` that have lingered `keepalive_linger`, oldest first.
    pub(crate) fn sweep(&mut self) {
        self.counting_lingering(|pool| {
            let now = clock::now_ms();
            let max_idle = pool.upstream.idle_timeout.as_millis() as u64;
            for list in &mut pool.idle {
                let before = list.len();
                list.retain(|i| now.saturating_sub(i.since_ms) < max_idle && i.conn.idle_alive());
                pool.idle_count -= before - list.len();
            }
            pool.close_lingering(pool.upstream.keepalive_linger.as_millis() as u64, now);
        });
    }

    /// Closes at once the idle connections beyond `keepalive`: descriptors ran short.
    pub(crate) fn drop_lingering(&mut self) {
        self.counting_lingering(|pool| pool.close_lingering(0, clock::now_ms()));
    }

    /// Closes the oldest idle connections beyond `keepalive` that have been idle for
    /// `linger_ms` or more.
    fn close_lingering(&mut self, linger_ms: u64, now: u64) {
        while self.idle_count > self.upstream.keepalive {
            // Each list is oldest first (connections are pushed as they come back).
            let Some((oldest, since)) = self
                .idle
                .iter()
                .enumerate()
                .filter_map(|(server, list)| list.first().map(|i| (server, i.since_ms)))
                .min_by_key(|&(_, since)| since)
            else {
                break;
            };
            if now.saturating_sub(since) < linger_ms {
                break;
            }
            self.idle[oldest].remove(0);
            self.idle_count -= 1;
        }
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle_count
    }
}

impl<S: Stream> Drop for WorkerUpstream<S> {
    fn drop(&mut self) {
        crate::util::budget::lingering_changed(-(self.lingering() as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, ServerEntry, UpstreamConfig};
    use crate::io::memory::{MemoryPeer, MemoryStream};
    use std::rc::Rc;
    use std::time::Duration;

    fn upstream(servers: usize, keepalive: usize, idle: Duration) -> Arc<Upstream> {
        let config = UpstreamConfig {
            name: "u".into(),
            servers: (0..servers)
                .map(|i| ServerEntry::Addr(format!("192.0.2.{}:80", i + 1)))
                .collect(),
            balance: Balance::RoundRobin,
            keepalive,
            keepalive_timeout: crate::config::Dur(idle),
            keepalive_linger: crate::config::Dur(Duration::ZERO),
            max_fails: 1,
            fail_timeout: crate::config::Dur(Duration::from_secs(10)),
            health_check: None,
            resolve_required: true,
            resolve_min: crate::config::Dur(std::time::Duration::from_secs(5)),
            resolve_max: crate::config::Dur(std::time::Duration::from_secs(300)),
            nxdomain_grace: crate::config::Dur(std::time::Duration::from_secs(60)),
        };
        Upstream::build(&config, &[])
    }

    fn conn() -> (MemoryStream, Rc<MemoryPeer>) {
        MemoryStream::pair()
    }

    #[test]
    fn idle_connections_are_reused_most_recent_first_per_server() {
        let mut pool = WorkerUpstream::new(upstream(2, 8, Duration::from_secs(60)));
        assert!(pool.take_idle(0).is_none());
        let (a, pa) = conn();
        let (b, pb) = conn();
        let (c, pc) = conn();
        pool.put_idle(0, a);
        pool.put_idle(0, b);
        pool.put_idle(1, c);
        assert_eq!(pool.idle_count(), 3);
        let got = pool.take_idle(0).expect("idle");
        assert!(Rc::ptr_eq(got.peer(), &pb), "the most recently used first");
        let got = pool.take_idle(0).expect("idle");
        assert!(Rc::ptr_eq(got.peer(), &pa));
        assert!(pool.take_idle(0).is_none());
        let got = pool.take_idle(1).expect("idle");
        assert!(Rc::ptr_eq(got.peer(), &pc));
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn any_idle_connection_of_the_upstream_serves_a_request_short_of_descriptors() {
        let mut pool = WorkerUpstream::new(upstream(3, 8, Duration::from_secs(60)));
        assert!(pool.take_idle_any(0).is_none());
        let (a, pa) = conn();
        let (b, pb) = conn();
        pool.put_idle(2, a);
        pool.put_idle(0, b);
        let (server, got) = pool.take_idle_any(0).expect("the preferred server's");
        assert_eq!(server, 0);
        assert!(Rc::ptr_eq(got.peer(), &pb));
        let (server, got) = pool.take_idle_any(1).expect("another server's");
        assert_eq!(server, 2);
        assert!(Rc::ptr_eq(got.peer(), &pa));
        assert!(pool.take_idle_any(1).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn keepalive_caps_idle_connections_per_worker_for_the_whole_upstream() {
        let mut pool = WorkerUpstream::new(upstream(2, 2, Duration::from_secs(60)));
        let peers: Vec<_> = (0..3)
            .map(|i| {
                let (s, p) = conn();
                pool.put_idle(i % 2, s);
                p
            })
            .collect();
        assert_eq!(pool.idle_count(), 2);
        // The third was closed, not kept: its liveness end sees the close.
        let far_closed = Rc::strong_count(&peers[2]) == 1;
        assert!(far_closed, "the connection over the cap was dropped");
        // Out of range: dropped, not a panic.
        let (s, _) = conn();
        pool.take_idle(0);
        pool.put_idle(7, s);
        assert_eq!(pool.idle_count(), 1);
    }

    #[test]
    fn connections_beyond_keepalive_linger_then_the_oldest_close() {
        let linger = |keepalive, linger| {
            let base = upstream(2, keepalive, Duration::from_secs(60));
            let mut config = base.config.clone();
            config.keepalive_linger = crate::config::Dur(linger);
            Upstream::build(&config, &[])
        };
        let mut pool = WorkerUpstream::new(linger(2, Duration::from_millis(100)));
        let peers: Vec<_> = (0..5)
            .map(|i| {
                let (s, p) = conn();
                pool.put_idle(i % 2, s);
                // Distinct millisecond stamps, so "oldest" is well defined.
                std::thread::sleep(Duration::from_millis(2));
                p
            })
            .collect();
        assert_eq!(pool.idle_count(), 5, "a burst's connections are kept");
        pool.sweep();
        assert_eq!(pool.idle_count(), 5, "not before they lingered");
        // The next burst reuses them, most recent first.
        let got = pool.take_idle(0).expect("a lingering connection");
        assert!(Rc::ptr_eq(got.peer(), &peers[4]));
        pool.put_idle(0, got);
        std::thread::sleep(Duration::from_millis(120));
        pool.sweep();
        assert_eq!(pool.idle_count(), 2, "back to keepalive");
        let open: Vec<bool> = peers.iter().map(|p| Rc::strong_count(p) > 1).collect();
        assert_eq!(
            open,
            [false, false, false, true, true],
            "the oldest closed first, across servers"
        );

        // `keepalive = 0` keeps none, linger or not.
        let mut pool = WorkerUpstream::new(linger(0, Duration::from_secs(1)));
        let (s, _p) = conn();
        pool.put_idle(0, s);
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn closed_or_expired_idle_connections_are_never_handed_out() {
        let mut pool = WorkerUpstream::new(upstream(1, 8, Duration::from_secs(60)));
        let (a, pa) = conn();
        let (b, _pb) = conn();
        pool.put_idle(0, b);
        pool.put_idle(0, a);
        pa.hang_up();
        // `a` (most recent) was closed by the upstream: skipped and dropped; `b` is fine.
        assert!(pool.take_idle(0).is_some());
        assert_eq!(pool.idle_count(), 0);

        let mut pool = WorkerUpstream::new(upstream(1, 8, Duration::from_millis(20)));
        let (a, _pa) = conn();
        pool.put_idle(0, a);
        std::thread::sleep(Duration::from_millis(40));
        assert!(pool.take_idle(0).is_none(), "past keepalive_timeout");
    }

    #[test]
    fn a_rebuilt_upstream_keeps_the_idle_connections_of_servers_that_stay() {
        let old = upstream(3, 8, Duration::from_secs(60));
        let mut pool = WorkerUpstream::new(old.clone());
        let (a, pa) = conn();
        let (b, pb) = conn();
        pool.put_idle(0, a); // 192.0.2.1, stays
        pool.put_idle(2, b); // 192.0.2.3, removed
        let mut config = old.config.clone();
        config.servers = ["192.0.2.9:80", "192.0.2.1:80"]
            .iter()
            .map(|a| ServerEntry::Addr(a.to_string()))
            .collect();
        let new = Upstream::build(&config, &[old]);
        let mut pool = WorkerUpstream::replacing(new, pool);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(
            Rc::strong_count(&pb),
            1,
            "the removed server's connection closed"
        );
        let got = pool.take_idle(1).expect("carried over to its new index");
        assert!(Rc::ptr_eq(got.peer(), &pa));
    }

    #[test]
    fn sweep_closes_dead_and_expired_connections() {
        let mut pool = WorkerUpstream::new(upstream(2, 8, Duration::from_secs(60)));
        let (a, pa) = conn();
        let (b, _pb) = conn();
        let (c, _pc) = conn();
        pool.put_idle(0, a);
        pool.put_idle(0, b);
        pool.put_idle(1, c);
        pa.hang_up();
        pool.sweep();
        assert_eq!(pool.idle_count(), 2);
        assert_eq!(Rc::strong_count(&pa), 1, "the dead connection was closed");

        let mut pool = WorkerUpstream::new(upstream(1, 8, Duration::from_millis(20)));
        let (a, pa) = conn();
        pool.put_idle(0, a);
        std::thread::sleep(Duration::from_millis(40));
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(Rc::strong_count(&pa), 1);
    }
}
