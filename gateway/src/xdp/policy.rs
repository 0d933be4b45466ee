//! Policy → maps: what the guard enforces, computed from `[limits]` and the listeners
//! (the `GUARD_CONFIG` entry, token-bucket parameters, the protected ports), and the map
//! sizes chosen at load ([`GuardOptions`]).

use gateway_common::{flags, sizes, BucketParams, GuardConfig};

use crate::config::{Config, LimitsConfig};

/// Sizes of the guard's state maps, fixed at load time (a change needs a restart, and
/// drops the pinned rate state, whose definition then no longer matches).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardOptions {
    /// Source addresses with a `conn_rate` bucket, per address family (LRU; the least
    /// recently charged is forgotten when full). Default [`sizes::RATE_ENTRIES`].
    pub tracked_sources: u32,
    /// Global backstop: new per-source buckets created per second, all CPUs together.
    /// Beyond it a SYN from a source without a bucket passes without one
    /// (`pass_untracked`; user space charges it at accept), and known sources keep
    /// their state. Default: `tracked_sources / 8`, so a flood of
    /// new sources cycles the LRU no faster than once per 8 s. 0 turns the backstop off.
    pub new_sources_per_sec: f64,
    /// Burst of the backstop. Default: `tracked_sources / 4`.
    pub new_sources_burst: u32,
}

impl Default for GuardOptions {
    fn default() -> Self {
        GuardOptions::for_tracked_sources(sizes::RATE_ENTRIES)
    }
}

impl GuardOptions {
    /// The defaults for a given LRU size.
    pub fn for_tracked_sources(tracked_sources: u32) -> GuardOptions {
        let tracked_sources = tracked_sources.max(1);
        GuardOptions {
            tracked_sources,
            new_sources_per_sec: f64::from(tracked_sources) / 8.0,
            new_sources_burst: (tracked_sources / 4).max(1),
        }
    }
}

// ---- Policy → maps ----

/// The TCP ports of `config`'s listeners (what the guard protects).
pub fn listener_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .listeners
        .iter()
        .filter_map(|l| l.get_ref().listen.parse::<std::net::SocketAddr>().ok())
        .map(|addr| addr.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Milli-tokens per token (the kernel's unit, `gateway_common::BucketParams`).
pub(super) const MTOK: u64 = 1000;
/// Largest bucket, in tokens: keeps `burst_mtok * 1e9` (the kernel's largest product)
/// below 2^64.
pub(crate) const MAX_BURST: u64 = 10_000_000;

/// Kernel bucket parameters for `rate` tokens per second with `burst` tokens.
pub(super) fn bucket_params(rate: f64, burst: u64) -> BucketParams {
    let burst_mtok = burst.clamp(1, MAX_BURST) * MTOK;
    // At least one milli-token per second: a zero rate would never refill and the
    // division below would be by zero.
    let rate_mtok_per_s = ((rate * MTOK as f64).round() as u64).max(1);
    let fill_ns =
        u64::try_from(u128::from(burst_mtok) * 1_000_000_000 / u128::from(rate_mtok_per_s) + 1)
            .unwrap_or(u64::MAX);
    BucketParams {
        rate_mtok_per_s,
        burst_mtok,
        fill_ns,
    }
}

/// `conn_burst`, or one second's worth of `conn_rate` (at least 1) when unset.
pub(crate) fn effective_conn_burst(limits: &LimitsConfig) -> Option<u64> {
    let rate = limits.conn_rate.as_ref()?.per_second;
    Some(
        limits
            .conn_burst
            .map_or_else(|| rate.ceil().max(1.0) as u64, u64::from)
            .max(1),
    )
}

/// The backstop's per-CPU share: each CPU refills its own bucket, so an even spread of
/// SYNs over the CPUs (RSS) adds up to the global rate.
pub(super) fn new_source_params(options: &GuardOptions, cpus: usize) -> BucketParams {
    let cpus = cpus.max(1) as f64;
    bucket_params(
        options.new_sources_per_sec / cpus,
        (f64::from(options.new_sources_burst) / cpus).ceil() as u64,
    )
}

/// The `GUARD_CONFIG` entry for `limits` and `ports` (sorted, at most `MAX_PORTS`).
pub(crate) fn guard_config(
    limits: &LimitsConfig,
    ports: &[u16],
    options: &GuardOptions,
    cpus: usize,
) -> GuardConfig {
    let mut config = GuardConfig::default();
    if ports.is_empty() {
        return config;
    }
    config.flags = flags::CFG_ENABLED;
    for (slot, port) in config.ports.iter_mut().zip(ports) {
        *slot = *port;
    }
    config.port_count = ports.len().min(sizes::MAX_PORTS) as u32;
    if let (Some(rate), Some(burst)) = (&limits.conn_rate, effective_conn_burst(limits)) {
        config.flags |= flags::CFG_CONN_RATE;
        config.conn = bucket_params(rate.per_second, burst);
        if options.new_sources_per_sec > 0.0 {
            config.flags |= flags::CFG_NEW_SOURCE_LIMIT;
            config.new_source = new_source_params(options, cpus);
        }
    }
    if limits.max_conns_per_ip.is_some() {
        config.flags |= flags::CFG_CONN_CAP;
    }
    config.v6_prefix_len = u32::from(limits.ipv6_prefix.clamp(1, 128));
    config
}

pub(super) fn possible_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1).max(1)
}
