//! Saving a whole VM: the one place that orders the save (vCPUs, then the VM-wide
//! in-kernel state, then the devices), and the snapshot operation that writes it out.

use std::path::Path;
use std::time::Instant;

use vm_memory::Bytes;

use super::{ms, Machine, SnapshotReport};
use crate::vmm::config::MemoryBackend;
use crate::vmm::memory::GuestRam;
use crate::vmm::saved::{self, SavedMemory, VmSnapshot};
use crate::vmm::state::save_vm;
use crate::vmm::VmmError;

impl Machine {
    /// Reads the whole VM's state; the VM must be paused. `memory` describes where its
    /// RAM is.
    pub fn save(&self, memory: SavedMemory) -> Result<VmSnapshot, VmmError> {
        if !self.paused {
            return Err(VmmError::NotPaused);
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for h in &self.vcpus {
            vcpus.push(h.save()?);
        }
        Ok(VmSnapshot {
            config: self.config.clone(),
            memory,
            vm: save_vm(&self.vm)?,
            vcpus,
            devices: self.devices.state(),
            saved_unix_ms: saved::unix_ms(),
        })
    }

    /// Pauses the VM, writes its state to `dir` (and its memory, when that lives in a
    /// memfd), and resumes it unless `keep_paused`.
    pub fn snapshot(&mut self, dir: &Path, keep_paused: bool) -> Result<SnapshotReport, VmmError> {
        let t = Instant::now();
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|source| VmmError::SnapshotDir {
            path: dir.into(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| VmmError::SnapshotDir {
            path: dir.into(),
            source,
        })?;
        let was_paused = self.paused;
        self.pause()?;

        let result = self.write_snapshot(&dir);
        let (memory, header_len) = match result {
            Ok(v) => v,
            Err(e) => {
                if created {
                    // Only if still empty: a failed snapshot leaves nothing behind.
                    let _ = std::fs::remove_dir(&dir);
                }
                if !was_paused {
                    self.resume()?;
                }
                return Err(e);
            }
        };
        let blackout = t.elapsed();
        let stay_paused = keep_paused || was_paused;
        let moved = self.devices.virtio.disks_moved();
        let mut report = SnapshotReport {
            dir: dir.clone(),
            blackout_ms: ms(blackout),
            memory,
            restorable: true,
            paused: true,
        };
        if !moved.is_empty() {
            log::warn!(
                "VM {} snapshot to {}: disk files {moved:?} were renamed or deleted since the \
                 VM opened them; a restore, which opens disks by path, will not find them",
                self.config.id,
                dir.display()
            );
            report.restorable = false;
        }
        self.last_snapshot = Some(report.clone());
        if !stay_paused {
            self.resume()?;
            report.blackout_ms = ms(t.elapsed());
            report.paused = false;
            report.restorable =
                moved.is_empty() && self.last_snapshot.as_ref().is_some_and(|r| r.restorable);
            self.last_snapshot = Some(report.clone());
        }
        log::info!(
            "VM {} snapshot to {} ({} bytes of state): guest paused {:.3} ms{}",
            self.config.id,
            dir.display(),
            header_len,
            report.blackout_ms,
            if report.restorable {
                ""
            } else {
                "; memory kept in place changed since, so the snapshot is not restorable"
            }
        );
        Ok(report)
    }

    fn write_snapshot(&mut self, dir: &Path) -> Result<(SavedMemory, u64), VmmError> {
        // The snapshot may be restored after a host reset, which loses the page cache:
        // what the guest wrote to its disks must be on stable storage first.
        self.devices.virtio.sync_disks()?;
        let token = saved::new_token();
        let memory = match self.ram.backend() {
            MemoryBackend::File { path } => {
                let path = path.canonicalize().unwrap_or_else(|_| path.clone());
                SavedMemory {
                    path,
                    size: self.ram.size(),
                    token,
                    copied: false,
                }
            }
            MemoryBackend::Memfd | MemoryBackend::Hugepages => {
                let path = dir.join(saved::MEMORY_FILE);
                write_memory(&self.ram, &path)?;
                SavedMemory {
                    path: saved::MEMORY_FILE.into(),
                    size: self.ram.size(),
                    token,
                    copied: true,
                }
            }
        };
        let snap = self.save(memory.clone())?;
        let header = saved::write_snapshot(dir, &snap)?;
        if !memory.copied {
            self.snapshot_memory = Some(memory.path.clone());
        }
        Ok((memory, header.payload_len))
    }
}

/// Writes guest RAM to `path` atomically (temporary name, fsync, rename).
fn write_memory(ram: &GuestRam, path: &Path) -> Result<(), VmmError> {
    let werr = |source| VmmError::MemoryWrite {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        for (addr, len) in ram.chunks() {
            ram.memory()
                .write_all_volatile_to(addr, &mut file, len)
                .map_err(std::io::Error::other)?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)
}
