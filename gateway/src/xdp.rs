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
//! Pinning: with a pin path (which must be on a bpffs mount; an unmounted `/sys/fs/bpf` is
//! mounted on demand), maps are pinned there by name and reused by the next load, so a
//! restart keeps counters (and later the guard's state). Reuse takes the pinned map as it is: a change to a map's definition needs the
//! old pin removed, or the diff-and-migrate step the guard's reload will bring.
//!
//! Non-goals here: the guard's maps and policy (deny lists, rate limits, connection caps)
//! and pinning the program or its links (a restart re-attaches).

use std::{
    error::Error as StdError,
    fmt, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, MapError, PerCpuArray},
    programs::{xdp::XdpLinkId, ProgramError, Xdp},
    Ebpf, EbpfError, EbpfLoader, TestRun as _, TestRunOptions,
};
pub use gateway_common::{
    names,
    verdict::{self, VERDICT_COUNT},
    VerdictCounter,
};

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
    /// Reading a map failed.
    #[error("reading XDP map {name}")]
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

/// One interface the program is attached to, and the mode it ended up in (never `Auto`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub mode: XdpMode,
}

/// Packets and bytes per verdict, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounts {
    counters: [VerdictCounter; VERDICT_COUNT as usize],
}

impl VerdictCounts {
    /// The counter of one verdict (`gateway_common::verdict::*`); zero for an unknown one.
    pub fn get(&self, verdict: u32) -> VerdictCounter {
        usize::try_from(verdict)
            .ok()
            .and_then(|index| self.counters.get(index))
            .copied()
            .unwrap_or_default()
    }

    /// Packets that received `verdict`.
    pub fn packets(&self, verdict: u32) -> u64 {
        self.get(verdict).packets
    }

    /// `(label, counter)` for every verdict, in index order; the label is the value of
    /// the `verdict` label of `gateway_xdp_packets_total`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, VerdictCounter)> + '_ {
        verdict::LABELS
            .iter()
            .copied()
            .zip(self.counters.iter().copied())
    }

    /// Packets seen, whatever the verdict.
    pub fn total_packets(&self) -> u64 {
        self.counters
            .iter()
            .fold(0, |sum, c| sum.wrapping_add(c.packets))
    }
}

/// The loaded XDP program, its maps, and its attachments. Dropping it detaches the program
/// from every interface and unloads it (pinned maps stay).
pub struct XdpGuard {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, VerdictCounter>,
    program_id: u32,
    pin_path: Option<PathBuf>,
    attachments: Vec<Attachment>,
    links: Vec<XdpLinkId>,
}

impl fmt::Debug for XdpGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpGuard")
            .field("program_id", &self.program_id)
            .field("pin_path", &self.pin_path)
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

impl XdpGuard {
    /// Loads the program and attaches it to every interface in `interfaces`, in `mode`.
    /// On error nothing stays attached.
    pub fn load_and_attach(
        interfaces: &[String],
        mode: XdpMode,
        pin_path: Option<&Path>,
    ) -> Result<XdpGuard, XdpError> {
        if interfaces.is_empty() {
            return Err(XdpError::NoInterfaces);
        }
        let mut guard = Self::load(pin_path)?;
        for interface in interfaces {
            // On error `guard` drops here and detaches what was already attached.
            guard.attach(interface, mode)?;
        }
        Ok(guard)
    }

    /// Loads (and verifies) the program without attaching it anywhere. With `pin_path`,
    /// maps are pinned under it, reusing maps a previous run pinned there.
    pub fn load(pin_path: Option<&Path>) -> Result<XdpGuard, XdpError> {
        let object = embedded_object().ok_or(XdpError::NotBuilt)?;
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_path {
            prepare_pin_dir(dir)?;
            loader.map_pin_path(names::VERDICT_COUNTERS, dir.join(names::VERDICT_COUNTERS));
        }
        let mut ebpf = loader.load(object).map_err(|source| XdpError::Load {
            pin_path: pin_path.map(Path::to_path_buf),
            source: Box::new(source),
        })?;

        let program = program_mut(&mut ebpf)?;
        program.load().map_err(|source| XdpError::Program {
            action: "verifying and loading into the kernel",
            source: Box::new(source),
        })?;
        let program_id = program
            .info()
            .map_err(|source| XdpError::Program {
                action: "reading its id",
                source: Box::new(source),
            })?
            .id();

        let map = ebpf
            .take_map(names::VERDICT_COUNTERS)
            .ok_or(XdpError::Missing {
                kind: "map",
                name: names::VERDICT_COUNTERS,
            })?;
        let counters = PerCpuArray::try_from(map).map_err(|source| XdpError::Map {
            name: names::VERDICT_COUNTERS,
            source: Box::new(source),
        })?;

        tracing::debug!(program_id, pin_path = ?pin_path, "XDP program loaded");
        Ok(XdpGuard {
            ebpf,
            counters,
            program_id,
            pin_path: pin_path.map(Path::to_path_buf),
            attachments: Vec::new(),
            links: Vec::new(),
        })
    }

    /// Attaches the loaded program to `interface`; returns the mode it attached in.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<XdpMode, XdpError> {
        let program = program_mut(&mut self.ebpf)?;
        let attach = |program: &mut Xdp, mode: XdpMode| {
            let flags = match mode {
                XdpMode::Native => aya::programs::XdpMode::Driver,
                XdpMode::Generic | XdpMode::Auto => aya::programs::XdpMode::Skb,
            };
            program.attach(interface, flags)
        };
        let (link, effective) = match mode {
            XdpMode::Native | XdpMode::Generic => {
                let link = attach(program, mode).map_err(|source| XdpError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source: Box::new(source),
                })?;
                (link, mode)
            }
            XdpMode::Auto => match attach(program, XdpMode::Native) {
                Ok(link) => (link, XdpMode::Native),
                // No point trying generic mode on an interface that does not exist.
                Err(source @ ProgramError::UnknownInterface { .. }) => {
                    return Err(XdpError::Attach {
                        interface: interface.to_owned(),
                        mode,
                        source: Box::new(source),
                    })
                }
                Err(native) => {
                    tracing::warn!(
                        interface,
                        error = %chain(&native),
                        "native XDP attach failed; falling back to GENERIC mode, which runs \
                         after the kernel has allocated an skb per packet and sheds far less \
                         load under a flood. Use a driver with native XDP for real protection"
                    );
                    match attach(program, XdpMode::Generic) {
                        Ok(link) => (link, XdpMode::Generic),
                        Err(source) => {
                            return Err(XdpError::AttachAuto {
                                interface: interface.to_owned(),
                                native: Box::new(native),
                                source: Box::new(source),
                            })
                        }
                    }
                }
            },
        };
        tracing::info!(
            interface,
            mode = %effective,
            program_id = self.program_id,
            "XDP program attached"
        );
        self.links.push(link);
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: effective,
        });
        Ok(effective)
    }

    /// Per-verdict packet and byte counts, summed over all CPUs. With a pin path these
    /// include packets counted before a restart.
    pub fn packet_counts(&self) -> Result<VerdictCounts, XdpError> {
        let mut counts = VerdictCounts::default();
        for (index, total) in (0..VERDICT_COUNT).zip(counts.counters.iter_mut()) {
            let per_cpu = self
                .counters
                .get(&index, 0)
                .map_err(|source| XdpError::Map {
                    name: names::VERDICT_COUNTERS,
                    source: Box::new(source),
                })?;
            for cpu in per_cpu.iter() {
                total.packets = total.packets.wrapping_add(cpu.packets);
                total.bytes = total.bytes.wrapping_add(cpu.bytes);
            }
        }
        Ok(counts)
    }

    /// The kernel's id of the loaded program (as `bpftool prog show id N` knows it).
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// Where maps are pinned, if anywhere.
    pub fn pin_path(&self) -> Option<&Path> {
        self.pin_path.as_deref()
    }

    /// The interfaces the program is attached to, in attach order.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Runs the program once over `frame` (an Ethernet frame, at least 14 bytes) through
    /// `BPF_PROG_TEST_RUN`, without any interface, and returns its XDP action
    /// (`XDP_PASS` = 2, `XDP_DROP` = 1). Counters move as for a received frame.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, XdpError> {
        let program: &Xdp = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or(XdpError::Missing {
                kind: "program",
                name: names::PROGRAM,
            })?
            .try_into()
            .map_err(|source| XdpError::Program {
                action: "not an XDP program",
                source: Box::new(source),
            })?;
        let options = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        program
            .test_run(options)
            .map(|result| result.return_value)
            .map_err(|source| XdpError::Program {
                action: "BPF_PROG_TEST_RUN",
                source: Box::new(source),
            })
    }
}

impl Drop for XdpGuard {
    fn drop(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let Ok(program) = program_mut(&mut self.ebpf) else {
            return;
        };
        for (link, attachment) in self.links.drain(..).zip(self.attachments.drain(..)) {
            match program.detach(link) {
                Ok(()) => tracing::info!(
                    interface = %attachment.interface,
                    mode = %attachment.mode,
                    "XDP program detached"
                ),
                // Unloading the program (when `ebpf` drops next) still releases it.
                Err(err) => tracing::warn!(
                    interface = %attachment.interface,
                    error = %chain(&err),
                    "detaching XDP program failed"
                ),
            }
        }
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(names::PROGRAM)
        .ok_or(XdpError::Missing {
            kind: "program",
            name: names::PROGRAM,
        })?
        .try_into()
        .map_err(|source| XdpError::Program {
            action: "not an XDP program",
            source: Box::new(source),
        })
}

/// `statfs(2)` magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted (systemd mounts it there at boot).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Creates `dir` if needed, after checking it lies on bpffs: a pin elsewhere fails with an
/// opaque EPERM, and creating folders in the unmounted `/sys/fs/bpf` (sysfs) fails too.
///
/// A pin path under `/sys/fs/bpf` on a system where nothing mounted bpffs there gets it
/// mounted, as bpftool and Cilium do: operators expect the conventional location to work,
/// and a bpffs mount is global but inert. Any other location must already be bpffs.
fn prepare_pin_dir(dir: &Path) -> Result<(), XdpError> {
    let pin_err = |source| XdpError::PinPath {
        path: dir.to_path_buf(),
        source,
    };
    let nearest_existing = || {
        dir.ancestors()
            .find(|ancestor| ancestor.exists())
            .ok_or_else(|| pin_err(io::Error::from(io::ErrorKind::NotFound)))
    };
    if !is_bpffs(nearest_existing()?).map_err(pin_err)? {
        let root = Path::new(BPFFS_ROOT);
        if dir.starts_with(root) && root.is_dir() && !is_bpffs(root).map_err(pin_err)? {
            mount_bpffs(root).map_err(|source| XdpError::MountBpffs {
                path: root.to_path_buf(),
                source,
            })?;
            tracing::warn!(
                path = BPFFS_ROOT,
                "bpffs was not mounted; mounted it to pin the XDP maps (systemd usually does \
                 this at boot)"
            );
        }
        if !is_bpffs(nearest_existing()?).map_err(pin_err)? {
            return Err(XdpError::NotBpffs {
                path: dir.to_path_buf(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(pin_err)
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: NUL-terminated strings that outlive the call; bpffs takes no mount data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = c_path(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and `stat` is writable for one `statfs`.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    // `f_type`'s integer type differs between libc targets; the magic fits in 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_type as u32 == BPF_FS_MAGIC)
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
    fn counts_sum_and_label() {
        let mut counts = VerdictCounts::default();
        counts.counters[verdict::PASS as usize] = VerdictCounter {
            packets: 3,
            bytes: 180,
        };
        counts.counters[verdict::PASS_ERROR as usize].packets = 1;
        assert_eq!(counts.packets(verdict::PASS), 3);
        assert_eq!(counts.get(verdict::PASS).bytes, 180);
        assert_eq!(counts.packets(VERDICT_COUNT), 0);
        assert_eq!(counts.total_packets(), 4);
        let labels: Vec<_> = counts.iter().map(|(label, _)| label).collect();
        assert_eq!(labels, verdict::LABELS);
    }

    #[test]
    fn not_built_error_names_the_cause() {
        assert!(XdpError::NotBuilt.to_string().contains("AYA_BUILD_SKIP"));
        if !program_embedded() {
            let err = XdpGuard::load(None).unwrap_err();
            assert!(matches!(err, XdpError::NotBuilt), "{err}");
        }
    }

    #[test]
    fn non_bpffs_pin_path_is_refused_before_anything_is_created() {
        let dir = std::env::temp_dir().join(format!("gateway-xdp-pin-{}", std::process::id()));
        assert!(matches!(
            prepare_pin_dir(&dir),
            Err(XdpError::NotBpffs { .. })
        ));
        assert!(!dir.exists());
    }
}
