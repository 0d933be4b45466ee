//! The `[limits.global]` sync task (issue 16): every `sync_interval` it swaps out the
//! workers' batches of per-source hits, adds them to Redis (Lua scripts, `EVALSHA`, of at
//! most [`CHUNK_SOURCES`] sources each, pipelined; at most [`MAX_SYNC_SOURCES`] sources per
//! sync and about 8192 a second), re-reads the sources already over, reads back each source's two fixed windows,
//! and publishes the sources over the fleet's rate to the workers and the XDP program
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

use crate::config::{redact_url, redis_connection_info, GlobalLimitsConfig};
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
/// the previous window's count and the ms elapsed in the current window. Zero hits only
/// reads (a source re-read because it is over: no key created, no expiry extended).
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[2 * i - 1])
  local w = tonumber(ARGV[2 * i])
  local idx = math.floor(now / w)
  local cur = KEYS[i] .. ':' .. string.format('%d', idx)
  local c
  if n > 0 then
    c = redis.call('INCRBY', cur, n)
    redis.call('PEXPIRE', cur, 2 * w)
  else
    c = tonumber(redis.call('GET', cur) or '0')
  end
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
             # HELP gateway_global_limit_batch_dropped_total Not counted for the fleet: hits of new sources when a worker's batch was full, and sources a sync left out (over its bound of sources).\n\
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
    let client =
        redis::Client::open(redis_connection_info(&config.redis)?).map_err(|e| e.to_string())?;
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

/// Sources one script call carries at most: Redis runs a script to its end before it
/// serves anyone else (every node's sync, every other tenant), so one call's work is
/// bounded to about a thousand keys (a few ms), and the calls of a sync are pipelined.
const CHUNK_SOURCES: usize = 512;
/// Sources one sync sends at most (the sources over first, then the heaviest): what a
/// sync costs Redis is bounded whatever the number of sources a flood brings; the rest
/// are not counted for the fleet this time (`gateway_global_limit_batch_dropped_total`).
pub const MAX_SYNC_SOURCES: usize = 4096;
/// Sources a node sends per second at most, so that a short `sync_interval` does not
/// multiply the bound (measured: 1024 keys cost Redis 15-22 ms, 8192 keys 120-230 ms, on
/// the loaded 2-core test host).
const MAX_SOURCES_PER_SECOND: f64 = 8192.0;

/// The sources one sync of `config` sends at most: [`MAX_SOURCES_PER_SECOND`] spread over
/// the syncs of a second, at least a chunk and at most [`MAX_SYNC_SOURCES`].
fn max_sync_sources(config: &GlobalLimitsConfig) -> usize {
    ((MAX_SOURCES_PER_SECOND * config.sync_interval.0.as_secs_f64()) as usize)
        .clamp(CHUNK_SOURCES, MAX_SYNC_SOURCES)
}

/// One key of a sync: which source, which limit, its window, the hits to add (0: re-read).
type Key = (IpAddr, Kind, Window, u32);

/// Chooses the sources of this sync into `sources` (source, hits, over now): every source
/// with hits and every source of the over-limit set `over`, which is re-read with zero
/// hits so that its verdict follows Redis (a FLUSHDB, another node) and the current limits,
/// not only its own refused (uncounted) requests. Above `max` it keeps the sources over,
/// then the heaviest; returns how many it left out.
fn choose_sources(
    hits: &HashMap<IpAddr, Hits>,
    over: &OverSet,
    max: usize,
    sources: &mut Vec<(IpAddr, Hits, bool)>,
) -> usize {
    sources.clear();
    sources.extend(hits.iter().map(|(ip, h)| (*ip, *h, over.contains_key(ip))));
    sources.extend(
        over.keys()
            .filter(|ip| !hits.contains_key(ip))
            .map(|ip| (*ip, Hits::default(), true)),
    );
    let total = sources.len();
    if total > max {
        sources.select_nth_unstable_by_key(max - 1, |(_, h, over)| {
            (
                std::cmp::Reverse(*over),
                std::cmp::Reverse(u64::from(h.requests) + u64::from(h.conns)),
            )
        });
        sources.truncate(max);
    }
    total - sources.len()
}

/// The keys of `sources`: a source's limit with hits, and both limits of a source over.
fn keys_of(sources: &[(IpAddr, Hits, bool)], windows: &Windows, keys: &mut Vec<Key>) {
    keys.clear();
    for (ip, h, over) in sources {
        for (kind, count, window) in [
            (Kind::Requests, h.requests, Some(windows.requests)),
            (Kind::Conns, h.conns, windows.conns),
        ] {
            if let Some(window) = window.filter(|_| count > 0 || *over) {
                keys.push((*ip, kind, window, count));
            }
        }
    }
}

/// One script call for `keys` (at most two per source of a chunk): the counts Redis holds.
async fn run_chunk(
    mut conn: redis::aio::MultiplexedConnection,
    script: Arc<redis::Script>,
    keys: Vec<Key>,
    deadline: Duration,
) -> (Vec<Key>, Result<Vec<i64>, String>) {
    let mut invocation = script.prepare_invoke();
    for (ip, kind, window, count) in &keys {
        let tag = match kind {
            Kind::Requests => "r",
            Kind::Conns => "c",
        };
        invocation
            .key(format!("{KEY_PREFIX}{tag}:{ip}"))
            .arg(*count)
            .arg(window.length_ms);
    }
    let result = match tokio::time::timeout(deadline, invocation.invoke_async(&mut conn)).await {
        Ok(Ok(values)) => Ok::<Vec<i64>, String>(values),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {deadline:?}")),
    };
    let result = result.and_then(|values| {
        if values.len() == keys.len() * 3 {
            Ok(values)
        } else {
            Err(format!(
                "the script returned {} values for {} keys",
                values.len(),
                keys.len()
            ))
        }
    });
    (keys, result)
}

/// What one sync learned: the verdicts of every key read (an entry of zeros: read and not
/// over) and the first error of the chunks that failed.
struct SyncResult {
    over: OverSet,
    chunks_ok: usize,
    error: Option<String>,
}

/// Sends `keys` to Redis in pipelined chunks of [`CHUNK_SOURCES`] sources (one chunk, maybe
/// empty, at least: it is also the check that Redis answers) and returns the verdicts of
/// the chunks that answered within `deadline`, with their deadlines on
/// `util::clock::now_ms`.
async fn sync_once(
    link: &Link,
    script: &Arc<redis::Script>,
    keys: &[Key],
    deadline: Duration,
) -> SyncResult {
    let mut calls = tokio::task::JoinSet::new();
    // A source has at most two keys, so a chunk of keys holds at most that many sources.
    for chunk in keys
        .chunks(CHUNK_SOURCES * 2)
        .chain(keys.is_empty().then_some(&[][..]))
    {
        calls.spawn(run_chunk(
            link.conn.clone(),
            script.clone(),
            chunk.to_vec(),
            deadline,
        ));
    }
    let mut out = SyncResult {
        over: OverSet::new(),
        chunks_ok: 0,
        error: None,
    };
    while let Some(joined) = calls.join_next().await {
        let (keys, values) = match joined {
            Ok((keys, Ok(values))) => (keys, values),
            Ok((_, Err(e))) => {
                out.error.get_or_insert(e);
                continue;
            }
            Err(e) => {
                out.error.get_or_insert(format!("sync task: {e}"));
                continue;
            }
        };
        out.chunks_ok += 1;
        let now_ms = crate::util::clock::now_ms();
        for ((ip, kind, window, _), v) in keys.iter().zip(values.chunks_exact(3)) {
            let count = |i: usize| v[i].max(0) as u64;
            let until = window
                .over_for(count(0), count(1), count(2))
                .map_or(0, |wait| now_ms + wait.as_millis() as u64);
            let entry = out.over.entry(*ip).or_default();
            match kind {
                Kind::Requests => entry.requests_ms = until,
                Kind::Conns => entry.conns_ms = until,
            }
        }
    }
    out
}

impl Control {
    /// The `[limits.global]` sync task: runs on the control runtime for the process's life,
    /// following reloads (a table added, changed or removed takes effect at the next sync).
    pub async fn sync_global_limits(self: Arc<Self>) {
        let script = Arc::new(redis::Script::new(SCRIPT));
        let global = &self.shared.global_limit;
        let stats = &self.global_sync;
        let mut link: Option<Link> = None;
        let mut retry_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut outage = Outage::default();
        let (mut spares, mut hits, mut keys) = (Vec::new(), HashMap::new(), Vec::new());
        let mut sources = Vec::new();
        let mut last_windows: Option<Windows> = None;
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
            // A reload that changes the limits (or their windows) re-judges every source:
            // the verdicts of the old limits are dropped at once, and a source still over
            // the new ones is found at its next request's sync.
            let windows = Windows::new(&config);
            if last_windows.replace(windows).is_some_and(|w| w != windows) {
                global.clear();
            }
            let result = match link.as_ref() {
                Some(link) => {
                    let started = Instant::now();
                    let left_out = choose_sources(
                        &hits,
                        &global.over_set(),
                        max_sync_sources(&config),
                        &mut sources,
                    );
                    global.dropped.fetch_add(left_out as u64, Ordering::Relaxed);
                    keys_of(&sources, &windows, &mut keys);
                    let synced = sync_once(link, &script, &keys, deadline(&config)).await;
                    if synced.error.is_none() {
                        stats
                            .latency
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .observe(started.elapsed().as_secs_f64());
                    }
                    Ok(synced)
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
                        Ok(SyncResult {
                            over: OverSet::new(),
                            chunks_ok: 1,
                            error: None,
                        })
                    }
                    Err(e) => Err(format!("connect: {e}")),
                },
            };
            // The verdicts of the chunks that answered stand even when another chunk
            // failed: only a sync that learned nothing falls back (fail_open).
            let result = match result {
                Ok(SyncResult {
                    over,
                    chunks_ok,
                    error,
                }) if chunks_ok > 0 => {
                    global.publish(over, crate::util::clock::now_ms());
                    error.map_or(Ok(()), |e| Err((e, true)))
                }
                Ok(SyncResult { error, .. }) => {
                    Err((error.unwrap_or_else(|| "no chunk answered".into()), false))
                }
                Err(e) => Err((e, false)),
            };
            match result {
                Ok(()) => {
                    stats.up.store(true, Ordering::Relaxed);
                    backoff = BACKOFF_MIN;
                    if let Some(since) = outage.since.take() {
                        tracing::info!(redis = %redact_url(&config.redis), after = ?since.elapsed(), "limits.global: Redis reachable again, fleet-wide limits enforced");
                        outage.logged = None;
                    }
                }
                Err((error, partial)) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.up.store(false, Ordering::Relaxed);
                    link = None;
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    if config.fail_open && !partial {
                        global.clear();
                    } else {
                        global.publish(OverSet::new(), crate::util::clock::now_ms());
                    }
                    let since = *outage.since.get_or_insert_with(Instant::now);
                    if outage.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                        outage.logged = Some(Instant::now());
                        tracing::warn!(redis = %redact_url(&config.redis), %error, down_for = ?since.elapsed(), fail_open = config.fail_open, "limits.global: Redis unreachable, local limits only");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::global_limit::OverUntil;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn requests(n: u32) -> Hits {
        Hits {
            requests: n,
            conns: 0,
        }
    }

    /// A flood of sources: a sync sends the sources over and the heaviest, no more than
    /// MAX_SYNC_SOURCES, and says how many it left out.
    #[test]
    fn a_sync_is_bounded_to_the_sources_over_and_the_heaviest() {
        let mut hits: HashMap<IpAddr, Hits> = (0..3 * MAX_SYNC_SOURCES as u32)
            .map(|i| (ip(i), requests(1)))
            .collect();
        for i in 0..100 {
            hits.insert(ip(i), requests(50));
        }
        let over = OverSet::from([(
            ip(1_000_000),
            OverUntil {
                requests_ms: u64::MAX,
                conns_ms: 0,
            },
        )]);
        let mut sources = Vec::new();
        let left_out = choose_sources(&hits, &over, MAX_SYNC_SOURCES, &mut sources);
        assert_eq!(sources.len(), MAX_SYNC_SOURCES);
        assert_eq!(left_out, hits.len() + 1 - MAX_SYNC_SOURCES);
        assert!(sources.contains(&(ip(1_000_000), Hits::default(), true)));
        for i in 0..100 {
            assert!(sources.contains(&(ip(i), requests(50), false)), "heavy {i}");
        }

        // The source over is re-read (zero hits) on both limits; the others on theirs.
        let config: GlobalLimitsConfig =
            toml::from_str("redis = \"redis://h\"\nrequest_rate = \"10/s\"\nconn_rate = \"5/s\"")
                .unwrap();
        let windows = Windows::new(&config);
        // 8192 a second: 2048 per sync at 250 ms, a chunk at least at 10 ms.
        assert_eq!(max_sync_sources(&config), 2048);
        let mut keys = Vec::new();
        keys_of(
            &[(ip(1), Hits::default(), true), (ip(2), requests(3), false)],
            &windows,
            &mut keys,
        );
        let summary: Vec<(IpAddr, u32)> = keys.iter().map(|k| (k.0, k.3)).collect();
        assert_eq!(summary, [(ip(1), 0), (ip(1), 0), (ip(2), 3)]);
    }
}
