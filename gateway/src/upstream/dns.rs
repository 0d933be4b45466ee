//! Upstream servers written `"NAME:PORT"`: their names resolved to addresses, at start and
//! at each reload (blocking callers, off the workers), and again while running, at each
//! name's TTL clamped to the upstream's `[resolve_min, resolve_max]` (the control plane's
//! refresh task, `control/mod.rs`).
//!
//! Resolution is hickory-resolver on the control plane's tokio runtime: never a blocking
//! `getaddrinfo` on a worker thread. `/etc/hosts` is read first, then A and AAAA are asked
//! of `[resolver] nameservers`, or of `/etc/resolv.conf`'s (with its search domains and
//! `ndots`, so a bare `aragora` resolves inside a pod). Answers are not cached here: the
//! refresh asks when the TTL runs out, so a cache would only hand back what it expires.
//!
//! The failure rules (`docs/operations.md`): a name that cannot be asked (timeout,
//! SERVFAIL, no server) keeps its last good addresses; NXDOMAIN (or no A/AAAA record) for a
//! name that resolved before keeps them for `nxdomain_grace`, then drops them.

use super::Resolved;
use crate::config::{Config, ConfigError, ConfigErrors, LoadedConfig, ResolverConfig, ServerAddr};
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig,
};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveErrorKind, TokioResolver};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The IPv4-only and the IPv6-only resolver.
type Resolvers = (Arc<TokioResolver>, Arc<TokioResolver>);

/// What one lookup of one name gave.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Addresses (sorted, deduplicated) and how long the answer is valid.
    Found(Vec<IpAddr>, Duration),
    /// NXDOMAIN, or the name exists with no A or AAAA record.
    Missing(&'static str),
    /// The name could not be asked: timeout, SERVFAIL, refused, no server reachable.
    Failed(&'static str, String),
}

impl Outcome {
    /// The `result` label of `gateway_upstream_dns_resolutions_total`.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Found(..) => "ok",
            Outcome::Missing(label) | Outcome::Failed(label, _) => label,
        }
    }
}

/// One name of one upstream, as last resolved.
#[derive(Debug, Clone)]
struct NameState {
    /// The last good set; empty when it never resolved or was dropped after the grace.
    addrs: Vec<IpAddr>,
    /// When it is next asked.
    due: Instant,
    /// Since when it answers NXDOMAIN, while it still holds its old set.
    missing_since: Option<Instant>,
}

/// The resolver and the state of every upstream name, shared by the control plane's
/// start-up, reloads and the refresh task.
pub struct Dns {
    /// Built at the first lookup (a config without names never reads resolv.conf), and
    /// again when `[resolver]` changes.
    resolver: Mutex<Option<(ResolverConfig, Resolvers)>>,
    /// Keyed by (upstream name, host name).
    names: Mutex<HashMap<(String, String), NameState>>,
    /// `gateway_upstream_dns_resolutions_total` by (upstream, result).
    results: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Rate limit of the failure log line (ms on the process clock).
    last_failure_log_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Dns")
    }
}

fn build_resolver(
    config: &ResolverConfig,
    strategy: LookupIpStrategy,
) -> Result<TokioResolver, String> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?
    } else {
        let mut hickory = HickoryConfig::new();
        for ns in &config.nameservers {
            let addr = ns.parse().map_err(|_| format!("bad nameserver {ns:?}"))?;
            hickory.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            // A truncated (large headless Service) answer is asked again over TCP.
            hickory.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(
            hickory,
            hickory_resolver::name_server::TokioConnectionProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.use_hosts_file = ResolveHosts::Always;
    // One resolver per family, asked side by side: hickory's combined A+AAAA lookup
    // reports an A query that timed out beside an empty AAAA answer as "no records",
    // which would drop a name's addresses instead of keeping them through the outage.
    opts.ip_strategy = strategy;
    // The refresh asks at each TTL; a cache would hand back an answer a too-small
    // `resolve_max` wants re-asked.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    Ok(builder.build())
}

/// The servers of an upstream that are names, as (host, port).
fn names_of(config: &Config) -> impl Iterator<Item = (usize, &str, String)> + '_ {
    config.upstreams.iter().enumerate().flat_map(|(i, u)| {
        let up = u.get_ref();
        up.servers
            .iter()
            .filter_map(move |s| match ServerAddr::parse(s.addr()) {
                Some(ServerAddr::Name(host, _)) => Some((i, up.name.as_str(), host)),
                _ => None,
            })
    })
}

/// Whether an address from an answer may be a server. Unspecified (it reaches this host),
/// multicast, broadcast, "this network" (0/8), reserved (240/4) and link-local addresses
/// (169.254.169.254 is a cloud's metadata service) are never servers, whatever a name
/// server says; IPv4-mapped IPv6 forms are judged as the IPv4 address they are.
fn usable(ip: IpAddr) -> bool {
    if ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            !(v4.is_broadcast() || v4.is_link_local() || first == 0 || first >= 240)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The outcome of a name from its A and its AAAA lookups. A family that could not be
/// asked (timeout, SERVFAIL) keeps the last good set when that set has addresses of that
/// family: an outage of one query type must not drop half a name.
fn combine(v4: Outcome, v6: Outcome, previous: &[IpAddr]) -> Outcome {
    use Outcome::*;
    let had = |want_v4: bool| previous.iter().any(|ip| ip.is_ipv4() == want_v4);
    match (v4, v6) {
        (Found(mut a, ta), Found(b, tb)) => {
            a.extend(b);
            a.sort_unstable();
            a.dedup();
            Found(a, ta.min(tb))
        }
        (found @ Found(..), Missing(_)) | (Missing(_), found @ Found(..)) => found,
        (Found(..), failed @ Failed(..)) if had(false) => failed,
        (failed @ Failed(..), Found(..)) if had(true) => failed,
        (found @ Found(..), Failed(..)) | (Failed(..), found @ Found(..)) => found,
        (failed @ Failed(..), _) | (_, failed @ Failed(..)) => failed,
        (Missing(a), Missing(b)) => Missing(if a == "nxdomain" || b == "nxdomain" {
            "nxdomain"
        } else {
            "nodata"
        }),
    }
}

/// What a lookup's result means for the failure rules.
fn classify(
    result: Result<hickory_resolver::lookup_ip::LookupIp, hickory_resolver::ResolveError>,
) -> Outcome {
    match result {
        Ok(lookup) => {
            // An unspecified or multicast address is no server (0.0.0.0 would reach this
            // host): a record pointing there is ignored, not connected to.
            let mut addrs: Vec<IpAddr> = lookup
                .iter()
                .map(|ip| ip.to_canonical())
                .filter(|ip| usable(*ip))
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            if addrs.is_empty() {
                Outcome::Missing("nodata")
            } else {
                Outcome::Found(addrs, ttl)
            }
        }
        Err(e) => match e.kind() {
            ResolveErrorKind::Proto(p) => match p.kind() {
                ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
                    ResponseCode::NXDomain => Outcome::Missing("nxdomain"),
                    ResponseCode::NoError => Outcome::Missing("nodata"),
                    ResponseCode::ServFail => Outcome::Failed("servfail", e.to_string()),
                    _ => Outcome::Failed("error", e.to_string()),
                },
                ProtoErrorKind::Timeout => Outcome::Failed("timeout", e.to_string()),
                _ => Outcome::Failed("error", e.to_string()),
            },
            _ => Outcome::Failed("error", e.to_string()),
        },
    }
}

impl Dns {
    pub fn new() -> Arc<Dns> {
        Arc::new(Dns {
            resolver: Mutex::new(None),
            names: Mutex::new(HashMap::new()),
            results: Mutex::new(BTreeMap::new()),
            last_failure_log_ms: Default::default(),
        })
    }

    fn resolver(&self, config: &ResolverConfig) -> Result<Resolvers, String> {
        let mut current = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        match &*current {
            Some((built_for, resolver)) if built_for == config => Ok(resolver.clone()),
            _ => {
                let resolver = (
                    Arc::new(build_resolver(config, LookupIpStrategy::Ipv4Only)?),
                    Arc::new(build_resolver(config, LookupIpStrategy::Ipv6Only)?),
                );
                *current = Some((config.clone(), resolver.clone()));
                Ok(resolver)
            }
        }
    }

    /// Looks up every (upstream, host) of `keys` at once (a slow or silent name server
    /// costs one timeout per round, not one per name), counting each result.
    async fn lookup_all(&self, resolver: &Resolvers, keys: &[(String, String)]) -> Vec<Outcome> {
        let mut tasks = tokio::task::JoinSet::new();
        for (index, key) in keys.iter().enumerate() {
            let (v4, v6, host) = (resolver.0.clone(), resolver.1.clone(), key.1.clone());
            let previous = self.state(key).map(|s| s.addrs).unwrap_or_default();
            // A trailing dot makes the name absolute (no search domains); without one,
            // the system's search list and ndots apply, as they do for getaddrinfo.
            tasks.spawn(async move {
                let (a, aaaa) = tokio::join!(v4.lookup_ip(host.clone()), v6.lookup_ip(host));
                (index, combine(classify(a), classify(aaaa), &previous))
            });
        }
        let mut outcomes = vec![None; keys.len()];
        while let Some(done) = tasks.join_next().await {
            if let Ok((index, outcome)) = done {
                outcomes[index] = Some(outcome);
            }
        }
        let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .zip(outcomes)
            .map(|((upstream, _), outcome)| {
                let outcome = outcome
                    .unwrap_or_else(|| Outcome::Failed("error", "lookup task failed".into()));
                *results
                    .entry((upstream.clone(), outcome.label()))
                    .or_default() += 1;
                outcome
            })
            .collect()
    }

    /// Resolves every name of `loaded` (start, `gateway check`, reload). A name that does
    /// not resolve is an error at its upstream's `servers` line when the upstream has
    /// `resolve_required` and the name has no last good set; otherwise it keeps that set
    /// (a DNS outage during a reload changes nothing) or starts empty.
    pub async fn resolve_config(&self, loaded: &LoadedConfig) -> Result<(), ConfigErrors> {
        let config = &loaded.config;
        let mut lookups: Vec<(usize, (String, String))> = Vec::new();
        for (i, upstream, host) in names_of(config) {
            let key = (upstream.to_string(), host);
            if !lookups.iter().any(|(_, k)| *k == key) {
                lookups.push((i, key));
            }
        }
        if lookups.is_empty() {
            return Ok(());
        }
        let resolver = self.resolver(&config.resolver).map_err(|message| {
            ConfigErrors(vec![ConfigError {
                file: loaded.path.clone(),
                line: 0,
                key: "resolver".into(),
                message,
            }])
        })?;
        let keys: Vec<(String, String)> = lookups.iter().map(|(_, k)| k.clone()).collect();
        let outcomes = self.lookup_all(&resolver, &keys).await;
        let mut errors = Vec::new();
        let mut fresh = HashMap::new();
        for ((i, key), outcome) in lookups.into_iter().zip(outcomes) {
            let (upstream, host) = (key.0.as_str(), key.1.clone());
            let up = config.upstreams[i].get_ref();
            let old = self.state(&key);
            let now = Instant::now();
            let state = match (outcome, old) {
                (Outcome::Found(addrs, ttl), _) => NameState {
                    addrs,
                    due: now + ttl.clamp(up.resolve_min.0, up.resolve_max.0),
                    missing_since: None,
                },
                (outcome, Some(old)) if !old.addrs.is_empty() => {
                    self.log_failure(upstream, &host, &outcome);
                    NameState {
                        due: now + up.resolve_min.0,
                        ..old
                    }
                }
                (outcome, _) => {
                    if up.resolve_required {
                        let why = match &outcome {
                            Outcome::Found(..) => unreachable!(),
                            Outcome::Missing(what) => format!("no such name ({what})"),
                            Outcome::Failed(what, detail) => format!("{what}: {detail}"),
                        };
                        errors.push(loaded.error_at(
                            config.upstreams[i].span(),
                            &format!("upstream[{i}]"),
                            "servers",
                            format!(
                                "{host:?} does not resolve ({why}); set resolve_required = false \
                                 to start without it"
                            ),
                        ));
                    } else {
                        tracing::warn!(upstream, name = %host, result = outcome.label(), "upstream name does not resolve: the upstream has no servers from it (503) until it does");
                    }
                    NameState {
                        addrs: Vec::new(),
                        due: now + up.resolve_min.0,
                        missing_since: None,
                    }
                }
            };
            fresh.insert(key, state);
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        // Merged, not replaced: until this config is installed (a reload can still fail
        // after this), the running one's names must keep theirs. `retain` forgets the
        // names of a config once it is replaced.
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(fresh);
        Ok(())
    }

    /// Forgets the names that `config` (the one just installed) no longer has.
    pub fn retain(&self, config: &Config) {
        let keep: Vec<(String, String)> = names_of(config)
            .map(|(_, u, h)| (u.to_string(), h))
            .collect();
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| keep.contains(key));
    }

    fn state(&self, key: &(String, String)) -> Option<NameState> {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn log_failure(&self, upstream: &str, host: &str, outcome: &Outcome) {
        // At most one line every 10 s: a DNS outage must not flood the log, and the
        // counter says how many lookups failed.
        let now = crate::util::clock::now_ms();
        let last = self
            .last_failure_log_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 10_000 {
            return;
        }
        self.last_failure_log_ms
            .store(now.max(1), std::sync::atomic::Ordering::Relaxed);
        let detail = match outcome {
            Outcome::Failed(_, detail) => detail.as_str(),
            _ => "",
        };
        tracing::warn!(upstream, name = %host, result = outcome.label(), detail, "upstream name lookup failed: keeping its last good addresses");
    }

    /// Re-resolves the names that are due. Returns the upstreams whose address sets
    /// changed, and when the next name is due.
    pub async fn refresh(&self, config: &Config) -> (Vec<String>, Instant) {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        let due: Vec<(usize, (String, String))> = {
            let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            // A name the map does not have (forgotten while a reload raced this refresh)
            // is due at once.
            let mut due: Vec<(usize, (String, String))> = Vec::new();
            for (i, u, h) in names_of(config) {
                let key = (u.to_string(), h);
                if names.get(&key).is_none_or(|s| s.due <= now)
                    && !due.iter().any(|(_, k)| *k == key)
                {
                    due.push((i, key));
                }
            }
            // At least once a second: a reload may add names due sooner than any known.
            if let Some(first) = names.values().map(|s| s.due).min() {
                next = first.clamp(now + Duration::from_millis(100), next);
            }
            due
        };
        if due.is_empty() {
            return (Vec::new(), next);
        }
        let resolver = match self.resolver(&config.resolver) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the resolver: upstream names keep their addresses");
                return (Vec::new(), now + Duration::from_secs(5));
            }
        };
        let keys: Vec<(String, String)> = due.iter().map(|(_, k)| k.clone()).collect();
        let outcomes = self.lookup_all(&resolver, &keys).await;
        let mut changed = Vec::new();
        for ((i, key), outcome) in due.into_iter().zip(outcomes) {
            let up = config.upstreams[i].get_ref();
            let now = Instant::now();
            let mut state = self.state(&key).unwrap_or(NameState {
                addrs: Vec::new(),
                due: now,
                missing_since: None,
            });
            let before = state.addrs.clone();
            match outcome {
                Outcome::Found(addrs, ttl) => {
                    state.addrs = addrs;
                    state.missing_since = None;
                    state.due = now + ttl.clamp(up.resolve_min.0, up.resolve_max.0);
                }
                Outcome::Missing(_) if state.addrs.is_empty() => {
                    state.due = now + up.resolve_min.0;
                }
                Outcome::Missing(what) => {
                    let since = *state.missing_since.get_or_insert(now);
                    if now.duration_since(since) >= up.nxdomain_grace.0 {
                        tracing::warn!(upstream = %key.0, name = %key.1, result = what, grace = ?up.nxdomain_grace.0, "upstream name is gone past its grace period: its addresses are dropped");
                        state.addrs.clear();
                        state.missing_since = None;
                    }
                    // Asked again within the grace, so a name back in time is kept.
                    let left = (since + up.nxdomain_grace.0).saturating_duration_since(now);
                    state.due = now + up.resolve_min.0.min(left.max(Duration::from_millis(100)));
                }
                ref failed @ Outcome::Failed(..) => {
                    self.log_failure(&key.0, &key.1, failed);
                    state.due = now + up.resolve_min.0;
                }
            }
            if state.addrs != before && !changed.contains(&key.0) {
                changed.push(key.0.clone());
            }
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, state);
        }
        (changed, next)
    }

    /// The current addresses of the names of `upstream`.
    pub fn resolved(&self, upstream: &str) -> Resolved {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((u, _), _)| u == upstream)
            .map(|((_, host), state)| (host.clone(), state.addrs.clone()))
            .collect()
    }

    /// Lines of `gateway_upstream_dns_resolutions_total`.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP gateway_upstream_dns_resolutions_total Lookups of upstream server names, by result (ok, nxdomain, nodata, timeout, servfail, error).\n# TYPE gateway_upstream_dns_resolutions_total counter"
        );
        for ((upstream, result), n) in results.iter() {
            let _ = writeln!(
                out,
                "gateway_upstream_dns_resolutions_total{{upstream=\"{}\",result=\"{result}\"}} {n}",
                upstream.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_are_never_servers_are_refused_in_any_form() {
        for bad in [
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "224.0.0.1",
            "::ffff:224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "0.1.2.3",
            "240.0.0.1",
            "169.254.169.254",
            "fe80::1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(!usable(ip.to_canonical()), "{bad}");
        }
        for good in [
            "10.0.0.1",
            "127.0.0.1",
            "::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = good.parse().unwrap();
            assert!(usable(ip.to_canonical()), "{good}");
        }
    }

    #[test]
    fn one_family_timing_out_is_an_outage_not_a_missing_name() {
        use Outcome::*;
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let t = Duration::from_secs(30);
        let timeout = || Failed("timeout", String::new());
        // A timed out, AAAA empty: an outage (the last good set is kept), never "nodata".
        assert!(matches!(
            combine(timeout(), Missing("nodata"), &[v4]),
            Failed("timeout", _)
        ));
        // Both answered: the union.
        match combine(Found(vec![v4], t), Found(vec![v6], t), &[]) {
            Found(a, _) => assert_eq!(a, vec![v4, v6]),
            other => panic!("{other:?}"),
        }
        // AAAA found, A timed out: kept as an outage when the name had IPv4 addresses.
        assert!(matches!(
            combine(timeout(), Found(vec![v6], t), &[v4]),
            Failed(..)
        ));
        assert!(matches!(
            combine(timeout(), Found(vec![v6], t), &[v6]),
            Found(..)
        ));
        assert!(matches!(
            combine(Missing("nxdomain"), Missing("nodata"), &[]),
            Missing("nxdomain")
        ));
    }
}
