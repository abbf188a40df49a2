//! Building a VM for a fresh boot: checking the kernel, initrd and sizes, loading the
//! guest into memory, and creating the boot vCPU state.

use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};

use super::boot::acpi::setup_acpi;
use super::boot::builtin::{test_guest_file, TEST_GUEST_NAME};
use super::boot::kernel::{check_cmdline, write_cmdline, EntryPoint, Initrd, KernelImage};
use super::boot::mptable::{setup_mptable, MAX_CPUS};
use super::boot::params::{write_boot_params, write_pvh_info, BootData};
use super::config::{check_memory, ConfigError, KernelSource, VirtioDiscovery, VmConfig};
use super::cpuid;
use super::devices::Devices;
use super::layout::{virtio_slot, CMDLINE_START, HIMEM_START, VIRTIO_MMIO_SIZE};
use super::machine::{Machine, Vmm};
use super::memory::{backend_page_size, GuestRam};
use super::state_dir::StateDir;
use super::vcpu::Vcpu;
use super::virtio::HandedOver;
use super::{vm, VmmError};
use crate::api::ApiSocket;

/// The kernel input after every check that needs no guest memory.
struct CheckedKernel {
    image: KernelImage,
    initrd: Option<Initrd>,
}

fn check_inputs(config: &VmConfig) -> Result<CheckedKernel, VmmError> {
    if config.cpus == 0 {
        return Err(ConfigError::NoCpus.into());
    }
    if config.cpus > MAX_CPUS {
        return Err(VmmError::TooManyCpus {
            requested: config.cpus,
            max: MAX_CPUS,
        });
    }
    check_memory(config.memory_bytes, backend_page_size(&config.memory))?;
    let image = match &config.kernel {
        KernelSource::Path { path } => KernelImage::open(path)?,
        KernelSource::Builtin => {
            let file = test_guest_file().map_err(VmmError::TestGuest)?;
            KernelImage::from_file(std::path::Path::new(TEST_GUEST_NAME), file)?
        }
    };
    image.check_size(config.memory_bytes)?;
    check_cmdline(&guest_cmdline(config), image.cmdline_limit())?;
    let initrd = match &config.initrd {
        Some(path) => {
            let initrd = Initrd::read(path)?;
            // A first placement check with the kernel's file size; the exact one, with
            // where the kernel really ends, follows the load.
            image.initrd_placement(
                path,
                initrd.data.len() as u64,
                HIMEM_START,
                config.memory_bytes,
            )?;
            Some(initrd)
        }
        None => None,
    };
    Ok(CheckedKernel { image, initrd })
}

/// Checks the configuration and builds the VM for a fresh boot. On error nothing is
/// left on disk.
pub fn build(config: VmConfig) -> Result<Vmm, VmmError> {
    let started = Instant::now();
    let checked = check_inputs(&config)?;
    let kvm = vm::open_kvm()?;
    vm::check_vcpu_count(&kvm, config.cpus)?;

    let mut state_dir = StateDir::acquire(&config.state_dir)?;
    let api = match config
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()
    {
        Ok(api) => api,
        Err(e) => {
            state_dir.remove();
            return Err(e.into());
        }
    };
    let ram = match GuestRam::create(&config.memory, config.memory_bytes) {
        Ok(ram) => ram,
        Err(e) => {
            remove_socket(api.as_ref());
            state_dir.remove();
            return Err(e.into());
        }
    };
    let (vm, devices, vcpus) = match assemble(&config, checked, &kvm, &ram, &state_dir) {
        Ok(parts) => parts,
        Err(e) => {
            ram.discard_if_created();
            remove_socket(api.as_ref());
            state_dir.remove();
            return Err(e);
        }
    };
    log::info!(
        "VM {} built in {} ms: {} vCPUs, {} MiB",
        config.id,
        started.elapsed().as_millis(),
        config.cpus,
        config.memory_bytes >> 20
    );
    let machine = Machine::new(config, kvm, vm, ram, devices, state_dir, api);
    Ok(Vmm::new(machine, vcpus, false))
}

/// Removes a socket file this process bound, after a failed start.
pub(super) fn remove_socket(api: Option<&ApiSocket>) {
    if let Some(api) = api {
        let _ = api.remove_file();
    }
}

/// Creates the KVM VM, loads the guest, and creates devices and vCPUs; records the
/// configuration last, once the VM exists.
fn assemble(
    config: &VmConfig,
    checked: CheckedKernel,
    kvm: &Kvm,
    ram: &GuestRam,
    state_dir: &StateDir,
) -> Result<(VmFd, Devices, Vec<Vcpu>), VmmError> {
    let vm = vm::create_vm(kvm, ram.memory())?;
    let entry = load_guest(config, checked, ram)?;
    let devices = Devices::create(&vm, ram.memory(), config, None, HandedOver::default())?;
    let vcpus = create_vcpus(kvm, &vm, ram, config.cpus, entry)?;
    state_dir.write_config(config)?;
    Ok((vm, devices, vcpus))
}

/// Loads kernel, initrd, command line, boot parameters and MP table into guest memory;
/// returns the entry point.
fn load_guest(
    config: &VmConfig,
    mut checked: CheckedKernel,
    ram: &GuestRam,
) -> Result<EntryPoint, VmmError> {
    let mem = ram.memory();
    let kernel = checked.image.load(mem)?;
    let initrd = match (&checked.initrd, &config.initrd) {
        (Some(initrd), Some(path)) => {
            let size = initrd.data.len() as u64;
            let addr = checked
                .image
                .initrd_placement(path, size, kernel.kernel_end, ram.size())?;
            initrd.load(mem, addr)?;
            Some((addr, size))
        }
        _ => None,
    };
    let cmdline = guest_cmdline(config);
    write_cmdline(mem, CMDLINE_START, &cmdline)?;
    // Both: kernels without MP table support (Debian's cloud kernel) need the ACPI
    // MADT to find their CPUs; kernels without ACPI use the MP table. With virtio
    // devices on the command line there are no ACPI tables (see VirtioDiscovery).
    setup_mptable(mem, config.cpus).map_err(VmmError::Mptable)?;
    let rsdp = match config.virtio_discovery {
        VirtioDiscovery::Acpi => {
            let slots = virtio_slots(config);
            Some(setup_acpi(mem, config.cpus, &slots).map_err(VmmError::Acpi)?)
        }
        VirtioDiscovery::Cmdline => None,
    };
    let data = BootData {
        cmdline_addr: CMDLINE_START,
        cmdline_len: cmdline.len(),
        initrd,
        rsdp,
    };
    match kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_info(mem, &data, ram.size())?,
        EntryPoint::Linux64(_) => write_boot_params(mem, kernel.header, &data, ram.size())?,
    }
    log::debug!(
        "kernel entry {:?}, kernel ends at {:#x}",
        kernel.entry,
        kernel.kernel_end
    );
    Ok(kernel.entry)
}

/// The MMIO base and GSI of each virtio device of `config`, in device order.
fn virtio_slots(config: &VmConfig) -> Vec<(u64, u32)> {
    (0..config.disks.len() + config.nets.len())
        .map_while(virtio_slot)
        .collect()
}

/// The command line the guest gets: the user's, plus a `virtio_mmio.device=` entry per
/// device when the devices are found through the command line.
fn guest_cmdline(config: &VmConfig) -> String {
    let mut cmdline = config.cmdline.clone();
    if config.virtio_discovery == VirtioDiscovery::Cmdline {
        for (base, gsi) in virtio_slots(config) {
            let entry = format!(
                "virtio_mmio.device={}K@{base:#x}:{gsi}",
                VIRTIO_MMIO_SIZE >> 10
            );
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&entry);
        }
    }
    cmdline
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    ram: &GuestRam,
    cpus: u8,
    entry: EntryPoint,
) -> Result<Vec<Vcpu>, VmmError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(cpus.into());
    for index in 0..cpus {
        let mut vcpu = Vcpu::new(vm, index)?;
        let cpuid = cpuid::vcpu_cpuid(&supported, index, cpus)
            .map_err(|source| VmmError::Cpuid { index, source })?;
        let boot = (index == 0).then_some((ram.memory(), entry));
        vcpu.configure(&cpuid, boot)?;
        vcpu.probe_msrs(kvm);
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
