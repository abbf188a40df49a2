//! Live update: the running VMM pauses its guest, saves vCPU and device state, and
//! re-executes itself (or a new binary) with the guest memory descriptor, the API
//! socket and the saved state handed over; the new process restores and resumes.
//!
//! Safety net, in three layers:
//! 1. Before pausing, the new binary must answer `--version` as a waterbear; a binary
//!    that does not is refused with the guest untouched.
//! 2. If `execve` fails, the old process resumes the guest itself.
//! 3. If the new binary starts but cannot restore, it executes the old binary (kept
//!    open as a descriptor from the start) with the same hand-over, which restores the
//!    guest and reports the failure in `GET /vm`'s `last_update`.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::MemoryBackend;
use super::saved::VmSnapshot;
use crate::snapshot::{self, SnapshotError};

/// The hidden subcommand a re-executed VMM starts with.
pub const RESUME_COMMAND: &str = "__resume-update";
/// Environment variable that makes `__resume-update` fail before restoring, so tests
/// can exercise the fallback. Only read by the receiving side.
pub const FAIL_RESTORE_ENV: &str = "WATERBEAR_TEST_FAIL_UPDATE_RESTORE";

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("update binary {path} does not exist or is not executable")]
    NotExecutable { path: PathBuf },
    #[error("update binary {path} is not a waterbear binary (`--version` printed {printed:?})")]
    NotWaterbear { path: PathBuf, printed: String },
    #[error("cannot prepare the hand-over: {what}")]
    Prepare {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot encode the hand-over")]
    Encode(#[source] SnapshotError),
    #[error("cannot execute {path}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the hand-over from descriptor {fd}")]
    Read { fd: RawFd, source: SnapshotError },
}

/// Everything the new process needs, passed in a memfd.
#[derive(Clone, Serialize, Deserialize)]
pub struct Handoff {
    pub snapshot: VmSnapshot,
    /// The memory backend as the VM was started with (the descriptor carries it).
    pub backend: MemoryBackend,
    pub memory_fd: RawFd,
    pub api_listener_fd: Option<RawFd>,
    /// The network interfaces' taps, in configuration order: kept attached so that
    /// frames arriving during the update wait in the tap instead of being dropped.
    pub tap_fds: Vec<RawFd>,
    /// The disks, in configuration order: the same files (even renamed or deleted since)
    /// with their locks held throughout.
    pub disk_fds: Vec<RawFd>,
    /// The binary that was running, opened for a fallback `fexecve`.
    pub fallback_exe_fd: RawFd,
    /// CLOCK_MONOTONIC when the pause began, to measure the blackout across exec.
    pub pause_started_ns: u64,
    /// How many live updates this VM has been through before this one.
    pub generation: u64,
    pub binary: PathBuf,
    /// Set when the new binary failed and the old one restores instead.
    pub failure: Option<String>,
    /// The terminal attributes before waterbear made stdin raw.
    pub terminal: Option<Vec<u8>>,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    /// The VM was paused before the update and stays paused after it.
    pub paused: bool,
    /// A memory file whose snapshot marker is valid while the VM stays paused.
    pub snapshot_memory: Option<PathBuf>,
    /// Whether the VMM that first started this VM created its state directory and lock
    /// file, so that the last process removes them when the VM stops.
    pub state_dir_owned: (bool, bool),
    /// The state format the hand-over arrived in (not part of it): a fallback writes it
    /// back in that format, the only one the previous binary may read.
    #[serde(skip, default = "current_format")]
    pub format_version: u32,
}

fn current_format() -> u32 {
    snapshot::FORMAT_VERSION
}

impl Handoff {
    /// Every descriptor the hand-over passes by number.
    pub fn descriptors(&self) -> impl Iterator<Item = RawFd> + '_ {
        [
            Some(self.memory_fd),
            self.api_listener_fd,
            Some(self.fallback_exe_fd),
        ]
        .into_iter()
        .flatten()
        .chain(self.tap_fds.iter().copied())
        .chain(self.disk_fds.iter().copied())
    }
}

/// The outcome of the last live update, for `GET /vm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateReport {
    pub generation: u64,
    pub binary: PathBuf,
    pub blackout_ms: f64,
    /// `updated`, or `fallback` when the old binary resumed the guest.
    pub outcome: String,
    pub error: Option<String>,
}

/// CLOCK_MONOTONIC in nanoseconds; comparable across `execve`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Checks that `binary` is an executable waterbear, before anything is paused.
pub fn check_binary(binary: &Path) -> Result<(), UpdateError> {
    let not_exec = || UpdateError::NotExecutable {
        path: binary.into(),
    };
    let c = CString::new(binary.as_os_str().as_encoded_bytes()).map_err(|_| not_exec())?;
    // SAFETY: access() reads the NUL-terminated path only.
    if !binary.is_file() || unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(not_exec());
    }
    // Bounded: the check runs on the VMM's event loop, which must not wait on a binary
    // that hangs.
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|_| not_exec())?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpdateError::NotWaterbear {
                    path: binary.into(),
                    printed: "nothing within 5 s".into(),
                });
            }
        }
    };
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
    }
    let printed = stdout.lines().next().unwrap_or("").to_string();
    if !status.success() || !printed.starts_with("waterbear ") {
        return Err(UpdateError::NotWaterbear {
            path: binary.into(),
            printed,
        });
    }
    Ok(())
}

/// Sets or clears close-on-exec on a descriptor.
pub fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number; failures are reported, nothing is dereferenced.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the running binary for a later fallback `fexecve`.
pub fn open_self_exe() -> std::io::Result<File> {
    File::open("/proc/self/exe")
}

/// Writes the hand-over into a new memfd without close-on-exec.
pub fn write_handoff(handoff: &Handoff) -> Result<OwnedFd, UpdateError> {
    let bytes = super::compat::encode_handoff(handoff).map_err(UpdateError::Encode)?;
    let name = c"waterbear-handoff";
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(UpdateError::Prepare {
            what: "memfd",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(&bytes)
        .map_err(|source| UpdateError::Prepare {
            what: "write",
            source,
        })?;
    Ok(file.into())
}

/// Reads the hand-over from the descriptor the old process passed, and closes it.
pub fn read_handoff(fd: RawFd) -> Result<Handoff, UpdateError> {
    let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
    let read = (|| {
        let (header, payload) = snapshot::read_file(&path)?;
        super::compat::decode_handoff(&path, header.version, &payload)
    })();
    // SAFETY: the descriptor was handed to this process for this purpose only.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    read.map_err(|source| UpdateError::Read { fd, source })
}

fn argv(handoff_fd: RawFd) -> Vec<CString> {
    [
        "waterbear",
        RESUME_COMMAND,
        "--handoff-fd",
        &handoff_fd.to_string(),
    ]
    .iter()
    .map(|a| CString::new(*a).expect("no NUL in fixed arguments"))
    .collect()
}

/// Replaces this process with `binary`, handing over `handoff_fd`. Returns only on
/// failure.
pub fn exec_binary(binary: &Path, handoff_fd: RawFd) -> UpdateError {
    let args = argv(handoff_fd);
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let Ok(path) = CString::new(binary.as_os_str().as_encoded_bytes()) else {
        return UpdateError::NotExecutable {
            path: binary.into(),
        };
    };
    // SAFETY: path and argv are NUL-terminated strings that outlive the call, argv is
    // null-terminated; environ is the process's own environment.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    UpdateError::Exec {
        path: binary.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Replaces this process with the binary open at `exe_fd`. Returns only on failure.
pub fn exec_fd(exe_fd: RawFd, handoff_fd: RawFd) -> UpdateError {
    let args = argv(handoff_fd);
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: as for execv; `environ` is the process environment maintained by libc.
    unsafe { libc::fexecve(exe_fd, ptrs.as_ptr(), environ) };
    UpdateError::Exec {
        path: PathBuf::from(format!("fd {exe_fd}")),
        source: std::io::Error::last_os_error(),
    }
}

/// Reads the terminal attributes of stdin as bytes, to restore them at the very end.
pub fn terminal_bytes(t: &libc::termios) -> Vec<u8> {
    // SAFETY: termios is a plain C struct; viewing its bytes for its size is sound.
    unsafe {
        std::slice::from_raw_parts(
            (t as *const libc::termios).cast::<u8>(),
            std::mem::size_of::<libc::termios>(),
        )
    }
    .to_vec()
}

/// The inverse of `terminal_bytes`.
pub fn terminal_from_bytes(b: &[u8]) -> Option<libc::termios> {
    if b.len() != std::mem::size_of::<libc::termios>() {
        return None;
    }
    // SAFETY: termios is plain old data and `b` has exactly its size.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<libc::termios>()) })
}
