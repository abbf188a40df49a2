//! Finding the VMs under a state root and describing each: running or saved, its
//! process, its memory backend and whether that memory survives a host reset.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::HostError;
use crate::vmm::config::{MemoryBackend, VmConfig};
use crate::vmm::memory::try_lock_exclusive;
use crate::vmm::saved;
use crate::vmm::state_dir::{CONFIG_FILE, LOCK_FILE, SAVED_STATE_FILE};

/// What a VM directory says about its VM.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// A VMM holds the lock.
    Running,
    /// No VMM runs and the directory holds a saved state.
    Saved,
    /// Neither: a directory left behind.
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmEntry {
    pub id: String,
    pub dir: PathBuf,
    pub state: VmState,
    pub pid: Option<u32>,
    pub api_socket: Option<PathBuf>,
    /// "memfd", "hugepages" or the memory file's path.
    pub memory: String,
    pub memory_bytes: Option<u64>,
    /// Whether the VM survives a host reset: its memory lives on a DAX filesystem, which a
    /// kexec preserves, and none of its disks is on a filesystem in RAM.
    pub survives_host_reset: bool,
    /// Why it does not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_reset_blocker: Option<String>,
}

/// Every VM directory under `root`, sorted by id.
pub fn scan(root: &Path) -> Result<Vec<VmEntry>, HostError> {
    let entries = std::fs::read_dir(root).map_err(|source| HostError::StateRoot {
        path: root.into(),
        source,
    })?;
    let mut vms: Vec<VmEntry> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| describe(&e.path()))
        .collect();
    vms.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(vms)
}

/// Reads one VM directory; `None` when it holds nothing of waterbear's.
pub fn describe(dir: &Path) -> Option<VmEntry> {
    let running = lock_held(&dir.join(LOCK_FILE));
    let saved_state = dir.join(SAVED_STATE_FILE).exists();
    let config: Option<VmConfig> = if running {
        read_json(&dir.join(CONFIG_FILE))
    } else if saved_state {
        saved::read_snapshot(dir).ok().map(|s| s.config)
    } else {
        read_json(&dir.join(CONFIG_FILE))
    };
    if !running && !saved_state && config.is_none() {
        return None;
    }
    let state = if running {
        VmState::Running
    } else if saved_state {
        VmState::Saved
    } else {
        VmState::Stopped
    };
    let id = config.as_ref().map(|c| c.id.clone()).unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let (memory, survives) = match config.as_ref().map(|c| &c.memory) {
        Some(MemoryBackend::File { path }) => (path.display().to_string(), is_dax(path)),
        Some(MemoryBackend::Memfd) => ("memfd".to_string(), false),
        Some(MemoryBackend::Hugepages) => ("hugepages".to_string(), false),
        None => ("unknown".to_string(), false),
    };
    let volatile_disk = config
        .iter()
        .flat_map(|c| &c.disks)
        .find(|d| is_volatile(&d.path));
    let mut reasons = Vec::new();
    if !survives {
        reasons.push(format!("memory {memory} is not on a DAX filesystem"));
    }
    reasons.extend(
        volatile_disk.map(|d| format!("disk {} is on a filesystem in RAM", d.path.display())),
    );
    let blocker = (!reasons.is_empty()).then(|| reasons.join("; "));
    Some(VmEntry {
        id,
        dir: dir.into(),
        state,
        pid: if running {
            lock_owner(&dir.join(LOCK_FILE))
        } else {
            None
        },
        api_socket: config.as_ref().and_then(|c| c.api_socket.clone()),
        memory,
        memory_bytes: config.as_ref().map(|c| c.memory_bytes),
        survives_host_reset: blocker.is_none(),
        host_reset_blocker: blocker,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Whether another process holds the flock on `path`.
pub fn lock_held(path: &Path) -> bool {
    match File::options().write(true).open(path) {
        Ok(f) => !try_lock_exclusive(&f),
        Err(_) => false,
    }
}

/// The pid holding a flock on `path`, from /proc/locks.
fn lock_owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let inode = meta.ino();
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> <start> <end>"
        let dev_inode = f.get(5)?;
        let ino: u64 = dev_inode.rsplit(':').next()?.parse().ok()?;
        (f.get(1) == Some(&"FLOCK") && ino == inode)
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// The filesystem type and mount options of the mount `path` (or, when it does not exist,
/// its directory) is on, from `/proc/self/mounts`.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let target = path
        .canonicalize()
        .or_else(|_| {
            path.parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
                .canonicalize()
        })
        .ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mnt = PathBuf::from(unescape(f.get(1)?));
            Some((mnt, f.get(2)?.to_string(), f.get(3)?.to_string()))
        })
        .filter(|(mnt, _, _)| target.starts_with(mnt))
        .max_by_key(|(mnt, _, _)| mnt.as_os_str().len())
        .map(|(_, fstype, opts)| (fstype, opts))
}

/// Whether `path` is on a filesystem mounted with `dax` (persistent memory, preserved
/// across a kexec when the kernel reserves the same range).
pub fn is_dax(path: &Path) -> bool {
    mount_of(path).is_some_and(|(_, opts)| opts.split(',').any(|o| o == "dax" || o == "dax=always"))
}

/// Whether `path` is on a filesystem that lives in RAM (tmpfs, ramfs) and is gone after
/// a kexec.
pub fn is_volatile(path: &Path) -> bool {
    mount_of(path).is_some_and(|(fstype, _)| fstype == "tmpfs" || fstype == "ramfs")
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_foreign_directories_are_not_vms() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("empty")).unwrap();
        std::fs::create_dir(root.path().join("other")).unwrap();
        std::fs::write(root.path().join("other/notes.txt"), b"x").unwrap();
        assert!(scan(root.path()).unwrap().is_empty());
    }

    #[test]
    fn a_stopped_vm_with_config_is_listed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm1");
        std::fs::create_dir(&dir).unwrap();
        let config = VmConfig::for_test("vm1", &dir);
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&config).unwrap()).unwrap();
        let vms = scan(root.path()).unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].state, VmState::Stopped);
        assert!(!vms[0].survives_host_reset);
    }

    #[test]
    fn filesystems_in_ram_are_volatile() {
        if std::path::Path::new("/dev/shm").is_dir() {
            assert!(is_volatile(Path::new("/dev/shm/not-yet-created.img")));
        }
        assert!(!is_volatile(Path::new("/proc/self")));
    }

    #[test]
    fn tmpfs_is_not_dax() {
        assert!(!is_dax(Path::new("/proc/self")));
    }
}
