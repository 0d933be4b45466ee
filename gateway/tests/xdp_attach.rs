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
//! instance and its own veth rig from `gateway-test-support` (unique names, its own /30 of
//! 198.51.100.0/24), so they run in parallel; every namespace, link and mount is removed in
//! `Drop`, on panic too.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use gateway::xdp::{verdict, XdpError, XdpGuard, XdpMode};
use gateway_test_support::{enter_netns, PrivateBpffs, VethPair};

mod common;
use common::privileged;

const XDP_PASS: u32 = 2;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

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
    attach_and_send(XdpMode::Generic, XdpMode::Generic);
}

#[test]
fn native_mode_counts_real_traffic() {
    if !privileged("native_mode_counts_real_traffic") {
        return;
    }
    attach_and_send(XdpMode::Native, XdpMode::Native);
}

#[test]
fn auto_mode_attaches_natively_on_veth() {
    if !privileged("auto_mode_attaches_natively_on_veth") {
        return;
    }
    // veth has native XDP (PLATFORM.md), so auto must not fall back.
    attach_and_send(XdpMode::Auto, XdpMode::Native);
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

fn attach_and_send(mode: XdpMode, expected_mode: XdpMode) {
    let veth = VethPair::create();
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
    let sent = send_traffic(&veth);
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

/// Sends UDP datagrams and one TCP exchange from inside the namespace to `host4`,
/// checks they arrived, and returns how many frames certainly entered `host_if`.
fn send_traffic(veth: &VethPair) -> u64 {
    const DATAGRAMS: u64 = 10;
    let udp = UdpSocket::bind((veth.host4, 0)).expect("bind UDP");
    udp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind((veth.host4, 0)).expect("bind TCP");
    let tcp_addr = tcp.local_addr().unwrap();
    let peer_addr = veth.peer4;

    std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            enter_netns(&veth.netns).expect("enter the namespace");
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

// ---------------------------------------------------------------------------------------
// Pinning.

#[test]
fn pinned_counters_survive_a_reload() {
    if !privileged("pinned_counters_survive_a_reload") {
        return;
    }
    let bpffs = PrivateBpffs::mount();
    let pin_path = bpffs.dir().join("gateway");
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
