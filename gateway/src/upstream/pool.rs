//! A worker's idle keep-alive connections to one upstream (nginx `keepalive N`: at most N
//! idle connections per worker for the whole upstream), and its balancing state.

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

    /// This worker's state for `upstream`, which replaces `old` (the same upstream before a
    /// reload or its names' new addresses rebuilt it): the idle connections to servers
    /// that stay (same address) carry over; those to servers gone close with `old`.
    pub(crate) fn replacing(upstream: Arc<Upstream>, mut old: WorkerUpstream<S>) -> Self {
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
        // In-flight counts stay with `old`'s entry: the requests that hold them finish
        // on the upstream they started with.
        new
    }

    /// An idle connection to `server` that is still open, if any. Connections the upstream
    /// closed while they sat idle (EOF or stray bytes waiting) are dropped here.
    pub(crate) fn take_idle(&mut self, server: usize) -> Option<S> {
        let now = clock::now_ms();
        let max_idle = self.upstream.idle_timeout.as_millis() as u64;
        while let Some(idle) = self.idle[server].pop() {
            self.idle_count -= 1;
            if now.saturating_sub(idle.since_ms) < max_idle && idle.conn.idle_alive() {
                return Some(idle.conn);
            }
        }
        None
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

    /// Keeps a connection for reuse when there is room; otherwise it is closed. Either way a
    /// request of this worker waiting for a descriptor may now find one (or this very
    /// connection): it is woken.
    pub(crate) fn put_idle(&mut self, server: usize, conn: S) {
        crate::util::budget::descriptor_freed();
        if self.idle_count >= self.upstream.keepalive || server >= self.idle.len() {
            return;
        }
        // Only a connection kept is watched: one dropped here needs no registration.
        conn.park_idle();
        self.idle_count += 1;
        self.idle[server].push(Idle {
            conn,
            since_ms: clock::now_ms(),
        });
    }

    /// Closes idle connections that expired or that the upstream closed, so they do not
    /// linger in CLOSE_WAIT until the next request happens to look at them.
    pub(crate) fn sweep(&mut self) {
        let now = clock::now_ms();
        let max_idle = self.upstream.idle_timeout.as_millis() as u64;
        for list in &mut self.idle {
            let before = list.len();
            list.retain(|i| now.saturating_sub(i.since_ms) < max_idle && i.conn.idle_alive());
            self.idle_count -= before - list.len();
        }
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle_count
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
