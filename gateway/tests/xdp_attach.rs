//! Privileged tests of `gateway::xdp` against the running kernel.
//!
//! - `prog_test_run_*`: crafted frames through `BPF_PROG_TEST_RUN`; deterministic, no
//!   interface involved.
//! - `*_mode_counts_real_traffic`: a network namespace joined to this one by a veth pair,
//!   the program attached to the host-side veth, real UDP and TCP sent from inside the
//!   namespace; the PASS counter must rise by at least the frames known to have arrived,
//!   and the program must be gone from the interface once the guard is dropped.
//! - pinning: counters survive a reload through a private bpffs mount, and an unmounted
//!   `/sys/fs/bpf` gets mounted on demand (checked in a private mount namespace).
//!
//! They need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Not root: skipped with a
//! message, unless `CI=true`, where that is a failure. Every test uses its own program
//! instance, its own names (pid + tag) and its own /30 from 198.51.100.0/24, so they run in
//! parallel; every namespace, link and mount is removed in `Drop`, on panic too.

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use gateway::xdp::{verdict, XdpError, XdpGuard, XdpMode};

const XDP_PASS: u32 = 2;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// True when the test may touch the kernel. Panics in CI without root.
fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            gateway::xdp::program_embedded(),
            "{test}: this test binary was built with AYA_BUILD_SKIP, so it carries no XDP \
             program; rebuild without AYA_BUILD_SKIP"
        );
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: CI=true but not running as root; the XDP tests need root and must not be skipped in CI");
    }
    // Straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must
    // be visible.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (CAP_BPF, CAP_NET_ADMIN); run as root, and CI=true makes this a failure"
    );
    false
}

// ---------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN: crafted frames, exact counts.

#[test]
fn prog_test_run_passes_and_counts_crafted_frames() {
    if !privileged("prog_test_run_passes_and_counts_crafted_frames") {
        return;
    }
    let guard = XdpGuard::load(None).expect("load the XDP program");
    assert!(guard.attachments().is_empty());
    let frames = [
        ("IPv4 TCP SYN", ipv4_tcp_syn()),
        ("IPv6 UDP", ipv6_udp()),
        ("ARP request", arp_request()),
        ("bare Ethernet header", ethernet(0x88b5, &[])),
    ];
    let mut bytes = 0;
    for (name, frame) in &frames {
        let action = guard
            .test_run(frame)
            .unwrap_or_else(|e| panic!("{name}: {e:#?}"));
        assert_eq!(action, XDP_PASS, "{name}");
        bytes += frame.len() as u64;
    }
    let counts = guard.packet_counts().expect("read counters");
    assert_eq!(
        counts.packets(verdict::PASS),
        frames.len() as u64,
        "{counts:?}"
    );
    assert_eq!(counts.get(verdict::PASS).bytes, bytes, "{counts:?}");
    assert_eq!(counts.total_packets(), frames.len() as u64, "{counts:?}");
}

#[test]
fn prog_test_run_repeats_count_every_run() {
    if !privileged("prog_test_run_repeats_count_every_run") {
        return;
    }
    let guard = XdpGuard::load(None).expect("load the XDP program");
    let frame = ipv4_tcp_syn();
    for _ in 0..100 {
        assert_eq!(guard.test_run(&frame).expect("test run"), XDP_PASS);
    }
    let counts = guard.packet_counts().expect("read counters");
    assert_eq!(counts.packets(verdict::PASS), 100);
    assert_eq!(counts.get(verdict::PASS).bytes, 100 * frame.len() as u64);
}

// ---------------------------------------------------------------------------------------
// Real traffic over a veth pair.

#[test]
fn generic_mode_counts_real_traffic() {
    if !privileged("generic_mode_counts_real_traffic") {
        return;
    }
    attach_and_send(XdpMode::Generic, 'g', XdpMode::Generic);
}

#[test]
fn native_mode_counts_real_traffic() {
    if !privileged("native_mode_counts_real_traffic") {
        return;
    }
    attach_and_send(XdpMode::Native, 'n', XdpMode::Native);
}

#[test]
fn auto_mode_attaches_natively_on_veth() {
    if !privileged("auto_mode_attaches_natively_on_veth") {
        return;
    }
    // veth has native XDP (PLATFORM.md), so auto must not fall back.
    attach_and_send(XdpMode::Auto, 'a', XdpMode::Native);
}

#[test]
fn unknown_interface_is_named_in_the_error() {
    if !privileged("unknown_interface_is_named_in_the_error") {
        return;
    }
    let interface = format!("gwx{}z", std::process::id());
    let err = XdpGuard::load_and_attach(std::slice::from_ref(&interface), XdpMode::Auto, None)
        .unwrap_err();
    assert!(
        matches!(&err, XdpError::Attach { interface: i, .. } if *i == interface),
        "{err:?}"
    );
    assert!(err.to_string().contains(&interface), "{err}");
}

fn attach_and_send(mode: XdpMode, tag: char, expected_mode: XdpMode) {
    let veth = VethPair::create(tag);
    let guard = XdpGuard::load_and_attach(std::slice::from_ref(&veth.host_if), mode, None)
        .unwrap_or_else(|e| panic!("attach in {mode} mode: {e:#?}"));
    assert_eq!(guard.attachments().len(), 1);
    assert_eq!(guard.attachments()[0].mode, expected_mode);
    let (kernel_mode, kernel_prog) = veth.attached_xdp().expect("ip link shows an XDP program");
    assert_eq!(kernel_prog, guard.program_id());
    assert_eq!(
        kernel_mode,
        if expected_mode == XdpMode::Native {
            1
        } else {
            2
        }
    );

    let before = guard.packet_counts().expect("read counters");
    let sent = veth.send_traffic();
    let after = guard.packet_counts().expect("read counters");
    let passed = after.packets(verdict::PASS) - before.packets(verdict::PASS);
    eprintln!(
        "{mode} on {}: {sent} frames sent, PASS rose by {passed}",
        veth.host_if
    );
    assert!(
        passed >= sent,
        "PASS counter rose by {passed}, but {sent} frames are known to have crossed \
         (before {before:?}, after {after:?})"
    );
    assert_eq!(after.packets(verdict::PASS_ERROR), 0, "{after:?}");

    drop(guard);
    assert_eq!(
        veth.attached_xdp(),
        None,
        "program still attached after the guard dropped"
    );
}

/// A namespace and a veth pair `host_if` (here) <-> `peer_if` (in `netns`) on their own /30.
struct VethPair {
    netns: String,
    host_if: String,
    host_addr: Ipv4Addr,
    peer_addr: Ipv4Addr,
}

/// Serialises address allocation within this process (tests run in parallel threads).
static ADDRESSES: Mutex<()> = Mutex::new(());

impl VethPair {
    fn create(tag: char) -> VethPair {
        let pid = std::process::id();
        let peer_if = format!("gwp{pid}{tag}");
        let _lock = ADDRESSES
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let block = free_block(pid, tag);
        // Built before the first command so Drop cleans up whatever got created.
        let veth = VethPair {
            netns: format!("gwx{pid}{tag}"),
            host_if: format!("gwh{pid}{tag}"),
            host_addr: Ipv4Addr::new(198, 51, 100, block + 1),
            peer_addr: Ipv4Addr::new(198, 51, 100, block + 2),
        };
        let (ns, host, peer) = (&veth.netns, &veth.host_if, &peer_if);
        ip(&["netns", "add", ns]);
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", veth.host_addr),
            "dev",
            host,
        ]);
        ip(&["link", "set", host, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", veth.peer_addr),
            "dev",
            peer,
        ]);
        ip(&["-n", ns, "link", "set", peer, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        veth
    }

    /// `(mode, program id)` of the XDP program on `host_if` per `ip -j link`, if any.
    /// Modes: 1 = driver (native), 2 = generic (skb).
    fn attached_xdp(&self) -> Option<(u64, u32)> {
        let json = ip_output(&["-j", "-d", "link", "show", "dev", &self.host_if]);
        let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let xdp = links.get(0)?.get("xdp")?;
        let mode = xdp.get("mode")?.as_u64()?;
        let id = xdp.get("prog")?.get("id")?.as_u64()?;
        Some((mode, u32::try_from(id).ok()?))
    }

    /// Sends UDP datagrams and one TCP exchange from inside the namespace to `host_addr`,
    /// checks they arrived, and returns how many frames certainly entered `host_if`.
    fn send_traffic(&self) -> u64 {
        const DATAGRAMS: u64 = 10;
        let udp = UdpSocket::bind((self.host_addr, 0)).expect("bind UDP");
        udp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind((self.host_addr, 0)).expect("bind TCP");
        let tcp_addr = tcp.local_addr().unwrap();
        let peer_addr = self.peer_addr;

        std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                enter_netns(&self.netns);
                let socket = UdpSocket::bind((peer_addr, 0)).expect("bind UDP in netns");
                for i in 0..DATAGRAMS {
                    socket
                        .send_to(&i.to_be_bytes(), udp_addr)
                        .expect("send UDP");
                }
                let mut stream =
                    TcpStream::connect_timeout(&tcp_addr, IO_TIMEOUT).expect("TCP connect");
                stream.write_all(b"hello").expect("TCP write");
            });

            // Join first: the kernel completes the handshake and buffers the data without
            // an accept, and if the sender failed, `accept` below would wait forever.
            sender.join().expect("netns sender thread");
            let mut buf = [0u8; 64];
            for _ in 0..DATAGRAMS {
                let (n, from) = udp
                    .recv_from(&mut buf)
                    .expect("UDP datagram from the netns");
                assert_eq!((n, from.ip()), (8, peer_addr.into()));
            }
            let (mut stream, _) = tcp.accept().expect("TCP accept");
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut received = Vec::new();
            stream.read_to_end(&mut received).expect("TCP read");
            assert_eq!(received, b"hello");
        });
        // Each datagram, and at least the SYN, the handshake's ACK and the data segment.
        DATAGRAMS + 3
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; deleting the namespace would too,
        // but the host end must go even if the namespace never got created.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Moves the calling thread (only) into network namespace `name`.
fn enter_netns(name: &str) {
    let file = File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Picks a /30 in 198.51.100.0/24 with no address in use on this host, starting at a
/// pid-derived block so concurrent test processes rarely collide.
fn free_block(pid: u32, tag: char) -> u8 {
    let used = ip_output(&["-o", "-4", "addr", "show"]);
    let start = (pid as usize * 7 + tag as usize) % 64;
    (0..64)
        .map(|i| ((start + i) % 64) as u8 * 4)
        .find(|&base| {
            (0..4).all(|offset| !used.contains(&format!("198.51.100.{}/", base + offset)))
        })
        .expect("a free /30 in 198.51.100.0/24")
}

fn ip(args: &[&str]) {
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
}

fn ip_output(args: &[&str]) -> String {
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

// ---------------------------------------------------------------------------------------
// Pinning.

#[test]
fn pinned_counters_survive_a_reload() {
    if !privileged("pinned_counters_survive_a_reload") {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let pin_path = bpffs.dir.join("gateway");
    let frame = ipv4_tcp_syn();
    {
        let guard = XdpGuard::load(Some(&pin_path)).expect("load with pinning");
        for _ in 0..3 {
            assert_eq!(guard.test_run(&frame).expect("test run"), XDP_PASS);
        }
        assert!(pin_path
            .join(gateway::xdp::names::VERDICT_COUNTERS)
            .exists());
    }
    let guard = XdpGuard::load(Some(&pin_path)).expect("reload with pinning");
    assert_eq!(
        guard
            .packet_counts()
            .expect("counters")
            .packets(verdict::PASS),
        3
    );
    assert_eq!(guard.test_run(&frame).expect("test run"), XDP_PASS);
    assert_eq!(
        guard
            .packet_counts()
            .expect("counters")
            .packets(verdict::PASS),
        4
    );
}

#[test]
fn unmounted_sys_fs_bpf_is_mounted_on_demand() {
    if !privileged("unmounted_sys_fs_bpf_is_mounted_on_demand") {
        return;
    }
    // In a private mount namespace of one thread, so the host's /sys/fs/bpf is untouched
    // and the bpffs mounted here (with its pins) vanishes with the thread.
    std::thread::spawn(|| {
        // SAFETY: plain syscalls on this thread's own fs context and mount namespace.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNS),
                0,
                "unshare: {}",
                std::io::Error::last_os_error()
            );
            let rc = libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            assert_eq!(rc, 0, "make / private: {}", std::io::Error::last_os_error());
            // Fails harmlessly when nothing is mounted there.
            libc::umount2(c"/sys/fs/bpf".as_ptr(), libc::MNT_DETACH);
        }
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/gateway-test-{}", std::process::id()));
        let guard = XdpGuard::load(Some(&pin_path)).unwrap_or_else(|e| panic!("{}", e.detail()));
        assert_eq!(guard.test_run(&ipv4_tcp_syn()).expect("test run"), XDP_PASS);
        assert!(pin_path
            .join(gateway::xdp::names::VERDICT_COUNTERS)
            .exists());
    })
    .join()
    .expect("thread in a private mount namespace");
}

/// A bpffs instance of our own on a temporary directory, so the test neither needs nor
/// touches /sys/fs/bpf. Unmounted (which frees its pins) and removed on drop.
struct PrivateBpffs {
    dir: PathBuf,
    mounted: bool,
}

impl PrivateBpffs {
    fn mount() -> PrivateBpffs {
        let dir = std::env::temp_dir().join(format!("gateway-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create mount point");
        let mut fs = PrivateBpffs {
            dir,
            mounted: false,
        };
        let target = c_path(&fs.dir);
        // SAFETY: NUL-terminated strings that outlive the call; no mount data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        fs.mounted = true;
        fs
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if self.mounted {
            let target = c_path(&self.dir);
            // SAFETY: NUL-terminated path; MNT_DETACH so a lingering fd cannot block it.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn c_path(path: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

// ---------------------------------------------------------------------------------------
// Crafted frames (checksums are left zero: the program does not verify them).

const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// 203.0.113.7:40000 -> 198.51.100.1:8080, SYN (RFC 791 and RFC 9293 header layouts).
fn ipv4_tcp_syn() -> Vec<u8> {
    let mut packet = vec![
        0x45, 0x00, 0x00, 40, // version 4, IHL 5, total length 40
        0x00, 0x01, 0x40, 0x00, // id 1, DF
        64, 6, 0x00, 0x00, // TTL 64, TCP, checksum
        203, 0, 113, 7, // source
        198, 51, 100, 1, // destination
    ];
    packet.extend_from_slice(&40000u16.to_be_bytes());
    packet.extend_from_slice(&8080u16.to_be_bytes());
    packet.extend_from_slice(&1u32.to_be_bytes()); // sequence
    packet.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment
    packet.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
    packet.extend_from_slice(&64240u16.to_be_bytes()); // window
    packet.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    ethernet(0x0800, &packet)
}

/// [2001:db8::7]:5353 -> [2001:db8::1]:53, 8 bytes of payload (RFC 8200, RFC 768).
fn ipv6_udp() -> Vec<u8> {
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&16u16.to_be_bytes()); // payload length
    packet.extend_from_slice(&[17, 64]); // UDP, hop limit
    packet.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    packet.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    packet.extend_from_slice(&5353u16.to_be_bytes());
    packet.extend_from_slice(&53u16.to_be_bytes());
    packet.extend_from_slice(&16u16.to_be_bytes()); // UDP length
    packet.extend_from_slice(&[0, 0]); // checksum
    packet.extend_from_slice(b"gateway!");
    ethernet(0x86dd, &packet)
}

/// Who has 198.51.100.1? Tell 198.51.100.2 (RFC 826).
fn arp_request() -> Vec<u8> {
    let mut packet = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1]; // Ethernet, IPv4, request
    packet.extend_from_slice(&SRC_MAC);
    packet.extend_from_slice(&[198, 51, 100, 2]);
    packet.extend_from_slice(&[0; 6]);
    packet.extend_from_slice(&[198, 51, 100, 1]);
    ethernet(0x0806, &packet)
}
