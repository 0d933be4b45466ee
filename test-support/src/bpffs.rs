//! bpffs for tests: the gateway pins its XDP maps under a bpffs directory, and a test must
//! neither share pins with another run nor leave them behind (pinned maps outlive the
//! process and keep their memory).
//!
//! - [`bpffs_mounted_at`]: whether a bpffs is mounted at a path (`/proc/mounts`).
//! - [`PrivateBpffs`]: a bpffs of our own on a fresh temporary directory, for tests that
//!   neither need nor may touch `/sys/fs/bpf`; unmounting it frees every pin in it.
//! - [`PinDir`]: a unique pin directory under `/sys/fs/bpf`, removed on drop, for runs of
//!   the real binary, which pins where its config says.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the gateway pins by default, and where bpffs is normally mounted.
pub const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// True when `/proc/mounts` lists a bpf filesystem mounted exactly at `dir`.
pub fn bpffs_mounted_at(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, at, fstype) = (fields.next(), fields.next(), fields.next());
        at.map(Path::new) == Some(dir) && fstype == Some("bpf")
    })
}

/// A name unique to this process and call: `{prefix}-{pid}-{n}`.
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A bpffs instance of our own on a fresh temporary directory; unmounted (which frees its
/// pins) and the directory removed on drop, also on panic. Needs CAP_SYS_ADMIN.
#[derive(Debug)]
pub struct PrivateBpffs {
    dir: PathBuf,
    mounted: bool,
}

impl PrivateBpffs {
    /// Mounts it; panics with the errno when the mount fails.
    pub fn mount() -> PrivateBpffs {
        let dir = std::env::temp_dir().join(unique("gateway-test-bpffs"));
        std::fs::create_dir_all(&dir).expect("create the bpffs mount point");
        // Built before the mount so that Drop removes the directory if it fails.
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

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
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
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// A pin directory `/sys/fs/bpf/{name}-{pid}-{n}` that nobody else uses; not created here
/// (the gateway creates its pin path), removed with everything pinned in it on drop.
/// Declare it before whatever pins into it, so that it is dropped after that stopped.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        PinDir(Path::new(SYS_FS_BPF).join(unique(name)))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unlinking a pin drops the kernel's reference to the map.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_bpffs_is_mounted_and_gone_after_drop() {
        if !crate::privileged(
            "private_bpffs_is_mounted_and_gone_after_drop",
            "CAP_SYS_ADMIN",
        ) {
            return;
        }
        let fs = PrivateBpffs::mount();
        let dir = fs.dir().to_path_buf();
        assert!(bpffs_mounted_at(&dir), "{} not a bpffs", dir.display());
        // A second one is another mount on another directory.
        let other = PrivateBpffs::mount();
        assert_ne!(other.dir(), fs.dir());
        drop(fs);
        assert!(!bpffs_mounted_at(&dir), "{} still mounted", dir.display());
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn pin_dirs_are_unique_and_removed_with_their_contents() {
        if !crate::privileged(
            "pin_dirs_are_unique_and_removed_with_their_contents",
            "CAP_SYS_ADMIN",
        ) {
            return;
        }
        // On a private bpffs standing in for /sys/fs/bpf, so the host's stays untouched.
        let fs = PrivateBpffs::mount();
        let (a, b) = (PinDir::new("kit"), PinDir::new("kit"));
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(SYS_FS_BPF));
        let pin = PinDir(fs.dir().join(unique("kit")));
        std::fs::create_dir_all(pin.path().join("nested")).unwrap();
        let path = pin.path().to_path_buf();
        drop(pin);
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
