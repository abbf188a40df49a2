//! Building a VM from a saved state: in a new process from a snapshot directory
//! (`restore --from DIR`), or in a re-executed VMM from a live-update hand-over.
//!
//! The order is fixed: read and check the state file; check the memory file (size,
//! marker, not in use); check that this host can run the saved vCPUs — all before a
//! KVM object exists. Then map the memory shared, create the VM, restore its in-kernel
//! devices and clock, create the devices and the vCPUs from their state. The VM starts
//! running only after every part is in place.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::builder::remove_socket;
use super::config::{MemoryBackend, SerialMode};
use super::devices::Devices;
use super::machine::{Machine, Vmm};
use super::memory::GuestRam;
use super::saved::{self, VmSnapshot};
use super::state::{check_host_compat, restore_vm, xsave_size};
use super::state_dir::StateDir;
use super::update::{Handoff, FAIL_RESTORE_ENV};
use super::vcpu::Vcpu;
use super::virtio::HandedOver;
use super::{vm, VmmError};
use crate::api::ApiSocket;

/// What a restore may change from the saved configuration.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub serial: Option<SerialMode>,
    pub state_dir: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub start_paused: bool,
    /// Copy the memory into a new memfd instead of mapping the file in place.
    pub copy_memory: bool,
    /// The directory the snapshot is read from (set by `restore_from_dir`).
    pub snapshot_dir: Option<PathBuf>,
    /// What a live update says the first VMM created in the state directory.
    pub state_dir_owned: Option<(bool, bool)>,
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Where a restored VM's API socket comes from.
pub enum ApiSource {
    /// Bind the configured path (a restore in a new process).
    Bind,
    /// Adopt the socket inherited from the VMM that re-executed (a live update).
    Inherited(ApiSocket),
}

/// Reads the snapshot in `dir` and builds the VM it describes, in this process.
pub fn restore_from_dir(dir: &Path, opts: &RestoreOptions) -> Result<Vmm, VmmError> {
    let started = Instant::now();
    let snap = saved::read_snapshot(dir)?;
    let memory_path = saved::check_memory_file(dir, &snap)?;
    let opts = &RestoreOptions {
        snapshot_dir: Some(dir.to_path_buf()),
        ..opts.clone()
    };
    let vmm = if opts.copy_memory {
        // The snapshot's memory is read into a new memfd and stays as it was, so the
        // snapshot can be restored again.
        let copy = |backend: &MemoryBackend, size| GuestRam::copy_of(&memory_path, backend, size);
        build_restored(
            snap,
            MemoryBackend::Memfd,
            opts,
            ApiSource::Bind,
            HandedOver::default(),
            copy,
        )?
    } else {
        // Absolute: the restored VM's configuration (and any snapshot of it) must name
        // the memory file wherever it is read from later.
        let backend = MemoryBackend::File {
            path: std::path::absolute(&memory_path).unwrap_or_else(|_| memory_path.clone()),
        };
        let vmm = build_restored(
            snap,
            backend,
            opts,
            ApiSource::Bind,
            HandedOver::default(),
            GuestRam::open_existing,
        )?;
        // The guest changes this memory as soon as it runs: the snapshot is consumed.
        saved::clear_marker(&memory_path);
        if same_dir(dir, &vmm.config().state_dir) {
            // Kept for diagnosis, under a name that no longer marks a saved VM.
            let state = dir.join(saved::STATE_FILE);
            let _ = std::fs::rename(&state, state.with_extension("state.restored"));
        }
        vmm
    };
    log::info!(
        "VM {} restored from {} in {:.3} ms",
        vmm.config().id,
        dir.display(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(vmm)
}

/// Builds a VM from a checked snapshot; `map` maps its memory.
pub fn build_restored(
    mut snap: VmSnapshot,
    backend: MemoryBackend,
    opts: &RestoreOptions,
    api: ApiSource,
    handed: HandedOver,
    map: impl FnOnce(&MemoryBackend, u64) -> Result<GuestRam, super::memory::MemoryError>,
) -> Result<Vmm, VmmError> {
    let t = Instant::now();
    let kvm = vm::open_kvm()?;
    vm::check_vcpu_count(&kvm, snap.config.cpus)?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::SupportedCpuid)?;
    // The host XSAVE size needs a VM; a scratch one costs well under a millisecond.
    let scratch = kvm.create_vm().map_err(vm::VmError::CreateVm)?;
    check_host_compat(&supported, &snap.vcpus, xsave_size(&scratch))?;
    drop(scratch);
    log::debug!("restore: host checks done at {:.3} ms", ms(t));

    if let Some(serial) = &opts.serial {
        snap.config.serial = serial.clone();
    }
    if let Some(dir) = &opts.state_dir {
        snap.config.state_dir = dir.clone();
    }
    if let Some(path) = &opts.api_socket {
        snap.config.api_socket = Some(path.clone());
    }
    snap.config.memory = backend.clone();

    let restoring_here = opts
        .snapshot_dir
        .as_deref()
        .is_some_and(|d| same_dir(d, &snap.config.state_dir));
    let mut state_dir = StateDir::acquire_with(&snap.config.state_dir, restoring_here)?;
    if let Some(owned) = opts.state_dir_owned {
        state_dir.adopt(owned);
    }
    // A socket inherited from a live update stays in place on failure: the fallback
    // keeps serving it.
    let bound_here = matches!(api, ApiSource::Bind);
    let api = match api {
        ApiSource::Bind => snap
            .config
            .api_socket
            .as_deref()
            .map(ApiSocket::bind)
            .transpose(),
        ApiSource::Inherited(socket) => Ok(Some(socket)),
    };
    let api = match api {
        Ok(api) => api,
        Err(e) => {
            state_dir.remove();
            return Err(e.into());
        }
    };
    let ram = match map(&backend, snap.memory.size) {
        Ok(ram) => ram,
        Err(e) => {
            if bound_here {
                remove_socket(api.as_ref());
            }
            state_dir.remove();
            return Err(e.into());
        }
    };
    log::debug!("restore: memory mapped at {:.3} ms", ms(t));
    let parts = (|| {
        let vm = vm::create_vm(&kvm, ram.memory())?;
        restore_vm(&vm, &snap.vm)?;
        log::debug!("restore: VM state restored at {:.3} ms", ms(t));
        let devices =
            Devices::create(&vm, ram.memory(), &snap.config, Some(&snap.devices), handed)?;
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for state in &snap.vcpus {
            let mut vcpu = Vcpu::new(&vm, state.index)?;
            vcpu.restore(state)?;
            vcpus.push(vcpu);
        }
        log::debug!("restore: vCPUs restored at {:.3} ms", ms(t));
        state_dir.write_config(&snap.config)?;
        log::debug!("restore: config written at {:.3} ms", ms(t));
        Ok::<_, VmmError>((vm, devices, vcpus))
    })();
    let (vm, devices, vcpus) = match parts {
        Ok(p) => p,
        Err(e) => {
            if bound_here {
                remove_socket(api.as_ref());
            }
            state_dir.remove();
            return Err(e);
        }
    };
    let machine = Machine::new(snap.config, kvm, vm, ram, devices, state_dir, api);
    Ok(Vmm::new(machine, vcpus, opts.start_paused))
}

/// Builds the VM handed over by a live update, in the re-executed process.
pub fn restore_from_handoff(handoff: &Handoff) -> Result<Vmm, VmmError> {
    // Work on duplicates: if the restore fails, the handed-over descriptors must still
    // be open (and inheritable) for the fallback to execute the previous binary with.
    let memory = File::from(dup_cloexec(handoff.memory_fd)?);
    let api = match (handoff.api_listener_fd, &handoff.snapshot.config.api_socket) {
        (Some(fd), Some(path)) => {
            ApiSource::Inherited(ApiSocket::from_listener_fd(dup_cloexec(fd)?, path)?)
        }
        _ => ApiSource::Bind,
    };
    let dup_all = |fds: &[std::os::fd::RawFd]| {
        fds.iter()
            .map(|fd| dup_cloexec(*fd))
            .collect::<Result<Vec<_>, _>>()
    };
    let handed = HandedOver {
        disks: dup_all(&handoff.disk_fds)?,
        taps: dup_all(&handoff.tap_fds)?,
    };
    // The injected failure comes after the descriptors were taken over, like a real
    // restore failure would.
    if std::env::var_os(FAIL_RESTORE_ENV).is_some() && handoff.failure.is_none() {
        return Err(VmmError::Setup {
            what: "the restore (failure injected by the test environment variable)",
            source: std::io::Error::other(FAIL_RESTORE_ENV),
        });
    }
    // The state directory is the VM's own: a snapshot kept there does not stop it.
    let opts = RestoreOptions {
        start_paused: handoff.paused,
        snapshot_dir: Some(handoff.snapshot.config.state_dir.clone()),
        state_dir_owned: Some(handoff.state_dir_owned),
        ..RestoreOptions::default()
    };
    let mut vmm = build_restored(
        handoff.snapshot.clone(),
        handoff.backend.clone(),
        &opts,
        api,
        handed,
        |backend, size| GuestRam::from_file(memory, backend, size),
    )?;
    // Restored: the originals are no longer needed.
    for fd in handoff.descriptors() {
        // SAFETY: these descriptor numbers were handed over to this process and nothing
        // in it owns them (only duplicates are in use).
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    vmm.continue_update(handoff);
    Ok(vmm)
}

/// A close-on-exec duplicate of a handed-over descriptor.
fn dup_cloexec(fd: std::os::fd::RawFd) -> Result<OwnedFd, VmmError> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; the result is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(VmmError::Setup {
            what: "taking over a handed-over descriptor",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `new` is a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
