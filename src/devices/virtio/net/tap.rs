//! A tap interface as the host side of a virtio-net device.
//!
//! [`Tap::open`] attaches to a tap interface that already exists (the operator creates it,
//! with its bridge or routing, e.g. `ip tuntap add dev NAME mode tap`); it never creates
//! one. The attachment is non-blocking and close-on-exec, exchanges frames with a
//! 12-byte `virtio_net_hdr_v1` in front (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), without the
//! packet-information prefix (`IFF_NO_PI`), and with every offload turned off
//! (`TUNSETOFFLOAD` 0), so the host kernel checksums and segments frames before they
//! reach the guest. Each failure is a [`TapError`] that names the tap and says what to do.
//!
//! Bringing the interface up, addressing and bridging it are the operator's business.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::{self, Backend, TxFrame};
use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap interface {name}, which this VM is attached to, was deleted: the guest's network \
         interface has no link and a live update cannot hand it over; save the VM (ctl \
         snapshot DIR --keep-paused), stop it, create the tap again and restore it"
    )]
    Deleted { name: String },
    #[error(
        "tap interface name {name:?} is not valid: {why}; give the name of an existing tap \
         interface"
    )]
    InvalidName { name: String, why: &'static str },
    #[error(
        "tap interface {name} does not exist; create it first, e.g. \
         `ip tuntap add dev {name} mode tap`"
    )]
    NotFound { name: String },
    #[error(
        "network interface {name} is not a tap interface that can be attached (it is another \
         kind of interface, a tun, or a multi-queue tap); give a tap created with \
         `ip tuntap add dev {name} mode tap`"
    )]
    NotATap { name: String },
    #[error(
        "tap interface {name} is busy: another process (another VM?) has it open; stop that \
         process or give each VM its own tap"
    )]
    Busy { name: String },
    #[error(
        "no permission to attach to tap interface {name}; run with CAP_NET_ADMIN or create \
         the tap for this user (`ip tuntap add dev {name} mode tap user USER`)"
    )]
    PermissionDenied { name: String },
    #[error(
        "{TUN_PATH} is missing, so tap interface {name} cannot be opened; load the tun \
         kernel module (`modprobe tun`)"
    )]
    TunMissing { name: String },
    #[error("cannot open {TUN_PATH} for tap interface {name}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap interface {name}: cannot {step}")]
    Setup {
        name: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An attached tap interface; dropping it detaches (a persistent tap stays).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap interface `name` in the caller's network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        // TUNSETIFF creates a missing interface when the caller has CAP_NET_ADMIN, so the
        // interface must be known to exist first.
        let index = if_index(name)?.ok_or_else(|| TapError::NotFound { name: name.into() })?;
        let fd = open_tun(name)?;
        attach(&fd, name)?;
        // Had the interface vanished in between, TUNSETIFF made a new one, which goes away
        // again when `fd` is dropped.
        if if_index(name)? != Some(index) {
            return Err(TapError::NotFound { name: name.into() });
        }
        configure(&fd, name)?;
        Ok(Self {
            fd,
            name: name.to_string(),
        })
    }

    /// Takes over a descriptor that is already attached to the tap `name`: one handed
    /// over by the previous process in a live update, so that no frame is dropped while
    /// the tap would have had no reader. Checks with TUNGETIFF that it is that tap.
    pub fn from_attached(name: &str, fd: OwnedFd) -> Result<Self, TapError> {
        check_attached(fd.as_raw_fd(), name)?;
        // The flags (non-blocking) belong to the open file, which the previous process
        // shared; set them again all the same.
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Self {
            fd,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A tap reports the whole frame's length even when it had to cut it short.
        backend::read_frame(self.fd.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<usize> {
        backend::writev_frame(self.fd.as_raw_fd(), frame)
    }
}

/// Checks with TUNGETIFF that `fd` is attached to the tap interface `name`, which still
/// exists (a deleted interface leaves its descriptors in a bad state, EBADFD).
pub fn check_attached(fd: RawFd, name: &str) -> Result<(), TapError> {
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq, which `ifr` is, alive for the call.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EBADFD) {
            return Err(TapError::Deleted {
                name: name.to_string(),
            });
        }
        return Err(TapError::Setup {
            name: name.to_string(),
            step: "check its descriptor is still attached (TUNGETIFF)",
            source,
        });
    }
    let attached: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    if attached != name.as_bytes() || flags & libc::IFF_TAP == 0 {
        return Err(TapError::Setup {
            name: name.to_string(),
            step: "check its descriptor is still attached",
            source: io::Error::other(format!(
                "it is attached to {}, not to this tap",
                String::from_utf8_lossy(&attached)
            )),
        });
    }
    Ok(())
}

/// Refuses names the kernel would refuse, or would take as a pattern (`%d`) and create.
fn check_name(name: &str) -> Result<(), TapError> {
    let why = if name.is_empty() {
        "it is empty"
    } else if name.len() >= libc::IFNAMSIZ {
        "it is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "it is . or .."
    } else if name.contains(['/', ':', '%', '\0']) {
        "it contains '/', ':', '%' or a NUL byte"
    } else if name.chars().any(char::is_whitespace) {
        "it contains whitespace"
    } else {
        return Ok(());
    };
    Err(TapError::InvalidName {
        name: name.to_string(),
        why,
    })
}

/// The interface index of `name` in the caller's network namespace, `None` if there is no
/// such interface.
fn if_index(name: &str) -> Result<Option<u32>, TapError> {
    let setup = |source| TapError::Setup {
        name: name.to_string(),
        step: "look up its interface index",
        source,
    };
    let c_name = CString::new(name).map_err(|_| setup(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: `c_name` is a NUL-terminated string that lives through the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index != 0 {
        return Ok(Some(index));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODEV) => Ok(None),
        _ => Err(setup(e)),
    }
}

fn open_tun(name: &str) -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::TunMissing {
                name: name.to_string(),
            },
            Some(libc::EACCES | libc::EPERM) => TapError::PermissionDenied {
                name: name.to_string(),
            },
            _ => TapError::OpenTun {
                name: name.to_string(),
                source,
            },
        })?;
    Ok(file.into())
}

/// TUNSETIFF: attaches `fd` to the tap `name`.
fn attach(fd: &OwnedFd, name: &str) -> Result<(), TapError> {
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // check_name ensured fewer than IFNAMSIZ bytes, so the name stays NUL-terminated.
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is, alive for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    let name = name.to_string();
    Err(match source.raw_os_error() {
        Some(libc::EINVAL) => TapError::NotATap { name },
        Some(libc::EBUSY) => TapError::Busy { name },
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { name },
        _ => TapError::Setup {
            name,
            step: "attach to it (TUNSETIFF)",
            source,
        },
    })
}

/// Sets the header size the device exchanges and turns every offload off.
fn configure(fd: &OwnedFd, name: &str) -> Result<(), TapError> {
    let setup = |step| {
        let source = io::Error::last_os_error();
        TapError::Setup {
            name: name.to_string(),
            step,
            source,
        }
    };
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(setup("set its virtio-net header size (TUNSETVNETHDRSZ)"));
    }
    // A persistent tap keeps the offloads its previous user enabled; without them the
    // kernel finishes checksums and segmentation itself. The argument is a value.
    // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(setup("turn off its offloads (TUNSETOFFLOAD)"));
    }
    Ok(())
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
