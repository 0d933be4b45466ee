//! Choosing a server: smooth weighted round robin (nginx's algorithm), least connections
//! (per worker, weighted), and a consistent hash of the client IP (ketama-style ring with
//! points in proportion to weight, so removing a server moves only its own clients).
//!
//! Every algorithm skips servers that are down and servers already tried for this request.

use super::{Server, Upstream};
use crate::policy::retry::Tried;
use std::net::IpAddr;

/// Points on the ring per unit of weight (nginx `hash ... consistent` uses 160).
const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug, Default)]
pub(crate) struct HashRing {
    points: Vec<(u64, u32)>,
}

impl HashRing {
    pub fn new(servers: &[Server]) -> HashRing {
        let mut points = Vec::new();
        for (index, server) in servers.iter().enumerate() {
            for point in 0..server.weight * POINTS_PER_WEIGHT {
                let key = format!("{}-{point}", server.label);
                points.push((hash_bytes(key.as_bytes()), index as u32));
            }
        }
        points.sort_unstable();
        HashRing { points }
    }

    /// Servers in ring order from the client's point: the first acceptable one wins.
    fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|&(h, _)| h < hash);
        let n = self.points.len();
        (0..n).map(move |i| self.points[(start + i) % n].1 as usize)
    }
}

/// FNV-1a then a splitmix64 finaliser: stable across builds and platforms (the standard
/// hasher promises neither), and well spread for short keys such as IP addresses.
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

pub(crate) fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(&v4.octets()),
            None => hash_bytes(&v6.octets()),
        },
    }
}

/// A worker's balancing state for one upstream.
#[derive(Debug)]
pub(crate) struct Picker {
    current_weight: Vec<i64>,
    /// Requests in flight per server from this worker (least_conn, and the metric).
    pub active: Vec<u32>,
    rotate: usize,
}

impl Picker {
    pub fn new(servers: usize) -> Picker {
        Picker {
            current_weight: vec![0; servers],
            active: vec![0; servers],
            rotate: 0,
        }
    }

    /// Picks a server that is up and not in `tried`. `None` when no such server exists.
    pub fn pick(
        &mut self,
        up: &Upstream,
        client_ip: IpAddr,
        now_ms: u64,
        tried: &Tried,
    ) -> Option<usize> {
        let usable = |i: usize| !tried.contains(i) && up.servers[i].state.is_up(now_ms);
        match up.balance {
            crate::config::Balance::RoundRobin => self.smooth_weighted(up, usable),
            crate::config::Balance::LeastConn => {
                // Lowest active/weight, compared by cross-multiplication; ties rotate so
                // an idle pool is still spread.
                let n = up.servers.len();
                self.rotate = self.rotate.wrapping_add(1);
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (self.rotate + k) % n;
                    if !usable(i) {
                        continue;
                    }
                    best = match best {
                        None => Some(i),
                        Some(b) => {
                            let lhs = self.active[i] as u64 * up.servers[b].weight as u64;
                            let rhs = self.active[b] as u64 * up.servers[i].weight as u64;
                            if lhs < rhs {
                                Some(i)
                            } else {
                                Some(b)
                            }
                        }
                    };
                }
                best
            }
            crate::config::Balance::ClientIpHash => {
                up.hash_ring.walk(hash_ip(client_ip)).find(|&i| usable(i))
            }
        }
    }

    /// nginx's smooth weighted round robin: each pick adds every weight to its server's
    /// current weight, takes the largest, and subtracts the total from it.
    fn smooth_weighted(&mut self, up: &Upstream, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, server) in up.servers.iter().enumerate() {
            if !usable(i) {
                continue;
            }
            self.current_weight[i] += server.weight as i64;
            total += server.weight as i64;
            if best.is_none_or(|b| self.current_weight[i] > self.current_weight[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            self.current_weight[b] -= total;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, ServerEntry, UpstreamConfig};

    fn upstream(balance: Balance, weights: &[u32]) -> std::sync::Arc<Upstream> {
        let config = UpstreamConfig {
            name: "u".into(),
            servers: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| {
                    ServerEntry::Weighted(crate::config::WeightedServer {
                        addr: format!("127.0.0.1:{}", 9000 + i),
                        weight,
                    })
                })
                .collect(),
            balance,
            keepalive: 32,
            keepalive_timeout: crate::config::Dur(std::time::Duration::from_secs(60)),
            keepalive_linger: crate::config::Dur(std::time::Duration::ZERO),
            max_fails: 1,
            fail_timeout: crate::config::Dur(std::time::Duration::from_secs(10)),
            health_check: None,
            resolve_required: true,
            resolve_min: crate::config::Dur(std::time::Duration::from_secs(5)),
            resolve_max: crate::config::Dur(std::time::Duration::from_secs(300)),
            nxdomain_grace: crate::config::Dur(std::time::Duration::from_secs(60)),
        };
        Upstream::build(&config, &[])
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let up = upstream(Balance::RoundRobin, &[1, 2, 1]);
        let mut p = Picker::new(3);
        let ip = "127.0.0.1".parse().unwrap();
        let picks: Vec<usize> = (0..8)
            .map(|_| p.pick(&up, ip, 0, &Tried::default()).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 4);
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
        // Smooth: nginx's sequence for weights 1, 2, 1 interleaves the heavy server.
        assert_eq!(&picks[..4], &[1, 0, 2, 1]);
    }

    #[test]
    fn tried_servers_are_skipped() {
        let up = upstream(Balance::RoundRobin, &[1, 1]);
        let mut p = Picker::new(2);
        let ip = "127.0.0.1".parse().unwrap();
        let mut tried = Tried::default();
        tried.insert(0);
        for _ in 0..4 {
            assert_eq!(p.pick(&up, ip, 0, &tried), Some(1));
        }
        tried.insert(1);
        assert_eq!(p.pick(&up, ip, 0, &tried), None);
    }

    #[test]
    fn client_ip_hash_sticks_and_spreads() {
        let up = upstream(Balance::ClientIpHash, &[1, 1, 1]);
        let mut p = Picker::new(3);
        let mut seen = [0usize; 3];
        for last in 0..=255u8 {
            let ip = IpAddr::from([10, 0, 0, last]);
            let first = p.pick(&up, ip, 0, &Tried::default()).unwrap();
            for _ in 0..3 {
                assert_eq!(p.pick(&up, ip, 0, &Tried::default()), Some(first));
            }
            seen[first] += 1;
        }
        assert!(seen.iter().all(|&n| n > 40), "{seen:?}");
    }

    #[test]
    fn client_ip_hash_moves_only_the_down_servers_clients() {
        let up = upstream(Balance::ClientIpHash, &[1, 1, 1]);
        let mut p = Picker::new(3);
        let before: Vec<usize> = (0..=255u8)
            .map(|l| {
                p.pick(&up, IpAddr::from([10, 0, 1, l]), 0, &Tried::default())
                    .unwrap()
            })
            .collect();
        up.servers[2].state.set_check_result(false);
        for (l, &b) in before.iter().enumerate() {
            let now = p
                .pick(&up, IpAddr::from([10, 0, 1, l as u8]), 0, &Tried::default())
                .unwrap();
            if b != 2 {
                assert_eq!(now, b);
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    /// A headless Service's pods come and go, in whatever order DNS lists them: the ring
    /// is built from the addresses, so only the clients of pods that left or arrived move.
    #[test]
    fn client_ip_hash_moves_only_the_keys_of_addresses_that_moved() {
        let build = |addrs: &[&str]| {
            let mut config = upstream(Balance::ClientIpHash, &[1]).config.clone();
            config.servers = addrs
                .iter()
                .map(|a| ServerEntry::Addr(a.to_string()))
                .collect();
            Upstream::build(&config, &[])
        };
        let before = build(&["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"]);
        // Reordered, .2 gone, .4 new.
        let after = build(&["10.1.0.4:80", "10.1.0.3:80", "10.1.0.1:80"]);
        let pick = |up: &Upstream, ip: IpAddr| {
            let i = Picker::new(up.servers.len())
                .pick(up, ip, 0, &Tried::default())
                .unwrap();
            up.servers[i].addr
        };
        let (mut kept, mut moved) = (0, 0);
        for last in 0..=255u8 {
            let ip = IpAddr::from([192, 0, 2, last]);
            let (was, is) = (pick(&before, ip), pick(&after, ip));
            let was_gone = was.to_string() == "10.1.0.2:80";
            let is_new = is.to_string() == "10.1.0.4:80";
            if was == is {
                kept += 1;
            } else {
                assert!(was_gone || is_new, "{ip} moved from {was} to {is}");
                moved += 1;
            }
        }
        assert!(kept > 100 && moved > 20, "kept {kept}, moved {moved}");
    }

    #[test]
    fn least_conn_prefers_idle() {
        let up = upstream(Balance::LeastConn, &[1, 1]);
        let mut p = Picker::new(2);
        p.active[0] = 3;
        let ip = "127.0.0.1".parse().unwrap();
        for _ in 0..4 {
            assert_eq!(p.pick(&up, ip, 0, &Tried::default()), Some(1));
        }
    }
}
