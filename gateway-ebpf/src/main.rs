//! The gateway's XDP program: the first code every inbound frame meets.
//!
//! Today it passes every frame and counts it, per CPU, under its verdict in
//! `VERDICT_COUNTERS` (which user space exports as `gateway_xdp_packets_total{verdict}`).
//! It is the skeleton the guard grows into: deny networks, per-IP connection rate and
//! connection caps (see `gateway-common` for the maps reserved for them). Shape:
//! `gateway_xdp` → `try_gateway_xdp` decides a verdict → one counter bump → one XDP action.
//! Every packet read goes through [`ptr_at`], and every verdict is counted, including the
//! fail-open one for frames the program cannot parse.
//!
//! Built for `bpfel-unknown-none` by aya-build from `gateway/build.rs`. For the host (where
//! `cargo clippy --workspace --all-targets` compiles it) it is an ordinary binary with an
//! empty `main`; the `cfg_attr`s below follow aya's own test programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use gateway_common::{
    verdict::{self, VERDICT_COUNT},
    VerdictCounter,
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

/// Decides the verdict (a `gateway_common::verdict` index) for one frame: `Ok` for a
/// judgement, `Err` when the frame could not be judged (the caller fails open and counts
/// it under `PASS_ERROR`).
#[inline(always)]
fn try_gateway_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|Truncated| verdict::PASS_ERROR)?;
    // SAFETY: `ptr_at` checked the whole header lies within [data, data_end).
    let _ether_type = u16::from_be(unsafe { (*eth).ether_type });
    // The guard goes here: IPv4/IPv6 source lookups in the deny tries, then the token
    // bucket and connection cap of that source for TCP SYNs to the protected ports.
    Ok(verdict::PASS)
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
/// the verifier can track the bound.
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

const _: () = assert!(size_of::<EthHdr>() == 14);

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
