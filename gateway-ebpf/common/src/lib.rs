//! Map key and value types shared by the XDP program (`gateway-ebpf`) and user space
//! (`gateway::xdp`): the kernel/user ABI of the XDP guard.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has no implicit padding (padding is spelled out
//! as `_pad` fields and zeroed) and holds only integers: no `bool`, `Option` or enums,
//! whose bit patterns the kernel side could not guarantee. Sizes are asserted at compile
//! time so a layout change breaks the build on both sides at once. `aya::Pod` is
//! implemented only with the `user` feature, which the `gateway` crate turns on; the eBPF
//! crate builds this crate without it (no `aya`, no `std`).
//!
//! The maps (names in [`names`], design in `docs/design/xdp-guard.md`):
//! - `VERDICT_COUNTERS`: per-CPU [`VerdictCounter`] per [`verdict`];
//! - `GUARD_CONFIG`: one-entry array holding [`GuardConfig`] (limits and protected ports),
//!   rewritten in place by user space on reload; all zero (no `CFG_ENABLED`) = pass all;
//! - `DENY_V4`/`DENY_V6`, `ALLOW_V4`/`ALLOW_V6`: LPM tries keyed by
//!   `{prefix_len: u32, addr bytes in network order}`, value [`NetEntry`];
//! - `RATE_V4`/`RATE_V6`: LRU hashes, source key → [`SourceRate`] (`conn_rate` bucket and
//!   the record of the SYNs the program charged, which user space reads at accept); the
//!   IPv6 key is the source masked to [`GuardConfig::v6_prefix_len`];
//! - `CAPPED_V4`/`CAPPED_V6`: hashes of source keys at `max_conns_per_ip`, written by
//!   user space only (value: the connection count when marked);
//! - `FLEET_V4`/`FLEET_V6`: LRU hashes of source keys over a fleet-wide limit
//!   (`[limits.global]`), written by user space only (value: `bpf_ktime_get_ns` until which
//!   the source's SYNs are dropped);
//! - `NEW_SOURCE_BUCKET`: per-CPU [`TokenBucket`], the global backstop that limits how fast
//!   new `RATE_*` entries are created (beyond it a new source passes untracked).
#![no_std]

/// Names the user-space loader uses to find the program and maps in the object.
///
/// The eBPF side names its statics identically (aya-ebpf's `#[map]` uses the identifier),
/// and the loader's tests fail if they ever drift apart.
pub mod names {
    /// The XDP entry point.
    pub const PROGRAM: &str = "gateway_xdp";
    /// `PerCpuArray<VerdictCounter>` with [`super::verdict::VERDICT_COUNT`] entries.
    pub const VERDICT_COUNTERS: &str = "VERDICT_COUNTERS";
    /// `Array<GuardConfig>` with one entry.
    pub const GUARD_CONFIG: &str = "GUARD_CONFIG";
    /// `LpmTrie<[u8; 4], NetEntry>`.
    pub const DENY_V4: &str = "DENY_V4";
    /// `LpmTrie<[u8; 16], NetEntry>`.
    pub const DENY_V6: &str = "DENY_V6";
    /// `LpmTrie<[u8; 4], NetEntry>`.
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// `LpmTrie<[u8; 16], NetEntry>`.
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// `LruHashMap<[u8; 4], SourceRate>`.
    pub const RATE_V4: &str = "RATE_V4";
    /// `LruHashMap<[u8; 16], SourceRate>` (keys masked to the IPv6 prefix).
    pub const RATE_V6: &str = "RATE_V6";
    /// `HashMap<[u8; 4], u32>`.
    pub const CAPPED_V4: &str = "CAPPED_V4";
    /// `HashMap<[u8; 16], u32>`.
    pub const CAPPED_V6: &str = "CAPPED_V6";
    /// `LruHashMap<[u8; 4], u64>`: deny-until, CLOCK_MONOTONIC ns.
    pub const FLEET_V4: &str = "FLEET_V4";
    /// `LruHashMap<[u8; 16], u64>` (keys masked to the IPv6 prefix).
    pub const FLEET_V6: &str = "FLEET_V6";
    /// `PerCpuArray<TokenBucket>` with one entry.
    pub const NEW_SOURCE_BUCKET: &str = "NEW_SOURCE_BUCKET";
}

/// Compiled-in map sizes. The LRU and cap maps can be resized at load time
/// (`EbpfLoader::map_max_entries`); these are the defaults the object declares.
pub mod sizes {
    /// Networks per deny/allow trie and family.
    pub const NET_ENTRIES: u32 = 16_384;
    /// Source addresses with a `conn_rate` bucket, per family (LRU).
    pub const RATE_ENTRIES: u32 = 65_536;
    /// Source addresses marked at their connection cap, per family.
    pub const CAPPED_ENTRIES: u32 = 65_536;
    /// Sources over a fleet-wide limit, per family (LRU: the oldest verdict goes first).
    pub const FLEET_ENTRIES: u32 = 65_536;
    /// Listener ports the guard can protect at once.
    pub const MAX_PORTS: usize = 16;
}

/// Verdict indices: the key of `VERDICT_COUNTERS`, one slot per outcome.
///
/// Plain `u32` constants rather than an enum: the value crosses the kernel boundary as a
/// map key, and an enum with an out-of-range discriminant would be undefined behaviour on
/// the user side. The order is ABI (pinned maps outlive a binary); only append.
pub mod verdict {
    /// Passed to the network stack.
    pub const PASS: u32 = 0;
    /// Dropped because the source is in a denied network.
    pub const DROP_DENY: u32 = 1;
    /// Dropped because the source exceeded its new-connection rate.
    pub const DROP_RATE: u32 = 2;
    /// Dropped because the source is at its concurrent-connection cap.
    pub const DROP_CONN_CAP: u32 = 3;
    /// Passed without judgement because the program could not parse the frame (for
    /// example a truncated header) or a map update failed. The guard fails open, but
    /// visibly: a rising count here is a bug or an attack, never silent.
    pub const PASS_ERROR: u32 = 4;
    /// Dropped: a SYN from a source with no rate state while the global new-source
    /// backstop is exhausted. No longer produced (such SYNs now pass untracked, see
    /// [`PASS_UNTRACKED`]); the slot stays because the order is ABI.
    pub const DROP_NEW_SOURCE: u32 = 5;
    /// Passed: not IPv4/IPv6 after at most two VLAN tags (ARP, LLDP, a third tag, ...).
    pub const PASS_NOT_IP: u32 = 6;
    /// Dropped: TCP (or possibly TCP) the program cannot classify while a SYN limit is
    /// configured: an IPv4/IPv6 first fragment without a whole TCP header, a non-first
    /// fragment overlapping the TCP header, an IPv6 extension chain longer than the bound.
    /// Deny and allow are decided first (they need only the source address).
    pub const DROP_UNCLASSIFIED: u32 = 7;
    /// Passed without a rate bucket: a SYN from a source with no state while the global
    /// new-source backstop is exhausted (a flood from many addresses). The kernel's SYN
    /// cookies cost a spoofed source nothing; a real one completes the handshake and user
    /// space charges `conn_rate` at accept, because no program charged it.
    pub const PASS_UNTRACKED: u32 = 8;
    /// Dropped: a SYN from a source user space marked in `FLEET_*` as over a fleet-wide
    /// limit (`[limits.global]`, counted in Redis across the nodes), until its window clears.
    pub const DROP_FLEET: u32 = 9;

    /// Number of verdict slots; the `max_entries` of `VERDICT_COUNTERS`.
    pub const VERDICT_COUNT: u32 = 10;

    /// The `verdict` label of `gateway_xdp_packets_total`, indexed by verdict.
    pub const LABELS: [&str; VERDICT_COUNT as usize] = [
        "pass",
        "drop_deny",
        "drop_rate",
        "drop_conn_cap",
        "pass_error",
        "drop_new_source",
        "pass_not_ip",
        "drop_unclassified",
        "pass_untracked",
        "drop_fleet",
    ];

    /// Whether the verdict lets the packet through (`XDP_PASS`) rather than dropping it.
    pub const fn passes(verdict: u32) -> bool {
        matches!(verdict, PASS | PASS_ERROR | PASS_NOT_IP | PASS_UNTRACKED)
    }
}

/// Per-CPU value of `VERDICT_COUNTERS`: packets and bytes (whole frame, from the Ethernet
/// header) that received one verdict on one CPU. User space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Bits of [`GuardConfig::flags`].
pub mod flags {
    /// User space has written a configuration: without it the program passes everything.
    pub const CFG_ENABLED: u32 = 1;
    /// `conn_rate` is set: SYNs are charged to per-source token buckets.
    pub const CFG_CONN_RATE: u32 = 1 << 1;
    /// `max_conns_per_ip` is set: SYNs from sources in `CAPPED_*` are dropped.
    pub const CFG_CONN_CAP: u32 = 1 << 2;
    /// The global new-source backstop is active.
    pub const CFG_NEW_SOURCE_LIMIT: u32 = 1 << 3;
}

/// Token-bucket parameters in milli-tokens (1 token = 1000), so fractional rates such as
/// `"0.5/s"` need no floating point in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketParams {
    /// Refill rate, milli-tokens per second.
    pub rate_mtok_per_s: u64,
    /// Bucket size (burst), milli-tokens.
    pub burst_mtok: u64,
    /// Nanoseconds to refill an empty bucket: elapsed time is capped at this before it is
    /// multiplied by the rate, which keeps `elapsed * rate` far from `u64` overflow
    /// (user space bounds `burst_mtok` so that `burst_mtok * 1e9` fits).
    pub fill_ns: u64,
}

/// The one entry of `GUARD_CONFIG`. User space rewrites it whole on every reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// [`flags`] bits.
    pub flags: u32,
    /// Number of valid entries in `ports`.
    pub port_count: u32,
    /// Protected TCP destination ports (host byte order); only the first `port_count`
    /// count.
    pub ports: [u16; sizes::MAX_PORTS],
    /// Per-source new-connection bucket (`conn_rate`/`conn_burst`).
    pub conn: BucketParams,
    /// Global backstop bucket for creating new per-source entries, per CPU (user space
    /// divides the global rate by the number of CPUs).
    pub new_source: BucketParams,
    /// IPv6 sources are keyed by this prefix (`[limits] ipv6_prefix`, 1..=128) in
    /// `RATE_V6` and `CAPPED_V6`: one /64 holder is one client, not 2^64.
    pub v6_prefix_len: u32,
    pub _pad: u32,
}

/// Value of `NEW_SOURCE_BUCKET` (and the bucket inside [`SourceRate`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Milli-tokens left.
    pub tokens_mtok: u64,
    /// `bpf_ktime_get_ns` of the last refill that added at least one milli-token.
    pub last_ns: u64,
}

/// Value of the LRU `RATE_*` maps: one source's `conn_rate` bucket, and what user space
/// needs to tell whether the program charged a connection it accepts (issue 17 item 3:
/// a connection that arrived on an interface without the program was never charged).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRate {
    pub bucket: TokenBucket,
    /// SYNs the program charged to this entry (passed with a token), since it was created.
    pub syns: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last charged SYN.
    pub charged_ns: u64,
}

/// Value of the deny/allow tries: the prefix length of the matched entry, so the program
/// can let the more specific of a deny and an allow match win.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetEntry {
    pub prefix_len: u32,
}

const _: () = assert!(size_of::<VerdictCounter>() == 16);
const _: () = assert!(align_of::<VerdictCounter>() == 8);
const _: () = assert!(verdict::LABELS.len() == verdict::VERDICT_COUNT as usize);
const _: () = assert!(size_of::<BucketParams>() == 24);
const _: () = assert!(size_of::<GuardConfig>() == 8 + 2 * sizes::MAX_PORTS + 2 * 24 + 8);
const _: () = assert!(size_of::<TokenBucket>() == 16);
const _: () = assert!(size_of::<SourceRate>() == 32);
const _: () = assert!(size_of::<NetEntry>() == 4);

// SAFETY (all impls below): `#[repr(C)]`, only integer fields and arrays of them, no
// padding (sizes asserted above equal the sum of the fields): every bit pattern is a valid
// value and the structs have no uninitialised bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for VerdictCounter {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for BucketParams {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for GuardConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TokenBucket {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetEntry {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceRate {}
