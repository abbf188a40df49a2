//! The launch configuration of one VM, parsed and checked before anything is created.
//!
//! `VmConfig` is what `waterbear run` builds from its flags and what the VM's state
//! directory records as `config.json`. Everything a user can get wrong is rejected here,
//! with the offending input named, before a file or a KVM object exists.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod devices;

use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::NetConfig;
pub use devices::VirtioDiscovery;

/// Default kernel command line for Linux guests: console on the first UART, reboot by
/// the keyboard controller (the VMM has no ACPI yet), and reboot at once on panic so a
/// broken guest ends the VMM instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// The smallest guest we agree to build: enough for the boot structures and a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Default root of the per-VM state directories.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/waterbear/vms";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid memory size '{0}': expected a number with an optional K, M, G or T suffix (a bare number means MiB)")]
    BadSize(String),
    #[error("guest memory of {size} bytes is below the minimum of {min} bytes")]
    MemoryTooSmall { size: u64, min: u64 },
    #[error("guest memory of {size} bytes is not a multiple of the {page}-byte page size")]
    MemoryNotPageAligned { size: u64, page: u64 },
    #[error(
        "invalid VM id '{0}': use 1 to 64 characters from A-Z a-z 0-9 . _ - not starting with '.'"
    )]
    BadId(String),
    #[error("invalid serial mode '{0}': expected stdio, null or file=PATH")]
    BadSerial(String),
    #[error(
        "invalid memory backend '{0}': expected memfd or hugepages (use --memory-file for a file)"
    )]
    BadBackend(String),
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("invalid {option} '{arg}': {why}")]
    BadDevice {
        option: &'static str,
        arg: String,
        why: String,
    },
    #[error("{what} '{value}' is used twice")]
    Duplicate { what: &'static str, value: String },
    #[error("{count} virtio devices requested; at most {max} fit with --virtio-discovery {discovery} (one interrupt line each)")]
    TooManyDevices {
        count: usize,
        max: usize,
        discovery: VirtioDiscovery,
    },
    #[error("invalid --virtio-discovery '{0}': expected acpi or cmdline")]
    BadDiscovery(String),
}

/// Where guest RAM lives. The mapping is always `MAP_SHARED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryBackend {
    /// An anonymous memfd: survives a re-exec of the VMM (the fd is inherited).
    Memfd,
    /// A memfd with `MFD_HUGETLB` (the system's default huge page size).
    Hugepages,
    /// A file on tmpfs, hugetlbfs or a DAX filesystem: survives the VMM process.
    File { path: PathBuf },
}

impl FromStr for MemoryBackend {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memfd" => Ok(MemoryBackend::Memfd),
            "hugepages" => Ok(MemoryBackend::Hugepages),
            other => Err(ConfigError::BadBackend(other.to_string())),
        }
    }
}

/// Where the guest's first UART goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialMode {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file; no input.
    File { path: PathBuf },
    /// Output discarded; no input.
    Null,
}

impl FromStr for SerialMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialMode::Stdio),
            "null" => Ok(SerialMode::Null),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(SerialMode::File { path: path.into() }),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

/// The kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// A Linux kernel image on disk (ELF vmlinux or bzImage).
    Path { path: PathBuf },
    /// The built-in test guest compiled into waterbear.
    Builtin,
}

/// Everything needed to launch one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub id: String,
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub memory: MemoryBackend,
    pub serial: SerialMode,
    pub state_dir: PathBuf,
    /// The control API socket; none for a VM run without one.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces, after the disks.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub virtio_discovery: VirtioDiscovery,
}

impl VmConfig {
    /// A one-vCPU built-in-guest configuration with its state in `dir`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(id: &str, dir: &std::path::Path) -> Self {
        VmConfig {
            id: id.into(),
            kernel: KernelSource::Builtin,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory_bytes: 16 << 20,
            memory: MemoryBackend::Memfd,
            serial: SerialMode::Null,
            state_dir: dir.into(),
            api_socket: None,
            disks: Vec::new(),
            nets: Vec::new(),
            virtio_discovery: VirtioDiscovery::Acpi,
        }
    }
}

/// Parses a size such as `512M`, `1G`, `1536MiB` or `256` (bare numbers are MiB, as in
/// Firecracker's `mem_size_mib`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let value: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        _ => return Err(bad()),
    };
    value
        .checked_mul(1u64 << shift)
        .filter(|v| *v > 0)
        .ok_or_else(bad)
}

/// Checks a VM id: it names a directory under the state root, so no separators, no
/// leading dot, nothing a shell would mangle.
pub fn check_id(id: &str) -> Result<(), ConfigError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > 64 || id.starts_with('.') || !id.chars().all(ok_char) {
        return Err(ConfigError::BadId(id.to_string()));
    }
    Ok(())
}

/// Checks the memory size against the minimum and the page size of the backend.
pub fn check_memory(size: u64, page_size: u64) -> Result<(), ConfigError> {
    if size < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall {
            size,
            min: MIN_MEMORY,
        });
    }
    if size % page_size != 0 {
        return Err(ConfigError::MemoryNotPageAligned {
            size,
            page: page_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
    }

    #[test]
    fn malformed_or_zero_sizes_are_rejected() {
        for bad in ["", "M", "12Q", "-5M", "0", "99999999999999T", "1.5G"] {
            assert!(parse_size(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn ids_that_could_escape_the_state_root_are_rejected() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "accepted {bad:?}");
        }
        check_id("vm-1.test_A").unwrap();
    }

    #[test]
    fn memory_must_be_a_multiple_of_the_page_size() {
        check_memory(512 << 20, 2 << 20).unwrap();
        assert_eq!(
            check_memory((512 << 20) + 4096, 2 << 20),
            Err(ConfigError::MemoryNotPageAligned {
                size: (512 << 20) + 4096,
                page: 2 << 20
            })
        );
        assert!(matches!(
            check_memory(1 << 20, 4096),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!("stdio".parse(), Ok(SerialMode::Stdio));
        assert_eq!("null".parse(), Ok(SerialMode::Null));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialMode::File {
                path: "/tmp/x".into()
            })
        );
        assert!("file=".parse::<SerialMode>().is_err());
        assert!("tcp".parse::<SerialMode>().is_err());
    }
}
