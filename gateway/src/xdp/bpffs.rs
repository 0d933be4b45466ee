//! The pin directory: it must lie on bpffs; the conventional `/sys/fs/bpf` is mounted on
//! demand when nothing mounted it.

use std::{io, path::Path};

use super::XdpError;

/// `statfs(2)` magic of bpffs (include/uapi/linux/magic.h).
pub(super) const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted (systemd mounts it there at boot).
pub(super) const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Creates `dir` if needed, after checking it lies on bpffs: a pin elsewhere fails with an
/// opaque EPERM, and creating folders in the unmounted `/sys/fs/bpf` (sysfs) fails too.
///
/// A pin path under `/sys/fs/bpf` on a system where nothing mounted bpffs there gets it
/// mounted, as bpftool and Cilium do: operators expect the conventional location to work,
/// and a bpffs mount is global but inert. Any other location must already be bpffs.
pub(super) fn prepare_pin_dir(dir: &Path) -> Result<(), XdpError> {
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

pub(super) fn mount_bpffs(target: &Path) -> io::Result<()> {
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

pub(super) fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))
}

pub(super) fn is_bpffs(path: &Path) -> io::Result<bool> {
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
    fn non_bpffs_pin_path_is_refused_before_anything_is_created() {
        let dir = std::env::temp_dir().join(format!("gateway-xdp-pin-{}", std::process::id()));
        assert!(matches!(
            prepare_pin_dir(&dir),
            Err(XdpError::NotBpffs { .. })
        ));
        assert!(!dir.exists());
    }
}
