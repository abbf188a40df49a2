//! `waterbear snapshot inspect`: the header and a readable JSON view of a VM state file.
//!
//! Raw KVM structures are shown by their meaningful fields (registers, control
//! registers, MP state) and sizes, not as kilobytes of byte arrays.

use std::path::Path;

use serde_json::{json, Value};

use super::{read_file, SnapshotError};
use crate::vmm::saved::VmSnapshot;
use crate::vmm::state::VcpuState;

/// Reads and checks `path` and returns its header and state as JSON.
pub fn inspect(path: &Path) -> Result<Value, SnapshotError> {
    let (header, payload) = read_file(path)?;
    let snap: VmSnapshot = crate::vmm::compat::decode_snapshot(path, header.version, &payload)?;
    Ok(json!({
        "file": path,
        "header": header,
        "saved_unix_ms": snap.saved_unix_ms,
        "config": snap.config,
        "memory": snap.memory,
        "vm": {
            "clock_ns": snap.vm.clock.clock,
            "pit_channel0_count": snap.vm.pit.channels[0].count,
        },
        "vcpus": snap.vcpus.iter().map(vcpu_json).collect::<Vec<_>>(),
        "devices": snap.devices,
    }))
}

/// The CPUID table as bytes (function, index, flags, registers of each entry), so two
/// snapshots can be compared by digest.
fn cpuid_bytes(v: &VcpuState) -> Vec<u8> {
    v.cpuid
        .iter()
        .flat_map(|e| [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx])
        .flat_map(u32::to_le_bytes)
        .collect()
}

fn vcpu_json(v: &VcpuState) -> Value {
    let r = &v.regs;
    let s = &v.sregs;
    let apic_id = u32::from_le_bytes([
        v.lapic.regs[0x20] as u8,
        v.lapic.regs[0x21] as u8,
        v.lapic.regs[0x22] as u8,
        v.lapic.regs[0x23] as u8,
    ]) >> 24;
    json!({
        "index": v.index,
        "mp_state": v.mp_state.mp_state,
        "rip": format!("{:#x}", r.rip),
        "rsp": format!("{:#x}", r.rsp),
        "rflags": format!("{:#x}", r.rflags),
        "cr0": format!("{:#x}", s.cr0),
        "cr3": format!("{:#x}", s.cr3),
        "cr4": format!("{:#x}", s.cr4),
        "efer": format!("{:#x}", s.efer),
        "cs_selector": format!("{:#x}", s.cs.selector),
        "apic_id": apic_id,
        "msrs": v.msrs.len(),
        "msr_indices_crc32": crc32fast::hash(
            &v.msrs.iter().flat_map(|m| m.index.to_le_bytes()).collect::<Vec<u8>>()
        ),
        "cpuid_entries": v.cpuid.len(),
        "cpuid_crc32": crc32fast::hash(&cpuid_bytes(v)),
        "xsave_bytes": v.xsave.len() * 4,
        "tsc_khz": v.tsc_khz,
        "pending_exception": v.events.exception.injected != 0 || v.events.exception.pending != 0,
    })
}
