//! A network namespace joined to this one by a veth pair: the rig of every test and bench
//! that needs real traffic to cross a real interface (XDP attached to the host end, clients
//! or floods in the namespace), without touching any real network.
//!
//! One [`VethPair`] is a namespace, a veth pair `host_if` (here) <-> `peer_if` (in the
//! namespace), an IPv4 /30 of 198.51.100.0/24 (TEST-NET-2, RFC 5737) and an IPv6 /64 of
//! 2001:db8::/32 (documentation, RFC 3849) on the two ends, every link up (`lo` in the
//! namespace too). Everything is removed on drop, also on panic, also when creation failed
//! half-way (the value exists before the first command).
//!
//! Names are unique per process and pair (pid + a counter), so tests run in parallel. The
//! /30 is picked and assigned under an exclusive `flock` shared by every process using this
//! kit, so two test binaries (or a test and a bench) never take the same block; the /64 is
//! derived from the /30, so it is unique too.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A namespace and a veth pair with addresses on both ends; see the module docs.
#[derive(Debug)]
pub struct VethPair {
    /// The namespace's name (`ip netns`), also in `/run/netns/`.
    pub netns: String,
    /// The end in this (the host's) namespace.
    pub host_if: String,
    /// The end inside `netns`.
    pub peer_if: String,
    pub host4: Ipv4Addr,
    pub peer4: Ipv4Addr,
    pub host6: Ipv6Addr,
    pub peer6: Ipv6Addr,
}

/// How long no frame may arrive from a new namespace end before it counts as quiet.
const QUIET: Duration = Duration::from_millis(100);

/// Longest interface name the kernel takes (IFNAMSIZ minus the NUL).
const IFNAME_MAX: usize = 15;

impl VethPair {
    /// Creates the namespace, the pair and the addresses; panics (after cleaning up) when
    /// any `ip` command fails.
    pub fn create() -> VethPair {
        static N: AtomicU32 = AtomicU32::new(0);
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let host_if = format!("gth{pid}x{n}");
        assert!(
            host_if.len() <= IFNAME_MAX,
            "interface name {host_if} too long"
        );
        let _lock = AddressLock::take();
        let block = free_block(pid as usize + n as usize);
        let subnet = 0x100 + u16::from(block);
        // Built before the first command so that Drop removes whatever got created.
        let veth = VethPair {
            netns: format!("gtn{pid}x{n}"),
            peer_if: format!("gtp{pid}x{n}"),
            host_if,
            host4: Ipv4Addr::new(198, 51, 100, block + 1),
            peer4: Ipv4Addr::new(198, 51, 100, block + 2),
            host6: Ipv6Addr::new(0x2001, 0xdb8, 0x77, subnet, 0, 0, 0, 1),
            peer6: Ipv6Addr::new(0x2001, 0xdb8, 0x77, subnet, 0, 0, 0, 2),
        };
        let (ns, host, peer) = (&veth.netns, &veth.host_if, &veth.peer_if);
        let (host4, peer4) = (format!("{}/30", veth.host4), format!("{}/30", veth.peer4));
        let (host6, peer6) = (format!("{}/64", veth.host6), format!("{}/64", veth.peer6));
        ip(&["netns", "add", ns]);
        quiet_ipv6(ns);
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns,
        ]);
        // `nodad`: usable at once, no duplicate address detection to wait for.
        ip(&["addr", "add", &host4, "dev", host]);
        ip(&["addr", "add", &host6, "dev", host, "nodad"]);
        ip(&["link", "set", host, "up"]);
        ip(&["-n", ns, "addr", "add", &peer4, "dev", peer]);
        ip(&["-n", ns, "addr", "add", &peer6, "dev", peer, "nodad"]);
        ip(&["-n", ns, "link", "set", peer, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        veth.wait_quiet();
        veth
    }

    /// Waits until the new link has said what a new link says of its own accord, so that a
    /// test counting the frames on the host end (an XDP program's counters) counts only its
    /// own. With router solicitations and DAD off (`quiet_ipv6`) that is the MLD reports of
    /// the groups the namespace end joins (RFC 3810 section 6.1), sent when the carrier
    /// comes up: after linkwatch, up to a second after `ip link set up`. So: wait for the
    /// peer's carrier (operstate UP), then until no frame arrived for a while longer than
    /// the reports' spacing (a few milliseconds, `quiet_ipv6`).
    fn wait_quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let state = || {
            ip_output(&[
                "-n",
                &self.netns,
                "-o",
                "link",
                "show",
                "dev",
                &self.peer_if,
            ])
        };
        while !state().contains("state UP") {
            assert!(
                Instant::now() < deadline,
                "{} never came up: {}",
                self.peer_if,
                state()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = format!("/sys/class/net/{}/statistics/rx_packets", self.host_if);
        let rx = || std::fs::read_to_string(&path).unwrap_or_default();
        let mut last = (rx(), Instant::now());
        while last.1.elapsed() < QUIET {
            assert!(
                Instant::now() < deadline,
                "{} never went quiet",
                self.host_if
            );
            std::thread::sleep(Duration::from_millis(10));
            let now = rx();
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
    }

    /// Runs `f` on a new thread inside the namespace and returns its result; a panic in
    /// `f` is resumed on the caller.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.netns, f)
    }

    /// `ip netns exec NETNS program`: a command that runs inside the namespace. `ip netns
    /// exec` execs the program in place, so the child's pid is the program's own and
    /// killing the child stops it.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// Routes `net` (`ADDR/LEN`) from the host into the namespace, via the peer's address
    /// of `net`'s family. The route goes with the link on drop.
    pub fn route_into(&self, net: &str) {
        let via: IpAddr = if net.contains(':') {
            self.peer6.into()
        } else {
            self.peer4.into()
        };
        ip(&[
            "route",
            "add",
            net,
            "via",
            &via.to_string(),
            "dev",
            &self.host_if,
        ]);
    }

    /// The MAC address of the host end (from this thread's namespace's sysfs: call it
    /// outside the namespace).
    pub fn host_mac(&self) -> Vec<u8> {
        let path = format!("/sys/class/net/{}/address", self.host_if);
        let mac = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        mac.trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte"))
            .collect()
    }

    /// `(mode, program id)` of the XDP program on the host end per `ip -j -d link`, if any.
    /// Modes: 1 = driver (native), 2 = generic (skb).
    pub fn attached_xdp(&self) -> Option<(u64, u32)> {
        let json = ip_output(&["-j", "-d", "link", "show", "dev", &self.host_if]);
        let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let xdp = links.get(0)?.get("xdp")?;
        let mode = xdp.get("mode")?.as_u64()?;
        let id = xdp.get("prog")?.get("id")?.as_u64()?;
        Some((mode, u32::try_from(id).ok()?))
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both (and the routes through it);
        // deleting the namespace would too, but the host end must go even if the
        // namespace never got created.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Makes links created later in namespace `ns` send as little IPv6 traffic of their own
/// accord as possible, and all of it at once: no router solicitations (RFC 4861 section
/// 6.3.7, repeated every few seconds), no duplicate address detection (RFC 4862 section
/// 5.4), and the MLD reports of the groups it joins (RFC 3810 section 6.1; no sysctl turns
/// them off) without their random delays, so [`VethPair::wait_quiet`] sees them all. A test
/// that counts the frames an XDP program saw on the host end must count only its own.
fn quiet_ipv6(ns: &str) {
    in_netns(ns, || {
        for (key, value) in [
            ("router_solicitations", "0"),
            ("dad_transmits", "0"),
            // DAD (even of zero probes) starts after a random delay below this (ms), and
            // the link-local address's MLD reports wait for it.
            ("router_solicitation_delay", "0"),
            // Milliseconds: every retransmission of the reports goes out at once.
            ("mldv1_unsolicited_report_interval", "1"),
            ("mldv2_unsolicited_report_interval", "1"),
        ] {
            // /proc/sys/net shows the namespace of the thread that opens it.
            let path = format!("/proc/sys/net/ipv6/conf/default/{key}");
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    });
}

/// Moves the calling thread (only) into network namespace `name` (`/run/netns/NAME`).
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that entered namespace `name`, and returns its result; a panic
/// in `f` (or a failed `setns`) is resumed on the caller. The caller's thread stays where
/// it is.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = name.to_owned();
    let thread = std::thread::spawn(move || {
        enter_netns(&name).unwrap_or_else(|e| panic!("setns {name}: {e}"));
        f()
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `ip ARGS`; panics with ip's stderr when it fails.
pub fn ip(args: &[&str]) {
    ip_output(args);
}

/// `ip ARGS`' stdout; panics with ip's stderr when it fails.
pub fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 from ip")
}

/// An exclusive `flock` on a lock file every user of this kit shares: held while a /30 is
/// picked and assigned, so that concurrent threads and processes never pick the same one.
/// Separate opens are separate locks, so it serialises threads of one process too.
struct AddressLock {
    _file: File,
}

impl AddressLock {
    fn take() -> AddressLock {
        let path = std::env::temp_dir().join("gateway-test-support-veth.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: a valid fd; the lock is released when the file is closed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", io::Error::last_os_error());
        AddressLock { _file: file }
    }
}

/// A /30 of 198.51.100.0/24 (its base's last octet) with no address in use on this host,
/// searched from a `seed`-derived block so that concurrent users rarely even look at the
/// same one.
fn free_block(seed: usize) -> u8 {
    let used = ip_output(&["-o", "-4", "addr", "show"]);
    let start = seed.wrapping_mul(7) % 64;
    (0..64)
        .map(|i| ((start + i) % 64) as u8 * 4)
        .find(|&base| {
            (0..4).all(|offset| !used.contains(&format!("198.51.100.{}/", base + offset)))
        })
        .expect("a free /30 in 198.51.100.0/24")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn link_exists(name: &str) -> bool {
        Path::new("/sys/class/net").join(name).exists()
    }

    fn netns_exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    #[test]
    fn creates_the_namespace_and_removes_it_on_drop() {
        if !crate::privileged(
            "creates_the_namespace_and_removes_it_on_drop",
            "CAP_NET_ADMIN, CAP_SYS_ADMIN",
        ) {
            return;
        }
        let veth = VethPair::create();
        let (netns, host_if) = (veth.netns.clone(), veth.host_if.clone());
        assert!(netns_exists(&netns) && link_exists(&host_if), "{veth:?}");
        // The peer end and both of its addresses are inside the namespace, not here.
        assert!(!link_exists(&veth.peer_if));
        let (peer_if, peer4, peer6) = (veth.peer_if.clone(), veth.peer4, veth.peer6);
        let inside = veth.run_in(move || {
            let addrs = ip_output(&["-o", "addr", "show", "dev", &peer_if]);
            (addrs.contains(&format!("{peer4}/30")) && addrs.contains(&format!("{peer6}/64")))
                .then_some(())
                .ok_or(addrs)
        });
        inside.expect("the peer's addresses in the namespace");
        // The link works both ways: TCP from inside to the host end, over v4 and v6.
        for host in [IpAddr::from(veth.host4), veth.host6.into()] {
            let listener = std::net::TcpListener::bind((host, 0)).expect("bind the host end");
            let to = listener.local_addr().unwrap();
            veth.run_in(move || {
                std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {to} from the namespace: {e}"));
            });
            listener.accept().expect("accept from the namespace");
        }
        let out = veth.command("ip").args(["-o", "link"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&veth.peer_if));
        drop(veth);
        assert!(!netns_exists(&netns), "namespace {netns} left behind");
        assert!(!link_exists(&host_if), "link {host_if} left behind");
    }

    #[test]
    fn the_namespace_end_is_quiet_once_created() {
        if !crate::privileged(
            "the_namespace_end_is_quiet_once_created",
            "CAP_NET_ADMIN, CAP_SYS_ADMIN",
        ) {
            return;
        }
        let veth = VethPair::create();
        let path = format!("/sys/class/net/{}/statistics/rx_packets", veth.host_if);
        let rx = || -> u64 {
            std::fs::read_to_string(&path)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let at_create = rx();
        // Longer than every interval of spontaneous IPv6 traffic a new link sends: MLD's
        // Unsolicited Report Interval (1 s by default), the first router solicitation delay
        // (1 s), duplicate address detection (1 s).
        std::thread::sleep(std::time::Duration::from_millis(2500));
        assert_eq!(rx(), at_create, "frames from the namespace end nobody sent");
    }

    #[test]
    fn a_panic_still_removes_the_namespace() {
        if !crate::privileged(
            "a_panic_still_removes_the_namespace",
            "CAP_NET_ADMIN, CAP_SYS_ADMIN",
        ) {
            return;
        }
        let names = std::thread::spawn(|| {
            let veth = VethPair::create();
            let names = (veth.netns.clone(), veth.host_if.clone());
            std::panic::panic_any(names);
        })
        .join()
        .expect_err("the thread panics");
        let (netns, host_if) = *names.downcast::<(String, String)>().unwrap();
        assert!(!netns_exists(&netns), "namespace {netns} left behind");
        assert!(!link_exists(&host_if), "link {host_if} left behind");
    }

    #[test]
    fn concurrent_pairs_get_distinct_blocks() {
        if !crate::privileged(
            "concurrent_pairs_get_distinct_blocks",
            "CAP_NET_ADMIN, CAP_SYS_ADMIN",
        ) {
            return;
        }
        let pairs: Vec<VethPair> = (0..4)
            .map(|_| std::thread::spawn(VethPair::create))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let mut blocks: Vec<u8> = pairs.iter().map(|p| p.host4.octets()[3] & !3).collect();
        blocks.sort_unstable();
        blocks.dedup();
        assert_eq!(blocks.len(), pairs.len(), "{pairs:?}");
    }
}
