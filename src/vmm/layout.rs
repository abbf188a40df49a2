//! The guest physical address map: where waterbear places boot structures, where RAM
//! ends and the MMIO hole below 4 GiB begins.
//!
//! Low memory (below 1 MiB) holds the boot structures; the kernel goes at or above
//! `HIMEM_START`. Every range written here that is not RAM for the guest is reserved in
//! the e820 map or the PVH memory map.

/// GDT used for the 64-bit and PVH entries.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries (at most `PVH_MEMMAP_MAX` of them).
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MEMMAP_MAX: usize = 32;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6800;
/// Linux `boot_params` (the "zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables: PML4, one PDPT, and four page directories of 2 MiB
/// pages that together map the first 4 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Number of page directories (each maps 1 GiB).
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we place; the kernel's own limit may be lower (bzImage header).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Extended BIOS data area: the top of conventional memory, reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory; 0xa0000..0x100000 is the legacy VGA/ROM hole.
pub const LOW_RAM_END: u64 = 0xa0000;
/// The BIOS area, reserved: ACPI tables from 0xE0000, the MP table from 0xF0000 (both
/// where Linux scans for them).
pub const BIOS_AREA_START: u64 = 0xe0000;
/// Start of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole (IOAPIC, LAPIC, future MMIO devices); RAM above it is
/// relocated to start at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The virtio-mmio devices' register windows, one 4 KiB page each from here on, in the
/// MMIO hole below the IOAPIC.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The GSIs (IOAPIC pins) of the virtio devices, in device order. Pins 0-4 belong to the
/// PIT, keyboard, cascade, COM2 and COM1, 8 to the RTC, 12 and 13 to the PS/2 mouse and the
/// FPU on a PC; the rest of the first IOAPIC's 24 pins are free.
pub const VIRTIO_GSIS: [u32; 16] = [5, 6, 7, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];
/// At most this many virtio devices: one per free GSI.
pub const MAX_VIRTIO_DEVICES: usize = VIRTIO_GSIS.len();
/// With command-line discovery the guest finds its interrupts in the MP table, which
/// wires only the 16 ISA IRQs: the first 8 GSIs of the list.
pub const CMDLINE_VIRTIO_DEVICES: usize = 8;
const _: () = assert!(VIRTIO_GSIS[CMDLINE_VIRTIO_DEVICES - 1] < 16);

/// Where virtio device `index` (disks first, then network interfaces) sits: its MMIO
/// window's base address and its GSI.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *VIRTIO_GSIS.get(index)?;
    Some((VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, gsi))
}

/// KVM's TSS (three pages) and identity map page, placed in the MMIO hole below the
/// IOAPIC where they never collide with RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

// The boot structures must not overlap one another.
const _: () = assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
const _: () = assert!(PVH_MEMMAP_START + (PVH_MEMMAP_MAX as u64) * 24 <= PVH_MODLIST_START);
const _: () = assert!(PVH_MODLIST_START + 32 <= ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
const _: () = assert!(PDE_START + PDE_COUNT * 0x1000 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
// The virtio windows sit in the MMIO hole, clear of KVM's TSS and the IOAPIC above.
const _: () = assert!(MMIO_GAP_START <= VIRTIO_MMIO_START);
const _: () = assert!(
    VIRTIO_MMIO_START + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE <= KVM_IDENTITY_MAP_ADDRESS
);

/// Guest RAM ranges for `size` bytes of RAM: one range below the MMIO hole and, when the
/// RAM does not fit under it, a second range starting at 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_gap_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn ram_above_gap_is_split_at_four_gib() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(
            ranges,
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
        );
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), size);
    }
}
