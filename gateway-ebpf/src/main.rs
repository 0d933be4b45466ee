//! The gateway's XDP program: the first code every inbound frame meets.
//!
//! It guards TCP to the gateway's listener ports, IPv4 and IPv6, before the kernel spends
//! anything on a handshake (design and non-goals: `docs/design/xdp-guard.md`):
//! 1. a source in a denied network (`DENY_*` LPM tries) loses every packet, unless a more
//!    specific `ALLOW_*` entry covers it; allowed sources are exempt from 2-4;
//! 2. a SYN (without ACK) from a source user space marked in `CAPPED_*` (at
//!    `max_conns_per_ip` completed connections) is dropped;
//! 3. a SYN is charged to its source's token bucket in the LRU `RATE_*` (`conn_rate`,
//!    `conn_burst`); an empty bucket drops it;
//! 4. a SYN from a source with no bucket yet takes a token from the per-CPU global
//!    `NEW_SOURCE_BUCKET` first; when that is empty the SYN is dropped rather than
//!    evicting known sources' state with a flood of new ones.
//!
//! Everything else passes untouched: other protocols, other ports, frames that are not
//! IPv4/IPv6, and every frame while `GUARD_CONFIG` lacks `CFG_ENABLED` (user space writes
//! it after loading). Frames the program cannot parse pass too, counted as `PASS_ERROR`
//! (fail open, visibly). Every verdict bumps one per-CPU counter in `VERDICT_COUNTERS`.
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
    sizes::{CAPPED_ENTRIES, MAX_PORTS, NET_ENTRIES, RATE_ENTRIES},
    verdict::{self, VERDICT_COUNT},
    BucketParams, GuardConfig, NetEntry, TokenBucket, VerdictCounter,
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
static RATE_V4: LruHashMap<[u8; 4], TokenBucket> = LruHashMap::with_max_entries(RATE_ENTRIES, 0);
#[map]
static RATE_V6: LruHashMap<[u8; 16], TokenBucket> = LruHashMap::with_max_entries(RATE_ENTRIES, 0);

/// Sources at `max_conns_per_ip` completed connections; written by user space only, so a
/// spoofed SYN can never put an address here.
#[map]
static CAPPED_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(CAPPED_ENTRIES, 0);
#[map]
static CAPPED_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(CAPPED_ENTRIES, 0);

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
const IPPROTO_TCP: u8 = 6;
const ETH_LEN: usize = 14;
const IPV6_LEN: usize = 40;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

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
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IPV4 => {
            let ip: *const Ipv4Hdr =
                ptr_at(ctx, ETH_LEN).map_err(|Truncated| verdict::PASS_ERROR)?;
            // SAFETY: bounds checked by `ptr_at`.
            let (vihl, protocol, frag, src) =
                unsafe { ((*ip).vihl, (*ip).protocol, (*ip).frag_off, (*ip).src) };
            if protocol != IPPROTO_TCP {
                return Ok(verdict::PASS);
            }
            // A non-first fragment carries no TCP header; the first fragment (which does)
            // is judged, so a dropped first fragment sinks the whole datagram anyway.
            if u16::from_be(frag) & 0x1fff != 0 {
                return Ok(verdict::PASS);
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(verdict::PASS_ERROR);
            }
            let (port, tcp_flags) = tcp_port_flags(ctx, ETH_LEN + ihl)?;
            if !protected(cfg, port) {
                return Ok(verdict::PASS);
            }
            Ok(judge(
                cfg, &src, &DENY_V4, &ALLOW_V4, &CAPPED_V4, &RATE_V4, 32, tcp_flags,
            ))
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr =
                ptr_at(ctx, ETH_LEN).map_err(|Truncated| verdict::PASS_ERROR)?;
            // SAFETY: bounds checked by `ptr_at`.
            let (mut next, src) = unsafe { ((*ip).next_header, (*ip).src) };
            let mut offset = ETH_LEN + IPV6_LEN;
            // Walk up to three extension headers (RFC 8200 section 4): without this a
            // hop-by-hop or destination-options header would slip a denied source past
            // the guard. Bounded and unrolled for the verifier.
            for _ in 0..3 {
                match next {
                    IPPROTO_TCP => break,
                    // Hop-by-hop, routing, destination options: length in 8-octet units,
                    // not counting the first 8 (RFC 8200 section 4.3).
                    0 | 43 | 60 => {
                        let ext: *const Ipv6Ext =
                            ptr_at(ctx, offset).map_err(|Truncated| verdict::PASS_ERROR)?;
                        // SAFETY: bounds checked by `ptr_at`.
                        let (n, len) = unsafe { ((*ext).next_header, (*ext).len) };
                        next = n;
                        offset += (len as usize + 1) * 8;
                    }
                    // Fragment header (RFC 8200 section 4.5): fixed 8 octets; only the
                    // first fragment carries the TCP header.
                    44 => {
                        let ext: *const Ipv6Frag =
                            ptr_at(ctx, offset).map_err(|Truncated| verdict::PASS_ERROR)?;
                        // SAFETY: bounds checked by `ptr_at`.
                        let (n, frag) = unsafe { ((*ext).next_header, (*ext).frag_off) };
                        if u16::from_be(frag) & 0xfff8 != 0 {
                            return Ok(verdict::PASS);
                        }
                        next = n;
                        offset += 8;
                    }
                    _ => return Ok(verdict::PASS),
                }
            }
            if next != IPPROTO_TCP {
                // More extension headers than walked: cannot find the port. Fail open.
                return Err(verdict::PASS_ERROR);
            }
            let (port, tcp_flags) = tcp_port_flags(ctx, offset)?;
            if !protected(cfg, port) {
                return Ok(verdict::PASS);
            }
            Ok(judge(
                cfg, &src, &DENY_V6, &ALLOW_V6, &CAPPED_V6, &RATE_V6, 128, tcp_flags,
            ))
        }
        _ => Ok(verdict::PASS),
    }
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

/// The verdict for a TCP segment from `src` to a protected port. Generic over the address
/// family's key type (`[u8; 4]` or `[u8; 16]`, network byte order).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn judge<K: Copy>(
    cfg: &GuardConfig,
    src: &K,
    deny: &LpmTrie<K, NetEntry>,
    allow: &LpmTrie<K, NetEntry>,
    capped: &HashMap<K, u32>,
    rate: &LruHashMap<K, TokenBucket>,
    full_prefix: u32,
    tcp_flags: u8,
) -> u32 {
    let key = Key::new(full_prefix, *src);
    let denied = deny.get(&key).map(|e| e.prefix_len);
    let allowed = allow.get(&key).map(|e| e.prefix_len);
    match (denied, allowed) {
        // The more specific entry wins; on a tie, deny.
        (Some(d), Some(a)) if a > d => return verdict::PASS,
        (Some(_), _) => return verdict::DROP_DENY,
        (None, Some(_)) => return verdict::PASS,
        (None, None) => {}
    }
    // Only a connection attempt is limited; everything else of an admitted connection
    // flows (the cap and the rate are about new connections).
    if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return verdict::PASS;
    }
    if cfg.flags & CFG_CONN_CAP != 0 && capped.get_ptr(src).is_some() {
        return verdict::DROP_CONN_CAP;
    }
    if cfg.flags & CFG_CONN_RATE == 0 {
        return verdict::PASS;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(bucket) = rate.get_ptr_mut(src) {
        // SAFETY: a pointer to a live map value. Another CPU may update the same bucket
        // concurrently; a lost update costs one token of accuracy, not safety.
        return if unsafe { take(&mut *bucket, &cfg.conn, now) } {
            verdict::PASS
        } else {
            verdict::DROP_RATE
        };
    }
    // A source without state. The backstop decides whether it gets some.
    if cfg.flags & CFG_NEW_SOURCE_LIMIT != 0 {
        match NEW_SOURCE_BUCKET.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; XDP runs with migration disabled.
            Some(global) => {
                if !unsafe { take(&mut *global, &cfg.new_source, now) } {
                    return verdict::DROP_NEW_SOURCE;
                }
            }
            None => return verdict::PASS_ERROR,
        }
    }
    let fresh = TokenBucket {
        // The bucket starts full, minus this SYN (user space keeps burst >= 1 token).
        tokens_mtok: cfg.conn.burst_mtok.saturating_sub(MTOK),
        last_ns: now,
    };
    match rate.insert(src, fresh, 0) {
        Ok(()) => verdict::PASS,
        // Could not record the source: let the SYN through, visibly.
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

/// IPv4 header without options (RFC 791 section 3.1); network byte order.
#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    _tos: u8,
    _total_len: u16,
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
    _payload_len: u16,
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
const _: () = assert!(size_of::<Ipv4Hdr>() == 20);
const _: () = assert!(size_of::<Ipv6Hdr>() == IPV6_LEN);
const _: () = assert!(size_of::<Ipv6Frag>() == 8);
const _: () = assert!(size_of::<TcpHdr>() == 20);

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
