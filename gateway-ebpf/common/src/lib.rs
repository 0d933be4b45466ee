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
//! What lives here today: the verdict indices and the per-CPU counter value of
//! `VERDICT_COUNTERS`, plus the names user space looks maps and programs up by.
//!
//! Room left for the guard (not built yet; see PRODUCT.md "[limits]" and "[xdp]"), each to
//! be added here as its own `#[repr(C)]` type with a size assert:
//! - deny/allow networks: one `LpmTrie` per address family (`DENY_V4`/`DENY_V6`,
//!   `ALLOW_V4`/`ALLOW_V6`), keyed by the address bytes in network order;
//! - per-IP token buckets for `conn_rate`/`conn_burst` (LRU hash per family, value with
//!   tokens and last-refill time in ns);
//! - per-IP concurrent connection counts for `max_conns_per_ip`;
//! - a one-entry config `Array` holding the limits and the protected ports, so a reload
//!   updates limits in place instead of reloading the program (limits that change at run
//!   time belong in a map, not in load-time globals).
//!
//! The verdicts those maps produce already have counter slots below, so the metric
//! `gateway_xdp_packets_total{verdict}` keeps its label set when the guard lands.
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
}

/// Verdict indices: the key of `VERDICT_COUNTERS`, one slot per outcome.
///
/// Plain `u32` constants rather than an enum: the value crosses the kernel boundary as a
/// map key, and an enum with an out-of-range discriminant would be undefined behaviour on
/// the user side. The order is ABI (pinned maps outlive a binary); only append.
pub mod verdict {
    /// Passed to the network stack.
    pub const PASS: u32 = 0;
    /// Reserved: dropped because the source is in a denied network.
    pub const DROP_DENY: u32 = 1;
    /// Reserved: dropped because the source exceeded its new-connection rate.
    pub const DROP_RATE: u32 = 2;
    /// Reserved: dropped because the source is at its concurrent-connection cap.
    pub const DROP_CONN_CAP: u32 = 3;
    /// Passed without judgement because the program could not parse the frame (for
    /// example a truncated header). The guard fails open, but visibly: a rising count
    /// here is a bug or an attack, never silent.
    pub const PASS_ERROR: u32 = 4;

    /// Number of verdict slots; the `max_entries` of `VERDICT_COUNTERS`.
    pub const VERDICT_COUNT: u32 = 5;

    /// The `verdict` label of `gateway_xdp_packets_total`, indexed by verdict.
    pub const LABELS: [&str; VERDICT_COUNT as usize] = [
        "pass",
        "drop_deny",
        "drop_rate",
        "drop_conn_cap",
        "pass_error",
    ];

    /// Whether the verdict lets the packet through (`XDP_PASS`) rather than dropping it.
    pub const fn passes(verdict: u32) -> bool {
        matches!(verdict, PASS | PASS_ERROR)
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

const _: () = assert!(size_of::<VerdictCounter>() == 16);
const _: () = assert!(align_of::<VerdictCounter>() == 8);
const _: () = assert!(verdict::LABELS.len() == verdict::VERDICT_COUNT as usize);

// SAFETY: `#[repr(C)]`, only `u64` fields, no padding (asserted above): every bit pattern
// is a valid value and the struct has no uninitialised bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for VerdictCounter {}
