//! Loading a kernel with the `kexec_file_load` system call and rebooting into it, so no
//! external kexec tool is needed.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `KEXEC_FILE_NO_INITRAMFS`: no initrd descriptor is passed.
const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel command line contains a NUL byte")]
    Cmdline,
    #[error("kexec_file_load of {kernel} refused")]
    Load {
        kernel: PathBuf,
        source: std::io::Error,
    },
    #[error("reboot into the loaded kernel failed")]
    Reboot(#[source] std::io::Error),
}

/// Loads `kernel` (and `initrd`) with `cmdline` as the kernel to boot on the next
/// `reboot(LINUX_REBOOT_CMD_KEXEC)`.
pub fn load(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> Result<(), KexecError> {
    let open = |what, path: &Path| {
        File::open(path).map_err(|source| KexecError::Open {
            what,
            path: path.into(),
            source,
        })
    };
    let kernel_file = open("kernel", kernel)?;
    let initrd_file = initrd.map(|p| open("initrd", p)).transpose()?;
    let cmdline = CString::new(cmdline).map_err(|_| KexecError::Cmdline)?;
    let bytes = cmdline.as_bytes_with_nul();
    let (initrd_fd, flags) = match &initrd_file {
        Some(f) => (f.as_raw_fd(), 0),
        None => (-1, KEXEC_FILE_NO_INITRAMFS),
    };
    // SAFETY: the descriptors are open for the duration of the call, the command line
    // pointer and length describe a NUL-terminated buffer that outlives it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel_file.as_raw_fd(),
            initrd_fd,
            bytes.len() as libc::c_ulong,
            bytes.as_ptr(),
            flags,
        )
    };
    if ret != 0 {
        return Err(KexecError::Load {
            kernel: kernel.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Flushes filesystems and reboots into the loaded kernel. Returns only on failure.
pub fn reboot_into_loaded() -> KexecError {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    }
    KexecError::Reboot(std::io::Error::last_os_error())
}
