//! Metrics: counted per worker without locks, merged when `/metrics` is scraped.
//!
//! Each worker counts into a [`Stats`] of its own (a `RefCell`, touched only by its thread)
//! and every tick (200 ms) publishes a copy behind a mutex that only the scraper and that
//! worker's tick ever take. The request path therefore pays a hash lookup and an add, never
//! a lock or a contended cache line. Label values are bounded: listener and route names
//! from the config, upstream names and server addresses, status codes, fixed kinds.
//! Process metrics (`process_*`) come from the prometheus crate's process collector.

use crate::util::fasthash::FastMap;
use std::sync::{Arc, Mutex};

/// The I/O driver the workers run, set once at start.
pub static IO_DRIVER: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// This process's generation: 1 for a plain start, one more than the process it took over
/// from for a binary upgrade (`gateway run --upgrade`). Set once at start.
pub static PROCESS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Histogram bounds in seconds: sub-millisecond proxying up to multi-minute uploads.
pub(crate) const DURATION_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 300.0,
];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    pub(crate) counts: [u64; DURATION_BUCKETS.len() + 1],
    pub(crate) sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let slot = DURATION_BUCKETS.partition_point(|&b| b < seconds);
        self.counts[slot] += 1;
        self.sum += seconds;
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
    }
}

#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    /// (listener, status) → requests.
    pub requests: Vec<(Arc<str>, u16, u64)>,
    pub duration: Histogram,
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamStats {
    pub duration: Histogram,
    pub errors: Vec<(&'static str, u64)>,
    /// Connections to this upstream carrying a request now.
    pub active: i64,
    /// Idle keep-alive connections held.
    pub idle: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ListenerStats {
    pub total: u64,
    pub active: i64,
    /// HTTP/2 connections open now.
    pub(crate) h2_active: i64,
    /// HTTP/2 streams accepted.
    pub(crate) h2_streams: u64,
    /// RST_STREAM frames: [received from clients, sent by the gateway].
    pub(crate) h2_resets: [u64; 2],
    /// GOAWAYs sent, by reason.
    pub(crate) h2_goaways: Vec<(&'static str, u64)>,
}

/// One worker's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub routes: FastMap<Arc<str>, RouteStats>,
    /// Per upstream name, in the order this worker first counted them. The request path
    /// reaches its upstream's entry by slot ([`Stats::upstream_at`]), resolved once per
    /// upstream and worker ([`Stats::upstream_slot`]), never by hashing the name.
    pub upstreams: Vec<(Arc<str>, UpstreamStats)>,
    /// Name → slot in `upstreams`, for the counters taken by name (errors, tunnels, idle).
    upstream_slots: FastMap<Arc<str>, usize>,
    pub listeners: FastMap<Arc<str>, ListenerStats>,
    pub(crate) tunnels_active: i64,
    /// Bytes relayed by tunnels: [to upstream, to client].
    pub(crate) tunnel_bytes: [u64; 2],
    /// Tunnels by copy path (`splice`, `copy`).
    pub(crate) tunnel_paths: Vec<(&'static str, u64)>,
    /// HTTP/1 bodies spliced (at least in part): [request, response].
    pub(crate) body_splices: [u64; 2],
    /// (limit, enforcer) → rejections.
    pub limit_rejections: Vec<(&'static str, &'static str, u64)>,
    pub(crate) busy_ratio: f64,
    /// Idle keep-alive connections in the worker's parking lot (`dataplane::parking`).
    pub(crate) parked_connections: u64,
    /// Parks since the worker started (`gateway_connections_parks_total`).
    pub(crate) parks: u64,
    /// When the worker last published (process clock, ms): its liveness for `/healthz`.
    pub(crate) heartbeat_ms: u64,
    /// The worker finished its drain and stopped: silent, but not stuck.
    pub finished: bool,
    /// (listener, result) → TLS handshakes.
    pub(crate) tls_handshakes: Vec<(Arc<str>, &'static str, u64)>,
    /// Duration of successful TLS handshakes, by listener.
    pub(crate) tls_handshake_duration: FastMap<Arc<str>, Histogram>,
}

fn bump<K: PartialEq + Copy>(list: &mut Vec<(K, u64)>, key: K, by: u64) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += by,
        None => list.push((key, by)),
    }
}

impl Stats {
    pub fn request(&mut self, listener: &Arc<str>, route: &Arc<str>, status: u16, seconds: f64) {
        let r = match self.routes.get_mut(&**route) {
            Some(r) => r,
            None => self.routes.entry(route.clone()).or_default(),
        };
        match r
            .requests
            .iter_mut()
            .find(|(l, s, _)| *s == status && **l == **listener)
        {
            Some((_, _, n)) => *n += 1,
            None => r.requests.push((listener.clone(), status, 1)),
        }
        r.duration.observe(seconds);
    }

    /// The counters of the upstream named `name`, by name (a hash of it).
    pub fn upstream(&mut self, name: &Arc<str>) -> &mut UpstreamStats {
        let slot = self.upstream_slot(name);
        self.upstream_at(slot)
    }

    /// The slot of `name`'s counters, created on first use. Slots are never reused or
    /// removed (a name is counted until the process ends, as before a reload), so a slot
    /// stays valid for the worker's life.
    pub fn upstream_slot(&mut self, name: &Arc<str>) -> usize {
        if let Some(&slot) = self.upstream_slots.get(&**name) {
            return slot;
        }
        let slot = self.upstreams.len();
        self.upstreams
            .push((name.clone(), UpstreamStats::default()));
        self.upstream_slots.insert(name.clone(), slot);
        slot
    }

    /// The counters in `slot`, from [`Stats::upstream_slot`] on this same `Stats`.
    pub fn upstream_at(&mut self, slot: usize) -> &mut UpstreamStats {
        &mut self.upstreams[slot].1
    }

    pub(crate) fn upstream_error(&mut self, name: &Arc<str>, kind: &'static str) {
        bump(&mut self.upstream(name).errors, kind, 1);
    }

    pub fn listener(&mut self, name: &Arc<str>) -> &mut ListenerStats {
        if !self.listeners.contains_key(&**name) {
            self.listeners
                .insert(name.clone(), ListenerStats::default());
        }
        self.listeners.get_mut(&**name).expect("inserted above")
    }

    pub fn tls_handshake(
        &mut self,
        listener: &Arc<str>,
        result: &'static str,
        seconds: Option<f64>,
    ) {
        match self
            .tls_handshakes
            .iter_mut()
            .find(|(l, r, _)| *r == result && **l == **listener)
        {
            Some((_, _, n)) => *n += 1,
            None => self.tls_handshakes.push((listener.clone(), result, 1)),
        }
        if let Some(seconds) = seconds {
            if !self.tls_handshake_duration.contains_key(&**listener) {
                self.tls_handshake_duration
                    .insert(listener.clone(), Histogram::default());
            }
            if let Some(h) = self.tls_handshake_duration.get_mut(&**listener) {
                h.observe(seconds);
            }
        }
    }

    pub(crate) fn h2_goaway(&mut self, listener: &Arc<str>, reason: &'static str) {
        bump(&mut self.listener(listener).h2_goaways, reason, 1);
    }

    pub(crate) fn tunnel_path(&mut self, path: &'static str) {
        bump(&mut self.tunnel_paths, path, 1);
    }

    pub(crate) fn limit_rejection(&mut self, limit: &'static str, enforcer: &'static str) {
        match self
            .limit_rejections
            .iter_mut()
            .find(|(l, e, _)| *l == limit && *e == enforcer)
        {
            Some((_, _, n)) => *n += 1,
            None => self.limit_rejections.push((limit, enforcer, 1)),
        }
    }
}

/// Where a worker publishes its counters for the scraper.
pub(crate) type Published = Arc<Mutex<Stats>>;

/// Registry of every worker's published counters.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<Vec<(usize, Published)>>,
}

impl Registry {
    pub(crate) fn register(&self, worker: usize) -> Published {
        let published = Published::default();
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((worker, published.clone()));
        published
    }

    /// Workers that have not published within `max_age_ms`: stuck or gone.
    pub(crate) fn silent_workers(&self, max_age_ms: u64) -> Vec<usize> {
        let now = crate::util::clock::now_ms();
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, p)| {
                let stats = p.lock().unwrap_or_else(|e| e.into_inner());
                !stats.finished && now.saturating_sub(stats.heartbeat_ms) > max_age_ms
            })
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn collect(&self) -> Vec<(usize, Stats)> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, p)| (*id, p.lock().unwrap_or_else(|e| e.into_inner()).clone()))
            .collect()
    }
}

pub(crate) fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counting() {
        let mut s = Stats::default();
        let l: Arc<str> = "http".into();
        let r: Arc<str> = "/api/".into();
        s.request(&l, &r, 200, 0.001);
        s.request(&l, &r, 200, 0.001);
        s.request(&l, &r, 502, 0.001);
        let rs = &s.routes["/api/"];
        assert_eq!(rs.requests.len(), 2);
        assert_eq!(rs.requests[0].2, 2);
    }
}
