//! The VM's state directory: `<root>/<id>/` by default, holding the launch config
//! (`config.json`) and the lock that marks the VM as running. Host-level commands find
//! VMs by walking the state root; nothing else is a registry.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::config::VmConfig;
use super::memory::try_lock_exclusive;

pub const CONFIG_FILE: &str = "config.json";
pub const LOCK_FILE: &str = "vmm.lock";
/// A saved VM's state; its presence means the directory belongs to a saved VM.
pub const SAVED_STATE_FILE: &str = "vm.state";

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create state directory {path}; pass --state-dir to use another")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path} belongs to a VM that is running now (its lock is held)")]
    Running { path: PathBuf },
    #[error("state directory {path} holds a saved VM ({file}); restore it or choose another --id or --state-dir")]
    HoldsSavedVm { path: PathBuf, file: &'static str },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A locked state directory. Dropping it releases the lock; `remove` deletes what this
/// process wrote.
pub struct StateDir {
    path: PathBuf,
    created_dir: bool,
    /// Files this process wrote there, the only ones `remove` deletes.
    created_lock: bool,
    wrote_config: std::cell::Cell<bool>,
    removed: bool,
    _lock: File,
}

impl StateDir {
    /// Creates (if needed) and locks the directory. Refuses one whose VM is running or
    /// that holds a saved VM.
    pub fn acquire(path: &Path) -> Result<Self, StateDirError> {
        Self::acquire_with(path, false)
    }

    /// As `acquire`; `restoring_here` accepts a directory holding a saved VM because
    /// that VM is the one being restored from it (a host reset saves each VM into its
    /// own state directory).
    pub fn acquire_with(path: &Path, restoring_here: bool) -> Result<Self, StateDirError> {
        let created_dir = !path.exists();
        fs::create_dir_all(path).map_err(|source| StateDirError::Create {
            path: path.into(),
            source,
        })?;
        let result = Self::lock(path, created_dir, restoring_here);
        if result.is_err() && created_dir {
            let _ = fs::remove_dir_all(path);
        }
        result
    }

    fn lock(path: &Path, created_dir: bool, restoring_here: bool) -> Result<Self, StateDirError> {
        if !restoring_here && path.join(SAVED_STATE_FILE).exists() {
            return Err(StateDirError::HoldsSavedVm {
                path: path.into(),
                file: SAVED_STATE_FILE,
            });
        }
        let lock_path = path.join(LOCK_FILE);
        let created_lock = !lock_path.exists();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StateDirError::Create {
                path: lock_path.clone(),
                source,
            })?;
        if !try_lock_exclusive(&lock) {
            return Err(StateDirError::Running { path: path.into() });
        }
        Ok(StateDir {
            path: path.into(),
            created_dir,
            created_lock,
            wrote_config: std::cell::Cell::new(false),
            removed: false,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this process created the directory and the lock file, for a live update
    /// to pass on: the next process removes them when the VM finally stops.
    pub fn ownership(&self) -> (bool, bool) {
        (self.created_dir, self.created_lock)
    }

    /// Takes over the ownership a live update passed on (see [`StateDir::ownership`]).
    pub fn adopt(&mut self, (created_dir, created_lock): (bool, bool)) {
        self.created_dir |= created_dir;
        self.created_lock |= created_lock;
    }

    /// Writes `config.json` atomically: temporary name, fsync, rename, fsync of the dir.
    pub fn write_config(&self, config: &VmConfig) -> Result<(), StateDirError> {
        let json = serde_json::to_vec_pretty(config).expect("VmConfig always serialises");
        let path = self.path.join(CONFIG_FILE);
        // A live update or a restore in place usually finds the same config: skip the
        // fsyncs, they sit in the guest's blackout.
        self.wrote_config.set(true);
        if fs::read(&path).is_ok_and(|old| old == json) {
            return Ok(());
        }
        write_atomic(&path, &json)
    }

    /// Removes the files this process wrote and the directory if it made it and it is
    /// now empty. Files a user put there (a memory file, logs) stay.
    pub fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        if self.wrote_config.get() {
            let _ = fs::remove_file(self.path.join(CONFIG_FILE));
        }
        if self.created_lock {
            let _ = fs::remove_file(self.path.join(LOCK_FILE));
        }
        if self.created_dir {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// Writes `path` so that readers see the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateDirError> {
    crate::snapshot::write_atomic(path, bytes).map_err(|source| StateDirError::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_vms_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm1");
        let _held = StateDir::acquire(&dir).unwrap();
        assert!(matches!(
            StateDir::acquire(&dir),
            Err(StateDirError::Running { .. })
        ));
    }

    #[test]
    fn a_saved_vms_directory_is_refused_and_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm1");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(SAVED_STATE_FILE), b"state").unwrap();
        assert!(matches!(
            StateDir::acquire(&dir),
            Err(StateDirError::HoldsSavedVm { .. })
        ));
        assert_eq!(fs::read(dir.join(SAVED_STATE_FILE)).unwrap(), b"state");
        assert!(!dir.join(LOCK_FILE).exists());
    }

    #[test]
    fn remove_deletes_what_it_created_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm1");
        let config = VmConfig::for_test("vm1", &dir);
        let mut sd = StateDir::acquire(&dir).unwrap();
        sd.write_config(&config).unwrap();
        sd.remove();
        assert!(!dir.exists());

        // A directory the user made, with their own files of the same names: a VM that
        // never got as far as writing its config leaves them all.
        fs::create_dir(&dir).unwrap();
        for name in ["user-file", CONFIG_FILE, LOCK_FILE] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        StateDir::acquire(&dir).unwrap().remove();
        for name in ["user-file", CONFIG_FILE, LOCK_FILE] {
            assert_eq!(
                fs::read(dir.join(name)).unwrap(),
                b"x",
                "{name} was touched"
            );
        }
    }
}
