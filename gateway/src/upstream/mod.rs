//! Upstream pools: the servers of each `[[upstream]]`, whether each is up, how one is
//! chosen for a request, and the idle keep-alive connections each worker keeps to them.
//!
//! What is shared across workers is only what must agree: a server's health (atomics,
//! written on failures and by the active checker, read on every pick). Balancer state and
//! idle connections are per worker, with no lock on the request path.

pub mod balance;
pub mod dns;
pub mod health;
pub mod pool;

use crate::config::{Balance, HealthCheckConfig, ServerAddr, UpstreamConfig};
use crate::util::clock;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Health of one upstream server, shared by all workers and carried over reloads while the
/// server stays in its upstream.
#[derive(Debug, Default)]
pub struct ServerState {
    /// Passive health: failures counted in the current `fail_timeout` window.
    fails: AtomicU32,
    fail_window_start_ms: AtomicU64,
    /// Marked down by `max_fails` until this time (ms on the process clock).
    down_until_ms: AtomicU64,
    /// Marked down by the active health checker.
    check_failed: AtomicBool,
}

impl ServerState {
    pub(crate) fn is_up(&self, now_ms: u64) -> bool {
        !self.check_failed.load(Ordering::Relaxed)
            && self.down_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Counts a failure; at `max_fails` within `fail_timeout` the server is down for
    /// `fail_timeout` (nginx semantics). Returns whether this failure marked it down.
    pub(crate) fn record_failure(&self, max_fails: u32, fail_timeout: Duration) -> bool {
        let now = clock::now_ms();
        let window = fail_timeout.as_millis() as u64;
        let start = self.fail_window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) > window {
            self.fail_window_start_ms.store(now, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= max_fails {
            self.fails.store(0, Ordering::Relaxed);
            self.down_until_ms.store(now + window, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub(crate) fn record_success(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn set_check_result(&self, healthy: bool) {
        self.check_failed.store(!healthy, Ordering::Relaxed);
        if healthy {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    /// The address as text, for logs and metric labels.
    pub label: String,
    /// The server as its config entry wrote it (`IP:PORT` or `NAME:PORT`): the `Host` of
    /// an active health check.
    pub(crate) authority: Arc<str>,
    pub weight: u32,
    pub state: Arc<ServerState>,
}

/// One `[[upstream]]` as the data plane uses it. Immutable; replaced on reload.
#[derive(Debug)]
pub struct Upstream {
    /// Unique per process; unchanged when a reload keeps this upstream as it was, so each
    /// worker's idle pool for it carries over.
    pub id: u64,
    pub name: String,
    /// `name` as the label value metrics are keyed by.
    pub(crate) metric_name: Arc<str>,
    pub servers: Vec<Server>,
    pub balance: Balance,
    pub keepalive: usize,
    pub(crate) idle_timeout: Duration,
    /// How long idle connections beyond `keepalive` stay open (`keepalive_linger`).
    pub(crate) keepalive_linger: Duration,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub health_check: Option<HealthCheckConfig>,
    pub(crate) hash_ring: balance::HashRing,
    pub config: UpstreamConfig,
}

static NEXT_UPSTREAM_ID: AtomicU64 = AtomicU64::new(1);

/// The addresses each server name of one upstream resolved to (`upstream/dns.rs`); a
/// name missing here, or with no addresses, contributes no server.
pub type Resolved = HashMap<String, Vec<IpAddr>>;

/// Whether `ip` is one of this host's own addresses (a socket can be bound to it).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

impl Upstream {
    /// Builds an upstream from its config with its names unresolved (no servers from them).
    pub fn build(config: &UpstreamConfig, previous: &[Arc<Upstream>]) -> Arc<Upstream> {
        Self::build_resolved(config, previous, &Resolved::new(), &[])
    }

    /// Builds an upstream from its config and the addresses its names resolved to: each
    /// address is a server of its own (its own health and idle pool), with its entry's
    /// weight. `previous` are the upstreams being replaced: an identical one (same config,
    /// same addresses) is reused as is, and servers that stay keep their health.
    pub fn build_resolved(
        config: &UpstreamConfig,
        previous: &[Arc<Upstream>],
        resolved: &Resolved,
        own: &[SocketAddr],
    ) -> Arc<Upstream> {
        let mut wanted: Vec<(SocketAddr, u32, Arc<str>)> = Vec::new();
        // The config bounds its entries, but a name can stand for any number of records:
        // the same bounds apply to what the names resolved to (the hash ring is built from
        // them), so a huge or hostile answer costs at most what a long config would.
        let mut total_weight: u64 = 0;
        let mut left_out = 0usize;
        // IP literals first: they are the operator's own servers and count in the config's
        // bounds already, so no answer may crowd them out. Then the names' addresses, one
        // from each name in turn, so one huge answer cannot crowd out the other names.
        let mut named: Vec<(Vec<SocketAddr>, u32, Arc<str>)> = Vec::new();
        let mut add = |addr: SocketAddr, weight: u32, authority: &Arc<str>| {
            // Two names for one address: one server, not two pools to it.
            if wanted.iter().any(|(a, ..)| *a == addr) {
                return;
            }
            if wanted.len() >= crate::config::MAX_UPSTREAM_SERVERS
                || total_weight + u64::from(weight) > crate::config::MAX_UPSTREAM_TOTAL_WEIGHT
            {
                left_out += 1;
                return;
            }
            total_weight += u64::from(weight);
            wanted.push((addr, weight, authority.clone()));
        };
        for s in &config.servers {
            let authority: Arc<str> = s.addr().into();
            match ServerAddr::parse(s.addr()).expect("validated server address") {
                ServerAddr::Ip(addr) => add(addr, s.weight(), &authority),
                ServerAddr::Name(host, port) => {
                    let addrs = resolved
                        .get(&host)
                        .into_iter()
                        .flatten()
                        .map(|ip| SocketAddr::new(*ip, port))
                        .filter(|addr| {
                            // A name that points back at the gateway's own listener or
                            // admin port would loop every request through it.
                            let own_socket = own.iter().any(|o| {
                                o.port() == addr.port()
                                    && (o.ip() == addr.ip()
                                        || (o.ip().is_unspecified() && is_local(addr.ip())))
                            });
                            if own_socket {
                                tracing::warn!(upstream = %config.name, name = %host, %addr, "a name resolved to the gateway's own listener: that address is left out");
                            }
                            !own_socket
                        })
                        .collect();
                    named.push((addrs, s.weight(), authority));
                }
            }
        }
        let longest = named.iter().map(|(a, ..)| a.len()).max().unwrap_or(0);
        for i in 0..longest {
            for (addrs, weight, authority) in &named {
                if let Some(addr) = addrs.get(i) {
                    add(*addr, *weight, authority);
                }
            }
        }
        if left_out > 0 {
            tracing::warn!(upstream = %config.name, left_out, "the upstream's names resolved to more servers than it may have (1024, weights adding up to 10000): the rest are left out");
        }
        let same_servers = |u: &Upstream| {
            u.servers.len() == wanted.len()
                && u.servers
                    .iter()
                    .zip(&wanted)
                    .all(|(s, (a, w, _))| s.addr == *a && s.weight == *w)
        };
        if let Some(same) = previous
            .iter()
            .find(|u| &u.config == config && same_servers(u))
        {
            return same.clone();
        }
        let servers: Vec<Server> = wanted
            .into_iter()
            .map(|(addr, weight, authority)| {
                let state = previous
                    .iter()
                    .filter(|u| u.name == config.name)
                    .flat_map(|u| u.servers.iter())
                    .find(|old| old.addr == addr)
                    .map(|old| old.state.clone())
                    .unwrap_or_default();
                Server {
                    addr,
                    // The resolved address, so the access log and metrics name the pod.
                    label: addr.to_string(),
                    authority,
                    weight,
                    state,
                }
            })
            .collect();
        let hash_ring = balance::HashRing::new(&servers);
        Arc::new(Upstream {
            id: NEXT_UPSTREAM_ID.fetch_add(1, Ordering::Relaxed),
            name: config.name.clone(),
            metric_name: config.name.as_str().into(),
            servers,
            balance: config.balance,
            keepalive: config.keepalive,
            idle_timeout: config.keepalive_timeout.0,
            keepalive_linger: config.keepalive_linger.0,
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout.0,
            health_check: config.health_check.clone(),
            hash_ring,
            config: config.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, ServerEntry};

    fn named(servers: &[&str]) -> UpstreamConfig {
        let text = format!(
            "name = \"u\"\nservers = [{}]",
            servers
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        toml::from_str(&text).expect("upstream config")
    }

    #[test]
    fn each_resolved_address_is_a_server_and_those_that_stay_keep_their_health() {
        let config = named(&["svc.test:8080", "10.9.0.1:80"]);
        let mut resolved = Resolved::new();
        resolved.insert("svc.test".into(), vec!["10.0.0.2".parse().unwrap()]);
        let first = Upstream::build_resolved(&config, &[], &resolved, &[]);
        let labels: Vec<&str> = first.servers.iter().map(|s| s.label.as_str()).collect();
        // IP literals first: no answer can crowd them out.
        assert_eq!(labels, ["10.9.0.1:80", "10.0.0.2:8080"]);
        // Same config, same addresses: the very same upstream (pools carry over as is).
        let again = Upstream::build_resolved(&config, std::slice::from_ref(&first), &resolved, &[]);
        assert!(Arc::ptr_eq(&first, &again));
        // One more address: a new upstream whose staying servers share their health.
        first.servers[1].state.set_check_result(false);
        resolved.insert(
            "svc.test".into(),
            vec!["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()],
        );
        let grown = Upstream::build_resolved(&config, std::slice::from_ref(&first), &resolved, &[]);
        assert!(!Arc::ptr_eq(&first, &grown));
        assert_eq!(grown.servers.len(), 3);
        assert!(Arc::ptr_eq(
            &grown.servers[1].state,
            &first.servers[1].state
        ));
        assert!(!grown.servers[1].state.is_up(0));
        assert!(grown.servers[2].state.is_up(0));
    }

    #[test]
    fn no_answer_crowds_out_literals_or_other_names_and_none_points_back_at_the_gateway() {
        let config = named(&["big.test:80", "small.test:80", "10.9.0.1:80"]);
        let mut resolved = Resolved::new();
        let many: Vec<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        resolved.insert("big.test".into(), many);
        resolved.insert("small.test".into(), vec!["10.8.0.1".parse().unwrap()]);
        let up = Upstream::build_resolved(&config, &[], &resolved, &[]);
        assert_eq!(up.servers.len(), crate::config::MAX_UPSTREAM_SERVERS);
        let has = |a: &str| up.servers.iter().any(|s| s.label == a);
        assert!(has("10.9.0.1:80"), "the literal stays");
        assert!(has("10.8.0.1:80"), "the other name stays");
        // A name resolving to the gateway's own listener (here a wildcard one) is left out.
        let mut resolved = Resolved::new();
        resolved.insert(
            "loop.test".into(),
            vec!["127.0.0.1".parse().unwrap(), "10.7.0.1".parse().unwrap()],
        );
        let config = named(&["loop.test:8080"]);
        let own: [SocketAddr; 1] = ["0.0.0.0:8080".parse().unwrap()];
        let up = Upstream::build_resolved(&config, &[], &resolved, &own);
        let labels: Vec<&str> = up.servers.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["10.7.0.1:8080"]);
    }

    #[test]
    fn a_huge_answer_is_bounded_like_a_long_config() {
        let mut config = named(&["svc.test:80"]);
        config.servers = vec![ServerEntry::Weighted(crate::config::WeightedServer {
            addr: "svc.test:80".into(),
            weight: 1,
        })];
        config.fail_timeout = Dur(std::time::Duration::from_secs(10));
        let many: Vec<IpAddr> = (0..3000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let mut resolved = Resolved::new();
        resolved.insert("svc.test".into(), many);
        let up = Upstream::build_resolved(&config, &[], &resolved, &[]);
        assert_eq!(up.servers.len(), crate::config::MAX_UPSTREAM_SERVERS);
    }
}
