//! `[limits.global]`: per-IP rates counted across the fleet (issue 16).
//!
//! The data plane's side of it lives here: every worker records each admitted request (and,
//! with `conn_rate`, each accepted connection) per source key, the same key as the local
//! limits ([`source_key`](super::limits::source_key): IPv6 aggregated to `ipv6_prefix`), into
//! a batch of its own behind a mutex that only that worker and the sync task take (the
//! task once per `sync_interval`), and checks the published over-limit set. The sync task
//! (`control/global_limits.rs`) swaps the batches out, adds them to Redis, and publishes
//! the sources over the fleet's rate here through [`GlobalLimit::publish`].
//!
//! Counting is a sliding window made of two fixed windows (the estimate is
//! `previous × (1 − elapsed / window) + current`, the approximation Cloudflare and Envoy
//! use); [`Window`] holds the arithmetic. A window is `burst / rate` long (at least 1 s),
//! so a source may spend `burst` at once and then `rate` per second.
//!
//! Bounds: a batch holds at most [`MAX_BATCH_SOURCES`] sources per worker (further new
//! sources are not counted until the next sync, and counted in `dropped`), so an attacker
//! with many source addresses cannot grow it; the over-limit set holds at most what the
//! batches held.

use crate::config::GlobalLimitsConfig;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The label of `gateway_limit_rejections_total{limit}` for requests refused by the fleet.
pub const LIMIT_GLOBAL_REQUEST_RATE: &str = "global_request_rate";
/// The same for connections refused at accept by the fleet's `conn_rate`.
pub const LIMIT_GLOBAL_CONN_RATE: &str = "global_conn_rate";

/// Sources one worker's batch holds between two syncs.
pub const MAX_BATCH_SOURCES: usize = 16384;

/// The shortest counting window: below a second the windows hold too few syncs for the
/// estimate to mean anything.
const MIN_WINDOW: Duration = Duration::from_secs(1);
/// The longest counting window (a burst of a day's worth at a tiny rate).
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// What one source did on one worker since the last sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    pub requests: u32,
    pub conns: u32,
}

/// One fixed-window pair's parameters: how long a window is and how many events it holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub length_ms: u64,
    pub limit: f64,
}

impl Window {
    /// The window of `rate` with `burst` (unset: one second's worth, as the local limits).
    pub fn new(rate_per_second: f64, burst: Option<u32>) -> Window {
        let burst = burst.map_or_else(|| rate_per_second.ceil().max(1.0), f64::from);
        let length = Duration::from_secs_f64(
            (burst / rate_per_second).clamp(MIN_WINDOW.as_secs_f64(), MAX_WINDOW.as_secs_f64()),
        );
        Window {
            length_ms: length.as_millis() as u64,
            // A window stretched to the minimum holds the rate's worth over its length.
            limit: burst.max(rate_per_second * length.as_secs_f64()),
        }
    }

    /// How long a source stays over, given the counts of the current and previous fixed
    /// windows and how far (ms) into the current one Redis's clock is; `None` when it is
    /// under the limit. Assumes it sends nothing more (refused requests are not counted),
    /// so this is when its estimate falls back under the limit.
    pub fn over_for(&self, current: u64, previous: u64, elapsed_ms: u64) -> Option<Duration> {
        let w = self.length_ms as f64;
        let elapsed = (elapsed_ms as f64).min(w);
        let (cur, prev) = (current as f64, previous as f64);
        let estimate = prev * (1.0 - elapsed / w) + cur;
        if estimate < self.limit {
            return None;
        }
        let wait_ms = if cur < self.limit {
            // The previous window's share decays below the room left in this one.
            (w * (1.0 - (self.limit - cur) / prev.max(1.0)) - elapsed).max(0.0)
        } else {
            // This window alone is full: wait for the next one, and for its share to decay.
            (w - elapsed) + w * (1.0 - self.limit / cur)
        };
        Some(Duration::from_millis(wait_ms.ceil().max(1.0) as u64))
    }
}

/// The windows of a `[limits.global]` table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Windows {
    pub requests: Window,
    pub conns: Option<Window>,
}

impl Windows {
    pub fn new(config: &GlobalLimitsConfig) -> Windows {
        Windows {
            requests: Window::new(config.request_rate.per_second, config.request_burst),
            conns: config
                .conn_rate
                .map(|rate| Window::new(rate.per_second, config.conn_burst)),
        }
    }
}

/// Until when (on [`crate::util::clock::now_ms`]'s clock; 0 = not over) a source is over
/// each of the fleet's limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverUntil {
    pub requests_ms: u64,
    pub conns_ms: u64,
}

impl OverUntil {
    /// The later of the two deadlines.
    pub fn until_ms(&self) -> u64 {
        self.requests_ms.max(self.conns_ms)
    }
}

/// The over-limit set the sync task publishes.
pub type OverSet = HashMap<IpAddr, OverUntil>;

/// Where fleet-denied sources go beyond the request path: the XDP program's map of them
/// (`xdp/maps.rs` implements it), so their SYNs are dropped in the kernel.
pub trait FleetDenySink: Send + Sync {
    /// `ip` (a source key) is over until `until_ns` on CLOCK_MONOTONIC.
    fn deny_until(&self, ip: IpAddr, until_ns: u64);
    /// `ip` is no longer over.
    fn remove(&self, ip: IpAddr);
}

/// The fleet-wide limit's shared state (in `Shared`, every thread).
pub struct GlobalLimit {
    /// One batch per worker (index = worker id modulo the length).
    batches: Box<[Mutex<HashMap<IpAddr, Hits>>]>,
    over: ArcSwap<OverSet>,
    /// Entries in `over`, so that the common case (nobody over) is one relaxed load.
    over_len: AtomicUsize,
    /// New sources not recorded because a worker's batch was full.
    pub dropped: AtomicU64,
    /// The kernel's map of fleet-denied sources, when the XDP program is attached.
    sink: Mutex<Option<Arc<dyn FleetDenySink>>>,
}

impl std::fmt::Debug for GlobalLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimit")
            .field("workers", &self.batches.len())
            .field("over", &self.over_len.load(Ordering::Relaxed))
            .finish()
    }
}

/// `Retry-After` seconds for a deadline `until_ms` at `now_ms` (at least 1).
fn retry_after(until_ms: u64, now_ms: u64) -> u64 {
    until_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
}

impl GlobalLimit {
    pub fn new(workers: usize) -> GlobalLimit {
        GlobalLimit {
            batches: (0..workers.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            over: ArcSwap::from_pointee(OverSet::new()),
            over_len: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            sink: Mutex::new(None),
        }
    }

    /// Plugs in the kernel's map (main.rs, when the XDP program attached).
    pub fn set_sink(&self, sink: Arc<dyn FleetDenySink>) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// How long `key` is still over, by `pick` of its deadlines.
    fn over(&self, key: IpAddr, pick: fn(&OverUntil) -> u64) -> Option<u64> {
        if self.over_len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let until = pick(self.over.load().get(&key)?);
        let now = crate::util::clock::now_ms();
        (until > now).then(|| retry_after(until, now))
    }

    fn record(&self, worker: usize, key: IpAddr, add: Hits) {
        let mut batch = self.batches[worker % self.batches.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let len = batch.len();
        match batch.get_mut(&key) {
            Some(hits) => {
                hits.requests = hits.requests.saturating_add(add.requests);
                hits.conns = hits.conns.saturating_add(add.conns);
            }
            None if len >= MAX_BATCH_SOURCES => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                batch.insert(key, add);
            }
        }
    }

    /// One request from source `key` on `worker`: `Err(retry_after_secs)` when the fleet
    /// counts it over `request_rate` (answer 429), else it is counted.
    pub fn admit_request(&self, worker: usize, key: IpAddr) -> Result<(), u64> {
        if let Some(secs) = self.over(key, |o| o.requests_ms) {
            return Err(secs);
        }
        self.record(
            worker,
            key,
            Hits {
                requests: 1,
                conns: 0,
            },
        );
        Ok(())
    }

    /// One accepted connection from source `key` on `worker` (`conn_rate`): `false` when
    /// the fleet counts it over (close it), else it is counted.
    pub fn admit_conn(&self, worker: usize, key: IpAddr) -> bool {
        if self.over(key, |o| o.conns_ms).is_some() {
            return false;
        }
        self.record(
            worker,
            key,
            Hits {
                requests: 0,
                conns: 1,
            },
        );
        true
    }

    /// Swaps every worker's batch for an empty one from `spares` (one per worker, kept by
    /// the caller so their capacity is reused) and merges them into `into`. Each worker's
    /// mutex is held for one swap.
    pub fn take_batches(
        &self,
        spares: &mut Vec<HashMap<IpAddr, Hits>>,
        into: &mut HashMap<IpAddr, Hits>,
    ) {
        spares.resize_with(self.batches.len(), HashMap::new);
        for (slot, spare) in self.batches.iter().zip(spares.iter_mut()) {
            std::mem::swap(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()), spare);
            for (key, hits) in spare.drain() {
                let sum = into.entry(key).or_default();
                sum.requests = sum.requests.saturating_add(hits.requests);
                sum.conns = sum.conns.saturating_add(hits.conns);
            }
        }
    }

    /// Publishes `fresh` (the sources read from Redis in this sync, with their verdicts: an
    /// entry of zeros is a source read and not over) over the previous set: a source read
    /// takes its fresh verdict, even a shorter one or none (the fleet's count fell, a
    /// FLUSHDB, a limit raised), and a source not read keeps its verdict until it expires
    /// at `now_ms`. Mirrors the change into the kernel's map. Returns the size of the set.
    pub fn publish(&self, fresh: OverSet, now_ms: u64) -> usize {
        let old = self.over.load_full();
        let mut next = fresh;
        for (key, until) in old.iter() {
            if until.until_ms() > now_ms {
                next.entry(*key).or_insert(*until);
            }
        }
        next.retain(|_, until| until.until_ms() > now_ms);
        if next.is_empty() && old.is_empty() {
            return 0;
        }
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sink) = sink {
            let mono_now = super::limits::monotonic_ns();
            for (key, until) in &next {
                if old.get(key) != Some(until) {
                    let left = until.until_ms().saturating_sub(now_ms);
                    sink.deny_until(
                        *key,
                        mono_now.saturating_add(left.saturating_mul(1_000_000)),
                    );
                }
            }
            for key in old.keys().filter(|k| !next.contains_key(k)) {
                sink.remove(*key);
            }
        }
        let len = next.len();
        self.over.store(Arc::new(next));
        self.over_len.store(len, Ordering::Relaxed);
        len
    }

    /// Forgets every verdict (Redis unreachable with `fail_open`, or the table removed):
    /// the local limits alone apply from the next request on.
    pub fn clear(&self) {
        self.publish(OverSet::new(), u64::MAX);
    }

    /// The published over-limit set (the sync task re-reads these sources every sync).
    pub fn over_set(&self) -> Arc<OverSet> {
        self.over.load_full()
    }

    /// Sources over a fleet limit now.
    pub fn over_len(&self) -> usize {
        self.over_len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, d))
    }

    #[test]
    fn window_length_is_burst_over_rate_at_least_a_second() {
        assert_eq!(
            Window::new(10.0, None),
            Window {
                length_ms: 1000,
                limit: 10.0
            }
        );
        assert_eq!(
            Window::new(10.0, Some(50)),
            Window {
                length_ms: 5000,
                limit: 50.0
            }
        );
        // A burst under a second's worth still counts over a second.
        assert_eq!(
            Window::new(100.0, Some(10)),
            Window {
                length_ms: 1000,
                limit: 100.0
            }
        );
    }

    #[test]
    fn sliding_estimate_and_wait() {
        let w = Window::new(10.0, None);
        assert_eq!(w.over_for(9, 0, 500), None);
        // Half-way through, half of the previous window's 10 still counts: 5 + 5 = 10.
        assert_eq!(w.over_for(5, 10, 500), Some(Duration::from_millis(1)));
        assert_eq!(w.over_for(4, 10, 500), None);
        // A full current window: wait for the next one.
        assert_eq!(w.over_for(10, 0, 250), Some(Duration::from_millis(750)));
        // Twice the limit: half of the next window too.
        assert_eq!(w.over_for(20, 0, 0), Some(Duration::from_millis(1500)));
        // With 6 of 10 spent, the previous 10 must decay to under 4: at 600 ms.
        assert_eq!(w.over_for(6, 10, 100), Some(Duration::from_millis(500)));
    }

    #[test]
    fn batches_are_bounded_and_counted_once() {
        let g = GlobalLimit::new(2);
        assert_eq!(g.admit_request(0, ip(1)), Ok(()));
        assert_eq!(g.admit_request(1, ip(1)), Ok(()));
        assert!(g.admit_conn(3, ip(1)));
        for i in 0..MAX_BATCH_SOURCES as u32 + 10 {
            let _ = g.admit_request(0, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert_eq!(g.dropped.load(Ordering::Relaxed), 11);
        let (mut spares, mut merged) = (Vec::new(), HashMap::new());
        g.take_batches(&mut spares, &mut merged);
        assert_eq!(
            merged[&ip(1)],
            Hits {
                requests: 2,
                conns: 1
            }
        );
        assert_eq!(spares.len(), 2);
        merged.clear();
        g.take_batches(&mut spares, &mut merged);
        assert!(merged.is_empty());
    }

    struct Sink(Mutex<Vec<(IpAddr, Option<u64>)>>);
    impl FleetDenySink for Sink {
        fn deny_until(&self, ip: IpAddr, until_ns: u64) {
            self.0.lock().unwrap().push((ip, Some(until_ns)));
        }
        fn remove(&self, ip: IpAddr) {
            self.0.lock().unwrap().push((ip, None));
        }
    }

    #[test]
    fn published_sources_are_refused_until_they_expire() {
        let g = GlobalLimit::new(1);
        let sink = Arc::new(Sink(Mutex::new(Vec::new())));
        g.set_sink(sink.clone());
        let now = crate::util::clock::now_ms();
        let fresh = OverSet::from([(
            ip(7),
            OverUntil {
                requests_ms: now + 2500,
                conns_ms: 0,
            },
        )]);
        assert_eq!(g.publish(fresh, now), 1);
        assert_eq!(g.admit_request(0, ip(7)), Err(3));
        assert!(g.admit_conn(0, ip(7)), "only the request rate is over");
        assert_eq!(g.admit_request(0, ip(8)), Ok(()));
        // A later sync without it keeps it until it expires, then drops it.
        assert_eq!(g.publish(OverSet::new(), now + 1000), 1);
        assert_eq!(g.publish(OverSet::new(), now + 2500), 0);
        assert_eq!(g.admit_request(0, ip(7)), Ok(()));
        let calls = sink.0.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(matches!(calls[0], (a, Some(_)) if a == ip(7)));
        assert_eq!(calls[1], (ip(7), None));
        drop(calls);
        g.publish(
            OverSet::from([(
                ip(9),
                OverUntil {
                    requests_ms: u64::MAX - 1,
                    conns_ms: 0,
                },
            )]),
            now,
        );
        // A sync that read it again takes the fresh verdict, even a shorter one or none
        // (a FLUSHDB, a limit raised): the old deadline does not outlive it.
        let shorter = OverUntil {
            requests_ms: now + 10,
            conns_ms: 0,
        };
        assert_eq!(g.publish(OverSet::from([(ip(9), shorter)]), now), 1);
        assert_eq!(g.over_set()[&ip(9)], shorter);
        assert_eq!(
            g.publish(OverSet::from([(ip(9), OverUntil::default())]), now),
            0
        );
        assert_eq!(g.admit_request(0, ip(9)), Ok(()));
        g.clear();
        assert_eq!(g.over_len(), 0);
    }
}
