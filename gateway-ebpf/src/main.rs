//! The gateway's XDP program: the first code every inbound frame meets.
//!
//! It guards TCP to the gateway's listener ports, IPv4 and IPv6, behind up to two VLAN
//! tags, before the kernel spends anything on a handshake (design and non-goals:
//! `docs/design/xdp-guard.md`):
//! 1. a source in a denied network (`DENY_*` LPM tries) loses every packet, unless a more
//!    specific `ALLOW_*` entry covers it; allowed sources are exempt from 2-5. Deny needs
//!    only the source address, so it holds for fragments and unparsable chains too;
//! 2. TCP that cannot be classified (a first fragment without the whole TCP header, a
//!    fragment overlapping it, an IPv6 extension chain beyond the bound) is dropped while a
//!    SYN limit is configured: it fails closed rather than let a SYN escape 3-5;
//! 3. a SYN (without ACK) from a source key user space marked in `CAPPED_*` (at
//!    `max_conns_per_ip` completed connections) is dropped;
//!    A SYN from a source key user space marked in `FLEET_*` (over a fleet-wide limit,
//!    `[limits.global]`) is dropped until the deadline the entry holds;
//! 4. a SYN is charged to its source key's token bucket in the LRU `RATE_*` (`conn_rate`,
//!    `conn_burst`); an empty bucket drops it. The entry counts the charged SYNs, which user
//!    space reads at accept to charge only the connections no program charged;
//! 5. a SYN from a source with no bucket yet takes a token from the per-CPU global
//!    `NEW_SOURCE_BUCKET` first; when that is empty the SYN passes without state (kernel
//!    SYN cookies and the user-space charge at accept cover it) rather than evict known
//!    sources' state or lock new clients out.
//!
//! IPv6 source keys are the address masked to `GuardConfig::v6_prefix_len` (default /64).
//! Everything else passes untouched: other protocols, other ports, frames that are not
//! IPv4/IPv6 (counted `PASS_NOT_IP`), and every frame while `GUARD_CONFIG` lacks
//! `CFG_ENABLED` (user space writes it after loading). Frames too short for a header pass
//! too, counted as `PASS_ERROR` (fail open, visibly). Every verdict bumps one per-CPU
//! counter in `VERDICT_COUNTERS`.
//!
//! Built for `bpfel-unknown-none` by aya-build from `gateway/build.rs`. For the host (where
//! `cargo clippy --workspace --all-targets` compiles it) it is an ordinary binary with an
//! empty `main`; the `cfg_attr`s below follow aya's own test programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// On the host nothing calls the program; the items are still compiled (and linted).
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code))]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use gateway_common::{
    flags::{CFG_CONN_CAP, CFG_CONN_RATE, CFG_ENABLED, CFG_NEW_SOURCE_LIMIT},
    sizes::{CAPPED_ENTRIES, FLEET_ENTRIES, MAX_PORTS, NET_ENTRIES, RATE_ENTRIES},
    verdict::{self, VERDICT_COUNT},
    BucketParams, GuardConfig, NetEntry, SourceRate, TokenBucket, VerdictCounter,
};

// ---- Maps: every map the program uses is declared here, and only here. ----
//
// Names are the identifiers; `gateway_common::names` holds the same strings for user space.
// None is declared pinned: user space decides about pinning (`EbpfLoader::map_pin_path`),
// so the program loads on a node without bpffs mounted.

/// Packets and bytes per verdict, per CPU (no atomics needed on the hot path).
#[map]
static VERDICT_COUNTERS: PerCpuArray<VerdictCounter> =
    PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

/// Limits and protected ports; one entry, rewritten by user space on reload.
#[map]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

#[map]
static DENY_V4: LpmTrie<[u8; 4], NetEntry> = LpmTrie::with_max_entries(NET_ENTRIES, 0);
#[map]
static DENY_V6: LpmTrie<[u8; 16], NetEntry> = LpmTrie::with_max_entries(NET_ENTRIES, 0);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], NetEntry> = LpmTrie::with_max_entries(NET_ENTRIES, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], NetEntry> = LpmTrie::with_max_entries(NET_ENTRIES, 0);

/// Per-source `conn_rate` buckets. LRU: when full, the least recently charged source is
/// forgotten (a forgotten source starts again with a full bucket).
#[map]
static RATE_V4: LruHashMap<[u8; 4], SourceRate> = LruHashMap::with_max_entries(RATE_ENTRIES, 0);
#[map]
static RATE_V6: LruHashMap<[u8; 16], SourceRate> = LruHashMap::with_max_entries(RATE_ENTRIES, 0);

/// Sources at `max_conns_per_ip` completed connections; written by user space only, so a
/// spoofed SYN can never put an address here.
#[map]
static CAPPED_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(CAPPED_ENTRIES, 0);
#[map]
static CAPPED_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(CAPPED_ENTRIES, 0);

/// Sources over a fleet-wide limit: the `bpf_ktime_get_ns` until which their SYNs are
/// dropped. Written by user space only (from Redis's counts of completed requests and
/// connections), so a spoofed SYN can never put an address here. LRU: a full map forgets
/// the oldest verdict rather than refuse a new one.
#[map]
static FLEET_V4: LruHashMap<[u8; 4], u64> = LruHashMap::with_max_entries(FLEET_ENTRIES, 0);
#[map]
static FLEET_V6: LruHashMap<[u8; 16], u64> = LruHashMap::with_max_entries(FLEET_ENTRIES, 0);

/// Global backstop on creating `RATE_*` entries, one bucket per CPU (no shared cache line
/// to fight over during a flood).
#[map]
static NEW_SOURCE_BUCKET: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(1, 0);

// ---- Program ----

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    let verdict = match try_gateway_xdp(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    count(&ctx, verdict);
    if verdict::passes(verdict) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IEEE 802.1Q customer tag and IEEE 802.1ad service tag (QinQ outer tag).
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// VLAN tags parsed (802.1ad outer + 802.1Q inner); a frame with more is not IP to us.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before the chain counts as unclassifiable. Real TCP
/// carries zero or one (RFC 7045 section 1; RFC 9098 reports drops of long chains on the
/// Internet anyway); eight leaves room for every legitimate combination of RFC 8200
/// section 4.1's order while the loop stays small for the verifier.
const MAX_IPV6_EXT: usize = 8;
/// Bytes of IPv6 extension headers walked at most: bounds the offset for the verifier.
const MAX_IPV6_EXT_BYTES: usize = 1024;
/// A non-first fragment with an offset below this (in 8-octet units) overlaps the fixed
/// TCP header, which a legitimate sender never does (RFC 1858 section 3.2: such a
/// fragment could rewrite the flags of a first fragment that was judged harmless).
const MIN_FRAG_UNITS: u16 = (TCP_LEN as u16).div_ceil(8);

/// Decides the verdict (a `gateway_common::verdict` index) for one frame: `Ok` for a
/// judgement, `Err` when the frame could not be judged (the caller fails open and counts
/// it under `PASS_ERROR`).
#[inline(always)]
fn try_gateway_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let Some(cfg) = GUARD_CONFIG.get(0) else {
        return Ok(verdict::PASS);
    };
    if cfg.flags & CFG_ENABLED == 0 {
        // No config yet (just loaded, or user space never wrote one): pass untouched.
        return Ok(verdict::PASS);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|Truncated| verdict::PASS_ERROR)?;
    // SAFETY: `ptr_at` checked the whole header lies within [data, data_end).
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = ETH_LEN;
    // One or two VLAN tags (IEEE 802.1Q-2018 section 9.6): the frame is judged by what
    // they carry, so tagging a SYN does not take it past the guard.
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag: *const VlanHdr = ptr_at(ctx, l3).map_err(|Truncated| verdict::PASS_ERROR)?;
        // SAFETY: bounds checked by `ptr_at`.
        ether_type = u16::from_be(unsafe { (*tag).inner_type });
        l3 += VLAN_LEN;
    }
    match ether_type {
        ETH_P_IPV4 => ipv4(ctx, cfg, l3),
        ETH_P_IPV6 => ipv6(ctx, cfg, l3),
        // Including a third VLAN tag: the stack does not deliver it as IP either.
        _ => Ok(verdict::PASS_NOT_IP),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, cfg: &GuardConfig, l3: usize) -> Result<u32, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).map_err(|Truncated| verdict::PASS_ERROR)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (vihl, total_len, protocol, frag, src) = unsafe {
        (
            (*ip).vihl,
            (*ip).total_len,
            (*ip).protocol,
            (*ip).frag_off,
            (*ip).src,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(verdict::PASS);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(verdict::PASS_ERROR);
    }
    let frag = u16::from_be(frag);
    let frag_units = frag & 0x1fff;
    let more_fragments = frag & 0x2000 != 0;
    let v4 = Family4;
    if frag_units != 0 {
        // A non-first fragment has no TCP header, so no port. It cannot become a segment
        // without its first fragment, which is judged below with a whole TCP header, and
        // Linux discards a datagram with overlapping fragments (net/ipv4/ip_fragment.c,
        // as RFC 5722 asks of IPv6); a fragment that would overlap the TCP header is
        // dropped here anyway. Deny needs only the source, so it applies.
        return Ok(if frag_units < MIN_FRAG_UNITS {
            unclassified(cfg, &v4, &src)
        } else {
            v4.listed(&src).unwrap_or(verdict::PASS)
        });
    }
    // A first fragment must carry the whole fixed TCP header inside the IP datagram (the
    // frame may hold Ethernet padding after it, which must not be read as TCP): the
    // "tiny fragment" attack of RFC 1858 section 3.1 puts the flags in the second one.
    if more_fragments && (u16::from_be(total_len) as usize) < ihl + TCP_LEN {
        return Ok(unclassified(cfg, &v4, &src));
    }
    let (port, tcp_flags) = tcp_port_flags(ctx, l3 + ihl)?;
    if !protected(cfg, port) {
        return Ok(verdict::PASS);
    }
    Ok(judge(cfg, &v4, &src, &src, tcp_flags))
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, cfg: &GuardConfig, l3: usize) -> Result<u32, u32> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).map_err(|Truncated| verdict::PASS_ERROR)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (mut next, payload_len, src) = unsafe { ((*ip).next_header, (*ip).payload_len, (*ip).src) };
    let payload_len = u16::from_be(payload_len) as usize;
    let v6 = Family6;
    let mut ext_len = 0usize;
    let mut first_fragment = false;
    // Walk the extension headers (RFC 8200 section 4), at most MAX_IPV6_EXT of them:
    // bounded and unrolled for the verifier.
    for _ in 0..MAX_IPV6_EXT {
        if next == IPPROTO_TCP {
            break;
        }
        let offset = l3 + IPV6_LEN + ext_len;
        match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6 and the
            // experimental 253/254 (RFC 7045 section 4; RFC 8200 section 4.3): length
            // in 8-octet units, not counting the first 8.
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                let ext: *const Ipv6Ext =
                    ptr_at(ctx, offset).map_err(|Truncated| verdict::PASS_ERROR)?;
                // SAFETY: bounds checked by `ptr_at`.
                let (n, len) = unsafe { ((*ext).next_header, (*ext).len) };
                next = n;
                ext_len += (len as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2 (RFC 4302
            // section 2.2).
            51 => {
                let ext: *const Ipv6Ext =
                    ptr_at(ctx, offset).map_err(|Truncated| verdict::PASS_ERROR)?;
                // SAFETY: bounds checked by `ptr_at`.
                let (n, len) = unsafe { ((*ext).next_header, (*ext).len) };
                next = n;
                ext_len += (len as usize + 2) * 4;
            }
            // Fragment header (RFC 8200 section 4.5): fixed 8 octets.
            44 => {
                let ext: *const Ipv6Frag =
                    ptr_at(ctx, offset).map_err(|Truncated| verdict::PASS_ERROR)?;
                // SAFETY: bounds checked by `ptr_at`.
                let (n, frag) = unsafe { ((*ext).next_header, u16::from_be((*ext).frag_off)) };
                let units = frag >> 3;
                if units != 0 {
                    // As for IPv4: the first fragment is judged whole (RFC 7112 puts the
                    // entire header chain in it), and overlaps are discarded (RFC 5722).
                    return Ok(if n == IPPROTO_TCP && units < MIN_FRAG_UNITS {
                        unclassified(cfg, &v6, &src)
                    } else {
                        v6.listed(&src).unwrap_or(verdict::PASS)
                    });
                }
                // Offset 0 with M set; M clear is an atomic fragment (RFC 6946), a
                // whole datagram.
                first_fragment = frag & 1 != 0;
                next = n;
                ext_len += 8;
            }
            // UDP, ICMPv6, ESP, no next header, ...: not TCP we can see.
            _ => return Ok(verdict::PASS),
        }
        if ext_len > MAX_IPV6_EXT_BYTES {
            return Ok(unclassified(cfg, &v6, &src));
        }
    }
    if next != IPPROTO_TCP {
        return Ok(if is_ipv6_ext(next) {
            // More extension headers than the bound: the port is unknown, so fail closed.
            unclassified(cfg, &v6, &src)
        } else {
            verdict::PASS
        });
    }
    if ext_len > MAX_IPV6_EXT_BYTES {
        return Ok(unclassified(cfg, &v6, &src));
    }
    // The TCP header must lie inside the datagram (not the frame's padding), and in the
    // first fragment (RFC 7112 section 5: a first fragment without the whole chain and
    // upper-layer header may be dropped).
    if first_fragment && payload_len < ext_len + TCP_LEN {
        return Ok(unclassified(cfg, &v6, &src));
    }
    let (port, tcp_flags) = tcp_port_flags(ctx, l3 + IPV6_LEN + ext_len)?;
    if !protected(cfg, port) {
        return Ok(verdict::PASS);
    }
    let key = mask_v6(&src, cfg.v6_prefix_len);
    Ok(judge(cfg, &v6, &src, &key, tcp_flags))
}

/// Whether `next` is an IPv6 extension header the walk above steps over.
#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// `addr` with all but the first `prefix_len` bits cleared: the `RATE_V6`/`CAPPED_V6`
/// key, so every address of one /64 (by default) is one client.
#[inline(always)]
fn mask_v6(addr: &[u8; 16], prefix_len: u32) -> [u8; 16] {
    let a = addr;
    let hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let p = if prefix_len > 128 { 128 } else { prefix_len };
    let (mask_hi, mask_lo) = if p >= 128 {
        (u64::MAX, u64::MAX)
    } else if p >= 64 {
        (u64::MAX, !(u64::MAX >> (p - 64)))
    } else if p == 0 {
        (0, 0)
    } else {
        (!(u64::MAX >> p), 0)
    };
    let hi = (hi & mask_hi).to_be_bytes();
    let lo = (lo & mask_lo).to_be_bytes();
    [
        hi[0], hi[1], hi[2], hi[3], hi[4], hi[5], hi[6], hi[7], lo[0], lo[1], lo[2], lo[3], lo[4],
        lo[5], lo[6], lo[7],
    ]
}

/// Destination port (host order) and flags byte of the TCP header at `offset`.
#[inline(always)]
fn tcp_port_flags(ctx: &XdpContext, offset: usize) -> Result<(u16, u8), u32> {
    let tcp: *const TcpHdr = ptr_at(ctx, offset).map_err(|Truncated| verdict::PASS_ERROR)?;
    // SAFETY: bounds checked by `ptr_at`.
    Ok(unsafe { (u16::from_be((*tcp).dst_port), (*tcp).flags) })
}

/// Whether `port` is one of the listener ports in the config.
#[inline(always)]
fn protected(cfg: &GuardConfig, port: u16) -> bool {
    let count = cfg.port_count as usize;
    let mut i = 0;
    while i < MAX_PORTS {
        if i >= count {
            return false;
        }
        if cfg.ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// One address family's maps. `K` is the address in network byte order.
trait Family {
    type K: Copy;
    const FULL_PREFIX: u32;
    fn deny(&self) -> &LpmTrie<Self::K, NetEntry>;
    fn allow(&self) -> &LpmTrie<Self::K, NetEntry>;
    fn capped(&self) -> &HashMap<Self::K, u32>;
    fn rate(&self) -> &LruHashMap<Self::K, SourceRate>;
    fn fleet(&self) -> &LruHashMap<Self::K, u64>;

    /// `Some(verdict)` when the source is listed: the more specific of a deny and an
    /// allow entry wins, a tie goes to deny. Only the source address is needed, so this
    /// holds for every packet, whatever follows the fixed IP header.
    #[inline(always)]
    fn listed(&self, src: &Self::K) -> Option<u32> {
        let key = Key::new(Self::FULL_PREFIX, *src);
        let denied = self.deny().get(&key).map(|e| e.prefix_len);
        let allowed = self.allow().get(&key).map(|e| e.prefix_len);
        match (denied, allowed) {
            (Some(d), Some(a)) if a > d => Some(verdict::PASS),
            (Some(_), _) => Some(verdict::DROP_DENY),
            (None, Some(_)) => Some(verdict::PASS),
            (None, None) => None,
        }
    }
}

struct Family4;
struct Family6;

impl Family for Family4 {
    type K = [u8; 4];
    const FULL_PREFIX: u32 = 32;
    fn deny(&self) -> &LpmTrie<[u8; 4], NetEntry> {
        &DENY_V4
    }
    fn allow(&self) -> &LpmTrie<[u8; 4], NetEntry> {
        &ALLOW_V4
    }
    fn capped(&self) -> &HashMap<[u8; 4], u32> {
        &CAPPED_V4
    }
    fn rate(&self) -> &LruHashMap<[u8; 4], SourceRate> {
        &RATE_V4
    }
    fn fleet(&self) -> &LruHashMap<[u8; 4], u64> {
        &FLEET_V4
    }
}

impl Family for Family6 {
    type K = [u8; 16];
    const FULL_PREFIX: u32 = 128;
    fn deny(&self) -> &LpmTrie<[u8; 16], NetEntry> {
        &DENY_V6
    }
    fn allow(&self) -> &LpmTrie<[u8; 16], NetEntry> {
        &ALLOW_V6
    }
    fn capped(&self) -> &HashMap<[u8; 16], u32> {
        &CAPPED_V6
    }
    fn rate(&self) -> &LruHashMap<[u8; 16], SourceRate> {
        &RATE_V6
    }
    fn fleet(&self) -> &LruHashMap<[u8; 16], u64> {
        &FLEET_V6
    }
}

/// The verdict for TCP the program cannot classify (no port, no flags): deny and allow
/// still apply; otherwise, while a SYN limit is configured, drop it rather than let a
/// SYN escape `conn_rate` and the cap (fail closed). No legitimate sender produces such
/// packets (see the callers).
#[inline(always)]
fn unclassified<F: Family>(cfg: &GuardConfig, family: &F, src: &F::K) -> u32 {
    if let Some(verdict) = family.listed(src) {
        return verdict;
    }
    if cfg.flags & (CFG_CONN_RATE | CFG_CONN_CAP) != 0 {
        verdict::DROP_UNCLASSIFIED
    } else {
        verdict::PASS
    }
}

/// The verdict for a TCP segment from `src` to a protected port; `key` is the source's
/// rate/cap key (`src` itself for IPv4, masked to the prefix for IPv6).
#[inline(always)]
fn judge<F: Family>(cfg: &GuardConfig, family: &F, src: &F::K, key: &F::K, tcp_flags: u8) -> u32 {
    if let Some(verdict) = family.listed(src) {
        return verdict;
    }
    // Only a connection attempt is limited; everything else of an admitted connection
    // flows (the cap and the rate are about new connections).
    if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return verdict::PASS;
    }
    if cfg.flags & CFG_CONN_CAP != 0 && family.capped().get_ptr(key).is_some() {
        return verdict::DROP_CONN_CAP;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY (the read): a pointer to a live map value; user space rewrites it whole.
    if family
        .fleet()
        .get_ptr(key)
        .is_some_and(|until| now < unsafe { *until })
    {
        return verdict::DROP_FLEET;
    }
    if cfg.flags & CFG_CONN_RATE == 0 {
        return verdict::PASS;
    }
    let rate = family.rate();
    if let Some(state) = rate.get_ptr_mut(key) {
        // SAFETY: a pointer to a live map value. Another CPU may update the same entry
        // concurrently; a lost update costs one token (or one `syns` count) of accuracy.
        let state = unsafe { &mut *state };
        if !take(&mut state.bucket, &cfg.conn, now) {
            return verdict::DROP_RATE;
        }
        state.syns = state.syns.wrapping_add(1);
        state.charged_ns = now;
        return verdict::PASS;
    }
    // A source without state. The backstop decides whether it gets some; without a
    // token it passes untracked: dropping it would lock every new client out during a
    // random-source flood, while passing costs little (the kernel answers with SYN
    // cookies, a spoofed source never completes, and user space charges a real one at
    // accept because no program charged it).
    if cfg.flags & CFG_NEW_SOURCE_LIMIT != 0 {
        match NEW_SOURCE_BUCKET.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; XDP runs with migration disabled.
            Some(global) => {
                if !unsafe { take(&mut *global, &cfg.new_source, now) } {
                    return verdict::PASS_UNTRACKED;
                }
            }
            None => return verdict::PASS_ERROR,
        }
    }
    let fresh = SourceRate {
        bucket: TokenBucket {
            // The bucket starts full, minus this SYN (user space keeps burst >= 1 token).
            tokens_mtok: cfg.conn.burst_mtok.saturating_sub(MTOK),
            last_ns: now,
        },
        syns: 1,
        charged_ns: now,
    };
    match rate.insert(key, &fresh, 0) {
        Ok(()) => verdict::PASS,
        // Could not record the source: let the SYN through, visibly (user space charges
        // it at accept, since no charge was recorded).
        Err(_) => verdict::PASS_ERROR,
    }
}

/// Milli-tokens per token.
const MTOK: u64 = 1000;
const NS_PER_S: u64 = 1_000_000_000;

/// Refills `bucket` for the time since its last refill and takes one token if it has one.
#[inline(always)]
fn take(bucket: &mut TokenBucket, params: &BucketParams, now: u64) -> bool {
    let mut elapsed = now.saturating_sub(bucket.last_ns);
    if elapsed > params.fill_ns {
        elapsed = params.fill_ns;
    }
    // `elapsed <= fill_ns`, so this is at most about `burst_mtok * 1e9`, which user space
    // keeps below 2^64.
    let added = elapsed * params.rate_mtok_per_s / NS_PER_S;
    // Advance the clock only when something was added, so slow refills accumulate instead
    // of being rounded away on every SYN.
    if added > 0 {
        let tokens = bucket.tokens_mtok + added;
        bucket.tokens_mtok = if tokens > params.burst_mtok {
            params.burst_mtok
        } else {
            tokens
        };
        bucket.last_ns = now;
    }
    if bucket.tokens_mtok >= MTOK {
        bucket.tokens_mtok -= MTOK;
        true
    } else {
        false
    }
}

/// Bumps this CPU's counter for `verdict`.
#[inline(always)]
fn count(ctx: &XdpContext, verdict: u32) {
    // The lookup can only fail for an index >= VERDICT_COUNT, i.e. a bug; there is no
    // slot to count that in, and failing the packet over a counter would be worse.
    if let Some(counter) = VERDICT_COUNTERS.get_ptr_mut(verdict) {
        let len = (ctx.data_end() - ctx.data()) as u64;
        // SAFETY: a per-CPU slot: only programs on this CPU write it, and XDP programs run
        // with migration disabled, so there is no concurrent writer.
        unsafe {
            (*counter).packets = (*counter).packets.wrapping_add(1);
            (*counter).bytes = (*counter).bytes.wrapping_add(len);
        }
    }
}

// ---- Packet access ----

/// The frame ended before the header being read.
struct Truncated;

/// Pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
///
/// The verifier rejects any packet read it cannot prove is below `data_end`
/// (kernel Documentation/bpf/verifier.rst, "Direct packet access"): the comparison must be
/// of `data + offset + size_of::<T>()` against `data_end`, done before the read, exactly
/// as here. `#[inline(always)]` keeps that comparison and the read in one function, where
/// the verifier can track the bound. Variable offsets (IPv4 IHL, IPv6 extension headers)
/// are bounded by construction, which the verifier also needs.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Truncated> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Truncated);
    }
    Ok((start + offset) as *const T)
}

/// Ethernet II header (IEEE 802.3 clause 3.1.1); fields in network byte order.
#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    ether_type: u16,
}

/// IEEE 802.1Q tag after the outer EtherType: TCI, then the inner EtherType.
#[repr(C)]
struct VlanHdr {
    _tci: u16,
    inner_type: u16,
}

/// IPv4 header without options (RFC 791 section 3.1); network byte order.
#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    _tos: u8,
    total_len: u16,
    _id: u16,
    frag_off: u16,
    _ttl: u8,
    protocol: u8,
    _check: u16,
    src: [u8; 4],
    _dst: [u8; 4],
}

/// IPv6 fixed header (RFC 8200 section 3).
#[repr(C)]
struct Ipv6Hdr {
    _vtcfl: [u8; 4],
    payload_len: u16,
    next_header: u8,
    _hop_limit: u8,
    src: [u8; 16],
    _dst: [u8; 16],
}

/// The first two octets every variable-length IPv6 extension header shares.
#[repr(C)]
struct Ipv6Ext {
    next_header: u8,
    len: u8,
}

/// IPv6 fragment header (RFC 8200 section 4.5).
#[repr(C)]
struct Ipv6Frag {
    next_header: u8,
    _reserved: u8,
    frag_off: u16,
    _id: u32,
}

/// TCP header without options (RFC 9293 section 3.1); network byte order.
#[repr(C)]
struct TcpHdr {
    _src_port: u16,
    dst_port: u16,
    _seq: u32,
    _ack: u32,
    _data_offset: u8,
    flags: u8,
    _window: u16,
    _check: u16,
    _urgent: u16,
}

const _: () = assert!(size_of::<EthHdr>() == 14);
const _: () = assert!(size_of::<VlanHdr>() == VLAN_LEN);
const _: () = assert!(size_of::<Ipv4Hdr>() == 20);
const _: () = assert!(size_of::<Ipv6Hdr>() == IPV6_LEN);
const _: () = assert!(size_of::<Ipv6Frag>() == 8);
const _: () = assert!(size_of::<TcpHdr>() == TCP_LEN);

// ---- Runtime glue ----

/// GPL-compatible so the kernel allows GPL-only helpers (e.g. for aya-log) should the guard
/// need them; the same declaration aya-template uses.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Unreachable in a verified program: the verifier rejects the infinite loop, so any path
/// that could panic fails at load time, not in the kernel.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Host builds (clippy, `cargo test --workspace`) compile this file as a normal binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
