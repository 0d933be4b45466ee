//! Per-client-IP limits enforced in user space: the `[limits]` table at accept and per
//! request.
//!
//! - [`ConnLimiter`], one per process (cheap `Clone`, shared by every worker), is asked
//!   once per accepted connection ([`ConnLimiter::on_accept`]) and told of the close when
//!   the returned [`ConnTicket`] drops. It applies `deny`/`allow`, `conn_rate`/`conn_burst`
//!   and `max_conns_per_ip`. With the XDP program attached, `conn_rate` is charged here
//!   only for connections no program charged (an [`XdpLedger`] says which): a connection
//!   that came in on an interface without the program, or a SYN the program let pass
//!   untracked during a flood of new sources, is still rate limited. It always
//!   keeps the per-IP count of open connections: that count is what feeds the XDP cap —
//!   an address reaching `max_conns_per_ip` is marked through a [`CapSink`] and its next
//!   SYNs are dropped in the kernel; only completed handshakes count, so spoofed SYNs can
//!   never use up a real address's connections.
//! - [`RequestLimiter`], one per worker (no locks, `&mut self`), applies `request_rate` per
//!   request like nginx `limit_req` with `nodelay`: over the rate → 429 with `Retry-After`.
//!   Each worker enforces `rate / workers` (and `burst / workers`, at least 1), which is
//!   exact when a client's connections spread evenly over workers (SO_REUSEPORT hashes
//!   them) and stricter for a client with a single keep-alive connection. Chosen for a
//!   lock-free hot path; see `docs/design/xdp-guard.md`.
//!
//! Per-IP means per source key ([`source_key`]): an IPv4 address, or an IPv6 address
//! masked to `[limits] ipv6_prefix` (default /64, the usual end-site assignment, so one
//! subscriber is one client, not 2^64), as the XDP program keys its maps. `deny`/`allow`
//! match the full address.
//!
//! Precedence of the lists, same as the XDP program: the longest matching prefix of
//! `deny` and `allow` wins, a tie goes to `deny`; an allowed address is exempt from every
//! limit. Memory is bounded: per-IP state exists only for open connections and recently
//! active buckets, and is swept when the tables grow (full buckets carry no information).
//!
//! Rejections carry `limit` and `enforcer` labels for
//! `gateway_limit_rejections_total{limit,enforcer}`; the caller counts them.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::LimitsConfig;

/// `limit` label: the source is in a denied network.
pub(crate) const LIMIT_DENY: &str = "deny";
/// `limit` label: over `conn_rate`/`conn_burst`.
pub const LIMIT_CONN_RATE: &str = "conn_rate";
/// `limit` label: at `max_conns_per_ip`.
pub(crate) const LIMIT_MAX_CONNS: &str = "max_conns_per_ip";
/// `limit` label: over `request_rate`/`request_burst`.
pub(crate) const LIMIT_REQUEST_RATE: &str = "request_rate";
/// `limit` label: the XDP global backstop on new sources (no config key; see
/// `crate::xdp::GuardOptions`). No longer produced: over the backstop a new source passes
/// untracked and is charged at accept.
pub(crate) const LIMIT_NEW_SOURCE_RATE: &str = "new_source_rate";
/// `enforcer` label: dropped by the XDP program.
pub(crate) const ENFORCER_XDP: &str = "xdp";
/// `enforcer` label: refused in user space.
pub(crate) const ENFORCER_USERSPACE: &str = "userspace";

/// Shards of the connection table: accepts from different workers rarely contend.
const SHARDS: usize = 64;
/// `conn_rate` buckets kept per shard before a sweep (65536 addresses in all).
const RATE_ENTRIES_PER_SHARD: usize = 1024;
/// Request-rate states one worker keeps before it stops tracking new addresses.
pub(crate) const MAX_REQUEST_SOURCES: usize = 65_536;

/// Why a connection or request was refused: the two labels of
/// `gateway_limit_rejections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub limit: &'static str,
    pub enforcer: &'static str,
}

/// Where [`ConnLimiter`] marks addresses at their connection cap: the XDP program's
/// `CAPPED_*` maps (`crate::xdp::CapMarker`), or a test double.
pub trait CapSink: Send + Sync {
    /// `Some(count)`: `ip` has reached its cap with `count` connections; `None`: it is
    /// below its cap again. Called with the address's shard locked, in order.
    fn set_capped(&self, ip: IpAddr, count: Option<u32>);
}

/// What the XDP program recorded for one source key in its rate map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpCharge {
    /// SYNs the program charged to the key's bucket since the entry was created.
    pub syns: u64,
    /// When it charged the last one, CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub(crate) charged_ns: u64,
}

/// Read access to the program's per-source charges (`crate::xdp::ChargeLedger`, or a
/// test double): how user space tells a connection the program charged from one it did
/// not see (another interface, `lo`, a tunnel) or let pass untracked.
pub trait XdpLedger: Send + Sync {
    /// The record for `key` (a [`source_key`]), if the program has one.
    fn charged(&self, key: IpAddr) -> Option<XdpCharge>;

    /// Now, on the clock of [`XdpCharge::charged_ns`].
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// How long after the program charged a source's SYN a connection from that source may be
/// credited with it. Covers SYN retransmissions and a busy accept queue; older charges
/// are not credited, so a surplus of charged SYNs cannot be saved up.
pub(crate) const XDP_CHARGE_WINDOW: Duration = Duration::from_secs(10);

/// Which limits the XDP program enforces already, so user space does not charge them twice.
#[derive(Clone, Default)]
pub struct Enforcement {
    /// The program is attached and charges `conn_rate` per SYN: at accept, a connection
    /// is charged in user space only when the ledger shows no unclaimed charge for its
    /// source within [`XDP_CHARGE_WINDOW`].
    pub xdp: Option<Arc<dyn XdpLedger>>,
}

impl std::fmt::Debug for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcement")
            .field("xdp", &self.xdp.is_some())
            .finish()
    }
}

/// Default of `[limits] ipv6_prefix`; config owns it (config sits below policy).
pub(crate) use crate::config::DEFAULT_IPV6_PREFIX;

/// The per-IP key of `ip`: an IPv4 (or IPv4-mapped) address as is, an IPv6 address with
/// all but its first `v6_prefix` bits cleared.
pub fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from_bits(mask6(ip.to_bits(), v6_prefix.min(128)))),
        v4 => v4,
    }
}

/// Networks grouped by prefix length, longest first: a longest-prefix match is at most
/// one hash lookup per distinct length present (a handful in practice), whatever the
/// number of networks.
#[derive(Clone, Debug, Default)]
struct PrefixSet {
    v4: Vec<(u8, HashSet<u32>)>,
    v6: Vec<(u8, HashSet<u128>)>,
}

fn mask4(addr: u32, len: u8) -> u32 {
    addr & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(addr: u128, len: u8) -> u128 {
    addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl PrefixSet {
    fn new(nets: &[IpNet]) -> PrefixSet {
        let mut set = PrefixSet::default();
        for net in nets {
            let len = net.prefix_len();
            match net {
                IpNet::V4(n) => {
                    let key = mask4(n.addr().to_bits(), len);
                    match set.v4.iter_mut().find(|(l, _)| *l == len) {
                        Some((_, keys)) => drop(keys.insert(key)),
                        None => set.v4.push((len, HashSet::from([key]))),
                    }
                }
                IpNet::V6(n) => {
                    let key = mask6(n.addr().to_bits(), len);
                    match set.v6.iter_mut().find(|(l, _)| *l == len) {
                        Some((_, keys)) => drop(keys.insert(key)),
                        None => set.v6.push((len, HashSet::from([key]))),
                    }
                }
            }
        }
        set.v4
            .sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
        set.v6
            .sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
        set
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The prefix length of the longest network containing `ip`.
    fn longest(&self, ip: IpAddr) -> Option<u8> {
        match ip {
            IpAddr::V4(ip) => {
                let bits = ip.to_bits();
                self.v4
                    .iter()
                    .find(|(len, keys)| keys.contains(&mask4(bits, *len)))
                    .map(|(len, _)| *len)
            }
            IpAddr::V6(ip) => {
                let bits = ip.to_bits();
                self.v6
                    .iter()
                    .find(|(len, keys)| keys.contains(&mask6(bits, *len)))
                    .map(|(len, _)| *len)
            }
        }
    }
}

/// Deny/allow lists with longest-prefix precedence.
#[derive(Clone, Debug, Default)]
struct NetLists {
    deny: PrefixSet,
    allow: PrefixSet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listed {
    Denied,
    Allowed,
    Neither,
}

impl NetLists {
    fn new(limits: &LimitsConfig) -> NetLists {
        NetLists {
            deny: PrefixSet::new(&limits.deny),
            allow: PrefixSet::new(&limits.allow),
        }
    }

    fn classify(&self, ip: IpAddr) -> Listed {
        match (self.deny.longest(ip), self.allow.longest(ip)) {
            (Some(d), Some(a)) if a > d => Listed::Allowed,
            (Some(_), _) => Listed::Denied,
            (None, Some(_)) => Listed::Allowed,
            (None, None) => Listed::Neither,
        }
    }
}

/// A token bucket's parameters, in tokens and seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct BucketLimit {
    rate: f64,
    burst: f64,
}

/// A token bucket in user space: `tokens` as of `last`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// XDP charges ([`XdpCharge::syns`]) already credited to connections of this key.
    xdp_seen: u64,
}

impl Bucket {
    fn full(limit: BucketLimit, now: Instant) -> Bucket {
        Bucket {
            tokens: limit.burst,
            last: now,
            xdp_seen: 0,
        }
    }

    /// Whether the program charged this connection: an XDP charge not yet credited, and
    /// recent. Claims it.
    fn claim_xdp_charge(&mut self, charge: XdpCharge, now_ns: u64) -> bool {
        if charge.syns < self.xdp_seen {
            // The kernel's entry is younger than ours (LRU eviction, restart).
            self.xdp_seen = charge.syns.saturating_sub(1);
        }
        let recent =
            now_ns.saturating_sub(charge.charged_ns) <= XDP_CHARGE_WINDOW.as_nanos() as u64;
        if recent && charge.syns > self.xdp_seen {
            self.xdp_seen += 1;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, limit: BucketLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(limit.burst);
        self.last = now;
    }

    fn take(&mut self, limit: BucketLimit, now: Instant) -> bool {
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, limit: BucketLimit, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(limit, now);
        copy.tokens >= limit.burst
    }
}

/// The user-space view of one `[limits]` table.
#[derive(Clone, Debug)]
struct ConnPolicy {
    lists: NetLists,
    conn_rate: Option<BucketLimit>,
    max_conns: Option<u32>,
    v6_prefix: u8,
    enforcement: Enforcement,
}

impl ConnPolicy {
    fn new(limits: &LimitsConfig, enforcement: Enforcement) -> ConnPolicy {
        ConnPolicy {
            lists: NetLists::new(limits),
            conn_rate: limits.conn_rate.as_ref().map(|rate| BucketLimit {
                rate: rate.per_second,
                burst: f64::from(
                    limits
                        .conn_burst
                        .unwrap_or_else(|| rate.per_second.ceil().max(1.0) as u32)
                        .max(1),
                ),
            }),
            max_conns: limits.max_conns_per_ip,
            v6_prefix: limits.ipv6_prefix,
            enforcement,
        }
    }
}

/// Per-source-key state in one shard.
#[derive(Default)]
struct Shard {
    /// Open connections per counted key (entries at zero are removed).
    conns: HashMap<IpAddr, ConnCount>,
    /// `conn_rate` buckets (with the XDP charges they were credited), when it is set.
    rate: HashMap<IpAddr, Bucket>,
}

#[derive(Clone, Copy, Debug, Default)]
struct ConnCount {
    open: u32,
    /// Whether the address is marked at its cap in the sink.
    marked: bool,
}

struct Inner {
    policy: RwLock<Arc<ConnPolicy>>,
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    sink: Option<Arc<dyn CapSink>>,
}

impl Inner {
    fn shard(&self, ip: &IpAddr) -> &Mutex<Shard> {
        let index = self.hasher.hash_one(ip) as usize % self.shards.len();
        &self.shards[index]
    }

    fn policy(&self) -> Arc<ConnPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Brings `ip`'s mark in line with its count under `max`.
    fn sync_mark(&self, ip: IpAddr, count: &mut ConnCount, max: Option<u32>) {
        let Some(sink) = &self.sink else {
            return;
        };
        let at_cap = max.is_some_and(|max| count.open >= max);
        if at_cap != count.marked {
            sink.set_capped(ip, at_cap.then_some(count.open));
            count.marked = at_cap;
        }
    }

    fn release(&self, ip: IpAddr) {
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        // Read under the shard lock: `replace_policy` swaps the policy before it walks the
        // shards, so a mark set here can never be one a concurrent reload misses.
        let max = self.policy().max_conns;
        let Some(count) = shard.conns.get_mut(&ip) else {
            return;
        };
        count.open = count.open.saturating_sub(1);
        self.sync_mark(ip, count, max);
        if count.open == 0 && !count.marked {
            shard.conns.remove(&ip);
        }
    }
}

/// Connection-level limits for the whole process. `Clone` is an `Arc` clone.
#[derive(Clone)]
pub struct ConnLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConnLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLimiter")
            .field("policy", &self.inner.policy())
            .finish_non_exhaustive()
    }
}

/// One admitted connection. Dropping it (at connection close) gives the slot back.
#[must_use = "dropping the ticket closes the connection's slot at once"]
pub struct ConnTicket {
    /// `None` for a connection that was not counted (allowed address).
    limiter: Option<Arc<Inner>>,
    /// The source key the connection is counted under.
    ip: IpAddr,
}

impl std::fmt::Debug for ConnTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTicket")
            .field("ip", &self.ip)
            .field("counted", &self.limiter.is_some())
            .finish()
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        if let Some(inner) = self.limiter.take() {
            inner.release(self.ip);
        }
    }
}

impl ConnLimiter {
    /// Whether the current `deny` list (and no more specific `allow`) covers `ip`: for
    /// connections accepted before a reload added it.
    pub fn denies(&self, ip: IpAddr) -> bool {
        self.inner.policy().lists.classify(ip.to_canonical()) == Listed::Denied
    }

    /// A limiter for `limits`. `sink` receives the cap marks (pass
    /// `XdpGuard::cap_marker()` when the program is attached, else `None`).
    pub fn new(
        limits: &LimitsConfig,
        enforcement: Enforcement,
        sink: Option<Arc<dyn CapSink>>,
    ) -> ConnLimiter {
        ConnLimiter {
            inner: Arc::new(Inner {
                policy: RwLock::new(Arc::new(ConnPolicy::new(limits, enforcement))),
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                sink,
            }),
        }
    }

    /// Reload: new limits for new connections, at once. Open connections stay counted;
    /// every mark is re-evaluated against the new `max_conns_per_ip` (an address over a
    /// lowered cap keeps its connections but gets no new one until below it). User-space
    /// rate buckets are kept (they clamp to a new burst on their next refill).
    pub fn apply(&self, limits: &LimitsConfig) {
        let enforcement = self.inner.policy().enforcement.clone();
        self.replace_policy(ConnPolicy::new(limits, enforcement));
    }

    fn replace_policy(&self, policy: ConnPolicy) {
        let max = policy.max_conns;
        let drop_rate_state = policy.conn_rate.is_none();
        *self.inner.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        for shard in &self.inner.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let shard = &mut *shard;
            for (ip, count) in shard.conns.iter_mut() {
                self.inner.sync_mark(*ip, count, max);
            }
            shard
                .conns
                .retain(|_, count| count.open > 0 || count.marked);
            if drop_rate_state {
                shard.rate.clear();
            }
        }
    }

    /// Decides on a connection just accepted from `ip` (the peer address). `Ok`: serve
    /// it and keep the ticket until the connection closes. `Err`: close it at once and
    /// count the rejection. Counted under `ip`'s [`source_key`].
    pub fn on_accept(&self, ip: IpAddr) -> Result<ConnTicket, Rejection> {
        self.on_accept_at(ip, Instant::now())
    }

    /// [`on_accept`](Self::on_accept) at a given time (tests).
    pub(crate) fn on_accept_at(&self, ip: IpAddr, now: Instant) -> Result<ConnTicket, Rejection> {
        let ip = ip.to_canonical();
        // The prefix only changes on reload; a connection racing one is keyed either way.
        let early = self.inner.policy();
        let key = source_key(ip, early.v6_prefix);
        // What the program recorded for this key: a map lookup (a syscall), so done before
        // the shard lock is taken.
        let charge = match (&early.conn_rate, &early.enforcement.xdp) {
            (Some(_), Some(ledger)) => ledger.charged(key).map(|charge| (charge, ledger.now_ns())),
            _ => None,
        };
        drop(early);
        let mut shard = self
            .inner
            .shard(&key)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Under the shard lock, for the same reason as in `release`.
        let policy = self.inner.policy();
        let reject = |limit| {
            Err(Rejection {
                limit,
                enforcer: ENFORCER_USERSPACE,
            })
        };
        match policy.lists.classify(ip) {
            Listed::Denied => return reject(LIMIT_DENY),
            Listed::Allowed => {
                return Ok(ConnTicket {
                    limiter: None,
                    ip: key,
                })
            }
            Listed::Neither => {}
        }
        let ip = key;
        let open = shard.conns.get(&ip).map_or(0, |c| c.open);
        if policy.max_conns.is_some_and(|max| open >= max) {
            return reject(LIMIT_MAX_CONNS);
        }
        if let Some(limit) = policy.conn_rate {
            if !shard.rate.contains_key(&ip) && shard.rate.len() >= RATE_ENTRIES_PER_SHARD {
                // Full buckets say nothing a missing entry does not; if none is full,
                // forget an arbitrary one (it restarts full: the bound wins over accuracy).
                shard.rate.retain(|_, bucket| !bucket.is_full(limit, now));
                if shard.rate.len() >= RATE_ENTRIES_PER_SHARD {
                    if let Some(victim) = shard.rate.keys().next().copied() {
                        shard.rate.remove(&victim);
                    }
                }
            }
            let bucket = shard.rate.entry(ip).or_insert_with(|| Bucket {
                // New here: at most the program's latest charge can be this connection's.
                xdp_seen: charge.map_or(0, |(c, _)| c.syns.saturating_sub(1)),
                ..Bucket::full(limit, now)
            });
            let charged_by_xdp =
                charge.is_some_and(|(charge, now_ns)| bucket.claim_xdp_charge(charge, now_ns));
            if !charged_by_xdp && !bucket.take(limit, now) {
                return reject(LIMIT_CONN_RATE);
            }
        }
        let count = shard.conns.entry(ip).or_default();
        count.open += 1;
        self.inner.sync_mark(ip, count, policy.max_conns);
        Ok(ConnTicket {
            limiter: Some(self.inner.clone()),
            ip,
        })
    }

    /// Counts one more descriptor a client at `ip` holds beyond its connection (an HTTP/2
    /// stream's upstream socket) against `max_conns_per_ip`, as a connection: the ticket
    /// gives it back. Unlike [`on_accept`](Self::on_accept) it takes nothing from the
    /// connection rate, which is about accepts. `Err` (the cap): refuse the stream.
    pub fn on_upstream_socket(&self, ip: IpAddr) -> Result<ConnTicket, Rejection> {
        let ip = ip.to_canonical();
        let key = source_key(ip, self.inner.policy().v6_prefix);
        let mut shard = self
            .inner
            .shard(&key)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let policy = self.inner.policy();
        if policy.lists.classify(ip) == Listed::Allowed {
            return Ok(ConnTicket {
                limiter: None,
                ip: key,
            });
        }
        let count = shard.conns.entry(key).or_default();
        if policy.max_conns.is_some_and(|max| count.open >= max) {
            return Err(Rejection {
                limit: LIMIT_MAX_CONNS,
                enforcer: ENFORCER_USERSPACE,
            });
        }
        count.open += 1;
        self.inner.sync_mark(key, count, policy.max_conns);
        Ok(ConnTicket {
            limiter: Some(self.inner.clone()),
            ip: key,
        })
    }

    /// Open connections counted for `ip`'s source key.
    pub fn open_connections(&self, ip: IpAddr) -> u32 {
        let ip = source_key(ip, self.inner.policy().v6_prefix);
        let shard = self
            .inner
            .shard(&ip)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        shard.conns.get(&ip).map_or(0, |c| c.open)
    }

    /// `(addresses with open connections, user-space rate buckets)`: the limiter's memory.
    pub fn tracked(&self) -> (usize, usize) {
        self.inner
            .shards
            .iter()
            .fold((0, 0), |(conns, rate), shard| {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                (conns + shard.conns.len(), rate + shard.rate.len())
            })
    }
}

/// Per-worker `request_rate` limiter (GCRA, the token bucket in one timestamp per
/// address). Owned by one worker; no locks.
#[derive(Debug)]
pub struct RequestLimiter {
    workers: u32,
    lists: NetLists,
    v6_prefix: u8,
    /// `None` when `request_rate` is unset.
    gcra: Option<Gcra>,
    /// Theoretical arrival time per address, in ns since `epoch`.
    tat: HashMap<IpAddr, u64>,
    epoch: Instant,
    /// Table size that triggers the next sweep.
    sweep_at: usize,
    /// Snapshot generation the limits came from ([`check_with`](Self::check_with)).
    generation: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gcra {
    /// Nanoseconds per request at this worker's share of the rate.
    interval_ns: u64,
    /// How far ahead of now the arrival time may run: `(burst - 1) * interval`.
    tolerance_ns: u64,
}

impl RequestLimiter {
    /// A limiter for one of `workers` workers (each gets `rate / workers`).
    pub fn new(limits: &LimitsConfig, workers: usize) -> RequestLimiter {
        let mut limiter = RequestLimiter {
            workers: workers.clamp(1, u32::MAX as usize) as u32,
            lists: NetLists::default(),
            v6_prefix: DEFAULT_IPV6_PREFIX,
            gcra: None,
            tat: HashMap::new(),
            epoch: Instant::now(),
            sweep_at: 1024,
            generation: None,
        };
        limiter.configure(limits);
        limiter
    }

    /// New limits (reload). States are kept; they are timestamps, valid under any rate.
    pub(crate) fn configure(&mut self, limits: &LimitsConfig) {
        self.lists = NetLists::new(limits);
        self.v6_prefix = limits.ipv6_prefix;
        self.gcra = limits.request_rate.as_ref().and_then(|rate| {
            let workers = f64::from(self.workers);
            let per_worker = rate.per_second / workers;
            if per_worker <= 0.0 || !per_worker.is_finite() {
                return None;
            }
            // Unset burst: one second's worth, like the token buckets of conn_rate.
            let burst = limits
                .request_burst
                .map_or_else(|| rate.per_second.ceil(), f64::from);
            let burst = (burst / workers).ceil().max(1.0);
            let interval_ns = (1e9 / per_worker).round().max(1.0) as u64;
            Some(Gcra {
                interval_ns,
                tolerance_ns: interval_ns.saturating_mul(burst as u64 - 1),
            })
        });
        if self.gcra.is_none() {
            self.tat = HashMap::new();
        }
    }

    /// [`check`](Self::check) after re-reading `limits` if `generation` (the config
    /// snapshot's) changed since the last call: one integer compare per request otherwise.
    pub(crate) fn check_with(
        &mut self,
        generation: u64,
        limits: &LimitsConfig,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(), u64> {
        if self.generation != Some(generation) {
            self.configure(limits);
            self.generation = Some(generation);
        }
        self.check(ip, now)
    }

    /// One request from `ip` (the client address; limited per [`source_key`]) at `now`. `Err(retry_after_secs)`
    /// (at least 1): answer 429 with `Retry-After: retry_after_secs`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let Some(gcra) = self.gcra else {
            return Ok(());
        };
        let ip = ip.to_canonical();
        if !self.lists.allow.is_empty() && self.lists.classify(ip) == Listed::Allowed {
            return Ok(());
        }
        let ip = source_key(ip, self.v6_prefix);
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let tat = match self.tat.get(&ip) {
            Some(&tat) => tat.max(now_ns),
            None => {
                if self.tat.len() >= self.sweep_at {
                    self.sweep(now_ns);
                }
                if self.tat.len() >= MAX_REQUEST_SOURCES {
                    // Every tracked address is active: admit untracked rather than grow
                    // (or evict someone who is being limited).
                    return Ok(());
                }
                now_ns
            }
        };
        let ahead = tat - now_ns;
        if ahead > gcra.tolerance_ns {
            let wait = Duration::from_nanos(ahead - gcra.tolerance_ns);
            return Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        }
        self.tat.insert(ip, tat + gcra.interval_ns);
        Ok(())
    }

    /// The key `ip` is limited under ([`source_key`]), or `None` when `allow` exempts it:
    /// what the fleet-wide limit counts ([`super::global_limit`]).
    pub(crate) fn limited_key(&self, ip: IpAddr) -> Option<IpAddr> {
        let ip = ip.to_canonical();
        if !self.lists.allow.is_empty() && self.lists.classify(ip) == Listed::Allowed {
            return None;
        }
        Some(source_key(ip, self.v6_prefix))
    }

    /// Forgets addresses whose arrival time has passed (their state equals no state).
    fn sweep(&mut self, now_ns: u64) {
        self.tat.retain(|_, tat| *tat > now_ns);
        self.sweep_at = (self.tat.len() * 2).clamp(1024, MAX_REQUEST_SOURCES);
    }

    /// Addresses with state in this worker.
    pub fn tracked(&self) -> usize {
        self.tat.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }

    fn v4(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, d))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(IpAddr, Option<u32>)>>);

    impl CapSink for Recorder {
        fn set_capped(&self, ip: IpAddr, count: Option<u32>) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((ip, count));
        }
    }

    #[test]
    fn no_limits_admit_everything() {
        let limiter = ConnLimiter::new(&limits(), Enforcement::default(), None);
        let tickets: Vec<_> = (0..100)
            .map(|_| limiter.on_accept(v4(1)).unwrap())
            .collect();
        assert_eq!(limiter.open_connections(v4(1)), 100);
        drop(tickets);
        assert_eq!(limiter.open_connections(v4(1)), 0);
        assert_eq!(limiter.tracked(), (0, 0));
    }

    #[test]
    fn deny_and_allow_use_the_longest_prefix() {
        let mut l = limits();
        l.deny = vec![net("203.0.113.0/24"), net("2001:db8::/32")];
        l.allow = vec![net("203.0.113.128/25")];
        l.max_conns_per_ip = Some(1);
        let limiter = ConnLimiter::new(&l, Enforcement::default(), None);
        let denied = limiter.on_accept(v4(1)).unwrap_err();
        assert_eq!(
            denied,
            Rejection {
                limit: LIMIT_DENY,
                enforcer: ENFORCER_USERSPACE
            }
        );
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(limiter.on_accept(v6).unwrap_err().limit, LIMIT_DENY);
        // Allowed: more specific than the deny, and exempt from the cap.
        let _a = limiter.on_accept(v4(200)).unwrap();
        let _b = limiter.on_accept(v4(200)).unwrap();
        // IPv4-mapped IPv6 is the IPv4 address.
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 9).to_ipv6_mapped());
        assert_eq!(limiter.on_accept(mapped).unwrap_err().limit, LIMIT_DENY);
        // A tie goes to deny.
        l.allow.push(net("203.0.113.0/24"));
        limiter.apply(&l);
        assert_eq!(limiter.on_accept(v4(1)).unwrap_err().limit, LIMIT_DENY);
    }

    #[test]
    fn prefix_sets_find_the_longest_match() {
        let set = PrefixSet::new(&[
            net("0.0.0.0/0"),
            net("203.0.113.0/24"),
            net("203.0.113.64/26"),
            net("203.0.113.77/32"),
            net("2001:db8::/32"),
            net("2001:db8:1:2::/64"),
        ]);
        assert_eq!(set.longest(v4(77)), Some(32));
        assert_eq!(set.longest(v4(78)), Some(26));
        assert_eq!(set.longest(v4(1)), Some(24));
        assert_eq!(set.longest("192.0.2.1".parse().unwrap()), Some(0));
        assert_eq!(set.longest("2001:db8:1:2::9".parse().unwrap()), Some(64));
        assert_eq!(set.longest("2001:db8:1:3::9".parse().unwrap()), Some(32));
        assert_eq!(set.longest("2001:db9::1".parse().unwrap()), None);
        assert!(PrefixSet::new(&[]).is_empty());
    }

    #[test]
    fn upstream_sockets_count_against_the_cap_but_not_the_rate() {
        let mut l = limits();
        l.max_conns_per_ip = Some(3);
        // One connection per 1000 s: a stream socket taking from it would fail at once.
        l.conn_rate = Some(Rate { per_second: 0.001 });
        l.conn_burst = Some(1);
        let limiter = ConnLimiter::new(&l, Enforcement::default(), None);
        let conn = limiter.on_accept(v4(1)).unwrap();
        // The stream sockets of that one connection: two more, then the cap.
        let s1 = limiter.on_upstream_socket(v4(1)).unwrap();
        let _s2 = limiter.on_upstream_socket(v4(1)).unwrap();
        assert_eq!(limiter.open_connections(v4(1)), 3);
        let refused = limiter.on_upstream_socket(v4(1)).unwrap_err();
        assert_eq!(refused.limit, LIMIT_MAX_CONNS);
        // A new connection is refused at the cap too: one IP holds no more descriptors
        // through streams than through connections.
        assert_eq!(limiter.on_accept(v4(1)).unwrap_err().limit, LIMIT_MAX_CONNS);
        drop(s1);
        let _s3 = limiter.on_upstream_socket(v4(1)).unwrap();
        drop(conn);
        assert_eq!(limiter.open_connections(v4(1)), 2);
    }

    #[test]
    fn cap_counts_open_connections_and_marks_the_sink() {
        let mut l = limits();
        l.max_conns_per_ip = Some(2);
        let sink = Arc::new(Recorder::default());
        let limiter = ConnLimiter::new(&l, Enforcement::default(), Some(sink.clone()));
        let a = limiter.on_accept(v4(1)).unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        let b = limiter.on_accept(v4(1)).unwrap();
        assert_eq!(*sink.0.lock().unwrap(), vec![(v4(1), Some(2))]);
        assert_eq!(limiter.on_accept(v4(1)).unwrap_err().limit, LIMIT_MAX_CONNS);
        // Another address is unaffected.
        let _c = limiter.on_accept(v4(2)).unwrap();
        drop(a);
        assert_eq!(sink.0.lock().unwrap().last(), Some(&(v4(1), None)));
        let _d = limiter.on_accept(v4(1)).unwrap();
        drop(b);
        // Lowering the cap on reload marks every address at it (shards in any order);
        // raising it unmarks them.
        let marks = |sink: &Recorder| sink.0.lock().unwrap().split_off(0);
        marks(&sink);
        l.max_conns_per_ip = Some(1);
        limiter.apply(&l);
        let mut set = marks(&sink);
        set.sort();
        assert_eq!(set, vec![(v4(1), Some(1)), (v4(2), Some(1))]);
        l.max_conns_per_ip = Some(5);
        limiter.apply(&l);
        let mut set = marks(&sink);
        set.sort();
        assert_eq!(set, vec![(v4(1), None), (v4(2), None)]);
        l.max_conns_per_ip = None;
        limiter.apply(&l);
        assert_eq!(limiter.open_connections(v4(1)), 1);
    }

    #[test]
    fn conn_rate_is_a_token_bucket() {
        let mut l = limits();
        l.conn_rate = Some(Rate { per_second: 10.0 });
        l.conn_burst = Some(3);
        let limiter = ConnLimiter::new(&l, Enforcement::default(), None);
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(limiter.on_accept_at(v4(1), t0).unwrap());
        }
        assert_eq!(
            limiter.on_accept_at(v4(1), t0).unwrap_err().limit,
            LIMIT_CONN_RATE
        );
        // Another address has its own bucket.
        drop(limiter.on_accept_at(v4(2), t0).unwrap());
        // 100 ms refills one token at 10/s.
        let t1 = t0 + Duration::from_millis(100);
        drop(limiter.on_accept_at(v4(1), t1).unwrap());
        assert!(limiter.on_accept_at(v4(1), t1).is_err());
    }

    /// A ledger the test writes: `(key, charge)` pairs, and a settable clock.
    #[derive(Default)]
    struct Ledger {
        charges: Mutex<HashMap<IpAddr, XdpCharge>>,
        now_ns: std::sync::atomic::AtomicU64,
    }

    impl Ledger {
        /// The program charged one more SYN of `key` at `at_ns`.
        fn syn(&self, key: IpAddr, at_ns: u64) {
            let mut charges = self.charges.lock().unwrap();
            let entry = charges.entry(key).or_insert(XdpCharge {
                syns: 0,
                charged_ns: 0,
            });
            entry.syns += 1;
            entry.charged_ns = at_ns;
        }
    }

    impl XdpLedger for Ledger {
        fn charged(&self, key: IpAddr) -> Option<XdpCharge> {
            self.charges.lock().unwrap().get(&key).copied()
        }
        fn now_ns(&self) -> u64 {
            self.now_ns.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[test]
    fn with_xdp_only_connections_no_program_charged_are_charged() {
        let mut l = limits();
        l.conn_rate = Some(Rate { per_second: 0.001 });
        l.conn_burst = Some(2);
        let ledger = Arc::new(Ledger::default());
        let window = XDP_CHARGE_WINDOW.as_nanos() as u64;
        ledger
            .now_ns
            .store(window * 10, std::sync::atomic::Ordering::Relaxed);
        let xdp = ConnLimiter::new(
            &l,
            Enforcement {
                xdp: Some(ledger.clone()),
            },
            None,
        );
        let t0 = Instant::now();
        let now_ns = window * 10;
        // Ten connections whose SYNs the program charged: none costs a user-space token.
        for _ in 0..10 {
            ledger.syn(v4(1), now_ns);
            drop(xdp.on_accept_at(v4(1), t0).unwrap());
        }
        // Connections the program never saw (another interface): the user-space bucket
        // (burst 2) pays, then refuses.
        drop(xdp.on_accept_at(v4(1), t0).unwrap());
        drop(xdp.on_accept_at(v4(1), t0).unwrap());
        assert_eq!(
            xdp.on_accept_at(v4(1), t0).unwrap_err().limit,
            LIMIT_CONN_RATE
        );
        // A source the program never charged (untracked during a flood, or `lo`).
        drop(xdp.on_accept_at(v4(2), t0).unwrap());
        drop(xdp.on_accept_at(v4(2), t0).unwrap());
        assert!(xdp.on_accept_at(v4(2), t0).is_err());
        // An old charge is not credited: saved-up SYNs do not buy connections later.
        ledger.syn(v4(3), now_ns - window - 1);
        ledger.syn(v4(3), now_ns - window - 1);
        drop(xdp.on_accept_at(v4(3), t0).unwrap());
        drop(xdp.on_accept_at(v4(3), t0).unwrap());
        assert!(xdp.on_accept_at(v4(3), t0).is_err());
        // A key first seen here gets at most the latest charge, however many came before.
        for _ in 0..5 {
            ledger.syn(v4(4), now_ns);
        }
        for _ in 0..3 {
            drop(xdp.on_accept_at(v4(4), t0).unwrap());
        }
        assert!(xdp.on_accept_at(v4(4), t0).is_err());
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_prefix() {
        let mut l = limits();
        l.max_conns_per_ip = Some(2);
        l.conn_rate = Some(Rate { per_second: 0.001 });
        l.conn_burst = Some(3);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(
            source_key(a, 64),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(source_key(b, 128), b);
        assert_eq!(source_key(a, 48), "2001:db8:1::".parse::<IpAddr>().unwrap());
        assert_eq!(source_key(v4(1), 64), v4(1));
        let limiter = ConnLimiter::new(&l, Enforcement::default(), None);
        let t0 = Instant::now();
        let _a = limiter.on_accept_at(a, t0).unwrap();
        let _b = limiter.on_accept_at(b, t0).unwrap();
        assert_eq!(limiter.open_connections(a), 2);
        // Same /64: capped together.
        assert_eq!(
            limiter.on_accept_at(b, t0).unwrap_err().limit,
            LIMIT_MAX_CONNS
        );
        let _c = limiter.on_accept_at(other, t0).unwrap();
        // /128 keys each address alone.
        l.ipv6_prefix = 128;
        limiter.apply(&l);
        let _d = limiter
            .on_accept_at("2001:db8:1:2::77".parse().unwrap(), t0)
            .unwrap();

        let mut r = limits();
        r.request_rate = Some(Rate { per_second: 1.0 });
        r.request_burst = Some(1);
        let mut requests = RequestLimiter::new(&r, 1);
        assert_eq!(requests.check(a, t0), Ok(()));
        assert!(requests.check(b, t0).is_err(), "same /64 shares the rate");
        assert_eq!(requests.check(other, t0), Ok(()));
    }

    #[test]
    fn conn_rate_state_is_bounded() {
        let mut l = limits();
        l.conn_rate = Some(Rate { per_second: 1.0 });
        l.conn_burst = Some(2);
        let limiter = ConnLimiter::new(&l, Enforcement::default(), None);
        let now = Instant::now();
        for i in 0..(SHARDS * RATE_ENTRIES_PER_SHARD * 2) as u32 {
            // One /64 each: with the default prefix, addresses of one /64 are one key.
            let ip = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i) << 64));
            drop(limiter.on_accept_at(ip, now).unwrap());
        }
        let (conns, rate) = limiter.tracked();
        assert_eq!(conns, 0);
        assert!(rate <= SHARDS * RATE_ENTRIES_PER_SHARD, "{rate}");
    }

    #[test]
    fn request_rate_gcra_with_retry_after() {
        let mut l = limits();
        l.request_rate = Some(Rate { per_second: 2.0 });
        l.request_burst = Some(4);
        l.allow = vec![net("198.51.100.0/24")];
        // Two workers: each allows 1/s with a burst of 2.
        let mut limiter = RequestLimiter::new(&l, 2);
        let t0 = Instant::now();
        assert_eq!(limiter.check(v4(1), t0), Ok(()));
        assert_eq!(limiter.check(v4(1), t0), Ok(()));
        assert_eq!(limiter.check(v4(1), t0), Err(1));
        assert_eq!(limiter.check(v4(2), t0), Ok(()));
        let allowed = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
        for _ in 0..100 {
            assert_eq!(limiter.check(allowed, t0), Ok(()));
        }
        // One interval later one more request fits.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.check(v4(1), t1), Ok(()));
        assert_eq!(limiter.check(v4(1), t1), Err(1));
        // Slow rates give longer waits.
        l.request_rate = Some(Rate { per_second: 0.1 });
        l.request_burst = Some(1);
        let mut slow = RequestLimiter::new(&l, 1);
        assert_eq!(slow.check(v4(1), t0), Ok(()));
        assert_eq!(slow.check(v4(1), t0), Err(10));
        // Reload through the generation check turns it off.
        l.request_rate = None;
        assert_eq!(slow.check_with(2, &l, v4(1), t0), Ok(()));
        assert_eq!(slow.tracked(), 0);
    }

    #[test]
    fn request_state_is_swept_and_bounded() {
        let mut l = limits();
        l.request_rate = Some(Rate { per_second: 1000.0 });
        let mut limiter = RequestLimiter::new(&l, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_REQUEST_SOURCES as u32 + 10) {
            let ip = IpAddr::V4(Ipv4Addr::from(0xc633_0000 | i));
            assert_eq!(limiter.check(ip, t0), Ok(()));
        }
        assert!(limiter.tracked() <= MAX_REQUEST_SOURCES);
        // A second later every state has expired and the next new address sweeps them.
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..2000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 | (i & 0xff) | (i << 8)));
            assert_eq!(limiter.check(ip, t1), Ok(()));
        }
        assert!(limiter.tracked() < 10_000, "{}", limiter.tracked());
    }
}
