//! The `[limits.global]` sync task (issue 16): every `sync_interval` it swaps out the
//! workers' batches of per-source hits, adds them to Redis in one round trip (one Lua
//! script, `EVALSHA`), reads back each source's two fixed windows, and publishes the
//! sources over the fleet's rate to the workers and the XDP program
//! (`policy::global_limit`).
//!
//! It runs on the control runtime, never on a worker: a slow or dead Redis delays only the
//! next sync. Each round trip has a deadline (twice `sync_interval`, at most 1 s; a connect
//! 5 s); on any
//! failure the connection is dropped and re-opened with backoff (250 ms doubling to 2 s),
//! the error is counted (`gateway_global_limit_redis_errors_total`) and logged at most
//! every 10 s, and with `fail_open` the published verdicts are dropped at once, so the
//! nodes enforce their local limits alone until Redis answers again.
//!
//! Keys: `gateway:rl:r:<source>:<window>` (requests) and `gateway:rl:c:<source>:<window>`
//! (connections), `<window>` the index of the fixed window on Redis's clock (`TIME`, one
//! clock for the fleet), each expiring two windows after its last increment, so Redis
//! holds no more than the sources of the last two windows. The script builds the window
//! keys itself: a single Redis (or a primary with replicas), not Redis Cluster.

use crate::config::GlobalLimitsConfig;
use crate::control::Control;
use crate::policy::global_limit::{Hits, OverSet, Window, Windows};
use crate::telemetry::metrics::Histogram;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fixed prefix of every key the gateway writes (fleets sharing one Redis use a
/// database each: `redis://host:6379/N`).
pub const KEY_PREFIX: &str = "gateway:rl:";

/// For each key `KEYS[i]` (`ARGV[2i-1]` hits, `ARGV[2i]` window in ms): add the hits to the
/// current fixed window, let it expire two windows later, and return the current count,
/// the previous window's count and the ms elapsed in the current window.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[2 * i - 1])
  local w = tonumber(ARGV[2 * i])
  local idx = math.floor(now / w)
  local cur = KEYS[i] .. ':' .. string.format('%d', idx)
  local c = redis.call('INCRBY', cur, n)
  redis.call('PEXPIRE', cur, 2 * w)
  local p = redis.call('GET', KEYS[i] .. ':' .. string.format('%d', idx - 1))
  out[3 * i - 2] = c
  out[3 * i - 1] = tonumber(p or '0')
  out[3 * i] = now - idx * w
end
return out
"#;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Between two warnings about the same outage.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The sync task's pace while `[limits.global]` is not configured (it picks up a reload).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The sync task's counters, rendered in `/metrics`.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub(crate) latency: Mutex<Histogram>,
    pub(crate) errors: AtomicU64,
    /// Whether the last round trip succeeded.
    pub(crate) up: AtomicBool,
}

impl SyncStats {
    pub(crate) fn render(&self, control: &Control, out: &mut String) {
        use std::fmt::Write;
        let global = &control.shared.global_limit;
        let _ = writeln!(
            out,
            "# HELP gateway_global_limit_redis_errors_total Failed Redis connections and round trips of the [limits.global] sync.\n\
             # TYPE gateway_global_limit_redis_errors_total counter\n\
             gateway_global_limit_redis_errors_total {}\n\
             # HELP gateway_global_limit_redis_up Whether the last [limits.global] sync reached Redis.\n\
             # TYPE gateway_global_limit_redis_up gauge\n\
             gateway_global_limit_redis_up {}\n\
             # HELP gateway_global_limit_over_sources Sources over a fleet-wide limit now.\n\
             # TYPE gateway_global_limit_over_sources gauge\n\
             gateway_global_limit_over_sources {}\n\
             # HELP gateway_global_limit_batch_dropped_total Hits of new sources not counted for the fleet because a worker's batch was full.\n\
             # TYPE gateway_global_limit_batch_dropped_total counter\n\
             gateway_global_limit_batch_dropped_total {}",
            self.errors.load(Ordering::Relaxed),
            u8::from(self.up.load(Ordering::Relaxed)),
            global.over_len(),
            global.dropped.load(Ordering::Relaxed),
        );
    }
}

/// The open connection and the URL it was opened for (a reload may change it).
struct Link {
    url: String,
    conn: redis::aio::MultiplexedConnection,
}

/// How an outage is reported: a warning when it starts, then at most every [`LOG_EVERY`].
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    logged: Option<Instant>,
}

/// One key of a round trip: which source, which limit.
#[derive(Clone, Copy)]
enum Kind {
    Requests,
    Conns,
}

/// The deadline of one round trip or connect: a stalled Redis must not hold the verdicts
/// (or, with `fail_open`, the fallback to local limits) for long.
fn deadline(config: &GlobalLimitsConfig) -> Duration {
    (config.sync_interval.0 * 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// The deadline of a connect (TCP, TLS handshake, AUTH): longer than a round trip's, since
/// a TLS handshake costs more than a sync and nothing waits on it (the verdicts are already
/// dropped or expiring while there is no connection).
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);

async fn connect(config: &GlobalLimitsConfig) -> Result<Link, String> {
    let client = redis::Client::open(config.redis.as_str()).map_err(|e| e.to_string())?;
    let limit = CONNECT_DEADLINE;
    let settings = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        // The connect's AUTH and HELLO; each sync's round trip has its own, shorter
        // deadline around it (`sync_global_limits`).
        .set_response_timeout(Some(limit));
    let conn = tokio::time::timeout(
        limit,
        client.get_multiplexed_async_connection_with_config(&settings),
    )
    .await
    .map_err(|_| format!("no connection within {limit:?}"))?
    .map_err(|e| e.to_string())?;
    Ok(Link {
        url: config.redis.clone(),
        conn,
    })
}

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Adds `hits` to Redis and returns the sources now over, with their deadlines on
/// `util::clock::now_ms`.
async fn sync_once(
    link: &mut Link,
    script: &redis::Script,
    windows: &Windows,
    hits: &HashMap<IpAddr, Hits>,
    keys: &mut Vec<(IpAddr, Kind, Window)>,
) -> Result<OverSet, String> {
    keys.clear();
    let mut invocation = script.prepare_invoke();
    for (ip, h) in hits {
        for (kind, count, window, tag) in [
            (Kind::Requests, h.requests, Some(windows.requests), "r"),
            (Kind::Conns, h.conns, windows.conns, "c"),
        ] {
            let Some(window) = window.filter(|_| count > 0) else {
                continue;
            };
            invocation
                .key(format!("{KEY_PREFIX}{tag}:{ip}"))
                .arg(count)
                .arg(window.length_ms);
            keys.push((*ip, kind, window));
        }
    }
    let values: Vec<i64> = invocation
        .invoke_async(&mut link.conn)
        .await
        .map_err(|e| e.to_string())?;
    if values.len() != keys.len() * 3 {
        return Err(format!(
            "the script returned {} values for {} keys",
            values.len(),
            keys.len()
        ));
    }
    let now_ms = crate::util::clock::now_ms();
    let mut over = OverSet::new();
    for ((ip, kind, window), v) in keys.iter().zip(values.chunks_exact(3)) {
        let count = |i: usize| v[i].max(0) as u64;
        if let Some(wait) = window.over_for(count(0), count(1), count(2)) {
            let until = now_ms + wait.as_millis() as u64;
            let entry = over.entry(*ip).or_default();
            match kind {
                Kind::Requests => entry.requests_ms = until,
                Kind::Conns => entry.conns_ms = until,
            }
        }
    }
    Ok(over)
}

impl Control {
    /// The `[limits.global]` sync task: runs on the control runtime for the process's life,
    /// following reloads (a table added, changed or removed takes effect at the next sync).
    pub async fn sync_global_limits(self: Arc<Self>) {
        let script = redis::Script::new(SCRIPT);
        let global = &self.shared.global_limit;
        let stats = &self.global_sync;
        let mut link: Option<Link> = None;
        let mut retry_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut outage = Outage::default();
        let (mut spares, mut hits, mut keys) = (Vec::new(), HashMap::new(), Vec::new());
        let mut next = Instant::now();
        loop {
            let snap = self.shared.snapshot();
            let Some(config) = snap.config.limits.global.clone() else {
                drop(snap);
                if link.take().is_some() || global.over_len() > 0 {
                    global.clear();
                }
                stats.up.store(false, Ordering::Relaxed);
                // Workers record nothing without the table; drain what a reload left.
                hits.clear();
                global.take_batches(&mut spares, &mut hits);
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            };
            drop(snap);
            next += config.sync_interval.0;
            let now = Instant::now();
            if next < now {
                next = now + config.sync_interval.0;
            }
            tokio::time::sleep_until(next.into()).await;

            hits.clear();
            global.take_batches(&mut spares, &mut hits);
            if link.as_ref().is_some_and(|l| l.url != config.redis) {
                link = None;
            }
            let result = match link.as_mut() {
                Some(link) => {
                    let started = Instant::now();
                    let windows = Windows::new(&config);
                    let round_trip = sync_once(link, &script, &windows, &hits, &mut keys);
                    match tokio::time::timeout(deadline(&config), round_trip).await {
                        Ok(Ok(over)) => {
                            stats
                                .latency
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .observe(started.elapsed().as_secs_f64());
                            Ok(over)
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(format!("no answer within {:?}", deadline(&config))),
                    }
                }
                None if Instant::now() < retry_at => {
                    // Backing off: hits are dropped (the local limits hold meanwhile).
                    global.publish(OverSet::new(), crate::util::clock::now_ms());
                    continue;
                }
                None => match connect(&config).await {
                    Ok(new) => {
                        link = Some(new);
                        // Counted from the next interval; these hits are few and old.
                        Ok(OverSet::new())
                    }
                    Err(e) => Err(format!("connect: {e}")),
                },
            };
            match result {
                Ok(over) => {
                    global.publish(over, crate::util::clock::now_ms());
                    stats.up.store(true, Ordering::Relaxed);
                    backoff = BACKOFF_MIN;
                    if let Some(since) = outage.since.take() {
                        tracing::info!(redis = %redacted(&config.redis), after = ?since.elapsed(), "limits.global: Redis reachable again, fleet-wide limits enforced");
                        outage.logged = None;
                    }
                }
                Err(error) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.up.store(false, Ordering::Relaxed);
                    link = None;
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    if config.fail_open {
                        global.clear();
                    } else {
                        global.publish(OverSet::new(), crate::util::clock::now_ms());
                    }
                    let since = *outage.since.get_or_insert_with(Instant::now);
                    if outage.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                        outage.logged = Some(Instant::now());
                        tracing::warn!(redis = %redacted(&config.redis), %error, down_for = ?since.elapsed(), fail_open = config.fail_open, "limits.global: Redis unreachable, local limits only");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:secret@10.0.0.1:6379/0"),
            "redis://…@10.0.0.1:6379/0"
        );
        assert_eq!(redacted("rediss://h:6380"), "rediss://h:6380");
    }
}
