//! The Intel MultiProcessor Specification 1.4 table that tells a guest without ACPI where its
//! CPUs, its IOAPIC and its legacy interrupt lines are.
//!
//! This module owns the layout and contents of the table and writes it into guest memory at
//! [`MPTABLE_START`]. It does not own the e820 map (the caller reserves
//! `MPTABLE_START..MPTABLE_START + MPTABLE_MAX_SIZE`), the in-kernel irqchip, or the GSI routing
//! the table describes; see [`ISA_IRQ0_IOAPIC_PIN`] for the one place where the two must agree.
//!
//! Every structure is serialised by hand in the specification's little-endian layout, so no
//! `unsafe` is needed.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Guest physical address of the floating pointer structure. Linux scans the BIOS area
/// 0xF0000..0x100000 for it on 16-byte boundaries; the caller reserves that range in e820.
pub const MPTABLE_START: u64 = 0xf_0000;
/// Room reserved for the whole table (floating pointer plus configuration table).
pub const MPTABLE_MAX_SIZE: u64 = 0x1_0000;
/// Guest physical address of the IOAPIC registers (KVM's in-kernel IOAPIC lives here).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Guest physical address of every local APIC.
pub const APIC_DEFAULT_ADDR: u32 = 0xfee0_0000;
/// Largest CPU count the table supports: CPUs take APIC IDs `0..num_cpus`, the IOAPIC takes
/// `num_cpus`, and 0xFF is the broadcast ID, so 8-bit IDs leave room for 254 CPUs.
pub const MAX_CPUS: u8 = 254;

/// IOAPIC input pin the table wires ISA IRQ 0 (the PIT) to.
///
/// This must match KVM's GSI routing. `KVM_CREATE_IRQCHIP` installs a default routing that
/// sends GSI `n` to IOAPIC pin `n` (and to the PIC) for every ISA IRQ, IRQ 0 included, and the
/// in-kernel PIT raises GSI 0, so with that routing the PIT arrives on pin 0. Linux takes the
/// pin for IRQ 0 from this table; it assumes pin 2 only for the MP spec's default
/// configurations or when ACPI announces an override. A table saying pin 2 while KVM delivers
/// on pin 0 would leave the PIT masked at the IOAPIC, and a Linux guest that sees KVM skips its
/// timer check (`no_timer_check`), so it would not notice. A VMM that installs its own routing
/// with GSI 0 on pin 2 (as QEMU does) must set this to 2; the table then leaves out ISA IRQ 2,
/// whose pin IRQ 0 has taken.
pub const ISA_IRQ0_IOAPIC_PIN: u8 = 0;

/// Failures while building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The guest has no CPU to describe.
    #[error("An MP table needs at least one CPU")]
    NoCpus,
    /// More CPUs than 8-bit APIC IDs allow next to the IOAPIC.
    #[error("Too many CPUs for the MP table: {num_cpus} requested, at most {max} supported")]
    TooManyCpus { num_cpus: u8, max: u8 },
    /// Guest memory does not cover the range the table goes in.
    #[error(
        "The MP table ({size} bytes at {start:#x}) does not fit in guest memory; \
         guest memory must cover the BIOS area up to 0x100000"
    )]
    TableOutsideMemory { start: u64, size: u64 },
    /// Writing the table to guest memory failed.
    #[error("Failed to write the MP table to guest memory at {start:#x}")]
    WriteTable {
        start: u64,
        #[source]
        source: GuestMemoryError,
    },
}

const FLOATING_POINTER_LEN: u64 = 16;
const CONFIG_HEADER_LEN: u64 = 44;
const PROCESSOR_ENTRY_LEN: u64 = 20;
const BUS_ENTRY_LEN: u64 = 8;
const IOAPIC_ENTRY_LEN: u64 = 8;
const IO_INTERRUPT_ENTRY_LEN: u64 = 8;
const LOCAL_INTERRUPT_ENTRY_LEN: u64 = 8;

const FLOATING_POINTER_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
/// Specification revision 1.4.
const SPEC_REVISION: u8 = 4;
const OEM_ID: &[u8; 8] = b"WTRBEAR ";
const PRODUCT_ID: &[u8; 12] = b"WATERBEAR   ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Version register value of KVM's local APIC (an integrated xAPIC).
const LOCAL_APIC_VERSION: u8 = 0x14;
/// Family 6, model 0, stepping 0: Linux only prints it.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX FPU (bit 0) and APIC (bit 9).
const CPU_FEATURE_FLAGS: u32 = (1 << 0) | (1 << 9);

const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";

const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1 << 0;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus": edge-triggered, active high on ISA.
const INT_FLAGS_CONFORMING: u16 = 0;
/// Destination local APIC ID meaning "every local APIC".
const ALL_LOCAL_APICS: u8 = 0xff;
const ISA_IRQ_COUNT: u8 = 16;

/// IOAPIC pin for ISA IRQ `irq`, or `None` when that IRQ is not wired to the IOAPIC.
const fn isa_irq_pin(irq: u8) -> Option<u8> {
    if irq == 0 {
        Some(ISA_IRQ0_IOAPIC_PIN)
    } else if irq == ISA_IRQ0_IOAPIC_PIN {
        None
    } else {
        Some(irq)
    }
}

const fn io_interrupt_entry_count() -> u64 {
    let mut count = 0;
    let mut irq = 0;
    while irq < ISA_IRQ_COUNT {
        if isa_irq_pin(irq).is_some() {
            count += 1;
        }
        irq += 1;
    }
    count
}

/// Bytes the whole table (floating pointer and configuration table) takes for `num_cpus` CPUs.
pub const fn mptable_size(num_cpus: u8) -> u64 {
    FLOATING_POINTER_LEN + CONFIG_HEADER_LEN + config_entries_len(num_cpus)
}

const fn config_entries_len(num_cpus: u8) -> u64 {
    num_cpus as u64 * PROCESSOR_ENTRY_LEN
        + BUS_ENTRY_LEN
        + IOAPIC_ENTRY_LEN
        + io_interrupt_entry_count() * IO_INTERRUPT_ENTRY_LEN
        + 2 * LOCAL_INTERRUPT_ENTRY_LEN
}

const _: () = assert!(mptable_size(MAX_CPUS) <= MPTABLE_MAX_SIZE);

/// Writes an MP table describing `num_cpus` CPUs, one ISA bus and one IOAPIC at
/// [`MPTABLE_START`] in `mem`.
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus {
            num_cpus,
            max: MAX_CPUS,
        });
    }

    let table = build_table(num_cpus);
    let start = GuestAddress(MPTABLE_START);
    if !mem.check_range(start, table.len(), Permissions::Write) {
        return Err(MptableError::TableOutsideMemory {
            start: MPTABLE_START,
            size: table.len() as u64,
        });
    }
    mem.write_slice(&table, start)
        .map_err(|source| MptableError::WriteTable {
            start: MPTABLE_START,
            source,
        })
}

/// The table's bytes as they go into guest memory at [`MPTABLE_START`]: the floating pointer,
/// then the configuration table right after it.
fn build_table(num_cpus: u8) -> Vec<u8> {
    let mut entries = Vec::with_capacity(config_entries_len(num_cpus) as usize);
    let mut entry_count: u16 = 0;
    let ioapic_id = num_cpus;

    // The specification wants entries sorted by type.
    for cpu in 0..num_cpus {
        push_processor(&mut entries, cpu, cpu == 0);
        entry_count += 1;
    }
    push_bus(&mut entries, ISA_BUS_ID, ISA_BUS_TYPE);
    entry_count += 1;
    push_ioapic(&mut entries, ioapic_id);
    entry_count += 1;
    for irq in 0..ISA_IRQ_COUNT {
        if let Some(pin) = isa_irq_pin(irq) {
            push_io_interrupt(&mut entries, irq, ioapic_id, pin);
            entry_count += 1;
        }
    }
    // LINT0 takes the 8259 PIC's output (virtual wire mode), LINT1 the NMI line.
    for (lint, int_type) in [(0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        push_local_interrupt(&mut entries, int_type, lint);
        entry_count += 1;
    }

    let config_addr = MPTABLE_START + FLOATING_POINTER_LEN;
    let mut table = floating_pointer(config_addr as u32).to_vec();
    let config_start = table.len();
    table.extend_from_slice(&config_header(entries.len(), entry_count));
    table.extend_from_slice(&entries);
    table[config_start + CONFIG_CHECKSUM_OFFSET] = checksum(&table[config_start..]);
    table
}

const FLOATING_POINTER_CHECKSUM_OFFSET: usize = 10;
const CONFIG_CHECKSUM_OFFSET: usize = 7;

/// The byte that makes the sum of `bytes` (with that byte still zero) wrap to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

fn floating_pointer(config_addr: u32) -> [u8; FLOATING_POINTER_LEN as usize] {
    let mut fp = [0u8; FLOATING_POINTER_LEN as usize];
    fp[0..4].copy_from_slice(FLOATING_POINTER_SIGNATURE);
    fp[4..8].copy_from_slice(&config_addr.to_le_bytes());
    fp[8] = 1; // Length in 16-byte units.
    fp[9] = SPEC_REVISION;
    // fp[11], feature byte 1, stays 0: a configuration table is present.
    // fp[12] bit 7 (IMCRP) stays 0: virtual wire mode, there is no IMCR.
    fp[FLOATING_POINTER_CHECKSUM_OFFSET] = checksum(&fp);
    fp
}

/// Configuration table header with its checksum left zero (it covers the entries too).
fn config_header(entries_len: usize, entry_count: u16) -> [u8; CONFIG_HEADER_LEN as usize] {
    let base_len = (CONFIG_HEADER_LEN as usize + entries_len) as u16;
    let mut header = [0u8; CONFIG_HEADER_LEN as usize];
    header[0..4].copy_from_slice(CONFIG_SIGNATURE);
    header[4..6].copy_from_slice(&base_len.to_le_bytes());
    header[6] = SPEC_REVISION;
    header[8..16].copy_from_slice(OEM_ID);
    header[16..28].copy_from_slice(PRODUCT_ID);
    // 28..34: no OEM table (pointer and size zero).
    header[34..36].copy_from_slice(&entry_count.to_le_bytes());
    header[36..40].copy_from_slice(&APIC_DEFAULT_ADDR.to_le_bytes());
    // 40..44: no extended table (length and checksum zero), reserved byte.
    header
}

fn push_processor(out: &mut Vec<u8>, apic_id: u8, bootstrap: bool) {
    let flags = if bootstrap {
        CPU_ENABLED | CPU_BOOTSTRAP
    } else {
        CPU_ENABLED
    };
    out.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, LOCAL_APIC_VERSION, flags]);
    out.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
    out.extend_from_slice(&CPU_FEATURE_FLAGS.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // Reserved.
}

fn push_bus(out: &mut Vec<u8>, bus_id: u8, bus_type: &[u8; 6]) {
    out.extend_from_slice(&[ENTRY_BUS, bus_id]);
    out.extend_from_slice(bus_type);
}

fn push_ioapic(out: &mut Vec<u8>, ioapic_id: u8) {
    out.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    out.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
}

/// ISA IRQ `irq` wired to pin `pin` of IOAPIC `ioapic_id`.
fn push_io_interrupt(out: &mut Vec<u8>, irq: u8, ioapic_id: u8, pin: u8) {
    push_interrupt(out, ENTRY_IO_INTERRUPT, INT_TYPE_INT, irq, ioapic_id, pin);
}

/// Interrupt `int_type` wired to input LINT`lint` of every local APIC.
fn push_local_interrupt(out: &mut Vec<u8>, int_type: u8, lint: u8) {
    push_interrupt(
        out,
        ENTRY_LOCAL_INTERRUPT,
        int_type,
        0,
        ALL_LOCAL_APICS,
        lint,
    );
}

/// The layout I/O and local interrupt entries share: the source is an ISA IRQ, the destination
/// an APIC ID and one of that APIC's inputs.
fn push_interrupt(
    out: &mut Vec<u8>,
    entry_type: u8,
    int_type: u8,
    source_irq: u8,
    dest_apic_id: u8,
    dest_input: u8,
) {
    out.extend_from_slice(&[entry_type, int_type]);
    out.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
    out.extend_from_slice(&[ISA_BUS_ID, source_irq, dest_apic_id, dest_input]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Guest memory covering the first MiB, BIOS area included.
    fn low_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn read_table(mem: &GuestMemoryMmap, num_cpus: u8) -> Vec<u8> {
        let mut table = vec![0u8; mptable_size(num_cpus) as usize];
        mem.read_slice(&mut table, GuestAddress(MPTABLE_START))
            .unwrap();
        table
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    /// The configuration table the floating pointer points at, checked against the header.
    fn config_table(table: &[u8]) -> &[u8] {
        let config_addr = u64::from(u32_at(table, 4));
        let start = (config_addr - MPTABLE_START) as usize;
        let len = usize::from(u16_at(table, start + 4));
        &table[start..start + len]
    }

    /// The configuration table's entries, each as its bytes, walked the way Linux walks them.
    fn entries(config: &[u8]) -> Vec<&[u8]> {
        let mut entries = Vec::new();
        let mut offset = CONFIG_HEADER_LEN as usize;
        while offset < config.len() {
            let len = match config[offset] {
                ENTRY_PROCESSOR => PROCESSOR_ENTRY_LEN,
                ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => 8,
                other => panic!("unknown entry type {other}"),
            } as usize;
            entries.push(&config[offset..offset + len]);
            offset += len;
        }
        assert_eq!(offset, config.len());
        entries
    }

    fn entries_of_type(config: &[u8], entry_type: u8) -> Vec<&[u8]> {
        entries(config)
            .into_iter()
            .filter(|e| e[0] == entry_type)
            .collect()
    }

    #[test]
    fn floating_pointer_is_aligned_valid_and_sums_to_zero() {
        let mem = low_memory();
        setup_mptable(&mem, 4).unwrap();
        let table = read_table(&mem, 4);

        let fp = &table[..16];
        assert_eq!(MPTABLE_START % 16, 0);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp[8], 1);
        assert_eq!(fp[9], 4);
        assert_eq!(fp[11], 0);
        assert_eq!(sum(fp), 0);
    }

    #[test]
    fn config_table_header_is_valid_and_sums_to_zero() {
        let mem = low_memory();
        setup_mptable(&mem, 4).unwrap();
        let table = read_table(&mem, 4);

        let config = config_table(&table);
        assert_eq!(&config[0..4], b"PCMP");
        assert_eq!(config[6], 4);
        assert_eq!(u32_at(config, 36), APIC_DEFAULT_ADDR);
        assert_eq!(sum(config), 0);
        assert_eq!(16 + config.len() as u64, mptable_size(4));
    }

    #[test]
    fn entry_count_matches_entries() {
        for num_cpus in [1, 2, 7, MAX_CPUS] {
            let mem = low_memory();
            setup_mptable(&mem, num_cpus).unwrap();
            let table = read_table(&mem, num_cpus);

            let config = config_table(&table);
            assert_eq!(usize::from(u16_at(config, 34)), entries(config).len());
        }
    }

    #[test]
    fn one_enabled_processor_per_cpu_and_only_cpu_0_is_bootstrap() {
        let num_cpus = 5;
        let mem = low_memory();
        setup_mptable(&mem, num_cpus).unwrap();
        let table = read_table(&mem, num_cpus);

        let cpus = entries_of_type(config_table(&table), ENTRY_PROCESSOR);
        assert_eq!(cpus.len(), usize::from(num_cpus));
        for (index, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu[1]), index, "APIC ID");
            assert_ne!(cpu[3] & CPU_ENABLED, 0);
        }
        let bootstrap: Vec<u8> = cpus
            .iter()
            .filter(|cpu| cpu[3] & CPU_BOOTSTRAP != 0)
            .map(|cpu| cpu[1])
            .collect();
        assert_eq!(bootstrap, [0]);
    }

    #[test]
    fn ioapic_entry_follows_the_cpus() {
        let num_cpus = 3;
        let mem = low_memory();
        setup_mptable(&mem, num_cpus).unwrap();
        let table = read_table(&mem, num_cpus);

        let ioapics = entries_of_type(config_table(&table), ENTRY_IOAPIC);
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!(ioapic[1], num_cpus);
        assert_eq!(ioapic[2], 0x11);
        assert_eq!(ioapic[3] & IOAPIC_ENABLED, IOAPIC_ENABLED);
        assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDR);
    }

    #[test]
    fn each_isa_irq_has_its_own_pin_and_irq0_the_configured_one() {
        let num_cpus = 2;
        let mem = low_memory();
        setup_mptable(&mem, num_cpus).unwrap();
        let table = read_table(&mem, num_cpus);
        let config = config_table(&table);

        let buses = entries_of_type(config, ENTRY_BUS);
        assert_eq!(buses.len(), 1);
        assert_eq!(&buses[0][2..8], b"ISA   ");
        let routes: Vec<(u8, u8)> = entries_of_type(config, ENTRY_IO_INTERRUPT)
            .iter()
            .inspect(|e| {
                assert_eq!(e[1], INT_TYPE_INT);
                assert_eq!(e[4], buses[0][1], "source bus");
                assert_eq!(e[6], num_cpus, "destination IOAPIC");
            })
            .map(|e| (e[5], e[7]))
            .collect();
        let expected: Vec<(u8, u8)> = (0..16)
            .filter_map(|irq| match irq {
                0 => Some((0, ISA_IRQ0_IOAPIC_PIN)),
                irq if irq == ISA_IRQ0_IOAPIC_PIN => None,
                irq => Some((irq, irq)),
            })
            .collect();
        assert_eq!(routes, expected);
        let mut pins: Vec<u8> = routes.iter().map(|(_, pin)| *pin).collect();
        pins.sort_unstable();
        pins.dedup();
        assert_eq!(pins.len(), routes.len(), "two IRQs share a pin");
    }

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi_on_every_local_apic() {
        let mem = low_memory();
        setup_mptable(&mem, 2).unwrap();
        let table = read_table(&mem, 2);

        let lints: Vec<(u8, u8, u8)> = entries_of_type(config_table(&table), ENTRY_LOCAL_INTERRUPT)
            .iter()
            .map(|e| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            lints,
            [
                (INT_TYPE_EXTINT, ALL_LOCAL_APICS, 0),
                (INT_TYPE_NMI, ALL_LOCAL_APICS, 1)
            ]
        );
    }

    #[test]
    fn table_for_max_cpus_fits_in_reserved_area() {
        assert!(mptable_size(MAX_CPUS) <= MPTABLE_MAX_SIZE);
        let mem = low_memory();
        setup_mptable(&mem, MAX_CPUS).unwrap();
        let table = read_table(&mem, MAX_CPUS);
        assert_eq!(sum(config_table(&table)), 0);
    }

    #[test]
    fn zero_cpus_is_an_error() {
        let mem = low_memory();
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
    }

    #[test]
    fn more_than_max_cpus_is_an_error() {
        let mem = low_memory();
        let err = setup_mptable(&mem, MAX_CPUS + 1).unwrap_err();
        assert!(matches!(
            err,
            MptableError::TooManyCpus {
                num_cpus: 255,
                max: 254
            }
        ));
        assert_eq!(
            err.to_string(),
            "Too many CPUs for the MP table: 255 requested, at most 254 supported"
        );
    }

    #[test]
    fn guest_memory_below_the_bios_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::TableOutsideMemory { .. })
        ));
    }

    #[test]
    fn guest_memory_ending_inside_the_table_is_an_error() {
        let end = MPTABLE_START as usize + 32;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), end)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::TableOutsideMemory { .. })
        ));
    }
}
