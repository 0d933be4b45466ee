//! User-space side of the XDP program: loads the embedded kernel object, attaches it to
//! interfaces, reads its counters, and detaches it again when dropped.
//!
//! The object is `gateway-ebpf`'s binary, built by `build.rs` through aya-build and
//! embedded at compile time, so the gateway ships as one file. A gateway built with
//! `AYA_BUILD_SKIP=1` embeds nothing; [`XdpGuard::load`] then fails with
//! [`XdpError::NotBuilt`] and [`program_embedded`] says so up front, which lets the caller
//! fall back to user-space enforcement.
//!
//! Attach modes: [`XdpMode::Native`] runs in the driver before any skb exists (the cheap
//! place to drop a flood), [`XdpMode::Generic`] runs after skb allocation and works on any
//! interface, and [`XdpMode::Auto`] tries native and falls back to generic with a warning.
//! Attachments use BPF links where the kernel has them, so a crashed gateway leaves no
//! program behind; a clean shutdown detaches in `Drop`.
//!
//! The guard's policy (design: `docs/design/xdp-guard.md`) lives in maps the program
//! reads on every packet: [`XdpGuard::apply`] writes the limits and the listener ports into
//! the one-entry `GUARD_CONFIG` array and diffs the deny/allow LPM tries against the config
//! (insert new, remove gone). A reload therefore keeps the program id, its attachments and
//! every counter. With no config written (no pin path, or a fresh one) the program
//! passes everything.
//! [`XdpGuard::start`] loads, applies, then attaches, so no packet meets an unconfigured
//! guard once it is attached.
//!
//! The per-IP connection cap is counted in user space (`crate::policy::limits::ConnLimiter`,
//! completed handshakes only, so spoofed SYNs never count); [`XdpGuard::cap_marker`] hands
//! it a [`CapMarker`] that marks addresses at their cap in the `CAPPED_*` maps.
//!
//! Pinning: with a pin path (which must be on a bpffs mount; an unmounted `/sys/fs/bpf` is
//! mounted on demand), the counters, the config, the tries, the rate buckets and the
//! backstop bucket are pinned there by name and reused by the next load, so a restart keeps
//! counts and rate state. A pinned map whose definition no longer matches this build (key
//! or value size, or size) is removed and recreated, with a warning. The `CAPPED_*` maps
//! are never pinned: they mirror the connection counts of this process, which a restart
//! resets.
//!
//! Links are not pinned while a process runs (a restart re-attaches). A binary upgrade
//! pins them for the moment of the handover only: the old process pins each link under
//! the pin path ([`XdpGuard::pin_links_for_handover`]), the new one takes the pin, removes
//! it and replaces the program on the same link atomically (`bpf_link_update`,
//! [`XdpGuard::adopt_link`]); an attempt that fails puts the old program back on its links
//! ([`XdpGuard::restore_links`]). The interface is never without the program.
//!
//! The module, by what each part owns: [`guard`] (load, attach, detach, apply: the program's
//! life), [`maps`] (typed map handles: counters, tries and their sync, the cap marks, the
//! charge ledger, the map plumbing), [`policy`] (from `[limits]` and the listeners to the
//! `GUARD_CONFIG` entry and bucket parameters), [`bpffs`] (the pin directory and its mount).

pub mod bpffs;
pub mod guard;
pub mod maps;
pub mod policy;

use std::{
    error::Error as StdError,
    fmt, io,
    path::{Path, PathBuf},
};

use aya::{maps::MapError, programs::ProgramError, EbpfError};
pub use gateway_common::{
    names, sizes,
    verdict::{self, VERDICT_COUNT},
    GuardConfig, VerdictCounter,
};

pub use guard::XdpGuard;
pub use maps::VerdictCounts;
pub use policy::{listener_ports, GuardOptions};

/// How to attach the program to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum XdpMode {
    /// Native, else generic (with a warning).
    #[default]
    Auto,
    /// Driver mode only (`XDP_FLAGS_DRV_MODE`); fails where the driver lacks XDP support.
    Native,
    /// Generic (SKB) mode only (`XDP_FLAGS_SKB_MODE`); works everywhere, saves less CPU.
    Generic,
}

impl XdpMode {
    /// The name used in config files and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the XDP loader. Each carries what was being done and to what; the `source`
/// chain holds the kernel's answer (for load failures, the verifier log). aya's errors are
/// boxed: they are large, and this type travels through every `Result` of the module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpError {
    /// The binary was built with `AYA_BUILD_SKIP`: there is no program to load.
    #[error("gateway built without the XDP program (AYA_BUILD_SKIP); rebuild without AYA_BUILD_SKIP to use XDP")]
    NotBuilt,
    /// `load_and_attach` was given no interface.
    #[error("no interface given to attach the XDP program to")]
    NoInterfaces,
    /// The pin path is not on a bpffs mount, so nothing can be pinned there.
    #[error(
        "XDP pin path {} is not on a bpffs mount; mount one first (`mount -t bpf bpf /sys/fs/bpf`)",
        path.display()
    )]
    NotBpffs { path: PathBuf },
    /// The pin path is under `/sys/fs/bpf`, nothing was mounted there, and mounting bpffs
    /// failed (e.g. a read-only /sys in a container).
    #[error("mounting bpffs at {} for the XDP pin path", path.display())]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The pin path could not be inspected or created.
    #[error("preparing XDP pin path {}", path.display())]
    PinPath {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Parsing the object, creating (or opening pinned) maps, or relocating failed.
    #[error("loading the XDP object{}", pinned_suffix(.pin_path.as_deref()))]
    Load {
        pin_path: Option<PathBuf>,
        #[source]
        source: Box<EbpfError>,
    },
    /// The object lacks a program or map the loader expects: the object and this module
    /// disagree about `gateway_common::names`.
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// An operation on the loaded program failed (verification, info, test run).
    #[error("XDP program {}: {action}", names::PROGRAM)]
    Program {
        action: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching in one explicit mode failed.
    #[error("attaching the XDP program to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: Box<ProgramError>,
    },
    /// `Auto` tried native, then generic, and both failed; `source` is the generic error.
    #[error(
        "attaching the XDP program to {interface} in auto mode: native failed ({}), then generic failed",
        chain(.native)
    )]
    AttachAuto {
        interface: String,
        native: Box<ProgramError>,
        #[source]
        source: Box<ProgramError>,
    },
    /// Handing a link over to a new process (binary upgrade) or taking one over failed.
    #[error("XDP link of {interface}: {action}")]
    Handover {
        interface: String,
        action: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The config cannot be expressed in the guard's maps (e.g. too many listener ports).
    #[error("XDP guard policy: {0}")]
    Policy(String),
    /// Reading or writing a map failed.
    #[error("XDP map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

impl XdpError {
    /// The message with every underlying cause, on one line: what `{:#}` shows through
    /// anyhow. Use it when logging with `%`, which shows only the outermost message
    /// (e.g. "attaching ... in native mode" without the kernel's reason).
    pub fn detail(&self) -> String {
        chain(self)
    }
}

fn pinned_suffix(pin_path: Option<&Path>) -> String {
    pin_path.map_or_else(String::new, |path| {
        format!(" (maps pinned under {})", path.display())
    })
}

/// An error and its sources on one line, for logs and nested messages.
fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}

/// Whether this binary carries the XDP program (false when built with `AYA_BUILD_SKIP`).
pub const fn program_embedded() -> bool {
    cfg!(gateway_xdp_embedded)
}

#[cfg(gateway_xdp_embedded)]
fn embedded_object() -> Option<&'static [u8]> {
    // aya-build names the file after the `[[bin]]` of gateway-ebpf (see build.rs).
    Some(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/gateway-ebpf"
    )))
}

#[cfg(not(gateway_xdp_embedded))]
fn embedded_object() -> Option<&'static [u8]> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_and_errors_can_cross_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<XdpError>();
        assert_send_sync::<XdpGuard>();
    }

    #[test]
    fn not_built_error_names_the_cause() {
        assert!(XdpError::NotBuilt.to_string().contains("AYA_BUILD_SKIP"));
        if !program_embedded() {
            let err = XdpGuard::load(None).unwrap_err();
            assert!(matches!(err, XdpError::NotBuilt), "{err}");
        }
    }
}
