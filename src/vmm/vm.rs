//! The KVM VM: the `/dev/kvm` handle, the VM file descriptor with its in-kernel irqchip
//! and PIT, and guest memory registered as KVM memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)")]
    NoKvm,
    #[error("no permission to open /dev/kvm: run as root or add this user to the group that owns /dev/kvm")]
    KvmPermission,
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks the required capability {0}")]
    MissingCap(&'static str),
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up KVM's {what}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register {size} bytes of guest memory at {addr:#x} with KVM")]
    MemorySlot {
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("{requested} vCPUs requested but this host's KVM supports at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
}

/// The capabilities waterbear relies on, checked up front for a clear error.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Opens `/dev/kvm` with an error that tells the user what to do.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::OpenKvm(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Checks a vCPU count against what this KVM supports.
pub fn check_vcpu_count(kvm: &Kvm, cpus: u8) -> Result<(), VmError> {
    let max = kvm.get_max_vcpus();
    if usize::from(cpus) > max {
        return Err(VmError::TooManyVcpus {
            requested: cpus,
            max,
        });
    }
    Ok(())
}

/// Creates the VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and maps
/// guest memory into it.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    let setup = |what| move |source| VmError::Setup { what, source };
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(setup("TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(setup("identity map"))?;
    vm.create_irq_chip().map_err(setup("in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(setup("PIT"))?;

    for (slot, region) in mem.iter().enumerate() {
        let addr = region.start_addr().0;
        let size = region.len();
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's start address is inside the region") as u64;
        let kvm_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the caller keeps
        // alive for as long as the VM exists (both are fields of the same `Vm`, and the
        // VM fd is dropped first); slots do not overlap because the regions do not.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| VmError::MemorySlot {
            addr,
            size,
            source,
        })?;
    }
    Ok(vm)
}
