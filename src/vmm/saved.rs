//! A saved VM on disk: the snapshot directory layout, the payload that goes into the
//! snapshot file, and the marker that ties a memory file to the snapshot whose memory
//! it holds.
//!
//! A snapshot directory holds `vm.state` (the framed payload), `vm.json` (a readable
//! description) and, for memfd-backed VMs, `memory` (guest RAM written out). File-backed
//! memory is referenced, not copied; a marker file `<memory>.waterbear-saved` holding
//! the snapshot's token says that the memory file still holds exactly the memory that
//! snapshot describes. Whoever changes the memory (a resumed or restored VM) removes the
//! marker, so a stale snapshot is refused instead of resuming a guest on memory that
//! moved on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::VmConfig;
use super::memory::saved_marker;
use super::state::{VcpuState, VmState};
use super::virtio::VirtioDeviceState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::snapshot::{self, SnapshotError};

pub const STATE_FILE: &str = "vm.state";
pub const DESCRIPTION_FILE: &str = "vm.json";
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("snapshot directory {0} does not exist")]
    NoDir(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {path} of the snapshot is missing")]
    MemoryMissing { path: PathBuf },
    #[error("memory file {path} is {actual} bytes but the snapshot's guest has {expected}")]
    MemorySize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("memory file {path} no longer holds this snapshot's memory ({why}); the guest ran on after the snapshot or the snapshot is another VM's")]
    MemoryMoved { path: PathBuf, why: &'static str },
    #[error("snapshot description {path} is damaged: {why}")]
    Description { path: PathBuf, why: String },
    #[error("the snapshot in {dir} is inconsistent: {why}")]
    Inconsistent { dir: PathBuf, why: String },
}

/// The memory a snapshot describes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedMemory {
    /// Absolute path, or a path relative to the snapshot directory.
    pub path: PathBuf,
    pub size: u64,
    /// Random number also written to the memory file's marker.
    pub token: u64,
    /// The memory was written out by the snapshot (memfd) rather than referenced.
    pub copied: bool,
}

/// The state of the emulated devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: SerialDeviceState,
    pub i8042: I8042State,
    /// One per virtio device, in configuration order (disks, then network interfaces).
    pub virtio: Vec<VirtioDeviceState>,
}

/// Everything needed to bring a VM back: the payload of `vm.state`.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub config: VmConfig,
    pub memory: SavedMemory,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
    pub saved_unix_ms: u64,
}

impl VmSnapshot {
    /// Checks the parts that must agree with one another before anything is built.
    pub fn check(&self, dir: &Path) -> Result<(), SavedError> {
        let bad = |why: String| SavedError::Inconsistent {
            dir: dir.into(),
            why,
        };
        if self.vcpus.len() != usize::from(self.config.cpus) || self.vcpus.is_empty() {
            return Err(bad(format!(
                "{} vCPU states for a VM of {} vCPUs",
                self.vcpus.len(),
                self.config.cpus
            )));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return Err(bad(format!("vCPU state {i} is for vCPU {}", v.index)));
            }
        }
        let devices = self.config.disks.len() + self.config.nets.len();
        if self.devices.virtio.len() != devices {
            return Err(bad(format!(
                "{} virtio device states for a VM configured with {devices} devices",
                self.devices.virtio.len()
            )));
        }
        if self.memory.size != self.config.memory_bytes {
            return Err(bad(format!(
                "memory of {} bytes for a VM configured with {}",
                self.memory.size, self.config.memory_bytes
            )));
        }
        Ok(())
    }

    /// The memory file's path, resolved against the snapshot directory.
    pub fn memory_path(&self, dir: &Path) -> PathBuf {
        if self.memory.path.is_absolute() {
            self.memory.path.clone()
        } else {
            dir.join(&self.memory.path)
        }
    }
}

/// The readable description written next to the state.
#[derive(Debug, Serialize, Deserialize)]
pub struct Description {
    pub id: String,
    pub config: VmConfig,
    pub memory: SavedMemory,
    pub state_file: String,
    pub saved_unix_ms: u64,
    pub waterbear_version: String,
}

/// Writes `vm.state` and `vm.json` into `dir` (each atomically) and the memory marker.
pub fn write_snapshot(dir: &Path, snap: &VmSnapshot) -> Result<snapshot::Header, SavedError> {
    let header = snapshot::write_file(&dir.join(STATE_FILE), snap)?;
    let desc = Description {
        id: snap.config.id.clone(),
        config: snap.config.clone(),
        memory: snap.memory.clone(),
        state_file: STATE_FILE.into(),
        saved_unix_ms: snap.saved_unix_ms,
        waterbear_version: env!("CARGO_PKG_VERSION").into(),
    };
    let json = serde_json::to_vec_pretty(&desc).expect("the description always serialises");
    let desc_path = dir.join(DESCRIPTION_FILE);
    snapshot::write_atomic(&desc_path, &json).map_err(|source| SavedError::Write {
        path: desc_path,
        source,
    })?;
    write_marker(&snap.memory_path(dir), snap.memory.token)?;
    Ok(header)
}

/// Reads and checks `dir/vm.state`.
pub fn read_snapshot(dir: &Path) -> Result<VmSnapshot, SavedError> {
    if !dir.is_dir() {
        return Err(SavedError::NoDir(dir.into()));
    }
    let path = dir.join(STATE_FILE);
    let (header, payload) = snapshot::read_file(&path)?;
    let snap = super::compat::decode_snapshot(&path, header.version, &payload)?;
    snap.check(dir)?;
    check_description(dir, &snap)?;
    Ok(snap)
}

/// `vm.json` must parse and describe the same snapshot as `vm.state`: a damaged or
/// mismatched description means the directory was tampered with or mixed up.
fn check_description(dir: &Path, snap: &VmSnapshot) -> Result<(), SavedError> {
    let path = dir.join(DESCRIPTION_FILE);
    let bytes = std::fs::read(&path).map_err(|e| SavedError::Description {
        path: path.clone(),
        why: e.to_string(),
    })?;
    let desc: Description =
        serde_json::from_slice(&bytes).map_err(|e| SavedError::Description {
            path: path.clone(),
            why: e.to_string(),
        })?;
    if desc.id != snap.config.id || desc.memory != snap.memory {
        return Err(SavedError::Description {
            path,
            why: "it describes another snapshot than vm.state".into(),
        });
    }
    Ok(())
}

/// Checks that the memory file exists, has the snapshot's size and still holds the
/// snapshot's memory (its marker carries the snapshot's token).
pub fn check_memory_file(dir: &Path, snap: &VmSnapshot) -> Result<PathBuf, SavedError> {
    let path = snap.memory_path(dir);
    let meta =
        std::fs::metadata(&path).map_err(|_| SavedError::MemoryMissing { path: path.clone() })?;
    if meta.len() != snap.memory.size {
        return Err(SavedError::MemorySize {
            path,
            actual: meta.len(),
            expected: snap.memory.size,
        });
    }
    match read_marker(&path) {
        None => Err(SavedError::MemoryMoved {
            path,
            why: "no saved-memory marker",
        }),
        Some(token) if token != snap.memory.token => Err(SavedError::MemoryMoved {
            path,
            why: "the marker is another snapshot's",
        }),
        Some(_) => Ok(path),
    }
}

pub fn write_marker(memory: &Path, token: u64) -> Result<(), SavedError> {
    let marker = saved_marker(memory);
    snapshot::write_atomic(&marker, format!("{token:016x}\n").as_bytes()).map_err(|source| {
        SavedError::Write {
            path: marker,
            source,
        }
    })
}

pub fn read_marker(memory: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(saved_marker(memory)).ok()?;
    u64::from_str_radix(text.trim(), 16).ok()
}

/// Removes the marker: the memory no longer matches any snapshot.
pub fn clear_marker(memory: &Path) {
    let marker = saved_marker(memory);
    match std::fs::remove_file(&marker) {
        Ok(()) => log::info!(
            "memory file {} changes from now on; its snapshot marker is removed",
            memory.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove {}: {e}", marker.display()),
    }
}

/// A random token for a new snapshot.
pub fn new_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
