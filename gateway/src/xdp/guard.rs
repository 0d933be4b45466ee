//! The guard's life: load the embedded program (reusing pinned maps), apply a policy,
//! attach to interfaces, read the verdict counters, detach on drop.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp,
    },
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
};
use gateway_common::{
    names, sizes, verdict::VERDICT_COUNT, GuardConfig, TokenBucket, VerdictCounter,
};

use super::bpffs::prepare_pin_dir;
use super::maps::{
    count_entries, drop_mismatched_pin, map_err, map_id, open_map, pinned_maps, split_nets,
    sync_trie, take_map, ApplySummary, CapMarker, ChargeLedger, MapFill, TrieV4, TrieV6,
    VerdictCounts,
};
use super::policy::{guard_config, listener_ports, new_source_params, possible_cpus, GuardOptions};
use super::{chain, embedded_object, XdpError, XdpMode};
use crate::config::{Config, LimitsConfig};

/// One interface the program is attached to, and the mode it ended up in (never `Auto`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub mode: XdpMode,
}

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
    /// Links pinned for a binary upgrade in progress (see [`pin_links_for_handover`]),
    /// with their pin files.
    ///
    /// [`pin_links_for_handover`]: Self::pin_links_for_handover
    handed: Vec<(Attachment, PathBuf, PinnedLink)>,
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
        Self::start_taking_over(interfaces, mode, pin_path, options, limits, ports, &[])
    }

    /// [`start`](Self::start) in a binary upgrade: on an interface whose link the old
    /// process `handed` over (its pin), the program replaces the old one on that link
    /// ([`adopt_link`](Self::adopt_link)) instead of attaching anew, which would fail
    /// while the old program is attached. A handed link no configured interface uses has
    /// its pin removed: it detaches when the old process exits.
    pub fn start_taking_over(
        interfaces: &[String],
        mode: XdpMode,
        pin_path: Option<&Path>,
        options: &GuardOptions,
        limits: &LimitsConfig,
        ports: &[u16],
        handed: &[(Attachment, PathBuf)],
    ) -> Result<XdpGuard, XdpError> {
        if interfaces.is_empty() {
            return Err(XdpError::NoInterfaces);
        }
        let mut guard = Self::load_with(pin_path, options)?;
        guard.apply(limits, ports)?;
        for interface in interfaces {
            match handed.iter().find(|(a, _)| &a.interface == interface) {
                Some((attachment, pin)) => guard.adopt_link(attachment.clone(), pin)?,
                None => {
                    guard.attach(interface, mode)?;
                }
            }
        }
        for (attachment, pin) in handed {
            if !interfaces.contains(&attachment.interface) {
                let _ = std::fs::remove_file(pin);
            }
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
            handed: Vec::new(),
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

    /// Binary upgrade, old side: pins every link under the pin path (`upgrade_link_<if>`),
    /// so the new process can take it over, and returns each attachment with its pin.
    /// The program stays attached throughout; the links leave this guard's management
    /// (its drop no longer detaches them) until [`restore_links`](Self::restore_links).
    pub fn pin_links_for_handover(&mut self) -> Result<Vec<(Attachment, PathBuf)>, XdpError> {
        if self.links.is_empty() {
            return Ok(Vec::new());
        }
        let Some(dir) = self.pin_path.clone() else {
            return Err(XdpError::Policy(
                "an upgrade hands the XDP links over through the pin path: set xdp.pin_path".into(),
            ));
        };
        let taken: Vec<_> = self
            .links
            .drain(..)
            .zip(self.attachments.drain(..))
            .collect();
        let program = program_mut(&mut self.ebpf)?;
        let mut failed = None;
        for (id, attachment) in taken {
            let pin = dir.join(format!("upgrade_link_{}", attachment.interface));
            let _ = std::fs::remove_file(&pin);
            let handover =
                |e: Box<dyn std::error::Error + Send + Sync>, action| XdpError::Handover {
                    interface: attachment.interface.clone(),
                    action,
                    source: e,
                };
            let pinned = program
                .take_link(id)
                .map_err(|e| handover(Box::new(e), "taking the link"))
                .and_then(|link| {
                    // A netlink attachment (a kernel without XDP links) has no descriptor
                    // to hand over: it is detached here, and re-attached below.
                    FdLink::try_from(link)
                        .map_err(|e| handover(Box::new(e), "not a BPF link (kernel < 5.9?)"))
                })
                .and_then(|link| {
                    link.pin(&pin)
                        .map_err(|e| handover(Box::new(e), "pinning it"))
                });
            match pinned {
                Ok(pinned) => self.handed.push((attachment, pin, pinned)),
                Err(e) => {
                    failed.get_or_insert(e);
                    let attached = match program.attach(
                        &attachment.interface,
                        match attachment.mode {
                            XdpMode::Native => aya::programs::XdpMode::Driver,
                            _ => aya::programs::XdpMode::Skb,
                        },
                    ) {
                        Ok(id) => id,
                        Err(e) => {
                            tracing::error!(interface = %attachment.interface, error = %chain(&e), "re-attaching the XDP program failed");
                            continue;
                        }
                    };
                    self.links.push(attached);
                    self.attachments.push(attachment);
                }
            }
        }
        match failed {
            None => Ok(self
                .handed
                .iter()
                .map(|(a, pin, _)| (a.clone(), pin.clone()))
                .collect()),
            Some(e) => {
                self.restore_links();
                Err(e)
            }
        }
    }

    /// Binary upgrade, old side, after an attempt that failed: removes the pins and puts
    /// this process's program back on its links (the new process may have replaced it
    /// already), which this guard manages again.
    pub fn restore_links(&mut self) {
        let Ok(program) = program_mut(&mut self.ebpf) else {
            return;
        };
        for (attachment, pin, pinned) in self.handed.drain(..) {
            // The new process removes the pin when it takes the link; then only this
            // process's descriptor holds it.
            let link: FdLink = if pin.exists() {
                match pinned.unpin() {
                    Ok(link) => link,
                    Err(e) => {
                        tracing::error!(interface = %attachment.interface, error = %e, "removing the XDP link pin");
                        continue;
                    }
                }
            } else {
                pinned.into()
            };
            let restored = XdpLink::try_from(link)
                .map_err(|e| chain(&e))
                .and_then(|link| program.attach_to_link(link).map_err(|e| chain(&e)));
            match restored {
                Ok(id) => {
                    self.links.push(id);
                    self.attachments.push(attachment);
                }
                Err(e) => {
                    tracing::error!(interface = %attachment.interface, error = %e, "putting the XDP program back on its link")
                }
            }
        }
    }

    /// Binary upgrade, new side (step 4): takes the link the old process pinned at `pin`,
    /// removes the pin, and replaces the program on the link with this one atomically
    /// (`bpf_link_update`): no packet meets the interface without a program.
    pub fn adopt_link(&mut self, attachment: Attachment, pin: &Path) -> Result<(), XdpError> {
        let handover = |e: Box<dyn std::error::Error + Send + Sync>, action| XdpError::Handover {
            interface: attachment.interface.clone(),
            action,
            source: e,
        };
        let link = PinnedLink::from_pin(pin)
            .map_err(|e| handover(Box::new(e), "opening its pin"))?
            .unpin()
            .map_err(|e| handover(Box::new(e), "removing its pin"))?;
        let link = XdpLink::try_from(link).map_err(|e| handover(Box::new(e), "not an XDP link"))?;
        let program = program_mut(&mut self.ebpf)?;
        let id = program
            .attach_to_link(link)
            .map_err(|e| handover(Box::new(e), "replacing the program on it"))?;
        tracing::info!(
            interface = %attachment.interface,
            mode = %attachment.mode,
            program_id = self.program_id,
            "XDP program replaced on the link handed over"
        );
        self.links.push(id);
        self.attachments.push(attachment);
        Ok(())
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

pub(super) fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
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
