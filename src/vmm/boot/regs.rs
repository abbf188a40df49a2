//! The boot vCPU's initial CPU state: GDT, identity page tables, segment and control
//! registers for the 64-bit Linux entry or the 32-bit PVH entry, general registers and
//! FPU defaults.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::{BootError, EntryPoint};
use crate::vmm::layout::*;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Present, writable, 2 MiB page.
const PDE_LARGE_RW: u64 = 0x83;
/// Present, writable.
const PTE_RW: u64 = 0x03;

/// GDT selectors (index * 8).
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

/// Builds a GDT descriptor from flags (the high nibble of byte 6 and byte 5), base and
/// limit, in the layout the CPU reads.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Null, 64-bit code, data, TSS.
const GDT_64: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// Null, 32-bit flat code, data, TSS: the PVH entry state.
const GDT_32: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` a selector loads from a descriptor.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    v: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { addr, source })
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), BootError> {
    for (i, e) in gdt.iter().enumerate() {
        write(mem, *e, BOOT_GDT_START + (i as u64) * 8)?;
    }
    write(mem, 0u64, BOOT_IDT_START)
}

/// Identity-maps the first 4 GiB with 2 MiB pages (so the kernel, the boot data and the
/// local APIC are all reachable).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write(mem, PDPTE_START | PTE_RW, PML4_START)?;
    for i in 0..PDE_COUNT {
        let pd = PDE_START + i * 0x1000;
        write(mem, pd | PTE_RW, PDPTE_START + i * 8)?;
        for j in 0..512u64 {
            let addr = ((i * 512 + j) << 21) | PDE_LARGE_RW;
            write(mem, addr, pd + j * 8)?;
        }
    }
    Ok(())
}

/// Writes the GDT (and, for the 64-bit entry, page tables) and returns the special
/// registers for the boot vCPU, starting from KVM's reset values in `sregs`.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, BootError> {
    let gdt: &[u64; 4] = match entry {
        EntryPoint::Linux64(_) => &GDT_64,
        EntryPoint::Pvh(_) => &GDT_32,
    };
    write_gdt(mem, gdt)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment(gdt[1], CODE_SEL);
    let data = segment(gdt[2], DATA_SEL);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], TSS_SEL);

    match entry {
        EntryPoint::Linux64(_) => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// General registers at the kernel entry.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            rflags: 0x2,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rip,
            rbx: PVH_INFO_START,
            rflags: 0x2,
            ..Default::default()
        },
    }
}

/// FPU reset state: x87 control word and MXCSR as after FNINIT / power-on.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_code_segment_is_64_bit_and_flat() {
        let cs = segment(GDT_64[1], CODE_SEL);
        assert_eq!((cs.l, cs.db, cs.present, cs.s), (1, 0, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.type_, 0xb);
    }

    #[test]
    fn pvh_code_segment_is_32_bit() {
        let cs = segment(GDT_32[1], CODE_SEL);
        assert_eq!((cs.l, cs.db), (0, 1));
    }

    #[test]
    fn linux64_entry_enables_paging_and_long_mode() {
        let m = mem();
        let s = boot_sregs(&m, EntryPoint::Linux64(0x100_0000), kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let pde: u64 = m.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | PDE_LARGE_RW);
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000, "the LAPIC page is mapped");
    }

    #[test]
    fn pvh_entry_is_protected_mode_without_paging() {
        let s = boot_sregs(&mem(), EntryPoint::Pvh(0x100_0000), kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_eq!(boot_regs(EntryPoint::Pvh(0x1234)).rbx, PVH_INFO_START);
    }
}
