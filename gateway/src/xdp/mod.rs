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
//! Non-goals here: pinning the program or its links (a restart re-attaches).

use std::{
    collections::BTreeSet,
    error::Error as StdError,
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues,
    },
    programs::{xdp::XdpLinkId, ProgramError, Xdp},
    Ebpf, EbpfError, EbpfLoader, TestRun as _, TestRunOptions,
};
use gateway_common::{flags, BucketParams, NetEntry, SourceRate, TokenBucket};
pub use gateway_common::{
    names, sizes,
    verdict::{self, VERDICT_COUNT},
    GuardConfig, VerdictCounter,
};
use ipnet::IpNet;

use crate::config::{Config, LimitsConfig};

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

    /// The drops as `gateway_limit_rejections_total{limit, enforcer="xdp"}`: `(limit
    /// label, packets)`. Drops count packets, so a client's retransmitted SYN counts again.
    /// `new_source_rate` is the global backstop (see [`GuardOptions`]).
    pub fn limit_rejections(&self) -> [(&'static str, u64); 4] {
        [
            (
                crate::policy::limits::LIMIT_DENY,
                self.packets(verdict::DROP_DENY),
            ),
            (
                crate::policy::limits::LIMIT_CONN_RATE,
                self.packets(verdict::DROP_RATE),
            ),
            (
                crate::policy::limits::LIMIT_MAX_CONNS,
                self.packets(verdict::DROP_CONN_CAP),
            ),
            (
                crate::policy::limits::LIMIT_NEW_SOURCE_RATE,
                self.packets(verdict::DROP_NEW_SOURCE),
            ),
        ]
    }

    /// Packets seen, whatever the verdict.
    pub fn total_packets(&self) -> u64 {
        self.counters
            .iter()
            .fold(0, |sum, c| sum.wrapping_add(c.packets))
    }
}

/// Sizes of the guard's state maps, fixed at load time (a change needs a restart, and
/// drops the pinned rate state, whose definition then no longer matches).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardOptions {
    /// Source addresses with a `conn_rate` bucket, per address family (LRU; the least
    /// recently charged is forgotten when full). Default [`sizes::RATE_ENTRIES`].
    pub tracked_sources: u32,
    /// Global backstop: new per-source buckets created per second, all CPUs together.
    /// Beyond it a SYN from a source without a bucket passes without one
    /// (`pass_untracked`; user space charges it at accept), and known sources keep
    /// their state. Default: `tracked_sources / 8`, so a flood of
    /// new sources cycles the LRU no faster than once per 8 s. 0 turns the backstop off.
    pub new_sources_per_sec: f64,
    /// Burst of the backstop. Default: `tracked_sources / 4`.
    pub new_sources_burst: u32,
}

impl Default for GuardOptions {
    fn default() -> Self {
        GuardOptions::for_tracked_sources(sizes::RATE_ENTRIES)
    }
}

impl GuardOptions {
    /// The defaults for a given LRU size.
    pub fn for_tracked_sources(tracked_sources: u32) -> GuardOptions {
        let tracked_sources = tracked_sources.max(1);
        GuardOptions {
            tracked_sources,
            new_sources_per_sec: f64::from(tracked_sources) / 8.0,
            new_sources_burst: (tracked_sources / 4).max(1),
        }
    }
}

/// How full one map is, for the `gateway_xdp_map_entries{map}` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name (`gateway_common::names`), the `map` label.
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// What [`XdpGuard::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub networks_added: usize,
    pub networks_removed: usize,
    pub ports: Vec<u16>,
}

type TrieV4 = LpmTrie<MapData, [u8; 4], NetEntry>;
type TrieV6 = LpmTrie<MapData, [u8; 16], NetEntry>;

/// The loaded XDP program, its maps, and its attachments. Dropping it detaches the program
/// from every interface and unloads it (pinned maps stay).
pub struct XdpGuard {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, VerdictCounter>,
    config: Array<MapData, GuardConfig>,
    deny_v4: TrieV4,
    deny_v6: TrieV6,
    allow_v4: TrieV4,
    allow_v6: TrieV6,
    capped_ids: (u32, u32),
    rate_ids: (u32, u32),
    /// Own descriptors of the hash maps `map_fill` counts in batches (aya's typed maps
    /// do not lend out their descriptors).
    counted: Vec<(&'static str, MapData, u32)>,
    options: GuardOptions,
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
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// One map's expected definition: `(name, key size, value size, max entries)`. Used to
/// spot a pinned map left by a build with another layout.
type MapShape = (&'static str, u32, u32, u32);

/// The maps pinned under the pin path, with the shape this build expects of them.
fn pinned_maps(options: &GuardOptions) -> [MapShape; 9] {
    let size = |n: usize| n as u32;
    [
        (
            names::VERDICT_COUNTERS,
            4,
            size(size_of::<VerdictCounter>()),
            VERDICT_COUNT,
        ),
        (names::GUARD_CONFIG, 4, size(size_of::<GuardConfig>()), 1),
        (names::DENY_V4, 8, 4, sizes::NET_ENTRIES),
        (names::DENY_V6, 20, 4, sizes::NET_ENTRIES),
        (names::ALLOW_V4, 8, 4, sizes::NET_ENTRIES),
        (names::ALLOW_V6, 20, 4, sizes::NET_ENTRIES),
        (
            names::RATE_V4,
            4,
            size(size_of::<SourceRate>()),
            options.tracked_sources,
        ),
        (
            names::RATE_V6,
            16,
            size(size_of::<SourceRate>()),
            options.tracked_sources,
        ),
        (
            names::NEW_SOURCE_BUCKET,
            4,
            size(size_of::<TokenBucket>()),
            1,
        ),
    ]
}

impl XdpGuard {
    /// Loads the program and attaches it to every interface in `interfaces`, in `mode`.
    /// On error nothing stays attached. The program passes everything until
    /// [`apply`](Self::apply); prefer [`start`](Self::start), which applies first.
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

    /// Loads the program, writes the policy of `limits` for the listener `ports`, then
    /// attaches to every interface: the guard is in force from its first packet. On error
    /// nothing stays attached.
    pub fn start(
        interfaces: &[String],
        mode: XdpMode,
        pin_path: Option<&Path>,
        options: &GuardOptions,
        limits: &LimitsConfig,
        ports: &[u16],
    ) -> Result<XdpGuard, XdpError> {
        if interfaces.is_empty() {
            return Err(XdpError::NoInterfaces);
        }
        let mut guard = Self::load_with(pin_path, options)?;
        guard.apply(limits, ports)?;
        for interface in interfaces {
            guard.attach(interface, mode)?;
        }
        Ok(guard)
    }

    /// Loads (and verifies) the program with default [`GuardOptions`], without attaching
    /// it anywhere. With `pin_path`, maps are pinned under it, reusing maps a previous run
    /// pinned there.
    pub fn load(pin_path: Option<&Path>) -> Result<XdpGuard, XdpError> {
        Self::load_with(pin_path, &GuardOptions::default())
    }

    /// [`load`](Self::load) with explicit map sizes.
    pub fn load_with(
        pin_path: Option<&Path>,
        options: &GuardOptions,
    ) -> Result<XdpGuard, XdpError> {
        let object = embedded_object().ok_or(XdpError::NotBuilt)?;
        let options = GuardOptions {
            tracked_sources: options.tracked_sources.max(1),
            ..*options
        };
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::RATE_V4, options.tracked_sources);
        loader.map_max_entries(names::RATE_V6, options.tracked_sources);
        if let Some(dir) = pin_path {
            prepare_pin_dir(dir)?;
            for (name, key_size, value_size, max_entries) in pinned_maps(&options) {
                let path = dir.join(name);
                drop_mismatched_pin(&path, name, key_size, value_size, max_entries);
                loader.map_pin_path(name, path);
            }
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

        let capped_ids = (
            map_id(&ebpf, names::CAPPED_V4)?,
            map_id(&ebpf, names::CAPPED_V6)?,
        );
        let rate_ids = (
            map_id(&ebpf, names::RATE_V4)?,
            map_id(&ebpf, names::RATE_V6)?,
        );
        let mut counted = Vec::new();
        for (name, capacity) in [
            (names::RATE_V4, options.tracked_sources),
            (names::RATE_V6, options.tracked_sources),
            (names::CAPPED_V4, sizes::CAPPED_ENTRIES),
            (names::CAPPED_V6, sizes::CAPPED_ENTRIES),
        ] {
            let data = MapData::from_id(map_id(&ebpf, name)?).map_err(map_err(name))?;
            counted.push((name, data, capacity));
        }
        let mut guard = XdpGuard {
            counters: take_map(&mut ebpf, names::VERDICT_COUNTERS)?,
            config: take_map(&mut ebpf, names::GUARD_CONFIG)?,
            deny_v4: take_map(&mut ebpf, names::DENY_V4)?,
            deny_v6: take_map(&mut ebpf, names::DENY_V6)?,
            allow_v4: take_map(&mut ebpf, names::ALLOW_V4)?,
            allow_v6: take_map(&mut ebpf, names::ALLOW_V6)?,
            ebpf,
            capped_ids,
            rate_ids,
            counted,
            options,
            program_id,
            pin_path: pin_path.map(Path::to_path_buf),
            attachments: Vec::new(),
            links: Vec::new(),
        };
        guard.reset_new_source_bucket()?;
        tracing::debug!(program_id, pin_path = ?pin_path, "XDP program loaded");
        Ok(guard)
    }

    /// Fills the per-CPU backstop buckets: a restart must not start out throttled.
    fn reset_new_source_bucket(&mut self) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(names::NEW_SOURCE_BUCKET)
            .ok_or(XdpError::Missing {
                kind: "map",
                name: names::NEW_SOURCE_BUCKET,
            })?;
        let mut bucket: PerCpuArray<&mut MapData, TokenBucket> =
            PerCpuArray::try_from(map).map_err(map_err(names::NEW_SOURCE_BUCKET))?;
        let cpus = possible_cpus();
        let full = TokenBucket {
            tokens_mtok: new_source_params(&self.options, cpus).burst_mtok,
            last_ns: 0,
        };
        let values = PerCpuValues::try_from(vec![full; cpus])
            .map_err(|err| XdpError::Policy(format!("per-CPU backstop buckets: {err}")))?;
        bucket
            .set(0, values, 0)
            .map_err(map_err(names::NEW_SOURCE_BUCKET))
    }

    /// Writes the policy of `limits` for listener `ports` into the program's maps, in place:
    /// the deny/allow tries are diffed against the config (new networks inserted first,
    /// then those gone removed, so a change never opens a gap), then the config entry is
    /// rewritten whole. Program id, attachments, counters and rate state stay. With
    /// nothing to protect (no ports) the config is written disabled: everything passes.
    pub fn apply(
        &mut self,
        limits: &LimitsConfig,
        ports: &[u16],
    ) -> Result<ApplySummary, XdpError> {
        let mut ports: Vec<u16> = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > sizes::MAX_PORTS {
            return Err(XdpError::Policy(format!(
                "{} listener ports, but the XDP guard protects at most {}",
                ports.len(),
                sizes::MAX_PORTS
            )));
        }
        let mut summary = ApplySummary {
            ports: ports.clone(),
            ..ApplySummary::default()
        };
        let (deny_v4, deny_v6) = split_nets(&limits.deny);
        let (allow_v4, allow_v6) = split_nets(&limits.allow);
        sync_trie(&mut self.deny_v4, names::DENY_V4, &deny_v4, &mut summary)?;
        sync_trie(&mut self.deny_v6, names::DENY_V6, &deny_v6, &mut summary)?;
        sync_trie(&mut self.allow_v4, names::ALLOW_V4, &allow_v4, &mut summary)?;
        sync_trie(&mut self.allow_v6, names::ALLOW_V6, &allow_v6, &mut summary)?;

        let config = guard_config(limits, &ports, &self.options, possible_cpus());
        self.config
            .set(0, config, 0)
            .map_err(map_err(names::GUARD_CONFIG))?;
        tracing::info!(
            program_id = self.program_id,
            ports = ?summary.ports,
            networks_added = summary.networks_added,
            networks_removed = summary.networks_removed,
            "XDP guard policy applied"
        );
        Ok(summary)
    }

    /// [`apply`](Self::apply) with the limits and listener ports of `config`.
    pub fn apply_config(&mut self, config: &Config) -> Result<ApplySummary, XdpError> {
        self.apply(&config.limits, &listener_ports(config))
    }

    /// The config entry as the program sees it.
    pub fn current_config(&self) -> Result<GuardConfig, XdpError> {
        self.config.get(&0, 0).map_err(map_err(names::GUARD_CONFIG))
    }

    /// The map sizes this guard was loaded with.
    pub fn options(&self) -> &GuardOptions {
        &self.options
    }

    /// Entries and capacity of the deny/allow tries, the rate LRUs and the cap maps, for
    /// `gateway_xdp_map_entries{map}`. Hash maps are counted with `BPF_MAP_LOOKUP_BATCH`
    /// (4096 entries per syscall: a few milliseconds for full 65536-entry LRUs); the tries,
    /// which have no batch operations and hold the (short) configured lists, key by key.
    pub fn map_fill(&self) -> Result<Vec<MapFill>, XdpError> {
        fn walk<K: aya::Pod>(
            map: &'static str,
            keys: aya::maps::MapKeys<'_, K>,
            capacity: u32,
        ) -> Result<MapFill, XdpError> {
            let mut entries = 0u64;
            for key in keys {
                key.map_err(map_err(map))?;
                entries += 1;
            }
            Ok(MapFill {
                map,
                entries,
                capacity: u64::from(capacity),
            })
        }
        let mut fill = vec![
            walk(names::DENY_V4, self.deny_v4.keys(), sizes::NET_ENTRIES)?,
            walk(names::DENY_V6, self.deny_v6.keys(), sizes::NET_ENTRIES)?,
            walk(names::ALLOW_V4, self.allow_v4.keys(), sizes::NET_ENTRIES)?,
            walk(names::ALLOW_V6, self.allow_v6.keys(), sizes::NET_ENTRIES)?,
        ];
        for (map, data, capacity) in &self.counted {
            let info = data.info().map_err(map_err(map))?;
            let entries = count_entries(
                std::os::fd::AsFd::as_fd(data.fd()),
                info.key_size() as usize,
                info.value_size() as usize,
            )
            .map_err(|err| XdpError::Policy(format!("counting the entries of {map}: {err}")))?;
            fill.push(MapFill {
                map,
                entries,
                capacity: u64::from(*capacity),
            });
        }
        Ok(fill)
    }

    /// A handle on the `CAPPED_*` maps for `crate::policy::limits::ConnLimiter`, which marks the
    /// addresses at `max_conns_per_ip` there. It holds its own map descriptors, so it can
    /// outlive the guard (marks then no longer matter) and be shared between threads.
    pub fn cap_marker(&self) -> Result<CapMarker, XdpError> {
        Ok(CapMarker {
            v4: Mutex::new(open_map(names::CAPPED_V4, self.capped_ids.0)?),
            v6: Mutex::new(open_map(names::CAPPED_V6, self.capped_ids.1)?),
        })
    }

    /// A read handle on the `RATE_*` maps for `crate::policy::limits::ConnLimiter`: at accept it
    /// tells whether the program charged the connection's SYN (issue 17 item 3). Holds
    /// its own map descriptors, like [`cap_marker`](Self::cap_marker).
    pub fn charge_ledger(&self) -> Result<ChargeLedger, XdpError> {
        Ok(ChargeLedger {
            v4: open_map(names::RATE_V4, self.rate_ids.0)?,
            v6: open_map(names::RATE_V6, self.rate_ids.1)?,
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
        self.test_run_repeat(frame, 1).map(|(action, _)| action)
    }

    /// Runs the program `repeat` times over `frame` in one `BPF_PROG_TEST_RUN` and
    /// returns its last XDP action and the kernel's average time per run (a micro-benchmark
    /// of the program's path for that frame). Counters move once per run.
    pub fn test_run_repeat(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), XdpError> {
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
            repeat,
            ..TestRunOptions::default()
        };
        program
            .test_run(options)
            .map(|result| (result.return_value, result.duration))
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

// ---- Policy → maps ----

/// The TCP ports of `config`'s listeners (what the guard protects).
pub fn listener_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .listeners
        .iter()
        .filter_map(|l| l.get_ref().listen.parse::<std::net::SocketAddr>().ok())
        .map(|addr| addr.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Milli-tokens per token (the kernel's unit, `gateway_common::BucketParams`).
const MTOK: u64 = 1000;
/// Largest bucket, in tokens: keeps `burst_mtok * 1e9` (the kernel's largest product)
/// below 2^64.
pub const MAX_BURST: u64 = 10_000_000;

/// Kernel bucket parameters for `rate` tokens per second with `burst` tokens.
fn bucket_params(rate: f64, burst: u64) -> BucketParams {
    let burst_mtok = burst.clamp(1, MAX_BURST) * MTOK;
    // At least one milli-token per second: a zero rate would never refill and the
    // division below would be by zero.
    let rate_mtok_per_s = ((rate * MTOK as f64).round() as u64).max(1);
    let fill_ns =
        u64::try_from(u128::from(burst_mtok) * 1_000_000_000 / u128::from(rate_mtok_per_s) + 1)
            .unwrap_or(u64::MAX);
    BucketParams {
        rate_mtok_per_s,
        burst_mtok,
        fill_ns,
    }
}

/// `conn_burst`, or one second's worth of `conn_rate` (at least 1) when unset.
pub fn effective_conn_burst(limits: &LimitsConfig) -> Option<u64> {
    let rate = limits.conn_rate.as_ref()?.per_second;
    Some(
        limits
            .conn_burst
            .map_or_else(|| rate.ceil().max(1.0) as u64, u64::from)
            .max(1),
    )
}

/// The backstop's per-CPU share: each CPU refills its own bucket, so an even spread of
/// SYNs over the CPUs (RSS) adds up to the global rate.
fn new_source_params(options: &GuardOptions, cpus: usize) -> BucketParams {
    let cpus = cpus.max(1) as f64;
    bucket_params(
        options.new_sources_per_sec / cpus,
        (f64::from(options.new_sources_burst) / cpus).ceil() as u64,
    )
}

/// The `GUARD_CONFIG` entry for `limits` and `ports` (sorted, at most `MAX_PORTS`).
pub fn guard_config(
    limits: &LimitsConfig,
    ports: &[u16],
    options: &GuardOptions,
    cpus: usize,
) -> GuardConfig {
    let mut config = GuardConfig::default();
    if ports.is_empty() {
        return config;
    }
    config.flags = flags::CFG_ENABLED;
    for (slot, port) in config.ports.iter_mut().zip(ports) {
        *slot = *port;
    }
    config.port_count = ports.len().min(sizes::MAX_PORTS) as u32;
    if let (Some(rate), Some(burst)) = (&limits.conn_rate, effective_conn_burst(limits)) {
        config.flags |= flags::CFG_CONN_RATE;
        config.conn = bucket_params(rate.per_second, burst);
        if options.new_sources_per_sec > 0.0 {
            config.flags |= flags::CFG_NEW_SOURCE_LIMIT;
            config.new_source = new_source_params(options, cpus);
        }
    }
    if limits.max_conns_per_ip.is_some() {
        config.flags |= flags::CFG_CONN_CAP;
    }
    config.v6_prefix_len = u32::from(limits.ipv6_prefix.clamp(1, 128));
    config
}

fn possible_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1).max(1)
}

/// `(network address, prefix length)` of every network of one family.
type NetKeys<const N: usize> = BTreeSet<([u8; N], u32)>;

/// LPM keys of `nets`, per family, host bits cleared (the trie stores what it is given).
fn split_nets(nets: &[IpNet]) -> (NetKeys<4>, NetKeys<16>) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for net in nets {
        match net.trunc() {
            IpNet::V4(n) => {
                v4.insert((n.network().octets(), u32::from(n.prefix_len())));
            }
            IpNet::V6(n) => {
                v6.insert((n.network().octets(), u32::from(n.prefix_len())));
            }
        }
    }
    (v4, v6)
}

/// Makes `trie` hold exactly `wanted`: inserts what is missing, then removes the rest.
fn sync_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], NetEntry>,
    name: &'static str,
    wanted: &BTreeSet<([u8; N], u32)>,
    summary: &mut ApplySummary,
) -> Result<(), XdpError>
where
    [u8; N]: aya::Pod,
{
    let mut present = BTreeSet::new();
    for key in trie.keys() {
        let key = key.map_err(map_err(name))?;
        present.insert((key.data(), key.prefix_len()));
    }
    for (addr, prefix_len) in wanted.difference(&present) {
        trie.insert(
            &Key::new(*prefix_len, *addr),
            NetEntry {
                prefix_len: *prefix_len,
            },
            0,
        )
        .map_err(map_err(name))?;
        summary.networks_added += 1;
    }
    for (addr, prefix_len) in present.difference(wanted) {
        match trie.remove(&Key::new(*prefix_len, *addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => summary.networks_removed += 1,
            Err(err) => return Err(map_err(name)(err)),
        }
    }
    Ok(())
}

// ---- Connection-cap marks ----

/// Writes "this address is at its connection cap" into the `CAPPED_*` maps, which the
/// program checks on every SYN. Made by [`XdpGuard::cap_marker`]; used through
/// [`crate::policy::limits::CapSink`]. Marks change only when an address crosses its cap, so the
/// mutexes are cold.
pub struct CapMarker {
    v4: Mutex<BpfHashMap<MapData, [u8; 4], u32>>,
    v6: Mutex<BpfHashMap<MapData, [u8; 16], u32>>,
}

impl fmt::Debug for CapMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapMarker").finish_non_exhaustive()
    }
}

impl CapMarker {
    /// Marks (`Some(count)`) or unmarks (`None`) `ip`.
    pub fn set(&self, ip: IpAddr, count: Option<u32>) -> Result<(), XdpError> {
        fn update<const N: usize>(
            map: &Mutex<BpfHashMap<MapData, [u8; N], u32>>,
            name: &'static str,
            key: [u8; N],
            count: Option<u32>,
        ) -> Result<(), XdpError>
        where
            [u8; N]: aya::Pod,
        {
            let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
            match count {
                Some(count) => map.insert(key, count, 0).map_err(map_err(name)),
                None => match map.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                    Err(err) => Err(map_err(name)(err)),
                },
            }
        }
        match ip.to_canonical() {
            IpAddr::V4(ip) => update(&self.v4, names::CAPPED_V4, ip.octets(), count),
            IpAddr::V6(ip) => update(&self.v6, names::CAPPED_V6, ip.octets(), count),
        }
    }

    /// Whether `ip` is marked.
    pub fn is_marked(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(ip) => self
                .v4
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&ip.octets(), 0)
                .is_ok(),
            IpAddr::V6(ip) => self
                .v6
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&ip.octets(), 0)
                .is_ok(),
        }
    }
}

impl crate::policy::limits::CapSink for CapMarker {
    fn set_capped(&self, ip: IpAddr, count: Option<u32>) {
        if let Err(err) = self.set(ip, count) {
            // The user-space count still refuses the connection at accept; only the
            // early drop of the SYN is lost.
            tracing::warn!(%ip, error = %err.detail(), "updating the XDP connection-cap mark failed");
        }
    }
}

// ---- Charges the program recorded ----

/// Reads the program's per-source charges (`RATE_*`: SYN count and time of the last
/// charged SYN) for [`crate::policy::limits::XdpLedger`]. One map lookup per accepted connection
/// while `conn_rate` is set; lookups need no lock.
pub struct ChargeLedger {
    v4: BpfHashMap<MapData, [u8; 4], SourceRate>,
    v6: BpfHashMap<MapData, [u8; 16], SourceRate>,
}

impl fmt::Debug for ChargeLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeLedger").finish_non_exhaustive()
    }
}

impl crate::policy::limits::XdpLedger for ChargeLedger {
    fn charged(&self, key: IpAddr) -> Option<crate::policy::limits::XdpCharge> {
        let state = match key.to_canonical() {
            IpAddr::V4(ip) => self.v4.get(&ip.octets(), 0),
            IpAddr::V6(ip) => self.v6.get(&ip.octets(), 0),
        }
        .ok()?;
        Some(crate::policy::limits::XdpCharge {
            syns: state.syns,
            charged_ns: state.charged_ns,
        })
    }
}

// ---- Map plumbing ----

/// Opens the map `id` (of this guard's program) through a descriptor of its own.
fn open_map<M: TryFrom<aya::maps::Map, Error = MapError>>(
    name: &'static str,
    id: u32,
) -> Result<M, XdpError> {
    let data = MapData::from_id(id).map_err(map_err(name))?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
    M::try_from(map).map_err(map_err(name))
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map {
        name,
        source: Box::new(source),
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, XdpError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(XdpError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(map_err(name))
}

fn map_id(ebpf: &Ebpf, name: &'static str) -> Result<u32, XdpError> {
    let map = ebpf
        .map(name)
        .ok_or(XdpError::Missing { kind: "map", name })?;
    let (aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data)) = map else {
        return Err(XdpError::Missing {
            kind: "hash map",
            name,
        });
    };
    Ok(data.info().map_err(map_err(name))?.id())
}

/// `union bpf_attr` as `BPF_MAP_*_BATCH` reads it (include/uapi/linux/bpf.h).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Number of entries in a (non-per-CPU) hash map, read `BATCH` at a time with
/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+). The batch token of hash maps is a bucket index;
/// eight bytes hold it.
fn count_entries(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    const BATCH: u32 = 4096;
    let mut keys = vec![0u8; key_size * BATCH as usize];
    let mut values = vec![0u8; value_size * BATCH as usize];
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    let mut total = 0u64;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token_in) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `BATCH` keys and values of the map's sizes
        // and at two 8-byte tokens, all alive for the call; the kernel writes only there.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        total += u64::from(attr.count);
        match err {
            None => {}
            // The end of the map; `count` holds the last partial batch.
            Some(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Some(err) => return Err(err),
        }
        token_in = token_out;
        first = false;
    }
}

/// Removes the pin at `path` if the pinned map's key size, value size or size differ from
/// this build's: reusing it would feed the program a map of the wrong shape.
fn drop_mismatched_pin(path: &Path, name: &str, key: u32, value: u32, max_entries: u32) {
    let Ok(info) = MapInfo::from_pin(path) else {
        return;
    };
    let found = (info.key_size(), info.value_size(), info.max_entries());
    if found == (key, value, max_entries) {
        return;
    }
    tracing::warn!(
        map = name,
        path = %path.display(),
        ?found,
        expected = ?(key, value, max_entries),
        "pinned XDP map has another definition (older build or other sizes); replacing it, \
         its contents are lost"
    );
    if let Err(err) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %err, "removing the stale pin failed");
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
