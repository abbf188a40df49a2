//! Building a VM from a saved state: in a new process from a snapshot directory
//! (`restore --from DIR`), or in a re-executed VMM from a live-update hand-over.
//!
//! The order is fixed: read and check the state file; check the memory file (size,
//! marker, not in use); check that this host can run the saved vCPUs — all before a
//! KVM object exists. Then map the memory shared, create the VM, restore its in-kernel
//! devices and clock, create the devices and the vCPUs from their state. The VM starts
//! running only after every part is in place.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::{MemoryBackend, SerialMode};
use super::devices::Devices;
use super::machine::{Machine, Vmm};
use super::memory::GuestRam;
use super::saved::{self, VmSnapshot};
use super::state::{check_host_compat, restore_vm, xsave_size};
use super::state_dir::StateDir;
use super::vcpu::Vcpu;
use super::{vm, VmmError};

/// What a restore may change from the saved configuration.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub serial: Option<SerialMode>,
    pub state_dir: Option<PathBuf>,
    pub start_paused: bool,
}

/// Reads the snapshot in `dir` and builds the VM it describes, in this process.
pub fn restore_from_dir(dir: &Path, opts: &RestoreOptions) -> Result<Vmm, VmmError> {
    let started = Instant::now();
    let snap = saved::read_snapshot(dir)?;
    let memory_path = saved::check_memory_file(dir, &snap)?;
    let backend = MemoryBackend::File {
        path: memory_path.clone(),
    };
    let vmm = build_restored(snap, backend, opts, |backend, size| {
        GuestRam::open_existing(backend, size)
    })?;
    // The guest will change this memory as soon as it runs: the snapshot is consumed.
    saved::clear_marker(&memory_path);
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
    map: impl FnOnce(&MemoryBackend, u64) -> Result<GuestRam, super::memory::MemoryError>,
) -> Result<Vmm, VmmError> {
    let kvm = vm::open_kvm()?;
    vm::check_vcpu_count(&kvm, snap.config.cpus)?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::SupportedCpuid)?;
    // The host XSAVE size needs a VM; a scratch one costs well under a millisecond.
    let scratch = kvm.create_vm().map_err(vm::VmError::CreateVm)?;
    check_host_compat(&supported, &snap.vcpus, xsave_size(&scratch))?;
    drop(scratch);

    if let Some(serial) = &opts.serial {
        snap.config.serial = serial.clone();
    }
    if let Some(dir) = &opts.state_dir {
        snap.config.state_dir = dir.clone();
    }
    snap.config.memory = backend.clone();

    let mut state_dir = StateDir::acquire(&snap.config.state_dir)?;
    let ram = match map(&backend, snap.memory.size) {
        Ok(ram) => ram,
        Err(e) => {
            state_dir.remove();
            return Err(e.into());
        }
    };
    let parts = (|| {
        let vm = vm::create_vm(&kvm, ram.memory())?;
        restore_vm(&vm, &snap.vm)?;
        let devices = Devices::create(&vm, &snap.config.serial, Some(&snap.devices))?;
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for state in &snap.vcpus {
            let mut vcpu = Vcpu::new(&vm, state.index)?;
            vcpu.restore(state)?;
            vcpus.push(vcpu);
        }
        state_dir.write_config(&snap.config)?;
        Ok::<_, VmmError>((vm, devices, vcpus))
    })();
    let (vm, devices, vcpus) = match parts {
        Ok(p) => p,
        Err(e) => {
            state_dir.remove();
            return Err(e);
        }
    };
    let machine = Machine::new(snap.config, kvm, vm, ram, devices, state_dir);
    Ok(Vmm::new(machine, vcpus, opts.start_paused))
}
