//! Phase 3 of the recovery workflow: pause and save every running VM (in parallel),
//! sync, load the next kernel with `kexec_file_load` and reboot into it. After the new
//! kernel boots, `restore_all` brings the VMs back.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::inventory::{self, VmEntry, VmState};
use super::{kexec, HostError};
use crate::api::ApiClient;

/// What happened to one VM during the save.
#[derive(Debug, Clone, Serialize)]
pub struct SavedVm {
    pub id: String,
    pub dir: std::path::PathBuf,
    pub blackout_ms: Option<f64>,
    pub error: Option<String>,
}

/// Options of `host reset`.
#[derive(Debug, Clone, Default)]
pub struct ResetOptions {
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub append: String,
    /// Reset even if some VMs' memory will not survive (they are lost).
    pub force: bool,
    /// Save and stop every VM but do not kexec (for tests and for a manual reboot).
    pub no_kexec: bool,
}

/// The running VMs whose memory a kexec would not preserve.
pub fn unsafe_vms(vms: &[VmEntry]) -> Vec<&VmEntry> {
    vms.iter()
        .filter(|v| v.state == VmState::Running && !v.survives_host_reset)
        .collect()
}

/// Saves every running VM into its own state directory (paused), then stops its VMM.
pub fn save_all(root: &Path, force: bool) -> Result<Vec<SavedVm>, HostError> {
    let vms = inventory::scan(root)?;
    let lost = unsafe_vms(&vms);
    if !lost.is_empty() && !force {
        let names = lost
            .iter()
            .map(|v| {
                let why = v.host_reset_blocker.as_deref().unwrap_or("unknown reason");
                format!("{} ({why})", v.id)
            })
            .collect::<Vec<_>>();
        return Err(HostError::NotResettable {
            count: lost.len(),
            names: names.join(", "),
        });
    }
    let running: Vec<VmEntry> = vms
        .into_iter()
        .filter(|v| v.state == VmState::Running)
        .collect();
    let results: Vec<SavedVm> = std::thread::scope(|s| {
        let handles: Vec<_> = running
            .iter()
            .map(|vm| s.spawn(move || save_one(vm)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("save threads do not panic"))
            .collect()
    });
    Ok(results)
}

fn save_one(vm: &VmEntry) -> SavedVm {
    let t = Instant::now();
    let result = (|| {
        let api = vm.api_socket.as_ref().ok_or("the VM has no API socket")?;
        // Bounded: a VMM that does not answer must not hold up every other VM's save.
        let client = ApiClient::new(api).with_timeouts(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(120),
        );
        let report = client.snapshot(&vm.dir, true).map_err(|e| e.to_string())?;
        client.shutdown().map_err(|e| e.to_string())?;
        wait_stopped(vm)?;
        Ok::<_, String>(report["blackout_ms"].as_f64())
    })();
    match result {
        Ok(blackout) => SavedVm {
            id: vm.id.clone(),
            dir: vm.dir.clone(),
            blackout_ms: blackout,
            error: None,
        },
        Err(e) => {
            log::error!("saving VM {} failed after {:?}: {e}", vm.id, t.elapsed());
            SavedVm {
                id: vm.id.clone(),
                dir: vm.dir.clone(),
                blackout_ms: None,
                error: Some(e.to_string()),
            }
        }
    }
}

/// Waits until the VMM process has exited: only then are its memory file and state
/// directory free for a restore.
fn wait_stopped(vm: &VmEntry) -> Result<(), String> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let lock = vm.dir.join(crate::vmm::state_dir::LOCK_FILE);
    loop {
        let alive = match vm.pid {
            Some(pid) => process_alive(pid),
            None => inventory::lock_held(&lock),
        };
        if !alive {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("its VMM did not exit after the shutdown request".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// The whole phase 3: save every VM, then (unless `no_kexec`) kexec into the kernel.
pub fn reset(root: &Path, opts: &ResetOptions) -> Result<Vec<SavedVm>, HostError> {
    // Load the kernel first: a kernel that cannot be loaded must not cost the VMs a pause.
    if !opts.no_kexec {
        let kernel = opts
            .kernel
            .as_deref()
            .ok_or_else(|| HostError::Failed("host reset needs --kernel (or --no-kexec)".into()))?;
        kexec::load(kernel, opts.initrd.as_deref(), &opts.append)?;
    }
    let saved = save_all(root, opts.force)?;
    if let Some(bad) = saved.iter().find(|s| s.error.is_some()) {
        if !opts.force {
            return Err(HostError::Save {
                id: bad.id.clone(),
                reason: bad.error.clone().unwrap_or_default(),
            });
        }
    }
    if opts.no_kexec {
        return Ok(saved);
    }
    Err(kexec::reboot_into_loaded().into())
}
