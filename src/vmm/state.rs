//! The saved state of vCPUs and of the VM-wide in-kernel devices, and the ioctl
//! sequences that read and write it.
//!
//! Order matters and follows what KVM requires (and what other VMMs learned from bugs):
//! on save, MP state is read first; on restore, CPUID is set before anything else and
//! before the first `KVM_RUN`, special registers before the LAPIC, the LAPIC before
//! MSRs, and MSRs in index order so that TSC comes before TSC_DEADLINE. vCPU events are
//! written with the "valid" flags for the fields KVM only applies when asked.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs,
    Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSRs KVM does not list in `KVM_GET_MSR_INDEX_LIST` but a guest relies on: the MTRRs
/// (fixed and variable ranges, default type) and PAT. Losing them after restore leaves
/// the guest with uncached memory.
const EXTRA_MSRS: &[u32] = &[
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable, pairs 0-3
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // variable, pairs 4-7
    0x277, // PAT
    0x2ff, // MTRRdefType
];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} {what} of vCPU {index}")]
    Vcpu {
        op: &'static str,
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot {op} the VM's {what}")]
    Vm {
        op: &'static str,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM {op} {done} of {total} MSRs of vCPU {index} (MSR {failed:#x} refused)")]
    ShortMsrs {
        op: &'static str,
        index: u8,
        done: usize,
        total: usize,
        failed: u32,
    },
    #[error("the saved XSAVE area of vCPU {index} is {saved} bytes but this host's is {host}")]
    XsaveSize {
        index: u8,
        saved: usize,
        host: usize,
    },
    #[error("the snapshot needs CPUID features this host's KVM lacks: {0}")]
    CpuidFeatures(String),
    #[error(
        "the snapshot's vCPU {index} uses XSAVE components {missing:#x} this host does not support"
    )]
    XsaveFeatures { index: u8, missing: u64 },
    #[error("the saved CPUID of vCPU {index} has {count} entries, over KVM's limit")]
    CpuidTooLong { index: u8, count: usize },
    #[error(
        "vCPU {index} ran with a {saved} kHz TSC, this host's KVM runs vCPUs at {host} kHz and \
         cannot scale (set TSC frequency: {source}); more than {TSC_TOLERANCE_PERCENT}% apart, \
         the guest's timekeeping would be off too far"
    )]
    TscFrequency {
        index: u8,
        saved: u32,
        host: u32,
        source: kvm_ioctls::Error,
    },
}

/// How far apart (in percent) a saved and a host TSC frequency may be when the host
/// cannot scale the guest's TSC: within it the restore goes on at the host's rate.
pub const TSC_TOLERANCE_PERCENT: u32 = 10;

/// Gives a restored vCPU its saved TSC frequency. A host that cannot scale TSCs refuses
/// any frequency but its own (beyond KVM's 250 ppm tolerance). After a kexec the new
/// kernel calibrates the host TSC anew and may land a little off the old value; refusing
/// the guest for that would lose it, while running its TSC at a rate a fraction of a
/// percent different only skews TSC-based timekeeping by as much (kvmclock guests keep
/// correct time: KVM recomputes the kvmclock scale). So within `TSC_TOLERANCE_PERCENT`
/// the restore goes on with a warning.
fn restore_tsc_khz(fd: &VcpuFd, index: u8, saved: u32) -> Result<(), StateError> {
    let host = fd.get_tsc_khz().ok();
    if host == Some(saved) {
        return Ok(());
    }
    let Err(source) = fd.set_tsc_khz(saved) else {
        return Ok(());
    };
    let Some(host) = host else {
        return Err(StateError::Vcpu {
            op: "write",
            what: "TSC frequency",
            index,
            source,
        });
    };
    let apart = u64::from(host.abs_diff(saved)) * 100;
    if apart > u64::from(saved) * u64::from(TSC_TOLERANCE_PERCENT) {
        return Err(StateError::TscFrequency {
            index,
            saved,
            host,
            source,
        });
    }
    log::warn!(
        "vCPU {index} ran with a {saved} kHz TSC; this host cannot scale TSCs and runs it at \
         {host} kHz ({:.3}% apart): TSC-based guest timekeeping is off by as much",
        (f64::from(host) - f64::from(saved)) / f64::from(saved) * 100.0
    );
    Ok(())
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The whole XSAVE area as KVM_GET_XSAVE2 returns it (its size comes from
    /// KVM_CAP_XSAVE2), in 32-bit words.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    pub tsc_khz: Option<u32>,
}

/// VM-wide in-kernel state: the PIC pair, the IOAPIC, the PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The XSAVE area size in bytes KVM uses on this host.
pub fn xsave_size(vm: &VmFd) -> usize {
    let size = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size > 0 {
        size as usize
    } else {
        std::mem::size_of::<kvm_bindings::kvm_xsave>()
    }
}

/// The MSRs this vCPU can save: KVM's list plus `EXTRA_MSRS`, each probed once.
pub fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Vec<u32> {
    let mut list: Vec<u32> = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    list.extend_from_slice(EXTRA_MSRS);
    list.sort_unstable();
    list.dedup();
    list.retain(|&index| {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one entry fits");
        matches!(fd.get_msrs(&mut one), Ok(1))
    });
    list
}

fn vcpu_err(
    op: &'static str,
    what: &'static str,
    index: u8,
) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu {
        op,
        what,
        index,
        source,
    }
}

/// Reads a vCPU's whole state. The vCPU must not be running.
/// `cpuid` is the table the vCPU was given: saved as set rather than read back, so that
/// a restored vCPU gets exactly the same table generation after generation (KVM's
/// read-back adds run-time bits such as OSXSAVE).
pub fn save_vcpu(
    fd: &VcpuFd,
    index: u8,
    cpuid: &[kvm_cpuid_entry2],
    msr_indices: &[u32],
    xsave_bytes: usize,
) -> Result<VcpuState, StateError> {
    let get = |what| vcpu_err("read", what, index);
    // MP state first: reading it makes KVM settle pending INIT/SIPI into the state.
    let mp_state = fd.get_mp_state().map_err(get("MP state"))?;
    let regs = fd.get_regs().map_err(get("registers"))?;
    let sregs = fd.get_sregs().map_err(get("special registers"))?;
    let xsave = read_xsave(fd, index, xsave_bytes)?;
    let xcrs = fd.get_xcrs().map_err(get("XCRs"))?;
    let lapic = fd.get_lapic().map_err(get("LAPIC"))?;
    let msrs = read_msrs(fd, index, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(get("vCPU events"))?;
    let debug_regs = fd.get_debug_regs().map_err(get("debug registers"))?;
    let cpuid = cpuid.to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        lapic,
        msrs,
        events,
        debug_regs,
        tsc_khz,
    })
}

fn read_xsave(fd: &VcpuFd, index: u8, bytes: usize) -> Result<Vec<u32>, StateError> {
    let base = std::mem::size_of::<kvm_bindings::kvm_xsave>();
    let extra_words = bytes.saturating_sub(base).div_ceil(4);
    let mut xsave = Xsave::new(extra_words).expect("XSAVE size from KVM fits the FAM wrapper");
    // SAFETY: `xsave` was allocated with the size KVM_CAP_XSAVE2 reported, so the kernel
    // writes within it.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(vcpu_err("read", "XSAVE", index))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

fn read_msrs(fd: &VcpuFd, index: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("chunk fits the FAM limit");
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err("read", "MSRs", index))?;
        if n != chunk.len() {
            return Err(StateError::ShortMsrs {
                op: "read",
                index,
                done: out.len() + n,
                total: indices.len(),
                failed: chunk[n],
            });
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// Checks, before any vCPU exists, that this host can run the saved vCPUs: every CPUID
/// feature bit they were given is one this host's KVM supports, and their XSAVE
/// components are a subset of the host's.
pub fn check_host_compat(
    supported: &CpuId,
    vcpus: &[VcpuState],
    host_xsave_bytes: usize,
) -> Result<(), StateError> {
    const FEATURE_LEAVES: [(u32, u32); 5] = [(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];
    let find = |set: &[kvm_cpuid_entry2], f: u32, i: u32| {
        set.iter()
            .find(|e| e.function == f && e.index == i)
            .copied()
    };
    let mut missing = Vec::new();
    let count = u8::try_from(vcpus.len()).unwrap_or(u8::MAX);
    for v in vcpus {
        if v.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(StateError::CpuidTooLong {
                index: v.index,
                count: v.cpuid.len(),
            });
        }
        // Compare with what this host would give the same vCPU of the same VM: bits the
        // VMM sets itself (HTT, hypervisor) are part of that, not host features.
        let baseline = crate::vmm::cpuid::vcpu_cpuid(supported, v.index, count)
            .map(|c| c.as_slice().to_vec())
            .unwrap_or_else(|_| supported.as_slice().to_vec());
        for (leaf, sub) in FEATURE_LEAVES {
            let Some(saved) = find(&v.cpuid, leaf, sub) else {
                continue;
            };
            let host = find(&baseline, leaf, sub).unwrap_or_default();
            // Leaf 1 ECX bit 27 (OSXSAVE) mirrors the guest's CR4, not a host feature.
            let ecx_mask = if leaf == 1 { !(1u32 << 27) } else { !0 };
            // Leaf 7's EBX holds features too; leaf 1's EBX holds per-vCPU APIC fields.
            let ebx = if leaf == 7 {
                (saved.ebx, host.ebx)
            } else {
                (0, 0)
            };
            let regs = [
                ("ebx", ebx.0, ebx.1),
                ("ecx", saved.ecx & ecx_mask, host.ecx),
                ("edx", saved.edx, host.edx),
            ];
            for (reg, s, h) in regs {
                if s & !h != 0 {
                    missing.push(format!("leaf {leaf:#x}.{sub} {reg} bits {:#x}", s & !h));
                }
            }
        }
        let host_xcr0 = find(supported.as_slice(), 0xd, 0)
            .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
            .unwrap_or(0);
        let xcr0 = v
            .xcrs
            .xcrs
            .iter()
            .take(v.xcrs.nr_xcrs as usize)
            .find(|x| x.xcr == 0)
            .map(|x| x.value)
            .unwrap_or(0);
        if xcr0 & !host_xcr0 != 0 {
            return Err(StateError::XsaveFeatures {
                index: v.index,
                missing: xcr0 & !host_xcr0,
            });
        }
        if v.xsave.len() * 4 > host_xsave_bytes.max(std::mem::size_of::<kvm_bindings::kvm_xsave>())
        {
            return Err(StateError::XsaveSize {
                index: v.index,
                saved: v.xsave.len() * 4,
                host: host_xsave_bytes,
            });
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        missing.sort();
        missing.dedup();
        Err(StateError::CpuidFeatures(missing.join(", ")))
    }
}

/// Writes a saved state into a freshly created vCPU, in KVM's required order.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let index = state.index;
    let set = |what| vcpu_err("write", what, index);
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::CpuidTooLong {
        index,
        count: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        restore_tsc_khz(fd, index, khz)?;
    }
    fd.set_sregs(&state.sregs)
        .map_err(set("special registers"))?;
    fd.set_regs(&state.regs).map_err(set("registers"))?;
    write_xsave(fd, index, &state.xsave)?;
    fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
    fd.set_lapic(&state.lapic).map_err(set("LAPIC"))?;
    write_msrs(fd, index, &state.msrs)?;
    let mut events = state.events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events).map_err(set("vCPU events"))?;
    fd.set_mp_state(state.mp_state).map_err(set("MP state"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(set("debug registers"))?;
    Ok(())
}

fn write_xsave(fd: &VcpuFd, index: u8, words: &[u32]) -> Result<(), StateError> {
    let region_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
    let extra = words.len().saturating_sub(region_words);
    let mut xsave = Xsave::new(extra).expect("saved XSAVE size was checked against the host");
    let n = words.len().min(region_words);
    // SAFETY: `xsave` has room for `extra` trailing words past the fixed region, and the
    // slices written below are within those bounds.
    unsafe {
        let fam = xsave.as_mut_fam_struct();
        fam.xsave.region[..n].copy_from_slice(&words[..n]);
    }
    xsave.as_mut_slice().copy_from_slice(&words[n..]);
    // SAFETY: the buffer is at least as large as KVM's XSAVE area (checked by
    // check_host_compat), so the kernel reads within it.
    unsafe { fd.set_xsave2(&xsave) }.map_err(vcpu_err("write", "XSAVE", index))
}

fn write_msrs(fd: &VcpuFd, index: u8, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|e| e.index);
    let mut done = 0;
    for chunk in sorted.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).expect("chunk fits the FAM limit");
        let n = fd
            .set_msrs(&msrs)
            .map_err(vcpu_err("write", "MSRs", index))?;
        if n != chunk.len() {
            return Err(StateError::ShortMsrs {
                op: "accepted",
                index,
                done: done + n,
                total: sorted.len(),
                failed: chunk[n].index,
            });
        }
        done += n;
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(|source| StateError::Vm {
        op: "read",
        what,
        source,
    })?;
    Ok(chip)
}

/// Reads the VM-wide state. All vCPUs must be paused.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let get = |what| {
        move |source| StateError::Vm {
            op: "read",
            what,
            source,
        }
    };
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "master PIC")?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
        pit: vm.get_pit2().map_err(get("PIT"))?,
        clock: vm.get_clock().map_err(get("clock"))?,
    })
}

/// Writes the VM-wide state; call before any vCPU of the restored VM runs.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    let set = |what| {
        move |source| StateError::Vm {
            op: "write",
            what,
            source,
        }
    };
    vm.set_irqchip(&state.pic_master)
        .map_err(set("master PIC"))?;
    vm.set_irqchip(&state.pic_slave).map_err(set("slave PIC"))?;
    vm.set_irqchip(&state.ioapic).map_err(set("IOAPIC"))?;
    vm.set_pit2(&state.pit).map_err(set("PIT"))?;
    // Only the clock value is restored: the flags describe how KVM read it.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(set("clock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vcpu_with(cpuid: Vec<kvm_cpuid_entry2>) -> VcpuState {
        VcpuState {
            index: 0,
            cpuid,
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; 1024],
            xcrs: Default::default(),
            lapic: Default::default(),
            msrs: vec![],
            events: Default::default(),
            debug_regs: Default::default(),
            tsc_khz: None,
        }
    }

    #[test]
    fn host_lacking_a_saved_feature_is_refused() {
        let host = CpuId::from_entries(&[entry(1, 0, 0, 0b0011, 0xff)]).unwrap();
        let saved = vcpu_with(vec![entry(1, 0, 0, 0b0111, 0xff)]);
        let err = check_host_compat(&host, &[saved], 4096).unwrap_err();
        assert!(
            matches!(err, StateError::CpuidFeatures(ref s) if s.contains("ecx bits 0x4")),
            "{err}"
        );
    }

    #[test]
    fn host_with_every_saved_feature_is_accepted() {
        let host =
            CpuId::from_entries(&[entry(1, 0, 0, 0b1111, 0xff), entry(7, 0, 0xf, 0, 0)]).unwrap();
        let saved = vcpu_with(vec![
            entry(1, 0, 0x0200_0800, 0b0101 | (1 << 27), 0x0f),
            entry(7, 0, 0x3, 0, 0),
        ]);
        check_host_compat(&host, &[saved], 4096).unwrap();
    }

    #[test]
    fn larger_xsave_area_than_the_host_is_refused() {
        let host = CpuId::from_entries(&[entry(1, 0, 0, 0, 0)]).unwrap();
        let mut saved = vcpu_with(vec![]);
        saved.xsave = vec![0; 4096];
        assert!(matches!(
            check_host_compat(&host, &[saved], 4096),
            Err(StateError::XsaveSize { .. })
        ));
    }
}
