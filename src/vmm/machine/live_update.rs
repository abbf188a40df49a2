//! The old process's half of a live update: check the binary, pause, save, hand over
//! and execute; resume in place if that fails. The new process's half is
//! `restore::restore_from_handoff`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Machine;
use crate::vmm::saved::SavedMemory;
use crate::vmm::update::{self, Handoff, UpdateError, UpdateReport};
use crate::vmm::vcpu::GuestExit;
use crate::vmm::VmmError;

impl Machine {
    pub(super) fn note_update_blackout(&mut self) {
        if let (Some(start), Some(report)) =
            (self.update_started_ns.take(), self.last_update.as_mut())
        {
            report.blackout_ms = (update::monotonic_ns().saturating_sub(start)) as f64 / 1e6;
            log::info!(
                "VM {} live update {} ({}): guest blackout {:.3} ms",
                self.config.id,
                report.generation,
                report.outcome,
                report.blackout_ms
            );
        }
    }

    /// Checks the update binary and asks the event loop to carry the update out once
    /// the API response is on its way.
    pub fn request_update(&mut self, binary: Option<PathBuf>) -> Result<PathBuf, VmmError> {
        let binary = match binary {
            Some(b) => b,
            // The path the running binary was started from; once a deployment replaced
            // the file, the kernel reports it with a " (deleted)" suffix, and the new
            // file at that path is the one to run.
            None => std::fs::read_link("/proc/self/exe")
                .map(|p| {
                    let s = p.to_string_lossy();
                    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
                })
                .map_err(|source| VmmError::Setup {
                    what: "finding the running binary",
                    source,
                })?,
        };
        // A tap whose interface was deleted cannot be handed over; refuse now, with the
        // guest untouched, rather than lose it in the new process.
        self.devices.virtio.check_taps()?;
        update::check_binary(&binary)?;
        self.pending_update = Some(binary.clone());
        self.exit.request(GuestExit::UpdateRequested);
        Ok(binary)
    }

    /// Carries out a requested live update: pause, save, hand over, execute. Returns
    /// only if the update could not start, after resuming the guest.
    pub fn live_update(&mut self) -> UpdateError {
        let Some(binary) = self.pending_update.take() else {
            return UpdateError::Prepare {
                what: "no update was requested",
                source: std::io::Error::other("none"),
            };
        };
        let was_paused = self.paused;
        let (disk_fds, tap_fds) = self.devices.virtio.handover_fds();
        let err = self.try_exec(&binary, was_paused);
        // Still here: execve failed. Take the descriptors back and let the guest run.
        for fd in [
            Some(self.ram.file().as_raw_fd()),
            self.api_listener_fd,
            self.self_exe.as_ref().map(|f| f.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        .chain(disk_fds)
        .chain(tap_fds)
        {
            let _ = update::set_cloexec(fd, true);
        }
        if !was_paused {
            if let Err(e) = self.resume() {
                log::error!("cannot resume the VM after the failed update: {e}");
            }
        }
        self.last_update = Some(UpdateReport {
            generation: self.generation,
            binary,
            blackout_ms: 0.0,
            outcome: "failed".into(),
            error: Some(err.to_string()),
        });
        err
    }

    fn try_exec(&mut self, binary: &Path, was_paused: bool) -> UpdateError {
        let pause_started_ns = update::monotonic_ns();
        if let Err(e) = self.pause() {
            return UpdateError::Prepare {
                what: "pausing the vCPUs",
                source: std::io::Error::other(e.to_string()),
            };
        }
        let memory = SavedMemory {
            path: PathBuf::new(),
            size: self.ram.size(),
            token: 0,
            copied: false,
        };
        let snapshot = match self.save(memory) {
            Ok(s) => s,
            Err(e) => {
                return UpdateError::Prepare {
                    what: "saving the VM",
                    source: std::io::Error::other(e.to_string()),
                }
            }
        };
        let Some(exe) = self.self_exe.as_ref() else {
            return UpdateError::Prepare {
                what: "the running binary",
                source: std::io::Error::other("not open"),
            };
        };
        let (log_level, log_file) = crate::logger::settings();
        let (disk_fds, tap_fds) = self.devices.virtio.handover_fds();
        let handoff = Handoff {
            snapshot,
            backend: self.ram.backend().clone(),
            memory_fd: self.ram.file().as_raw_fd(),
            api_listener_fd: self.api_listener_fd,
            tap_fds,
            disk_fds,
            fallback_exe_fd: exe.as_raw_fd(),
            pause_started_ns,
            generation: self.generation,
            binary: binary.into(),
            failure: None,
            paused: was_paused,
            snapshot_memory: self.snapshot_memory.clone(),
            state_dir_owned: self.state_dir.ownership(),
            format_version: crate::snapshot::FORMAT_VERSION,
            terminal: self.terminal.clone(),
            log_level: log_level.to_string(),
            log_file,
        };
        log::debug!(
            "live update: paused and saved in {:.3} ms",
            (update::monotonic_ns() - pause_started_ns) as f64 / 1e6
        );
        let handoff_fd = match update::write_handoff(&handoff) {
            Ok(fd) => fd,
            Err(e) => return e,
        };
        for fd in handoff.descriptors() {
            if let Err(source) = update::set_cloexec(fd, false) {
                return UpdateError::Prepare {
                    what: "handing over a descriptor",
                    source,
                };
            }
        }
        self.devices.serial_pump.drain(Duration::from_millis(200));
        log::info!(
            "VM {} live update: executing {}",
            self.config.id,
            binary.display()
        );
        update::exec_binary(binary, handoff_fd.as_raw_fd())
    }
}
