//! Typed handles on the program's maps: the verdict counters, the deny/allow tries and
//! their sync with a config, the connection-cap marks ([`CapMarker`]), the charge ledger
//! ([`ChargeLedger`]), the pinned maps' expected shapes, and the raw map plumbing (batch
//! counts, descriptors of our own).

use std::{collections::BTreeSet, fmt, io, net::IpAddr, path::Path, sync::Mutex};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap as BpfHashMap, MapData, MapError, MapInfo,
    },
    Ebpf,
};
use gateway_common::{
    names, sizes,
    verdict::{self, VERDICT_COUNT},
    GuardConfig, NetEntry, SourceRate, TokenBucket, VerdictCounter,
};
use ipnet::IpNet;

use super::{policy::GuardOptions, XdpError};

/// Packets and bytes per verdict, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounts {
    pub(super) counters: [VerdictCounter; VERDICT_COUNT as usize],
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

/// How full one map is, for the `gateway_xdp_map_entries{map}` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name (`gateway_common::names`), the `map` label.
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// What [`XdpGuard::apply`](super::XdpGuard::apply) changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub networks_added: usize,
    pub networks_removed: usize,
    pub ports: Vec<u16>,
}

pub(super) type TrieV4 = LpmTrie<MapData, [u8; 4], NetEntry>;
pub(super) type TrieV6 = LpmTrie<MapData, [u8; 16], NetEntry>;

/// One map's expected definition: `(name, key size, value size, max entries)`. Used to
/// spot a pinned map left by a build with another layout.
pub(super) type MapShape = (&'static str, u32, u32, u32);

/// The maps pinned under the pin path, with the shape this build expects of them.
pub(super) fn pinned_maps(options: &GuardOptions) -> [MapShape; 9] {
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

/// `(network address, prefix length)` of every network of one family.
pub(super) type NetKeys<const N: usize> = BTreeSet<([u8; N], u32)>;

/// LPM keys of `nets`, per family, host bits cleared (the trie stores what it is given).
pub(super) fn split_nets(nets: &[IpNet]) -> (NetKeys<4>, NetKeys<16>) {
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
pub(super) fn sync_trie<const N: usize>(
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
/// program checks on every SYN. Made by [`XdpGuard::cap_marker`](super::XdpGuard::cap_marker); used through
/// [`crate::policy::limits::CapSink`]. Marks change only when an address crosses its cap, so the
/// mutexes are cold.
pub struct CapMarker {
    pub(super) v4: Mutex<BpfHashMap<MapData, [u8; 4], u32>>,
    pub(super) v6: Mutex<BpfHashMap<MapData, [u8; 16], u32>>,
}

impl fmt::Debug for CapMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapMarker").finish_non_exhaustive()
    }
}

impl CapMarker {
    /// Marks (`Some(count)`) or unmarks (`None`) `ip`.
    pub fn set(&self, ip: IpAddr, count: Option<u32>) -> Result<(), XdpError> {
        match ip.to_canonical() {
            IpAddr::V4(ip) => set_entry(&self.v4, names::CAPPED_V4, ip.octets(), count),
            IpAddr::V6(ip) => set_entry(&self.v6, names::CAPPED_V6, ip.octets(), count),
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

/// Inserts (`Some`) or removes (`None`) `key` in a hash (or LRU hash) map.
fn set_entry<const N: usize, V: aya::Pod>(
    map: &Mutex<BpfHashMap<MapData, [u8; N], V>>,
    name: &'static str,
    key: [u8; N],
    value: Option<V>,
) -> Result<(), XdpError>
where
    [u8; N]: aya::Pod,
{
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    match value {
        Some(value) => map.insert(key, value, 0).map_err(map_err(name)),
        None => match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(map_err(name)(err)),
        },
    }
}

// ---- Fleet-wide verdicts ----

/// Writes the sources over a fleet-wide limit (`[limits.global]`) into `FLEET_*`, with the
/// CLOCK_MONOTONIC deadline until which the program drops their SYNs. Made by
/// [`XdpGuard::fleet_marker`](super::XdpGuard::fleet_marker); used through
/// [`crate::policy::global_limit::FleetDenySink`] by the sync task, once per sync for the
/// sources whose verdict changed.
pub struct FleetMarker {
    v4: Mutex<BpfHashMap<MapData, [u8; 4], u64>>,
    v6: Mutex<BpfHashMap<MapData, [u8; 16], u64>>,
}

impl fmt::Debug for FleetMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetMarker").finish_non_exhaustive()
    }
}

impl FleetMarker {
    /// Sets (`Some(until_ns)`) or clears (`None`) the verdict on source key `ip`.
    pub fn set(&self, ip: IpAddr, until_ns: Option<u64>) -> Result<(), XdpError> {
        match ip.to_canonical() {
            IpAddr::V4(ip) => set_entry(&self.v4, names::FLEET_V4, ip.octets(), until_ns),
            IpAddr::V6(ip) => set_entry(&self.v6, names::FLEET_V6, ip.octets(), until_ns),
        }
    }
}

impl super::XdpGuard {
    /// A handle on the `FLEET_*` maps of this guard's program, through descriptors of its
    /// own (found among the maps the loaded program uses, by name).
    pub fn fleet_marker(&self) -> Result<FleetMarker, XdpError> {
        let program_id = self.program_id();
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == program_id)
            .ok_or(XdpError::Missing {
                kind: "program",
                name: names::PROGRAM,
            })?;
        let ids = info.map_ids().ok().flatten().unwrap_or_default();
        let find = |name: &'static str| {
            ids.iter()
                .copied()
                .find(|&id| MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(name)))
                .ok_or(XdpError::Missing { kind: "map", name })
        };
        Ok(FleetMarker {
            v4: Mutex::new(open_map(names::FLEET_V4, find(names::FLEET_V4)?)?),
            v6: Mutex::new(open_map(names::FLEET_V6, find(names::FLEET_V6)?)?),
        })
    }
}

impl crate::policy::global_limit::FleetDenySink for FleetMarker {
    fn deny_until(&self, ip: IpAddr, until_ns: u64) {
        if let Err(err) = self.set(ip, Some(until_ns)) {
            // Requests are still refused in user space; only the early SYN drop is lost.
            tracing::warn!(%ip, error = %err.detail(), "writing the XDP fleet-wide verdict failed");
        }
    }

    fn remove(&self, ip: IpAddr) {
        if let Err(err) = self.set(ip, None) {
            tracing::warn!(%ip, error = %err.detail(), "clearing the XDP fleet-wide verdict failed");
        }
    }
}

// ---- Charges the program recorded ----

/// Reads the program's per-source charges (`RATE_*`: SYN count and time of the last
/// charged SYN) for [`crate::policy::limits::XdpLedger`]. One map lookup per accepted connection
/// while `conn_rate` is set; lookups need no lock.
pub struct ChargeLedger {
    pub(super) v4: BpfHashMap<MapData, [u8; 4], SourceRate>,
    pub(super) v6: BpfHashMap<MapData, [u8; 16], SourceRate>,
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
pub(super) fn open_map<M: TryFrom<aya::maps::Map, Error = MapError>>(
    name: &'static str,
    id: u32,
) -> Result<M, XdpError> {
    let data = MapData::from_id(id).map_err(map_err(name))?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
    M::try_from(map).map_err(map_err(name))
}

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map {
        name,
        source: Box::new(source),
    }
}

pub(super) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, XdpError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(XdpError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(map_err(name))
}

pub(super) fn map_id(ebpf: &Ebpf, name: &'static str) -> Result<u32, XdpError> {
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
pub(super) struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Number of entries in a (non-per-CPU) hash map, read `BATCH` at a time with
/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+). The batch token of hash maps is a bucket index;
/// eight bytes hold it.
pub(super) fn count_entries(
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
pub(super) fn drop_mismatched_pin(path: &Path, name: &str, key: u32, value: u32, max_entries: u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
