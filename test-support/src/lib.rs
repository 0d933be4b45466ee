//! The one test kit of the workspace: what the gateway's tests, the integration tests, the
//! benchmarks, xtask and the fuzz targets need from the machine, written once.
//!
//! Before this crate each of them carried its own copy (three veth rigs, four port pickers,
//! two bpffs mounts, two accept-any TLS verifiers), and the copies had drifted: one cleaned
//! up a half-built rig, another did not; one serialised address picking, another did not.
//! A fix now lands everywhere at once.
//!
//! - [`free_port`] / [`free_addr`]: a port nothing listens on (bind port 0, read, release).
//! - [`netns`]: a network namespace joined to this one by a veth pair, with addresses from
//!   the documentation ranges, removed on drop (also on panic).
//! - [`bpffs`]: is bpffs mounted, a private bpffs mount, a unique pin directory.
//! - [`process`]: stopping a child (SIGTERM, grace, SIGKILL), and killing one on drop.
//! - [`privileged`]: the root check every privileged test starts with (never a silent skip).
//! - `tls` (feature `tls`): a server-certificate verifier that accepts any certificate.
//!
//! Dependencies are kept to libc and serde_json (rustls only with `tls`), so xtask and the
//! benches can use it without building a TLS stack.

pub mod bpffs;
pub mod netns;
pub mod process;
#[cfg(feature = "tls")]
pub mod tls;

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

pub use bpffs::{bpffs_mounted_at, PinDir, PrivateBpffs};
pub use netns::{enter_netns, in_netns, VethPair};
pub use process::{stop_child, stop_child_and_pid_file, KillOnDrop};

/// A TCP port on `ip` that was free a moment ago: bound to port 0, read, released.
///
/// The kernel picks the port, so concurrent tests and processes never race over a fixed
/// number; the short window until the caller binds it again is the accepted cost of handing
/// a port to another process (the gateway, nginx) by configuration.
pub fn free_port_on(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("bind {ip} port 0: {e}"))
        .port()
}

/// A free TCP port on 127.0.0.1 (see [`free_port_on`]).
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST.into())
}

/// `127.0.0.1:<free port>` (see [`free_port_on`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// True when this process is root, so a privileged test may touch the kernel.
///
/// Not root: prints a `SKIPPED` line straight to stderr (libtest captures `eprintln!` of
/// passing tests, and a skip must be visible) and returns false, unless `CI=true`, where it
/// panics: CI must never pass by skipping. `needs` says what the test needs root for.
pub fn privileged(test: &str, needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: CI=true but not running as root; it needs {needs} and must not be skipped in CI");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root ({needs}); run as root, and CI=true makes this a failure"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addr_is_a_bindable_loopback_address() {
        let addr = free_addr();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_ne!(addr.port(), 0);
        let listener = TcpListener::bind(addr).expect("the free address binds");
        assert_eq!(listener.local_addr().unwrap(), addr);
    }

    #[test]
    fn free_port_on_unspecified_binds_every_address() {
        let port = free_port_on(Ipv4Addr::UNSPECIFIED.into());
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("the free port binds");
    }
}
