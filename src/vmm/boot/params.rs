//! The memory map the guest is told about, and the structures that carry it: Linux
//! `boot_params` (zero page) for the 64-bit entry and `hvm_start_info` for PVH.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::BootError;
use crate::vmm::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `boot_params.hdr.loadflags`: the kernel was loaded high.
const LOADED_HIGH: u8 = 0x01;

/// One entry of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub addr: u64,
    pub size: u64,
    pub ram: bool,
}

/// Where the boot data went; what both boot protocols need to describe.
pub struct BootData {
    pub cmdline_addr: u64,
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    /// The ACPI RSDP, for kernels that take it from the boot protocol.
    pub rsdp: Option<u64>,
}

/// The guest memory map for `memory` bytes of RAM: conventional memory up to the EBDA,
/// the BIOS area (MP table) reserved, and RAM from 1 MiB on, split around the 32-bit
/// MMIO hole.
pub fn memory_map(memory: u64) -> Vec<MapEntry> {
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA_START,
            ram: true,
        },
        MapEntry {
            addr: EBDA_START,
            size: LOW_RAM_END - EBDA_START,
            ram: false,
        },
        MapEntry {
            addr: BIOS_AREA_START,
            size: HIMEM_START - BIOS_AREA_START,
            ram: false,
        },
    ];
    for (start, len) in ram_ranges(memory) {
        let start_hi = start.max(HIMEM_START);
        let end = start + len;
        if end > start_hi {
            map.push(MapEntry {
                addr: start_hi,
                size: end - start_hi,
                ram: true,
            });
        }
    }
    map
}

/// Writes `boot_params` for the Linux 64-bit boot protocol.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    data: &BootData,
    memory: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = data.cmdline_addr as u32;
    params.hdr.cmdline_size = data.cmdline_len as u32;
    if let Some((addr, size)) = data.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = data.rsdp.unwrap_or(0);
    let map = memory_map(memory);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: if e.ram { E820_RAM } else { E820_RESERVED },
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestWrite {
            addr: ZERO_PAGE_START,
            source,
        })
}

/// Writes `hvm_start_info`, its memory map and module list for the PVH entry.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    data: &BootData,
    memory: u64,
) -> Result<(), BootError> {
    let write_err = |addr| move |source| BootError::GuestWrite { addr, source };
    let map = memory_map(memory);
    for (i, e) in map.iter().take(PVH_MEMMAP_MAX).enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: if e.ram { E820_RAM } else { E820_RESERVED },
            reserved: 0,
        };
        let addr = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(addr))
            .map_err(write_err(addr))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: data.cmdline_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len().min(PVH_MEMMAP_MAX) as u32,
        rsdp_paddr: data.rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((addr, size)) = data.initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(write_err(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write_err(PVH_INFO_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_the_ebda_and_bios_area() {
        let map = memory_map(512 << 20);
        assert!(map.contains(&MapEntry {
            addr: 0,
            size: EBDA_START,
            ram: true
        }));
        assert!(map.iter().any(|e| !e.ram && e.addr == BIOS_AREA_START));
        assert!(map.contains(&MapEntry {
            addr: HIMEM_START,
            size: (512 << 20) - HIMEM_START,
            ram: true
        }));
        let ram: u64 = map.iter().filter(|e| e.ram).map(|e| e.size).sum();
        assert_eq!(ram, (512 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn memory_map_skips_the_mmio_hole() {
        let map = memory_map(6 << 30);
        assert!(map
            .iter()
            .filter(|e| e.ram)
            .all(|e| { e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END }));
        assert!(map.iter().any(|e| e.ram && e.addr == MMIO_GAP_END));
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_and_e820() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let data = BootData {
            cmdline_addr: CMDLINE_START,
            cmdline_len: 10,
            initrd: Some((0x1e0_0000, 4096)),
            rsdp: None,
        };
        write_boot_params(&mem, None, &data, 32 << 20).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x1e0_0000);
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(params.e820_entries as usize, memory_map(32 << 20).len());
    }

    #[test]
    fn pvh_info_points_at_memmap_and_module() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let data = BootData {
            cmdline_addr: CMDLINE_START,
            cmdline_len: 10,
            initrd: Some((0x1e0_0000, 4096)),
            rsdp: None,
        };
        write_pvh_info(&mem, &data, 32 << 20).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 4096);
        assert_eq!(info.memmap_entries as usize, memory_map(32 << 20).len());
    }
}
