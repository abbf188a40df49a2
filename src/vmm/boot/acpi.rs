//! The ACPI tables that tell a guest kernel built without MP table support (Debian's stock
//! cloud kernel, for one) where its CPUs, its IOAPIC and its legacy devices are.
//!
//! This module owns the contents and the layout of the RSDP, XSDT, FADT, DSDT and MADT, and
//! writes them into guest memory at [`ACPI_START`]. The machine they describe is a
//! hardware-reduced ACPI platform: no PM timer, PM1 blocks, GPEs or SCI for the VMM to
//! emulate. It does not own the e820 map (the caller reserves
//! `ACPI_START..ACPI_START + ACPI_MAX_SIZE`), the pointers to the RSDP in `boot_params` and
//! `hvm_start_info` (the caller stores the returned address there), the devices the DSDT
//! names, or the interrupt routing the MADT describes; the MP table's [`ISA_IRQ0_IOAPIC_PIN`]
//! is the one setting both tables follow.
//!
//! The tables come from the `acpi_tables` crate. The MADT is built on its generic [`Sdt`]
//! because the crate's own MADT type takes only structures that derive `zerocopy` traits; the
//! two entries the crate does not offer (local APIC NMI, interrupt source override) are
//! serialised here by hand. No `unsafe` is needed.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::mptable::{
    APIC_DEFAULT_ADDR, IOAPIC_ADDR, ISA_IRQ0_IOAPIC_PIN, MAX_CPUS, MPTABLE_START,
};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::vmm::layout::VIRTIO_MMIO_SIZE;

/// Guest physical address of the RSDP, the first of the tables. Linux scans 0xE0000..0x100000
/// for it on 16-byte boundaries when the boot protocol does not hand it the address.
pub const ACPI_START: u64 = 0xe_0000;
/// Room reserved for all the tables; the MP table owns the BIOS area above it.
pub const ACPI_MAX_SIZE: u64 = 0x1_0000;

const _: () = assert!(ACPI_START % 16 == 0);
const _: () = assert!(ACPI_START + ACPI_MAX_SIZE <= MPTABLE_START);

/// Failures while building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The guest has no CPU to describe.
    #[error("ACPI tables need at least one CPU")]
    NoCpus,
    /// More CPUs than 8-bit APIC IDs allow next to the IOAPIC.
    #[error("Too many CPUs for the ACPI tables: {num_cpus} requested, at most {max} supported")]
    TooManyCpus { num_cpus: u8, max: u8 },
    /// The tables outgrew the area reserved for them.
    #[error("The ACPI tables take {size} bytes, more than the {max} bytes reserved at {start:#x}")]
    TablesTooLarge { start: u64, size: u64, max: u64 },
    /// Guest memory does not cover the range the tables go in.
    #[error(
        "The ACPI tables ({size} bytes at {start:#x}) do not fit in guest memory; \
         guest memory must cover the BIOS area from 0xe0000"
    )]
    TablesOutsideMemory { start: u64, size: u64 },
    /// Writing the tables to guest memory failed.
    #[error("Failed to write the ACPI tables to guest memory at {start:#x}")]
    WriteTables {
        start: u64,
        #[source]
        source: GuestMemoryError,
    },
}

const OEM_ID: [u8; 6] = *b"WTRBER";
/// The specification wants the FADT's table ID to match the XSDT's, so every table uses it.
const OEM_TABLE_ID: [u8; 8] = *b"WTRBEAR ";
const OEM_REVISION: u32 = 1;

/// Every table after the RSDP starts on this boundary.
const TABLE_ALIGN: usize = 16;

const SDT_HEADER_LEN: u32 = 36;
/// Revision 2 and up: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// ACPI 6.2 to 6.4 layout; the entries used here are the same in every revision.
const MADT_REVISION: u8 = 5;
/// Standard header, local APIC address, flags.
const MADT_HEADER_LEN: u32 = 44;
const MADT_LOCAL_APIC_ADDR_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
/// KVM's in-kernel irqchip does have the dual 8259, so this is true; a guest OS that sees it
/// knows to remap and mask the PICs rather than trust their reset state.
const MADT_PCAT_COMPAT: u32 = 1 << 0;

const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_INTERRUPT_OVERRIDE_LEN: u8 = 10;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_NMI_LEN: u8 = 6;
/// Processor UID meaning "every processor"; CPU UIDs stop at `MAX_CPUS - 1`.
const ALL_PROCESSORS: u8 = 0xff;
/// Polarity and trigger mode "conform to the bus": edge-triggered, active high for ISA.
const MPS_INTI_CONFORMING: u16 = 0;
const ISA_BUS: u8 = 0;
/// The local APIC input the NMI line is wired to.
const NMI_LINT: u8 = 1;

/// IA-PC boot architecture flags: there is no VGA and no CMOS RTC, so the guest should not
/// probe for them. The 8042 flag stays clear, so Linux skips its i8042 driver; the keyboard
/// controller reset on port 0x64 that `reboot` uses needs no driver.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Writes the RSDP (at [`ACPI_START`], 16-byte aligned so a scan of the BIOS area finds it),
/// the XSDT, FADT, DSDT and MADT for `num_cpus` CPUs and the virtio-mmio devices `virtio`
/// (each its window's base and its GSI) into `mem`, and returns the RSDP's address.
pub fn setup_acpi<M: GuestMemory>(
    mem: &M,
    num_cpus: u8,
    virtio: &[(u64, u32)],
) -> Result<u64, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus {
            num_cpus,
            max: MAX_CPUS,
        });
    }

    let tables = build_tables(num_cpus, virtio);
    let size = tables.len() as u64;
    if size > ACPI_MAX_SIZE {
        return Err(AcpiError::TablesTooLarge {
            start: ACPI_START,
            size,
            max: ACPI_MAX_SIZE,
        });
    }
    let start = GuestAddress(ACPI_START);
    if !mem.check_range(start, tables.len(), Permissions::Write) {
        return Err(AcpiError::TablesOutsideMemory {
            start: ACPI_START,
            size,
        });
    }
    mem.write_slice(&tables, start)
        .map_err(|source| AcpiError::WriteTables {
            start: ACPI_START,
            source,
        })?;
    Ok(ACPI_START)
}

/// The tables' bytes as they go into guest memory at [`ACPI_START`]: the RSDP, then each table
/// after the ones it points to (DSDT, FADT, MADT, XSDT).
fn build_tables(num_cpus: u8, virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut image = TableImage::new();
    let dsdt = image.push(dsdt(virtio).as_slice());
    let fadt = image.push(&aml_bytes(&fadt(dsdt)));
    let madt = image.push(madt(num_cpus).as_slice());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = image.push(&aml_bytes(&xsdt));
    image.finish(&Rsdp::new(OEM_ID, xsdt))
}

/// The tables laid out one after another from [`ACPI_START`], with the RSDP's slot first.
struct TableImage {
    bytes: Vec<u8>,
}

impl TableImage {
    fn new() -> Self {
        Self {
            bytes: vec![0; Rsdp::len()],
        }
    }

    /// Appends `table` at the next aligned offset and returns its guest address.
    fn push(&mut self, table: &[u8]) -> u64 {
        let offset = self.bytes.len().next_multiple_of(TABLE_ALIGN);
        self.bytes.resize(offset, 0);
        self.bytes.extend_from_slice(table);
        ACPI_START + offset as u64
    }

    fn finish(mut self, rsdp: &Rsdp) -> Vec<u8> {
        let rsdp = aml_bytes(rsdp);
        self.bytes[..rsdp.len()].copy_from_slice(&rsdp);
        self.bytes
    }
}

fn aml_bytes(object: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    bytes
}

/// A hardware-reduced FADT pointing at the DSDT. Sleep control and status registers stay
/// zero: the guest has no ACPI way to power off. The power and sleep button flags say that
/// there are no fixed-feature buttons.
fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.finalize()
}

/// The DSDT: a definition block whose namespace names the legacy devices whose resources the
/// guest cannot find otherwise.
fn dsdt(virtio: &[(u64, u32)]) -> Sdt {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_body(virtio));
    dsdt
}

const _: () = assert!(COM1_LEN <= u8::MAX as u16);

/// `\_SB.COM1`, the 16550 UART.
///
/// Linux on a hardware-reduced platform drops the 8259 PIC and with it the identity mapping of
/// ISA IRQs 0-15 onto IOAPIC pins, so the IRQ 4 its built-in COM1 port assumes has no IRQ
/// descriptor and opening `ttyS0` fails. Described here, the port is claimed through ACPI,
/// which maps GSI 4 on the IOAPIC (edge-triggered, active high, as the UART signals it).
///
/// Then one `\_SB.VRnn` per virtio-mmio device: `LNRO0005` is the ACPI ID Linux's
/// virtio_mmio driver matches, with the register window and the interrupt (edge-triggered,
/// active high: each irqfd write is one edge) as its resources.
fn dsdt_body(virtio: &[(u64, u32)]) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &0u8);
    let io = aml::IO::new(COM1_BASE, COM1_BASE, 1, COM1_LEN as u8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let virtio: Vec<Vec<u8>> = virtio
        .iter()
        .enumerate()
        .map(|(i, &(base, gsi))| virtio_device(i, base, gsi))
        .collect();
    let mut devices: Vec<&dyn Aml> = vec![&com1];
    let raw: Vec<RawAml> = virtio.iter().map(|b| RawAml(b)).collect();
    devices.extend(raw.iter().map(|r| r as &dyn Aml));
    aml_bytes(&aml::Scope::new("\\_SB_".into(), devices))
}

/// Bytes already encoded as AML, to nest in a scope.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

/// `Device (VRnn)` for virtio-mmio device `index`.
fn virtio_device(index: usize, base: u64, gsi: u32) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &(index as u32));
    let window = aml::Memory32Fixed::new(true, base as u32, VIRTIO_MMIO_SIZE as u32);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&window, &irq]),
    );
    let name = format!("VR{index:02X}");
    aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    ))
}

/// The MADT: one enabled local APIC per CPU (APIC ID and processor UID both the vCPU index),
/// the IOAPIC with ID `num_cpus` serving GSIs from 0, and NMIs on LINT1 of every local APIC.
fn madt(num_cpus: u8) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(MADT_LOCAL_APIC_ADDR_OFFSET, APIC_DEFAULT_ADDR);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);

    for cpu in 0..num_cpus {
        let lapic = ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled);
        madt.append_slice(&aml_bytes(&lapic));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(num_cpus, IOAPIC_ADDR, 0)));
    if let Some(gsi) = isa_irq0_override() {
        madt.append_slice(&interrupt_override(0, gsi));
    }
    madt.append_slice(&local_apic_nmi(ALL_PROCESSORS, NMI_LINT));
    madt
}

/// The GSI an interrupt source override must send ISA IRQ 0 (the PIT) to, or `None` when
/// none is needed.
///
/// ACPI maps every ISA IRQ without an override to the GSI of the same number, and with the
/// IOAPIC's GSI base at 0 that GSI is the pin of the same number. KVM's default routing puts
/// the PIT on pin 0 ([`ISA_IRQ0_IOAPIC_PIN`]), which is exactly that default, so the MADT
/// carries no override. Linux would parse an explicit 0 -> 0 override correctly too, but it
/// would say nothing the default does not, while sending the entry through Linux's special
/// cases for IRQ 0 overrides (the command-line and DMI quirks that ignore them, the pin 2
/// polarity fix-up). Only a VMM routing the PIT to pin 2, as QEMU does, needs the override,
/// and then it gets one. Linux on a hardware-reduced platform does not use the PIT as its
/// timer at all (the local APIC timer takes over), so this matters to other guests more.
const fn isa_irq0_override() -> Option<u32> {
    if ISA_IRQ0_IOAPIC_PIN == 0 {
        None
    } else {
        Some(ISA_IRQ0_IOAPIC_PIN as u32)
    }
}

/// ISA IRQ `source` delivered on GSI `gsi`, with the bus's polarity and trigger mode.
fn interrupt_override(source: u8, gsi: u32) -> Vec<u8> {
    let mut entry = vec![
        MADT_INTERRUPT_OVERRIDE,
        MADT_INTERRUPT_OVERRIDE_LEN,
        ISA_BUS,
        source,
    ];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    entry
}

/// NMIs on input LINT`lint` of the local APIC of processor `uid`.
fn local_apic_nmi(uid: u8, lint: u8) -> Vec<u8> {
    let mut entry = vec![MADT_LOCAL_APIC_NMI, MADT_LOCAL_APIC_NMI_LEN, uid];
    entry.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    entry.push(lint);
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Guest memory covering the first MiB, BIOS area included.
    fn low_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
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

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// The whole table at `addr`, as long as its header says.
    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, SDT_HEADER_LEN as usize);
        read(mem, addr, u32_at(&header, 4) as usize)
    }

    /// Every table reachable from the RSDP, found the way a guest finds them, with addresses.
    struct Tables {
        rsdp: Vec<u8>,
        xsdt: (u64, Vec<u8>),
        fadt: (u64, Vec<u8>),
        dsdt: (u64, Vec<u8>),
        madt: (u64, Vec<u8>),
    }

    fn tables(mem: &GuestMemoryMmap, rsdp_addr: u64) -> Tables {
        let rsdp = read(mem, rsdp_addr, 36);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = table_at(mem, xsdt_addr);
        let mut fadt = None;
        let mut madt = None;
        for entry in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(entry.try_into().unwrap());
            let table = table_at(mem, addr);
            match &table[0..4] {
                b"FACP" => fadt = Some((addr, table)),
                b"APIC" => madt = Some((addr, table)),
                other => panic!("unexpected table {other:?} in the XSDT"),
            }
        }
        let fadt = fadt.expect("the XSDT lists no FADT");
        let dsdt_addr = u64_at(&fadt.1, 140);
        let dsdt = (dsdt_addr, table_at(mem, dsdt_addr));
        Tables {
            rsdp,
            xsdt: (xsdt_addr, xsdt),
            fadt,
            dsdt,
            madt: madt.expect("the XSDT lists no MADT"),
        }
    }

    fn setup(num_cpus: u8) -> Tables {
        let mem = low_memory();
        let rsdp_addr = setup_acpi(&mem, num_cpus, &[]).unwrap();
        tables(&mem, rsdp_addr)
    }

    /// The MADT's interrupt controller structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut offset = MADT_HEADER_LEN as usize;
        while offset < madt.len() {
            let len = usize::from(madt[offset + 1]);
            assert!(len >= 2, "zero-length MADT entry at {offset}");
            entries.push((madt[offset], &madt[offset..offset + len]));
            offset += len;
        }
        assert_eq!(offset, madt.len(), "the last MADT entry overruns the table");
        entries
    }

    fn madt_entries_of_type(madt: &[u8], entry_type: u8) -> Vec<&[u8]> {
        madt_entries(madt)
            .into_iter()
            .filter(|(t, _)| *t == entry_type)
            .map(|(_, e)| e)
            .collect()
    }

    #[test]
    fn rsdp_is_at_acpi_start_with_both_checksums_right() {
        let mem = low_memory();
        let rsdp_addr = setup_acpi(&mem, 2, &[]).unwrap();
        assert_eq!(rsdp_addr, ACPI_START);
        assert_eq!(rsdp_addr % 16, 0);

        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "length");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&rsdp), 0, "extended checksum");
    }

    #[test]
    fn xsdt_reaches_fadt_and_madt() {
        let tables = setup(2);
        let xsdt = &tables.xsdt.1;
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        assert_eq!(&tables.fadt.1[0..4], b"FACP");
        assert_eq!(&tables.madt.1[0..4], b"APIC");
    }

    #[test]
    fn every_table_sums_to_zero() {
        for num_cpus in [1, 2, 7, MAX_CPUS] {
            let t = setup(num_cpus);
            for (name, table) in [
                ("XSDT", &t.xsdt.1),
                ("FADT", &t.fadt.1),
                ("DSDT", &t.dsdt.1),
                ("MADT", &t.madt.1),
            ] {
                assert_eq!(sum(table), 0, "{name} checksum with {num_cpus} CPUs");
            }
        }
    }

    #[test]
    fn tables_do_not_overlap_and_stay_in_the_reserved_area() {
        let t = setup(MAX_CPUS);
        let mut ranges = vec![(ACPI_START, ACPI_START + t.rsdp.len() as u64)];
        for (addr, table) in [&t.xsdt, &t.fadt, &t.dsdt, &t.madt] {
            ranges.push((*addr, addr + table.len() as u64));
        }
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{:x?} overlaps {:x?}",
                pair[0],
                pair[1]
            );
        }
        let end = ranges.last().unwrap().1;
        assert!(end <= ACPI_START + ACPI_MAX_SIZE);
        assert!(end <= MPTABLE_START);
        assert_eq!(end - ACPI_START, build_tables(MAX_CPUS, &[]).len() as u64);
    }

    #[test]
    fn fadt_is_hardware_reduced_revision_6_and_points_at_the_dsdt() {
        let t = setup(1);
        let fadt = &t.fadt.1;
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "revision");
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer");
        assert_eq!(u64_at(fadt, 140), t.dsdt.0, "X_DSDT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16_at(fadt, 109), IAPC_BOOT_ARCH);
    }

    #[test]
    fn fadt_describes_no_fixed_hardware_and_no_sleep_registers() {
        let t = setup(1);
        let fadt = &t.fadt.1;
        // SCI, SMI command, PM1/PM2/PM timer/GPE blocks and their lengths.
        assert!(fadt[46..96].iter().all(|b| *b == 0));
        // X_PM1a_EVT_BLK through SLEEP_STATUS_REG.
        assert!(fadt[148..268].iter().all(|b| *b == 0));
    }

    #[test]
    fn dsdt_is_a_valid_definition_block_naming_com1() {
        let t = setup(1);
        let dsdt = &t.dsdt.1;
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(dsdt[8], DSDT_REVISION);
        let body = &dsdt[36..];
        assert_eq!(body, dsdt_body(&[]).as_slice());
        let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"COM1"));
        // IO descriptor for 0x3f8..0x3ff and extended interrupt descriptor for GSI 4.
        assert!(contains(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        assert!(contains(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00
        ]));
    }

    #[test]
    fn dsdt_names_each_virtio_device_with_its_window_and_interrupt() {
        let body = dsdt_body(&[(0xd000_0000, 5), (0xd000_1000, 16)]);
        let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"VR00") && contains(b"VR01"));
        assert_eq!(body.windows(9).filter(|w| w == b"LNRO0005\0").count(), 2);
        // Memory32Fixed, read-write, base, 4 KiB; then the edge-triggered GSI.
        assert!(contains(&[
            0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00
        ]));
        assert!(contains(&[
            0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00
        ]));
        assert!(contains(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00
        ]));
        assert!(contains(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x10, 0x00, 0x00, 0x00
        ]));
        // Without devices the DSDT is COM1 alone.
        assert!(!dsdt_body(&[]).windows(8).any(|w| w == b"LNRO0005"));
    }

    #[test]
    fn madt_lists_one_enabled_local_apic_per_cpu() {
        for num_cpus in [1, 4, MAX_CPUS] {
            let t = setup(num_cpus);
            let madt = &t.madt.1;
            assert_eq!(u32_at(madt, 36), APIC_DEFAULT_ADDR);
            let lapics = madt_entries_of_type(madt, 0);
            assert_eq!(lapics.len(), usize::from(num_cpus));
            for (index, lapic) in lapics.iter().enumerate() {
                assert_eq!(lapic.len(), 8);
                assert_eq!(usize::from(lapic[2]), index, "processor UID");
                assert_eq!(usize::from(lapic[3]), index, "APIC ID");
                assert_eq!(u32_at(lapic, 4) & 1, 1, "enabled");
            }
        }
    }

    #[test]
    fn madt_has_one_ioapic_after_the_cpus_serving_gsi_0_up() {
        let num_cpus = 3;
        let t = setup(num_cpus);
        let ioapics = madt_entries_of_type(&t.madt.1, 1);
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!(ioapic.len(), 12);
        assert_eq!(ioapic[2], num_cpus, "IOAPIC ID");
        assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDR);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
    }

    #[test]
    fn madt_wires_nmi_to_lint1_of_every_local_apic() {
        let t = setup(2);
        let nmis = madt_entries_of_type(&t.madt.1, MADT_LOCAL_APIC_NMI);
        assert_eq!(nmis, [[4, 6, 0xff, 0, 0, 1].as_slice()]);
    }

    #[test]
    fn isa_irq0_reaches_the_pin_the_mp_table_names() {
        let t = setup(2);
        let overrides = madt_entries_of_type(&t.madt.1, MADT_INTERRUPT_OVERRIDE);
        let irq0_gsi = overrides
            .iter()
            .find(|e| e[3] == 0)
            .map_or(0, |e| u32_at(e, 4));
        assert_eq!(irq0_gsi, u32::from(ISA_IRQ0_IOAPIC_PIN));
        assert!(overrides.iter().all(|e| e.len() == 10 && e[3] == 0));
    }

    #[test]
    fn madt_flags_say_the_8259s_are_present() {
        let t = setup(1);
        assert_eq!(u32_at(&t.madt.1, 40), MADT_PCAT_COMPAT);
    }

    #[test]
    fn zero_cpus_is_an_error() {
        assert!(matches!(
            setup_acpi(&low_memory(), 0, &[]),
            Err(AcpiError::NoCpus)
        ));
    }

    #[test]
    fn more_than_max_cpus_is_an_error() {
        let err = setup_acpi(&low_memory(), MAX_CPUS + 1, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Too many CPUs for the ACPI tables: 255 requested, at most 254 supported"
        );
    }

    #[test]
    fn guest_memory_below_the_tables_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&mem, 1, &[]),
            Err(AcpiError::TablesOutsideMemory {
                start: ACPI_START,
                ..
            })
        ));
    }

    #[test]
    fn guest_memory_ending_inside_the_tables_is_an_error() {
        let end = ACPI_START as usize + 64;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), end)]).unwrap();
        let err = setup_acpi(&mem, 1, &[]).unwrap_err();
        assert!(matches!(err, AcpiError::TablesOutsideMemory { .. }));
        assert!(err.to_string().starts_with("The ACPI tables ("));
    }
}
